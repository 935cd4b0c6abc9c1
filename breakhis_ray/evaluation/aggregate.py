"""Patient-level diagnosis from image predictions, three ways side by side.

A patient's true label is the majority of their image labels (BreakHis patients carry one label each). With
the locked threshold ``t``:

* ``mean``: the patient's mean malignant probability ``>= t`` (the project's ``patient_accuracy``);
* ``majority``: the share of the patient's images called malignant (``p >= t``) is at least one half (a tie
  counts as malignant: the cautious call);
* ``max``: the patient's highest image probability ``>= t`` (one suspicious image is enough).

The ROC AUC of each rule ranks patients by its score: the mean probability, the malignant vote share, the
maximum probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from breakhis_ray import metrics as M
from breakhis_ray.evaluation.sample import Sample

AGGREGATIONS = ("mean", "majority", "max")


@dataclass(frozen=True)
class PatientTable:
    """One row per patient (sorted ids): label, image count and the score of each aggregation rule."""

    ids: np.ndarray
    label: np.ndarray
    n_images: np.ndarray
    mean_prob: np.ndarray
    vote_share: np.ndarray
    max_prob: np.ndarray

    def score(self, rule: str) -> np.ndarray:
        return {"mean": self.mean_prob, "majority": self.vote_share, "max": self.max_prob}[rule]

    def pred(self, rule: str, threshold: float) -> np.ndarray:
        if rule == "majority":
            return (self.vote_share >= 0.5).astype(np.int64)
        if rule in ("mean", "max"):
            return (self.score(rule) >= threshold).astype(np.int64)
        raise ValueError(f"unknown aggregation {rule!r}; choose from {', '.join(AGGREGATIONS)}")


def patient_table(sample: Sample, threshold: float) -> PatientTable:
    """Per-patient label and scores of ``sample`` at ``threshold``."""
    idx, n_pat = sample.patient_index, sample.n_patients
    counts = np.bincount(idx, minlength=n_pat).astype(np.float64)
    safe = np.maximum(counts, 1.0)
    label = (np.bincount(idx, weights=sample.y.astype(np.float64), minlength=n_pat) / safe >= 0.5)
    mean_prob = np.bincount(idx, weights=sample.prob, minlength=n_pat) / safe
    votes = np.bincount(idx, weights=(sample.prob >= threshold).astype(np.float64), minlength=n_pat) / safe
    max_prob = np.full(n_pat, -np.inf)
    np.maximum.at(max_prob, idx, sample.prob)
    return PatientTable(sample.patient_ids, label.astype(np.int64), counts.astype(np.int64), mean_prob, votes,
                        np.where(np.isfinite(max_prob), max_prob, 0.0))


def binary_summary(y: Any, pred: Any, score: Any) -> dict[str, Any]:
    """Accuracy, balanced accuracy, precision, recall (sensitivity), specificity, F1, ROC AUC, confusion."""
    y, pred = np.asarray(y).astype(np.int64), np.asarray(pred).astype(np.int64)
    neg = y == 0
    return {
        "accuracy": M.accuracy(y, pred),
        "balanced_accuracy": M.balanced_accuracy(y, pred),
        "precision": M.precision(y, pred),
        "recall": M.recall(y, pred),
        "specificity": float(np.mean(pred[neg] == 0)) if neg.any() else None,
        "f1": M.f1(y, pred),
        "roc_auc": M.roc_auc(y, score),
        "confusion_matrix": M.confusion_matrix(y, pred).tolist(),
    }


def patient_aggregation(sample: Sample, threshold: float) -> dict[str, dict[str, Any]]:
    """``{rule: {metrics..., "n_patients"}}`` for ``mean``, ``majority`` and ``max``."""
    table = patient_table(sample, threshold)
    out = {}
    for rule in AGGREGATIONS:
        out[rule] = {**binary_summary(table.label, table.pred(rule, threshold), table.score(rule)),
                     "n_patients": int(table.ids.size)}
    return out


__all__ = ["AGGREGATIONS", "PatientTable", "binary_summary", "patient_aggregation", "patient_table"]
