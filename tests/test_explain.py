"""Grad-CAM / Grad-CAM++: maps that point at the class evidence, per-family target layers, heatmap PNGs written
by the predictor beside its probabilities, and ``infer --explain gradcam`` end to end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from breakhis_ray.errors import ConfigError

SIDE = 48


def _squares(n: int, rng: np.random.Generator, quadrant: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy grey images; label 1 holds a bright 10x10 square somewhere inside one quadrant (``quadrant``, else
    random), label 0 none (``quadrant`` given: every image has the square there)."""
    x = rng.normal(0.3, 0.08, (n, 3, SIDE, SIDE)).astype(np.float32)
    y = np.zeros(n, dtype=np.int64)
    half = SIDE // 2
    for i in range(n):
        if quadrant is None and rng.random() < 0.5:
            continue
        q = int(rng.integers(4)) if quadrant is None else quadrant
        r0 = (q // 2) * half + int(rng.integers(2, half - 12))
        c0 = (q % 2) * half + int(rng.integers(2, half - 12))
        x[i, :, r0:r0 + 10, c0:c0 + 10] = 0.95
        y[i] = 1
    return torch.from_numpy(x), torch.from_numpy(y)


def _quadrant_mass(cams: np.ndarray) -> np.ndarray:
    """``(N, 4)`` share of each map's mass in the quadrants (top-left, top-right, bottom-left, bottom-right)."""
    h = SIDE // 2
    mass = np.stack([cams[:, :h, :h].sum((1, 2)), cams[:, :h, h:].sum((1, 2)),
                     cams[:, h:, :h].sum((1, 2)), cams[:, h:, h:].sum((1, 2))], axis=1)
    return mass / mass.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def square_detector():
    """A tiny_cnn trained for a few steps to say whether a bright square is present (it reaches ~0 loss)."""
    from breakhis_ray.models import create_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and fair to a shared machine
    try:
        torch.manual_seed(0)
        model = create_model("tiny_cnn", num_classes=2, width=8)
        optimizer = torch.optim.Adam(model.parameters(), 3e-3)
        rng = np.random.default_rng(0)
        for _ in range(120):
            x, y = _squares(32, rng)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_map_mass_lies_in_the_quadrant_of_the_square_and_follows_it(square_detector, method):
    from breakhis_ray.explain import GradCAM

    cam = GradCAM(square_detector, method=method)
    assert cam.target_layer == "features"
    for quadrant in range(4):
        x, _ = _squares(8, np.random.default_rng(100 + quadrant), quadrant=quadrant)
        with torch.inference_mode():  # as in the predictor: the explain pass re-enables autograd itself
            cams, logits = cam(x, class_index=1)
        assert cams.shape == (8, SIDE, SIDE) and cams.dtype == np.float32
        assert np.isfinite(cams).all() and cams.min() >= 0.0 and np.allclose(cams.max(axis=(1, 2)), 1.0)
        assert (logits.argmax(1) == 1).all()  # the detector sees the square
        share = _quadrant_mass(cams)
        # most of every map lies in the square's quadrant: moving the square moves the map
        assert (share.argmax(axis=1) == quadrant).all(), (quadrant, share.round(2))
        assert share[:, quadrant].mean() > 0.7, (quadrant, share.round(2))
    assert all(p.grad is None for p in square_detector.parameters())  # no parameter gradient accumulated


def test_the_predicted_class_is_explained_by_default(square_detector):
    from breakhis_ray.explain import GradCAM

    x, _ = _squares(2, np.random.default_rng(7), quadrant=3)
    cam = GradCAM(square_detector)
    default, logits = cam(x)
    explicit, _ = cam(x, class_index=logits.argmax(1).tolist())
    np.testing.assert_allclose(default, explicit, atol=1e-6)


@pytest.mark.parametrize("name,layer", [("vgg16", "features.29"), ("vgg16_bn", "features.42"),
                                        ("resnet18", "layer4"), ("densenet121", "features"),
                                        ("tiny_cnn", "features")])
def test_every_family_has_a_target_layer_and_maps_of_the_input_size(name, layer):
    from breakhis_ray.explain import GradCAM, TARGET_LAYERS
    from breakhis_ray.models import create_model

    torch.manual_seed(0)
    model = create_model(name, num_classes=2).eval()
    assert TARGET_LAYERS[name] == layer
    assert isinstance(model.get_submodule(layer), torch.nn.Module)
    x = torch.randn(2, 3, 64, 80)
    cams, logits = GradCAM(model)(x)
    assert cams.shape == (2, 64, 80) and logits.shape == (2, 2)
    assert np.isfinite(cams).all() and 0.0 <= cams.min() and cams.max() <= 1.0
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), rtol=1e-4, atol=1e-5)  # the same forward


def test_target_layer_override_and_a_wrong_one_is_a_one_line_error():
    from breakhis_ray.explain import GradCAM
    from breakhis_ray.models import create_model

    model = create_model("resnet18", num_classes=2).eval()
    cams, _ = GradCAM(model, target_layer="layer3", method="gradcam++")(torch.randn(1, 3, 64, 64))
    assert cams.shape == (1, 64, 64)
    with pytest.raises(ConfigError, match=r"explain.target_layer='layer9' is not a module of resnet18.*layer4"):
        GradCAM(model, target_layer="layer9")
    with pytest.raises(ConfigError, match="unknown explanation method"):
        GradCAM(model, method="lime")  # type: ignore[arg-type]


def test_heatmap_pngs_have_the_input_size_and_the_raw_map_scales_to_8_bits():
    from breakhis_ray.explain import heatmap_names, heatmap_pngs

    cam = np.zeros((16, 24), np.float32)
    cam[:, 12:] = 1.0
    image = np.full((16, 24, 3), 128, np.uint8)
    overlay_png, raw_png = heatmap_pngs(cam, image, (45, 70))
    overlay, raw = Image.open(io.BytesIO(overlay_png)), Image.open(io.BytesIO(raw_png))
    assert overlay.size == (70, 45) and overlay.mode == "RGB"
    assert raw.size == (70, 45) and raw.mode == "L"
    raw_px = np.asarray(raw)
    assert raw_px[:, :30].max() == 0 and raw_px[:, 40:].min() == 255
    over = np.asarray(overlay).astype(int)
    assert over[:, 60:, 0].mean() > over[:, :10, 0].mean()  # red where the map is high (jet)
    assert over[:, :10, 2].mean() > over[:, 60:, 2].mean()  # blue where it is low
    a, b = heatmap_names("s3://b/dir/x y.png", "gradcam++"), heatmap_names("/other/x y.png", "gradcam++")
    assert a[0].startswith("x_y-") and a[0].endswith("_gradcampp.png") and a[1].endswith("_gradcampp_raw.png")
    assert a != b  # same file name in two folders: two heatmaps


# ------------------------------------------------------------------------------------------ predictor
@pytest.fixture(scope="module")
def explain_inputs(tmp_path_factory) -> dict:
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.models import create_model

    root = tmp_path_factory.mktemp("explain")
    torch.manual_seed(0)
    save_checkpoint(str(root / "classifier"), create_model("tiny_cnn", num_classes=2, width=4),
                    preprocessing={"size": [32, 48]})
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    sizes = {"a.png": (60, 90), "b.png": (41, 77), "c.png": (32, 48)}
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    (images / "broken.png").write_bytes(b"not an image")
    return {"classifier": str(root / "classifier"), "images": images, "sizes": sizes}


def test_predictor_writes_a_heatmap_per_ok_row_and_keeps_its_probabilities(explain_inputs, tmp_path):
    from breakhis_ray.inference import Predictor

    uris = sorted(str(p) for p in explain_inputs["images"].iterdir())
    plain = Predictor.from_checkpoint(explain_inputs["classifier"], device="cpu").predict_uris(uris)
    explained = Predictor.from_checkpoint(explain_inputs["classifier"], device="cpu", explain="gradcam",
                                          heatmap_dir=str(tmp_path / "heatmaps")).predict_uris(uris)
    assert plain.column("heatmap_uri").null_count == len(uris)  # explain off: null everywhere
    np.testing.assert_array_equal(plain.column("prob_malignant").to_numpy(zero_copy_only=False),
                                  explained.column("prob_malignant").to_numpy(zero_copy_only=False))
    for row in explained.to_pylist():
        name = Path(row["path"]).name
        if name == "broken.png":
            assert row["status"] == "error" and row["heatmap_uri"] is None
            continue
        h, w = explain_inputs["sizes"][name]
        overlay = Path(row["heatmap_uri"])
        assert overlay.parent.parent == tmp_path / "heatmaps" and overlay.name.endswith("_gradcam.png")
        assert Image.open(overlay).size == (w, h)
        raw = overlay.with_name(overlay.name.replace("_gradcam.png", "_gradcam_raw.png"))
        assert Image.open(raw).size == (w, h) and Image.open(raw).mode == "L"


def test_predictor_explain_needs_a_heatmap_dir(explain_inputs):
    from breakhis_ray.inference import Predictor

    with pytest.raises(ConfigError, match="needs heatmap_dir"):
        Predictor.from_checkpoint(explain_inputs["classifier"], device="cpu", explain="gradcam")


@pytest.mark.ray
def test_infer_explain_flag_writes_heatmap_uris(ray_session, explain_inputs, tmp_path):
    from breakhis_ray.cli import main

    out = tmp_path / "infer"
    code = main(["infer", "--input", str(explain_inputs["images"]), "--out", str(out),
                 "--classifier", explain_inputs["classifier"], "--explain", "gradcam++",
                 "explain.target_layer=features.6", "batch_size=2", "chunk_size=2", "decode_num_cpus=0.5",
                 "num_cpus=0.5"])
    assert code == 0
    rows = pq.read_table(out / "predictions").to_pylist()
    assert len(rows) == 4
    for row in rows:
        if row["status"] == "ok":
            assert row["heatmap_uri"].startswith(str(out / "heatmaps" / "part-"))
            assert row["heatmap_uri"].endswith("_gradcampp.png") and Path(row["heatmap_uri"]).is_file()
        else:
            assert row["heatmap_uri"] is None
    # the plan pins the explanation settings: resuming with other ones is refused
    again = main(["infer", "--input", str(explain_inputs["images"]), "--out", str(out),
                  "--classifier", explain_inputs["classifier"], "--explain", "gradcam", "batch_size=2",
                  "chunk_size=2"])
    assert again == 2
