"""Report figures as PNG bytes, drawn on matplotlib's Agg canvas (no display, no global pyplot state).

Every function returns the encoded PNG; :func:`roc_curve` is the numpy helper behind :func:`roc_plot`.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np

from breakhis_ray.domain import LABELS

CLASS_NAMES = LABELS
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DPI = 100


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """Encode a matplotlib figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="#666666", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# ------------------------------------------------------------------------------------ training
def training_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """Accuracy and loss per epoch for each run: train solid, validation dashed (two panels)."""
    fig = _figure(11, 4)
    panels = (("accuracy", "train_accuracy", "val_accuracy"), ("loss", "train_loss", "val_loss"))
    for i, (title, train_key, val_key) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        drawn = False
        for j, (name, history) in enumerate(runs.items()):
            color = COLORS[j % len(COLORS)]
            epochs = [h.get("epoch", k + 1) for k, h in enumerate(history)]
            for key, style, split in ((train_key, "-", "train"), (val_key, "--", "val")):
                points = [(e, h.get(key)) for e, h in zip(epochs, history) if isinstance(h.get(key), (int, float))]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=f"{name} ({split})")
                    drawn = True
        if drawn:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            _placeholder(ax, f"no {title} recorded")
        ax.set_title(f"{title} per epoch")
    fig.tight_layout()
    return figure_png(fig)


# ------------------------------------------------------------------------------ confusion matrix
def _draw_confusion(ax, cm: Sequence[Sequence[float]], title: str, labels: Sequence[str]) -> None:
    arr = np.asarray(cm, dtype=np.float64)
    total = arr.sum()
    ax.imshow(arr, cmap="Blues", vmin=0, vmax=max(arr.max(), 1))
    for r in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            value = arr[r, c]
            text = f"{int(value)}" if float(value).is_integer() else f"{value:.1f}"
            share = f"\n{value / total:.1%}" if total and len(labels) <= 2 else ""
            ax.text(c, r, text + share, ha="center", va="center", fontsize=9 if len(labels) <= 2 else 7,
                    color="white" if value > arr.max() * 0.6 else "black")
    if len(labels) > 2:
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=40, ha="right")
    else:
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title(title, fontsize=10)


def confusion_matrices(matrices: Mapping[str, Sequence[Sequence[float]] | None],
                       labels: Sequence[str] = CLASS_NAMES) -> bytes:
    """One panel per named confusion matrix (rows true, columns predicted); ``None`` draws "no images".
    More than two labels (the eight subtypes) get a larger panel each."""
    items = list(matrices.items())
    n = max(1, len(items))
    side = 2.8 if len(labels) <= 2 else 0.75 * len(labels) + 1.5
    fig = _figure(side * n, side + 0.1)
    for i, (title, cm) in enumerate(items):
        ax = fig.add_subplot(1, n, i + 1)
        if cm is None or not np.asarray(cm).size or np.asarray(cm, dtype=float).sum() == 0:
            _placeholder(ax, "no images")
            ax.set_title(title, fontsize=10)
        else:
            _draw_confusion(ax, cm, title, labels)
    fig.tight_layout()
    return figure_png(fig)


# ------------------------------------------------------------------------------------------ ROC
def roc_curve(y_true: Sequence[int], score: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` with malignant (1) positive; starts at (0, 0), ends at (1, 1).

    Empty arrays when ``y_true`` lacks one of the classes (the curve is undefined).
    """
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y != 1))
    if n_pos == 0 or n_neg == 0:
        empty = np.zeros(0)
        return empty, empty, empty
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(y == 1)[last]
    fps = np.cumsum(y != 1)[last]
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_plot(curves: Mapping[str, tuple[Sequence[float], Sequence[float], float | None]]) -> bytes:
    """ROC curves ``{name: (fpr, tpr, auc)}`` on one axis with the chance diagonal."""
    fig = _figure(5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ":", color="#999999", label="chance")
    drawn = False
    for i, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        if len(fpr) == 0:
            continue
        label = f"{name} (AUC {auc:.3f})" if auc is not None else name
        ax.plot(fpr, tpr, color=COLORS[i % len(COLORS)], linewidth=2 if i == 0 else 1.2, label=label)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.35, "ROC undefined: one class only", ha="center", color="#666666")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (benign called malignant)")
    ax.set_ylabel("true positive rate (malignant recall)")
    ax.set_title("ROC, malignant = positive")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return figure_png(fig)


# ---------------------------------------------------------------------------------- calibration
def reliability_diagram(curves: Mapping[str, Sequence[Mapping[str, Any]]],
                        labels: Mapping[str, str] | None = None) -> bytes:
    """Reliability diagram: per named set of bins (``{"lo", "hi", "n", "mean_prob", "frac_malignant"}``, as
    the evaluate JSON's ``calibration.reliability``), the share of malignant images against the mean predicted
    probability in each non-empty bin, over the diagonal of perfect calibration; below it, images per bin."""
    fig = _figure(5.2, 5.6)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax, hist = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    ax.plot([0, 1], [0, 1], ":", color="#999999", label="perfect calibration")
    drawn = False
    width = None
    for i, (name, bins) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        full = [b for b in bins if b.get("n") and b.get("mean_prob") is not None]
        if bins:
            centers = [(b["lo"] + b["hi"]) / 2 for b in bins]
            width = (bins[0]["hi"] - bins[0]["lo"]) / max(1, len(curves))
            offset = (i - (len(curves) - 1) / 2) * width
            hist.bar([c + offset for c in centers], [b.get("n") or 0 for b in bins], width, color=color, alpha=0.7)
        if full:
            ax.plot([b["mean_prob"] for b in full], [b["frac_malignant"] for b in full], "-o", color=color,
                    markersize=4, label=(labels or {}).get(name, name))
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no predictions", ha="center", color="#666666")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xticklabels([])
    ax.set_ylabel("share malignant (observed)")
    ax.set_title("Reliability of P(malignant)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    hist.set_xlim(0, 1)
    hist.set_xlabel("predicted P(malignant), equal-width bins")
    hist.set_ylabel("images")
    hist.grid(axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.94, bottom=0.1)
    return figure_png(fig)


# ----------------------------------------------------------------------------------------- bars
def metric_bars(groups: Mapping[str, Mapping[str, float | None]], metrics: Sequence[str],
                errors: Mapping[str, Mapping[str, float | None]] | None = None,
                title: str = "", ylabel: str = "%", scale: float = 100.0) -> bytes:
    """Grouped bars: one group per key of ``groups`` (e.g. ``40X``), one bar per metric; optional std bars."""
    names = list(groups)
    fig = _figure(max(5.0, 1.6 * len(names) + 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(names))
    for i, metric in enumerate(metrics):
        values = [groups[n].get(metric) for n in names]
        heights = [v * scale if isinstance(v, (int, float)) else 0.0 for v in values]
        yerr = None
        if errors is not None:
            yerr = [(errors.get(n, {}) or {}).get(metric) or 0.0 for n in names]
            yerr = [e * scale for e in yerr]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, heights, width, yerr=yerr, capsize=3,
                      label=metric.replace("_", " "), color=COLORS[i % len(COLORS)])
        for bar, v in zip(bars, values):
            text = f"{v * scale:.1f}" if isinstance(v, (int, float)) else "n/a"
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.5, text, ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(x, names)
    ax.set_ylim(0, scale * 1.12)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(metrics)), loc="upper center", bbox_to_anchor=(0.5, -0.1),
              frameon=False)
    fig.tight_layout()
    return figure_png(fig)


def class_magnification_bars(tables: Mapping[str, Any]) -> bytes:
    """Benign/malignant image counts per magnification; one panel per table (e.g. before/after enhancement).

    Each table is a pandas DataFrame indexed by magnification (``40X`` ...) with ``Benign`` and ``Malignant``
    columns (as :func:`breakhis_ray.data.manifest.class_magnification_table` returns); a ``Total`` row is ignored.
    """
    items = list(tables.items())
    fig = _figure(5.2 * len(items), 3.6)
    for i, (title, table) in enumerate(items):
        ax = fig.add_subplot(1, len(items), i + 1)
        rows = [r for r in table.index if str(r).lower() != "total"]
        x = np.arange(len(rows))
        for j, cls in enumerate(("Benign", "Malignant")):
            if cls not in table.columns:
                continue
            values = [float(table.loc[r, cls]) for r in rows]
            bars = ax.bar(x + (j - 0.5) * 0.38, values, 0.38, label=cls.lower(), color=COLORS[j])
            for bar, v in zip(bars, values):
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{int(v)}", ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(x, [str(r) for r in rows])
        ax.set_ylim(0, max(1.0, ax.get_ylim()[1]) * 1.18)  # headroom for the legend
        ax.set_ylabel("images")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=2, loc="upper center")
    fig.tight_layout()
    return figure_png(fig)


# ---------------------------------------------------------------------------------------- tiles
def prediction_tiles(tiles: Sequence[tuple[np.ndarray | None, str, bool | None]], ncols: int = 4) -> bytes:
    """A grid of ``(image or None, caption, correct)`` tiles; captions green when correct, red when wrong."""
    ncols = max(1, min(ncols, len(tiles)))
    nrows = max(1, -(-len(tiles) // ncols))
    fig = _figure(3.0 * ncols, 2.6 * nrows)
    for i, (image, caption, correct) in enumerate(tiles):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        if image is None:
            _placeholder(ax, "image unreadable")
        else:
            ax.imshow(image)
            ax.set_axis_off()
        color = "#1a7f37" if correct else ("#cf222e" if correct is False else "#333333")
        ax.set_title(caption, fontsize=8, color=color)
    fig.tight_layout()
    return figure_png(fig)


__all__ = [
    "class_magnification_bars",
    "confusion_matrices",
    "figure_png",
    "metric_bars",
    "prediction_tiles",
    "reliability_diagram",
    "roc_curve",
    "roc_plot",
    "training_curves",
]
