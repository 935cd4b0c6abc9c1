"""Random online augmentation of uint8 image batches: the only module of the project that draws random numbers
for data.

Applied to the training set *after* ``materialize()`` (:func:`breakhis_ray.data.pipeline.build_datasets`),
so the cached decode/resize stays deterministic and every epoch sees new draws. Operations on
``uint8 (H, W, 3)`` images, in this order: optional random resized crop, horizontal / vertical flips,
quarter turns (half turns for non-square images), HED jitter (scale and shift of the hematoxylin, eosin and
residual concentrations of colour deconvolution, Tellez et al. 2018), colour jitter (brightness, contrast,
saturation).

Randomness and reproducibility
------------------------------
Every row gets its own ``numpy.random.Generator`` seeded by ``(seed, epoch, key)``
(:func:`sample_rngs`), where ``key`` is a stable 64-bit hash of the last :data:`KEY_PARTS` components of the
row's ``path`` (:func:`path_keys`: the same whatever block, batch or worker the row lands in, and wherever the
tree lies: a clone in another directory or the same tree on ``s3://`` draws the same augmentations) and ``epoch`` is the 0-based training epoch. Inside a
Ray Data pipeline (:class:`RandomAugment`) ``epoch`` is Ray Data's execution index of the dataset (the
counter behind ``RandomSeedConfig(reseed_after_execution=True)``, which grows by one each time the dataset is
executed, i.e. each epoch, in the driver and in Ray Train's split coordinator alike) minus the index the
dataset had when the pipeline was built (``first_execution``). Every augmented row carries the epoch it was
drawn for in an ``aug_epoch`` column, and the training loop checks it against its own epoch. Hence, with
``DataConfig.seed`` set:

* every epoch draws different augmentations (the execution index changes);
* a run repeated with the same seed and data reproduces them image by image, whatever the batch
  composition, block order or number of workers (each row has its own stream);
* a resumed run lines the index up with its epoch first (a restarted worker group gets a fresh split
  coordinator whose index starts where the driver's dataset was): the loop executes the dataset once, briefly,
  per epoch already done (:func:`breakhis_ray.data.pipeline.advance_epochs`);
* any extra execution of the training dataset (e.g. ``count()``, ``take()`` on it) advances the index: the
  ``aug_epoch`` check then stops the run instead of silently training on another epoch's draws.

With ``seed=None`` each batch draws fresh OS entropy: epochs differ, runs are not reproducible.

Image/mask pairs (:func:`augment_pairs`, :class:`PairAugment`: U-Net training and the mask channel of
segmentation-guided classification) draw the same way; flips and quarter turns move every pixel column
(``mask`` included) with the image, HED and colour jitter change ``image`` only.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping, Sequence

import numpy as np

from breakhis_ray.config import AugmentConfig
from breakhis_ray.data.stain import E_REF, H_REF, od_to_rgb, rgb_to_od, stain_matrix
from breakhis_ray.data.transforms import resize_uint8
from breakhis_ray.errors import DataError

_HED = stain_matrix(H_REF, E_REF).astype(np.float32)  # rows: H, E, residual (unit OD vectors)
_HED_INV = np.linalg.inv(stain_matrix(H_REF, E_REF)).astype(np.float32)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------- seeding
#: Path components a row's key is made of: BreakHis' ``<patient folder>/<magnification>X/<file name>`` (the file
#: name alone is unique there; the two folders keep keys distinct in trees whose names repeat per folder).
KEY_PARTS = 3


def path_keys(paths: Sequence[str]) -> np.ndarray:
    """Stable int64 key per path (first 8 bytes of BLAKE2b of its last :data:`KEY_PARTS` components, so the
    key does not depend on where the tree lies): the per-row seed component."""
    out = np.empty(len(paths), dtype=np.int64)
    for i, path in enumerate(paths):
        tail = "/".join(re.split(r"[/\\]+", str(path))[-KEY_PARTS:])
        digest = hashlib.blake2b(tail.encode("utf-8"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little", signed=True)
    return out


def execution_index(context: Any = None) -> int:
    """Ray Data's execution index of the dataset being computed (0 outside a Ray Data task), or of the
    ``DataContext`` given (a dataset's ``ds.context``)."""
    if context is None:
        try:
            from ray.data import DataContext
        except ImportError:  # pragma: no cover - ray is a hard dependency
            return 0
        context = DataContext.get_current()
    return int(getattr(context, "_execution_idx", 0) or 0)


def _with_epoch(out: dict[str, np.ndarray], epoch: int) -> dict[str, np.ndarray]:
    return {**out, "aug_epoch": np.full(len(out["image"]), epoch, dtype=np.int64)}


def sample_rngs(seed: int, epoch: int, keys: Sequence[int]) -> list[np.random.Generator]:
    """One generator per row, seeded by ``(seed, epoch, key)``: reproducible and independent of batching."""
    seed_u, epoch_u = int(seed) & _MASK64, int(epoch) & _MASK64
    return [np.random.default_rng([int(key) & _MASK64, epoch_u, seed_u]) for key in keys]


# ------------------------------------------------------------------------------------------- operations
def _as_cfg(cfg: AugmentConfig | Mapping[str, Any] | None) -> AugmentConfig:
    if cfg is None:
        return AugmentConfig()
    if isinstance(cfg, AugmentConfig):
        return cfg
    return AugmentConfig.model_validate(dict(cfg))


def random_resized_crop(img: np.ndarray, rng: np.random.Generator, scale=(0.7, 1.0), ratio=(0.75, 4 / 3)):
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio``; resize back to the input size."""
    height, width = img.shape[:2]
    area = height * width
    log_ratio = np.log(ratio)
    target = area * rng.uniform(scale[0], scale[1])
    aspect = float(np.exp(rng.uniform(log_ratio[0], log_ratio[1])))
    crop_w = int(round(np.sqrt(target * aspect)))
    crop_h = int(round(np.sqrt(target / aspect)))
    crop_w, crop_h = min(max(crop_w, 1), width), min(max(crop_h, 1), height)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    crop = np.ascontiguousarray(img[top:top + crop_h, left:left + crop_w])
    return resize_uint8(crop, (height, width))


def hed_jitter(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Perturb each stain concentration ``c -> c * U(1 - sigma, 1 + sigma) + U(-sigma, sigma)``."""
    alpha = rng.uniform(1.0 - sigma, 1.0 + sigma, size=3).astype(np.float32)
    beta = rng.uniform(-sigma, sigma, size=3).astype(np.float32)
    conc = rgb_to_od(img) @ _HED_INV
    return od_to_rgb((conc * alpha + beta) @ _HED)


def color_jitter(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation factors each drawn in ``1 +- strength``."""
    brightness, contrast, saturation = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    x = img.astype(np.float32) * np.float32(brightness)
    gray_mean = np.float32((x @ _LUMA).mean())
    x = (x - gray_mean) * np.float32(contrast) + gray_mean
    gray = (x @ _LUMA)[..., None]
    x = (x - gray) * np.float32(saturation) + gray
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_image(img: np.ndarray, cfg: AugmentConfig | Mapping[str, Any] | None, rng: np.random.Generator):
    """One random augmentation of a ``uint8 (H, W, 3)`` image (same shape and dtype)."""
    cfg = _as_cfg(cfg)
    if img.ndim != 3 or img.dtype != np.uint8:
        raise DataError(f"augment expects uint8 (H, W, C) images, got {img.dtype} {img.shape}")
    out = img
    if not cfg.enabled:
        return out
    if cfg.random_resized_crop:
        out = random_resized_crop(out, rng, cfg.crop_scale, cfg.crop_ratio)
    if cfg.hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    if cfg.vflip and rng.random() < 0.5:
        out = out[::-1]
    if cfg.rot90:
        square = out.shape[0] == out.shape[1]
        k = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
        out = np.rot90(out, k)
    if cfg.hed_jitter > 0:
        out = hed_jitter(out, rng, cfg.hed_jitter)
    if cfg.color_jitter > 0:
        out = color_jitter(out, rng, cfg.color_jitter)
    return np.ascontiguousarray(out)


def augment_batch(
    batch: dict[str, np.ndarray],
    cfg: AugmentConfig | Mapping[str, Any] | None,
    rng: np.random.Generator | Sequence[np.random.Generator],
) -> dict[str, np.ndarray]:
    """Augment ``batch["image"]`` (``uint8 (N, H, W, 3)``); other columns pass through untouched.

    ``rng`` is one generator for the whole batch, or one per row (:func:`sample_rngs`, what the pipeline uses).
    """
    cfg = _as_cfg(cfg)
    images = np.asarray(batch["image"])
    if images.ndim != 4:
        raise DataError(f"augment_batch expects image (N, H, W, C), got shape {images.shape}")
    if not cfg.enabled or len(images) == 0:
        return batch
    rngs = [rng] * len(images) if isinstance(rng, np.random.Generator) else list(rng)
    if len(rngs) != len(images):
        raise DataError(f"augment_batch got {len(rngs)} generators for {len(images)} images")
    out = np.empty_like(images)
    for i, (img, gen) in enumerate(zip(images, rngs)):
        out[i] = augment_image(img, cfg, gen)
    return {**batch, "image": out}


class RandomAugment:
    """Ray Data ``map_batches`` function: :func:`augment_batch` with per-row, per-epoch generators.

    Rows need ``image`` and, when ``seed`` is set, ``key`` (:func:`path_keys`); rows leave with ``aug_epoch``
    (execution index minus ``first_execution``). See the module docstring for how epochs differ and runs
    reproduce.
    """

    def __init__(self, cfg: AugmentConfig | Mapping[str, Any] | None, seed: int | None, first_execution: int = 0):
        self.cfg = _as_cfg(cfg).model_dump()
        self.seed = seed
        self.first_execution = int(first_execution)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = AugmentConfig.model_validate(self.cfg)
        epoch = execution_index() - self.first_execution
        if self.seed is None:
            return _with_epoch(augment_batch(batch, cfg, np.random.default_rng()), epoch)
        if "key" not in batch:
            raise DataError("seeded augmentation needs a 'key' column (stable per-row hash of 'path')")
        return _with_epoch(augment_batch(batch, cfg, sample_rngs(self.seed, epoch, batch["key"])), epoch)


# ------------------------------------------------------------------------------------ image/mask pairs
def _geometry_and_colour(cfg: AugmentConfig) -> tuple[AugmentConfig, AugmentConfig]:
    geometry = cfg.model_copy(update={"hed_jitter": 0.0, "color_jitter": 0.0, "random_resized_crop": False})
    colour = cfg.model_copy(update={"hflip": False, "vflip": False, "rot90": False, "random_resized_crop": False})
    return geometry, colour


def augment_pairs(batch: dict[str, np.ndarray], cfg: AugmentConfig, rngs: Sequence[np.random.Generator],
                  pixel_columns: Sequence[str] = ("mask",)) -> dict[str, np.ndarray]:
    """Random flips/quarter turns applied identically to ``image`` and each ``(N, H, W)`` column in
    ``pixel_columns``; HED and colour jitter to ``image`` only. Other columns pass through.

    Built on :func:`augment_image`: the mask columns ride along as extra channels of the image for the
    geometric part, so both see exactly the same transform.
    """
    if cfg.random_resized_crop:
        raise DataError("random_resized_crop is not supported for image/mask pairs")
    images = np.asarray(batch["image"])
    columns = [c for c in pixel_columns if c in batch]
    if not cfg.enabled or len(images) == 0:
        return batch
    if len(rngs) != len(images):
        raise DataError(f"augment_pairs got {len(rngs)} generators for {len(images)} images")
    geometry, colour = _geometry_and_colour(cfg)
    extra = [np.asarray(batch[c]) for c in columns]
    for c, arr in zip(columns, extra):
        if arr.shape != images.shape[:3] or arr.dtype != np.uint8:
            raise DataError(f"column {c!r} must be uint8 {images.shape[:3]}, got {arr.dtype} {arr.shape}")
    out_images = np.empty_like(images)
    out_extra = [np.empty_like(a) for a in extra]
    for i, rng in enumerate(rngs):
        stacked = np.concatenate([images[i], *[a[i][..., None] for a in extra]], axis=-1)
        moved = augment_image(stacked, geometry, rng)
        out_images[i] = augment_image(np.ascontiguousarray(moved[..., :3]), colour, rng)
        for j, a in enumerate(out_extra):
            a[i] = moved[..., 3 + j]
    return {**batch, "image": out_images, **dict(zip(columns, out_extra))}


class PairAugment:
    """Ray Data ``map_batches`` function: :func:`augment_pairs` with per-row, per-epoch generators seeded as
    :class:`RandomAugment` seeds them (``seed``, epoch, row ``key``); rows leave with ``aug_epoch``.
    The ``key`` column is consumed when ``drop_key`` is set."""

    def __init__(self, cfg: AugmentConfig | Mapping[str, Any] | None, seed: int | None,
                 pixel_columns: Sequence[str] = ("mask",), drop_key: bool = True, first_execution: int = 0):
        self.cfg = _as_cfg(cfg).model_dump()
        self.seed = seed
        self.pixel_columns = tuple(pixel_columns)
        self.drop_key = drop_key
        self.first_execution = int(first_execution)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = AugmentConfig.model_validate(self.cfg)
        n = len(batch["image"])
        epoch = execution_index() - self.first_execution
        if self.seed is None:
            rngs = list(np.random.default_rng().spawn(n))
        else:
            if "key" not in batch:
                raise DataError("seeded augmentation needs a 'key' column (stable per-row hash of 'path')")
            rngs = sample_rngs(self.seed, epoch, batch["key"])
        out = augment_pairs(batch, cfg, rngs, self.pixel_columns)
        if self.drop_key:
            out = {k: v for k, v in out.items() if k != "key"}
        return _with_epoch(out, epoch)
