"""The CPU stage of ``infer``: read encoded images and decode them into the columns the model stage reads.

Plain functions over ``dict[str, np.ndarray]`` batches (Ray Data ``map_batches`` runs them as tasks, and
:meth:`breakhis_ray.inference.predictor.Predictor.decode` runs them in-process); nothing here imports Ray.

Every image goes through :func:`breakhis_ray.data.decode.try_decode` (the one decoder: header-size guard
``max_pixels``, conversions to RGB, rejection reasons) and is then prepared with the checkpoint's
:class:`~breakhis_ray.data.transforms.PreprocessSpec` (resize, stain normalisation), plus a uint8 copy at the
segmenter's size. A bad input becomes a row with ``_ok = False`` and its ``error`` text in ``_error``
(``<kind>: <detail>``, see :data:`breakhis_ray.inference.schema.PREDICTION_SCHEMA`); nothing raises.

Columns out: ``path``, ``_chunk``, ``_ok``, ``_error``, ``_height``, ``_width`` (decoded size),
``_image`` (uint8 ``(N, H, W, 3)`` at the classifier size) and, with a segmenter, ``_seg``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis_ray import storage
from breakhis_ray.data.decode import DEFAULT_MAX_PIXELS, ImageRejected, decode_rgb, error_text
from breakhis_ray.data.transforms import PreprocessSpec, prepare_uint8, resize_uint8
from breakhis_ray.errors import DataError
from breakhis_ray.inference.schema import CHUNK_COLUMN

# Raised by preprocessing (resize, stain normalisation) of a decoded image; such a row is a decode_error.
_PREPROCESS_ERRORS = (DataError, ValueError, MemoryError)

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


def read_uri(uri: str) -> bytes | str:
    """The file's bytes, or a ``read_error: ...`` string."""
    fs, path = _fs_and_path(uri)
    try:
        return storage.read_file(fs, path)
    except FileNotFoundError:
        return "read_error: file not found"
    except OSError as exc:
        return f"read_error: {_first_line(exc)}"


def decode_for_models(
    data: bytes,
    spec: PreprocessSpec,
    segment_size: tuple[int, int] | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    backend: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """One encoded image -> (classifier uint8 (H, W, 3), segmenter uint8 or None, decoded (H, W)).

    Raises :class:`~breakhis_ray.data.decode.ImageRejected` for an image the decoder refuses.
    """
    img = decode_rgb(data, max_pixels=max_pixels, backend=backend)
    image = prepare_uint8(img, spec)
    seg = resize_uint8(img, segment_size) if segment_size is not None else None
    return image, seg, (int(img.shape[0]), int(img.shape[1]))


class BatchDecoder:
    """Decodes a list of encoded images into the columns the model stage reads (errors become rows)."""

    def __init__(self, preprocessing: dict, segment_size: Sequence[int] | None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, backend: str | None = None):
        self.spec = PreprocessSpec.from_dict(preprocessing)
        self.segment_size = tuple(int(v) for v in segment_size) if segment_size is not None else None
        self.max_pixels = int(max_pixels)
        self.backend = backend

    def __call__(self, paths: Sequence[str], contents: Sequence[bytes | str], chunks: np.ndarray) -> dict:
        """``contents``: encoded bytes, or an error string already (a failed read)."""
        n = len(paths)
        h, w = self.spec.size
        images = np.zeros((n, h, w, 3), dtype=np.uint8)
        segs = np.zeros((n, *self.segment_size, 3), dtype=np.uint8) if self.segment_size is not None else None
        ok = np.zeros(n, dtype=bool)
        errors = np.full(n, "", dtype=object)
        sizes = np.zeros((n, 2), dtype=np.int32)
        for i, data in enumerate(contents):
            if isinstance(data, str):
                errors[i] = data
                continue
            try:
                image, seg, size = decode_for_models(bytes(data), self.spec, self.segment_size, self.max_pixels,
                                                     self.backend)
            except ImageRejected as rej:
                errors[i] = error_text(rej.reason, rej.detail)
                continue
            except _PREPROCESS_ERRORS as exc:
                errors[i] = f"decode_error: {_first_line(exc)}"
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
    max_pixels: int = DEFAULT_MAX_PIXELS,
    io_threads: int = 8,
    backend: str | None = None,
) -> dict[str, np.ndarray]:
    """CPU stage for path inputs: read every file (threads, for object-store latency) and decode it."""
    paths = [str(p) for p in batch["path"]]
    if io_threads > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=min(io_threads, len(paths))) as pool:
            contents = list(pool.map(read_uri, paths))
    else:
        contents = [read_uri(p) for p in paths]
    chunks = batch.get(CHUNK_COLUMN, np.zeros(len(paths), dtype=np.int32))
    return BatchDecoder(preprocessing, segment_size, max_pixels, backend)(paths, contents, chunks)


def read_and_decode_shards(
    batch: dict[str, np.ndarray],
    preprocessing: dict,
    segment_size: Sequence[int] | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    rows_per_batch: int = 16,
    backend: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """CPU stage for shard inputs: read the needed rows of one row group per unit and decode them."""
    decoder = BatchDecoder(preprocessing, segment_size, max_pixels, backend)
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
