"""``breakhis-ray export``: TorchScript and ONNX files whose outputs equal the checkpoint's, with the uint8 NHWC
input contract (normalisation inside) written beside them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from breakhis_ray.errors import ConfigError


def _checkpoint(root, name: str, size, **prep):
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=2, **({"width": 4} if name == "tiny_cnn" else {}))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode differs from train mode
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(str(root / name), model, preprocessing={"size": list(size), **prep})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("export")
    return {"tiny_cnn": _checkpoint(root, "tiny_cnn", (40, 56)), "resnet18": _checkpoint(root, "resnet18", (64, 64))}


def _reference(checkpoint: str, images: np.ndarray) -> np.ndarray:
    """The checkpoint's logits through this project's own preprocessing (Predictor's path)."""
    from breakhis_ray.checkpoint import load_model
    from breakhis_ray.data.transforms import PreprocessSpec, normalize

    model, meta = load_model(checkpoint)
    with torch.no_grad():
        return model(torch.from_numpy(normalize(images, PreprocessSpec.from_dict(meta["preprocessing"])))).numpy()


def _images(n: int, h: int, w: int, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name,size", [("tiny_cnn", (40, 56)), ("resnet18", (64, 64))])
def test_torchscript_outputs_equal_the_checkpoints(checkpoints, tmp_path, name, size):
    from breakhis_ray.cli import main

    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", checkpoints[name], "--format", "torchscript", "--out", str(out)]) == 0
    module = torch.jit.load(str(out))
    images = _images(5, *size)  # another batch size than the one traced
    with torch.no_grad():
        logits, probs = module(torch.from_numpy(images))
    reference = _reference(checkpoints[name], images)
    np.testing.assert_allclose(logits.numpy(), reference, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(probs.numpy(), torch.softmax(torch.from_numpy(reference), 1).numpy(), atol=1e-5)
    sidecar = json.loads((tmp_path / "model.pt.json").read_text())
    assert sidecar["input"]["dtype"] == "uint8" and sidecar["input"]["layout"] == "NHWC"
    assert sidecar["input"]["shape"] == ["N", size[0], size[1], 3]
    assert sidecar["labels"] == ["benign", "malignant"]
    assert sidecar["preprocessing"]["scale"] == ("unit" if name == "tiny_cnn" else "imagenet")
    assert sidecar["parity"]["runtime"] == "torch.jit" and sidecar["parity"]["max_abs_logit_diff"] <= 1e-4
    assert (tmp_path / "model.pt.config.yaml").is_file()


def test_onnx_outputs_equal_the_checkpoints_in_onnxruntime(checkpoints, tmp_path):
    import onnxruntime

    from breakhis_ray.cli import main

    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", checkpoints["tiny_cnn"], "--format", "onnx", "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    images = _images(3, 40, 56)  # the batch dimension is dynamic
    logits, probs = session.run(None, {"image": images})
    np.testing.assert_allclose(logits, _reference(checkpoints["tiny_cnn"], images), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["parity"]["runtime"].startswith("onnxruntime")
    assert not list(tmp_path.glob("*.data"))  # one self-contained file


def test_checkpoints_whose_preprocessing_cannot_be_baked_are_refused(tmp_path):
    from breakhis_ray.config import ExportConfig
    from breakhis_ray.export import export_model

    ckpt = _checkpoint(tmp_path, "tiny_cnn", (32, 32), stain_normalization="macenko")
    with pytest.raises(ConfigError, match="stain_normalization='macenko'"):
        export_model(ExportConfig(checkpoint=ckpt, format="torchscript", out=str(tmp_path / "m.pt")))
    assert not (tmp_path / "m.pt").exists()


def test_export_config_rejects_an_unknown_format(capsys):
    from breakhis_ray.cli import main

    assert main(["export", "checkpoint=x", "format=tflite", "out=y"]) == 2
    assert "format" in capsys.readouterr().err
