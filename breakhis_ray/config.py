"""Typed configuration: pydantic v2 models, YAML files and dotted ``key=value`` overrides.

Precedence: model defaults < YAML file (``--config``) < CLI flags < ``key.sub=value`` overrides.
Every model forbids unknown keys, so a typo fails before any cluster work starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from breakhis_ray.errors import ConfigError

MAGNIFICATIONS = (40, 100, 200, 400)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_size(value: Any) -> tuple[int, int]:
    """Accept ``"700x460"``, ``[700, 460]`` or ``(700, 460)``; return ``(width, height)``."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must look like WxH (e.g. 700x460), got {value!r}")
        value = (int(parts[0]), int(parts[1]))
    width, height = (int(v) for v in value)
    if width < 8 or height < 8:
        raise ValueError(f"size must be at least 8x8, got {width}x{height}")
    return width, height


# --------------------------------------------------------------------------------------------- ray
class RayConfig(StrictModel):
    """How to reach Ray. ``address=None`` joins ``RAY_ADDRESS`` if set, else starts a local instance."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, description="only for a local instance we start")
    dashboard: bool = Field(default=True, description="a local instance we start serves Ray's dashboard on "
                            "127.0.0.1 (it also answers the state API that Ray Train's placement-group cleaner "
                            "polls; without it that cleaner logs a warning every few seconds)")


# ------------------------------------------------------------------------------------------- synth
class SynthConfig(StrictModel):
    out: str = "runs/demo/synthetic"
    fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    patients: int | None = Field(default=None, ge=2, le=82)
    size: tuple[int, int] = (700, 460)
    seed: int = 0
    difficulty: float = Field(default=0.5, ge=0.0, le=1.0)
    masks: bool = True
    folds_files: bool = True
    grid: bool = True
    task_cpus: float = Field(default=0.5, gt=0.0)
    ray: RayConfig = RayConfig()

    _size = field_validator("size", mode="before")(lambda cls, v: parse_size(v))


# ---------------------------------------------------------------------------------------- manifest
class ManifestConfig(StrictModel):
    root: str
    out: str
    read_sizes: bool = Field(default=True, description="read width/height from each image header")
    io_threads: int = Field(default=16, ge=1, le=256, description="concurrent header reads")


# ------------------------------------------------------------------------------------------ splits
class SplitOptions(StrictModel):
    """How images are assigned to folds and train/val/test (shared by ``split`` and ``prepare``)."""

    mode: Literal["patient", "official", "image"] = "patient"
    folds: int = Field(default=5, ge=2, le=20)
    patient_key: Literal["folder", "slide"] = "folder"
    dc_lc_policy: Literal["keep", "drop", "merge"] = "merge"
    folds_file: str | None = None
    val_fraction: float = Field(default=0.15, ge=0.0, lt=0.5)
    seed: int = 0


class SplitConfig(SplitOptions):
    manifest: str
    out: str


# ----------------------------------------------------------------------------------------- prepare
ENHANCE_TRANSFORMS = ("hflip", "vflip", "rot90", "rot180", "rot270", "hed_jitter")
_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size_string(value: Any) -> str | None:
    """``None`` stays ``None``; ``"WxH"``/``[W, H]`` -> the canonical string ``"WxH"``."""
    if value is None:
        return None
    width, height = parse_size(value)
    return f"{width}x{height}"


def _parse_bytes(value: Any) -> int | None:
    """``268435456``, ``"256MB"``, ``"1GiB"`` -> bytes."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGIB")
    unit = text[len(number):]
    if unit not in _BYTE_UNITS or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"byte size must look like 268435456, 256MB or 1GiB, got {value!r}")
    return int(float(number) * _BYTE_UNITS[unit])


class EnhanceConfig(StrictModel):
    """Offline class balancing ("data enhancement", Tab. 2 of the VGG + focal loss paper).

    Deterministic augmented copies of *training* images of the minority class, per magnification, until the
    classes balance (``target: balance``) or each class reaches ``target`` images per magnification.
    ``transforms``: ``hflip``, ``vflip``, ``rot90``, ``rot180``, ``rot270`` (quarter turns only for square
    images) and ``hed_jitter`` / ``hed_jitter(SIGMA)`` (seeded stain jitter, added to every copy; it also
    allows more copies per image than there are geometric transforms).
    """

    enabled: bool = False
    target: Literal["balance"] | int = "balance"
    transforms: list[str] = Field(default_factory=lambda: ["hflip", "vflip", "rot90", "rot180", "rot270"])
    seed: int = 0

    @field_validator("target")
    @classmethod
    def _positive_target(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"target must be 'balance' or a positive count, got {value}")
        return value

    @field_validator("transforms")
    @classmethod
    def _known_transforms(cls, value: list[str]) -> list[str]:
        out = []
        for item in value:
            name = str(item).strip().replace(" ", "")
            base = name.split("(", 1)[0]
            if base not in ENHANCE_TRANSFORMS:
                raise ValueError(f"unknown transform {item!r}: choose from {', '.join(ENHANCE_TRANSFORMS)}")
            if "(" in name:
                arg = name[len(base):]
                try:
                    sigma = float(arg[1:-1]) if base == "hed_jitter" and arg.endswith(")") else None
                except ValueError:
                    sigma = None
                if sigma is None or not 0.0 < sigma <= 0.5:
                    raise ValueError(f"transform {item!r}: only hed_jitter takes an argument, 0 < sigma <= 0.5")
                name = f"hed_jitter({sigma:g})"
            if name.split("(", 1)[0] in [o.split("(", 1)[0] for o in out]:
                raise ValueError(f"transform {base!r} is listed twice")
            out.append(name)
        if not out:
            raise ValueError("transforms must not be empty")
        return out


class PrepareConfig(StrictModel):
    """``breakhis-ray prepare``: decode and check every image, write Parquet shards, rejects, manifest and splits."""

    root: str = Field(description="BreakHis tree URI, or a manifest Parquet (*.parquet)")
    out: str = Field(description="destination URI (local path or s3://bucket/prefix)")
    splits: str | None = Field(default=None, description="an existing splits Parquet; default: made with `split`")
    split: SplitOptions = SplitOptions()
    fold: int = Field(default=1, ge=1, description="the fold whose train/val/test the shards carry")
    resize: str | None = Field(default=None, description="'WxH' to resize every image to, or null (keep)")
    expected_size: str | None = Field(
        default=None, description="'WxH' or 'auto' (the most common manifest size): reject other sizes; null: no check"
    )
    image_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(default=95, ge=1, le=100, description="JPEG/WebP quality (PNG is lossless)")
    shard_size: int = Field(default=1000, ge=1, description="images per shard at most")
    shard_bytes: int | None = Field(default=None, ge=1, description="target shard size (estimated), e.g. 256MB")
    row_group_size: int = Field(default=64, ge=1, description="images per Parquet row group")
    max_pixels: int = Field(default=40_000_000, ge=64, description="decompression-bomb guard: width*height limit")
    task_cpus: float = Field(default=0.5, gt=0.0)
    enhance: EnhanceConfig = EnhanceConfig()
    ray: RayConfig = RayConfig()

    _resize = field_validator("resize", mode="before")(lambda cls, v: _size_string(v))
    _shard_bytes = field_validator("shard_bytes", mode="before")(lambda cls, v: _parse_bytes(v))

    @field_validator("expected_size", mode="before")
    @classmethod
    def _expected(cls, value: Any) -> str | None:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return _size_string(value)


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for part in keys[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[keys[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _format_validation_error(exc: ValidationError, cls: type[BaseModel]) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "<root>"
    if err["type"] == "extra_forbidden":
        return f"unknown config key {key!r} for {cls.__name__}"
    if err["type"] == "missing":
        return f"missing required config key {key!r} for {cls.__name__}"
    value = err.get("input")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"bad config value {key}={value!r}: {err['msg']}{more}"


def load_config(
    cls: type[ModelT],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> ModelT:
    """Build ``cls`` from defaults < YAML ``path`` < ``values`` (CLI flags) < dotted ``overrides``."""
    data: dict = read_yaml(path) if path else {}
    for key, value in (values or {}).items():
        if value is not None:
            _set_dotted(data, key.split("."), value)
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_dotted(data, keys, value)
    return validate_config(cls, data)


def validate_config(cls: type[ModelT], data: dict) -> ModelT:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, cls)) from None


def dump_config(cfg: BaseModel) -> dict:
    """JSON-safe dict of a config (what workers re-validate and what is saved beside outputs)."""
    return json.loads(cfg.model_dump_json())


def config_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(dump_config(cfg), sort_keys=False)


# --------------------------------------------------------------------------------- data pipeline
def _parse_hw(value: Any) -> tuple[int, int]:
    from breakhis_ray.data.transforms import parse_hw  # lazy: transforms imports this module

    return parse_hw(value)


def _parse_magnifications(value: Any) -> Any:
    """``"all"``, ``40``, ``"40X"``, ``[40, "100x"]`` -> ``"all"`` or a sorted list of ints."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    items = value if isinstance(value, (list, tuple)) else [value]
    out = set()
    for item in items:
        text = str(item).strip().upper().removesuffix("X")
        if not text.isdigit() or int(text) not in MAGNIFICATIONS:
            raise ValueError(f"magnification {item!r} is not one of {list(MAGNIFICATIONS)} or 'all'")
        out.add(int(text))
    if not out:
        raise ValueError("magnifications must not be empty (use 'all')")
    return sorted(out)


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
    read_num_cpus: float | None = Field(default=None, gt=0.0)
    decode_batch_size: int = Field(default=32, ge=1)
    decode_num_cpus: float = Field(default=0.5, gt=0.0)
    decode_concurrency: int | None = Field(default=None, ge=1)
    augment: AugmentConfig = AugmentConfig()
    seed: int | None = Field(default=0, description="augmentation/shuffle seed; null: fresh entropy every run")

    _image_size = field_validator("image_size", mode="before")(lambda cls, v: _parse_hw(v))
    _magnifications = field_validator("magnifications", mode="before")(
        lambda cls, v: _parse_magnifications(v))


# ------------------------------------------------------------------------------------------- train
class ModelConfig(StrictModel):
    name: str = "vgg16"
    weights: str | None = Field(
        default=None, description="pretrained weights: local path, s3:// URI, 'torchvision' ($TORCH_HOME cache) or null"
    )
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0)
    in_channels: Literal[3, 4] = 3


class LossConfig(StrictModel):
    name: Literal["ce", "weighted_ce", "focal"] = "focal"
    alpha: float | list[float] | None = None
    gamma: float = Field(default=2.0, ge=0.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    class_counts: list[int] | None = Field(default=None, description="filled from the train split when null")


class OptimConfig(StrictModel):
    strategy: Literal["scratch", "frozen", "finetune", "finetune_aug", "warmup_finetune"] = "finetune_aug"
    epochs: int = Field(default=25, ge=1)
    batch_size: int = Field(default=32, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    backbone_lr_factor: float = Field(default=1.0, gt=0.0, description="backbone lr = lr * factor")
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    scheduler: Literal["none", "cosine", "step"] = "cosine"
    step_size: int = Field(default=10, ge=1)
    warmup_epochs: int = Field(default=1, ge=0, description="frozen-backbone epochs for warmup_finetune")
    early_stopping_patience: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=None, gt=0.0)
    amp: bool = Field(default=True, description="bf16 autocast on GPU; ignored on CPU")
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    seed: int = 0


class ScalingSection(StrictModel):
    num_workers: int = Field(default=1, ge=0, description="0 runs the loop in the driver process")
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    gpus_per_worker: float = Field(default=1.0, gt=0.0)
    backend: Literal["gloo", "nccl"] | None = None


class FailureInjection(StrictModel):
    """Chaos testing: fail once at ``epoch`` (0-based) on ``rank``, by exception or by killing the worker."""

    epoch: int = Field(ge=0)
    rank: int = Field(default=0, ge=0)
    mode: Literal["exception", "kill"] = "exception"


class RunSection(StrictModel):
    name: str = "breakhis-train"
    storage_path: str = "runs/train"
    max_failures: int = Field(default=2, ge=-1)
    keep_checkpoints: int = Field(default=2, ge=1)
    checkpoint_metric: str = "val_balanced_accuracy"
    checkpoint_mode: Literal["max", "min"] = "max"
    inject_failure: FailureInjection | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    data_progress_bars: bool = False


# -------------------------------------------------------------------------------------- guidance
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


class TrainConfig(StrictModel):
    data: "DataConfig"
    guidance: GuidanceConfig = GuidanceConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: OptimConfig = OptimConfig()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    ray: RayConfig = RayConfig()


# ------------------------------------------------------------------------------------ segmentation
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

    _magnifications = field_validator("magnifications", mode="before")(lambda cls, v: _parse_magnifications(v))


def _unet_size(value: Any) -> tuple[int, int]:
    height, width = _parse_hw(value)
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
    decode_num_cpus: float = Field(default=0.5, gt=0.0)
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
    encoder: Literal["resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "densenet121"] = "resnet18"
    weights: str | None = Field(default=None, description="encoder ImageNet weights: path, s3:// URI, "
                                "'torchvision' ($TORCH_HOME cache) or null (random init)")
    decoder_channels: list[int] | None = Field(default=None, description="5 ints; null: smp's (256, 128, 64, 32, 16)")


class SegLossConfig(StrictModel):
    dice_weight: float = Field(default=1.0, ge=0.0)
    bce_weight: float = Field(default=1.0, ge=0.0)
    gamma: float = Field(default=0.0, ge=0.0, description="> 0: sigmoid focal loss instead of BCE")


class SegOptimConfig(StrictModel):
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

    _eval_size = field_validator("eval_size", mode="before")(lambda cls, v: _parse_hw_or_none(v))


# ------------------------------------------------------------------------------------------- infer
def _parse_hw_or_none(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    from breakhis_ray.data.transforms import parse_hw  # lazy: transforms imports this module

    return parse_hw(value)


class InferConfig(StrictModel):
    """``breakhis-ray infer``: Ray Data batch inference, one Parquet row per input image.

    Stages: listing (one recursive call) -> CPU decode tasks (``decode_*``) -> one actor pool
    (``batch_size``, ``concurrency``, ``num_cpus``, ``num_gpus``) running segmentation + classifier.
    Work is cut into deterministic chunks of ``chunk_size`` inputs, each written atomically as
    ``<out>/predictions/part-<chunk>.parquet``; a re-run with the same ``out`` skips finished chunks.
    """

    input: str = Field(description="image tree (local or s3://), prepare output / Parquet shards, or a manifest")
    out: str = Field(description="output URI: predictions/, config.yaml, versions.json, summary.json")
    classifier: str = Field(description="classifier checkpoint directory (local or s3://)")
    segmenter: str | None = Field(default=None, description="U-Net checkpoint directory, 'threshold', "
                                  "'watershed' or null (no nuclear features)")
    segmenter_options: dict[str, Any] = Field(default_factory=dict,
                                              description="keyword options for create_segmenter")
    segment_size: tuple[int, int] | None = Field(
        default=None, description="(H, W) or 'WxH' the segmenter sees; null: the U-Net checkpoint's size, "
        "else the classifier's")
    input_format: Literal["auto", "images", "shards", "manifest"] = "auto"
    extensions: list[str] = Field(default=[".png", ".jpg", ".jpeg", ".tif", ".tiff"],
                                  description="image file suffixes taken from a tree (case-insensitive)")
    include_augmented: bool = Field(default=False, description="shards: also predict offline-augmented copies")
    max_pixels: int = Field(default=64_000_000, ge=1, description="larger images become error rows "
                            "(decompression-bomb guard, checked from the header before decoding)")
    chunk_size: int = Field(default=1000, ge=1, description="inputs per output part (the unit of resume)")
    max_chunks: int | None = Field(default=None, ge=1, description="stop after writing this many parts")
    write_masks: bool = Field(default=False, description="write nuclei instance masks (uint16 PNG) under "
                              "<out>/masks/ and fill mask_uri")
    # CPU decode stage (Ray tasks)
    decode_batch_size: int = Field(default=16, ge=1)
    decode_num_cpus: float = Field(default=1.0, gt=0.0, description="CPUs per decode task: image decode is one "
                                   "core of work, so fractions oversubscribe the cores and starve the model "
                                   "actors (measured on 2 cores: 0.5 -> 57 img/s, 1.0 -> 76 img/s, tiny_cnn)")
    decode_concurrency: int | None = Field(default=None, ge=1, description="max concurrent decode tasks")
    decode_max_calls: int = Field(default=1000, ge=0, description="decode tasks per worker process before it "
                                  "is recycled; 0 = never (Ray may then fuse decoding into the model actors "
                                  "when both ask for the same resources)")
    io_threads: int = Field(default=8, ge=1, le=128, description="parallel reads inside one decode task")
    # model stage (one actor per replica: segmenter + classifier fused)
    batch_size: int = Field(default=32, ge=1)
    concurrency: int = Field(default=1, ge=1, description="number of Predictor actors")
    num_cpus: float = Field(default=0.5, gt=0.0, description="CPUs reserved per Predictor actor")
    num_gpus: float = Field(default=0.0, ge=0.0, description="GPUs per Predictor actor (fractions share one)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(default=True, description="bf16 autocast on GPU; ignored on CPU")
    torch_threads: int | None = Field(default=None, ge=1, description="torch threads per actor "
                                      "(null: max(1, round(num_cpus)))")
    run_id: str | None = Field(default=None, description="null: a fresh id per run")
    ray: RayConfig = RayConfig()

    _segment_size = field_validator("segment_size", mode="before")(lambda cls, v: _parse_hw_or_none(v))

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("extensions must name at least one suffix")
        return [v.lower() if v.startswith(".") else "." + v.lower() for v in value]


# ---------------------------------------------------------------------------------------- evaluate
def _one_or_many(value: Any) -> Any:
    """A single value becomes a one-element list; ``None`` and lists pass through."""
    if value is None or isinstance(value, (list, tuple)):
        return value
    return [value]


class EvaluateConfig(StrictModel):
    """``breakhis-ray evaluate``: metrics from prediction Parquet joined with the manifest labels.

    ``predictions`` takes one URI (a Parquet file or a directory of ``part-*.parquet``) or a list, one per
    fold; with several, the output also holds every fold and the mean ± std over folds. The evaluation set
    is every predicted image found in the manifest, or, with ``splits``, the images of ``split`` in
    ``fold`` (one fold per prediction set; default: the splits' folds in order).
    """

    predictions: list[str] = Field(description="prediction Parquet file or directory; a list for several folds")
    manifest: str = Field(description="manifest Parquet whose labels, patients and magnifications are used")
    out: str = Field(description="metrics JSON file (the resolved config is written beside it)")
    splits: str | None = Field(default=None, description="splits Parquet: evaluate only `split` of `fold`")
    fold: list[int] | None = Field(default=None, description="splits fold of each prediction set")
    split: Literal["train", "val", "test"] = Field(default="test", description="which split, with `splits`")
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="malignant when prob_malignant >= this")

    _predictions = field_validator("predictions", mode="before")(lambda cls, v: _one_or_many(v))
    _fold = field_validator("fold", mode="before")(lambda cls, v: _one_or_many(v))

    @field_validator("predictions")
    @classmethod
    def _some_predictions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("predictions must name at least one Parquet file or directory")
        return value


# ------------------------------------------------------------------------------------------ report
class ReportConfig(StrictModel):
    """``breakhis-ray report``: one self-contained ``report.html`` (+ its PNGs) from whatever inputs exist.

    Every input is optional; a section whose input is not given is kept with a visible note. An input that
    is given but cannot be read is an error.
    """

    out: str = Field(description="output directory: report.html, figures/*.png, config.yaml")
    title: str = "BreakHis benign/malignant classification report"
    data_source: Literal["synthetic", "real", "unspecified"] = Field(
        default="unspecified", description="what the images are: the synthetic BreakHis or the real dataset")
    protocol: Literal["patient", "official", "image"] | None = Field(
        default=None, description="split protocol shown in the header; null: taken from the metrics JSON")
    manifest: str | None = Field(default=None, description="manifest Parquet (dataset tables)")
    prepare_summary: str | None = Field(default=None, description="prepare.json (Tab. 1 before / Tab. 2 after)")
    train_runs: list[str] = Field(default_factory=list, description="training run directories (history.json)")
    metrics: str | None = Field(default=None, description="metrics JSON written by `evaluate`")
    predictions: str | None = Field(default=None, description="prediction Parquet file or directory (ROC, tiles)")
    segmentation: str | None = Field(default=None, description="segmentation evaluation JSON (Dice/IoU, overlays)")
    grid: str | None = Field(default=None, description="experiment grid results (JSON, Parquet or CSV)")
    samples_grid: str | None = Field(default=None, description="PNG of synthetic samples")
    configs: list[str] = Field(default_factory=list, description="YAML files shown in the configuration section")
    sample_tiles: int = Field(default=8, ge=0, le=64, description="predicted tiles shown with their probability")
    seed: int = Field(default=0, description="which tiles are shown (deterministic for a seed)")
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="malignant when prob_malignant >= this")
    embed_images: bool = Field(default=True, description="embed PNGs as data URIs (they are written as files too)")

    _train_runs = field_validator("train_runs", "configs", mode="before")(
        lambda cls, v: [] if v is None else _one_or_many(v))


# ------------------------------------------------------------------------------------- experiments
GRID_TABLES = ("vgg_tab3", "vgg_fig4", "vgg_tab4", "cancernet_tab1")


def _grid_magnifications(value: Any) -> list[int]:
    mags = _parse_magnifications(value)
    return list(MAGNIFICATIONS) if mags == "all" else mags


class LossTableSection(StrictModel):
    """VGG paper Tab. 3: one model per loss (cross-entropy, class-weighted cross-entropy, focal)."""

    losses: list[Literal["ce", "weighted_ce", "focal"]] = Field(default_factory=lambda: ["ce", "weighted_ce", "focal"])
    overrides: list[str] = Field(default_factory=list, description="TrainConfig key=value for this table's runs")


class StrategyTableSection(StrictModel):
    """VGG paper Fig. 4: one model per transfer-learning strategy (they need model.weights to mean anything)."""

    strategies: list[Literal["scratch", "frozen", "finetune", "finetune_aug", "warmup_finetune"]] = Field(
        default_factory=lambda: ["scratch", "frozen", "finetune", "finetune_aug"])
    overrides: list[str] = Field(default_factory=list)


class MagnificationTableSection(StrictModel):
    """VGG paper Tab. 4: accuracy per magnification, from one model per magnification
    (``per_magnification``) or from one magnification-independent model scored per magnification (``shared``)."""

    magnifications: list[int] = Field(default_factory=lambda: list(MAGNIFICATIONS))
    mode: Literal["per_magnification", "shared"] = "per_magnification"
    overrides: list[str] = Field(default_factory=list)

    _magnifications = field_validator("magnifications", mode="before")(lambda cls, v: _grid_magnifications(v))


class SegmentationTableSection(StrictModel):
    """CancerNet Table 1: each CNN without and with nuclear segmentation guidance (``unet``, or the classical
    ``threshold`` / ``watershed``), scored by precision, recall and F1. Defaults follow the paper's training
    (categorical cross-entropy, Adam at lr 0.001, pixels in [0, 1])."""

    models: list[str] = Field(default_factory=lambda: ["vgg16_bn", "resnet50", "densenet121"])
    segmentations: list[Literal["none", "threshold", "watershed", "unet"]] = Field(
        default_factory=lambda: ["none", "unet"])
    guidance_mode: Literal["channel", "emphasis"] = Field(
        default="channel", description="channel: the mask as a 4th input channel; emphasis: non-nuclei faded")
    overrides: list[str] = Field(default_factory=lambda: ["loss.name=ce", "data.scale=unit",
                                                          "train.optimizer=adam", "train.lr=0.001"])


class GridSegmenterSection(StrictModel):
    """The U-Net behind ``segmentation: unet``: an existing checkpoint, or one trained once for the grid
    (``breakhis-ray train-segmenter`` on ``root``: ground-truth masks, or pseudo-labels via overrides)."""

    checkpoint: str | None = Field(default=None, description="U-Net checkpoint directory; null: train one")
    config: str = "jobs/configs/train_segmenter_tiny.yaml"
    overrides: list[str] = Field(default_factory=list, description="SegTrainConfig key=value overrides")


class GridScoringSection(StrictModel):
    """Scoring of each trial's checkpoint on the test split of its fold (one Ray task per trial)."""

    checkpoint: Literal["best", "latest"] = "best"
    batch_size: int = Field(default=32, ge=1)
    num_cpus: float = Field(default=0.5, gt=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)


class ExperimentsConfig(StrictModel):
    """``breakhis-ray experiments``: the papers' tables as a Ray Tune grid over Ray Train runs.

    Every (table cell, protocol, fold) becomes a training config: ``base_train_config`` < ``base_overrides``
    < the table's ``overrides`` < the cell's setting; cells with the same resolved config share one trial.
    Each protocol gets its own splits and, per fold, its own prepared shards under ``<out>/data``. A re-run
    with the same ``out`` skips finished stages and trials (``resume``).
    """

    out: str = Field(description="output directory (local or s3://): grid.json, tables.md, runs, trials, data")
    root: str | None = Field(default=None, description="BreakHis tree URI or manifest Parquet; "
                             "default: synthetic.out")
    synthetic: SynthConfig | None = Field(default=None, validate_default=True,
                                          description="generate this synthetic BreakHis first (kept when "
                                          "already there) and use it as root")
    base_train_config: str = "jobs/configs/train_tiny.yaml"
    base_overrides: list[str] = Field(default_factory=list, description="TrainConfig key=value for every run")
    tables: list[Literal["vgg_tab3", "vgg_fig4", "vgg_tab4", "cancernet_tab1"]] = Field(
        default_factory=lambda: list(GRID_TABLES))
    split: SplitOptions = Field(default_factory=SplitOptions, description="how folds are made (mode: protocols)")
    protocols: list[Literal["patient", "official", "image"]] = Field(default_factory=lambda: ["patient", "image"])
    folds: list[int] = Field(default_factory=lambda: [1], description="folds to run; an int N means 1..N")
    prepare_overrides: list[str] = Field(default_factory=lambda: ["enhance.enabled=true"],
                                         description="PrepareConfig key=value for every protocol and fold")
    vgg_tab3: LossTableSection = Field(default_factory=LossTableSection)
    vgg_fig4: StrategyTableSection = Field(default_factory=StrategyTableSection)
    vgg_tab4: MagnificationTableSection = Field(default_factory=MagnificationTableSection)
    cancernet_tab1: SegmentationTableSection = Field(default_factory=SegmentationTableSection)
    segmenter: GridSegmenterSection = Field(default_factory=GridSegmenterSection)
    scaling: ScalingSection | None = Field(default=None, description="Ray Train workers of every trial "
                                           "(null: the base config's); num_workers >= 1")
    trial_cpus: float = Field(default=0.1, gt=0.0, description="CPUs held by each trial's driver process "
                              "(it launches Ray Train and waits; workers get scaling's resources)")
    max_concurrent_trials: int = Field(default=1, ge=1)
    trial_retries: int = Field(default=0, ge=0, description="Ray Tune retries of a failed trial")
    scoring: GridScoringSection = Field(default_factory=GridScoringSection)
    resume: bool = Field(default=True, description="skip finished stages and trials found in out; false: "
                         "refuse an out that already holds finished trials")
    ray: RayConfig = RayConfig()

    @field_validator("synthetic")
    @classmethod
    def _one_root(cls, value: SynthConfig | None, info) -> SynthConfig | None:
        root = info.data.get("root")
        if root is None and value is None:
            raise ValueError("set root (a BreakHis tree or manifest Parquet) or synthetic (to generate one)")
        if root is not None and value is not None and root.rstrip("/") != value.out.rstrip("/"):
            raise ValueError(f"synthetic.out {value.out!r} differs from root {root!r}: give one of them")
        return value

    @field_validator("tables", "protocols")
    @classmethod
    def _distinct(cls, value: list) -> list:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"must be a non-empty list without repeats, got {value}")
        return value

    @field_validator("split")
    @classmethod
    def _mode_from_protocols(cls, value: SplitOptions) -> SplitOptions:
        if value.mode != "patient":  # the default; dumped configs carry it
            raise ValueError("split.mode is set per protocol: list the protocols in `protocols` instead")
        return value

    @field_validator("protocols")
    @classmethod
    def _official_needs_folds_file(cls, value: list[str], info) -> list[str]:
        split = info.data.get("split")
        if "official" in value and split is not None and not split.folds_file:
            raise ValueError("protocol 'official' needs split.folds_file (dsfoldN.txt or Folds.csv)")
        return value

    @field_validator("folds", mode="before")
    @classmethod
    def _fold_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return list(range(1, value + 1))
        return value

    @field_validator("folds")
    @classmethod
    def _folds_in_split(cls, value: list[int], info) -> list[int]:
        split = info.data.get("split")
        n = split.folds if split is not None else None
        if not value or len(set(value)) != len(value):
            raise ValueError(f"must be a non-empty list without repeats, got {value}")
        if n is not None and any(not 1 <= f <= n for f in value):
            raise ValueError(f"folds must lie in 1..split.folds={n}, got {value}")
        return value

    @field_validator("scaling")
    @classmethod
    def _workers(cls, value: ScalingSection | None) -> ScalingSection | None:
        if value is not None and value.num_workers < 1:
            raise ValueError("must have num_workers >= 1 in a grid: Ray Train's in-process mode (0) does not run "
                             "inside a Ray Tune trial and persists no checkpoint to score")
        return value

    @property
    def tree_root(self) -> str:
        """The BreakHis tree or manifest the grid reads (``root``, else ``synthetic.out``)."""
        return self.root if self.root is not None else self.synthetic.out


# -------------------------------------------------------------------------------------------- demo
class DemoConfig(StrictModel):
    """``make demo``: synth -> manifest -> split -> prepare -> train -> U-Net -> infer -> evaluate -> report."""

    out: str = "runs/demo"
    seed: int = 0
    fraction: float = Field(default=0.05, gt=0.0, le=1.0, description="share of BreakHis' 7,909 images")
    size: tuple[int, int] = (350, 230)
    difficulty: float = Field(default=0.5, ge=0.0, le=1.0)
    train_config: str = "jobs/configs/train_tiny.yaml"
    segmenter_config: str = "jobs/configs/train_segmenter_tiny.yaml"
    train_overrides: list[str] = Field(default_factory=list, description="key=value overrides for training")
    segmenter_overrides: list[str] = Field(default_factory=list)
    infer_segmenter: Literal["unet", "threshold", "watershed"] = "unet"
    ray: RayConfig = RayConfig()

    _size = field_validator("size", mode="before")(lambda cls, v: parse_size(v))


# ------------------------------------------------------------------------------------------- bench
class BenchIngestSection(StrictModel):
    """Ingest: Ray Data over Parquet shards vs a torch ``DataLoader`` over the loose PNGs vs PIL decode."""

    enabled: bool = True
    n_images: int = Field(default=480, ge=8, description="about this many synthetic 700x460 images")
    source: Literal["synthetic", "random"] = Field(default="synthetic", description="synthetic BreakHis tiles "
                                                   "(run_synth + prepare), or smooth random PNGs (faster to make)")
    size: int = Field(default=224, ge=8, description="square side every image is resized to")
    batch_size: int = Field(default=32, ge=1)
    workers: int | None = Field(default=None, ge=0, description="DataLoader workers; null: the cores")
    decode_num_cpus: float = Field(default=0.5, gt=0.0, description="as DataConfig (what training uses)")
    decode_batch_size: int = Field(default=32, ge=1, description="as DataConfig (what training uses)")


class BenchTrainSection(StrictModel):
    """Training step: Ray Train ``TorchTrainer`` (1 worker) vs a plain PyTorch loop; ``scale_workers`` vs 1."""

    enabled: bool = True
    models: list[str] = Field(default=["tiny_cnn", "resnet18"], min_length=1,
                              description="create_model names, random init; the first gives the headline ratio")
    image_size: int = Field(default=96, ge=8)
    batch_size: int = Field(default=32, ge=1)
    warmup_steps: int = Field(default=5, ge=0, description="steps not timed (allocator, caches, prefetch)")
    warmup_s: float = Field(default=5.0, ge=0.0, description="Ray Train sides warm up at least this long (in steps "
                            "of the plain loop's step time): Ray Train's helper actors start during the first seconds")
    steps: int = Field(default=30, ge=1, description="timed steps per side")
    torch_threads: int = Field(default=1, ge=1, description="torch threads of the plain loop and of each worker")
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    scale_workers: int = Field(default=2, ge=0, description="also run this many workers against 1 (0 or 1: skip)")
    use_gpu: bool | None = Field(default=None, description="null: when torch sees a CUDA device")


class BenchInferenceSection(StrictModel):
    """Batch inference: pipeline vs the raw model on pre-decoded tensors; peak memory at N vs ``scale`` x N."""

    enabled: bool = True
    n_images: int = Field(default=40, ge=2)
    scale: int = Field(default=10, ge=2)
    image_size: tuple[int, int] = Field(default=(460, 700), description="(H, W) of the synthetic PNG tiles")
    classifier: str = "tiny_cnn"
    input_size: int = Field(default=224, ge=8)
    segment_size: int = Field(default=256, ge=32, description="U-Net input side (multiple of 32)")
    batch_size: int = Field(default=16, ge=1)
    num_cpus: float = Field(default=0.5, gt=0.0, description="CPUs per Predictor actor")
    num_gpus: float | None = Field(default=None, ge=0.0, description="GPUs per actor; null: 1 with CUDA, else 0")
    concurrency: int = Field(default=1, ge=1)
    decode_num_cpus: float = Field(default=1.0, gt=0.0, description="as InferConfig")
    decode_batch_size: int = Field(default=16, ge=1, description="as InferConfig")
    profile: bool = Field(default=True, description="cProfile one raw Predictor pass per mode and one more "
                          "classifier pipeline pass at scale x N for Ray Data's per-operator statistics")

    _image_size = field_validator("image_size", mode="before")(lambda cls, v: _parse_hw(v))

    @field_validator("segment_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"segment_size must be a multiple of 32, got {value}")
        return value


class BenchSynthSection(StrictModel):
    """Synthetic generation: ``run_synth`` with Ray tasks vs the same task function in one process."""

    enabled: bool = True
    fraction: float = Field(default=0.1, gt=0.0, le=1.0)
    patients: int | None = Field(default=24, ge=2, le=82)
    size: tuple[int, int] = (700, 460)
    masks: bool = True
    task_cpus: float = Field(default=0.5, gt=0.0)

    _size = field_validator("size", mode="before")(lambda cls, v: parse_size(v))


#: What ``quick: true`` changes; any value given explicitly (YAML, flag, override) still wins.
BENCH_QUICK: dict[str, dict[str, Any]] = {
    "ingest": {"n_images": 240},
    "train": {"models": ["tiny_cnn"], "steps": 25},
    "inference": {"n_images": 16},
    "synth": {"fraction": 0.15, "patients": 8},
}


class BenchConfig(StrictModel):
    """``breakhis-ray bench``: ingest, training step, batch inference and synthetic generation, measured side
    by side in one run; prints a table of ratios and writes ``json_out`` with a profile beside it."""

    quick: bool = Field(default=False, description="smaller sizes (BENCH_QUICK): about 5 minutes on 2 CPU cores")
    json_out: str = Field(default="runs/bench/bench.json",
                          description="results JSON; <stem>.profile.txt (table + profile) is written beside it")
    workdir: str | None = Field(default=None, description="scratch data; null: a temporary folder, removed after")
    seed: int = 0
    ray_worker_niceness: int | None = Field(
        default=0, ge=0, le=19, description="niceness of the workers of a local Ray the bench starts. Ray's "
        "default (15) yields CPU to every other process, which on a shared machine slows only the Ray side of "
        "each ratio (the baselines run at 0 in the driver); null: Ray's default")
    ingest: BenchIngestSection = BenchIngestSection()
    train: BenchTrainSection = BenchTrainSection()
    inference: BenchInferenceSection = BenchInferenceSection()
    synth: BenchSynthSection = BenchSynthSection()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _quick_sizes(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("quick"):
            return data
        data = dict(data)
        for section, sizes in BENCH_QUICK.items():
            given = data.get(section) or {}
            if isinstance(given, dict):
                data[section] = {**sizes, **given}
        return data
