"""U-Net nuclei segmentation training with Ray Train (``breakhis-ray train-segmenter``).

The driver (:func:`run_train_segmenter`) lists the tree, splits it by patient, builds the image/mask Ray
datasets (:mod:`breakhis_ray.segmentation.dataset`), writes ``config.yaml`` and ``split.json`` in the run
directory and launches a ``TorchTrainer``. Every worker runs the shared epoch loop
(:mod:`breakhis_ray.train.ray_glue`, :mod:`breakhis_ray.train.loop`) with the U-Net's pieces: Dice + BCE (or
focal) loss and per-image Dice/IoU plus pixel overlap counts, summed over ranks before every report.
Checkpoints are self-describing (``model_args`` name the U-Net, ``preprocessing`` its size and normalisation),
so :meth:`UNetSegmenter.from_checkpoint` and :func:`breakhis_ray.checkpoint.load_model` rebuild the network
from the directory alone.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from breakhis_ray import storage
from breakhis_ray.artifacts import write_provenance
from breakhis_ray.config import SegTrainConfig
from breakhis_ray.train import loop
from breakhis_ray.train.ray_glue import launch, run_epochs, start_driver, start_worker

log = logging.getLogger(__name__)
TAG = "train-segmenter"
#: class names stored in the checkpoint (one sigmoid output: nucleus)
LABELS = ("nucleus",)
SPLIT_FILE = "split.json"
#: the zero of :func:`batch_stats`
ZERO_SUMS = {"loss_sum": 0.0, "seen": 0.0, "dice_sum": 0.0, "iou_sum": 0.0, "inter": 0.0, "pred_px": 0.0,
             "true_px": 0.0}


# ------------------------------------------------------------------------------------ model pieces
def model_name(cfg: SegTrainConfig) -> str:
    return f"unet_{cfg.model.encoder}"


def build_model(cfg: SegTrainConfig):
    from breakhis_ray.models import create_model

    extra = {"decoder_channels": list(cfg.model.decoder_channels)} if cfg.model.decoder_channels else {}
    return create_model(model_name(cfg), num_classes=1, weights=cfg.model.weights, in_channels=3, **extra)


def build_loss(cfg: SegTrainConfig):
    from breakhis_ray.losses import DiceBCELoss

    return DiceBCELoss(dice_weight=cfg.loss.dice_weight, bce_weight=cfg.loss.bce_weight, gamma=cfg.loss.gamma)


def segmenter_spec(cfg: SegTrainConfig):
    """The U-Net's eval/inference preprocessing (saved in its checkpoints)."""
    return loop.preprocess_spec(model_name(cfg), cfg.data)


# ------------------------------------------------------------------------------------- epoch pieces
def overlap_sums(logits, target, threshold: float = 0.5) -> dict[str, float]:
    """Summed per-image Dice and IoU (:mod:`breakhis_ray.segmentation.metrics`) and pixel counts of a batch."""
    import torch

    from breakhis_ray.segmentation.metrics import dice, iou

    pred = (torch.sigmoid(logits.detach().float()) > threshold).cpu().numpy()[:, 0]
    truth = (target.detach() > 0.5).cpu().numpy()[:, 0]
    return {
        "dice_sum": float(sum(dice(p, t) for p, t in zip(pred, truth))),
        "iou_sum": float(sum(iou(p, t) for p, t in zip(pred, truth))),
        "inter": float(np.logical_and(pred, truth).sum()),
        "pred_px": float(pred.sum()),
        "true_px": float(truth.sum()),
    }


def batch_stats(loss, logits, y, *, threshold: float = 0.5) -> dict[str, float]:
    """Loss sum, image count and :func:`overlap_sums` of one batch."""
    return {"loss_sum": float(loss) * len(y), "seen": float(len(y)), **overlap_sums(logits, y, threshold)}


def epoch_metrics(train: dict, val: dict, world_size: int) -> dict[str, float]:
    n_train, n_val = max(1.0, train["seen"]), max(1.0, val["seen"])
    px = val["pred_px"] + val["true_px"]
    union = px - val["inter"]
    return {
        "train_loss": train["loss_sum"] / n_train,
        "train_dice": train["dice_sum"] / n_train,
        "val_loss": val["loss_sum"] / n_val,
        "val_dice": val["dice_sum"] / n_val,
        "val_iou": val["iou_sum"] / n_val,
        "val_pixel_dice": 2 * val["inter"] / px if px else 1.0,
        "val_pixel_iou": val["inter"] / union if union else 1.0,
        "val_images": val["seen"],
        # each rank timed its own share; the slowest bounds the epoch
        "train_images_per_s": train["seen"] / max(1e-9, train["seconds"] / world_size),
    }


def describe(metrics: dict) -> str:
    """The per-epoch log line."""
    return (f"train_loss={metrics['train_loss']:.4f} train_dice={metrics['train_dice']:.3f} "
            f"val_loss={metrics['val_loss']:.4f} val_dice={metrics['val_dice']:.3f} "
            f"val_iou={metrics['val_iou']:.3f} {metrics['train_images_per_s']:.1f} img/s")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train.torch

    from breakhis_ray.segmentation.dataset import iter_seg_batches

    worker = start_worker(SegTrainConfig, config)
    cfg = worker.cfg
    spec = segmenter_spec(cfg)
    model = ray.train.torch.prepare_model(build_model(cfg))
    optimizer, scheduler = loop.build_optimizer(cfg.train, [p for p in model.parameters() if p.requires_grad])
    stats = functools.partial(batch_stats, threshold=cfg.train.threshold)
    learner = worker.learner(model, build_loss(cfg).to(worker.device), optimizer, scheduler, stats, ZERO_SUMS)
    run_epochs(worker, learner, tag=TAG, labels=LABELS, spec=spec, epoch_metrics=epoch_metrics, describe=describe,
               batches=lambda shard, batch_size, epoch: iter_seg_batches(shard, batch_size, worker.device, spec,
                                                                         epoch=epoch))


# ----------------------------------------------------------------------------------------- driver
def run_train_segmenter(cfg: SegTrainConfig) -> dict:
    """Train one U-Net; returns the summary (best and latest checkpoint URIs) also written to result.json."""
    from breakhis_ray.segmentation.dataset import build_seg_datasets, write_split

    run_dir = start_driver(cfg)
    datasets = build_seg_datasets(cfg.data, segmenter_spec(cfg))
    rows = datasets.pop("rows")
    write_provenance(run_dir, cfg)
    write_split(storage.join(run_dir, SPLIT_FILE), rows, {"root": cfg.data.root, "mask_source": cfg.data.mask_source})
    counts = rows.groupby("split")["patient_id"].agg(["size", "nunique"])
    log.info("[%s] %s on %s masks at %dx%d: %s; workers=%d gpu=%s -> %s", TAG, model_name(cfg), cfg.data.mask_source,
             cfg.data.image_size[1], cfg.data.image_size[0],
             ", ".join(f"{s} {int(counts.loc[s, 'size'])} images / {int(counts.loc[s, 'nunique'])} patients"
                       for s in counts.index),
             cfg.scaling.num_workers, cfg.scaling.use_gpu, run_dir)
    summary = launch(train_loop_per_worker, cfg, datasets, run_dir, TAG)
    summary["split_file"] = storage.join(run_dir, SPLIT_FILE)
    return summary
