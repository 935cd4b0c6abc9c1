"""Segmentation-guided classification: nuclei masks as a 4th channel or as emphasis, in Ray Data and in
plain numpy (inference), read back from a classifier checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from breakhis_ray.config import GuidanceConfig, load_config
from breakhis_ray.data.transforms import PreprocessSpec
from breakhis_ray.errors import ConfigError
from breakhis_ray.segmentation import create_segmenter
from breakhis_ray.segmentation.guided import (
    GuidanceStage,
    apply_guidance,
    check_in_channels,
    emphasise,
    load_guidance,
    stage_for_checkpoint,
)

SIZE = 64
SPEC = PreprocessSpec(size=(SIZE, SIZE), scale="unit")


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    """Six H&E-like tiles with dark nuclei (Beer-Lambert, Macenko stain vectors) on pink stroma."""
    h = np.array([0.5626, 0.7201, 0.4062])
    e = np.array([0.2159, 0.8012, 0.5581])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(6):
        nuclei = np.zeros((SIZE, SIZE), dtype=bool)
        for cy, cx in rng.uniform(8, SIZE - 8, size=(6, 2)):
            nuclei |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        od = np.where(nuclei, 1.2, 0.03)[..., None] * h + np.where(nuclei, 0.15, 0.5)[..., None] * e
        out.append(np.clip(np.round(255 * np.exp(-od) + rng.normal(0, 2, od.shape)), 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory) -> str:
    """A random-weight U-Net saved as train-segmenter saves one."""
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.models import create_model

    torch.manual_seed(0)
    model = create_model("unet_resnet18", num_classes=1, decoder_channels=[32, 16, 16, 8, 8])
    path = str(tmp_path_factory.mktemp("guided") / "unet")
    save_checkpoint(path, model, labels=["nucleus"], preprocessing={"size": [SIZE, SIZE], "scale": "imagenet"})
    return path


# ---------------------------------------------------------------------------------------- no Ray
def test_config_and_channel_checks():
    assert GuidanceConfig().in_channels == 3
    assert GuidanceConfig(method="threshold").in_channels == 4
    assert GuidanceConfig(method="watershed", mode="emphasis").in_channels == 3
    with pytest.raises(ConfigError, match="unet_checkpoint"):
        load_config(GuidanceConfig, values={"method": "unet"})
    with pytest.raises(ConfigError, match="only used with method=unet"):
        load_config(GuidanceConfig, values={"method": "threshold", "unet_checkpoint": "/x"})
    check_in_channels(GuidanceConfig(method="threshold"), 4)
    with pytest.raises(ConfigError, match="in_channels=4"):
        check_in_channels({"method": "threshold"}, 3)
    with pytest.raises(ConfigError, match="in_channels=3"):
        check_in_channels(None, 4)


def test_emphasis_keeps_nuclei_and_fades_the_rest():
    images = np.full((1, 4, 4, 3), 100, dtype=np.uint8)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :2] = True
    out = emphasise(images, masks, 0.5)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert (out[0, :2] == 100).all() and (out[0, 2:] == 178).all()  # 100 + 0.5 * (255 - 100)
    assert (emphasise(images, masks, 1.0)[0, 2:] == 255).all()


def test_stage_matches_the_segmenter(tiles):
    stage = GuidanceStage(GuidanceConfig(method="threshold"), size=(SIZE, SIZE))
    out = stage.transform(tiles)
    expected = create_segmenter("threshold").segment(tiles).masks
    assert expected.any()
    assert np.array_equal(out["image"], tiles) and np.array_equal(out["mask"], expected.astype(np.uint8) * 255)
    emph = GuidanceStage({"method": "threshold", "mode": "emphasis", "emphasis_strength": 0.6})(
        {"image": tiles, "label": np.arange(6)})
    assert sorted(emph) == ["image", "label"]
    assert np.array_equal(emph["image"][expected], tiles[expected])
    assert (emph["image"][~expected] >= tiles[~expected]).all()


def test_guidance_travels_with_the_classifier_checkpoint(tmp_path, tiles, unet_checkpoint):
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.models import create_model

    guidance = GuidanceConfig(method="unet", unet_checkpoint=unet_checkpoint, mode="channel")
    model = create_model("tiny_cnn", num_classes=2, in_channels=4)
    ckpt = str(tmp_path / "clf")
    save_checkpoint(ckpt, model, preprocessing=SPEC.to_dict(),
                    config={"model": {"name": "tiny_cnn", "in_channels": 4}, "guidance": guidance.model_dump()})
    assert load_guidance(ckpt) == guidance
    stage = stage_for_checkpoint(ckpt, device="cpu")
    direct = GuidanceStage(guidance, device="cpu")
    assert np.array_equal(stage.transform(tiles)["mask"], direct.transform(tiles)["mask"])
    plain = str(tmp_path / "plain")
    save_checkpoint(plain, create_model("tiny_cnn", num_classes=2), preprocessing=SPEC.to_dict(),
                    config={"model": {"name": "tiny_cnn"}})
    assert load_guidance(plain).method == "none" and stage_for_checkpoint(plain) is None
    assert yaml.safe_load((tmp_path / "clf" / "config.yaml").read_text())["guidance"]["method"] == "unet"


# ------------------------------------------------------------------------------------------- Ray tier
def _dataset(tiles):
    import ray.data

    return ray.data.from_items([{"image": t, "label": i % 2} for i, t in enumerate(tiles)])


def _one_step(x: torch.Tensor, y: torch.Tensor, in_channels: int) -> float:
    from breakhis_ray.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=2, in_channels=in_channels)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    optimiser.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return float(loss.detach())


@pytest.mark.ray
def test_channel_guidance_feeds_a_four_channel_classifier(ray_session, tiles):
    from breakhis_ray.data.pipeline import iter_train_batches

    guidance = GuidanceConfig(method="threshold", mode="channel")
    ds = apply_guidance(_dataset(tiles), guidance, SPEC).materialize()
    x, y = next(iter(iter_train_batches(ds, 6, "cpu", SPEC, in_channels=guidance.in_channels)))
    assert x.shape == (6, 4, SIZE, SIZE) and x.dtype == torch.float32
    rows = ds.take_batch(6, batch_format="numpy")
    expected = create_segmenter("threshold").segment(np.stack(rows["image"])).masks
    assert np.array_equal(rows["mask"] > 0, expected)
    assert set(torch.unique(x[:, 3]).tolist()) == {0.0, 1.0}
    assert np.isfinite(_one_step(x, y, in_channels=4))
    assert apply_guidance(ds, None, SPEC) is ds  # method none: the dataset unchanged


@pytest.mark.ray
def test_unet_guidance_runs_in_actors_and_matches_inference(ray_session, tiles, unet_checkpoint):
    from breakhis_ray.data.pipeline import iter_train_batches

    guidance = GuidanceConfig(method="unet", unet_checkpoint=unet_checkpoint, mode="emphasis", num_cpus=0.5,
                              batch_size=4, device="cpu")
    ds = apply_guidance(_dataset(tiles), guidance, SPEC)
    rows = ds.take_batch(6, batch_format="numpy")
    local = GuidanceStage(guidance)({"image": tiles, "label": np.arange(6) % 2})
    assert sorted(rows) == ["image", "label"]
    # compare as sets of tiles: Ray Data row order is not part of the contract
    assert {img.tobytes() for img in rows["image"]} == {img.tobytes() for img in local["image"]}
    x, y = next(iter(iter_train_batches(ds, 6, "cpu", SPEC, in_channels=3)))
    assert x.shape == (6, 3, SIZE, SIZE)
    assert np.isfinite(_one_step(x, y, in_channels=3))
