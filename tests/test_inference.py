"""Batch inference: one row per input (good and bad), resume after interruption, S3 in/out, parity with a
plain loop, classical segmenter features, the pinned output schema.

Tiny random models (``tiny_cnn`` at 32x32, U-Net resnet18 at 64x64) and a dozen small images keep this fast.
"""

from __future__ import annotations

import dataclasses

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breakhis_ray import storage
from breakhis_ray.config import InferConfig, load_config
from breakhis_ray.errors import ConfigError

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

MAX_PIXELS = 120 * 120  # the "decompression bomb" below is bigger than this, the good images are smaller

GOOD = {  # relative path -> expected status
    "benign/SOB_B_A-14-22549AB-40-001.png": "ok",
    "benign/SOB_B_F-14-14134-100-002.png": "ok",
    "malignant/SOB_M_DC-14-13412-200-003.png": "ok",
    "malignant/SOB_M_LC-14-12204-400-004.jpg": "ok",
    "other/slide one.png": "ok",
    "other/tile_7.tif": "ok",
    "odd/grayscale.png": "ok",
    "odd/rgba.png": "ok",
    "odd/sixteen_bit.png": "ok",
}
BAD = {
    "odd/truncated.png": "error",
    "odd/zero_bytes.png": "error",
    "odd/text_as.png": "error",
    "odd/bomb.png": "error",
}
EXPECTED = {**GOOD, **BAD}


# ------------------------------------------------------------------------------------------ fixtures
def _tissue(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Pink stroma with dark purple blobs (nuclei) so the segmenters find something."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = (235, 170, 200)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(8):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(3, 7)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (70, 40, 130)
    noise = rng.integers(-12, 13, size=img.shape)
    return np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write_tree(root: Path) -> None:
    rng = np.random.default_rng(0)
    for rel in GOOD:
        if rel.startswith("odd/"):
            continue
        fmt = {"png": "PNG", "jpg": "JPEG", "tif": "TIFF"}[rel.rsplit(".", 1)[1]]
        data = _encode(_tissue(rng, 60 + 4 * len(rel) % 30, 80), fmt)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    odd = root / "odd"
    odd.mkdir(parents=True, exist_ok=True)
    tissue = _tissue(rng, 64, 96)
    (odd / "grayscale.png").write_bytes(_encode(Image.fromarray(tissue).convert("L")))
    rgba = np.dstack([tissue, np.full(tissue.shape[:2], 200, np.uint8)])
    (odd / "rgba.png").write_bytes(_encode(Image.fromarray(rgba)))
    wide = (tissue[..., 0].astype(np.uint16) * 257)
    (odd / "sixteen_bit.png").write_bytes(_encode(Image.fromarray(wide)))
    full = _encode(tissue)
    (odd / "truncated.png").write_bytes(full[: len(full) // 2])
    (odd / "zero_bytes.png").write_bytes(b"")
    (odd / "text_as.png").write_bytes(b"this is not an image, only text\n" * 10)
    (odd / "bomb.png").write_bytes(_encode(np.zeros((400, 300, 3), np.uint8)))  # 120k px > MAX_PIXELS
    (root / "notes.txt").write_text("not an input: no image extension\n")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.models import create_model, create_unet

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    clf = create_model("tiny_cnn", num_classes=2, width=4)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so probabilities spread
        for m in clf.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    save_checkpoint(str(root / "classifier"), clf, preprocessing={"size": [32, 32]})
    unet = create_unet(encoder="resnet18", classes=1)
    save_checkpoint(str(root / "unet"), unet, preprocessing={"size": [64, 64]})
    return {"classifier": str(root / "classifier"), "unet": str(root / "unet")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _write_tree(root)
    return root


def _cfg(inp: str, out: str, classifier: str, segmenter: str | None = None, **over) -> InferConfig:
    values = {"input": inp, "out": out, "classifier": classifier, "segmenter": segmenter,
              "max_pixels": MAX_PIXELS, "chunk_size": 4, "batch_size": 4, "decode_batch_size": 4,
              "decode_num_cpus": 0.5, "num_cpus": 0.5, "concurrency": 1}
    values.update(over)
    return load_config(InferConfig, None, [], values)


def _rel(table: pa.Table, root: str) -> dict[str, dict]:
    root = root.rstrip("/") + "/"
    out = {}
    for row in table.to_pylist():
        assert row["path"].startswith(root), row["path"]
        out[row["path"][len(root):]] = {k: v for k, v in row.items()
                                        if k not in ("run_id", "processed_at", "path", "mask_uri")}
    return out


# -------------------------------------------------------------------------------------------- unit
def test_schema_is_pinned():
    from breakhis_ray.inference import PREDICTION_SCHEMA

    assert [(f.name, str(f.type)) for f in PREDICTION_SCHEMA] == [
        ("path", "string"),
        ("status", "string"),
        ("error", "string"),
        ("prob_malignant", "float"),
        ("pred_label", "string"),
        ("patient_id", "string"),
        ("magnification", "int16"),
        ("label", "string"),
        ("image_height", "int32"),
        ("image_width", "int32"),
        ("nuclei_count", "int32"),
        ("nuclear_area_fraction", "float"),
        ("mean_nuclear_area_px", "float"),
        ("std_nuclear_area_px", "float"),
        ("mean_hematoxylin", "float"),
        ("mask_uri", "string"),
        ("heatmap_uri", "string"),
        ("classifier_checkpoint", "string"),
        ("segmenter_checkpoint", "string"),
        ("run_id", "string"),
        ("processed_at", "timestamp[us, tz=UTC]"),
    ]
    assert not PREDICTION_SCHEMA.field("path").nullable and not PREDICTION_SCHEMA.field("status").nullable


def test_decode_stage_error_rows_keep_the_documented_kinds():
    """The CPU stage decodes with breakhis_ray.data.decode; a bad input becomes an error row, never raises."""
    from breakhis_ray.inference.decode_stage import BatchDecoder

    good = _encode(np.zeros((30, 40, 3), np.uint8))
    big = _encode(np.zeros((30, 41, 3), np.uint8))  # 1230 px > max_pixels
    decoder = BatchDecoder({"size": [32, 32]}, (16, 16), max_pixels=1200)
    contents = [good, big, b"", b"hello", good[: len(good) // 2], "read_error: file not found"]
    out = decoder([f"p{i}" for i in range(len(contents))], contents, np.zeros(len(contents), np.int32))
    assert out["_ok"].tolist() == [True, False, False, False, False, False]
    assert (int(out["_height"][0]), int(out["_width"][0])) == (30, 40)
    assert out["_image"].shape == (6, 32, 32, 3) and out["_seg"].shape == (6, 16, 16, 3)
    kinds = [str(e).split(": ")[0] for e in out["_error"][1:]]
    assert kinds == ["too_large", "empty", "not_an_image", "decode_error", "read_error"]
    assert str(out["_error"][4]).startswith("decode_error: truncated: ")


def test_plain_loop_matches_preprocess_bytes(checkpoints, tree):
    """Predictor.from_checkpoint without Ray == the checkpoint's model on preprocess_bytes."""
    from breakhis_ray.checkpoint import load_model
    from breakhis_ray.data.transforms import PreprocessSpec, preprocess_bytes
    from breakhis_ray.inference import PREDICTION_SCHEMA, Predictor

    model, meta = load_model(checkpoints["classifier"])
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    predictor = Predictor.from_checkpoint(checkpoints["classifier"])
    paths = sorted(str(tree / rel) for rel in GOOD)
    got = predictor.predict_uris(paths)
    assert got.schema.equals(PREDICTION_SCHEMA)
    assert got.column("status").to_pylist() == ["ok"] * len(paths)
    with torch.no_grad():
        x = torch.from_numpy(preprocess_bytes([Path(p).read_bytes() for p in paths], spec))
        want = torch.softmax(model(x), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(got.column("prob_malignant").to_numpy(), want, atol=1e-5)
    assert got.column("nuclei_count").null_count == len(paths)  # no segmenter: features are null


def test_decoding_predictor_reads_decodes_and_predicts_a_call_in_model_batches(checkpoints, tree):
    """Without Ray: a call of paths (bad files included) is decoded and predicted 3 images at a time and comes back
    as one table, row for row what the plain Predictor gives for the same files."""
    from breakhis_ray.inference import DecodingPredictor, Predictor, resolve_sizes

    prep, _ = resolve_sizes(checkpoints["classifier"], None)
    decoding = DecodingPredictor(checkpoints["classifier"], units="images", batch_rows=3,
                                 decode={"preprocessing": prep, "segment_size": None, "max_pixels": MAX_PIXELS})
    paths = sorted(str(tree / rel) for rel in EXPECTED)
    batches = list(decoding.decoded_batches({"path": np.asarray(paths, dtype=object),
                                             "_chunk": np.arange(len(paths), dtype=np.int32)}))
    assert [len(b["path"]) for b in batches] == [3] * (len(paths) // 3) + ([len(paths) % 3] if len(paths) % 3 else [])
    got = decoding({"path": np.asarray(paths, dtype=object), "_chunk": np.full(len(paths), 7, dtype=np.int32)})
    want = Predictor.from_checkpoint(checkpoints["classifier"]).predict_uris(paths, max_pixels=MAX_PIXELS)
    assert got.column("path").to_pylist() == paths and set(got.column("_chunk").to_pylist()) == {7}
    assert got.column("status").to_pylist() == want.column("status").to_pylist()
    assert got.column("error").to_pylist() == want.column("error").to_pylist()
    np.testing.assert_allclose(got.column("prob_malignant").to_numpy(zero_copy_only=False),
                               want.column("prob_malignant").to_numpy(zero_copy_only=False), atol=1e-6)
    with pytest.raises(ValueError, match="units"):
        DecodingPredictor(checkpoints["classifier"], units="rows", decode={"preprocessing": prep})


def test_guided_classifier_gets_its_training_guidance(tmp_path, tree):
    """A classifier trained with the nuclei mask as 4th channel gets the same mask at inference."""
    from breakhis_ray.checkpoint import load_model, save_checkpoint
    from breakhis_ray.data.transforms import PreprocessSpec, normalize, prepare_bytes
    from breakhis_ray.inference import Predictor
    from breakhis_ray.models import create_model
    from breakhis_ray.segmentation.guided import stage_for_checkpoint

    torch.manual_seed(1)
    clf = create_model("tiny_cnn", num_classes=2, in_channels=4, width=4)
    ckpt = str(tmp_path / "guided")
    save_checkpoint(ckpt, clf, preprocessing={"size": [32, 32]},
                    config={"guidance": {"method": "threshold", "mode": "channel"}})
    paths = sorted(str(tree / rel) for rel in GOOD if not rel.startswith("odd/"))
    got = Predictor.from_checkpoint(ckpt).predict_uris(paths)
    model, meta = load_model(ckpt)
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    tiles = prepare_bytes([Path(p).read_bytes() for p in paths], spec)
    guided = stage_for_checkpoint(ckpt).transform(tiles)
    x = normalize(np.concatenate([guided["image"], guided["mask"][..., None]], axis=-1), spec)
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x)), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(got.column("prob_malignant").to_numpy(), want, atol=1e-5)
    # a 4-channel classifier without saved guidance cannot be fed
    save_checkpoint(str(tmp_path / "bare4"), clf, preprocessing={"size": [32, 32]})
    with pytest.raises(ConfigError, match="input channels"):
        Predictor.from_checkpoint(str(tmp_path / "bare4"))


def test_config_rejects_typos():
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(InferConfig, None, ["batchsize=4"], {"input": "a", "out": "b", "classifier": "c"})


def test_decode_tasks_are_sized_from_the_cores():
    """decode_num_cpus null: the CPUs the model actors leave are split into decode tasks of at most one core that
    fill them (2 cores beside one 0.5-CPU actor: 2 tasks of 0.75); a given value wins; no count: the fallback."""
    from breakhis_ray.data.cpu_share import FALLBACK_DECODE_CPUS
    from breakhis_ray.inference.plan import plan_stages

    cfg = load_config(InferConfig, None, [], {"input": "a", "out": "b", "classifier": "c",
                                              "decode_placement": "tasks"})
    assert cfg.decode_num_cpus is None and cfg.num_cpus is None and cfg.concurrency is None
    two = plan_stages(cfg, 2.0)
    assert (two.decode_num_cpus, two.decode_tasks, two.sized_from) == (0.75, 2, "cores")
    assert (two.placement, two.actors, two.actor_cpus, two.tasks_in_flight) == ("tasks", 1, 0.5, 8)
    for cpus in (1, 2, 3, 4, 7, 16, 96):
        for over in ({}, {"num_cpus": 1.0}, {"concurrency": 2, "num_cpus": 2.0}):
            stages = plan_stages(cfg.model_copy(update=over), float(cpus))
            if stages.sized_from == "cores":
                assert 0 < stages.decode_num_cpus <= 1.0
                used = stages.decode_tasks * stages.decode_num_cpus + stages.model_cpus
                assert used <= cpus + 1e-9 and used + stages.decode_num_cpus > cpus, (cpus, over, stages)
            else:  # the actors leave nothing: one decode task at a time, as before
                assert stages.model_cpus >= cpus and stages.decode_num_cpus == FALLBACK_DECODE_CPUS
    assert plan_stages(cfg, None).decode_num_cpus == FALLBACK_DECODE_CPUS
    given = plan_stages(cfg.model_copy(update={"decode_num_cpus": 0.5}), 2.0)
    assert (given.decode_num_cpus, given.decode_tasks, given.sized_from) == (0.5, 3, "config")


def test_decode_tasks_are_capped_at_the_plan_only_on_a_fixed_size_cluster():
    """A Ray instance this process started cannot grow: decode tasks are capped at the planned count. A joined
    cluster may (autoscaler): no cap, unless the config sets one; an unknown CPU count gives no cap either."""
    from breakhis_ray.inference.plan import plan_stages

    cfg = load_config(InferConfig, None, [], {"input": "a", "out": "b", "classifier": "c",
                                              "decode_placement": "tasks"})
    assert cfg.decode_concurrency is None
    for cpus in (2.0, 3.0, 16.0):
        fixed, joined = plan_stages(cfg, cpus, fixed_size=True), plan_stages(cfg, cpus)
        assert fixed.decode_concurrency == fixed.decode_tasks == joined.decode_tasks
        assert joined.decode_concurrency is None
        assert fixed.as_dict()["decode_concurrency"] == fixed.decode_tasks
    given = cfg.model_copy(update={"decode_num_cpus": 0.5})
    assert plan_stages(given, 2.0, fixed_size=True).decode_concurrency == 3
    assert plan_stages(cfg, None, fixed_size=True).decode_concurrency is None
    capped = cfg.model_copy(update={"decode_concurrency": 5})
    assert plan_stages(capped, 2.0).decode_concurrency == 5
    assert plan_stages(capped, 2.0, fixed_size=True).decode_concurrency == 5


def test_decode_runs_in_the_actors_on_cpu_and_in_tasks_beside_gpus():
    """auto: on CPU each actor decodes its own batches, one 1-CPU actor per core, two batches queued at each;
    GPU actors, or decode tasks sized in the config, keep the separate decode tasks. Explicit settings win;
    sizing decode tasks while asking for none is refused."""
    from breakhis_ray.inference.plan import decode_placement, plan_stages

    base = {"input": "a", "out": "b", "classifier": "c"}
    cfg = load_config(InferConfig, None, [], base)
    assert cfg.decode_placement == "auto" and decode_placement(cfg) == "actors"
    for cpus in (1.0, 2.0, 3.0, 16.0):
        stages = plan_stages(cfg, cpus, fixed_size=True)
        assert (stages.placement, stages.actors, stages.actor_cpus) == ("actors", int(cpus), 1.0)
        assert stages.model_cpus == cpus and stages.decode_tasks == 0 and stages.decode_concurrency is None
        assert stages.torch_threads == 1 and stages.tasks_in_flight == 2 and stages.sized_from == "cores"
    assert (plan_stages(cfg, None).actors, plan_stages(cfg, None).sized_from) == (1, "fallback")
    # an actor call holds up to 128 images, at most a quarter of each actor's share, so the actors end together
    two = plan_stages(cfg, 2.0)
    assert [two.call_images(n) for n in (1, 7, 160, 1024, 2560)] == [1, 1, 20, 128, 128]
    assert plan_stages(cfg.model_copy(update={"decode_batch_size": 8}), 2.0).call_images(2560) == 8
    tasks = plan_stages(cfg.model_copy(update={"decode_placement": "tasks"}), 2.0)
    assert [tasks.call_images(n) for n in (1, 2560)] == [32, 32]  # a decode task's size does not shrink
    two_threads = plan_stages(cfg.model_copy(update={"num_cpus": 2.0}), 5.0)
    assert (two_threads.actors, two_threads.torch_threads) == (2, 2)
    given = plan_stages(cfg.model_copy(update={"concurrency": 3, "max_tasks_in_flight_per_actor": 4}), 2.0)
    assert (given.actors, given.sized_from, given.tasks_in_flight) == (3, "config", 4)
    for over in ({"num_gpus": 1.0}, {"decode_num_cpus": 0.5}, {"decode_concurrency": 2},
                 {"decode_placement": "tasks"}):
        assert decode_placement(cfg.model_copy(update=over)) == "tasks", over
    assert decode_placement(cfg.model_copy(update={"num_gpus": 1.0, "decode_placement": "actors"})) == "actors"
    with pytest.raises(ConfigError, match="decode_num_cpus"):
        load_config(InferConfig, None, ["decode_placement=actors", "decode_num_cpus=0.5"], base)


# ------------------------------------------------------------------------------------------ ray tier
@pytest.mark.ray
def test_a_capped_decode_stage_runs_without_ray_datas_reservation_and_actors_queue_batches(
        ray_session, checkpoints, tree, tmp_path):
    """The session's Ray is one this process started: ``infer`` caps its decode tasks at the plan and turns
    Ray Data's per-operator reservation off (it held decode below the cap); uncapped, the reservation stays."""
    from breakhis_ray.inference import build_dataset, plan_inputs, resolve_sizes
    from breakhis_ray.inference.driver import cluster_stage_plan, model_stage_args
    from breakhis_ray.ray_utils import fixed_size_cluster

    assert fixed_size_cluster()
    cfg = _cfg(str(tree), str(tmp_path / "out"), checkpoints["classifier"])
    stages = cluster_stage_plan(cfg)
    assert stages.decode_concurrency == stages.decode_tasks >= 1
    plan = plan_inputs(cfg)
    prep, seg_size = resolve_sizes(cfg.classifier, cfg.segmenter)
    capped = build_dataset(cfg, plan, range(plan.n_chunks), prep, seg_size, "run", stages)
    assert capped.context.op_resource_reservation_enabled is False
    free = dataclasses.replace(stages, decode_concurrency=None)
    uncapped = build_dataset(cfg, plan, range(plan.n_chunks), prep, seg_size, "run", free)
    assert uncapped.context.op_resource_reservation_enabled is True
    model_stage = model_stage_args(cfg, seg_size, "run", stages)  # what build_dataset gives the Predictor stage
    assert model_stage["compute"].max_tasks_in_flight_per_actor == stages.tasks_in_flight == 8
    assert model_stage["batch_size"] == cfg.batch_size and model_stage["num_cpus"] == cfg.num_cpus
    assert len(capped.take_all()) == len(plan.paths)  # the capped plan runs and keeps every input


@pytest.mark.ray
def test_decode_is_its_own_stage(ray_session, checkpoints, tree, tmp_path, capsys):
    """CPU decode tasks and the fused segmenter + classifier actors stay separate Ray Data operators."""
    from breakhis_ray.inference import build_dataset, plan_inputs, resolve_sizes

    cfg = _cfg(str(tree), str(tmp_path / "out"), checkpoints["classifier"], checkpoints["unet"])
    plan = plan_inputs(cfg)
    assert plan.mode == "images" and len(plan.paths) == len(EXPECTED)  # notes.txt is not an input
    prep, seg_size = resolve_sizes(cfg.classifier, cfg.segmenter)
    assert tuple(prep["size"]) == (32, 32) and seg_size == (64, 64)
    build_dataset(cfg, plan, range(plan.n_chunks), prep, seg_size, "run").explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(Predictor)]" in physical
    assert "TaskPoolMapOperator[MapBatches(read_and_decode)]" in physical


def _actors_cfg(inp: str, out: str, classifier: str, segmenter: str | None = None, **over) -> InferConfig:
    """As :func:`_cfg`, with decode in the actors and the actors planned from the session's cores."""
    return _cfg(inp, out, classifier, segmenter, decode_placement="actors", decode_num_cpus=None, num_cpus=None,
                concurrency=None, **over)


@pytest.mark.ray
def test_decoding_actors_are_the_only_stage(ray_session, checkpoints, tree, tmp_path, capsys):
    """With decode in the actors the plan is one actor-pool operator; no decode task is scheduled."""
    from breakhis_ray.inference import build_dataset, plan_inputs, resolve_sizes
    from breakhis_ray.inference.driver import cluster_stage_plan, model_stage_args

    cfg = _actors_cfg(str(tree), str(tmp_path / "out"), checkpoints["classifier"], checkpoints["unet"])
    stages = cluster_stage_plan(cfg)
    assert stages.placement == "actors" and stages.actors >= 1 and stages.actor_cpus == 1.0
    plan = plan_inputs(cfg)
    prep, seg_size = resolve_sizes(cfg.classifier, cfg.segmenter)
    build_dataset(cfg, plan, range(plan.n_chunks), prep, seg_size, "run").explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "MapBatches(DecodingPredictor)" in physical and "read_and_decode" not in physical
    model_stage = model_stage_args(cfg, seg_size, "run", stages, decode={"preprocessing": prep}, units="shards")
    assert model_stage["batch_size"] == 1 and model_stage["fn_constructor_kwargs"]["units"] == "shards"
    assert model_stage["compute"].max_tasks_in_flight_per_actor == 2


@pytest.mark.ray
def test_decoding_actors_give_the_rows_of_decode_tasks(full_run, tree, checkpoints, tmp_path):
    """Every input, error rows with their reasons, features and probabilities equal to the decode-task run."""
    from breakhis_ray.inference import read_predictions, run_infer

    _, reference, want = full_run
    out = str(tmp_path / "out")
    summary = run_infer(_actors_cfg(str(tree), out, checkpoints["classifier"], checkpoints["unet"],
                                    write_masks=True))
    table = read_predictions(out)
    assert summary["complete"] and (summary["ok"], summary["error"]) == (reference["ok"], reference["error"])
    assert summary["stages"]["placement"] == "actors" and reference["stages"]["placement"] == "tasks"
    got, expected = _rel(table, str(tree)), _rel(want, str(tree))
    assert set(got) == set(expected) == set(EXPECTED)
    for rel, row in got.items():
        ref = expected[rel]
        assert (row["status"], row["error"], row["nuclei_count"]) == (ref["status"], ref["error"],
                                                                      ref["nuclei_count"]), rel
        if row["status"] == "ok":
            assert row["prob_malignant"] == pytest.approx(ref["prob_malignant"], abs=1e-6)
            assert row["mean_hematoxylin"] == pytest.approx(ref["mean_hematoxylin"], abs=1e-5)
    assert sum(1 for u in table.column("mask_uri").to_pylist() if u) == len(GOOD)


@pytest.fixture(scope="module")
def full_run(ray_session, checkpoints, tree, tmp_path_factory):
    """One uninterrupted run with the U-Net: the reference for the resume test."""
    from breakhis_ray.inference import read_predictions, run_infer

    out = str(tmp_path_factory.mktemp("full") / "out")
    summary = run_infer(_cfg(str(tree), out, checkpoints["classifier"], checkpoints["unet"], write_masks=True))
    return out, summary, read_predictions(out)


@pytest.mark.ray
def test_one_row_per_input_with_statuses(full_run, tree, checkpoints):
    from breakhis_ray.inference import PREDICTION_SCHEMA

    out, summary, table = full_run
    rows = _rel(table, str(tree))
    assert {k: v["status"] for k, v in rows.items()} == EXPECTED
    assert summary["total"] == len(EXPECTED) and summary["complete"]
    assert summary["ok"] == len(GOOD) and summary["error"] == len(BAD) and summary["skipped_done"] == 0
    assert table.num_rows == len(set(table.column("path").to_pylist()))
    for rel, row in rows.items():
        if row["status"] == "ok":
            assert row["error"] is None and 0.0 <= row["prob_malignant"] <= 1.0
            assert row["pred_label"] in ("benign", "malignant")
            assert row["nuclei_count"] is not None and row["mean_hematoxylin"] is not None
            assert row["image_height"] > 0 and row["image_width"] > 0
        else:
            assert row["error"] and row["prob_malignant"] is None and row["pred_label"] is None
            assert row["nuclei_count"] is None
        assert row["classifier_checkpoint"] == checkpoints["classifier"]
        assert row["segmenter_checkpoint"] == checkpoints["unet"]
    assert rows["odd/bomb.png"]["error"].startswith("too_large")
    assert rows["odd/zero_bytes.png"]["error"].startswith("empty")
    assert rows["odd/text_as.png"]["error"].startswith("not_an_image")
    assert rows["odd/truncated.png"]["error"].startswith("decode_error")
    b = rows["benign/SOB_B_A-14-22549AB-40-001.png"]
    assert (b["patient_id"], b["magnification"], b["label"]) == ("SOB_B_A_14-22549AB", 40, "benign")
    m = rows["malignant/SOB_M_LC-14-12204-400-004.jpg"]
    assert (m["patient_id"], m["magnification"], m["label"]) == ("SOB_M_LC_14-12204", 400, "malignant")
    other = rows["other/slide one.png"]
    assert (other["patient_id"], other["magnification"], other["label"]) == (None, None, None)
    # masks beside the output, one per ok row
    masks = [u for u in table.column("mask_uri").to_pylist() if u]
    assert len(masks) == len(GOOD)
    assert np.asarray(Image.open(masks[0])).shape == (64, 64)
    # beside the output
    assert (Path(out) / "config.yaml").is_file()
    versions = json.loads((Path(out) / "versions.json").read_text())
    assert {"python", "torch", "ray", "breakhis_ray"} <= set(versions)
    # every part is a complete, schema-conformant Parquet file
    for part in sorted((Path(out) / "predictions").glob("part-*.parquet")):
        assert pq.read_schema(part).remove_metadata().equals(
            PREDICTION_SCHEMA)


@pytest.mark.ray
def test_job_matches_plain_loop(full_run, tree, checkpoints):
    """The Ray job's probabilities equal the model applied directly to preprocess_bytes (1e-5)."""
    from breakhis_ray.checkpoint import load_model
    from breakhis_ray.data.transforms import PreprocessSpec, preprocess_bytes

    _, _, table = full_run
    ok = table.filter(pa.compute.equal(table.column("status"), "ok"))
    model, meta = load_model(checkpoints["classifier"])
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    paths = ok.column("path").to_pylist()
    with torch.no_grad():
        x = torch.from_numpy(preprocess_bytes([Path(p).read_bytes() for p in paths], spec))
        want = torch.softmax(model(x), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(ok.column("prob_malignant").to_numpy(), want, atol=1e-5)


@pytest.mark.ray
def test_stop_after_max_chunks_and_resume_gives_the_same_rows(full_run, tree, checkpoints, tmp_path):
    """A clean stop (``max_chunks``), a leftover temp file and a lost part: the re-run fills exactly the gaps.
    (A real SIGKILL mid-run: :func:`test_sigkill_mid_run_then_rerun_gives_an_uninterrupted_runs_rows`.)"""
    from breakhis_ray.inference import read_predictions, run_infer

    _, _, reference = full_run
    out = str(tmp_path / "out")
    cfg = _cfg(str(tree), out, checkpoints["classifier"], checkpoints["unet"], write_masks=True)
    first = run_infer(cfg.model_copy(update={"max_chunks": 2}))  # "killed" after two of four parts
    assert first["chunks_written"] == 2 and not first["complete"] and first["chunks_remaining"] == 2
    assert read_predictions(out).num_rows == 8
    # a crash during a write leaves only a hidden temp file, never a partial part; and a finished part is lost
    (Path(out) / "predictions" / ".part-00002.parquet.tmp-dead").write_bytes(b"partial")
    (Path(out) / "predictions" / "part-00000.parquet").unlink()
    second = run_infer(cfg)
    assert second["complete"] and second["skipped_done"] == 4 and second["chunks_written"] == 3
    assert second["processed"] == len(EXPECTED) - 4
    third = run_infer(cfg)  # nothing left to do
    assert third["processed"] == 0 and third["skipped_done"] == len(EXPECTED) and third["complete"]
    table = read_predictions(out)
    assert table.num_rows == len(EXPECTED) == len(set(table.column("path").to_pylist()))
    got, want = _rel(table, str(tree)), _rel(reference, str(tree))
    assert got.keys() == want.keys()
    for key in want:
        for col, value in want[key].items():
            if isinstance(value, float):
                assert got[key][col] == pytest.approx(value, abs=1e-6), (key, col)
            else:
                assert got[key][col] == value, (key, col)
    # other settings in the same --out are refused instead of mixed
    with pytest.raises(ConfigError, match="already holds predictions"):
        run_infer(cfg.model_copy(update={"chunk_size": 5}))


def _rows_by_path(out: str, root: str) -> dict[str, dict]:
    """Every row of ``out``'s predictions by input path relative to ``root``, all columns but the run's id and
    timestamp; ``mask_uri`` relative to ``out``, plus the mask file's bytes."""
    from breakhis_ray.inference import read_predictions

    rows = {}
    for row in sorted(read_predictions(out).to_pylist(), key=lambda r: r["path"]):
        rel = row.pop("path")[len(root.rstrip("/")) + 1:]
        assert rel not in rows, f"duplicate row for {rel}"
        row.pop("run_id"), row.pop("processed_at")
        mask = row.pop("mask_uri")
        if mask is not None:
            assert mask.startswith(out.rstrip("/") + "/"), mask
            row["mask"] = (mask[len(out.rstrip("/")) + 1:], Path(mask).read_bytes())
        rows[rel] = row
    return rows


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_an_uninterrupted_runs_rows(ray_session, checkpoints, tree, tmp_path):
    """``python -m breakhis_ray.cli infer`` in a subprocess, with its own local Ray, gets SIGKILL (its whole
    process group and every Ray process it started) once its first part is written and before its last; the
    re-run in the same ``out`` completes, and the rows equal an uninterrupted run's, values and masks included.

    The killed run's Ray processes carry a tag in their environment and use a private temp dir
    (``tests/localcluster.py``); only they are signalled, ``ray stop`` never runs.
    """
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from localcluster import cluster_env, new_tag, stop_tagged, tagged_pids

    from breakhis_ray import cli
    from breakhis_ray.inference import run_infer

    # The test tree's 13 inputs (good and bad) plus 27 more tiles, one chunk each: 40 parts to write, so the
    # run is still writing when its first part appears.
    images = tmp_path / "images"
    shutil.copytree(tree, images)
    rng = np.random.default_rng(1)
    for i in range(27):
        (images / "more" / f"tile_{i:02d}.png").parent.mkdir(exist_ok=True)
        (images / "more" / f"tile_{i:02d}.png").write_bytes(_encode(_tissue(rng, 56 + i % 5, 72)))
    n_inputs = len(EXPECTED) + 27
    settings = {"input": str(images), "classifier": checkpoints["classifier"], "segmenter": checkpoints["unet"],
                "write_masks": True, "max_pixels": MAX_PIXELS, "chunk_size": 1, "batch_size": 1,
                "decode_batch_size": 1, "decode_num_cpus": 0.5, "num_cpus": 0.5, "concurrency": 1}
    reference_out = str(tmp_path / "uninterrupted")
    reference = run_infer(load_config(InferConfig, None, [], {**settings, "out": reference_out}))
    assert reference["complete"] and reference["chunks"] == n_inputs

    out = tmp_path / "killed"
    overrides = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in {**settings, "out": out}.items()]
    tag, ray_tmp = new_tag(), tempfile.mkdtemp(prefix="brkill-", dir="/tmp")  # short: Ray's socket paths
    log_path = tmp_path / "killed-run.log"
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "breakhis_ray.cli", "infer", *overrides, "ray.num_cpus=2",
                 "ray.dashboard=false"],
                cwd=str(Path(__file__).resolve().parents[1]), env=cluster_env(tag, RAY_TMPDIR=ray_tmp),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            parts: list[Path] = []
            while not parts:  # the per-test timeout bounds this wait
                if proc.poll() is not None:
                    pytest.fail(f"infer exited ({proc.returncode}) before writing a part:\n"
                                f"{log_path.read_text(errors='replace')[-4000:]}")
                time.sleep(0.01)
                parts = sorted((out / "predictions").glob("part-*.parquet"))
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and its process group ...
            for pid in tagged_pids(tag, cmdline_marker=ray_tmp):  # ... and every Ray process it started
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
    finally:
        stop_tagged(tag, cmdline_marker=ray_tmp)
        leftover = tagged_pids(tag, cmdline_marker=ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leftover, f"processes of the killed run survived: {leftover}"
    assert proc.returncode == -signal.SIGKILL
    survived = sorted((out / "predictions").glob("part-*.parquet"))
    assert 1 <= len(survived) < n_inputs, f"killed after {len(survived)} of {n_inputs} parts"
    print(f"[infer-kill] SIGKILL after {len(survived)} of {n_inputs} parts were written")
    assert not (out / "summary.json").exists()  # it never finished
    for part in survived:  # a kill leaves whole parts only (at most a hidden temp file besides them)
        assert pq.read_table(part).num_rows == 1

    # The re-run, through the same CLI, in the same out: only the missing chunks, then every row once.
    assert cli.main(["infer", *overrides]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["chunks_skipped"] == len(survived)
    assert summary["chunks_written"] == n_inputs - len(survived) and summary["processed"] == n_inputs - len(survived)
    got, want = _rows_by_path(str(out), str(images)), _rows_by_path(reference_out, str(images))
    assert len(want) == n_inputs and sorted(got) == sorted(want)
    assert {rel: want[rel]["status"] for rel in EXPECTED} == EXPECTED
    for rel, row in want.items():
        for col, value in row.items():
            if isinstance(value, float):
                assert got[rel][col] == pytest.approx(value, abs=1e-6), (rel, col)
            else:
                assert got[rel][col] == value, (rel, col)


@pytest.mark.ray
def test_manifest_input_with_threshold_segmenter(ray_session, checkpoints, tree, tmp_path):
    """A manifest Parquet (column path; duplicates count once) and the classical segmenter's features."""
    from breakhis_ray.inference import read_predictions, run_infer

    manifest = tmp_path / "manifest.parquet"
    paths = [str(tree / rel) for rel in EXPECTED]
    pq.write_table(pa.table({"path": paths + paths[:2]}), manifest)
    out = str(tmp_path / "out")
    summary = run_infer(_cfg(str(manifest), out, checkpoints["classifier"], "threshold", chunk_size=100,
                             decode_num_cpus=None, decode_placement="tasks"))  # tasks sized from the cores
    table = read_predictions(out)
    assert summary["mode"] == "manifest" and summary["ok"] == len(GOOD) and table.num_rows == len(EXPECTED)
    assert {k: v["status"] for k, v in _rel(table, str(tree)).items()} == EXPECTED
    ok = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert all(r["segmenter_checkpoint"] == "threshold" for r in table.to_pylist())
    assert all(r["nuclei_count"] is not None and r["nuclear_area_fraction"] is not None for r in ok)
    assert sum(r["nuclei_count"] for r in ok) > 0  # the blobs are found
    assert all(0.0 <= r["nuclear_area_fraction"] <= 1.0 and r["mean_hematoxylin"] >= 0.0 for r in ok)
    assert all(r["mask_uri"] is None for r in ok)


@pytest.mark.ray
def test_parquet_shards_input(ray_session, checkpoints, tree, tmp_path, full_run):
    """prepare-style shards (image bytes + path; augmented copies skipped; other Parquet files ignored), decoded
    in the actors, give the probabilities of the image tree through decode tasks."""
    from breakhis_ray.inference import read_predictions, run_infer

    good = sorted(rel for rel in GOOD if not rel.startswith("odd/"))
    shard_dir = tmp_path / "prep" / "shards"
    shard_dir.mkdir(parents=True)
    rows = [{"path": str(tree / rel), "image": (tree / rel).read_bytes(), "augmentation": None} for rel in good]
    rows.append({"path": str(tree / good[0]) + "#aug=hflip", "image": rows[0]["image"], "augmentation": "hflip"})
    rows.append({"path": "s3://elsewhere/broken.png", "image": b"\x89PNG broken", "augmentation": None})
    schema = pa.schema([("path", pa.string()), ("image", pa.binary()), ("augmentation", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows[:3], schema), shard_dir / "part-00000.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(rows[3:], schema), shard_dir / "part-00001.parquet")
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "prep" / "manifest.parquet")  # not an input
    out = str(tmp_path / "out")
    summary = run_infer(_actors_cfg(str(tmp_path / "prep"), out, checkpoints["classifier"], chunk_size=3))
    table = read_predictions(out)
    assert summary["mode"] == "shards" and table.num_rows == len(good) + 1 and summary["chunks"] == 3
    status = dict(zip(table.column("path").to_pylist(), table.column("status").to_pylist()))
    assert status.pop("s3://elsewhere/broken.png") == "error"
    assert set(status.values()) == {"ok"}
    # the same images give the same probabilities whichever way they came in
    _, _, reference = full_run
    want = dict(zip(reference.column("path").to_pylist(), reference.column("prob_malignant").to_pylist()))
    for path, prob in zip(table.column("path").to_pylist(), table.column("prob_malignant").to_pylist()):
        if path in want:
            assert prob == pytest.approx(want[path], abs=1e-6)


@pytest.mark.ray
@pytest.mark.s3
def test_s3_in_and_out(ray_session, s3_server, checkpoints, tree):
    """Images and checkpoints read from S3 (by the decoding actors), predictions written to S3, against a real
    local S3 server."""
    from breakhis_ray.inference import read_predictions, run_infer

    root = s3_server.uri("infer-test/images")
    for path in sorted(tree.rglob("*")):
        if path.is_file():
            storage.write_bytes(root + "/" + path.relative_to(tree).as_posix(), path.read_bytes())
    ckpt = s3_server.uri("infer-test/classifier")
    for name in ("meta.json", "model.pt"):
        storage.write_bytes(f"{ckpt}/{name}", (Path(checkpoints["classifier"]) / name).read_bytes())
    out = s3_server.uri("infer-test/out")
    cfg = _actors_cfg(root, out, ckpt, "threshold")
    first = run_infer(cfg.model_copy(update={"max_chunks": 2}))
    assert first["chunks_written"] == 2
    summary = run_infer(cfg)
    assert summary["complete"] and summary["skipped_done"] == 8
    table = read_predictions(out)
    assert {k: v["status"] for k, v in _rel(table, root).items()} == EXPECTED
    assert storage.exists(out + "/config.yaml") and storage.exists(out + "/versions.json")
