"""Stain normalisation of H&E tiles: Macenko (2009) and Reinhard (2001), fitted to a reference. Pure numpy.

Both normalisers share one interface: ``fit(reference_uint8) -> self``, ``transform(uint8 HxWx3) -> uint8``,
``transform_float`` (the same result before its uint8 rounding: optical density or ``l-alpha-beta``, ``None``
for a tile left unchanged), ``to_dict()`` (JSON-safe fitted parameters, stored in
:class:`~breakhis_ray.data.transforms.PreprocessSpec` as ``stain_reference``) and construction from those
parameters (:func:`get_normalizer`).

* **Macenko**: optical density (Beer-Lambert, :mod:`breakhis_ray.data.stain`) of tissue pixels (every channel
  above ``beta``); the plane of the two main eigenvectors; the robust extreme angles (``alpha`` and
  ``100 - alpha`` percentiles) give the H and E vectors (H = the one absorbing more red); concentrations
  by least squares, rescaled so their 99th percentile matches the reference's (by a factor within
  1/5..5), then recomposed with the reference vectors. Default reference: Macenko's
  H = (0.5626, 0.7201, 0.4062), E = (0.2159, 0.8012, 0.5581), maximum concentrations (1.9705, 1.0308).
* **Reinhard**: per-channel mean and standard deviation of tissue pixels in Ruderman's decorrelated
  ``l-alpha-beta`` space are matched to the reference's. Default reference: the statistics of
  :func:`reference_tile`, a deterministic tile rendered with the Macenko reference stains.

Robustness: a tile with too little tissue (blank glass, pure white, solid black) or, for Macenko, a single
stain direction (a flat colour) is returned unchanged, and no output is ever NaN.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from breakhis_ray.data.stain import E_REF, H_REF, compose, od_to_rgb, rgb_to_od, unit
from breakhis_ray.errors import ConfigError, DataError

#: 99th-percentile H and E concentrations of Macenko's reference slide.
MACENKO_MAX_CONC = (1.9705, 1.0308)
#: Default optical-density threshold separating tissue from background.
BETA = 0.15
#: Default share of tissue pixels below which a tile is left unchanged.
MIN_TISSUE = 0.01
_MIN_TISSUE_PIXELS = 16
#: Largest factor by which Macenko rescales a stain's concentrations (guards nearly single-stain tiles).
_MAX_GAIN = 5.0
_EPS = 1e-6

# Ruderman et al. l-alpha-beta (as used by Reinhard et al. 2001).
_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS2RGB = np.linalg.inv(_RGB2LMS)
_LOG2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]
)
_LAB2LOG = np.linalg.inv(_LOG2LAB)


class StainNormalizer(Protocol):
    method: str

    def fit(self, reference: np.ndarray) -> "StainNormalizer": ...

    def transform(self, img: np.ndarray) -> np.ndarray: ...

    def transform_float(self, img: np.ndarray) -> np.ndarray | None: ...

    def to_dict(self) -> dict[str, Any]: ...


def _check_rgb(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise DataError(f"{what} expects a uint8 (H, W, 3) RGB image, got {img.dtype} {img.shape}")
    return img


def _enough_tissue(mask: np.ndarray, min_tissue: float) -> bool:
    count = int(mask.sum())
    return count >= _MIN_TISSUE_PIXELS and count >= min_tissue * mask.size


def tissue_mask(img: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Pixels whose optical density exceeds ``beta`` in every channel (Macenko's tissue definition)."""
    return (rgb_to_od(_check_rgb(img, "tissue_mask")) > beta).all(axis=-1)


# --------------------------------------------------------------------------------------------- Macenko
def estimate_stain_vectors(
    img: np.ndarray, beta: float = BETA, alpha: float = 1.0, min_tissue: float = MIN_TISSUE
) -> np.ndarray | None:
    """Macenko H and E unit OD vectors of a tile, shape ``(2, 3)`` (row 0 = H), or ``None`` when the tile has
    too little tissue or only one stain direction."""
    od = rgb_to_od(_check_rgb(img, "estimate_stain_vectors")).reshape(-1, 3).astype(np.float64)
    mask = (od > beta).all(axis=1)
    if not _enough_tissue(mask, min_tissue):
        return None
    tissue = od[mask]
    _, vecs = np.linalg.eigh(np.cov(tissue, rowvar=False))
    plane = vecs[:, 1:3]  # the two largest eigenvalues (eigh sorts ascending)
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # OD lives in the positive octant
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    vectors = []
    for v in (v1, v2):
        v = -v if v.sum() < 0 else v
        norm = np.linalg.norm(v)
        if not np.isfinite(norm) or norm < _EPS:
            return None
        vectors.append(v / norm)
    v1, v2 = vectors
    if abs(float(v1 @ v2)) > 0.995:
        return None
    he = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1])
    return he if np.isfinite(he).all() else None


class MacenkoNormalizer:
    """Macenko normalisation towards ``stain_matrix`` (rows H, E) and ``max_conc`` (99th percentiles)."""

    method = "macenko"

    def __init__(
        self,
        stain_matrix=None,
        max_conc=None,
        *,
        beta: float = BETA,
        alpha: float = 1.0,
        min_tissue: float = MIN_TISSUE,
    ):
        matrix = np.stack([H_REF, E_REF]) if stain_matrix is None else np.asarray(stain_matrix, dtype=np.float64)
        if matrix.shape != (2, 3):
            raise ConfigError(f"Macenko stain_matrix must be 2x3 (rows H, E), got shape {matrix.shape}")
        self.stain_matrix = np.stack([unit(matrix[0]), unit(matrix[1])])
        self.max_conc = np.asarray(MACENKO_MAX_CONC if max_conc is None else max_conc, dtype=np.float64)
        if self.max_conc.shape != (2,) or (self.max_conc <= 0).any():
            raise ConfigError(f"Macenko max_conc must be two positive numbers, got {self.max_conc.tolist()}")
        self.beta, self.alpha, self.min_tissue = float(beta), float(alpha), float(min_tissue)

    def _concentrations(self, od: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """Least-squares (N, 2) concentrations of (N, 3) OD on the rows of ``matrix``."""
        return od @ np.linalg.pinv(matrix)

    def _source(self, img: np.ndarray):
        """(stain matrix, 99th-percentile concentrations) of ``img``, or ``None`` without enough tissue."""
        od = rgb_to_od(img).reshape(-1, 3).astype(np.float64)
        mask = (od > self.beta).all(axis=1)
        if not _enough_tissue(mask, self.min_tissue):
            return None
        matrix = estimate_stain_vectors(img, self.beta, self.alpha, self.min_tissue)
        if matrix is None:  # one stain direction only: nothing to separate
            return None
        conc = self._concentrations(od[mask], matrix)
        max_conc = np.percentile(conc, 99, axis=0)
        if not np.isfinite(max_conc).all() or (max_conc < _EPS).any():
            return None
        return matrix, max_conc

    def fit(self, reference: np.ndarray) -> "MacenkoNormalizer":
        source = self._source(_check_rgb(reference, "MacenkoNormalizer.fit"))
        if source is None:
            raise DataError("cannot fit Macenko normalisation: the reference image has too little tissue")
        self.stain_matrix, self.max_conc = source
        return self

    def transform_float(self, img: np.ndarray) -> np.ndarray | None:
        """The normalised tile as float64 optical density (H, W, 3) before rounding to uint8, or ``None`` when
        the tile is left unchanged (too little tissue, one stain direction)."""
        img = _check_rgb(img, "MacenkoNormalizer.transform")
        source = self._source(img)
        if source is None:
            return None
        matrix, max_conc = source
        od = rgb_to_od(img).reshape(-1, 3).astype(np.float64)
        gain = np.clip(self.max_conc / max_conc, 1.0 / _MAX_GAIN, _MAX_GAIN)
        conc = self._concentrations(od, matrix) * gain
        return (conc @ self.stain_matrix).reshape(img.shape)

    def transform(self, img: np.ndarray) -> np.ndarray:
        out_od = self.transform_float(img)
        if out_od is None:
            return np.array(img, copy=True)
        return od_to_rgb(np.nan_to_num(out_od, nan=0.0, posinf=0.0, neginf=0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "stain_matrix": self.stain_matrix.round(6).tolist(),
            "max_conc": self.max_conc.round(6).tolist(),
        }


# -------------------------------------------------------------------------------------------- Reinhard
def rgb_to_lab(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float64 Ruderman ``l-alpha-beta`` (Reinhard's colour space), same spatial shape."""
    rgb = np.maximum(np.asarray(img, dtype=np.float64), 1.0) / 255.0
    lms = np.maximum(rgb @ _RGB2LMS.T, _EPS)
    return np.log10(lms) @ _LOG2LAB.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab`, rounded and clipped to uint8."""
    lms = np.power(10.0, np.clip(lab @ _LAB2LOG.T, -6.0, 1.0))
    rgb = np.nan_to_num(lms @ _LMS2RGB.T * 255.0, nan=255.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class ReinhardNormalizer:
    """Reinhard normalisation: match ``l-alpha-beta`` means and standard deviations of tissue pixels."""

    method = "reinhard"

    def __init__(self, mean=None, std=None, *, beta: float = BETA, min_tissue: float = MIN_TISSUE):
        self.beta, self.min_tissue = float(beta), float(min_tissue)
        if mean is None or std is None:
            default = _default_reinhard()
            mean = default.mean if mean is None else mean
            std = default.std if std is None else std
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if self.mean.shape != (3,) or self.std.shape != (3,) or (self.std <= 0).any():
            raise ConfigError("Reinhard mean/std must be three numbers each, std positive")

    def _stats(self, img: np.ndarray):
        """(lab image, tissue mean, tissue std) or ``None`` without enough tissue."""
        mask = (rgb_to_od(img) > self.beta).any(axis=-1)
        if not _enough_tissue(mask, self.min_tissue):
            return None
        lab = rgb_to_lab(img)
        tissue = lab[mask]
        mean, std = tissue.mean(axis=0), tissue.std(axis=0)
        if not (np.isfinite(mean).all() and np.isfinite(std).all()):
            return None
        return lab, mean, std

    def fit(self, reference: np.ndarray) -> "ReinhardNormalizer":
        stats = self._stats(_check_rgb(reference, "ReinhardNormalizer.fit"))
        if stats is None:
            raise DataError("cannot fit Reinhard normalisation: the reference image has too little tissue")
        _, self.mean, std = stats
        self.std = np.maximum(std, _EPS)
        return self

    def transform_float(self, img: np.ndarray) -> np.ndarray | None:
        """The normalised tile in float64 ``l-alpha-beta`` (H, W, 3) before conversion to uint8 RGB, or ``None``
        when the tile is left unchanged (too little tissue)."""
        img = _check_rgb(img, "ReinhardNormalizer.transform")
        stats = self._stats(img)
        if stats is None:
            return None
        lab, mean, std = stats
        gain = np.where(std > 1e-3, self.std / np.maximum(std, _EPS), 1.0)  # flat channel: shift only
        return (lab - mean) * gain + self.mean

    def transform(self, img: np.ndarray) -> np.ndarray:
        lab = self.transform_float(img)
        return np.array(img, copy=True) if lab is None else lab_to_rgb(lab)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "mean": self.mean.round(6).tolist(), "std": self.std.round(6).tolist()}


# ----------------------------------------------------------------------------------- reference, factory
def reference_tile(size: int = 128, seed: int = 0) -> np.ndarray:
    """A deterministic H&E-like tile rendered with the Macenko reference stains (Beer-Lambert).

    Eosin stroma with smooth variation, hematoxylin nuclei (discs), an unstained lumen; concentrations are
    scaled so their 99th percentiles equal :data:`MACENKO_MAX_CONC`. Default target of Reinhard normalisation
    and a convenient fixture for tests.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    e = 0.55 + 0.15 * np.sin(6.0 * xx + 2.0 * rng.random()) * np.cos(5.0 * yy + 2.0 * rng.random())
    h = 0.02 + 0.03 * rng.random((size, size))
    for _ in range(max(4, size // 6)):
        cy, cx = rng.random(2)
        radius = rng.uniform(0.02, 0.05)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        h[disc] = rng.uniform(1.2, 2.0)
        e[disc] *= 0.1
    lumen = (yy - 0.7) ** 2 + (xx - 0.3) ** 2 < 0.12**2
    h[lumen], e[lumen] = 0.0, 0.0
    tissue = ~lumen
    h *= MACENKO_MAX_CONC[0] / np.percentile(h[tissue], 99)
    e *= MACENKO_MAX_CONC[1] / np.percentile(e[tissue], 99)
    return compose(h, e, H_REF, E_REF)


@lru_cache(maxsize=1)
def _default_reinhard() -> "ReinhardNormalizer":
    return ReinhardNormalizer(mean=np.zeros(3), std=np.ones(3)).fit(reference_tile())


_METHODS = {"macenko": MacenkoNormalizer, "reinhard": ReinhardNormalizer}
_CACHE: dict[str, StainNormalizer] = {}


def fit_normalizer(method: str, reference: np.ndarray) -> StainNormalizer:
    """A normaliser of ``method`` fitted to a reference image (its ``to_dict()`` goes into the spec)."""
    if method not in _METHODS:
        raise ConfigError(f"unknown stain normalisation {method!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[method]().fit(reference)


def get_normalizer(method: str, reference: dict[str, Any] | None = None) -> StainNormalizer:
    """The normaliser for ``method`` and fitted parameters ``reference`` (``None`` = built-in reference).

    Instances are cached per (method, parameters): cheap to call per image.
    """
    if method not in _METHODS:
        raise ConfigError(f"unknown stain normalisation {method!r}; choose one of {sorted(_METHODS)}")
    key = json.dumps([method, reference], sort_keys=True)
    normalizer = _CACHE.get(key)
    if normalizer is None:
        params = dict(reference or {})
        declared = params.pop("method", method)
        if declared != method:
            raise ConfigError(f"stain_reference was fitted for {declared!r}, not {method!r}")
        try:
            normalizer = _METHODS[method](**params)
        except TypeError as exc:
            raise ConfigError(f"bad {method} stain_reference {sorted(params)}: {exc}") from None
        _CACHE[key] = normalizer
    return normalizer


def normalize_stain(img: np.ndarray, method: str, reference: dict[str, Any] | None = None) -> np.ndarray:
    """Stain-normalize one uint8 RGB tile with ``method`` towards ``reference`` (built-in by default)."""
    return get_normalizer(method, reference).transform(img)
