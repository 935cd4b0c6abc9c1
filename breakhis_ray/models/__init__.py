"""Model registry: ``create_model(name, num_classes, weights, in_channels, **kw)``.

Classifiers (:mod:`.classifiers`): ``vgg16``, ``vgg16_bn`` (VGG adjusted structure: conv features +
global average pooling + ``Linear(512, 256)``-ReLU-Dropout-``Linear(256, num_classes)``), ``resnet18``,
``resnet34``, ``resnet50``, ``densenet121`` and ``tiny_cnn``.
Segmenters (:mod:`.unet`): ``unet_<encoder>`` for the encoders in ``UNET_ENCODERS`` (``num_classes`` =
output mask channels); :func:`create_unet` is the same builder under its own signature.

``weights`` is a spec for :func:`load_pretrained` (``None``, ``"torchvision"``, a path or ``s3://`` URI).
Every model carries ``model_args`` (what rebuilds it), ``preprocessing`` and ``head_prefixes``.
"""

from __future__ import annotations

import inspect

from torch import nn

from breakhis_ray.errors import ConfigError
from breakhis_ray.models.classifiers import (
    CLASSIFIER_BUILDERS,
    feature_parameters,
    head_parameters,
    preprocessing_for,
    set_backbone_trainable,
    split_backbone_head,
    torchvision_arch,
)
from breakhis_ray.models.unet import UNET_ENCODERS, UNET_PREFIX, create_unet
from breakhis_ray.models.weights import (
    LoadReport,
    load_pretrained,
    torchvision_weight_file,
    torchvision_weight_path,
)

CLASSIFIER_NAMES = tuple(CLASSIFIER_BUILDERS)
SEGMENTER_NAMES = tuple(UNET_PREFIX + e for e in UNET_ENCODERS)
MODEL_NAMES = CLASSIFIER_NAMES + SEGMENTER_NAMES


def list_models() -> list[str]:
    """Every name :func:`create_model` accepts."""
    return list(MODEL_NAMES)


def _check_options(name: str, builder, options: dict, fixed: set[str]) -> None:
    params = inspect.signature(builder).parameters
    allowed = [p for p in params if p not in fixed]
    unknown = [k for k in options if k not in params or k in fixed]
    if unknown:
        raise ConfigError(
            f"model {name!r} does not take option {unknown[0]!r}; options: {', '.join(allowed) or 'none'}"
        )


def create_model(
    name: str,
    num_classes: int = 2,
    weights: str | None = None,
    in_channels: int = 3,
    **kw,
) -> nn.Module:
    """Build model ``name`` with random weights, then load ``weights`` (backbone only) if given.

    Unknown names raise :class:`ConfigError` listing the valid ones; unknown options likewise.
    The load report (or ``None``) is kept as ``model.weights_report``.
    """
    if name in CLASSIFIER_BUILDERS:
        builder = CLASSIFIER_BUILDERS[name]
        _check_options(name, builder, kw, {"name", "num_classes", "in_channels"})
        model = builder(name, int(num_classes), int(in_channels), **kw)
        model.weights_report = load_pretrained(model, weights)
        return model
    if name in SEGMENTER_NAMES:
        _check_options(name, create_unet, kw, {"encoder", "encoder_weights_path", "classes", "in_channels"})
        model = create_unet(
            encoder=name[len(UNET_PREFIX):],
            encoder_weights_path=weights,
            classes=int(num_classes),
            in_channels=int(in_channels),
            **kw,
        )
        if not hasattr(model, "weights_report"):
            model.weights_report = None
        return model
    raise ConfigError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")


__all__ = [
    "CLASSIFIER_NAMES",
    "LoadReport",
    "MODEL_NAMES",
    "SEGMENTER_NAMES",
    "UNET_ENCODERS",
    "create_model",
    "create_unet",
    "feature_parameters",
    "head_parameters",
    "list_models",
    "load_pretrained",
    "preprocessing_for",
    "set_backbone_trainable",
    "split_backbone_head",
    "torchvision_arch",
    "torchvision_weight_file",
    "torchvision_weight_path",
]
