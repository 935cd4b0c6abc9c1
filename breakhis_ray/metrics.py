"""Classification metrics in pure numpy (no torch, no Ray), with the BreakHis patient-level conventions.

Labels are integers with ``1 = malignant`` as the positive class and ``0 = benign``; binary metrics
(precision, recall, F1, ROC AUC) are about the malignant class unless ``average="macro"`` is asked for.

Undefined values are ``None`` rather than ``nan`` (so metric dicts stay JSON-safe): every metric on an
empty input, ROC AUC when ``y_true`` holds one class only, patient metrics without patient ids.
Precision/recall/F1 with a zero denominator are ``0.0`` (scikit-learn's ``zero_division=0``).

BreakHis conventions (Spanhol et al. 2016):

* image recognition rate = plain accuracy over images;
* patient score = share of one patient's images classified correctly;
* patient recognition rate = mean patient score over patients (every patient counts once);
* patient (diagnosis) accuracy = each patient's mean malignant probability over their images, thresholded,
  compared with the patient's label; the share of patients diagnosed correctly.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

POSITIVE = 1  # malignant

METRIC_KEYS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "f1_macro",
    "roc_auc",
    "balanced_accuracy",
    "log_loss",
    "confusion_matrix",
    "image_recognition_rate",
    "patient_recognition_rate",
    "patient_accuracy",
    "n_images",
    "n_patients",
)


# ------------------------------------------------------------------------------------------ helpers
def _labels(y: Any) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.bool_):
            return arr.astype(np.int64)
        as_int = arr.astype(np.int64)
        if not np.array_equal(as_int, arr):
            raise ValueError("labels must be integers (0 benign, 1 malignant)")
        return as_int
    return arr.astype(np.int64)


def _scores(p: Any) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64).reshape(-1)
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError("scores/probabilities must be finite")
    return arr


def _same_length(*arrays: np.ndarray) -> None:
    sizes = {len(a) for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"inputs have different lengths: {sorted(sizes)}")


def _safe_div(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def predict(prob_malignant: Any, threshold: float = 0.5) -> np.ndarray:
    """Hard labels from malignant probabilities: ``1`` where ``prob >= threshold``."""
    return (_scores(prob_malignant) >= threshold).astype(np.int64)


# ------------------------------------------------------------------------------------ image level
def accuracy(y_true: Any, y_pred: Any) -> float | None:
    t, p = _labels(y_true), _labels(y_pred)
    _same_length(t, p)
    return float(np.mean(t == p)) if t.size else None


def image_recognition_rate(y_true: Any, y_pred: Any) -> float | None:
    """BreakHis image recognition rate: plain accuracy over images."""
    return accuracy(y_true, y_pred)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int = 2) -> np.ndarray:
    """Rows = true class, columns = predicted class; binary gives ``[[tn, fp], [fn, tp]]``."""
    t, p = _labels(y_true), _labels(y_pred)
    _same_length(t, p)
    if t.size and (t.min() < 0 or p.min() < 0 or t.max() >= num_classes or p.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _classes(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    return np.union1d(np.unique(t), np.unique(p))


def _prf_for_class(t: np.ndarray, p: np.ndarray, cls: int) -> tuple[float, float, float]:
    tp = float(np.sum((t == cls) & (p == cls)))
    fp = float(np.sum((t != cls) & (p == cls)))
    fn = float(np.sum((t == cls) & (p != cls)))
    prec, rec = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    return prec, rec, f1


def _prf(y_true: Any, y_pred: Any, average: str, which: int) -> float | None:
    t, p = _labels(y_true), _labels(y_pred)
    _same_length(t, p)
    if not t.size:
        return None
    if average == "binary":
        return _prf_for_class(t, p, POSITIVE)[which]
    if average == "macro":
        return float(np.mean([_prf_for_class(t, p, int(c))[which] for c in _classes(t, p)]))
    raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")


def precision(y_true: Any, y_pred: Any, average: str = "binary") -> float | None:
    """Malignant-class precision (``average="binary"``) or the unweighted mean over classes (``"macro"``)."""
    return _prf(y_true, y_pred, average, 0)


def recall(y_true: Any, y_pred: Any, average: str = "binary") -> float | None:
    """Malignant-class recall (sensitivity) or the macro mean over classes."""
    return _prf(y_true, y_pred, average, 1)


def f1(y_true: Any, y_pred: Any, average: str = "binary") -> float | None:
    """Malignant-class F1 or the macro mean over classes (classes present in ``y_true`` or ``y_pred``)."""
    return _prf(y_true, y_pred, average, 2)


def balanced_accuracy(y_true: Any, y_pred: Any) -> float | None:
    """Mean recall over the classes present in ``y_true``."""
    t, p = _labels(y_true), _labels(y_pred)
    _same_length(t, p)
    if not t.size:
        return None
    return float(np.mean([np.mean(p[t == c] == c) for c in np.unique(t)]))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties receiving the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(xs)]))
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def roc_auc(y_true: Any, score: Any) -> float | None:
    """Area under the ROC curve from ranks (Mann-Whitney U); ties count one half.

    Returns ``None`` when ``y_true`` holds a single class (the AUC is undefined) or is empty.
    """
    t, s = _labels(y_true), _scores(score)
    _same_length(t, s)
    n_pos = int(np.sum(t == POSITIVE))
    n_neg = int(t.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(s)
    u = float(np.sum(ranks[t == POSITIVE])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def log_loss(y_true: Any, prob_malignant: Any, eps: float = 1e-15) -> float | None:
    """Mean binary cross-entropy of malignant probabilities, clipped to ``[eps, 1 - eps]``."""
    t, q = _labels(y_true), _scores(prob_malignant)
    _same_length(t, q)
    if not t.size:
        return None
    q = np.clip(q, eps, 1.0 - eps)
    return float(-np.mean(np.where(t == POSITIVE, np.log(q), np.log1p(-q))))


# ---------------------------------------------------------------------------------- patient level
def _groups(patient_ids: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(patient_ids).reshape(-1)
    if len(ids) != n:
        raise ValueError(f"inputs have different lengths: {sorted({n, len(ids)})}")
    uniq, inverse = np.unique(ids.astype(str), return_inverse=True)
    return uniq, inverse.reshape(-1)


def patient_scores(y_true: Any, y_pred: Any, patient_ids: Any) -> dict[str, float]:
    """``{patient_id: share of that patient's images classified correctly}``."""
    t, p = _labels(y_true), _labels(y_pred)
    _same_length(t, p)
    uniq, inv = _groups(patient_ids, t.size)
    correct = np.bincount(inv, weights=(t == p).astype(np.float64), minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq))
    return {str(pid): float(c / n) for pid, c, n in zip(uniq, correct, counts)}


def patient_recognition_rate(y_true: Any, y_pred: Any, patient_ids: Any) -> float | None:
    """Mean of the patient scores: each patient counts once, whatever their number of images."""
    scores = patient_scores(y_true, y_pred, patient_ids)
    return float(np.mean(list(scores.values()))) if scores else None


def patient_predictions(
    y_true: Any, prob_malignant: Any, patient_ids: Any, threshold: float = 0.5
) -> dict[str, dict[str, float | int]]:
    """Per patient: label (majority of the image labels), mean malignant probability, prediction, n_images."""
    t, q = _labels(y_true), _scores(prob_malignant)
    _same_length(t, q)
    uniq, inv = _groups(patient_ids, t.size)
    counts = np.bincount(inv, minlength=len(uniq))
    mean_prob = np.bincount(inv, weights=q, minlength=len(uniq)) / np.maximum(counts, 1)
    mean_label = np.bincount(inv, weights=t.astype(np.float64), minlength=len(uniq)) / np.maximum(counts, 1)
    out = {}
    for pid, prob, lab, n in zip(uniq, mean_prob, mean_label, counts):
        out[str(pid)] = {
            "label": int(lab >= 0.5),
            "prob_malignant": float(prob),
            "pred": int(prob >= threshold),
            "n_images": int(n),
        }
    return out


def patient_accuracy(y_true: Any, prob_malignant: Any, patient_ids: Any, threshold: float = 0.5) -> float | None:
    """Patient diagnosis accuracy: mean image probability per patient, thresholded, against the patient label.

    A patient's label is the majority of their image labels (BreakHis patients carry one label each).
    """
    preds = patient_predictions(y_true, prob_malignant, patient_ids, threshold)
    if not preds:
        return None
    return float(np.mean([p["label"] == p["pred"] for p in preds.values()]))


# ---------------------------------------------------------------------------------------- summary
def compute_metrics(
    y_true: Any,
    prob_malignant: Any,
    patient_ids: Any | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Every metric for one evaluation, JSON-safe (floats, ints, ``None``, nested lists).

    Keys: ``METRIC_KEYS``. Patient metrics and ``n_patients`` are ``None`` without ``patient_ids``.
    """
    t, q = _labels(y_true), _scores(prob_malignant)
    _same_length(t, q)
    if t.size and (t.min() < 0 or t.max() > 1):
        raise ValueError("y_true must hold 0 (benign) or 1 (malignant)")
    p = predict(q, threshold)
    out: dict[str, Any] = {
        "accuracy": accuracy(t, p),
        "precision": precision(t, p),
        "recall": recall(t, p),
        "f1": f1(t, p),
        "f1_macro": f1(t, p, average="macro"),
        "roc_auc": roc_auc(t, q),
        "balanced_accuracy": balanced_accuracy(t, p),
        "log_loss": log_loss(t, q),
        "confusion_matrix": confusion_matrix(t, p).tolist(),
        "image_recognition_rate": image_recognition_rate(t, p),
        "patient_recognition_rate": None,
        "patient_accuracy": None,
        "n_images": int(t.size),
        "n_patients": None,
    }
    if patient_ids is not None:
        ids = np.asarray(patient_ids).reshape(-1)
        _same_length(t, ids)
        out["patient_recognition_rate"] = patient_recognition_rate(t, p, ids)
        out["patient_accuracy"] = patient_accuracy(t, q, ids, threshold)
        out["n_patients"] = int(len(np.unique(ids.astype(str))))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _numeric_array(value: Any) -> np.ndarray | None:
    if isinstance(value, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            return None
        return arr if arr.size else None
    return None


def mean_std_over_folds(folds: Sequence[Mapping[str, Any]], ddof: int = 0) -> dict[str, dict[str, Any]]:
    """``{key: {"mean", "std", "n"}}`` over per-fold metric dicts.

    Numbers are averaged over the folds where they are defined (``None``/``nan`` skipped; ``n`` says how
    many); equally-shaped numeric lists (confusion matrices) are averaged elementwise. Keys whose values
    are never numeric are left out. ``ddof=0`` is the population standard deviation.
    """
    keys: list[str] = []
    for fold in folds:
        keys.extend(k for k in fold if k not in keys)
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = [fold.get(key) for fold in folds]
        nums = [float(v) for v in values if _is_number(v) and not math.isnan(float(v))]
        if nums:
            arr = np.asarray(nums)
            std = float(arr.std(ddof=ddof)) if len(arr) > ddof else None
            out[key] = {"mean": float(arr.mean()), "std": std, "n": len(arr)}
            continue
        arrays = [a for a in (_numeric_array(v) for v in values) if a is not None]
        if arrays and all(a.shape == arrays[0].shape for a in arrays):
            stack = np.stack(arrays)
            std = stack.std(axis=0, ddof=ddof).tolist() if len(stack) > ddof else None
            out[key] = {"mean": stack.mean(axis=0).tolist(), "std": std, "n": len(stack)}
    return out


def format_mean_std(summary: Mapping[str, Any], key: str, percent: bool = True, digits: int = 2) -> str:
    """``"96.96 ± 1.20"`` for one key of :func:`mean_std_over_folds` (``"n/a"`` when absent)."""
    entry = summary.get(key)
    if not entry or not _is_number(entry.get("mean")):
        return "n/a"
    scale = 100.0 if percent else 1.0
    std = entry.get("std")
    std_txt = f" ± {std * scale:.{digits}f}" if _is_number(std) else ""
    return f"{entry['mean'] * scale:.{digits}f}{std_txt}"


__all__ = [
    "METRIC_KEYS",
    "accuracy",
    "balanced_accuracy",
    "compute_metrics",
    "confusion_matrix",
    "f1",
    "format_mean_std",
    "image_recognition_rate",
    "log_loss",
    "mean_std_over_folds",
    "patient_accuracy",
    "patient_predictions",
    "patient_recognition_rate",
    "patient_scores",
    "precision",
    "predict",
    "recall",
    "roc_auc",
]
