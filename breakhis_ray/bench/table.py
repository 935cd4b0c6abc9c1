"""Targets, the printed table of ratios (with their absolute figures) and the profile text of a bench run."""

from __future__ import annotations

from typing import Any

from breakhis_ray.bench.machine import describe

#: (key, path to the ratio in the results, comparison, target)
TARGETS: tuple[tuple[str, tuple[str, ...], str, float], ...] = (
    ("ingest_shards_vs_dataloader", ("ingest", "ratio_vs_dataloader"), ">=", 1.5),
    ("ingest_same_decoder", ("ingest", "ratio_same_decoder"), ">=", 0.95),
    ("ingest_resized_shards_vs_dataloader", ("ingest", "ratios", "ray_shards_resized_vs_dataloader_steady"), ">=", 1.5),
    ("train_ray_vs_plain", ("train", "ratio_ray_vs_plain"), ">=", 0.95),
    ("inference_classifier_vs_raw", ("inference", "classifier", "ratio_vs_raw"), ">=", 0.85),
    ("inference_unet_classifier_vs_raw", ("inference", "unet_classifier", "ratio_vs_raw"), ">=", 0.95),
    ("inference_classifier_memory_10x", ("inference", "classifier", "peak_rss_ratio"), "<=", 1.3),
    ("inference_unet_classifier_memory_10x", ("inference", "unet_classifier", "peak_rss_ratio"), "<=", 1.3),
)


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def evaluate_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{key: {ratio, op, target, met, off_pct}}`` for every target whose section ran;
    ``off_pct``: how far a missed ratio is from its target, in percent of the target (0 when met)."""
    out = {}
    for key, path, op, target in TARGETS:
        ratio = _get(results, path)
        if ratio is None:
            continue
        met = ratio >= target if op == ">=" else ratio <= target
        off = 0.0 if met else abs(ratio - target) / target * 100
        out[key] = {"ratio": ratio, "op": op, "target": target, "met": bool(met), "off_pct": round(off, 1)}
    return out


# ------------------------------------------------------------------------------------------------ rows
def _verdict(targets: dict, key: str | None) -> tuple[str, str]:
    if key is None or key not in targets:
        return "", "as is"
    t = targets[key]
    verdict = "met" if t["met"] else f"MISSED by {t['off_pct']:.0f}%"
    return f"{t['op']} {t['target']:g}", verdict


def _row(targets: dict, name: str, value: str, baseline: str, ratio: float | None, key: str | None = None) -> str:
    target, verdict = _verdict(targets, key)
    shown = "-" if ratio is None else f"{ratio:.2f}x"
    return f"  {name:<44}{value:>14}{baseline:>14}{shown:>8}  {target:<8}{verdict}"


def _rate(value: float) -> str:
    return f"{value:.1f} img/s"


def _ms(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f} ms/img"


def _backends(r: dict) -> str:
    """``; PNG decode img/s on 1 core: pil 122, wuffs 319, ...`` of a section's ``decode_backends_1core``."""
    rates = r.get("decode_backends_1core") or {}
    return "; PNG decode img/s on 1 core: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) if rates else ""


def _ingest_rows(r: dict, targets: dict) -> list[str]:
    rates, steady, ratios = r["images_per_s"], r["steady_images_per_s"], r["ratios"]
    dl, dl_steady = _rate(rates["dataloader"]), _rate(steady["dataloader"])
    return [
        f"ingest: N={r['n_images']} {r['data_source']} 700x460 PNGs -> {r['size']}x{r['size']}, batch "
        f"{r['batch_size']}; DataLoader num_workers={r['dataloader_workers']} (PIL decode); Ray decode tasks "
        f"{r['decode_num_cpus']} CPU, {r['decode_batch_size']} images each, decoder {r['decode_backend']}; steady = "
        f"marginal rate N -> 2N, best of {r['repeats']}{_backends(r)}",
        _row(targets, "Ray Data, original-PNG shards, steady", _rate(steady["ray_shards"]), dl_steady,
             ratios["ray_shards_vs_dataloader_steady"], "ingest_shards_vs_dataloader"),
        _row(targets, f"same, vs DataLoader with {r['decode_backend']} too", _rate(steady["ray_shards"]),
             _rate(steady["dataloader_fast"]), ratios["ray_shards_vs_dataloader_fast_steady"], "ingest_same_decoder"),
        _row(targets, "Ray Data, shards resized by prepare, steady", _rate(steady["ray_shards_resized"]), dl_steady,
             ratios["ray_shards_resized_vs_dataloader_steady"], "ingest_resized_shards_vs_dataloader"),
        _row(targets, "Ray Data, original-PNG shards, 1 pass of N", _rate(rates["ray_shards"]), dl,
             ratios["ray_shards_vs_dataloader"]),
        _row(targets, "Ray Data, resized shards, 1 pass of N", _rate(rates["ray_shards_resized"]), dl,
             ratios["ray_shards_resized_vs_dataloader"]),
        _row(targets, "Ray Data, materialized (every later epoch)", _rate(rates["ray_cached_epoch"]), dl,
             ratios["ray_cached_epoch_vs_dataloader"]),
        _row(targets, "DataLoader steady vs PIL decode limit", dl_steady, _rate(rates["decode_limit"]),
             ratios["dataloader_steady_vs_decode_limit"]),
        _row(targets, "Ray Data steady vs fast decode+resize limit", _rate(steady["ray_shards"]),
             _rate(rates["fast_decode_resize_limit"]), ratios["ray_shards_steady_vs_fast_decode_resize_limit"]),
        _row(targets, "CPU per image: PIL DataLoader / Ray Data", _ms(r["cpu_ms_per_image"]["dataloader"]),
             _ms(r["cpu_ms_per_image"]["ray_shards"]), ratios["dataloader_vs_ray_shards_cpu_per_image"]),
        _row(targets, f"CPU per image: {r['decode_backend']} DataLoader / Ray Data",
             _ms(r["cpu_ms_per_image"]["dataloader_fast"]), _ms(r["cpu_ms_per_image"]["ray_shards"]),
             ratios["dataloader_fast_vs_ray_shards_cpu_per_image"]),
    ]


def _train_rows(r: dict, targets: dict) -> list[str]:
    device = "GPU" if r["use_gpu"] else "CPU"
    lines = [f"train: {r['image_size']}x{r['image_size']}, batch {r['batch_size']} per worker, {r['torch_threads']} "
             f"torch thread(s) per side, {r['cpus_per_worker']} CPU per worker, {device}; {r['steps']} timed steps "
             f"after {r['warmup_steps']} warm-up (Ray: >= {r['warmup_s']:g} s of steps)"]
    for i, (model, e) in enumerate(r["models"].items()):
        plain = _rate(e["plain"]["images_per_s"])
        lines.append(_row(targets, f"{model}: TorchTrainer 1 worker vs plain loop", _rate(e["ray_1w"]["images_per_s"]),
                          plain, e["ratio_ray_vs_plain"], "train_ray_vs_plain" if i == 0 else None))
        key = f"ray_{r['scale_workers']}w"
        if key in e:
            lines.append(_row(targets, f"{model}: TorchTrainer {r['scale_workers']} workers vs 1",
                              _rate(e[key]["images_per_s"]), _rate(e["ray_1w"]["images_per_s"]),
                              e["ratio_scale_vs_1"]))
    return lines


def _decode_where(r: dict) -> str:
    """Where the inference pipeline decoded: in the actors, or in tasks of so many CPUs."""
    stages = r.get("stages", {})
    if stages.get("placement") == "actors":
        return "decode in the actors"
    return f"decode tasks {r['decode_num_cpus']} CPU x {stages.get('decode_tasks', '?')}"


def _inference_rows(r: dict, targets: dict) -> list[str]:
    actor = r["actor"]
    lines = [f"inference: {r['classifier_model']} at {r['input_size']}, U-Net resnet18 at {r['segment_size']}, "
             f"{r['image_size_hw'][1]}x{r['image_size_hw'][0]} PNGs, batch {r['batch_size']}; {actor['concurrency']} "
             f"actor(s) x {actor['num_cpus']} CPU, {actor['num_gpus']} GPU, {actor['torch_threads']} torch thread(s); "
             f"{_decode_where(r)}; "
             f"classifier N={r['n_images']}, {r['scale']}N={r['n_images'] * r['scale']}; U-Net + classifier "
             f"N={r.get('unet_n_images', r['n_images'])}; steady = marginal rate N -> {r['scale']}N, best of "
             f"{r.get('repeats', 1)}{_backends(r)}"]
    for mode, label in (("classifier", "classifier"), ("unet_classifier", "U-Net + classifier")):
        e = r[mode]
        lines.append(_row(targets, f"{label}: pipeline vs {e['raw_kind'].replace('_', ' ')}",
                          _rate(e["steady_images_per_s"]), _rate(e["raw_images_per_s"]), e["ratio_vs_raw"],
                          f"inference_{mode}_vs_raw"))
        lines.append(_row(targets, f"{label}: pipeline vs attainable here",
                          _rate(e["steady_images_per_s"]), _rate(e["attainable_images_per_s"]),
                          e["ratio_vs_attainable"]))
        if "ratio_vs_raw_all_cores" in e:
            lines.append(_row(targets, f"{label}: vs {e['raw_kind'].split('_')[1]}, all cores",
                              _rate(e["steady_images_per_s"]), _rate(e["raw_all_cores_images_per_s"]),
                              e["ratio_vs_raw_all_cores"]))
        lines.append(_row(targets, f"{label}: peak RSS {r['scale']}N vs N",
                          f"{e['pipeline_scale_n']['peak_rss_mb']:.0f} MB", f"{e['pipeline_n']['peak_rss_mb']:.0f} MB",
                          e["peak_rss_ratio"], f"inference_{mode}_memory_10x"))
    if "explain" in r:  # cost of --explain gradcam (classifier alone)
        x = r["explain"]
        lines.append(_row(targets, f"classifier+{x['method']} vs plain: raw Predictor",
                          _rate(x["raw_predictor_explain_images_per_s"]), _rate(x["raw_predictor_images_per_s"]),
                          x["raw_ratio"]))
        lines.append(_row(targets, f"classifier+{x['method']} vs plain: pipeline {x.get('images', '')}",
                          _rate(x["pipeline_explain_images_per_s"]), _rate(x["pipeline_images_per_s"]),
                          x["pipeline_ratio"]))
    return lines


def _synth_rows(r: dict, targets: dict) -> list[str]:
    w, h = r["size"]
    return [
        f"synth: {r['images']} tiles of {r['patients']} patients at {w}x{h}{' + masks' if r['masks'] else ''}; "
        f"Ray tasks at {r['task_cpus']} CPU each on {r['cores']} cores",
        _row(targets, "Ray tasks vs one process", _rate(r["images_per_s"]["ray"]), _rate(r["images_per_s"]["single"]),
             r["ratio_ray_vs_single"]),
    ]


SECTIONS = (("ingest", _ingest_rows), ("train", _train_rows), ("inference", _inference_rows), ("synth", _synth_rows))


def format_table(results: dict[str, Any]) -> str:
    """The table: a header naming the machine, then per section its setup line and ratio rows."""
    machine = results["machine"]
    load = " ".join(str(v) for v in machine.get("load_average_start") or [])
    lines = [
        f"breakhis-ray bench{' --quick' if results.get('quick') else ''}, {machine['date']}, "
        f"wall {results['wall_s']:.0f} s",
        f"machine: {describe(machine)}; load average at start {load}",
        f"  {'measure':<44}{'value':>14}{'baseline':>14}{'ratio':>8}  {'target':<8}verdict",
    ]
    targets = results.get("targets", {})
    for name, rows in SECTIONS:
        if name in results:
            lines.extend(rows(results[name], targets))
    others = results.get("others_cpu_cores") or {}
    if others:
        shown = ", ".join(f"{k} {'?' if v is None else v}" for k, v in others.items())
        lines.append(f"other processes on this machine meanwhile (average busy cores): {shown}; Ray workers at "
                     f"niceness {machine.get('ray_worker_niceness', '?')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- profile
def limits(results: dict[str, Any]) -> list[str]:
    """One line per missed target saying what bounds it, from the measured figures."""
    targets = results.get("targets", {})
    missed = {k for k, t in targets.items() if not t["met"]}
    out = []
    if missed & {"ingest_shards_vs_dataloader", "ingest_same_decoder", "ingest_resized_shards_vs_dataloader"}:
        r, rates = results["ingest"]["ratios"], results["ingest"]["images_per_s"]
        out.append(f"ingest: per core, PIL decodes {rates['pil_decode_1core']:.1f} img/s and "
                   f"{results['ingest']['decode_backend']} {rates['fast_decode_1core']:.1f} "
                   f"({r['fast_vs_pil_decode_1core']:.2f}x); with the resize, {rates['pil_decode_resize_1core']:.1f} "
                   f"vs {rates['fast_decode_resize_1core']:.1f}: the most any loader can gain over the PIL DataLoader "
                   "by decoding faster. Steady, Ray Data reaches "
                   f"{r['ray_shards_steady_vs_fast_decode_resize_limit']:.2f} of the fast decode+resize limit "
                   f"(cores x 1-core rate, {rates['fast_decode_resize_limit']:.1f} img/s); the PIL DataLoader "
                   f"{r['dataloader_steady_vs_decode_limit']:.2f} of the PIL decode limit. The Ray Data statistics "
                   "below show where a pass spends the rest")
    if "train_ray_vs_plain" in missed:
        first = next(iter(results["train"]["models"].values()))
        ray, plain = first["ray_1w"], first["plain"]
        out.append(f"train: a Ray step takes {ray['step_ms']:.1f} ms ({ray['data_ms']:.1f} ms waiting for data) vs "
                   f"{plain['step_ms']:.1f} ms ({plain['data_ms']:.1f} ms) in the plain loop")
    for mode in ("classifier", "unet_classifier"):
        if f"inference_{mode}_vs_raw" in missed:
            e = results["inference"][mode]
            share = e["attainable_images_per_s"] / e["raw_images_per_s"]
            out.append(f"inference {mode}: decode and model share the cores; attainable here "
                       f"{e['attainable_images_per_s']:.1f} img/s = {share:.2f} of raw (decode "
                       f"{e['decode_1core_images_per_s']:.1f} img/s per core, model stage "
                       f"{e['raw_predictor_images_per_s']:.1f} img/s); the pipeline reaches "
                       f"{e['ratio_vs_attainable']:.2f} of that")
        if f"inference_{mode}_memory_10x" in missed:
            e = results["inference"][mode]
            out.append(f"inference {mode}: peak RSS grew {e['pipeline_n']['peak_rss_mb']:.0f} -> "
                       f"{e['pipeline_scale_n']['peak_rss_mb']:.0f} MB from N to {results['inference']['scale']}N")
    return out


def _train_profile(r: dict) -> list[str]:
    lines = [f"  {'model':<12}{'side':<8}{'img/s':>9}{'step ms':>10}{'data ms':>10}{'compute ms':>12}{'fit s':>8}"]
    for model, e in r["models"].items():
        for side in [k for k, v in e.items() if isinstance(v, dict) and "step_ms" in v]:
            s = e[side]
            fit = f"{s['fit_s']:.1f}" if "fit_s" in s else "-"
            lines.append(f"  {model:<12}{side:<8}{s['images_per_s']:>9.1f}{s['step_ms']:>10.1f}{s['data_ms']:>10.1f}"
                         f"{s['compute_ms']:>12.1f}{fit:>8}")
    return lines


def _inference_profile(r: dict, pieces: dict[str, str]) -> list[str]:
    lines = []
    sweep = r.get("forward_sweep_images_per_s")
    if sweep:
        lines.append(f"  classifier forward alone, img/s by forward batch size ({r['actor']['torch_threads']} thread(s), "
                     "channels-last): " + ", ".join(f"{k}: {v:.1f}" for k, v in sweep.items()))
    for mode in ("classifier", "unet_classifier"):
        e = r[mode]
        lines.append(f"  {mode}: decode+resize {1000 / e['decode_1core_images_per_s']:.1f} ms/img on 1 core, "
                     f"model stage "
                     f"{1000 / e['raw_predictor_images_per_s']:.1f} ms/img ({e['raw_kind']} "
                     f"{1000 / e['raw_images_per_s']:.1f} ms/img); pipeline N {e['pipeline_n']['seconds']} s, "
                     f"{r['scale']}N {e['pipeline_scale_n']['seconds']} s, marginal {e['marginal_images_per_s']} img/s")
    for mode, text in pieces.items():
        lines += ["", f"== inference: cProfile of the raw Predictor pass ({mode}, top by cumulative time) ==", text]
    return lines


def format_profile(results: dict[str, Any], pieces: dict[str, str]) -> str:
    """Where the time goes: limits of missed targets, step breakdowns, Ray Data stats and cProfile output."""
    lines = ["== limits of missed targets ==", *(limits(results) or ["(every target met)"])]
    if "train" in results:
        lines += ["", "== train: time per step (data = waiting for the next batch) ==",
                  *_train_profile(results["train"])]
    if "inference" in results:
        lines += ["", "== inference: per-image costs ==",
                  *_inference_profile(results["inference"], {k[len("inference:"):]: v for k, v in pieces.items()
                                                             if k.startswith("inference:")})]
    if "synth" in results:
        s = results["synth"]
        eff = s["images_per_s"]["ray"] / (s["images_per_s"]["single"] * s["cores"])
        lines += ["", "== synth ==", f"  single process {s['seconds']['single']} s, Ray {s['seconds']['ray']} s: "
                  f"parallel efficiency {eff:.2f} of {s['cores']} cores"]
    if "inference_pipeline" in pieces:
        lines += ["", "== inference: Ray Data statistics of a classifier pipeline pass at "
                  f"{results['inference']['scale']}N ==", pieces["inference_pipeline"]]
    if "ingest" in pieces:
        lines += ["", "== ingest: " + pieces["ingest"]]
    return "\n".join(lines)
