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
