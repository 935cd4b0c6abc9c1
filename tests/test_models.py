"""Model registry, transfer-learning helpers and pretrained-weight loading (random weights, tiny inputs)."""

from __future__ import annotations

import io

import pytest
import torch

from breakhis_ray.errors import ConfigError, StorageError
from breakhis_ray.models import (
    CLASSIFIER_NAMES,
    create_model,
    create_unet,
    feature_parameters,
    head_parameters,
    list_models,
    load_pretrained,
    preprocessing_for,
    set_backbone_trainable,
    split_backbone_head,
    torchvision_weight_file,
)

TORCHVISION_FILES = {
    "vgg16": "vgg16-397923af.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "densenet121": "densenet121-a639ec97.pth",
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    return ckpt


def _backward(model, x):
    model.train()
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.float().pow(2).mean().backward()
    return out


@pytest.mark.parametrize("name", CLASSIFIER_NAMES)
def test_classifier_shapes_gradients_and_freezing(name):
    model = create_model(name, num_classes=2)
    x = torch.randn(2, 3, 32, 32)
    out = _backward(model, x)
    assert out.shape == (2, 2)
    assert torch.isfinite(out).all()
    named = list(model.named_parameters())
    no_grad = [n for n, p in named if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"

    backbone, head = split_backbone_head(model)
    assert backbone and head
    assert len(backbone) + len(head) == len(named)
    assert {id(p) for p in backbone}.isdisjoint({id(p) for p in head})

    set_backbone_trainable(model, False)
    _backward(model, x)
    assert all(not p.requires_grad and p.grad is None for p in feature_parameters(model))
    assert all(p.requires_grad and p.grad is not None for p in head_parameters(model))
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())

    assert model.model_args["name"] == name
    assert model.model_args["num_classes"] == 2 and model.model_args["in_channels"] == 3
    rebuilt = create_model(**model.model_args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert model.preprocessing == preprocessing_for(name)


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "densenet121", "tiny_cnn"])
def test_four_channel_input(name):
    model = create_model(name, num_classes=2, in_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 32, 32))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
    assert model.model_args["in_channels"] == 4


def test_vgg_adjusted_head_and_options():
    model = create_model("vgg16", num_classes=3, dropout=0.3, hidden=64)
    linear = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(512, 64), (64, 3)]
    assert model.classifier[2].p == 0.3
    assert isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d)
    default = create_model("vgg16_bn")
    assert [m.out_features for m in default.classifier if isinstance(m, torch.nn.Linear)] == [256, 2]
    assert model.model_args == {"name": "vgg16", "num_classes": 3, "in_channels": 3, "dropout": 0.3, "hidden": 64}


def test_resnet_dropout_head():
    model = create_model("resnet18", dropout=0.2)
    assert isinstance(model.fc[0], torch.nn.Dropout) and model.fc[1].out_features == 2


def test_unknown_name_and_option_list_valid_choices():
    with pytest.raises(ConfigError, match="vgg16.*resnet50.*tiny_cnn.*unet_resnet18"):
        create_model("alexnet")
    with pytest.raises(ConfigError, match="does not take option 'depth'.*dropout"):
        create_model("resnet18", depth=3)
    with pytest.raises(ConfigError):
        create_model("vgg16", dropout=1.5)
    with pytest.raises(ConfigError, match="valid"):
        create_unet("mobilenet_v9")
    assert "unet_densenet121" in list_models()


def test_preprocessing_for():
    p = preprocessing_for("resnet50")
    assert p == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": "imagenet"}
    assert preprocessing_for("unet_resnet18")["scale"] == "imagenet"
    assert preprocessing_for("tiny_cnn")["scale"] == "unit"
    with pytest.raises(ConfigError):
        preprocessing_for("nope")


def test_unet_shapes_and_freezing():
    model = create_model("unet_resnet18", num_classes=1)
    x = torch.randn(2, 3, 64, 64)
    out = _backward(model, x)
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    set_backbone_trainable(model, False)
    _backward(model, x)
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("encoder."))
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("encoder."))
    assert model.model_args == {"name": "unet_resnet18", "num_classes": 1, "in_channels": 3}

    four = create_unet("resnet18", classes=2, in_channels=4).eval()
    with torch.no_grad():
        assert four(torch.randn(2, 4, 32, 32)).shape == (2, 2, 32, 32)


def test_torchvision_file_names_come_from_torchvision():
    for arch, fname in TORCHVISION_FILES.items():
        assert torchvision_weight_file(arch) == fname


# ---------------------------------------------------------------------------------- weight loading
def _torchvision_resnet18_state():
    import torchvision

    return torchvision.models.resnet18(weights=None).state_dict()


def test_load_torchvision_named_file_skips_head(torch_home):
    src = _torchvision_resnet18_state()
    torch.save(src, torch_home / "resnet18-f37072fd.pth")
    model = create_model("resnet18", num_classes=2, weights="torchvision")
    report = model.weights_report
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]
    assert not report.unexpected and not report.adapted
    assert sorted(report.missing) == ["fc.bias", "fc.weight"]
    state = model.state_dict()
    for key, value in src.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    assert "skipped 2 head tensors" in report.summary()


def test_four_channel_pretrained_uses_rgb_mean(torch_home):
    src = _torchvision_resnet18_state()
    torch.save(src, torch_home / "resnet18-f37072fd.pth")
    model = create_model("resnet18", in_channels=4, weights="torchvision")
    w = model.conv1.weight
    assert w.shape[1] == 4
    assert torch.equal(w[:, :3], src["conv1.weight"])
    assert torch.allclose(w[:, 3], src["conv1.weight"].mean(dim=1))
    assert model.weights_report.adapted == ["conv1.weight"]


def test_vgg_head_mismatch_reported_and_prefixes_stripped(tmp_path):
    donor = create_model("vgg16")
    src = {f"module.{k}": v for k, v in donor.state_dict().items() if k.startswith("features.")}
    src["module.classifier.0.weight"] = torch.zeros(40, 70)  # torchvision's 4096x25088, shrunk
    src["module.classifier.6.weight"] = torch.zeros(10, 40)
    path = tmp_path / "vgg.pth"
    torch.save({"state_dict": src}, path)
    model = create_model("vgg16", weights=str(path))
    report = model.weights_report
    assert report.skipped == ["classifier.0.weight"]
    assert report.unexpected == ["classifier.6.weight"]
    assert torch.equal(model.features[0].weight, donor.features[0].weight)


def test_densenet_legacy_keys(tmp_path):
    donor = create_model("densenet121")
    legacy = {}
    for key, value in donor.state_dict().items():
        if key.startswith("classifier."):
            continue
        for part in ("norm1", "norm2", "conv1", "conv2", "relu1", "relu2"):
            if ".denselayer" in key and f".{part}." in key:
                key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
        legacy[key] = value
    assert any(".norm.1." in k for k in legacy)
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(legacy, path)
    model = create_model("densenet121", weights=f"file://{path}")
    for key, value in donor.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(model.state_dict()[key], value), key


def test_missing_weight_files_name_the_expected_path(torch_home, tmp_path):
    with pytest.raises(StorageError, match=r"vgg16-397923af\.pth.*hub/checkpoints.*model\.weights=PATH"):
        create_model("vgg16", weights="torchvision")
    with pytest.raises(StorageError, match="nope.pth"):
        create_model("tiny_cnn", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="torchvision"):
        create_model("tiny_cnn", weights="torchvision")
    assert create_model("tiny_cnn", weights="none").weights_report is None


def test_wrong_architecture_raises(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(_torchvision_resnet18_state(), path)
    with pytest.raises(ConfigError, match="backbone tensors missing.*wrong architecture"):
        create_model("resnet34", weights=str(path))
    with pytest.raises(ConfigError, match="no tensor .* matches"):
        create_model("tiny_cnn", weights=str(path))
    tiny = tmp_path / "tiny.pth"
    torch.save(create_model("tiny_cnn", width=8).state_dict(), tiny)
    with pytest.raises(ConfigError, match="other shapes"):
        create_model("tiny_cnn", width=16, weights=str(tiny))


def test_corrupt_or_pickled_file_is_a_storage_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(StorageError, match="cannot load weights"):
        create_model("tiny_cnn", weights=str(bad))
    pickled = tmp_path / "module.pth"
    torch.save(create_model("tiny_cnn"), pickled)  # a whole module: refused by weights_only=True
    with pytest.raises(StorageError, match="cannot load weights"):
        create_model("tiny_cnn", weights=str(pickled))


def test_s3_specs_are_read_through_storage(monkeypatch):
    from breakhis_ray import storage

    donor = create_model("tiny_cnn")
    buf = io.BytesIO()
    torch.save(donor.state_dict(), buf)
    calls = []

    def fake_read_bytes(uri):
        calls.append(uri)
        return buf.getvalue()

    monkeypatch.setattr(storage, "read_bytes", fake_read_bytes)
    model = create_model("tiny_cnn")
    report = load_pretrained(model, "s3://bucket/weights/tiny.pth")
    assert calls == ["s3://bucket/weights/tiny.pth"]
    assert report.source == "s3://bucket/weights/tiny.pth"
    assert torch.equal(model.features[0].weight, donor.features[0].weight)


def test_unet_encoder_weights_from_file(torch_home):
    src = _torchvision_resnet18_state()
    torch.save(src, torch_home / "resnet18-f37072fd.pth")
    model = create_model("unet_resnet18", num_classes=1, weights="torchvision", in_channels=4)
    assert sorted(model.weights_report.unexpected) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.encoder.layer1[0].conv1.weight, src["layer1.0.conv1.weight"])
    assert torch.equal(model.encoder.conv1.weight[:, :3], src["conv1.weight"])
    direct = create_unet("resnet18", encoder_weights_path=str(torch_home / "resnet18-f37072fd.pth"))
    assert torch.equal(direct.encoder.conv1.weight, src["conv1.weight"])
