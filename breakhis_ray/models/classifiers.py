"""Image classifiers: torchvision backbones with a BreakHis head, plus a tiny CNN for CPU tests and demos.

Every builder returns a plain ``nn.Module`` carrying three attributes that the rest of the project reads:

* ``model_args``: the keyword arguments of :func:`breakhis_ray.models.create_model` that rebuild it
  (``name``, ``num_classes``, ``in_channels`` and the builder's own options; never the weights);
* ``preprocessing``: the normalisation of the backbone's pretraining (``mean``, ``std``, ``scale``), see
  :func:`preprocessing_for`;
* ``head_prefixes``: state-dict prefixes of the freshly initialised task head. Everything else is the
  backbone; :func:`split_backbone_head` and :func:`set_backbone_trainable` use this split for the
  transfer-learning strategies (from scratch, frozen features, full fine-tune).

VGG "adjusted structure" (``vgg16``, ``vgg16_bn``): the 13 convolution layers of torchvision's VGG16 are
kept (so ImageNet weights load unchanged), the 3 x 4096 fully connected head (~120 M parameters, fixed to
224 x 224 inputs) is replaced by global average pooling + ``Linear(512, hidden=256)`` + ReLU +
``Dropout(dropout)`` + ``Linear(hidden, num_classes)``. Global pooling makes the network accept any input
size of at least 32 x 32.

ResNet and DenseNet keep torchvision's structure; their last layer (``fc`` / ``classifier``) becomes
``Linear(features, num_classes)``, preceded by ``Dropout(dropout)`` when ``dropout > 0``.

``in_channels != 3`` (e.g. 4 for segmentation-guided classification: RGB + mask) replaces the first
convolution by one with that many input channels; when ImageNet weights are loaded afterwards,
:func:`breakhis_ray.models.weights.load_pretrained` copies the RGB filters and initialises each extra
channel's filters to the mean of the RGB filters.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from breakhis_ray.domain import IMAGENET_MEAN, IMAGENET_STD, UNIT_MEAN, UNIT_STD
from breakhis_ray.errors import ConfigError

# name -> (torchvision builder name, head prefix, first conv module path)
_TORCHVISION = {
    "vgg16": ("vgg16", "classifier.", "features.0"),
    "vgg16_bn": ("vgg16_bn", "classifier.", "features.0"),
    "resnet18": ("resnet18", "fc.", "conv1"),
    "resnet34": ("resnet34", "fc.", "conv1"),
    "resnet50": ("resnet50", "fc.", "conv1"),
    "densenet121": ("densenet121", "classifier.", "features.conv0"),
}


def preprocessing_for(name: str) -> dict:
    """Input normalisation a model expects: ``{"mean", "std", "scale"}`` for its RGB channels.

    Pixels are first scaled to ``[0, 1]``, then ``(x - mean) / std`` per RGB channel. torchvision
    backbones (and U-Net encoders) use the ImageNet statistics (``scale="imagenet"``); ``tiny_cnn`` has no
    pretraining and takes ``[0, 1]`` pixels as they are (``scale="unit"``: mean 0, std 1). Extra input
    channels (a mask) are not normalised: feed them in ``[0, 1]``.
    """
    base = name[len("unet_"):] if name.startswith("unet_") else name
    if base in _TORCHVISION:
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "scale": "imagenet"}
    if base == "tiny_cnn":
        return {"mean": list(UNIT_MEAN), "std": list(UNIT_STD), "scale": "unit"}
    raise ConfigError(f"unknown model {name!r}: no preprocessing known")


def torchvision_arch(name: str) -> str | None:
    """The torchvision architecture whose ImageNet weights fit model ``name`` (``None`` if none does)."""
    base = name[len("unet_"):] if name.startswith("unet_") else name
    entry = _TORCHVISION.get(base)
    return entry[0] if entry else None


# ------------------------------------------------------------------------------------ adaptations
def _get_module(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def adapt_first_conv(model: nn.Module, path: str, in_channels: int) -> None:
    """Replace the conv at ``path`` by one taking ``in_channels`` inputs (same everything else).

    With random weights the new conv keeps torch's default init for all channels; pretrained RGB filters
    are mapped onto it later by ``load_pretrained``.
    """
    old = _get_module(model, path)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"{path} is {type(old).__name__}, expected Conv2d")
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    _set_module(model, path, new)


def _linear_head(in_features: int, num_classes: int, dropout: float) -> nn.Module:
    if dropout > 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    return nn.Linear(in_features, num_classes)


def _check_common(num_classes: int, in_channels: int, dropout: float) -> None:
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if int(in_channels) < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")


def _finish(model: nn.Module, model_args: dict, head_prefixes: tuple[str, ...], first_conv: str) -> nn.Module:
    model.model_args = dict(model_args)
    model.preprocessing = preprocessing_for(model_args["name"])
    model.head_prefixes = tuple(head_prefixes)
    model.first_conv = first_conv
    return model


# ---------------------------------------------------------------------------------------- builders
class VGGAdjusted(nn.Module):
    """torchvision's VGG16 convolution layers (same parameter names) + global pooling + a small head."""

    def __init__(self, batch_norm: bool, num_classes: int, dropout: float, hidden: int):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"], batch_norm=batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(512, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _build_vgg(name: str, num_classes: int, in_channels: int, dropout: float = 0.5, hidden: int = 256) -> nn.Module:
    _check_common(num_classes, in_channels, dropout)
    if int(hidden) < 1:
        raise ConfigError(f"hidden must be >= 1, got {hidden}")
    model = VGGAdjusted(name == "vgg16_bn", num_classes, dropout, int(hidden))
    _, head, first = _TORCHVISION[name]
    adapt_first_conv(model, first, in_channels)
    args = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "dropout": dropout, "hidden": hidden}
    return _finish(model, args, (head,), first)


def _build_torchvision(name: str, num_classes: int, in_channels: int, dropout: float = 0.0) -> nn.Module:
    """ResNet / DenseNet: torchvision's structure, its last layer (``fc`` / ``classifier``) replaced by
    ``Linear(features, num_classes)``, preceded by ``Dropout(dropout)`` when ``dropout > 0``."""
    import torchvision

    _check_common(num_classes, in_channels, dropout)
    model = getattr(torchvision.models, name)(weights=None)
    _, head, first = _TORCHVISION[name]
    last = head.rstrip(".")
    setattr(model, last, _linear_head(getattr(model, last).in_features, num_classes, dropout))
    adapt_first_conv(model, first, in_channels)
    args = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "dropout": dropout}
    return _finish(model, args, (head,), first)


class TinyCNN(nn.Module):
    """Three conv blocks + global pooling + linear: ~25k parameters, for CPU tests and the demo."""

    def __init__(self, num_classes: int = 2, in_channels: int = 3, width: int = 16, dropout: float = 0.0):
        super().__init__()
        w = int(width)
        layers: list[nn.Module] = []
        chans = [in_channels, w, 2 * w, 4 * w]
        for i in range(3):
            layers += [
                nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                nn.BatchNorm2d(chans[i + 1]),
                nn.ReLU(inplace=True),
            ]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = _linear_head(4 * w, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _build_tiny(name: str, num_classes: int, in_channels: int, dropout: float = 0.0, width: int = 16) -> nn.Module:
    _check_common(num_classes, in_channels, dropout)
    if int(width) < 1:
        raise ConfigError(f"width must be >= 1, got {width}")
    model = TinyCNN(num_classes, in_channels, width, dropout)
    args = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "dropout": dropout, "width": width}
    return _finish(model, args, ("classifier.",), "features.0")


CLASSIFIER_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vgg16": _build_vgg,
    "vgg16_bn": _build_vgg,
    "resnet18": _build_torchvision,
    "resnet34": _build_torchvision,
    "resnet50": _build_torchvision,
    "densenet121": _build_torchvision,
    "tiny_cnn": _build_tiny,
}


# ------------------------------------------------------------------------------ transfer learning
def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    model = getattr(model, "module", model)  # DDP wrapper
    prefixes = getattr(model, "head_prefixes", None)
    if prefixes is None:
        raise ConfigError(f"{type(model).__name__} was not built by create_model: no head_prefixes attribute")
    return tuple(prefixes)


def _is_head(name: str, prefixes: Iterable[str]) -> bool:
    name = name[len("module."):] if name.startswith("module.") else name
    return any(name.startswith(p) for p in prefixes)


def split_backbone_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(backbone parameters, head parameters)``, e.g. for two optimizer parameter groups."""
    prefixes = _head_prefixes(model)
    backbone, head = [], []
    for name, param in model.named_parameters():
        (head if _is_head(name, prefixes) else backbone).append(param)
    return backbone, head


def feature_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Backbone (feature extractor) parameters."""
    return split_backbone_head(model)[0]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Task head parameters (the classifier layers, or a U-Net's decoder and segmentation head)."""
    return split_backbone_head(model)[1]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> nn.Module:
    """Freeze (``False``) or unfreeze the backbone by ``requires_grad``; the head stays trainable.

    BatchNorm running statistics still update in ``train()`` mode; call ``.eval()`` on the frozen
    backbone's BatchNorm layers as well if they must stay fixed.
    """
    for param in feature_parameters(model):
        param.requires_grad_(bool(trainable))
    for param in head_parameters(model):
        param.requires_grad_(True)
    return model
