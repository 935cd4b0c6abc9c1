"""Deterministic preprocessing (decode, resize, normalize, the eval transform) and random augmentation."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from breakhis_ray.config import AugmentConfig, parse_hw
from breakhis_ray.data import augment
from breakhis_ray.data.decode import ImageRejected
from breakhis_ray.data.transforms import (
    PreprocessSpec,
    normalize,
    prepare_bytes,
    prepare_uint8,
    preprocess_bytes,
    resize_uint8,
)
from breakhis_ray.domain import IMAGENET_MEAN, IMAGENET_STD
from breakhis_ray.errors import DataError


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def random_rgb(h: int = 30, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ decode
def test_prepare_bytes_decodes_with_the_one_decoder_and_its_guard():
    """Decoding itself is tested in test_decode.py; here: prepare_bytes goes through it, bomb guard included."""
    arr = random_rgb()
    data = encode(Image.fromarray(arr))
    np.testing.assert_array_equal(prepare_bytes([data], PreprocessSpec(size=(30, 40)))[0], arr)
    with pytest.raises(ImageRejected) as info:
        prepare_bytes([data], PreprocessSpec(size=(30, 40)), max_pixels=30 * 40 - 1)
    assert info.value.reason == "too_large"
    with pytest.raises(DataError, match="not_an_image"):
        preprocess_bytes([b"not an image"], PreprocessSpec(size=(30, 40)))


# ------------------------------------------------------------------------------------------------ resize
def test_resize_uses_height_width_and_is_deterministic():
    arr = random_rgb(46, 70)
    a = resize_uint8(arr, (20, 30))
    b = resize_uint8(arr.copy(), (20, 30))
    assert a.shape == (20, 30, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert resize_uint8(arr, (46, 70)) is arr
    assert parse_hw(32) == (32, 32) and parse_hw([20, 30]) == (20, 30) and parse_hw("70x46") == (46, 70)


@pytest.mark.parametrize("shape, size", [((460, 700, 3), (224, 224)), ((460, 700, 1), (256, 256)),
                                         ((50, 60, 3), (120, 90)), ((33, 47, 3), (32, 32))])
def test_resize_stays_within_one_grey_level_of_pils_bilinear(shape, size):
    """torch's uint8 kernel runs PIL's BILINEAR filter with other fixed-point rounding: down- and upscaling,
    one and three channels, at most one grey level apart and rarely that."""
    arr = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    ours = resize_uint8(arr, size).astype(int)
    pil = np.asarray(Image.fromarray(arr[..., 0] if shape[2] == 1 else arr).resize(size[::-1],
                                                                                   Image.Resampling.BILINEAR))
    diff = np.abs(ours - pil.reshape(ours.shape))
    assert ours.shape == (*size, shape[2]) and diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_resize_takes_read_only_and_reversed_views_and_returns_a_contiguous_array():
    arr = random_rgb(46, 70)
    expected = resize_uint8(arr.copy(), (20, 30))
    read_only = arr.copy()
    read_only.flags.writeable = False
    np.testing.assert_array_equal(resize_uint8(read_only, (20, 30)), expected)
    flipped = resize_uint8(arr[:, ::-1], (20, 30))
    np.testing.assert_array_equal(flipped, resize_uint8(np.ascontiguousarray(arr[:, ::-1]), (20, 30)))
    assert flipped.flags.c_contiguous and flipped.flags.writeable


def test_resize_antialiases_high_frequencies():
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    small = resize_uint8(stripes, (8, 8))
    assert 100 < small.mean() < 155 and small.std() < 20


# ---------------------------------------------------------------------------------------------- normalize
def test_normalize_numpy_equals_torch():
    batch = np.stack([random_rgb(12, 10, s) for s in range(3)])
    spec = PreprocessSpec(size=(12, 10))
    a = normalize(batch, spec)
    b = normalize(torch.from_numpy(batch), spec)
    assert a.dtype == np.float32 and a.shape == (3, 3, 12, 10)
    assert b.dtype == torch.float32 and tuple(b.shape) == (3, 3, 12, 10) and b.is_contiguous()
    np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-6)


def test_normalize_in_channels_last_layout_gives_the_same_values():
    """The layout the inference actors ask for comes without a transposing copy and holds the same values."""
    batch = torch.from_numpy(np.stack([random_rgb(12, 10, s) for s in range(3)]))
    spec = PreprocessSpec(size=(12, 10), scale="imagenet")
    nchw = normalize(batch, spec)
    last = normalize(batch, spec, memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    assert torch.equal(last, nchw)


def test_imagenet_and_unit_scaling_values():
    batch = np.zeros((1, 2, 2, 3), np.uint8)
    batch[0, 1] = 255
    imagenet = normalize(batch, PreprocessSpec(scale="imagenet"))
    unit = normalize(batch, PreprocessSpec(scale="unit", mean=(0.5, 0.5, 0.5), std=(0.1, 0.1, 0.1)))
    for c in range(3):
        assert imagenet[0, c, 0, 0] == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], abs=1e-6)
        assert imagenet[0, c, 1, 0] == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], abs=1e-6)
    assert unit[0, :, 0].max() == 0.0 and unit[0, :, 1].min() == pytest.approx(1.0)
    assert 0.0 <= unit.min() and unit.max() <= 1.0


def test_normalize_extra_channels_are_scaled_to_unit_and_float_rejected():
    batch = np.full((2, 3, 3, 4), 255, np.uint8)
    out = normalize(torch.from_numpy(batch), PreprocessSpec())
    assert out.shape == (2, 4, 3, 3) and torch.all(out[:, 3] == 1.0)
    with pytest.raises(DataError, match="uint8"):
        normalize(batch.astype(np.float32))
    with pytest.raises(DataError, match="N, H, W, C"):
        normalize(batch[0])


def test_spec_round_trip_and_unit_ignores_mean_std():
    spec = PreprocessSpec(size="64x48", scale="imagenet", stain_normalization="macenko")
    assert spec.size == (48, 64)
    data = json.loads(json.dumps(spec.to_dict()))
    assert PreprocessSpec.from_dict(data) == spec
    unit = PreprocessSpec(scale="unit", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert unit.mean == (0.0, 0.0, 0.0) and unit.std == (1.0, 1.0, 1.0)
    assert PreprocessSpec(mean=None, std=None).mean == IMAGENET_MEAN


def test_eval_transform_is_deterministic_and_matches_the_two_halves():
    images = [encode(Image.fromarray(random_rgb(46, 70, s))) for s in range(3)]
    images.append(encode(Image.fromarray(random_rgb(30, 30, 9)).convert("L")))
    spec = PreprocessSpec(size=(24, 32))
    a = preprocess_bytes(images, spec)
    b = preprocess_bytes(list(images), spec)
    assert a.shape == (4, 3, 24, 32) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, normalize(prepare_bytes(images, spec), spec))


def test_prepare_with_stain_normalization_keeps_shape():
    arr = random_rgb(40, 40)
    for method in ("macenko", "reinhard"):
        out = prepare_uint8(arr, PreprocessSpec(size=(16, 16), stain_normalization=method))
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8


# ---------------------------------------------------------------------------------------------- augment
def _batch(n: int = 4, size: int = 16) -> dict[str, np.ndarray]:
    images = np.stack([random_rgb(size, size, s) for s in range(n)])
    return {"image": images, "label": np.arange(n), "key": augment.path_keys([f"/x/{i}.png" for i in range(n)])}


def test_augment_same_seed_and_epoch_reproduce_other_epochs_differ():
    batch, cfg = _batch(), AugmentConfig()
    first = augment.augment_batch(batch, cfg, augment.sample_rngs(7, 0, batch["key"]))["image"]
    again = augment.augment_batch(batch, cfg, augment.sample_rngs(7, 0, batch["key"]))["image"]
    epoch1 = augment.augment_batch(batch, cfg, augment.sample_rngs(7, 1, batch["key"]))["image"]
    other_seed = augment.augment_batch(batch, cfg, augment.sample_rngs(8, 0, batch["key"]))["image"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, epoch1)
    assert not np.array_equal(first, other_seed)
    assert first.shape == batch["image"].shape and first.dtype == np.uint8
    np.testing.assert_array_equal(batch["image"], _batch()["image"])  # input untouched


def test_augment_is_per_row_independent_of_batch_composition():
    batch, cfg = _batch(4), AugmentConfig()
    whole = augment.augment_batch(batch, cfg, augment.sample_rngs(3, 2, batch["key"]))["image"]
    half = {k: v[2:] for k, v in batch.items()}
    part = augment.augment_batch(half, cfg, augment.sample_rngs(3, 2, half["key"]))["image"]
    np.testing.assert_array_equal(whole[2:], part)


def test_geometric_only_augmentation_permutes_pixels():
    cfg = AugmentConfig(color_jitter=0.0, hed_jitter=0.0)
    rng = np.random.default_rng(0)
    img = random_rgb(16, 16)
    seen = set()
    for _ in range(20):
        out = augment.augment_image(img, cfg, rng)
        np.testing.assert_array_equal(np.sort(out.reshape(-1, 3), axis=0), np.sort(img.reshape(-1, 3), axis=0))
        seen.add(out.tobytes())
    assert len(seen) > 3
    rect = random_rgb(10, 16)
    assert augment.augment_image(rect, cfg, rng).shape == (10, 16, 3)  # half turns only


def test_colour_crop_and_disabled():
    img = random_rgb(20, 20)
    rng = np.random.default_rng(1)
    out = augment.augment_image(img, AugmentConfig(random_resized_crop=True, color_jitter=0.3, hed_jitter=0.1), rng)
    assert out.shape == img.shape and out.dtype == np.uint8
    disabled = {"image": img[None], "label": np.zeros(1)}
    assert augment.augment_batch(disabled, AugmentConfig(enabled=False), rng) is disabled
    with pytest.raises(DataError):
        augment.augment_batch({"image": img}, AugmentConfig(), rng)


def test_random_augment_udf_seeded_vs_unseeded():
    batch = _batch()
    seeded = augment.RandomAugment(AugmentConfig(), seed=5)
    np.testing.assert_array_equal(seeded(batch)["image"], seeded(batch)["image"])  # execution index 0 here
    unseeded = augment.RandomAugment(AugmentConfig(), seed=None)
    assert not np.array_equal(unseeded(batch)["image"], unseeded(batch)["image"])
    with pytest.raises(DataError, match="key"):
        seeded({"image": batch["image"]})


def test_path_keys_are_stable_and_distinct():
    keys = augment.path_keys(["a.png", "b.png", "a.png#aug=hflip"])
    assert keys.dtype == np.int64 and len(set(keys.tolist())) == 3
    np.testing.assert_array_equal(keys, augment.path_keys(["a.png", "b.png", "a.png#aug=hflip"]))


def test_path_keys_do_not_depend_on_where_the_tree_lies():
    """A clone in another directory, or the same tree on s3://, gives every row the same key (so the same
    augmentations and enhancement copies); names repeated in other patient or magnification folders differ."""
    tail = "SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png"
    where = [f"/work/main/runs/demo/BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/{tail}",
             f"/tmp/elsewhere/{tail}", f"s3://bucket/breakhis/{tail}", f"C:\\data\\{tail.replace('/', chr(92))}"]
    keys = augment.path_keys(where + [w + "#aug=hflip" for w in where[:2]])
    assert len(set(keys[:4].tolist())) == 1 and len(set(keys[4:].tolist())) == 1 and keys[0] != keys[4]
    repeated = augment.path_keys(["/t/P1/40X/001.png", "/t/P2/40X/001.png", "/t/P1/100X/001.png"])
    assert len(set(repeated.tolist())) == 3
