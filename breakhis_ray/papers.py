"""The two reproduced papers' tables: titles, table keys, the numbers they publish and the grid's columns.

One home for what the experiment grid (``breakhis_ray.experiments``) and the report (``breakhis_ray.report``)
both need to know about the papers. Pure Python: no Ray, no torch, no pandas.

Table keys (the grid's ``table`` column and ``ExperimentsConfig.tables``):

==================  ===============================================================================
``vgg_tab3``        VGG + focal loss paper, Tab. 3: accuracy per loss function
``vgg_fig4``        VGG + focal loss paper, Fig. 4: accuracy per training strategy
``vgg_tab4``        VGG + focal loss paper, Tab. 4: recognition accuracy per magnification
``cancernet_tab1``  CancerNet paper, Table 1: precision, recall, F1 per CNN with and without U-Net
==================  ===============================================================================
"""

from __future__ import annotations

import re
from typing import Any

PAPER_VGG = "Classification of breast cancer histopathological images based on CNN (VGG + focal loss)"
PAPER_CANCERNET = ("Anu Krishnan K R, N. Satyabalaji: CancerNet classifier for breast cancer classification "
                   "using deep neural networks and U-Net segmentation (IJNRD 7(6), 2022)")

#: Label of a published row wherever it appears next to ours.
PUBLISHED_LABEL = "published (image-level split, as reported)"

#: The papers' numbers, as legible in their text. Values are the papers' own strings (percent or fraction).
#: Each table: ``title``, ``paper``, ``keys`` (setting columns of a row), optional ``pivot`` (a column whose
#: values become columns), ``metrics``, ``percent`` (values shown as percentages), ``rows``
#: (``(settings, {column: published value}, remark)``) and ``note``.
PUBLISHED: dict[str, dict[str, Any]] = {
    "vgg_tab3": {
        "title": "Tab. 3: accuracy with different loss functions (VGG + focal loss paper)",
        "paper": PAPER_VGG,
        "keys": ("loss",),
        "metrics": ("accuracy", "patient_recognition_rate"),
        "percent": True,
        "rows": [({"loss": "focal"}, {"accuracy": "96.96"},
                  "mean recognition rate over the four magnifications (abstract)")],
        "note": "Only the focal-loss model's mean recognition rate (96.96%) is legible in the source text; the "
                "cross-entropy cells of Tab. 3 are not. The paper does not describe a patient-disjoint split.",
    },
    "vgg_fig4": {
        "title": "Fig. 4: accuracy under four training strategies (VGG + focal loss paper)",
        "paper": PAPER_VGG,
        "keys": ("strategy",),
        "metrics": ("accuracy", "patient_recognition_rate"),
        "percent": True,
        "rows": [],
        "note": "Fig. 4 is a chart; no numbers are legible in the source text, so only our runs are listed.",
    },
    "vgg_tab4": {
        "title": "Tab. 4: recognition accuracy per magnification (VGG + focal loss paper)",
        "paper": PAPER_VGG,
        "keys": ("model", "loss"),
        "pivot": "magnification",
        "metrics": ("accuracy",),
        "percent": True,
        "rows": [({"model": "vgg", "loss": "focal"},
                  {"40": "> 97", "100": "> 97", "mean": "96.96"},
                  "the paper's model; per-magnification cells other than '> 97%' at 40X/100X are not legible")],
        "note": "Published: mean 96.96% over 40X-400X and above 97% at 40X and 100X (the source text is partly "
                "garbled; the exact per-magnification values and the compared methods' rows are not legible).",
    },
    "cancernet_tab1": {
        "title": "Table 1: precision, recall and F1 per CNN with and without U-Net (CancerNet paper)",
        "paper": PAPER_CANCERNET,
        "keys": ("model", "segmentation"),
        "metrics": ("precision", "recall", "f1", "accuracy"),
        "percent": False,
        "rows": [
            ({"model": "vgg", "segmentation": "none"}, {"precision": "1.000"}, "text: VGG precision 1 (100%)"),
            ({"model": "vgg", "segmentation": "unet"}, {"precision": "1.000", "f1": "0.994"},
             "text: VGG + U-Net precision 1, best F1 0.994"),
            ({"model": "densenet", "segmentation": "none"}, {"recall": "1.000"}, "text: DenseNet recall 1 (100%)"),
            ({"model": "densenet", "segmentation": "unet"}, {"recall": "1.000"},
             "text: DenseNet + U-Net recall 1 (100%)"),
        ],
        "note": "Only the cells named in the paper's text are known (the table itself is an image). Its test set "
                "is 1,000 images (5,220 train / 2,689 validation), most likely split by image.",
    },
}

#: Every table key, in the papers' order.
TABLES: tuple[str, ...] = tuple(PUBLISHED)

#: Metric column -> label shown in tables (report and ``tables.md``).
METRIC_LABELS: dict[str, str] = {
    "accuracy": "accuracy (image recognition rate)",
    "precision": "precision",
    "recall": "recall (sensitivity)",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "balanced_accuracy": "balanced accuracy",
    "patient_recognition_rate": "patient recognition rate",
    "patient_accuracy": "patient diagnosis accuracy",
}

#: Grid columns that may name a row's setting (beyond a table's own ``keys``).
KEY_CANDIDATES: tuple[str, ...] = ("model", "loss", "strategy", "segmentation", "magnification")
#: Grid columns that may hold the segmentation setting, preferred first.
SEGMENTATION_COLUMNS: tuple[str, ...] = ("segmentation", "segmenter", "seg")

_TABLE_ALIASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cancernet_tab1", ("cancernet", "unet", "segmentation")),
    ("vgg_tab3", ("tab3", "table3", "loss")),
    ("vgg_fig4", ("fig4", "figure4", "strateg")),
    ("vgg_tab4", ("tab4", "table4", "magnif")),
)


def canonical_table(name: Any) -> str:
    """Map a grid ``table`` value to a key of :data:`PUBLISHED` (unknown names are returned as they are)."""
    text = str(name)
    key = re.sub(r"[^a-z0-9]", "", text.lower())
    for canonical, needles in _TABLE_ALIASES:
        if key == canonical.replace("_", "") or any(n in key for n in needles):
            return canonical
    return text


def grid_columns(name: str) -> tuple[str, list[str], list[str], bool]:
    """``(title, key columns, metric columns, percent)`` of a table as the grid's ``tables.md`` shows it.

    The VGG tables also show the patient recognition rate; Fig. 4 rows are told apart by their weights too.
    """
    spec = PUBLISHED[name]
    keys = list(spec["keys"]) + ([spec["pivot"]] if spec.get("pivot") else [])
    metrics = list(spec["metrics"])
    if name in ("vgg_tab3", "vgg_fig4", "vgg_tab4") and "patient_recognition_rate" not in metrics:
        metrics.append("patient_recognition_rate")
    if name == "vgg_fig4":
        keys.append("weights")
    return spec["title"], keys, metrics, bool(spec["percent"])


__all__ = ["KEY_CANDIDATES", "METRIC_LABELS", "PAPER_CANCERNET", "PAPER_VGG", "PUBLISHED", "PUBLISHED_LABEL",
           "SEGMENTATION_COLUMNS", "TABLES", "canonical_table", "grid_columns"]
