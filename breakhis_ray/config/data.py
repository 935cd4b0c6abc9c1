"""Configs of the data stages: ``synth``, ``manifest``, ``split`` and ``prepare`` (with offline enhancement)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from breakhis_ray.config.base import StrictModel, parse_bytes, size_string, wh_size
from breakhis_ray.config.common import DecodeSection, RayConfig, lift_max_pixels


class SynthConfig(StrictModel):
    """``breakhis-ray synth``: a synthetic BreakHis tree rendered by Ray tasks, deterministic per seed.

    ``size`` is stored ``(width, height)``, as the tiles' file dimensions: ``"WxH"`` or ``[W, H]``.
    ``out`` defaults to ``runs/demo/synthetic`` relative to the working directory of the command.
    """

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

    _size = field_validator("size", mode="before")(lambda cls, v: wh_size(v))


class ManifestConfig(StrictModel):
    """``breakhis-ray manifest``: one Parquet row per image file of a BreakHis tree."""

    root: str
    out: str
    read_sizes: bool = Field(default=True, description="read width/height from each image header")
    io_threads: int = Field(default=16, ge=1, le=256, description="concurrent header reads")


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
    """``breakhis-ray split``: rows ``path, fold, split`` for every image and fold."""

    manifest: str
    out: str


ENHANCE_TRANSFORMS = ("hflip", "vflip", "rot90", "rot180", "rot270", "hed_jitter")


class EnhanceConfig(StrictModel):
    """Offline class balancing ("data enhancement", Tab. 2 of the VGG + focal loss paper).

    Deterministic augmented copies of *training* images of the minority class, per magnification, until the
    classes balance (``target: balance``) or each class reaches ``target`` images per magnification.
    ``balance``: the classes balanced, ``label`` (benign / malignant, the binary task) or ``subtype`` (the
    eight subtypes, for the subtype task).
    ``transforms``: ``hflip``, ``vflip``, ``rot90``, ``rot180``, ``rot270`` (quarter turns only for square
    images) and ``hed_jitter`` / ``hed_jitter(SIGMA)`` (seeded stain jitter, added to every copy; it also
    allows more copies per image than there are geometric transforms).
    """

    enabled: bool = False
    balance: Literal["label", "subtype"] = Field(default="label", description="classes to balance: "
                                                 "benign/malignant (label) or the eight subtypes (subtype)")
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
    """``breakhis-ray prepare``: decode and check every image, write Parquet shards, rejects, manifest and splits.

    ``resize`` and ``expected_size`` are kept as canonical ``"WxH"`` strings (``[W, H]`` is accepted);
    :func:`~breakhis_ray.config.base.parse_hw` turns them into ``(H, W)``. The former top-level
    ``max_pixels`` key is still accepted and means ``decode.max_pixels`` (read back as ``cfg.max_pixels``).
    """

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
    decode: DecodeSection = Field(default_factory=DecodeSection)
    task_cpus: float = Field(default=0.5, gt=0.0)
    enhance: EnhanceConfig = EnhanceConfig()
    ray: RayConfig = RayConfig()

    _max_pixels = model_validator(mode="before")(lambda cls, data: lift_max_pixels(data))
    _resize = field_validator("resize", mode="before")(lambda cls, v: size_string(v))
    _shard_bytes = field_validator("shard_bytes", mode="before")(lambda cls, v: parse_bytes(v))

    @field_validator("expected_size", mode="before")
    @classmethod
    def _expected(cls, value: Any) -> str | None:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return size_string(value)

    @property
    def max_pixels(self) -> int:
        """``decode.max_pixels`` (the decompression-bomb guard)."""
        return self.decode.max_pixels
