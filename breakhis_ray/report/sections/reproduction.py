"""The papers' tables: the experiment grid's rows (mean ± std over folds per split protocol) beside the numbers
the papers publish (:mod:`breakhis_ray.papers`)."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np
import pandas as pd
from markupsafe import Markup

from breakhis_ray.domain import MAGNIFICATIONS
from breakhis_ray.papers import (
    KEY_CANDIDATES,
    METRIC_LABELS,
    PUBLISHED,
    PUBLISHED_LABEL,
    SEGMENTATION_COLUMNS,
    canonical_table,
)
from breakhis_ray.report import html
from breakhis_ray.report.context import Context
from breakhis_ray.report.html import mean_std_text

PROTOCOL_LABELS = {
    "patient": "ours (patient split)",
    "official": "ours (official patient-disjoint folds)",
    "image": "ours (image split)",
    "unknown": "ours (split not stated)",
}
PROTOCOL_ORDER = {"patient": 0, "official": 1, "image": 2, "unknown": 3}
_DEFAULT_METRICS = ("accuracy", "precision", "recall", "f1", "patient_recognition_rate")


def norm(column: str, value: Any) -> str:
    """A setting as a comparable key: model families (``vgg16_bn`` -> ``vgg``), ``40X`` -> ``40``, no
    segmentation -> ``none``, no magnification -> ``all``."""
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


def prepare_grid(df: pd.DataFrame) -> pd.DataFrame:
    """The grid with ``segmentation``, ``table``, ``protocol`` filled in and ``_table`` (canonical table key)."""
    df = df.copy()
    if "segmentation" not in df.columns:
        for col in SEGMENTATION_COLUMNS[1:]:
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


def _stats(values: pd.Series) -> dict[str, Any] | None:
    nums = pd.to_numeric(values, errors="coerce").dropna().to_numpy(dtype=float)
    if not nums.size:
        return None
    return {"mean": float(nums.mean()), "std": float(nums.std()) if nums.size > 1 else None, "n": int(nums.size)}


def _published_label(remark: str) -> Markup:
    return Markup("{}<br><small>{}</small>").format(PUBLISHED_LABEL, remark)


def grid_table(name: str, df: pd.DataFrame) -> Markup:
    """One paper table from its grid rows: a row per setting and protocol, the published rows beside their
    setting (or at the end)."""
    spec = PUBLISHED.get(name, {})
    percent = spec.get("percent", True)
    pivot = spec.get("pivot")
    if pivot and pivot not in df.columns:
        pivot = None
    keys = [k for k in spec.get("keys", ()) if k in df.columns]
    keys += [k for k in KEY_CANDIDATES if k in df.columns and k not in keys and k != pivot
             and df[k].astype(str).nunique(dropna=False) > 1]
    if pivot:
        metric = next((m for m in spec.get("metrics", ("accuracy",)) if m in df.columns), None)
        metrics = [metric] if metric else []
    else:
        metrics = [m for m in spec.get("metrics") or _DEFAULT_METRICS if m in df.columns]
    if not metrics:
        return html.note(f"{name}: no metric column ({', '.join(spec.get('metrics', ('accuracy',)))}) in the grid.")

    normed = df.copy()
    for k in set(keys) | ({pivot} if pivot else set()):
        normed[f"_n_{k}"] = [norm(k, v) for v in df[k]]
    group_cols = [f"_n_{k}" for k in keys]
    if pivot:
        columns = [str(m) for m in MAGNIFICATIONS]
        extra = sorted(set(normed[f"_n_{pivot}"]) - set(columns))
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
        rows.append([key_values.get(k, "—") for k in keys] + [_published_label(remark)]
                    + [values.get(c, "—") for c in columns] + ["—"])
        classes.append("published")

    key_groups = normed.groupby(group_cols, dropna=False, sort=True) if group_cols else [((), normed)]
    for key_tuple, group in key_groups:
        key_tuple = key_tuple if isinstance(key_tuple, tuple) else (key_tuple,)
        key_map = dict(zip(keys, key_tuple))
        display = [", ".join(sorted({str(v) for v in group[k]})) for k in keys]
        for protocol, sub in sorted(group.groupby("protocol"), key=lambda p: PROTOCOL_ORDER.get(p[0], 9)):
            label = PROTOCOL_LABELS.get(protocol, f"ours ({protocol} split)")
            if pivot:
                per = {value: _stats(cell[metrics[0]]) for value, cell in sub.groupby(f"_n_{pivot}")}
                mags = [per[str(m)]["mean"] for m in MAGNIFICATIONS if str(m) in per and per[str(m)]]
                cells = [mean_std_text(per.get(c), percent) for c in columns[:-1]]
                mean = {"mean": float(np.mean(mags)), "std": None} if len(mags) == len(MAGNIFICATIONS) else None
                cells.append(mean_std_text(mean, percent))
                n = int(sub.groupby(f"_n_{pivot}").size().max())
            else:
                cells = [mean_std_text(_stats(sub[m]), percent) for m in metrics]
                n = len(sub)
            rows.append([*display, label, *cells, n])
            classes.append("")
        for i, (pkey, pvalues, remark) in enumerate(published_rows):
            matches = all(key_map.get(k, norm(k, v)) == norm(k, v) for k, v in pkey.items() if k in keys)
            if i not in shown and matches and any(k in keys for k in pkey):
                published_row(i, {k: pkey.get(k, "—") for k in keys}, pvalues, remark)
    for i, (pkey, pvalues, remark) in enumerate(published_rows):
        if i not in shown:
            published_row(i, {k: pkey.get(k, "—") for k in keys}, pvalues, remark)
    return html.table_html(headers, rows, row_classes=classes)


def published_only(name: str) -> Markup:
    """A paper table's published rows alone (no grid rows for it)."""
    spec = PUBLISHED[name]
    cols = ["40", "100", "200", "400", "mean"] if spec.get("pivot") else list(spec["metrics"])
    keys = list(spec["keys"])
    rows = [[pkey.get(k, "—") for k in keys] + [remark] + [values.get(c, "—") for c in cols]
            for pkey, values, remark in spec["rows"]]
    if not rows:
        return html.note("No published numbers are legible for this figure.")
    headers = [*keys, "source", *[f"{c}X" if c.isdigit() else METRIC_LABELS.get(c, c) for c in cols]]
    return html.table_html(headers, rows, row_classes=["published"] * len(rows))


def reproduction(ctx: Context) -> Markup:
    parts = [html.note(Markup("Published numbers are the papers' own, as legible in their text; both papers most "
                              "likely split BreakHis by image (tiles of one patient in training and test), which "
                              "inflates accuracy. Our rows name their split: <em>patient</em> (patient-disjoint, "
                              "the default) or <em>image</em> (the papers' protocol, for comparison)."), "warn")]
    if ctx.grid is None:
        parts.append(html.skipped("grid", Markup("Set <code>grid=PATH</code> to the experiment grid results "
                                                 "(<code>breakhis-ray experiments</code>); the published numbers "
                                                 "are listed alone.")))
        for name, spec in PUBLISHED.items():
            parts += [html.heading(spec["title"]), published_only(name), html.note(spec["note"])]
        return html.join(parts)
    grid = prepare_grid(ctx.grid)
    names = list(dict.fromkeys([n for n in PUBLISHED if n in set(grid["_table"])]
                               + [n for n in grid["_table"].unique() if n not in PUBLISHED]))
    for name in names:
        spec = PUBLISHED.get(name)
        title = spec["title"] if spec else f"Grid table {name}"
        parts += [html.heading(title), grid_table(name, grid[grid["_table"] == name])]
        if spec:
            parts.append(html.note(Markup("{}<br>Source: {}.").format(spec["note"], spec["paper"])))
    for name, spec in PUBLISHED.items():
        if name not in names:
            parts += [html.heading(spec["title"]), html.note("Not in the grid: published numbers only."),
                      published_only(name)]
    return html.join(parts)
