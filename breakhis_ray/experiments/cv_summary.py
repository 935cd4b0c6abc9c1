"""Cross-validation statistics and tables (pure numpy / pandas): per-fold metrics flattened to numbers, mean,
standard deviation and a 95% interval over folds, and Markdown tables (one run, or several side by side).

The interval over folds is Student's t: ``mean +- t(0.975, k - 1) * std / sqrt(k)`` with the sample standard
deviation (``ddof=1``) of the ``k`` fold values, clipped to the metric's range (``[0, 1]``; ``[0, inf)`` for
losses); with one fold there is no spread and no interval. The pooled
out-of-fold evaluation (``summary["pooled"]``) carries ``evaluate``'s own intervals (a bootstrap over patients)
where ``evaluate`` computes them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

CI_METHOD = "student_t_over_folds"
#: metrics shown in the Markdown tables, in order (others stay in summary.json)
TABLE_METRICS = ("accuracy", "balanced_accuracy", "f1", "macro_f1", "roc_auc", "patient_accuracy",
                 "patient_recognition_rate", "calibration.ece", "calibration.brier")


#: sub-keys that are settings, not metrics (``calibration.bins``, bootstrap ``resamples`` and ``seed``)
_SETTINGS = ("bins", "resamples", "seed")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def flat_metrics(overall: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of an ``evaluate`` result's ``overall``: top-level numbers, and numbers one level down
    as ``section.key`` (``calibration.ece``, ``threshold.value``). Counts (``n_*``) and lists (intervals,
    confusion matrices) are left out."""
    out: dict[str, float] = {}
    for key, value in overall.items():
        if key.startswith("n_"):
            continue
        if _number(value):
            out[key] = float(value)
        elif isinstance(value, Mapping) and key != "ci95":
            for sub, inner in value.items():
                if _number(inner) and not str(sub).startswith("n_") and sub not in _SETTINGS:
                    out[f"{key}.{sub}"] = float(inner)
    return out


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def fold_statistics(per_fold: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """``{"mean", "std", "ci95", "n"}``, each ``{metric: value}``, over the folds where a metric is defined."""
    names: list[str] = []
    for fold in per_fold:
        names.extend(k for k in fold if k not in names)
    stats: dict[str, dict[str, Any]] = {"mean": {}, "std": {}, "ci95": {}, "n": {}}
    for name in names:
        values = np.asarray([f[name] for f in per_fold if _number(f.get(name))], dtype=np.float64)
        if not values.size:
            continue
        mean = float(values.mean())
        stats["mean"][name] = mean
        stats["n"][name] = int(values.size)
        if values.size > 1:
            std = float(values.std(ddof=1))
            half = t_quantile(values.size - 1) * std / math.sqrt(values.size)
            stats["std"][name] = std
            top = math.inf if "loss" in name else 1.0
            stats["ci95"][name] = [max(0.0, mean - half), min(top, mean + half)]
        else:
            stats["std"][name] = None
            stats["ci95"][name] = None
    return stats


def _pct(value: Any) -> str:
    return f"{value * 100:.1f}" if _number(value) else "n/a"


def _interval(pair: Any) -> str:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(_number(v) for v in pair):
        return "n/a"
    return f"[{pair[0] * 100:.1f}, {pair[1] * 100:.1f}]"


def _pooled_ci(summary: Mapping[str, Any], name: str) -> Any:
    return ((summary.get("pooled") or {}).get("overall") or {}).get("ci95", {}).get(name)


def cell(summary: Mapping[str, Any], name: str) -> str:
    """``mean ± std [t-interval over folds]`` of one metric, in percent."""
    mean = summary["mean"].get(name)
    if not _number(mean):
        return "n/a"
    std = summary["std"].get(name)
    text = _pct(mean) + (f" ± {std * 100:.1f}" if _number(std) else "")
    return f"{text} {_interval(summary['ci95'].get(name))}"


def present_metrics(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """:data:`TABLE_METRICS` that at least one summary has a mean for."""
    return [m for m in TABLE_METRICS if any(_number(s["mean"].get(m)) for s in summaries)]


def format_summary(summary: Mapping[str, Any]) -> str:
    """Markdown: one row per metric, one column per fold, mean ± std, the interval over folds and the pooled
    out-of-fold value with its bootstrap interval (when ``evaluate`` gives one)."""
    folds = summary["folds"]
    head = ["metric", *[f"fold {f['fold']}" for f in folds], "mean ± std [95% t-interval]",
            "pooled OOF [95% bootstrap]"]
    lines = [f"### {summary['protocol']} ({summary['task']}, magnification-{summary['magnification_mode']}), "
             f"{summary['split']} split, {len(folds)} folds", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pooled = flat_metrics((summary.get("pooled") or {}).get("overall") or {})
    for name in present_metrics([summary]):
        row = [name, *[_pct(f["metrics"].get(name)) for f in folds], cell(summary, name),
               f"{_pct(pooled.get(name))} {_interval(_pooled_ci(summary, name))}".replace(" n/a", "")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def format_side_by_side(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one row per metric, one column per labelled summary (``mean ± std [t-interval]``)."""
    labels = list(summaries)
    head = ["metric", *labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in present_metrics(list(summaries.values())):
        lines.append("| " + " | ".join([name, *[cell(summaries[k], name) for k in labels]]) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["CI_METHOD", "TABLE_METRICS", "cell", "flat_metrics", "fold_statistics", "format_side_by_side",
           "format_summary", "present_metrics", "t_quantile"]
