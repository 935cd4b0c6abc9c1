"""U-Net segmenters from segmentation-models-pytorch, never downloading anything.

``smp.Unet`` is always built with ``encoder_weights=None``; ImageNet encoder weights come only from a file
the user supplies (a local path, ``s3://`` URI, or ``"torchvision"`` for the torchvision-named file in
``$TORCH_HOME/hub/checkpoints``). The supported encoders are torchvision networks whose smp encoders
keep torchvision's parameter names, so torchvision's ImageNet files load directly.

U-Nets are also reachable through the one factory: ``create_model("unet_resnet18", num_classes=1,
weights=..., in_channels=3)`` is ``create_unet("resnet18", weights, classes=1, in_channels=3)``, which lets
checkpoints rebuild segmenters exactly as they rebuild classifiers. Inputs need H and W divisible by 32.
"""

from __future__ import annotations

from torch import nn

from breakhis_ray.errors import ConfigError
from breakhis_ray.models.classifiers import preprocessing_for, torchvision_arch

UNET_ENCODERS = ("resnet18", "resnet34", "resnet50", "vgg16", "vgg16_bn", "densenet121")
UNET_PREFIX = "unet_"


def create_unet(
    encoder: str = "resnet18",
    encoder_weights_path: str | None = None,
    classes: int = 1,
    in_channels: int = 3,
    decoder_channels: tuple[int, ...] | list[int] | None = None,
) -> nn.Module:
    """A ``smp.Unet`` returning logits of shape ``(B, classes, H, W)``.

    ``encoder_weights_path``: ``None`` (random init), a local path or ``s3://`` URI of a state dict with the
    encoder's torchvision names, or ``"torchvision"``. The decoder and segmentation head are the "head" for
    :func:`set_backbone_trainable`; the encoder is the backbone.
    """
    if encoder not in UNET_ENCODERS:
        raise ConfigError(f"unknown U-Net encoder {encoder!r}; valid: {', '.join(UNET_ENCODERS)}")
    if int(classes) < 1:
        raise ConfigError(f"classes must be >= 1, got {classes}")
    if int(in_channels) < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    import segmentation_models_pytorch as smp

    kwargs = {}
    if decoder_channels is not None:
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) != 5 or min(decoder_channels) < 1:
            raise ConfigError(f"decoder_channels must be 5 positive ints, got {decoder_channels}")
        kwargs["decoder_channels"] = decoder_channels
    model = smp.Unet(
        encoder_name=encoder,
        encoder_weights=None,
        in_channels=int(in_channels),
        classes=int(classes),
        **kwargs,
    )
    name = UNET_PREFIX + encoder
    model.model_args = {"name": name, "num_classes": int(classes), "in_channels": int(in_channels)}
    if decoder_channels is not None:
        model.model_args["decoder_channels"] = list(decoder_channels)
    model.preprocessing = preprocessing_for(name)
    model.head_prefixes = ("decoder.", "segmentation_head.")
    if encoder_weights_path is not None:
        from breakhis_ray.models.weights import load_pretrained

        model.weights_report = load_pretrained(
            model.encoder, encoder_weights_path, arch=torchvision_arch(name), head_prefixes=()
        )
    return model
