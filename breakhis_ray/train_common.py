"""Ray Train machinery shared by the classifier and the U-Net trainers.

Trainer construction from the typed config sections, cross-rank metric sums, RNG state capture for exact
resume, checkpoint restore, the chaos-testing failure hook and the run summary written after ``fit()``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from breakhis_ray import storage
from breakhis_ray.allocator import MODEL_PROCESS_ENV
from breakhis_ray.config import RunSection, ScalingSection, StrictModel, dump_config, validate_config
from breakhis_ray.errors import BreakhisError


# ------------------------------------------------------------------------------------ worker side
def all_reduce_sums(stats: dict[str, float], device) -> dict[str, float]:
    """Sum statistics over all ranks so every rank sees the same epoch metrics (and stops together)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stats
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def quiet_worker_logs(run: RunSection) -> None:
    """Apply ``run.log_level`` to the worker's root logger: Ray Train logs every report at INFO there."""
    import logging

    logging.getLogger().setLevel(run.log_level)


def start_worker(cls: type[StrictModel], config: dict[str, Any]):
    """The common start of a train loop: ``(cfg, rank, world_size, device, amp)``.

    Re-validates the dumped config, applies its log level, pins the torch thread count (a reused Ray worker
    keeps the count of its first task), seeds every generator per rank and picks the device Ray assigned.
    """
    import ray.train
    import ray.train.torch
    import torch

    cfg = validate_config(cls, config)
    quiet_worker_logs(cfg.run)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.train.seed + rank)
    device = ray.train.torch.get_device()
    return cfg, rank, world, device, bool(cfg.train.amp and device.type == "cuda")


@dataclass
class LoopState:
    """What a run carries across epochs and restarts: next epoch, history, best score, stale epochs, resumes."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: float | None = None
    stale: int = 0
    resumes: int = 0

    @classmethod
    def resume(cls, run: RunSection, model, optimizer, scheduler, device, *, rank: int, tag: str,
               epochs: int) -> "LoopState":
        """Restore the latest checkpoint of ``run`` (weights, optimiser, scheduler, RNG) into the objects given."""
        import ray.train

        state = restore(latest_checkpoint(run, ray.train.get_checkpoint()), model, optimizer, scheduler, device)
        if not state:
            return cls()
        loop = cls(epoch=state.get("epoch", 0), history=state.get("history", []), best=state.get("best"),
                   stale=state.get("stale", 0), resumes=state.get("resumes", 0) + 1)
        if rank == 0:
            print(f"[{tag}] resumed from checkpoint at epoch {loop.epoch}/{epochs}", flush=True)
        return loop

    def record(self, metrics: dict, run: RunSection, patience: int | None) -> bool:
        """Add one epoch's metrics (``epoch`` and ``resumes`` included); True when early stopping says stop."""
        metrics["resumes"] = self.resumes
        self.epoch = int(metrics["epoch"])
        self.history.append(metrics)
        score = metrics[run.checkpoint_metric]
        if is_improvement(score, self.best, run.checkpoint_mode):
            self.best, self.stale = score, 0
        else:
            self.stale += 1
        metrics["early_stopped"] = patience is not None and self.stale >= patience
        return metrics["early_stopped"]

    def train_state(self, optimizer, scheduler) -> dict:
        return {"epoch": self.epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "history": self.history, "best": self.best, "stale": self.stale,
                "resumes": self.resumes}


def finish_epoch(loop: LoopState, metrics: dict, *, cfg, rank: int, tag: str, line: str, model, optimizer,
                 scheduler, save_kwargs: dict) -> bool:
    """Record, log (rank 0), report with a checkpoint and decide early stopping; True: stop training."""
    from breakhis_ray.checkpoint import save_checkpoint

    stop = loop.record(metrics, cfg.run, cfg.train.early_stopping_patience)
    if rank == 0:
        write_history(cfg.run, loop.history)
        print(f"[{tag}] epoch {loop.epoch}/{cfg.train.epochs} {line}", flush=True)
    train_state = loop.train_state(optimizer, scheduler)
    report_epoch(metrics, rank, lambda d: save_checkpoint(d, model, config=dump_config(cfg), extra_state=train_state,
                                                          metrics=metrics, **save_kwargs))
    if stop and rank == 0:
        print(f"[{tag}] early stopping: no {cfg.run.checkpoint_metric} improvement for {loop.stale} epochs",
              flush=True)
    return stop


def seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())


def _checkpoint_epoch(uri: str) -> int:
    from breakhis_ray.checkpoint import read_meta

    try:
        return int((read_meta(uri).get("metrics") or {}).get("epoch", -1))
    except (BreakhisError, ValueError, TypeError):
        return -1  # incomplete (meta.json is written last) or foreign: never resumed from


def latest_checkpoint(run: RunSection, reported=None):
    """The newest complete checkpoint of this run: Ray's own (``get_checkpoint()``) or, when Ray lost track
    of it (a worker died before its last report was registered, or the controller was restarted), the
    newest one found in the run's storage folder. Resuming never silently starts over at epoch 1."""
    import ray.train

    run_dir = storage.join(run.storage_path, run.name)
    candidates = []
    if reported is not None:
        candidates.append((_checkpoint_epoch(checkpoint_uri(run.storage_path, reported)), reported))
    if storage.exists(run_dir):
        fs, _ = storage.resolve(run_dir)
        metas = [u for u in storage.list_files(run_dir, suffixes=["meta.json"])
                 if u.rstrip("/").split("/")[-2].startswith("checkpoint_")]
        for meta in metas:
            folder = storage.parent(meta)
            candidates.append((_checkpoint_epoch(folder), folder))
    candidates = [c for c in candidates if c[0] >= 0]
    if not candidates:
        return None
    epoch, best = max(candidates, key=lambda c: c[0])
    if isinstance(best, str):
        fs, path = storage.resolve(best)
        return ray.train.Checkpoint(path, filesystem=fs)
    return best


def restore(checkpoint, model, optimizer, scheduler, device) -> dict | None:
    """Load weights, optimiser, scheduler and RNG state from a Ray checkpoint; return the train state."""
    from breakhis_ray.checkpoint import load_state_dict, load_train_state, unwrap_model

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        unwrap_model(model).load_state_dict(load_state_dict(ckpt_dir, map_location=device))
        state = load_train_state(ckpt_dir, map_location=device)
    if state is None:
        raise BreakhisError(f"checkpoint {checkpoint.path} has no train_state.pt: cannot resume from it")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        set_rng_state(state["rng"])
    return state


def maybe_inject_failure(run: RunSection, epoch: int, rank: int) -> None:
    """Chaos testing hook: fail once at ``run.inject_failure.epoch`` (a marker in storage stops repeats)."""
    spec = run.inject_failure
    if spec is None or spec.epoch != epoch or spec.rank != rank:
        return
    marker = storage.join(run.storage_path, run.name, f".injected-failure-epoch{epoch}")
    if storage.exists(marker):
        return
    storage.write_text(marker, "injected\n")
    if spec.mode == "kill":
        os._exit(1)
    raise RuntimeError(f"injected failure at epoch {epoch} on rank {rank}")


def is_improvement(score: float, best: float | None, mode: str) -> bool:
    return best is None or (score > best if mode == "max" else score < best)


def write_history(run: RunSection, history: list[dict]) -> None:
    """Rank 0 keeps ``<run_dir>/history.json`` current every epoch (curves for the report, any mode)."""
    uri = storage.join(run.storage_path, run.name, "history.json")
    storage.write_text(uri, json.dumps(history, indent=2, default=float))


def read_history(run_dir: str) -> list[dict]:
    uri = storage.join(run_dir, "history.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else []


def report_epoch(metrics: dict, rank: int, save: Callable[[str], Any]) -> None:
    """Every rank reports once per epoch; rank 0 attaches a checkpoint written by ``save(directory)``."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save(tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


# ------------------------------------------------------------------------------------ driver side
def make_trainer(loop: Callable[[dict], None], cfg: StrictModel, scaling: ScalingSection, run: RunSection,
                 datasets: dict):
    """A ``TorchTrainer`` whose workers receive ``dump_config(cfg)``; storage may be local or ``s3://``.

    Only ``train`` is split across workers. Ray's equal split drops the remainder rows, which is harmless for
    a shuffled training epoch but would silently shrink validation; so ``val`` stays whole and rank 0
    evaluates it (`evaluates_on_this_rank`), its sums then shared with every rank.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    fs, path = storage.resolve(run.storage_path)
    # Train V2 tees a worker's print() into its logger too, so every epoch line reached the driver twice.
    # Workers keep freed memory (breakhis_ray.allocator): CPU steps otherwise re-fault activations every batch.
    env = {**storage.credential_env(), **MODEL_PROCESS_ENV, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    run_config = ray.train.RunConfig(
        name=run.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=run.keep_checkpoints,
            checkpoint_score_attribute=run.checkpoint_metric,
            checkpoint_score_order=run.checkpoint_mode,
        ),
        worker_runtime_env={"env_vars": env},
        logging_config=ray.train.LoggingConfig(log_level=run.log_level),
    )
    return TorchTrainer(
        loop,
        train_loop_config=dump_config(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources,
        ),
        torch_config=TorchConfig(backend=scaling.backend or ("nccl" if scaling.use_gpu else "gloo")),
        run_config=run_config,
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def evaluates_on_this_rank(rank: int) -> bool:
    return rank == 0


def quiet_data_progress(enabled: bool) -> None:
    """Ray Data's per-operator bars are noise inside a training log of per-epoch lines."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = enabled
    ctx.enable_operator_progress_bars = enabled


def fit(trainer, run_dir: str):
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BreakhisError(f"training run {run_dir} failed: {first}") from exc


def checkpoint_uri(storage_path: str, checkpoint) -> str:
    """Storage URI (same scheme as ``storage_path``) of a Ray checkpoint."""
    return f"s3://{checkpoint.path}" if storage.is_s3(storage_path) else checkpoint.path


def summarise(run: RunSection, result, run_dir: str, tag: str) -> dict:
    """Write ``<run_dir>/result.json`` and ``history.json``; return the summary (best/latest checkpoints)."""
    best = result.get_best_checkpoint(run.checkpoint_metric, run.checkpoint_mode) if result.best_checkpoints else None
    latest = result.checkpoint
    history = read_history(run_dir)
    summary = {
        "run_dir": run_dir,
        "best_checkpoint": checkpoint_uri(run.storage_path, best) if best else None,
        "latest_checkpoint": checkpoint_uri(run.storage_path, latest) if latest else None,
        "metric": run.checkpoint_metric,
        "best_metrics": next((m for c, m in result.best_checkpoints or [] if best and c.path == best.path), None),
        "final_metrics": result.metrics,
        "epochs_completed": len(history),
    }
    storage.write_text(storage.join(run_dir, "result.json"), json.dumps(summary, indent=2, default=str))
    if summary["best_checkpoint"]:
        score = (summary["best_metrics"] or {}).get(run.checkpoint_metric)
        print(f"[{tag}] best checkpoint ({run.checkpoint_metric}={score}): {summary['best_checkpoint']}", flush=True)
    return summary
