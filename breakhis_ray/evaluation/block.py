"""One metrics block (what ``overall`` and each ``per_magnification`` entry of the evaluate JSON hold), and
the mean of such blocks over folds.

A block holds :func:`breakhis_ray.metrics.compute_metrics` at the locked threshold, plus

* ``ci95``: ``{metric: [lo, hi]}`` from the patient bootstrap (:mod:`.bootstrap`), ``None`` where undefined;
* ``calibration``: ``{"ece", "brier", "bins", "reliability": [...]}`` (:mod:`.calibration`);
* ``patient_aggregation``: ``{"mean" | "majority" | "max": {metrics..., "ci95"}}`` (:mod:`.aggregate`);
* ``binary_confusion_matrix``: ``[[tn, fp], [fn, tp]]``, in both tasks;
* subtype task only (:mod:`.multiclass`): ``classes``, ``macro_f1``, ``subtype_accuracy``,
  ``subtype_balanced_accuracy``, ``per_class``, ``patient_level``, and ``confusion_matrix`` becomes the
  ``K x K`` subtype matrix in ``classes`` order (the binary one stays in ``binary_confusion_matrix``).

Over folds (:func:`fold_mean_block`): numbers are means over the folds where they are defined; counts and
confusion matrices are sums; ``ci95`` is the interval of the mean over folds (patients resampled within each
fold); the reliability bins pool every fold's predictions (out-of-fold predictions).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from breakhis_ray.evaluation.aggregate import patient_aggregation
from breakhis_ray.evaluation.bootstrap import (
    IMAGE_CI_METRICS,
    PATIENT_CI_METRICS,
    SUBTYPE_CI_METRICS,
    bootstrap_intervals,
)
from breakhis_ray.evaluation.calibration import calibration_summary, reliability_bins
from breakhis_ray.evaluation.multiclass import subtype_block
from breakhis_ray.evaluation.sample import Sample, concat
from breakhis_ray.metrics import compute_metrics

#: Keys summed (not averaged) over folds, wherever they appear in a block.
SUMMED_KEYS = ("confusion_matrix", "binary_confusion_matrix", "n_images", "n_patients", "n_errors", "support")


def _attach_intervals(block: dict[str, Any], intervals: Mapping[str, Any], subtypes: bool) -> None:
    keys = IMAGE_CI_METRICS + (SUBTYPE_CI_METRICS if subtypes else ())
    ci = intervals.get("ci95") or {}
    block["ci95"] = {k: ci.get(k) for k in keys}
    agg = intervals.get("patient_aggregation") or {}
    for rule, values in block["patient_aggregation"].items():
        values["ci95"] = {m: (agg.get(rule) or {}).get(m) for m in PATIENT_CI_METRICS}


def metrics_block(sample: Sample, threshold: float, *, bins: int = 10, resamples: int = 1000,
                  seed: int = 0) -> dict[str, Any]:
    """The metrics block of one evaluation set at the locked ``threshold`` (JSON-safe)."""
    out = compute_metrics(sample.y, sample.prob, patient_ids=sample.patients, threshold=threshold)
    out["binary_confusion_matrix"] = out["confusion_matrix"]
    out["calibration"] = calibration_summary(sample.y, sample.prob, bins)
    out["patient_aggregation"] = patient_aggregation(sample, threshold)
    if sample.has_subtypes:
        out.update(subtype_block(sample))
    _attach_intervals(out, bootstrap_intervals([sample], [threshold], resamples, seed, bins), sample.has_subtypes)
    return out


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and not math.isnan(float(value)))


def _combine(values: Sequence[Any], key: str | None) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, Mapping) for v in present):
        keys: list[str] = []
        for v in present:
            keys.extend(k for k in v if k not in keys)
        return {k: _combine([v.get(k) for v in present], k) for k in keys}
    if key in SUMMED_KEYS:
        try:
            total = np.sum(np.asarray(present, dtype=np.float64), axis=0)
        except ValueError:  # shapes differ (should not happen): keep the first
            return present[0]
        return total.astype(int).tolist() if np.ndim(total) else int(total)
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in present):
        if all(v == present[0] for v in present):
            return present[0]  # settings (bins) and equal values stay as they are
        numbers = [float(v) for v in present if _is_number(v)]
        return float(np.mean(numbers)) if numbers else None
    return present[0]  # names, lists of names, settings: the same in every fold


def fold_mean_block(blocks: Sequence[Mapping[str, Any]], samples: Sequence[Sample], thresholds: Sequence[float],
                    *, bins: int = 10, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One block from the folds' blocks: means, sums, pooled reliability, intervals of the mean over folds."""
    blocks = list(blocks)
    out = _combine(blocks, None) or {}
    out.pop("ci95", None)
    subtypes = bool(samples) and all(s.has_subtypes for s in samples)
    nonempty = [s for s in samples if s.n]
    if isinstance(out.get("calibration"), dict):
        pooled = concat(nonempty) if nonempty else None
        out["calibration"]["reliability"] = (reliability_bins(pooled.y, pooled.prob, bins) if pooled is not None
                                             else reliability_bins([], [], bins))
        out["calibration"]["reliability_pooled_over_folds"] = True
    _attach_intervals(out, bootstrap_intervals(samples, thresholds, resamples, seed, bins), subtypes)
    return out


__all__ = ["SUMMED_KEYS", "fold_mean_block", "metrics_block"]
