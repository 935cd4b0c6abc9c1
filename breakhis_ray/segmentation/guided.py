"""Segmentation-guided classification: feed nuclei masks to the classifier (CancerNet "with U-Net").

:class:`~breakhis_ray.config.GuidanceConfig` chooses the segmenter (``none`` | ``threshold`` | ``watershed`` |
``unet``) and how its mask reaches the classifier:

* ``channel``: the mask becomes a ``mask`` column (uint8 ``(H, W)``, 0/255) that the classifier pipeline
  appends as a 4th input channel (:func:`breakhis_ray.data.pipeline.iter_train_batches` with
  ``in_channels=4``; the model needs ``model.in_channels=4``).
* ``emphasis``: the image keeps 3 channels; pixels outside nuclei fade towards white (the empty-glass colour)
  by ``emphasis_strength``, so pretrained RGB backbones apply unchanged.

The same :class:`GuidanceStage` runs in three places, so training and inference see identical inputs:

* Ray Data (:func:`apply_guidance`): a deterministic ``map_batches`` stage on the decoded, resized uint8 images,
  before ``materialize()``; classical methods run as tasks, the U-Net in an actor pool that loads it once.
* Inference (:func:`load_guidance` + :meth:`GuidanceStage.transform`), on the classifier-preprocessed tiles,
  with the guidance read back from the classifier checkpoint's ``config.yaml`` (key ``guidance``).
* Tests and notebooks, on plain numpy batches.

Masks are computed at the classifier's input size (the U-Net resizes to its own training size and back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from breakhis_ray.config import GuidanceConfig
from breakhis_ray.errors import ConfigError, DataError

if TYPE_CHECKING:
    from breakhis_ray.data.transforms import PreprocessSpec

#: pixel value of the ``mask`` column on nuclei (the pipeline scales extra channels to [0, 1])
MASK_ON = 255
WHITE = 255.0


def as_guidance(guidance: GuidanceConfig | Mapping[str, Any] | None) -> GuidanceConfig:
    if guidance is None:
        return GuidanceConfig()
    if isinstance(guidance, GuidanceConfig):
        return guidance
    from breakhis_ray.config import validate_config

    return validate_config(GuidanceConfig, dict(guidance))


def check_in_channels(guidance: GuidanceConfig | Mapping[str, Any] | None, in_channels: int) -> None:
    """Raise :class:`ConfigError` when the classifier's input channels do not fit the guidance."""
    g = as_guidance(guidance)
    if int(in_channels) != g.in_channels:
        if g.in_channels == 4:
            why = f"guidance method={g.method} mode=channel adds the nuclei mask as a 4th channel"
        elif g.method == "none":
            why = "guidance.method=none gives no mask channel"
        else:
            why = f"guidance mode={g.mode} keeps 3 channels"
        raise ConfigError(f"model.in_channels={in_channels} does not fit the guidance: {why}; "
                          f"set model.in_channels={g.in_channels}")


def emphasise(images: np.ndarray, masks: np.ndarray, strength: float) -> np.ndarray:
    """uint8 ``(N, H, W, 3)``: nuclei unchanged, other pixels moved ``strength`` of the way to white."""
    keep = np.asarray(masks, dtype=bool)[..., None]
    faded = images.astype(np.float32) * (1.0 - strength) + WHITE * strength
    return np.where(keep, images, np.clip(np.rint(faded), 0, 255).astype(np.uint8))


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_guidance_segmenter(guidance: GuidanceConfig, device: str = "cpu"):
    """The segmenter named by ``guidance`` (``None`` for ``method=none``)."""
    from breakhis_ray.segmentation import create_segmenter

    options = dict(guidance.segmenter_options)
    if guidance.method == "none":
        return None
    if guidance.method == "unet":
        options.setdefault("device", device)
        return create_segmenter("unet", checkpoint=str(guidance.unet_checkpoint).rstrip("/"), **options)
    return create_segmenter(guidance.method, **options)


class GuidanceStage:
    """Segment a batch of uint8 tiles and turn the masks into classifier inputs.

    As a Ray Data ``map_batches`` UDF it reads ``image`` and returns the batch with ``image`` replaced
    (``emphasis``) or a ``mask`` column added (``channel``); other columns pass through. ``size``: the
    expected ``(H, W)`` of the images (checked when given). ``device``: overrides ``guidance.device``.
    """

    def __init__(self, guidance: GuidanceConfig | Mapping[str, Any], size: tuple[int, int] | None = None,
                 device: str | None = None):
        self.guidance = as_guidance(guidance)
        if self.guidance.method == "none":
            raise ConfigError("GuidanceStage needs a guidance method other than 'none'")
        self.size = tuple(int(v) for v in size) if size is not None else None
        self.threads = self.guidance.torch_threads or max(1, round(self.guidance.num_cpus))
        self.segmenter = build_guidance_segmenter(self.guidance, _device(device or self.guidance.device))

    def masks(self, images: np.ndarray) -> np.ndarray:
        """Boolean nuclei masks ``(N, H, W)`` of uint8 ``(N, H, W, 3)`` tiles."""
        images = np.ascontiguousarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"guidance expects uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        if self.size is not None and tuple(images.shape[1:3]) != self.size:
            raise DataError(f"guidance expects {self.size[1]}x{self.size[0]} images, got "
                            f"{images.shape[2]}x{images.shape[1]}")
        if len(images) == 0:
            return np.zeros(images.shape[:3], dtype=bool)
        return np.asarray(self.segmenter.segment(images).masks, dtype=bool)

    def transform(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """``{"image": uint8 (N, H, W, 3)}`` plus ``"mask"`` (uint8 0/255) in ``channel`` mode."""
        masks = self.masks(images)
        if self.guidance.mode == "emphasis":
            return {"image": emphasise(np.asarray(images), masks, self.guidance.emphasis_strength)}
        return {"image": np.asarray(images), "mask": masks.astype(np.uint8) * np.uint8(MASK_ON)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data entry point; sets the actor's torch threads (in-process callers keep their own)."""
        if self.guidance.method == "unet":
            import torch

            torch.set_num_threads(self.threads)
        return {**batch, **self.transform(np.asarray(batch["image"]))}


def apply_guidance(ds, guidance: GuidanceConfig | Mapping[str, Any] | None, spec: "PreprocessSpec | None" = None):
    """Add the guidance stage to a Ray dataset of decoded uint8 ``image`` rows; ``method=none`` returns ``ds``.

    Call it on the decoded (resized, stain-normalised) images *before* ``materialize()`` so the masks are
    computed once. ``spec``: the classifier's preprocessing (its ``size`` is checked on every batch).
    Classical methods run as Ray tasks; the U-Net runs in ``guidance.concurrency`` actors with
    ``guidance.num_cpus`` / ``num_gpus`` each.
    """
    g = as_guidance(guidance)
    if g.method == "none":
        return ds
    size = tuple(spec.size) if spec is not None else None
    common = dict(batch_size=g.batch_size, batch_format="numpy", num_cpus=g.num_cpus,
                  udf_modifying_row_count=False)
    if g.method == "unet":
        return ds.map_batches(GuidanceStage, fn_constructor_kwargs={"guidance": g.model_dump(), "size": size},
                              concurrency=g.concurrency, num_gpus=g.num_gpus or None, **common)
    return ds.map_batches(GuidanceStage(g, size=size, device="cpu"), **common)


def load_guidance(checkpoint: str) -> GuidanceConfig:
    """The guidance a classifier checkpoint was trained with (``config.yaml`` key ``guidance``; none if absent)."""
    from breakhis_ray.checkpoint import load_config_dict

    config = load_config_dict(str(checkpoint).rstrip("/")) or {}
    return as_guidance(config.get("guidance"))


def stage_for_checkpoint(checkpoint: str, device: str | None = None) -> GuidanceStage | None:
    """The :class:`GuidanceStage` that reproduces a classifier's training inputs (``None`` without guidance)."""
    g = load_guidance(checkpoint)
    return None if g.method == "none" else GuidanceStage(g, device=device)


__all__ = [
    "GuidanceStage",
    "apply_guidance",
    "as_guidance",
    "build_guidance_segmenter",
    "check_in_channels",
    "emphasise",
    "load_guidance",
    "stage_for_checkpoint",
]
