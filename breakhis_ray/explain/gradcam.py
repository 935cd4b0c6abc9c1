"""Grad-CAM and Grad-CAM++ class-activation maps for the project's classifiers, and their PNG files.

Grad-CAM (Selvaraju et al., 2017): for the explained class ``c`` (by default the predicted one), the
gradients of the logit ``y_c`` with respect to the activations ``A`` of a target layer are averaged over
space into one weight per channel; the map is ``ReLU(sum_k w_k A_k)``. Grad-CAM++ (Chattopadhyay et al.,
2018) weights each location's positive gradient by ``alpha = g^2 / (2 g^2 + sum(A) g^3)`` (the closed form
with an exponential score), which spreads the map over several instances of the evidence. Both maps are
upsampled (bilinear) to the model's input size and scaled to ``[0, 1]`` per image (an all-zero map stays 0).

Target layer per family (:data:`TARGET_LAYERS`), a module path for ``nn.Module.get_submodule``:

=================  ====================  ===========================================================
model              layer                 why
=================  ====================  ===========================================================
``vgg16``          ``features.29``       last ReLU before the final max-pool (14 x 14 at 224)
``vgg16_bn``       ``features.42``       the same in the batch-norm variant
``resnet18/34/50`` ``layer4``            last residual stage (7 x 7 at 224)
``densenet121``    ``features``          last dense block + ``norm5`` (7 x 7 at 224)
``tiny_cnn``       ``features``          last conv block (1/4 of the input)
=================  ====================  ===========================================================

Any other module path can be given (``explain.target_layer``); a wrong one is a one-line
:class:`~breakhis_ray.errors.ConfigError` listing the model's convolutional modules.

Inference runs under ``torch.inference_mode``; :meth:`GradCAM.__call__` leaves it for its own pass (a
forward with autograd on a copy of the input, then one ``torch.autograd.grad`` with respect to the target
activations only: no parameter gradient is accumulated). This module never imports Ray.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from breakhis_ray.errors import ConfigError

EXPLAIN_METHODS = ("gradcam", "gradcam++")
Method = Literal["gradcam", "gradcam++"]

#: model name -> default target layer (module path)
TARGET_LAYERS: dict[str, str] = {
    "vgg16": "features.29",
    "vgg16_bn": "features.42",
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "densenet121": "features",
    "tiny_cnn": "features",
}


def _bare(model: nn.Module) -> nn.Module:
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP / DataParallel
        model = model.module
    return model


def _conv_paths(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def resolve_target_layer(model: nn.Module, target_layer: str | None = None) -> str:
    """The module path Grad-CAM hooks: ``target_layer`` if given, else the family default of
    ``model.model_args["name"]``; checked against the model's modules."""
    model = _bare(model)
    name = str((getattr(model, "model_args", None) or {}).get("name", type(model).__name__))
    path = target_layer or TARGET_LAYERS.get(name)
    if path is None:
        raise ConfigError(f"no default Grad-CAM target layer for model {name!r}: set explain.target_layer to a "
                          f"module path (known defaults: {', '.join(f'{k}={v}' for k, v in TARGET_LAYERS.items())})")
    try:
        model.get_submodule(path)
    except AttributeError:
        convs = _conv_paths(model)
        shown = ", ".join(convs[-4:]) or "none"
        raise ConfigError(f"explain.target_layer={path!r} is not a module of {name}; its last convolutions: "
                          f"{shown} (any module path works, e.g. a block holding them)") from None
    return path


class GradCAM:
    """Class-activation maps of ``model`` at ``target_layer`` (default: the family's, see module docstring).

    ``cams, logits = GradCAM(model)(x)``: ``x`` is the normalised ``float (N, C, H, W)`` model input (it may
    have been made under ``torch.inference_mode``); ``cams`` is ``float32 (N, H, W)`` in ``[0, 1]``,
    ``logits`` the ``float32 (N, classes)`` of the same forward pass. ``class_index``: one class for all
    images, one per image, or ``None`` for each image's predicted class.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None, method: Method = "gradcam") -> None:
        if method not in EXPLAIN_METHODS:
            raise ConfigError(f"unknown explanation method {method!r}; valid: {', '.join(EXPLAIN_METHODS)}")
        self.model = model
        self.method = method
        self.target_layer = resolve_target_layer(model, target_layer)
        self.layer = _bare(model).get_submodule(self.target_layer)

    def __call__(self, x: torch.Tensor, class_index: int | Sequence[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        captured: list[torch.Tensor] = []
        with torch.inference_mode(False), torch.enable_grad():
            inp = x.detach().clone().float().requires_grad_(True)  # a normal tensor with a graph
            handle = self.layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                logits = self.model(inp)
            finally:
                handle.remove()
            if not captured:
                raise ConfigError(f"Grad-CAM target layer {self.target_layer!r} was not used by the forward pass")
            acts = captured[-1]
            if isinstance(acts, (tuple, list)):
                acts = acts[0]
            n = logits.shape[0]
            if class_index is None:
                idx = logits.detach().argmax(1)
            else:
                idx = torch.as_tensor(np.broadcast_to(np.asarray(class_index), (n,)).copy(), device=logits.device)
            score = logits.gather(1, idx.long().view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, acts)
        acts, grads = acts.detach().float(), grads.detach().float()
        if self.method == "gradcam":
            weights = grads.mean(dim=(2, 3), keepdim=True)
        else:
            g2 = grads.pow(2)
            denom = 2.0 * g2 + acts.sum(dim=(2, 3), keepdim=True) * grads.pow(3)
            alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
            weights = (alpha * F.relu(grads)).sum(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
        cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(cam))
        return cam.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32), logits.detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------------- images
_LUT: np.ndarray | None = None


def colorize(cam: np.ndarray) -> np.ndarray:
    """A ``[0, 1]`` map -> ``uint8 (H, W, 3)`` with matplotlib's ``jet`` colour map (blue low, red high)."""
    global _LUT
    if _LUT is None:
        import matplotlib

        _LUT = (matplotlib.colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    return _LUT[np.clip(np.round(cam * 255), 0, 255).astype(np.uint8)]


def _resize_float(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    height, width = size
    if cam.shape == (height, width):
        return cam
    return np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((width, height),
                                                                                Image.Resampling.BILINEAR))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def heatmap_pngs(cam: np.ndarray, image: np.ndarray, size: Sequence[int], alpha: float = 0.45
                 ) -> tuple[bytes, bytes]:
    """``(overlay PNG, raw map PNG)`` at ``size = (H, W)`` (the input image's size).

    The overlay blends the colour-mapped map over ``image`` (the uint8 RGB the model saw, resized back to
    ``size``); the raw map is an 8-bit greyscale PNG of the ``[0, 1]`` map (0 -> 0, 1 -> 255).
    """
    from breakhis_ray.data.transforms import resize_uint8

    height, width = int(size[0]), int(size[1])
    cam = np.clip(_resize_float(np.asarray(cam, dtype=np.float32), (height, width)), 0.0, 1.0)
    rgb = resize_uint8(np.ascontiguousarray(image[..., :3]), (height, width)).astype(np.float32)
    overlay = (1.0 - alpha) * rgb + alpha * colorize(cam).astype(np.float32)
    raw = np.round(cam * 255).astype(np.uint8)
    return _png(np.clip(np.round(overlay), 0, 255).astype(np.uint8)), _png(raw)


def heatmap_names(path: str, method: str) -> tuple[str, str]:
    """``(<stem>-<hash>_<method>.png, <stem>-<hash>_<method>_raw.png)``: unique per input path."""
    base = posixpath.basename(str(path).replace("\\", "/"))
    stem = base.rsplit(".", 1)[0] if "." in base else base
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:80] or "image"
    tag = "gradcampp" if method == "gradcam++" else method
    name = f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_{tag}"
    return f"{name}.png", f"{name}_raw.png"
