"""THE image decoder: encoded bytes -> ``uint8 (H, W, 3)`` RGB, or a rejection ``(reason, detail)``.

``prepare`` (:mod:`breakhis_ray.data.shards`), the training pipeline (:mod:`breakhis_ray.data.pipeline`) and
``infer`` (:mod:`breakhis_ray.inference.decode_stage`) all decode through :func:`decode_rgb` /
:func:`try_decode`, so an image is accepted or refused, and converted, the same way everywhere.

Rejection reasons (one vocabulary; ``prepare`` writes them to ``rejects.parquet``)
-------------------------------------------------------------------------------

==================  =============================================================  ==================
reason              meaning                                                        ``infer`` kind
==================  =============================================================  ==================
``zero_byte``       no bytes at all                                                ``empty``
``not_an_image``    no known image format (and no known image signature)          ``not_an_image``
``corrupt``         an image signature, but a header or data that cannot be read  ``decode_error``
``truncated``       the data ends before the image does                           ``decode_error``
``too_large``       more than ``max_pixels`` pixels, from the header, before       ``too_large``
                    any pixel is decoded (decompression-bomb guard)
``unsupported_mode``  a pixel mode that cannot be converted to RGB                 ``decode_error``
==================  =============================================================  ==================

``infer`` keeps its documented ``error`` column (``<kind>: <detail>``): :func:`error_text` maps a reason to
its kind and, where the kind is coarser than the reason, puts the reason first in the detail
(``decode_error: truncated: image file is truncated``).

Conversions (recorded as ``converted_from`` by ``prepare``; ``None`` for 8-bit RGB)
---------------------------------------------------------------------------------
* transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, palette with a transparent index) is composited on
  white, the slide background;
* integer greyscale (``I;16*``, ``I``) maps ``0..65535`` linearly onto ``0..255`` (values outside are
  clipped first);
* float greyscale (``F``) is read as ``0..255`` values: NaN -> 0, rounded, clipped;
* everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ...) goes through PIL's
  ``convert("RGB")``; a mode PIL cannot convert is ``unsupported_mode``;
* 16-bit-per-channel PNGs (``RGB;16``, ``RGBA;16``, ``LA;16``) are reduced to 8 bits by PIL;
* multi-frame files use their first frame.

PNG backends
------------
8-bit RGB PNGs (every BreakHis image) whose header passed the size guard go to a faster decoder when one is
installed: ``wuffs`` (``pywuffs``, Google's Wuffs PNG decoder, with the chunk CRC and Adler-32 checks that
pywuffs leaves off by default switched on), ``imagecodecs`` (its libspng, CRC and Adler-32 checked) or
``opencv`` (``cv2.imdecode``, libpng); PNGs with a ``tRNS`` colour key or an animation (``acTL``), everything
else, and any image a backend declines or fails on, go through PIL, which then decides the
rejection, so the vocabulary stays the same whichever backend decoded. (``pyspng`` was measured too and left
out: it turns libspng's checksum checks off, so it returns altered pixels for PNGs whose data PIL rejects
as corrupt.) A backend returns the
same pixels as PIL or nothing (``tests/test_decode.py`` compares every installed backend with PIL on a corpus
of RGB, RGBA, grey, palette, 16-bit, interlaced, EXIF-rotated and damaged PNGs). The backend is chosen per call
(``backend=``, from the stages' ``decode.backend``), else by ``$BREAKHIS_DECODE_BACKEND``, else ``auto``:
the first installed of :data:`FAST_BACKENDS`, ordered by measured speed (:func:`backend_rates`), else PIL.

No Ray, no torch: this module imports numpy, PIL and the backends (lazily), :mod:`breakhis_ray.errors` and
the default ``max_pixels`` and backend names from :mod:`breakhis_ray.config.common`.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Sequence

import numpy as np

# The one default decompression-bomb guard (width * height), shared with every stage's config.
from breakhis_ray.config.common import DECODE_BACKENDS, DEFAULT_MAX_PIXELS
from breakhis_ray.errors import ConfigError, DataError

#: Every reason :func:`decode_rgb` may give, and the ``infer`` error kind each maps to.
ERROR_KINDS = {
    "zero_byte": "empty",
    "not_an_image": "not_an_image",
    "corrupt": "decode_error",
    "truncated": "decode_error",
    "too_large": "too_large",
    "unsupported_mode": "decode_error",
}
REASONS = tuple(ERROR_KINDS)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_MAGIC = (PNG_SIGNATURE, b"\xff\xd8\xff", b"RIFF", b"II*\x00", b"MM\x00*", b"GIF8", b"BM")
# What PIL raises for damaged data (besides UnidentifiedImageError, an OSError).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa")


class ImageRejected(DataError):
    """An image that cannot be used, with a machine-readable ``reason`` (see :data:`REASONS`) and a one-line
    ``detail``. ``prepare`` also raises it with its own reasons (``missing``, ``wrong_size``)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self):  # picklable across Ray workers with both arguments
        return type(self), (self.reason, self.detail)


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, without decoding pixels."""

    width: int
    height: int
    mode: str
    format: str | None


@dataclass(frozen=True)
class Decoded:
    """The outcome of :func:`try_decode`: ``pixels`` (uint8 (H, W, 3) RGB) or ``reason`` + ``detail``.

    ``converted_from``: the original mode when pixels were converted (``None``: 8-bit RGB, unchanged).
    ``format``: PIL's format name (``PNG``, ``JPEG``, ...) of an accepted image.
    """

    pixels: np.ndarray | None
    reason: str | None = None
    detail: str | None = None
    converted_from: str | None = None
    format: str | None = None

    @property
    def ok(self) -> bool:
        return self.pixels is not None


def error_text(reason: str, detail: str) -> str:
    """The ``infer`` ``error`` column for a rejection: ``<kind>: <detail>`` (kind from :data:`ERROR_KINDS`)."""
    kind = ERROR_KINDS.get(reason, "decode_error")
    return f"{kind}: {detail}" if kind == reason else f"{kind}: {reason}: {detail}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _damage_reason(exc: BaseException) -> str:
    return "truncated" if isinstance(exc, EOFError) or "truncat" in str(exc).lower() else "corrupt"


def _png_bit_depth(data: bytes) -> int | None:
    if data.startswith(PNG_SIGNATURE) and len(data) >= 25 and data[12:16] == b"IHDR":
        return data[24]
    return None


def _open(source: bytes | BinaryIO):
    """PIL image with only its header read; raises :class:`ImageRejected` for what cannot even be opened."""
    from PIL import Image, UnidentifiedImageError

    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", _one_line(exc)) from None
    except UnidentifiedImageError:
        head = bytes(source[:8]) if isinstance(source, (bytes, bytearray, memoryview)) else b""
        size = f"{len(source)} bytes" if isinstance(source, (bytes, bytearray, memoryview)) else "stream"
        if head.startswith(_IMAGE_MAGIC):
            raise ImageRejected("corrupt", f"image header unreadable ({size})") from None
        raise ImageRejected("not_an_image", f"no known image format ({size}, starts {head!r})") from None
    except _PIL_ERRORS as exc:
        raise ImageRejected(_damage_reason(exc), _one_line(exc)) from None


def _check_bytes(data) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"the image decoder expects encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageRejected("zero_byte", "file is empty")
    return bytes(data) if not isinstance(data, bytes) else data


def read_header(source: bytes | BinaryIO) -> ImageHeader:
    """Size, mode and format from the image header alone (bytes, or a binary file object positioned at 0).

    Raises :class:`ImageRejected` (``zero_byte``, ``not_an_image``, ``corrupt``, ``truncated``, and
    ``too_large`` only for sizes PIL itself refuses to open).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = _check_bytes(source)
    with _open(source) as img:
        return ImageHeader(int(img.size[0]), int(img.size[1]), img.mode, img.format)


def image_size(source: bytes | BinaryIO) -> tuple[int, int]:
    """``(width, height)`` from the header, without decoding pixels (see :func:`read_header`)."""
    header = read_header(source)
    return header.width, header.height


# ------------------------------------------------------------------------------------------ PNG backends
#: Fast PNG backends, in the order ``auto`` tries them: fastest first, as measured on synthetic 700x460
#: BreakHis PNGs (per-core rates in ``docs/BENCHMARKS.md``; ``breakhis-ray bench`` reports them again).
FAST_BACKENDS = ("wuffs", "imagecodecs", "opencv")
#: Where ``pip`` finds each backend.
BACKEND_PACKAGES = {"wuffs": "pywuffs", "imagecodecs": "imagecodecs", "opencv": "opencv-python-headless"}
#: Environment variable that picks the backend where a stage's config says ``auto`` (``pil`` forces PIL).
BACKEND_ENV = "BREAKHIS_DECODE_BACKEND"


#: PNG chunks that send a file to PIL whatever the backend: a ``tRNS`` colour key (Wuffs composites it, PIL
#: keeps the stored pixels) and ``acTL``, an animation (Wuffs and OpenCV may return another frame than PIL's).
_PIL_ONLY_CHUNKS = (b"tRNS", b"acTL")


def _has_chunk_before_idat(data: bytes, kinds: Sequence[bytes]) -> bool:
    """Whether a PNG chunk of one of the types ``kinds`` comes before the first IDAT (reads chunk headers
    only)."""
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, found = struct.unpack_from(">I4s", data, pos)
        if found in kinds:
            return True
        if found == b"IDAT":
            return False
        pos += 12 + length
    return False


def _wuffs() -> Callable[[bytes], np.ndarray]:
    import threading

    from pywuffs import ImageDecoderQuirks, ImageDecoderType, PixelFormat
    from pywuffs.aux import ImageDecoder, ImageDecoderConfig

    config = ImageDecoderConfig()
    config.enabled_decoders = [ImageDecoderType.PNG]
    config.pixel_format = PixelFormat.RGB
    # pywuffs switches the PNG checksums off by default; on here, so damaged data fails and PIL decides.
    config.quirks = {ImageDecoderQuirks.IGNORE_CHECKSUM: 0}
    local = threading.local()  # a decoder keeps per-call state: one per thread (I/O threads decode at once)

    def load(data: bytes) -> np.ndarray:
        decoder = getattr(local, "decoder", None)
        if decoder is None:
            decoder = local.decoder = ImageDecoder(config)
        result = decoder.decode(data)
        if result.error_message:
            raise ValueError(result.error_message)
        return result.pixbuf

    return load


def _imagecodecs() -> Callable[[bytes], np.ndarray]:
    import imagecodecs

    # libspng with its default checks (chunk CRCs, zlib's Adler-32): damaged data raises, and PIL decides
    return imagecodecs.spng_decode if imagecodecs.SPNG.available else imagecodecs.png_decode


def _opencv() -> Callable[[bytes], np.ndarray]:
    import cv2

    # EXIF orientation ignored, as PIL does; RGB order straight from the decoder where OpenCV offers it.
    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)
    flags = (rgb if rgb is not None else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION

    def load(data: bytes) -> np.ndarray:
        out = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
        return out if out is None or rgb is not None else out[..., ::-1]

    return load


_LOADERS = {"wuffs": _wuffs, "imagecodecs": _imagecodecs, "opencv": _opencv}


@functools.lru_cache(maxsize=None)
def _backend_function(name: str) -> Callable[[bytes], np.ndarray] | None:
    """The decode function of an installed backend, ``None`` when its package does not import."""
    try:
        return _LOADERS[name]()
    except ImportError:
        return None


def available_backends() -> list[str]:
    """``pil`` and every fast backend whose package is installed here, in ``auto``'s order."""
    return ["pil", *(name for name in FAST_BACKENDS if _backend_function(name) is not None)]


def resolve_backend(backend: str | None = None) -> str:
    """The backend a call with ``backend`` uses: an explicit name as is (it must be installed), else
    (``None``/``auto``) ``$BREAKHIS_DECODE_BACKEND`` if set, else the first installed of
    :data:`FAST_BACKENDS`, else ``pil``. Raises :class:`~breakhis_ray.errors.ConfigError` for an unknown or
    uninstalled name."""
    name = backend or "auto"
    if name == "auto":
        name = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if name not in DECODE_BACKENDS:
        raise ConfigError(f"unknown decode backend {name!r}; choose from {', '.join(DECODE_BACKENDS)}")
    if name == "auto":
        return next((n for n in FAST_BACKENDS if _backend_function(n) is not None), "pil")
    if name != "pil" and _backend_function(name) is None:
        raise ConfigError(f"decode backend {name!r} is not installed here (pip install {BACKEND_PACKAGES[name]}); "
                          f"installed: {', '.join(available_backends())}")
    return name


def _is_png_rgb8(data: bytes) -> bool:
    """The IHDR says 8-bit truecolour (colour type 2): what PIL opens as mode ``RGB`` without conversion."""
    return data.startswith(PNG_SIGNATURE) and len(data) >= 26 and data[12:16] == b"IHDR" and data[24:26] == b"\x08\x02"


def _decode_png_fast(data: bytes, backend: str) -> np.ndarray | None:
    """uint8 ``(H, W, 3)`` of an 8-bit RGB PNG from ``backend``, or ``None`` to let PIL decode (any other PNG,
    ``pil``, or output that is not 8-bit RGB). May raise; PIL then decodes the same bytes and decides.
    Called only after the header passed the ``max_pixels`` guard."""
    if backend == "pil" or not _is_png_rgb8(data) or _has_chunk_before_idat(data, _PIL_ONLY_CHUNKS):
        return None
    function = _backend_function(backend)
    out = function(data) if function is not None else None
    if out is None or out.dtype != np.uint8 or out.ndim != 3 or out.shape[2] != 3:
        return None
    return out


def backend_rates(blobs: Sequence[bytes], backends: Sequence[str] | None = None, repeats: int = 3,
                  ) -> dict[str, float]:
    """Images per second on one core of each backend (default: every installed one) on ``blobs``, bytes in
    memory, through :func:`decode` (header, guard and checks included); the best of ``repeats`` passes,
    interleaved so that load from other processes hits every backend alike."""
    names = list(backends) if backends is not None else available_backends()
    best = {name: float("inf") for name in names}
    for _ in range(max(1, repeats)):
        for name in names:
            start = time.perf_counter()
            for data in blobs:
                decode(data, backend=name)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: round(len(blobs) / max(seconds, 1e-9), 1) for name, seconds in best.items()}


def _to_rgb(img, data: bytes) -> tuple[np.ndarray, str | None]:
    """8-bit RGB pixels of a loaded PIL image and the mode they were converted from (``None``: unchanged)."""
    from PIL import Image

    mode = img.mode
    deep = _png_bit_depth(data) == 16
    if mode == "RGB":
        return np.asarray(img), ("RGB;16" if deep else None)
    if mode in _TRANSPARENT_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        pixels = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return pixels, mode + (";16" if deep and mode in ("RGBA", "LA") else "")
    if mode == "I" or mode.startswith("I;16"):
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        gray = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1), ("I;16" if mode == "I" and deep else mode)
    if mode == "F":
        gray = np.clip(np.rint(np.nan_to_num(np.asarray(img), nan=0.0)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1), mode
    try:
        return np.asarray(img.convert("RGB")), mode
    except (ValueError, OSError) as exc:
        raise ImageRejected("unsupported_mode", f"pixel mode {mode!r} cannot be converted to RGB "
                            f"({_one_line(exc)})") from None


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, backend: str | None = None) -> Decoded:
    """:func:`decode_rgb` with what the pixels were converted from and the source format (for ``prepare``).

    Raises :class:`ImageRejected`.
    """
    data = _check_bytes(data)
    name = resolve_backend(backend)
    with _open(data) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageRejected("too_large", f"{width}x{height} = {width * height} pixels exceeds "
                                f"max_pixels={max_pixels} (decompression-bomb guard)")
        fmt = img.format
        if name != "pil" and fmt == "PNG" and img.mode == "RGB" and _png_bit_depth(data) == 8:
            try:
                fast = _decode_png_fast(data, name)
            except Exception:  # noqa: BLE001 - any backend failure: PIL decides below
                fast = None
            if fast is not None and fast.shape == (height, width, 3) and fast.dtype == np.uint8:
                return Decoded(np.ascontiguousarray(fast), format=fmt)
        try:
            img.load()
        except _PIL_ERRORS as exc:
            raise ImageRejected(_damage_reason(exc), _one_line(exc)) from None
        pixels, converted = _to_rgb(img, data)
    return Decoded(np.ascontiguousarray(pixels, dtype=np.uint8), converted_from=converted, format=fmt)


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, backend: str | None = None) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, TIFF, WebP, ...) -> ``uint8 (H, W, 3)`` RGB.

    Raises :class:`ImageRejected` (a :class:`~breakhis_ray.errors.DataError`) with one of :data:`REASONS`;
    the pixel count is checked from the header before anything is decoded. ``backend``: see
    :func:`resolve_backend` (the pixels do not depend on it).
    """
    return decode(data, max_pixels=max_pixels, backend=backend).pixels


def try_decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, backend: str | None = None) -> Decoded:
    """:func:`decode_rgb` for callers that record failures as rows: never raises for a bad image."""
    try:
        return decode(data, max_pixels=max_pixels, backend=backend)
    except ImageRejected as rej:
        return Decoded(None, rej.reason, rej.detail)


def decode_labels(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded mask / label image -> its stored values, unconverted (``(H, W)`` or ``(H, W, C)``).

    For nuclei instance ids (16-bit), tissue classes (8-bit) and binary masks; palette images give their
    palette indices. Same guards and rejections as :func:`decode_rgb`.
    """
    data = _check_bytes(data)
    with _open(data) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageRejected("too_large", f"{width}x{height} exceeds max_pixels={max_pixels}")
        try:
            img.load()
        except _PIL_ERRORS as exc:
            raise ImageRejected(_damage_reason(exc), _one_line(exc)) from None
        return np.array(img)


__all__ = [
    "BACKEND_ENV",
    "DEFAULT_MAX_PIXELS",
    "ERROR_KINDS",
    "FAST_BACKENDS",
    "REASONS",
    "Decoded",
    "ImageHeader",
    "ImageRejected",
    "available_backends",
    "backend_rates",
    "decode",
    "decode_labels",
    "decode_rgb",
    "error_text",
    "image_size",
    "read_header",
    "resolve_backend",
    "try_decode",
]
