"""U-Net training data (pairs, patient split, pseudo-labels, joint augmentation), Dice losses, the Ray Train
segmenter trainer end to end and ``segment-eval``, on a tiny synthetic BreakHis tree with ground-truth masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from breakhis_ray.config import (
    AugmentConfig,
    SegDataConfig,
    SegEvalConfig,
    SegSplitSection,
    SegTrainConfig,
    SynthConfig,
    load_config,
)
from breakhis_ray.data.augment import augment_pairs
from breakhis_ray.data.transforms import PreprocessSpec
from breakhis_ray.errors import ConfigError, DataError
from breakhis_ray.losses import DiceBCELoss, binary_focal_loss, dice_loss
from breakhis_ray.segmentation import create_segmenter
from breakhis_ray.segmentation.dataset import (
    LoadPairs,
    cap_rows,
    load_pair,
    mask_uri,
    pair_table,
    read_mask,
    resize_mask,
    split_patients,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 64  # training resolution (H = W), a multiple of 32


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> str:
    """6 patients (both classes), one 96x64 tile per magnification each: 24 images with masks."""
    from breakhis_ray.data.synthetic import generate_single_process

    out = str(tmp_path_factory.mktemp("segsynth"))
    generate_single_process(SynthConfig(out=out, patients=6, fraction=0.001, size=(96, 64), grid=False,
                                        folds_files=False))
    return out


def _data(tree: str, **kw) -> SegDataConfig:
    base = dict(root=tree, image_size=SIZE, decode_batch_size=4, decode_num_cpus=0.25,
                augment={"batch_size": 4, "num_cpus": 0.25})
    return SegDataConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------- losses (no Ray)
def test_dice_loss_and_dice_bce_properties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g) * 3
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(binary_focal_loss(logits, target, gamma=0.0), bce)
    assert binary_focal_loss(logits, target, gamma=2.0) < bce  # easy pixels down-weighted
    assert torch.allclose(DiceBCELoss(dice_weight=0.0)(logits, target), bce)
    perfect = (target * 2 - 1) * 30
    assert dice_loss(perfect, target) < 1e-3 < dice_loss(-perfect, target)
    assert dice_loss(torch.full((1, 1, 4, 4), -30.0), torch.zeros(1, 1, 4, 4)) < 1e-6  # empty vs empty
    assert dice_loss(logits, target, reduction="none").shape == (3,)
    leaf = logits.clone().requires_grad_(True)
    DiceBCELoss(gamma=2.0)(leaf, target).backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
    with pytest.raises(ConfigError):
        DiceBCELoss(dice_weight=0.0, bce_weight=0.0)
    with pytest.raises(ConfigError):
        DiceBCELoss(gamma=-1)


# --------------------------------------------------------------------------------------- data (no Ray)
def test_config_rejects_bad_segmentation_settings(tree):
    with pytest.raises(ConfigError, match="multiples of 32"):
        load_config(SegTrainConfig, values={"data.root": tree, "data.image_size": 50})
    with pytest.raises(ConfigError, match="random_resized_crop"):
        load_config(SegTrainConfig, values={"data.root": tree, "data.augment.random_resized_crop": True})
    with pytest.raises(ConfigError, match="mask_source"):
        load_config(SegTrainConfig, overrides=[f"data.root={tree}", "data.mask_source=otsu"])
    cfg = load_config(SegTrainConfig, REPO / "jobs" / "configs" / "train_segmenter_tiny.yaml", [f"data.root={tree}"])
    assert cfg.run.checkpoint_metric == "val_dice" and cfg.data.image_size[0] % 32 == 0


def test_split_is_patient_disjoint_deterministic_and_stratified(tree):
    rows = pair_table(_data(tree))
    train, val = rows[rows["split"] == "train"], rows[rows["split"] == "val"]
    assert len(train) and len(val) and len(train) + len(val) == 24
    assert not set(train["patient_id"]) & set(val["patient_id"])
    assert set(val["label"]) == {"benign", "malignant"}  # at least one val patient per class
    assert rows.equals(pair_table(_data(tree)))
    shuffled = rows.sample(frac=1.0, random_state=1)
    assert (split_patients(shuffled, SegSplitSection()).sort_index() == rows["split"]).all()
    other = pair_table(_data(tree, split={"seed": 7, "val_fraction": 0.5}))
    assert not set(other[other.split == "train"].patient_id) & set(other[other.split == "val"].patient_id)
    capped = pair_table(_data(tree, max_images=3))
    assert (capped["split"].value_counts() <= 3).all()
    assert set(capped["path"]) <= set(rows["path"])


def test_capped_images_do_not_depend_on_where_the_tree_lies():
    """The same tree under two roots keeps the same images (by name), spread over patients; another seed
    picks others."""
    import pandas as pd

    names = [f"SOB_B_A-14-{p}-40-{i:03d}.png" for p in ("111A", "222B", "333C") for i in range(1, 9)]
    patients = [n.split("-")[2] for n in names]

    def picked(root: str, seed: int = 0) -> list[str]:
        rows = pd.DataFrame({"path": [f"{root}/{n}" for n in names], "patient_id": patients})
        kept = cap_rows(rows, 6, seed)
        assert kept["patient_id"].value_counts().tolist() == [2, 2, 2]
        return [p.rsplit("/", 1)[1] for p in kept["path"]]

    assert picked("/data/a/synthetic") == picked("/elsewhere/clone/runs/demo/synthetic")
    assert any(picked("/data/a/synthetic", seed) != picked("/data/a/synthetic") for seed in (1, 2, 3))


def test_mask_paths_follow_the_synthetic_layout(tree):
    rows = pair_table(_data(tree))
    first = rows.iloc[0]
    rel = first["path"][len(tree) + 1:-len(".png")]
    assert first["mask_path"] == str(Path(tree, "masks", rel + "_nuclei.png"))
    assert Path(first["mask_path"]).is_file()
    assert mask_uri(first["path"], tree, "/elsewhere", "_m.png") == f"/elsewhere/{rel}_m.png"
    with pytest.raises(DataError, match="no mask"):
        pair_table(_data(tree, mask_suffix="_missing.png"))


def test_pairs_resize_image_bilinear_and_mask_nearest(tree):
    rows = pair_table(_data(tree))
    path, mpath = rows.iloc[0]["path"], rows.iloc[0]["mask_path"]
    spec = PreprocessSpec(size=(SIZE, SIZE))
    image, mask = load_pair(path, mpath, spec)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 1} and mask.any()
    full = read_mask(Path(mpath).read_bytes())
    assert full.shape == (64, 96) and np.array_equal(resize_mask(full, (SIZE, SIZE)), mask)


@pytest.mark.parametrize("method", ["threshold", "watershed"])
def test_pseudo_labels_equal_the_classical_segmenter(tree, method):
    from breakhis_ray.data.decode import decode_rgb as decode_image

    rows = pair_table(_data(tree, mask_source=method), masks=False)
    assert (rows["mask_path"] == "").all()
    batch = {"path": rows["path"].to_numpy()[:4], "mask_path": rows["mask_path"].to_numpy()[:4]}
    spec = PreprocessSpec(size=(SIZE, SIZE))
    out = LoadPairs(spec.to_dict(), method)(batch)
    seg = create_segmenter(method)
    for path, mask in zip(batch["path"], out["mask"]):
        expected = seg.segment(decode_image(Path(path).read_bytes())).masks[0]
        assert np.array_equal(mask, resize_mask(expected, (SIZE, SIZE)))


def test_joint_augmentation_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    masks = (images[..., 0] > 128).astype(np.uint8)
    geometric = AugmentConfig(hed_jitter=0.0, color_jitter=0.0)
    rngs = [np.random.default_rng([3, i]) for i in range(6)]
    out = augment_pairs({"image": images, "mask": masks, "key": np.arange(6)}, geometric, rngs)
    assert np.array_equal(out["mask"], (out["image"][..., 0] > 128).astype(np.uint8))
    assert not np.array_equal(out["image"], images)  # something moved
    assert np.array_equal(out["key"], np.arange(6))
    coloured = augment_pairs({"image": images, "mask": masks}, AugmentConfig(),
                             [np.random.default_rng([3, i]) for i in range(6)])
    assert np.array_equal(coloured["mask"], out["mask"])  # same draws: same geometry, jitter on image only
    assert not np.array_equal(coloured["image"], out["image"])


# ------------------------------------------------------------------------------------------- Ray tier
@pytest.mark.ray
def test_ray_datasets_hold_pairs(ray_session, tree):
    from breakhis_ray.segmentation.dataset import build_seg_datasets

    cfg = _data(tree)
    datasets = build_seg_datasets(cfg, PreprocessSpec(size=cfg.image_size))
    for split in ("train", "val"):
        batch = datasets[split].take_batch(100, batch_format="numpy")
        # augmented train rows also carry the epoch their draws were keyed by (the loop checks it)
        assert sorted(batch) == (["aug_epoch", "image", "mask"] if split == "train" else ["image", "mask"])
        n = int((datasets["rows"]["split"] == split).sum())
        assert batch["image"].shape == (n, SIZE, SIZE, 3) and batch["mask"].shape == (n, SIZE, SIZE)
        assert set(np.unique(batch["mask"])) == {0, 1}


@pytest.fixture(scope="module")
def trained(ray_session, tree, tmp_path_factory) -> dict:
    """3 epochs of a small U-Net through Ray Train (1 worker), no augmentation so the loss is comparable."""
    from breakhis_ray.train import run_train_segmenter

    runs = str(tmp_path_factory.mktemp("segruns"))
    cfg = load_config(SegTrainConfig, REPO / "jobs" / "configs" / "train_segmenter_tiny.yaml", [
        f"data.root={tree}", f"data.image_size={SIZE}", "data.augment.enabled=false", "data.max_images=null",
        "model.decoder_channels=[32,16,16,8,8]", "train.epochs=3", "train.lr=0.003", "train.batch_size=4",
        f"run.storage_path={runs}", "run.name=unet-test", "scaling.cpus_per_worker=1",
    ])
    return {"summary": run_train_segmenter(cfg), "cfg": cfg, "runs": runs}


@pytest.mark.ray
def test_unet_trains_through_ray_train_and_reloads(trained, tree):
    from breakhis_ray.checkpoint import load_model, read_meta
    from breakhis_ray.segmentation.unet import UNetSegmenter

    summary = trained["summary"]
    run_dir = Path(summary["run_dir"])
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(0.0 <= h["val_dice"] <= 1.0 and 0.0 <= h["val_iou"] <= h["val_dice"] + 1e-9 for h in history)
    assert json.loads((run_dir / "result.json").read_text())["metric"] == "val_dice"
    split = json.loads((run_dir / "split.json").read_text())
    assert not set(split["train"]["patients"]) & set(split["val"]["patients"])

    best = summary["best_checkpoint"]
    meta = read_meta(best)
    assert meta["model_args"]["name"] == "unet_resnet18" and meta["preprocessing"]["size"] == [SIZE, SIZE]
    model, _ = load_model(best)
    assert model(torch.zeros(1, 3, SIZE, SIZE)).shape == (1, 1, SIZE, SIZE)
    seg = UNetSegmenter.from_checkpoint(best)
    assert seg.input_size == (SIZE, SIZE)
    image = np.zeros((64, 96, 3), dtype=np.uint8) + 200
    assert seg.segment(image).masks.shape == (1, 64, 96)


@pytest.mark.ray
def test_segment_eval_compares_all_three_methods(trained, tree, tmp_path):
    from breakhis_ray.segmentation.evaluate import run_segment_eval, select_images

    out = tmp_path / "eval"
    split_file = trained["summary"]["split_file"]
    cfg = SegEvalConfig(root=tree, out=str(out), unet_checkpoint=trained["summary"]["best_checkpoint"],
                        split_file=split_file, overlay_images=2, num_cpus=0.5)
    summary = run_segment_eval(cfg)
    doc = json.loads((out / "segment_eval.json").read_text())
    val = json.loads(Path(split_file).read_text())["val"]
    assert doc["images"] == val["images"] == summary["images"]
    assert sorted(doc["methods"]) == ["threshold", "unet", "watershed"]
    for scores in doc["methods"].values():
        assert scores["n"] == doc["images"] and 0.0 <= scores["iou"] <= scores["dice"] <= 1.0
    # watershed only splits touching nuclei: the same foreground as thresholding
    assert doc["methods"]["watershed"]["dice"] == pytest.approx(doc["methods"]["threshold"]["dice"])
    assert (out / "overlays.png").stat().st_size > 0 and (out / "config.yaml").is_file()
    # the default split reproduces the training val images without the split file
    rows = select_images(SegEvalConfig(root=tree, out=str(tmp_path / "eval2")))
    assert rows["path"].tolist() == sorted(val["paths"])
