"""Ray Train glue shared by the classifier and the U-Net trainers.

Worker side: :func:`start_worker` (config, logging, threads, per-rank seeds, device), :class:`LoopState`
(what a run carries across epochs and restarts), :func:`run_epochs` (resume, then per epoch: failure hook,
train on this rank's shard, evaluate on rank 0, sums over ranks, history, log line, report with a checkpoint,
early stopping). Driver side: :func:`make_trainer`, :func:`fit` and :func:`summarise` (``result.json``).
Resume never silently starts over: :func:`latest_checkpoint` falls back to a scan of the run's storage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from breakhis_ray import storage
from breakhis_ray.allocator import MODEL_PROCESS_ENV
from breakhis_ray.artifacts import write_json, write_text_atomic
from breakhis_ray.config import RunSection, ScalingSection, StrictModel, dump_config, validate_config
from breakhis_ray.errors import BreakhisError
from breakhis_ray.train.loop import (
    Learner,
    all_reduce_sums,
    evaluate,
    is_improvement,
    rng_state,
    seed_everything,
    set_rng_state,
    train_one_epoch,
)

if TYPE_CHECKING:
    from breakhis_ray.data.transforms import PreprocessSpec

log = logging.getLogger(__name__)
HISTORY_FILE = "history.json"
RESULT_FILE = "result.json"


# ------------------------------------------------------------------------------------ worker side
@dataclass(frozen=True)
class Worker:
    """One train-loop process: its validated config, rank, world size, device and whether AMP is on."""

    cfg: Any
    rank: int
    world: int
    device: Any
    amp: bool

    def learner(self, model, loss_fn, optimizer, scheduler, batch_stats, zero) -> Learner:
        """A :class:`Learner` with this worker's device and the config's AMP, clipping and step cap."""
        train = self.cfg.train
        return Learner(model, loss_fn, optimizer, scheduler, self.device, batch_stats, zero, amp=self.amp,
                       grad_clip=train.grad_clip, max_steps=train.max_steps_per_epoch)


def worker_logging(run: RunSection) -> None:
    """Apply ``run.log_level`` to the root logger (Ray Train logs every report at INFO there) while keeping this
    package's INFO lines (the per-epoch line) visible.

    In a Ray Train worker actor the root logger's handlers drop records below ``run.log_level``, so the
    package logger gets its own stdout handler there (Ray forwards a worker's stdout to the driver, as it did
    the ``print`` this replaces). In-process (``num_workers=0``) the driver's logging set-up (the CLI's
    ``--log-level``) applies unchanged.
    """
    import ray

    logging.getLogger().setLevel(run.log_level)
    if ray.get_runtime_context().get_actor_id() is None:
        return
    ours = logging.getLogger("breakhis_ray")
    ours.setLevel(min(logging.INFO, logging.getLevelName(run.log_level)))
    if not any(getattr(h, "_breakhis_worker", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._breakhis_worker = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
    ours.propagate = False


def start_worker(cls: type[StrictModel], config: dict[str, Any]) -> Worker:
    """The common start of a train loop.

    Re-validates the dumped config, applies its log level, pins the torch thread count (a reused Ray worker
    keeps the count of its first task), seeds every generator per rank and picks the device Ray assigned.
    """
    import ray.train
    import ray.train.torch
    import torch

    cfg = validate_config(cls, config)
    worker_logging(cfg.run)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.train.seed + rank)
    device = ray.train.torch.get_device()
    return Worker(cfg, rank, world, device, bool(cfg.train.amp and device.type == "cuda"))


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
            log.info("[%s] resumed from checkpoint at epoch %d/%d", tag, loop.epoch, epochs)
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


def run_epochs(
    worker: Worker,
    learner: Learner,
    *,
    tag: str,
    labels: Sequence[str],
    spec: "PreprocessSpec",
    batches: Callable[[Any, int], Iterable],
    epoch_metrics: Callable[[dict, dict, int], dict],
    describe: Callable[[dict], str],
    before_epoch: Callable[[int], Mapping[str, Any]] | None = None,
) -> None:
    """The epochs of one worker, from the latest checkpoint on.

    Per epoch: the failure hook, ``before_epoch(epoch)`` (extra metrics, e.g. a frozen backbone), training on
    this rank's ``train`` shard, ``val`` scored whole by rank 0 alone, a scheduler step, the sums shared by
    every rank, ``epoch_metrics(train, val, world)`` plus ``epoch`` and ``lr``, then :func:`finish_epoch`.
    ``batches(shard, batch_size)`` yields ``(x, y)`` on the device; ``describe(metrics)`` is the log line.
    Checkpoints carry the bare model's ``model_args``, ``labels`` and ``spec``.
    """
    import ray.train

    from breakhis_ray.checkpoint import unwrap_model

    cfg, rank, device = worker.cfg, worker.rank, worker.device
    save_kwargs = {"model_args": dict(unwrap_model(learner.model).model_args), "labels": list(labels),
                   "preprocessing": spec.to_dict()}
    loop = LoopState.resume(cfg.run, learner.model, learner.optimizer, learner.scheduler, device, rank=rank,
                            tag=tag, epochs=cfg.train.epochs)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(loop.epoch, cfg.train.epochs):
        maybe_inject_failure(cfg.run, epoch, rank)
        extra = dict(before_epoch(epoch)) if before_epoch else {}
        train_sums = train_one_epoch(learner, batches(train_shard, cfg.train.batch_size))
        val_batches = batches(val_shard, cfg.train.eval_batch_size) if evaluates_on_this_rank(rank) else []
        val_sums = evaluate(learner, val_batches)
        learner.scheduler.step()
        metrics = epoch_metrics(all_reduce_sums(train_sums, device), all_reduce_sums(val_sums, device), worker.world)
        metrics.update(epoch=epoch + 1, **extra, lr=learner.optimizer.param_groups[-1]["lr"])
        if finish_epoch(loop, metrics, worker=worker, tag=tag, line=describe(metrics), learner=learner,
                        save_kwargs=save_kwargs):
            break


def finish_epoch(loop: LoopState, metrics: dict, *, worker: Worker, tag: str, line: str, learner: Learner,
                 save_kwargs: dict) -> bool:
    """Record, log (rank 0), report with a checkpoint and decide early stopping; True: stop training."""
    from breakhis_ray.checkpoint import save_checkpoint

    cfg, rank = worker.cfg, worker.rank
    stop = loop.record(metrics, cfg.run, cfg.train.early_stopping_patience)
    if rank == 0:
        write_history(cfg.run, loop.history)
        log.info("[%s] epoch %d/%d %s", tag, loop.epoch, cfg.train.epochs, line)
    train_state = loop.train_state(learner.optimizer, learner.scheduler)
    report_epoch(metrics, rank, lambda d: save_checkpoint(d, learner.model, config=dump_config(cfg),
                                                          extra_state=train_state, metrics=metrics, **save_kwargs))
    if stop and rank == 0:
        log.info("[%s] early stopping: no %s improvement for %d epochs", tag, cfg.run.checkpoint_metric, loop.stale)
    return stop


def evaluates_on_this_rank(rank: int) -> bool:
    return rank == 0


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


def write_history(run: RunSection, history: list[dict]) -> None:
    """Rank 0 keeps ``<run_dir>/history.json`` current every epoch (curves for the report, any mode)."""
    uri = storage.join(run.storage_path, run.name, HISTORY_FILE)
    write_text_atomic(uri, json.dumps(history, indent=2, default=float))


def read_history(run_dir: str) -> list[dict]:
    uri = storage.join(run_dir, HISTORY_FILE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else []


# ------------------------------------------------------------------------------------- checkpoints
def checkpoint_epoch(uri: str) -> int:
    """The epoch a checkpoint directory holds; -1 when it is incomplete (``meta.json`` is written last) or
    foreign: such a directory is never resumed from."""
    from breakhis_ray.checkpoint import read_meta

    try:
        return int((read_meta(uri).get("metrics") or {}).get("epoch", -1))
    except (BreakhisError, ValueError, TypeError):
        return -1


def latest_checkpoint(run: RunSection, reported=None):
    """The newest complete checkpoint of this run: Ray's own (``get_checkpoint()``) or, when Ray lost track
    of it (a worker died before its last report was registered, or the controller was restarted), the
    newest one found in the run's storage folder. Resuming never silently starts over at epoch 1."""
    import ray.train

    run_dir = storage.join(run.storage_path, run.name)
    candidates = []
    if reported is not None:
        candidates.append((checkpoint_epoch(checkpoint_uri(run.storage_path, reported)), reported))
    if storage.exists(run_dir):
        metas = [u for u in storage.list_files(run_dir, suffixes=["meta.json"])
                 if u.rstrip("/").split("/")[-2].startswith("checkpoint_")]
        for meta in metas:
            folder = storage.parent(meta)
            candidates.append((checkpoint_epoch(folder), folder))
    candidates = [c for c in candidates if c[0] >= 0]
    if not candidates:
        return None
    _, best = max(candidates, key=lambda c: c[0])
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


def checkpoint_uri(storage_path: str, checkpoint) -> str:
    """Storage URI (same scheme as ``storage_path``) of a Ray checkpoint."""
    return f"s3://{checkpoint.path}" if storage.is_s3(storage_path) else checkpoint.path


# ------------------------------------------------------------------------------------ driver side
def start_driver(cfg) -> str:
    """Join or start Ray, quiet Ray Data's progress bars (per ``run.data_progress_bars``); the run directory."""
    from breakhis_ray.ray_utils import ensure_ray

    ensure_ray(cfg.ray)
    quiet_data_progress(cfg.run.data_progress_bars)
    return storage.join(cfg.run.storage_path, cfg.run.name)


def quiet_data_progress(enabled: bool) -> None:
    """Ray Data's per-operator bars are noise inside a training log of per-epoch lines."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = enabled
    ctx.enable_operator_progress_bars = enabled


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
    # Train V2 would tee a worker's print() into its logger too, so a line could reach the driver twice.
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


def fit(trainer, run_dir: str):
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BreakhisError(f"training run {run_dir} failed: {first}") from exc


def summarise(run: RunSection, result, run_dir: str, tag: str) -> dict:
    """Write ``<run_dir>/result.json``; return the summary (best/latest checkpoints, metrics, epochs done)."""
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
    write_json(storage.join(run_dir, RESULT_FILE), summary)
    if summary["best_checkpoint"]:
        score = (summary["best_metrics"] or {}).get(run.checkpoint_metric)
        log.info("[%s] best checkpoint (%s=%s): %s", tag, run.checkpoint_metric, score, summary["best_checkpoint"])
    return summary


def launch(loop: Callable[[dict], None], cfg, datasets: dict, run_dir: str, tag: str) -> dict:
    """Build the trainer, run it to the end and summarise the run (:func:`summarise`)."""
    trainer = make_trainer(loop, cfg, cfg.scaling, cfg.run, datasets)
    return summarise(cfg.run, fit(trainer, run_dir), run_dir, tag)
