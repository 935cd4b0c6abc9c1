"""report: one self-contained HTML page from small fake inputs; sections skip with a note without input."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import skip_or_fail
from PIL import Image
from test_evaluate import cohort_manifest, cohort_predictions, make_manifest, make_predictions, write_table

from breakhis_ray import cli
from breakhis_ray.artifacts import write_parquet
from breakhis_ray.config import EvaluateConfig, ReportConfig, load_config
from breakhis_ray.evaluate import run_evaluate
from breakhis_ray.metrics import roc_auc
from breakhis_ray.report import PUBLISHED_LABEL, SECTIONS, canonical_table, plots, run_report

REPO = Path(__file__).resolve().parents[1]
SECTION_IDS = [sid for sid, _ in SECTIONS]


class _Page(HTMLParser):
    """Collects section ids, <img> sources, <details> count and text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.details = 0
        self.text: list[str] = []
        self.toc_links: list[str] = []
        self._in_nav = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "details":
            self.details += 1
        elif tag == "nav":
            self._in_nav = True
        elif tag == "a" and self._in_nav:
            self.toc_links.append(attrs.get("href"))

    def handle_endtag(self, tag):
        if tag == "nav":
            self._in_nav = False

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page


def png(color=(200, 80, 120), size=(24, 16)) -> bytes:
    rng = np.random.default_rng(sum(color))
    arr = np.clip(np.asarray(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def history(n: int, start: float) -> list[dict]:
    return [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": start + 0.05 * e, "val_loss": 1.2 / e,
             "val_accuracy": start + 0.04 * e, "val_balanced_accuracy": start + 0.03 * e, "val_f1": start,
             "train_images_per_s": 50.0} for e in range(1, n + 1)]


def grid_rows() -> list[dict]:
    rows = []
    for protocol, base in (("patient", 0.86), ("image", 0.95)):
        for fold in (1, 2):
            jitter = 0.01 * fold
            for loss in ("ce", "focal"):
                rows.append({"table": "vgg_tab3", "model": "vgg16", "loss": loss, "strategy": "finetune_aug",
                             "magnification": None, "protocol": protocol, "fold": fold,
                             "accuracy": base + jitter, "patient_recognition_rate": base - 0.02})
            for mag in (40, 100, 200, 400):
                rows.append({"table": "vgg_tab4", "model": "vgg16", "loss": "focal", "strategy": "finetune_aug",
                             "magnification": mag, "protocol": protocol, "fold": fold, "accuracy": base + jitter})
            for model in ("vgg16", "densenet121"):
                for seg in ("none", "unet"):
                    rows.append({"table": "cancernet_tab1", "model": model, "segmentation": seg, "loss": "ce",
                                 "protocol": protocol, "fold": fold, "accuracy": base, "precision": base + 0.02,
                                 "recall": base - 0.01, "f1": base + jitter})
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every report input, small: manifest with real PNG tiles, predictions, metrics, runs, grid, overlays."""
    tmp = tmp_path_factory.mktemp("report-inputs")
    manifest = make_manifest(str(tmp / "BreaKHis_v1" / "histology_slides" / "breast"))
    for i, (path, label) in enumerate(zip(manifest["path"], manifest["label"])):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(png((200, 90 + i, 160) if label == "malignant" else (230, 170, 200 - i)))
    Path(manifest["path"].iloc[5]).write_bytes(b"not an image")  # the tile grid shows it as unreadable
    manifest_uri = str(tmp / "manifest.parquet")
    write_parquet(manifest, manifest_uri)
    predictions = make_predictions(manifest)
    pred_uri = write_table(predictions, tmp / "infer" / "predictions" / "part-00000.parquet")
    metrics_uri = str(tmp / "metrics.json")
    run_evaluate(load_config(EvaluateConfig, values={"predictions": pred_uri, "manifest": manifest_uri,
                                                     "out": metrics_uri}))
    before = {"40X": {"Benign": 5, "Malignant": 3, "Total": 8}, "100X": {"Benign": 4, "Malignant": 2, "Total": 6},
              "Total": {"Benign": 9, "Malignant": 5, "Total": 14}}
    after = {"40X": {"Benign": 5, "Malignant": 5, "Total": 10}, "100X": {"Benign": 4, "Malignant": 4, "Total": 8},
             "Total": {"Benign": 9, "Malignant": 9, "Total": 18}}
    prepare = {"root": "synthetic", "out": "prep", "fold": 1, "input": 17, "written": 17, "rejected": 0,
               "augmented": 4, "shards": ["shards/part-00000.parquet"], "splits": {"train": 18, "test": 3},
               "protocol": "patient", "enhance_notes": ["40X: 2 benign copies"],
               "tables": {"tab1_all": before, "tab1_train": before, "tab2_train": after, "tab2_all": after}}
    (tmp / "prepare.json").write_text(json.dumps(prepare))
    run_a, run_b = tmp / "runs" / "vgg16-focal", tmp / "runs" / "resnet50-ce"
    run_a.mkdir(parents=True)
    run_b.mkdir(parents=True)
    (run_a / "history.json").write_text(json.dumps(history(4, 0.6)))
    (run_a / "result.json").write_text(json.dumps({"best_checkpoint": str(run_a / "checkpoint_3")}))
    (run_a / "config.yaml").write_text("model:\n  name: vgg16\nloss:\n  name: focal\n")
    (run_b / "result.json").write_text(json.dumps({"latest_checkpoint": None, "kept_checkpoints": history(3, 0.5)}))
    (tmp / "seg").mkdir()
    (tmp / "seg" / "overlays.png").write_bytes(png((90, 60, 160)))
    seg = {"methods": {m: {"dice": d, "iou": d - 0.15, "n": 4, "dice_std": 0.05, "iou_std": 0.04,
                           "count_rel_error": 0.2} for m, d in (("threshold", 0.71), ("watershed", 0.74),
                                                                 ("unet", 0.86))},
           "images": 4, "patients": 2, "metric_notes": "per-image Dice/IoU",
           "overlays": str(tmp / "seg" / "overlays.png")}
    (tmp / "seg.json").write_text(json.dumps(seg))
    (tmp / "grid.json").write_text(json.dumps(grid_rows()))
    (tmp / "samples_grid.png").write_bytes(png((180, 100, 170), (64, 32)))
    (tmp / "train.yaml").write_text("train:\n  epochs: 2\n")
    cfg = {
        "manifest": manifest_uri, "prepare_summary": str(tmp / "prepare.json"),
        "train_runs": [str(run_a), str(run_b)], "metrics": metrics_uri, "predictions": str(tmp / "infer"),
        "segmentation": str(tmp / "seg.json"), "grid": str(tmp / "grid.json"),
        "samples_grid": str(tmp / "samples_grid.png"), "configs": [str(tmp / "train.yaml")],
        "data_source": "synthetic", "sample_tiles": 6,
    }
    return tmp, cfg


@pytest.fixture(scope="module")
def full_report(inputs, tmp_path_factory):
    _, values = inputs
    out = tmp_path_factory.mktemp("report-full")
    cfg = ReportConfig(out=str(out), **values)
    run_report(cfg)
    return out


# one figure each: class x magnification, enhancement, samples, training curves, confusion matrices,
# per-magnification bars, reliability diagram, ROC, prediction tiles, segmentation overlays
FULL_FIGURES = 10


def test_full_report_sections_images_and_tables(full_report, inputs):
    page = parse(full_report / "report.html")
    assert page.sections == SECTION_IDS
    assert page.toc_links == ["#" + sid for sid in SECTION_IDS]
    assert len(page.images) == FULL_FIGURES
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    for src in page.images:  # every embedded image decodes as a PNG
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert len(list((full_report / "figures").glob("*.png"))) == FULL_FIGURES
    assert (full_report / "config.yaml").is_file() and (full_report / "versions.json").is_file()
    text = "".join(page.text)
    assert "Skipped:" not in text and "input not given" not in text
    for needle in ("Not for diagnosis", "Intended use", "Known limitations", "Metric caveats",
                   "synthetic BreakHis (procedurally generated images)", PUBLISHED_LABEL,
                   "ours (patient split)", "ours (image split)", "96.96", "0.994", "> 97",
                   "Tab. 1: training split before enhancement", "Tab. 2: training split after enhancement",
                   "40X: 2 benign copies", "Recall per subtype",
                   "vgg16-focal", "resnet50-ce", "excluded from the metric denominators", "0.860 ± 0.050"):
        assert needle in text, needle
    assert page.details >= 4  # header config, evaluate config, training run config, configs=[train.yaml]
    metrics = json.loads(Path(inputs[1]["metrics"]).read_text())
    acc, (lo, hi) = metrics["overall"]["accuracy"], metrics["overall"]["ci95"]["accuracy"]
    for needle in (f"{acc * 100:.2f} [{lo * 100:.1f}, {hi * 100:.1f}]",  # intervals in the metric table
                   "Decision threshold:", "0.5 (no validation predictions)", "bootstrap over patients",
                   "Calibration", "Reliability diagram", "Patient diagnosis: three ways", "majority",
                   "Protocol of every number below:", "magnification handling not known"):
        assert needle in text, needle
    # patient-split focal tab3 row: mean of the two folds, as a percentage with the std
    assert "87.50 ± 0.50" in text


def test_report_subtype_task_threshold_and_protocol(tmp_path):
    """Metrics of the subtype task with a locked threshold: the 8x8 matrices, per-class table, rule and protocol."""
    manifest = cohort_manifest(str(tmp_path / "BreaKHis_v1" / "histology_slides" / "breast"))
    manifest_uri = str(tmp_path / "manifest.parquet")
    write_parquet(manifest, manifest_uri)
    pred = cohort_predictions(manifest, subtypes=True)
    test = manifest["patient_id"].isin(sorted(manifest["patient_id"].unique())[::2])
    pred_uri = write_table(pred[test.to_numpy()], tmp_path / "test.parquet")
    val_uri = write_table(pred[~test.to_numpy()], tmp_path / "val.parquet")
    metrics_uri = str(tmp_path / "metrics.json")
    run_evaluate(load_config(EvaluateConfig, values={"predictions": pred_uri, "val_predictions": val_uri,
                                                     "manifest": manifest_uri, "out": metrics_uri,
                                                     "bootstrap.resamples": 100}))
    metrics = json.loads(Path(metrics_uri).read_text())
    out = tmp_path / "report"
    run_report(load_config(ReportConfig, values={"out": str(out), "metrics": metrics_uri}))
    page = parse(out / "report.html")
    text = "".join(page.text)
    thr = metrics["overall"]["threshold"]
    assert thr["rule"] == "youden"
    for needle in ("Eight-subtype task", "phyllodes_tumor", "subtype macro F1 %", "MIM", "youden",
                   f"{thr['value']:.4f}", "Subtype confusion matrices", f"{thr['value']:.4g} (rule: youden)"):
        assert needle in text, needle
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert any("subtype-confusion" in f for f in figures) and any("reliability" in f for f in figures)
    with Image.open(next((out / "figures").glob("*subtype-confusion*.png"))) as im:
        assert im.width > 600  # two 8x8 panels, not 2x2-sized ones


def test_report_with_only_the_manifest(inputs, tmp_path):
    _, values = inputs
    cfg = load_config(ReportConfig, overrides=[f"manifest={values['manifest']}", "embed_images=false"],
                      values={"out": str(tmp_path / "r")})
    run_report(cfg)
    page = parse(tmp_path / "r" / "report.html")
    assert page.sections == SECTION_IDS
    assert page.images == ["figures/01-class-magnification.png"]
    assert (tmp_path / "r" / "figures" / "01-class-magnification.png").is_file()
    text = "".join(page.text)
    for what in ("prepare_summary", "samples_grid", "train_runs", "metrics", "predictions", "segmentation", "grid"):
        assert f"Skipped: no {what} input given" in text, what
    assert text.count("(input not given)") == 8  # the explanation gallery reads predictions too
    assert "96.96" in text  # the published numbers are still listed
    assert "Tab. 1: images per magnification and class" in text


def test_report_image_protocol_and_predictions_without_manifest(inputs, tmp_path):
    tmp, values = inputs
    metrics = json.loads(Path(values["metrics"]).read_text())
    metrics["protocol"] = "image"
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    cfg = ReportConfig(out=str(tmp_path / "r"), metrics=str(tmp_path / "metrics.json"),
                       predictions=values["predictions"], sample_tiles=0)
    run_report(cfg)
    page = parse(tmp_path / "r" / "report.html")
    text = "".join(page.text)
    assert "Image-level split: the same patients appear in training and test data" in text
    # confusion matrices, per-magnification bars, reliability diagram, ROC from the file's own labels; no tiles
    assert len(page.images) == 4
    assert "sample_tiles=0" in text


def test_report_cli_bad_input_is_one_line(tmp_path, capsys):
    code = cli.main(["report", "--out", str(tmp_path / "r"), f"metrics={tmp_path / 'missing.json'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1


def test_user_strings_are_escaped(inputs, tmp_path):
    """Paths, config values and file contents reach the page as text: a <script> in them never becomes a tag."""
    _, values = inputs
    evil = tmp_path / "<script>alert('path')"
    evil.mkdir()
    samples = evil / "samples.png"
    samples.write_bytes(Path(values["samples_grid"]).read_bytes())
    stage_yaml = evil / "stage.yaml"
    stage_yaml.write_text("note: '</pre><script>alert(1)</script>'\n")
    cfg = ReportConfig(out=str(tmp_path / "r"), title="<script>alert('title')</script>", samples_grid=str(samples),
                       configs=[str(stage_yaml)], prepare_summary=values["prepare_summary"])
    text = Path(run_report(cfg)).read_text()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(" in text
    page = parse(tmp_path / "r" / "report.html")
    assert page.sections == SECTION_IDS
    shown = "".join(page.text)
    assert "<script>alert('title')</script>" in shown  # the title, as text
    assert f"Synthetic samples ({samples})." in shown  # the path in the caption, as text
    assert "</pre><script>alert(1)</script>" in shown  # the config file's content, verbatim


def test_roc_curve_area_matches_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, 300), 0, 1), 1)  # ties
    fpr, tpr, _ = plots.roc_curve(y, s)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids (ties count one half)
    assert area == pytest.approx(roc_auc(y, s))
    assert plots.roc_curve([1, 1], [0.2, 0.4])[0].size == 0


def test_canonical_table_names():
    assert canonical_table("vgg_tab3") == "vgg_tab3"
    assert canonical_table("Tab. 4") == "vgg_tab4"
    assert canonical_table("cancernet") == "cancernet_tab1"
    assert canonical_table("something_else") == "something_else"


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser") if shutil.which(b)), None)


def test_report_renders_in_headless_chromium(full_report, tmp_path):
    if _browser() is None:
        skip_or_fail("chromium / chromium-browser not on PATH")
    shot = tmp_path / "report.png"
    subprocess.run(["bash", str(REPO / "scripts" / "screenshot_report.sh"), str(full_report / "report.html"),
                    str(shot)], check=True, timeout=120, capture_output=True)
    assert shot.is_file()
    with Image.open(shot) as img:
        arr = np.asarray(img.convert("L"), dtype=np.float32)
    assert arr.shape[1] >= 1000
    assert arr.std() > 5.0 and (arr < 128).mean() > 0.005  # not blank: text and figures drawn
    # the DOM as Chromium built it holds every section and every embedded figure
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", f"--user-data-dir={profile}", "--dump-dom",
                              (full_report / "report.html").as_uri()],
                             check=True, timeout=120, capture_output=True, text=True).stdout
    page = _Page()
    page.feed(dom)
    assert page.sections == SECTION_IDS
    assert len(page.images) == FULL_FIGURES
