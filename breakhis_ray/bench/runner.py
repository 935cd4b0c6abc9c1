"""Run every enabled benchmark of a :class:`~breakhis_ray.config.BenchConfig` in one process tree, log the
table and write the results JSON with the profile, the resolved config and the library versions beside it
(``runs/bench/bench.json``: ``bench.profile.txt``, ``bench.config.yaml``, ``bench.versions.json``).

The JSON is stable across runs: ``machine``, ``config``, ``wall_s``, ``seconds`` and ``others_cpu_cores``
(per section: average cores busy with processes outside this run, the noise on a shared machine), ``targets``
and one object per section: ``ingest`` (``images_per_s``, ``ratio_vs_dataloader``, ``ratios``), ``train``
(``ratio_ray_vs_plain``, ``ratio_scale_vs_1``, ``models``), ``inference`` (``ratio_vs_raw`` and
``memory_ratio_10x``: the worse of the two modes; ``classifier``, ``unet_classifier``; ``explain``: the
classifier with and without ``--explain gradcam``, raw and in the pipeline, and their ratios) and ``synth``
(``images_per_s``, ``ratio_ray_vs_single``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from breakhis_ray.artifacts import config_text, versions, write_json, write_text_atomic
from breakhis_ray.config import BenchConfig, dump_config

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@contextlib.contextmanager
def _scratch(workdir: str | None) -> Iterator[Path]:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="breakhis-bench-") as tmp:
        yield Path(tmp)


# ---------------------------------------------------------------------------------------------- stages
def _ingest(cfg: BenchConfig, work: Path, gpus: int) -> dict:
    from breakhis_ray.bench.ingest import run_ingest_benchmark

    return run_ingest_benchmark(cfg.ingest, seed=cfg.seed, workdir=str(work))


def _train(cfg: BenchConfig, work: Path, gpus: int) -> dict:
    from breakhis_ray.bench.train import run_train_benchmark

    s = cfg.train
    use_gpu = gpus > 0 if s.use_gpu is None else s.use_gpu
    scale = s.scale_workers if not use_gpu or s.scale_workers <= gpus else 0
    out = run_train_benchmark(s, use_gpu=use_gpu, scale_workers=scale, seed=cfg.seed, workdir=str(work))
    if scale != s.scale_workers:
        out["note"] = f"{s.scale_workers} workers skipped: {gpus} GPU(s) visible"
    return out


def _inference(cfg: BenchConfig, work: Path, gpus: int) -> dict:
    from breakhis_ray.bench.inference import run_inference_benchmark

    s = cfg.inference
    num_gpus = (1.0 if gpus else 0.0) if s.num_gpus is None else s.num_gpus
    out = run_inference_benchmark(s, num_gpus=num_gpus, workdir=str(work))
    modes = [out[m] for m in ("classifier", "unet_classifier")]
    out["ratio_vs_raw"] = min(m["ratio_vs_raw"] for m in modes)
    out["memory_ratio_10x"] = max(m["peak_rss_ratio"] for m in modes)
    return out


def _synth(cfg: BenchConfig, work: Path, gpus: int) -> dict:
    from breakhis_ray.bench.synth import run_synth_benchmark

    return run_synth_benchmark(cfg.synth, seed=cfg.seed, workdir=str(work))


STAGES: tuple[tuple[str, Callable[[BenchConfig, Path, int], dict]], ...] = (
    ("ingest", _ingest), ("train", _train), ("inference", _inference), ("synth", _synth))


def _pop_profiles(results: dict[str, Any]) -> dict[str, str]:
    """Move the text profiles out of the results (they go to the profile file, not the JSON)."""
    pieces = {}
    if "profile" in results.get("ingest", {}):
        pieces["ingest"] = results["ingest"].pop("profile")
    for mode in ("classifier", "unet_classifier"):
        entry = results.get("inference", {}).get(mode, {})
        if "profile" in entry:
            pieces[f"inference:{mode}"] = entry.pop("profile")
    if "pipeline_stats" in results.get("inference", {}):
        pieces["inference_pipeline"] = results["inference"].pop("pipeline_stats")
    return pieces


def _beside(json_out: str, suffix: str) -> str:
    stem = json_out[: -len(".json")] if json_out.endswith(".json") else json_out
    return stem + suffix


def profile_uri(json_out: str) -> str:
    """``runs/bench/bench.json`` -> ``runs/bench/bench.profile.txt``."""
    return _beside(json_out, ".profile.txt")


# ---------------------------------------------------------------------------------------------- driver
def start_ray(cfg: BenchConfig) -> None:
    """Join or start Ray (:func:`~breakhis_ray.ray_utils.ensure_ray`); a local instance started here gets one
    CPU per core and workers at ``cfg.ray_worker_niceness``."""
    import os

    import ray

    from breakhis_ray.ray_utils import cpu_count, ensure_ray

    ray_cfg = cfg.ray if cfg.ray.num_cpus else cfg.ray.model_copy(update={"num_cpus": cpu_count()})
    local = not (ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    if not local or cfg.ray_worker_niceness is None:
        ensure_ray(ray_cfg)
        return
    saved = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = str(cfg.ray_worker_niceness)  # read by the raylet we start
    try:
        ensure_ray(ray_cfg)
    finally:
        if saved is None:
            os.environ.pop("RAY_worker_niceness", None)
        else:
            os.environ["RAY_worker_niceness"] = saved


def _niceness_of_a_worker() -> int | None:
    import os

    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    try:
        return int(ray.get(niceness.remote(), timeout=60))
    except (ray.exceptions.RayError, OSError):
        return None


#: Where ``bench --gpu`` writes its JSON unless ``--json``/``json_out`` says otherwise.
GPU_CHECK_JSON = "runs/bench/gpu_check.json"


def _gpu_check(cfg: BenchConfig, start: float) -> dict[str, Any]:
    from breakhis_ray.bench.gpu import format_gpu_table, run_gpu_check

    json_out = cfg.json_out if "json_out" in cfg.model_fields_set else GPU_CHECK_JSON
    with _scratch(cfg.workdir) as work:
        results = run_gpu_check(cfg, work / "gpu")
    results["wall_s"] = round(time.perf_counter() - start, 1)
    log.info("%s", format_gpu_table(results))
    write_json(json_out, results)
    write_text_atomic(_beside(json_out, ".config.yaml"), config_text(cfg))
    log.info("bench: wrote %s", json_out)
    return results


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the enabled sections in order (ingest, train, inference, synth); log the table; write the JSON
    (``cfg.json_out``), the profile and the provenance beside it; return the results. With ``gpu.enabled``
    (``--gpu``), run the one-shot GPU check instead (:mod:`breakhis_ray.bench.gpu`; JSON at
    :data:`GPU_CHECK_JSON` unless ``json_out`` is given)."""
    from breakhis_ray.bench.machine import load_average, machine_info
    from breakhis_ray.bench.memory import OthersCpu
    from breakhis_ray.allocator import keep_freed_memory
    from breakhis_ray.bench.table import evaluate_targets, format_profile, format_table

    start = time.perf_counter()
    keep_freed_memory()  # the baselines run here: the same allocator setting as the Ray workers and actors
    start_ray(cfg)
    if cfg.gpu.enabled:
        return _gpu_check(cfg, start)
    machine = machine_info()
    machine["ray_worker_niceness"] = _niceness_of_a_worker()
    results: dict[str, Any] = {"schema": SCHEMA_VERSION, "machine": machine, "quick": cfg.quick,
                               "config": dump_config(cfg), "seconds": {}, "others_cpu_cores": {}}
    with _scratch(cfg.workdir) as work:
        for name, stage in STAGES:
            if not getattr(cfg, name).enabled:
                continue
            log.info("bench: %s ...", name)
            t0 = time.perf_counter()
            with OthersCpu() as others:
                results[name] = stage(cfg, work / name, machine["gpu"]["count"])
            results["seconds"][name] = round(time.perf_counter() - t0, 1)
            results["others_cpu_cores"][name] = others.cores
    machine["load_average_end"] = load_average()
    results["wall_s"] = round(time.perf_counter() - start, 1)
    results["targets"] = evaluate_targets(results)
    pieces = _pop_profiles(results)
    table = format_table(results)
    log.info("%s", table)
    write_json(cfg.json_out, results)
    profile = profile_uri(cfg.json_out)
    write_text_atomic(profile, table + "\n\n" + format_profile(results, pieces) + "\n")
    write_text_atomic(_beside(cfg.json_out, ".config.yaml"), config_text(cfg))
    write_json(_beside(cfg.json_out, ".versions.json"), versions())
    log.info("bench: wrote %s and %s", cfg.json_out, profile)
    return results
