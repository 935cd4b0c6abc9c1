"""Nuclei segmentation: one interface, three methods (as CancerNet compares them).

- ``threshold``: hematoxylin channel by colour deconvolution, Otsu, morphology, connected components.
- ``watershed``: the same foreground, split at the necks of touching nuclei by distance-transform watershed.
- ``unet``: a segmentation_models_pytorch U-Net (trained on synthetic, user or pseudo-label masks).

Every segmenter maps uint8 ``(B, H, W, 3)`` tiles to a :class:`SegmentationResult` (bool masks, int32
instance labels, per-image :func:`nuclear_features`). Build one with :func:`create_segmenter`.
This module imports only numpy; scikit-image, torch and smp load when a method is first used.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from breakhis_ray.errors import ConfigError
from breakhis_ray.segmentation.base import SegmentationResult, Segmenter

#: method name -> (module, class)
SEGMENTERS: dict[str, tuple[str, str]] = {
    "threshold": ("breakhis_ray.segmentation.threshold", "ThresholdSegmenter"),
    "watershed": ("breakhis_ray.segmentation.watershed", "WatershedSegmenter"),
    "unet": ("breakhis_ray.segmentation.unet", "UNetSegmenter"),
}

_LAZY = {
    "ThresholdSegmenter": "breakhis_ray.segmentation.threshold",
    "WatershedSegmenter": "breakhis_ray.segmentation.watershed",
    "UNetSegmenter": "breakhis_ray.segmentation.unet",
    "nuclear_features": "breakhis_ray.segmentation.features",
    "hematoxylin_density": "breakhis_ray.segmentation.features",
    "FEATURE_KEYS": "breakhis_ray.segmentation.features",
    "dice": "breakhis_ray.segmentation.metrics",
    "iou": "breakhis_ray.segmentation.metrics",
    "mean_dice_iou": "breakhis_ray.segmentation.metrics",
    "draw_overlay": "breakhis_ray.segmentation.overlay",
    "save_overlay_grid": "breakhis_ray.segmentation.overlay",
}

__all__ = ["SEGMENTERS", "SegmentationResult", "Segmenter", "create_segmenter", "segmenter_class", *_LAZY]


def segmenter_class(method: str) -> type[Segmenter]:
    """The class implementing ``method``; a wrong name raises :class:`ConfigError` listing the choices."""
    if method not in SEGMENTERS:
        raise ConfigError(
            f"unknown segmentation method {method!r}; choose from {', '.join(sorted(SEGMENTERS))}"
        )
    module, name = SEGMENTERS[method]
    return getattr(importlib.import_module(module), name)


def create_segmenter(method: str, **kwargs: Any) -> Segmenter:
    """Build a segmenter by name: ``threshold``, ``watershed`` or ``unet``.

    Keyword arguments go to the class. For ``unet`` pass ``model=`` (a torch module) or
    ``checkpoint=`` (a directory or URI holding a saved U-Net), plus any inference option.
    """
    cls = segmenter_class(method)
    if method == "unet" and "checkpoint" in kwargs:
        checkpoint = kwargs.pop("checkpoint")
        if "model" in kwargs:
            raise ConfigError("give the unet segmenter either model= or checkpoint=, not both")
        return cls.from_checkpoint(checkpoint, **kwargs)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for segmentation method {method!r}: {exc}") from None
    return cls(**kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
