"""Beer-Lambert optics of H&E: optical density, stain vectors and colour deconvolution.

Transmitted light through a stained section: ``I = Io * exp(-(cH * h + cE * e))`` per RGB channel, with
``h`` and ``e`` unit optical-density (OD) vectors and ``cH``, ``cE`` stain concentrations. The synthetic
renderer uses it forwards; segmentation (thresholding the hematoxylin channel) and stain normalisation use
it backwards. Reference vectors are Macenko et al.'s (2009) H&E estimates.
"""

from __future__ import annotations

import numpy as np

#: Macenko reference optical-density vectors (R, G, B), normalised to unit length.
H_REF = np.array([0.5626, 0.7201, 0.4062]) / np.linalg.norm([0.5626, 0.7201, 0.4062])
E_REF = np.array([0.2159, 0.8012, 0.5581]) / np.linalg.norm([0.2159, 0.8012, 0.5581])

#: Default incident light intensity (a blank 8-bit background).
IO = 255.0


def unit(vector) -> np.ndarray:
    """``vector`` as a float64 unit vector."""
    v = np.asarray(vector, dtype=np.float64)
    norm = np.linalg.norm(v)
    if norm == 0:
        raise ValueError("a stain vector cannot be zero")
    return v / norm


def rgb_to_od(rgb: np.ndarray, io: float = IO) -> np.ndarray:
    """Optical density ``-ln(I / Io)`` of an 8-bit (or float 0..255) RGB image, float32, clipped at 0.

    Zero intensities are treated as 1 so the density stays finite (at most ``ln(Io)``).
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    return np.maximum(-np.log(np.maximum(rgb, 1.0) / np.float32(io)), 0.0)


def od_to_rgb(od: np.ndarray, io: float | np.ndarray = IO) -> np.ndarray:
    """8-bit RGB from optical density (``Io * exp(-od)``, rounded and clipped). ``io`` may be per channel."""
    rgb = np.asarray(io, dtype=np.float32) * np.exp(-np.asarray(od, dtype=np.float32))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def stain_matrix(h=H_REF, e=E_REF) -> np.ndarray:
    """3x3 matrix whose rows are the H and E unit OD vectors and their normalised cross product (residual)."""
    h, e = unit(h), unit(e)
    return np.stack([h, e, unit(np.cross(h, e))])


def concentrations(rgb: np.ndarray, h=H_REF, e=E_REF, io: float = IO) -> np.ndarray:
    """Colour deconvolution (Ruifrok & Johnston): per-pixel (H, E, residual) concentrations, float32 HxWx3."""
    inverse = np.linalg.inv(stain_matrix(h, e)).astype(np.float32)
    return rgb_to_od(rgb, io) @ inverse


def hematoxylin_density(rgb: np.ndarray, h=H_REF, e=E_REF, io: float = IO) -> np.ndarray:
    """Hematoxylin concentration (optical density along ``h``) per pixel, float32 HxW, clipped at 0.

    Nuclei are the dense hematoxylin regions: Otsu on this map is the classical nucleus segmentation.
    """
    return np.maximum(concentrations(rgb, h, e, io)[..., 0], 0.0)


def eosin_density(rgb: np.ndarray, h=H_REF, e=E_REF, io: float = IO) -> np.ndarray:
    """Eosin concentration per pixel, float32 HxW, clipped at 0."""
    return np.maximum(concentrations(rgb, h, e, io)[..., 1], 0.0)


def compose(h_density: np.ndarray, e_density: np.ndarray, h=H_REF, e=E_REF, io: float | np.ndarray = IO) -> np.ndarray:
    """Forward Beer-Lambert model: 8-bit RGB from H and E concentration maps (HxW each)."""
    od = (
        np.asarray(h_density, dtype=np.float32)[..., None] * unit(h).astype(np.float32)
        + np.asarray(e_density, dtype=np.float32)[..., None] * unit(e).astype(np.float32)
    )
    return od_to_rgb(od, io)
