"""Reading prepared shards (``breakhis-ray prepare --out``) into Ray Data: which files, columns and rows, how
many read tasks, and whether the read runs in the decode task (:func:`fused_decode_cpus`).

:func:`read_split` makes one read task per shard file, streaming blocks of about ``decode_batch_size`` rows,
with the column projection and the split / magnification / augmentation filters pushed into the Parquet scan.
Read and decode run in one task per file whenever there are at least as many files as decode tasks fit on the
cluster: Ray Data then fuses ``ReadParquet->MapBatches(DecodeBatch)`` (:func:`breakhis_ray.data.pipeline.decode_stage`
asks for the same CPUs and whole blocks, see :func:`fused_cpus`), so the encoded PNG bytes never pass through the
object store. Ray Data's per-operator resource reservation is off for these datasets: it let the single fused
operator run one task on a 2-CPU node (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from breakhis_ray import storage
from breakhis_ray.config import DataConfig
from breakhis_ray.data.cpu_share import decode_task_cpus
from breakhis_ray.errors import DataError
from breakhis_ray.ray_utils import cpu_count

SPLITS = ("train", "val", "test")
#: Shard columns the pipeline always reads.
REQUIRED_COLUMNS = ("image", "label_id", "magnification", "split", "path")

# dataset of read_split whose read fuses with the decode stage -> CPUs of that one task
_FUSED: "weakref.WeakKeyDictionary[Any, float]" = weakref.WeakKeyDictionary()


def fused_cpus(ds) -> float | None:
    """CPUs of the one read-and-decode task per file if ``ds`` (from :func:`read_split`) fuses its read with
    the decode stage, else ``None``."""
    return _FUSED.get(ds)


def shards_uri(cfg: DataConfig) -> str:
    return storage.join(cfg.shards, "shards")


@dataclass(frozen=True)
class ShardLayout:
    """What one listing and one Parquet footer tell about the shards: the files, the column names (the
    required ones checked) and the encoded bytes per row of the ``image`` column (for the read's block size)."""

    files: list[str]
    columns: list[str]
    row_bytes: int


def shard_layout(cfg: DataConfig) -> ShardLayout:
    """List the shards once and read the first file's footer once (:class:`ShardLayout`)."""
    import pyarrow.parquet as pq

    uri = shards_uri(cfg)
    if not storage.exists(uri):
        raise DataError(f"no prepared shards at {uri} (run `breakhis-ray prepare --out {cfg.shards}` first)")
    files = storage.list_files(uri, suffixes=[".parquet"])
    if not files:
        raise DataError(f"no Parquet shards under {uri}")
    fs, path = storage.resolve(files[0])
    try:
        meta = pq.read_metadata(path, filesystem=fs)
    except OSError as exc:
        raise DataError(f"cannot read Parquet footer of {files[0]}: {str(exc).splitlines()[0]}") from None
    names = list(meta.schema.to_arrow_schema().names)
    missing = [c for c in (*REQUIRED_COLUMNS, *cfg.eval_columns) if c not in names]
    if missing:
        raise DataError(f"shards at {uri} lack column(s) {missing} (have {names})")
    image = [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == "image"]
    total = sum(meta.row_group(g).column(i).total_uncompressed_size
                for g in range(meta.num_row_groups) for i in image)
    return ShardLayout(files, names, max(1, total // max(1, meta.num_rows)))


def shard_columns(cfg: DataConfig) -> list[str]:
    """Column names of the shards (from the first file's Parquet footer); checks the required ones."""
    return shard_layout(cfg).columns


#: Ray Data reads Parquet footers on this many actors per read (default 32: one Python process each, started for
#: every execution; on a 2-core machine their start-up took ~12 s of each pass, next to ~3 s of decoding).
_FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


#: ``DataContext`` flag choosing Ray Data's Parquet reader. The V2 reader (Ray's default) lists files in a
#: task and reads every footer on a pool of actors that it starts, in new worker processes, on every execution:
#: ~1.3 s of CPU per pass on this project's 2-core benchmark (5 ms per image of a 237-image pass). The V1
#: reader reads the few shard footers in the driver once, when the read is planned, and starts no process.
_PARQUET_V2_FLAG = "use_datasource_v2"


@contextlib.contextmanager
def _read_settings(block_bytes: int, footer_readers: int):
    """While a read is planned: Ray Data's target block size (kept by the dataset, whose read then streams
    blocks of that size as the file is read), the V1 Parquet reader where this Ray has it (see
    :data:`_PARQUET_V2_FLAG`) and, for the V2 reader, the number of footer-reading actors. Progress bars are
    off while the V1 reader samples the footers (a "Parquet dataset sampling" bar on every read otherwise);
    :func:`read_split` gives the dataset the caller's setting back."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = {"target_max_block_size": ctx.target_max_block_size, "enable_progress_bars": ctx.enable_progress_bars}
    saved_env = os.environ.get(_FOOTER_READERS_ENV)
    if hasattr(ctx, _PARQUET_V2_FLAG):
        saved[_PARQUET_V2_FLAG] = getattr(ctx, _PARQUET_V2_FLAG)
        setattr(ctx, _PARQUET_V2_FLAG, False)
    ctx.target_max_block_size = block_bytes
    ctx.enable_progress_bars = False
    if saved_env is None:  # an explicit setting of the user's wins
        os.environ[_FOOTER_READERS_ENV] = str(footer_readers)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(ctx, key, value)
        if saved_env is None:
            os.environ.pop(_FOOTER_READERS_ENV, None)


def read_split(cfg: DataConfig, split: str | None, keep: Sequence[str] = (), layout: ShardLayout | None = None):
    """Lazy dataset of one split's shard rows (``None``: every split, originals only): only the needed
    columns, filters pushed into the scan. ``layout``: :func:`shard_layout` if already read (the splits of one
    pipeline share one listing and one footer read).

    The read streams blocks of about ``decode_batch_size`` rows while it reads a file, so decoding starts
    with the first block and every core decodes without a repartition. Ray Data's V1 Parquet reader reads the
    footers here, once (its V2 reader, where V1 is gone, reads them on one actor per ten shard files, at most
    32, started on every execution)."""
    import ray.data

    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    layout = layout or shard_layout(cfg)
    has_aug = "augmentation" in layout.columns
    wanted = list(dict.fromkeys([*REQUIRED_COLUMNS, *keep, *(["augmentation"] if has_aug else [])]))
    fs, path = storage.resolve(shards_uri(cfg))
    n_files, row_bytes = len(layout.files), layout.row_bytes
    fused = fused_decode_cpus(cfg, n_files)
    # one read task per file: more would only split each file's output into blocks of 1-3 rows
    read_args: dict[str, Any] = {"override_num_blocks": n_files}
    if fused is not None:
        read_args["num_cpus"] = fused
    elif cfg.read_num_cpus is not None:
        read_args["num_cpus"] = cfg.read_num_cpus
    with _read_settings(max(1 << 16, cfg.decode_batch_size * row_bytes), min(32, -(-n_files // 10))):
        ds = ray.data.read_parquet(path, filesystem=fs, columns=wanted, **read_args)
    ds.context.enable_progress_bars = ray.data.DataContext.get_current().enable_progress_bars
    ds.context.op_resource_reservation_enabled = False
    ds = _filtered(ds, cfg, split, has_aug)
    if fused is not None:
        _FUSED[ds] = fused
    return ds


def _filtered(ds, cfg: DataConfig, split: str | None, has_aug: bool):
    """``ds`` with :func:`read_split`'s row filters (pushed into the Parquet scan by Ray Data)."""
    from ray.data.expressions import col, lit

    predicates = [] if split is None else [col("split") == lit(split)]
    if cfg.magnifications != "all":
        predicates.append(col("magnification").is_in(list(cfg.magnifications)))
    if has_aug and (split != "train" or not cfg.include_augmented):
        predicates.append(col("augmentation").is_null())
    if not predicates:
        return ds
    predicate = predicates[0]
    for more in predicates[1:]:
        predicate = predicate & more
    return ds.filter(expr=predicate)


def _cluster_cpus() -> float | None:
    """CPUs of the connected Ray cluster; ``None`` before Ray is initialised."""
    import ray

    return ray.cluster_resources().get("CPU") if ray.is_initialized() else None


def decode_cpus(configured: float | None) -> float:
    """CPUs per decode task: ``configured`` when set, else the running Ray cluster's CPUs shared by the one
    rule (:func:`breakhis_ray.data.cpu_share.share_cpus`: a whole core per task on whole-core machines)."""
    return decode_task_cpus(configured, _cluster_cpus() if configured is None else None)


def fused_decode_cpus(cfg: DataConfig, n_files: int) -> float | None:
    """CPUs of the one task per shard file that reads and decodes it, or ``None`` when the read stays a
    separate stage: fewer files than decode tasks fit on the cluster (a fused read would leave cores idle),
    a ``decode_concurrency`` cap or a ``read_num_cpus`` other than the decode tasks' (both keep Ray Data
    from fusing)."""
    task_cpus = decode_cpus(cfg.decode_num_cpus)
    if cfg.decode_concurrency is not None or cfg.read_num_cpus not in (None, task_cpus):
        return None
    cluster = _cluster_cpus()
    if cluster is None:
        cluster = float(cpu_count())
    slots = max(1, int(cluster // task_cpus))
    return task_cpus if n_files >= slots else None
