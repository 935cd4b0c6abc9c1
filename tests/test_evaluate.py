"""evaluate: predictions joined with the manifest, BreakHis metrics per magnification, errors counted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn import metrics as skm

from breakhis_ray import cli
from breakhis_ray.artifacts import write_parquet
from breakhis_ray.config import EvaluateConfig, load_config
from breakhis_ray.data.manifest import COLUMNS
from breakhis_ray.data.splits import write_splits
from breakhis_ray.domain import SUBTYPE_CLASSES, SUBTYPES
from breakhis_ray.errors import ConfigError, DataError, StorageError
from breakhis_ray.evaluate import aggregate_folds, read_predictions, run_evaluate
from breakhis_ray.evaluation import choose_threshold
from breakhis_ray.metrics import compute_metrics

ROOT = "/data/BreaKHis_v1/histology_slides/breast"
# (class, subtype, code, patient folder slide, {magnification: images})
PATIENTS = [
    ("benign", "adenosis", "A", "14-22549AB", {40: 3, 100: 3}),
    ("benign", "fibroadenoma", "F", "14-9133", {40: 2, 100: 1}),
    ("malignant", "ductal_carcinoma", "DC", "14-2523", {40: 3, 100: 2, 200: 2}),
    ("malignant", "lobular_carcinoma", "LC", "14-15570", {200: 1}),  # a patient with one image
]  # nothing at 400X: an empty magnification; 200X holds malignant images only: one class


def make_manifest(root: str = ROOT) -> pd.DataFrame:
    rows = []
    for label, subtype, code, slide, counts in PATIENTS:
        letter = label[0].upper()
        folder = f"SOB_{letter}_{code}_{slide}"
        for mag, n in counts.items():
            for seq in range(1, n + 1):
                name = f"SOB_{letter}_{code}-{slide}-{mag}-{seq:03d}.png"
                rows.append({"path": f"{root}/{label}/SOB/{subtype}/{folder}/{mag}X/{name}", "filename": name,
                             "label": label, "label_id": int(label == "malignant"), "subtype": subtype,
                             "subtype_code": code, "patient_id": folder, "slide_id": slide.rstrip("ABCDG"),
                             "magnification": mag, "seq": seq, "width": 700, "height": 460})
    df = pd.DataFrame(rows)
    return df.astype({k: v for k, v in COLUMNS.items() if v is not str})


def make_predictions(manifest: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Predictions for all manifest rows but one, two error rows, one extra path, one wrong file label."""
    rng = np.random.default_rng(seed)
    rows = manifest.iloc[1:].copy()  # manifest row 0 has no prediction
    prob = np.clip(0.3 + 0.45 * rows["label_id"].to_numpy() + rng.uniform(-0.35, 0.35, len(rows)), 0, 1)
    pred = pd.DataFrame({
        "path": rows["path"].to_numpy(),
        "status": "ok",
        "error": None,
        "prob_malignant": prob.astype(np.float32),
        "pred_label": np.where(prob >= 0.5, "malignant", "benign"),
        "patient_id": rows["patient_id"].to_numpy(),
        "magnification": rows["magnification"].to_numpy(),
        "label": rows["label"].to_numpy(),
    })
    pred.loc[2, ["status", "error", "prob_malignant", "pred_label"]] = ["error", "decode_error: truncated", None,
                                                                         None]
    pred.loc[9, ["status", "error", "prob_malignant", "pred_label"]] = ["error", "read_error: gone", None, None]
    pred.loc[4, "label"] = "malignant" if pred.loc[4, "label"] == "benign" else "benign"  # manifest wins
    extra = pred.iloc[[0]].copy()
    extra["path"] = "/elsewhere/not_in_manifest.png"
    return pd.concat([pred, extra], ignore_index=True)


def write_table(df: pd.DataFrame, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    return str(path)


@pytest.fixture()
def case(tmp_path):
    manifest = make_manifest()
    manifest_uri = str(tmp_path / "manifest.parquet")
    write_parquet(manifest, manifest_uri)
    pred = make_predictions(manifest)
    # as `infer` writes them: a directory of parts (plus a _plan.json that is not a part)
    write_table(pred.iloc[:10], tmp_path / "pred" / "predictions" / "part-00000.parquet")
    write_table(pred.iloc[10:], tmp_path / "pred" / "predictions" / "part-00001.parquet")
    (tmp_path / "pred" / "predictions" / "_plan.json").write_text("{}")
    return tmp_path, manifest, manifest_uri, pred


def expected_metrics(manifest: pd.DataFrame, pred: pd.DataFrame, mask=None) -> dict:
    joined = pred.merge(manifest[["path", "label_id", "patient_id", "magnification"]], on="path",
                        suffixes=("_p", ""))
    joined = joined[joined["status"] == "ok"]
    if mask is not None:
        joined = joined[mask(joined)]
    return compute_metrics(joined["label_id"].to_numpy(), joined["prob_malignant"].to_numpy(dtype=float),
                           joined["patient_id"].to_numpy())


def test_evaluate_values_counts_and_errors(case, caplog):
    caplog.set_level(logging.INFO, logger="breakhis_ray.evaluate")
    tmp, manifest, manifest_uri, pred = case
    out = str(tmp / "metrics.json")
    cfg = load_config(EvaluateConfig, values={"predictions": str(tmp / "pred"), "manifest": manifest_uri,
                                              "out": out})
    result = run_evaluate(cfg)
    saved = json.loads(Path(out).read_text())
    assert saved == json.loads(json.dumps(result))
    assert Path(out + ".config.yaml").is_file() and Path(out + ".versions.json").is_file()

    overall = saved["overall"]
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "confusion_matrix", "image_recognition_rate",
                "patient_recognition_rate", "patient_accuracy", "n_images", "n_patients"):
        assert key in overall
    want = expected_metrics(manifest, pred)
    for key, value in want.items():
        assert overall[key] == (value if key == "confusion_matrix" else pytest.approx(value)), key
    assert overall["n_images"] == len(pred) - 1 - 2  # minus the extra path and the two errors
    assert sum(map(sum, overall["confusion_matrix"])) == overall["n_images"]

    assert saved["n_errors"] == 2 and overall["n_errors"] == 2
    assert saved["error_policy"] == "excluded_from_denominators"
    assert saved["errors_by_kind"] == {"decode_error": 1, "read_error": 1}
    assert saved["counts"]["not_in_manifest"] == 1
    assert saved["counts"]["without_prediction"] == 1
    assert saved["counts"]["label_disagreements"] == 1
    assert saved["positive_class"] == "malignant" and saved["protocol"] is None

    per_mag = saved["per_magnification"]
    assert set(per_mag) == {"40", "100", "200", "400"}
    for mag in (40, 100, 200):
        want = expected_metrics(manifest, pred, lambda d, m=mag: d["magnification"] == m)
        for key in ("accuracy", "f1", "patient_recognition_rate", "patient_accuracy", "n_images", "n_patients"):
            assert per_mag[str(mag)][key] == pytest.approx(want[key]), (mag, key)
    assert per_mag["400"]["n_images"] == 0 and per_mag["400"]["accuracy"] is None
    assert per_mag["200"]["roc_auc"] is None  # malignant only
    assert per_mag["200"]["n_patients"] == 2  # including the one-image patient

    sub = saved["per_subtype"]
    assert sub["lobular_carcinoma"]["n_images"] == 1 and sub["lobular_carcinoma"]["label"] == "malignant"
    ok = pred[pred["status"] == "ok"].merge(manifest[["path", "subtype", "label_id"]], on="path")
    dc = ok[ok["subtype"] == "ductal_carcinoma"]
    assert sub["ductal_carcinoma"]["recall"] == pytest.approx(np.mean(dc["prob_malignant"] >= 0.5))

    printed = caplog.text  # the human summary is logged at INFO (the CLI shows INFO lines)
    assert "2 prediction(s) in error excluded from the metric denominators" in printed
    assert "overall" in printed and "400X" in printed


def test_evaluate_with_splits_and_several_folds(case):
    tmp, manifest, manifest_uri, pred = case
    paths = manifest["path"]
    folder = manifest["patient_id"]
    test_1 = folder.isin(["SOB_B_A_14-22549AB", "SOB_M_DC_14-2523"])
    splits = pd.concat([
        pd.DataFrame({"path": paths, "fold": 1, "split": np.where(test_1, "test", "train")}),
        pd.DataFrame({"path": paths, "fold": 2, "split": np.where(test_1, "train", "test")}),
    ], ignore_index=True)
    splits.attrs.update(protocol="patient", patient_key="folder", dc_lc_policy="keep")
    splits_uri = str(tmp / "splits.parquet")
    write_splits(splits, splits_uri)
    second = write_table(make_predictions(manifest, seed=1), tmp / "pred2.parquet")
    out = str(tmp / "folds.json")
    cfg = load_config(EvaluateConfig, overrides=[f"predictions=[{tmp / 'pred'}, {second}]", f"splits={splits_uri}"],
                      values={"manifest": manifest_uri, "out": out})
    result = run_evaluate(cfg)
    assert result["protocol"] == "patient" and result["n_folds"] == 2
    assert [f["fold"] for f in result["folds"]] == [1, 2]
    f1_counts = result["folds"][0]["counts"]
    assert f1_counts["outside_split"] > 0 and f1_counts["evaluation_set_size"] == int(test_1.sum())
    accs = [f["overall"]["accuracy"] for f in result["folds"]]
    assert result["overall"]["accuracy"] == pytest.approx(np.mean(accs))
    assert result["mean_std"]["overall"]["accuracy"]["std"] == pytest.approx(np.std(accs))
    assert result["overall"]["n_images"] == sum(f["overall"]["n_images"] for f in result["folds"])
    assert result["n_errors"] == sum(f["n_errors"] for f in result["folds"])

    with pytest.raises(ConfigError, match="one per prediction set"):
        run_evaluate(cfg.model_copy(update={"predictions": [str(tmp / "pred")]}))
    with pytest.raises(ConfigError, match="fold needs splits"):
        run_evaluate(cfg.model_copy(update={"splits": None, "fold": [1, 2]}))


def test_aggregate_folds_plain_and_structured():
    a = {"accuracy": 0.8, "confusion_matrix": [[1, 0], [0, 1]], "roc_auc": None}
    b = {"accuracy": 0.9, "confusion_matrix": [[2, 0], [1, 1]], "roc_auc": 0.5}
    flat = aggregate_folds([a, b])
    assert flat["accuracy"]["mean"] == pytest.approx(0.85) and flat["roc_auc"]["n"] == 1
    nested = aggregate_folds([{"overall": a, "per_magnification": {"40": a}},
                              {"overall": b, "per_magnification": {"40": b, "100": b}}])
    assert nested["n_folds"] == 2
    assert nested["per_magnification"]["100"]["accuracy"]["n"] == 1
    assert nested["overall"]["confusion_matrix"]["mean"] == [[1.5, 0.0], [0.5, 1.0]]


def test_read_predictions_rejects_bad_inputs(tmp_path):
    with pytest.raises(StorageError, match="predictions not found"):
        read_predictions(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.parquet"):
        read_predictions(str(tmp_path / "empty"))
    dup = write_table(pd.DataFrame({"path": ["a", "a"], "prob_malignant": [0.1, 0.2]}), tmp_path / "dup.parquet")
    with pytest.raises(DataError, match="repeated path"):
        read_predictions(dup)
    derived = write_table(pd.DataFrame({"path": ["a", "b"], "prob_malignant": [0.1, None]}), tmp_path / "s.parquet")
    assert read_predictions(derived)["status"].tolist() == ["ok", "error"]


def test_cli_missing_predictions_is_one_line_exit_2(case, capsys):
    tmp, _, manifest_uri, _ = case
    code = cli.main(["evaluate", "--predictions", str(tmp / "nope.parquet"), "--manifest", manifest_uri,
                     "--out", str(tmp / "m.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "nope.parquet" in err and len(err.splitlines()) == 1
    assert not (tmp / "m.json").exists()


# ------------------------------------------------------------- thresholds, intervals, calibration, subtypes
def cohort_manifest(root: str = ROOT) -> pd.DataFrame:
    """Two patients per subtype (16), three images at 40X and at 100X each."""
    rows = []
    for s, (code, subtype) in enumerate(SUBTYPES.items()):
        label = "malignant" if s >= 4 else "benign"
        letter = label[0].upper()
        for k in range(2):
            slide = f"14-{1000 + 10 * s + k}"
            folder = f"SOB_{letter}_{code}_{slide}"
            for mag in (40, 100):
                for seq in range(1, 4):
                    name = f"SOB_{letter}_{code}-{slide}-{mag}-{seq:03d}.png"
                    rows.append({"path": f"{root}/{label}/SOB/{subtype}/{folder}/{mag}X/{name}", "filename": name,
                                 "label": label, "label_id": int(label == "malignant"), "subtype": subtype,
                                 "subtype_code": code, "patient_id": folder, "slide_id": slide, "magnification": mag,
                                 "seq": seq, "width": 700, "height": 460})
    return pd.DataFrame(rows).astype({k: v for k, v in COLUMNS.items() if v is not str})


def cohort_predictions(manifest: pd.DataFrame, seed: int = 0, subtypes: bool = False) -> pd.DataFrame:
    """A prediction for every image; benign probabilities around 0.35, malignant around 0.6 (so a threshold
    below 0.5 separates them better), optionally with the eight subtype probabilities."""
    rng = np.random.default_rng(seed)
    prob = np.clip(0.35 + 0.25 * manifest["label_id"].to_numpy() + rng.normal(0, 0.1, len(manifest)), 0.01, 0.99)
    pred = pd.DataFrame({"path": manifest["path"], "status": "ok", "error": None, "prob_malignant": prob,
                         "classifier_checkpoint": "/ckpt/all"})
    if subtypes:
        true = manifest["subtype"].map({n: i for i, n in enumerate(SUBTYPE_CLASSES)}).to_numpy()
        logits = rng.normal(0, 1, (len(manifest), 8))
        logits[np.arange(len(manifest)), true] += 1.2
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        for i, name in enumerate(SUBTYPE_CLASSES):
            pred[f"prob_{name}"] = probs[:, i]
        pred["pred_subtype"] = [SUBTYPE_CLASSES[i] for i in probs.argmax(axis=1)]
    return pred


@pytest.fixture()
def cohort(tmp_path):
    """Manifest and a patient split: per fold 6 test, 4 val and 6 train patients, both classes in each."""
    manifest = cohort_manifest()
    manifest_uri = str(tmp_path / "manifest.parquet")
    write_parquet(manifest, manifest_uri)
    patients = sorted(manifest["patient_id"].unique())
    role = {1: {}, 2: {}}
    for i, pid in enumerate(patients):  # sorted: 8 benign, then 8 malignant; both classes on every side
        j = i % 8
        role[1][pid] = "test" if j in (0, 3, 6) else ("val" if j in (1, 4) else "train")
        role[2][pid] = "test" if j in (1, 4, 7) else ("val" if j in (2, 5) else "train")
    splits = pd.concat([pd.DataFrame({"path": manifest["path"], "fold": f,
                                      "split": manifest["patient_id"].map(role[f])}) for f in (1, 2)],
                       ignore_index=True)
    splits.attrs.update(protocol="patient", patient_key="folder", dc_lc_policy="keep")
    splits_uri = str(tmp_path / "splits.parquet")
    write_splits(splits, splits_uri)
    return tmp_path, manifest, manifest_uri, splits, splits_uri


def _eval(tmp: Path, manifest_uri: str, pred: pd.DataFrame | list, name: str, **values) -> dict:
    preds = pred if isinstance(pred, list) else [pred]
    uris = [write_table(p, tmp / f"{name}-{i}.parquet") for i, p in enumerate(preds)]
    overrides = [f"{k}={v}" for k, v in values.pop("overrides", {}).items()]
    cfg = load_config(EvaluateConfig, overrides=overrides,
                      values={"predictions": uris, "manifest": manifest_uri, "out": str(tmp / f"{name}.json"),
                              "bootstrap.resamples": 200, **values})
    return run_evaluate(cfg)


def test_threshold_is_locked_on_validation_and_test_data_never_moves_it(cohort):
    tmp, manifest, manifest_uri, splits, splits_uri = cohort
    pred = cohort_predictions(manifest)
    base = _eval(tmp, manifest_uri, pred, "base", splits=splits_uri, fold=1)
    thr = base["overall"]["threshold"]
    assert thr["rule"] == "youden" and not thr["fallback"] and "split 'val' of fold 1" in thr["source"]
    assert base["threshold"] == thr["value"] and base["threshold_rule"] == "youden"
    val_paths = set(splits.loc[(splits["fold"] == 1) & (splits["split"] == "val"), "path"])
    test_paths = set(splits.loc[(splits["fold"] == 1) & (splits["split"] == "test"), "path"])
    val = pred[pred["path"].isin(val_paths)]
    expected = choose_threshold("youden", manifest.set_index("path").loc[val["path"], "label_id"],
                                val["prob_malignant"])
    assert thr["value"] == pytest.approx(expected.value) and thr["value"] != 0.5

    moved_test = pred.copy()  # other test predictions: other metrics, the same threshold
    in_test = moved_test["path"].isin(test_paths)
    moved_test.loc[in_test, "prob_malignant"] = np.random.default_rng(9).uniform(0, 1, int(in_test.sum()))
    other = _eval(tmp, manifest_uri, moved_test, "moved-test", splits=splits_uri, fold=1)
    assert other["overall"]["threshold"]["value"] == thr["value"]
    assert other["overall"]["accuracy"] != base["overall"]["accuracy"]

    moved_val = pred.copy()  # other validation predictions: another threshold
    in_val = moved_val["path"].isin(val_paths)
    moved_val.loc[in_val, "prob_malignant"] = np.clip(moved_val.loc[in_val, "prob_malignant"] + 0.2, 0, 1)
    again = _eval(tmp, manifest_uri, moved_val, "moved-val", splits=splits_uri, fold=1)
    assert again["overall"]["threshold"]["value"] != thr["value"]

    # the same validation rows given as their own table: the same threshold
    separate = _eval(tmp, manifest_uri, pred[pred["path"].isin(test_paths)], "separate", splits=splits_uri, fold=1,
                     val_predictions=[write_table(val, tmp / "val.parquet")])
    assert separate["overall"]["threshold"]["value"] == thr["value"]
    assert separate["overall"]["accuracy"] == base["overall"]["accuracy"]


def test_threshold_rules_fallback_and_leak_guard(cohort):
    tmp, manifest, manifest_uri, splits, splits_uri = cohort
    pred = cohort_predictions(manifest)
    plain = _eval(tmp, manifest_uri, pred, "plain")  # no splits, no validation predictions
    assert plain["overall"]["threshold"]["rule"] == "0.5 (no validation predictions)"
    assert plain["overall"]["threshold"]["value"] == 0.5 and plain["overall"]["threshold"]["fallback"]
    fixed = _eval(tmp, manifest_uri, pred, "fixed", splits=splits_uri, fold=1, overrides={"threshold": 0.4})
    assert fixed["overall"]["threshold"]["rule"] == "fixed" and fixed["threshold"] == 0.4
    sens = _eval(tmp, manifest_uri, pred, "sens", splits=splits_uri, fold=1,
                 overrides={"threshold.rule": "sensitivity", "threshold.target_sensitivity": 1.0})
    assert sens["overall"]["threshold"]["rule"] == "sensitivity >= 1" and sens["overall"]["threshold"][
        "val_sensitivity"] == 1.0
    with pytest.raises(DataError, match="also in the evaluated set"):
        _eval(tmp, manifest_uri, pred, "leak", val_predictions=[write_table(pred.iloc[:5], tmp / "v.parquet")])
    with pytest.raises(ConfigError, match="one per prediction set"):
        _eval(tmp, manifest_uri, pred, "n", val_predictions=[str(tmp / "v.parquet")] * 2)


CONTRACT_CI = ("accuracy", "balanced_accuracy", "f1", "roc_auc", "patient_accuracy")


def test_intervals_calibration_and_patient_aggregation_in_every_block(cohort):
    tmp, manifest, manifest_uri, splits, splits_uri = cohort
    result = _eval(tmp, manifest_uri, cohort_predictions(manifest), "blocks", splits=splits_uri, fold=1,
                   **{"bootstrap.seed": 3, "calibration.bins": 5})
    saved = json.loads((tmp / "blocks.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["bootstrap"]["resamples"] == 200 and saved["bootstrap"]["seed"] == 3
    assert saved["bootstrap"]["unit"] == "patient" and saved["calibration_bins"] == 5
    for scope in (saved["overall"], saved["per_magnification"]["40"], saved["per_magnification"]["100"]):
        for key in CONTRACT_CI:
            lo, hi = scope["ci95"][key]
            assert 0.0 <= lo <= hi <= 1.0, key
        assert lo <= scope["patient_accuracy"] <= hi
        assert set(scope["calibration"]) >= {"ece", "brier"} and len(scope["calibration"]["reliability"]) == 5
        assert set(scope["patient_aggregation"]) == {"mean", "majority", "max"}
        assert scope["patient_aggregation"]["mean"]["accuracy"] == pytest.approx(scope["patient_accuracy"])
    empty = saved["per_magnification"]["400"]
    assert empty["n_images"] == 0 and all(v is None for v in empty["ci95"].values())
    ok = cohort_predictions(manifest).merge(manifest[["path", "label_id"]], on="path")
    test = ok[ok["path"].isin(splits.loc[(splits["fold"] == 1) & (splits["split"] == "test"), "path"])]
    assert saved["overall"]["calibration"]["brier"] == pytest.approx(
        np.mean((test["prob_malignant"] - test["label_id"]) ** 2))
    assert saved["task"] == "binary" and saved["magnification_mode"] == "independent"
    assert saved["benhammou_protocol"] == "MIB"


def test_several_folds_intervals_of_the_mean_and_thresholds_per_fold(cohort):
    tmp, manifest, manifest_uri, splits, splits_uri = cohort
    result = _eval(tmp, manifest_uri, [cohort_predictions(manifest, 1), cohort_predictions(manifest, 2)], "folds",
                   splits=splits_uri)
    per_fold = result["overall"]["threshold"]["per_fold"]
    assert [t["fold"] for t in per_fold] == [1, 2]
    assert [t["value"] for t in per_fold] == [f["overall"]["threshold"]["value"] for f in result["folds"]]
    assert result["overall"]["threshold"]["value"] == pytest.approx(np.mean([t["value"] for t in per_fold]))
    for key in CONTRACT_CI:
        assert len(result["overall"]["ci95"][key]) == 2 and len(result["per_magnification"]["40"]["ci95"][key]) == 2
        assert result["folds"][0]["overall"]["ci95"][key] is not None
    assert result["overall"]["accuracy"] == pytest.approx(np.mean([f["overall"]["accuracy"] for f in result["folds"]]))
    assert result["overall"]["n_images"] == sum(f["overall"]["n_images"] for f in result["folds"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_subtype_columns_give_the_eight_class_metrics(cohort):
    tmp, manifest, manifest_uri, splits, splits_uri = cohort
    pred = cohort_predictions(manifest, subtypes=True)
    result = _eval(tmp, manifest_uri, pred, "subtype", splits=splits_uri, fold=1)
    overall = result["overall"]
    assert result["task"] == "subtype" and result["benhammou_protocol"] == "MIM"
    assert overall["classes"] == list(SUBTYPE_CLASSES)
    assert np.asarray(overall["confusion_matrix"]).shape == (8, 8)
    assert np.asarray(overall["binary_confusion_matrix"]).shape == (2, 2)
    test = pred[pred["path"].isin(splits.loc[(splits["fold"] == 1) & (splits["split"] == "test"), "path"])]
    true = manifest.set_index("path").loc[test["path"], "subtype"].map(
        {n: i for i, n in enumerate(SUBTYPE_CLASSES)}).to_numpy()
    predicted = test[[f"prob_{n}" for n in SUBTYPE_CLASSES]].to_numpy().argmax(axis=1)
    assert overall["macro_f1"] == pytest.approx(skm.f1_score(true, predicted, labels=np.unique(true),
                                                             average="macro"))
    assert overall["confusion_matrix"] == skm.confusion_matrix(true, predicted, labels=range(8)).tolist()
    assert overall["subtype_balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(true, predicted))
    assert overall["ci95"]["macro_f1"] is not None and "macro_f1" in result["per_magnification"]["40"]["ci95"]
    assert overall["patient_level"]["n_patients"] == overall["n_patients"]
    with pytest.raises(DataError, match="missing prob_papillary_carcinoma"):
        _eval(tmp, manifest_uri, pred.drop(columns="prob_papillary_carcinoma"), "partial")


def test_magnification_mode_from_the_checkpoints(cohort):
    tmp, manifest, manifest_uri, splits, splits_uri = cohort
    pred = cohort_predictions(manifest)
    pred["classifier_checkpoint"] = "/ckpt/" + manifest["magnification"].astype(str).to_numpy()
    specific = _eval(tmp, manifest_uri, pred, "msb", splits=splits_uri, fold=1)
    assert specific["magnification_mode"] == "specific" and specific["benhammou_protocol"] == "MSB"
    unknown = _eval(tmp, manifest_uri, pred.drop(columns="classifier_checkpoint"), "unknown")
    assert unknown["magnification_mode"] is None and unknown["benhammou_protocol"] is None
    told = _eval(tmp, manifest_uri, pred.drop(columns="classifier_checkpoint"), "told",
                 magnification_mode="specific")
    assert told["benhammou_protocol"] == "MSB"
