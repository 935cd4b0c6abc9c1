"""Configs of nuclei segmentation: U-Net training (``breakhis-ray train-segmenter``) and the comparison of
threshold, watershed and U-Net against ground-truth masks (``breakhis-ray segment-eval``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from breakhis_ray.config.base import StrictModel, parse_hw, parse_hw_or_none, parse_magnifications
from breakhis_ray.config.common import RayConfig, RunSection, ScalingSection
from breakhis_ray.config.train import AugmentConfig


class SegSplitSection(StrictModel):
    """Deterministic patient-grouped train/val split for segmentation (no patient on both sides).

    Patient groups are the folders (``patient_key=folder``, the DC/LC copies of slide 13412 merged) or slide
    numbers; within each class ``val_fraction`` of the groups (at least one) go to val, chosen by a seeded hash
    of the group id, so the split does not depend on listing order or on the other patients.
    """

    val_fraction: float = Field(default=0.25, gt=0.0, lt=1.0)
    seed: int = 0
    patient_key: Literal["folder", "slide"] = "folder"


class SegSourceSection(StrictModel):
    """Images (a BreakHis-layout tree, e.g. ``breakhis-ray synth --out``) and their nuclei masks."""

    root: str = Field(description="image tree URI (local or s3://); histology_slides/breast is found below it")
    mask_root: str | None = Field(default=None, description="tree of masks with the images' paths relative to "
                                  "root; null: <root>/masks (the synthetic layout)")
    mask_suffix: str = Field(default="_nuclei.png", description="mask file = <mask_root>/<relative path without "
                             "extension><suffix>; any non-zero pixel is nucleus")
    magnifications: list[int] | Literal["all"] = "all"
    max_images: int | None = Field(default=None, ge=1, description="cap per split (a seeded, spread-out subset)")
    split: SegSplitSection = SegSplitSection()

    _magnifications = field_validator("magnifications", mode="before")(lambda cls, v: parse_magnifications(v))


def _unet_size(value: Any) -> tuple[int, int]:
    height, width = parse_hw(value)
    if height % 32 or width % 32:
        raise ValueError(f"U-Net image size must be multiples of 32, got H={height} W={width}")
    return height, width


class SegDataConfig(SegSourceSection):
    """U-Net training data: image/mask pairs decoded and resized once (image bilinear, mask nearest) before
    ``materialize()``; random flips/quarter turns applied identically to image and mask after it."""

    mask_source: Literal["ground_truth", "threshold", "watershed"] = Field(
        default="ground_truth", description="ground_truth: mask files; threshold|watershed: pseudo-labels of "
        "the classical method on each full-resolution image (for trees without masks, e.g. BreakHis)")
    pseudo_options: dict[str, Any] = Field(default_factory=dict,
                                           description="keyword options for the pseudo-label segmenter")
    image_size: tuple[int, int] = Field(default=(128, 128), description="(H, W), an int or 'WxH'; multiples of 32")
    scale: Literal["imagenet", "unit"] = "imagenet"
    materialize: bool = True
    decode_batch_size: int = Field(default=8, ge=1)
    decode_num_cpus: float | None = Field(default=None, gt=0.0, description="as DataConfig.decode_num_cpus")
    decode_concurrency: int | None = Field(default=None, ge=1)
    augment: AugmentConfig = AugmentConfig()
    seed: int | None = Field(default=0, description="augmentation/shuffle seed; null: fresh entropy every run")

    _image_size = field_validator("image_size", mode="before")(lambda cls, v: _unet_size(v))

    @field_validator("augment")
    @classmethod
    def _no_crop(cls, value: AugmentConfig) -> AugmentConfig:
        if value.enabled and value.random_resized_crop:
            raise ValueError("random_resized_crop is not supported for image/mask pairs (flips, quarter turns, "
                             "HED and colour jitter are)")
        return value


class SegModelConfig(StrictModel):
    """The U-Net (segmentation-models-pytorch ``Unet``): encoder, its weights (a file or random init), decoder."""

    encoder: Literal["resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "densenet121"] = "resnet18"
    weights: str | None = Field(default=None, description="encoder ImageNet weights: path, s3:// URI, "
                                "'torchvision' ($TORCH_HOME cache) or null (random init)")
    decoder_channels: list[int] | None = Field(default=None, description="5 ints; null: smp's (256, 128, 64, 32, 16)")


class SegLossConfig(StrictModel):
    """Dice + BCE (or sigmoid focal with ``gamma > 0``) on the nuclei mask."""

    dice_weight: float = Field(default=1.0, ge=0.0)
    bce_weight: float = Field(default=1.0, ge=0.0)
    gamma: float = Field(default=0.0, ge=0.0, description="> 0: sigmoid focal loss instead of BCE")


class SegOptimConfig(StrictModel):
    """The U-Net's optimisation and the probability cut of its Dice/IoU."""

    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=8, ge=1)
    eval_batch_size: int = Field(default=16, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    scheduler: Literal["none", "cosine"] = "cosine"
    early_stopping_patience: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=None, gt=0.0)
    amp: bool = Field(default=True, description="bf16 autocast on GPU; ignored on CPU")
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="probability cut for Dice/IoU")
    seed: int = 0


class SegRunSection(RunSection):
    """:class:`RunSection` with the U-Net's name, storage and metric defaults."""

    name: str = "breakhis-unet"
    storage_path: str = "runs/segmenter"
    checkpoint_metric: str = "val_dice"


class SegTrainConfig(StrictModel):
    """``breakhis-ray train-segmenter``: a U-Net on nuclei masks with Ray Train."""

    data: SegDataConfig
    model: SegModelConfig = SegModelConfig()
    loss: SegLossConfig = SegLossConfig()
    train: SegOptimConfig = SegOptimConfig()
    scaling: ScalingSection = ScalingSection()
    run: SegRunSection = SegRunSection()
    ray: RayConfig = RayConfig()


class SegEvalConfig(SegSourceSection):
    """``breakhis-ray segment-eval``: Dice/IoU of threshold, watershed and a U-Net against ground-truth masks.

    Images: ``images`` (paths relative to ``root`` or full URIs), else the val paths of a training run's
    ``split.json`` (``split_file``), else the val split that ``split`` gives (the training default).
    """

    out: str = Field(description="output directory: segment_eval.json, overlays.png, config.yaml")
    unet_checkpoint: str | None = Field(default=None, description="U-Net checkpoint directory (local or s3://)")
    images: list[str] | None = None
    split_file: str | None = Field(default=None, description="split.json written by train-segmenter")
    subset: Literal["val", "train", "all"] = "val"
    eval_size: tuple[int, int] | None = Field(default=None, description="(H, W) or 'WxH' every method and the "
                                              "masks are resized to; null: native resolution")
    threshold_options: dict[str, Any] = Field(default_factory=dict)
    watershed_options: dict[str, Any] = Field(default_factory=dict)
    unet_options: dict[str, Any] = Field(default_factory=dict, description="options for UNetSegmenter")
    overlay_images: int = Field(default=4, ge=0, description="tiles in the overlay grid (0: none)")
    batch_size: int = Field(default=8, ge=1)
    num_cpus: float = Field(default=0.5, gt=0.0, description="CPUs per evaluation actor")
    num_gpus: float = Field(default=0.0, ge=0.0)
    concurrency: int = Field(default=1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ray: RayConfig = RayConfig()

    _eval_size = field_validator("eval_size", mode="before")(lambda cls, v: parse_hw_or_none(v))
