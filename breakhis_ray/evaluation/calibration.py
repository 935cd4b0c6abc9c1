"""Calibration of the malignant probability: expected calibration error, Brier score, reliability bins.

Bins are equal-width on ``[0, 1]``: a probability ``p`` falls in bin ``min(floor(p * bins), bins - 1)``, so
bin ``k`` is ``[k / bins, (k + 1) / bins)`` and the last bin includes 1.0.

* ECE (binary, malignant class) = sum over bins of ``n_k / N * |mean p in bin k - share malignant in bin k|``.
  This is the reliability diagram's gap weighted by the bin's share of images (not the "top-label" ECE over
  ``max(p, 1 - p)``).
* Brier score = mean of ``(p - y)^2`` (scikit-learn's ``brier_score_loss``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _arrays(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.float64).reshape(-1)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"inputs have different lengths: {len(y)}, {len(p)}")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilities must be finite and lie in [0, 1]")
    return y, p


def bin_index(prob: Any, bins: int) -> np.ndarray:
    """The equal-width bin of each probability (``0..bins-1``; 1.0 in the last bin)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    return np.minimum(np.floor(p * bins), bins - 1).astype(np.int64).clip(0)


def reliability_bins(y_true: Any, prob: Any, bins: int = 10) -> list[dict[str, Any]]:
    """Per bin: ``lo``, ``hi``, ``n``, ``mean_prob`` and ``frac_malignant`` (``None`` in an empty bin)."""
    y, p = _arrays(y_true, prob)
    index = bin_index(p, bins)
    n = np.bincount(index, minlength=bins)
    sum_p = np.bincount(index, weights=p, minlength=bins)
    sum_y = np.bincount(index, weights=y, minlength=bins)
    out = []
    for k in range(bins):
        out.append({"lo": k / bins, "hi": (k + 1) / bins, "n": int(n[k]),
                    "mean_prob": float(sum_p[k] / n[k]) if n[k] else None,
                    "frac_malignant": float(sum_y[k] / n[k]) if n[k] else None})
    return out


def expected_calibration_error(y_true: Any, prob: Any, bins: int = 10) -> float | None:
    """ECE over ``bins`` equal-width bins (``None`` on an empty input)."""
    y, p = _arrays(y_true, prob)
    if not p.size:
        return None
    index = bin_index(p, bins)
    gap = np.bincount(index, weights=p, minlength=bins) - np.bincount(index, weights=y, minlength=bins)
    return float(np.sum(np.abs(gap)) / p.size)


def brier_score(y_true: Any, prob: Any) -> float | None:
    """Mean squared difference between the malignant probability and the label (``None`` when empty)."""
    y, p = _arrays(y_true, prob)
    return float(np.mean((p - y) ** 2)) if p.size else None


def calibration_summary(y_true: Any, prob: Any, bins: int = 10) -> dict[str, Any]:
    """``{"ece", "brier", "bins", "reliability": [...]}`` (JSON-safe)."""
    return {"ece": expected_calibration_error(y_true, prob, bins), "brier": brier_score(y_true, prob),
            "bins": int(bins), "reliability": reliability_bins(y_true, prob, bins)}


__all__ = ["bin_index", "brier_score", "calibration_summary", "expected_calibration_error", "reliability_bins"]
