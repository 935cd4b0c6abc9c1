"""95% intervals from a bootstrap that resamples patients, not images.

Images of one patient are correlated (same tissue, same slide, same stain), so the unit of resampling is the
patient: replicate ``b`` draws ``P`` patients with replacement from the ``P`` patients of the evaluation set
and takes every image of each drawn patient (a patient drawn twice counts twice, at image and at patient
level). The draws are exactly ``numpy.random.default_rng(seed).integers(0, P, size=(resamples, P))`` over the
sorted patient ids, so a plain loop with the same seed reproduces every replicate (the tests do that with
scikit-learn). The threshold stays the locked one: the interval describes the test sampling, not the
threshold choice. Intervals are percentile intervals (``numpy.percentile``, linear) over the replicates where
the metric is defined (ROC AUC is undefined in a replicate holding one class only).

Several samples (one per fold): each fold's patients are resampled within the fold (one generator, folds in
order), each replicate averages the folds' values (folds where the metric is undefined are skipped, as in the
mean over folds), and the interval is that of the mean over folds.

Each replicate's metrics come from per-patient sums (confusion counts, losses, calibration gaps) weighted by
how often the patient was drawn, which equals recomputing them on the duplicated images; ROC AUC is the
weighted Mann-Whitney statistic (ties count one half).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from breakhis_ray.evaluation.aggregate import AGGREGATIONS, patient_table
from breakhis_ray.evaluation.calibration import bin_index
from breakhis_ray.evaluation.sample import Sample

CI_LEVEL = 0.95
#: Metrics of a block that get an interval (the subtype ones only when the sample has subtypes).
IMAGE_CI_METRICS = ("accuracy", "image_recognition_rate", "precision", "recall", "f1", "f1_macro",
                    "balanced_accuracy", "roc_auc", "log_loss", "patient_recognition_rate", "patient_accuracy",
                    "ece", "brier")
SUBTYPE_CI_METRICS = ("macro_f1", "subtype_accuracy", "subtype_balanced_accuracy")
PATIENT_CI_METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1", "roc_auc")
_LOG_EPS = 1e-15  # as breakhis_ray.metrics.log_loss
_CHUNK_CELLS = 4_000_000  # replicates x images per ROC AUC chunk (bounds memory on the full dataset)


def patient_draws(n_patients: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(resamples, n_patients)`` counts: how often each patient is drawn in each replicate."""
    idx = rng.integers(0, n_patients, size=(resamples, n_patients))
    flat = (idx + np.arange(resamples)[:, None] * n_patients).reshape(-1)
    return np.bincount(flat, minlength=resamples * n_patients).reshape(resamples, n_patients).astype(np.float64)


def _div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty)


def _binary_rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Binary metrics from ``(b, 4)`` weighted counts ``tn, fp, fn, tp``; ``nan`` where undefined, 0 where the
    project's metrics give 0 for a zero denominator (precision, recall, F1)."""
    tn, fp, fn, tp = cm.T
    n = tn + fp + fn + tp
    recall = _div(tp, tp + fn, 0.0)
    spec = _div(tn, tn + fp, np.nan)
    f1_pos = _div(2 * tp, 2 * tp + fp + fn, 0.0)
    f1_neg = _div(2 * tn, 2 * tn + fp + fn, 0.0)
    has_pos, has_neg = (tp + fn) > 0, (tn + fp) > 0
    in_pos, in_neg = (tp + fn + fp) > 0, (tn + fp + fn) > 0
    balanced = _div(np.where(has_pos, recall, 0.0) + np.where(has_neg, np.nan_to_num(spec), 0.0),
                    has_pos.astype(float) + has_neg.astype(float), np.nan)
    macro = _div(np.where(in_pos, f1_pos, 0.0) + np.where(in_neg, f1_neg, 0.0),
                 in_pos.astype(float) + in_neg.astype(float), np.nan)
    return {"accuracy": _div(tn + tp, n, np.nan), "precision": _div(tp, tp + fp, 0.0), "recall": recall,
            "specificity": spec, "f1": f1_pos, "f1_macro": macro, "balanced_accuracy": balanced}


def _weighted_auc(counts: np.ndarray, unit_patient: np.ndarray, y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC per replicate: unit ``i`` (an image, or a patient) weighs ``counts[:, unit_patient[i]]``."""
    b = counts.shape[0]
    out = np.full(b, np.nan)
    if not y.size:
        return out
    order = np.argsort(score, kind="mergesort")
    s, pos = score[order], (y[order] == 1).astype(np.float64)
    neg = 1.0 - pos
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # groups of tied scores
    owner = unit_patient[order]
    step = max(1, _CHUNK_CELLS // max(1, y.size))
    for lo in range(0, b, step):
        w = counts[lo:lo + step][:, owner]
        wp = np.add.reduceat(w * pos, starts, axis=1)
        wn = np.add.reduceat(w * neg, starts, axis=1)
        below = np.cumsum(wn, axis=1) - wn
        num = np.sum(wp * (below + 0.5 * wn), axis=1)
        out[lo:lo + step] = _div(num, wp.sum(axis=1) * wn.sum(axis=1), np.nan)
    return out


def _per_patient(sample: Sample, values: np.ndarray, width: int | None = None) -> np.ndarray:
    """Sum of per-image ``values`` (1-D, or ``(N, width)``) per patient."""
    if values.ndim == 1:
        return np.bincount(sample.patient_index, weights=values, minlength=sample.n_patients)
    out = np.zeros((sample.n_patients, width or values.shape[1]))
    np.add.at(out, sample.patient_index, values)
    return out


def _subtype_rates(cm: np.ndarray) -> dict[str, np.ndarray]:
    """``macro_f1``, ``subtype_accuracy``, ``subtype_balanced_accuracy`` from ``(b, K, K)`` weighted counts."""
    diag = np.diagonal(cm, axis1=1, axis2=2)
    rows, cols = cm.sum(axis=2), cm.sum(axis=1)
    total = rows.sum(axis=1)
    in_true = rows > 0  # macro over the classes present in the true labels (see .multiclass)
    recall = _div(diag, rows, 0.0)
    f1 = _div(2 * diag, rows + cols, 0.0)
    return {"subtype_accuracy": _div(diag.sum(axis=1), total, np.nan),
            "subtype_balanced_accuracy": _div((recall * in_true).sum(axis=1), in_true.sum(axis=1), np.nan),
            "macro_f1": _div((f1 * in_true).sum(axis=1), in_true.sum(axis=1), np.nan)}


def replicate_metrics(sample: Sample, threshold: float, counts: np.ndarray,
                      bins: int = 10) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Every interval metric of ``sample`` in each replicate of ``counts`` (``(b, P)``, from
    :func:`patient_draws`): ``({metric: (b,)}, {aggregation rule: {metric: (b,)}})``, ``nan`` where undefined."""
    y, p = sample.y, sample.prob
    pred = (p >= threshold).astype(np.int64)
    cell = 2 * y + pred  # 0 tn, 1 fp, 2 fn, 3 tp
    cm = counts @ _per_patient(sample, np.eye(4)[cell], 4)
    out = _binary_rates(cm)
    out.pop("specificity")
    out["image_recognition_rate"] = out["accuracy"]
    n_images = cm.sum(axis=1)
    q = np.clip(p, _LOG_EPS, 1.0 - _LOG_EPS)
    loss = -np.where(y == 1, np.log(q), np.log1p(-q))
    out["log_loss"] = _div(counts @ _per_patient(sample, loss), n_images, np.nan)
    out["brier"] = _div(counts @ _per_patient(sample, (p - y) ** 2), n_images, np.nan)
    gaps = np.eye(bins)[bin_index(p, bins)] * (p - y)[:, None]
    out["ece"] = _div(np.abs(counts @ _per_patient(sample, gaps, bins)).sum(axis=1), n_images, np.nan)
    out["roc_auc"] = _weighted_auc(counts, sample.patient_index, y, p)
    drawn = counts.sum(axis=1)
    share_correct = _per_patient(sample, (pred == y).astype(np.float64)) / np.bincount(
        sample.patient_index, minlength=sample.n_patients)
    out["patient_recognition_rate"] = _div(counts @ share_correct, drawn, np.nan)
    table = patient_table(sample, threshold)
    mean_correct = (table.pred("mean", threshold) == table.label).astype(np.float64)
    out["patient_accuracy"] = _div(counts @ mean_correct, drawn, np.nan)
    if sample.has_subtypes:
        k = len(sample.classes)
        cells = np.eye(k * k)[sample.subtype_true * k + sample.subtype_pred]
        out.update(_subtype_rates((counts @ _per_patient(sample, cells, k * k)).reshape(-1, k, k)))
    rules = {}
    units = np.arange(sample.n_patients)
    for rule in AGGREGATIONS:
        rule_pred = table.pred(rule, threshold)
        rates = _binary_rates(counts @ np.eye(4)[2 * table.label + rule_pred])
        rates["roc_auc"] = _weighted_auc(counts, units, table.label, table.score(rule))
        rules[rule] = {m: rates[m] for m in PATIENT_CI_METRICS}
    return out, rules


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def _fold_mean(arrays: list[np.ndarray]) -> np.ndarray:
    stack = np.stack(arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all folds undefined in a replicate: nan
        return np.nanmean(stack, axis=0)


def bootstrap_intervals(samples: Sequence[Sample], thresholds: Sequence[float], resamples: int = 1000,
                        seed: int = 0, bins: int = 10, level: float = CI_LEVEL) -> dict[str, Any]:
    """Percentile intervals of every metric (of the mean over the samples, one sample per fold).

    Returns ``{"ci95": {metric: [lo, hi] | None}, "patient_aggregation": {rule: {metric: [lo, hi] | None}}}``;
    empty dicts when ``resamples`` is 0 or no sample holds a patient.
    """
    samples, thresholds = list(samples), list(thresholds)
    if len(samples) != len(thresholds):
        raise ValueError(f"{len(samples)} sample(s) but {len(thresholds)} threshold(s)")
    rng = np.random.default_rng(seed)
    image_reps: list[dict[str, np.ndarray]] = []
    rule_reps: list[dict[str, dict[str, np.ndarray]]] = []
    for sample, threshold in zip(samples, thresholds):
        if resamples <= 0 or sample.n_patients == 0:
            continue
        counts = patient_draws(sample.n_patients, resamples, rng)
        image, rules = replicate_metrics(sample, threshold, counts, bins)
        image_reps.append(image)
        rule_reps.append(rules)
    if not image_reps:
        return {"ci95": {}, "patient_aggregation": {}}
    keys = [k for k in IMAGE_CI_METRICS + SUBTYPE_CI_METRICS if all(k in r for r in image_reps)]
    ci = {k: _interval(_fold_mean([r[k] for r in image_reps]), level) for k in keys}
    agg = {rule: {m: _interval(_fold_mean([r[rule][m] for r in rule_reps]), level) for m in PATIENT_CI_METRICS}
           for rule in AGGREGATIONS}
    return {"ci95": ci, "patient_aggregation": agg}


__all__ = ["CI_LEVEL", "IMAGE_CI_METRICS", "PATIENT_CI_METRICS", "SUBTYPE_CI_METRICS", "bootstrap_intervals",
           "patient_draws", "replicate_metrics"]
