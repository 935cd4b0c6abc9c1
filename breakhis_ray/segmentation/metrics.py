"""Overlap metrics for binary segmentation masks (pure numpy).

Any non-zero value counts as foreground, so instance label maps can be passed directly. Two empty masks
agree perfectly: ``dice = iou = 1.0``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred) != 0
    truth = np.asarray(truth) != 0
    if pred.shape != truth.shape:
        raise ValueError(f"pred shape {pred.shape} does not match truth shape {truth.shape}")
    return pred, truth


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2|P & T| / (|P| + |T|)``; 1.0 when both masks are empty."""
    pred, truth = _pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(pred, truth).sum() / total)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|P & T| / |P | T|``; 1.0 when both masks are empty."""
    pred, truth = _pair(pred, truth)
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, truth).sum() / union)


def mean_dice_iou(preds: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> dict[str, float]:
    """Per-image Dice and IoU averaged over images: ``{"dice", "iou", "n"}``.

    ``preds`` and ``truths`` are sequences (or ``(B, H, W)`` arrays) of masks, paired by position.
    """
    preds, truths = list(preds), list(truths)
    if len(preds) != len(truths):
        raise ValueError(f"got {len(preds)} predictions for {len(truths)} ground-truth masks")
    if not preds:
        raise ValueError("mean_dice_iou needs at least one mask pair")
    dices = [dice(p, t) for p, t in zip(preds, truths)]
    ious = [iou(p, t) for p, t in zip(preds, truths)]
    return {"dice": float(np.mean(dices)), "iou": float(np.mean(ious)), "n": len(preds)}
