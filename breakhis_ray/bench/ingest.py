"""Ingest benchmark: Parquet shards + Ray Data against a torch DataLoader over loose PNGs, in one run.

Every contender produces the same thing, ``float32 (N, 3, size, size)`` batches of normalised pixels:

* ``ray_shards``: this project's pipeline (:mod:`breakhis_ray.data.pipeline`) over shards holding the
  original PNGs: read Parquet, decode + resize in Ray tasks, ``materialize()`` (as training does), iterate
  with ``iter_train_batches``: the first epoch;
* ``ray_cached_epoch``: a second pass over that materialized dataset (every later epoch: no decode);
* ``ray_shards_resized``: the same over shards that ``prepare --resize`` stored at the model size (the
  design lets the one-off preparation pay for the big decode);
* ``dataloader``: ``torch.utils.data.DataLoader`` over the loose PNG files, ``num_workers`` = cores,
  the same decode (:mod:`breakhis_ray.data.decode`) + resize in the workers;
* ``pil_decode_1core``: a plain loop decoding the PNG bytes (already in memory) with PIL on one core, and
  ``decode_limit`` = that rate times the cores: the hardware limit for full-size images.

``images_per_s`` are per pass over the ``N`` images, start-up included (a Ray Data execution pays a fixed
few seconds for listing, planning and scheduling; a DataLoader forks its workers). ``steady_images_per_s``
removes it: the same pass over ``2N`` rows (every shard linked twice; every path listed twice) gives the
marginal rate ``N / (t(2N) - t(N))``. ``ratio_vs_dataloader`` is the steady Ray Data rate over original-PNG
shards against the steady DataLoader rate; ``ratios`` holds the others.

Data: a small synthetic BreakHis (:func:`breakhis_ray.data.synthetic.run_synth`, about ``n_images``
images) prepared twice with :func:`breakhis_ray.data.shards.run_prepare` (``source="synthetic"``), or
smooth random PNGs and shards written here (``source="random"``, faster to make).

Sizes come from :class:`~breakhis_ray.config.BenchIngestSection` (``breakhis-ray bench ingest.n_images=...``;
``python benchmarks/ingest.py`` runs this section alone through the same config).
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from breakhis_ray import storage
from breakhis_ray.config import DataConfig
from breakhis_ray.data.decode import decode_rgb
from breakhis_ray.data.transforms import PreprocessSpec, normalize, resize_uint8

if TYPE_CHECKING:  # pragma: no cover
    from breakhis_ray.config import BenchIngestSection


# ------------------------------------------------------------------------------------------- data setup
def synth_options(n_images: int, seed: int) -> dict[str, Any]:
    """``patients`` and ``fraction`` for :class:`~breakhis_ray.config.SynthConfig` giving about ``n_images``
    images (every generated patient has at least one image per magnification)."""
    from breakhis_ray.data.synthetic import select_patients

    patients = None if n_images >= 82 * 4 * 2 else max(16, n_images // 8)
    total = sum(sum(row.counts) for row in select_patients(patients, seed))
    return {"patients": patients, "fraction": min(1.0, max(n_images / total, 1e-4))}


def _make_synthetic(work: Path, n_images: int, size: int, seed: int) -> tuple[list[str], str, str]:
    """Synthetic tree + two prepared outputs (original PNGs, PNGs resized to ``size``)."""
    from breakhis_ray.config import PrepareConfig, SynthConfig
    from breakhis_ray.data.shards import run_prepare
    from breakhis_ray.data.synthetic import run_synth

    tree = work / "synthetic"
    run_synth(SynthConfig(out=str(tree), seed=seed, masks=False, folds_files=False, grid=False,
                          **synth_options(n_images, seed)))
    pngs = storage.list_files(str(tree / "BreaKHis_v1"), suffixes=[".png"])
    full, resized = work / "prepared_full", work / "prepared_resized"
    run_prepare(PrepareConfig(root=str(tree), out=str(full)))
    run_prepare(PrepareConfig(root=str(tree), out=str(resized), resize=f"{size}x{size}"))
    return pngs, str(full), str(resized)


def _write_shards(out: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (out / "shards").mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("path", pa.string()), ("label_id", pa.int8()), ("patient_id", pa.string()), ("magnification", pa.int16()),
        ("image", pa.binary()), ("split", pa.string()), ("augmentation", pa.string()),
    ]))
    for part, start in enumerate(range(0, len(rows), 1000)):
        pq.write_table(table.slice(start, 1000), out / "shards" / f"part-{part:05d}.parquet", row_group_size=64)


def _make_random(work: Path, n_images: int, size: int, seed: int) -> tuple[list[str], str, str]:
    """Smooth random 700x460 PNGs (compressible like tissue) and shards in the shard schema."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tree = work / "pngs"
    tree.mkdir(parents=True, exist_ok=True)
    full_rows, small_rows, paths = [], [], []
    for i in range(n_images):
        coarse = rng.integers(60, 255, (46, 70, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((700, 460), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-6, 7, (460, 700, 3)), 0, 255).astype(np.uint8)
        path = tree / f"img-{i:05d}.png"
        Image.fromarray(noisy).save(path)
        buf = io.BytesIO()
        Image.fromarray(resize_uint8(noisy, (size, size))).save(buf, format="PNG")
        row = dict(path=str(path), label_id=i % 2, patient_id=f"P{i % 10}", magnification=(40, 100, 200, 400)[i % 4],
                   split=("train", "val", "test")[i % 3], augmentation=None)
        full_rows.append({**row, "image": path.read_bytes()})
        small_rows.append({**row, "image": buf.getvalue()})
        paths.append(str(path))
    _write_shards(work / "prepared_full", full_rows)
    _write_shards(work / "prepared_resized", small_rows)
    return paths, str(work / "prepared_full"), str(work / "prepared_resized")


def _doubled(prepared: str, out: Path) -> str:
    """A prepared folder whose ``shards/`` holds every shard of ``prepared`` twice (hard links): 2N rows."""
    parts = sorted((Path(prepared) / "shards").glob("*.parquet"))
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts + parts):
        target = out / "shards" / f"part-{i:05d}.parquet"
        if not target.exists():
            target.hardlink_to(part)
    return str(out)


# ----------------------------------------------------------------------------------------- contenders
def _bench_ray(shards: str, spec: PreprocessSpec, batch_size: int, data_kw: dict, cached: bool = False):
    """``(images, seconds of the first pass, seconds of a second pass or None, Ray Data stats)``: one pass
    reads, decodes, resizes and yields batches of normalised tensors; with ``cached``, the pass also
    materializes (as training does) and a second pass over the cache is timed as well."""
    from breakhis_ray.data import pipeline

    cfg = DataConfig(shards=shards, image_size=spec.size, eval_columns=[], **data_kw)

    def one_pass(ds) -> int:
        seen = 0
        for x, _ in pipeline.iter_train_batches(ds, batch_size, "cpu", spec):
            seen += int(x.shape[0])
        return seen

    start = time.perf_counter()
    ds = pipeline.decode_stage(cfg, pipeline.read_split(cfg, None), spec)
    if cached:
        ds = ds.materialize()
    seen = one_pass(ds)
    first = time.perf_counter() - start
    if not cached:
        return seen, first, None, ds.stats()
    start = time.perf_counter()
    again = one_pass(ds)
    return again, first, time.perf_counter() - start, ds.stats()


class _LoosePngs:
    """Map-style torch dataset: read one PNG file, decode, resize (the classic loader)."""

    def __init__(self, paths: list[str], spec: PreprocessSpec):
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        with open(self.paths[i], "rb") as f:
            img = resize_uint8(decode_rgb(f.read()), self.spec.size)
        return torch.from_numpy(np.ascontiguousarray(img)), i % 2


def _bench_dataloader(paths: list[str], spec: PreprocessSpec, batch_size: int, workers: int) -> tuple[int, float]:
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    loader = DataLoader(_LoosePngs(paths, spec), batch_size=batch_size, num_workers=workers, shuffle=False)
    seen = 0
    for images, _ in loader:
        x = normalize(images, spec)
        seen += int(x.shape[0])
    return seen, time.perf_counter() - start


def _bench_decode(paths: list[str]) -> tuple[int, float]:
    blobs = [Path(p).read_bytes() for p in paths]
    start = time.perf_counter()
    for blob in blobs:
        decode_rgb(blob)
    return len(blobs), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- driver
def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else float("inf")


def _marginal(small: tuple[int, float], large: tuple[int, float]) -> float:
    """Images per second of the extra images of the larger pass (start-up cancels out); falls back to the
    larger pass's own rate when noise makes it no slower than the smaller one."""
    extra_n, extra_s = large[0] - small[0], large[1] - small[1]
    return extra_n / extra_s if extra_s > 0 else large[0] / max(large[1], 1e-9)


def run_ingest_benchmark(section: "BenchIngestSection", *, seed: int = 0,
                         workdir: str | None = None) -> dict[str, Any]:
    """Measure images/s of every contender on the same images; returns rates, ratios and the setup.

    ``section`` gives the sizes; ``workdir`` keeps the data (default: a temporary folder, removed after).
    ``profile`` in the result holds Ray Data's per-operator statistics of the ``ray_shards`` pass (text).
    """
    import ray
    import torch

    from breakhis_ray.config import RayConfig
    from breakhis_ray.ray_utils import cpu_count, ensure_ray

    n_images, size, batch_size, source = section.n_images, section.size, section.batch_size, section.source
    decode_num_cpus, decode_batch_size = section.decode_num_cpus, section.decode_batch_size
    if source not in ("synthetic", "random"):
        raise ValueError(f"source must be 'synthetic' or 'random', got {source!r}")
    cores = cpu_count()
    workers = section.workers
    workers = cores if workers is None else workers
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="breakhis-ingest-")
        workdir = own_tmp.name
    work = Path(workdir)
    ensure_ray(RayConfig(num_cpus=cores))
    try:
        t0 = time.perf_counter()
        make = _make_synthetic if source == "synthetic" else _make_random
        paths, full, resized = make(work, n_images, size, seed)
        setup_s = time.perf_counter() - t0

        spec = PreprocessSpec(size=(size, size))
        data_kw = {"decode_num_cpus": decode_num_cpus, "decode_batch_size": decode_batch_size}
        _bench_ray(resized, spec, batch_size, data_kw)  # warm Ray's worker pool once (not measured)

        results: dict[str, tuple[int, float]] = {
            "pil_decode_1core": _bench_decode(paths),
            "dataloader": _bench_dataloader(paths, spec, batch_size, workers),
            "dataloader_2n": _bench_dataloader(paths + paths, spec, batch_size, workers),
        }
        n, first, cached, stats = _bench_ray(full, spec, batch_size, data_kw, cached=True)
        results["ray_shards"] = (n, first)
        results["ray_cached_epoch"] = (n, cached)
        results["ray_shards_2n"] = _bench_ray(_doubled(full, work / "prepared_full_2n"), spec, batch_size, data_kw)[:2]
        results["ray_shards_resized"] = _bench_ray(resized, spec, batch_size, data_kw)[:2]
        results["ray_shards_resized_2n"] = _bench_ray(_doubled(resized, work / "prepared_resized_2n"), spec,
                                                      batch_size, data_kw)[:2]
    finally:
        torch.set_num_threads(threads)
        if own_tmp is not None:
            own_tmp.cleanup()
    rates = {name: n / max(sec, 1e-9) for name, (n, sec) in results.items() if not name.endswith("_2n")}
    rates["decode_limit"] = rates["pil_decode_1core"] * cores
    steady = {name: _marginal(results[name], results[f"{name}_2n"])
              for name in ("ray_shards", "ray_shards_resized", "dataloader")}
    dl = rates["dataloader"]
    summary = {
        "n_images": len(paths),
        "size": size,
        "cores": cores,
        "dataloader_workers": workers,
        "batch_size": batch_size,
        "decode_num_cpus": decode_num_cpus,
        "decode_batch_size": decode_batch_size,
        "data_source": source,
        "setup_s": round(setup_s, 1),
        "ray_version": ray.__version__,
        "images": {name: n for name, (n, _) in results.items()},
        "seconds": {name: round(sec, 3) for name, (_, sec) in results.items()},
        "images_per_s": {name: round(r, 1) for name, r in rates.items()},
        "steady_images_per_s": {name: round(r, 1) for name, r in steady.items()},
        "ratio_vs_dataloader": _ratio(steady["ray_shards"], steady["dataloader"]),
        "ratios": {
            "ray_shards_vs_dataloader_steady": _ratio(steady["ray_shards"], steady["dataloader"]),
            "ray_shards_resized_vs_dataloader_steady": _ratio(steady["ray_shards_resized"], steady["dataloader"]),
            "ray_shards_vs_dataloader": _ratio(rates["ray_shards"], dl),
            "ray_shards_resized_vs_dataloader": _ratio(rates["ray_shards_resized"], dl),
            "ray_cached_epoch_vs_dataloader": _ratio(rates["ray_cached_epoch"], dl),
            "ray_shards_steady_vs_decode_limit": _ratio(steady["ray_shards"], rates["decode_limit"]),
            "dataloader_steady_vs_decode_limit": _ratio(steady["dataloader"], rates["decode_limit"]),
        },
        "profile": "Ray Data statistics of the ray_shards pass (read, decode, materialize, iterate):\n" + stats,
    }
    return summary
