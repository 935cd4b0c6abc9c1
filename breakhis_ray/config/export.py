"""Config of model export (``breakhis-ray export``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from breakhis_ray.config.base import StrictModel


class ExportConfig(StrictModel):
    """``breakhis-ray export --checkpoint CKPT --format torchscript|onnx --out FILE``.

    The exported module takes ``uint8`` images ``(N, H, W, C)`` (RGB, resized to the checkpoint's size) and does
    the checkpoint's normalisation itself; it returns ``(logits, probabilities)``. The preprocessing spec and the
    parity check are written beside ``out`` as ``<out>.json`` (see :mod:`breakhis_ray.export`).
    """

    checkpoint: str = Field(description="classifier checkpoint directory (local or s3://)")
    format: Literal["torchscript", "onnx"] = Field(description="torchscript (torch.jit.trace) or onnx")
    out: str = Field(description="output file (local or s3://), e.g. model.pt or model.onnx")
    opset: int | None = Field(default=None, ge=17, description="ONNX opset (null: the exporter's default)")
    verify: bool = Field(default=True, description="run the exported file on random images and compare its "
                         "outputs with the checkpoint's (onnxruntime for ONNX); fail above atol")
    verify_images: int = Field(default=4, ge=1, description="images in the parity check")
    atol: float = Field(default=1e-4, gt=0.0, description="largest absolute logit difference accepted")
