"""The subtype task: class names, per-subtype enhancement, class-balanced losses, per-class epoch metrics
(unit tier), the subtype Predictor's columns (no Ray), and a tiny subtype training run with temperature
scaling whose checkpoint ``infer`` turns into subtype columns (ray tier)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breakhis_ray.config import PrepareConfig, TrainConfig, load_config
from breakhis_ray.domain import (
    EVALUATION_PROTOCOLS,
    LABELS,
    MALIGNANT,
    SUBTYPE_CLASS_LABELS,
    SUBTYPE_CLASSES,
    task_classes,
    task_of_classes,
)
from breakhis_ray.errors import ConfigError

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]
MALIGNANT_SUBTYPES = [f"prob_{s}" for s in SUBTYPE_CLASSES if SUBTYPE_CLASS_LABELS[s] == MALIGNANT]


def test_task_classes_and_protocols():
    assert task_classes("binary") == LABELS and task_classes("subtype") == SUBTYPE_CLASSES
    assert len(SUBTYPE_CLASSES) == 8 and SUBTYPE_CLASSES[0] == "adenosis"
    assert [SUBTYPE_CLASS_LABELS[s] for s in SUBTYPE_CLASSES] == ["benign"] * 4 + ["malignant"] * 4
    assert task_of_classes(list(SUBTYPE_CLASSES)) == "subtype" and task_of_classes(["a", "b"]) is None
    assert {k: v[0] for k, v in EVALUATION_PROTOCOLS.items()} == {
        "MSB": "binary", "MIB": "binary", "MSM": "subtype", "MIM": "subtype"}
    with pytest.raises(ValueError, match="unknown task"):
        task_classes("ternary")


def test_train_config_task_key_and_typos():
    cfg = load_config(TrainConfig, REPO / "jobs/configs/train_tiny.yaml", ["task=subtype", "loss.alpha=balanced"])
    assert cfg.task == "subtype" and cfg.loss.alpha == "balanced" and not cfg.calibration.temperature_scaling
    assert load_config(TrainConfig, REPO / "jobs/configs/train_tiny.yaml").task == "binary"
    with pytest.raises(ConfigError, match="task"):
        load_config(TrainConfig, REPO / "jobs/configs/train_tiny.yaml", ["task=subtypes"])
    from breakhis_ray.train.classifier import build_model, needs_class_counts

    assert build_model(cfg).model_args["num_classes"] == 8 and needs_class_counts(cfg)


# ------------------------------------------------------------------------------------ enhancement
def _valid(counts: dict[str, int], mag: int = 40, size: int = 16) -> pd.DataFrame:
    rows = []
    for subtype, n in counts.items():
        for i in range(n):
            rows.append({"path": f"{subtype}-{mag}-{i}", "subtype": subtype, "label": SUBTYPE_CLASS_LABELS[subtype],
                         "magnification": mag, "split": "train", "image_width": size, "image_height": size})
    rows.append({**rows[0], "path": "val-0", "split": "val"})  # never copied
    return pd.DataFrame(rows)


def test_subtype_enhancement_balances_every_subtype_per_magnification():
    from breakhis_ray.data import enhance

    counts = dict(zip(SUBTYPE_CLASSES, [2, 5, 3, 4, 12, 6, 7, 5]))
    valid = pd.concat([_valid(counts, 40), _valid({s: n + 1 for s, n in counts.items()}, 100)])
    cfg = PrepareConfig.model_validate({"root": "r", "out": "o", "enhance": {"enabled": True,
                                                                            "balance": "subtype"}}).enhance
    plan, notes = enhance.plan_enhancement(valid, cfg)
    assert not notes and "val-0" not in set(plan["source_path"])
    source = valid.set_index("path")
    after = pd.concat([valid[valid["split"] == "train"],
                       source.loc[plan["source_path"]].reset_index()], ignore_index=True)
    table = enhance.subtype_distribution(after)
    assert table["40X"] == {**dict.fromkeys(SUBTYPE_CLASSES, 12), "Total": 96}
    assert table["100X"] == {**dict.fromkeys(SUBTYPE_CLASSES, 13), "Total": 104}
    assert plan.equals(enhance.plan_enhancement(valid, cfg)[0])  # deterministic
    # the binary balancing is unchanged by the new option (label is the default)
    by_label = PrepareConfig.model_validate({"root": "r", "out": "o", "enhance": {"enabled": True}}).enhance
    label_plan, _ = enhance.plan_enhancement(valid, by_label)
    benign = valid[(valid["split"] == "train") & (valid["label"] == "benign")]
    assert set(label_plan["source_path"]) <= set(benign["path"])


# -------------------------------------------------------------------------------------------- losses
def test_class_balanced_focal_alpha_from_class_counts():
    from breakhis_ray.losses import create_loss, focal_loss, inverse_frequency_weights

    counts = [10, 40, 5, 20, 80, 15, 12, 18]
    loss = create_loss("focal", class_counts=counts, alpha="balanced", gamma=0.0, num_classes=8)
    weights = inverse_frequency_weights(counts)
    assert loss.alpha == pytest.approx(tuple(weights))
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(64, 8, generator=g), torch.randint(0, 8, (64,), generator=g)
    per_image = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert float(loss(logits, y)) == pytest.approx(float((torch.tensor(weights)[y] * per_image).mean()), rel=1e-6)
    assert float(focal_loss(logits, y, alpha=weights, gamma=2.0)) < float(loss(logits, y))
    weighted = create_loss("weighted_ce", class_counts=counts)
    assert torch.allclose(weighted.weight, torch.tensor(weights, dtype=torch.float32))
    with pytest.raises(ConfigError, match="needs class_counts"):
        create_loss("focal", alpha="balanced")
    # a subtype with no training image (a fold whose few patients of it sit in val/test): weight 0 when asked
    absent = [10, 40, 5, 20, 80, 0, 12, 18]
    with pytest.raises(ConfigError, match="must all be > 0"):
        create_loss("focal", class_counts=absent, alpha="balanced")
    ignored = create_loss("focal", class_counts=absent, alpha="balanced", absent_classes="ignore")
    present = [c for c in absent if c]
    assert ignored.alpha[5] == 0.0
    assert [a for a in ignored.alpha if a] == pytest.approx(inverse_frequency_weights(present))
    y_present = y[y != 5]
    assert float(ignored(logits[y != 5], y_present)) == pytest.approx(
        float(focal_loss(logits[y != 5], y_present, alpha=list(ignored.alpha), gamma=2.0)))
    with pytest.raises(ConfigError, match="8 classes"):
        create_loss("focal", class_counts=[1, 2], alpha="balanced", num_classes=8)
    with pytest.raises(ConfigError, match="2 weights for num_classes=8"):
        create_loss("focal", alpha=[0.5, 0.5], num_classes=8)


# ------------------------------------------------------------------------------------ epoch metrics
def test_per_class_sums_give_sklearn_metrics():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from breakhis_ray.train import loop, multiclass

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 8, generator=g), torch.randint(0, 7, (n,), generator=g)) for n in (13, 20, 7)]
    sums = multiclass.zero_sums(8)
    stats = multiclass.batch_stats_for(8)
    for logits, y in batches:
        loop.add_sums(sums, stats(torch.tensor(0.5), logits, y))
    y_true = torch.cat([y for _, y in batches]).numpy()
    y_pred = torch.cat([lg.argmax(1) for lg, _ in batches]).numpy()
    scores = multiclass.class_metrics(sums, 8)
    assert sums["seen"] == 40 and isinstance(sums["tp_0"], int)
    assert scores["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    with pytest.warns(UserWarning):  # class 7 is predicted but never true: sklearn warns, both skip it
        expected = balanced_accuracy_score(y_true, y_pred)
    assert scores["balanced_accuracy"] == pytest.approx(expected)
    metrics = multiclass.epoch_metrics_for(8)({**sums, "seconds": 1.0}, sums, 1)
    assert metrics["val_f1"] == metrics["val_macro_f1"] == scores["macro_f1"]
    assert metrics["val_loss"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ predictor
def _png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _check_subtype_rows(table) -> pd.DataFrame:
    from breakhis_ray.inference import SUBTYPE_PROB_COLUMNS

    df = table.to_pandas()
    ok = df[df["status"] == "ok"]
    assert len(ok)
    probs = ok[list(SUBTYPE_PROB_COLUMNS)].to_numpy(dtype=np.float64)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5) and (probs >= 0).all()
    assert np.allclose(ok["prob_malignant"], ok[MALIGNANT_SUBTYPES].sum(1), atol=1e-5)
    assert (ok["pred_subtype"].to_numpy() == np.asarray(SUBTYPE_CLASSES)[probs.argmax(1)]).all()
    assert (ok["pred_label"] == np.where(ok["prob_malignant"] >= 0.5, "malignant", "benign")).all()
    bad = df[df["status"] != "ok"]
    assert bad["pred_subtype"].isna().all() and bad[list(SUBTYPE_PROB_COLUMNS)].isna().all().all()
    return df


def test_subtype_checkpoint_writes_pred_subtype_and_one_probability_per_class(tmp_path):
    from breakhis_ray.checkpoint import read_meta, save_checkpoint
    from breakhis_ray.inference import SUBTYPE_PREDICTION_SCHEMA, Predictor
    from breakhis_ray.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=8, width=4)
    with torch.no_grad():
        for m in model.classifier.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(30.0)
    save_checkpoint(str(tmp_path / "clf"), model, labels=SUBTYPE_CLASSES, preprocessing={"size": [32, 32]})
    assert read_meta(str(tmp_path / "clf"))["task"] == "subtype"
    predictor = Predictor.from_checkpoint(str(tmp_path / "clf"), device="cpu")
    table = predictor.predict_bytes([_png(i) for i in range(6)] + [b"not an image"])
    assert table.schema == SUBTYPE_PREDICTION_SCHEMA
    df = _check_subtype_rows(table)
    from breakhis_ray.inference import SUBTYPE_PROB_COLUMNS

    ok = df[df["status"] == "ok"]
    assert (ok[list(SUBTYPE_PROB_COLUMNS)].std() > 1e-4).any()  # they vary with the image


# ------------------------------------------------------------------------------------------- ray tier
@pytest.mark.ray
def test_subtype_task_trains_calibrates_and_infer_writes_subtype_columns(tiny_breakhis, tmp_path):
    from breakhis_ray.checkpoint import read_meta
    from breakhis_ray.config import InferConfig
    from breakhis_ray.inference import SUBTYPE_PREDICTION_SCHEMA, read_predictions, run_infer
    from breakhis_ray.train import run_train

    cfg = load_config(TrainConfig, REPO / "jobs/configs/train_tiny.yaml", [
        f"data.shards={tiny_breakhis['prepared']}", f"run.storage_path={tmp_path / 'runs'}",
        "data.image_size=[32,48]", "train.epochs=2", "train.max_steps_per_epoch=4", "train.batch_size=16",
        "scaling.num_workers=1", "task=subtype", "loss.alpha=balanced",
        "calibration.temperature_scaling=true", "calibration.num_cpus=0.5",
    ])
    summary = run_train(cfg)
    best = summary["best_checkpoint"]
    meta = read_meta(best)
    assert meta["labels"] == list(SUBTYPE_CLASSES) and meta["task"] == "subtype"
    assert meta["model_args"]["num_classes"] == 8
    calibration = meta["calibration"]
    assert calibration["temperature"] > 0 and calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    assert calibration["n_images"] == summary["calibration"][best]["n_images"] > 0
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    assert len(history) == 2 and 0.0 <= history[-1]["val_macro_f1"] <= 1.0
    saved = json.loads((Path(summary["run_dir"]) / "result.json").read_text())
    assert saved["calibration"][best]["temperature"] == calibration["temperature"]
    # the class-balanced alpha was computed from the training split's subtype counts
    config = TrainConfig.model_validate(__import__("yaml").safe_load((Path(best) / "config.yaml").read_text()))
    assert len(config.loss.class_counts) == 8 and all(c > 0 for c in config.loss.class_counts)

    out = tmp_path / "pred"
    run_infer(load_config(InferConfig, None, [], {
        "input": str(tiny_breakhis["prepared"]), "out": str(out), "classifier": best, "chunk_size": 48,
        "max_chunks": 1, "batch_size": 16, "num_cpus": 0.5, "decode_num_cpus": 0.5}))
    table = read_predictions(str(out))
    assert table.schema == SUBTYPE_PREDICTION_SCHEMA and table.num_rows == 48
    _check_subtype_rows(table)
