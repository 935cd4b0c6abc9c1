"""Self-describing model artifacts: a directory (local or ``s3://``) that rebuilds its model alone.

Layout::

    <dir>/model.pt         state_dict (CPU tensors, DDP/compile prefixes stripped)
    <dir>/meta.json        format, format_version, model_args, labels, task (binary | subtype, from the
                           labels), preprocessing, torch version, sha256 of model.pt, optional metrics,
                           optional calibration ({"temperature": T}: infer divides the logits by T)
    <dir>/config.yaml      the resolved config that produced it (when given)
    <dir>/train_state.pt   optional: optimizer/scheduler/epoch/RNG state for resuming

``preprocessing`` is the ONE eval/inference transform: ``{"size": [H, W], "mean": [...], "std": [...],
"scale": "imagenet" | "unit"}`` (pixels to [0, 1], then ``(x - mean) / std`` per RGB channel).

:func:`load_model` reads ``meta.json``, rebuilds the network with
``breakhis_ray.models.create_model(**model_args)`` and loads ``model.pt`` with ``weights_only=True``.
Files are read into memory through :mod:`breakhis_ray.storage` (no temp files), the same way for local
paths and ``s3://``. Every failure (missing directory, corrupt file, meta that does not match the
weights) is one :class:`StorageError` line naming the URI.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import torch
import yaml
from torch import nn

from breakhis_ray import storage
from breakhis_ray.domain import LABELS, task_of_classes
from breakhis_ray.errors import BreakhisError, StorageError
from breakhis_ray.models.weights import strip_wrapper_prefixes

FORMAT = "breakhis-ray-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
TRAIN_STATE_FILE = "train_state.pt"
_REQUIRED_PREPROCESSING = ("size", "mean", "std", "scale")


# -------------------------------------------------------------------------------------------- save
def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copy of a state dict with ``module.``/``_orig_mod.`` prefixes stripped."""
    return {strip_wrapper_prefixes(key): value.detach().cpu() if isinstance(value, torch.Tensor) else value
            for key, value in state.items()}


def _to_safe(obj: Any) -> Any:
    """numpy arrays/scalars -> tensors/Python numbers, so ``torch.load(weights_only=True)`` reads them."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if np is not None and isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: _to_safe(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_safe(v) for v in obj)
    if isinstance(obj, list):
        return [_to_safe(v) for v in obj]
    return obj


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _config_dict(config: Any) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "model_dump_json"):
        return json.loads(config.model_dump_json())
    return json.loads(json.dumps(dict(config), default=str))


def save_checkpoint(
    directory: str,
    model: nn.Module,
    *,
    model_args: Mapping[str, Any] | None = None,
    labels: Sequence[str] = LABELS,
    preprocessing: Mapping[str, Any],
    config: Any = None,
    extra_state: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint directory (local path or ``s3://``); return its URI.

    ``model_args`` defaults to ``model.model_args`` (set by ``create_model``) and must name ``name``,
    ``num_classes`` and ``in_channels``. ``preprocessing`` needs ``size`` ``[H, W]``; ``mean``/``std``/``scale``
    default to ``model.preprocessing``. ``config``: a pydantic config or a dict (saved as YAML).
    ``extra_state``: optimizer/scheduler state dicts, epoch, RNG states (numpy arrays are converted to
    tensors). ``metrics``: small JSON-safe dict stored in ``meta.json``. ``model.pt`` is written last but one
    and ``meta.json`` last, so a directory with ``meta.json`` is complete.
    """
    bare = unwrap_model(model)
    args = dict(model_args if model_args is not None else getattr(bare, "model_args", None) or {})
    missing = [k for k in ("name", "num_classes", "in_channels") if k not in args]
    if missing:
        raise ValueError(f"model_args must include {missing}; got {sorted(args)}")
    prep = dict(getattr(bare, "preprocessing", None) or {})
    prep.update(dict(preprocessing))
    absent = [k for k in _REQUIRED_PREPROCESSING if k not in prep]
    if absent:
        raise ValueError(f"preprocessing must include {absent}")
    prep["size"] = [int(v) for v in prep["size"]]
    prep["mean"] = [float(v) for v in prep["mean"]]
    prep["std"] = [float(v) for v in prep["std"]]

    if extra_state is not None:
        storage.write_bytes(storage.join(directory, TRAIN_STATE_FILE), _torch_bytes(_to_safe(dict(extra_state))))
    cfg = _config_dict(config)
    if cfg is not None:
        storage.write_text(storage.join(directory, CONFIG_FILE), yaml.safe_dump(cfg, sort_keys=False))
    model_bytes = _torch_bytes(clean_state_dict(bare.state_dict()))
    storage.write_bytes(storage.join(directory, MODEL_FILE), model_bytes)

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_args": json.loads(json.dumps(args)),
        "labels": [str(lbl) for lbl in labels],
        **({"task": task_of_classes(labels)} if task_of_classes(labels) else {}),
        "preprocessing": prep,
        "files": {MODEL_FILE: {"sha256": hashlib.sha256(model_bytes).hexdigest(), "bytes": len(model_bytes)}},
        "has_train_state": extra_state is not None,
        "has_config": cfg is not None,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if metrics:
        meta["metrics"] = json.loads(json.dumps(dict(metrics), default=float))
    storage.write_text(storage.join(directory, META_FILE), json.dumps(meta, indent=2) + "\n")
    return str(directory)


# -------------------------------------------------------------------------------------------- load
def _bad(uri: str, why: str) -> StorageError:
    return StorageError(f"invalid checkpoint {uri}: {why}")


def read_meta(uri: str) -> dict:
    """``meta.json`` of a checkpoint directory, validated."""
    meta_uri = storage.join(uri, META_FILE)
    try:
        text = storage.read_text(meta_uri)
    except StorageError:
        raise StorageError(f"no checkpoint at {uri}: {META_FILE} not found or unreadable") from None
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise _bad(uri, f"{META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(uri, f"{META_FILE} is not a {FORMAT} file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _bad(uri, f"format_version {version!r} is not supported (this code reads <= {FORMAT_VERSION})")
    args = meta.get("model_args")
    if not isinstance(args, dict) or not all(k in args for k in ("name", "num_classes", "in_channels")):
        raise _bad(uri, "model_args must hold name, num_classes and in_channels")
    prep = meta.get("preprocessing")
    if not isinstance(prep, dict) or not all(k in prep for k in _REQUIRED_PREPROCESSING):
        raise _bad(uri, f"preprocessing must hold {', '.join(_REQUIRED_PREPROCESSING)}")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not all(isinstance(lbl, str) for lbl in labels):
        raise _bad(uri, f"labels must be a list of names, got {labels!r}")
    is_segmenter = str(args["name"]).startswith("unet_")
    if not is_segmenter and len(labels) != int(args["num_classes"]):
        raise _bad(uri, f"labels {labels} do not match num_classes={args['num_classes']}")
    return meta


def _load_tensors(uri: str, file_uri: str, map_location: Any) -> Any:
    data = storage.read_bytes(file_uri)
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True), data


def load_state_dict(uri: str, meta: dict | None = None, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's ``model.pt``, checked against the sha256 recorded in ``meta.json``."""
    meta = meta or read_meta(uri)
    file_uri = storage.join(uri, MODEL_FILE)
    try:
        state, data = _load_tensors(uri, file_uri, map_location)
    except StorageError:
        raise _bad(uri, f"{MODEL_FILE} not found or unreadable") from None
    except Exception as exc:  # torch.load raises UnpicklingError/RuntimeError/EOFError on corrupt files
        raise _bad(uri, f"{MODEL_FILE} is corrupt ({type(exc).__name__})") from None
    expected = (meta.get("files") or {}).get(MODEL_FILE, {}).get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise _bad(uri, f"{MODEL_FILE} does not match the sha256 in {META_FILE}")
    if not isinstance(state, dict):
        raise _bad(uri, f"{MODEL_FILE} holds no state dict")
    return state


def load_model(dir_or_uri: str, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint directory (local or ``s3://``); return ``(model.eval(), meta)``."""
    from breakhis_ray.models import create_model  # lazy: models sit above checkpoint in the layering

    uri = str(dir_or_uri).rstrip("/")
    meta = read_meta(uri)
    args = dict(meta["model_args"])
    args.pop("weights", None)
    try:
        model = create_model(**args)
    except (BreakhisError, TypeError, ValueError) as exc:
        raise _bad(uri, f"model_args {args} cannot be built ({exc})") from None
    state = load_state_dict(uri, meta, map_location)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise _bad(uri, f"weights do not fit model_args {args}: {first}") from None
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return model, meta


def load_train_state(dir_or_uri: str, map_location: Any = "cpu") -> dict | None:
    """``train_state.pt`` of a checkpoint (``None`` when it has none), read with ``weights_only=True``."""
    uri = str(dir_or_uri).rstrip("/")
    file_uri = storage.join(uri, TRAIN_STATE_FILE)
    if not storage.exists(file_uri):
        return None
    try:
        state, _ = _load_tensors(uri, file_uri, map_location)
    except StorageError:
        raise _bad(uri, f"{TRAIN_STATE_FILE} unreadable") from None
    except Exception as exc:
        raise _bad(uri, f"{TRAIN_STATE_FILE} is corrupt ({type(exc).__name__})") from None
    return state


def update_meta(dir_or_uri: str, **fields: Any) -> dict:
    """Add or replace JSON-safe top-level ``fields`` of a checkpoint's ``meta.json`` (e.g. ``calibration``);
    the weights and their sha256 stay as they are. Returns the new meta."""
    from breakhis_ray.artifacts import write_text_atomic

    uri = str(dir_or_uri).rstrip("/")
    meta = read_meta(uri)
    protected = {"format", "format_version", "model_args", "labels", "preprocessing", "files"}
    if protected & set(fields):
        raise ValueError(f"update_meta cannot change {sorted(protected & set(fields))}")
    meta.update(json.loads(json.dumps(fields)))
    write_text_atomic(storage.join(uri, META_FILE), json.dumps(meta, indent=2) + "\n")
    return meta


def temperature_of(meta: Mapping[str, Any]) -> float:
    """The calibration temperature a checkpoint's meta records (1.0: none)."""
    value = (meta.get("calibration") or {}).get("temperature", 1.0)
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        temperature = float("nan")
    if not temperature > 0 or temperature == float("inf"):
        raise StorageError(f"checkpoint calibration temperature must be a number > 0, got {value!r}")
    return temperature


def load_config_dict(dir_or_uri: str) -> dict | None:
    """The resolved config saved beside the weights (``None`` when absent)."""
    file_uri = storage.join(str(dir_or_uri).rstrip("/"), CONFIG_FILE)
    if not storage.exists(file_uri):
        return None
    try:
        return yaml.safe_load(storage.read_text(file_uri)) or {}
    except yaml.YAMLError:
        raise _bad(str(dir_or_uri), f"{CONFIG_FILE} is not valid YAML") from None


__all__ = [
    "FORMAT_VERSION",
    "clean_state_dict",
    "load_config_dict",
    "load_model",
    "load_state_dict",
    "load_train_state",
    "read_meta",
    "save_checkpoint",
    "strip_wrapper_prefixes",
    "temperature_of",
    "unwrap_model",
    "update_meta",
]
