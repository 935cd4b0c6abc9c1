"""Configs of classifier training (``breakhis-ray train``): the Ray Data input pipeline and its random
augmentation, the model, the loss, segmentation guidance, and the whole :class:`TrainConfig`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from breakhis_ray.config.base import StrictModel, parse_hw, parse_magnifications
from breakhis_ray.config.common import (
    DecodeSection,
    OptimConfig,
    RayConfig,
    RunSection,
    ScalingSection,
    TrackingSection,
)


class AugmentConfig(StrictModel):
    """Random online augmentation of the training set (after ``materialize()``; a new draw every epoch)."""

    enabled: bool = True
    hflip: bool = True
    vflip: bool = True
    rot90: bool = Field(default=True, description="quarter turns (half turns only for non-square images)")
    color_jitter: float = Field(default=0.1, ge=0.0, lt=1.0,
                                description="brightness/contrast/saturation factors drawn in 1 +- this")
    hed_jitter: float = Field(default=0.03, ge=0.0, le=0.5,
                              description="H&E(+residual) concentration scale 1 +- s and shift +- s")
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = Field(default=(0.7, 1.0), description="area fraction range of the crop")
    crop_ratio: tuple[float, float] = Field(default=(0.75, 4 / 3), description="aspect ratio range of the crop")
    batch_size: int = Field(default=32, ge=1)
    num_cpus: float = Field(default=0.5, gt=0.0)
    concurrency: int | None = Field(default=None, ge=1)

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1]:
            raise ValueError(f"range must satisfy 0 < low <= high, got {value}")
        return value


class DataConfig(StrictModel):
    """Ray Data input pipeline over prepared Parquet shards (``breakhis-ray prepare --out``)."""

    shards: str = Field(description="the prepare --out URI (local or s3://); shards are read from <shards>/shards")
    magnifications: list[int] | Literal["all"] = "all"
    image_size: tuple[int, int] = Field(default=(224, 224), description="(H, W), an int, or the string 'WxH'")
    scale: Literal["imagenet", "unit"] = Field(default="imagenet",
                                               description="imagenet: (x/255-mean)/std; unit: x/255 (CancerNet)")
    stain_normalization: Literal["macenko", "reinhard"] | None = None
    include_augmented: bool = Field(default=True, description="keep prepare's offline-augmented train copies")
    eval_columns: list[str] = Field(default=["path", "patient_id"],
                                    description="shard columns kept in val/test (per-image and patient metrics)")
    materialize: bool = Field(default=True, description="cache decoded train/val images in the object store")
    shuffle: Literal["none", "blocks", "full"] = Field(
        default="blocks", description="train order each epoch: block order (cheap) or a full shuffle")
    block_rows: int = Field(default=64, ge=1, description="rows per cached train block (unit of block shuffling)")
    shuffle_buffer: int = Field(default=1024, ge=0, description="rows of each training rank's local shuffle "
                                "buffer (Ray Data's local_shuffle_buffer_size, seeded by seed, epoch and rank), "
                                "so no batch is a run of one patient or class from one block; 0: off")
    read_num_cpus: float | None = Field(default=None, gt=0.0)
    decode_batch_size: int = Field(default=32, ge=1)
    decode_num_cpus: float | None = Field(default=None, gt=0.0, description="CPUs per decode task; null: the "
                                          "cluster's CPUs shared by one rule (breakhis_ray.data.cpu_share: a "
                                          "whole core per task on whole-core machines), as infer and bench")
    decode_concurrency: int | None = Field(default=None, ge=1)
    decode: DecodeSection = Field(default_factory=DecodeSection, description="decoder backend and "
                                  "decompression-bomb guard of the decode stage (as prepare and infer)")
    augment: AugmentConfig = AugmentConfig()
    seed: int | None = Field(default=0, description="augmentation/shuffle seed; null: fresh entropy every run")

    _image_size = field_validator("image_size", mode="before")(lambda cls, v: parse_hw(v))
    _magnifications = field_validator("magnifications", mode="before")(
        lambda cls, v: parse_magnifications(v))


class ModelConfig(StrictModel):
    """The classifier: a ``create_model`` name, its pretrained weights (a file, never a download), its head."""

    name: str = "vgg16"
    weights: str | None = Field(
        default=None, description="pretrained weights: local path, s3:// URI, 'torchvision' ($TORCH_HOME cache) or null"
    )
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)
    in_channels: Literal[3, 4] = 3


class LossConfig(StrictModel):
    """Classification loss: cross-entropy, class-weighted cross-entropy or focal loss.

    Class balancing: ``weighted_ce`` weighs each class by ``n_total / (n_classes * n_c)`` from
    ``class_counts``; focal ``alpha: balanced`` uses the same per-class weights as its alpha (both counted on
    the training split when ``class_counts`` is null), for either task.
    """

    name: Literal["ce", "weighted_ce", "focal"] = "focal"
    alpha: float | list[float] | Literal["balanced"] | None = Field(
        default=None, description="focal: malignant weight (binary), one weight per class, 'balanced' "
        "(inverse class frequency from class_counts) or null")
    gamma: float = Field(default=2.0, ge=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    class_counts: list[int] | None = Field(default=None, description="filled from the train split when null")


class GuidanceConfig(StrictModel):
    """Segmentation-guided classification (CancerNet "with U-Net"): how nuclei masks reach the classifier.

    ``method``: ``none`` (plain RGB, "without U-Net"), ``threshold``, ``watershed`` or ``unet`` (needs
    ``unet_checkpoint``). ``mode``: ``channel`` appends the nuclei mask as a 4th input channel (the classifier
    needs ``model.in_channels=4``); ``emphasis`` keeps 3 channels and fades everything that is not nucleus
    towards white by ``emphasis_strength``, so pretrained RGB backbones apply unchanged. The masks are computed
    once, deterministically, on the decoded and resized images before ``materialize()``; inference applies the
    same guidance, read from the classifier checkpoint's config.
    """

    method: Literal["none", "threshold", "watershed", "unet"] = "none"
    unet_checkpoint: str | None = Field(default=None, description="U-Net checkpoint directory (local or s3://)")
    mode: Literal["channel", "emphasis"] = "channel"
    emphasis_strength: float = Field(default=0.6, gt=0.0, le=1.0,
                                     description="emphasis: share of the way non-nuclear pixels fade to white")
    segmenter_options: dict[str, Any] = Field(default_factory=dict,
                                              description="keyword options for create_segmenter")
    batch_size: int = Field(default=16, ge=1, description="images per segmentation batch")
    num_cpus: float = Field(default=0.5, gt=0.0, description="CPUs per guidance task / actor")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per U-Net actor (fractions share one)")
    concurrency: int = Field(default=1, ge=1, description="U-Net actors (classical methods run as tasks)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads per U-Net actor "
                                      "(null: max(1, round(num_cpus)))")

    @model_validator(mode="after")
    def _checkpoint_matches_method(self) -> "GuidanceConfig":
        if self.method == "unet" and not self.unet_checkpoint:
            raise ValueError("guidance.method=unet needs guidance.unet_checkpoint (a U-Net checkpoint directory)")
        if self.method != "unet" and self.unet_checkpoint:
            raise ValueError(f"guidance.unet_checkpoint is only used with method=unet, not {self.method!r}")
        return self

    @property
    def in_channels(self) -> int:
        """Classifier input channels this guidance produces (4 for ``channel`` mode, else 3)."""
        return 4 if self.method != "none" and self.mode == "channel" else 3


class CalibrationSection(StrictModel):
    """Post-hoc calibration of the trained classifier.

    ``temperature_scaling``: after training, one temperature ``T`` (logits / T) is fitted on the validation
    split for the best and the latest checkpoint by minimising the negative log-likelihood, and saved in their
    ``meta.json`` (``calibration: {"temperature": T}``); ``infer`` then writes calibrated probabilities.
    """

    temperature_scaling: bool = False
    num_cpus: float = Field(default=1.0, gt=0.0, description="CPUs of the Ray task that fits T")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs of the Ray task that fits T")


class TrainConfig(StrictModel):
    """``breakhis-ray train``: a classifier on prepared shards with Ray Train.

    ``task``: ``binary`` (benign / malignant) or ``subtype`` (the eight BreakHis subtypes, from the shards'
    ``subtype`` column; the model gets eight outputs and its checkpoint records the class names).
    """

    task: Literal["binary", "subtype"] = "binary"
    data: DataConfig
    guidance: GuidanceConfig = GuidanceConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: OptimConfig = OptimConfig()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    calibration: CalibrationSection = CalibrationSection()
    tracking: TrackingSection = TrackingSection()
    ray: RayConfig = RayConfig()

