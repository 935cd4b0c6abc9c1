"""The training loop shared by the classifier and the U-Net trainers: pure torch, no Ray.

An epoch is the same for both: ``(x, y)`` batches, a forward pass (bf16 autocast on CUDA when enabled),
``loss_fn(logits.float(), y)``, backward, optional gradient clipping, an optimiser step. A trainer only says
how one batch is scored (``batch_stats(loss, logits, y)``: counts and sums, never means) and, elsewhere, how the
epoch's sums become metrics. Sums add up exactly over batches and over ranks (:func:`all_reduce_sums`).

Also here: the optimiser/scheduler factory, the preprocessing spec saved with every checkpoint, seeds and RNG
state for exact resume, deterministic algorithms, and the early-stopping comparison.

Exact resume: :func:`train_one_epoch` can start inside an epoch (``skip`` the batches already trained on, with
their ``totals``) and calls ``on_step`` after every optimiser step (mid-epoch checkpoints, failure injection).
The learning rate is a pure function of the epoch and the configured number of epochs (:func:`lr_factor`,
applied by :func:`set_epoch_lr` at the start of every epoch), so a resumed run, or one whose ``epochs`` was
raised, continues on the schedule its current config defines.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import numpy as np

if TYPE_CHECKING:
    from breakhis_ray.data.transforms import PreprocessSpec

#: ``(loss, logits, y) -> {name: count or sum}`` for one batch
BatchStats = Callable[[Any, Any, Any], dict[str, float]]


# ------------------------------------------------------------------------------- seeds and RNG state
def seed_everything(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    """This process's generators: Python, NumPy, torch CPU and, once CUDA is in use, the current CUDA device's."""
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8).cpu())


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (``run.deterministic``): ``torch.use_deterministic_algorithms`` (ops without a
    deterministic CUDA kernel warn instead of failing), cuDNN without autotuning, and a fixed cuBLAS workspace
    (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: call this before the first CUDA matmul). CPU runs
    are deterministic without it for a fixed thread count."""
    import os

    import torch

    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def is_improvement(score: float, best: float | None, mode: str) -> bool:
    return best is None or (score > best if mode == "max" else score < best)


# ------------------------------------------------------------------------------------ run pieces
def lr_factor(section, epoch: int) -> float:
    """The learning-rate multiplier of 0-based ``epoch`` under ``section``'s schedule: ``cosine`` from 1 down to
    0 over ``epochs`` (closed form, ``0.5 * (1 + cos(pi * epoch / epochs))``, held at 0 past the end), ``step``
    (x0.1 every ``step_size`` epochs) or ``none`` (1)."""
    import math

    if section.scheduler == "cosine":
        total = max(1, section.epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, total) / total))
    if section.scheduler == "step":
        return 0.1 ** (epoch // section.step_size)
    return 1.0


def build_optimizer(section, groups):
    """``(optimizer, scheduler)`` from an optimiser config section and torch parameter groups.

    ``section`` names ``optimizer`` (adam | adamw | sgd, Nesterov momentum), ``lr``, ``weight_decay``,
    ``momentum``, ``scheduler`` and ``epochs`` (see :func:`lr_factor`). ``groups``: parameters, or dicts with
    ``params`` and optionally their own ``lr``. The scheduler is a ``LambdaLR`` over :func:`lr_factor` of this
    section (a closure: its ``state_dict`` keeps only the epoch counter and base rates, so a checkpoint never
    carries an old number of epochs into a run configured for more).
    """
    import torch

    if section.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=section.lr, weight_decay=section.weight_decay)
    elif section.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=section.lr, weight_decay=section.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=section.lr, momentum=section.momentum,
                                    weight_decay=section.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(section, epoch))
    return optimizer, scheduler


def load_scheduler_state(scheduler, state: Mapping[str, Any]) -> None:
    """Restore a :func:`build_optimizer` scheduler's counters and base rates from a checkpoint (one of an
    earlier version's ``CosineAnnealingLR``/``StepLR`` included: the schedule itself always comes from the
    current config)."""
    keep = {k: state[k] for k in ("last_epoch", "base_lrs", "_step_count") if k in state}
    scheduler.load_state_dict({**keep, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


def set_epoch_lr(scheduler, epoch: int) -> float:
    """Put every parameter group at its schedule's rate for 0-based ``epoch`` (``base_lr * lr_factor``) and the
    scheduler's counter at ``epoch``; returns the last group's rate (the head's, for the classifier)."""
    scheduler.last_epoch = epoch
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
    return groups[-1]["lr"]


def preprocess_spec(model_name: str, data) -> "PreprocessSpec":
    """The one eval/inference transform of model ``model_name`` trained on ``data`` (saved in its checkpoints):
    the data section's ``image_size`` and ``scale``, the model's normalisation, and the data's
    ``stain_normalization`` where the section has one."""
    from breakhis_ray.data.transforms import PreprocessSpec
    from breakhis_ray.models import preprocessing_for

    norm = preprocessing_for(model_name)
    return PreprocessSpec(size=tuple(data.image_size), scale=data.scale, mean=norm["mean"], std=norm["std"],
                          stain_normalization=getattr(data, "stain_normalization", None))


def autocast(device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; a no-op context on CPU (CPU steps run in float32)."""
    import torch

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ epochs
@dataclass
class Learner:
    """What an epoch needs: the model (DDP-wrapped or bare), its loss, optimiser and scheduler, the device, how
    a batch is scored and the zero of those sums (its value types are kept: int counts stay ints), plus AMP,
    gradient clipping and a cap on training steps per epoch."""

    model: Any
    loss_fn: Any
    optimizer: Any
    scheduler: Any
    device: Any
    batch_stats: BatchStats
    zero: Mapping[str, float]
    amp: bool = False
    grad_clip: float | None = None
    max_steps: int | None = None


#: ``(steps done in this epoch, the epoch's sums so far) -> None``, called after every optimiser step
OnStep = Callable[[int, dict], None]


def add_sums(total: dict[str, float], part: Mapping[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def train_one_epoch(learner: Learner, batches: Iterable, *, skip: int = 0, totals: Mapping[str, float] | None = None,
                    on_step: OnStep | None = None) -> dict[str, float]:
    """One pass over ``batches`` of ``(x, y)`` on the device; the summed ``batch_stats`` plus ``seconds``.

    A resumed epoch passes ``skip`` (steps already done: their batches are drawn and dropped, so the next step
    sees the batch an uninterrupted epoch would) and ``totals`` (the sums of those steps). ``on_step(steps,
    totals)`` runs after every optimiser step, ``steps`` counted from the start of the epoch.
    """
    import torch

    model, optimizer = learner.model, learner.optimizer
    model.train()
    totals = dict(learner.zero) if totals is None else {k: v for k, v in totals.items() if k != "seconds"}
    steps, start = 0, time.perf_counter()
    for x, y in batches:
        if steps < skip:
            steps += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        with autocast(learner.device, learner.amp):
            logits = model(x)
        loss = learner.loss_fn(logits.float(), y)
        loss.backward()
        if learner.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), learner.grad_clip)
        optimizer.step()
        add_sums(totals, learner.batch_stats(loss.detach(), logits.detach(), y))
        steps += 1
        if on_step is not None:
            on_step(steps, totals)
        if learner.max_steps and steps >= learner.max_steps:
            break
    totals["seconds"] = time.perf_counter() - start
    return totals


def evaluate(learner: Learner, batches: Iterable) -> dict[str, float]:
    """The summed ``batch_stats`` of the bare model (no DDP wrapper: a DDP forward on one rank alone would wait
    on a buffer broadcast) over ``batches``; an empty iterable gives the zero sums."""
    import torch

    from breakhis_ray.checkpoint import unwrap_model

    model = unwrap_model(learner.model)
    model.eval()
    totals = dict(learner.zero)
    with torch.no_grad():
        for x, y in batches:
            with autocast(learner.device, learner.amp):
                logits = model(x)
            add_sums(totals, learner.batch_stats(learner.loss_fn(logits.float(), y), logits, y))
    return totals


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` outside a process group): per-rank RNG state and
    partial sums for a checkpoint that rank 0 writes alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sums(stats: dict[str, float], device) -> dict[str, float]:
    """Sum statistics over all ranks so every rank sees the same epoch metrics (and stops together);
    unchanged outside a process group."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stats
    keys = sorted(stats)
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))
