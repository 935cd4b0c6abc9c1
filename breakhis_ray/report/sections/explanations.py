"""The explanation gallery: correct and wrong predictions beside their class-activation maps (``heatmap_uri``,
written by ``breakhis-ray infer --explain gradcam``)."""

from __future__ import annotations

import posixpath
from typing import Sequence

import numpy as np
import pandas as pd
from markupsafe import Markup

from breakhis_ray.domain import BENIGN, MALIGNANT
from breakhis_ray.report import html, plots
from breakhis_ray.report.context import Context
from breakhis_ray.report.inputs import read_tile
from breakhis_ray.report.sections.results import labelled_predictions, pick_tiles

_HOW = Markup("Run <code>breakhis-ray infer ... --explain gradcam</code> (or <code>gradcam++</code>) and give "
              "its predictions as <code>predictions=PATH</code>: every row then carries a "
              "<code>heatmap_uri</code>.")


def gallery_png(pairs: Sequence[tuple[np.ndarray | None, np.ndarray | None, str, bool]], per_row: int = 2) -> bytes:
    """``(tile, heatmap overlay, caption, correct)`` pairs side by side, ``per_row`` pairs per row."""
    per_row = max(1, min(per_row, len(pairs)))
    nrows = max(1, -(-len(pairs) // per_row))
    fig = plots._figure(3.0 * 2 * per_row, 2.7 * nrows)
    for i, (tile, heat, caption, correct) in enumerate(pairs):
        color = "#1a7f37" if correct else "#cf222e"
        for j, (image, label) in enumerate(((tile, "image"), (heat, "Grad-CAM"))):
            ax = fig.add_subplot(nrows, 2 * per_row, 2 * i + j + 1)
            if image is None:
                plots._placeholder(ax, f"{label} unreadable")
            else:
                ax.imshow(image)
                ax.set_axis_off()
            ax.set_title(caption if j == 0 else label, fontsize=8, color=color if j == 0 else "#333333")
    fig.tight_layout()
    return plots.figure_png(fig)


def _rows(labelled: pd.DataFrame, threshold: float) -> pd.DataFrame:
    rows = labelled[labelled["ok"] & labelled["label_id"].notna() & labelled["heatmap_uri"].notna()].copy()
    rows["pred_id"] = (rows["prob_malignant"] >= threshold).astype(int)
    rows["correct"] = rows["pred_id"] == rows["label_id"].astype(int)
    return rows


def gallery(ctx: Context) -> Markup:
    cfg = ctx.cfg
    labelled = labelled_predictions(ctx)
    if labelled is None:
        return html.skipped("predictions", _HOW)
    if "heatmap_uri" in ctx.predictions.columns and "heatmap_uri" not in labelled.columns:  # manifest join
        labelled = labelled.merge(ctx.predictions[["path", "heatmap_uri"]], on="path", how="left")
    if "heatmap_uri" not in labelled.columns or labelled["heatmap_uri"].isna().all():
        return html.join([html.note(Markup("These predictions carry no heatmaps. ") + _HOW, "skipped")])
    rows = _rows(labelled, cfg.threshold)
    if rows.empty:
        return html.note("No successful prediction with a known label and a heatmap to show.")
    per_group = max(1, cfg.sample_tiles // 2)
    parts = [html.paragraph(
        f"{int(labelled['heatmap_uri'].notna().sum()):,} predictions carry a class-activation map of the class "
        f"the model predicted; {int(rows['correct'].sum()):,} of the {len(rows):,} with a known label are correct "
        f"at threshold {cfg.threshold:g}. Red regions pushed the prediction most; the overlay is drawn on the "
        "image the model saw, at the input's size.")]
    for title, group in (("Correct predictions", rows[rows["correct"]]), ("Wrong predictions", rows[~rows["correct"]])):
        parts.append(html.heading(title))
        if group.empty:
            parts.append(html.note(f"None: no {title.split()[0].lower()} prediction with a heatmap."))
            continue
        picked = pick_tiles(group, per_group, cfg.seed)
        pairs, table = [], []
        for _, r in picked.iterrows():
            prob = float(r["prob_malignant"])
            pred, true = (MALIGNANT if r["pred_id"] else BENIGN), (MALIGNANT if int(r["label_id"]) else BENIGN)
            conf = prob if pred == MALIGNANT else 1.0 - prob
            mag = f" {int(r['magnification'])}X" if pd.notna(r.get("magnification")) else ""
            pairs.append((read_tile(str(r["path"])), read_tile(str(r["heatmap_uri"])),
                          f"true: {true} | pred: {pred}\np({pred}) = {conf:.1%}{mag}", bool(r["correct"])))
            table.append([posixpath.basename(str(r["path"])), true, pred, f"{prob:.4f}",
                          posixpath.basename(str(r["heatmap_uri"]))])
        slug = "correct" if title.startswith("Correct") else "wrong"
        parts.append(ctx.figures.add(f"gradcam-{slug}", gallery_png(pairs),
                                     f"{title}: each tile beside its Grad-CAM overlay (green caption: correct, "
                                     "red: wrong)."))
        parts.append(html.table_html(["file", "true", "predicted", "P(malignant)", "heatmap"], table))
    return html.join(parts)
