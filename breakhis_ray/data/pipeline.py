"""Ray Data input pipeline over prepared Parquet shards (``breakhis-ray prepare --out``).

Per split (``train`` / ``val`` / ``test`` of the fold the shards were prepared for)::

    read_parquet(<shards>/shards, only the needed columns)     projection pushed into the scan
      -> filter split, magnifications[, offline-augmented]    predicate pushed into the scan
      -> repartition(decode_batch_size) -> map_batches(DecodeBatch)   deterministic: decode, resize, stain-norm
      -> repartition(block_rows)                               train, shuffle="blocks": small blocks
      -> materialize()                                         train and val: decoded once, cached
      -> randomize_block_order / random_shuffle                train: a new order every epoch
      -> map_batches(RandomAugment)                            train: new random draws every epoch

Rows leaving the pipeline: ``image`` (uint8 H x W x 3), ``label`` (int64: 0 benign, 1 malignant),
``magnification`` (int64); train also ``key`` (int64 hash of ``path``, seeds per-row augmentation);
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
from breakhis_ray.data.augment import RandomAugment, path_keys
from breakhis_ray.data.decode import DEFAULT_MAX_PIXELS, ImageRejected, decode_rgb
from breakhis_ray.data.transforms import PreprocessSpec, normalize, prepare_uint8
from breakhis_ray.errors import DataError

if TYPE_CHECKING:
    import ray.data

SPLITS = ("train", "val", "test")
#: Shard columns the pipeline always reads.
REQUIRED_COLUMNS = ("image", "label_id", "magnification", "split", "path")
#: Columns a training batch hands to the model (``mask`` is added for 4-channel inputs).
TRAIN_COLUMNS = ("image", "label")

# augmented train dataset -> the materialized dataset it draws from (class counts without augmenting)
_BASES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def shards_uri(cfg: DataConfig) -> str:
    return storage.join(cfg.shards, "shards")


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
    """The decompression-bomb guard for training decode: ``cfg.decode.max_pixels``, else the one default."""
    decode = getattr(cfg, "decode", None)  # TODO: read cfg.decode directly once DataConfig has a DecodeSection
    return int(decode.max_pixels) if decode is not None else DEFAULT_MAX_PIXELS


class DecodeBatch:
    """``map_batches`` function: encoded ``image`` bytes -> uint8 ``image`` of ``spec.size`` (+ label etc.).

    Decodes with :func:`breakhis_ray.data.decode.decode_rgb` (the same decisions and conversions as
    ``prepare`` and ``infer``); a row that cannot be decoded stops the run with
    :class:`~breakhis_ray.data.decode.ImageRejected` naming the row, since training has no reject table.
    """

    def __init__(self, spec: dict[str, Any], keep: Sequence[str] = (), with_key: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.spec = dict(spec)
        self.keep = tuple(keep)
        self.with_key = with_key
        self.max_pixels = int(max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = PreprocessSpec.from_dict(self.spec)
        height, width = spec.size
        encoded, paths = batch["image"], batch["path"]
        images = np.empty((len(encoded), height, width, 3), dtype=np.uint8)
        for i, data in enumerate(encoded):
            try:
                pixels = decode_rgb(data, max_pixels=self.max_pixels)
            except ImageRejected as rej:
                raise ImageRejected(rej.reason, f"shard row {paths[i]}: {rej.detail}") from None
            images[i] = prepare_uint8(pixels, spec)
        out = {
            "image": images,
            "label": np.asarray(batch["label_id"]).astype(np.int64),
            "magnification": np.asarray(batch["magnification"]).astype(np.int64),
        }
        if self.with_key:
            out["key"] = path_keys(paths)
        for column in self.keep:
            out[column] = batch[column]
        return out


# ---------------------------------------------------------------------------------------------- reading
def shard_columns(cfg: DataConfig) -> list[str]:
    """Column names of the shards (from the first file's Parquet footer); checks the required ones."""
    import pyarrow.parquet as pq

    uri = shards_uri(cfg)
    if not storage.exists(uri):
        raise DataError(f"no prepared shards at {uri} (run `breakhis-ray prepare --out {cfg.shards}` first)")
    files = storage.list_files(uri, suffixes=[".parquet"])
    if not files:
        raise DataError(f"no Parquet shards under {uri}")
    fs, path = storage.resolve(files[0])
    try:
        names = list(pq.read_schema(path, filesystem=fs).names)
    except OSError as exc:
        raise DataError(f"cannot read Parquet schema of {files[0]}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in (*REQUIRED_COLUMNS, *cfg.eval_columns) if c not in names]
    if missing:
        raise DataError(f"shards at {uri} lack column(s) {missing} (have {names})")
    return names


def read_split(
    cfg: DataConfig, split: str | None, keep: Sequence[str] = (), columns: Sequence[str] | None = None
):
    """Lazy dataset of one split's shard rows (``None``: every split, originals only): only the needed
    columns, filters pushed into the scan. ``columns``: the shard's column names if already known."""
    import ray.data
    from ray.data.expressions import col, lit

    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    names = list(columns) if columns is not None else shard_columns(cfg)
    has_aug = "augmentation" in names
    wanted = list(dict.fromkeys([*REQUIRED_COLUMNS, *keep, *(["augmentation"] if has_aug else [])]))
    fs, path = storage.resolve(shards_uri(cfg))
    read_args: dict[str, Any] = {}
    if cfg.read_num_cpus is not None:
        read_args["num_cpus"] = cfg.read_num_cpus
    ds = ray.data.read_parquet(path, filesystem=fs, columns=wanted, **read_args)
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


def decode_stage(cfg: DataConfig, ds, spec: PreprocessSpec, keep: Sequence[str] = (), with_key: bool = False):
    """The deterministic ``map_batches(DecodeBatch)`` stage on rows from :func:`read_split`.

    Shard files are read one task each (~1k images); a streaming repartition into blocks of
    ``decode_batch_size`` rows first lets every core decode, however few files there are.
    """
    ds = ds.repartition(target_num_rows_per_block=cfg.decode_batch_size)
    return ds.map_batches(
        DecodeBatch(spec.to_dict(), keep=keep, with_key=with_key, max_pixels=_max_pixels(cfg)),
        batch_size=cfg.decode_batch_size,
        batch_format="numpy",
        num_cpus=cfg.decode_num_cpus,
        concurrency=cfg.decode_concurrency,
        udf_modifying_row_count=False,
    )


def _seed_config(seed: int | None):
    from ray.data import RandomSeedConfig

    return RandomSeedConfig(seed=seed, reseed_after_execution=True)


def build_datasets(
    cfg: DataConfig,
    spec: PreprocessSpec | None = None,
    *,
    after_decode: Callable[[Any], Any] | None = None,
    augment_udf: Any = None,
) -> dict[str, "ray.data.Dataset"]:
    """``{"train", "val", "test"}`` datasets of uint8 images (see the module docstring for the stages).

    ``after_decode`` adds a deterministic stage to every split before ``materialize()`` (segmentation
    guidance adds a nuclei-mask column there); ``augment_udf`` replaces the random augmentation (one that
    transforms that mask with the image).
    """
    spec = spec or preprocess_spec(cfg)
    after_decode = after_decode or (lambda ds: ds)
    if tuple(spec.size) != tuple(cfg.image_size):
        raise DataError(f"preprocess size {spec.size} differs from data.image_size {cfg.image_size}")
    names = shard_columns(cfg)
    keep = list(cfg.eval_columns)

    train = after_decode(decode_stage(cfg, read_split(cfg, "train", columns=names), spec, keep=(), with_key=True))
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
        train = train.map_batches(
            augment_udf or RandomAugment(cfg.augment, cfg.seed),
            batch_size=cfg.augment.batch_size,
            batch_format="numpy",
            num_cpus=cfg.augment.num_cpus,
            concurrency=cfg.augment.concurrency,
            udf_modifying_row_count=False,
        )
    if train is not base:
        _BASES[train] = base

    val = after_decode(decode_stage(cfg, read_split(cfg, "val", keep=keep, columns=names), spec, keep=keep,
                                    with_key=False))
    if cfg.materialize:
        val = val.materialize()
    test = after_decode(decode_stage(cfg, read_split(cfg, "test", keep=keep, columns=names), spec, keep=keep,
                                     with_key=False))
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


# --------------------------------------------------------------------------------------- train-side batches
def _collate(columns: Sequence[str], combine_chunks: bool):
    import torch
    from ray.data.collate_fn import DefaultCollateFn

    class SelectColumnsCollate(DefaultCollateFn):
        """Keep only tensor columns (strings such as ``path`` cannot become tensors) and set dtypes."""

        def __call__(self, batch):
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
    prefetch_batches: int = 2,
) -> Iterator[tuple[Any, Any]]:
    """``(x float32 (N, C, H, W), y int64 (N,))`` on ``device`` from a dataset or a Ray Train shard.

    Only ``image`` and ``label`` (plus ``mask`` for ``in_channels=4``: uint8 H x W, 0/255, appended as a
    fourth channel in ``[0, 1]``) are converted; normalisation runs on ``device``.
    """
    import torch

    device = torch.device(device)
    columns = ["image", "label"] + (["mask"] if in_channels == 4 else [])
    if in_channels not in (3, 4):
        raise DataError(f"in_channels must be 3 (RGB) or 4 (RGB + mask), got {in_channels}")
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        collate_fn=_collate(columns, combine_chunks=device.type == "cpu"),
        drop_last=drop_last,
        local_shuffle_buffer_size=shuffle_buffer,
        prefetch_batches=prefetch_batches,
    )
    for batch in batches:
        image = batch["image"]
        if in_channels == 4:
            image = torch.cat([image, batch["mask"].unsqueeze(-1)], dim=-1)
        yield normalize(image, spec), batch["label"]
