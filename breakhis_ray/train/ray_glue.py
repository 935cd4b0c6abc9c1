"""Ray Train glue shared by the classifier and the U-Net trainers.

Worker side: :func:`start_worker` (config, logging, threads, deterministic kernels, per-rank seeds, device),
:class:`LoopState` (what a run carries across epochs and restarts), :func:`run_epochs` (resume, then per
epoch: failure hook, the schedule's learning rate, train on this rank's shard with optional mid-epoch
checkpoints, evaluate on rank 0, sums over ranks, history, log line, report with a checkpoint, early
stopping). Driver side: :func:`make_trainer`, :func:`fit` and :func:`summarise` (``result.json``).
Resume never silently starts over: :func:`latest_checkpoint` falls back to a scan of the run's storage.

Exact resume. A checkpoint records the epochs done and, when taken inside an epoch
(``run.checkpoint_every_steps``), the optimiser steps done in the next one; beside the weights, optimiser and
scheduler state it holds every rank's RNG state and partial epoch sums (gathered to rank 0, which writes the
checkpoint; each rank restores its own). A resumed worker advances the training dataset to its epoch (the
per-epoch block order and augmentation are keyed by the epoch), draws and drops the batches already trained
on, and continues; with the same seed and worker count on CPU the weights, optimiser state, learning rates
and history (bar wall-clock throughput and the ``resumes`` counter) equal an uninterrupted run's.
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
from breakhis_ray.tracking import EpochTracker, start_training_run
from breakhis_ray.train.loop import (
    Learner,
    all_reduce_sums,
    evaluate,
    gather_objects,
    is_improvement,
    load_scheduler_state,
    rng_state,
    seed_everything,
    set_deterministic,
    set_epoch_lr,
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
    keeps the count of its first task), turns on deterministic kernels when ``run.deterministic``, seeds every
    generator per rank (``train.seed + rank``) and picks the device Ray assigned.
    """
    import ray.train
    import ray.train.torch
    import torch

    cfg = validate_config(cls, config)
    worker_logging(cfg.run)
    set_deterministic(cfg.run.deterministic)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.train.seed + rank)
    device = ray.train.torch.get_device()
    return Worker(cfg, rank, world, device, bool(cfg.train.amp and device.type == "cuda"))


@dataclass
class LoopState:
    """What a run carries across epochs and restarts: epochs done, optimiser steps done in the next one (a
    mid-epoch checkpoint) with this rank's sums of those steps, history, best score, stale epochs, resumes."""

    epoch: int = 0
    step: int = 0
    sums: dict | None = None
    history: list[dict] = field(default_factory=list)
    best: float | None = None
    stale: int = 0
    resumes: int = 0

    @classmethod
    def resume(cls, run: RunSection, model, optimizer, scheduler, device, *, rank: int, tag: str,
               epochs: int, world: int = 1) -> "LoopState":
        """Restore the latest checkpoint of ``run`` (weights, optimiser, scheduler) into the objects given, and
        this rank's RNG state and partial sums (:func:`restore_rank`)."""
        import ray.train

        state = restore(latest_checkpoint(run, ray.train.get_checkpoint()), model, optimizer, scheduler, device)
        if not state:
            return cls()
        loop = cls(epoch=state.get("epoch", 0), step=state.get("step", 0), history=state.get("history", []),
                   best=state.get("best"), stale=state.get("stale", 0), resumes=state.get("resumes", 0) + 1)
        loop.sums = restore_rank(state, rank, world, tag)
        if rank == 0:
            where = f" + {loop.step} steps" if loop.step else ""
            log.info("[%s] resumed from checkpoint at epoch %d%s/%d", tag, loop.epoch, where, epochs)
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

    def train_state(self, optimizer, scheduler, ranks: list[dict], step: int = 0) -> dict:
        """The checkpoint's ``train_state.pt``: ``ranks`` is every rank's ``{"rng", "sums"}`` in rank order
        (:func:`rank_states`); ``step``: optimiser steps done in epoch ``self.epoch`` (0 at an epoch's end)."""
        return {"epoch": self.epoch, "step": step, "world": len(ranks), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ranks": ranks, "history": self.history, "best": self.best,
                "stale": self.stale, "resumes": self.resumes}


def rank_states(sums: Mapping[str, float] | None = None) -> list[dict]:
    """Every rank's RNG state and partial epoch ``sums``, in rank order (a collective: all ranks call it)."""
    return gather_objects({"rng": rng_state(), "sums": None if sums is None else dict(sums)})


def restore_rank(state: dict, rank: int, world: int, tag: str) -> dict | None:
    """Set this rank's RNG state from a checkpoint's ``ranks`` and return its partial epoch sums. A checkpoint
    written by another number of ranks (or before per-rank state existed) leaves the generators as
    :func:`start_worker` seeded them: the run goes on, but is no longer an exact continuation."""
    ranks = state.get("ranks")
    if ranks is None and "rng" in state and world == 1:  # single-rank checkpoints of earlier versions
        ranks = [{"rng": state["rng"], "sums": None}]
    if not ranks or len(ranks) != world:
        if rank == 0:
            log.warning("[%s] the checkpoint holds RNG state of %s rank(s), this run has %d: generators "
                        "reseeded, the run continues but not exactly as it would have", tag,
                        len(ranks) if ranks else "no", world)
        return None
    set_rng_state(ranks[rank]["rng"])
    return ranks[rank].get("sums")


def run_epochs(
    worker: Worker,
    learner: Learner,
    *,
    tag: str,
    labels: Sequence[str],
    spec: "PreprocessSpec",
    batches: Callable[[Any, int, int | None], Iterable],
    epoch_metrics: Callable[[dict, dict, int], dict],
    describe: Callable[[dict], str],
    before_epoch: Callable[[int], Mapping[str, Any]] | None = None,
) -> None:
    """The epochs of one worker, from the latest checkpoint on (mid-epoch ones included).

    Per epoch: the failure hook, the schedule's learning rate for the epoch (:func:`set_epoch_lr`: a function
    of the epoch and ``train.epochs``, so an extended run continues on its new schedule), ``before_epoch(epoch)``
    (extra metrics, e.g. a frozen backbone), training on this rank's ``train`` shard (a checkpoint every
    ``run.checkpoint_every_steps`` steps, :func:`step_hook`), ``val`` scored whole by rank 0 alone, the sums
    shared by every rank, ``epoch_metrics(train, val, world)`` plus ``epoch``, ``lr`` (the rate the epoch
    trained at) and ``start_step`` (steps already done when this run entered the epoch: > 0 after a resume
    from a mid-epoch checkpoint), then :func:`finish_epoch`. ``batches(shard, batch_size, epoch)`` yields
    ``(x, y)`` on the device (``epoch`` None for validation); ``describe(metrics)`` is the log line.
    Checkpoints carry the bare model's ``model_args``, ``labels`` and ``spec``.
    """
    import ray.train

    from breakhis_ray.checkpoint import unwrap_model
    from breakhis_ray.data.pipeline import advance_epochs

    cfg, rank, device = worker.cfg, worker.rank, worker.device
    save_kwargs = {"model_args": dict(unwrap_model(learner.model).model_args), "labels": list(labels),
                   "preprocessing": spec.to_dict()}
    loop = LoopState.resume(cfg.run, learner.model, learner.optimizer, learner.scheduler, device, rank=rank,
                            tag=tag, epochs=cfg.train.epochs, world=worker.world)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    advance_epochs(train_shard, loop.epoch)
    tracker = EpochTracker.open(cfg, rank)  # MLflow / TensorBoard on rank 0 (breakhis_ray.tracking)
    for epoch in range(loop.epoch, cfg.train.epochs):
        maybe_inject_failure(cfg.run, epoch, rank)
        lr = set_epoch_lr(learner.scheduler, epoch)
        extra = dict(before_epoch(epoch)) if before_epoch else {}
        start_step = loop.step
        train_sums = train_one_epoch(learner, batches(train_shard, cfg.train.batch_size, epoch), skip=start_step,
                                     totals=loop.sums, on_step=step_hook(loop, epoch, worker=worker,
                                                                         learner=learner, save_kwargs=save_kwargs))
        loop.step, loop.sums = 0, None
        val_batches = batches(val_shard, cfg.train.eval_batch_size, None) if evaluates_on_this_rank(rank) else []
        val_sums = evaluate(learner, val_batches)
        metrics = epoch_metrics(all_reduce_sums(train_sums, device), all_reduce_sums(val_sums, device), worker.world)
        metrics.update(epoch=epoch + 1, **extra, lr=lr, start_step=start_step)
        stop = finish_epoch(loop, metrics, worker=worker, tag=tag, line=describe(metrics), learner=learner,
                            save_kwargs=save_kwargs)
        tracker.log_epoch(metrics)
        if stop:
            break
    tracker.close()


def step_hook(loop: LoopState, epoch: int, *, worker: Worker, learner: Learner, save_kwargs: dict):
    """``on_step`` for :func:`train_one_epoch`: every ``run.checkpoint_every_steps`` steps all ranks report a
    mid-epoch checkpoint (rank 0 writes it: weights, optimiser, scheduler, every rank's RNG and partial sums,
    the epoch and step), then the step's failure hook runs."""
    from breakhis_ray.checkpoint import save_checkpoint

    cfg, rank = worker.cfg, worker.rank
    every, cap = cfg.run.checkpoint_every_steps, cfg.train.max_steps_per_epoch

    def on_step(steps: int, totals: dict) -> None:
        if every and steps % every == 0 and steps != cap:  # the epoch's end checkpoints the last step anyway
            ranks = rank_states(totals)
            state = loop.train_state(learner.optimizer, learner.scheduler, ranks, step=steps)
            worst = float("-inf") if cfg.run.checkpoint_mode == "max" else float("inf")
            # never ranked above an epoch's checkpoint; Ray keeps it while it is the latest
            metrics = {"epoch": epoch, "step": steps, cfg.run.checkpoint_metric: worst}
            report_epoch(metrics, rank, lambda d: save_checkpoint(d, learner.model, config=dump_config(cfg),
                                                                  extra_state=state, metrics=metrics,
                                                                  **save_kwargs))
        maybe_inject_failure(cfg.run, epoch, rank, step=steps)

    return on_step


def finish_epoch(loop: LoopState, metrics: dict, *, worker: Worker, tag: str, line: str, learner: Learner,
                 save_kwargs: dict) -> bool:
    """Record, log (rank 0), report with a checkpoint and decide early stopping; True: stop training."""
    from breakhis_ray.checkpoint import save_checkpoint

    cfg, rank = worker.cfg, worker.rank
    stop = loop.record(metrics, cfg.run, cfg.train.early_stopping_patience)
    if rank == 0:
        write_history(cfg.run, loop.history)
        log.info("[%s] epoch %d/%d %s", tag, loop.epoch, cfg.train.epochs, line)
    train_state = loop.train_state(learner.optimizer, learner.scheduler, rank_states())
    report_epoch(metrics, rank, lambda d: save_checkpoint(d, learner.model, config=dump_config(cfg),
                                                          extra_state=train_state, metrics=metrics, **save_kwargs))
    if stop and rank == 0:
        log.info("[%s] early stopping: no %s improvement for %d epochs", tag, cfg.run.checkpoint_metric, loop.stale)
    return stop


def evaluates_on_this_rank(rank: int) -> bool:
    return rank == 0


def report_epoch(metrics: dict, rank: int, save: Callable[[str], Any]) -> None:
    """Every rank reports once per epoch (and per mid-epoch checkpoint); rank 0 attaches a checkpoint written
    by ``save(directory)``."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save(tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def maybe_inject_failure(run: RunSection, epoch: int, rank: int, step: int | None = None) -> None:
    """Chaos testing hook: fail once at ``run.inject_failure`` (``epoch``, and ``step`` steps into it when
    set; a marker in storage stops repeats). ``kill``: SIGKILL to this process, as when a node dies."""
    import signal

    spec = run.inject_failure
    if spec is None or spec.epoch != epoch or spec.rank != rank or spec.step != step:
        return
    name = f".injected-failure-epoch{epoch}" + (f"-step{step}" if step is not None else "")
    marker = storage.join(run.storage_path, run.name, name)
    if storage.exists(marker):
        return
    storage.write_text(marker, "injected\n")
    where = f"epoch {epoch}" + (f" step {step}" if step is not None else "")
    if spec.mode == "kill":
        log.warning("injected failure: killing rank %d (pid %d) at %s", rank, os.getpid(), where)
        for handler in logging.getLogger("breakhis_ray").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at {where} on rank {rank}")


def write_history(run: RunSection, history: list[dict]) -> None:
    """Rank 0 keeps ``<run_dir>/history.json`` current every epoch (curves for the report, any mode)."""
    uri = storage.join(run.storage_path, run.name, HISTORY_FILE)
    write_text_atomic(uri, json.dumps(history, indent=2, default=float))


def read_history(run_dir: str) -> list[dict]:
    uri = storage.join(run_dir, HISTORY_FILE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else []


# ------------------------------------------------------------------------------------- checkpoints
def checkpoint_position(uri: str) -> tuple[int, int]:
    """``(epochs done, steps done in the next epoch)`` of a checkpoint directory (step 0 at an epoch's end);
    epoch -1 when it is incomplete (``meta.json`` is written last) or foreign: never resumed from."""
    from breakhis_ray.checkpoint import read_meta

    try:
        metrics = read_meta(uri).get("metrics") or {}
        return int(metrics.get("epoch", -1)), int(metrics.get("step", 0))
    except (BreakhisError, ValueError, TypeError):
        return -1, 0


def checkpoint_epoch(uri: str) -> int:
    """The epochs done in a checkpoint directory; -1 when it is incomplete or foreign."""
    return checkpoint_position(uri)[0]


def latest_checkpoint(run: RunSection, reported=None):
    """The newest complete checkpoint of this run: Ray's own (``get_checkpoint()``) or, when Ray lost track
    of it (a worker died before its last report was registered, or the controller was restarted), the
    newest one found in the run's storage folder. Resuming never silently starts over at epoch 1."""
    import ray.train

    run_dir = storage.join(run.storage_path, run.name)
    candidates = []
    if reported is not None:
        candidates.append((checkpoint_position(checkpoint_uri(run.storage_path, reported)), reported))
    if storage.exists(run_dir):
        metas = [u for u in storage.list_files(run_dir, suffixes=["meta.json"])
                 if u.rstrip("/").split("/")[-2].startswith("checkpoint_")]
        for meta in metas:
            folder = storage.parent(meta)
            candidates.append((checkpoint_position(folder), folder))
    candidates = [c for c in candidates if c[0][0] >= 0]
    if not candidates:
        return None
    _, best = max(candidates, key=lambda c: c[0])
    if isinstance(best, str):
        fs, path = storage.resolve(best)
        return ray.train.Checkpoint(path, filesystem=fs)
    return best


def restore(checkpoint, model, optimizer, scheduler, device) -> dict | None:
    """Load weights, optimiser and scheduler state from a Ray checkpoint; return the train state (RNG state
    and partial sums per rank: :func:`restore_rank`)."""
    from breakhis_ray.checkpoint import load_state_dict, load_train_state, unwrap_model

    if checkpoint is None:
        return None
    with checkpoint.as_directory() as ckpt_dir:
        unwrap_model(model).load_state_dict(load_state_dict(ckpt_dir, map_location=device))
        state = load_train_state(ckpt_dir, map_location=device)
    if state is None:
        raise BreakhisError(f"checkpoint {checkpoint.path} has no train_state.pt: cannot resume from it")
    optimizer.load_state_dict(state["optimizer"])
    load_scheduler_state(scheduler, state["scheduler"])
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
                 datasets: dict, ordered: bool = False):
    """A ``TorchTrainer`` whose workers receive ``dump_config(cfg)``; storage may be local or ``s3://``.

    Only ``train`` is split across workers. Ray's equal split drops the remainder rows, which is harmless for
    a shuffled training epoch but would silently shrink validation; so ``val`` stays whole and rank 0
    evaluates it (`evaluates_on_this_rank`), its sums then shared with every rank. ``ordered``: the datasets
    are read with Ray Data's ``preserve_order`` (the split then ignores locality and task timing: the same
    rows reach the same rank in the same order, run after run).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    fs, path = storage.resolve(run.storage_path)
    # Train V2 would tee a worker's print() into its logger too, so a line could reach the driver twice.
    # Workers keep freed memory (breakhis_ray.allocator): CPU steps otherwise re-fault activations every batch.
    # Object-storage credentials come from each node's environment, never from this runtime env.
    env = {**MODEL_PROCESS_ENV, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if run.deterministic:  # read when cuBLAS starts: set before the worker process exists
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
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
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest_options(
            datasets, ordered)),
    )


def ingest_options(datasets: dict, ordered: bool) -> dict | None:
    """Ray Train's default ingest options for every dataset, with ``preserve_order`` when ``ordered``."""
    import ray.train

    if not ordered:
        return None
    options = {}
    for name in datasets:
        options[name] = ray.train.DataConfig.default_ingest_options()
        options[name].preserve_order = True
    return options


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
    """Build the trainer, run it to the end and summarise the run (:func:`summarise`). Data is read in order
    when ``cfg.data.seed`` is set (reproducible runs)."""
    trainer = make_trainer(loop, cfg, cfg.scaling, cfg.run, datasets, ordered=cfg.data.seed is not None)
    tracked = start_training_run(cfg, run_dir)  # None unless tracking.mlflow_uri is set
    try:
        summary = summarise(cfg.run, fit(trainer, run_dir), run_dir, tag)
    except BaseException:
        if tracked is not None:
            tracked.fail()
        raise
    if tracked is not None:
        tracked.finish(summary)
        summary["mlflow_run_id"] = tracked.ref.run_id
    return summary
