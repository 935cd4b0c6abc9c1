"""Test-time augmentation (unit tier, no Ray): the views, averaging, an invariant model unchanged by it, a
non-invariant one changed, and the Predictor's ``tta`` switch."""

from __future__ import annotations

import io

import numpy as np
import pytest

from breakhis_ray.inference.tta import RECT_VIEWS, SQUARE_VIEWS, apply_view, class_probabilities, view_names

torch = pytest.importorskip("torch")


class PooledLinear(torch.nn.Module):
    """Per-channel means then a linear layer: invariant to every flip and quarter turn."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 4)

    def forward(self, x):
        return self.linear(x.mean(dim=(2, 3)))


class LeftHalf(torch.nn.Module):
    """Logits from the left half of the image only: flips and turns change them."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.stack([left, -left, 2 * left], dim=1) * 5.0


def test_views_are_the_dihedral_group_on_squares_and_shape_keeping_otherwise():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    outs = {name: apply_view(x, name) for name in view_names(5, 5)}
    assert len(outs) == 8 and set(outs) == set(SQUARE_VIEWS)
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) == 8  # all distinct
    assert torch.equal(outs["vflip"], torch.flip(x, dims=(2,)))
    assert torch.equal(outs["rot90"], torch.rot90(x, 1, dims=(2, 3)))
    rect = torch.randn(1, 3, 4, 6)
    assert view_names(4, 6) == RECT_VIEWS
    assert all(apply_view(rect, v).shape == rect.shape for v in RECT_VIEWS)


def test_invariant_model_gives_identical_probabilities_with_and_without_tta():
    model = PooledLinear().eval()
    for shape in ((3, 3, 8, 8), (3, 3, 6, 10)):
        x = torch.rand(*shape)
        with torch.no_grad():
            plain = class_probabilities(model, x)
            tta = class_probabilities(model, x, tta=True)
        assert torch.allclose(plain, tta, atol=1e-6)
        assert torch.allclose(plain.sum(1), torch.ones(shape[0]), atol=1e-6)


def test_non_invariant_model_differs_and_tta_is_the_mean_over_views():
    model = LeftHalf()
    x = torch.rand(4, 3, 8, 8)
    x[..., :4] += 1.0  # a bright left half
    plain = class_probabilities(model, x)
    tta = class_probabilities(model, x, tta=True, temperature=2.0)
    manual = torch.stack([torch.softmax(model(apply_view(x, v)) / 2.0, 1) for v in SQUARE_VIEWS]).mean(0)
    assert torch.allclose(tta, manual, atol=1e-6)
    assert not torch.allclose(class_probabilities(model, x, temperature=2.0), tta, atol=1e-3)
    assert not torch.allclose(plain, class_probabilities(model, x, tta=True), atol=1e-3)


def _png(seed: int, size=(40, 40)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    img[:, : size[1] // 2] //= 3  # a dark left half, so orientation matters
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_predictor_tta_switch(tmp_path):
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.inference import PREDICTION_SCHEMA, Predictor
    from breakhis_ray.models import create_model

    torch.manual_seed(3)
    save_checkpoint(str(tmp_path / "clf"), create_model("tiny_cnn", num_classes=2, width=4),
                    preprocessing={"size": [32, 32]})
    images = [_png(i) for i in range(5)]
    plain = Predictor.from_checkpoint(str(tmp_path / "clf"), device="cpu").predict_bytes(images)
    tta = Predictor.from_checkpoint(str(tmp_path / "clf"), device="cpu", tta=True).predict_bytes(images)
    assert plain.schema == tta.schema == PREDICTION_SCHEMA  # binary checkpoints: no subtype columns
    a, b = plain.column("prob_malignant").to_numpy(), tta.column("prob_malignant").to_numpy()
    assert np.isfinite(b).all() and ((b >= 0) & (b <= 1)).all()
    assert not np.allclose(a, b, atol=1e-6)
