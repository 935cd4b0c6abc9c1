"""The data sections: dataset tables (Tab. 1, subtypes), data enhancement (Tab. 1 / Tab. 2), synthetic samples."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from breakhis_ray import storage
from breakhis_ray.domain import MAGNIFICATIONS
from breakhis_ray.report import html, plots
from breakhis_ray.report.context import Context
from breakhis_ray.report.inputs import frame_from_json, reference_table

#: ``prepare.json`` table keys and their titles.
PREPARE_TABLES = {
    "tab1_all": "Tab. 1: all images of the prepared fold, before enhancement",
    "tab1_train": "Tab. 1: training split before enhancement",
    "tab2_train": "Tab. 2: training split after enhancement",
    "tab2_all": "Tab. 2: all splits after enhancement",
}


def _total_classes(rows: list[list[Any]]) -> list[str]:
    return ["total" if r[0] == "Total" else "" for r in rows]


def dataset(ctx: Context) -> Markup:
    if ctx.manifest is None:
        return html.skipped("manifest", Markup("Set <code>manifest=PATH</code> to the Parquet written by "
                                               "<code>breakhis-ray manifest</code>."))
    from breakhis_ray.data.manifest import class_magnification_table, patient_summary

    df = ctx.manifest
    table = class_magnification_table(df)
    rows = [[idx, *[int(v) for v in table.loc[idx]]] for idx in table.index]
    parts = [html.paragraph(f"{patient_summary(df)}."),
             html.heading("Tab. 1: images per magnification and class"),
             html.table_html(["Magnification", *table.columns], rows, row_classes=_total_classes(rows))]
    reference = reference_table()
    share = table.loc["Total", "Total"] / max(int(reference.loc["Total", "Total"]), 1)
    parts.append(html.note(f"The full BreakHis holds {int(reference.loc['Total', 'Total']):,} images "
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
    parts += [html.heading("Subtypes: patients and images"),
              html.table_html(["class", "subtype", "patients", "images", *[f"{m}X" for m in MAGNIFICATIONS]],
                              sub_rows)]
    parts.append(ctx.figures.add("class-magnification", plots.class_magnification_bars({"manifest": table}),
                                 "Images per magnification and class (manifest)."))
    return html.join(parts)


def _cell(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def enhancement(ctx: Context) -> Markup:
    cfg = ctx.cfg
    if not cfg.prepare_summary:
        return html.skipped("prepare_summary", Markup("Set <code>prepare_summary=PATH</code> to the "
                                                      "<code>prepare.json</code> written by "
                                                      "<code>breakhis-ray prepare</code>."))
    data = ctx.prepare
    counts = [(k, v) for k, v in data.items()
              if (isinstance(v, (int, float, str, bool)) or v is None) and k not in ("root", "out")]
    for group in ("splits", "rejects_by_reason", "converted"):
        if isinstance(data.get(group), dict):
            counts += [(f"{group}: {k}", v) for k, v in data[group].items()]
    if isinstance(data.get("shards"), list):
        counts.append(("shard files", len(data["shards"])))
    parts = [html.paragraph(Markup("Prepared from <code>{}</code> into <code>{}</code>.").format(
        data.get("root", "n/a"), data.get("out", "n/a")))]
    if counts:
        parts += [html.heading("Counts"), html.table_html(["count", "value"], [[k, v] for k, v in counts])]
    for text in data.get("enhance_notes") or []:
        parts.append(html.note(text))
    tables = data.get("tables") if isinstance(data.get("tables"), dict) else {}
    frames = {}
    for key, value in tables.items():
        frame = frame_from_json(value)
        if frame is None:
            continue
        title = PREPARE_TABLES.get(key, key)
        frames[key] = (title, frame)
        rows = [[idx, *[_cell(v) for v in frame.loc[idx]]] for idx in frame.index]
        parts += [html.heading(title),
                  html.table_html(["Magnification", *frame.columns], rows, row_classes=_total_classes(rows))]
    if not frames:
        parts.append(html.note(Markup("No class x magnification tables (<code>tables</code>) in {}.").format(
            cfg.prepare_summary)))
    pair = [k for k in ("tab1_train", "tab2_train") if k in frames] or list(frames)[:2]
    plottable = {frames[k][0]: frames[k][1] for k in pair if {"Benign", "Malignant"} <= set(frames[k][1].columns)}
    if plottable:
        parts.append(ctx.figures.add("enhancement", plots.class_magnification_bars(plottable),
                                     "Training images per class and magnification before and after the offline "
                                     "class-balancing augmentation (VGG paper Tab. 1 / Tab. 2)."))
    return html.join(parts)


def samples(ctx: Context) -> Markup:
    if not ctx.cfg.samples_grid:
        return html.skipped("samples_grid", Markup("Set <code>samples_grid=PATH</code> to the PNG written by "
                                                   "<code>breakhis-ray synth</code>."))
    png = storage.read_bytes(ctx.cfg.samples_grid)
    return ctx.figures.add("samples-grid", png, f"Synthetic samples ({ctx.cfg.samples_grid}).")
