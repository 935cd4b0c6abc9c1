"""Typed configuration: pydantic v2 models, YAML files and dotted ``key=value`` overrides.

Precedence: model defaults < YAML file (``--config``) < CLI flags < ``key.sub=value`` overrides.
Every model forbids unknown keys, so a typo fails before any cluster work starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
class SplitConfig(StrictModel):
    manifest: str
    out: str
    mode: Literal["patient", "official", "image"] = "patient"
    folds: int = Field(default=5, ge=2, le=20)
    patient_key: Literal["folder", "slide"] = "folder"
    dc_lc_policy: Literal["keep", "drop", "merge"] = "merge"
    folds_file: str | None = None
    val_fraction: float = Field(default=0.15, ge=0.0, lt=0.5)
    seed: int = 0


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


class TrainConfig(StrictModel):
    data: "DataConfig"
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: OptimConfig = OptimConfig()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    ray: RayConfig = RayConfig()


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
    decode_num_cpus: float = Field(default=0.5, gt=0.0)
    decode_concurrency: int | None = Field(default=None, ge=1, description="max concurrent decode tasks")
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
