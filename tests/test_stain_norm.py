"""Macenko and Reinhard stain normalisation: towards the reference, identity on it, robust to blank tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from breakhis_ray.data import stain_norm
from breakhis_ray.data.stain import (
    E_REF, H_REF, compose, concentrations, eosin_density, hematoxylin_density, rgb_to_od, unit,
)
from breakhis_ray.data.transforms import PreprocessSpec, prepare_uint8
from breakhis_ray.errors import ConfigError, DataError

METHODS = ("macenko", "reinhard")


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return stain_norm.reference_tile(96)


@pytest.fixture(scope="module")
def shifted(reference) -> np.ndarray:
    """The reference tissue re-rendered with other stain vectors and strengths (another lab's staining)."""
    conc = concentrations(reference)
    h2 = unit(H_REF + np.array([0.15, -0.10, 0.10]))
    e2 = unit(E_REF + np.array([0.20, -0.05, -0.10]))
    return compose(conc[..., 0] * 1.3, conc[..., 1] * 0.7, h2, e2)


def mean_od(img: np.ndarray) -> np.ndarray:
    od = rgb_to_od(img).reshape(-1, 3)
    return od[(od > 0.15).any(axis=1)].mean(axis=0)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def test_reference_tile_is_deterministic_and_recovers_reference_vectors(reference):
    np.testing.assert_array_equal(reference, stain_norm.reference_tile(96))
    he = stain_norm.estimate_stain_vectors(reference)
    assert he is not None
    assert he[0] @ unit(H_REF) > 0.99 and he[1] @ unit(E_REF) > 0.99


@pytest.mark.parametrize("method", METHODS)
def test_shifted_tile_moves_towards_reference(method, reference, shifted):
    out = stain_norm.normalize_stain(shifted, method)
    assert out.shape == shifted.shape and out.dtype == np.uint8
    before = np.linalg.norm(mean_od(shifted) - mean_od(reference))
    after = np.linalg.norm(mean_od(out) - mean_od(reference))
    assert after < 0.5 * before
    assert mean_abs_diff(out, reference) < 0.5 * mean_abs_diff(shifted, reference)


def test_macenko_output_has_reference_stain_vectors(shifted):
    he = stain_norm.estimate_stain_vectors(stain_norm.normalize_stain(shifted, "macenko"))
    assert he[0] @ unit(H_REF) > 0.99 and he[1] @ unit(E_REF) > 0.99


@pytest.mark.parametrize("method", METHODS)
def test_identity_on_the_reference(method, reference):
    assert mean_abs_diff(stain_norm.normalize_stain(reference, method), reference) < 3.0


@pytest.mark.parametrize("method", METHODS)
def test_fit_to_another_reference_and_round_trip_parameters(method, reference, shifted):
    fitted = stain_norm.fit_normalizer(method, shifted)
    towards_shifted = fitted.transform(reference)
    assert mean_abs_diff(towards_shifted, shifted) < 0.5 * mean_abs_diff(reference, shifted)
    params = json.loads(json.dumps(fitted.to_dict()))
    rebuilt = stain_norm.get_normalizer(method, params)
    np.testing.assert_array_equal(rebuilt.transform(reference), towards_shifted)
    spec = PreprocessSpec(size=(96, 96), stain_normalization=method, stain_reference=params)
    np.testing.assert_array_equal(prepare_uint8(reference, spec), towards_shifted)


def _two_colours(top, bottom) -> np.ndarray:
    tile = np.empty((32, 32, 3), np.uint8)
    tile[:16], tile[16:] = top, bottom
    return tile


def _black_rows(reference) -> np.ndarray:
    tile = reference.copy()
    tile[::2] = 0  # saturated optical density in every other row
    return tile


def _little_tissue(reference) -> np.ndarray:
    tile = np.full((64, 64, 3), 255, np.uint8)
    tile[:20, :20] = reference[:20, :20]
    return tile


# (tile, whether (Macenko, Reinhard) normalise it through their float path; otherwise they return it unchanged)
DEGENERATE = {
    "white": (lambda ref: np.full((32, 32, 3), 255, np.uint8), (False, False)),  # blank glass
    "near-white": (lambda ref: np.full((32, 32, 3), 250, np.uint8), (False, False)),
    "black": (lambda ref: np.zeros((32, 32, 3), np.uint8), (False, True)),  # zero intensity: OD at its cap
    "flat": (lambda ref: np.broadcast_to(np.array([200, 120, 180], np.uint8), (32, 32, 3)).copy(), (False, True)),
    "tiny": (lambda ref: np.full((2, 2, 3), 128, np.uint8), (False, False)),
    "two-flat": (lambda ref: _two_colours([200, 120, 180], [120, 60, 160]), (True, True)),  # rank-1 OD covariance
    "black-and-pink": (lambda ref: _two_colours([0, 0, 0], [200, 120, 180]), (True, True)),
    "black-rows": (_black_rows, (True, True)),
    "little-tissue": (_little_tissue, (False, True)),
}


@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_degenerate_tiles_never_give_nan_on_the_float_path(name, reference):
    """The float arrays (optical density, concentrations, l-alpha-beta, the normalised tile before its uint8
    rounding) stay finite on degenerate tiles: a NaN there would vanish in the uint8 cast, so look before it."""
    build, float_path = DEGENERATE[name]
    tile = build(reference)
    od = rgb_to_od(tile)
    assert od.dtype == np.float32 and np.isfinite(od).all()
    assert od.min() >= 0 and od.max() <= np.log(255.0) + 1e-5  # zero intensity counts as 1: a finite cap
    conc = concentrations(tile)
    assert conc.shape == tile.shape and np.isfinite(conc).all()
    for density in (hematoxylin_density(tile), eosin_density(tile)):
        assert density.shape == tile.shape[:2] and np.isfinite(density).all() and density.min() >= 0
    assert np.isfinite(stain_norm.rgb_to_lab(tile)).all()
    he = stain_norm.estimate_stain_vectors(tile)
    if he is not None:
        assert he.shape == (2, 3) and np.isfinite(he).all()
        np.testing.assert_allclose(np.linalg.norm(he, axis=1), 1.0, atol=1e-9)
    for method, expect_float in zip(METHODS, float_path):
        normalizer = stain_norm.get_normalizer(method)
        normalised = normalizer.transform_float(tile)
        out = normalizer.transform(tile)
        assert out.shape == tile.shape and out.dtype == np.uint8
        assert (normalised is not None) == expect_float, (method, name)
        if normalised is None:
            np.testing.assert_array_equal(out, tile)  # no tissue or one stain direction: unchanged
        else:
            assert normalised.dtype == np.float64 and normalised.shape == tile.shape
            assert np.isfinite(normalised).all(), (method, name)


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown stain normalisation"):
        stain_norm.get_normalizer("vahadane")
    with pytest.raises(ConfigError, match="fitted for"):
        stain_norm.get_normalizer("macenko", {"method": "reinhard", "mean": [0, 0, 0], "std": [1, 1, 1]})
    with pytest.raises(DataError, match="too little tissue"):
        stain_norm.fit_normalizer("macenko", np.full((16, 16, 3), 255, np.uint8))
    with pytest.raises(DataError, match="uint8"):
        stain_norm.normalize_stain(np.zeros((8, 8, 3), np.float32), "reinhard")
