"""Classifier training with Ray Train (``breakhis-ray train``): ``TorchTrainer`` + DDP, per-epoch reports with
checkpoints, resume.

The driver (:func:`run_train`) builds the Ray datasets from the prepared shards and launches the trainer;
every worker runs :func:`train_loop_per_worker`: the shared epoch loop (:mod:`breakhis_ray.train.ray_glue`,
:mod:`breakhis_ray.train.loop`) with the classifier's pieces: the transfer-learning strategy (which weights,
when the backbone is frozen, online augmentation), two parameter groups (backbone, head), the configured loss,
and accuracy / balanced accuracy / F1 (malignant = positive) from summed confusion counts. ``task: subtype``
trains eight outputs with per-class sums (:mod:`breakhis_ray.train.multiclass`); ``calibration`` fits a
temperature on the validation split afterwards (:mod:`breakhis_ray.train.calibrate`).
"""

from __future__ import annotations

import logging
from typing import Any

from breakhis_ray.artifacts import write_provenance
from breakhis_ray.config import TrainConfig
from breakhis_ray.domain import task_classes
from breakhis_ray.train import loop
from breakhis_ray.train.ray_glue import launch, run_epochs, start_driver, start_worker

log = logging.getLogger(__name__)
TAG = "train"

# Transfer-learning strategies (VGG paper, Fig. 4) plus the common warm-up schedule:
# name -> (use pretrained weights, epochs with a frozen backbone (None = always), online augmentation)
STRATEGIES: dict[str, tuple[bool, int | None, bool]] = {
    "scratch": (False, 0, False),
    "frozen": (True, None, False),
    "finetune": (True, 0, False),
    "finetune_aug": (True, 0, True),
    "warmup_finetune": (True, -1, True),  # -1: cfg.train.warmup_epochs
}

#: the zero of :func:`batch_stats` (int counts stay ints in single-process sums)
ZERO_SUMS = {"loss_sum": 0.0, "correct": 0, "tp": 0, "tn": 0, "fp": 0, "fn": 0, "seen": 0}


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
    from breakhis_ray.data.augment import PairAugment
    from breakhis_ray.segmentation.guided import apply_guidance

    spec = classifier_spec(cfg)
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
        num_classes=len(task_classes(cfg.task)),
        weights=cfg.model.weights if pretrained else None,
        in_channels=cfg.model.in_channels,
        dropout=cfg.model.dropout,
    )


def make_optimizer(cfg: TrainConfig, model):
    """Two parameter groups (backbone, head) so a warm-up can unfreeze the backbone at a lower lr."""
    from breakhis_ray.models import split_backbone_head

    backbone, head = split_backbone_head(model)
    groups = [
        {"params": backbone, "lr": cfg.train.lr * cfg.train.backbone_lr_factor, "name": "backbone"},
        {"params": head, "lr": cfg.train.lr, "name": "head"},
    ]
    return loop.build_optimizer(cfg.train, groups)


def build_loss(cfg: TrainConfig):
    from breakhis_ray.losses import create_loss

    return create_loss(cfg.loss.name, class_counts=cfg.loss.class_counts, alpha=cfg.loss.alpha,
                       gamma=cfg.loss.gamma, label_smoothing=cfg.loss.label_smoothing,
                       num_classes=len(task_classes(cfg.task)), absent_classes="ignore")


def needs_class_counts(cfg: TrainConfig) -> bool:
    """Whether the loss weighs classes by their training-split counts (and none are configured)."""
    balanced = cfg.loss.name == "weighted_ce" or (cfg.loss.name == "focal" and cfg.loss.alpha == "balanced")
    return balanced and cfg.loss.class_counts is None


def task_scoring(cfg: TrainConfig) -> tuple:
    """``(class names, batch_stats, zero sums, epoch_metrics)`` of the config's task."""
    labels = task_classes(cfg.task)
    if cfg.task == "binary":
        return labels, batch_stats, ZERO_SUMS, epoch_metrics
    from breakhis_ray.train import multiclass

    n = len(labels)
    return labels, multiclass.batch_stats_for(n), multiclass.zero_sums(n), multiclass.epoch_metrics_for(n)


def classifier_spec(cfg: TrainConfig):
    """The classifier's eval/inference preprocessing (saved in its checkpoints)."""
    return loop.preprocess_spec(cfg.model.name, cfg.data)


# ------------------------------------------------------------------------------------- epoch pieces
def batch_stats(loss, logits, y) -> dict[str, float]:
    """Loss sum, correct predictions and binary confusion counts (malignant = 1 positive) of one batch."""
    pred = logits.argmax(1)
    return {
        "loss_sum": float(loss) * len(y),
        "correct": int((pred == y).sum()),
        "tp": int(((pred == 1) & (y == 1)).sum()),
        "tn": int(((pred == 0) & (y == 0)).sum()),
        "fp": int(((pred == 1) & (y == 0)).sum()),
        "fn": int(((pred == 0) & (y == 1)).sum()),
        "seen": len(y),
    }


def train_one_epoch(model, batches, loss_fn, optimizer, device, *, amp: bool, grad_clip: float | None,
                    max_steps: int | None = None) -> dict[str, float]:
    """One classifier training pass (the step the training benchmark times); summed statistics."""
    learner = loop.Learner(model, loss_fn, optimizer, None, device, batch_stats, ZERO_SUMS, amp=amp,
                           grad_clip=grad_clip, max_steps=max_steps)
    return loop.train_one_epoch(learner, batches)


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


def describe(metrics: dict) -> str:
    """The per-epoch log line."""
    return (f"train_loss={metrics['train_loss']:.4f} train_acc={metrics['train_accuracy']:.3f} "
            f"val_loss={metrics['val_loss']:.4f} val_acc={metrics['val_accuracy']:.3f} "
            f"val_bal_acc={metrics['val_balanced_accuracy']:.3f} {metrics['train_images_per_s']:.1f} img/s"
            f"{' (backbone frozen)' if metrics['backbone_frozen'] else ''}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train.torch

    from breakhis_ray.data.pipeline import iter_train_batches, local_shuffle_seed
    from breakhis_ray.models import set_backbone_trainable

    worker = start_worker(TrainConfig, config)
    cfg = worker.cfg
    _, frozen_epochs, _ = strategy_plan(cfg)
    spec = classifier_spec(cfg)
    model = build_model(cfg)
    set_backbone_trainable(model, not _backbone_frozen(frozen_epochs, 0))
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer, scheduler = make_optimizer(cfg, model)
    labels, stats, zero, metrics_of = task_scoring(cfg)
    learner = worker.learner(model, build_loss(cfg).to(worker.device), optimizer, scheduler, stats, zero)

    def before_epoch(epoch: int) -> dict:
        frozen = _backbone_frozen(frozen_epochs, epoch)
        set_backbone_trainable(model, not frozen)
        return {"backbone_frozen": frozen}

    def batches(shard, batch_size: int, epoch: int | None):
        if epoch is None:  # validation: in order, as stored
            return iter_train_batches(shard, batch_size, worker.device, spec, in_channels=cfg.model.in_channels)
        return iter_train_batches(shard, batch_size, worker.device, spec, in_channels=cfg.model.in_channels,
                                  epoch=epoch, shuffle_buffer=cfg.data.shuffle_buffer or None,
                                  shuffle_seed=local_shuffle_seed(cfg.data.seed, epoch, worker.rank))

    run_epochs(worker, learner, tag=TAG, labels=labels, spec=spec, batches=batches, epoch_metrics=metrics_of,
               describe=describe, before_epoch=before_epoch)


# ----------------------------------------------------------------------------------------- driver
def _class_counts(data_cfg, task: str = "binary") -> list[int]:
    """Training images per class, from the shards' columns (executing the training dataset here would use
    up one of its seeded per-epoch executions)."""
    from breakhis_ray.data.pipeline import split_class_counts

    return split_class_counts(data_cfg, task, "train")


def run_train(cfg: TrainConfig) -> dict:
    """Train one classifier; returns a summary with the best and latest checkpoint URIs."""
    from breakhis_ray.data.pipeline import build_datasets

    run_dir = start_driver(cfg)
    pretrained, _, augment = strategy_plan(cfg)
    if STRATEGIES[cfg.train.strategy][0] and not pretrained:
        log.warning("[%s] strategy %r without model.weights: the backbone starts from random init (pass "
                    "model.weights=PATH|s3://...|torchvision for transfer learning)", TAG, cfg.train.strategy)
    data_cfg = cfg.data.model_copy(update={"augment": cfg.data.augment.model_copy(update={"enabled": augment})})
    datasets = build_datasets(data_cfg, classifier_spec(cfg), **guidance_stages(cfg, data_cfg), task=cfg.task)
    if needs_class_counts(cfg):
        counts = _class_counts(data_cfg, cfg.task)
        absent = [name for name, n in zip(task_classes(cfg.task), counts) if n == 0]
        if absent:  # e.g. a fold whose few lobular carcinoma patients all sit in val/test
            log.warning("[%s] no training image of %s: the class-balanced loss gives them weight 0 (the model "
                        "still has their outputs, never trained towards)", TAG, ", ".join(absent))
        cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"class_counts": counts})})
    write_provenance(run_dir, cfg)
    log.info("[%s] %s task=%s strategy=%s loss=%s workers=%d gpu=%s -> %s", TAG, cfg.model.name, cfg.task,
             cfg.train.strategy, cfg.loss.name, cfg.scaling.num_workers, cfg.scaling.use_gpu, run_dir)
    summary = launch(train_loop_per_worker, cfg, {"train": datasets["train"], "val": datasets["val"]}, run_dir, TAG)
    if cfg.calibration.temperature_scaling:
        from breakhis_ray.train.calibrate import calibrate_run

        summary = calibrate_run(cfg, datasets["val"], summary)
    return summary
