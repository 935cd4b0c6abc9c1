"""Batch-inference benchmark: the Ray Data pipeline against the bare model, and its memory at N vs 10N images.

Measured in one run, on the same images, the same checkpoints and the same batch size:

* ``raw_forward``: the classifier's forward pass alone on pre-decoded uint8 tensors (normalisation on the
  device included), with the torch thread count one Predictor actor uses;
* ``raw_predictor``: :class:`breakhis_ray.inference.Predictor` called directly on pre-decoded batches (the
  whole model stage without Ray or decode: segmentation + nuclear features + classifier + output table);
* ``decode_1core``: read-free decode + resize of the encoded images on one core, the CPU-side limit;
  ``decode_backends_1core``: decode alone of the same tiles on one core, every installed PNG backend;
* ``pipeline``: :func:`breakhis_ray.inference.run_infer` end to end (listing, decode tasks, Predictor actors,
  Parquet parts) at ``N`` and ``scale * N`` images, with the decode tasks sized as ``infer`` sizes them
  (:func:`~breakhis_ray.inference.plan.plan_stages`, recorded under ``stages``); ``marginal_images_per_s`` =
  the extra images over the extra seconds, which removes the fixed start-up (actor start, model load). N is
  ``n_images`` for the classifier and ``unet_n_images`` for U-Net + classifier (a U-Net batch takes seconds,
  a classifier batch a tenth of one): the N run must already span several batches per stage, or the
  marginal rate holds start-up effects instead of the steady rate;
* ``peak_rss``: the largest sum of resident memory over the driver and every process it started (raylet,
  Ray workers, actors), sampled every ``sample_interval`` seconds during each pipeline run (a sample reads
  ``/proc`` of every process on the machine, a few ms of the driver's CPU, charged to the pipeline); the target is
  ``peak(scale * N) / peak(N) <= 1.3`` (streaming: memory must not grow with the number of images).

The N and ``scale * N`` runs are repeated ``repeats`` times per mode (``marginal_images_per_s_rounds``); the
round with the highest marginal rate counts, with its two runs under ``pipeline_n`` / ``pipeline_scale_n``:
on a 2-core machine one round's marginal rate varied by about 10% from round to round (docs/BENCHMARKS.md).

Derived per mode: ``raw_images_per_s`` (the raw forward for the classifier alone, the raw Predictor for
U-Net + classifier), ``ratio_vs_raw`` = steady pipeline rate (the marginal rate, else the ``scale * N``
rate) / raw, and ``attainable_images_per_s``: what the machine allows when decode and the model share the
cores (on CPU: ``min(pool rate, cores / (decode s/img + model s/img x torch threads))``; with GPUs:
``min(pool rate, decode limit)``; the pool rate is ``actors / model s/img`` beside decode tasks and
``actors / (decode s/img + model s/img)`` when each actor decodes its own batches), with
``ratio_vs_attainable``. Note what ``ratio_vs_raw`` compares: the pipeline decodes every PNG, the raw forward
none, so on CPU it is bounded by ``attainable / raw``, which depends on the cores: on 2 cores with the
classifier's decode + resize (4.5-5 ms/img) as long as its forward at one thread (4.5 ms/img) that bound is
about 0.9; with cores to spare beside the model's threads it is 1. The pipeline and the raw model run with the
actors' torch threads (``stages``); ``raw_all_cores_images_per_s`` is the raw model with a thread per core,
and ``ratio_vs_raw_all_cores`` the pipeline against it, for reference.

Each is done for the classifier alone and for U-Net + classifier. With ``explain`` (default), ``explain``
holds the cost of ``--explain gradcam`` on the classifier: the raw Predictor with and without it
(``raw_ratio``) and the pipeline over the same ``scale * unet_n_images`` images with and without it
(``pipeline_ratio``); heatmap PNGs are written in both. Images are synthetic H&E-like tiles at the
BreakHis size (700x460 PNG) unless ``image_size`` says otherwise; models have random weights.

Sizes come from :class:`~breakhis_ray.config.BenchInferenceSection` (``breakhis-ray bench
inference.n_images=...``; ``python benchmarks/inference.py`` runs this section alone through the same config).
With ``profile``, a cProfile of the raw Predictor pass (where the model stage's time goes) is returned under
``profile``.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from breakhis_ray.bench.memory import PeakSampler, process_tree_rss
from breakhis_ray.config import InferConfig, validate_config
from breakhis_ray.inference.plan import StagePlan

if TYPE_CHECKING:  # pragma: no cover
    from breakhis_ray.config import BenchInferenceSection


# ---------------------------------------------------------------------------------------------- data
def _tissue(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An H&E-like tile: pink stroma, purple nuclei, pixel noise (so PNG decode costs what real tiles do)."""
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = (232, 168, 198)
    n = max(8, height * width // 1500)
    cy, cx = rng.integers(0, height, n), rng.integers(0, width, n)
    radius = rng.uniform(3, 8, n)
    yy, xx = np.mgrid[:height, :width]
    for y, x, r in zip(cy, cx, radius):
        y0, y1, x0, x1 = max(0, y - 9), min(height, y + 9), max(0, x - 9), min(width, x + 9)
        blob = (yy[y0:y1, x0:x1] - y) ** 2 + (xx[y0:y1, x0:x1] - x) ** 2 <= r * r
        img[y0:y1, x0:x1][blob] = (72, 42, 128)
    img += rng.normal(0, 9, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(root: Path, count: int, image_size: tuple[int, int], distinct: int = 16, seed: int = 0) -> list[str]:
    """``count`` PNG files (``distinct`` different tiles, repeated under different names)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(min(distinct, count)):
        buf = io.BytesIO()
        Image.fromarray(_tissue(rng, *image_size)).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    paths = []
    for i in range(count):
        path = root / f"{i // 1000:03d}" / f"tile-{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded[i % len(encoded)])
        paths.append(str(path))
    return paths


def write_checkpoints(work: Path, classifier: str, input_size: int, segment_size: int) -> tuple[str, str]:
    import torch

    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.models import create_model, create_unet

    torch.manual_seed(0)
    clf = create_model(classifier, num_classes=2)
    save_checkpoint(str(work / "classifier"), clf, preprocessing={"size": [input_size, input_size]})
    unet = create_unet(encoder="resnet18", classes=1)
    save_checkpoint(str(work / "unet"), unet, preprocessing={"size": [segment_size, segment_size]})
    return str(work / "classifier"), str(work / "unet")


# ----------------------------------------------------------------------------------------- baselines
def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else float("inf")


def _sig(ratio: float) -> float:
    """A ratio to 3 significant digits (a tiny one stays above 0)."""
    return float(f"{ratio:.3g}")


def profile_text(func, top: int = 18) -> str:
    """Run ``func()`` under cProfile; the ``top`` functions by cumulative time, as text."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        func()
    finally:
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("cumulative").print_stats(top)
    return out.getvalue().strip()


def raw_baselines(classifier: str, segmenter: str | None, encoded: list[bytes], batch_size: int,
                  threads: int, profile: bool = False) -> dict[str, Any]:
    """Model-stage throughput on pre-decoded batches, in this process, with ``threads`` torch threads
    (``profile``: also a cProfile of one more, untimed, Predictor pass under ``profile``)."""
    import torch

    from breakhis_ray.data.transforms import normalize
    from breakhis_ray.inference import Predictor

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictor = Predictor.from_checkpoint(classifier, segmenter, torch_threads=threads)
        batch = predictor.decode(encoded)  # not timed: decode happens in the CPU stage
        n = len(encoded)
        batches = [{k: v[i:i + batch_size] for k, v in batch.items()} for i in range(0, n, batch_size)]
        predictor(batches[0])  # warm-up
        start = time.perf_counter()
        for b in batches:
            predictor(b)
        predictor_s = time.perf_counter() - start
        out = {"raw_predictor_images_per_s": _rate(n, predictor_s)}
        if profile:
            out["profile"] = profile_text(lambda: [predictor(b) for b in batches])
        if segmenter is None:
            # the model at its best: the layout and forward batch size the Predictor runs it with
            layout, step = predictor.memory_format, predictor.forward_batch_size or batch_size
            with torch.inference_mode():
                tensors = [torch.from_numpy(b["_image"]) for b in batches]
                predictor.model(normalize(tensors[0], predictor.spec, memory_format=layout)[:step])
                start = time.perf_counter()
                for t in tensors:
                    x = normalize(t.to(predictor.device), predictor.spec, memory_format=layout)
                    for i in range(0, len(x), step):
                        predictor.model(x[i:i + step])
                forward_s = time.perf_counter() - start
            out["raw_forward_images_per_s"] = _rate(n, forward_s)
            out["forward_batch_size"] = step
        return out
    finally:
        torch.set_num_threads(previous)


def forward_sweep(classifier: str, encoded: list[bytes], sizes: list[int], threads: int) -> dict[str, float]:
    """The classifier's forward alone (pre-decoded, normalised, in the Predictor's layout) in img/s at each
    forward batch size in ``sizes``, interleaved and best of 3, with ``threads`` torch threads: where
    :data:`~breakhis_ray.inference.predictor.CPU_FORWARD_BATCH` comes from."""
    import torch

    from breakhis_ray.data.transforms import normalize
    from breakhis_ray.inference import Predictor

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        predictor = Predictor.from_checkpoint(classifier, torch_threads=threads)
        images = torch.from_numpy(predictor.decode(encoded)["_image"])
        need = 2 * max(sizes)
        images = images.repeat(-(-need // len(images)), 1, 1, 1)[:need]
        x = normalize(images, predictor.spec, memory_format=predictor.memory_format)
        best = {size: float("inf") for size in sizes}
        with torch.inference_mode():
            for size in sizes:
                predictor.model(x[:size])
            for _ in range(3):
                for size in sizes:
                    start = time.perf_counter()
                    for i in range(0, need, size):
                        predictor.model(x[i:i + size])
                    best[size] = min(best[size], time.perf_counter() - start)
        return {str(size): _rate(need, seconds) for size, seconds in best.items()}
    finally:
        torch.set_num_threads(previous)


def explain_cost(classifier: str, encoded: list[bytes], batch_size: int, threads: int, heatmap_dir: str,
                 method: str = "gradcam") -> dict[str, Any]:
    """The classifier's raw Predictor with and without class-activation maps (PNG writing included), on the
    same pre-decoded batches in this process: img/s of each and ``explain / plain``."""
    import torch

    from breakhis_ray.inference import Predictor

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plain = Predictor.from_checkpoint(classifier, torch_threads=threads)
        explained = Predictor.from_checkpoint(classifier, torch_threads=threads, explain=method,
                                              heatmap_dir=heatmap_dir)
        batch = plain.decode(encoded)
        n = len(encoded)
        batches = [{k: v[i:i + batch_size] for k, v in batch.items()} for i in range(0, n, batch_size)]
        rates = {}
        for name, predictor in (("plain", plain), ("explain", explained)):
            predictor(batches[0])  # warm-up
            start = time.perf_counter()
            for b in batches:
                predictor(b)
            rates[name] = _rate(n, time.perf_counter() - start)
        return {"method": method, "raw_predictor_images_per_s": rates["plain"],
                "raw_predictor_explain_images_per_s": rates["explain"],
                "raw_ratio": round(rates["explain"] / rates["plain"], 3)}
    finally:
        torch.set_num_threads(previous)


def decode_rate(encoded: list[bytes], preprocessing: dict, segment_size, backend: str | None = None) -> float:
    """Images per second for decode + resize (+ segmenter copy) on one core, bytes already in memory
    (``backend``: the PNG decoder, default as ``infer``'s)."""
    from breakhis_ray.data.transforms import PreprocessSpec
    from breakhis_ray.inference import decode_for_models

    spec = PreprocessSpec.from_dict(preprocessing)
    start = time.perf_counter()
    for data in encoded:
        decode_for_models(data, spec, segment_size, max_pixels=10**9, backend=backend)
    return _rate(len(encoded), time.perf_counter() - start)


# ------------------------------------------------------------------------------------------ pipeline
def pipeline_run(cfg_values: dict, sample_interval: float) -> dict[str, Any]:
    from breakhis_ray.inference import run_infer

    cfg = validate_config(InferConfig, cfg_values)
    before = process_tree_rss()
    with PeakSampler(sample_interval) as sampler:
        start = time.perf_counter()
        summary = run_infer(cfg)
        seconds = time.perf_counter() - start
    if summary["total"] != summary["ok"] or not summary["complete"]:
        raise RuntimeError(f"benchmark run did not predict every image: {summary}")
    return {
        "images": summary["total"],
        "seconds": round(seconds, 2),
        "images_per_s": _rate(summary["total"], seconds),
        "rss_before_mb": round(before / 2**20, 1),
        "peak_rss_mb": round(sampler.peak / 2**20, 1),
    }


def pipeline_stats(cfg_values: dict) -> str:
    """One pass over the dataset :func:`breakhis_ray.inference.run_infer` builds (``build_dataset``), without
    writing parts; returns Ray Data's per-operator statistics (where the pipeline's time goes)."""
    from breakhis_ray.inference import build_dataset, new_run_id, plan_inputs, resolve_sizes

    cfg = validate_config(InferConfig, cfg_values)
    plan = plan_inputs(cfg)
    preprocessing, segment_size = resolve_sizes(cfg.classifier, cfg.segmenter, cfg.segment_size)
    ds = build_dataset(cfg, plan, list(range(plan.n_chunks)), preprocessing, segment_size, new_run_id())
    start = time.perf_counter()
    rows = sum(batch.num_rows for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    seconds = time.perf_counter() - start
    return f"{rows} images in {seconds:.1f} s ({_rate(rows, seconds)} img/s)\n{ds.stats()}"


def run_inference_benchmark(
    section: "BenchInferenceSection",
    *,
    num_gpus: float = 0.0,
    workdir: str | None = None,
    sample_interval: float = 0.25,
) -> dict[str, Any]:
    """Pipeline vs raw model throughput and peak memory at ``n_images`` and ``scale * n_images``.

    ``section`` gives the sizes: ``image_size`` is (H, W) of the synthetic PNGs; ``classifier`` any
    ``create_model`` name (random weights) at ``input_size``; the U-Net (resnet18 encoder) sees
    ``segment_size`` squares. ``num_gpus`` per actor is resolved by the caller (``section.num_gpus`` may be
    null: "1 with CUDA"). Returns a JSON-safe dict (see the module docstring for every number); with
    ``section.profile``, each mode also holds a cProfile text of its raw Predictor pass under ``profile``, and
    ``pipeline_stats`` holds Ray Data's statistics of one more (untimed) classifier pipeline pass over the
    ``scale * N`` images.
    """
    from breakhis_ray.config import RayConfig
    from breakhis_ray.ray_utils import cpu_count, ensure_ray

    n_images, scale, image_size = section.n_images, section.scale, tuple(section.image_size)
    unet_n = section.unet_n_images or n_images
    classifier, input_size, segment_size = section.classifier, section.input_size, section.segment_size
    batch_size = section.batch_size
    profile = section.profile

    work = Path(workdir or tempfile.mkdtemp(prefix="bench-infer-"))
    work.mkdir(parents=True, exist_ok=True)
    big = max(n_images, unet_n) * scale
    paths = write_images(work / "images_big", big, image_size)

    def image_set(count: int) -> Path:
        """A folder holding the first ``count`` images (hard links)."""
        if count == big:
            return work / "images_big"
        root = work / f"images_{count}"
        for p in paths[:count]:
            dst = root / Path(p).relative_to(work / "images_big")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                os.link(p, dst)
        return root

    clf_ckpt, unet_ckpt = write_checkpoints(work, classifier, input_size, segment_size)
    encoded = [Path(p).read_bytes() for p in paths[:max(n_images, unet_n)]]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    ensure_ray(RayConfig(num_cpus=cpu_count()))
    from breakhis_ray.inference import resolve_sizes
    from breakhis_ray.inference.driver import cluster_stage_plan

    # the pipeline settings every run shares (what is null here is planned from the cores, as `infer` does)
    common = {"classifier": clf_ckpt, "batch_size": batch_size, "num_gpus": num_gpus,
              "decode_placement": section.decode_placement}
    for key in ("num_cpus", "concurrency", "decode_num_cpus", "decode_batch_size"):
        if getattr(section, key) is not None:
            common[key] = getattr(section, key)
    stages = cluster_stage_plan(validate_config(InferConfig, {**common, "input": str(work), "out": str(work)}))
    threads = stages.torch_threads

    results: dict[str, Any] = {
        "n_images": n_images,
        "unet_n_images": unet_n,
        "scale": scale,
        "repeats": section.repeats,
        "image_size_hw": list(image_size),
        "classifier_model": classifier,
        "input_size": input_size,
        "segment_size": segment_size,
        "batch_size": batch_size,
        "actor": {"concurrency": stages.actors, "num_cpus": stages.actor_cpus, "num_gpus": num_gpus,
                  "torch_threads": threads},
        "decode_placement": stages.placement,
        "decode_num_cpus": stages.decode_num_cpus,
        "decode_batch_size": stages.decode_batch,
        "stages": stages.as_dict(),
        "cores": cpu_count(),
        "workdir": str(work),
    }
    from breakhis_ray.data.decode import backend_rates

    results["decode_backends_1core"] = backend_rates(encoded[:48], repeats=2)
    if section.forward_sweep:
        results["forward_sweep_images_per_s"] = forward_sweep(clf_ckpt, encoded[:n_images], section.forward_sweep,
                                                              threads)

    # One unmeasured run first: the first Ray Data execution of a process pays one-time costs (worker
    # pool start, imports in the driver) that would otherwise land on whichever run comes first.
    pipeline_run({**common, "input": str(image_set(min(n_images, unet_n))), "out": str(work / f"out-{stamp}-warmup")},
                 sample_interval)
    for mode, segmenter, count in (("classifier", None, n_images), ("unet_classifier", unet_ckpt, unet_n)):
        prep, seg_size = resolve_sizes(clf_ckpt, segmenter)
        sample = encoded[:count]
        entry: dict[str, Any] = {"n_images": count,
                                 "decode_1core_images_per_s": decode_rate(sample, prep, seg_size),
                                 "decode_1core_pil_images_per_s": decode_rate(sample, prep, seg_size, "pil")}
        entry["decode_limit_images_per_s"] = round(entry["decode_1core_images_per_s"] * results["cores"], 2)
        entry.update(raw_baselines(clf_ckpt, segmenter, sample, batch_size, threads, profile=profile))
        if results["cores"] > threads and not num_gpus:  # the model with every core, for reference
            every = raw_baselines(clf_ckpt, segmenter, sample, batch_size, results["cores"])
            entry["raw_all_cores_images_per_s"] = every.get("raw_forward_images_per_s",
                                                            every["raw_predictor_images_per_s"])
        rounds = []
        for r in range(section.repeats):
            runs = {}
            for label, n in (("n", count), ("scale_n", count * scale)):
                values = {**common, "input": str(image_set(n)), "segmenter": segmenter, "chunk_size": max(8, n // 8),
                          "out": str(work / f"out-{stamp}-{mode}-{label}-{r}")}
                runs[label] = pipeline_run(values, sample_interval)
            extra_s = runs["scale_n"]["seconds"] - runs["n"]["seconds"]
            rounds.append((_rate(count * (scale - 1), extra_s) if extra_s > 0 else None, runs))
        if profile and mode == "classifier":
            values = {**common, "input": str(image_set(count * scale)), "chunk_size": max(8, count * scale // 8),
                      "out": str(work / f"out-{stamp}-{mode}-stats")}
            results["pipeline_stats"] = pipeline_stats(values)
        entry["marginal_images_per_s_rounds"] = [m for m, _ in rounds]
        marginal, best = max(rounds, key=lambda mr: mr[0] or 0.0)
        entry["marginal_images_per_s"] = marginal
        # this round's two runs give the end-to-end rate and memory too (the table shows their two peaks)
        entry["pipeline_n"], entry["pipeline_scale_n"] = small, large = best["n"], best["scale_n"]
        raw = entry["raw_predictor_images_per_s"]
        entry["pipeline_vs_raw_predictor"] = round(large["images_per_s"] / raw, 3)
        if entry["marginal_images_per_s"]:
            entry["marginal_vs_raw_predictor"] = round(entry["marginal_images_per_s"] / raw, 3)
        entry["peak_rss_ratio"] = round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)
        entry["peak_rss_ratio_ok"] = entry["peak_rss_ratio"] <= 1.3
        entry.update(derived_ratios(entry, results["cores"], stages, num_gpus))
        results[mode] = entry
    if section.explain:  # the cost of --explain gradcam on the classifier: raw Predictor and pipeline
        cost = explain_cost(clf_ckpt, encoded[:unet_n], batch_size, threads, str(work / f"heatmaps-{stamp}"))
        n = unet_n * scale  # a Grad-CAM pass costs about what a U-Net pass does: the same count
        values = {**common, "input": str(image_set(n)), "chunk_size": max(8, n // 8)}
        cost["images"] = n
        cost["pipeline_plain"] = pipeline_run({**values, "out": str(work / f"out-{stamp}-plain")}, sample_interval)
        cost["pipeline_explain"] = pipeline_run({**values, "out": str(work / f"out-{stamp}-explain"),
                                                 "explain": {"method": cost["method"]}}, sample_interval)
        cost["pipeline_images_per_s"] = cost["pipeline_plain"]["images_per_s"]
        cost["pipeline_explain_images_per_s"] = cost["pipeline_explain"]["images_per_s"]
        cost["pipeline_ratio"] = round(cost["pipeline_explain_images_per_s"] / cost["pipeline_images_per_s"], 3)
        results["explain"] = cost
    return results


def derived_ratios(entry: dict[str, Any], cores: int, stages: StagePlan, num_gpus: float) -> dict[str, Any]:
    """Raw reference, steady pipeline rate and the machine's attainable rate (see the module docstring)."""
    raw_kind = "raw_forward" if "raw_forward_images_per_s" in entry else "raw_predictor"
    raw = entry[f"{raw_kind}_images_per_s"]
    steady = entry["marginal_images_per_s"] or entry["pipeline_scale_n"]["images_per_s"]
    decode_s = 1.0 / entry["decode_1core_images_per_s"]
    model_s = 1.0 / entry["raw_predictor_images_per_s"]
    if stages.placement == "actors":  # each actor decodes a batch, then runs the model on it
        model_rate = stages.actors / (decode_s + model_s)
    else:
        model_rate = stages.actors / model_s
    if num_gpus:
        attainable = min(model_rate, cores / decode_s)
    else:
        attainable = min(model_rate, cores / (decode_s + model_s * stages.torch_threads))
    out = {
        "raw_kind": raw_kind,
        "raw_images_per_s": raw,
        "steady_images_per_s": steady,
        "ratio_vs_raw": _sig(steady / raw),
        "ratio_vs_raw_end_to_end": _sig(entry["pipeline_scale_n"]["images_per_s"] / raw),
        "attainable_images_per_s": round(attainable, 2),
        "ratio_vs_attainable": _sig(steady / attainable),
    }
    if "raw_all_cores_images_per_s" in entry:
        out["ratio_vs_raw_all_cores"] = _sig(steady / entry["raw_all_cores_images_per_s"])
    return out
