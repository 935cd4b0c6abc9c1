"""Losses: focal loss properties (gamma=0 is cross-entropy, easy examples down-weighted), weighted CE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from breakhis_ray.errors import ConfigError
from breakhis_ray.losses import FocalLoss, create_loss, focal_loss, inverse_frequency_weights


def _batch(n: int = 16, c: int = 2, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("num_classes", [2, 5])
def test_focal_gamma0_equals_cross_entropy(num_classes):
    logits, target = _batch(c=num_classes)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))
    assert torch.allclose(
        focal_loss(logits, target, gamma=0.0, reduction="none"), F.cross_entropy(logits, target, reduction="none")
    )
    assert torch.allclose(
        focal_loss(logits, target, gamma=0.0, reduction="sum"), F.cross_entropy(logits, target, reduction="sum")
    )
    assert torch.allclose(FocalLoss(gamma=0)(logits, target), F.cross_entropy(logits, target))


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 5.0])
def test_focal_not_above_cross_entropy(gamma):
    logits, target = _batch(n=64, c=3, seed=1)
    fl = focal_loss(logits, target, gamma=gamma, reduction="none")
    ce = F.cross_entropy(logits, target, reduction="none")
    assert torch.all(fl <= ce + 1e-7)
    assert torch.all(fl >= 0)


def test_focal_downweights_easy_examples():
    logits = torch.tensor([[4.0, -4.0], [0.2, -0.2]])  # both class 0: first easy, second hard
    target = torch.tensor([0, 0])
    fl = focal_loss(logits, target, gamma=2.0, reduction="none")
    ce = F.cross_entropy(logits, target, reduction="none")
    ratio = fl / ce
    assert ratio[0] < ratio[1]
    assert ratio[0] < 1e-3  # (1 - p_t)^2 with p_t ~ 0.9997
    pt = torch.softmax(logits, 1)[:, 0]
    assert torch.allclose(fl, (1 - pt) ** 2 * ce)


def test_focal_alpha_weighting():
    logits, target = _batch(n=32, c=2, seed=2)
    base = focal_loss(logits, target, gamma=2.0, reduction="none")
    weighted = focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none")
    expected = torch.where(target == 1, 0.25 * base, 0.75 * base)
    assert torch.allclose(weighted, expected)
    per_class = focal_loss(logits, target, alpha=[0.75, 0.25], gamma=2.0, reduction="none")
    assert torch.allclose(per_class, expected)
    logits3, target3 = _batch(n=32, c=3, seed=3)
    w = torch.tensor([0.2, 0.3, 0.5])
    out = focal_loss(logits3, target3, alpha=w, gamma=1.0, reduction="none")
    assert torch.allclose(out, w[target3] * focal_loss(logits3, target3, gamma=1.0, reduction="none"))
    assert torch.allclose(focal_loss(logits3, target3, alpha=w, gamma=1.0), out.mean())


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_gradient_finite_even_for_saturated_logits(gamma):
    logits = torch.tensor([[100.0, -100.0], [-100.0, 100.0], [0.3, 0.1], [30.0, -30.0]], requires_grad=True)
    target = torch.tensor([0, 0, 1, 0])
    loss = focal_loss(logits, target, alpha=0.25, gamma=gamma)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_focal_half_precision_input():
    logits, target = _batch(c=2)
    out = focal_loss(logits.to(torch.bfloat16), target)
    assert out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gamma": -1.0},
        {"gamma": "two"},
        {"gamma": float("inf")},
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"alpha": True},
        {"alpha": [0.5, 0.5, 0.5], "num_classes": 2},
        {"alpha": [0.5, -1.0]},
        {"alpha": 0.25, "num_classes": 3},
        {"reduction": "avg"},
    ],
)
def test_focal_module_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        FocalLoss(**kwargs)


def test_focal_function_rejects_bad_inputs():
    logits, target = _batch(c=3)
    with pytest.raises(ValueError):
        focal_loss(logits, target, alpha=0.25)  # scalar alpha needs 2 classes
    with pytest.raises(ValueError):
        focal_loss(logits, target, alpha=[0.5, 0.5])
    with pytest.raises(ValueError):
        focal_loss(logits[0], target)
    with pytest.raises(ValueError):
        focal_loss(logits, target, gamma=-1)


def test_create_loss_variants():
    logits, target = _batch(n=20, c=2, seed=4)
    assert torch.allclose(create_loss("ce")(logits, target), F.cross_entropy(logits, target))
    smoothed = create_loss("ce", label_smoothing=0.1)(logits, target)
    assert torch.allclose(smoothed, F.cross_entropy(logits, target, label_smoothing=0.1))

    counts = [2480, 5429]
    weights = inverse_frequency_weights(counts)
    assert weights[0] > 1 > weights[1]
    assert sum(w * c for w, c in zip(weights, counts)) == pytest.approx(sum(counts))
    wce = create_loss("weighted_ce", class_counts=counts)
    assert torch.allclose(wce(logits, target), F.cross_entropy(logits, target, weight=torch.tensor(weights)))

    focal = create_loss("focal", alpha=0.25, gamma=2.0, class_counts=counts)
    assert isinstance(focal, FocalLoss)
    assert torch.allclose(focal(logits, target), focal_loss(logits, target, alpha=0.25, gamma=2.0))


@pytest.mark.parametrize(
    "args,kwargs",
    [
        (("hinge",), {}),
        (("weighted_ce",), {}),
        (("weighted_ce",), {"class_counts": [10, 0]}),
        (("weighted_ce",), {"class_counts": [10]}),
        (("focal",), {"label_smoothing": 0.1}),
        (("focal",), {"gamma": -2}),
        (("focal",), {"alpha": [0.1, 0.2, 0.7], "class_counts": [5, 5]}),
        (("ce",), {"label_smoothing": 1.0}),
    ],
)
def test_create_loss_rejects_bad_arguments(args, kwargs):
    with pytest.raises(ConfigError):
        create_loss(*args, **kwargs)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ConfigError, match="ce, weighted_ce, focal"):
        create_loss("dice")
