"""The segmentation section: Dice/IoU per method from the ``segment-eval`` JSON, and its overlay figures."""

from __future__ import annotations

import posixpath
from typing import Any

from markupsafe import Markup

from breakhis_ray import storage
from breakhis_ray.report import html
from breakhis_ray.report.context import Context
from breakhis_ray.report.html import mean_std_text
from breakhis_ray.report.inputs import read_json

_OVERLAY_KEYS = ("overlays", "overlay", "overlay_png", "overlay_pngs", "figures")


def _method_items(data: Any) -> list[tuple[str, dict]]:
    """``(method, values)`` from ``{"methods": {name: {...}}}``, ``{"methods"|"results": [...]}``, ``{name: {...}}``
    or a list of records."""
    if isinstance(data, dict) and isinstance(data.get("methods"), dict):
        return list(data["methods"].items())
    for key in ("methods", "results"):
        if isinstance(data, dict) and isinstance(data.get(key), list):
            return [(m.get("method", f"#{i}"), m) for i, m in enumerate(data[key]) if isinstance(m, dict)]
    if isinstance(data, list):
        return [(m.get("method", f"#{i}"), m) for i, m in enumerate(data) if isinstance(m, dict)]
    if isinstance(data, dict):
        return [(k, v) for k, v in data.items()
                if isinstance(v, dict) and any(isinstance(x, (int, float, dict)) for x in v.values())
                and k not in ("config", "overlays")]
    return []


def seg_rows(data: Any) -> tuple[list[str], list[list[Any]]]:
    """Headers and one row per method; ``x`` with ``x_std`` (or ``{"mean", "std"}``) shown as ``mean ± std``."""
    columns: list[str] = []
    flat_rows = []
    for name, values in _method_items(data):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            if key == "method" or (key.endswith("_std") and key[:-4] in values):
                continue
            std = values.get(f"{key}_std")
            if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
                flat[key] = mean_std_text(value, percent=False)
            elif isinstance(value, float) and isinstance(std, (int, float)):
                flat[key] = mean_std_text({"mean": value, "std": std}, percent=False)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[key] = f"{value:.3f}" if isinstance(value, float) else value
        columns.extend(k for k in flat if k not in columns)
        flat_rows.append((name, flat))
    return ["method", *columns], [[name, *[f.get(c, "n/a") for c in columns]] for name, f in flat_rows]


def overlay_paths(data: Any, base: str) -> list[tuple[str, str]]:
    """``(title, URI)`` of every overlay PNG the JSON names (relative paths are relative to ``base``)."""
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
        for key in _OVERLAY_KEYS:
            if key in data:
                add("overlay", data[key])
    return found


def segmentation(ctx: Context) -> Markup:
    cfg = ctx.cfg
    if not cfg.segmentation:
        return html.skipped("segmentation", Markup("Set <code>segmentation=PATH</code> to the JSON written by "
                                                   "<code>breakhis-ray segment-eval</code>."))
    data = read_json(cfg.segmentation, "segmentation evaluation")
    headers, rows = seg_rows(data)
    parts = [html.paragraph("Nuclear segmentation against ground-truth masks: thresholding (Otsu on hematoxylin), "
                            "watershed and U-Net, as compared in the CancerNet paper.")]
    if isinstance(data, dict) and any(k in data for k in ("images", "patients", "metric_notes")):
        parts.append(html.note(f"{data.get('images', 'n/a')} images of {data.get('patients', 'n/a')} "
                               f"patients. {data.get('metric_notes', '')}"))
    parts.append(html.table_html(headers, rows) if rows else html.note("No per-method metrics found in the JSON."))
    for title, path in overlay_paths(data, storage.parent(cfg.segmentation)):
        parts.append(ctx.figures.add(f"overlay-{title}", storage.read_bytes(path),
                                     f"Segmentation overlay: {title} ({posixpath.basename(path)})."))
    return html.join(parts)
