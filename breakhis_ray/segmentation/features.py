"""Per-image nuclear features shared by every segmentation method.

``nuclear_features(labels, hematoxylin)`` is the single place these numbers are computed, so the
threshold, watershed and U-Net segmenters report exactly comparable values. The hematoxylin channel is
:func:`breakhis_ray.data.stain.hematoxylin_density` (colour deconvolution on the Macenko H&E vectors),
re-exported here for the segmenters.
"""

from __future__ import annotations

import numpy as np

from breakhis_ray.data.stain import hematoxylin_density

__all__ = ["FEATURE_KEYS", "hematoxylin_density", "nuclear_features"]

FEATURE_KEYS = (
    "nuclei_count",
    "nuclear_area_fraction",
    "mean_nuclear_area_px",
    "std_nuclear_area_px",
    "mean_hematoxylin",
)


def nuclear_features(labels: np.ndarray, hematoxylin: np.ndarray) -> dict:
    """Features of one image from its instance ``labels`` (0 = background) and hematoxylin OD map.

    Returns a dict with exactly :data:`FEATURE_KEYS`: the number of nuclei, the fraction of pixels on
    nuclei, the mean and (population) standard deviation of nucleus areas in pixels, and the mean
    hematoxylin optical density inside nuclei. Every value is 0 when there are no nuclei.
    """
    labels = np.asarray(labels)
    hematoxylin = np.asarray(hematoxylin, dtype=np.float64)
    if labels.shape != hematoxylin.shape or labels.ndim != 2:
        raise ValueError(
            f"labels {labels.shape} and hematoxylin {hematoxylin.shape} must be the same 2-D shape"
        )
    flat = labels.ravel().astype(np.int64)
    if flat.size and flat.min() < 0:
        raise ValueError("instance labels must be non-negative")
    areas = np.bincount(flat)[1:] if flat.size else np.zeros(0, dtype=np.int64)
    areas = areas[areas > 0]  # label ids need not be consecutive
    foreground = flat > 0
    n_fg = int(foreground.sum())
    if areas.size == 0:
        return {
            "nuclei_count": 0,
            "nuclear_area_fraction": 0.0,
            "mean_nuclear_area_px": 0.0,
            "std_nuclear_area_px": 0.0,
            "mean_hematoxylin": 0.0,
        }
    return {
        "nuclei_count": int(areas.size),
        "nuclear_area_fraction": float(n_fg / flat.size),
        "mean_nuclear_area_px": float(areas.mean()),
        "std_nuclear_area_px": float(areas.std()),
        "mean_hematoxylin": float(hematoxylin.ravel()[foreground].mean()),
    }
