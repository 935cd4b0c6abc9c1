"""Ray Data input pipeline over prepared Parquet shards (``breakhis-ray prepare --out``).

Per split (``train`` / ``val`` / ``test`` of the fold the shards were prepared for)::

    read_parquet(<shards>/shards, only the needed columns)     one read task per shard file; projection
                                                               pushed into the scan; blocks of
                                                               ~decode_batch_size rows, streamed as read
      -> filter split, magnifications[, offline-augmented]    predicate pushed into the scan
      -> map_batches(DecodeBatch)                              deterministic: decode, resize, stain-norm;
                                                               fused with the read (see below)
      -> repartition(block_rows)                               train, shuffle="blocks": small blocks
      -> materialize()                                         train and val: decoded once, cached
      -> randomize_block_order / random_shuffle                train: a new order every epoch
      -> map_batches(RandomAugment)                            train: new random draws every epoch
      -> iter_torch_batches(local shuffle buffer)              train, per rank: rows mixed across blocks

The read (:mod:`breakhis_ray.data.read`) runs in the decode task, one task per shard file, whenever there are
at least as many files as decode tasks fit on the cluster (:func:`~breakhis_ray.data.read.fused_decode_cpus`):
the encoded PNG bytes (~0.5 MB per BreakHis image) then never pass through the object store. With fewer files
(a small cohort in one shard), the read stays a separate stage and decode tasks of ``decode_batch_size`` rows
spread every file's rows over the cores.

The local shuffle matters: shards keep ``prepare``'s row order (by class, subtype and patient), so a block is
mostly one class and one patient, and without mixing a batch would be too: BatchNorm then normalises the class
difference away and a small CNN learns close to nothing.

Determinism (``DataConfig.seed`` set): train and val run :func:`ordered` (Ray Data's ``preserve_order``:
blocks leave every stage, and Ray Train's split of ``train`` hands them to the ranks, in an order that does
not depend on which task finishes first); the per-epoch block order and augmentation are
seeded by ``(seed, epoch)`` and the augmentation per row by its ``path`` (:mod:`breakhis_ray.data.augment`),
so the same config, seed and worker count give every rank the same batches, epoch after epoch. A resumed run
first advances the dataset to its epoch (:func:`advance_epochs`); every training batch is checked against
the epoch its rows were augmented for (``aug_epoch``).

Rows leaving the pipeline: ``image`` (uint8 H x W x 3), ``label`` (int64: 0 benign, 1 malignant; for
``task="subtype"`` the subtype's index in :data:`~breakhis_ray.domain.SUBTYPE_CLASSES`), ``magnification`` (int64); train also ``key`` (int64 hash of ``path``, seeds per-row augmentation);
val/test also ``DataConfig.eval_columns`` (default ``path``, ``patient_id``: strings, for per-image and
patient-level metrics). Normalisation to float happens in the training loop (:func:`iter_train_batches`
calls :func:`breakhis_ray.data.transforms.normalize` on the device), so the cache holds compact uint8.

Batch sizes, CPUs per task and concurrency of every stage come from :class:`~breakhis_ray.config.DataConfig`;
CPUs are fractional by default so decode tasks never starve reads or training workers on small machines.
The test set is left lazy (read once per evaluation).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from breakhis_ray import storage
from breakhis_ray.config import DataConfig
from breakhis_ray.data.augment import RandomAugment, execution_index, path_keys
from breakhis_ray.data.decode import DEFAULT_MAX_PIXELS, ImageRejected, decode_rgb
from breakhis_ray.data.read import (  # noqa: F401  (re-exported: the pipeline's read stage)
    REQUIRED_COLUMNS,
    SPLITS,
    decode_cpus,
    fused_cpus,
    fused_decode_cpus,
    read_split,
    shard_columns,
    shard_layout,
    shards_uri,
)
from breakhis_ray.data.transforms import PreprocessSpec, normalize, prepare_uint8
from breakhis_ray.domain import SUBTYPE_CLASSES
from breakhis_ray.errors import DataError

if TYPE_CHECKING:
    import ray.data

#: Columns a training batch hands to the model (``mask`` is added for 4-channel inputs).
TRAIN_COLUMNS = ("image", "label")
#: Shard column the class of each task comes from.
LABEL_SOURCE = {"binary": "label_id", "subtype": "subtype"}
_SUBTYPE_IDS = {name: i for i, name in enumerate(SUBTYPE_CLASSES)}

# augmented train dataset -> the materialized dataset it draws from (class counts without augmenting)
_BASES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def preprocess_spec(cfg: DataConfig, mean=None, std=None) -> PreprocessSpec:
    """The :class:`PreprocessSpec` matching ``cfg`` (``mean``/``std``: the model's, ignored for ``scale=unit``)."""
    return PreprocessSpec(
        size=cfg.image_size,
        scale=cfg.scale,
        mean=None if mean is None else tuple(mean),
        std=None if std is None else tuple(std),
        stain_normalization=cfg.stain_normalization,
    )


# ------------------------------------------------------------------------------------------- decode stage
def _max_pixels(cfg: DataConfig) -> int:
    """The decompression-bomb guard for training decode: ``cfg.decode.max_pixels``."""
    return int(cfg.decode.max_pixels)


class DecodeBatch:
    """``map_batches`` function: encoded ``image`` bytes -> uint8 ``image`` of ``spec.size`` (+ label etc.).

    Decodes with :func:`breakhis_ray.data.decode.decode_rgb` (the same decisions and conversions as
    ``prepare`` and ``infer``); a row that cannot be decoded stops the run with
    :class:`~breakhis_ray.data.decode.ImageRejected` naming the row, since training has no reject table.
    ``backend``: the PNG decoder (``DataConfig.decode.backend``; resolved in the worker that decodes).
    """

    def __init__(self, spec: dict[str, Any], keep: Sequence[str] = (), with_key: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, task: str = "binary", backend: str | None = None):
        self.spec = dict(spec)
        self.keep = tuple(keep)
        self.with_key = with_key
        self.max_pixels = int(max_pixels)
        self.backend = backend
        if task not in LABEL_SOURCE:
            raise DataError(f"unknown task {task!r}; choose from {', '.join(LABEL_SOURCE)}")
        self.task = task

    def _labels(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        if self.task == "binary":
            return np.asarray(batch["label_id"]).astype(np.int64)
        names = [str(s) for s in batch["subtype"]]
        unknown = sorted(set(names) - set(_SUBTYPE_IDS))
        if unknown:
            raise DataError(f"shard rows have subtype(s) {unknown}; the subtype task knows {list(SUBTYPE_CLASSES)}")
        return np.asarray([_SUBTYPE_IDS[n] for n in names], dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = PreprocessSpec.from_dict(self.spec)
        height, width = spec.size
        encoded, paths = batch["image"], batch["path"]
        images = np.empty((len(encoded), height, width, 3), dtype=np.uint8)
        for i, data in enumerate(encoded):
            try:
                pixels = decode_rgb(data, max_pixels=self.max_pixels, backend=self.backend)
            except ImageRejected as rej:
                raise ImageRejected(rej.reason, f"shard row {paths[i]}: {rej.detail}") from None
            images[i] = prepare_uint8(pixels, spec)
        out = {
            "image": images,
            "label": self._labels(batch),
            "magnification": np.asarray(batch["magnification"]).astype(np.int64),
        }
        if self.with_key:
            out["key"] = path_keys(paths)
        for column in self.keep:
            out[column] = batch[column]
        return out


# ---------------------------------------------------------------------------------------------- reading
def decode_stage(cfg: DataConfig, ds, spec: PreprocessSpec, keep: Sequence[str] = (), with_key: bool = False,
                 task: str = "binary"):
    """The deterministic ``map_batches(DecodeBatch)`` stage on rows from :func:`read_split` (which must carry
    ``LABEL_SOURCE[task]``).

    :func:`read_split` streams blocks of about ``decode_batch_size`` rows. Where it chose a fused read
    (:func:`fused_decode_cpus`), every read block is one decode batch and the stage asks for the read's CPUs,
    so Ray Data runs both in one task per file; otherwise decode tasks take ``decode_batch_size`` rows each,
    so every core decodes, however few files there are, without a repartition of each file's rows.
    """
    fused = fused_cpus(ds)
    return ds.map_batches(
        DecodeBatch(spec.to_dict(), keep=keep, with_key=with_key, max_pixels=_max_pixels(cfg), task=task,
                    backend=cfg.decode.backend),
        batch_size=None if fused is not None else cfg.decode_batch_size,
        batch_format="numpy",
        num_cpus=fused if fused is not None else decode_cpus(cfg.decode_num_cpus),
        concurrency=cfg.decode_concurrency,
        udf_modifying_row_count=False,
    )


def _seed_config(seed: int | None):
    from ray.data import RandomSeedConfig

    return RandomSeedConfig(seed=seed, reseed_after_execution=True)


def ordered(ds, enabled: bool = True):
    """``ds`` with Ray Data's ``preserve_order`` set in its ``DataContext`` (shared by the datasets derived from
    it, copied by ``materialize()``): blocks leave every stage in input order, whichever task finishes first,
    so a materialized cache holds its rows in the same order run after run. Ray Train re-applies its ingest
    options to the datasets it splits: :func:`breakhis_ray.train.ray_glue.make_trainer` asks for the same
    there. Unchanged when ``enabled`` is false."""
    if enabled:
        ds.context.execution_options.preserve_order = True
    return ds


def advance_epochs(shard, epochs: int) -> None:
    """Execute ``shard`` (a dataset or Ray Train shard iterator) ``epochs`` times, stopping each at its first
    batch: a resumed run's fresh split coordinator then draws the per-epoch block order and augmentation of
    the epoch the run resumes at. Every rank must call it with the same ``epochs`` (each execution of a
    split dataset waits for all of them)."""
    for _ in range(epochs):
        for _ in shard.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            break


def build_datasets(
    cfg: DataConfig,
    spec: PreprocessSpec | None = None,
    *,
    after_decode: Callable[[Any], Any] | None = None,
    augment_udf: Any = None,
    task: str = "binary",
) -> dict[str, "ray.data.Dataset"]:
    """``{"train", "val", "test"}`` datasets of uint8 images (see the module docstring for the stages);
    ``label`` holds the class of ``task`` (``binary`` or ``subtype``).

    ``after_decode`` adds a deterministic stage to every split before ``materialize()`` (segmentation
    guidance adds a nuclei-mask column there); ``augment_udf`` replaces the random augmentation (one that
    transforms that mask with the image).
    """
    spec = spec or preprocess_spec(cfg)
    after_decode = after_decode or (lambda ds: ds)
    if tuple(spec.size) != tuple(cfg.image_size):
        raise DataError(f"preprocess size {spec.size} differs from data.image_size {cfg.image_size}")
    layout = shard_layout(cfg)
    names = layout.columns
    keep = list(cfg.eval_columns)
    source = [LABEL_SOURCE.get(task, "label_id")]
    if source[0] not in names:
        raise DataError(f"shards at {shards_uri(cfg)} lack column {source[0]!r} (needed by task={task})")

    train = after_decode(decode_stage(cfg, ordered(read_split(cfg, "train", keep=source, layout=layout),
                                                   cfg.seed is not None), spec, keep=(), with_key=True, task=task))
    if cfg.shuffle == "blocks":  # small blocks, so a new block order is a real reshuffle
        train = train.repartition(target_num_rows_per_block=cfg.block_rows)
    if cfg.materialize:
        train = train.materialize()
    base = train
    if cfg.shuffle == "blocks":
        train = train.randomize_block_order(seed=_seed_config(cfg.seed))
    elif cfg.shuffle == "full":
        train = train.random_shuffle(seed=_seed_config(cfg.seed))
    if cfg.augment.enabled:
        udf = augment_udf or RandomAugment(cfg.augment, cfg.seed)
        udf.first_execution = execution_index(train.context)  # this dataset's first execution is epoch 0
        train = train.map_batches(
            udf,
            batch_size=cfg.augment.batch_size,
            batch_format="numpy",
            num_cpus=cfg.augment.num_cpus,
            concurrency=cfg.augment.concurrency,
            udf_modifying_row_count=False,
        )
    if train is not base:
        _BASES[train] = base

    val = after_decode(decode_stage(cfg, ordered(read_split(cfg, "val", keep=keep + source, layout=layout),
                                                 cfg.seed is not None), spec, keep=keep, with_key=False, task=task))
    if cfg.materialize:
        val = val.materialize()
    test = after_decode(decode_stage(cfg, read_split(cfg, "test", keep=keep + source, layout=layout), spec,
                                     keep=keep, with_key=False, task=task))
    return {"train": train, "val": val, "test": test}


def class_counts(ds) -> dict[int, int]:
    """``{label: rows}`` of a pipeline dataset (for weighted losses); never runs the random augmentation."""
    source = _BASES.get(ds, ds)
    counts: dict[int, int] = {}
    for batch in source.select_columns(["label"]).iter_batches(batch_size=4096, batch_format="numpy"):
        labels, n = np.unique(np.asarray(batch["label"]), return_counts=True)
        for label, count in zip(labels.tolist(), n.tolist()):
            counts[int(label)] = counts.get(int(label), 0) + int(count)
    return dict(sorted(counts.items()))


def split_class_counts(cfg: DataConfig, task: str = "binary", split: str = "train") -> list[int]:
    """Images per class of ``task`` in one split, counted from the shards' columns with :func:`read_split`'s
    filters (magnifications; offline-augmented copies only in ``train`` with ``include_augmented``): no Ray
    Data execution, so the pipeline's per-epoch executions and augmentation draws are left untouched."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    layout = shard_layout(cfg)
    names, files = layout.columns, layout.files
    source = LABEL_SOURCE.get(task)
    if source is None:
        raise DataError(f"unknown task {task!r}; choose from {', '.join(LABEL_SOURCE)}")
    fs, _ = storage.resolve(files[0])
    dataset = pads.dataset([storage.resolve(u)[1] for u in files], filesystem=fs, format="parquet")
    wanted = pc.field("split") == split
    if cfg.magnifications != "all":
        wanted = wanted & pc.field("magnification").isin(list(cfg.magnifications))
    if "augmentation" in names and (split != "train" or not cfg.include_augmented):
        wanted = wanted & pc.field("augmentation").is_null()
    values = dataset.to_table(columns=[source], filter=wanted).column(source).to_pylist()
    if task == "binary":
        return [sum(1 for v in values if int(v) == i) for i in range(2)]
    unknown = sorted(set(values) - set(_SUBTYPE_IDS))
    if unknown:
        raise DataError(f"shard rows have subtype(s) {unknown}; the subtype task knows {list(SUBTYPE_CLASSES)}")
    return [sum(1 for v in values if v == name) for name in SUBTYPE_CLASSES]


# --------------------------------------------------------------------------------------- train-side batches
def local_shuffle_seed(seed: int | None, epoch: int, rank: int) -> int | None:
    """The seed of one rank's local shuffle buffer in one epoch (``None`` with ``seed`` None: fresh entropy)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), int(epoch), int(rank), 0x5EED]).generate_state(1)[0])


def check_epoch(aug_epochs: np.ndarray, epoch: int) -> None:
    """Stop when a training batch of ``epoch`` holds rows augmented for another epoch (``aug_epoch``)."""
    wrong = sorted(set(np.unique(np.asarray(aug_epochs)).tolist()) - {epoch})
    if wrong:
        raise DataError(f"training epoch {epoch} received rows augmented for epoch(s) {wrong}: the training "
                        "dataset was executed outside the epoch loop (count(), take(), ...), so a resumed or "
                        "repeated run would not draw the same augmentations")


def tensor_collate(columns: Sequence[str], combine_chunks: bool, epoch: int | None = None):
    import torch
    from ray.data.collate_fn import DefaultCollateFn

    class SelectColumnsCollate(DefaultCollateFn):
        """Keep only tensor columns (strings such as ``path`` cannot become tensors) and set dtypes; check the
        rows' ``aug_epoch`` against ``epoch`` first (in the format threads, so never a device sync)."""

        def __call__(self, batch):
            if epoch is not None and "aug_epoch" in batch.column_names:
                check_epoch(batch.column("aug_epoch").to_numpy(), epoch)
            return super().__call__(batch.select(list(columns)))

    dtypes = {"image": torch.uint8, "label": torch.int64, "mask": torch.uint8}
    return SelectColumnsCollate(dtypes={c: dtypes[c] for c in columns}, combine_chunks=combine_chunks)


def iter_train_batches(
    shard,
    batch_size: int,
    device,
    spec: PreprocessSpec,
    *,
    in_channels: int = 3,
    drop_last: bool = False,
    shuffle_buffer: int | None = None,
    shuffle_seed: int | None = None,
    prefetch_batches: int = 2,
    epoch: int | None = None,
) -> Iterator[tuple[Any, Any]]:
    """``(x float32 (N, C, H, W), y int64 (N,))`` on ``device`` from a dataset or a Ray Train shard.

    Only ``image`` and ``label`` (plus ``mask`` for ``in_channels=4``: uint8 H x W, 0/255, appended as a
    fourth channel in ``[0, 1]``) are converted; normalisation runs on ``device``. ``epoch`` (training): rows
    augmented for another epoch stop the run (:func:`check_epoch`). ``shuffle_buffer``/``shuffle_seed``: an
    optional local shuffle (seed it per epoch and rank for a reproducible order).
    """
    import torch

    device = torch.device(device)
    columns = ["image", "label"] + (["mask"] if in_channels == 4 else [])
    if in_channels not in (3, 4):
        raise DataError(f"in_channels must be 3 (RGB) or 4 (RGB + mask), got {in_channels}")
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        collate_fn=tensor_collate(columns, combine_chunks=device.type == "cpu", epoch=epoch),
        drop_last=drop_last,
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=shuffle_seed,
        prefetch_batches=prefetch_batches,
    )
    for batch in batches:
        image = batch["image"]
        if in_channels == 4:
            image = torch.cat([image, batch["mask"].unsqueeze(-1)], dim=-1)
        yield normalize(image, spec), batch["label"]
