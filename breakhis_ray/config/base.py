"""Config mechanics: the strict base model, the value parsers, and load / validate / dump.

Precedence: model defaults < YAML file (``--config``) < CLI flags < ``key.sub=value`` overrides.
Every model forbids unknown keys, so a typo fails before any cluster work starts.

Sizes have ONE parser, :func:`parse_hw`, and one axis order: ``(height, width)``. The string form is the
project's ``"WxH"`` (width first, as image dimensions are usually written: ``700x460``). The few fields
stored width-first (the synthetic tile size, prepare's ``resize``: image-file dimensions) go through
:func:`wh_size`, which is ``parse_hw`` reordered, not a second parser.

This package imports nothing from ``breakhis_ray.data`` (or any stage module): it is the bottom layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from breakhis_ray.domain import MAGNIFICATIONS
from breakhis_ray.errors import ConfigError

#: The YAML configs shipped with the source tree (``jobs/configs/``). Defaults that name a shipped config
#: are absolute paths below it, so they do not depend on the directory a command runs in.
SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def shipped_config(name: str) -> str:
    """Absolute path of ``jobs/configs/<name>`` in this source tree (for config-file defaults)."""
    return str(SHIPPED_CONFIGS / name)


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ------------------------------------------------------------------------------------------ parsers
def parse_hw(value: Any) -> tuple[int, int]:
    """The one size parser; returns ``(height, width)``.

    ``224`` -> ``(224, 224)``; ``[H, W]`` or ``(H, W)`` -> ``(H, W)``; the string ``"WxH"`` (project
    convention: width first) -> ``(H, W)``, so ``"700x460"`` -> ``(460, 700)``. Both sides must be >= 8.
    """
    if isinstance(value, bool):
        raise ValueError(f"image size must be an int, [H, W] or 'WxH', got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    elif isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"image size string must look like WxH (e.g. 224x224), got {value!r}")
        value = (int(parts[1]), int(parts[0]))
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"image size must be an int, [H, W] or 'WxH', got {value!r}") from None
    if height < 8 or width < 8:
        raise ValueError(f"image size must be at least 8x8, got H={height} W={width}")
    return height, width


def parse_hw_or_none(value: Any) -> tuple[int, int] | None:
    """:func:`parse_hw`, with ``None`` passed through (optional size fields)."""
    return None if value is None else parse_hw(value)


def wh_size(value: Any) -> tuple[int, int]:
    """``(width, height)`` for the fields stored width-first (image-file dimensions).

    Accepts what those fields always accepted: the string ``"WxH"`` and a width-first ``[W, H]``; parsed by
    :func:`parse_hw` (a sequence is reversed into its ``[H, W]`` order first) and returned reordered.
    """
    given = value
    try:
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError
            value = (value[1], value[0])
        height, width = parse_hw(value)
    except ValueError:
        raise ValueError(f"size must look like WxH or [W, H] (e.g. 700x460), each side at least 8, "
                         f"got {given!r}") from None
    return width, height


def size_string(value: Any) -> str | None:
    """``None`` stays ``None``; ``"WxH"`` / ``[W, H]`` -> the canonical string ``"WxH"``."""
    if value is None:
        return None
    width, height = wh_size(value)
    return f"{width}x{height}"


_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(value: Any) -> int | None:
    """``268435456``, ``"256MB"``, ``"1GiB"`` -> bytes (``None`` passes through)."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGIB")
    unit = text[len(number):]
    if unit not in _BYTE_UNITS or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"byte size must look like 268435456, 256MB or 1GiB, got {value!r}")
    return int(float(number) * _BYTE_UNITS[unit])


def parse_magnifications(value: Any) -> Any:
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


def magnification_list(value: Any) -> list[int]:
    """:func:`parse_magnifications` with ``"all"`` spelled out: a sorted list of ints."""
    mags = parse_magnifications(value)
    return list(MAGNIFICATIONS) if mags == "all" else mags


def one_or_many(value: Any) -> Any:
    """A single value becomes a one-element list; ``None`` and lists pass through."""
    if value is None or isinstance(value, (list, tuple)):
        return value
    return [value]


# ---------------------------------------------------------------------------------- load and dump
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
    """The mapping at the top of a YAML file; a missing file or bad YAML is a one-line ConfigError."""
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


def format_validation_error(exc: ValidationError, cls: type[BaseModel]) -> str:
    """One line naming the first bad key of ``exc`` (and how many more there are)."""
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
    """``cls.model_validate(data)`` with a one-line :class:`ConfigError` instead of pydantic's report."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, cls)) from None


def dump_config(cfg: BaseModel) -> dict:
    """JSON-safe dict of a config (what workers re-validate and what is saved beside outputs)."""
    return json.loads(cfg.model_dump_json())


def config_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, keys in field order (the text of every ``config.yaml``)."""
    return yaml.safe_dump(dump_config(cfg), sort_keys=False)
