"""Load pretrained (ImageNet) backbone weights from files the user supplies; never downloads.

A weight spec is one of:

* ``None`` (or ``"none"``/``"random"``): random initialisation, nothing loaded;
* ``"torchvision"`` (alias ``"imagenet"``): torchvision's own file name for the architecture in
  ``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``), e.g. ``vgg16-397923af.pth``; the name is taken
  from torchvision's weight enum (``DEFAULT``), so it is exactly the file torchvision itself would cache;
* a local path or ``file://`` URI;
* an ``s3://`` URI, read through :func:`breakhis_ray.storage.read_bytes`.

Files are read with ``torch.load(..., weights_only=True)``. Keys are matched by name after stripping DDP
(``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes and renaming DenseNet's legacy keys
(``norm.1`` -> ``norm1``) as torchvision does. Head keys (``model.head_prefixes``) whose shape differs are
skipped; a first convolution with a different number of input channels is adapted (RGB filters copied,
each extra channel gets the mean of the RGB filters). Any backbone tensor left missing or of the wrong
shape means the file belongs to another architecture: that raises :class:`ConfigError`.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from breakhis_ray import storage
from breakhis_ray.errors import ConfigError, StorageError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(key: str) -> str:
    """A state-dict key without the ``module.`` (DDP / DataParallel) and ``_orig_mod.`` (compile) prefixes."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key

log = logging.getLogger(__name__)

TORCHVISION_SPECS = ("torchvision", "imagenet")
RANDOM_SPECS = ("", "none", "random", "scratch")

_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: which tensors were loaded, adapted, skipped, missing, unexpected."""

    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.adapted:
            parts.append(f"adapted {len(self.adapted)} ({', '.join(self.adapted)})")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} head tensors ({_few(self.skipped)})")
        if self.missing:
            parts.append(f"newly initialised {len(self.missing)} ({_few(self.missing)})")
        if self.unexpected:
            parts.append(f"ignored {len(self.unexpected)} unused ({_few(self.unexpected)})")
        return "; ".join(parts)


def _few(keys: list[str], n: int = 3) -> str:
    more = f", ... +{len(keys) - n}" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ------------------------------------------------------------------------------------------ sources
def torchvision_weight_file(arch: str) -> str:
    """torchvision's file name for ``arch``'s default ImageNet weights, e.g. ``vgg16-397923af.pth``."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision has no pretrained weights for {arch!r}") from None
    return enum.DEFAULT.url.rsplit("/", 1)[-1]


def torchvision_weight_path(arch: str) -> Path:
    """Where torchvision caches ``arch``'s ImageNet weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / torchvision_weight_file(arch)


def _resolve_spec(spec: str, arch: str | None) -> str:
    if spec.lower() in TORCHVISION_SPECS:
        if not arch:
            raise ConfigError("weights='torchvision' needs a torchvision architecture; pass a weight file path")
        path = torchvision_weight_path(arch)
        if not path.is_file():
            raise StorageError(
                f"ImageNet weights for {arch} not found at {path}: put {path.name} in "
                f"$TORCH_HOME/hub/checkpoints ({path.parent}) or pass model.weights=PATH"
            )
        return str(path)
    return spec


def _read(uri: str) -> bytes:
    if storage.is_s3(uri):
        return storage.read_bytes(uri)
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    local = os.path.expanduser(local)
    if not os.path.isfile(local):
        raise StorageError(f"weight file not found: {uri}")
    return storage.read_bytes(local)


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a state dict (local or ``s3://``) with ``weights_only=True``, unwrapped and key-normalised.

    Accepts a bare state dict or a dict holding one under ``state_dict``/``model``/``model_state_dict``.
    """
    data = _read(uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot load weights from {uri}: {msg}") from None
    return normalise_state_dict(_unwrap(obj, uri))


def _unwrap(obj: Any, uri: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return obj
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise StorageError(f"{uri} holds no state dict of tensors")


def normalise_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``module.``/``_orig_mod.`` prefixes and rename DenseNet legacy keys."""
    out = {}
    for key, value in sd.items():
        key = strip_wrapper_prefixes(key)
        match = _DENSENET_LEGACY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ loading
def _adapt_conv(src: torch.Tensor, dst_shape: torch.Size) -> torch.Tensor | None:
    """RGB conv filters -> filters for ``dst_shape[1]`` input channels (extra channels: RGB mean)."""
    if src.ndim != 4 or len(dst_shape) != 4:
        return None
    if src.shape[0] != dst_shape[0] or src.shape[2:] != dst_shape[2:] or src.shape[1] != 3:
        return None
    n_in = dst_shape[1]
    mean = src.mean(dim=1, keepdim=True)
    if n_in > 3:
        return torch.cat([src, mean.expand(-1, n_in - 3, -1, -1)], dim=1).clone()
    # fewer channels (e.g. grayscale): the summed response of the RGB filters, shared out
    return (mean * (3.0 / n_in)).expand(-1, n_in, -1, -1).clone()


def _default_arch(model: nn.Module) -> str | None:
    from breakhis_ray.models.classifiers import torchvision_arch

    name = (getattr(model, "model_args", None) or {}).get("name")
    return torchvision_arch(name) if name else None


def load_pretrained(
    model: nn.Module,
    spec: str | os.PathLike | None,
    *,
    arch: str | None = None,
    head_prefixes: tuple[str, ...] | None = None,
) -> LoadReport | None:
    """Load backbone weights from ``spec`` into ``model`` in place; return a :class:`LoadReport`.

    ``arch`` (default: from ``model.model_args["name"]``) picks the torchvision file for
    ``spec="torchvision"``. ``head_prefixes`` (default: ``model.head_prefixes``) names the task head, whose
    tensors may be skipped; every other tensor of the model must be found with the right shape.
    Returns ``None`` for a random-init spec.
    """
    if spec is None:
        return None
    spec = str(spec)
    if spec.strip().lower() in RANDOM_SPECS:
        return None
    arch = arch or _default_arch(model)
    uri = _resolve_spec(spec, arch)
    source = read_state_dict(uri)
    if head_prefixes is None:
        head_prefixes = tuple(getattr(model, "head_prefixes", ()))
    target = model.state_dict()
    what = arch or type(model).__name__

    report = LoadReport(source=uri)
    new_state: dict[str, torch.Tensor] = {}
    bad_shape: list[str] = []
    for key, value in source.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key]
        if value.shape == want.shape:
            new_state[key] = value.to(dtype=want.dtype)
            report.loaded.append(key)
            continue
        adapted = _adapt_conv(value, want.shape)
        if adapted is not None:
            new_state[key] = adapted.to(dtype=want.dtype)
            report.loaded.append(key)
            report.adapted.append(key)
        elif any(key.startswith(p) for p in head_prefixes):
            report.skipped.append(key)
        else:
            bad_shape.append(f"{key} {tuple(value.shape)} vs {tuple(want.shape)}")

    if not report.loaded:
        raise ConfigError(
            f"no tensor in {uri} matches {what}: wrong architecture? (file keys e.g. {_few(list(source))})"
        )
    if bad_shape:
        raise ConfigError(
            f"weights in {uri} do not fit {what}: {len(bad_shape)} tensors have other shapes "
            f"({_few(bad_shape, 2)}): wrong architecture?"
        )
    report.missing = [k for k in target if k not in new_state]
    missing_backbone = [
        k
        for k in report.missing
        if not any(k.startswith(p) for p in head_prefixes) and not k.endswith("num_batches_tracked")
    ]
    if missing_backbone:
        raise ConfigError(
            f"weights in {uri} do not fit {what}: {len(missing_backbone)} backbone tensors missing "
            f"({_few(missing_backbone)}): wrong architecture?"
        )
    model.load_state_dict(new_state, strict=False)
    log.info("%s", report.summary())
    return report
