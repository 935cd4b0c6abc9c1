"""Class probabilities of a classifier batch, optionally temperature-scaled and test-time augmented. Plain torch.

Test-time augmentation (``tta=True``) runs the model on the dihedral views of each image (identity,
horizontal and vertical flips, and the quarter turns: all eight for square inputs; for non-square inputs the
four views that keep the shape: identity, flips, half turn, as the training augmentation does) and averages the
softmax probabilities. A model whose output does not change under these views gives the same probabilities
with and without TTA; the cost is one forward pass per view.
"""

from __future__ import annotations

from typing import Callable

#: view name -> (quarter turns, then flip of the last axis); applied to NCHW batches
SQUARE_VIEWS: dict[str, tuple[int, bool]] = {
    "identity": (0, False), "hflip": (0, True), "rot90": (1, False), "rot90+hflip": (1, True),
    "rot180": (2, False), "vflip": (2, True), "rot270": (3, False), "rot270+hflip": (3, True),
}
#: the views that keep a non-square (H != W) image's shape
RECT_VIEWS: tuple[str, ...] = ("identity", "hflip", "rot180", "vflip")


def view_names(height: int, width: int) -> tuple[str, ...]:
    """The TTA views for an input of ``height`` x ``width``."""
    return tuple(SQUARE_VIEWS) if height == width else RECT_VIEWS


def apply_view(x, name: str):
    """One view of an NCHW tensor (``vflip`` is a half turn then a horizontal flip)."""
    import torch

    turns, flip = SQUARE_VIEWS[name]
    out = torch.rot90(x, turns, dims=(2, 3)) if turns else x
    return torch.flip(out, dims=(3,)) if flip else out


def class_probabilities(forward: Callable, x, *, temperature: float = 1.0, tta: bool = False):
    """Softmax of ``forward(x) / temperature`` (float32, ``(N, C)``), averaged over the TTA views when
    ``tta`` is set. ``forward`` maps an NCHW batch to logits (autocast, if any, is the caller's)."""
    import torch

    views = view_names(int(x.shape[2]), int(x.shape[3])) if tta else ("identity",)
    total = None
    for name in views:
        logits = forward(apply_view(x, name) if name != "identity" else x)
        prob = torch.softmax(logits.float() / float(temperature), dim=1)
        total = prob if total is None else total + prob
    return total / len(views)


__all__ = ["RECT_VIEWS", "SQUARE_VIEWS", "apply_view", "class_probabilities", "view_names"]
