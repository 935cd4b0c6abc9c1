"""Cross-validation (``breakhis-ray cv``): presets, protocols and the trial plan, the statistics over folds
(unit tier), and the small preset on the shared tiny data end to end through Ray Tune, then re-run to show that
finished folds are skipped and only a missing one is trained again (ray + slow tiers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from breakhis_ray.config import CVConfig, TrainConfig, load_config, validate_config
from breakhis_ray.errors import ConfigError
from breakhis_ray.experiments.cv import magnification_groups, plan_cv
from breakhis_ray.experiments.cv_summary import flat_metrics, fold_statistics, format_side_by_side
from breakhis_ray.experiments.plan import GridInputs

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "jobs" / "configs" / "cv_small.yaml"
FULL = REPO / "jobs" / "configs" / "cv_full.yaml"


def _small(*overrides: str) -> CVConfig:
    return load_config(CVConfig, SMALL, ["out=/tmp/cv-unit", *overrides])


def _inputs(cfg: CVConfig) -> GridInputs:
    return GridInputs(manifest="/data/manifest.parquet",
                      prepared={(cfg.split.mode, f): f"/data/{cfg.split.mode}/fold{f}" for f in cfg.fold_list})


# ------------------------------------------------------------------------------------------- unit
def test_presets_fit_their_machines():
    small = _small()
    assert small.fold_list == [1, 2, 3] and small.split.mode == "patient" and small.protocol == "MIB"
    assert small.scaling.num_workers == 1 and not small.scaling.use_gpu and small.synthetic is not None
    base = load_config(TrainConfig, REPO / small.base_train_config, small.base_overrides)
    assert base.model.name == "tiny_cnn" and base.calibration.temperature_scaling and base.loss.alpha == "balanced"
    full = load_config(CVConfig, FULL)
    assert full.fold_list == [1, 2, 3, 4, 5] and full.scaling.use_gpu and full.scoring.num_gpus >= 1
    assert full.out.startswith("s3://") and full.root.startswith("s3://")


@pytest.mark.parametrize("protocol,task,models", [("MIB", "binary", 1), ("MSB", "binary", 4),
                                                  ("MIM", "subtype", 1), ("MSM", "subtype", 4)])
def test_protocols_expand_to_task_and_models_per_fold(protocol, task, models):
    cfg = _small(f"protocol={protocol}")
    assert cfg.task == task and len(magnification_groups(cfg)) == models
    specs = plan_cv(cfg, _inputs(cfg))
    assert len(specs) == 3 * models and len({s["trial_id"] for s in specs}) == len(specs)
    for spec in specs:
        train = validate_config(TrainConfig, spec["train"])
        assert train.task == task and train.data.shards == spec["prepared"] == f"/data/patient/fold{spec['fold']}"
        assert train.run.name == spec["trial_id"] and train.run.storage_path == "/tmp/cv-unit/runs"
        if models == 1:
            assert train.data.magnifications == "all" and spec["magnifications"] is None
        else:
            assert train.data.magnifications == spec["magnifications"] == spec["cv_magnifications"]
    if models == 4:
        per_fold = [sorted(s["magnifications"][0] for s in specs if s["fold"] == f) for f in (1, 2, 3)]
        assert per_fold == [[40, 100, 200, 400]] * 3


def test_fewer_magnifications_and_folds():
    cfg = _small("protocol=MSB", "magnifications=[40,400]", "folds=[2]")
    specs = plan_cv(cfg, _inputs(cfg))
    assert [(s["fold"], s["magnifications"]) for s in specs] == [(2, [40]), (2, [400])]
    independent = _small("magnifications=[100,200]")
    assert validate_config(TrainConfig, plan_cv(independent, _inputs(independent))[0]["train"]) \
        .data.magnifications == [100, 200]


@pytest.mark.parametrize("override,message", [
    ("protocol=MXB", "protocol"),
    ("folds=[4]", "1..split.folds=3"),
    ("scaling.num_workers=0", "num_workers >= 1"),
    ("base_overrides=[task=binary]", "set by the protocol"),
    ("split.mode=official", "folds_file"),
    ("magnifications=[50]", "magnification 50"),
])
def test_bad_cv_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        _small(override)
    assert "\n" not in str(info.value)


def test_a_typo_in_a_training_override_fails_in_the_plan():
    cfg = _small("base_overrides=[train.epoch=3]")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        plan_cv(cfg, _inputs(cfg))


def test_flat_metrics_and_student_t_interval_over_folds():
    from scipy import stats

    overall = {"accuracy": 0.8, "n_images": 40, "confusion_matrix": [[1, 2], [3, 4]], "roc_auc": None,
               "threshold": {"value": 0.5, "rule": "fixed"}, "calibration": {"ece": 0.1, "brier": 0.2, "bins": 10},
               "ci95": {"accuracy": [0.7, 0.9]}}
    assert flat_metrics(overall) == {"accuracy": 0.8, "threshold.value": 0.5, "calibration.ece": 0.1,
                                     "calibration.brier": 0.2}
    folds = [{"accuracy": a, "f1": f} for a, f in ((0.80, 0.7), (0.90, 0.75), (0.85, None))]
    summary = fold_statistics(folds)
    acc = np.array([0.80, 0.90, 0.85])
    lo, hi = stats.t.interval(0.95, 2, loc=acc.mean(), scale=stats.sem(acc))
    assert summary["mean"]["accuracy"] == pytest.approx(acc.mean())
    assert summary["std"]["accuracy"] == pytest.approx(acc.std(ddof=1))
    assert summary["ci95"]["accuracy"] == pytest.approx([lo, hi])
    assert summary["n"] == {"accuracy": 3, "f1": 2} and summary["mean"]["f1"] == pytest.approx(0.725)
    wide = fold_statistics([{"accuracy": a, "log_loss": b} for a, b in ((0.99, 0.1), (0.6, 0.9), (0.95, 0.05))])
    assert wide["ci95"]["accuracy"][1] == 1.0 and wide["ci95"]["log_loss"][0] == 0.0  # clipped to the range
    assert wide["ci95"]["log_loss"][1] > 1.0
    one = fold_statistics([{"accuracy": 0.8}])
    assert one["std"]["accuracy"] is None and one["ci95"]["accuracy"] is None
    table = format_side_by_side({"binary, patient": {**summary}, "binary, image": {**summary}})
    assert table.splitlines()[0] == "| metric | binary, patient | binary, image |"
    assert "| accuracy | 85.0 ± 5.0 [" in table


# ------------------------------------------------------------------------------------ end to end
def _cv_cfg(tiny_breakhis, out: Path, *overrides: str) -> CVConfig:
    """The small preset on the shared tiny data, two of its three folds, one epoch each."""
    return load_config(CVConfig, SMALL, [
        f"out={out}", "synthetic=null", f"root={tiny_breakhis['manifest']}", "folds=[1,2]",
        'base_overrides=["data.image_size=[32,48]","train.epochs=1","train.batch_size=16",'
        '"loss.alpha=balanced","calibration.temperature_scaling=true","calibration.num_cpus=0.25"]',
        *overrides])


@pytest.fixture(scope="module")
def cv_run(tiny_breakhis, tmp_path_factory):
    from breakhis_ray.experiments.cv import run_cv

    out = tmp_path_factory.mktemp("cv") / "out"
    cfg = _cv_cfg(tiny_breakhis, out)
    return {"cfg": cfg, "out": out, "summary": run_cv(cfg)}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_small_cv_writes_the_contract_and_out_of_fold_predictions(cv_run):
    out, summary = cv_run["out"], cv_run["summary"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert {"folds", "mean", "std", "ci95"} <= set(on_disk) and on_disk["n_folds"] == 2
    assert [f["fold"] for f in on_disk["folds"]] == [1, 2] and len(summary["ran"]) == 2
    for name in ("accuracy", "balanced_accuracy", "f1"):
        values = [f["metrics"][name] for f in on_disk["folds"]]
        assert on_disk["mean"][name] == pytest.approx(np.mean(values))
        assert on_disk["std"][name] == pytest.approx(np.std(values, ddof=1))
        lo, hi = on_disk["ci95"][name]
        assert lo <= on_disk["mean"][name] <= hi
    # out-of-fold: every test image of the folds run predicted exactly once, by its own fold's model
    oof = pq.read_table(out / "oof_predictions.parquet").to_pandas()
    splits = pq.read_table(out / "data" / "patient" / "fold1" / "splits.parquet").to_pandas()
    test = splits[(splits["split"] == "test") & splits["fold"].isin([1, 2])]
    assert oof["path"].is_unique and set(oof["path"]) == set(test["path"])
    assert (oof.set_index("path")["fold"].sort_index() == test.set_index("path")["fold"].sort_index()).all()
    assert sum(f["overall"]["n_images"] for f in on_disk["folds"]) == len(oof)
    # each fold's checkpoint carries its own temperature, applied when it predicted the fold
    from breakhis_ray.checkpoint import read_meta

    for fold in on_disk["folds"]:
        meta = read_meta(fold["checkpoints"][0])
        assert meta["calibration"]["temperature"] > 0 and meta["task"] == "binary"
    assert on_disk["pooled"]["overall"]["n_images"] == len(oof)
    assert (out / "summary.md").read_text().startswith("### MIB (binary, magnification-independent), patient")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_cv_rerun_skips_finished_folds_and_trains_only_a_missing_one(cv_run, tiny_breakhis):
    from breakhis_ray.experiments.cv import run_cv

    out = cv_run["out"]
    records = {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")}
    again = run_cv(cv_run["cfg"])
    assert again["ran"] == [] and again["mean"] == pytest.approx(cv_run["summary"]["mean"])
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")} == records

    lost = sorted(cv_run["summary"]["ran"])[0]  # as if the run had been killed before this fold finished
    (out / "trials" / f"{lost}.json").unlink()
    resumed = run_cv(cv_run["cfg"])
    assert resumed["ran"] == [lost]
    assert all((out / "trials" / name).stat().st_mtime_ns == mtime for name, mtime in records.items()
               if name != f"{lost}.json")
    with pytest.raises(ConfigError, match="already holds a cross-validation"):
        run_cv(_cv_cfg(tiny_breakhis, out, "resume=false"))
