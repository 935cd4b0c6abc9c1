"""The evaluation maths (breakhis_ray.evaluation): patient bootstrap, locked thresholds, calibration, patient
aggregation and subtype metrics, each against an independent reference (scikit-learn, hand-made cases)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from breakhis_ray.domain import SUBTYPE_CLASSES
from breakhis_ray.evaluation import (
    Sample,
    bootstrap_intervals,
    brier_score,
    calibration_summary,
    choose_threshold,
    expected_calibration_error,
    fold_mean_block,
    metrics_block,
)
from breakhis_ray.evaluation.aggregate import patient_aggregation
from breakhis_ray.evaluation.calibration import reliability_bins
from breakhis_ray.evaluation.multiclass import subtype_metrics
from breakhis_ray.metrics import patient_accuracy


def make_sample(seed: int, n_patients: int = 12, subtypes: bool = False) -> Sample:
    """Patients with 1-9 images each, one label (and one subtype) per patient, noisy probabilities."""
    rng = np.random.default_rng(seed)
    rows_y, rows_p, rows_pat, rows_sub, rows_probs = [], [], [], [], []
    for i in range(n_patients):
        sub = int(rng.integers(0, 8))
        label = int(sub >= 4) if subtypes else int(rng.random() < 0.6)
        n = int(rng.integers(1, 10))
        rows_y += [label] * n
        rows_p += list(np.clip(0.25 + 0.5 * label + rng.normal(0, 0.25, n), 0, 1).round(2))  # rounded: ties
        rows_pat += [f"P{i:03d}"] * n
        logits = rng.normal(0, 1, (n, 8))
        logits[:, sub] += 1.5
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        rows_sub += [sub] * n
        rows_probs.append(probs)
    if subtypes:
        return Sample(rows_y, rows_p, rows_pat, rows_sub, np.concatenate(rows_probs), SUBTYPE_CLASSES)
    return Sample(rows_y, rows_p, rows_pat)


def reference_replicates(sample: Sample, threshold: float, resamples: int, rng,
                         only: str | None = None) -> dict[str, list[float]]:
    """A plain loop: draw patients, duplicate their images, recompute with scikit-learn (undefined: skipped).

    ``only="accuracy"`` computes just the accuracy."""
    patients = np.unique(sample.patients)  # sorted, as the implementation indexes them
    draws = rng.integers(0, len(patients), size=(resamples, len(patients)))
    out: dict[str, list[float]] = {k: [] for k in ("accuracy", "balanced_accuracy", "f1", "roc_auc",
                                                   "patient_accuracy", "brier", "macro_f1")}
    rows_of = [np.flatnonzero(sample.patients == pid) for pid in patients]
    for row in draws:
        idx = np.concatenate([rows_of[j] for j in row])
        # a patient drawn twice is two patients at patient level
        ids = np.concatenate([[f"{k}"] * len(rows_of[j]) for k, j in enumerate(row)])
        y, p = sample.y[idx], sample.prob[idx]
        pred = (p >= threshold).astype(int)
        out["accuracy"].append(skm.accuracy_score(y, pred))
        if only == "accuracy":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn warns on one-class replicates
            out["balanced_accuracy"].append(skm.balanced_accuracy_score(y, pred))
            out["f1"].append(skm.f1_score(y, pred, zero_division=0))
            if sample.has_subtypes:
                true_sub = sample.subtype_true[idx]  # macro over the subtypes present in the replicate
                out["macro_f1"].append(skm.f1_score(true_sub, sample.subtype_pred[idx], labels=np.unique(true_sub),
                                                    average="macro", zero_division=0))
        if len(np.unique(y)) == 2:
            out["roc_auc"].append(skm.roc_auc_score(y, p))
        out["patient_accuracy"].append(patient_accuracy(y, p, ids, threshold))
        out["brier"].append(skm.brier_score_loss(y, p))
    return out


# ------------------------------------------------------------------------------------------ bootstrap
@pytest.mark.parametrize("seed, n_patients", [(0, 12), (7, 5)])
def test_patient_bootstrap_matches_a_plain_sklearn_loop(seed, n_patients):
    sample = make_sample(seed, n_patients=n_patients, subtypes=True)
    threshold, resamples = 0.55, 150
    got = bootstrap_intervals([sample], [threshold], resamples=resamples, seed=seed)["ci95"]
    ref = reference_replicates(sample, threshold, resamples, np.random.default_rng(seed))
    for key, values in ref.items():
        want = np.percentile(values, [2.5, 97.5])
        assert got[key] == pytest.approx(want, abs=1e-12), key
    if n_patients == 5:  # some replicates hold one class: ROC AUC is skipped there, not counted as 0
        assert 0 < len(ref["roc_auc"]) < resamples


def test_bootstrap_over_folds_is_the_interval_of_the_fold_mean():
    a, b = make_sample(3), make_sample(4, n_patients=9)
    resamples = 100
    got = bootstrap_intervals([a, b], [0.5, 0.6], resamples=resamples, seed=5)["ci95"]
    rng = np.random.default_rng(5)  # one generator, folds in order
    ref_a = reference_replicates(a, 0.5, resamples, rng, only="accuracy")
    ref_b = reference_replicates(b, 0.6, resamples, rng, only="accuracy")
    mean = (np.asarray(ref_a["accuracy"]) + np.asarray(ref_b["accuracy"])) / 2
    assert got["accuracy"] == pytest.approx(np.percentile(mean, [2.5, 97.5]), abs=1e-12)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_patients():
    small = metrics_block(make_sample(2, n_patients=10), 0.5, resamples=400)
    large = metrics_block(make_sample(2, n_patients=120), 0.5, resamples=400)
    for block in (small, large):
        lo, hi = block["ci95"]["accuracy"]
        assert lo <= block["accuracy"] <= hi
    width = lambda b: b["ci95"]["accuracy"][1] - b["ci95"]["accuracy"][0]  # noqa: E731
    assert width(large) < width(small)
    again = metrics_block(make_sample(2, n_patients=10), 0.5, resamples=400)
    assert again["ci95"] == small["ci95"]  # same seed, same intervals
    other = metrics_block(make_sample(2, n_patients=10), 0.5, resamples=400, seed=1)
    assert other["ci95"]["accuracy"] != small["ci95"]["accuracy"]


def test_no_resamples_no_intervals_but_the_keys_stay():
    block = metrics_block(make_sample(0), 0.5, resamples=0)
    assert set(block["ci95"]) >= {"accuracy", "balanced_accuracy", "f1", "roc_auc", "patient_accuracy"}
    assert all(v is None for v in block["ci95"].values())


# ----------------------------------------------------------------------------------------- thresholds
def test_threshold_rules_on_a_hand_made_validation_set():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.05, 0.2, 0.35, 0.6, 0.4, 0.7, 0.8, 0.9]
    # youden: at 0.7 sens 3/4 spec 1 (J .75); at 0.4 sens 1 spec 3/4 (J .75): ties go to the higher threshold
    youden = choose_threshold("youden", y, p)
    assert youden.value == pytest.approx(0.7) and youden.rule == "youden" and not youden.fallback
    assert (youden.val_sensitivity, youden.val_specificity) == (0.75, 1.0)
    sens = choose_threshold("sensitivity", y, p, target_sensitivity=1.0)
    assert sens.value == pytest.approx(0.4) and sens.val_sensitivity == 1.0 and sens.val_specificity == 0.75
    assert choose_threshold("sensitivity", y, p, target_sensitivity=0.5).value == pytest.approx(0.8)
    fixed = choose_threshold("fixed", y, p, value=0.3)
    assert fixed.value == 0.3 and fixed.rule == "fixed"


def test_threshold_youden_matches_sklearn_roc_curve():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.3, 300), 0, 1)
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    j = tpr - fpr
    assert choose_threshold("youden", y, p).value == pytest.approx(thr[np.argmax(j)])


def test_threshold_falls_back_without_usable_validation_predictions():
    none = choose_threshold("youden")
    assert none.value == 0.5 and none.fallback and none.rule == "0.5 (no validation predictions)"
    one_class = choose_threshold("youden", [1, 1], [0.2, 0.9], value=0.4)
    assert one_class.value == 0.4 and one_class.fallback and "one class" in one_class.rule
    # the sensitivity rule needs malignant images only
    only_pos = choose_threshold("sensitivity", [1, 1, 1, 1], [0.2, 0.5, 0.6, 0.9], target_sensitivity=0.75)
    assert only_pos.value == pytest.approx(0.5) and not only_pos.fallback
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold("median", [0, 1], [0.1, 0.9])


# ---------------------------------------------------------------------------------------- calibration
def test_ece_and_brier_on_hand_made_cases():
    # perfectly calibrated: in the 0.2-bin 1 of 5 is malignant, in the 0.8-bin 4 of 5
    y = [0, 0, 0, 0, 1, 1, 1, 1, 1, 0]
    p = [0.2] * 5 + [0.8] * 5
    assert expected_calibration_error(y, p, bins=10) == pytest.approx(0.0, abs=1e-12)
    # always 0.9, never malignant: ECE 0.9, Brier 0.81
    assert expected_calibration_error([0, 0, 0], [0.9, 0.9, 0.9]) == pytest.approx(0.9)
    assert brier_score([0, 0, 0], [0.9, 0.9, 0.9]) == pytest.approx(0.81)
    # two bins of two: |0.25 - 0.5| and |0.75 - 0.5| at weight 1/2 each -> 0.25
    assert expected_calibration_error([0, 1, 0, 1], [0.2, 0.3, 0.7, 0.8], bins=2) == pytest.approx(0.25)
    # with one bin ECE is |mean p - mean y|
    assert expected_calibration_error([0, 1, 0, 1], [0.2, 0.3, 0.7, 0.8], bins=1) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    yy, pp = rng.integers(0, 2, 200), rng.random(200)
    assert brier_score(yy, pp) == pytest.approx(skm.brier_score_loss(yy, pp))
    assert expected_calibration_error([], []) is None and brier_score([], []) is None


def test_reliability_bins_edges_and_counts():
    bins = reliability_bins([0, 1, 1, 0, 1], [0.0, 0.5, 1.0, 0.49, 0.99], bins=2)
    assert [b["n"] for b in bins] == [2, 3]  # 0.5 opens the upper bin, 1.0 falls in the last bin
    assert bins[0]["frac_malignant"] == 0.0 and bins[1]["frac_malignant"] == 1.0
    assert bins[1]["mean_prob"] == pytest.approx((0.5 + 1.0 + 0.99) / 3)
    summary = calibration_summary([0, 1], [0.1, 0.9], bins=5)
    assert summary["bins"] == 5 and len(summary["reliability"]) == 5
    assert summary["reliability"][2]["n"] == 0 and summary["reliability"][2]["mean_prob"] is None


# ------------------------------------------------------------------------------- patient aggregation
def test_patient_aggregation_mean_majority_max_by_hand():
    # A: benign, probs .2 .3 .9 -> mean .467 benign, votes 1/3 benign, max .9 malignant
    # B: malignant, probs .4 .45 .6 .9 -> mean .5875 malignant, votes 2/4 (tie) malignant, max malignant
    # C: malignant, probs .3 .4 -> all three say benign
    y = [0, 0, 0, 1, 1, 1, 1, 1, 1]
    p = [0.2, 0.3, 0.9, 0.4, 0.45, 0.6, 0.9, 0.3, 0.4]
    pat = ["A", "A", "A", "B", "B", "B", "B", "C", "C"]
    agg = patient_aggregation(Sample(y, p, pat), 0.5)
    assert agg["mean"]["confusion_matrix"] == [[1, 0], [1, 1]]
    assert agg["majority"]["confusion_matrix"] == [[1, 0], [1, 1]]
    assert agg["max"]["confusion_matrix"] == [[0, 1], [1, 1]]
    assert agg["max"]["accuracy"] == pytest.approx(1 / 3) and agg["mean"]["accuracy"] == pytest.approx(2 / 3)
    assert agg["mean"]["accuracy"] == pytest.approx(patient_accuracy(y, p, pat, 0.5))
    assert agg["mean"]["roc_auc"] == pytest.approx(skm.roc_auc_score([0, 1, 1], [7 / 15, 0.5875, 0.35]))
    assert all(a["n_patients"] == 3 for a in agg.values())


# ------------------------------------------------------------------------------------ subtype metrics
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", [0, 3])
def test_subtype_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 7, 150)  # class 7 never true
    pr = np.where(rng.random(150) < 0.6, t, rng.integers(0, 8, 150))
    got = subtype_metrics(t, pr, SUBTYPE_CLASSES)
    # macro F1 over the classes present in the true labels: class 7's stray predictions do not count as F1 0
    assert got["macro_f1"] == pytest.approx(skm.f1_score(t, pr, labels=np.unique(t), average="macro"))
    assert got["macro_f1"] > skm.f1_score(t, pr, average="macro")
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(t, pr))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(t, pr))
    assert got["confusion_matrix"] == skm.confusion_matrix(t, pr, labels=range(8)).tolist()
    prec, rec, f1, sup = skm.precision_recall_fscore_support(t, pr, labels=range(8), zero_division=0)
    for i, name in enumerate(SUBTYPE_CLASSES[:7]):
        c = got["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx((prec[i], rec[i], f1[i], sup[i]))
    assert got["per_class"][SUBTYPE_CLASSES[7]]["recall"] is None  # no support: undefined, not 0


def test_subtype_block_image_and_patient_level():
    sample = make_sample(5, n_patients=20, subtypes=True)
    block = metrics_block(sample, 0.5, resamples=50)
    assert block["classes"] == list(SUBTYPE_CLASSES)
    assert np.asarray(block["confusion_matrix"]).shape == (8, 8)
    assert np.asarray(block["binary_confusion_matrix"]).shape == (2, 2)
    assert sum(map(sum, block["confusion_matrix"])) == sample.n
    assert block["macro_f1"] == pytest.approx(skm.f1_score(sample.subtype_true, sample.subtype_pred,
                                                           labels=np.unique(sample.subtype_true), average="macro"))
    patient = block["patient_level"]
    assert sum(map(sum, patient["confusion_matrix"])) == patient["n_patients"] == sample.n_patients
    assert block["ci95"]["macro_f1"] is not None
    # patient truth: one subtype per patient; prediction: argmax of the mean class probabilities
    first = sample.patients == sample.patient_ids[0]
    want = int(np.argmax(sample.subtype_prob[first].mean(axis=0)))
    true = int(sample.subtype_true[first][0])
    assert patient["confusion_matrix"][true][want] >= 1


def test_fold_mean_block_means_sums_and_pooled_reliability():
    a, b = make_sample(8), make_sample(9, n_patients=7)
    blocks = [metrics_block(a, 0.5, resamples=20), metrics_block(b, 0.6, resamples=20)]
    mean = fold_mean_block(blocks, [a, b], [0.5, 0.6], resamples=20)
    assert mean["accuracy"] == pytest.approx((blocks[0]["accuracy"] + blocks[1]["accuracy"]) / 2)
    assert mean["n_images"] == a.n + b.n and mean["calibration"]["bins"] == 10
    assert mean["confusion_matrix"] == (np.asarray(blocks[0]["confusion_matrix"])
                                        + np.asarray(blocks[1]["confusion_matrix"])).tolist()
    assert mean["patient_aggregation"]["max"]["n_patients"] == a.n_patients + b.n_patients
    assert sum(r["n"] for r in mean["calibration"]["reliability"]) == a.n + b.n
    assert mean["calibration"]["ece"] == pytest.approx((blocks[0]["calibration"]["ece"]
                                                        + blocks[1]["calibration"]["ece"]) / 2)
