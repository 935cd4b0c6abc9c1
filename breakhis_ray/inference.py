"""Batch inference with Ray Data: segmentation + classification over any number of images.

``breakhis-ray infer --input URI --out URI --classifier CKPT [--segmenter CKPT|threshold|watershed]``

Pipeline
--------
1. **Listing** (driver): one recursive listing of ``--input`` (a local or ``s3://`` tree of PNG/JPEG/TIFF files
   with any names), or the Parquet shards written by ``prepare`` (``<prep>/shards/*.parquet``: ``image`` bytes +
   ``path``), or a manifest Parquet (column ``path``). Inputs are put in a deterministic order (sorted paths; shard
   file then row for shards) and cut into chunks of ``chunk_size``.
2. **CPU stage** (Ray tasks, ``decode_num_cpus`` each): read bytes through :mod:`breakhis_ray.storage`, check
   the pixel count from the header (``max_pixels``, the decompression-bomb guard), decode with
   :func:`~breakhis_ray.data.transforms.decode_image` (greyscale replicated to RGB, transparency composited on
   white, 16-bit greyscale mapped linearly to 8 bits, first frame of multi-frame files) and prepare the uint8
   classifier input with the checkpoint's :class:`~breakhis_ray.data.transforms.PreprocessSpec` (resize, stain
   normalisation), plus a uint8 copy at the segmenter's size. A bad input becomes a row with ``status="error"``
   and the reason in ``error``; nothing raises.
3. **Model stage** (:class:`Predictor` actors: ``batch_size``, ``concurrency``, ``num_cpus``, ``num_gpus``):
   the classifier and the segmenter are loaded once per actor; each batch is segmented and classified in the
   same actor (normalisation on the device, bf16 autocast on GPU); error rows pass through untouched.
4. **Output** (driver): rows are gathered per chunk and each complete chunk is written atomically as
   ``<out>/predictions/part-<chunk>.parquet`` (local: temp file + rename; s3: one PUT). A re-run with the same
   ``--out`` lists the existing parts and processes only the missing chunks, so a killed job ends, once
   re-run, with exactly one row per input. ``<out>/predictions/_plan.json`` pins the input list and the
   model settings; a re-run with different ones is refused instead of mixing predictions.

Output layout::

    <out>/predictions/part-00000.parquet ...   PREDICTION_SCHEMA, rows sorted by path
    <out>/predictions/_plan.json               input digest, chunking and model settings (resume check)
    <out>/masks/part-00000/<stem>-<hash>_nuclei.png   uint16 nuclei instance ids (write_masks=true)
    <out>/config.yaml  <out>/versions.json  <out>/summary.json

Prediction schema (``PREDICTION_SCHEMA``; one row per input image):

==========================  ==================  =========================================================
column                      type                meaning
==========================  ==================  =========================================================
``path``                    string              input URI (shards: the ``path`` stored in the shard)
``status``                  string              ``ok`` or ``error``
``error``                   string              null when ok; else ``<kind>: <detail>`` with kind one of
                                                ``read_error``, ``empty``, ``not_an_image``, ``too_large``,
                                                ``decode_error``
``prob_malignant``          float32             softmax probability of ``malignant``; null on error
``pred_label``              string              ``benign`` or ``malignant``; null on error
``patient_id``              string              BreakHis patient folder from the file name, else null
``magnification``           int16               40/100/200/400 from a BreakHis name, else null
``label``                   string              true label from a BreakHis name, else null
``image_height``            int32               decoded size before resizing; null on error
``image_width``             int32
``nuclei_count``            int32               nuclear features at the segmenter's input size; null
``nuclear_area_fraction``   float32             without a segmenter or on error
``mean_nuclear_area_px``    float32
``std_nuclear_area_px``     float32
``mean_hematoxylin``        float32
``mask_uri``                string              nuclei mask PNG when ``write_masks=true``, else null
``classifier_checkpoint``   string              ``--classifier`` as given
``segmenter_checkpoint``    string              ``--segmenter`` as given (or null)
``run_id``                  string              id of the run that wrote the row
``processed_at``            timestamp[us, UTC]  when the model stage processed the row
==========================  ==================  =========================================================
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import posixpath
import struct
import sys
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from breakhis_ray import storage
from breakhis_ray.allocator import MODEL_PROCESS_ENV
from breakhis_ray.config import InferConfig, config_yaml
from breakhis_ray.errors import BreakhisError, ConfigError, DataError, StorageError

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("prob_malignant", pa.float32()),
        pa.field("pred_label", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("magnification", pa.int16()),
        pa.field("label", pa.string()),
        pa.field("image_height", pa.int32()),
        pa.field("image_width", pa.int32()),
        pa.field("nuclei_count", pa.int32()),
        pa.field("nuclear_area_fraction", pa.float32()),
        pa.field("mean_nuclear_area_px", pa.float32()),
        pa.field("std_nuclear_area_px", pa.float32()),
        pa.field("mean_hematoxylin", pa.float32()),
        pa.field("mask_uri", pa.string()),
        pa.field("classifier_checkpoint", pa.string()),
        pa.field("segmenter_checkpoint", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("processed_at", pa.timestamp("us", tz="UTC")),
    ]
)
"""The output contract of ``infer`` (see the module docstring for the meaning of every column)."""

FEATURE_COLUMNS = (
    "nuclei_count",
    "nuclear_area_fraction",
    "mean_nuclear_area_px",
    "std_nuclear_area_px",
    "mean_hematoxylin",
)
CLASSICAL_SEGMENTERS = ("threshold", "watershed")
PREDICTIONS_DIR = "predictions"
MASKS_DIR = "masks"
PLAN_FILE = "_plan.json"
PLAN_FORMAT = "breakhis-ray-predictions"
CHUNK_COLUMN = "_chunk"
MALIGNANT = "malignant"
BENIGN = "benign"

# Exceptions a single bad input may raise while being read or decoded; each becomes an error row.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    BreakhisError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    MemoryError,
    struct.error,
    zlib.error,
)


# ================================================================================== input planning
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


# ================================================================================ models and sizes
def _read_checkpoint_meta(uri: str) -> dict:
    from breakhis_ray.checkpoint import read_meta

    return read_meta(uri.rstrip("/"))


def _is_classical(segmenter: str | None) -> bool:
    return segmenter in CLASSICAL_SEGMENTERS


def resolve_sizes(
    classifier: str,
    segmenter: str | None,
    segment_size: Sequence[int] | None = None,
) -> tuple[dict, tuple[int, int] | None]:
    """``(classifier preprocessing dict, segmenter input (H, W) or None)`` from the checkpoints.

    The segmenter sees ``segment_size`` when given, else the U-Net checkpoint's preprocessing size, else
    (classical methods) the classifier's input size.
    """
    meta = _read_checkpoint_meta(classifier)
    prep = dict(meta["preprocessing"])
    if segmenter is None:
        return prep, None
    if segment_size is not None:
        return prep, (int(segment_size[0]), int(segment_size[1]))
    if _is_classical(segmenter):
        return prep, (int(prep["size"][0]), int(prep["size"][1]))
    seg_meta = _read_checkpoint_meta(segmenter)
    size = seg_meta["preprocessing"]["size"]
    return prep, (int(size[0]), int(size[1]))


def build_segmenter(segmenter: str, options: dict | None = None, device: str = "cpu"):
    """``threshold`` / ``watershed`` by name, or a U-Net from a checkpoint directory (local or s3://)."""
    from breakhis_ray.segmentation import create_segmenter

    options = dict(options or {})
    if _is_classical(segmenter):
        return create_segmenter(segmenter, **options)
    meta = _read_checkpoint_meta(segmenter)
    name = str(meta["model_args"]["name"])
    if not name.startswith("unet_"):
        raise ConfigError(f"segmenter checkpoint {segmenter} holds {name!r}, not a U-Net; "
                          f"give a U-Net checkpoint, {' or '.join(CLASSICAL_SEGMENTERS)}")
    options.setdefault("normalization", meta["preprocessing"].get("scale", "imagenet"))
    options.setdefault("device", device)
    return create_segmenter("unet", checkpoint=segmenter.rstrip("/"), **options)


# ====================================================================================== CPU stage
_S3_FS = None


def _fs_and_path(uri: str):
    """Filesystem and path for a URI; the S3 filesystem is built once per worker process."""
    global _S3_FS
    if storage.is_s3(uri):
        if _S3_FS is None:
            _S3_FS = storage.s3_filesystem()
        return _S3_FS, uri[len("s3://"):]
    return storage.resolve(uri)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read(uri: str) -> bytes | str:
    """The file's bytes, or an error string."""
    fs, path = _fs_and_path(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return "read_error: file not found"
    except OSError as exc:
        return f"read_error: {_first_line(exc)}"


def check_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """``(height, width)`` from the image header, without decoding pixels.

    Raises :class:`DataError` (``empty``, ``not_an_image`` or ``too_large: ...``) before any large
    allocation happens.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise DataError("empty: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except UnidentifiedImageError:
        raise DataError(f"not_an_image: no known image format in {len(data)} bytes") from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"too_large: {_first_line(exc)}") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise DataError(f"decode_error: unreadable header ({_first_line(exc)})") from None
    if width * height > max_pixels:
        raise DataError(f"too_large: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    return height, width


def decode_for_models(
    data: bytes,
    spec,
    segment_size: tuple[int, int] | None,
    max_pixels: int,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """One encoded image -> (classifier uint8 (H, W, 3), segmenter uint8 or None, original (H, W)).

    Raises :class:`DataError` with a ``<kind>: <detail>`` message for a bad input.
    """
    from breakhis_ray.data.transforms import decode_image, prepare_uint8, resize_uint8

    check_header(data, max_pixels)
    try:
        img = decode_image(data)
    except DataError as exc:
        raise DataError(f"decode_error: {exc}") from None
    image = prepare_uint8(img, spec)
    seg = None
    if segment_size is not None:
        seg = resize_uint8(img, segment_size)
    return image, seg, (int(img.shape[0]), int(img.shape[1]))


class _BatchDecoder:
    """Decodes a list of encoded images into the columns the model stage reads (errors become rows)."""

    def __init__(self, preprocessing: dict, segment_size: Sequence[int] | None, max_pixels: int):
        from breakhis_ray.data.transforms import PreprocessSpec

        self.spec = PreprocessSpec.from_dict(preprocessing)
        self.segment_size = tuple(int(v) for v in segment_size) if segment_size is not None else None
        self.max_pixels = int(max_pixels)

    def __call__(self, paths: Sequence[str], contents: Sequence[bytes | str], chunks: np.ndarray) -> dict:
        n = len(paths)
        h, w = self.spec.size
        images = np.zeros((n, h, w, 3), dtype=np.uint8)
        segs = None
        if self.segment_size is not None:
            segs = np.zeros((n, *self.segment_size, 3), dtype=np.uint8)
        ok = np.zeros(n, dtype=bool)
        errors = np.empty(n, dtype=object)
        sizes = np.zeros((n, 2), dtype=np.int32)
        for i, data in enumerate(contents):
            errors[i] = ""
            if isinstance(data, str):
                errors[i] = data
                continue
            try:
                image, seg, size = decode_for_models(bytes(data), self.spec, self.segment_size, self.max_pixels)
            except _DECODE_ERRORS as exc:
                msg = _first_line(exc)
                errors[i] = msg if ":" in msg.split(" ")[0] else f"decode_error: {msg}"
                continue
            images[i] = image
            if segs is not None:
                segs[i] = seg
            sizes[i] = size
            ok[i] = True
        out = {
            "path": np.asarray(list(paths), dtype=object),
            CHUNK_COLUMN: np.asarray(chunks, dtype=np.int32),
            "_ok": ok,
            "_error": errors,
            "_height": sizes[:, 0],
            "_width": sizes[:, 1],
            "_image": images,
        }
        if segs is not None:
            out["_seg"] = segs
        return out


def read_and_decode(
    batch: dict[str, np.ndarray],
    preprocessing: dict,
    segment_size: Sequence[int] | None,
    max_pixels: int,
    io_threads: int = 8,
) -> dict[str, np.ndarray]:
    """CPU stage for path inputs: read every file (threads, for object-store latency) and decode it."""
    paths = [str(p) for p in batch["path"]]
    if io_threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(io_threads, len(paths))) as pool:
            contents = list(pool.map(_read, paths))
    else:
        contents = [_read(p) for p in paths]
    chunks = batch.get(CHUNK_COLUMN, np.zeros(len(paths), dtype=np.int32))
    return _BatchDecoder(preprocessing, segment_size, max_pixels)(paths, contents, chunks)


def read_and_decode_shards(
    batch: dict[str, np.ndarray],
    preprocessing: dict,
    segment_size: Sequence[int] | None,
    max_pixels: int,
    rows_per_batch: int = 16,
) -> Iterator[dict[str, np.ndarray]]:
    """CPU stage for shard inputs: read the needed rows of one row group per unit and decode them."""
    decoder = _BatchDecoder(preprocessing, segment_size, max_pixels)
    for uri, group, rows, chunk in zip(batch["file"], batch["row_group"], batch["rows"], batch[CHUNK_COLUMN]):
        fs, path = _fs_and_path(str(uri))
        with fs.open_input_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(int(group), columns=["path", "image"])
        table = table.take(pa.array(np.asarray(rows, dtype=np.int64)))
        paths = table.column("path").to_pylist()
        images = table.column("image").to_pylist()
        del table
        for start in range(0, len(paths), rows_per_batch):
            stop = start + rows_per_batch
            contents = [b if b is not None else "empty: no image bytes in the shard" for b in images[start:stop]]
            yield decoder(paths[start:stop], contents, np.full(len(contents), int(chunk), dtype=np.int32))


# ==================================================================================== model stage
def _filename_fields(path: str) -> tuple[str | None, int | None, str | None]:
    from breakhis_ray.data.manifest import parse_filename

    name = posixpath.basename(str(path).split("#", 1)[0].replace("\\", "/"))
    parsed = parse_filename(name)
    if parsed is None:
        return None, None, None
    return parsed.patient_folder, parsed.magnification, parsed.label


def _mask_name(path: str) -> str:
    base = posixpath.basename(str(path).replace("\\", "/"))
    stem = base.rsplit(".", 1)[0] if "." in base else base
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:80] or "image"
    return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_nuclei.png"


def _mask_png(labels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(labels, 0, 65535).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


class Predictor:
    """Segmentation + classification in one actor (Ray Data ``map_batches``) or in a plain loop.

    Loads the classifier checkpoint and the segmenter (U-Net checkpoint, ``threshold``, ``watershed`` or
    ``None``) once, from local paths or ``s3://``. ``__call__`` takes the CPU stage's columns (see
    :func:`read_and_decode`) and returns a ``pyarrow.Table`` with :data:`PREDICTION_SCHEMA` (plus the
    chunk id when the input carries one). Rows whose decode failed are passed through as error rows.

    ``device``: ``auto`` (CUDA when this process sees a GPU), ``cpu`` or ``cuda``. ``amp``: bf16 autocast
    on GPU. ``mask_dir``: where nuclei masks are written (``None``: not written).
    """

    def __init__(
        self,
        classifier: str,
        segmenter: str | None = None,
        *,
        segmenter_options: dict | None = None,
        segment_size: Sequence[int] | None = None,
        device: str = "auto",
        amp: bool = True,
        torch_threads: int | None = None,
        mask_dir: str | None = None,
        run_id: str | None = None,
    ) -> None:
        import torch

        from breakhis_ray.checkpoint import load_model
        from breakhis_ray.data.transforms import PreprocessSpec

        self.torch_threads = torch_threads
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device=cuda but no CUDA device is visible (set num_gpus > 0 for the actors)")
        self.device = torch.device(device)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.classifier_uri = str(classifier)
        self.segmenter_uri = str(segmenter) if segmenter is not None else None
        self.model, self.meta = load_model(self.classifier_uri.rstrip("/"), map_location=self.device)
        self.labels = list(self.meta["labels"])
        if MALIGNANT not in self.labels:
            raise ConfigError(f"classifier {classifier} has labels {self.labels}; inference needs {MALIGNANT!r}")
        self.malignant_index = self.labels.index(MALIGNANT)
        self.spec = PreprocessSpec.from_dict(self.meta["preprocessing"])
        self.in_channels = int(self.meta["model_args"].get("in_channels", 3))
        self.segmenter = None
        self.segment_size = None
        if segmenter is not None:
            _, self.segment_size = resolve_sizes(self.classifier_uri, self.segmenter_uri, segment_size)
            self.segmenter = build_segmenter(self.segmenter_uri, segmenter_options, device=str(self.device))
        # Segmentation-guided classifiers get the same guidance (mask channel or emphasis) as in training,
        # read from the checkpoint's config.
        from breakhis_ray.segmentation.guided import stage_for_checkpoint

        self.guidance = stage_for_checkpoint(self.classifier_uri, device=str(self.device))
        guided_channels = 4 if self.guidance is not None and self.guidance.guidance.mode == "channel" else 3
        if self.in_channels != guided_channels:
            raise ConfigError(f"classifier {classifier} takes {self.in_channels} input channels but its saved "
                              f"guidance gives {guided_channels}")
        self.mask_dir = mask_dir
        self.run_id = run_id or new_run_id()

    @classmethod
    def from_checkpoint(cls, classifier: str, segmenter: str | None = None, **options: Any) -> "Predictor":
        """Rebuild a predictor from checkpoint directories alone (no Ray needed)."""
        return cls(classifier, segmenter, **options)

    # ------------------------------------------------------------------------------ plain loop use
    @property
    def preprocessing(self) -> dict:
        return self.spec.to_dict()

    def decode(self, images: Sequence[bytes], paths: Sequence[str] | None = None,
               max_pixels: int = 64_000_000) -> dict[str, np.ndarray]:
        """The CPU stage in this process: encoded images -> the batch :meth:`__call__` takes."""
        paths = list(paths) if paths is not None else [f"image-{i}" for i in range(len(images))]
        decoder = _BatchDecoder(self.preprocessing, self.segment_size, max_pixels)
        return decoder(paths, list(images), np.zeros(len(paths), dtype=np.int32))

    def predict_bytes(self, images: Sequence[bytes], paths: Sequence[str] | None = None,
                      max_pixels: int = 64_000_000) -> pa.Table:
        """Predictions (:data:`PREDICTION_SCHEMA`) for encoded images, in this process."""
        out = self(self.decode(images, paths, max_pixels))
        return out.drop_columns([CHUNK_COLUMN])

    def predict_uris(self, uris: Sequence[str], max_pixels: int = 64_000_000) -> pa.Table:
        """Predictions for files (local or s3://), read and decoded in this process."""
        return self.predict_bytes([_read(u) for u in uris], list(uris), max_pixels)

    # ---------------------------------------------------------------------------------- the model
    def _classify(self, images: np.ndarray) -> np.ndarray:
        import torch

        from breakhis_ray.data.transforms import normalize

        if self.guidance is not None:
            guided = self.guidance.transform(np.ascontiguousarray(images))
            if self.torch_threads:
                torch.set_num_threads(int(self.torch_threads))
            images = guided["image"]
            if "mask" in guided:
                images = np.concatenate([images, guided["mask"][..., None]], axis=-1)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = normalize(x, self.spec)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1)[:, self.malignant_index].cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        if self.torch_threads:
            torch.set_num_threads(int(self.torch_threads))
        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        ok = np.asarray(batch["_ok"], dtype=bool)
        idx = np.flatnonzero(ok)
        prob = np.full(n, np.nan, dtype=np.float32)
        feats = {k: np.full(n, np.nan, dtype=np.float64) for k in FEATURE_COLUMNS}
        mask_uris: list[str | None] = [None] * n
        chunks = np.asarray(batch.get(CHUNK_COLUMN, np.zeros(n, dtype=np.int32)), dtype=np.int32)
        if idx.size:
            with torch.inference_mode():
                if self.segmenter is not None:
                    seg_images = batch["_seg"][idx] if "_seg" in batch else batch["_image"][idx]
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                        result = self.segmenter.segment(np.ascontiguousarray(seg_images))
                    for j, i in enumerate(idx):
                        for key in FEATURE_COLUMNS:
                            feats[key][i] = float(result.features[j][key])
                    if self.mask_dir is not None:
                        for j, i in enumerate(idx):
                            folder = storage.join(self.mask_dir, f"part-{int(chunks[i]):05d}")
                            uri = storage.join(folder, _mask_name(paths[i]))
                            storage.write_bytes(uri, _mask_png(result.labels[j]))
                            mask_uris[i] = uri
                prob[idx] = self._classify(batch["_image"][idx])
        fields = [_filename_fields(p) for p in paths]
        errors = [None if ok[i] else str(batch["_error"][i]) for i in range(n)]
        now = datetime.now(timezone.utc)
        has_seg = self.segmenter is not None
        columns = {
            "path": pa.array(paths, pa.string()),
            "status": pa.array(["ok" if o else "error" for o in ok], pa.string()),
            "error": pa.array(errors, pa.string()),
            "prob_malignant": pa.array(prob, pa.float32(), mask=~ok),
            "pred_label": pa.array(
                [(MALIGNANT if prob[i] >= 0.5 else BENIGN) if ok[i] else None for i in range(n)], pa.string()),
            "patient_id": pa.array([f[0] for f in fields], pa.string()),
            "magnification": pa.array([f[1] for f in fields], pa.int16()),
            "label": pa.array([f[2] for f in fields], pa.string()),
            "image_height": pa.array(np.asarray(batch["_height"], dtype=np.int32), pa.int32(), mask=~ok),
            "image_width": pa.array(np.asarray(batch["_width"], dtype=np.int32), pa.int32(), mask=~ok),
        }
        feature_mask = ~ok if has_seg else np.ones(n, dtype=bool)
        columns["nuclei_count"] = pa.array(
            np.nan_to_num(feats["nuclei_count"]).astype(np.int32), pa.int32(), mask=feature_mask)
        for key in FEATURE_COLUMNS[1:]:
            columns[key] = pa.array(feats[key].astype(np.float32), pa.float32(), mask=feature_mask)
        columns["mask_uri"] = pa.array(mask_uris, pa.string())
        columns["classifier_checkpoint"] = pa.array([self.classifier_uri] * n, pa.string())
        columns["segmenter_checkpoint"] = pa.array([self.segmenter_uri] * n, pa.string())
        columns["run_id"] = pa.array([self.run_id] * n, pa.string())
        columns["processed_at"] = pa.array([now] * n, pa.timestamp("us", tz="UTC"))
        table = pa.table(columns, schema=PREDICTION_SCHEMA)
        return table.append_column(CHUNK_COLUMN, pa.array(chunks, pa.int32()))


# ========================================================================================= driver
def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def part_name(chunk: int) -> str:
    return f"part-{chunk:05d}.parquet"


def _chunk_of(uri: str) -> int | None:
    name = posixpath.basename(uri.replace("\\", "/"))
    if name.startswith("part-") and name.endswith(".parquet"):
        digits = name[len("part-"):-len(".parquet")]
        if digits.isdigit():
            return int(digits)
    return None


def write_atomic(uri: str, data: bytes) -> None:
    """Write a file so readers see all of it or nothing: temp name + rename locally, one PUT on s3."""
    if storage.is_s3(uri):
        storage.write_bytes(uri, data)
        return
    _, path = storage.resolve(uri)
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {_first_line(exc)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def versions() -> dict[str, str]:
    """Versions recorded beside the output."""
    import importlib.metadata as md

    import breakhis_ray

    out = {"python": platform.python_version(), "platform": platform.platform(),
           "breakhis_ray": breakhis_ray.__version__}
    for dist in ("torch", "ray", "pyarrow", "numpy", "pillow", "segmentation-models-pytorch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _plan_record(plan: InputPlan, cfg: InferConfig) -> dict:
    return {
        "format": PLAN_FORMAT,
        "format_version": 1,
        "input": cfg.input,
        "mode": plan.mode,
        "n_inputs": len(plan.paths),
        "chunk_size": plan.chunk_size,
        "n_chunks": plan.n_chunks,
        "inputs_sha256": plan.digest(),
        "settings": {
            "classifier": cfg.classifier,
            "segmenter": cfg.segmenter,
            "segmenter_options": cfg.segmenter_options,
            "segment_size": list(cfg.segment_size) if cfg.segment_size else None,
            "max_pixels": cfg.max_pixels,
            "include_augmented": cfg.include_augmented,
            "write_masks": cfg.write_masks,
        },
    }


def _check_or_write_plan(pred_dir: str, record: dict) -> bool:
    """Compare with the plan of an earlier run in the same output; write it when there is none.

    Returns ``True`` when an earlier plan exists (a resume).
    """
    uri = storage.join(pred_dir, PLAN_FILE)
    if storage.exists(uri):
        try:
            old = json.loads(storage.read_text(uri))
        except ValueError:
            raise DataError(f"{uri} is not valid JSON: remove it (and the parts beside it) or use a new --out") \
                from None
        before = {**{k: old.get(k) for k in ("mode", "n_inputs", "chunk_size")}, **(old.get("settings") or {})}
        now = {**{k: record[k] for k in ("mode", "n_inputs", "chunk_size")}, **record["settings"]}
        diff = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in now if before.get(k) != now.get(k)]
        if old.get("inputs_sha256") != record["inputs_sha256"]:
            diff.append("the list of inputs changed")
        if diff:
            what = ", ".join(diff)
            raise ConfigError(f"{storage.parent(pred_dir)} already holds predictions for other inputs or settings "
                              f"({what}); use a new --out, or the same settings to resume")
        return True
    write_atomic(uri, (json.dumps(record, indent=2) + "\n").encode())
    return False


def _done_chunks(pred_dir: str, n_chunks: int) -> set[int]:
    if not storage.exists(pred_dir):
        return set()
    done = {_chunk_of(f) for f in storage.list_files(pred_dir, suffixes=[".parquet"])}
    return {c for c in done if c is not None and c < n_chunks}


def _predictor_kwargs(cfg: InferConfig, segment_size, run_id: str) -> dict:
    return {
        "classifier": cfg.classifier,
        "segmenter": cfg.segmenter,
        "segmenter_options": dict(cfg.segmenter_options),
        "segment_size": list(segment_size) if segment_size else None,
        "device": cfg.device,
        "amp": cfg.amp,
        "torch_threads": cfg.torch_threads or max(1, round(cfg.num_cpus)),
        "mask_dir": storage.join(cfg.out, MASKS_DIR) if cfg.write_masks and cfg.segmenter else None,
        "run_id": run_id,
    }


def build_dataset(cfg: InferConfig, plan: InputPlan, chunks: Sequence[int], preprocessing: dict,
                  segment_size, run_id: str):
    """The Ray Data pipeline for ``chunks``: work units -> CPU decode tasks -> Predictor actors."""
    import ray.data

    units = plan.units(chunks)
    decode_kwargs = {"preprocessing": preprocessing, "segment_size": segment_size, "max_pixels": cfg.max_pixels}
    # Decode workers are recycled after decode_max_calls tasks (bounds allocator growth from images of
    # many sizes). Their remote args then differ from the actors', so Ray Data keeps decoding a separate
    # operator instead of fusing it into the model actors (it fuses only identical remote args).
    decode_remote: dict[str, Any] = {"num_cpus": cfg.decode_num_cpus}
    if cfg.decode_max_calls:
        decode_remote["max_calls"] = cfg.decode_max_calls
    if cfg.decode_concurrency:
        decode_remote["compute"] = ray.data.TaskPoolStrategy(size=cfg.decode_concurrency)
    # Workers on other nodes (or started before the credentials were set) get object-storage settings here.
    env = storage.credential_env()
    runtime_env = {"env_vars": env} if env else None
    if runtime_env:
        decode_remote["runtime_env"] = runtime_env
    if plan.mode == "shards":
        ds = ray.data.from_arrow(units, override_num_blocks=max(1, min(len(units), 4096)))
        ds = ds.map_batches(read_and_decode_shards, batch_size=1, batch_format="numpy",
                            fn_kwargs={**decode_kwargs, "rows_per_batch": cfg.decode_batch_size}, **decode_remote)
    else:
        blocks = max(1, min(math.ceil(len(units) / cfg.decode_batch_size), 4096))
        ds = ray.data.from_arrow(units, override_num_blocks=blocks)
        ds = ds.map_batches(read_and_decode, batch_size=cfg.decode_batch_size, batch_format="numpy",
                            fn_kwargs={**decode_kwargs, "io_threads": cfg.io_threads}, **decode_remote)
    return ds.map_batches(
        Predictor,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs=_predictor_kwargs(cfg, segment_size, run_id),
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus or None,
        # model processes keep freed memory (breakhis_ray.allocator): no page faults on every batch
        runtime_env={"env_vars": {**env, **MODEL_PROCESS_ENV}},
    )


class _ChunkWriter:
    """Gathers predicted rows per chunk and writes each chunk once it is complete."""

    def __init__(self, plan: InputPlan, pred_dir: str, chunks: Sequence[int]):
        self.plan = plan
        self.pred_dir = pred_dir
        self.expected = {c: plan.chunk_count(c) for c in chunks}
        self.buffers: dict[int, list[pa.Table]] = {c: [] for c in chunks}
        self.received = dict.fromkeys(chunks, 0)
        self.written = 0
        self.ok = 0
        self.errors = 0

    def add(self, table: pa.Table) -> None:
        ids = table.column(CHUNK_COLUMN).to_numpy()
        for c in np.unique(ids):
            c = int(c)
            if c not in self.expected:
                raise RuntimeError(f"inference produced rows for chunk {c}, which was not scheduled")
            part = table.filter(pc.equal(table.column(CHUNK_COLUMN), c))
            self.buffers[c].append(part)
            self.received[c] += len(part)
            if self.received[c] > self.expected[c]:
                raise RuntimeError(f"chunk {c}: {self.received[c]} rows for {self.expected[c]} inputs")
            if self.received[c] == self.expected[c]:
                self._write(c)

    def _write(self, chunk: int) -> None:
        table = pa.concat_tables(self.buffers.pop(chunk)).drop_columns([CHUNK_COLUMN])
        table = table.sort_by("path").cast(PREDICTION_SCHEMA)
        write_atomic(storage.join(self.pred_dir, part_name(chunk)), table_bytes(table))
        status = table.column("status").to_numpy(zero_copy_only=False)
        self.ok += int((status == "ok").sum())
        self.errors += int((status == "error").sum())
        self.written += 1

    def missing(self) -> dict[int, int]:
        return {c: self.expected[c] - self.received[c] for c in self.buffers}


def run_infer(cfg: InferConfig) -> dict:
    """CLI stage: predict every input not yet in ``cfg.out``; return (and print) the run summary."""
    start = time.perf_counter()
    run_id = cfg.run_id or new_run_id()
    plan = plan_inputs(cfg)
    preprocessing, segment_size = resolve_sizes(cfg.classifier, cfg.segmenter, cfg.segment_size)
    pred_dir = storage.join(cfg.out, PREDICTIONS_DIR)
    storage.makedirs(pred_dir)
    resumed = _check_or_write_plan(pred_dir, _plan_record(plan, cfg))
    done = _done_chunks(pred_dir, plan.n_chunks) if resumed else set()
    pending = [c for c in range(plan.n_chunks) if c not in done]
    if cfg.max_chunks is not None:
        pending = pending[: cfg.max_chunks]
    storage.write_text(storage.join(cfg.out, "config.yaml"), config_yaml(cfg))
    storage.write_text(storage.join(cfg.out, "versions.json"), json.dumps(versions(), indent=2) + "\n")

    writer = _ChunkWriter(plan, pred_dir, pending)
    if pending:
        from breakhis_ray.ray_utils import ensure_ray

        ensure_ray(cfg.ray)
        ds = build_dataset(cfg, plan, pending, preprocessing, segment_size, run_id)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(batch)
        missing = {c: m for c, m in writer.missing().items() if m}
        if missing:
            raise RuntimeError(f"inference lost rows: chunk -> missing rows {missing}")
    seconds = time.perf_counter() - start
    processed = writer.ok + writer.errors
    skipped = sum(plan.chunk_count(c) for c in done)
    remaining = plan.n_chunks - len(done) - writer.written
    summary = {
        "out": cfg.out,
        "predictions": pred_dir,
        "run_id": run_id,
        "mode": plan.mode,
        "total": len(plan.paths),
        "processed": processed,
        "ok": writer.ok,
        "error": writer.errors,
        "skipped_done": skipped,
        "chunks": plan.n_chunks,
        "chunks_written": writer.written,
        "chunks_skipped": len(done),
        "chunks_remaining": remaining,
        "complete": remaining == 0,
        "seconds": round(seconds, 3),
        "images_per_s": round(processed / seconds, 2) if seconds > 0 else None,
    }
    storage.write_text(storage.join(cfg.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    state = "complete" if remaining == 0 else f"INCOMPLETE: {remaining} chunk(s) left, re-run to finish"
    print(f"infer: total={summary['total']} ok={writer.ok} error={writer.errors} skipped_as_done={skipped} "
          f"images/s={summary['images_per_s']} ({state}) -> {pred_dir}", file=sys.stdout, flush=True)
    return summary


def read_predictions(out: str) -> pa.Table:
    """Every prediction row under ``<out>/predictions`` as one table (sorted by path)."""
    pred_dir = storage.join(out, PREDICTIONS_DIR)
    parts = [f for f in storage.list_files(pred_dir, suffixes=[".parquet"]) if _chunk_of(f) is not None]
    if not parts:
        return PREDICTION_SCHEMA.empty_table()
    tables = []
    for uri in parts:
        fs, path = storage.resolve(uri)
        tables.append(pq.read_table(path, filesystem=fs, schema=PREDICTION_SCHEMA))
    return pa.concat_tables(tables).sort_by("path")


__all__ = [
    "PREDICTION_SCHEMA",
    "InputPlan",
    "Predictor",
    "build_dataset",
    "check_header",
    "decode_for_models",
    "plan_inputs",
    "read_and_decode",
    "read_and_decode_shards",
    "read_predictions",
    "resolve_sizes",
    "run_infer",
    "write_atomic",
]
