"""``breakhis-ray prepare``: checked Parquet shards, rejects, offline enhancement; local and real S3."""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from breakhis_ray import storage
from breakhis_ray.cli import main as cli_main
from breakhis_ray.config import PrepareConfig
from breakhis_ray.data import enhance
from breakhis_ray.data.decode import decode_rgb
from breakhis_ray.data.shards import (
    SHARD_SCHEMA,
    plan_chunks,
    process_chunk,
    read_shards,
    run_prepare,
    shard_uris,
)
from breakhis_ray.errors import ConfigError

SIZE = (24, 16)  # (W, H): tiny, non-square like BreakHis' 700x460
PATIENTS = [  # (label, subtype folder, code, slide)
    ("benign", "adenosis", "A", "22549AB"),
    ("benign", "fibroadenoma", "F", "9133"),
    ("benign", "phyllodes_tumor", "PT", "21998AB"),
    ("benign", "tubular_adenoma", "TA", "3411F"),
    ("malignant", "ductal_carcinoma", "DC", "2523"),
    ("malignant", "lobular_carcinoma", "LC", "15570"),
    ("malignant", "mucinous_carcinoma", "MC", "10147"),
    ("malignant", "papillary_carcinoma", "PC", "9146"),
]
PER_PATIENT = {"benign": 2, "malignant": 4}  # images per patient and magnification
MAGS = (40, 100)
SPLIT = {"folds": 2, "val_fraction": 0.3, "seed": 0}


def _png(pixels: np.ndarray | Image.Image) -> bytes:
    img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_rgb16(width: int, height: int, seed: int) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 65535, (height, width, 3), dtype=np.uint16).astype(">u2")
    raw = b"".join(b"\x00" + px[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _tile(rng: np.random.Generator, label: str, size=SIZE) -> np.ndarray:
    base = np.array([230, 170, 210] if label == "benign" else [150, 80, 160], dtype=np.int16)
    noise = rng.integers(-25, 25, (size[1], size[0], 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _name(label: str, code: str, slide: str, mag: int, seq: int) -> tuple[str, str]:
    c = label[0].upper()
    folder = f"SOB_{c}_{code}_14-{slide}"
    return folder, f"SOB_{c}_{code}-14-{slide}-{mag}-{seq:03d}.png"


def build_tree(root: Path) -> dict:
    """A tiny BreakHis-shaped tree with every kind of bad file; returns what each special file should become."""
    rng = np.random.default_rng(7)
    breast = root / "BreaKHis_v1" / "histology_slides" / "breast"
    expected = {"rejects": {}, "converted": {}, "valid": 0}

    def put(label, subtype, code, slide, mag, seq, data: bytes) -> str:
        folder, name = _name(label, code, slide, mag, seq)
        path = breast / label / "SOB" / subtype / folder / f"{mag}X" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    for label, subtype, code, slide in PATIENTS:
        for mag in MAGS:
            for seq in range(1, PER_PATIENT[label] + 1):
                put(label, subtype, code, slide, mag, seq, _png(_tile(rng, label)))
                expected["valid"] += 1
    good = _png(_tile(rng, "malignant"))
    dc, lc = PATIENTS[4], PATIENTS[5]
    specials = {
        "truncated": (dc, 40, good[: len(good) // 2]),
        "zero_byte": (dc, 100, b""),
        "not_an_image": (lc, 40, b"this is a text file, not a PNG\n"),
        "wrong_size": (lc, 100, _png(_tile(rng, "malignant", (20, 20)))),
        "corrupt": (dc, 40, good[:8] + b"\x00" * 64),
        "too_large": (lc, 40, _png(Image.new("RGB", (400, 300), (200, 100, 150)))),
    }
    for i, (reason, (patient, mag, data)) in enumerate(sorted(specials.items())):
        expected["rejects"][put(*patient, mag, 50 + i, data)] = reason
    converts = {
        "L": (dc, 100, _png(Image.fromarray(_tile(rng, "malignant")).convert("L"))),
        "RGBA": (lc, 40, _png(Image.fromarray(np.dstack([_tile(rng, "malignant"),
                                                         np.full(SIZE[::-1], 128, np.uint8)])))),
        "I;16": (lc, 100, _png(Image.fromarray(rng.integers(0, 65535, SIZE[::-1], dtype=np.uint16)))),
        "RGB;16": (dc, 100, _png_rgb16(*SIZE, seed=3)),
        "1": (dc, 40, _png(Image.fromarray(_tile(rng, "malignant")).convert("1"))),
        "CMYK": (lc, 100, _jpeg(Image.fromarray(_tile(rng, "malignant")).convert("CMYK"))),
    }
    for i, (mode, (patient, mag, data)) in enumerate(sorted(converts.items())):
        expected["converted"][put(*patient, mag, 70 + i, data)] = mode
        expected["valid"] += 1
    notes = breast / "malignant" / "SOB" / "ductal_carcinoma" / _name("malignant", "DC", "2523", 40, 1)[0] / "notes.txt"
    notes.write_text("scanner notes\n")
    expected["rejects"][str(notes)] = "bad_name"
    return expected


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("breakhis")
    return root, build_tree(root)


def _cfg(root: str, out: str, **over) -> PrepareConfig:
    data = {"root": root, "out": out, "split": SPLIT, "shard_size": 10, "expected_size": "auto",
            "max_pixels": 50_000}
    data.update(over)
    return PrepareConfig.model_validate(data)


def _check_outputs(out: str, expected: dict, summary: dict, root_prefix: str = "") -> pd.DataFrame:
    shards = read_shards(out)
    rejects = pq.read_table(storage.resolve(storage.join(out, "rejects.parquet"))[1],
                            filesystem=storage.resolve(out)[0]).to_pandas()
    n_inputs = expected["valid"] + len(expected["rejects"])
    originals = shards[shards["augmentation"].isna()]
    assert summary["input"] == n_inputs
    assert len(originals) == n_inputs - len(rejects) == summary["written"]
    assert len(shards) == summary["written"] + summary["augmented"]
    got = {p.replace(root_prefix, "", 1) if root_prefix else p: r for p, r in zip(rejects["path"], rejects["reason"])}
    assert got == expected["rejects"]
    assert set(rejects["stage"]) <= {"manifest", "read", "decode", "check"}
    converted = originals.dropna(subset=["converted_from"])
    got_conv = {p.replace(root_prefix, "", 1) if root_prefix else p: m
                for p, m in zip(converted["path"], converted["converted_from"])}
    assert got_conv == expected["converted"]
    assert shards["path"].is_unique
    assert (originals["source_path"] == originals["path"]).all()
    assert set(shards["split"]) <= {"train", "val", "test"} and (shards["fold"] == 1).all()
    for row in shards.sample(8, random_state=0).itertuples():
        pixels = decode_rgb(row.image)
        assert pixels.shape == (row.image_height, row.image_width, 3)
    for name in ("manifest.parquet", "splits.parquet", "prepare.json", "config.yaml", "rejects.parquet"):
        assert storage.exists(storage.join(out, name))
    return shards


# ---------------------------------------------------------------------------------------------- units
def test_process_chunk_reasons_stages_and_stored_bytes(tmp_path):
    """One chunk without Ray: rejects carry prepare's stage; 8-bit RGB PNGs are stored byte for byte,
    converted images re-encoded (the decisions themselves are tested in test_decode.py)."""
    rgb = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    good, grey = _png(rgb), _png(Image.fromarray(rgb).convert("L"))
    files = {"good.png": good, "grey.png": grey, "empty.png": b"", "cut.png": good[: len(good) // 2],
             "small.png": _png(rgb[:10, :10])}
    rows = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        row = dict.fromkeys(SHARD_SCHEMA.names)
        row.update(path=str(tmp_path / name), source_path=str(tmp_path / name), filename=name)
        rows.append(row)
    missing = dict(rows[0], path=str(tmp_path / "gone.png"), source_path=str(tmp_path / "gone.png"))
    (tmp_path / "out" / "shards").mkdir(parents=True)
    ctx = {"out": str(tmp_path / "out"), "image_format": "png", "quality": 95, "resize": None,
           "expected_size": (24, 16), "max_pixels": 10_000, "row_group_size": 2, "enhance_seed": 0}
    result = process_chunk(3, rows + [missing], ctx)
    got = {r["path"].rsplit("/", 1)[-1]: (r["reason"], r["stage"]) for r in result["rejects"]}
    assert got == {"empty.png": ("zero_byte", "read"), "cut.png": ("truncated", "decode"),
                   "small.png": ("wrong_size", "check"), "gone.png": ("missing", "read")}
    assert result["part"] == "part-00003.parquet" and result["rows"] == 2
    stored = {r["filename"]: r for r in pq.read_table(tmp_path / "out" / "shards" / result["part"]).to_pylist()}
    assert stored["good.png"]["image"] == good and stored["good.png"]["converted_from"] is None
    assert stored["grey.png"]["converted_from"] == "L" and stored["grey.png"]["image"] != grey
    assert np.array_equal(decode_rgb(stored["grey.png"]["image"]), decode_rgb(grey))


def test_shard_image_column_is_stored_uncompressed_other_columns_snappy(tmp_path):
    """The encoded image bytes are written as they are (no snappy, no dictionary, no statistics: nothing to gain
    on PNG bytes, a pass over every byte on each read); the small columns stay snappy with dictionaries."""
    rgb = np.random.default_rng(1).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    rows = []
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png(np.roll(rgb, i, axis=0)))
        row = dict.fromkeys(SHARD_SCHEMA.names)
        row.update(path=str(tmp_path / f"{i}.png"), source_path=str(tmp_path / f"{i}.png"), filename=f"{i}.png",
                   split="train", label="benign")
        rows.append(row)
    (tmp_path / "out" / "shards").mkdir(parents=True)
    ctx = {"out": str(tmp_path / "out"), "image_format": "png", "quality": 95, "resize": None,
           "expected_size": (24, 16), "max_pixels": 10_000, "row_group_size": 2, "enhance_seed": 0}
    result = process_chunk(0, rows, ctx)
    meta = pq.read_metadata(tmp_path / "out" / "shards" / result["part"])
    assert meta.num_row_groups == 2
    for g in range(meta.num_row_groups):
        chunks = {meta.row_group(g).column(i).path_in_schema: meta.row_group(g).column(i)
                  for i in range(meta.num_columns)}
        image = chunks["image"]
        assert image.compression == "UNCOMPRESSED" and not image.has_dictionary_page
        assert image.statistics is None or not image.statistics.has_min_max
        assert chunks["split"].compression == "SNAPPY" and chunks["split"].has_dictionary_page
        assert chunks["split"].statistics.has_min_max
    stored = pq.read_table(tmp_path / "out" / "shards" / result["part"]).to_pylist()
    assert [r["image"] for r in stored] == [(tmp_path / f"{i}.png").read_bytes() for i in range(3)]


def test_plan_chunks():
    assert plan_chunks([1] * 5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert plan_chunks([5, 5, 5, 20, 1], 10, shard_bytes=10) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert plan_chunks([], 3) == []


def test_enhance_recipes_and_plan():
    square = enhance.max_copies(["hflip", "rot90", "rot180"], square=True)
    assert square == 3 and enhance.max_copies(["hflip", "rot90", "rot180"], square=False) == 2
    names = [enhance.recipe(["hflip", "vflip", "hed_jitter"], False, i).name for i in range(5)]
    assert names == ["hflip+hed_jitter", "vflip+hed_jitter", "hflip+hed_jitter#1", "vflip+hed_jitter#1",
                     "hflip+hed_jitter#2"]
    img = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    rec = enhance.recipe(["rot90", "hed_jitter(0.05)"], True, 1)
    a, b = (enhance.apply_recipe(img, rec, 0, "p") for _ in range(2))
    assert np.array_equal(a, b) and not np.array_equal(a, enhance.apply_recipe(img, rec, 1, "p"))
    valid = pd.DataFrame({
        "path": [f"b{i}" for i in range(3)] + [f"m{i}" for i in range(7)] + ["bv"],
        "label": ["benign"] * 3 + ["malignant"] * 7 + ["benign"],
        "magnification": 40, "split": ["train"] * 10 + ["val"],
        "image_width": 24, "image_height": 16,
    })
    cfg = PrepareConfig.model_validate({"root": "r", "out": "o", "enhance": {"enabled": True}}).enhance
    plan, notes = enhance.plan_enhancement(valid, cfg)
    assert len(plan) == 4 and not notes and set(plan["source_path"]) <= {"b0", "b1", "b2"}
    assert plan["source_path"].value_counts().max() - plan["source_path"].value_counts().min() <= 1
    assert plan.equals(enhance.plan_enhancement(valid, cfg)[0])
    capped = cfg.model_copy(update={"target": 20})
    plan, notes = enhance.plan_enhancement(valid, capped)
    # non-square images allow hflip, vflip, rot180: benign 3 x 3 = 9 of 17 needed, malignant 13 of 21 possible
    assert len(plan) == 9 + 13 and len(notes) == 1 and notes[0].startswith("40X benign: 12 of 20")


# ------------------------------------------------------------------------------------ local -> local
def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "shards").glob("*.parquet"))}


@pytest.mark.ray
def test_prepare_local_enhance_idempotent(tree, tmp_path, ray_session, caplog):
    root, expected = tree
    out = tmp_path / "prepared"
    # a first run with smaller shards leaves more part files than the runs below
    first = run_prepare(_cfg(str(root), str(out), shard_size=4, enhance={"enabled": True}))
    n_first = len(first["shards"])
    cfg = _cfg(str(root), str(out), enhance={"enabled": True})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="breakhis_ray.data.shards"):
        summary = run_prepare(cfg)
    printed = caplog.text
    assert "Tab. 1" in printed and "Tab. 2" in printed and "rejected" in printed
    assert len(summary["shards"]) < n_first
    assert [u.rsplit("/", 1)[-1] for u in shard_uris(str(out))] == summary["shards"]  # stale parts removed
    shards = _check_outputs(str(out), expected, summary)

    # enhancement: copies only in train, classes balanced per magnification, marked with their source
    aug = shards[shards["augmentation"].notna()]
    assert summary["augmented"] == len(aug) > 0
    assert (aug["split"] == "train").all()
    assert (aug["path"] == aug["source_path"] + "#aug=" + aug["augmentation"]).all()
    train_originals = shards[(shards["augmentation"].isna()) & (shards["split"] == "train")]
    assert set(aug["source_path"]) <= set(train_originals["path"])
    train = shards[shards["split"] == "train"]
    for mag, cell in train.groupby("magnification"):
        counts = cell["label"].value_counts()
        assert counts["benign"] == counts["malignant"], (mag, counts.to_dict())
    tab2 = summary["tables"]["tab2_train"]
    assert all(row["Benign"] == row["Malignant"] for key, row in tab2.items() if key != "Total")
    on_disk = json.loads((out / "prepare.json").read_text())
    assert on_disk["tables"] == summary["tables"] and on_disk["augmented"] == summary["augmented"]

    # idempotent: the same files, byte for byte, and no duplicates
    before = _files(out)
    again = run_prepare(cfg)
    assert again["shards"] == summary["shards"] and _files(out) == before
    assert read_shards(str(out))["path"].is_unique

    # the same tree in another directory: the same split and the same enhanced (stain-jittered) pixels
    moved = tmp_path / "elsewhere" / "tree"
    shutil.copytree(root, moved)
    jitter = {"enabled": True, "transforms": ["hflip", "vflip", "hed_jitter"]}
    run_prepare(_cfg(str(root), str(tmp_path / "prepared_here"), enhance=jitter))
    run_prepare(_cfg(str(moved), str(tmp_path / "prepared_moved"), enhance=jitter))
    rows = {}
    for where in ("here", "moved"):
        frame = read_shards(str(tmp_path / f"prepared_{where}"))
        tails = ["/".join(p.rsplit("/", 3)[-3:]) for p in frame["path"]]
        rows[where] = dict(zip(tails, zip(frame["split"], frame["image"])))
    assert rows["here"] == rows["moved"] and len(rows["here"]) > len(shards[shards["augmentation"].isna()])


@pytest.mark.ray
def test_prepare_from_manifest_parquet_and_splits(tree, tmp_path, ray_session):
    root, expected = tree
    first = tmp_path / "first"
    run_prepare(_cfg(str(root), str(first), image_format="jpeg", resize="16x16"))
    second = tmp_path / "second"
    summary = run_prepare(_cfg(str(first / "manifest.parquet"), str(second), image_format="jpeg",
                               resize="16x16", splits=str(first / "splits.parquet")))
    a = read_shards(str(first)).sort_values("path").reset_index(drop=True)
    b = read_shards(str(second)).sort_values("path").reset_index(drop=True)
    assert a.equals(b)
    assert (a["image_width"] == 16).all() and (a["image_height"] == 16).all()
    assert (a["image_format"] == "jpeg").all() and all(bytes(x[:3]) == b"\xff\xd8\xff" for x in a["image"])
    # the manifest Parquet holds no file-name problems: only the image rejects remain
    assert summary["input"] == expected["valid"] + len(expected["rejects"]) - 1
    assert summary["rejects_by_reason"].get("bad_name") is None


def test_prepare_unknown_fold_is_config_error(tree, tmp_path):
    root, _ = tree
    with pytest.raises(ConfigError, match="fold 3 is not in the splits"):
        run_prepare(_cfg(str(root), str(tmp_path / "out"), fold=3))


# -------------------------------------------------------------------------------------------- s3 -> s3
@pytest.mark.ray
@pytest.mark.s3
def test_prepare_s3_to_s3_via_cli(tree, s3_server, ray_session, capsys):
    root, expected = tree
    tree_uri = s3_server.uri("prepare-test/tree")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(tree_uri, str(path.relative_to(root))), path.read_bytes())
    out = s3_server.uri("prepare-test/out")
    rc = cli_main(["prepare", "--root", tree_uri, "--out", out, "split.folds=2", "split.val_fraction=0.3",
                   "shard_size=10", "expected_size=auto", "max_pixels=50000", "resize=16x16",
                   "enhance.enabled=true", "enhance.transforms=[hflip, rot90, hed_jitter(0.05)]",
                   "enhance.target=12"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    summary = json.loads(storage.read_text(storage.join(out, "prepare.json")))
    mapped = {
        "valid": expected["valid"],
        "rejects": {tree_uri + p[len(str(root)):]: r for p, r in expected["rejects"].items()},
        "converted": {tree_uri + p[len(str(root)):]: m for p, m in expected["converted"].items()},
    }
    shards = _check_outputs(out, mapped, summary)
    assert shards["path"].str.startswith(tree_uri + "/").all()
    assert (shards["image_width"] == 16).all()
    aug = shards[shards["augmentation"].notna()]
    assert (aug["split"] == "train").all() and len(aug) == summary["augmented"] > 0
    assert aug["augmentation"].str.contains("hed_jitter").all()
    train = shards[shards["split"] == "train"]
    for (mag, label), n in train.groupby(["magnification", "label"]).size().items():
        assert n >= 12, (mag, label, n)

    # the secret never reaches the outputs or the logs
    secret = s3_server.secret_key.encode()
    assert secret not in (printed.out + printed.err).encode()
    files = storage.list_files(out)
    assert {f.rsplit("/", 1)[-1] for f in files} >= {"prepare.json", "config.yaml", "rejects.parquet",
                                                     "manifest.parquet", "splits.parquet"}
    for uri in files:
        data = storage.read_bytes(uri)
        assert secret not in data and s3_server.access_key.encode() not in data, uri
    for uri in shard_uris(out):
        fs, path = storage.resolve(uri)
        meta = pq.read_metadata(path, filesystem=fs).metadata or {}
        assert all(secret not in k + v for k, v in meta.items())
