"""Segmentation: classical methods on synthetic H&E discs with known nuclei, U-Net, metrics, overlays."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from breakhis_ray.errors import ConfigError, DataError
from breakhis_ray.segmentation import create_segmenter, segmenter_class
from breakhis_ray.segmentation.features import FEATURE_KEYS, hematoxylin_density, nuclear_features
from breakhis_ray.segmentation.metrics import dice, iou, mean_dice_iou
from breakhis_ray.segmentation.overlay import draw_overlay, save_overlay_grid

H_VEC = np.array([0.5626, 0.7201, 0.4062])
E_VEC = np.array([0.2159, 0.8012, 0.5581])
H_VEC, E_VEC = H_VEC / np.linalg.norm(H_VEC), E_VEC / np.linalg.norm(E_VEC)


# ------------------------------------------------------------------------------ synthetic tiles
def render(h_od: np.ndarray, e_od: np.ndarray, rng: np.random.Generator, noise: float = 3.0) -> np.ndarray:
    """Beer-Lambert H&E: ``I = 255 exp(-(cH h + cE e))`` plus a little sensor noise."""
    od = h_od[..., None] * H_VEC + e_od[..., None] * E_VEC
    rgb = 255.0 * np.exp(-od) + rng.normal(0.0, noise, od.shape)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def disc_tile(size: int, centres, radius: float, rng: np.random.Generator):
    """Pink stroma with dark-purple nuclei (discs) at ``centres``; returns (rgb, truth instance labels)."""
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((size, size), dtype=np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        truth[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & (truth == 0)] = i
    nuclei = truth > 0
    e_od = 0.5 + 0.1 * np.sin(xx / 9.0) * np.cos(yy / 13.0)  # uneven eosin stroma (E-OD 0.4-0.6)
    h_od = np.where(nuclei, rng.uniform(1.0, 1.4), 0.03)
    e_od = np.where(nuclei, 0.15, e_od)
    return render(h_od, e_od, rng), truth


def random_centres(n: int, size: int, radius: float, rng: np.random.Generator, gap: float = 5.0):
    """``n`` non-touching disc centres at least ``2 radius + gap`` apart, away from the border."""
    centres: list[tuple[float, float]] = []
    while len(centres) < n:
        c = rng.uniform(radius + 2, size - radius - 2, size=2)
        if all(np.hypot(*(c - np.array(o))) >= 2 * radius + gap for o in centres):
            centres.append((float(c[0]), float(c[1])))
    return centres


N_DISCS, SIZE, RADIUS = 8, 128, 6.0


@pytest.fixture(scope="module")
def disc_batch():
    rng = np.random.default_rng(0)
    pairs = [disc_tile(SIZE, random_centres(N_DISCS, SIZE, RADIUS, rng), RADIUS, rng) for _ in range(2)]
    tiles, truths = zip(*pairs)
    return np.stack(tiles), np.stack(truths)


@pytest.fixture(scope="module")
def touching_pair():
    """Two overlapping discs (centres 14 px apart, radius 9): one blob to a threshold, two nuclei in truth."""
    return disc_tile(64, [(32, 25), (32, 39)], 9.0, np.random.default_rng(1))


# ----------------------------------------------------------------------------- classical methods
@pytest.mark.parametrize("method", ["threshold", "watershed"])
def test_classical_methods_find_known_discs(method, disc_batch):
    images, truths = disc_batch
    result = create_segmenter(method).segment(images)
    assert result.masks.shape == images.shape[:3] and result.masks.dtype == bool
    assert result.labels.shape == images.shape[:3] and result.labels.dtype == np.int32
    assert np.array_equal(result.labels > 0, result.masks)
    assert len(result.features) == len(images)
    for feats, mask, truth in zip(result.features, result.masks, truths):
        assert tuple(sorted(feats)) == tuple(sorted(FEATURE_KEYS))
        # discs are separated by >= 5 px, so each should be found once; +-20% leaves room for noise
        assert abs(feats["nuclei_count"] - N_DISCS) <= 0.2 * N_DISCS
        true_fraction = float((truth > 0).mean())
        assert feats["nuclear_area_fraction"] == pytest.approx(true_fraction, rel=0.25)
        assert feats["mean_nuclear_area_px"] == pytest.approx(np.pi * RADIUS**2, rel=0.25)
        assert 0.8 < feats["mean_hematoxylin"] < 1.6  # rendered with H-OD 1.0-1.4
        assert dice(mask, truth) > 0.85


@pytest.mark.parametrize("method", ["threshold", "watershed"])
def test_tile_without_nuclei_is_empty(method):
    rng = np.random.default_rng(2)
    image, _ = disc_tile(64, [], 5.0, rng)
    result = create_segmenter(method).segment(image)  # a single HxWx3 image becomes a batch of one
    assert result.masks.shape == (1, 64, 64)
    assert not result.masks.any()
    assert result.features[0] == {key: 0 for key in FEATURE_KEYS}


def test_watershed_splits_touching_discs_that_threshold_merges(touching_pair):
    image, truth = touching_pair
    thr = create_segmenter("threshold").segment(image[None])
    ws = create_segmenter("watershed", min_distance=5).segment(image[None])
    assert thr.features[0]["nuclei_count"] == 1
    assert ws.features[0]["nuclei_count"] == 2
    assert np.array_equal(thr.masks, ws.masks)  # same foreground, different instances
    # each watershed instance lies mostly within one true disc
    for lab in (1, 2):
        overlap = np.bincount(truth[ws.labels[0] == lab], minlength=3)[1:]
        assert overlap.max() / overlap.sum() > 0.9


def test_segmenters_reject_bad_input():
    seg = create_segmenter("threshold")
    with pytest.raises(DataError, match="uint8"):
        seg.segment(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(DataError, match="RGB"):
        seg.segment(np.zeros((1, 8, 8), dtype=np.uint8))


# ------------------------------------------------------------------------------------- features
def test_hematoxylin_density_separates_the_stains():
    rng = np.random.default_rng(3)
    ones, zeros = np.ones((4, 4)), np.zeros((4, 4))
    pure_h = hematoxylin_density(render(ones, zeros, rng, noise=0.0))
    pure_e = hematoxylin_density(render(zeros, ones, rng, noise=0.0))
    assert pure_h.dtype == np.float32 and pure_h.shape == (4, 4)
    assert np.allclose(pure_h, 1.0, atol=0.02)
    assert np.allclose(pure_e, 0.0, atol=0.02)


def test_nuclear_features_by_hand():
    labels = np.zeros((6, 6), dtype=np.int32)
    labels[0:2, 0:2] = 3  # area 4, ids need not be consecutive
    labels[3:6, 3:6] = 7  # area 9
    hema = np.where(labels > 0, 2.0, 0.1)
    hema[0, 0] = 1.0
    feats = nuclear_features(labels, hema)
    assert feats["nuclei_count"] == 2
    assert feats["nuclear_area_fraction"] == pytest.approx(13 / 36)
    assert feats["mean_nuclear_area_px"] == pytest.approx(6.5)
    assert feats["std_nuclear_area_px"] == pytest.approx(2.5)
    assert feats["mean_hematoxylin"] == pytest.approx((12 * 2.0 + 1.0) / 13)
    assert nuclear_features(np.zeros((3, 3), int), np.ones((3, 3)))["mean_hematoxylin"] == 0.0


# -------------------------------------------------------------------------------------- metrics
def test_dice_iou_hand_made_cases():
    a = np.array([[1, 1, 0, 0]], dtype=bool)
    b = np.array([[0, 1, 1, 0]], dtype=bool)
    assert dice(a, b) == pytest.approx(0.5)  # 2*1 / (2+2)
    assert iou(a, b) == pytest.approx(1 / 3)  # 1 / 3
    assert dice(a, a) == iou(a, a) == 1.0
    assert dice(a, ~a) == iou(a, ~a) == 0.0
    empty = np.zeros((3, 3), dtype=bool)
    assert dice(empty, empty) == iou(empty, empty) == 1.0
    assert dice(empty, np.eye(3)) == iou(empty, np.eye(3)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((2, 2)))


def test_dice_iou_match_formula_on_random_masks():
    rng = np.random.default_rng(4)
    preds, truths = rng.random((5, 16, 16)) > 0.5, rng.random((5, 16, 16)) > 0.6
    for p, t in zip(preds, truths):
        inter, p_sum, t_sum = (p & t).sum(), p.sum(), t.sum()
        assert dice(p, t) == pytest.approx(2 * inter / (p_sum + t_sum))
        assert iou(p, t) == pytest.approx(inter / (p_sum + t_sum - inter))
        assert dice(p, t) == pytest.approx(2 * iou(p, t) / (1 + iou(p, t)))
    summary = mean_dice_iou(preds, truths)
    assert summary["n"] == 5
    assert summary["dice"] == pytest.approx(np.mean([dice(p, t) for p, t in zip(preds, truths)]))
    assert summary["iou"] == pytest.approx(np.mean([iou(p, t) for p, t in zip(preds, truths)]))


# ----------------------------------------------------------------------------------------- U-Net
@pytest.fixture(scope="module")
def unet_model():
    torch = pytest.importorskip("torch")
    from breakhis_ray.models.unet import create_unet

    torch.manual_seed(0)
    return create_unet(encoder="resnet18", encoder_weights_path=None, classes=1, in_channels=3)


def test_unet_segmenter_shapes(unet_model, touching_pair):
    image, _ = touching_pair
    seg = create_segmenter("unet", model=unet_model, batch_size=1)
    assert seg.mean == pytest.approx((0.485, 0.456, 0.406))  # the model's own ImageNet preprocessing
    result = seg.segment(np.stack([image, image]))
    batched = create_segmenter("unet", model=unet_model, batch_size=2)
    pair = np.stack([image, image])
    assert np.allclose(seg.predict_proba(pair), batched.predict_proba(pair), atol=1e-5)
    assert result.masks.shape == (2, 64, 64) and result.masks.dtype == bool
    assert result.labels.shape == (2, 64, 64) and result.labels.dtype == np.int32
    assert [sorted(f) for f in result.features] == [sorted(FEATURE_KEYS)] * 2
    # sizes that are not multiples of 32: padded (default) or resized to a fixed input, then mapped back
    odd = np.ascontiguousarray(image[:50, :40])
    proba = seg.predict_proba(odd[None])
    assert proba.shape == (1, 50, 40) and np.isfinite(proba).all()
    assert ((proba >= 0) & (proba <= 1)).all()
    resized = create_segmenter(
        "unet", model=unet_model, input_size=32, normalization="unit", instances="watershed"
    )
    assert resized.std == (1.0, 1.0, 1.0)
    assert resized.segment(odd[None]).masks.shape == (1, 50, 40)
    with pytest.raises(ConfigError, match="multiples of 32"):
        create_segmenter("unet", model=unet_model, input_size=50)


def test_unet_segmenter_from_checkpoint(unet_model, touching_pair, tmp_path):
    from breakhis_ray.checkpoint import save_checkpoint

    image, _ = touching_pair
    save_checkpoint(str(tmp_path / "unet"), unet_model, labels=["nucleus"], preprocessing={"size": [64, 64]})
    restored = create_segmenter("unet", checkpoint=str(tmp_path / "unet"))
    assert restored.input_size == (64, 64) and restored.mean == pytest.approx((0.485, 0.456, 0.406))
    direct = create_segmenter("unet", model=unet_model)
    assert np.allclose(restored.predict_proba(image[None]), direct.predict_proba(image[None]), atol=1e-5)
    assert restored.segment(image[:40, :48][None]).masks.shape == (1, 40, 48)


def test_unet_trains_on_a_disc_tile(unet_model, disc_batch):
    torch = pytest.importorskip("torch")
    import copy

    images, truths = disc_batch
    x = torch.from_numpy(images[:, :64, :64].copy()).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy((truths[:, :64, :64] > 0).astype(np.float32))[:, None]
    model = copy.deepcopy(unet_model).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def bce_dice(logits, target):
        prob = torch.sigmoid(logits)
        soft_dice = (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + 1 - soft_dice

    losses = []
    for _ in range(8):
        optimiser.zero_grad()
        loss = bce_dice(model(x), y)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------------------- overlay
def test_overlay_draws_only_on_boundaries(touching_pair, tmp_path):
    from skimage.segmentation import find_boundaries

    image, truth = touching_pair
    out = draw_overlay(image, truth, color=(0, 255, 0))
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = (out != image).any(axis=-1)
    edges = find_boundaries(truth, mode="inner")
    assert changed.any() and not (changed & ~edges).any()
    assert (out[edges] == (0, 255, 0)).all()
    assert (image == draw_overlay(image, np.zeros_like(truth, dtype=bool))).all()
    filled = draw_overlay(image, truth > 0, alpha=0.5)
    assert (filled != image).any(axis=-1)[(truth > 0) & ~edges].any()
    grid = str(tmp_path / "grid.png")
    path = save_overlay_grid([image, image], [truth, truth > 0], grid, titles=["a", "b"])
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.endswith("grid.png")


# --------------------------------------------------------------------------------------- factory
def test_factory_lists_choices_on_bad_name():
    with pytest.raises(ConfigError, match="threshold, unet, watershed"):
        create_segmenter("otsu")
    with pytest.raises(ConfigError, match="watershed"):
        create_segmenter("watershed", min_distanse=3)
    assert segmenter_class("watershed").name == "watershed"
    assert create_segmenter("watershed", min_distance=3).min_distance == 3
    with pytest.raises(ConfigError, match="min_distance"):
        create_segmenter("watershed", min_distance=0)


def test_package_import_is_light():
    code = (
        "import sys, breakhis_ray.segmentation as s; "
        "heavy = [m for m in ('torch', 'skimage', 'segmentation_models_pytorch', 'matplotlib') "
        "if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(s.create_segmenter)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
