"""Ingest benchmark: Parquet shards + Ray Data against a torch DataLoader over loose PNGs, in one run.

Every contender produces the same thing, ``float32 (N, 3, size, size)`` batches of normalised pixels:

* ``ray_shards``: this project's pipeline (:mod:`breakhis_ray.data.pipeline`) over shards holding the
  original PNGs: read Parquet, decode (the fastest installed backend of :mod:`breakhis_ray.data.decode`) +
  resize in Ray tasks, iterate with ``iter_train_batches``;
* ``ray_materialize`` / ``ray_cached_epoch``: the same pass with ``materialize()`` (as training does: the first
  epoch), and a second pass over that cache (every later epoch: no decode);
* ``ray_shards_resized``: the same over shards that ``prepare --resize`` stored at the model size (the
  design lets the one-off preparation pay for the big decode);
* ``dataloader``: ``torch.utils.data.DataLoader`` over the loose PNG files, ``num_workers`` = cores, decode
  with PIL (what users write) + the same resize in the workers;
* ``dataloader_fast``: the same DataLoader with the same fast decoder as ``ray_shards``: the same work on both
  sides, so ``ratio_same_decoder`` compares the two loaders alone;
* ``pil_decode_1core`` / ``fast_decode_1core`` (and ``*_decode_resize_1core``): a plain loop decoding (and
  resizing) the PNG bytes, already in memory, on one core; ``decode_limit`` = the PIL rate times the cores,
  ``fast_decode_resize_limit`` = the fast decode + resize rate times the cores: the hardware limits;
  ``decode_backends_1core``: every installed backend's decode rate on one core.

``images_per_s`` are per pass over the ``N`` images, start-up included (a Ray Data execution pays a fixed
few seconds for listing, planning and scheduling; a DataLoader forks its workers). ``steady_images_per_s``
removes it: the same pass over ``2N`` rows (every shard linked twice; every path listed twice) gives the
marginal rate ``N / (t(2N) - t(N))``. ``ratio_vs_dataloader`` is the steady Ray Data rate over original-PNG
shards against the steady PIL DataLoader; ``ratio_same_decoder`` against the steady DataLoader with the fast
decoder; ``ratios`` holds the others. Each pass runs ``repeats`` times, interleaved, and the fastest counts.

``cpu_ms_per_image``: the CPU time of every process of this run's tree (driver, DataLoader workers, raylet, GCS,
Ray workers), sampled from ``/proc`` while a pass runs, per extra image from N to 2N: what each loader costs
per image whatever other processes do to its wall time (on a shared machine wall-clock rates follow the load;
CPU per image barely does). ``dataloader_vs_ray_shards_cpu_per_image`` > 1: Ray Data spends less CPU per image.

Data: a small synthetic BreakHis (:func:`breakhis_ray.data.synthetic.run_synth`, about ``n_images``
images) prepared twice with :func:`breakhis_ray.data.shards.run_prepare` (``source="synthetic"``), or
smooth random PNGs and shards written here (``source="random"``, faster to make). Either way the N images
lie in :func:`shard_rows`-sized shard files, four per core: the layout the whole BreakHis (7,909 images,
8 shards of ``prepare``'s default 1,000) has on a 2-core machine, so the pipeline reads and decodes with
the parallelism it has on the real dataset (:func:`breakhis_ray.data.read.fused_decode_cpus`) rather
than that of one small file.

Sizes come from :class:`~breakhis_ray.config.BenchIngestSection` (``breakhis-ray bench ingest.n_images=...``;
``python benchmarks/ingest.py`` runs this section alone through the same config).
"""

from __future__ import annotations

import io
import math
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


def shard_rows(n_images: int, cores: int) -> int:
    """Images per shard file of the benchmark's data: ``n_images`` in four files per core."""
    return max(1, math.ceil(n_images / (4 * max(1, cores))))


def _make_synthetic(work: Path, n_images: int, size: int, seed: int,
                    shard_size: int) -> tuple[list[str], str, str]:
    """Synthetic tree + two prepared outputs (original PNGs, PNGs resized to ``size``)."""
    from breakhis_ray.config import PrepareConfig, SynthConfig
    from breakhis_ray.data.shards import run_prepare
    from breakhis_ray.data.synthetic import run_synth

    tree = work / "synthetic"
    run_synth(SynthConfig(out=str(tree), seed=seed, masks=False, folds_files=False, grid=False,
                          **synth_options(n_images, seed)))
    pngs = storage.list_files(str(tree / "BreaKHis_v1"), suffixes=[".png"])
    full, resized = work / "prepared_full", work / "prepared_resized"
    run_prepare(PrepareConfig(root=str(tree), out=str(full), shard_size=shard_size))
    run_prepare(PrepareConfig(root=str(tree), out=str(resized), resize=f"{size}x{size}", shard_size=shard_size))
    return pngs, str(full), str(resized)


def _write_shards(out: Path, rows: list[dict], shard_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from breakhis_ray.data.shards import SHARD_WRITE_OPTIONS

    (out / "shards").mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("path", pa.string()), ("label_id", pa.int8()), ("patient_id", pa.string()), ("magnification", pa.int16()),
        ("image", pa.binary()), ("split", pa.string()), ("augmentation", pa.string()),
    ]))
    options = {key: ({c: v for c, v in value.items() if c in table.column_names} if isinstance(value, dict)
                     else [c for c in value if c in table.column_names]) for key, value in SHARD_WRITE_OPTIONS.items()}
    for part, start in enumerate(range(0, len(rows), shard_size)):
        pq.write_table(table.slice(start, shard_size), out / "shards" / f"part-{part:05d}.parquet", row_group_size=64,
                       **options)


def _make_random(work: Path, n_images: int, size: int, seed: int,
                 shard_size: int) -> tuple[list[str], str, str]:
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
    _write_shards(work / "prepared_full", full_rows, shard_size)
    _write_shards(work / "prepared_resized", small_rows, shard_size)
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
    """Map-style torch dataset: read one PNG file, decode, resize (the classic loader); ``backend="pil"`` is
    what users write (``PIL.Image.open``), ``None`` the same fast decoder as the project's pipeline."""

    def __init__(self, paths: list[str], spec: PreprocessSpec, backend: str | None = "pil"):
        self.paths, self.spec, self.backend = paths, spec, backend

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        with open(self.paths[i], "rb") as f:
            img = resize_uint8(decode_rgb(f.read(), backend=self.backend), self.spec.size)
        return torch.from_numpy(np.ascontiguousarray(img)), i % 2


def _bench_dataloader(paths: list[str], spec: PreprocessSpec, batch_size: int, workers: int,
                      backend: str | None = "pil") -> tuple[int, float]:
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    loader = DataLoader(_LoosePngs(paths, spec, backend), batch_size=batch_size, num_workers=workers, shuffle=False)
    seen = 0
    for images, _ in loader:
        x = normalize(images, spec)
        seen += int(x.shape[0])
    return seen, time.perf_counter() - start


def _bench_decode(paths: list[str], backend: str = "pil", size: int | None = None) -> tuple[int, float]:
    """One core: decode (and with ``size``, resize) the files' bytes, already in memory."""
    blobs = [Path(p).read_bytes() for p in paths]
    start = time.perf_counter()
    for blob in blobs:
        img = decode_rgb(blob, backend=backend)
        if size is not None:
            resize_uint8(img, (size, size))
    return len(blobs), time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- driver
def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` to 3 significant digits (``inf`` for ``b = 0``; ``None`` when either is unknown)."""
    if a is None or b is None:
        return None
    return float(f"{a / b:.3g}") if b > 0 else float("inf")


def _marginal(small: tuple[int, float], large: tuple[int, float]) -> float:
    """Images per second of the extra images of the larger pass (start-up cancels out); falls back to the
    larger pass's own rate when noise makes it no slower than the smaller one."""
    extra_n, extra_s = large[0] - small[0], large[1] - small[1]
    return extra_n / extra_s if extra_s > 0 else large[0] / max(large[1], 1e-9)


def _best(runs: list[tuple[int, float]]) -> tuple[int, float]:
    """The fastest of repeated passes over the same images (load from other processes only slows a pass)."""
    return min(runs, key=lambda r: r[1])


def _cpu_ms_per_image(small: tuple[int, float], large: tuple[int, float]) -> float | None:
    """Marginal CPU milliseconds (all processes of this run's tree) per extra image from N to 2N (``None``
    when the sampling resolution hides it)."""
    extra_n, extra_s = large[0] - small[0], large[1] - small[1]
    return round(1000 * extra_s / extra_n, 2) if extra_n > 0 and extra_s > 0 else None


def run_ingest_benchmark(section: "BenchIngestSection", *, seed: int = 0,
                         workdir: str | None = None) -> dict[str, Any]:
    """Measure images/s of every contender on the same images; returns rates, ratios and the setup.

    ``section`` gives the sizes; ``workdir`` keeps the data (default: a temporary folder, removed after).
    ``profile`` in the result holds Ray Data's per-operator statistics of a ``ray_shards`` pass (text).

    Every streaming contender runs ``repeats`` rounds; a round passes over N then 2N images of each contender
    in turn, so load from other processes falls on all of them alike, and the fastest pass of each size counts.
    """
    import ray
    import torch

    from breakhis_ray.config import RayConfig
    from breakhis_ray.data.decode import backend_rates, resolve_backend
    from breakhis_ray.ray_utils import cpu_count, ensure_ray

    n_images, size, batch_size, source = section.n_images, section.size, section.batch_size, section.source
    decode_num_cpus, decode_batch_size = section.decode_num_cpus, section.decode_batch_size
    if source not in ("synthetic", "random"):
        raise ValueError(f"source must be 'synthetic' or 'random', got {source!r}")
    cores = cpu_count()
    workers = section.workers
    workers = cores if workers is None else workers
    fast = resolve_backend(section.backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="breakhis-ingest-")
        workdir = own_tmp.name
    work = Path(workdir)
    ensure_ray(RayConfig(num_cpus=cores))
    from breakhis_ray.bench.memory import OthersCpu
    from breakhis_ray.data.pipeline import decode_cpus

    decode_num_cpus = decode_cpus(decode_num_cpus)  # null: the one rule of every decode stage

    runs: dict[str, list[tuple[int, float]]] = {}
    cpu: dict[str, list[tuple[int, float]]] = {}

    def record(name: str, result: tuple[int, float]) -> None:
        runs.setdefault(name, []).append(result)

    def timed(name: str, func):
        """Run one streaming pass; record its wall time and the CPU seconds of this run's process tree."""
        with OthersCpu(interval=0.2) as own:
            result = func()
        record(name, result[:2])
        cpu.setdefault(name, []).append((result[0], own.own_seconds))
        return result

    try:
        t0 = time.perf_counter()
        make = _make_synthetic if source == "synthetic" else _make_random
        paths, full, resized = make(work, n_images, size, seed, shard_rows(n_images, cores))
        setup_s = time.perf_counter() - t0
        full_2n, resized_2n = _doubled(full, work / "prepared_full_2n"), _doubled(resized, work / "prepared_resized_2n")

        spec = PreprocessSpec(size=(size, size))
        data_kw = {"decode_num_cpus": decode_num_cpus, "decode_batch_size": decode_batch_size,
                   "decode": {"backend": fast}}
        _bench_ray(resized, spec, batch_size, data_kw)  # warm Ray's worker pool once (not measured)

        sample = paths[: min(len(paths), 48)]
        blobs = [Path(p).read_bytes() for p in sample]
        backends = backend_rates(blobs, repeats=2)
        for _ in range(section.repeats):
            record("pil_decode_1core", _bench_decode(sample, "pil"))
            record("fast_decode_1core", _bench_decode(sample, fast))
            record("pil_decode_resize_1core", _bench_decode(sample, "pil", size))
            record("fast_decode_resize_1core", _bench_decode(sample, fast, size))
            for name, backend in (("dataloader", "pil"), ("dataloader_fast", fast)):
                timed(name, lambda: _bench_dataloader(paths, spec, batch_size, workers, backend))
                timed(f"{name}_2n", lambda: _bench_dataloader(paths + paths, spec, batch_size, workers, backend))
            stats = timed("ray_shards", lambda: _bench_ray(full, spec, batch_size, data_kw))[3]
            timed("ray_shards_2n", lambda: _bench_ray(full_2n, spec, batch_size, data_kw))
            timed("ray_shards_resized", lambda: _bench_ray(resized, spec, batch_size, data_kw))
            timed("ray_shards_resized_2n", lambda: _bench_ray(resized_2n, spec, batch_size, data_kw))
        n, materialize_s, cached_s, _ = _bench_ray(full, spec, batch_size, data_kw, cached=True)
        record("ray_materialize", (n, materialize_s))
        record("ray_cached_epoch", (n, cached_s))
    finally:
        torch.set_num_threads(threads)
        if own_tmp is not None:
            own_tmp.cleanup()
    results = {name: _best(r) for name, r in runs.items()}
    rates = {name: n / max(sec, 1e-9) for name, (n, sec) in results.items() if not name.endswith("_2n")}
    rates["decode_limit"] = rates["pil_decode_1core"] * cores
    rates["fast_decode_limit"] = rates["fast_decode_1core"] * cores
    rates["fast_decode_resize_limit"] = rates["fast_decode_resize_1core"] * cores
    steady = {name: _marginal(results[name], results[f"{name}_2n"])
              for name in ("ray_shards", "ray_shards_resized", "dataloader", "dataloader_fast")}
    cpu_best = {name: min(r, key=lambda x: x[1]) for name, r in cpu.items()}
    cpu_ms = {name: _cpu_ms_per_image(cpu_best[name], cpu_best[f"{name}_2n"])
              for name in ("ray_shards", "ray_shards_resized", "dataloader", "dataloader_fast")}
    dl = rates["dataloader"]
    summary = {
        "n_images": len(paths),
        "shard_rows": shard_rows(n_images, cores),
        "size": size,
        "cores": cores,
        "dataloader_workers": workers,
        "batch_size": batch_size,
        "decode_num_cpus": decode_num_cpus,
        "decode_batch_size": decode_batch_size,
        "decode_backend": fast,
        "repeats": section.repeats,
        "data_source": source,
        "setup_s": round(setup_s, 1),
        "ray_version": ray.__version__,
        "images": {name: n for name, (n, _) in results.items()},
        "seconds": {name: round(sec, 3) for name, (_, sec) in results.items()},
        "images_per_s": {name: round(r, 1) for name, r in rates.items()},
        "steady_images_per_s": {name: round(r, 1) for name, r in steady.items()},
        "decode_backends_1core": backends,
        "cpu_ms_per_image": cpu_ms,
        "ratio_vs_dataloader": _ratio(steady["ray_shards"], steady["dataloader"]),
        "ratio_same_decoder": _ratio(steady["ray_shards"], steady["dataloader_fast"]),
        "ratios": {
            "ray_shards_vs_dataloader_steady": _ratio(steady["ray_shards"], steady["dataloader"]),
            "ray_shards_vs_dataloader_fast_steady": _ratio(steady["ray_shards"], steady["dataloader_fast"]),
            "dataloader_vs_ray_shards_cpu_per_image": _ratio(cpu_ms["dataloader"], cpu_ms["ray_shards"]),
            "dataloader_fast_vs_ray_shards_cpu_per_image": _ratio(cpu_ms["dataloader_fast"], cpu_ms["ray_shards"]),
            "dataloader_fast_vs_dataloader_steady": _ratio(steady["dataloader_fast"], steady["dataloader"]),
            "ray_shards_resized_vs_dataloader_steady": _ratio(steady["ray_shards_resized"], steady["dataloader"]),
            "ray_shards_vs_dataloader": _ratio(rates["ray_shards"], dl),
            "ray_shards_resized_vs_dataloader": _ratio(rates["ray_shards_resized"], dl),
            "ray_cached_epoch_vs_dataloader": _ratio(rates["ray_cached_epoch"], dl),
            "fast_vs_pil_decode_1core": _ratio(rates["fast_decode_1core"], rates["pil_decode_1core"]),
            "ray_shards_steady_vs_decode_limit": _ratio(steady["ray_shards"], rates["decode_limit"]),
            "ray_shards_steady_vs_fast_decode_resize_limit": _ratio(steady["ray_shards"],
                                                                    rates["fast_decode_resize_limit"]),
            "dataloader_steady_vs_decode_limit": _ratio(steady["dataloader"], rates["decode_limit"]),
        },
        "profile": "Ray Data statistics of a ray_shards pass (read, decode, iterate):\n" + stats,
    }
    return summary
