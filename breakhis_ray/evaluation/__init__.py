"""The evaluation maths behind ``breakhis-ray evaluate``: numpy and scikit-learn, no Ray, no stage module.

- :mod:`.sample`: :class:`Sample`, one evaluation set as arrays (labels, probabilities, patients, subtypes).
- :mod:`.thresholds`: the decision threshold chosen on validation predictions by a named rule, then locked.
- :mod:`.calibration`: expected calibration error (equal-width bins), Brier score, reliability bins.
- :mod:`.aggregate`: patient-level diagnosis by mean probability, majority vote and max, side by side.
- :mod:`.multiclass`: the eight-subtype task's per-class precision / recall / F1, macro F1, confusion matrix.
- :mod:`.bootstrap`: 95% intervals from a bootstrap that resamples patients.
- :mod:`.block`: one metrics block (what ``overall`` and each ``per_magnification`` entry hold) and the mean
  of such blocks over folds.
- :mod:`.tables`: prediction Parquet read and joined with the manifest (pandas), and a table's arrays as a
  :class:`Sample`.

The stage module :mod:`breakhis_ray.evaluate` reads the files and composes these.
"""

from __future__ import annotations

from breakhis_ray.evaluation.block import fold_mean_block, metrics_block
from breakhis_ray.evaluation.bootstrap import CI_LEVEL, bootstrap_intervals, patient_draws
from breakhis_ray.evaluation.calibration import brier_score, calibration_summary, expected_calibration_error
from breakhis_ray.evaluation.sample import Sample, subtype_prob_column
from breakhis_ray.evaluation.thresholds import THRESHOLD_RULES, Threshold, choose_threshold

__all__ = ["CI_LEVEL", "Sample", "THRESHOLD_RULES", "Threshold", "bootstrap_intervals", "brier_score",
           "calibration_summary", "choose_threshold", "expected_calibration_error", "fold_mean_block",
           "metrics_block", "patient_draws", "subtype_prob_column"]
