"""Training-step benchmark: Ray Train ``TorchTrainer`` against a plain PyTorch loop, and 2 workers vs 1.

The same model (``create_model`` name, random init), the same data and the same batch size on every side:

* ``plain``: a loop in this process over uint8 batches sliced from in-memory arrays, normalised on the
  device, through the project's own :func:`breakhis_ray.train.classifier.train_one_epoch` step (forward, loss,
  backward, optimiser step); run before and after ``ray_1w``, the faster of the two is kept;
* ``ray_<k>w``: ``TorchTrainer`` (:func:`breakhis_ray.train.ray_glue.make_trainer`) with ``k`` workers
  over a materialized Ray dataset of the same rows, batches from
  :func:`breakhis_ray.data.pipeline.iter_train_batches` on each worker's shard (Ray Data ingest included),
  DDP when ``k > 1`` (prepared as training prepares it).

Every side sets the same torch thread count and times ``steps`` steps after a warm-up from inside its loop
(:class:`StepTimer`), so the rate is the steady per-step cost without process start-up, worker-group
creation or model build. The plain loop warms up ``warmup_steps`` steps; the Ray sides at least as many and
at least ``warmup_s`` seconds' worth at the plain loop's step time: Ray Train starts helper actors
(controller, dataset manager, split coordinator, preemption watcher, ...) whose imports cost about two CPU
seconds each and overlap the first seconds of training. The count is fixed before the run, so every DDP rank
runs the same number of steps. The time of each step splits into waiting for the batch (``data``) and the
rest (``compute``). ``images_per_s`` of a multi-worker run is the sum of its workers' rates.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
from pydantic import Field

from breakhis_ray import storage
from breakhis_ray.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunSection,
    ScalingSection,
    StrictModel,
    TrainConfig,
    validate_config,
)
from breakhis_ray.errors import BreakhisError

if TYPE_CHECKING:  # pragma: no cover
    from breakhis_ray.config import BenchTrainSection

log = logging.getLogger(__name__)


class StepTimer:
    """Wraps an iterable of ``(x, y)`` batches: yields ``warmup + steps`` of them and times the last ``steps``.

    The clock starts when batch ``warmup`` is requested and stops when the batch after the last one is
    requested (the consumer has finished its last step); time spent inside ``next()`` is data wait.
    """

    def __init__(self, batches: Iterable, warmup: int, steps: int):
        self.batches, self.warmup, self.steps = batches, warmup, steps
        self.samples, self.data_s, self.start, self.end = 0, 0.0, None, None

    def __iter__(self) -> Iterator:
        source = iter(self.batches)
        for i in range(self.warmup + self.steps):
            asked = time.perf_counter()
            if i == self.warmup:
                self.start = asked
            try:
                batch = next(source)
            except StopIteration:
                raise BreakhisError(f"the data ran out after {i} batches; the benchmark needs "
                                    f"{self.warmup + self.steps}") from None
            if i >= self.warmup:
                self.data_s += time.perf_counter() - asked
                self.samples += len(batch[1])
            yield batch
        self.end = time.perf_counter()

    def result(self) -> dict[str, float]:
        if self.end is None:
            raise BreakhisError("the training step loop stopped before the timed steps ended")
        seconds = self.end - self.start
        return {
            "images_per_s": self.samples / seconds,
            "step_ms": 1000 * seconds / self.steps,
            "data_ms": 1000 * self.data_s / self.steps,
            "compute_ms": 1000 * (seconds - self.data_s) / self.steps,
            "samples": self.samples,
            "seconds": seconds,
        }


class StepJob(StrictModel):
    """What each side of the benchmark runs (workers re-validate it from the dumped config)."""

    train: TrainConfig
    warmup_steps: int = Field(ge=0)
    steps: int = Field(ge=1)
    torch_threads: int = Field(ge=1)
    stats_uri: str | None = Field(default=None, description="rank 0 writes its step statistics (JSON) here")


def step_job(model: str, image_size: int, batch_size: int, warmup: int, steps: int, threads: int,
             use_gpu: bool, workers: int, cpus_per_worker: float) -> StepJob:
    """The training config of one side: ``model`` from scratch, cross-entropy, Adam (the project defaults)."""
    train = TrainConfig(
        data=DataConfig(shards="(in-memory benchmark rows)", image_size=(image_size, image_size)),
        model=ModelConfig(name=model),
        loss=LossConfig(name="ce"),
        train=OptimConfig(strategy="scratch", epochs=1, batch_size=batch_size, scheduler="none"),
        scaling=ScalingSection(num_workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker),
    )
    return StepJob(train=train, warmup_steps=warmup, steps=steps, torch_threads=threads)


# ------------------------------------------------------------------------------------------------ data
def synthetic_rows(batch: dict[str, np.ndarray], size: int, seed: int) -> dict[str, np.ndarray]:
    """``map_batches`` function: row ids -> uint8 ``image`` (size x size x 3) and ``label``, seeded by id."""
    ids = np.asarray(batch["id"], dtype=np.int64)
    images = np.empty((len(ids), size, size, 3), dtype=np.uint8)
    for j, i in enumerate(ids):
        images[j] = np.random.default_rng([seed, int(i)]).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return {"image": images, "label": ids % 2}


def rows_needed(job: StepJob, workers: int) -> int:
    return max(1, workers) * (job.warmup_steps + job.steps) * job.train.train.batch_size


def _step_parts(job: StepJob, device):
    import torch

    from breakhis_ray.losses import create_loss
    from breakhis_ray.train.classifier import build_model, classifier_spec

    torch.manual_seed(job.train.train.seed)
    model = build_model(job.train).to(device)
    loss_fn = create_loss(job.train.loss.name).to(device)
    return model, loss_fn, classifier_spec(job.train)


def _run_steps(job: StepJob, model, batches, loss_fn, device) -> dict[str, float]:
    from breakhis_ray.train.classifier import make_optimizer, train_one_epoch

    optimizer, _ = make_optimizer(job.train, model)
    timer = StepTimer(batches, job.warmup_steps, job.steps)
    amp = job.train.train.amp and device.type == "cuda"
    train_one_epoch(model, timer, loss_fn, optimizer, device, amp=amp, grad_clip=None)
    return timer.result()


# ----------------------------------------------------------------------------------------------- sides
def plain_loop(job: StepJob, seed: int) -> dict[str, float]:
    """The plain PyTorch side, in this process."""
    import torch

    from breakhis_ray.data.transforms import normalize

    device = torch.device("cuda" if job.train.scaling.use_gpu else "cpu")
    size, batch_size = job.train.data.image_size[0], job.train.train.batch_size
    rows = synthetic_rows({"id": np.arange(rows_needed(job, 1))}, size, seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(job.torch_threads)
    try:
        model, loss_fn, spec = _step_parts(job, device)

        def batches():
            for i in range(0, len(rows["label"]), batch_size):
                x = torch.from_numpy(rows["image"][i:i + batch_size]).to(device)
                yield normalize(x, spec), torch.from_numpy(rows["label"][i:i + batch_size]).to(device)

        return _run_steps(job, model, batches(), loss_fn, device)
    finally:
        torch.set_num_threads(previous)


def ray_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train side: every worker times its own steps; all ranks report once."""
    import ray.train
    import ray.train.torch
    import torch

    from breakhis_ray.data.pipeline import iter_train_batches
    from breakhis_ray.train.loop import all_reduce_sums

    job = validate_config(StepJob, config)
    torch.set_num_threads(job.torch_threads)
    device = ray.train.torch.get_device()
    model, loss_fn, spec = _step_parts(job, device)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    shard = ray.train.get_dataset_shard("train")
    stats = _run_steps(job, model, iter_train_batches(shard, job.train.train.batch_size, device, spec), loss_fn,
                       device)
    totals = all_reduce_sums({"images_per_s": stats["images_per_s"]}, device)
    ctx = ray.train.get_context()
    metrics = {**stats, "images_per_s_rank0": stats["images_per_s"], "images_per_s": totals["images_per_s"],
               "world_size": ctx.get_world_size()}
    if ctx.get_world_rank() == 0 and job.stats_uri:
        storage.write_text(job.stats_uri, json.dumps(metrics))
    ray.train.report(metrics)  # Ray Train keeps only checkpointed metrics: the file carries them to the driver


def ray_trainer(job: StepJob, seed: int, storage_path: str) -> dict[str, float]:
    """The Ray Train side: ``job.train.scaling.num_workers`` workers over a materialized dataset."""
    import ray.data

    from breakhis_ray.train.ray_glue import fit, make_trainer, quiet_data_progress

    workers = job.train.scaling.num_workers
    size = job.train.data.image_size[0]
    quiet_data_progress(False)
    data = ray.data.range(rows_needed(job, workers)).map_batches(
        synthetic_rows, fn_kwargs={"size": size, "seed": seed}, batch_format="numpy").materialize()
    run = RunSection(name=f"bench-{job.train.model.name}-{workers}w-{time.strftime('%H%M%S')}",
                     storage_path=storage_path, max_failures=0)
    stats_uri = storage.join(storage_path, run.name, "step_stats.json")
    job = job.model_copy(update={"stats_uri": stats_uri})
    start = time.perf_counter()
    fit(make_trainer(ray_loop_per_worker, job, job.train.scaling, run, {"train": data}), run.name)
    metrics = json.loads(storage.read_text(stats_uri))
    metrics["fit_s"] = time.perf_counter() - start
    return metrics


# ---------------------------------------------------------------------------------------------- driver
def _rounded(stats: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 3) for k, v in stats.items()}


def run_train_benchmark(
    section: "BenchTrainSection",
    *,
    use_gpu: bool = False,
    scale_workers: int | None = None,
    seed: int = 0,
    workdir: str | None = None,
) -> dict[str, Any]:
    """Per model of ``section.models``: plain loop, Ray Train with 1 worker and with ``scale_workers`` (0:
    skipped); the ratios ``ratio_ray_vs_plain`` (1 worker) and ``ratio_scale_vs_1`` (``scale_workers`` vs 1).

    ``use_gpu`` and ``scale_workers`` are resolved by the caller from the machine (``section.use_gpu`` may be
    null: "when CUDA is there"; fewer GPUs than ``section.scale_workers`` skip the scaling run).
    """
    from breakhis_ray.config import RayConfig
    from breakhis_ray.ray_utils import cpu_count, ensure_ray

    models, image_size, batch_size = section.models, section.image_size, section.batch_size
    warmup_steps, warmup_s, steps = section.warmup_steps, section.warmup_s, section.steps
    torch_threads, cpus_per_worker = section.torch_threads, section.cpus_per_worker
    scale_workers = section.scale_workers if scale_workers is None else scale_workers

    ensure_ray(RayConfig(num_cpus=cpu_count()))
    own_tmp = tempfile.TemporaryDirectory(prefix="breakhis-bench-train-") if workdir is None else None
    storage_path = str(Path(own_tmp.name if own_tmp else workdir) / "train_runs")
    out: dict[str, Any] = {"image_size": image_size, "batch_size": batch_size, "warmup_steps": warmup_steps,
                           "warmup_s": warmup_s, "steps": steps, "torch_threads": torch_threads,
                           "cpus_per_worker": cpus_per_worker, "use_gpu": use_gpu, "scale_workers": scale_workers,
                           "models": {}}
    try:
        for model in models:
            def job(workers: int, warmup: int = warmup_steps) -> StepJob:
                return step_job(model, image_size, batch_size, warmup, steps, torch_threads, use_gpu,
                                workers, cpus_per_worker)

            before = plain_loop(job(1), seed)
            ray_warmup = max(warmup_steps, math.ceil(warmup_s / (before["step_ms"] / 1000)))
            entry = {"ray_warmup_steps": ray_warmup,
                     "ray_1w": _rounded(ray_trainer(job(1, ray_warmup), seed, storage_path))}
            after = plain_loop(job(1), seed)  # before and after: the better one, so noise cannot favour Ray
            entry["plain"] = _rounded(max(before, after, key=lambda r: r["images_per_s"]))
            entry["plain_runs_images_per_s"] = [round(before["images_per_s"], 3), round(after["images_per_s"], 3)]
            entry["ratio_ray_vs_plain"] = round(entry["ray_1w"]["images_per_s"] / entry["plain"]["images_per_s"], 3)
            if scale_workers > 1:
                key = f"ray_{scale_workers}w"
                entry[key] = _rounded(ray_trainer(job(scale_workers, ray_warmup), seed, storage_path))
                entry["ratio_scale_vs_1"] = round(entry[key]["images_per_s"] / entry["ray_1w"]["images_per_s"], 3)
            out["models"][model] = entry
            log.info("bench train: %s plain=%.1f ray_1w=%.1f img/s", model, entry["plain"]["images_per_s"],
                     entry["ray_1w"]["images_per_s"])
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    first = out["models"][models[0]]
    out["ratio_ray_vs_plain"] = first["ratio_ray_vs_plain"]
    if "ratio_scale_vs_1" in first:
        out["ratio_scale_vs_1"] = first["ratio_scale_vs_1"]
    return out
