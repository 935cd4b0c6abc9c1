"""The one decoder (``breakhis_ray.data.decode``): conversions, rejections, and the same decision and pixels
from ``prepare``, the training pipeline and ``infer`` over one corpus of odd inputs.

No Ray: each stage is driven through the lowest-level function that still runs its own code path
(``shards.process_chunk``, ``pipeline.DecodeBatch``, ``decode_stage.read_and_decode`` + ``Predictor``).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breakhis_ray.data import decode
from breakhis_ray.data.decode import (
    DEFAULT_MAX_PIXELS,
    ERROR_KINDS,
    ImageRejected,
    decode_labels,
    decode_rgb,
    error_text,
    image_size,
    read_header,
    try_decode,
)
from breakhis_ray.errors import DataError

W, H = 16, 12  # corpus image size (width, height); >= 8 so a PreprocessSpec can keep it unresized


# --------------------------------------------------------------------------------------------- corpus
def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_raw(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None) -> bytes:
    """A PNG written by hand (16-bit RGB, which PIL cannot write; or a header that claims any size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows) if rows is not None else zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _rgb16_png(seed: int = 3) -> bytes:
    px = np.random.default_rng(seed).integers(0, 65535, (H, W, 3), dtype=np.uint16).astype(">u2")
    return _png_raw(W, H, 16, 2, b"".join(b"\x00" + px[y].tobytes() for y in range(H)))


def _rgb(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def corpus() -> dict[str, tuple[bytes, str | None, str | None]]:
    """name -> (bytes, expected converted_from, expected rejection reason)."""
    rgb = _rgb()
    img = Image.fromarray(rgb)
    good = _encode(img)
    alpha = np.tile(np.linspace(0, 255, W, dtype=np.uint8), (H, 1))
    transparent_palette = Image.new("P", (W, H), 0)
    transparent_palette.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    transparent_palette.info["transparency"] = 0
    return {
        "rgb.png": (good, None, None),
        "cmyk.jpg": (_encode(img.convert("CMYK"), "JPEG", quality=90), "CMYK", None),
        "ycbcr.tif": (_encode(img.convert("YCbCr"), "TIFF"), "YCbCr", None),
        "palette.png": (_encode(img.convert("P")), "P", None),
        "palette_transparent.png": (_encode(transparent_palette), "P", None),
        "la.png": (_encode(Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")), "LA", None),
        "rgba.png": (_encode(Image.fromarray(np.dstack([rgb, alpha]))), "RGBA", None),
        "grey16.png": (_encode(Image.fromarray((rgb[..., 1].astype(np.uint16) * 257))), "I;16", None),
        "rgb16.png": (_rgb16_png(), "RGB;16", None),
        "one_bit.png": (_encode(img.convert("1")), "1", None),
        "float.tif": (_encode(Image.fromarray(rgb[..., 2].astype(np.float32) * 1.5 - 20), "TIFF"), "F", None),
        "int32.tif": (_encode(Image.fromarray(rgb[..., 0].astype(np.int32) * 300 - 1000), "TIFF"), "I", None),
        "grey.png": (_encode(img.convert("L")), "L", None),
        "truncated.png": (good[: len(good) // 2], None, "truncated"),
        "corrupt.png": (good[:8] + b"\x00" * 40, None, "corrupt"),
        "bomb_header.png": (_png_raw(20000, 20000, 8, 2, None), None, "too_large"),  # PIL's own limit
        "over_guard.png": (_png_raw(9000, 9000, 8, 2, None), None, "too_large"),  # our max_pixels guard
        "text.png": (b"this is a text file, not an image\n" * 4, None, "not_an_image"),
        "zero.png": (b"", None, "zero_byte"),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd_inputs")
    out = {}
    for name, (data, _, _) in corpus().items():
        (root / name).write_bytes(data)
        out[name] = root / name
    return out


# ------------------------------------------------------------------------------------------- the decoder
def test_corpus_decisions_and_conversions():
    for name, (data, converted, reason) in corpus().items():
        got = try_decode(data)
        if reason is None:
            assert got.ok and got.reason is None, (name, got.reason, got.detail)
            assert got.pixels.shape == (H, W, 3) and got.pixels.dtype == np.uint8, name
            assert got.pixels.flags.c_contiguous
            assert got.converted_from == converted, name
            np.testing.assert_array_equal(decode_rgb(data), got.pixels)
        else:
            assert not got.ok and got.reason == reason, (name, got.reason, got.detail)
            with pytest.raises(ImageRejected) as info:
                decode_rgb(data)
            assert info.value.reason == reason and isinstance(info.value, DataError)


def test_conversion_values():
    rgb = _rgb()
    c = corpus()
    np.testing.assert_array_equal(decode_rgb(c["rgb.png"][0]), rgb)
    grey = decode_rgb(c["grey.png"][0])
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # 16-bit grey v*257 maps back to v exactly
    np.testing.assert_array_equal(decode_rgb(c["grey16.png"][0])[..., 0], rgb[..., 1])
    # transparency composited on white: alpha 0 -> white, alpha 255 -> the colour
    rgba = decode_rgb(c["rgba.png"][0])
    assert (rgba[:, 0] == 255).all()
    np.testing.assert_array_equal(rgba[:, -1], rgb[:, -1])
    assert (decode_rgb(c["palette_transparent.png"][0]) == 255).all()
    one = decode_rgb(c["one_bit.png"][0])
    assert set(np.unique(one).tolist()) <= {0, 255}
    # float greyscale read as 0..255 values, clipped
    f = rgb[..., 2].astype(np.float32) * 1.5 - 20
    np.testing.assert_array_equal(decode_rgb(c["float.tif"][0])[..., 0], np.clip(np.rint(f), 0, 255))
    # 32-bit integers clipped to 0..65535 then mapped like 16-bit
    i = np.clip(rgb[..., 0].astype(np.int64) * 300 - 1000, 0, 65535)
    np.testing.assert_array_equal(decode_rgb(c["int32.tif"][0])[..., 0], (i * 255 + 32767) // 65535)
    cmyk = decode_rgb(_encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    assert cmyk.shape == (8, 8, 3) and cmyk.min() > 240


def test_max_pixels_is_checked_from_the_header():
    good = corpus()["rgb.png"][0]
    assert DEFAULT_MAX_PIXELS >= 9000 * 9000 // 2
    assert decode_rgb(good, max_pixels=W * H).shape == (H, W, 3)
    with pytest.raises(ImageRejected, match="max_pixels") as info:
        decode_rgb(good, max_pixels=W * H - 1)
    assert info.value.reason == "too_large"


def test_header_reads_without_decoding():
    c = corpus()
    assert image_size(c["rgb.png"][0]) == (W, H)
    assert image_size(io.BytesIO(c["cmyk.jpg"][0])) == (W, H)  # file objects too
    header = read_header(c["truncated.png"][0])  # the header is intact, the pixels are not
    assert (header.width, header.height, header.format) == (W, H, "PNG")
    assert image_size(c["over_guard.png"][0]) == (9000, 9000)  # a size is not a decode: no guard
    for name in ("text.png", "zero.png", "bomb_header.png"):
        with pytest.raises(ImageRejected):
            image_size(c[name][0])


def test_error_text_keeps_the_infer_kinds():
    assert set(ERROR_KINDS.values()) == {"empty", "not_an_image", "too_large", "decode_error"}
    assert error_text("too_large", "9000x9000") == "too_large: 9000x9000"
    assert error_text("truncated", "image file is truncated") == "decode_error: truncated: image file is truncated"
    assert error_text("zero_byte", "file is empty") == "empty: zero_byte: file is empty"


def test_unconvertible_mode_is_unsupported_mode(monkeypatch):
    class Odd:
        mode, info = "La", {}

        def convert(self, mode):
            raise ValueError("conversion from La to RGB not supported")

    with pytest.raises(ImageRejected) as info:
        decode._to_rgb(Odd(), b"")
    assert info.value.reason == "unsupported_mode"


def test_fast_png_hook_is_used_and_its_failures_fall_back(monkeypatch):
    good = corpus()["rgb.png"][0]
    assert decode.resolve_backend() != "pil"  # a fast backend is a dependency (pyproject.toml)
    marker = np.full((H, W, 3), 7, np.uint8)
    monkeypatch.setattr(decode, "_decode_png_fast", lambda data, backend: marker)
    np.testing.assert_array_equal(decode_rgb(good), marker)
    assert try_decode(corpus()["grey.png"][0]).converted_from == "L"  # only 8-bit RGB PNGs reach the hook
    np.testing.assert_array_equal(decode_rgb(good, backend="pil"), _rgb())  # pil: the hook is never asked

    def broken(data, backend):
        raise RuntimeError("backend failure")

    monkeypatch.setattr(decode, "_decode_png_fast", broken)
    np.testing.assert_array_equal(decode_rgb(good), _rgb())
    with pytest.raises(ImageRejected) as info:
        decode_rgb(corpus()["truncated.png"][0])
    assert info.value.reason == "truncated"


def test_non_bytes_and_labels():
    with pytest.raises(DataError, match="bytes"):
        decode_rgb("a string")  # type: ignore[arg-type]
    ids = np.arange(W * H, dtype=np.uint16).reshape(H, W) * 50
    got = decode_labels(_encode(Image.fromarray(ids)))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, ids)
    with pytest.raises(ImageRejected):
        decode_labels(b"not a mask")


# ------------------------------------------------------------------------------------- PNG backends
def _adam7_png(rgb: np.ndarray) -> bytes:
    """An interlaced (Adam7) 8-bit RGB PNG, written by hand (PIL only writes non-interlaced PNGs)."""
    height, width = rgb.shape[:2]
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _with_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """``png`` with one more chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return png[:33] + _chunk(kind, data) + png[33:]


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:]


def _stored_png(rgb: np.ndarray, damage: str) -> bytes:
    """8-bit RGB PNG whose chunk CRCs are all valid but whose zlib stream is damaged: ``adler`` (a wrong
    Adler-32), ``pixel`` (one stored pixel byte changed: the Adler-32 no longer matches) or ``none``."""
    height, width = rgb.shape[:2]
    stream = bytearray(zlib.compress(b"".join(b"\x00" + row.tobytes() for row in rgb), 0))
    if damage == "adler":
        stream[-1] ^= 0x01
    elif damage == "pixel":
        stream[40] ^= 0x10
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", bytes(stream)) + _chunk(b"IEND", b"")


def _apng(default_image: bool) -> bytes:
    """An animated 8-bit RGB PNG of three frames; ``default_image``: its IDAT image is not an animation frame."""
    rng = np.random.default_rng(13)
    frames = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:], default_image=default_image,
                   duration=100)
    return buf.getvalue()


def backend_corpus() -> dict[str, bytes]:
    """Every kind of PNG a backend could get wrong (besides :func:`corpus`): interlaced, colour-key
    transparency, animation, EXIF orientation, gamma, damaged data (with and without valid chunk CRCs), larger
    images with several IDAT chunks."""
    rgb = _rgb(5)
    good = _encode(Image.fromarray(rgb))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW": PIL does not apply it, so neither may a backend
    big = np.random.default_rng(9).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    big_png = _encode(Image.fromarray(big), compress_level=1)
    items = {name: data for name, (data, _, _) in corpus().items() if name.endswith(".png")}
    idat = good.index(b"IDAT")
    items.update({
        "adam7.png": _adam7_png(rgb),
        "rgb_trns.png": _encode(Image.fromarray(rgb), transparency=tuple(int(v) for v in rgb[0, 0])),
        "apng.png": _apng(default_image=False),
        "apng_default_image.png": _apng(default_image=True),
        "rgb_exif_rotated.png": _encode(Image.fromarray(rgb), exif=exif),
        "rgb_gamma.png": _with_chunk(good, b"gAMA", struct.pack(">I", 45455)),
        "rgb_srgb_iccp.png": _with_chunk(good, b"sRGB", b"\x00"),
        "rgb_big_many_idat.png": big_png,
        "rgb_no_iend.png": good[:-12],
        "rgb_cut_in_idat.png": good[: idat + 30],
        "rgb_cut_big.png": big_png[: len(big_png) * 2 // 3],
        "rgb_bad_idat_crc.png": _flip_byte(good, good.index(b"IEND") - 5),
        "rgb_flipped_deflate.png": _flip_byte(good, idat + 20),
        "rgb_flipped_late.png": _flip_byte(big_png, len(big_png) // 2),
        "rgb_bad_ihdr_crc.png": _flip_byte(good, 29),
        "rgb_trailing_junk.png": good + b"junk after IEND" * 3,
        "rgb_stored.png": _stored_png(rgb, "none"),
        "rgb_bad_adler.png": _stored_png(rgb, "adler"),
        "rgb_pixel_flipped_crc_ok.png": _stored_png(rgb, "pixel"),
    })
    return items


@pytest.mark.parametrize("backend", decode.FAST_BACKENDS)
def test_every_backend_gives_pils_pixels_or_declines(backend):
    """Each fast backend, on every PNG: the same decision, reason, conversion and pixels as PIL alone; and its
    own output is either PIL's uint8 RGB exactly or nothing (PIL then decides)."""
    if backend not in decode.available_backends():
        from conftest import skip_or_fail

        skip_or_fail(f"decode backend {backend} is not installed (pip install {decode.BACKEND_PACKAGES[backend]})")
    used = 0
    for name, data in backend_corpus().items():
        reference = try_decode(data, backend="pil")
        got = try_decode(data, backend=backend)
        assert (got.ok, got.reason, got.converted_from, got.format) == (
            reference.ok, reference.reason, reference.converted_from, reference.format), (backend, name, got.detail)
        if reference.ok:
            np.testing.assert_array_equal(got.pixels, reference.pixels, err_msg=f"{backend} {name}")
        try:
            own = decode._decode_png_fast(data, backend)
        except Exception:  # noqa: BLE001 - a failure is a decline
            own = None
        if own is not None:
            used += 1
            assert reference.ok and reference.converted_from is None, (backend, name)
            assert own.dtype == np.uint8 and own.shape == reference.pixels.shape, (backend, name)
            np.testing.assert_array_equal(own, reference.pixels, err_msg=f"{backend} {name} (own output)")
    for name in ("rgb.png", "adam7.png", "rgb_big_many_idat.png", "rgb_exif_rotated.png", "rgb_gamma.png"):
        assert decode._decode_png_fast(backend_corpus()[name], backend) is not None, (backend, name)
    assert used >= 5


@pytest.mark.parametrize("backend", decode.FAST_BACKENDS)
def test_every_backend_decodes_from_many_threads_at_once(backend):
    """The I/O threads of ``infer`` and training decode at the same time: each thread gets its own image's
    pixels (a decoder object shared between threads would mix them up or fail)."""
    from concurrent.futures import ThreadPoolExecutor

    if backend not in decode.available_backends():
        from conftest import skip_or_fail

        skip_or_fail(f"decode backend {backend} is not installed (pip install {decode.BACKEND_PACKAGES[backend]})")
    rng = np.random.default_rng(11)
    images = [rng.integers(0, 256, (40 + i, 60 + 3 * i, 3), dtype=np.uint8) for i in range(24)]
    blobs = [_encode(Image.fromarray(img)) for img in images]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda data: decode._decode_png_fast(data, backend), blobs * 4))
    for i, pixels in enumerate(got):
        np.testing.assert_array_equal(pixels, images[i % len(images)], err_msg=f"{backend} image {i}")


def test_backend_choice_config_and_environment(monkeypatch):
    from breakhis_ray.config import DecodeSection, InferConfig, PrepareConfig
    from breakhis_ray.config.common import DECODE_BACKENDS
    from breakhis_ray.errors import ConfigError

    assert set(DECODE_BACKENDS) == {"auto", "pil", *decode.FAST_BACKENDS}
    assert DecodeSection.model_fields["backend"].annotation.__args__ == DECODE_BACKENDS
    installed = decode.available_backends()
    monkeypatch.delenv(decode.BACKEND_ENV, raising=False)
    assert decode.resolve_backend() == decode.resolve_backend("auto") == next(
        n for n in [*decode.FAST_BACKENDS, "pil"] if n in installed)
    monkeypatch.setenv(decode.BACKEND_ENV, "pil")
    assert decode.resolve_backend() == "pil" and decode.resolve_backend(installed[-1]) == installed[-1]
    monkeypatch.setenv(decode.BACKEND_ENV, "webp")
    with pytest.raises(ConfigError, match="unknown decode backend 'webp'"):
        decode_rgb(corpus()["rgb.png"][0])
    assert PrepareConfig(root="r", out="o", decode={"backend": "pil"}).decode.backend == "pil"
    with pytest.raises(ConfigError, match="decode.backend"):
        from breakhis_ray.config import load_config

        load_config(InferConfig, None, ["input=i", "out=o", "classifier=c", "decode.backend=libpng"])


def test_every_stage_passes_its_backend_to_the_decoder(tmp_path):
    """prepare, training and infer hand ``decode.backend`` to the decoder (a name it rejects reaches it)."""
    from breakhis_ray import storage
    from breakhis_ray.data.pipeline import DecodeBatch
    from breakhis_ray.data.shards import _process_row
    from breakhis_ray.data.transforms import PreprocessSpec
    from breakhis_ray.errors import ConfigError
    from breakhis_ray.inference.decode_stage import read_and_decode

    path = tmp_path / "a.png"
    path.write_bytes(corpus()["rgb.png"][0])
    batch = {"image": np.array([path.read_bytes()], dtype=object), "path": np.array([str(path)], dtype=object),
             "label_id": np.array([0]), "magnification": np.array([40])}
    spec = PreprocessSpec(size=(H, W)).to_dict()
    for backend in ("pil", decode.resolve_backend()):
        np.testing.assert_array_equal(DecodeBatch(spec, backend=backend)(batch)["image"][0], _rgb())
        got = read_and_decode({"path": batch["path"]}, spec, None, io_threads=1, backend=backend)
        np.testing.assert_array_equal(got["_image"][0], _rgb())
    row = {"source_path": str(path), "width": None, "height": None}
    fs = storage.resolve(str(path))[0]
    ctx = {"max_pixels": DEFAULT_MAX_PIXELS, "expected_size": None, "resize": None, "image_format": "png",
           "quality": 95, "enhance_seed": 0}
    with pytest.raises(ConfigError, match="nope"):
        DecodeBatch(spec, backend="nope")(batch)
    with pytest.raises(ConfigError, match="nope"):
        read_and_decode({"path": batch["path"]}, spec, None, io_threads=1, backend="nope")
    with pytest.raises(ConfigError, match="nope"):
        _process_row(fs, row, {**ctx, "decode_backend": "nope"})
    assert _process_row(fs, row, {**ctx, "decode_backend": "pil"})["converted_from"] is None


# ----------------------------------------------------------------------- one corpus, three stages
def _prepare_outcomes(files: dict[str, Path], out: Path) -> dict[str, tuple[str, object]]:
    """``prepare``'s per-chunk worker (no Ray): accepted -> pixels stored in the shard, else the reason."""
    import pyarrow.parquet as pq

    from breakhis_ray.data.shards import SHARD_SCHEMA, process_chunk

    rows = []
    for name, path in sorted(files.items()):
        row = dict.fromkeys(SHARD_SCHEMA.names)
        row.update(path=str(path), source_path=str(path), filename=name, split="train", fold=1)
        rows.append(row)
    ctx = {"out": str(out), "image_format": "png", "quality": 95, "resize": None, "expected_size": None,
           "max_pixels": DEFAULT_MAX_PIXELS, "row_group_size": 64, "enhance_seed": 0}
    (out / "shards").mkdir(parents=True)  # run_prepare makes it before starting the tasks
    result = process_chunk(0, rows, ctx)
    outcomes: dict[str, tuple[str, object]] = {}
    for rej in result["rejects"]:
        outcomes[Path(rej["path"]).name] = ("rejected", rej["reason"])
        assert rej["stage"] in ("read", "decode", "check")
    table = pq.read_table(out / "shards" / result["part"]).to_pylist()
    for row in table:
        outcomes[row["filename"]] = ("ok", (decode_rgb(row["image"]), row["converted_from"]))
    return outcomes


def _training_outcomes(files: dict[str, Path]) -> dict[str, tuple[str, object]]:
    """The training pipeline's decode stage (``DecodeBatch``), one row per call: it raises on a bad row."""
    from breakhis_ray.data.pipeline import DecodeBatch
    from breakhis_ray.data.transforms import PreprocessSpec

    stage = DecodeBatch(PreprocessSpec(size=(H, W)).to_dict(), max_pixels=DEFAULT_MAX_PIXELS)
    outcomes: dict[str, tuple[str, object]] = {}
    for name, path in sorted(files.items()):
        batch = {"image": np.array([path.read_bytes()], dtype=object), "path": np.array([str(path)], dtype=object),
                 "label_id": np.array([0]), "magnification": np.array([40])}
        try:
            outcomes[name] = ("ok", stage(batch)["image"][0])
        except ImageRejected as rej:
            assert str(path) in rej.detail  # the failing row is named
            outcomes[name] = ("rejected", rej.reason)
    return outcomes


def _reason_of(error: str) -> str:
    kind, rest = error.split(": ", 1)
    return kind if kind in ERROR_KINDS else rest.split(": ", 1)[0]


def _infer_outcomes(files: dict[str, Path], tmp: Path) -> dict[str, tuple[str, object]]:
    """``infer``'s CPU stage (``read_and_decode``) and a tiny-model ``Predictor`` on its output, no Ray."""
    torch = pytest.importorskip("torch")
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.inference.decode_stage import read_and_decode
    from breakhis_ray.inference.predictor import Predictor
    from breakhis_ray.models import create_model

    torch.manual_seed(0)
    ckpt = str(tmp / "clf")
    save_checkpoint(ckpt, create_model("tiny_cnn", num_classes=2, width=4), preprocessing={"size": [H, W]})
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    names = sorted(files)
    batch = {"path": np.array([str(files[n]) for n in names], dtype=object)}
    decoded = read_and_decode(batch, predictor.preprocessing, None, max_pixels=DEFAULT_MAX_PIXELS, io_threads=1)
    table = predictor(decoded).to_pylist()
    outcomes: dict[str, tuple[str, object]] = {}
    for i, name in enumerate(names):
        row = table[i]
        assert row["path"] == str(files[name])
        if decoded["_ok"][i]:
            assert row["status"] == "ok" and row["error"] is None and 0.0 <= row["prob_malignant"] <= 1.0
            assert (row["image_height"], row["image_width"]) == (H, W)
            outcomes[name] = ("ok", decoded["_image"][i])
        else:
            assert row["status"] == "error" and row["error"] == decoded["_error"][i]
            outcomes[name] = ("rejected", _reason_of(row["error"]))
    return outcomes


def test_prepare_training_and_infer_agree_on_every_odd_input(files, tmp_path):
    expected = corpus()
    prepared = _prepare_outcomes(files, tmp_path / "prepared")
    training = _training_outcomes(files)
    inferred = _infer_outcomes(files, tmp_path)
    assert set(prepared) == set(training) == set(inferred) == set(expected)
    for name, (data, converted, reason) in expected.items():
        reference = try_decode(data)
        if reason is not None:
            assert prepared[name] == training[name] == inferred[name] == ("rejected", reason), name
            continue
        for stage, outcome in (("prepare", prepared), ("training", training), ("infer", inferred)):
            assert outcome[name][0] == "ok", (stage, name, outcome[name])
        pixels, converted_from = prepared[name][1]
        assert converted_from == converted, name
        np.testing.assert_array_equal(pixels, reference.pixels, err_msg=f"prepare {name}")
        np.testing.assert_array_equal(training[name][1], reference.pixels, err_msg=f"training {name}")
        np.testing.assert_array_equal(inferred[name][1], reference.pixels, err_msg=f"infer {name}")
