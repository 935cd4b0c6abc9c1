"""Procedural H&E rendering of one synthetic BreakHis tile with its ground-truth masks.

Pure numpy/scipy/Pillow: no Ray, no file IO. A tile is a deterministic function of
``(seed, patient, magnification, seq, size, difficulty)``.

Model, in physical units:

* **Scale.** A 700-pixel-wide tile is 0.25 um/px at 400X, so 40X:100X:200X:400X keep the exact ratio
  of their magnifications (2.5, 1.0, 0.5, 0.25 um/px). Another ``size`` is the same field of view
  resampled: ``um_per_px = 0.25 * (400 / mag) * (700 / width)``.
* **Architecture** by subtype, sized in micrometres: glands with lumens (adenosis, fibroadenoma,
  phyllodes tumour, tubular adenoma), solid nests with cribriform holes (ductal), single-file cords and
  discohesive sheets (lobular), mucin pools with floating clusters (mucinous), fibrovascular fronds
  lined by epithelium (papillary). Stroma carries wavy collagen, fibroblasts and lymphocytes.
* **Nuclei** as perturbed ellipses (instance labels), drawn in vectorised bounding-box stamps with
  anti-aliased edges; size, pleomorphism, hyperchromasia, crowding and mitoses follow a latent grade.
* **Colour** by Beer-Lambert, ``RGB = Io * exp(-(cH * h + cE * e))`` with per-patient stain vectors and
  intensities drawn independently of the class (colour is not a class shortcut).
* **Patients.** Each patient has a latent grade (malignant higher on average, overlapping more as
  ``difficulty`` rises) and its own stain and tissue nuisance; each image adds a smaller jitter. Images of
  one patient therefore resemble each other more than the class average, which is why a patient-disjoint
  split is harder than an image split, as on the real BreakHis.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.special import ndtri

from breakhis_ray.data import stain
from breakhis_ray.data.cohort import load_patients, pixel_source
from breakhis_ray.domain import MAGNIFICATIONS

REFERENCE_WIDTH = 700
UM_PER_PX_400X = 0.25
MAX_NUCLEI = 65535  # instance ids are stored as uint16

BACKGROUND, STROMA, EPITHELIUM = 0, 1, 2
_EPITHELIAL, _MITOSIS, _FIBROBLAST, _LYMPHOCYTE = 0, 1, 2, 3
_HOME_TISSUE = np.array([EPITHELIUM, EPITHELIUM, STROMA, STROMA], dtype=np.uint8)


def um_per_px(magnification: int, width: int = REFERENCE_WIDTH) -> float:
    """Micrometres per pixel of a tile ``width`` pixels wide at ``magnification``."""
    if magnification <= 0 or width <= 0:
        raise ValueError(f"magnification and width must be positive, got {magnification}, {width}")
    return UM_PER_PX_400X * (400.0 / magnification) * (REFERENCE_WIDTH / width)


# ------------------------------------------------------------------------------------- subtypes
@dataclass(frozen=True)
class Profile:
    """How one histological subtype looks, before patient and image variation."""

    arch: str  # glands | nests | cords | mucin | papillary
    malignant: bool
    grade_shift: float = 0.0  # added to the class-level latent grade
    nucleus_um: float = 6.0  # nuclear diameter at grade 0
    nucleus_slope: float = 8.0  # extra diameter (um) at grade 1
    pleomorphism: float = 1.0  # multiplier on size/shape/boundary variability
    cover: float = 0.4  # epithelial (or mucin, for mucinous) area share at mid grade
    gland_um: tuple[float, float] = (25.0, 50.0)  # gland semi-major axis range
    gland_aspect: tuple[float, float] = (1.0, 1.5)
    wall_um: float = 12.0  # epithelial wall thickness around a lumen
    fibroblasts: float = 1.0  # stromal cellularity multiplier
    lymphocytes: float = 0.5  # mean lymphocyte density multiplier
    mitoses: float = 1.0


PROFILES: dict[str, Profile] = {
    "A": Profile("glands", False, 0.0, cover=0.42, gland_um=(16, 32), gland_aspect=(1.0, 1.7), wall_um=14),
    "F": Profile("glands", False, 0.0, cover=0.22, gland_um=(40, 130), gland_aspect=(2.5, 6.0), wall_um=15,
                 fibroblasts=1.4),
    "PT": Profile("glands", False, 0.08, cover=0.18, gland_um=(60, 180), gland_aspect=(3.0, 8.0), wall_um=16,
                  fibroblasts=2.6, lymphocytes=0.4),
    "TA": Profile("glands", False, 0.03, cover=0.55, gland_um=(14, 26), gland_aspect=(1.0, 1.4), wall_um=13,
                  fibroblasts=0.7),
    "DC": Profile("nests", True, 0.0, pleomorphism=1.2, cover=0.5, lymphocytes=0.9),
    "LC": Profile("cords", True, -0.15, nucleus_um=6.5, nucleus_slope=2.0, pleomorphism=0.3, cover=0.35,
                  mitoses=0.2, lymphocytes=0.6),
    "MC": Profile("mucin", True, -0.05, cover=0.45, lymphocytes=0.3),
    "PC": Profile("papillary", True, -0.05, cover=0.4, lymphocytes=0.5),
}


@dataclass(frozen=True)
class PatientParams:
    """Latent, per-patient rendering parameters (every image of the patient shares them)."""

    key: str  # pixel identity: patients with equal keys render equal pixels
    subtype: str  # A F PT TA DC LC MC PC
    grade: float  # latent grade in [0, 1]
    h_vector: tuple[float, float, float]
    e_vector: tuple[float, float, float]
    h_scale: float
    e_scale: float
    io: tuple[float, float, float]  # glass brightness per channel
    epithelium: float  # coverage multiplier
    fibroblasts: float
    lymphocytes: float
    stroma_e: float  # eosin density of stroma
    holes: float  # threshold of the empty-glass field (higher: fewer holes)

    @property
    def malignant(self) -> bool:
        return PROFILES[self.subtype].malignant


def key_int(key: str) -> int:
    """Stable 32-bit integer for a patient key (Python's ``hash`` is salted per process)."""
    return zlib.crc32(key.encode("utf-8"))


def _seed_int(seed: int) -> int:
    return int(seed) & 0xFFFFFFFFFFFFFFFF


def patient_params(seed: int, key: str, subtype: str, difficulty: float = 0.5) -> PatientParams:
    """Draw a patient's latent parameters; deterministic in ``(seed, key)`` and monotone in ``difficulty``."""
    if subtype not in PROFILES:
        raise ValueError(f"unknown subtype code {subtype!r}; expected one of {', '.join(PROFILES)}")
    d = float(np.clip(difficulty, 0.0, 1.0))
    prof = PROFILES[subtype]
    rng = np.random.default_rng(np.random.SeedSequence([_seed_int(seed), key_int(key), 0]))
    z = rng.standard_normal(16)
    centre = (0.78 - 0.18 * d) if prof.malignant else (0.22 + 0.18 * d)
    grade = float(np.clip(centre + prof.grade_shift + (0.07 + 0.10 * d) * z[0], 0.0, 1.0))
    nuisance = 0.5 + d
    h_vec = stain.unit(stain.H_REF + 0.035 * nuisance * z[1:4])
    e_vec = stain.unit(stain.E_REF + 0.045 * nuisance * z[4:7])
    io_base = 244.0 + 5.0 * np.tanh(z[7])
    io = np.clip(io_base + 3.0 * z[8:11], 225.0, 255.0)
    return PatientParams(
        key=key,
        subtype=subtype,
        grade=grade,
        h_vector=tuple(float(v) for v in h_vec),
        e_vector=tuple(float(v) for v in e_vec),
        h_scale=float(np.exp(0.16 * nuisance * z[11])),
        e_scale=float(np.exp(0.20 * nuisance * z[12])),
        io=tuple(float(v) for v in io),
        epithelium=float(np.exp(0.22 * z[13])),
        fibroblasts=float(np.exp(0.3 * z[14])),
        lymphocytes=float(prof.lymphocytes * np.exp(0.7 * z[15])),
        stroma_e=float(rng.uniform(0.42, 0.68)),
        holes=float(rng.uniform(1.3, 2.6)),
    )


def patient_params_for_index(seed: int, index: int, difficulty: float = 0.5) -> PatientParams:
    """Rendering parameters of patient ``index`` of :func:`~breakhis_ray.data.cohort.load_patients` (DC and LC
    13412 share the ductal folder's parameters, so they render the same pixels)."""
    rows = load_patients()
    if not 0 <= index < len(rows):
        raise IndexError(f"patient index must be in 0..{len(rows) - 1}, got {index}")
    source = pixel_source(rows[index])
    return patient_params(seed, source.slide, source.code, difficulty)


def tile_rng(seed: int, key: str, magnification: int, seq: int) -> np.random.Generator:
    """The generator of one tile: independent streams per (seed, patient, magnification, seq)."""
    return np.random.default_rng(
        np.random.SeedSequence([_seed_int(seed), key_int(key), 1, int(magnification), int(seq)])
    )


# --------------------------------------------------------------------------------- random fields
@lru_cache(maxsize=None)
def _filtered_noise_std(sigma: float, truncate: float) -> float:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    return float((k**2).sum())  # 2-D variance of filtered unit white noise = (sum k^2)^2; std = sum k^2


def _noise(rng: np.random.Generator, shape: tuple[int, int], length_px: float) -> np.ndarray:
    """Smooth, roughly unit-variance Gaussian random field with correlation length ~``length_px``.

    White noise on a coarse grid (spacing ``length_px / 2.5``), blurred and bicubically upsampled:
    the cost depends on the output size only through the final resize.
    """
    h, w = shape
    step = max(float(length_px) / 2.5, 1.0)
    gh, gw = int(np.ceil(h / step)) + 5, int(np.ceil(w / step)) + 5
    g = rng.standard_normal((gh, gw), dtype=np.float32)
    g = ndimage.gaussian_filter(g, 1.0, mode="wrap", truncate=3.0)
    g *= np.float32(1.0 / _filtered_noise_std(1.0, 3.0))
    if step == 1.0:
        return np.ascontiguousarray(g[2 : 2 + h, 2 : 2 + w])
    return _resize(g, (w, h), box=(2.0, 2.0, 2.0 + w / step, 2.0 + h / step), resample=Image.Resampling.BICUBIC)


def _resize(field: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float] | None = None,
            resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resample a float32 field to ``size=(width, height)`` (optionally of a sub-box)."""
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32))
    return np.asarray(img.resize(size, resample, box=box), dtype=np.float32)


# ------------------------------------------------------------------------------------ stamping
def _bucket(half: np.ndarray) -> np.ndarray:
    """Round box half-sizes up to a geometric ladder (few distinct sizes, <~20% wasted width)."""
    ladder = np.unique(np.ceil(1.2 ** np.arange(0, 60)).astype(np.int64))
    return ladder[np.searchsorted(ladder, half)]


def _stamp(shape, cx, cy, a, b, theta, harm, pad: float = 0.5, max_elems: int = 1 << 21):
    """Rasterise perturbed ellipses in their bounding boxes, vectorised per box size.

    Centres ``cx, cy`` and semi-axes ``a, b`` are in pixels; ``harm`` (n, 4) holds the cos/sin
    coefficients of the 2nd and 3rd boundary harmonics. Returns ``(obj, flat, depth)`` for each pixel
    within ``pad`` pixels of an object: the object's index, the flat pixel index and the signed depth
    inside the boundary in pixels (measured along the minor axis).
    """
    height, width = shape
    n = len(cx)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n == 0:
        return empty
    a = np.maximum(np.asarray(a, np.float32), 0.05)
    b = np.maximum(np.asarray(b, np.float32), 0.05)
    harm = np.asarray(harm, np.float32)
    half = np.ceil(np.maximum(a, b) * (1.0 + np.abs(harm).sum(1)) + 1.0 + pad).astype(np.int64)
    half = _bucket(half)
    ix = np.rint(cx).astype(np.int64)
    iy = np.rint(cy).astype(np.int64)
    fx = (np.asarray(cx) - ix).astype(np.float32)
    fy = (np.asarray(cy) - iy).astype(np.float32)
    cos_t = np.cos(theta).astype(np.float32)
    sin_t = np.sin(theta).astype(np.float32)
    rad = np.minimum(a, b)
    out_obj, out_flat, out_depth = [], [], []
    for hb in np.unique(half):
        members = np.nonzero(half == hb)[0]
        side = 2 * int(hb) + 1
        chunk = max(1, max_elems // (side * side))
        off = np.arange(-hb, hb + 1, dtype=np.float32)
        for start in range(0, len(members), chunk):
            idx = members[start : start + chunk]

            def col(v, idx=idx):
                return v[idx][:, None, None]

            x = off[None, None, :] - col(fx)
            y = off[None, :, None] - col(fy)
            c, s = col(cos_t), col(sin_t)
            p = (x * c + y * s) / col(a)
            q = (y * c - x * s) / col(b)
            r = np.sqrt(p * p + q * q) + np.float32(1e-6)
            cp, sp = p / r, q / r
            hm = harm[idx]
            edge = (
                1.0
                + hm[:, 0, None, None] * (2 * cp * cp - 1)
                + hm[:, 1, None, None] * (2 * cp * sp)
                + hm[:, 2, None, None] * cp * (4 * cp * cp - 3)
                + hm[:, 3, None, None] * sp * (3 - 4 * sp * sp)
            )
            depth = (edge - r) * col(rad)
            px = ix[idx][:, None, None] + np.arange(-hb, hb + 1)[None, None, :]
            py = iy[idx][:, None, None] + np.arange(-hb, hb + 1)[None, :, None]
            keep = (depth > -pad) & (px >= 0) & (px < width) & (py >= 0) & (py < height)
            k, yy, xx = np.nonzero(keep)
            out_obj.append(idx[k])
            out_flat.append((iy[idx][k] + yy - hb) * width + (ix[idx][k] + xx - hb))
            out_depth.append(depth[k, yy, xx])
    if not out_obj:
        return empty
    return np.concatenate(out_obj), np.concatenate(out_flat), np.concatenate(out_depth)


# -------------------------------------------------------------------------------- architectures
def _glands(rng, shape, u, prof: Profile, cover: float) -> np.ndarray:
    """Tissue map of glands (epithelial wall around a lumen) in stroma."""
    height, width = shape
    f = max(1, int(1.0 / u))  # structure grid of cells >= ~1 um, upsampled at the end
    sh, sw = -(-height // f), -(-width // f)
    us = u * f
    r_lo, r_hi = prof.gland_um
    asp_lo, asp_hi = prof.gland_aspect
    ext_h, ext_w = sh * us + 2 * r_hi, sw * us + 2 * r_hi
    mean_area = np.pi * ((r_lo + r_hi) / 2) ** 2 / np.sqrt(asp_lo * asp_hi)
    n = int(rng.poisson(cover * ext_h * ext_w / mean_area))
    a_um = rng.uniform(r_lo, r_hi, n)
    b_um = a_um / rng.uniform(asp_lo, asp_hi, n)
    wall = prof.wall_um * rng.uniform(0.8, 1.3, n)
    cx = (rng.uniform(0, ext_w, n) - r_hi) / us
    cy = (rng.uniform(0, ext_h, n) - r_hi) / us
    theta = rng.uniform(0, np.pi, n)
    harm = rng.normal(0.0, 0.07, (n, 4)) * np.array([1.0, 1.0, 0.7, 0.7])
    obj, flat, depth = _stamp((sh, sw), cx, cy, a_um / us, b_um / us, theta, harm, pad=2.0)
    field = np.full(sh * sw, -1.0, np.float32)
    np.maximum.at(field, flat, (depth * us / wall[obj]).astype(np.float32))
    field = field.reshape(sh, sw)
    if f > 1:
        field = _resize(field, (width, height), box=(0, 0, width / f, height / f))
    tissue = np.where(field > 0, EPITHELIUM, STROMA).astype(np.uint8)
    tissue[field > 1.0] = BACKGROUND  # lumen
    return tissue


def _nests(rng, shape, u, cover: float) -> np.ndarray:
    """Solid tumour nests with cribriform holes and small infiltrating clusters."""
    nest = _noise(rng, shape, rng.uniform(60, 150) / u)
    thr = float(np.quantile(nest[::4, ::4], 1.0 - cover))  # the tile is taken on the tumour
    tissue = np.where(nest > thr, EPITHELIUM, STROMA).astype(np.uint8)
    holes = _noise(rng, shape, 10.0 / u)
    tissue[(nest > thr + 0.6) & (holes > rng.uniform(1.5, 2.4))] = BACKGROUND
    clusters = _noise(rng, shape, 18.0 / u)
    tissue[(tissue == STROMA) & (clusters > 2.0)] = EPITHELIUM
    return tissue


def _cords(rng, shape, u, cover: float) -> np.ndarray:
    """Lobular pattern: single-file cords threading through stroma, with discohesive sheets."""
    cords = _noise(rng, shape, 45.0 / u)
    width_thr = float(ndtri(0.5 + 0.5 * min(cover * 0.6, 0.9)))
    tissue = np.where(np.abs(cords) < width_thr, EPITHELIUM, STROMA).astype(np.uint8)
    sheets = _noise(rng, shape, 120.0 / u)
    tissue[sheets > float(ndtri(1.0 - 0.4 * cover))] = EPITHELIUM
    return tissue


def _mucin(rng, shape, u, cover: float) -> tuple[np.ndarray, np.ndarray]:
    """Mucinous pattern: pools of mucin with floating tumour clusters; returns (tissue, mucin mask)."""
    pools = _noise(rng, shape, rng.uniform(100, 200) / u)
    mucin = pools > float(np.quantile(pools[::4, ::4], 1.0 - min(cover + 0.1, 0.9)))
    clusters = _noise(rng, shape, 22.0 / u)
    tissue = np.full(shape, STROMA, np.uint8)
    tissue[mucin] = BACKGROUND
    tissue[mucin & (clusters > 0.9)] = EPITHELIUM
    tissue[~mucin & (clusters > 1.9)] = EPITHELIUM
    return tissue, mucin & (tissue == BACKGROUND)


def _papillary(rng, shape, u, cover: float) -> np.ndarray:
    """Papillary fronds: thin fibrovascular cores lined by (stratified) epithelium in cystic space."""
    fronds = np.abs(_noise(rng, shape, 70.0 / u))
    core = 0.12
    lining = core + 0.35 * cover / 0.4
    tissue = np.full(shape, BACKGROUND, np.uint8)
    tissue[fronds < lining] = EPITHELIUM
    tissue[fronds < core] = STROMA
    wall = _noise(rng, shape, 300.0 / u)
    tissue[wall < -1.4] = STROMA
    return tissue


# ------------------------------------------------------------------------------------- nuclei
@dataclass
class _Nuclei:
    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    harm: np.ndarray
    od: np.ndarray
    texture: np.ndarray
    kind: np.ndarray

    @staticmethod
    def concat(parts: list[_Nuclei]) -> _Nuclei:
        return _Nuclei(*(np.concatenate([getattr(p, f) for p in parts]) for f in _Nuclei.__dataclass_fields__))

    def take(self, idx) -> _Nuclei:
        return _Nuclei(*(getattr(self, f)[idx] for f in _Nuclei.__dataclass_fields__))


def _epithelial_nuclei(rng, tissue, u, grade, prof: Profile, od_scale: float, crowd: float) -> _Nuclei:
    height, width = tissue.shape
    pleo = prof.pleomorphism
    diameter = prof.nucleus_um + prof.nucleus_slope * grade
    spacing = diameter * crowd / u  # pixels between cell centres
    gx = np.arange(spacing / 2, width, spacing)
    gy = np.arange(spacing / 2, height, spacing)
    cx = np.repeat(gx[None, :], len(gy), 0).ravel()
    cy = np.repeat(gy[:, None], len(gx), 1).ravel()
    cx = cx + rng.uniform(-0.38, 0.38, cx.size) * spacing
    cy = cy + rng.uniform(-0.38, 0.38, cy.size) * spacing
    ok = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    cx, cy = cx[ok], cy[ok]
    inside = tissue[cy.astype(np.int64), cx.astype(np.int64)] == EPITHELIUM
    inside &= rng.random(cx.size) < 0.92
    cx, cy = cx[inside], cy[inside]
    n = cx.size
    size = diameter * np.exp(rng.normal(0.0, 0.05 + 0.22 * grade * pleo, n))
    aspect = 1.0 + np.abs(rng.normal(0.0, 0.08 + 0.25 * grade * pleo, n))
    harm = rng.normal(0.0, 0.015 + 0.07 * grade * pleo, (n, 4))
    od = (0.85 + 0.85 * grade) * np.exp(rng.normal(0.0, 0.06 + 0.10 * grade * pleo, n))
    texture = np.full(n, 0.10 + 0.30 * grade * max(pleo, 0.5), np.float32)
    kind = np.full(n, _EPITHELIAL, np.int8)
    mitotic = rng.random(n) < prof.mitoses * (0.001 + 0.03 * max(grade - 0.45, 0.0))
    size[mitotic] *= 0.85
    aspect[mitotic] = rng.uniform(1.6, 2.6, int(mitotic.sum()))
    harm[mitotic] = rng.normal(0.0, 0.2, (int(mitotic.sum()), 4))
    od[mitotic] = 2.0
    texture[mitotic] = 0.03
    kind[mitotic] = _MITOSIS
    od = np.clip(od * od_scale, 0.8, 2.0)
    half = size / (2 * u)
    root = np.sqrt(aspect)
    return _Nuclei(cx, cy, half * root, half / root, rng.uniform(0, np.pi, n), harm, od, texture, kind)


def _stromal_nuclei(rng, tissue, u, params: PatientParams, prof: Profile, fibre_angle: float,
                    lymph_field: np.ndarray, od_scale: float) -> _Nuclei:
    height, width = tissue.shape
    area = height * width * u * u
    parts = []
    # fibroblasts: spindles aligned with the collagen
    n = int(rng.poisson(area * prof.fibroblasts * params.fibroblasts / 38.0**2))
    cx, cy = rng.uniform(0, width, n), rng.uniform(0, height, n)
    keep = tissue[cy.astype(np.int64), cx.astype(np.int64)] == STROMA
    cx, cy = cx[keep], cy[keep]
    m = cx.size
    length = rng.uniform(10.0, 17.0, m) / (2 * u)
    thick = rng.uniform(2.2, 3.4, m) / (2 * u)
    parts.append(_Nuclei(cx, cy, length, thick, fibre_angle + rng.normal(0, 0.25, m),
                         rng.normal(0, 0.03, (m, 4)), np.clip(rng.uniform(0.8, 1.1, m) * od_scale, 0.8, 2.0),
                         np.full(m, 0.05, np.float32), np.full(m, _FIBROBLAST, np.int8)))
    # lymphocytes: small, round, dark, clustered in infiltrates
    n = int(rng.poisson(area * params.lymphocytes / 30.0**2 * 3.0))
    cx, cy = rng.uniform(0, width, n), rng.uniform(0, height, n)
    iy, ix = cy.astype(np.int64), cx.astype(np.int64)
    keep = (tissue[iy, ix] == STROMA) & (lymph_field[iy, ix] > 1.0)
    cx, cy = cx[keep], cy[keep]
    m = cx.size
    r = rng.uniform(5.5, 7.0, m) / (2 * u)
    parts.append(_Nuclei(cx, cy, r * 1.05, r / 1.05, rng.uniform(0, np.pi, m), rng.normal(0, 0.02, (m, 4)),
                         np.clip(rng.uniform(1.4, 1.8, m) * od_scale, 0.8, 2.0),
                         np.full(m, 0.04, np.float32), np.full(m, _LYMPHOCYTE, np.int8)))
    return _Nuclei.concat(parts)


def _draw_nuclei(shape, nuc: _Nuclei):
    """Coverage, optical density, texture amplitude and contiguous instance labels of all nuclei."""
    height, width = shape
    size = height * width
    cov_img = np.zeros(size, np.float32)
    od_img = np.zeros(size, np.float32)
    tex_img = np.zeros(size, np.float32)
    labels = np.zeros(size, np.int32)
    n = nuc.cx.size
    if n:
        obj, flat, depth = _stamp(shape, nuc.cx, nuc.cy, nuc.a, nuc.b, nuc.theta, nuc.harm)
        cov = np.clip(depth + 0.5, 0.0, 1.0)
        # sub-pixel nuclei (small tiles, low magnification): keep the integrated optical density right
        area = np.pi * nuc.a * nuc.b
        sums = np.bincount(obj, weights=cov, minlength=n)
        small = np.minimum(nuc.a, nuc.b) < 1.5
        scale = np.where(small, np.minimum(1.0, area / np.maximum(sums, 1e-6)), 1.0).astype(np.float32)
        cov = cov * scale[obj]
        od = nuc.od.astype(np.float32)
        tex = nuc.texture.astype(np.float32)
        cov_img[flat] = cov  # soft edges first, then cores on top: a later nucleus occludes an earlier one
        od_img[flat] = od[obj]
        tex_img[flat] = tex[obj]
        core = cov >= 0.5
        fc, oc = flat[core], obj[core]
        cov_img[fc] = cov[core]
        od_img[fc] = od[oc]
        tex_img[fc] = tex[oc]
        labels[fc] = oc + 1
    present = np.zeros(n + 1, bool)
    present[labels] = True
    present[0] = False
    ids = np.cumsum(present).astype(np.int32) * present
    kinds = np.concatenate([[0], nuc.kind]).astype(np.int64)
    home = np.where(labels > 0, _HOME_TISSUE[kinds[labels]], 0).reshape(shape)
    labels = ids[labels].reshape(shape)
    return labels, home, cov_img.reshape(shape), od_img.reshape(shape), tex_img.reshape(shape)


# ------------------------------------------------------------------------------------- render
def render_tile(
    seed: int,
    patient: PatientParams | int,
    magnification: int,
    seq: int,
    size: tuple[int, int] = (700, 460),
    difficulty: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one tile.

    ``patient`` is a :class:`PatientParams` (see :func:`patient_params`) or an index into the BreakHis
    patient table (:func:`breakhis_ray.data.cohort.load_patients`). ``size`` is ``(width, height)``.

    Returns ``(rgb uint8 HxWx3, nuclei uint16 HxW instance ids 1..N (0 none), tissue uint8 HxW``
    with 0 background/lumen/mucin, 1 stroma, 2 epithelium).
    """
    if not isinstance(patient, PatientParams):
        patient = patient_params_for_index(seed, int(patient), difficulty)
    if magnification not in MAGNIFICATIONS:
        raise ValueError(f"magnification must be one of {MAGNIFICATIONS}, got {magnification}")
    width, height = int(size[0]), int(size[1])
    shape = (height, width)
    d = float(np.clip(difficulty, 0.0, 1.0))
    prof = PROFILES[patient.subtype]
    u = um_per_px(magnification, width)
    rng = tile_rng(seed, patient.key, magnification, seq)

    # per-image jitter around the patient's latent state
    grade = float(np.clip(patient.grade + (0.04 + 0.06 * d) * rng.standard_normal(), 0.0, 1.0))
    h_scale = patient.h_scale * float(np.exp(0.05 * rng.standard_normal()))
    e_scale = patient.e_scale * float(np.exp(0.06 * rng.standard_normal()))
    cover = prof.cover * patient.epithelium * float(np.exp(0.2 * rng.standard_normal()))
    if prof.arch in ("nests", "cords", "papillary"):
        cover *= 0.7 + 0.6 * grade
    cover = float(np.clip(cover, 0.05, 0.85))

    # architecture
    mucin = None
    if prof.arch == "glands":
        tissue = _glands(rng, shape, u, prof, cover)
    elif prof.arch == "nests":
        tissue = _nests(rng, shape, u, cover)
    elif prof.arch == "cords":
        tissue = _cords(rng, shape, u, cover)
    elif prof.arch == "mucin":
        tissue, mucin = _mucin(rng, shape, u, cover)
    else:
        tissue = _papillary(rng, shape, u, cover)
    holes = _noise(rng, shape, 300.0 / u) > patient.holes + 0.3 * rng.standard_normal()
    tissue[holes] = BACKGROUND
    if mucin is not None:
        mucin &= ~holes

    # nuclei
    fibre_angle = float(rng.uniform(0, np.pi))
    lymph_field = _noise(rng, shape, 60.0 / u)
    crowd = {"glands": 1.3, "cords": 1.4}.get(prof.arch, 1.6 - 0.3 * grade)
    od_scale = h_scale  # nuclei keep their H-OD in 0.8..2.0 whatever the stain strength
    nuclei = _Nuclei.concat([
        _epithelial_nuclei(rng, tissue, u, grade, prof, od_scale, crowd),
        _stromal_nuclei(rng, tissue, u, patient, prof, fibre_angle, lymph_field, od_scale),
    ])
    if nuclei.cx.size > MAX_NUCLEI:
        nuclei = nuclei.take(np.sort(rng.choice(nuclei.cx.size, MAX_NUCLEI, replace=False)))
    order = rng.permutation(nuclei.cx.size)
    labels, home, cov, nuc_od, tex_amp = _draw_nuclei(shape, nuclei.take(order))
    fix = (labels > 0) & (tissue == BACKGROUND)
    tissue[fix] = home[fix]

    # stain densities around the nuclei: wavy collagen in stroma, paler cytoplasm in epithelium, mucin
    wavelength = 5.0 / u
    fibre_amp = 0.12 * float(np.clip((wavelength - 2.0) / 2.0, 0.0, 1.0))
    k = np.float32(2 * np.pi / wavelength)
    phase = (np.arange(width, dtype=np.float32) * (k * np.float32(np.cos(fibre_angle))))[None, :] + (
        np.arange(height, dtype=np.float32) * (k * np.float32(np.sin(fibre_angle)))
    )[:, None]
    fibres = np.sin(phase + 5.0 * _noise(rng, shape, 30.0 / u) + 1.5 * _noise(rng, shape, 8.0 / u))
    lumpy = _noise(rng, shape, 25.0 / u)
    e_epi = 0.24 + 0.08 * rng.random() + 0.05 * (1 - grade)
    h_epi = 0.06 + 0.12 * grade
    stroma_mask = tissue == STROMA
    epi_mask = tissue == EPITHELIUM
    e_map = np.where(stroma_mask, patient.stroma_e * (1 + fibre_amp * fibres + 0.12 * lumpy),
                     np.where(epi_mask, e_epi * (1 + 0.1 * lumpy), 0.0)).astype(np.float32)
    h_map = np.where(stroma_mask, 0.035, np.where(epi_mask, h_epi, 0.0)).astype(np.float32)
    if mucin is not None:
        wisps = np.clip(0.55 + 0.35 * _noise(rng, shape, 8.0 / u), 0.1, 1.2)
        h_map = np.where(mucin, 0.24 * wisps, h_map)
        e_map = np.where(mucin, 0.07 * wisps, e_map)
    h_map = ndimage.gaussian_filter(h_map, 0.6, truncate=3.0)
    e_map = ndimage.gaussian_filter(e_map, 0.6, truncate=3.0)

    h_map *= np.float32(h_scale)
    e_map *= np.float32(e_scale)

    # nuclei on top (their optical density already carries the stain strength): chromatin texture,
    # cytoplasm displaced; then uneven staining, Beer-Lambert and sensor noise
    chromatin = _noise(rng, shape, 1.6 / u)
    h_map = h_map * (1 - cov) + cov * nuc_od * np.maximum(1 + tex_amp * chromatin, 0.3)
    e_map = e_map * (1 - 0.7 * cov)
    uneven = 1 + 0.06 * _noise(rng, shape, 400.0 / u)
    h_map *= uneven
    e_map *= uneven
    od = h_map[..., None] * -np.asarray(patient.h_vector, np.float32)
    od -= e_map[..., None] * np.asarray(patient.e_vector, np.float32)
    rgb = np.exp(od, out=od)
    rgb *= np.asarray(patient.io, np.float32)
    rgb += (rng.standard_normal(shape, dtype=np.float32) * np.float32(1.8) + np.float32(0.5))[..., None]
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8), labels.astype(np.uint16), tissue
