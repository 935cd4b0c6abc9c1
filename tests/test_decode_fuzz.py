"""Property-based fuzzing of the one decoder (hypothesis): arbitrary bytes and damaged PNG/JPEG/TIFF files.

Whatever the bytes, :func:`~breakhis_ray.data.decode.try_decode` returns exactly one decision (uint8 (H, W, 3)
pixels, or one reason from :data:`~breakhis_ray.data.decode.REASONS` with a one-line detail),
:func:`~breakhis_ray.data.decode.decode_rgb` and :func:`~breakhis_ray.data.decode.image_size` raise nothing but
:class:`~breakhis_ray.data.decode.ImageRejected` and agree with it, and the inference CPU stage
(:class:`~breakhis_ray.inference.decode_stage.BatchDecoder`) gives one row per input with the same decision.

Inputs: arbitrary bytes; arbitrary bytes behind an image signature (so PIL's parsers, not only its format
sniffing, see them); and valid PNG/JPEG/TIFF/GIF/BMP/WebP files (the conversion corpus of ``test_decode``
plus compressed TIFFs) damaged by bit flips, truncation, overwritten, inserted or deleted bytes, and
format-aware corruption (a PNG chunk's data or length with a recomputed CRC, so the damage reaches the
decompressor; a JPEG segment length; a TIFF directory entry). Examples are derandomised (the same 200 on
every run) and kept off disk (no example database). A hang fails on the test's timeout; the per-example
deadline is generous, so a loaded machine cannot fail it, yet a pathological slowdown would.
"""

from __future__ import annotations

import io
import struct
import zlib
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_decode import corpus

from breakhis_ray.data.decode import ERROR_KINDS, REASONS, Decoded, ImageRejected, decode_rgb, image_size, try_decode
from breakhis_ray.inference.decode_stage import BatchDecoder

# PIL warns about many damaged files (e.g. "Tag data larger than file") before deciding; expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Small guard: a damaged header may claim a huge image; anything above this is rejected before decoding, so
# every example stays fast. (The guard's own behaviour at the default limit is tested in test_decode.)
MAX_PIXELS = 256 * 256

FUZZ = settings(max_examples=200, derandomize=True, database=None, deadline=timedelta(seconds=30),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    """Valid files of every format and conversion path the decoder handles."""
    seeds = {name: data for name, (data, _, reason) in corpus().items() if reason is None}
    rgb = np.random.default_rng(5).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    seeds.update({
        "rgb.jpg": _encode(img, "JPEG", quality=85),
        "progressive.jpg": _encode(img, "JPEG", quality=85, progressive=True),
        "grey.jpg": _encode(img.convert("L"), "JPEG"),
        "raw.tif": _encode(img, "TIFF"),
        "deflate.tif": _encode(img, "TIFF", compression="tiff_adobe_deflate"),
        "lzw.tif": _encode(img, "TIFF", compression="tiff_lzw"),
        "packbits.tif": _encode(img, "TIFF", compression="packbits"),
        "grey16.tif": _encode(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "TIFF"),
        "rgb.gif": _encode(img, "GIF"),
        "rgb.bmp": _encode(img, "BMP"),
        "rgb.webp": _encode(img, "WEBP", quality=80),
    })
    return seeds


SEEDS = _seeds()
SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"GIF89a", b"BM", b"RIFF")


# ------------------------------------------------------------------------------------------- mutations
def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, data length) of each well-formed chunk of a PNG."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        if pos + 12 + length > len(data):
            break
        out.append((pos, length))
        pos += 12 + length
    return out


def _corrupt_png_chunk(data: bytearray, draw) -> None:
    chunks = _png_chunks(bytes(data))
    if not chunks:
        return
    pos, length = draw(st.sampled_from(chunks))
    kind = bytes(data[pos + 4:pos + 8])
    body = bytearray(data[pos + 8:pos + 8 + length])
    if draw(st.booleans()) and body:  # damage the data, keep the CRC valid: the damage reaches the parser
        at = draw(st.integers(0, len(body) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        body[at:at + len(patch)] = patch
        body = body[:length] if len(body) > length else body
        new_len = len(body)
    else:  # lie about the length (the CRC then covers what the lie says)
        new_len = draw(st.integers(0, 2**31 - 1)) if draw(st.booleans()) else max(0, length + draw(
            st.integers(-8, 8)))
        body = body[:new_len]
    crc = struct.pack(">I", zlib.crc32(kind + bytes(body)) & 0xFFFFFFFF)
    data[pos:pos + 12 + length] = struct.pack(">I", new_len) + kind + bytes(body) + crc


def _corrupt_jpeg_segment(data: bytearray, draw) -> None:
    markers = [i for i in range(2, len(data) - 3) if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xFE]
    if markers:
        at = draw(st.sampled_from(markers)) + 2
        data[at:at + 2] = struct.pack(">H", draw(st.integers(0, 0xFFFF)))


def _corrupt_tiff_entry(data: bytearray, draw) -> None:
    if len(data) < 8 or data[:4] not in (b"II*\x00", b"MM\x00*"):
        return
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    if ifd + 2 > len(data):
        return
    (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    entries = [ifd + 2 + 12 * k for k in range(count) if ifd + 14 + 12 * k <= len(data)]
    if entries:
        entry = draw(st.sampled_from(entries))
        field = draw(st.sampled_from([(2, 2), (4, 4), (8, 4)]))  # type, count, value/offset
        start = entry + field[0]
        data[start:start + field[1]] = draw(st.binary(min_size=field[1], max_size=field[1]))


@st.composite
def mutated_images(draw) -> bytes:
    """A valid seed file with one to four kinds of damage."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "truncate", "overwrite", "insert", "delete", "format"]))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=32))
            data[at:at + len(patch)] = patch
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 32))]
        elif data.startswith(b"\x89PNG"):
            _corrupt_png_chunk(data, draw)
        elif data.startswith(b"\xff\xd8"):
            _corrupt_jpeg_segment(data, draw)
        else:
            _corrupt_tiff_entry(data, draw)
    return bytes(data)


ARBITRARY = st.binary(max_size=4096)
BEHIND_A_SIGNATURE = st.builds(lambda sig, tail: sig + tail, st.sampled_from(SIGNATURES), st.binary(max_size=2048))
ANY_INPUT = st.one_of(ARBITRARY, BEHIND_A_SIGNATURE, mutated_images())


# ---------------------------------------------------------------------------------------- properties
def _one_decision(data: bytes) -> Decoded:
    """Check the decoder's contract on ``data``; return try_decode's decision."""
    got = try_decode(data, max_pixels=MAX_PIXELS)
    assert isinstance(got, Decoded)
    if got.ok:
        assert got.reason is None and got.detail is None
        px = got.pixels
        assert px.dtype == np.uint8 and px.ndim == 3 and px.shape[2] == 3 and px.shape[0] * px.shape[1] >= 1
        assert px.shape[0] * px.shape[1] <= MAX_PIXELS
        np.testing.assert_array_equal(decode_rgb(data, max_pixels=MAX_PIXELS), px)  # deterministic, same path
        assert image_size(data) == (px.shape[1], px.shape[0])
    else:
        assert got.pixels is None and got.reason in REASONS, (got.reason, got.detail)
        assert got.detail and "\n" not in got.detail
        with pytest.raises(ImageRejected) as info:
            decode_rgb(data, max_pixels=MAX_PIXELS)
        assert info.value.reason == got.reason
        try:  # the header alone may be readable (damage further in) or not: either way nothing else raises
            width, height = image_size(data)
        except ImageRejected as rej:
            assert rej.reason in REASONS
        else:
            assert isinstance(width, int) and isinstance(height, int)
    return got


def test_the_seeds_decode():
    """The mutation seeds are valid images, so mutations start from files the decoder accepts."""
    for name, data in SEEDS.items():
        assert _one_decision(data).ok, name


@pytest.mark.timeout(600)
@FUZZ
@given(ARBITRARY)
def test_arbitrary_bytes_get_one_decision(data):
    _one_decision(data)


@pytest.mark.timeout(600)
@FUZZ
@given(BEHIND_A_SIGNATURE)
def test_garbage_behind_an_image_signature_gets_one_decision(data):
    got = _one_decision(data)
    assert got.ok or got.reason != "zero_byte"


@pytest.mark.timeout(600)
@FUZZ
@given(mutated_images())
def test_damaged_png_jpeg_tiff_get_one_decision(data):
    _one_decision(data)


@pytest.mark.timeout(600)
@FUZZ
@given(st.lists(ANY_INPUT, min_size=1, max_size=6))
def test_inference_decode_stage_gives_one_row_per_input_with_the_decoders_decision(batch):
    decoder = BatchDecoder({"size": [16, 16]}, (8, 8), max_pixels=MAX_PIXELS)
    paths = [f"in/{i}.png" for i in range(len(batch))]
    out = decoder(paths, batch, np.arange(len(batch), dtype=np.int32))
    assert out["path"].tolist() == paths and out["_chunk"].tolist() == list(range(len(batch)))
    assert out["_image"].shape == (len(batch), 16, 16, 3) and out["_seg"].shape == (len(batch), 8, 8, 3)
    for i, data in enumerate(batch):
        decision = try_decode(data, max_pixels=MAX_PIXELS)
        assert bool(out["_ok"][i]) == decision.ok, (i, decision.reason, out["_error"][i])
        if decision.ok:
            assert out["_error"][i] == ""
            assert (int(out["_height"][i]), int(out["_width"][i])) == decision.pixels.shape[:2]
        else:
            kind = str(out["_error"][i]).split(": ")[0]
            assert kind == ERROR_KINDS[decision.reason], out["_error"][i]
            assert not out["_image"][i].any()  # no stale pixels in a rejected row
