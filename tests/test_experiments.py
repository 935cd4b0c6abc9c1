"""Experiment grid (``breakhis-ray experiments``): config, trial plan and tables (unit tier), and the small
preset, shrunk to one loss, run end to end through Ray Tune on the shared Ray instance (ray + slow tiers),
then re-run to show that finished trials are skipped and only a missing one is trained again."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from breakhis_ray.config import ExperimentsConfig, TrainConfig, load_config, validate_config
from breakhis_ray.errors import ConfigError
from breakhis_ray.experiments import GridInputs, concurrency, format_tables, plan_trials

REPO = Path(__file__).resolve().parents[1]
SMALL = REPO / "jobs" / "configs" / "experiments_small.yaml"
FULL = REPO / "jobs" / "configs" / "experiments_full.yaml"


def _small(*overrides: str) -> ExperimentsConfig:
    return load_config(ExperimentsConfig, SMALL, ["out=/tmp/grid-unit", *overrides])


def _inputs(cfg: ExperimentsConfig, root: str = "/data") -> GridInputs:
    return GridInputs(manifest=f"{root}/manifest.parquet", unet_checkpoint=f"{root}/unet/checkpoint_000003",
                      prepared={(p, f): f"{root}/{p}/fold{f}" for p in cfg.protocols for f in cfg.folds})


# ----------------------------------------------------------------------------------- config (unit)
def test_presets_fit_their_machines():
    small = load_config(ExperimentsConfig, SMALL)
    base = load_config(TrainConfig, REPO / small.base_train_config)
    assert small.scaling.num_workers == 1 and not small.scaling.use_gpu and small.scoring.num_gpus == 0
    assert small.protocols == ["patient", "image"] and small.folds == [1]
    assert small.synthetic is not None and base.model.name == "tiny_cnn"
    full = load_config(ExperimentsConfig, FULL)
    assert full.scaling.use_gpu and full.scaling.num_workers == 4 and full.scoring.num_gpus >= 1
    assert full.folds == [1, 2, 3, 4, 5] and full.split.folds == 5
    assert full.cancernet_tab1.models == ["vgg16_bn", "resnet50", "densenet121"]
    assert full.out.startswith("s3://") and full.root.startswith("s3://")
    gpu = load_config(TrainConfig, REPO / full.base_train_config)
    assert gpu.data.image_size == (224, 224) and gpu.model.weights == "torchvision"


@pytest.mark.parametrize("override,message", [
    ("vgg_tab3.lossses=[ce]", "unknown config key 'vgg_tab3.lossses'"),
    ("tables=[vgg_tab3,vgg_tab3]", "tables"),
    ("tables=[vgg_tab5]", "tables"),
    ("protocols=[official]", "split.folds_file"),
    ("split.mode=image", "set per protocol"),
    ("folds=[4]", "1..split.folds=3"),
    ("scaling.num_workers=0", "num_workers >= 1"),
    ("vgg_tab4.magnifications=[40,50]", "magnification 50"),
])
def test_bad_grid_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        _small(override)
    assert "\n" not in str(info.value)


def test_a_typo_in_a_table_override_names_the_table():
    cfg = _small("tables=[vgg_fig4]", "vgg_fig4.overrides=[train.epoch=3]")
    with pytest.raises(ConfigError, match=r"vgg_fig4: unknown config key 'train.epoch'"):
        plan_trials(cfg, _inputs(cfg))
    cfg = _small("tables=[cancernet_tab1]", "cancernet_tab1.models=[vgg17]")
    with pytest.raises(ConfigError, match="cancernet_tab1: unknown model 'vgg17'"):
        plan_trials(cfg, _inputs(cfg))
    cfg = _small("tables=[cancernet_tab1]")
    no_unet = _inputs(cfg)
    no_unet.unet_checkpoint = None
    with pytest.raises(ConfigError, match="'unet' needs a U-Net checkpoint"):
        plan_trials(cfg, no_unet)


# ------------------------------------------------------------------------------------- plan (unit)
def test_plan_covers_every_table_cell_and_shares_identical_trials():
    cfg = _small()
    cells, specs = plan_trials(cfg, _inputs(cfg))
    per_table = pd.DataFrame([vars(c) for c in cells]).groupby("table").size().to_dict()
    n = len(cfg.protocols) * len(cfg.folds)
    assert per_table == {"vgg_tab3": 3 * n, "vgg_fig4": 4 * n, "vgg_tab4": 4 * n, "cancernet_tab1": 6 * n}
    ids = [s["trial_id"] for s in specs]
    assert len(ids) == len(set(ids)) and {c.trial_id for c in cells} == set(ids)
    # Tab. 3's focal run, Fig. 4's finetune_aug run and the shared Tab. 4 model are one training config
    by_cell = {(c.table, c.protocol, c.loss, c.strategy, c.model, c.segmentation): c.trial_id for c in cells}
    for protocol in cfg.protocols:
        focal = by_cell[("vgg_tab3", protocol, "focal", "finetune_aug", "tiny_cnn", "none")]
        assert by_cell[("vgg_fig4", protocol, "focal", "finetune_aug", "tiny_cnn", "none")] == focal
        assert by_cell[("vgg_tab4", protocol, "focal", "finetune_aug", "tiny_cnn", "none")] == focal
    assert len(specs) == (3 + 3 + 0 + 6) * n
    assert {c.magnification for c in cells if c.table == "vgg_tab4"} == {"40", "100", "200", "400"}


def test_trial_configs_carry_protocol_data_resources_and_guidance():
    cfg = _small()
    cells, specs = plan_trials(cfg, _inputs(cfg))
    for spec in specs:
        train = validate_config(TrainConfig, spec["train"])
        assert train.data.shards == f"/data/{spec['protocol']}/fold{spec['fold']}" == spec["prepared"]
        assert train.run.name == spec["trial_id"] and train.run.storage_path == "/tmp/grid-unit/runs"
        assert train.scaling == cfg.scaling
        assert spec["record"] == f"/tmp/grid-unit/trials/{spec['trial_id']}.json"
    guided = [validate_config(TrainConfig, s["train"]) for s in specs if "-unet-" in s["trial_id"]]
    assert len(guided) == 3 * len(cfg.protocols)
    for train in guided:
        assert train.guidance.unet_checkpoint == "/data/unet/checkpoint_000003"
        assert (train.guidance.mode, train.model.in_channels, train.loss.name) == ("channel", 4, "ce")
    per_mag = _small("tables=[vgg_tab4]", "vgg_tab4.mode=per_magnification")
    _, specs = plan_trials(per_mag, _inputs(per_mag))
    assert sorted(s["magnifications"][0] for s in specs) == [40, 40, 100, 100, 200, 200, 400, 400]


def test_trial_ids_follow_training_settings_not_storage_or_resources():
    cfg = _small("tables=[vgg_tab3]")
    ids = [s["trial_id"] for s in plan_trials(cfg, _inputs(cfg))[1]]
    assert ids == [s["trial_id"] for s in plan_trials(cfg, _inputs(cfg))[1]]
    moved = _small("tables=[vgg_tab3]", "out=/elsewhere", "scaling.cpus_per_worker=1.0", "max_concurrent_trials=1")
    assert ids == [s["trial_id"] for s in plan_trials(moved, _inputs(moved, root="/other"))[1]]
    longer = _small("tables=[vgg_tab3]", 'base_overrides=["data.image_size=[48,72]","train.epochs=5"]')
    assert not set(ids) & {s["trial_id"] for s in plan_trials(longer, _inputs(longer))[1]}


def test_concurrency_leaves_room_for_data_tasks():
    cfg = _small("max_concurrent_trials=3")
    _, specs = plan_trials(cfg, _inputs(cfg))
    # each trial holds 0.1 (driver) + 0.5 (worker); the largest data/scoring task asks 0.25
    assert [concurrency(cfg, specs, cpus) for cpus in (1.0, 2.0, 8.0)] == [1, 2, 3]


def test_tables_put_protocols_side_by_side_with_mean_std_over_folds_and_the_gap():
    rows = []
    for fold, (patient, image) in enumerate([(0.80, 0.95), (0.90, 0.97)], start=1):
        for protocol, acc in (("patient", patient), ("image", image)):
            rows.append({"table": "vgg_tab3", "protocol": protocol, "fold": fold, "loss": "focal",
                         "accuracy": acc, "patient_recognition_rate": acc - 0.05})
    text = format_tables(rows, ["patient", "image"])
    line = next(li for li in text.splitlines() if li.startswith("| focal"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == ["focal", "85.00 ± 5.00", "80.00 ± 5.00", "96.00 ± 1.00", "91.00 ± 1.00", "2", "+11.00"]
    assert "patient: accuracy" in text and "image: accuracy" in text


# ---------------------------------------------------------------------------------- grid (ray)
def _grid_cfg(tiny_breakhis, out: Path, *overrides: str) -> ExperimentsConfig:
    return load_config(ExperimentsConfig, SMALL, [
        f"out={out}", "synthetic=null", f"root={tiny_breakhis['manifest']}", "tables=[vgg_tab3,vgg_tab4]",
        "vgg_tab3.losses=[focal]", 'base_overrides=["data.image_size=[48,72]","train.epochs=2"]', *overrides])


@pytest.fixture(scope="module")
def grid(tiny_breakhis, tmp_path_factory):
    from breakhis_ray.experiments import run_experiments

    out = tmp_path_factory.mktemp("grid") / "out"
    cfg = _grid_cfg(tiny_breakhis, out, "tracking.mlflow_uri=local")  # MLflow store under out (child runs)
    return {"cfg": cfg, "out": out, "summary": run_experiments(cfg)}


def _test_images(out: Path, protocol: str) -> pd.DataFrame:
    from breakhis_ray.data.shards import read_shards

    rows = read_shards(str(out / "data" / protocol / "fold1"), columns=["path", "split", "augmentation",
                                                                        "patient_id", "magnification"])
    return rows[rows["augmentation"].isna()]


@pytest.mark.ray
@pytest.mark.slow
def test_small_grid_runs_through_tune_and_writes_both_protocols(grid):
    out, summary = grid["out"], grid["summary"]
    assert len(summary["ran"]) == 2 and summary["rows"] == 2 + 2 * 4  # Tab. 4 shares Tab. 3's focal run
    rows = pd.DataFrame(json.loads((out / "grid.json").read_text()))
    assert set(rows["protocol"]) == {"patient", "image"} and set(rows["table"]) == {"vgg_tab3", "vgg_tab4"}
    for protocol in ("patient", "image"):
        shards = _test_images(out, protocol)
        test = shards[shards["split"] == "test"]
        tab3 = rows[(rows["table"] == "vgg_tab3") & (rows["protocol"] == protocol)].iloc[0]
        assert tab3["n_images"] == len(test) and tab3["n_patients"] == test["patient_id"].nunique()
        tab4 = rows[(rows["table"] == "vgg_tab4") & (rows["protocol"] == protocol)]
        assert sorted(tab4["magnification"], key=int) == ["40", "100", "200", "400"]
        assert tab4["n_images"].sum() == len(test)
        assert tab4.set_index("magnification")["n_images"].to_dict() == \
            {str(m): int(n) for m, n in test.groupby("magnification").size().items()}
    metrics = rows[["accuracy", "precision", "recall", "f1", "patient_recognition_rate"]].to_numpy()
    assert ((metrics >= 0) & (metrics <= 1)).all()
    # the two protocols are different splits: only the image split shares patients between train and test
    leaks = {}
    for protocol in ("patient", "image"):
        shards = _test_images(out, protocol)
        train = set(shards.loc[shards["split"] == "train", "patient_id"])
        leaks[protocol] = len(train & set(shards.loc[shards["split"] == "test", "patient_id"]))
    assert leaks["patient"] == 0 and leaks["image"] > 0
    # Ray Tune ran the trials (one trial directory per id) and each trial trained and kept its curves
    tune_dirs = {p.name for p in (out / "tune").glob("grid-*/*") if p.is_dir()}
    assert set(summary["ran"]) <= tune_dirs
    for trial_id in summary["ran"]:
        record = json.loads((out / "trials" / f"{trial_id}.json").read_text())
        history = json.loads(Path(record["history"]).read_text())
        assert record["epochs_completed"] == len(history) == 2
        assert Path(record["predictions"]).is_file()
    tables = (out / "tables.md").read_text()
    assert "### vgg_tab3" in tables and "### vgg_tab4" in tables and "accuracy gap image - patient" in tables
    distribution = json.loads((out / "distribution.json").read_text())
    for protocol in ("patient", "image"):
        after = distribution[protocol]["fold1"]["tables"]["tab2_train"]
        assert all(after[m]["Benign"] == after[m]["Malignant"] for m in ("40X", "100X", "200X", "400X"))


@pytest.mark.ray
@pytest.mark.slow
def test_grid_trials_are_child_runs_of_one_mlflow_parent(grid):
    from mlflow import MlflowClient

    out = grid["out"]
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("breakhis-ray").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert sorted(r.info.run_name for r in children) == sorted(grid["summary"]["ran"])  # one child per trial
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_balanced_accuracy")] == [1, 2]
        assert 0.0 <= child.data.metrics["test_accuracy"] <= 1.0  # the trial's test scores, logged by the trial


@pytest.mark.ray
@pytest.mark.slow
def test_report_renders_the_grid_beside_the_published_numbers(grid, tmp_path):
    from breakhis_ray.config import ReportConfig
    from breakhis_ray.report import run_report

    cfg = load_config(ReportConfig, grid["out"] / "report.yaml", [f"out={tmp_path / 'report'}"])
    assert cfg.grid == str(grid["out"] / "grid.json") and cfg.train_runs
    page = Path(run_report(cfg)).read_text()
    section = page[page.index('id="reproduction"'):page.index('id="configuration"')]
    assert "ours (patient split)" in section and "ours (image split)" in section
    assert "published (image-level split, as reported)" in section and "96.96" in section


@pytest.mark.ray
@pytest.mark.slow
def test_rerun_skips_finished_trials_and_trains_only_a_missing_one(grid, tiny_breakhis):
    from breakhis_ray.experiments import run_experiments

    out = grid["out"]
    records = {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")}
    again = run_experiments(grid["cfg"])
    assert again["ran"] == [] and again["rows"] == grid["summary"]["rows"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trials").glob("*.json")} == records

    lost, kept = sorted(grid["summary"]["ran"])  # as if the grid had been killed before `lost` finished
    (out / "trials" / f"{lost}.json").unlink()
    resumed = run_experiments(grid["cfg"])
    assert resumed["ran"] == [lost]
    assert (out / "trials" / f"{kept}.json").stat().st_mtime_ns == records[f"{kept}.json"]
    assert json.loads((out / "trials" / f"{lost}.json").read_text())["epochs_completed"] == 2
    assert len(json.loads((out / "grid.json").read_text())) == grid["summary"]["rows"]

    with pytest.raises(ConfigError, match="already holds a grid"):
        run_experiments(_grid_cfg(tiny_breakhis, out, "resume=false"))
