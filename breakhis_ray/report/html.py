"""HTML rendering for the report: one jinja2 environment with autoescape, fragments and number formatting.

Every string that reaches the page goes through jinja2's autoescape (or :class:`markupsafe.Markup.format`,
the same escaping): plain ``str`` values (paths, config values, JSON contents) are escaped, ``Markup`` values
(fragments already rendered, or literal HTML written in this package) are inserted as they are. Nothing here
escapes by hand. The templates (``templates/*.html.j2``, ``templates/style.css``) are package data.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

__all__ = ["Markup", "ci_suffix", "ci_text", "details", "figure", "heading", "join", "mean_std_text", "note",
           "paragraph", "pct", "render", "skipped", "table_html"]


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The report's jinja2 environment: templates from the package, autoescape on, undefined names fail."""
    return Environment(loader=PackageLoader("breakhis_ray.report", "templates"), autoescape=True,
                       undefined=StrictUndefined, keep_trailing_newline=True)


def render(template: str, **context: Any) -> Markup:
    """Render a template of ``templates/`` with ``context`` (autoescaped)."""
    return Markup(environment().get_template(template).render(**context))


def _fragment(name: str, *args: Any) -> Markup:
    macro = getattr(environment().get_template("fragments.html.j2").module, name)
    return Markup(macro(*args))


def join(parts: Iterable[Any]) -> Markup:
    """Fragments one per line; plain strings among them are escaped."""
    return Markup("\n").join(parts)


def note(text: Any, kind: str = "") -> Markup:
    """A boxed note (``kind``: ``""``, ``"skipped"`` or ``"warn"``)."""
    return _fragment("note", text, kind)


def skipped(what: str, how: Any) -> Markup:
    """The note of a section whose input ``what`` was not given; ``how`` says how to give it."""
    return _fragment("skipped", what, how)


def details(summary: Any, body: Any) -> Markup:
    """A collapsed block of preformatted text (configs)."""
    return _fragment("details", summary, body)


def figure(src: str, alt: Any, caption: Any) -> Markup:
    return _fragment("figure", src, alt, caption)


def heading(text: Any) -> Markup:
    """A sub-heading (``h3``) inside a section."""
    return _fragment("heading", text)


def paragraph(text: Any) -> Markup:
    return _fragment("paragraph", text)


# ------------------------------------------------------------------------------------------ tables
_NUMERIC = re.compile(r"^\s*(?:[<>≥≤~+-]\s*)?\d[\d,.]*(?:\s*±\s*[\d.]+)?%?(?:\s*\[[\d.]+,\s*[\d.]+\])?\s*$"
                      r"|^(?:n/a|—)$")


def is_numeric(value: Any) -> bool:
    """Numbers and number-like text (``mean ± std``, ``91.20 [86.0, 95.1]``, ``> 97``, ``n/a``); never a
    rendered fragment."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return True
    return isinstance(value, str) and not isinstance(value, Markup) and bool(_NUMERIC.match(value))


def table_html(headers: Sequence[Any], rows: Iterable[Sequence[Any]],
               row_classes: Sequence[str] | None = None) -> Markup:
    """An HTML table; numeric cells (numbers, ``mean ± std``, ``n/a``) are right-aligned, text left-aligned."""
    rows = [list(r) for r in rows]
    numeric_cols = [bool(rows) and all(is_numeric(r[i]) for r in rows if i < len(r)) for i in range(len(headers))]
    head = [{"text": h, "num": i < len(numeric_cols) and numeric_cols[i]} for i, h in enumerate(headers)]
    body = []
    for r, row in enumerate(rows):
        cells = [{"value": "" if c is None else c,
                  "num": (numeric_cols[i] or is_numeric(c)) if i < len(numeric_cols) else is_numeric(c)}
                 for i, c in enumerate(row)]
        body.append({"cls": row_classes[r] if row_classes else "", "cells": cells})
    return _fragment("table", head, body)


# -------------------------------------------------------------------------------------- numbers
def pct(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage without the sign (``0.875`` -> ``87.50``); ``n/a`` when not a number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(float(value)):
        return "n/a"
    return f"{float(value) * 100:.{digits}f}"


def ci_suffix(interval: Any, percent: bool = True) -> str:
    """``" [86.0, 95.1]"`` for a 95% interval ``[lo, hi]`` (percent: one decimal of %, else four decimals);
    ``""`` when there is none."""
    if not (isinstance(interval, (list, tuple)) and len(interval) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)):
        return ""
    if percent:
        return f" [{interval[0] * 100:.1f}, {interval[1] * 100:.1f}]"
    return f" [{interval[0]:.4f}, {interval[1]:.4f}]"


def ci_text(value: Any, interval: Any, percent: bool = True) -> str:
    """A value with its 95% interval: ``91.20 [86.0, 95.1]`` (percent) or ``0.0712 [0.0501, 0.1010]``."""
    if percent:
        text = pct(value)
    else:
        text = f"{float(value):.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"
    return text if text == "n/a" else text + ci_suffix(interval, percent)


def mean_std_text(entry: Mapping[str, Any] | None, percent: bool = True) -> str:
    """``{"mean", "std"}`` as ``mean ± std`` (percent: two decimals of %, else three decimals)."""
    if not entry or not isinstance(entry.get("mean"), (int, float)):
        return "n/a"
    scale, digits = (100.0, 2) if percent else (1.0, 3)
    std = entry.get("std")
    std_txt = f" ± {std * scale:.{digits}f}" if isinstance(std, (int, float)) else ""
    return f"{entry['mean'] * scale:.{digits}f}{std_txt}"
