"""``breakhis-ray report``: one self-contained HTML report from the outputs of the other stages.

``<out>/report.html`` embeds every figure as a PNG data URI (``embed_images=false``: relative links instead);
the same PNGs are written to ``<out>/figures/`` and the resolved config to ``<out>/config.yaml``.

Inputs (all optional, see :class:`~breakhis_ray.config.ReportConfig`); a section whose input is not given
stays in the report with a visible note, an input that is given but unreadable is an error:

==================  ==================================================================================
``manifest``        dataset tables: images per class and magnification (Tab. 1), subtypes and patients
``prepare_summary`` ``prepare.json``: class x magnification before (Tab. 1) and after (Tab. 2) enhancement
``train_runs``      run directories: ``history.json`` (list of per-epoch metric dicts), else the latest
                    checkpoint's ``train_state.pt`` history, else ``result.json`` ``kept_checkpoints``
``metrics``         the ``evaluate`` JSON: tables, confusion matrices, per-magnification bars, subtypes
``predictions``     prediction Parquet (file or directory): ROC curves and predicted tiles with probabilities
``segmentation``    segmentation evaluation JSON: Dice/IoU per method and overlay PNG paths
``grid``            experiment grid (JSON records, Parquet or CSV): the papers' tables next to ours
``samples_grid``    PNG of synthetic samples
``configs``         YAML files shown verbatim in the configuration section
==================  ==================================================================================

Grid rows carry ``table`` (``vgg_tab3`` losses, ``vgg_fig4`` strategies, ``vgg_tab4`` magnifications,
``cancernet_tab1`` CNN x segmentation; other names are shown generically), the varying settings (``model``,
``loss``, ``strategy``, ``segmentation``/``segmenter``, ``magnification``), ``protocol`` (``patient``,
``official`` or ``image``), ``fold`` and metric columns (fractions: ``accuracy``, ``precision``, ``recall``,
``f1``, ``patient_recognition_rate`` ...). Each configuration is shown as mean ± std over folds per protocol,
next to the published numbers, which come from image-level splits as far as the papers say.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from breakhis_ray import plots, storage
from breakhis_ray.config import MAGNIFICATIONS, ReportConfig, config_yaml
from breakhis_ray.errors import DataError

REPORT_FILE = "report.html"
FIGURES_DIR = "figures"

SECTIONS: tuple[tuple[str, str], ...] = (
    ("model-card", "Model card"),
    ("dataset", "Dataset"),
    ("enhancement", "Data enhancement"),
    ("samples", "Synthetic samples"),
    ("training", "Training curves"),
    ("evaluation", "Evaluation"),
    ("predictions", "Sample predictions"),
    ("segmentation", "Segmentation"),
    ("reproduction", "The papers' tables"),
    ("configuration", "Run configuration"),
)

PROTOCOL_LABELS = {
    "patient": "ours (patient split)",
    "official": "ours (official patient-disjoint folds)",
    "image": "ours (image split)",
    "unknown": "ours (split not stated)",
}
PROTOCOL_ORDER = {"patient": 0, "official": 1, "image": 2, "unknown": 3}
PUBLISHED_LABEL = "published (image-level split, as reported)"

PAPER_VGG = "Classification of breast cancer histopathological images based on CNN (VGG + focal loss)"
PAPER_CANCERNET = ("Anu Krishnan K R, N. Satyabalaji: CancerNet classifier for breast cancer classification "
                   "using deep neural networks and U-Net segmentation (IJNRD 7(6), 2022)")

#: The papers' numbers, as legible in their text. Values are the papers' own strings (percent or fraction).
PUBLISHED: dict[str, dict[str, Any]] = {
    "vgg_tab3": {
        "title": "Tab. 3: accuracy with different loss functions (VGG + focal loss paper)",
        "paper": PAPER_VGG,
        "keys": ("loss",),
        "metrics": ("accuracy", "patient_recognition_rate"),
        "percent": True,
        "rows": [({"loss": "focal"}, {"accuracy": "96.96"},
                  "mean recognition rate over the four magnifications (abstract)")],
        "note": "Only the focal-loss model's mean recognition rate (96.96%) is legible in the source text; the "
                "cross-entropy cells of Tab. 3 are not. The paper does not describe a patient-disjoint split.",
    },
    "vgg_fig4": {
        "title": "Fig. 4: accuracy under four training strategies (VGG + focal loss paper)",
        "paper": PAPER_VGG,
        "keys": ("strategy",),
        "metrics": ("accuracy", "patient_recognition_rate"),
        "percent": True,
        "rows": [],
        "note": "Fig. 4 is a chart; no numbers are legible in the source text, so only our runs are listed.",
    },
    "vgg_tab4": {
        "title": "Tab. 4: recognition accuracy per magnification (VGG + focal loss paper)",
        "paper": PAPER_VGG,
        "keys": ("model", "loss"),
        "pivot": "magnification",
        "metrics": ("accuracy",),
        "percent": True,
        "rows": [({"model": "vgg", "loss": "focal"},
                  {"40": "> 97", "100": "> 97", "mean": "96.96"},
                  "the paper's model; per-magnification cells other than '> 97%' at 40X/100X are not legible")],
        "note": "Published: mean 96.96% over 40X-400X and above 97% at 40X and 100X (the source text is partly "
                "garbled; the exact per-magnification values and the compared methods' rows are not legible).",
    },
    "cancernet_tab1": {
        "title": "Table 1: precision, recall and F1 per CNN with and without U-Net (CancerNet paper)",
        "paper": PAPER_CANCERNET,
        "keys": ("model", "segmentation"),
        "metrics": ("precision", "recall", "f1", "accuracy"),
        "percent": False,
        "rows": [
            ({"model": "vgg", "segmentation": "none"}, {"precision": "1.000"}, "text: VGG precision 1 (100%)"),
            ({"model": "vgg", "segmentation": "unet"}, {"precision": "1.000", "f1": "0.994"},
             "text: VGG + U-Net precision 1, best F1 0.994"),
            ({"model": "densenet", "segmentation": "none"}, {"recall": "1.000"}, "text: DenseNet recall 1 (100%)"),
            ({"model": "densenet", "segmentation": "unet"}, {"recall": "1.000"},
             "text: DenseNet + U-Net recall 1 (100%)"),
        ],
        "note": "Only the cells named in the paper's text are known (the table itself is an image). Its test set "
                "is 1,000 images (5,220 train / 2,689 validation), most likely split by image.",
    },
}

_TABLE_ALIASES = (
    ("cancernet_tab1", ("cancernet", "unet", "segmentation")),
    ("vgg_tab3", ("tab3", "table3", "loss")),
    ("vgg_fig4", ("fig4", "figure4", "strateg")),
    ("vgg_tab4", ("tab4", "table4", "magnif")),
)
_KEY_CANDIDATES = ("model", "loss", "strategy", "segmentation", "magnification")
_SEGMENTATION_COLUMNS = ("segmentation", "segmenter", "seg")

METRIC_LABELS = {
    "accuracy": "accuracy (image recognition rate)",
    "precision": "precision",
    "recall": "recall (sensitivity)",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "balanced_accuracy": "balanced accuracy",
    "patient_recognition_rate": "patient recognition rate",
    "patient_accuracy": "patient diagnosis accuracy",
}

CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg-soft:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
header, main, nav { max-width: 1120px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 24px; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 21px; border-bottom: 1px solid var(--line); padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 16px; margin-top: 22px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
pre { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px;
      overflow-x: auto; }
.meta { color: var(--muted); margin: 4px 0; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 13px; font-weight: 600;
         background: var(--bg-soft); border: 1px solid var(--line); }
.badge.synthetic { background: #fff8c5; border-color: #d4a72c; }
.badge.real { background: #dafbe1; border-color: #4ac26b; }
.badge.image { background: #ffebe9; border-color: #ff8182; }
.banner { margin: 14px 0; padding: 10px 14px; border-radius: 6px; background: #ffebe9;
          border: 1px solid #ff8182; font-weight: 600; }
.note { padding: 8px 12px; border-left: 4px solid var(--line); background: var(--bg-soft); color: var(--muted); }
.note.skipped { border-left-color: #d4a72c; background: #fff8c5; color: #633c01; }
.note.warn { border-left-color: #cf222e; background: #ffebe9; color: #82071e; }
nav#toc { margin-top: 12px; }
nav#toc ol { columns: 2; margin: 4px 0; }
nav#toc .skipped { color: var(--muted); font-size: 13px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); }
td.num, th.num { text-align: right; }
td.num { white-space: nowrap; font-variant-numeric: tabular-nums; }
tr.published td { background: #fbefff; }
tr.total td { font-weight: 600; }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; }
details { margin: 8px 0; }
summary { cursor: pointer; font-weight: 600; }
footer { max-width: 1120px; margin: 40px auto; padding: 0 24px; color: var(--muted); font-size: 13px; }
"""


# ------------------------------------------------------------------------------------- html helpers
class Raw(str):
    """Already-escaped HTML that table cells and paragraphs insert as is."""


def esc(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    return html.escape("" if value is None else str(value))


_NUMERIC = re.compile(r"^\s*(?:[<>≥≤~+-]\s*)?\d[\d,.]*(?:\s*±\s*[\d.]+)?%?\s*$|^(?:n/a|—)$")


def _is_numeric(value: Any) -> bool:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return True
    return isinstance(value, str) and not isinstance(value, Raw) and bool(_NUMERIC.match(value))


def table_html(headers: Sequence[Any], rows: Iterable[Sequence[Any]], row_classes: Sequence[str] | None = None) -> str:
    """An HTML table; numeric cells (numbers, ``mean ± std``, ``n/a``) are right-aligned, text left-aligned."""
    rows = [list(r) for r in rows]
    numeric_cols = [bool(rows) and all(_is_numeric(r[i]) for r in rows if i < len(r)) for i in range(len(headers))]

    def cls(i: int, value: Any = None, header: bool = False) -> str:
        num = numeric_cols[i] if header or i >= len(numeric_cols) else (numeric_cols[i] or _is_numeric(value))
        return ' class="num"' if num else ""

    head = "".join(f"<th{cls(i, header=True)}>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        klass = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        body.append(f"<tr{klass}>" + "".join(f"<td{cls(i, c)}>{esc(c)}</td>" for i, c in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def note(text: str, kind: str = "") -> str:
    return f'<p class="note {kind}">{text}</p>'


def skipped(what: str, how: str) -> str:
    return note(f"Skipped: no <code>{esc(what)}</code> input given. {how}", "skipped")


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary><pre>{esc(body)}</pre></details>"


def _pct(value: Any, digits: int = 2) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(float(value)):
        return "n/a"
    return f"{float(value) * 100:.{digits}f}"


def _mean_std_text(entry: Mapping[str, Any] | None, percent: bool = True) -> str:
    if not entry or not isinstance(entry.get("mean"), (int, float)):
        return "n/a"
    scale, digits = (100.0, 2) if percent else (1.0, 3)
    std = entry.get("std")
    std_txt = f" ± {std * scale:.{digits}f}" if isinstance(std, (int, float)) else ""
    return f"{entry['mean'] * scale:.{digits}f}{std_txt}"


# --------------------------------------------------------------------------------------- readers
def read_json(uri: str, what: str) -> Any:
    text = storage.read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} {uri} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def _records(obj: Any, uri: str) -> list[dict]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for key in ("trials", "results", "rows", "records", "data"):
            if isinstance(obj.get(key), list):
                return obj[key]
    raise DataError(f"{uri} holds no list of records (expected a list, or a 'trials'/'results' list)")


def read_table(uri: str) -> pd.DataFrame:
    """A results table from Parquet, CSV or JSON (a list of records, or under ``trials``/``results``)."""
    lower = uri.lower()
    if lower.endswith(".parquet") or storage.is_dir(uri):
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = [uri] if not storage.is_dir(uri) else storage.list_files(uri, [".parquet"])
        if not files:
            raise DataError(f"no *.parquet file under {uri}")
        frames = []
        for file in files:
            try:
                frames.append(pq.read_table(pa.BufferReader(storage.read_bytes(file))).to_pandas())
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{file} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None
        return pd.concat(frames, ignore_index=True)
    if lower.endswith(".csv"):
        try:
            return pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
        except (ValueError, pd.errors.ParserError) as exc:
            raise DataError(f"{uri} is not a readable CSV file: {str(exc).splitlines()[0]}") from None
    return pd.DataFrame.from_records(_records(read_json(uri, "grid"), uri))


def _frame_from_json(obj: Any) -> pd.DataFrame | None:
    """A class x magnification table from JSON: ``{"columns", "data"[, "index"]}``, records or dict of dicts."""
    df = None
    if isinstance(obj, dict) and "columns" in obj and "data" in obj:
        df = pd.DataFrame(obj["data"], columns=obj["columns"], index=obj.get("index"))
    elif isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        df = pd.DataFrame.from_records(obj)
        for col in df.columns:
            if str(col).lower() in ("magnification", "mag"):
                df = df.set_index(col)
                break
    elif isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        df = pd.DataFrame.from_dict(obj, orient="index")
    if df is None or df.empty:
        return None
    df.columns = [str(c).capitalize() if str(c).lower() in ("benign", "malignant", "total") else str(c)
                  for c in df.columns]
    df.index = [f"{i}X" if str(i).isdigit() else str(i).capitalize() if str(i).lower() == "total" else str(i)
                for i in df.index]
    return df


def _history_from_run(run_dir: str) -> tuple[list[dict], str, dict | None]:
    """Per-epoch metrics of a run directory; returns ``(history, source, result_json)``."""
    result = None
    result_uri = storage.join(run_dir, "result.json")
    if storage.exists(result_uri):
        result = read_json(result_uri, "training result")
    history_uri = storage.join(run_dir, "history.json")
    if storage.exists(history_uri):
        data = read_json(history_uri, "training history")
        history = data.get("history", []) if isinstance(data, dict) else data
        return [h for h in history if isinstance(h, dict)], "history.json", result
    if result is None:
        raise DataError(f"training run {run_dir} has neither history.json nor result.json")
    latest = result.get("latest_checkpoint")
    if latest and storage.exists(latest):
        from breakhis_ray.checkpoint import load_train_state

        state = load_train_state(latest)
        if state and state.get("history"):
            return list(state["history"]), "latest checkpoint train_state.pt", result
    kept = [m for m in result.get("kept_checkpoints") or [] if isinstance(m, dict)]
    return sorted(kept, key=lambda m: m.get("epoch", 0)), "result.json kept checkpoints (partial)", result


# ---------------------------------------------------------------------------------------- builder
@dataclass
class _Figures:
    out: str
    embed: bool
    written: list[str] = field(default_factory=list)

    def add(self, name: str, png: bytes, caption: str, alt: str | None = None) -> str:
        index = len(self.written) + 1
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "figure"
        filename = f"{index:02d}-{slug}.png"
        storage.write_bytes(storage.join(self.out, FIGURES_DIR, filename), png)
        self.written.append(filename)
        src = ("data:image/png;base64," + base64.b64encode(png).decode("ascii")) if self.embed \
            else f"{FIGURES_DIR}/{filename}"
        return (f'<figure><img src="{src}" alt="{esc(alt or caption)}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>")


@dataclass
class _Context:
    cfg: ReportConfig
    figures: _Figures
    manifest: pd.DataFrame | None = None
    prepare: dict | None = None
    metrics: dict | None = None
    predictions: pd.DataFrame | None = None
    grid: pd.DataFrame | None = None
    protocol: str | None = None
    run_configs: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------- sections
def _section_model_card(ctx: _Context) -> str:
    cfg = ctx.cfg
    if ctx.manifest is not None:
        df = ctx.manifest
        per_label = df.groupby("label")["patient_id"].nunique()
        data_line = (f"{len(df):,} images of {df['patient_id'].nunique()} patient folders "
                     f"({int(per_label.get('benign', 0))} benign, {int(per_label.get('malignant', 0))} malignant) "
                     f"at 40X/100X/200X/400X, labelled benign or malignant with one of eight subtypes.")
    else:
        data_line = "not given to this report (set manifest=PATH)."
    source = {"synthetic": "the procedurally generated synthetic BreakHis (same tree, names and per-patient counts "
                           "as BreakHis, with rendered H&amp;E-like pixels)",
              "real": "the BreakHis dataset (Spanhol et al. 2016): 7,909 images of 82 patients",
              "unspecified": "not stated (set <code>data_source=synthetic|real</code>)"}[cfg.data_source]
    return f"""
<p><strong>What it is.</strong> Binary classifiers (benign vs malignant) for breast-tumour histopathology
tiles, trained with Ray Train on BreakHis-style data, optionally with nuclear segmentation (thresholding,
watershed or U-Net), and evaluated with the BreakHis conventions (image and patient recognition rates per
magnification).</p>
<p><strong>Intended use.</strong> Research: reproducing and benchmarking published BreakHis results, comparing
split protocols, losses, training strategies and segmentation methods, and testing distributed training and
batch inference pipelines.</p>
<p class="banner">Not for diagnosis or any clinical use. These models have not been validated on clinical
data; no output of this project may inform a decision about a patient.</p>
<p><strong>Training data.</strong> Source: {source}. This report's manifest: {esc(data_line)}</p>
<p><strong>Known limitations.</strong></p>
<ul>
<li>Synthetic data: results on the synthetic BreakHis measure the pipeline, not diagnostic skill; its class
signal is designed to be learnable.</li>
<li>Patient-level variation: tiles of one patient share stain, grade and tissue; BreakHis has only 82 patients
(24 benign, 58 malignant), so a test fold holds a few dozen patients and scores vary strongly between folds.</li>
<li>BreakHis size and composition: 7,909 tiles from one institution, one scanner and staining protocol;
benign tissue is the minority class (about 31%); slide 13412 appears under two subtypes.</li>
<li>Tiles were chosen by pathologists as representative; whole-slide performance is not measured.</li>
</ul>
<p><strong>Metric caveats.</strong></p>
<ul>
<li>Image-level random splits put tiles of one patient in both training and test data and inflate accuracy
(published image-level results 97-99.5% against 84-92% patient-level); patient-disjoint splits are our default
and both are labelled wherever they appear.</li>
<li>Malignant is the positive class: precision, recall and F1 refer to malignant tiles; the decision threshold
is {cfg.threshold:g} on the malignant probability.</li>
<li>Image recognition rate counts tiles; patient recognition rate averages per-patient scores (each patient once);
patient diagnosis accuracy thresholds each patient's mean probability.</li>
<li>Predictions in error (unreadable images) are counted and excluded from metric denominators, never dropped
silently; means ± std are over folds.</li>
</ul>"""


def _section_dataset(ctx: _Context) -> str:
    if ctx.manifest is None:
        return skipped("manifest", "Set <code>manifest=PATH</code> to the Parquet written by "
                       "<code>breakhis-ray manifest</code>.")
    from breakhis_ray.data.manifest import class_magnification_table, patient_summary

    df = ctx.manifest
    table = class_magnification_table(df)
    rows = [[idx, *[int(v) for v in table.loc[idx]]] for idx in table.index]
    parts = [f"<p>{esc(patient_summary(df))}.</p>",
             "<h3>Tab. 1: images per magnification and class</h3>",
             table_html(["Magnification", *table.columns], rows,
                        row_classes=["total" if r[0] == "Total" else "" for r in rows])]
    reference = _reference_table()
    share = table.loc["Total", "Total"] / max(int(reference.loc["Total", "Total"]), 1)
    parts.append(note(f"The full BreakHis holds {int(reference.loc['Total', 'Total']):,} images "
                      f"({int(reference.loc['Total', 'Benign']):,} benign, "
                      f"{int(reference.loc['Total', 'Malignant']):,} malignant); this manifest has "
                      f"{share:.1%} of that."))
    sub = (df.groupby(["label", "subtype"])
             .agg(patients=("patient_id", "nunique"), images=("path", "size")).reset_index())
    per_mag = df.pivot_table(index="subtype", columns="magnification", values="path", aggfunc="size", fill_value=0)
    sub_rows = []
    for _, r in sub.sort_values(["label", "subtype"]).iterrows():
        mags = [int(per_mag.loc[r["subtype"]].get(m, 0)) if r["subtype"] in per_mag.index else 0
                for m in MAGNIFICATIONS]
        sub_rows.append([r["label"], r["subtype"], int(r["patients"]), int(r["images"]), *mags])
    parts += ["<h3>Subtypes: patients and images</h3>",
              table_html(["class", "subtype", "patients", "images", *[f"{m}X" for m in MAGNIFICATIONS]],
                         sub_rows)]
    parts.append(ctx.figures.add("class-magnification", plots.class_magnification_bars({"manifest": table}),
                                 "Images per magnification and class (manifest)."))
    return "\n".join(parts)


def _reference_table() -> pd.DataFrame:
    """Tab. 1 of the full BreakHis, from the per-patient counts shipped with the package."""
    from importlib import resources

    text = resources.files("breakhis_ray.data").joinpath("resources/patients.tsv").read_text("utf-8")
    counts = pd.read_csv(io.StringIO(text), sep="\t")
    table = counts.groupby("class")[[f"{m}X" for m in MAGNIFICATIONS]].sum().T
    table.columns = [str(c).capitalize() for c in table.columns]
    table["Total"] = table.sum(axis=1)
    table.loc["Total"] = table.sum(axis=0)
    return table


PREPARE_TABLES = {
    "tab1_all": "Tab. 1: all images of the prepared fold, before enhancement",
    "tab1_train": "Tab. 1: training split before enhancement",
    "tab2_train": "Tab. 2: training split after enhancement",
    "tab2_all": "Tab. 2: all splits after enhancement",
}


def _section_enhancement(ctx: _Context) -> str:
    cfg = ctx.cfg
    if not cfg.prepare_summary:
        return skipped("prepare_summary", "Set <code>prepare_summary=PATH</code> to the <code>prepare.json</code> "
                       "written by <code>breakhis-ray prepare</code>.")
    data = ctx.prepare
    counts = [(k, v) for k, v in data.items()
              if (isinstance(v, (int, float, str, bool)) or v is None) and k not in ("root", "out")]
    for group in ("splits", "rejects_by_reason", "converted"):
        if isinstance(data.get(group), dict):
            counts += [(f"{group}: {k}", v) for k, v in data[group].items()]
    if isinstance(data.get("shards"), list):
        counts.append(("shard files", len(data["shards"])))
    parts = [f"<p>Prepared from <code>{esc(data.get('root', 'n/a'))}</code> into "
             f"<code>{esc(data.get('out', 'n/a'))}</code>.</p>"]
    if counts:
        parts += ["<h3>Counts</h3>", table_html(["count", "value"], [[k, v] for k, v in counts])]
    for text in data.get("enhance_notes") or []:
        parts.append(note(esc(text)))
    tables = data.get("tables") if isinstance(data.get("tables"), dict) else {}
    frames = {}
    for key, value in tables.items():
        frame = _frame_from_json(value)
        if frame is None:
            continue
        title = PREPARE_TABLES.get(key, key)
        frames[key] = (title, frame)
        rows = [[idx, *[_cell(v) for v in frame.loc[idx]]] for idx in frame.index]
        parts += [f"<h3>{esc(title)}</h3>",
                  table_html(["Magnification", *frame.columns], rows,
                             row_classes=["total" if r[0] == "Total" else "" for r in rows])]
    if not frames:
        parts.append(note(f"No class x magnification tables (<code>tables</code>) in "
                          f"{esc(cfg.prepare_summary)}."))
    pair = [k for k in ("tab1_train", "tab2_train") if k in frames] or list(frames)[:2]
    plottable = {frames[k][0]: frames[k][1] for k in pair if {"Benign", "Malignant"} <= set(frames[k][1].columns)}
    if plottable:
        parts.append(ctx.figures.add("enhancement", plots.class_magnification_bars(plottable),
                                     "Training images per class and magnification before and after the offline "
                                     "class-balancing augmentation (VGG paper Tab. 1 / Tab. 2)."))
    return "\n".join(parts)


def _cell(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _section_samples(ctx: _Context) -> str:
    if not ctx.cfg.samples_grid:
        return skipped("samples_grid", "Set <code>samples_grid=PATH</code> to the PNG written by "
                       "<code>breakhis-ray synth</code>.")
    png = storage.read_bytes(ctx.cfg.samples_grid)
    return ctx.figures.add("samples-grid", png, f"Synthetic samples ({ctx.cfg.samples_grid}).")


def _section_training(ctx: _Context) -> str:
    cfg = ctx.cfg
    if not cfg.train_runs:
        return skipped("train_runs", "Set <code>train_runs=[DIR, ...]</code> to training run directories "
                       "(each with history.json or result.json).")
    runs: dict[str, list[dict]] = {}
    rows = []
    for run_dir in cfg.train_runs:
        history, source, result = _history_from_run(run_dir)
        parts_ = str(run_dir).rstrip("/").split("/")
        name = parts_[-1] or str(run_dir)
        if any(posixpath.basename(str(d).rstrip("/")) == name for d in cfg.train_runs if d != run_dir):
            name = "/".join(parts_[-2:])  # same run name under two storage paths
        while name in runs:
            name += "'"
        runs[name] = history
        last = history[-1] if history else {}
        best = max((h.get("val_accuracy") for h in history if isinstance(h.get("val_accuracy"), (int, float))),
                   default=None)
        speeds = [h["train_images_per_s"] for h in history if isinstance(h.get("train_images_per_s"), (int, float))]
        rows.append([name, len(history), _pct(last.get("train_accuracy")), _pct(last.get("val_accuracy")),
                     _pct(best), _pct(last.get("val_balanced_accuracy")),
                     f"{last['val_loss']:.4f}" if isinstance(last.get("val_loss"), (int, float)) else "n/a",
                     f"{np.mean(speeds):.1f}" if speeds else "n/a", source,
                     (result or {}).get("best_checkpoint") or "n/a"])
        config_uri = storage.join(run_dir, "config.yaml")
        if storage.exists(config_uri):
            ctx.run_configs.append((f"training run {name}: config.yaml", storage.read_text(config_uri)))
    parts = [table_html(["run", "epochs", "final train acc %", "final val acc %", "best val acc %",
                         "final val bal. acc %", "final val loss", "train img/s", "history from",
                         "best checkpoint"], rows),
             ctx.figures.add("training-curves", plots.training_curves(runs),
                             "Accuracy and loss per epoch (solid: training, dashed: validation), as in "
                             "CancerNet Figs. 3-4.")]
    return "\n".join(parts)


def _metric_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    keys = ("accuracy", "precision", "recall", "f1", "roc_auc", "balanced_accuracy",
            "patient_recognition_rate", "patient_accuracy")
    summary = metrics.get("mean_std")
    scopes = [("overall", metrics.get("overall") or {}, (summary or {}).get("overall"))]
    for mag, values in (metrics.get("per_magnification") or {}).items():
        scopes.append((f"{mag}X", values, ((summary or {}).get("per_magnification") or {}).get(mag)))
    headers = ["scope", "images", "patients", "errors", *[f"{METRIC_LABELS[k]} %" for k in keys]]
    rows = []
    for name, values, stats in scopes:
        cells = [_mean_std_text(stats.get(k)) if stats else _pct(values.get(k)) for k in keys]
        rows.append([name, values.get("n_images", "n/a"), values.get("n_patients", "n/a"),
                     values.get("n_errors", 0), *cells])
    return headers, rows


def _labelled_predictions(ctx: _Context) -> pd.DataFrame | None:
    """Predictions with ``label_id`` (manifest labels when a manifest is given, else the file's ``label``)."""
    pred = ctx.predictions
    if pred is None:
        return None
    if ctx.manifest is not None:
        from breakhis_ray.evaluate import join_predictions

        joined, _ = join_predictions(pred, ctx.manifest)
        return joined
    out = pred.copy()
    out["ok"] = (out["status"] == "ok") & out["prob_malignant"].notna()
    out["label_id"] = out["label"].map({"benign": 0, "malignant": 1}) if "label" in out.columns else np.nan
    return out


def _section_evaluation(ctx: _Context) -> str:
    metrics = ctx.metrics
    parts = []
    if metrics is None:
        parts.append(skipped("metrics", "Set <code>metrics=PATH</code> to the JSON written by "
                             "<code>breakhis-ray evaluate</code>."))
    else:
        protocol = metrics.get("protocol")
        kind = "warn" if protocol == "image" else ""
        parts.append(note(f"<strong>Evaluation set:</strong> {esc(metrics.get('evaluation_set', 'n/a'))}. "
                          f"<strong>Split protocol:</strong> {esc(protocol or 'not stated')} "
                          f"({esc(metrics.get('protocol_note', ''))}).", kind))
        n_folds = metrics.get("n_folds", 1)
        if metrics.get("mean_std"):
            parts.append(note(f"Values are mean ± std over {n_folds} folds; images, patients and errors are "
                              "totals over folds."))
        n_err = metrics.get("n_errors", 0)
        kinds = ", ".join(f"{k}: {v}" for k, v in (metrics.get("errors_by_kind") or {}).items())
        parts.append(f"<p>{n_err} prediction(s) in error, excluded from the metric denominators "
                     f"(policy <code>{esc(metrics.get('error_policy', 'n/a'))}</code>)"
                     f"{esc(' — ' + kinds) if kinds else ''}.</p>")
        counts = metrics.get("counts")
        if isinstance(counts, dict):
            parts.append(table_html(["count", "value"], [[k, v] for k, v in counts.items()]))
        headers, rows = _metric_rows(metrics)
        parts += ["<h3>Overall and per magnification (malignant = positive class)</h3>",
                  table_html(headers, rows)]
        matrices = {"overall": (metrics.get("overall") or {}).get("confusion_matrix")}
        for mag, values in (metrics.get("per_magnification") or {}).items():
            matrices[f"{mag}X"] = values.get("confusion_matrix")
        parts.append(ctx.figures.add("confusion-matrices", plots.confusion_matrices(matrices),
                                     "Confusion matrices (rows: true class, columns: predicted), overall and "
                                     "per magnification."))
        per_mag = {f"{m}X": v for m, v in (metrics.get("per_magnification") or {}).items()}
        errors = None
        summary = metrics.get("mean_std")
        if summary:
            errors = {f"{m}X": {k: (e or {}).get("std") for k, e in s.items()}
                      for m, s in (summary.get("per_magnification") or {}).items()}
        if per_mag:
            parts.append(ctx.figures.add(
                "per-magnification", plots.metric_bars(per_mag, ["accuracy", "patient_recognition_rate",
                                                                 "patient_accuracy", "f1"],
                                                       errors=errors, title="Per magnification"),
                "Image recognition rate (accuracy), patient recognition rate, patient diagnosis accuracy and F1 "
                "per magnification" + (" (error bars: std over folds)." if errors else ".")))
        subtypes = metrics.get("per_subtype") or {}
        if subtypes:
            rows = [[name, v.get("label", ""), v.get("n_images", "n/a"), v.get("n_patients", "n/a"),
                     _pct(v.get("recall"))] for name, v in subtypes.items()]
            parts += ["<h3>Recall per subtype</h3>",
                      "<p>Share of each subtype's images predicted as its own class (benign subtypes: "
                      "specificity; malignant subtypes: sensitivity).</p>",
                      table_html(["subtype", "class", "images", "patients", "recall %"], rows)]
    labelled = _labelled_predictions(ctx)
    if labelled is None:
        parts.append(skipped("predictions", "The ROC curve is computed from <code>predictions=PATH</code>."))
    else:
        ok = labelled[labelled["ok"] & labelled["label_id"].notna()]
        curves = {}
        from breakhis_ray.metrics import roc_auc

        groups = [("all magnifications", ok)]
        if "magnification" in ok.columns:
            groups += [(f"{int(m)}X", ok[ok["magnification"] == m])
                       for m in sorted(ok["magnification"].dropna().unique())]
        for name, rows_ in groups:
            y, s = rows_["label_id"].astype(int).to_numpy(), rows_["prob_malignant"].to_numpy(dtype=float)
            fpr, tpr, _ = plots.roc_curve(y, s)
            curves[name] = (fpr, tpr, roc_auc(y, s) if len(y) else None)
        undefined = [name for name, (fpr, _, _) in curves.items() if len(fpr) == 0]
        parts.append(ctx.figures.add("roc", plots.roc_plot(curves),
                                     f"ROC curves from {len(ok):,} predictions with a known label, overall and per "
                                     "magnification" + (f" (undefined, one class only: {', '.join(undefined)})"
                                                        if undefined else "") + "."))
    return "\n".join(parts)


def _read_tile(path: str, size: int = 320) -> np.ndarray | None:
    """A thumbnail of the image at ``path``; ``None`` when it cannot be read (shown as such in the grid)."""
    from PIL import Image, UnidentifiedImageError

    from breakhis_ray.errors import StorageError

    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            return np.asarray(img)
    except (StorageError, UnidentifiedImageError, OSError, ValueError):
        return None


def _pick_tiles(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` rows, balanced over the true class when known, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    if "label_id" in rows.columns and rows["label_id"].notna().any():
        picks = []
        groups = [g for _, g in rows.groupby("label_id")]
        per = -(-n // max(1, len(groups)))
        for g in groups:
            picks.append(g.iloc[np.sort(rng.permutation(len(g))[:per])])
        picked = pd.concat(picks)
        return picked.sort_values("path").head(n)
    return rows.iloc[np.sort(rng.permutation(len(rows))[:n])]


def _section_predictions(ctx: _Context) -> str:
    cfg = ctx.cfg
    labelled = _labelled_predictions(ctx)
    if labelled is None:
        return skipped("predictions", "Set <code>predictions=PATH</code> to the prediction Parquet written by "
                       "<code>breakhis-ray infer</code> (file or directory).")
    total, n_err = len(ctx.predictions), int((ctx.predictions["status"] != "ok").sum())
    parts = [f"<p>{total:,} prediction rows, {n_err} in error.</p>"]
    if cfg.sample_tiles == 0:
        return "\n".join(parts + [note("sample_tiles=0: no tiles shown.")])
    candidates = labelled[labelled["ok"] & ~labelled["path"].astype(str).str.contains("#", regex=False)]
    if candidates.empty:
        return "\n".join(parts + [note("No successful prediction to show.")])
    picked = _pick_tiles(candidates, cfg.sample_tiles, cfg.seed)
    tiles, rows = [], []
    for _, r in picked.iterrows():
        prob = float(r["prob_malignant"])
        pred = "malignant" if prob >= cfg.threshold else "benign"
        true = None if pd.isna(r.get("label_id")) else ("malignant" if int(r["label_id"]) == 1 else "benign")
        correct = None if true is None else true == pred
        conf = prob if pred == "malignant" else 1.0 - prob
        mag = f" {int(r['magnification'])}X" if "magnification" in r and pd.notna(r.get("magnification")) else ""
        caption = f"true: {true or '?'} | pred: {pred}\np({pred}) = {conf:.1%}{mag}"
        tiles.append((_read_tile(str(r["path"])), caption, correct))
        rows.append([posixpath.basename(str(r["path"])), true or "?", pred, f"{prob:.4f}",
                     "yes" if correct else ("no" if correct is False else "?")])
    parts.append(ctx.figures.add("prediction-tiles", plots.prediction_tiles(tiles),
                                 "Predicted tiles with the probability of the predicted class (green: correct, "
                                 "red: wrong), as in CancerNet Figs. 5-6."))
    parts.append(table_html(["file", "true", "predicted", "P(malignant)", "correct"], rows))
    return "\n".join(parts)


def _seg_rows(data: Any) -> tuple[list[str], list[list[Any]]]:
    """Method rows from a segmentation JSON: ``{"methods": {name: {...}}}``, ``{name: {...}}`` or records."""
    if isinstance(data, dict) and isinstance(data.get("methods"), dict):
        items = list(data["methods"].items())
    elif isinstance(data, dict) and isinstance(data.get("methods"), list):
        items = [(m.get("method", f"#{i}"), m) for i, m in enumerate(data["methods"]) if isinstance(m, dict)]
    elif isinstance(data, dict) and isinstance(data.get("results"), list):
        items = [(m.get("method", f"#{i}"), m) for i, m in enumerate(data["results"]) if isinstance(m, dict)]
    elif isinstance(data, list):
        items = [(m.get("method", f"#{i}"), m) for i, m in enumerate(data) if isinstance(m, dict)]
    elif isinstance(data, dict):
        items = [(k, v) for k, v in data.items()
                 if isinstance(v, dict) and any(isinstance(x, (int, float, dict)) for x in v.values())
                 and k not in ("config", "overlays")]
    else:
        items = []
    columns: list[str] = []
    flat_rows = []
    for name, values in items:
        flat: dict[str, Any] = {}
        for key, value in values.items():
            if key == "method" or (key.endswith("_std") and key[:-4] in values):
                continue
            std = values.get(f"{key}_std")
            if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
                flat[key] = _mean_std_text(value, percent=False)
            elif isinstance(value, float) and isinstance(std, (int, float)):
                flat[key] = _mean_std_text({"mean": value, "std": std}, percent=False)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[key] = f"{value:.3f}" if isinstance(value, float) else value
        columns.extend(k for k in flat if k not in columns)
        flat_rows.append((name, flat))
    return ["method", *columns], [[name, *[f.get(c, "n/a") for c in columns]] for name, f in flat_rows]


def _overlay_paths(data: Any, base: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def add(title: str, value: Any) -> None:
        if isinstance(value, str):
            path = value if ("://" in value or value.startswith("/")) else storage.join(base, value)
            found.append((title, path))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                add(f"{title} {i + 1}" if len(value) > 1 else title, v)
        elif isinstance(value, dict):
            for k, v in value.items():
                add(str(k), v)

    if isinstance(data, dict):
        for key in ("overlays", "overlay", "overlay_png", "overlay_pngs", "figures"):
            if key in data:
                add("overlay", data[key])
    return found


def _section_segmentation(ctx: _Context) -> str:
    cfg = ctx.cfg
    if not cfg.segmentation:
        return skipped("segmentation", "Set <code>segmentation=PATH</code> to the JSON written by "
                       "<code>breakhis-ray segment-eval</code>.")
    data = read_json(cfg.segmentation, "segmentation evaluation")
    headers, rows = _seg_rows(data)
    parts = ["<p>Nuclear segmentation against ground-truth masks: thresholding (Otsu on hematoxylin), "
             "watershed and U-Net, as compared in the CancerNet paper.</p>"]
    if isinstance(data, dict) and any(k in data for k in ("images", "patients", "metric_notes")):
        parts.append(note(f"{esc(data.get('images', 'n/a'))} images of {esc(data.get('patients', 'n/a'))} "
                          f"patients. {esc(data.get('metric_notes', ''))}"))
    parts.append(table_html(headers, rows) if rows else note("No per-method metrics found in the JSON."))
    for title, path in _overlay_paths(data, storage.parent(cfg.segmentation)):
        parts.append(ctx.figures.add(f"overlay-{title}", storage.read_bytes(path),
                                     f"Segmentation overlay: {title} ({posixpath.basename(path)})."))
    return "\n".join(parts)


# --------------------------------------------------------------------------------- reproduction
def canonical_table(name: Any) -> str:
    """Map a grid ``table`` value to a key of :data:`PUBLISHED` (unknown names are returned as they are)."""
    text = str(name)
    key = re.sub(r"[^a-z0-9]", "", text.lower())
    for canonical, needles in _TABLE_ALIASES:
        if key == canonical.replace("_", "") or any(n in key for n in needles):
            return canonical
    return text


def _norm(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none" if column == "segmentation" else "all" if column == "magnification" else "n/a"
    if column == "segmentation":
        if isinstance(value, (bool, np.bool_)):
            return "unet" if value else "none"
        text = re.sub(r"[^a-z0-9]", "", str(value).lower())
        return text if text not in ("", "false", "no", "null") else "none"
    if column == "model":
        text = str(value).lower()
        for family in ("vgg", "resnet", "densenet"):
            if text.startswith(family):
                return family
        return text
    if column == "magnification":
        text = str(value).upper().removesuffix("X")
        return str(int(float(text))) if text.replace(".", "", 1).isdigit() else str(value).lower()
    return str(value).lower()


def _prepare_grid(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "segmentation" not in df.columns:
        for col in _SEGMENTATION_COLUMNS[1:]:
            if col in df.columns:
                df["segmentation"] = df[col]
                break
    if "table" not in df.columns:
        df["table"] = "results"
    if "protocol" not in df.columns:
        df["protocol"] = "unknown"
    df["protocol"] = df["protocol"].fillna("unknown").astype(str)
    df["_table"] = df["table"].map(canonical_table)
    return df


def _grid_table(name: str, df: pd.DataFrame) -> str:
    spec = PUBLISHED.get(name, {})
    percent = spec.get("percent", True)
    pivot = spec.get("pivot")
    if pivot and pivot not in df.columns:
        pivot = None
    keys = [k for k in spec.get("keys", ()) if k in df.columns]
    keys += [k for k in _KEY_CANDIDATES if k in df.columns and k not in keys and k != pivot
             and df[k].astype(str).nunique(dropna=False) > 1]
    if pivot:
        metric = next((m for m in spec.get("metrics", ("accuracy",)) if m in df.columns), None)
        metrics = [metric] if metric else []
    else:
        wanted = spec.get("metrics") or ("accuracy", "precision", "recall", "f1", "patient_recognition_rate")
        metrics = [m for m in wanted if m in df.columns]
    if not metrics:
        return note(f"{esc(name)}: no metric column ({', '.join(spec.get('metrics', ('accuracy',)))}) in the grid.")

    norm = df.copy()
    for k in set(keys) | ({pivot} if pivot else set()):
        norm[f"_n_{k}"] = [_norm(k, v) for v in df[k]]
    group_cols = [f"_n_{k}" for k in keys]
    if pivot:
        columns = [str(m) for m in MAGNIFICATIONS]
        extra = sorted(set(norm[f"_n_{pivot}"]) - set(columns))
        columns += extra + ["mean"]
        headers = [*keys, "source", *[f"{c}X" if c.isdigit() else c for c in columns], "folds"]
    else:
        columns = metrics
        headers = [*keys, "source", *[METRIC_LABELS.get(m, m) + (" %" if percent else "") for m in metrics],
                   "folds"]

    rows: list[list[Any]] = []
    classes: list[str] = []
    shown: set[int] = set()
    published_rows = spec.get("rows", [])

    def published_row(i: int, key_values: Mapping[str, str], values: Mapping[str, str], remark: str) -> None:
        shown.add(i)
        label = Raw(f"{esc(PUBLISHED_LABEL)}<br><small>{esc(remark)}</small>")
        rows.append([key_values.get(k, "—") for k in keys] + [label]
                    + [values.get(c, "—") for c in columns] + ["—"])
        classes.append("published")

    key_groups = norm.groupby(group_cols, dropna=False, sort=True) if group_cols else [((), norm)]
    for key_tuple, group in key_groups:
        key_tuple = key_tuple if isinstance(key_tuple, tuple) else (key_tuple,)
        key_map = dict(zip(keys, key_tuple))
        display = [", ".join(sorted({str(v) for v in group[k]})) for k in keys]
        for protocol, sub in sorted(group.groupby("protocol"), key=lambda p: PROTOCOL_ORDER.get(p[0], 9)):
            label = PROTOCOL_LABELS.get(protocol, f"ours ({protocol} split)")
            if pivot:
                per = {}
                for value, cell in sub.groupby(f"_n_{pivot}"):
                    per[value] = _stats(cell[metrics[0]])
                mags = [per[str(m)]["mean"] for m in MAGNIFICATIONS if str(m) in per and per[str(m)]]
                cells = [_mean_std_text(per.get(c), percent) for c in columns[:-1]]
                mean = {"mean": float(np.mean(mags)), "std": None} if len(mags) == len(MAGNIFICATIONS) else None
                cells.append(_mean_std_text(mean, percent))
                n = int(sub.groupby(f"_n_{pivot}").size().max())
            else:
                cells = [_mean_std_text(_stats(sub[m]), percent) for m in metrics]
                n = len(sub)
            rows.append([*display, label, *cells, n])
            classes.append("")
        for i, (pkey, pvalues, remark) in enumerate(published_rows):
            matches = all(key_map.get(k, _norm(k, v)) == _norm(k, v) for k, v in pkey.items() if k in keys)
            if i not in shown and matches and any(k in keys for k in pkey):
                published_row(i, {k: pkey.get(k, "—") for k in keys}, pvalues, remark)
    for i, (pkey, pvalues, remark) in enumerate(published_rows):
        if i not in shown:
            published_row(i, {k: pkey.get(k, "—") for k in keys}, pvalues, remark)
    return table_html(headers, rows, row_classes=classes)


def _stats(values: pd.Series) -> dict[str, Any] | None:
    nums = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if not nums.size:
        return None
    return {"mean": float(nums.mean()), "std": float(nums.std()) if nums.size > 1 else None, "n": int(nums.size)}


def _published_only(name: str) -> str:
    spec = PUBLISHED[name]
    cols = [c for c in ("40", "100", "200", "400", "mean")] if spec.get("pivot") else list(spec["metrics"])
    keys = list(spec["keys"])
    rows = [[pkey.get(k, "—") for k in keys] + [remark] + [values.get(c, "—") for c in cols]
            for pkey, values, remark in spec["rows"]]
    if not rows:
        return note("No published numbers are legible for this figure.")
    headers = [*keys, "source", *[f"{c}X" if c.isdigit() else METRIC_LABELS.get(c, c) for c in cols]]
    return table_html(headers, rows, row_classes=["published"] * len(rows))


def _section_reproduction(ctx: _Context) -> str:
    parts = [note("Published numbers are the papers' own, as legible in their text; both papers most likely split "
                  "BreakHis by image (tiles of one patient in training and test), which inflates accuracy. Our rows "
                  "name their split: <em>patient</em> (patient-disjoint, the default) or <em>image</em> "
                  "(the papers' protocol, for comparison).", "warn")]
    if ctx.grid is None:
        parts.append(skipped("grid", "Set <code>grid=PATH</code> to the experiment grid results "
                             "(<code>breakhis-ray experiments</code>); the published numbers are listed alone."))
        for name, spec in PUBLISHED.items():
            parts += [f"<h3>{esc(spec['title'])}</h3>", _published_only(name), note(esc(spec["note"]))]
        return "\n".join(parts)
    grid = _prepare_grid(ctx.grid)
    names = list(dict.fromkeys([n for n in PUBLISHED if n in set(grid["_table"])]
                               + [n for n in grid["_table"].unique() if n not in PUBLISHED]))
    for name in names:
        spec = PUBLISHED.get(name)
        title = spec["title"] if spec else f"Grid table {name}"
        parts += [f"<h3>{esc(title)}</h3>", _grid_table(name, grid[grid["_table"] == name])]
        if spec:
            parts.append(note(esc(spec["note"]) + f"<br>Source: {esc(spec['paper'])}."))
    for name, spec in PUBLISHED.items():
        if name not in names:
            parts += [f"<h3>{esc(spec['title'])}</h3>", note("Not in the grid: published numbers only."),
                      _published_only(name)]
    return "\n".join(parts)


def _section_configuration(ctx: _Context) -> str:
    parts = [note("The resolved config of this report is in the header and in <code>config.yaml</code> beside "
                  "<code>report.html</code>.")]
    if ctx.metrics is not None and ctx.cfg.metrics:
        beside = f"{ctx.cfg.metrics}.config.yaml"
        if storage.exists(beside):
            ctx.run_configs.insert(0, ("evaluate: " + posixpath.basename(beside), storage.read_text(beside)))
    for uri in ctx.cfg.configs:
        ctx.run_configs.append((uri, storage.read_text(uri)))
    for title, text in ctx.run_configs:
        parts.append(details(title, text))
    if len(parts) == 1:
        parts.append(note("No stage config found: pass <code>configs=[FILE, ...]</code> to include the YAML of "
                          "other stages."))
    return "\n".join(parts)


SECTION_BUILDERS: dict[str, Callable[[_Context], str]] = {
    "model-card": _section_model_card,
    "dataset": _section_dataset,
    "enhancement": _section_enhancement,
    "samples": _section_samples,
    "training": _section_training,
    "evaluation": _section_evaluation,
    "predictions": _section_predictions,
    "segmentation": _section_segmentation,
    "reproduction": _section_reproduction,
    "configuration": _section_configuration,
}


#: Whether a section's input was given (sections without one are still rendered, with a note).
SECTION_INPUTS: dict[str, Callable[[ReportConfig], bool]] = {
    "model-card": lambda cfg: True,
    "dataset": lambda cfg: bool(cfg.manifest),
    "enhancement": lambda cfg: bool(cfg.prepare_summary),
    "samples": lambda cfg: bool(cfg.samples_grid),
    "training": lambda cfg: bool(cfg.train_runs),
    "evaluation": lambda cfg: bool(cfg.metrics or cfg.predictions),
    "predictions": lambda cfg: bool(cfg.predictions),
    "segmentation": lambda cfg: bool(cfg.segmentation),
    "reproduction": lambda cfg: bool(cfg.grid),
    "configuration": lambda cfg: True,
}


# ---------------------------------------------------------------------------------------- driver
def _header(ctx: _Context) -> str:
    cfg = ctx.cfg
    protocol = ctx.protocol or "not stated"
    source_text = {"synthetic": "synthetic BreakHis (procedurally generated images)",
                   "real": "BreakHis (real histopathology images)",
                   "unspecified": "not stated"}[cfg.data_source]
    inputs = [(k, getattr(cfg, k)) for k in ("manifest", "prepare_summary", "metrics", "predictions",
                                              "segmentation", "grid", "samples_grid")]
    inputs.append(("train_runs", ", ".join(cfg.train_runs) or None))
    given = ", ".join(f"{k}={v}" for k, v in inputs if v) or "none"
    warn = ""
    if ctx.protocol == "image":
        warn = note("Image-level split: the same patients appear in training and test data; accuracy is "
                    "optimistic and not comparable with patient-level results.", "warn")
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if cfg.data_source == "synthetic":
        warn += note("All images are synthetic: the numbers describe the pipeline, not diagnostic performance.")
    return f"""<header id="top">
<h1>{esc(cfg.title)}</h1>
<p class="meta">Generated {generated} by <code>breakhis-ray report</code>.</p>
<p class="meta">Data source: <span class="badge {esc(cfg.data_source)}">{esc(source_text)}</span>
&nbsp; Split protocol: <span class="badge{' image' if ctx.protocol == 'image' else ''}">{esc(protocol)}</span></p>
<p class="meta">Inputs: {esc(given)}</p>
{details("Run config (YAML)", config_yaml(cfg))}
<p class="banner">Research use only: not for diagnosis or clinical use.</p>
{warn}
</header>"""


def render_report(cfg: ReportConfig) -> tuple[str, list[str], dict[str, bool]]:
    """Build the HTML; returns ``(html, figure file names, {section id: rendered with its input})``."""
    from breakhis_ray.data.manifest import read_manifest

    ctx = _Context(cfg=cfg, figures=_Figures(cfg.out, cfg.embed_images))
    if cfg.prepare_summary:
        ctx.prepare = read_json(cfg.prepare_summary, "prepare summary")
        if not isinstance(ctx.prepare, dict):
            raise DataError(f"prepare summary {cfg.prepare_summary} must hold a JSON object")
    if cfg.manifest:
        ctx.manifest = read_manifest(cfg.manifest)
    if cfg.metrics:
        ctx.metrics = read_json(cfg.metrics, "metrics")
        if not isinstance(ctx.metrics, dict) or "overall" not in ctx.metrics:
            raise DataError(f"metrics {cfg.metrics} is not an evaluate JSON (no 'overall' key)")
    if cfg.predictions:
        from breakhis_ray.evaluate import read_predictions

        ctx.predictions = read_predictions(cfg.predictions)
    if cfg.grid:
        ctx.grid = read_table(cfg.grid)
    protocols = set()
    if ctx.grid is not None and "protocol" in ctx.grid.columns:
        protocols = {str(p) for p in ctx.grid["protocol"].dropna().unique()}
    ctx.protocol = (cfg.protocol or (ctx.metrics or {}).get("protocol")
                    or (" + ".join(sorted(protocols)) if protocols else None) or (ctx.prepare or {}).get("protocol"))

    bodies, status = [], {}
    for number, (sid, title) in enumerate(SECTIONS, start=1):
        body = SECTION_BUILDERS[sid](ctx)
        status[sid] = SECTION_INPUTS[sid](cfg)
        bodies.append(f'<section id="{sid}">\n<h2>{number}. {esc(title)}</h2>\n{body}\n</section>')
    toc = "".join(
        f'<li><a href="#{sid}">{esc(title)}</a>'
        + ("" if status[sid] else ' <span class="skipped">(input not given)</span>') + "</li>"
        for sid, title in SECTIONS)
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(cfg.title)}</title>
<style>{CSS}</style>
</head>
<body>
{_header(ctx)}
<nav id="toc"><h2>Contents</h2><ol>{toc}</ol></nav>
<main>
{chr(10).join(bodies)}
</main>
<footer>breakhis-ray report. Research use only; not for diagnosis or clinical use.
<a href="#top">Back to top</a></footer>
</body>
</html>
"""
    return page, ctx.figures.written, status


def run_report(cfg: ReportConfig) -> str:
    """CLI stage: write ``<out>/report.html``, ``<out>/figures/*.png`` and ``<out>/config.yaml``; returns the
    URI of the HTML file."""
    storage.makedirs(cfg.out)
    page, figures, status = render_report(cfg)
    uri = storage.join(cfg.out, REPORT_FILE)
    storage.write_text(uri, page)
    storage.write_text(storage.join(cfg.out, "config.yaml"), config_yaml(cfg))
    missing = [sid for sid, ok in status.items() if not ok]
    print(f"report: {len(figures)} figure(s), {len(SECTIONS) - len(missing)} of {len(SECTIONS)} sections with "
          f"their input" + (f" (without input: {', '.join(missing)})" if missing else ""))
    print(f"wrote {uri}")
    return uri


__all__ = ["PUBLISHED", "SECTIONS", "canonical_table", "read_table", "render_report", "run_report"]
