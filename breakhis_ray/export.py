"""``breakhis-ray export``: a classifier checkpoint as one TorchScript or ONNX file, served without this project.

Input contract (baked in, the same for both formats): ``image``, ``uint8`` ``(N, H, W, C)`` — RGB pixels in
``[0, 255]``, channels last, resized to the checkpoint's ``preprocessing.size`` ``(H, W)`` (this project resizes
with PIL's antialiased bilinear filter, run by torch's uint8 kernel: :func:`breakhis_ray.data.transforms.resize_uint8`);
``N`` is free. The module
scales and normalises exactly as :func:`breakhis_ray.data.transforms.normalize` does (``x / 255``, then
``(x - mean) / std`` for ``scale=imagenet``), so a server feeds decoded pixels and nothing else. Outputs:
``logits`` ``float32 (N, classes)`` and ``probabilities`` = ``softmax(logits / T)`` (``T`` the checkpoint's
calibration temperature, 1 without one), classes in the order of ``labels``.

Beside ``FILE`` the export writes ``FILE.config.yaml`` and ``FILE.versions.json`` (provenance) and ``FILE.json``: format, input and output names, shapes and dtypes, labels,
the checkpoint's preprocessing spec, temperature, the source checkpoint, the file's sha256 and the parity
check (largest absolute logit difference against the checkpoint run in torch, on random images, through
``torch.jit.load`` or onnxruntime). Checkpoints whose preprocessing cannot be baked into a tensor program
(stain normalisation, segmentation guidance) are refused with a one-line error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import nn

from breakhis_ray import storage
from breakhis_ray.artifacts import write_json, write_provenance_beside
from breakhis_ray.config import ExportConfig
from breakhis_ray.errors import BreakhisError, ConfigError

log = logging.getLogger(__name__)
EXPORT_FORMAT = "breakhis-ray-export"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")


class ExportedClassifier(nn.Module):
    """``uint8 (N, H, W, C)`` -> ``(logits, probabilities)`` with the checkpoint's normalisation inside."""

    def __init__(self, model: nn.Module, mean, std, channels: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        m = np.zeros(channels, dtype=np.float32)
        s = np.ones(channels, dtype=np.float32)
        m[:3], s[:3] = mean, std
        # (x / 255 - mean) / std == x * a + b: the same arithmetic as data.transforms.normalize
        self.register_buffer("a", torch.from_numpy((1.0 / (255.0 * s)).astype(np.float32)).view(1, channels, 1, 1))
        self.register_buffer("b", torch.from_numpy((-m / s).astype(np.float32)).view(1, channels, 1, 1))
        self.temperature = float(temperature)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(torch.float32) * self.a + self.b
        logits = self.model(x)
        return logits, torch.softmax(logits / self.temperature, dim=1)


def _check_exportable(uri: str, meta: dict) -> None:
    from breakhis_ray.checkpoint import load_config_dict

    prep = meta["preprocessing"]
    if prep.get("stain_normalization"):
        raise ConfigError(f"checkpoint {uri} uses stain_normalization={prep['stain_normalization']!r}, which "
                          "cannot be baked into an exported model: export a checkpoint trained without it")
    guidance = ((load_config_dict(uri) or {}).get("guidance") or {}).get("method", "none")
    if guidance not in (None, "none"):
        raise ConfigError(f"checkpoint {uri} is segmentation-guided (guidance.method={guidance!r}); its "
                          "nuclei masks come from a segmenter outside the model: export an unguided classifier")


def build_exportable(checkpoint: str) -> tuple[ExportedClassifier, dict]:
    """The checkpoint's model wrapped with its preprocessing (CPU, eval mode) and its ``meta.json``."""
    from breakhis_ray.checkpoint import load_model, temperature_of
    from breakhis_ray.data.transforms import PreprocessSpec

    uri = str(checkpoint).rstrip("/")
    model, meta = load_model(uri, map_location="cpu")
    if str(meta["model_args"]["name"]).startswith("unet_"):
        raise ConfigError(f"checkpoint {uri} holds a U-Net; export takes a classifier checkpoint")
    _check_exportable(uri, meta)
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    channels = int(meta["model_args"].get("in_channels", 3))
    wrapper = ExportedClassifier(model, spec.mean, spec.std, channels, temperature_of(meta)).eval()
    return wrapper, meta


def example_images(meta: dict, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` random uint8 images of the checkpoint's input shape."""
    height, width = (int(v) for v in meta["preprocessing"]["size"])
    channels = int(meta["model_args"].get("in_channels", 3))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, height, width, channels), dtype=torch.uint8, generator=generator)


# ----------------------------------------------------------------------------------------- writers
def _torchscript_bytes(wrapper: ExportedClassifier, example: torch.Tensor) -> bytes:
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    return buf.getvalue()


def _onnx_bytes(wrapper: ExportedClassifier, example: torch.Tensor, opset: int | None) -> bytes:
    try:
        import onnx  # noqa: F401  (the exporter needs it; say so in one line when it is missing)
    except ImportError:
        raise ConfigError("format=onnx needs the onnx package: pip install 'breakhis-ray[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        kwargs: dict[str, Any] = {"opset_version": opset} if opset else {}
        torch.onnx.export(wrapper, (example,), path, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
                          **kwargs)
        with open(path, "rb") as fh:
            return fh.read()


# ------------------------------------------------------------------------------------------ parity
def run_exported(fmt: str, data: bytes, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """``(logits, probabilities, runtime)`` of an exported file on uint8 NHWC ``images``: ``torch.jit.load``
    for TorchScript, onnxruntime for ONNX (without onnxruntime: ``onnx.checker`` only, and empty outputs)."""
    if fmt == "torchscript":
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        with torch.no_grad():
            logits, probs = module(torch.from_numpy(images))
        return logits.numpy(), probs.numpy(), "torch.jit"
    try:
        import onnxruntime
    except ImportError:
        import onnx

        onnx.checker.check_model(onnx.load_from_string(data))
        return np.empty((0,)), np.empty((0,)), "onnx.checker (onnxruntime not installed: outputs not compared)"
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    logits, probs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    return logits, probs, f"onnxruntime {onnxruntime.__version__}"


def parity(fmt: str, data: bytes, wrapper: ExportedClassifier, meta: dict, n: int) -> dict:
    """Largest absolute difference of the exported file's outputs from the checkpoint's (torch, eval mode)."""
    from breakhis_ray.data.transforms import PreprocessSpec, normalize

    images = example_images(meta, n, seed=1)
    with torch.no_grad():
        reference = wrapper.model(normalize(images, PreprocessSpec.from_dict(meta["preprocessing"]))).numpy()
    logits, probs, runtime = run_exported(fmt, data, images.numpy())
    if logits.size == 0:
        return {"runtime": runtime, "images": n, "max_abs_logit_diff": None, "max_abs_prob_diff": None}
    ref_probs = torch.softmax(torch.from_numpy(reference) / wrapper.temperature, dim=1).numpy()
    return {"runtime": runtime, "images": n, "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "max_abs_prob_diff": float(np.abs(probs - ref_probs).max())}


# ------------------------------------------------------------------------------------------- stage
def export_model(cfg: ExportConfig) -> dict:
    """Write ``cfg.out`` and ``cfg.out + ".json"``; return the sidecar record."""
    wrapper, meta = build_exportable(cfg.checkpoint)
    example = example_images(meta, 2)
    if cfg.format == "torchscript":
        data = _torchscript_bytes(wrapper, example)
    else:
        data = _onnx_bytes(wrapper, example, cfg.opset)
    height, width = (int(v) for v in meta["preprocessing"]["size"])
    channels = int(meta["model_args"].get("in_channels", 3))
    classes = len(meta["labels"])
    record: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "model_format": cfg.format,
        "file": cfg.out,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": ["N", height, width, channels],
                  "channels": "RGB" if channels == 3 else "RGB + mask (0..255)",
                  "resize": "to (H, W) = preprocessing.size, antialiased bilinear (PIL BILINEAR, or torch "
                            "interpolate with antialias=True), before calling the model",
                  "normalisation": "inside the model: x / 255, then (x - mean) / std per RGB channel"},
        "outputs": {"logits": {"dtype": "float32", "shape": ["N", classes]},
                    "probabilities": {"dtype": "float32", "shape": ["N", classes],
                                      "meaning": "softmax(logits / temperature)"}},
        "labels": list(meta["labels"]),
        "preprocessing": meta["preprocessing"],
        "temperature": wrapper.temperature,
        "model_args": meta["model_args"],
        "checkpoint": cfg.checkpoint,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if cfg.verify:
        check = parity(cfg.format, data, wrapper, meta, cfg.verify_images)
        check["atol"] = cfg.atol
        record["parity"] = check
        diff = check["max_abs_logit_diff"]
        if diff is not None and not diff <= cfg.atol:
            raise BreakhisError(f"exported {cfg.format} model differs from checkpoint {cfg.checkpoint} by {diff:.3g} "
                                f"(> atol {cfg.atol}) on {cfg.verify_images} random images; nothing written")
    storage.write_bytes(cfg.out, data)
    write_json(f"{cfg.out}.json", record)
    write_provenance_beside(cfg.out, cfg)
    check = record.get("parity") or {}
    log.info("export: %s (%s, %.1f MB, input uint8 NHWC %dx%dx%d) -> %s; parity: %s max |logit diff| = %s",
             cfg.checkpoint, cfg.format, len(data) / 2**20, height, width, channels, cfg.out,
             check.get("runtime", "not checked"), check.get("max_abs_logit_diff"))
    return record


def run_export(cfg: ExportConfig) -> dict:
    """CLI stage (``breakhis-ray export``)."""
    return export_model(cfg)


def read_sidecar(uri: str) -> dict:
    """The ``FILE.json`` an export wrote beside ``FILE``."""
    return json.loads(storage.read_text(f"{uri}.json"))
