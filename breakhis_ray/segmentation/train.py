"""U-Net nuclei segmentation training with Ray Train (``breakhis-ray train-segmenter``).

The driver (:func:`run_train_segmenter`) lists the tree, splits it by patient, builds the image/mask Ray
datasets (:mod:`breakhis_ray.segmentation.dataset`), writes ``config.yaml`` and ``split.json`` in the run
directory and launches a ``TorchTrainer`` through :mod:`breakhis_ray.train_common`. Every worker re-validates
the dumped config, restores the latest checkpoint (weights, optimiser, scheduler, epoch, RNG, history,
early-stopping state) and runs small epoch functions; Dice/IoU statistics are summed over ranks before every
report. Checkpoints are self-describing (``model_args`` name the U-Net, ``preprocessing`` its size and
normalisation), so :meth:`UNetSegmenter.from_checkpoint` and :func:`breakhis_ray.checkpoint.load_model`
rebuild the network from the directory alone.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from breakhis_ray import storage
from breakhis_ray.config import SegTrainConfig, config_yaml
from breakhis_ray.train_common import (
    LoopState,
    all_reduce_sums,
    evaluates_on_this_rank,
    finish_epoch,
    fit,
    make_trainer,
    maybe_inject_failure,
    quiet_data_progress,
    start_worker,
    summarise,
)

#: class names stored in the checkpoint (one sigmoid output: nucleus)
LABELS = ["nucleus"]
SPLIT_FILE = "split.json"


# ------------------------------------------------------------------------------------ model pieces
def model_name(cfg: SegTrainConfig) -> str:
    return f"unet_{cfg.model.encoder}"


def build_model(cfg: SegTrainConfig):
    from breakhis_ray.models import create_model

    extra = {"decoder_channels": list(cfg.model.decoder_channels)} if cfg.model.decoder_channels else {}
    return create_model(model_name(cfg), num_classes=1, weights=cfg.model.weights, in_channels=3, **extra)


def build_optimizer(cfg: SegTrainConfig, model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = cfg.train
    if opt.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)
    elif opt.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                                    nesterov=True)
    if opt.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, opt.epochs))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


def build_loss(cfg: SegTrainConfig):
    from breakhis_ray.losses import DiceBCELoss

    return DiceBCELoss(dice_weight=cfg.loss.dice_weight, bce_weight=cfg.loss.bce_weight, gamma=cfg.loss.gamma)


def preprocess_spec(cfg: SegTrainConfig):
    from breakhis_ray.data.transforms import PreprocessSpec
    from breakhis_ray.models import preprocessing_for

    norm = preprocessing_for(model_name(cfg))
    return PreprocessSpec(size=tuple(cfg.data.image_size), scale=cfg.data.scale, mean=norm["mean"], std=norm["std"])


# ------------------------------------------------------------------------------------- epoch steps
def _autocast(device, amp: bool):
    import contextlib

    import torch

    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def _add(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value


def train_one_epoch(model, batches, loss_fn, optimizer, device, *, amp: bool, grad_clip: float | None,
                    threshold: float = 0.5, max_steps: int | None = None) -> dict[str, float]:
    """One pass over ``batches`` of ``(x, y)``; returns summed statistics (loss, Dice, IoU, images, seconds)."""
    import torch

    model.train()
    stats: dict[str, float] = {"loss_sum": 0.0, "seen": 0.0, "dice_sum": 0.0, "iou_sum": 0.0}
    steps, start = 0, time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            logits = model(x)
        loss = loss_fn(logits.float(), y)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        sums = overlap_sums(logits, y, threshold)
        _add(stats, {"loss_sum": float(loss.detach()) * len(y), "seen": float(len(y)),
                     "dice_sum": sums["dice_sum"], "iou_sum": sums["iou_sum"]})
        steps += 1
        if max_steps and steps >= max_steps:
            break
    stats["seconds"] = time.perf_counter() - start
    return stats


def evaluate(model, batches, loss_fn, device, *, amp: bool, threshold: float = 0.5) -> dict[str, float]:
    """Loss, summed per-image Dice/IoU and pixel overlap counts over ``batches``."""
    import torch

    model.eval()
    stats: dict[str, float] = {"loss_sum": 0.0, "seen": 0.0, "dice_sum": 0.0, "iou_sum": 0.0,
                               "inter": 0.0, "pred_px": 0.0, "true_px": 0.0}
    with torch.no_grad():
        for x, y in batches:
            with _autocast(device, amp):
                logits = model(x)
            _add(stats, {"loss_sum": float(loss_fn(logits.float(), y)) * len(y), "seen": float(len(y))})
            _add(stats, overlap_sums(logits, y, threshold))
    return stats


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from breakhis_ray.checkpoint import unwrap_model
    from breakhis_ray.segmentation.dataset import iter_seg_batches

    cfg, rank, world, device, amp = start_worker(SegTrainConfig, config)
    model = build_model(cfg)
    spec = preprocess_spec(cfg)
    save_kwargs = {"model_args": dict(model.model_args), "labels": LABELS, "preprocessing": spec.to_dict()}
    model = ray.train.torch.prepare_model(model)
    optimizer, scheduler = build_optimizer(cfg, model)
    loss_fn = build_loss(cfg).to(device)
    loop = LoopState.resume(cfg.run, model, optimizer, scheduler, device, rank=rank, tag="train-segmenter",
                            epochs=cfg.train.epochs)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    threshold = cfg.train.threshold
    for epoch in range(loop.epoch, cfg.train.epochs):
        maybe_inject_failure(cfg.run, epoch, rank)
        train_stats = train_one_epoch(
            model, iter_seg_batches(train_shard, cfg.train.batch_size, device, spec), loss_fn, optimizer, device,
            amp=amp, grad_clip=cfg.train.grad_clip, threshold=threshold, max_steps=cfg.train.max_steps_per_epoch)
        # val is not split: rank 0 scores all of it with the bare module (a DDP forward on one rank alone
        # would wait on a buffer broadcast); the sums reach every rank through all_reduce_sums
        val_batches = (iter_seg_batches(val_shard, cfg.train.eval_batch_size, device, spec)
                       if evaluates_on_this_rank(rank) else [])
        val_stats = evaluate(unwrap_model(model), val_batches, loss_fn, device, amp=amp, threshold=threshold)
        scheduler.step()
        metrics = epoch_metrics(all_reduce_sums(train_stats, device), all_reduce_sums(val_stats, device), world)
        metrics.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"])
        line = (f"train_loss={metrics['train_loss']:.4f} train_dice={metrics['train_dice']:.3f} "
                f"val_loss={metrics['val_loss']:.4f} val_dice={metrics['val_dice']:.3f} "
                f"val_iou={metrics['val_iou']:.3f} {metrics['train_images_per_s']:.1f} img/s")
        if finish_epoch(loop, metrics, cfg=cfg, rank=rank, tag="train-segmenter", line=line, model=model,
                        optimizer=optimizer, scheduler=scheduler, save_kwargs=save_kwargs):
            break


# ----------------------------------------------------------------------------------------- driver
def run_train_segmenter(cfg: SegTrainConfig) -> dict:
    """Train one U-Net; returns the summary (best and latest checkpoint URIs) also written to result.json."""
    from breakhis_ray.ray_utils import ensure_ray
    from breakhis_ray.segmentation.dataset import build_seg_datasets, write_split

    ensure_ray(cfg.ray)
    quiet_data_progress(cfg.run.data_progress_bars)
    spec = preprocess_spec(cfg)
    datasets = build_seg_datasets(cfg.data, spec)
    rows = datasets.pop("rows")
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    storage.write_text(storage.join(run_dir, "config.yaml"), config_yaml(cfg))
    write_split(storage.join(run_dir, SPLIT_FILE), rows, {"root": cfg.data.root, "mask_source": cfg.data.mask_source})
    counts = rows.groupby("split")["patient_id"].agg(["size", "nunique"])
    print(f"[train-segmenter] {model_name(cfg)} on {cfg.data.mask_source} masks at "
          f"{cfg.data.image_size[1]}x{cfg.data.image_size[0]}: "
          + ", ".join(f"{s} {int(counts.loc[s, 'size'])} images / {int(counts.loc[s, 'nunique'])} patients"
                      for s in counts.index)
          + f"; workers={cfg.scaling.num_workers} gpu={cfg.scaling.use_gpu} -> {run_dir}", flush=True)
    trainer = make_trainer(train_loop_per_worker, cfg, cfg.scaling, cfg.run, datasets)
    summary = summarise(cfg.run, fit(trainer, run_dir), run_dir, "train-segmenter")
    summary["split_file"] = storage.join(run_dir, SPLIT_FILE)
    return summary
