"""The one interface every nuclei segmenter implements, and the result it returns.

A segmenter takes a batch of RGB tiles, ``uint8`` of shape ``(B, H, W, 3)``, and returns a
:class:`SegmentationResult`: a boolean foreground (nuclei) mask per image, int32 instance labels
(0 = background, 1..N = nuclei) and one feature dict per image from
:func:`breakhis_ray.segmentation.features.nuclear_features`. Only numpy is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from breakhis_ray.errors import DataError


@dataclass
class SegmentationResult:
    """Outputs for a batch of ``B`` images of size ``H x W``.

    ``masks``: ``(B, H, W)`` bool, True on nuclei. ``labels``: ``(B, H, W)`` int32 instance ids, 0 on
    background, ``labels > 0`` equal to ``masks``. ``features``: ``B`` dicts with the keys of
    :data:`breakhis_ray.segmentation.features.FEATURE_KEYS`.
    """

    masks: np.ndarray
    labels: np.ndarray
    features: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def as_image_batch(images: np.ndarray) -> np.ndarray:
    """Validate a batch of RGB tiles; a single ``(H, W, 3)`` image becomes a batch of one.

    Raises :class:`DataError` for anything that is not ``uint8`` with 3 channels.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"segmenter input must be uint8 (B, H, W, 3) RGB, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"segmenter input must be uint8 (B, H, W, 3) RGB, got dtype {images.dtype}")
    if images.shape[1] < 2 or images.shape[2] < 2:
        raise DataError(f"segmenter input images are too small: {images.shape[1]}x{images.shape[2]}")
    return images


class Segmenter:
    """Base class: subclasses set ``name`` and implement :meth:`segment`."""

    name: str = "segmenter"

    def segment(self, images: np.ndarray) -> SegmentationResult:
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> SegmentationResult:
        return self.segment(images)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
