"""Ray Data pipeline over tiny Parquet shards written here in the documented shard schema."""

from __future__ import annotations

import io
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from breakhis_ray.config import DataConfig
from breakhis_ray.data import pipeline, read
from breakhis_ray.data.transforms import normalize
from breakhis_ray.errors import DataError

pytestmark = pytest.mark.ray

SIZE = 16
SCHEMA = pa.schema([
    ("path", pa.string()), ("filename", pa.string()), ("label", pa.string()), ("label_id", pa.int8()),
    ("subtype", pa.string()), ("subtype_code", pa.string()), ("patient_id", pa.string()),
    ("slide_id", pa.string()), ("magnification", pa.int16()), ("seq", pa.int16()),
    ("width", pa.int32()), ("height", pa.int32()), ("image", pa.binary()), ("image_format", pa.string()),
    ("image_width", pa.int32()), ("image_height", pa.int32()), ("fold", pa.int16()), ("split", pa.string()),
    ("source_path", pa.string()), ("augmentation", pa.string()),
])
SPLIT_SIZES = {"train": 12, "val": 6, "test": 6}
N_OFFLINE_AUG = 3


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if i % 7 == 3:
        img = img.convert("L")  # a greyscale file among the RGB ones
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rows() -> list[dict]:
    rows, i = [], 0
    for split, n in SPLIT_SIZES.items():
        for _ in range(n):
            mag, label_id = (40, 100, 200, 400)[i % 4], int(i % 3 == 0)
            label = "malignant" if label_id else "benign"
            name = f"SOB_{'M' if label_id else 'B'}_X-14-{i:05d}-{mag}-{i:03d}.png"
            path = f"/data/{label}/{i:05d}/{mag}X/{name}"
            rows.append(dict(
                path=path, filename=name, label=label, label_id=label_id, subtype="x", subtype_code="X",
                patient_id=f"P{i % 5}", slide_id=f"14-{i:05d}", magnification=mag, seq=i, width=24, height=20,
                image=_png(i), image_format="png", image_width=24, image_height=20, fold=1, split=split,
                source_path=path, augmentation=None,
            ))
            i += 1
    for src in rows[:N_OFFLINE_AUG]:  # offline class-balancing copies, train only
        rows.append({**src, "path": src["path"] + "#aug=hflip", "augmentation": "hflip",
                     "image": _png(1000 + src["seq"])})
    return rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[str, list[dict]]:
    out = tmp_path_factory.mktemp("prepared")
    rows = _rows()
    (out / "shards").mkdir()
    half = len(rows) // 2
    for part, chunk in enumerate([rows[:half], rows[half:]]):
        pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), out / "shards" / f"part-{part:05d}.parquet")
    return str(out), rows


def _cfg(uri: str, **kw) -> DataConfig:
    base = dict(shards=uri, image_size=SIZE, decode_batch_size=4, block_rows=4, augment={"batch_size": 4})
    return DataConfig(**{**base, **kw})


def _expected(rows, split, mags=(40, 100, 200, 400), augmented=True):
    return [r for r in rows if r["split"] == split and r["magnification"] in mags
            and (augmented or r["augmentation"] is None)]


@pytest.fixture(scope="module")
def default_datasets(ray_session, prepared) -> dict:
    return pipeline.build_datasets(_cfg(prepared[0]))


def _by(ds, key: str) -> dict:
    rows = ds.take_all()
    out = {r[key]: r for r in rows}
    assert len(out) == len(rows)
    return out


def test_splits_shapes_labels_and_columns(default_datasets, prepared):
    _, rows = prepared
    ds = default_datasets
    assert set(ds) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        got = ds[split].take_all()
        want = _expected(rows, split)
        assert len(got) == len(want)
        assert sorted(r["label"] for r in got) == sorted(r["label_id"] for r in want)
        assert sorted(r["magnification"] for r in got) == sorted(r["magnification"] for r in want)
        for r in got:
            assert r["image"].shape == (SIZE, SIZE, 3) and r["image"].dtype == np.uint8
    assert set(ds["train"].columns()) == {"image", "label", "magnification", "key", "aug_epoch"}
    assert set(ds["val"].columns()) == {"image", "label", "magnification", "path", "patient_id"}
    assert sorted(_by(ds["test"], "path")) == sorted(r["path"] for r in _expected(rows, "test"))
    assert pipeline.class_counts(ds["train"]) == dict(sorted(Counter(
        r["label_id"] for r in _expected(rows, "train")).items()))


def test_magnification_filter_and_offline_augmented_toggle(ray_session, prepared):
    uri, rows = prepared
    cfg = _cfg(uri, magnifications=["40X", 200], include_augmented=False, materialize=False, shuffle="none",
               augment={"enabled": False})
    ds = pipeline.build_datasets(cfg)
    train = ds["train"].take_all()
    want = _expected(rows, "train", mags=(40, 200), augmented=False)
    assert sorted(r["magnification"] for r in train) == sorted(r["magnification"] for r in want)
    assert sorted(r["label"] for r in train) == sorted(r["label_id"] for r in want)
    # unaugmented, deterministic: the val images are exactly the eval transform of the stored bytes
    val = _by(ds["val"], "path")
    want = _expected(rows, "val", mags=(40, 200))
    assert sorted(val) == sorted(r["path"] for r in want)
    from breakhis_ray.data.transforms import prepare_bytes

    for r in want:
        np.testing.assert_array_equal(val[r["path"]]["image"],
                                      prepare_bytes([r["image"]], pipeline.preprocess_spec(cfg))[0])
        assert val[r["path"]]["label"] == r["label_id"] and val[r["path"]]["patient_id"] == r["patient_id"]


def test_train_augmentation_changes_every_epoch_val_does_not_and_seed_reproduces(ray_session, prepared):
    uri, _ = prepared
    cfg = _cfg(uri, seed=11)
    ds = pipeline.build_datasets(cfg)
    epoch0, epoch1 = _by(ds["train"], "key"), _by(ds["train"], "key")
    assert epoch0.keys() == epoch1.keys()
    changed = sum(not np.array_equal(epoch0[k]["image"], epoch1[k]["image"]) for k in epoch0)
    assert changed >= len(epoch0) - 1
    assert all(epoch0[k]["label"] == epoch1[k]["label"] for k in epoch0)

    val_a, val_b = _by(ds["val"], "path"), _by(ds["val"], "path")
    assert all(np.array_equal(val_a[p]["image"], val_b[p]["image"]) for p in val_a)

    again = _by(pipeline.build_datasets(cfg)["train"], "key")  # same seed, fresh dataset: epoch 0 again
    assert all(np.array_equal(again[k]["image"], epoch0[k]["image"]) for k in epoch0)
    assert {r["aug_epoch"] for r in epoch0.values()} == {0} and {r["aug_epoch"] for r in epoch1.values()} == {1}


def test_a_fresh_dataset_advanced_to_an_epoch_draws_that_epochs_augmentation(ray_session, prepared):
    """What a resumed run relies on: executing a new dataset N times (stopping each at its first batch) puts
    it at epoch N, and a batch of the wrong epoch stops the loop instead of training on it."""
    from breakhis_ray.data.pipeline import advance_epochs

    uri, _ = prepared
    cfg = _cfg(uri, seed=11)
    straight = pipeline.build_datasets(cfg)["train"]
    epochs = [_by(straight, "key") for _ in range(3)]
    resumed = pipeline.build_datasets(cfg)["train"]
    advance_epochs(resumed, 2)
    two = _by(resumed, "key")
    assert {r["aug_epoch"] for r in two.values()} == {2}
    assert all(np.array_equal(two[k]["image"], epochs[2][k]["image"]) for k in two)
    spec = pipeline.preprocess_spec(cfg)
    assert len(list(pipeline.iter_train_batches(resumed, 4, "cpu", spec, epoch=3))) > 0  # its 4th execution
    with pytest.raises(DataError, match=r"augmented for epoch\(s\) \[4\]"):
        list(pipeline.iter_train_batches(resumed, 4, "cpu", spec, epoch=0))


def test_iter_train_batches_yields_normalized_tensors(default_datasets, prepared):
    uri, rows = prepared
    ds = default_datasets  # uint8 rows do not depend on the scale: normalisation happens here
    cfg = _cfg(uri, scale="unit")
    spec = pipeline.preprocess_spec(cfg, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert spec.mean == (0.0, 0.0, 0.0)  # unit scale: plain [0, 1]
    labels, n = [], 0
    for x, y in pipeline.iter_train_batches(ds["val"], 4, "cpu", spec):  # val has string columns
        assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE) and y.dtype == torch.int64
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        labels += y.tolist()
        n += len(x)
    assert sorted(labels) == sorted(r["label_id"] for r in _expected(rows, "val"))
    images = np.stack([r["image"] for r in ds["val"].take_all()])
    total = sum(float(x.sum()) for x, _ in pipeline.iter_train_batches(ds["val"], 4, "cpu", spec))
    assert total == pytest.approx(float(normalize(images, spec).sum()), rel=1e-5)
    with pytest.raises(DataError, match="in_channels"):
        next(pipeline.iter_train_batches(ds["train"], 4, "cpu", spec, in_channels=2))


def test_missing_shards_or_columns_fail_clearly(ray_session, tmp_path: Path, prepared):
    with pytest.raises(DataError, match="no prepared shards"):
        pipeline.build_datasets(_cfg(str(tmp_path / "nowhere")))
    bad = tmp_path / "bad"
    (bad / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"path": ["a"], "image": [b"x"]}), bad / "shards" / "part-00000.parquet")
    with pytest.raises(DataError, match="lack column"):
        pipeline.build_datasets(_cfg(str(bad)))


def test_one_shard_file_is_read_as_blocks_of_about_decode_batch_size_without_repartition(ray_session, tmp_path):
    """A shard file streams out of its read task in blocks of ~``decode_batch_size`` rows (so several decode
    tasks work on one file at once, with no repartition of the file's rows), every row arrives decoded once,
    the read starts no listing task or footer actors (Ray Data's V1 Parquet reader: no new worker processes on
    every execution), and the Ray Data settings changed while the read was planned are restored (the progress
    bar setting, off while the footers are sampled, on the dataset as well)."""
    import os

    from ray.data import DataContext

    from breakhis_ray.data.transforms import PreprocessSpec

    rows = []
    for i in range(16):  # one file of incompressible 96x128 PNGs (~37 kB each)
        arr = np.random.default_rng(i).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        rows.append({**_rows()[0], "path": f"/data/img-{i:02d}.png", "image": buf.getvalue(), "split": "train"})
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "shards" / "part-00000.parquet")
    before = DataContext.get_current().target_max_block_size
    bars_before = DataContext.get_current().enable_progress_bars
    env_before = os.environ.get(read._FOOTER_READERS_ENV)
    v2_before = getattr(DataContext.get_current(), read._PARQUET_V2_FLAG, None)
    cfg = _cfg(str(tmp_path), decode_batch_size=2)
    ds = pipeline.decode_stage(cfg, pipeline.read_split(cfg, None), PreprocessSpec(size=(SIZE, SIZE)), keep=["path"])
    assert DataContext.get_current().target_max_block_size == before
    assert os.environ.get(read._FOOTER_READERS_ENV) == env_before
    assert getattr(DataContext.get_current(), read._PARQUET_V2_FLAG, None) == v2_before
    assert DataContext.get_current().enable_progress_bars == bars_before
    assert ds.context.enable_progress_bars == bars_before
    done = ds.materialize()
    if v2_before is not None:  # this Ray has both readers: the V1 one was planned
        assert "ListFiles" not in done.stats() and "ReadParquet" in done.stats(), done.stats()
    assert sorted(r["path"] for r in done.take_all()) == sorted(r["path"] for r in rows)
    assert done.num_blocks() >= 4, done.num_blocks()  # not one block per file
    assert "Repartition" not in done.stats()


def test_training_decode_tasks_use_the_same_rule_as_infer(ray_session):
    """``data.decode_num_cpus`` null (the default of training, the U-Net's data and the ingest bench): the running
    cluster's CPUs shared by the rule ``infer`` uses beside its actors (no actors here: a core per task on a
    whole-core cluster, and never more tasks than cores); a given value wins."""
    import ray

    from breakhis_ray.config import DataConfig, SegDataConfig
    from breakhis_ray.data.cpu_share import share_cpus

    assert DataConfig(shards="x").decode_num_cpus is None and SegDataConfig(root="x").decode_num_cpus is None
    cpus = ray.cluster_resources()["CPU"]
    per_task, tasks = share_cpus(cpus)
    assert pipeline.decode_cpus(None) == per_task
    assert tasks * per_task <= cpus + 1e-9 and tasks == math.ceil(cpus - 1e-9)
    assert share_cpus(1.5) == (0.75, 2) and share_cpus(0.1) is None
    assert pipeline.decode_cpus(0.3) == 0.3


def _decoded_by_path(ds) -> dict[str, np.ndarray]:
    return {r["path"]: r["image"] for r in ds.take_all()}


def test_a_file_per_decode_task_reads_and_decodes_each_file_in_one_task_with_the_same_pixels(ray_session, tmp_path):
    """With at least as many shard files as decode tasks fit on the cluster, Ray Data runs read + decode as one
    fused task per file (encoded bytes never cross the object store) and gives the same decoded rows as the
    separate stages (forced here by a read reservation unlike the decode tasks'); with fewer files than that
    the read stays a separate stage, so every core still decodes. Ray Data's per-operator reservation is off
    for these datasets (it held the fused operator to one task on a 2-CPU node)."""
    import ray

    from breakhis_ray.data.transforms import PreprocessSpec

    spec = PreprocessSpec(size=(SIZE, SIZE))
    slots = int(ray.cluster_resources()["CPU"] // pipeline.decode_cpus(None))
    rows = [r for r in _rows() if r["augmentation"] is None]
    (tmp_path / "shards").mkdir()
    files = slots + 1
    for part in range(files):
        chunk = rows[part::files]
        pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), tmp_path / "shards" / f"part-{part:05d}.parquet")

    cfg = _cfg(str(tmp_path))
    assert pipeline.fused_decode_cpus(cfg, files) == pipeline.decode_cpus(None)
    assert pipeline.fused_decode_cpus(cfg, slots - 1) is None
    assert pipeline.fused_decode_cpus(_cfg(str(tmp_path), decode_concurrency=1), files) is None
    split = pipeline.read_split(cfg, "train", keep=["path"])
    assert split.context.op_resource_reservation_enabled is False
    fused = pipeline.decode_stage(cfg, split, spec, keep=["path"]).materialize()
    assert "ReadParquet->MapBatches(DecodeBatch)" in fused.stats(), fused.stats()

    apart_cfg = _cfg(str(tmp_path), read_num_cpus=0.5)
    apart = pipeline.decode_stage(apart_cfg, pipeline.read_split(apart_cfg, "train", keep=["path"]), spec,
                                  keep=["path"]).materialize()
    assert "ReadParquet->MapBatches" not in apart.stats() and "MapBatches(DecodeBatch)" in apart.stats()
    got, want = _decoded_by_path(fused), _decoded_by_path(apart)
    assert sorted(got) == sorted(r["path"] for r in _expected(rows, "train")) == sorted(want)
    for path, image in want.items():
        np.testing.assert_array_equal(got[path], image)
