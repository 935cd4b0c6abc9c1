"""Nuclei by thresholding: hematoxylin channel (colour deconvolution) + Otsu + morphology.

Per image: hematoxylin optical density -> light Gaussian smoothing -> Otsu threshold (never below
``min_od``, so a tile without nuclei stays empty) -> binary opening -> hole filling -> removal of
objects smaller than ``min_area`` pixels. Instances are connected components, so touching nuclei merge;
:class:`breakhis_ray.segmentation.watershed.WatershedSegmenter` splits them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, measure, morphology

from breakhis_ray.errors import ConfigError
from breakhis_ray.segmentation.base import SegmentationResult, Segmenter, as_image_batch
from breakhis_ray.segmentation.features import hematoxylin_density, nuclear_features

#: default smallest nucleus, as a fraction of the image area (32 px on a 700x460 BreakHis tile)
MIN_AREA_FRACTION = 1e-4


def default_min_area(height: int, width: int) -> int:
    """Smallest object kept when ``min_area`` is not given: scales with the image, at least 4 px."""
    return max(4, int(round(MIN_AREA_FRACTION * height * width)))


def clean_mask(mask: np.ndarray, min_area: int, opening_radius: int = 1) -> np.ndarray:
    """Binary opening (disk of ``opening_radius``, 0 to skip), hole filling, then small-object removal."""
    mask = np.asarray(mask, dtype=bool)
    if opening_radius > 0:
        mask = ndi.binary_opening(mask, structure=morphology.disk(opening_radius))
    mask = ndi.binary_fill_holes(mask)
    if min_area > 1:
        lab, _ = ndi.label(mask)
        areas = np.bincount(lab.ravel())
        keep = areas >= min_area
        keep[0] = False
        mask = keep[lab]
    return mask


class ThresholdSegmenter(Segmenter):
    """Otsu threshold on the hematoxylin channel; instances are connected components.

    ``min_area``: smallest nucleus in pixels (default :func:`default_min_area` of each image);
    ``opening_radius``: radius of the opening that removes specks and thin bridges (0 disables);
    ``sigma``: Gaussian smoothing of the hematoxylin channel before Otsu (0 disables);
    ``min_od``: floor on the threshold in optical-density units, so faint stroma never becomes nuclei.
    """

    name = "threshold"

    def __init__(
        self,
        min_area: int | None = None,
        opening_radius: int = 1,
        sigma: float = 1.0,
        min_od: float = 0.15,
    ) -> None:
        if min_area is not None and min_area < 0:
            raise ConfigError(f"min_area must be >= 0, got {min_area}")
        if opening_radius < 0:
            raise ConfigError(f"opening_radius must be >= 0, got {opening_radius}")
        if sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {sigma}")
        self.min_area = min_area
        self.opening_radius = int(opening_radius)
        self.sigma = float(sigma)
        self.min_od = float(min_od)

    # -- per-image steps -------------------------------------------------------------------------
    def foreground(self, hematoxylin: np.ndarray) -> np.ndarray:
        """Boolean nuclei mask of one image from its hematoxylin optical density."""
        h = filters.gaussian(hematoxylin, sigma=self.sigma) if self.sigma > 0 else hematoxylin
        if float(h.max()) - float(h.min()) < 1e-6:
            level = np.inf  # a flat image has no nuclei to separate
        else:
            level = float(filters.threshold_otsu(h))
        mask = h > max(level, self.min_od)
        min_area = self.min_area if self.min_area is not None else default_min_area(*mask.shape)
        return clean_mask(mask, min_area=min_area, opening_radius=self.opening_radius)

    def instances(self, mask: np.ndarray) -> np.ndarray:
        """Instance labels (int32) from a boolean mask: 8-connected components."""
        return measure.label(mask, connectivity=2).astype(np.int32)

    # -- batch API -------------------------------------------------------------------------------
    def segment(self, images: np.ndarray) -> SegmentationResult:
        images = as_image_batch(images)
        b, height, width = images.shape[:3]
        masks = np.zeros((b, height, width), dtype=bool)
        labels = np.zeros((b, height, width), dtype=np.int32)
        features = []
        for i, rgb in enumerate(images):
            hema = hematoxylin_density(rgb)
            masks[i] = self.foreground(hema)
            labels[i] = self.instances(masks[i])
            features.append(nuclear_features(labels[i], hema))
        return SegmentationResult(masks=masks, labels=labels, features=features)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(min_area={self.min_area}, opening_radius={self.opening_radius}, "
            f"sigma={self.sigma}, min_od={self.min_od})"
        )
