"""Metrics: checked against scikit-learn and against hand-computed BreakHis patient-level cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from breakhis_ray import metrics as M

sk = pytest.importorskip("sklearn.metrics")


def _random_case(seed: int, n: int = 200, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    prob = np.clip(0.35 * y + rng.uniform(0, 0.65, size=n), 0.0, 1.0)
    if ties:
        prob = np.round(prob, 1)
    return y, prob


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, False), (3, True)])
def test_image_metrics_match_sklearn(seed, ties):
    y, prob = _random_case(seed, ties=ties)
    pred = (prob >= 0.5).astype(int)
    assert M.accuracy(y, pred) == pytest.approx(sk.accuracy_score(y, pred))
    assert M.precision(y, pred) == pytest.approx(sk.precision_score(y, pred, zero_division=0))
    assert M.recall(y, pred) == pytest.approx(sk.recall_score(y, pred, zero_division=0))
    assert M.f1(y, pred) == pytest.approx(sk.f1_score(y, pred, zero_division=0))
    for fn, skfn in ((M.precision, sk.precision_score), (M.recall, sk.recall_score), (M.f1, sk.f1_score)):
        assert fn(y, pred, average="macro") == pytest.approx(skfn(y, pred, average="macro", zero_division=0))
    assert M.balanced_accuracy(y, pred) == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert M.roc_auc(y, prob) == pytest.approx(sk.roc_auc_score(y, prob))
    assert M.log_loss(y, prob) == pytest.approx(sk.log_loss(y, np.clip(prob, 1e-15, 1 - 1e-15)))
    np.testing.assert_array_equal(M.confusion_matrix(y, pred), sk.confusion_matrix(y, pred, labels=[0, 1]))


def test_confusion_matrix_layout_and_hand_values():
    y = [0, 0, 0, 1, 1, 1, 1]
    pred = [0, 1, 0, 1, 1, 0, 1]
    cm = M.confusion_matrix(y, pred)
    assert cm.tolist() == [[2, 1], [1, 3]]  # [[tn, fp], [fn, tp]]
    assert M.precision(y, pred) == pytest.approx(3 / 4)
    assert M.recall(y, pred) == pytest.approx(3 / 4)
    assert M.balanced_accuracy(y, pred) == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_roc_auc_ties_and_hand_value():
    assert M.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4, 0.8>0.1, 0.4=0.4 -> 1/2, 0.4>0.1) = 3.5 / 4
    assert M.roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert M.roc_auc([1, 1, 0], [0.1, 0.2, 0.9]) == pytest.approx(0.0)


def test_zero_division_gives_zero():
    assert M.precision([1, 1, 0], [0, 0, 0]) == 0.0
    assert M.f1([0, 0], [0, 0]) == 0.0


def test_one_class_only():
    y = [1, 1, 1, 1]
    prob = [0.9, 0.8, 0.3, 0.6]
    out = M.compute_metrics(y, prob, patient_ids=["a", "a", "b", "b"])
    assert out["roc_auc"] is None
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["recall"] == pytest.approx(0.75)
    assert out["precision"] == pytest.approx(1.0)
    assert out["balanced_accuracy"] == pytest.approx(0.75)
    assert out["confusion_matrix"] == [[0, 0], [1, 3]]
    assert out["patient_recognition_rate"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["patient_accuracy"] == pytest.approx(0.5)  # a: mean 0.85 right; b: mean 0.45 -> benign, wrong


def test_empty_input_returns_none_not_crash():
    out = M.compute_metrics([], [], patient_ids=[])
    assert out["n_images"] == 0
    for key in ("accuracy", "precision", "recall", "f1", "f1_macro", "roc_auc", "balanced_accuracy", "log_loss",
                "image_recognition_rate", "patient_recognition_rate", "patient_accuracy"):
        assert out[key] is None, key
    assert out["confusion_matrix"] == [[0, 0], [0, 0]]
    assert out["n_patients"] == 0


def test_compute_metrics_keys_and_no_patients():
    y, prob = _random_case(5, n=30)
    out = M.compute_metrics(y, prob)
    assert set(out) == set(M.METRIC_KEYS)
    assert out["patient_recognition_rate"] is None and out["n_patients"] is None
    assert out["image_recognition_rate"] == out["accuracy"]
    assert out["n_images"] == 30


def _patient_case():
    # P1 benign, 4 images: predictions 0,0,1,1 -> score 0.5; mean prob 0.55 -> diagnosed malignant (wrong)
    # P2 malignant, 3 images: predictions 1,0,0 -> score 1/3; mean prob 0.5833 -> malignant (right)
    # P3 malignant, 1 image: prob 0.7 -> score 1; right
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    prob = [0.2, 0.3, 0.9, 0.8, 0.9, 0.4, 0.45, 0.7]
    pid = ["P1"] * 4 + ["P2"] * 3 + ["P3"]
    return y, prob, pid


def test_patient_recognition_rate_differs_from_patient_accuracy():
    y, prob, pid = _patient_case()
    pred = M.predict(prob)
    scores = M.patient_scores(y, pred, pid)
    assert scores == pytest.approx({"P1": 0.5, "P2": 1 / 3, "P3": 1.0})
    prr = M.patient_recognition_rate(y, pred, pid)
    assert prr == pytest.approx((0.5 + 1 / 3 + 1.0) / 3)
    assert M.patient_accuracy(y, prob, pid) == pytest.approx(2 / 3)
    assert prr != pytest.approx(M.patient_accuracy(y, prob, pid))
    out = M.compute_metrics(y, prob, pid)
    assert out["image_recognition_rate"] == pytest.approx(4 / 8)
    assert out["patient_recognition_rate"] == pytest.approx(prr)
    assert out["patient_accuracy"] == pytest.approx(2 / 3)
    assert out["n_patients"] == 3
    per_patient = M.patient_predictions(y, prob, pid)
    assert per_patient["P3"] == {"label": 1, "prob_malignant": pytest.approx(0.7), "pred": 1, "n_images": 1}
    assert per_patient["P1"]["pred"] == 1 and per_patient["P1"]["label"] == 0


def test_threshold_is_inclusive_and_configurable():
    assert M.predict([0.5, 0.49]).tolist() == [1, 0]
    out = M.compute_metrics([0, 1], [0.6, 0.8], threshold=0.7)
    assert out["confusion_matrix"] == [[1, 0], [0, 1]]


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        M.compute_metrics([0, 1], [0.5])
    with pytest.raises(ValueError):
        M.compute_metrics([0, 1], [0.5, 0.2], patient_ids=["a"])
    with pytest.raises(ValueError):
        M.compute_metrics([0, 2], [0.5, 0.2])


def test_mean_std_over_folds():
    folds = [
        {"accuracy": 0.8, "roc_auc": None, "confusion_matrix": [[1, 0], [0, 1]], "n_images": 10, "name": "x"},
        {"accuracy": 0.9, "roc_auc": 0.7, "confusion_matrix": [[3, 0], [2, 1]], "n_images": 12},
        {"accuracy": 1.0, "roc_auc": float("nan"), "confusion_matrix": [[2, 0], [1, 1]], "n_images": 14},
    ]
    out = M.mean_std_over_folds(folds)
    assert out["accuracy"]["mean"] == pytest.approx(0.9)
    assert out["accuracy"]["std"] == pytest.approx(np.std([0.8, 0.9, 1.0]))
    assert out["accuracy"]["n"] == 3
    assert out["roc_auc"] == {"mean": pytest.approx(0.7), "std": 0.0, "n": 1}
    assert out["confusion_matrix"]["mean"] == [[2.0, 0.0], [1.0, 1.0]]
    assert "name" not in out
    assert M.format_mean_std(out, "accuracy") == f"90.00 ± {np.std([0.8, 0.9, 1.0]) * 100:.2f}"
    assert M.format_mean_std(out, "missing") == "n/a"
    assert M.mean_std_over_folds([]) == {}
    assert math.isclose(M.mean_std_over_folds(folds, ddof=1)["accuracy"]["std"], 0.1)
