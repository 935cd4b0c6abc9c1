"""``breakhis-ray segment-eval``: threshold vs watershed vs U-Net against ground-truth nuclei masks.

Images: an explicit list, the val paths of a training run's ``split.json``, or the patient-grouped split of
:func:`breakhis_ray.segmentation.dataset.split_patients` (by default the same val patients as training).
A Ray Data ``map_batches`` stage (an actor pool that loads the segmenters once) scores every image:
per-image Dice and IoU of the foreground (any non-zero pixel of the instance masks), and the relative error
of the nucleus count (where watershed, which splits touching nuclei, differs from thresholding; their
foreground masks are identical by construction). Outputs under ``out``::

    segment_eval.json   {"methods": {"threshold": {"dice", "iou", "n", ...}, ...}, "images": N, ...}
    overlays.png        a few tiles: ground truth, then each method (nucleus contours)
    config.yaml         the resolved SegEvalConfig
    versions.json       library versions
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from breakhis_ray import storage
from breakhis_ray.artifacts import write_provenance, write_text_atomic
from breakhis_ray.config import SegEvalConfig, dump_config, validate_config
from breakhis_ray.errors import DataError

log = logging.getLogger(__name__)

RESULT_FILE = "segment_eval.json"
OVERLAY_FILE = "overlays.png"
CLASSICAL = ("threshold", "watershed")


def methods_of(cfg: SegEvalConfig) -> list[str]:
    return [*CLASSICAL, *(["unet"] if cfg.unet_checkpoint else [])]


# ------------------------------------------------------------------------------------------ images
def select_images(cfg: SegEvalConfig):
    """The evaluation rows (``path``, ``mask_path``, ``patient_id``, ...), sorted by path."""
    from breakhis_ray.segmentation.dataset import (
        cap_rows,
        check_masks,
        default_mask_root,
        mask_uri,
        pair_table,
        read_split_paths,
    )

    rows = pair_table(cfg.model_copy(update={"max_images": None}), masks=False)
    wanted: list[str] | None = None
    if cfg.images:
        wanted = [p if storage.is_s3(p) or p.startswith("/") else storage.join(cfg.root, p) for p in cfg.images]
        wanted = [storage.join(p) if not storage.is_s3(p) else p for p in wanted]
    elif cfg.split_file:
        wanted = read_split_paths(cfg.split_file, cfg.subset)
    if wanted is not None:
        unknown = sorted(set(wanted) - set(rows["path"]))
        if unknown:
            raise DataError(f"{len(unknown)} requested image(s) are not BreakHis images under {cfg.root}, "
                            f"e.g. {unknown[0]}")
        rows = rows[rows["path"].isin(set(wanted))]
    elif cfg.subset != "all":
        rows = rows[rows["split"] == cfg.subset]
    rows = cap_rows(rows, cfg.max_images, cfg.split.seed)
    if rows.empty:
        raise DataError(f"no images to evaluate under {cfg.root} (subset={cfg.subset})")
    mask_root = cfg.mask_root or default_mask_root(cfg.root)
    rows = rows.assign(mask_path=[mask_uri(p, cfg.root, mask_root, cfg.mask_suffix) for p in rows["path"]])
    check_masks(rows["mask_path"].tolist(), mask_root)
    return rows.sort_values("path", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ scoring
def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_segmenters(cfg: SegEvalConfig) -> dict[str, Any]:
    from breakhis_ray.segmentation import create_segmenter

    segs: dict[str, Any] = {
        "threshold": create_segmenter("threshold", **cfg.threshold_options),
        "watershed": create_segmenter("watershed", **cfg.watershed_options),
    }
    if cfg.unet_checkpoint:
        options = {"device": _device(cfg.device), **cfg.unet_options}
        segs["unet"] = create_segmenter("unet", checkpoint=cfg.unet_checkpoint.rstrip("/"), **options)
    return segs


def load_eval_pair(path: str, mask_path: str, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image, int64 instance labels) at native resolution or resized to ``size`` (nearest mask)."""
    from PIL import Image

    from breakhis_ray.data.decode import decode_labels, decode_rgb
    from breakhis_ray.data.transforms import resize_uint8

    image = np.array(decode_rgb(storage.read_bytes(path)))  # writable: torch.from_numpy needs it
    labels = decode_labels(storage.read_bytes(mask_path)).astype(np.int64)
    if labels.ndim == 3:
        labels = labels.any(axis=-1).astype(np.int64)
    if labels.shape != image.shape[:2]:
        raise DataError(f"mask {mask_path} is {labels.shape[1]}x{labels.shape[0]} but its image is "
                        f"{image.shape[1]}x{image.shape[0]}")
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        image = resize_uint8(image, size)
        resized = Image.fromarray(labels.astype(np.int32)).resize((size[1], size[0]), Image.Resampling.NEAREST)
        labels = np.asarray(resized).astype(np.int64)
    return image, labels


def _count(labels: np.ndarray) -> int:
    ids = np.unique(labels)
    return int((ids > 0).sum())


def score_image(segs: dict[str, Any], image: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """Per method: ``dice``, ``iou`` of the foreground, ``count`` of predicted nuclei; plus the true count."""
    from breakhis_ray.segmentation.metrics import dice, iou

    out: dict[str, dict[str, float]] = {}
    for name, seg in segs.items():
        result = seg.segment(image)
        out[name] = {"dice": dice(result.masks[0], truth), "iou": iou(result.masks[0], truth),
                     "count": float(_count(result.labels[0]))}
    return out


class EvalBatch:
    """Ray Data UDF (actor): rows ``path``/``mask_path`` -> one score row per image and method."""

    def __init__(self, cfg: dict):
        import torch

        self.cfg = validate_config(SegEvalConfig, cfg)
        torch.set_num_threads(max(1, round(self.cfg.num_cpus)))
        self.segs = build_segmenters(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"path": [], "method": [], "dice": [], "iou": [], "count": [], "true_count": []}
        for path, mask_path in zip(batch["path"], batch["mask_path"]):
            image, truth = load_eval_pair(str(path), str(mask_path), self.cfg.eval_size)
            true_count = _count(truth)
            for method, s in score_image(self.segs, image, truth).items():
                for key, value in (("path", str(path)), ("method", method), ("dice", s["dice"]), ("iou", s["iou"]),
                                   ("count", s["count"]), ("true_count", true_count)):
                    rows[key].append(value)
        return {"path": np.asarray(rows["path"], dtype=object), "method": np.asarray(rows["method"], dtype=object),
                **{k: np.asarray(rows[k], dtype=np.float64) for k in ("dice", "iou", "count", "true_count")}}


def summarise_scores(scores, methods: list[str]) -> dict[str, dict[str, float]]:
    """Mean ± std of Dice and IoU per method and the mean relative nucleus-count error."""
    out = {}
    for method in methods:
        part = scores[scores["method"] == method]
        rel = np.abs(part["count"] - part["true_count"]) / np.maximum(part["true_count"], 1)
        out[method] = {
            "dice": float(part["dice"].mean()), "iou": float(part["iou"].mean()), "n": int(len(part)),
            "dice_std": float(part["dice"].std(ddof=0)), "iou_std": float(part["iou"].std(ddof=0)),
            "count_rel_error": float(rel.mean()),
        }
    return out


def write_overlays(cfg: SegEvalConfig, rows, segs: dict[str, Any]) -> str | None:
    """``overlays.png``: per tile, ground truth then every method (one row per tile)."""
    from breakhis_ray.segmentation.overlay import save_overlay_grid

    if cfg.overlay_images == 0:
        return None
    picked = rows.groupby("patient_id", sort=True).head(1).head(cfg.overlay_images)
    if len(picked) < cfg.overlay_images:
        picked = rows.head(cfg.overlay_images)
    images, masks, titles = [], [], []
    for path, mask_path in zip(picked["path"], picked["mask_path"]):
        image, truth = load_eval_pair(path, mask_path, cfg.eval_size)
        name = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        images.append(image), masks.append(truth), titles.append(f"{name}\nground truth")
        for method, seg in segs.items():
            result = seg.segment(image)
            images.append(image), masks.append(result.labels[0]), titles.append(method)
    uri = storage.join(cfg.out, OVERLAY_FILE)
    save_overlay_grid(images, masks, uri, titles=titles, ncols=len(segs) + 1)
    return uri


def format_table(methods: dict[str, dict[str, float]]) -> str:
    lines = [f"{'method':<10} {'dice':>12} {'iou':>12} {'count err':>10} {'n':>5}"]
    for name, m in methods.items():
        lines.append(f"{name:<10} {m['dice']:.3f}±{m['dice_std']:.3f} {m['iou']:.3f}±{m['iou_std']:.3f} "
                     f"{m['count_rel_error']:>10.3f} {m['n']:>5}")
    return "\n".join(lines)


def run_segment_eval(cfg: SegEvalConfig) -> dict:
    """Score every method on the selected images; write the JSON, the overlay grid and the config."""
    import pandas as pd
    import ray.data

    from breakhis_ray.ray_utils import ensure_ray

    ensure_ray(cfg.ray)
    rows = select_images(cfg)
    methods = methods_of(cfg)
    n_blocks = max(1, min(len(rows), 4 * cfg.concurrency))
    table = rows[["path", "mask_path"]]
    ds = ray.data.from_pandas([table.iloc[i::n_blocks] for i in range(n_blocks)])
    scored = ds.map_batches(EvalBatch, fn_constructor_kwargs={"cfg": dump_config(cfg)}, batch_size=cfg.batch_size,
                            batch_format="numpy", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus or None,
                            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency))
    scores = pd.DataFrame(scored.to_pandas()).sort_values(["path", "method"], kind="stable")
    summary = {
        "methods": summarise_scores(scores, methods),
        "images": int(len(rows)),
        "patients": int(rows["patient_id"].nunique()),
        "root": cfg.root,
        "unet_checkpoint": cfg.unet_checkpoint,
        "eval_size": list(cfg.eval_size) if cfg.eval_size else "native",
        "metric_notes": "per-image Dice/IoU of the nuclei foreground, averaged over images; count_rel_error = "
                        "mean |predicted - true nuclei| / true nuclei",
        "per_image": {m: scores[scores["method"] == m][["path", "dice", "iou"]].to_dict("records") for m in methods},
    }
    overlay = write_overlays(cfg, rows, build_segmenters(cfg))
    summary["overlays"] = overlay
    write_text_atomic(storage.join(cfg.out, RESULT_FILE), json.dumps(summary, indent=2) + "\n")
    write_provenance(cfg.out, cfg)
    size = "native size" if cfg.eval_size is None else f"{cfg.eval_size[1]}x{cfg.eval_size[0]}"
    log.info("[segment-eval] %d images of %d patients (%s)", summary["images"], summary["patients"], size)
    log.info("%s", format_table(summary["methods"]))
    log.info("[segment-eval] wrote %s%s", storage.join(cfg.out, RESULT_FILE), f" and {overlay}" if overlay else "")
    return summary
