"""Offline class balancing ("data enhancement", Tab. 2 of the VGG + focal loss paper).

``prepare`` writes deterministic augmented copies of *training* images of the minority class, per
magnification, until both classes have the same number of training images (``target: balance``) or each
class reaches ``target`` images per magnification. Validation and test images are never copied.

Recipes. A copy applies one geometric transform (``hflip``, ``vflip``, ``rot90``, ``rot180``, ``rot270``, in
the configured order; quarter turns only for square images, as in :mod:`breakhis_ray.data.augment`) and, when
``hed_jitter`` is configured, a stain jitter drawn from a generator seeded by ``(seed, source path, copy
index)``. Without ``hed_jitter`` an image gets at most one copy per geometric transform; with it, further
rounds repeat the geometric transforms with new jitter draws (``rot90+hed_jitter#1``, ...). The copy's
``augmentation`` column holds that name and its ``path`` is ``<source path>#aug=<name>``.

Which images are copied: the deficit of a (magnification, class) cell is spread round-robin over that cell's
training images in a seeded order, so every source gets ``floor`` or ``ceil`` of deficit/sources copies and
patients are covered evenly. Everything is a pure function of the valid images, the config and the seed.

The classes are the binary labels (``balance: label``) or the eight subtypes (``balance: subtype``, for the
subtype task: every subtype of a magnification is brought up to the largest one, or to ``target``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from breakhis_ray.config import EnhanceConfig
from breakhis_ray.data.augment import hed_jitter, path_keys
from breakhis_ray.data.manifest import class_magnification_table
from breakhis_ray.domain import LABEL_IDS, LABELS, SUBTYPE_CLASSES
from breakhis_ray.errors import DataError

GEOMETRIC = ("hflip", "vflip", "rot90", "rot180", "rot270")
QUARTER_TURNS = ("rot90", "rot270")
DEFAULT_HED_SIGMA = 0.03
MAX_COPIES_PER_IMAGE = 100
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Recipe:
    """One augmented copy: a geometric transform and/or a seeded HED jitter draw."""

    name: str
    geometric: str | None
    hed_sigma: float | None
    index: int  # copy index of this source (0-based): seeds the jitter draw


def _hed_sigma(transforms: list[str]) -> float | None:
    for item in transforms:
        if item.startswith("hed_jitter"):
            return float(item[len("hed_jitter("):-1]) if "(" in item else DEFAULT_HED_SIGMA
    return None


def _geometric(transforms: list[str], square: bool) -> list[str]:
    return [t for t in transforms if t in GEOMETRIC and (square or t not in QUARTER_TURNS)]


def max_copies(transforms: list[str], square: bool) -> int:
    """How many distinct copies one image can get (capped at ``MAX_COPIES_PER_IMAGE``)."""
    if _hed_sigma(transforms) is not None:
        return MAX_COPIES_PER_IMAGE
    return min(len(_geometric(transforms, square)), MAX_COPIES_PER_IMAGE)


def recipe(transforms: list[str], square: bool, index: int) -> Recipe:
    """The ``index``-th copy recipe of an image (see the module docstring)."""
    if not 0 <= index < max_copies(transforms, square):
        raise DataError(f"copy {index} is beyond the {max_copies(transforms, square)} the transforms allow")
    sigma = _hed_sigma(transforms)
    geo = _geometric(transforms, square)
    if geo:
        g, round_ = geo[index % len(geo)], index // len(geo)
        name = g + ("+hed_jitter" if sigma is not None else "")
    else:
        g, round_ = None, index
        name = "hed_jitter"
    if round_:
        name += f"#{round_}"
    return Recipe(name=name, geometric=g, hed_sigma=sigma, index=index)


def apply_recipe(img: np.ndarray, rec: Recipe, seed: int, source_path: str) -> np.ndarray:
    """Apply ``rec`` to a ``uint8 (H, W, 3)`` image; deterministic for ``(seed, source_path, rec.index)``."""
    out = img
    if rec.geometric == "hflip":
        out = out[:, ::-1]
    elif rec.geometric == "vflip":
        out = out[::-1]
    elif rec.geometric in ("rot90", "rot180", "rot270"):
        out = np.rot90(out, {"rot90": 1, "rot180": 2, "rot270": 3}[rec.geometric])
    if rec.hed_sigma is not None:
        key = int(path_keys([source_path])[0]) & _MASK64
        rng = np.random.default_rng([int(seed) & _MASK64, key, rec.index])
        out = hed_jitter(np.ascontiguousarray(out), rng, rec.hed_sigma)
    return np.ascontiguousarray(out, dtype=np.uint8)


def plan_enhancement(valid: pd.DataFrame, cfg: EnhanceConfig) -> tuple[pd.DataFrame, list[str]]:
    """Copies to make from the valid originals of one fold.

    ``valid`` needs ``path, label, magnification, split, image_width, image_height`` (and ``subtype`` for
    ``balance: subtype``). Returns a frame ``source_path, augmentation, path, copy`` (sorted by source path,
    then copy index) and notes to print (cells that could not reach their target).
    """
    columns = ["source_path", "augmentation", "path", "copy"]
    notes: list[str] = []
    if not cfg.enabled or valid.empty:
        return pd.DataFrame(columns=columns), notes
    column, classes = ("subtype", SUBTYPE_CLASSES) if cfg.balance == "subtype" else ("label", LABELS)
    # seed stream per class: the binary labels keep their ids; subtypes follow them (2, 3, ...)
    class_keys = dict(LABEL_IDS) if column == "label" else {c: len(LABELS) + i for i, c in enumerate(classes)}
    train = valid[valid["split"] == "train"]
    rows: list[tuple[str, str, str, int]] = []
    for mag in sorted(int(m) for m in train["magnification"].unique()):
        cell = train[train["magnification"] == mag]
        counts = {label: int((cell[column] == label).sum()) for label in classes}
        target = max(counts.values()) if cfg.target == "balance" else int(cfg.target)
        for label in classes:
            deficit = target - counts[label]
            if deficit <= 0:
                continue
            sources = cell[cell[column] == label].sort_values("path", kind="stable")
            if sources.empty:
                notes.append(f"{mag}X {label}: no training image to copy (target {target})")
                continue
            rng = np.random.default_rng([int(cfg.seed) & _MASK64, mag, class_keys[label]])
            order = sources.iloc[rng.permutation(len(sources))]
            paths = order["path"].tolist()
            squares = (order["image_width"] == order["image_height"]).tolist()
            caps = [max_copies(cfg.transforms, sq) for sq in squares]
            made = 0
            for round_ in range(max(caps)):
                for path, square, cap in zip(paths, squares, caps):
                    if made == deficit:
                        break
                    if round_ < cap:
                        rec = recipe(cfg.transforms, square, round_)
                        rows.append((path, rec.name, f"{path}#aug={rec.name}", round_))
                        made += 1
                if made == deficit:
                    break
            if made < deficit:
                notes.append(f"{mag}X {label}: {counts[label] + made} of {target} training images after "
                             f"{made} copies (the transforms allow no more; add hed_jitter for more)")
    plan = pd.DataFrame(rows, columns=columns)
    return plan.sort_values(["source_path", "copy"], kind="stable").reset_index(drop=True), notes


def distribution(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per magnification x class with totals, as ``{"40X": {"Benign": n, "Malignant": n, "Total": n}}``."""
    table = class_magnification_table(df)
    return {str(row): {str(col): int(v) for col, v in values.items()} for row, values in
            table.to_dict(orient="index").items()}


def subtype_distribution(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per magnification x subtype, as ``{"40X": {"adenosis": n, ..., "Total": n}}`` (no total row)."""
    out: dict[str, dict[str, int]] = {}
    for mag in sorted(int(m) for m in df["magnification"].unique()) if len(df) else []:
        cell = df[df["magnification"] == mag]
        row = {name: int((cell["subtype"] == name).sum()) for name in SUBTYPE_CLASSES}
        row["Total"] = int(len(cell))
        out[f"{mag}X"] = row
    return out


def format_distribution(df: pd.DataFrame, title: str) -> str:
    """A printable table (the paper's Tab. 1 / Tab. 2 layout) under ``title``."""
    return f"{title}\n{class_magnification_table(df).to_string()}"
