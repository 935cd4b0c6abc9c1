"""Build the page from the sections and write ``report.html``, ``figures/`` and the provenance beside it."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from markupsafe import Markup

from breakhis_ray import storage
from breakhis_ray.config import ReportConfig, config_yaml
from breakhis_ray.report import html
from breakhis_ray.report.context import REPORT_FILE, Context, load_context
from breakhis_ray.report.sections import REGISTRY

log = logging.getLogger(__name__)

_SOURCE_TEXT = {"synthetic": "synthetic BreakHis (procedurally generated images)",
                "real": "BreakHis (real histopathology images)",
                "unspecified": "not stated"}
_INPUT_KEYS = ("manifest", "prepare_summary", "metrics", "predictions", "segmentation", "grid", "samples_grid")


def _warnings(ctx: Context) -> list[Markup]:
    warnings = []
    if ctx.protocol == "image":
        warnings.append(html.note("Image-level split: the same patients appear in training and test data; "
                                  "accuracy is optimistic and not comparable with patient-level results.", "warn"))
    if ctx.cfg.data_source == "synthetic":
        warnings.append(html.note("All images are synthetic: the numbers describe the pipeline, not diagnostic "
                                  "performance."))
    return warnings


def render_report(cfg: ReportConfig) -> tuple[str, list[str], dict[str, bool]]:
    """Build the HTML; returns ``(html, figure file names, {section id: rendered with its input})``."""
    ctx = load_context(cfg)
    sections, status = [], {}
    for section in REGISTRY:
        body = section.build(ctx)
        status[section.id] = section.has_input(cfg)
        sections.append({"id": section.id, "title": section.title, "body": body, "has_input": status[section.id]})
    inputs = [(k, getattr(cfg, k)) for k in _INPUT_KEYS]
    inputs.append(("train_runs", ", ".join(cfg.train_runs) or None))
    page = html.render(
        "page.html.j2",
        title=cfg.title,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        data_source=cfg.data_source,
        source_text=_SOURCE_TEXT[cfg.data_source],
        protocol=ctx.protocol,
        inputs=", ".join(f"{k}={v}" for k, v in inputs if v) or "none",
        run_config=html.details("Run config (YAML)", config_yaml(cfg)),
        warnings=_warnings(ctx),
        sections=sections,
    )
    return str(page), ctx.figures.written, status


def run_report(cfg: ReportConfig) -> str:
    """CLI stage: write ``<out>/report.html``, ``<out>/figures/*.png``, ``<out>/config.yaml`` and
    ``<out>/versions.json``; returns the URI of the HTML file."""
    from breakhis_ray.artifacts import write_provenance, write_text_atomic

    storage.makedirs(cfg.out)
    page, figures, status = render_report(cfg)
    uri = storage.join(cfg.out, REPORT_FILE)
    write_text_atomic(uri, page)
    write_provenance(cfg.out, cfg)
    missing = [sid for sid, ok in status.items() if not ok]
    log.info("report: %d figure(s), %d of %d sections with their input%s", len(figures),
             len(status) - len(missing), len(status),
             f" (without input: {', '.join(missing)})" if missing else "")
    log.info("wrote %s", uri)
    return uri
