"""Checkpoints rebuild their model from the directory alone; damaged ones fail with one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from breakhis_ray.checkpoint import (
    clean_state_dict,
    load_config_dict,
    load_model,
    load_train_state,
    read_meta,
    save_checkpoint,
    unwrap_model,
)
from breakhis_ray.errors import StorageError
from breakhis_ray.models import create_model

PREP = {"size": [32, 32]}


def _trained_tiny(in_channels: int = 3):
    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=2, in_channels=in_channels, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(4, in_channels, 32, 32)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
    return model.eval(), opt


def test_round_trip_same_outputs(tmp_path):
    model, opt = _trained_tiny()
    config = {"model": {"name": "tiny_cnn"}, "train": {"lr": 0.001, "epochs": 2}}
    extra = {
        "epoch": 2,
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.default_rng(0).bit_generator.state["state"]["state"],
        "numpy_array": np.arange(3),
    }
    out = tmp_path / "ckpt"
    save_checkpoint(
        str(out), model, model_args=model.model_args, labels=["benign", "malignant"], preprocessing=PREP,
        config=config, extra_state=extra, metrics={"accuracy": np.float64(0.75)},
    )
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "meta.json", "model.pt", "train_state.pt"]

    loaded, meta = load_model(str(out))
    assert not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert meta["model_args"] == {"name": "tiny_cnn", "num_classes": 2, "in_channels": 3, "dropout": 0.0, "width": 8}
    assert meta["labels"] == ["benign", "malignant"]
    assert meta["preprocessing"] == {"size": [32, 32], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "scale": "unit"}
    assert meta["torch_version"] == torch.__version__ and meta["format_version"] == 1
    assert meta["metrics"] == {"accuracy": 0.75}
    assert yaml.safe_load((out / "config.yaml").read_text()) == config
    assert load_config_dict(str(out)) == config

    state = load_train_state(str(out))
    assert state["epoch"] == 2
    assert torch.equal(state["numpy_array"], torch.arange(3))
    opt2 = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == 2


def test_ddp_prefix_and_defaults_from_model(tmp_path):
    model, _ = _trained_tiny(in_channels=4)

    class Wrapper(torch.nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(model)
    assert unwrap_model(wrapped) is model
    assert all(k.startswith("module.") for k in wrapped.state_dict())
    assert not any(k.startswith("module.") for k in clean_state_dict(wrapped.state_dict()))
    save_checkpoint(str(tmp_path), wrapped, preprocessing={"size": (32, 48)})  # model_args from the model
    loaded, meta = load_model(str(tmp_path) + "/")
    assert meta["model_args"]["in_channels"] == 4 and meta["preprocessing"]["size"] == [32, 48]
    assert load_train_state(str(tmp_path)) is None and load_config_dict(str(tmp_path)) is None
    x = torch.randn(2, 4, 32, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))


def test_unet_round_trip(tmp_path):
    model = create_model("unet_resnet18", num_classes=1).eval()
    save_checkpoint(str(tmp_path), model, labels=["nuclei"], preprocessing={"size": [64, 64]})
    loaded, meta = load_model(str(tmp_path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x))
    assert meta["preprocessing"]["scale"] == "imagenet"


def test_save_requires_size_and_model_args(tmp_path):
    model, _ = _trained_tiny()
    with pytest.raises(ValueError, match="size"):
        save_checkpoint(str(tmp_path), model, preprocessing={})
    with pytest.raises(ValueError, match="model_args"):
        save_checkpoint(str(tmp_path), torch.nn.Linear(2, 2), preprocessing={"size": [8, 8], "mean": [0], "std": [1],
                                                                           "scale": "unit"})


@pytest.fixture
def saved(tmp_path):
    model, _ = _trained_tiny()
    save_checkpoint(str(tmp_path), model, preprocessing=PREP)
    return tmp_path


def _edit_meta(path, fn):
    meta = json.loads((path / "meta.json").read_text())
    fn(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def _one_line(exc_info, path):
    msg = str(exc_info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_checkpoint(tmp_path):
    with pytest.raises(StorageError, match="no checkpoint at") as exc:
        load_model(str(tmp_path / "absent"))
    _one_line(exc, tmp_path / "absent")


@pytest.mark.parametrize(
    "tamper,match",
    [
        (lambda m: m["model_args"].update(num_classes=3), "labels"),
        (lambda m: (m["model_args"].update(num_classes=3), m.update(labels=["a", "b", "c"])), "do not fit"),
        (lambda m: m["model_args"].update(width=16), "do not fit"),
        (lambda m: (m["model_args"].update(name="resnet18"), m["model_args"].pop("width")), "do not fit"),
        (lambda m: m["model_args"].update(name="alexnet"), "cannot be built"),
        (lambda m: m["model_args"].update(width="wide"), "cannot be built"),
        (lambda m: m["model_args"].pop("name"), "model_args must hold"),
        (lambda m: m.update(format_version=99), "format_version"),
        (lambda m: m.update(format="something-else"), "not a breakhis-ray-checkpoint"),
        (lambda m: m["preprocessing"].pop("size"), "preprocessing"),
        (lambda m: m["files"]["model.pt"].update(sha256="0" * 64), "sha256"),
    ],
)
def test_tampered_meta_raises_clearly(saved, tamper, match):
    _edit_meta(saved, tamper)
    with pytest.raises(StorageError, match=match) as exc:
        load_model(str(saved))
    _one_line(exc, saved)


def test_corrupt_files(saved):
    (saved / "meta.json").write_text("{not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        read_meta(str(saved))


def test_corrupt_or_missing_weights(saved):
    (saved / "model.pt").write_bytes(b"garbage")
    _edit_meta(saved, lambda m: m.pop("files"))
    with pytest.raises(StorageError, match="model.pt is corrupt") as exc:
        load_model(str(saved))
    _one_line(exc, saved)
    (saved / "model.pt").unlink()
    with pytest.raises(StorageError, match="model.pt not found"):
        load_model(str(saved))
