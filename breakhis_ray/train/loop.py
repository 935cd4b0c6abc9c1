"""The training loop shared by the classifier and the U-Net trainers: pure torch, no Ray.

An epoch is the same for both: ``(x, y)`` batches, a forward pass (bf16 autocast on CUDA when enabled),
``loss_fn(logits.float(), y)``, backward, optional gradient clipping, an optimiser step. A trainer only says
how one batch is scored (``batch_stats(loss, logits, y)``: counts and sums, never means) and, elsewhere, how the
epoch's sums become metrics. Sums add up exactly over batches and over ranks (:func:`all_reduce_sums`).

Also here: the optimiser/scheduler factory, the preprocessing spec saved with every checkpoint, seeds and RNG
state for exact resume, and the early-stopping comparison.
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
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())


def is_improvement(score: float, best: float | None, mode: str) -> bool:
    return best is None or (score > best if mode == "max" else score < best)


# ------------------------------------------------------------------------------------ run pieces
def build_optimizer(section, groups):
    """``(optimizer, scheduler)`` from an optimiser config section and torch parameter groups.

    ``section`` names ``optimizer`` (adam | adamw | sgd, Nesterov momentum), ``lr``, ``weight_decay``,
    ``momentum``, ``scheduler`` (cosine over ``epochs`` | step: x0.1 every ``step_size`` epochs | none) and
    ``epochs``. ``groups``: parameters, or dicts with ``params`` and optionally their own ``lr``.
    """
    import torch

    if section.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, lr=section.lr, weight_decay=section.weight_decay)
    elif section.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=section.lr, weight_decay=section.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=section.lr, momentum=section.momentum,
                                    weight_decay=section.weight_decay, nesterov=True)
    if section.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, section.epochs))
    elif section.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=section.step_size, gamma=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


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


def add_sums(total: dict[str, float], part: Mapping[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def train_one_epoch(learner: Learner, batches: Iterable) -> dict[str, float]:
    """One pass over ``batches`` of ``(x, y)`` on the device; the summed ``batch_stats`` plus ``seconds``."""
    import torch

    model, optimizer = learner.model, learner.optimizer
    model.train()
    totals = dict(learner.zero)
    steps, start = 0, time.perf_counter()
    for x, y in batches:
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
