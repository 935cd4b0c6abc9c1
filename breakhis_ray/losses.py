"""Classification losses: cross-entropy, class-weighted cross-entropy and focal loss (pure torch, no Ray).

Focal loss (Lin et al. 2017), multi-class softmax form::

    FL = -alpha_t * (1 - p_t) ** gamma * log(p_t)

with ``p_t`` the softmax probability of the true class. ``gamma = 0`` and ``alpha = None`` is exactly
cross-entropy; ``gamma > 0`` down-weights easy (well-classified) examples so training concentrates on
hard ones, and ``alpha`` re-weights classes against imbalance (BreakHis: ~2.2 malignant per benign image).
``alpha`` is either a float, the weight of the positive (malignant, index 1) class in a two-class problem
(benign gets ``1 - alpha``), or one weight per class. ``reduction="mean"`` divides by the number of
examples (not by the sum of ``alpha_t``, unlike weighted ``F.cross_entropy``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from breakhis_ray.errors import ConfigError

LOSS_NAMES = ("ce", "weighted_ce", "focal")
_REDUCTIONS = ("mean", "sum", "none")
_EPS = 1e-12


def _alpha_tensor(alpha: float | Sequence[float] | torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if num_classes != 2:
            raise ValueError(f"a scalar alpha needs 2 classes (benign, malignant), got {num_classes}")
        return torch.tensor([1.0 - float(alpha), float(alpha)], dtype=like.dtype, device=like.device)
    weights = torch.as_tensor(alpha, dtype=like.dtype, device=like.device).reshape(-1)
    if weights.numel() != num_classes:
        raise ValueError(f"alpha has {weights.numel()} weights for {num_classes} classes")
    return weights


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float | Sequence[float] | torch.Tensor | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax focal loss of ``logits`` (N, C) against class indices ``target`` (N,).

    Computed in float32 (or wider) whatever the input dtype; ``reduction`` is ``mean``, ``sum`` or ``none``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    compute = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    target = target.long().reshape(-1)
    logpt = F.log_softmax(compute, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    loss = -logpt
    if gamma > 0:
        # 1 - p_t computed stably; the floor keeps the gradient finite when p_t rounds to 1
        one_minus_pt = (-torch.expm1(logpt)).clamp_min(_EPS)
        loss = one_minus_pt.pow(gamma) * loss
    if alpha is not None:
        loss = _alpha_tensor(alpha, compute.shape[1], compute)[target] * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _validate_alpha(alpha, num_classes: int | None) -> float | tuple[float, ...] | None:
    if alpha is None:
        return None
    if isinstance(alpha, bool):
        raise ConfigError(f"focal alpha must be a number in [0, 1] or a list of per-class weights, got {alpha!r}")
    if isinstance(alpha, (int, float)):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"focal alpha must lie in [0, 1], got {alpha}")
        if num_classes is not None and num_classes != 2:
            raise ConfigError(f"a scalar focal alpha needs 2 classes, got num_classes={num_classes}")
        return float(alpha)
    try:
        weights = tuple(float(a) for a in alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"focal alpha must be a number or a list of numbers, got {alpha!r}") from None
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"focal alpha weights must be finite and >= 0, got {list(weights)}")
    if num_classes is not None and len(weights) != num_classes:
        raise ConfigError(f"focal alpha has {len(weights)} weights for num_classes={num_classes}")
    return weights


class FocalLoss(nn.Module):
    """:func:`focal_loss` as a module; arguments are validated when it is built (``ConfigError``)."""

    def __init__(
        self,
        alpha: float | Sequence[float] | None = None,
        gamma: float = 2.0,
        reduction: str = "mean",
        num_classes: int | None = None,
    ):
        super().__init__()
        try:
            gamma = float(gamma)
        except (TypeError, ValueError):
            raise ConfigError(f"focal gamma must be a number >= 0, got {gamma!r}") from None
        if not math.isfinite(gamma) or gamma < 0:
            raise ConfigError(f"focal gamma must be a number >= 0, got {gamma}")
        if reduction not in _REDUCTIONS:
            raise ConfigError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
        self.alpha = _validate_alpha(alpha, num_classes)
        self.gamma = gamma
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, target, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


def inverse_frequency_weights(class_counts: Sequence[int | float], absent: str = "error") -> list[float]:
    """``n_total / (n_classes * n_c)`` per class (scikit-learn's "balanced"): mean weight over images is 1.

    A class with no images is an error (``absent="error"``), or (``absent="ignore"``) gets weight 0 while the
    others are balanced among themselves (``n_classes`` = the classes present): a class absent from the training
    labels never enters a class-weighted loss, whatever its weight.
    """
    counts = [float(c) for c in class_counts]
    if len(counts) < 2:
        raise ConfigError(f"class_counts needs one count per class (at least 2), got {list(class_counts)}")
    if any(not math.isfinite(c) or c < 0 for c in counts):
        raise ConfigError(f"class_counts must be finite and >= 0, got {counts}")
    present = [c for c in counts if c > 0]
    if absent != "ignore" and len(present) < len(counts):
        raise ConfigError(f"class_counts must all be > 0 (a class without images cannot be weighted), got {counts}")
    if not present:
        raise ConfigError(f"class_counts has no class with images, got {counts}")
    total = sum(present)
    return [total / (len(present) * c) if c > 0 else 0.0 for c in counts]


def create_loss(
    name: str,
    class_counts: Sequence[int | float] | None = None,
    alpha: float | Sequence[float] | str | None = None,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
    num_classes: int | None = None,
    absent_classes: str = "error",
) -> nn.Module:
    """Loss module by name: ``ce``, ``weighted_ce`` (inverse-frequency weights from ``class_counts``)
    or ``focal`` (``alpha``, ``gamma``). ``label_smoothing`` applies to the cross-entropy losses only.

    Focal ``alpha="balanced"`` takes the inverse-frequency weights of ``class_counts`` as per-class alpha (the
    class-balanced focal loss, any number of classes). ``num_classes``, when given, is checked against
    ``class_counts`` and a per-class ``alpha``. ``absent_classes="ignore"``: a class with a zero count gets
    weight 0 instead of an error (:func:`inverse_frequency_weights`).
    """
    if class_counts is not None and num_classes is not None and len(class_counts) != num_classes:
        raise ConfigError(f"class_counts has {len(class_counts)} counts for {num_classes} classes")
    if name not in LOSS_NAMES:
        raise ConfigError(f"unknown loss {name!r}; valid: {', '.join(LOSS_NAMES)}")
    try:
        label_smoothing = float(label_smoothing)
    except (TypeError, ValueError):
        raise ConfigError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}") from None
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    if name == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if name == "weighted_ce":
        if class_counts is None:
            raise ConfigError("loss 'weighted_ce' needs class_counts (images per class in the training split)")
        weight = torch.tensor(inverse_frequency_weights(class_counts, absent_classes), dtype=torch.float32)
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ConfigError("label_smoothing is supported by the 'ce' and 'weighted_ce' losses only, not 'focal'")
    if num_classes is None and class_counts is not None:
        num_classes = len(class_counts)
    if isinstance(alpha, str):
        if alpha != "balanced":
            raise ConfigError(f"focal alpha must be a number, a list of weights, 'balanced' or null, got {alpha!r}")
        if class_counts is None:
            raise ConfigError("focal alpha 'balanced' needs class_counts (images per class in the training split)")
        alpha = inverse_frequency_weights(class_counts, absent_classes)
    return FocalLoss(alpha=alpha, gamma=gamma, num_classes=num_classes)


__all__ = ["FocalLoss", "LOSS_NAMES", "create_loss", "focal_loss", "inverse_frequency_weights"]


# ------------------------------------------------------------------------------------ segmentation losses
def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` per image, ``p = sigmoid(logits)``.

    ``logits`` and ``target`` (0/1) share a shape ``(N, ...)``, e.g. ``(N, 1, H, W)``; each image is scored on
    its own, so an image with few nuclei counts as much as a crowded one. ``smooth`` keeps an empty target
    with an empty prediction at loss 0. Computed in float32 (or wider).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    if logits.ndim < 2:
        raise ValueError(f"dice_loss needs a batch dimension, got shape {tuple(logits.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    compute = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    prob = torch.sigmoid(compute).flatten(1)
    truth = target.to(prob.dtype).flatten(1)
    inter = (prob * truth).sum(1)
    loss = 1.0 - (2.0 * inter + smooth) / (prob.sum(1) + truth.sum(1) + smooth)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def binary_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-pixel sigmoid focal loss (mean), as :func:`focal_loss` over the two logits ``(0, z)``.

    ``softmax((0, z))[1] == sigmoid(z)``, so ``gamma = 0`` is exactly binary cross-entropy with logits.
    """
    z = (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits).reshape(-1, 1)
    two_class = torch.cat([torch.zeros_like(z), z], dim=1)
    return focal_loss(two_class, target.reshape(-1).long(), gamma=gamma)


class DiceBCELoss(nn.Module):
    """``dice_weight * dice_loss + bce_weight * pixel loss`` for binary (nuclei) segmentation logits.

    The pixel loss is binary cross-entropy, or the sigmoid focal loss when ``gamma > 0``
    (:func:`binary_focal_loss`). ``target`` holds 0/1 with the logits' shape. Arguments are validated when the
    module is built (``ConfigError``).
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, gamma: float = 0.0, smooth: float = 1.0):
        super().__init__()
        try:
            dice_weight, bce_weight, gamma, smooth = (float(v) for v in (dice_weight, bce_weight, gamma, smooth))
        except (TypeError, ValueError):
            raise ConfigError("dice/bce weights, gamma and smooth must be numbers") from None
        if min(dice_weight, bce_weight) < 0 or dice_weight + bce_weight <= 0:
            raise ConfigError(f"dice_weight and bce_weight must be >= 0 and not both 0, got {dice_weight}, {bce_weight}")
        if not math.isfinite(gamma) or gamma < 0:
            raise ConfigError(f"focal gamma must be a number >= 0, got {gamma}")
        if smooth < 0:
            raise ConfigError(f"dice smooth must be >= 0, got {smooth}")
        self.dice_weight, self.bce_weight, self.gamma, self.smooth = dice_weight, bce_weight, gamma, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype if logits.is_floating_point() else torch.float32)
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.dice_weight:
            loss = loss + self.dice_weight * dice_loss(logits, target, smooth=self.smooth)
        if self.bce_weight:
            if self.gamma > 0:
                pixel = binary_focal_loss(logits, target, gamma=self.gamma)
            else:
                pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float())
            loss = loss + self.bce_weight * pixel
        return loss

    def extra_repr(self) -> str:
        return f"dice_weight={self.dice_weight}, bce_weight={self.bce_weight}, gamma={self.gamma}, smooth={self.smooth}"


__all__ += ["DiceBCELoss", "binary_focal_loss", "dice_loss"]
