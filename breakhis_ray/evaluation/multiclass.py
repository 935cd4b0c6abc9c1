"""Metrics of the eight-subtype task (scikit-learn), at image and patient level.

Image level: each image's predicted subtype is its most probable class. Patient level: a patient's true subtype
is the most frequent subtype of their images (ties: the lower class id; BreakHis patients carry one subtype),
their predicted subtype the most probable class of their mean class probabilities.

Per class: precision, recall, F1 and support (images, or patients, of that true class); ``None`` where a
denominator is zero (recall of a class with no support, precision of a class never predicted). Macro F1 is the
unweighted mean F1 over the classes present in the true labels (scikit-learn's
``f1_score(labels=np.unique(y_true), average="macro")``), as balanced accuracy is the mean recall over them: a
fold (or a bootstrap replicate) without a patient of some subtype is scored on the subtypes it holds, instead
of counting that subtype's stray predictions as an F1 of 0. The confusion matrix is ``K x K`` in class order,
rows true, columns predicted.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from breakhis_ray.evaluation.sample import Sample


def subtype_metrics(y_true: Any, y_pred: Any, classes: Sequence[str]) -> dict[str, Any]:
    """``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``per_class`` and ``confusion_matrix`` (JSON-safe)."""
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    t = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(y_pred).astype(np.int64).reshape(-1)
    k = len(classes)
    labels = list(range(k))
    if not t.size:
        return {"accuracy": None, "balanced_accuracy": None, "macro_f1": None,
                "per_class": {name: {"precision": None, "recall": None, "f1": None, "support": 0}
                              for name in classes},
                "confusion_matrix": np.zeros((k, k), dtype=int).tolist(), "n": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        prec, rec, f1, support = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
        macro = f1_score(t, p, labels=np.unique(t), average="macro", zero_division=0)
        balanced = balanced_accuracy_score(t, p)
    cm = confusion_matrix(t, p, labels=labels)
    predicted = cm.sum(axis=0)
    per_class = {}
    for i, name in enumerate(classes):
        per_class[name] = {
            "precision": float(prec[i]) if predicted[i] else None,
            "recall": float(rec[i]) if support[i] else None,
            "f1": float(f1[i]) if (support[i] or predicted[i]) else None,
            "support": int(support[i]),
        }
    return {"accuracy": float(accuracy_score(t, p)), "balanced_accuracy": float(balanced),
            "macro_f1": float(macro), "per_class": per_class, "confusion_matrix": cm.astype(int).tolist(),
            "n": int(t.size)}


def patient_subtypes(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """``(true, predicted)`` subtype ids per patient (sorted patient ids), as the module docstring says."""
    if not sample.has_subtypes:
        raise ValueError("the sample holds no subtype columns")
    k, n_pat, idx = len(sample.classes), sample.n_patients, sample.patient_index
    votes = np.zeros((n_pat, k))
    np.add.at(votes, (idx, sample.subtype_true), 1.0)
    probs = np.zeros((n_pat, k))
    np.add.at(probs, idx, sample.subtype_prob)
    return np.argmax(votes, axis=1).astype(np.int64), np.argmax(probs, axis=1).astype(np.int64)


def subtype_block(sample: Sample) -> dict[str, Any]:
    """The subtype keys of a metrics block: ``classes``, ``macro_f1``, ``subtype_accuracy``,
    ``subtype_balanced_accuracy``, ``per_class``, ``confusion_matrix`` (image level) and ``patient_level``
    (the same at patient level, with ``n_patients``)."""
    classes = list(sample.classes)
    image = subtype_metrics(sample.subtype_true, sample.subtype_pred, classes)
    if sample.n:
        true_p, pred_p = patient_subtypes(sample)
    else:
        true_p = pred_p = np.zeros(0, dtype=np.int64)
    patient = subtype_metrics(true_p, pred_p, classes)
    return {
        "classes": classes,
        "macro_f1": image["macro_f1"],
        "subtype_accuracy": image["accuracy"],
        "subtype_balanced_accuracy": image["balanced_accuracy"],
        "per_class": image["per_class"],
        "confusion_matrix": image["confusion_matrix"],
        "patient_level": {"macro_f1": patient["macro_f1"], "subtype_accuracy": patient["accuracy"],
                          "subtype_balanced_accuracy": patient["balanced_accuracy"],
                          "per_class": patient["per_class"], "confusion_matrix": patient["confusion_matrix"],
                          "n_patients": patient["n"]},
    }


__all__ = ["patient_subtypes", "subtype_block", "subtype_metrics"]
