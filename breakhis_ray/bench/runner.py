"""Run every enabled benchmark of a :class:`~breakhis_ray.config.BenchConfig` in one process tree, print the
table and write the results JSON with the profile beside it.

The JSON is stable across runs: ``machine``, ``config``, ``wall_s``, ``seconds`` and ``others_cpu_cores``
(per section: average cores busy with processes outside this run, the noise on a shared machine), ``targets``
and one object per section: ``ingest`` (``images_per_s``, ``ratio_vs_dataloader``, ``ratios``), ``train``
(``ratio_ray_vs_plain``, ``ratio_scale_vs_1``, ``models``), ``inference`` (``ratio_vs_raw`` and
``memory_ratio_10x``: the worse of the two modes; ``classifier``, ``unet_classifier``) and ``synth``
(``images_per_s``, ``ratio_ray_vs_single``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from breakhis_ray import storage
from breakhis_ray.config import BenchConfig, dump_config

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

    s = cfg.ingest
    return run_ingest_benchmark(s.n_images, s.size, workdir=str(work), batch_size=s.batch_size, workers=s.workers,
                                source=s.source, seed=cfg.seed, decode_num_cpus=s.decode_num_cpus,
                                decode_batch_size=s.decode_batch_size)


def _train(cfg: BenchConfig, work: Path, gpus: int) -> dict:
    from breakhis_ray.bench.train import run_train_benchmark

    s = cfg.train
    use_gpu = gpus > 0 if s.use_gpu is None else s.use_gpu
    scale = s.scale_workers if not use_gpu or s.scale_workers <= gpus else 0
    out = run_train_benchmark(s.models, image_size=s.image_size, batch_size=s.batch_size,
                              warmup_steps=s.warmup_steps, warmup_s=s.warmup_s, steps=s.steps,
                              torch_threads=s.torch_threads,
                              cpus_per_worker=s.cpus_per_worker, scale_workers=scale, use_gpu=use_gpu,
                              seed=cfg.seed, workdir=str(work))
    if scale != s.scale_workers:
        out["note"] = f"{s.scale_workers} workers skipped: {gpus} GPU(s) visible"
    return out


def _inference(cfg: BenchConfig, work: Path, gpus: int) -> dict:
    from breakhis_ray.bench.inference import run_inference_benchmark

    s = cfg.inference
    out = run_inference_benchmark(
        s.n_images, scale=s.scale, image_size=s.image_size, classifier=s.classifier, input_size=s.input_size,
        segment_size=s.segment_size, batch_size=s.batch_size, num_cpus=s.num_cpus,
        num_gpus=(1.0 if gpus else 0.0) if s.num_gpus is None else s.num_gpus, concurrency=s.concurrency,
        decode_num_cpus=s.decode_num_cpus, decode_batch_size=s.decode_batch_size, workdir=str(work),
        profile=s.profile)
    modes = [out[m] for m in ("classifier", "unet_classifier")]
    out["ratio_vs_raw"] = min(m["ratio_vs_raw"] for m in modes)
    out["memory_ratio_10x"] = max(m["peak_rss_ratio"] for m in modes)
    return out


def _synth(cfg: BenchConfig, work: Path, gpus: int) -> dict:
    from breakhis_ray.bench.synth import run_synth_benchmark

    s = cfg.synth
    return run_synth_benchmark(fraction=s.fraction, patients=s.patients, size=s.size, masks=s.masks,
                               task_cpus=s.task_cpus, seed=cfg.seed, workdir=str(work))


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


def profile_uri(json_out: str) -> str:
    """``runs/bench/bench.json`` -> ``runs/bench/bench.profile.txt``."""
    stem = json_out[: -len(".json")] if json_out.endswith(".json") else json_out
    return stem + ".profile.txt"


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


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the enabled sections in order (ingest, train, inference, synth); print the table; write the JSON
    (``cfg.json_out``) and the profile beside it; return the results."""
    from breakhis_ray.bench.machine import load_average, machine_info
    from breakhis_ray.bench.memory import OthersCpu
    from breakhis_ray.bench.table import evaluate_targets, format_profile, format_table

    from breakhis_ray.allocator import keep_freed_memory

    start = time.perf_counter()
    keep_freed_memory()  # the baselines run here: the same allocator setting as the Ray workers and actors
    start_ray(cfg)
    machine = machine_info()
    machine["ray_worker_niceness"] = _niceness_of_a_worker()
    results: dict[str, Any] = {"schema": SCHEMA_VERSION, "machine": machine, "quick": cfg.quick,
                               "config": dump_config(cfg), "seconds": {}, "others_cpu_cores": {}}
    with _scratch(cfg.workdir) as work:
        for name, stage in STAGES:
            if not getattr(cfg, name).enabled:
                continue
            print(f"bench: {name} ...", flush=True)
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
    print(table, flush=True)
    storage.write_text(cfg.json_out, json.dumps(results, indent=2) + "\n")
    profile = profile_uri(cfg.json_out)
    storage.write_text(profile, table + "\n\n" + format_profile(results, pieces) + "\n")
    print(f"bench: wrote {cfg.json_out} and {profile}", flush=True)
    return results
