"""The model card (what the models are, intended use, limitations, metric caveats) and the run configuration."""

from __future__ import annotations

import posixpath

from markupsafe import Markup

from breakhis_ray import storage
from breakhis_ray.report import html
from breakhis_ray.report.context import Context
from breakhis_ray.report.sections.evaluation import report_threshold


def model_card(ctx: Context) -> Markup:
    cfg = ctx.cfg
    if ctx.manifest is not None:
        df = ctx.manifest
        per_label = df.groupby("label")["patient_id"].nunique()
        data_line = (f"{len(df):,} images of {df['patient_id'].nunique()} patient folders "
                     f"({int(per_label.get('benign', 0))} benign, {int(per_label.get('malignant', 0))} malignant) "
                     f"at 40X/100X/200X/400X, labelled benign or malignant with one of eight subtypes.")
    else:
        data_line = "not given to this report (set manifest=PATH)."
    value, rule = report_threshold(ctx)
    return html.render("model_card.html.j2", data_source=cfg.data_source, data_line=data_line,
                       threshold=f"{value:.4g} (rule: {rule})")


def configuration(ctx: Context) -> Markup:
    parts = [html.note(Markup("The resolved config of this report is in the header and in <code>config.yaml</code> "
                              "beside <code>report.html</code>."))]
    if ctx.metrics is not None and ctx.cfg.metrics:
        beside = f"{ctx.cfg.metrics}.config.yaml"
        if storage.exists(beside):
            ctx.run_configs.insert(0, ("evaluate: " + posixpath.basename(beside), storage.read_text(beside)))
    for uri in ctx.cfg.configs:
        ctx.run_configs.append((uri, storage.read_text(uri)))
    for title, text in ctx.run_configs:
        parts.append(html.details(title, text))
    if len(parts) == 1:
        parts.append(html.note(Markup("No stage config found: pass <code>configs=[FILE, ...]</code> to include the "
                                      "YAML of other stages.")))
    return html.join(parts)
