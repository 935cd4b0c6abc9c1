"""Temperature scaling: the fit against a brute-force search, its edge cases, the temperature saved in a
checkpoint's meta.json and applied by the Predictor (unit tier: no Ray)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from breakhis_ray.temperature import DEFAULT_BOUNDS, fit_temperature, nll, scale_logits

torch = pytest.importorskip("torch")


GRID = 4001


def _brute_force(logits, labels, n: int = GRID) -> tuple[float, float]:
    """The best T on a fine log grid over the default bounds, by plain softmax cross-entropy in torch."""
    grid = torch.exp(torch.linspace(np.log(DEFAULT_BOUNDS[0]), np.log(DEFAULT_BOUNDS[1]), n, dtype=torch.float64))
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    scaled = z.unsqueeze(0) / grid[:, None, None]  # (T, N, C)
    losses = torch.nn.functional.cross_entropy(scaled.permute(0, 2, 1), y.expand(n, -1), reduction="none").mean(1)
    best = int(torch.argmin(losses))
    return float(grid[best]), float(losses[best])


def _case(seed: int, n: int, classes: int, scale: float, correct: float):
    """Logits ``scale`` times a random draw; a share ``correct`` of the labels is the argmax."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * scale
    labels = rng.integers(0, classes, n)
    hit = rng.random(n) < correct
    labels[hit] = logits[hit].argmax(1)
    return logits, labels


@pytest.mark.parametrize("seed,classes,scale,correct", [
    (0, 2, 4.0, 0.7),    # over-confident binary model: T > 1
    (1, 8, 5.0, 0.5),    # over-confident eight-class model
    (2, 8, 0.3, 0.9),    # under-confident: T < 1
    (3, 2, 1.0, 0.6),
])
def test_fit_matches_a_brute_force_search(seed, classes, scale, correct):
    logits, labels = _case(seed, 400, classes, scale, correct)
    fitted = fit_temperature(logits, labels)
    best, best_loss = _brute_force(logits, labels)
    step = np.log(DEFAULT_BOUNDS[1] / DEFAULT_BOUNDS[0]) / (GRID - 1)
    assert abs(np.log(fitted) - np.log(best)) <= step
    assert nll(logits, labels, fitted) <= best_loss + 1e-9
    assert nll(logits, labels, fitted) <= nll(logits, labels, 1.0)


def test_over_and_under_confidence_move_t_the_right_way():
    over, y_over = _case(0, 400, 8, 6.0, 0.5)
    under, y_under = _case(0, 400, 8, 0.2, 0.95)
    assert fit_temperature(over, y_over) > 1.5 and fit_temperature(under, y_under) < 0.7


def test_separable_validation_set_ends_at_the_lower_bound_and_argmax_never_changes():
    logits = np.array([[3.0, -1.0], [-2.0, 2.0], [0.5, 0.0]])
    labels = logits.argmax(1)
    t = fit_temperature(logits, labels)
    assert t == DEFAULT_BOUNDS[0]
    assert (scale_logits(logits, t).argmax(1) == labels).all()


@pytest.mark.parametrize("logits,labels,message", [
    (np.zeros((3,)), [0, 1, 0], "must be"),
    (np.zeros((3, 2)), [0, 1], "3 logit rows for 2 labels"),
    (np.zeros((2, 2)), [0, 2], "labels must lie"),
    (np.zeros((0, 2)), [], "at least one"),
    (np.array([[np.nan, 0.0]]), [0], "finite"),
])
def test_bad_inputs_are_value_errors(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_temperature(logits, labels)


def test_nll_equals_torch_cross_entropy():
    logits, labels = _case(5, 50, 8, 2.0, 0.5)
    expected = torch.nn.functional.cross_entropy(torch.as_tensor(logits) / 1.7, torch.as_tensor(labels))
    assert nll(logits, labels, 1.7) == pytest.approx(float(expected), rel=1e-12)
    with pytest.raises(ValueError):
        nll(logits, labels, 0.0)


# ------------------------------------------------------------------------ saved and applied (no Ray)
def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=2, width=4)
    with torch.no_grad():  # spread the probabilities so a temperature visibly changes them
        for module in model.classifier.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(40.0)
    uri = str(tmp_path / "clf")
    save_checkpoint(uri, model, preprocessing={"size": [32, 32]})
    return uri


def test_temperature_saved_in_meta_is_applied_by_the_predictor(tiny_checkpoint):
    from breakhis_ray.checkpoint import load_model, read_meta, temperature_of, update_meta
    from breakhis_ray.data.transforms import normalize
    from breakhis_ray.inference import Predictor

    images = [_png(i) for i in range(6)]
    plain = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    assert plain.temperature == 1.0
    before = plain.predict_bytes(images).column("prob_malignant").to_numpy()

    sha = read_meta(tiny_checkpoint)["files"]
    update_meta(tiny_checkpoint, calibration={"temperature": 3.0, "method": "temperature_scaling"})
    meta = read_meta(tiny_checkpoint)
    assert meta["files"] == sha and temperature_of(meta) == 3.0 and meta["task"] == "binary"
    calibrated = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    after = calibrated.predict_bytes(images).column("prob_malignant").to_numpy()

    model, _ = load_model(tiny_checkpoint)
    batch = calibrated.decode(images)
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(batch["_image"]), calibrated.spec)).double()
    assert np.allclose(before, torch.softmax(logits, 1)[:, 1].numpy(), atol=1e-6)
    assert np.allclose(after, torch.softmax(logits / 3.0, 1)[:, 1].numpy(), atol=1e-6)
    assert not np.allclose(before, after, atol=1e-4)
    # a larger T pulls every probability towards 1/2 without crossing it
    assert (np.abs(after - 0.5) <= np.abs(before - 0.5) + 1e-7).all()
    assert ((after >= 0.5) == (before >= 0.5)).all()


def test_update_meta_refuses_to_touch_the_weights_record(tiny_checkpoint):
    from breakhis_ray.checkpoint import update_meta
    from breakhis_ray.errors import StorageError

    with pytest.raises(ValueError, match="cannot change"):
        update_meta(tiny_checkpoint, files={})
    update_meta(tiny_checkpoint, calibration={"temperature": -1})
    from breakhis_ray.checkpoint import read_meta, temperature_of

    with pytest.raises(StorageError, match="temperature must be a number > 0"):
        temperature_of(read_meta(tiny_checkpoint))
    assert json.loads((Path(tiny_checkpoint) / "meta.json").read_text())["calibration"] == {"temperature": -1}
