"""Training with Ray Train: the classifier (``breakhis-ray train``) and the U-Net (``train-segmenter``).

Modules, top down:

* :mod:`.classifier`: :func:`run_train` and the classifier's pieces (strategies, parameter groups, confusion
  counts, segmentation guidance hooks);
* :mod:`.segmenter`: :func:`run_train_segmenter` and the U-Net's pieces (Dice/IoU sums, ``split.json``);
* :mod:`.ray_glue`: the Ray Train glue both share (worker start, resume, the epoch loop with reports and
  checkpoints, trainer construction, ``result.json``);
* :mod:`.loop`: the pure-torch loop (epochs, optimiser, autocast, RNG state), no Ray.

The entry points are imported lazily, so ``import breakhis_ray.train`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run_train": "classifier",
    "strategy_plan": "classifier",
    "run_train_segmenter": "segmenter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
