"""The report's explanation gallery: correct and wrong predictions beside their Grad-CAM heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from test_evaluate import make_manifest, write_table
from test_report import parse

from breakhis_ray.artifacts import write_parquet
from breakhis_ray.config import ReportConfig
from breakhis_ray.report import run_report


def _inputs(tmp: Path) -> tuple[str, str, pd.DataFrame]:
    manifest = make_manifest(str(tmp / "BreaKHis_v1" / "histology_slides" / "breast"))
    rows = []
    for i, (path, label_id) in enumerate(zip(manifest["path"], manifest["label_id"])):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 60, 3), 120 + i, np.uint8)).save(path)
        heat = tmp / "heatmaps" / f"{i:03d}_gradcam.png"
        heat.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 60, 3), (200, 30, 30), np.uint8)).save(heat)
        wrong = i % 4 == 0  # every fourth prediction is wrong
        prob = 0.8 if (label_id == 1) != wrong else 0.2
        rows.append({"path": path, "status": "ok", "error": None, "prob_malignant": prob,
                     "pred_label": "malignant" if prob >= 0.5 else "benign",
                     "label": manifest["label"].iloc[i], "magnification": manifest["magnification"].iloc[i],
                     "heatmap_uri": str(heat) if i != 1 else None})
    predictions = pd.DataFrame(rows)
    manifest_uri = str(tmp / "manifest.parquet")
    write_parquet(manifest, manifest_uri)
    return write_table(predictions, tmp / "predictions" / "part-00000.parquet"), manifest_uri, predictions


def test_gallery_shows_correct_and_wrong_predictions_with_their_heatmaps(tmp_path):
    pred_uri, manifest_uri, predictions = _inputs(tmp_path / "in")
    out = tmp_path / "report"
    run_report(ReportConfig(out=str(out), predictions=pred_uri, manifest=manifest_uri, sample_tiles=4))
    page = parse(out / "report.html")
    assert "explanations" in page.sections
    figures = sorted(p.name for p in (out / "figures").glob("*gradcam*.png"))
    assert [f.split("-", 1)[1] for f in figures] == ["gradcam-correct.png", "gradcam-wrong.png"]
    text = "".join(page.text)
    assert "Correct predictions" in text and "Wrong predictions" in text
    with_map = predictions["heatmap_uri"].notna()
    assert f"{int(with_map.sum()):,} predictions carry a class-activation map" in text
    shown = [Path(u).name for u in predictions.loc[with_map, "heatmap_uri"]]
    assert sum(name in text for name in shown) == 4  # two correct and two wrong rows, each naming its heatmap


def test_gallery_without_heatmaps_says_how_to_get_them(tmp_path):
    pred_uri, _, predictions = _inputs(tmp_path / "in")
    plain = predictions.drop(columns=["heatmap_uri"])
    plain_uri = write_table(plain, tmp_path / "plain" / "part-00000.parquet")
    out = tmp_path / "report"
    run_report(ReportConfig(out=str(out), predictions=plain_uri, sample_tiles=2))
    text = "".join(parse(out / "report.html").text)
    assert "These predictions carry no heatmaps" in text and "--explain gradcam" in text
    assert not list((out / "figures").glob("*gradcam*"))
