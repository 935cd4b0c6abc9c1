"""U-Net nuclei segmentation: batched inference around a segmentation_models_pytorch U-Net.

:class:`UNetSegmenter` turns a batch of uint8 RGB tiles into nucleus probabilities, a boolean mask
(``probability > threshold``) and instance labels (connected components, or the distance watershed of
:mod:`breakhis_ray.segmentation.watershed`). Models come from :func:`breakhis_ray.models.unet.create_unet`
or a checkpoint. Inputs are scaled as the model was trained (its ``preprocessing``: ImageNet mean/std or
unit [0, 1] pixels), then either padded to the next multiple of 32 (the U-Net's total stride) or resized to
a fixed ``input_size``; predictions are mapped back to the original size.
torch is imported when a segmenter is built, never at package import.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from breakhis_ray.errors import ConfigError
from breakhis_ray.segmentation.base import SegmentationResult, Segmenter, as_image_batch
from breakhis_ray.segmentation.features import hematoxylin_density, nuclear_features

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
INSTANCE_MODES = ("components", "watershed")
STRIDE = 32


def _round_up(value: int, multiple: int = STRIDE) -> int:
    return -(-int(value) // multiple) * multiple


def resolve_normalization(
    normalization: str | dict | None, model=None, meta: dict | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` applied to [0, 1] pixels.

    ``normalization`` is ``"imagenet"``, ``"unit"``, a ``{"mean", "std"}`` dict, or ``None`` to use the
    checkpoint's ``meta["preprocessing"]``, else the model's ``preprocessing`` attribute, else ImageNet.
    """
    if normalization is None:
        meta_pre = (meta or {}).get("preprocessing")
        normalization = meta_pre or getattr(model, "preprocessing", None) or "imagenet"
    if isinstance(normalization, str):
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"unknown normalization {normalization!r}; choose from {', '.join(NORMALIZATIONS)}"
            )
        return NORMALIZATIONS[normalization]
    if isinstance(normalization, dict) and "mean" in normalization and "std" in normalization:
        mean = tuple(float(v) for v in normalization["mean"])[:3]
        std = tuple(float(v) for v in normalization["std"])[:3]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"normalization needs 3 means and 3 positive stds, got {normalization!r}")
        return mean, std
    raise ConfigError(f"normalization must be 'imagenet', 'unit' or a mean/std dict, got {normalization!r}")


def _parse_input_size(value: Any) -> tuple[int, int] | None:
    """``None``, an int (square) or ``(height, width)``; each side a positive multiple of 32."""
    if value is None:
        return None
    size = (int(value), int(value)) if np.isscalar(value) else tuple(int(v) for v in value)
    if len(size) != 2 or any(s <= 0 or s % STRIDE for s in size):
        raise ConfigError(f"U-Net input_size must be (height, width) multiples of {STRIDE}, got {value!r}")
    return size  # type: ignore[return-value]


class UNetSegmenter(Segmenter):
    """Batched U-Net inference with the common :class:`Segmenter` interface.

    ``model``: a torch module mapping ``(N, 3, H, W)`` to ``(N, C, H, W)`` logits (C = 1: sigmoid
    foreground; C >= 2: softmax, foreground = 1 - p(class 0)). ``threshold``: probability cut.
    ``device``: torch device string, chosen by the caller (the model is moved there and set to eval mode).
    ``batch_size``: images per forward pass.
    ``normalization``: ``"imagenet"``, ``"unit"``, a mean/std dict, or ``None`` for the model's own
    (see :func:`resolve_normalization`). ``input_size``: ``None`` pads each batch to a multiple
    of 32; ``(h, w)`` (multiples of 32) resizes to that size and back. ``instances``: ``"components"`` or
    ``"watershed"`` (with ``min_distance``). ``min_area``: drop predicted objects smaller than this (px).
    """

    name = "unet"

    def __init__(
        self,
        model,
        threshold: float = 0.5,
        device: str = "cpu",
        batch_size: int = 8,
        normalization: str | dict | None = None,
        input_size: int | tuple[int, int] | None = None,
        instances: Literal["components", "watershed"] = "components",
        min_area: int = 0,
        min_distance: int = 5,
        meta: dict | None = None,
    ) -> None:
        import torch

        if not 0.0 < threshold < 1.0:
            raise ConfigError(f"U-Net threshold must be in (0, 1), got {threshold}")
        if batch_size < 1:
            raise ConfigError(f"U-Net batch_size must be >= 1, got {batch_size}")
        if instances not in INSTANCE_MODES:
            raise ConfigError(
                f"unknown instances mode {instances!r}; choose from {', '.join(INSTANCE_MODES)}"
            )
        if min_area < 0 or min_distance < 1:
            raise ConfigError(
                f"U-Net min_area must be >= 0 and min_distance >= 1, got {min_area}, {min_distance}"
            )
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.threshold = float(threshold)
        self.batch_size = int(batch_size)
        self.meta = dict(meta or {})
        self.mean, self.std = resolve_normalization(normalization, model=model, meta=self.meta)
        self.input_size = _parse_input_size(input_size)
        self.instances = instances
        self.min_area = int(min_area)
        self.min_distance = int(min_distance)

    @classmethod
    def from_checkpoint(cls, uri: str, **overrides: Any) -> "UNetSegmenter":
        """Rebuild a segmenter from a checkpoint directory or URI (see :mod:`breakhis_ray.checkpoint`).

        The checkpoint's ``preprocessing`` is the one inference transform: its ``mean``/``std`` scale the
        pixels and its ``size`` ``[H, W]`` becomes ``input_size`` (tiles are resized to the training size and
        predictions resized back). ``overrides`` win, e.g. ``input_size=None`` to pad at native resolution.
        """
        from breakhis_ray.checkpoint import load_model

        model, meta = load_model(uri)
        preprocessing = meta.get("preprocessing") or {}
        kwargs: dict[str, Any] = {"normalization": preprocessing}
        if preprocessing.get("size") is not None:
            kwargs["input_size"] = tuple(int(v) for v in preprocessing["size"])
        kwargs.update(overrides)
        return cls(model, meta=meta, **kwargs)

    # -- tensors ---------------------------------------------------------------------------------
    def _to_tensor(self, images: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _forward(self, x):
        """Logits at the input's own size: pad to a multiple of 32 (or resize to ``input_size``) and back."""
        import torch.nn.functional as F

        height, width = x.shape[-2:]
        if self.input_size is not None:
            if (height, width) != self.input_size:
                resized = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
                logits = self.model(resized)
                return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            return self.model(x)
        pad_h, pad_w = _round_up(height) - height, _round_up(width) - width
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return self.model(x)[..., :height, :width]

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Nucleus probability ``(B, H, W)`` float32 for uint8 ``(B, H, W, 3)`` images."""
        import torch

        images = as_image_batch(images)
        out = np.empty(images.shape[:3], dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                logits = self._forward(self._to_tensor(chunk))
                if logits.shape[1] == 1:
                    prob = torch.sigmoid(logits[:, 0])
                else:
                    prob = 1.0 - torch.softmax(logits, dim=1)[:, 0]
                out[start : start + len(chunk)] = prob.float().cpu().numpy()
        return out

    # -- masks and instances ---------------------------------------------------------------------
    def _labels(self, mask: np.ndarray) -> np.ndarray:
        if self.instances == "watershed":
            from breakhis_ray.segmentation.watershed import split_touching

            return split_touching(mask, min_distance=self.min_distance)
        from skimage import measure

        return measure.label(mask, connectivity=2).astype(np.int32)

    def segment(self, images: np.ndarray) -> SegmentationResult:
        images = as_image_batch(images)
        masks = self.predict_proba(images) > self.threshold
        if self.min_area > 1:
            from breakhis_ray.segmentation.threshold import clean_mask

            masks = np.stack([clean_mask(m, min_area=self.min_area, opening_radius=0) for m in masks])
        labels = np.stack([self._labels(m) for m in masks]).astype(np.int32)
        features = [nuclear_features(lab, hematoxylin_density(rgb)) for lab, rgb in zip(labels, images)]
        return SegmentationResult(masks=labels > 0, labels=labels, features=features)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, threshold={self.threshold}, "
            f"device={str(self.device)!r}, batch_size={self.batch_size}, mean={self.mean}, std={self.std}, "
            f"input_size={self.input_size}, instances={self.instances!r})"
        )
