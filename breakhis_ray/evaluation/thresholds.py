"""The decision threshold: chosen on validation predictions by a named rule, then locked for the test split.

Rules (an image is malignant when ``prob_malignant >= threshold``):

* ``fixed``: the configured value (0.5 by default); the validation predictions are not looked at.
* ``youden``: the validation threshold that maximises Youden's J = sensitivity + specificity - 1.
* ``sensitivity``: the highest validation threshold whose validation sensitivity reaches
  ``target_sensitivity`` (of the thresholds meeting the target, the most specific one).

Candidate thresholds are the distinct validation probabilities (scikit-learn's ``roc_curve`` with
``drop_intermediate=False``); ties in J go to the highest threshold. The chosen value is a function of the
validation labels and probabilities only: :func:`choose_threshold` never sees the test predictions, which is
what locks it. Without validation predictions, or when they lack a class the rule needs, the rule falls back
to the configured value and ``rule`` says so (``"0.5 (no validation predictions)"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

THRESHOLD_RULES = ("fixed", "youden", "sensitivity")


@dataclass(frozen=True)
class Threshold:
    """A locked threshold and how it was chosen.

    ``rule`` is what was applied (``fixed``, ``youden``, ``sensitivity >= 0.95``, or the fallback with its
    reason); ``requested`` the configured rule. ``val_*`` describe the validation set at the threshold.
    """

    value: float
    rule: str
    requested: str
    fallback: bool = False
    n_val_images: int = 0
    val_sensitivity: float | None = None
    val_specificity: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rates(y: np.ndarray, p: np.ndarray, value: float) -> tuple[float | None, float | None]:
    pred = p >= value
    pos, neg = y == 1, y == 0
    sens = float(np.mean(pred[pos])) if pos.any() else None
    spec = float(np.mean(~pred[neg])) if neg.any() else None
    return sens, spec


def choose_threshold(rule: str, y_val: Any = None, p_val: Any = None, *, value: float = 0.5,
                     target_sensitivity: float = 0.95) -> Threshold:
    """The threshold of ``rule`` on the validation labels ``y_val`` (0/1) and probabilities ``p_val``.

    ``value`` is the ``fixed`` threshold and the fallback. ``y_val``/``p_val`` ``None`` or empty: no
    validation predictions (the fallback, said in ``rule``).
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; choose from {', '.join(THRESHOLD_RULES)}")
    if not 0.0 < value < 1.0:
        raise ValueError(f"threshold value must lie in (0, 1), got {value}")
    y = np.zeros(0, dtype=np.int64) if y_val is None else np.asarray(y_val).astype(np.int64).reshape(-1)
    p = np.zeros(0) if p_val is None else np.asarray(p_val, dtype=np.float64).reshape(-1)
    if len(y) != len(p):
        raise ValueError(f"y_val and p_val have different lengths: {len(y)}, {len(p)}")
    if p.size and not np.all(np.isfinite(p)):
        raise ValueError("validation probabilities must be finite")

    def fallback(reason: str) -> Threshold:
        sens, spec = _rates(y, p, value)
        return Threshold(value, f"{value:g} ({reason})", rule, True, int(y.size), sens, spec)

    if rule == "fixed":
        sens, spec = _rates(y, p, value)
        return Threshold(value, "fixed", rule, False, int(y.size), sens, spec)
    if not y.size:
        return fallback("no validation predictions")
    n_pos = int(np.sum(y == 1))
    if n_pos == 0 or (rule == "youden" and n_pos == y.size):
        return fallback(f"validation predictions hold one class only; {rule} needs "
                        + ("both" if rule == "youden" else "malignant images"))

    from sklearn.metrics import roc_curve

    if n_pos == y.size:  # rule sensitivity without benign images: the sensitivity of each distinct score
        thresholds = np.unique(p)[::-1]
        tpr = (p.size - np.searchsorted(np.sort(p), thresholds, side="left")) / p.size
        fpr = np.zeros_like(tpr)
    else:
        fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
        finite = np.isfinite(thresholds)  # the first threshold (+inf) predicts nothing malignant
        fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "youden":
        index = int(np.argmax(tpr - fpr))  # first maximum: the highest threshold among ties
        applied = "youden"
    else:
        index = int(np.flatnonzero(tpr >= target_sensitivity - 1e-12)[0])
        applied = f"sensitivity >= {target_sensitivity:g}"
    chosen = float(min(max(thresholds[index], np.nextafter(0.0, 1.0)), 1.0))
    sens, spec = _rates(y, p, chosen)
    return Threshold(chosen, applied, rule, False, int(y.size), sens, spec)


__all__ = ["THRESHOLD_RULES", "Threshold", "choose_threshold"]
