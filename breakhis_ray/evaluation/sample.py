"""One evaluation set as plain arrays: what every metric, the threshold rule and the bootstrap take.

A :class:`Sample` holds the usable predictions of one scope (a fold's test split, or one magnification of it):
binary labels (``1`` malignant), malignant probabilities, patient ids and, for the subtype task, the true
subtype ids and the per-class probabilities (columns in :data:`~breakhis_ray.domain.SUBTYPE_CLASSES` order).
Patients are indexed ``0..P-1`` in sorted order of their ids; the bootstrap draws those indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


def subtype_prob_column(name: str) -> str:
    """The prediction column of one subtype's probability: ``prob_<subtype>`` (e.g. ``prob_adenosis``)."""
    return f"prob_{name}"


@dataclass(frozen=True)
class Sample:
    """Arrays of one evaluation scope (every row a usable prediction).

    ``y``: int 0/1 (1 malignant); ``prob``: float malignant probability; ``patients``: patient ids (str);
    ``subtype_true``: int class ids into ``classes`` (or ``None``); ``subtype_prob``: ``(N, len(classes))``.
    """

    y: np.ndarray
    prob: np.ndarray
    patients: np.ndarray
    subtype_true: np.ndarray | None = None
    subtype_prob: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    #: sorted unique patient ids and each row's index into them (filled in ``__post_init__``)
    patient_ids: np.ndarray = field(init=False, repr=False)
    patient_index: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        y = np.asarray(self.y).astype(np.int64).reshape(-1)
        prob = np.asarray(self.prob, dtype=np.float64).reshape(-1)
        patients = np.asarray(self.patients).astype(str).reshape(-1)
        if not (len(y) == len(prob) == len(patients)):
            raise ValueError(f"y, prob and patients have different lengths: {len(y)}, {len(prob)}, {len(patients)}")
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError("y must hold 0 (benign) or 1 (malignant)")
        if prob.size and not np.all(np.isfinite(prob)):
            raise ValueError("probabilities must be finite")
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "prob", prob)
        object.__setattr__(self, "patients", patients)
        ids, index = np.unique(patients, return_inverse=True)
        object.__setattr__(self, "patient_ids", ids)
        object.__setattr__(self, "patient_index", index.reshape(-1).astype(np.int64))
        if (self.subtype_true is None) != (self.subtype_prob is None):
            raise ValueError("subtype_true and subtype_prob go together")
        if self.subtype_true is not None:
            true = np.asarray(self.subtype_true).astype(np.int64).reshape(-1)
            probs = np.asarray(self.subtype_prob, dtype=np.float64)
            k = len(self.classes)
            if probs.shape != (len(y), k):
                raise ValueError(f"subtype_prob must be (N={len(y)}, {k}) for {k} classes, got {probs.shape}")
            if true.size and (true.min() < 0 or true.max() >= k):
                raise ValueError(f"subtype_true must lie in [0, {k - 1}]")
            object.__setattr__(self, "subtype_true", true)
            object.__setattr__(self, "subtype_prob", probs)

    @property
    def n(self) -> int:
        return int(self.y.size)

    @property
    def n_patients(self) -> int:
        return int(self.patient_ids.size)

    @property
    def has_subtypes(self) -> bool:
        return self.subtype_true is not None

    @property
    def subtype_pred(self) -> np.ndarray | None:
        """Predicted subtype ids: the most probable class of each row (ties: the lower class id)."""
        if self.subtype_prob is None:
            return None
        if not self.n:
            return np.zeros(0, dtype=np.int64)
        return np.argmax(self.subtype_prob, axis=1).astype(np.int64)


def concat(samples: Sequence[Sample]) -> Sample:
    """Rows of several samples as one (e.g. out-of-fold predictions pooled over folds)."""
    samples = list(samples)
    if not samples:
        raise ValueError("concat needs at least one sample")
    subtypes = all(s.has_subtypes for s in samples)
    return Sample(np.concatenate([s.y for s in samples]), np.concatenate([s.prob for s in samples]),
                  np.concatenate([s.patients for s in samples]),
                  np.concatenate([s.subtype_true for s in samples]) if subtypes else None,
                  np.concatenate([s.subtype_prob for s in samples]) if subtypes else None,
                  samples[0].classes if subtypes else ())


__all__ = ["Sample", "concat", "subtype_prob_column"]
