"""The ONE deterministic preprocessing shared by training, evaluation and batch inference.

Two halves, split where Ray Data materializes:

* ``bytes -> uint8 HWC`` (:func:`prepare_bytes`): decode (:func:`breakhis_ray.data.decode.decode_rgb`, the
  one decoder, with its decompression-bomb guard), resize (:func:`resize_uint8`), optional stain
  normalisation. Runs on CPU in a Ray Data stage *before* ``materialize()``; its output is what the
  training set caches.
* ``uint8 NHWC -> float32 NCHW`` (:func:`normalize`): scale to ``[0, 1]`` and, for ``scale="imagenet"``,
  subtract ``mean`` and divide by ``std``. Works on numpy arrays and on torch tensors, so the train loop
  normalizes on its device after random augmentation (:mod:`breakhis_ray.data.augment`).

:func:`preprocess_bytes` chains both halves: it is the eval/inference transform. Every checkpoint stores
its :class:`PreprocessSpec` (``to_dict``) so a predictor rebuilds exactly the same transform.

Nothing here is random.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
from pydantic import field_validator, model_validator

from breakhis_ray.config.base import StrictModel, parse_hw
from breakhis_ray.data.decode import DEFAULT_MAX_PIXELS, decode_rgb
from breakhis_ray.domain import IMAGENET_MEAN, IMAGENET_STD, UNIT_MEAN, UNIT_STD
from breakhis_ray.errors import DataError


class PreprocessSpec(StrictModel):
    """Deterministic preprocessing, saved with every checkpoint.

    ``size`` is ``(H, W)``. ``scale="imagenet"`` maps pixels to ``(x / 255 - mean) / std`` (ImageNet
    statistics unless given); ``scale="unit"`` maps them to plain ``x / 255`` in ``[0, 1]`` (CancerNet) and
    stores ``mean = 0``, ``std = 1`` whatever was passed. ``stain_normalization`` applies Macenko or Reinhard
    normalisation (:mod:`breakhis_ray.data.stain_norm`) towards ``stain_reference`` (fitted parameters from
    ``Normalizer.to_dict()``; ``None`` = the built-in H&E reference).
    """

    size: tuple[int, int] = (224, 224)
    scale: Literal["imagenet", "unit"] = "imagenet"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    stain_normalization: Literal["macenko", "reinhard"] | None = None
    stain_reference: dict[str, Any] | None = None

    _size = field_validator("size", mode="before")(lambda cls, v: parse_hw(v))

    @model_validator(mode="before")
    @classmethod
    def _resolve_stats(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("scale", "imagenet") == "unit":
            data["mean"], data["std"] = UNIT_MEAN, UNIT_STD
        else:
            if data.get("mean") is None:
                data["mean"] = IMAGENET_MEAN
            if data.get("std") is None:
                data["std"] = IMAGENET_STD
        return data

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in value):
            raise ValueError(f"std must be positive, got {value}")
        return value

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (what ``meta.json`` stores)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        return cls.model_validate(data)


def resize_uint8(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize ``uint8 (H, W, C)`` to ``size = (H, W)`` with antialiased bilinear interpolation (deterministic).

    The filter is PIL's ``BILINEAR`` (a triangle whose support widens with the reduction factor), run by
    torch's uint8 kernel (``interpolate(mode="bilinear", antialias=True)``): 0.46 ms for a 700x460 tile to
    224x224 on one core, against PIL's 1.62 ms. Its fixed-point weights round differently from PIL's, so a
    few values in a thousand differ from PIL's by one grey level, never more (``tests/test_transforms.py``;
    the accuracy effect is measured in docs/BENCHMARKS.md). Returns the input unchanged when it already has
    that size.
    """
    import torch

    height, width = int(size[0]), int(size[1])
    if img.ndim != 3 or img.dtype != np.uint8:
        raise DataError(f"resize_uint8 expects a uint8 (H, W, C) image, got {img.dtype} {img.shape}")
    if img.shape[:2] == (height, width):
        return img
    if not img.flags.writeable or min(img.strides) < 0:
        img = np.array(img)  # torch.from_numpy takes only writable, positively strided arrays (it only reads)
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)  # NCHW view in channels-last layout: no copy
    out = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True,
                                          align_corners=False)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def prepare_uint8(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize to ``spec.size`` then stain-normalize (if asked): the cached, pre-augmentation form.

    Resizing first keeps the stain estimate on exactly the pixels the model sees and makes the result
    independent of whether the shards were stored pre-resized.
    """
    out = resize_uint8(img, spec.size)
    if spec.stain_normalization is not None:
        from breakhis_ray.data.stain_norm import get_normalizer

        out = get_normalizer(spec.stain_normalization, spec.stain_reference).transform(out)
    return out


def prepare_bytes(images: Sequence[bytes], spec: PreprocessSpec, *,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded images -> ``uint8 (N, H, W, 3)`` (:func:`~breakhis_ray.data.decode.decode_rgb` +
    :func:`prepare_uint8`); a bad image raises :class:`~breakhis_ray.data.decode.ImageRejected`."""
    height, width = spec.size
    out = np.empty((len(images), height, width, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = prepare_uint8(decode_rgb(data, max_pixels=max_pixels), spec)
    return out


# --------------------------------------------------------------------------------------- normalize
def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def normalize(batch, spec: PreprocessSpec | None = None, memory_format=None):
    """``uint8 (N, H, W, C)`` numpy array or torch tensor -> ``float32 (N, C, H, W)`` of the same kind.

    RGB channels become ``(x / 255 - mean) / std``; channels beyond the third (e.g. a mask) are only
    scaled to ``[0, 1]``. A torch tensor stays on its device, so training normalizes on the GPU.
    ``memory_format`` (torch only; default ``torch.contiguous_format``): the layout of the result;
    ``torch.channels_last`` is the input's own pixel order, so the result is computed without a transposing
    copy (same values).
    """
    spec = spec or PreprocessSpec()
    if batch.ndim != 4:
        raise DataError(f"normalize expects a (N, H, W, C) batch, got shape {tuple(batch.shape)}")
    channels = int(batch.shape[-1])
    if channels < 3:
        raise DataError(f"normalize expects at least 3 channels (RGB), got {channels}")
    mean = np.zeros(channels, dtype=np.float32)
    std = np.ones(channels, dtype=np.float32)
    mean[:3], std[:3] = spec.mean, spec.std
    # (x / 255 - mean) / std == x * a + b, computed identically for numpy and torch.
    a = (1.0 / (255.0 * std)).astype(np.float32)
    b = (-mean / std).astype(np.float32)
    if _is_torch(batch):
        import torch

        if batch.dtype != torch.uint8:
            raise DataError(f"normalize expects uint8 pixels, got {batch.dtype} (already normalized?)")
        # the permuted view keeps the NHWC memory order (channels-last strides) through the float conversion
        # and the in-place affine map; one copy at the end gives another layout
        x = batch.permute(0, 3, 1, 2).to(torch.float32)
        x.mul_(torch.as_tensor(a, device=batch.device).view(1, channels, 1, 1))
        x.add_(torch.as_tensor(b, device=batch.device).view(1, channels, 1, 1))
        return x.contiguous(memory_format=memory_format or torch.contiguous_format)
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
        raise DataError(f"normalize expects uint8 pixels, got {batch.dtype} (already normalized?)")
    x = batch.transpose(0, 3, 1, 2).astype(np.float32)
    return np.ascontiguousarray(x * a.reshape(1, channels, 1, 1) + b.reshape(1, channels, 1, 1))


def preprocess_bytes(images: Sequence[bytes], spec: PreprocessSpec, *,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """THE eval / inference transform: encoded images -> ``float32 (N, 3, H, W)``."""
    return normalize(prepare_bytes(images, spec, max_pixels=max_pixels), spec)
