"""What the sections share while a report is built: the inputs read once, and the figures written so far."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

import pandas as pd
from markupsafe import Markup

from breakhis_ray import storage
from breakhis_ray.config import ReportConfig
from breakhis_ray.errors import DataError
from breakhis_ray.report import html
from breakhis_ray.report.inputs import read_json, read_table

REPORT_FILE = "report.html"
FIGURES_DIR = "figures"


@dataclass
class Figures:
    """Figures of one report: each PNG is written to ``<out>/figures/NN-<slug>.png`` and shown embedded (a data
    URI) or linked (``embed=False``)."""

    out: str
    embed: bool
    written: list[str] = field(default_factory=list)

    def add(self, name: str, png: bytes, caption: str, alt: str | None = None) -> Markup:
        index = len(self.written) + 1
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "figure"
        filename = f"{index:02d}-{slug}.png"
        storage.write_bytes(storage.join(self.out, FIGURES_DIR, filename), png)
        self.written.append(filename)
        src = ("data:image/png;base64," + base64.b64encode(png).decode("ascii")) if self.embed \
            else f"{FIGURES_DIR}/{filename}"
        return html.figure(src, alt or caption, caption)


@dataclass
class Context:
    """The report's config, its inputs (``None`` where not given) and the split protocol they state."""

    cfg: ReportConfig
    figures: Figures
    manifest: pd.DataFrame | None = None
    prepare: dict | None = None
    metrics: dict | None = None
    predictions: pd.DataFrame | None = None
    grid: pd.DataFrame | None = None
    protocol: str | None = None
    #: ``(title, YAML text)`` of stage configs found along the way, shown in the configuration section
    run_configs: list[tuple[str, str]] = field(default_factory=list)


def load_context(cfg: ReportConfig) -> Context:
    """Read every given input once (an unreadable one is a :class:`DataError`) and settle the split protocol:
    the config's, else the metrics', else the grid's, else ``prepare.json``'s."""
    from breakhis_ray.data.manifest import read_manifest

    ctx = Context(cfg=cfg, figures=Figures(cfg.out, cfg.embed_images))
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
    return ctx
