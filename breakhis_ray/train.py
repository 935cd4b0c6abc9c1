"""Classifier training with Ray Train: ``TorchTrainer`` + DDP, per-epoch reports with checkpoints, resume.

The driver (`run_train`) builds the Ray datasets from the prepared shards and launches the trainer; every
worker runs `train_loop_per_worker`, which re-validates the dumped config, restores the latest checkpoint
(model, optimiser, scheduler, epoch, RNG, history, early-stopping state) and runs small epoch functions.
"""

from __future__ import annotations

import time
from typing import Any

from breakhis_ray import storage
from breakhis_ray.config import TrainConfig, config_yaml
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

LABELS = ["benign", "malignant"]

# Transfer-learning strategies (VGG paper, Fig. 4) plus the common warm-up schedule:
# name -> (use pretrained weights, epochs with a frozen backbone (None = always), online augmentation)
STRATEGIES: dict[str, tuple[bool, int | None, bool]] = {
    "scratch": (False, 0, False),
    "frozen": (True, None, False),
    "finetune": (True, 0, False),
    "finetune_aug": (True, 0, True),
    "warmup_finetune": (True, -1, True),  # -1: cfg.train.warmup_epochs
}


def strategy_plan(cfg: TrainConfig) -> tuple[bool, int | None, bool]:
    """(load pretrained weights, frozen-backbone epochs or None for always, online augmentation)."""
    pretrained, frozen_epochs, augment = STRATEGIES[cfg.train.strategy]
    if frozen_epochs == -1:
        frozen_epochs = cfg.train.warmup_epochs
    return pretrained and cfg.model.weights is not None, frozen_epochs, augment


def guidance_stages(cfg: TrainConfig, data_cfg) -> dict:
    """Pipeline hooks for segmentation-guided classification (none when ``guidance.method == none``)."""
    from breakhis_ray.segmentation.guided import check_in_channels

    check_in_channels(cfg.guidance, cfg.model.in_channels)
    if cfg.guidance.method == "none":
        return {}
    from breakhis_ray.segmentation.dataset import PairAugment
    from breakhis_ray.segmentation.guided import apply_guidance

    spec = preprocess_spec(cfg)
    hooks: dict = {"after_decode": lambda ds: apply_guidance(ds, cfg.guidance, spec)}
    if cfg.guidance.in_channels == 4:  # the mask channel must turn with the image
        hooks["augment_udf"] = PairAugment(data_cfg.augment, data_cfg.seed, drop_key=False)
    return hooks


def _backbone_frozen(frozen_epochs: int | None, epoch: int) -> bool:
    return frozen_epochs is None or epoch < frozen_epochs


# ------------------------------------------------------------------------------------ model pieces
def build_model(cfg: TrainConfig):
    from breakhis_ray.models import create_model

    pretrained, _, _ = strategy_plan(cfg)
    return create_model(
        cfg.model.name,
        num_classes=len(LABELS),
        weights=cfg.model.weights if pretrained else None,
        in_channels=cfg.model.in_channels,
        dropout=cfg.model.dropout,
    )


def build_optimizer(cfg: TrainConfig, model):
    """Two parameter groups (backbone, head) so a warm-up can unfreeze the backbone at a lower lr."""
    import torch

    from breakhis_ray.models import split_backbone_head

    backbone, head = split_backbone_head(model)
    groups = [
        {"params": backbone, "lr": cfg.train.lr * cfg.train.backbone_lr_factor, "name": "backbone"},
        {"params": head, "lr": cfg.train.lr, "name": "head"},
    ]
    opt = cfg.train.optimizer
    if opt == "adam":
        optimizer = torch.optim.Adam(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    elif opt == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum,
                                    weight_decay=cfg.train.weight_decay, nesterov=True)
    if cfg.train.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.train.epochs))
    elif cfg.train.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.train.step_size, gamma=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


def preprocess_spec(cfg: TrainConfig):
    from breakhis_ray.data.transforms import PreprocessSpec
    from breakhis_ray.models import preprocessing_for

    norm = preprocessing_for(cfg.model.name)
    return PreprocessSpec(
        size=tuple(cfg.data.image_size),
        scale=cfg.data.scale,
        mean=norm["mean"],
        std=norm["std"],
        stain_normalization=cfg.data.stain_normalization,
    )


# ------------------------------------------------------------------------------------- epoch steps
def _autocast(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(model, batches, loss_fn, optimizer, device, *, amp: bool, grad_clip: float | None,
                    max_steps: int | None = None) -> dict[str, float]:
    """One pass over ``batches`` (iterable of (x, y) tensors on ``device``); returns summed statistics."""
    import contextlib

    import torch

    model.train()
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device) if amp else contextlib.nullcontext():
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        steps += 1
        if max_steps and steps >= max_steps:
            break
    elapsed = time.perf_counter() - start
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "seconds": elapsed}


def evaluate(model, batches, loss_fn, device, *, amp: bool) -> dict[str, float]:
    """Loss and binary confusion counts (malignant = 1 positive) over ``batches``."""
    import contextlib

    import torch

    model.eval()
    stats = {"loss_sum": 0.0, "tp": 0, "tn": 0, "fp": 0, "fn": 0, "seen": 0}
    with torch.no_grad():
        for x, y in batches:
            with _autocast(device) if amp else contextlib.nullcontext():
                logits = model(x)
            stats["loss_sum"] += float(loss_fn(logits.float(), y)) * len(y)
            pred = logits.argmax(1)
            stats["tp"] += int(((pred == 1) & (y == 1)).sum())
            stats["tn"] += int(((pred == 0) & (y == 0)).sum())
            stats["fp"] += int(((pred == 1) & (y == 0)).sum())
            stats["fn"] += int(((pred == 0) & (y == 1)).sum())
            stats["seen"] += len(y)
    return stats


def epoch_metrics(train: dict, val: dict, world_size: int) -> dict[str, float]:
    tp, tn, fp, fn = val["tp"], val["tn"], val["fp"], val["fn"]
    n_val = max(1.0, val["seen"])
    sens = tp / (tp + fn) if tp + fn else 0.0
    spec = tn / (tn + fp) if tn + fp else 0.0
    return {
        "train_loss": train["loss_sum"] / max(1.0, train["seen"]),
        "train_accuracy": train["correct"] / max(1.0, train["seen"]),
        "val_loss": val["loss_sum"] / n_val,
        "val_accuracy": (tp + tn) / n_val,
        "val_balanced_accuracy": (sens + spec) / 2,
        "val_f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "val_images": val["seen"],
        # each rank timed its own share; the slowest bounds the epoch
        "train_images_per_s": train["seen"] / max(1e-9, train["seconds"] / world_size),
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from breakhis_ray.checkpoint import unwrap_model
    from breakhis_ray.data.pipeline import iter_train_batches
    from breakhis_ray.losses import create_loss
    from breakhis_ray.models import set_backbone_trainable

    cfg, rank, world, device, amp = start_worker(TrainConfig, config)
    _, frozen_epochs, _ = strategy_plan(cfg)
    model = build_model(cfg)
    spec = preprocess_spec(cfg)
    save_kwargs = {"model_args": dict(model.model_args), "labels": LABELS, "preprocessing": spec.to_dict()}
    set_backbone_trainable(model, not _backbone_frozen(frozen_epochs, 0))
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer, scheduler = build_optimizer(cfg, model)
    loss_fn = create_loss(cfg.loss.name, class_counts=cfg.loss.class_counts, alpha=cfg.loss.alpha,
                          gamma=cfg.loss.gamma, label_smoothing=cfg.loss.label_smoothing).to(device)
    loop = LoopState.resume(cfg.run, model, optimizer, scheduler, device, rank=rank, tag="train",
                            epochs=cfg.train.epochs)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(loop.epoch, cfg.train.epochs):
        maybe_inject_failure(cfg.run, epoch, rank)
        frozen = _backbone_frozen(frozen_epochs, epoch)
        set_backbone_trainable(model, not frozen)
        train_stats = train_one_epoch(
            model, iter_train_batches(train_shard, cfg.train.batch_size, device, spec, in_channels=cfg.model.in_channels),
            loss_fn, optimizer, device, amp=amp, grad_clip=cfg.train.grad_clip,
            max_steps=cfg.train.max_steps_per_epoch)
        val_batches = iter_train_batches(val_shard, cfg.train.eval_batch_size, device, spec,
                                         in_channels=cfg.model.in_channels) if evaluates_on_this_rank(rank) else []
        # the bare module: a DDP forward on one rank alone would wait on a buffer broadcast
        val_stats = evaluate(unwrap_model(model), val_batches, loss_fn, device, amp=amp)
        scheduler.step()
        metrics = epoch_metrics(all_reduce_sums(train_stats, device), all_reduce_sums(val_stats, device), world)
        metrics.update(epoch=epoch + 1, backbone_frozen=frozen, lr=optimizer.param_groups[-1]["lr"])
        line = (f"train_loss={metrics['train_loss']:.4f} train_acc={metrics['train_accuracy']:.3f} "
                f"val_loss={metrics['val_loss']:.4f} val_acc={metrics['val_accuracy']:.3f} "
                f"val_bal_acc={metrics['val_balanced_accuracy']:.3f} {metrics['train_images_per_s']:.1f} img/s"
                f"{' (backbone frozen)' if frozen else ''}")
        if finish_epoch(loop, metrics, cfg=cfg, rank=rank, tag="train", line=line, model=model, optimizer=optimizer,
                        scheduler=scheduler, save_kwargs=save_kwargs):
            break


# ----------------------------------------------------------------------------------------- driver
def _class_counts(datasets) -> list[int]:
    from breakhis_ray.data.pipeline import class_counts

    counts = class_counts(datasets["train"])
    return [int(counts.get(i, 0)) for i in range(len(LABELS))]


def run_train(cfg: TrainConfig) -> dict:
    """Train one classifier; returns a summary with the best and latest checkpoint URIs."""
    from breakhis_ray.data.pipeline import build_datasets
    from breakhis_ray.ray_utils import ensure_ray

    ensure_ray(cfg.ray)
    quiet_data_progress(cfg.run.data_progress_bars)
    pretrained, _, augment = strategy_plan(cfg)
    if STRATEGIES[cfg.train.strategy][0] and not pretrained:
        print(f"[train] strategy {cfg.train.strategy!r} without model.weights: the backbone starts from random "
              "init (pass model.weights=PATH|s3://...|torchvision for transfer learning)", flush=True)
    data_cfg = cfg.data.model_copy(update={"augment": cfg.data.augment.model_copy(update={"enabled": augment})})
    datasets = build_datasets(data_cfg, preprocess_spec(cfg), **guidance_stages(cfg, data_cfg))
    if cfg.loss.name == "weighted_ce" and cfg.loss.class_counts is None:
        cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"class_counts": _class_counts(datasets)})})
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    storage.write_text(storage.join(run_dir, "config.yaml"), config_yaml(cfg))
    print(f"[train] {cfg.model.name} strategy={cfg.train.strategy} loss={cfg.loss.name} "
          f"workers={cfg.scaling.num_workers} gpu={cfg.scaling.use_gpu} -> {run_dir}", flush=True)
    trainer = make_trainer(train_loop_per_worker, cfg, cfg.scaling, cfg.run,
                           {"train": datasets["train"], "val": datasets["val"]})
    return summarise(cfg.run, fit(trainer, run_dir), run_dir, "train")
