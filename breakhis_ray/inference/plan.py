"""Input planning for ``infer``: list ``--input`` once, decide what the inputs are, cut them into chunks.

``--input`` may be a local or ``s3://`` tree of image files (any names), the Parquet shards written by
``prepare`` (``<prep>/shards/*.parquet``: ``image`` bytes + ``path``), or a manifest Parquet (column
``path``). Inputs are put in a deterministic order (sorted paths; shard file then row for shards) and cut into
chunks of ``chunk_size``; a chunk is the unit the writer (:mod:`breakhis_ray.inference.writer`) writes and a
re-run skips.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from breakhis_ray import storage
from breakhis_ray.config import InferConfig
from breakhis_ray.data.cpu_share import FALLBACK_DECODE_CPUS, share_cpus
from breakhis_ray.errors import ConfigError, DataError, StorageError
from breakhis_ray.inference.schema import CHUNK_COLUMN


@dataclass
class InputPlan:
    """The ordered inputs of a run and how they are cut into chunks.

    ``mode``: ``images`` (files read one by one), ``manifest`` (same, paths from a Parquet column) or
    ``shards`` (rows of prepare's Parquet shards). ``paths``: every input in processing order.
    ``locations``: for shards, ``(file index, row group, row in group)`` of each input.
    """

    mode: str
    paths: list[str]
    chunk_size: int
    files: list[str] = field(default_factory=list)
    locations: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.paths) / self.chunk_size)

    def chunk_count(self, chunk: int) -> int:
        return min(self.chunk_size, len(self.paths) - chunk * self.chunk_size)

    def digest(self) -> str:
        h = hashlib.sha256()
        for path in self.paths:
            h.update(path.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()

    def units(self, chunks: Sequence[int]) -> pa.Table:
        """Work units for the given chunks: one row per image, or one row per (shard row group, chunk)."""
        if self.mode != "shards":
            paths, ids = [], []
            for c in chunks:
                part = self.paths[c * self.chunk_size:(c + 1) * self.chunk_size]
                paths.extend(part)
                ids.extend([c] * len(part))
            return pa.table({"path": pa.array(paths, pa.string()), CHUNK_COLUMN: pa.array(ids, pa.int32())})
        files, groups, rows, ids = [], [], [], []
        for c in chunks:
            key, current = None, None
            for i in range(c * self.chunk_size, c * self.chunk_size + self.chunk_count(c)):
                f, g, r = self.locations[i]
                if (f, g) != key:
                    key, current = (f, g), []
                    files.append(self.files[f])
                    groups.append(g)
                    rows.append(current)
                    ids.append(c)
                current.append(r)
        return pa.table({
            "file": pa.array(files, pa.string()),
            "row_group": pa.array(groups, pa.int32()),
            "rows": pa.array(rows, pa.list_(pa.int32())),
            CHUNK_COLUMN: pa.array(ids, pa.int32()),
        })


def _parquet_columns(uri: str) -> list[str]:
    fs, path = storage.resolve(uri)
    try:
        return list(pq.read_schema(path, filesystem=fs).names)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{uri} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None


def _read_columns(uri: str, columns: list[str]) -> tuple[pa.Table, list[int]]:
    """Selected columns of a Parquet file and the row count of each of its row groups."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
            table = pf.read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{uri} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    return table, sizes


def _plan_manifest(files: list[str], chunk_size: int) -> InputPlan:
    paths: set[str] = set()
    for uri in files:
        if "path" not in _parquet_columns(uri):
            raise DataError(f"{uri} has no 'path' column: give an image tree, prepare's shards or a manifest")
        table, _ = _read_columns(uri, ["path"])
        paths.update(p for p in table.column("path").to_pylist() if p)
    if not paths:
        raise DataError(f"no image paths in {', '.join(files)}")
    return InputPlan("manifest", sorted(paths), chunk_size)


def _plan_shards(files: list[str], chunk_size: int, include_augmented: bool) -> InputPlan:
    def read(uri: str) -> tuple[list[str], list[int], list[bool]]:
        names = _parquet_columns(uri)
        if "image" not in names or "path" not in names:
            raise DataError(f"{uri} is not a shard: it needs 'image' and 'path' columns")
        cols = ["path"] + (["augmentation"] if "augmentation" in names else [])
        table, sizes = _read_columns(uri, cols)
        aug = table.column("augmentation").to_pylist() if "augmentation" in names else [None] * len(table)
        return table.column("path").to_pylist(), sizes, [a is not None for a in aug]

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        contents = list(pool.map(read, files))
    paths, locations = [], []
    for f, (file_paths, sizes, augmented) in enumerate(contents):
        row = 0
        for g, size in enumerate(sizes):
            for r in range(size):
                if include_augmented or not augmented[row]:
                    paths.append(file_paths[row])
                    locations.append((f, g, r))
                row += 1
    if not paths:
        raise DataError(f"no rows to predict in the shards {files[0]} ...")
    if len(set(paths)) != len(paths):
        raise DataError("the shards hold the same path more than once; predictions need one row per path")
    return InputPlan("shards", paths, chunk_size, files=list(files), locations=locations)


def plan_inputs(cfg: InferConfig) -> InputPlan:
    """List ``cfg.input`` once and decide what the inputs are (see :class:`InputPlan`)."""
    uri = cfg.input.rstrip("/")
    fmt = cfg.input_format
    if uri.lower().endswith(".parquet") and not storage.is_dir(uri):
        if not storage.exists(uri):
            raise StorageError(f"not found: {uri}")
        if fmt == "auto":
            fmt = "shards" if "image" in _parquet_columns(uri) else "manifest"
        if fmt == "shards":
            return _plan_shards([uri], cfg.chunk_size, cfg.include_augmented)
        if fmt == "manifest":
            return _plan_manifest([uri], cfg.chunk_size)
        raise ConfigError(f"input_format=images but {uri} is a Parquet file")
    if not storage.is_dir(uri):
        if storage.exists(uri):  # one image file
            return InputPlan("images", [uri], cfg.chunk_size)
        raise StorageError(f"not found: {uri}")
    files = storage.list_files(uri)
    images = [f for f in files if f.lower().endswith(tuple(cfg.extensions))]
    parquets = [f for f in files if f.lower().endswith(".parquet")]
    shard_dir = storage.join(uri, "shards")
    prep_shards = [f for f in parquets if storage.parent(f) == shard_dir]
    if fmt == "auto":
        if images:
            fmt = "images"
        elif parquets:
            candidates = prep_shards or parquets
            fmt = "shards" if "image" in _parquet_columns(candidates[0]) else "manifest"
        else:
            raise DataError(f"no images ({', '.join(cfg.extensions)}) or Parquet files under {uri}")
    if fmt == "images":
        if not images:
            raise DataError(f"no images ({', '.join(cfg.extensions)}) under {uri}")
        return InputPlan("images", images, cfg.chunk_size)
    if not parquets:
        raise DataError(f"no Parquet files under {uri} (input_format={fmt})")
    if fmt == "shards":
        return _plan_shards(prep_shards or parquets, cfg.chunk_size, cfg.include_augmented)
    return _plan_manifest(parquets, cfg.chunk_size)




# ------------------------------------------------------------------------------------------ stage sizes
#: CPUs of a Predictor actor that decodes its own inputs: one core decodes a batch, then runs the model on it.
ACTOR_DECODE_CPUS = 1.0
#: CPUs of a Predictor actor beside decode tasks: its torch thread shares a core with a decoder.
ACTOR_CPUS_BESIDE_TASKS = 0.5
#: Images per decode task (null ``decode_batch_size``): fewer tasks to schedule than 16 (sixth round).
DECODE_TASK_IMAGES = 32
#: Images per call of an actor that decodes its own inputs (null ``decode_batch_size``): each call costs the
#: driver, the raylet and the actor a fixed amount, paid once for more images (seventh round).
ACTOR_CALL_IMAGES = 128
#: Batches queued at an actor fed by decode tasks: the next decoded batch waits there, not in the driver.
TASKS_IN_FLIGHT_BESIDE_TASKS = 8
#: Batches queued at an actor that decodes its own (path) batches: one running, one waiting; more let the first
#: actor up take most of a short run's batches while the others idle.
TASKS_IN_FLIGHT_DECODING = 2


def decode_placement(cfg: InferConfig) -> str:
    """``actors`` or ``tasks``: where ``infer`` reads and decodes images (``cfg.decode_placement``; ``auto``:
    in the actors on CPU unless the decode tasks are sized in the config, in tasks beside GPU actors)."""
    if cfg.decode_placement != "auto":
        return cfg.decode_placement
    tasks_asked = cfg.decode_num_cpus is not None or cfg.decode_concurrency is not None
    return "tasks" if cfg.num_gpus > 0 or tasks_asked else "actors"


@dataclass(frozen=True)
class StagePlan:
    """How the model actors (and the CPU decode tasks, when decode runs apart) share the cluster
    (:func:`plan_stages`).

    ``placement``: ``actors`` (each actor reads and decodes its batches) or ``tasks`` (decode tasks feed the
    actors); ``actors``: the actor pool's size; ``actor_cpus``: what one actor reserves; ``model_cpus``: what
    all actors reserve; ``torch_threads``: per actor. Decode tasks (``tasks`` only; zero otherwise):
    ``decode_num_cpus`` is the reservation of one, ``decode_tasks`` how many run at once beside the actors,
    ``decode_concurrency`` the cap on concurrent ones (``None``: Ray Data's resource budget decides).
    ``sized_from``: ``config`` (given), ``cores`` (derived from ``cluster_cpus``) or ``fallback``.
    """

    decode_num_cpus: float
    decode_tasks: int
    model_cpus: float
    torch_threads: int
    cluster_cpus: float | None
    sized_from: str
    decode_concurrency: int | None = None
    placement: str = "tasks"
    actors: int = 1
    actor_cpus: float = ACTOR_CPUS_BESIDE_TASKS
    tasks_in_flight: int = TASKS_IN_FLIGHT_BESIDE_TASKS
    decode_batch: int = DECODE_TASK_IMAGES

    def call_images(self, inputs: int) -> int:
        """Images per decode task or actor call for a run of ``inputs`` images. Actors that decode take
        ``decode_batch``, but at most a quarter of each actor's share of the run, so the pool ends together (one
        128-image U-Net call takes ~15 s on a CPU core)."""
        if self.placement != "actors":
            return self.decode_batch
        return max(1, min(self.decode_batch, math.ceil(inputs / (4 * self.actors))))

    def as_dict(self) -> dict:
        return {"placement": self.placement, "actors": self.actors, "actor_cpus": self.actor_cpus,
                "tasks_in_flight": self.tasks_in_flight, "decode_batch": self.decode_batch,
                "decode_num_cpus": self.decode_num_cpus, "decode_tasks": self.decode_tasks,
                "model_cpus": self.model_cpus, "torch_threads": self.torch_threads,
                "cluster_cpus": self.cluster_cpus, "sized_from": self.sized_from,
                "decode_concurrency": self.decode_concurrency}


def plan_stages(cfg: InferConfig, cluster_cpus: float | None, fixed_size: bool = False) -> StagePlan:
    """The actor pool and, with decode in tasks, the decode tasks, from the cluster's CPUs.

    **Decode in the actors** (:func:`decode_placement`): ``num_cpus`` (null: :data:`ACTOR_DECODE_CPUS`) per
    actor and, with ``concurrency`` null, as many actors as fit the cluster's CPUs (one when the count is
    unknown). On 2 cores: 2 actors of 1 CPU, each decoding a batch and then running the model on it, with no
    decoded pixels sent through the object store (docs/BENCHMARKS.md, seventh round). The pool is sized from the
    CPUs at the start, on a joined cluster too: set ``concurrency`` for nodes an autoscaler will add. An actor
    call takes ``decode_batch_size`` images (null: :data:`ACTOR_CALL_IMAGES`) and decodes and predicts them
    ``batch_size`` at a time.

    **Decode in tasks**: actors of ``num_cpus`` (null: :data:`ACTOR_CPUS_BESIDE_TASKS`), ``concurrency`` of
    them (null: 1). With ``cfg.decode_num_cpus`` null, the CPUs the actors leave
    (``cluster_cpus - concurrency x num_cpus``) are shared by :func:`breakhis_ray.data.cpu_share.share_cpus`
    (the rule of every decode stage): ``ceil(free)`` tasks of ``free / ceil(free)`` CPUs each, so every core runs
    a decoder or a model thread (on 2 cores beside one actor at 0.5 CPU: 2 tasks of 0.75). A whole core per
    task (the former default) lets only one decoder run there and leaves decode, the slower stage, on one core;
    0.5 per task runs three decoders beside the actor's thread, which then gets half a core
    (docs/BENCHMARKS.md). With less than :data:`~breakhis_ray.data.cpu_share.MIN_DECODE_CPUS` left, or the CPU
    count unknown, tasks take :data:`~breakhis_ray.data.cpu_share.FALLBACK_DECODE_CPUS`.

    The cap: ``cfg.decode_concurrency`` when set; else, on a fixed-size cluster with a known CPU count, the
    planned ``decode_tasks``. Without a cap Ray Data's resource budget decides how many decode tasks run, and
    over long passes it ran one of the two planned on 2 cores; with the cap the driver also turns that budget
    off (:func:`breakhis_ray.inference.driver.build_dataset`) and both run (docs/BENCHMARKS.md, fourth round).
    A joined cluster gets no automatic cap: an autoscaler may add nodes, and a cap counted from the CPUs at the
    start would keep decoding off them.
    """
    placement = decode_placement(cfg)
    if placement == "actors":
        actor_cpus = cfg.num_cpus or ACTOR_DECODE_CPUS
        threads = cfg.torch_threads or max(1, round(actor_cpus))
        if cfg.concurrency is not None:
            actors, sized_from = cfg.concurrency, "config"
        elif cluster_cpus:
            actors, sized_from = max(1, int(cluster_cpus // actor_cpus + 1e-9)), "cores"
        else:
            actors, sized_from = 1, "fallback"
        return StagePlan(0.0, 0, actors * actor_cpus, threads, cluster_cpus, sized_from, None, placement, actors,
                         actor_cpus, cfg.max_tasks_in_flight_per_actor or TASKS_IN_FLIGHT_DECODING,
                         cfg.decode_batch_size or ACTOR_CALL_IMAGES)
    actor_cpus = cfg.num_cpus or ACTOR_CPUS_BESIDE_TASKS
    actors = cfg.concurrency or 1
    model_cpus = actors * actor_cpus
    threads = cfg.torch_threads or max(1, round(actor_cpus))
    if cfg.decode_num_cpus is not None:
        tasks = max(1, int((cluster_cpus - model_cpus) // cfg.decode_num_cpus) if cluster_cpus else 1)
        cpus, sized_from = cfg.decode_num_cpus, "config"
    else:
        share = share_cpus((cluster_cpus or 0.0) - model_cpus) if cluster_cpus else None
        cpus, tasks, sized_from = (FALLBACK_DECODE_CPUS, 1, "fallback") if share is None else (*share, "cores")
    cap = cfg.decode_concurrency
    if cap is None and fixed_size and cluster_cpus:
        cap = tasks
    return StagePlan(cpus, tasks, model_cpus, threads, cluster_cpus, sized_from, cap, placement, actors, actor_cpus,
                     cfg.max_tasks_in_flight_per_actor or TASKS_IN_FLIGHT_BESIDE_TASKS,
                     cfg.decode_batch_size or DECODE_TASK_IMAGES)
