"""Segmentation overlays: nucleus contours drawn over the tile, and PNG grids for reports and the demo."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries


def _as_labels(mask_or_labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(mask_or_labels)
    if arr.shape != shape:
        raise ValueError(f"mask shape {arr.shape} does not match image shape {shape}")
    if arr.dtype == bool:
        return arr.astype(np.int32)
    return arr.astype(np.int64, copy=False)


def draw_overlay(
    image: np.ndarray,
    mask_or_labels: np.ndarray,
    color: Sequence[int] = (0, 255, 0),
    thickness: int = 1,
    alpha: float = 0.0,
) -> np.ndarray:
    """Return a copy of ``image`` (uint8 ``H x W x 3``) with object contours drawn in ``color``.

    ``mask_or_labels`` is a boolean mask or an instance label map (touching instances get a contour
    between them). Contours lie on the objects' own edge pixels, ``thickness`` pixels wide. With
    ``alpha > 0`` object interiors are also tinted with ``color`` at that opacity.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1, got {thickness}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    labels = _as_labels(mask_or_labels, image.shape[:2])
    rgb = np.asarray(color, dtype=np.float32).reshape(3)
    out = image.copy()
    objects = labels > 0
    if alpha > 0:
        tinted = (1.0 - alpha) * out[objects].astype(np.float32) + alpha * rgb
        out[objects] = np.clip(np.round(tinted), 0, 255).astype(np.uint8)
    edges = find_boundaries(labels, connectivity=1, mode="inner")
    if thickness > 1:
        edges = ndi.binary_dilation(edges, iterations=thickness - 1) & objects
    out[edges] = rgb.astype(np.uint8)
    return out


def save_overlay_grid(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    path: str,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
    color: Sequence[int] = (0, 255, 0),
    tile_inches: float = 3.0,
    dpi: int = 100,
) -> str:
    """Write a PNG grid of ``draw_overlay(image, mask)`` panels to ``path`` (local path or URI).

    Rendered with matplotlib's Agg canvas (no display, no global pyplot state). Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from breakhis_ray import storage

    images, masks = list(images), list(masks)
    if len(images) != len(masks):
        raise ValueError(f"got {len(images)} images for {len(masks)} masks")
    if not images:
        raise ValueError("save_overlay_grid needs at least one image")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(titles)} titles for {len(images)} images")
    ncols = max(1, min(int(ncols), len(images)))
    nrows = -(-len(images) // ncols)
    fig = Figure(figsize=(tile_inches * ncols, tile_inches * nrows), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (image, mask) in enumerate(zip(images, masks)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(draw_overlay(image, mask, color=color))
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(path, buf.getvalue())
    return path
