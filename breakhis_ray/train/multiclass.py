"""Per-epoch statistics of the subtype task (C classes): summed per-class counts and the metrics made from them.

The binary classifier's sums (:func:`breakhis_ray.train.classifier.batch_stats`) count malignant-positive
confusion cells; with eight subtypes a batch instead adds, per class ``c``, the true positives ``tp_c``, the
images of that class ``true_c`` and the predictions of that class ``pred_c``. Those counts add up exactly over
batches and ranks, and give the epoch's accuracy, balanced accuracy (mean recall over the classes present) and
macro F1 (mean over the classes present or predicted). The metric names are the binary task's
(``val_balanced_accuracy``, ``val_f1``, ...), so ``run.checkpoint_metric`` works for both tasks.
"""

from __future__ import annotations

from typing import Any, Callable


def zero_sums(num_classes: int) -> dict[str, float]:
    """The zero of :func:`batch_stats` for ``num_classes`` classes (int counts stay ints)."""
    zero: dict[str, float] = {"loss_sum": 0.0, "correct": 0, "seen": 0}
    for c in range(num_classes):
        zero.update({f"tp_{c}": 0, f"true_{c}": 0, f"pred_{c}": 0})
    return zero


def batch_stats_for(num_classes: int) -> Callable[[Any, Any, Any], dict[str, float]]:
    """``(loss, logits, y) -> sums`` of one batch: loss sum, correct, seen and per-class counts."""

    def batch_stats(loss, logits, y) -> dict[str, float]:
        import torch

        pred = logits.argmax(1)
        true_counts = torch.bincount(y, minlength=num_classes).tolist()
        pred_counts = torch.bincount(pred, minlength=num_classes).tolist()
        tp_counts = torch.bincount(y[pred == y], minlength=num_classes).tolist()
        out: dict[str, float] = {"loss_sum": float(loss) * len(y), "correct": int((pred == y).sum()),
                                 "seen": len(y)}
        for c in range(num_classes):
            out.update({f"tp_{c}": int(tp_counts[c]), f"true_{c}": int(true_counts[c]),
                        f"pred_{c}": int(pred_counts[c])})
        return out

    return batch_stats


def class_metrics(sums: dict[str, float], num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 of summed counts (0.0 for an empty split)."""
    recalls, f1s = [], []
    for c in range(num_classes):
        tp, true, pred = sums[f"tp_{c}"], sums[f"true_{c}"], sums[f"pred_{c}"]
        if true:
            recalls.append(tp / true)
        if true or pred:
            f1s.append(2 * tp / (true + pred))
    return {
        "accuracy": sums["correct"] / sums["seen"] if sums["seen"] else 0.0,
        "balanced_accuracy": sum(recalls) / len(recalls) if recalls else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
    }


def epoch_metrics_for(num_classes: int) -> Callable[[dict, dict, int], dict[str, float]]:
    """``(train sums, val sums, world size) -> metrics`` with the binary task's names (``val_f1`` = macro F1)."""

    def epoch_metrics(train: dict, val: dict, world_size: int) -> dict[str, float]:
        scores = class_metrics(val, num_classes)
        return {
            "train_loss": train["loss_sum"] / max(1.0, train["seen"]),
            "train_accuracy": train["correct"] / max(1.0, train["seen"]),
            "val_loss": val["loss_sum"] / max(1.0, val["seen"]),
            "val_accuracy": scores["accuracy"],
            "val_balanced_accuracy": scores["balanced_accuracy"],
            "val_f1": scores["macro_f1"],
            "val_macro_f1": scores["macro_f1"],
            "val_images": val["seen"],
            "train_images_per_s": train["seen"] / max(1e-9, train["seconds"] / world_size),
        }

    return epoch_metrics
