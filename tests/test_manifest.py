"""Manifest: BreakHis name grammar, folder cross-checks, header sizes, Table 1, CLI (no Ray)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from breakhis_ray.cli import main
from breakhis_ray.data.manifest import (
    COLUMNS,
    ParsedName,
    build_manifest,
    class_magnification_table,
    explain_filename,
    find_breast_roots,
    manifest_from_paths,
    parse_filename,
    read_manifest,
    same_slide_folders,
)
from breakhis_ray.errors import DataError

BREAST = "BreaKHis_v1/histology_slides/breast"


def rel(name: str) -> str:
    """Correct path below ``histology_slides/breast`` for a valid file name."""
    return parse_filename(name).relative_path()


# --------------------------------------------------------------------------------------------- grammar
def test_parse_filename_fields():
    p = parse_filename("SOB_B_A-14-22549AB-40-001.png")
    assert p == ParsedName(label="benign", subtype_code="A", subtype="adenosis", year=14, slide_number="22549",
                           section="AB", magnification=40, seq=1, extension="png")
    assert p.patient_folder == "SOB_B_A_14-22549AB"
    assert p.slide_id == "14-22549"
    assert p.filename == "SOB_B_A-14-22549AB-40-001.png"
    assert p.relative_path() == ("benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png")


@pytest.mark.parametrize(
    "name, fields",
    [
        ("SOB_M_PC-15-190EF-100-001.png", dict(year=15, slide_number="190", section="EF", subtype_code="PC")),
        ("SOB_B_F-14-14134-40-010.png", dict(section="", slide_number="14134", subtype="fibroadenoma")),
        ("SOB_B_A-14-22549G-400-029.png", dict(section="G", magnification=400, seq=29)),
        ("SOB_M_DC-14-13412-100-001.png", dict(label="malignant", subtype="ductal_carcinoma")),
        ("SOB_M_LC-14-13412-200-033.png", dict(subtype="lobular_carcinoma", magnification=200, seq=33)),
        ("SOB_B_PT-14-21998AB-200-001.jpg", dict(subtype="phyllodes_tumor", extension="jpg")),
        ("SOB_B_TA-14-3411F-40-001.jpeg", dict(subtype="tubular_adenoma", extension="jpeg")),
        ("SOB_M_MC-14-10147-400-001.tif", dict(subtype="mucinous_carcinoma", extension="tif")),
    ],
)
def test_parse_quirks(name, fields):
    p = parse_filename(name)
    assert p is not None
    for key, value in fields.items():
        assert getattr(p, key) == value
    assert p.filename == name


@pytest.mark.parametrize(
    "name, reason",
    [
        ("IMG_001.png", "not a BreakHis image name"),
        (".DS_Store", "not a BreakHis image name"),
        ("Thumbs.db", "not a BreakHis image name"),
        ("SOB_B_A-14-22549AB-40-001.PNG", "extension .PNG"),
        ("SOB_B_A-14-22549AB-40-001.bmp", "extension .bmp"),
        ("SOB_B_A-14-22549AB-40-001.png.bak", "not a BreakHis image name"),
        ("CNB_B_A-14-22549AB-40-001.png", "procedure"),
        ("SOB_X_A-14-22549AB-40-001.png", "class letter"),
        ("SOB_B_XX-14-22549AB-40-001.png", "subtype code"),
        ("SOB_B_DC-14-22549AB-40-001.png", "malignant but the class letter is B"),
        ("SOB_B_A-16-22549AB-40-001.png", "year"),
        ("SOB_B_A-14-22549AB-50-001.png", "magnification"),
        ("SOB_B_A-14-22549AB-040-001.png", "magnification"),
        ("SOB_B_A-14-22549AB-40X-001.png", "not a BreakHis image name"),
        ("SOB_B_A-14-22549AB-40-01.png", "3 digits"),
        ("SOB_B_A-14-22549ab-40-001.png", "upper case"),
        ("SOB_B_A_14-22549AB-40-001.png", "not a BreakHis image name"),  # folder-style "_" before the year
    ],
)
def test_reject_non_breakhis_names(name, reason):
    assert parse_filename(name) is None
    explained = explain_filename(name)
    assert isinstance(explained, str) and reason in explained


# --------------------------------------------------------------------------------------- paths and folders
def test_double_nesting_and_plain_breast_root():
    name = "SOB_B_A-14-22549AB-40-001.png"
    for prefix in ("/d/BreaKHis_v1/BreaKHis_v1/histology_slides/breast", "s3://b/x/histology_slides/breast",
                   "/data/breast"):
        df, problems = manifest_from_paths([f"{prefix}/{rel(name)}"])
        assert problems == [] and len(df) == 1
        assert df.loc[0, "path"].startswith(prefix)
        assert df.loc[0, "patient_id"] == "SOB_B_A_14-22549AB"


@pytest.mark.parametrize(
    "path, reason",
    [
        ("benign/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-40-001.png", "magnification folder"),
        ("benign/SOB/adenosis/SOB_B_A_14-22549CD/40X/SOB_B_A-14-22549AB-40-001.png", "patient folder"),
        ("benign/SOB/adenosis/SOB_B_A-14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png", "patient folder"),
        ("benign/SOB/fibroadenoma/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png", "subtype folder"),
        ("malignant/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png", "class folder"),
        ("benign/CNB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png", "procedure folder"),
        ("benign/SOB/adenosis/40X/SOB_B_A-14-22549AB-40-001.png", "expected <class>/SOB"),
        ("benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/.DS_Store", "not a BreakHis image name"),
        ("benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/Thumbs.db", "not a BreakHis image name"),
    ],
)
def test_folder_mismatch_is_a_problem_not_a_row(path, reason):
    good = f"{BREAST}/{rel('SOB_B_A-14-22549AB-40-002.png')}"
    df, problems = manifest_from_paths([good, f"{BREAST}/{path}"])
    assert list(df["filename"]) == ["SOB_B_A-14-22549AB-40-002.png"]
    assert len(problems) == 1 and problems[0].path == f"{BREAST}/{path}"
    assert reason in problems[0].reason


def test_duplicate_file_name_in_two_copies_is_reported():
    name = rel("SOB_M_DC-14-13412-40-001.png")
    df, problems = manifest_from_paths([f"a/{BREAST}/{name}", f"b/{BREAST}/{name}"])
    assert len(df) == 1 and df.loc[0, "path"] == f"a/{BREAST}/{name}"
    assert [p.path for p in problems] == [f"b/{BREAST}/{name}"] and "duplicate" in problems[0].reason


def test_columns_and_dtypes_without_sizes():
    df, _ = manifest_from_paths([f"{BREAST}/{rel('SOB_M_MC-14-10147-400-001.png')}"])
    assert list(df.columns) == list(COLUMNS)
    assert str(df["label_id"].dtype) == "int8" and str(df["magnification"].dtype) == "int16"
    assert str(df["seq"].dtype) == "int16" and str(df["width"].dtype) == "Int32"
    assert df["width"].isna().all() and df.loc[0, "label_id"] == 1 and df.loc[0, "slide_id"] == "14-10147"


# ------------------------------------------------------------------------------------ the real file list
@pytest.fixture(scope="module")
def real(shared_dir: Path) -> pd.DataFrame:
    paths = (shared_dir / "breakhis" / "breakhis_v1_paths.txt").read_text().split()
    df, problems = manifest_from_paths(paths)
    assert problems == []
    return df


def test_table1_reproduced_exactly(real):
    table = class_magnification_table(real)
    expected = pd.DataFrame(
        [[625, 1370, 1995], [644, 1437, 2081], [623, 1390, 2013], [588, 1232, 1820], [2480, 5429, 7909]],
        index=["40X", "100X", "200X", "400X", "Total"], columns=["Benign", "Malignant", "Total"],
    )
    assert table.values.tolist() == expected.values.tolist()
    assert list(table.index) == list(expected.index) and list(table.columns) == list(expected.columns)


def test_real_patients_subtypes_and_traps(real):
    assert real["patient_id"].nunique() == 82 and real["slide_id"].nunique() == 70
    assert real.groupby("label")["patient_id"].nunique().to_dict() == {"benign": 24, "malignant": 58}
    per_subtype = real.groupby("subtype_code").agg(p=("patient_id", "nunique"), n=("path", "size"))
    assert per_subtype.to_dict("index") == {
        "A": {"p": 4, "n": 444}, "F": {"p": 10, "n": 1014}, "PT": {"p": 3, "n": 453}, "TA": {"p": 7, "n": 569},
        "DC": {"p": 38, "n": 3451}, "LC": {"p": 5, "n": 626}, "MC": {"p": 9, "n": 792}, "PC": {"p": 6, "n": 560},
    }
    assert same_slide_folders(real) == [("SOB_M_DC_14-13412", "SOB_M_LC_14-13412")]
    assert set(real.loc[real["slide_id"].str.startswith("15-"), "patient_id"]) == {"SOB_M_PC_15-190EF"}
    groups = real.groupby(["patient_id", "magnification"])["seq"].agg(["min", "max", "size"])
    assert int((groups["max"] != groups["size"]).sum()) > 0  # sequences with gaps are kept as they are
    assert groups.loc[("SOB_B_F_14-25197", 40)].tolist() == [22, 43, 22]


# ------------------------------------------------------------------------------- a tree on disk, end to end
def _png(path: Path, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (180, 90, 160)).save(path)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "download"
    breast = root / "BreaKHis_v1" / "BreaKHis_v1" / "histology_slides" / "breast"
    names = {
        "SOB_B_A-14-22549AB-40-001.png": (12, 8),
        "SOB_B_A-14-22549AB-40-003.png": (12, 8),  # gap in the sequence
        "SOB_M_DC-14-13412-100-001.png": (10, 7),
        "SOB_M_PC-15-190EF-400-002.png": (9, 9),
    }
    for name, size in names.items():
        _png(breast / rel(name), size)
    jpeg = breast / rel("SOB_M_LC-14-13412-200-001.jpg")
    jpeg.parent.mkdir(parents=True)
    Image.new("RGB", (16, 11)).save(jpeg, quality=90)
    corrupt = breast / rel("SOB_M_MC-14-10147-40-001.png")
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (breast / "benign" / ".DS_Store").write_bytes(b"\0")
    (breast / "benign" / "SOB" / "adenosis" / "SOB_B_A_14-22549AB" / "40X" / "Thumbs.db").write_bytes(b"\0")
    _png(breast / "benign/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-40-002.png", (12, 8))
    mask = root / "masks" / "BreaKHis_v1" / "histology_slides" / "breast" / "x" / "SOB_B_A-14-22549AB-40-001_nuclei.png"
    _png(mask, (12, 8))
    (root / "Folds.csv").write_text("fold,mag,grp,filename\n")
    return root


def test_build_manifest_end_to_end(tree: Path):
    df, problems = build_manifest(str(tree), threads=2)
    assert list(df.columns) == list(COLUMNS) and len(df) == 6
    sizes = dict(zip(df["filename"], zip(df["width"], df["height"])))
    assert sizes["SOB_B_A-14-22549AB-40-001.png"] == (12, 8)
    assert sizes["SOB_M_DC-14-13412-100-001.png"] == (10, 7)
    assert sizes["SOB_M_LC-14-13412-200-001.jpg"] == (16, 11)
    assert pd.isna(sizes["SOB_M_MC-14-10147-40-001.png"][0])  # unreadable header: kept, null size
    assert sorted(df["seq"][df["patient_id"] == "SOB_B_A_14-22549AB"]) == [1, 3]
    assert sorted(os.path.basename(p.path) for p in problems) == [
        ".DS_Store", "SOB_B_A-14-22549AB-40-002.png", "Thumbs.db"]
    assert df.attrs["ignored"] == 2  # the mask and Folds.csv lie outside the image tree
    assert find_breast_roots(str(tree)) == [str(tree / "BreaKHis_v1/BreaKHis_v1/histology_slides/breast")]
    assert all(p.startswith(str(tree)) for p in df["path"])


def test_cli_manifest_writes_parquet_and_config(tree: Path, tmp_path: Path, caplog):
    out = tmp_path / "out" / "manifest.parquet"
    with caplog.at_level(logging.INFO, logger="breakhis_ray"):
        assert main(["manifest", "--root", str(tree), "--out", str(out)]) == 0
    printed = caplog.text
    assert "Benign" in printed and "3 file(s) excluded" in printed and "Thumbs.db" in printed
    df = read_manifest(str(out))
    assert len(df) == 6 and str(df["width"].dtype) == "Int32" and str(df["label_id"].dtype) == "int8"
    assert "root:" in (tmp_path / "out" / "manifest.parquet.config.yaml").read_text()
    assert "pyarrow" in json.loads((tmp_path / "out" / "manifest.parquet.versions.json").read_text())


def test_cli_manifest_read_sizes_off(tree: Path, tmp_path: Path):
    out = tmp_path / "m.parquet"
    assert main(["manifest", "--root", str(tree), "--out", str(out), "read_sizes=false"]) == 0
    assert read_manifest(str(out))["width"].isna().all()


@pytest.mark.parametrize("kind", ["missing", "no_images"])
def test_cli_manifest_bad_root(tmp_path: Path, capsys, kind):
    root = tmp_path / "nothing"
    if kind == "no_images":
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "IMG_001.png").write_bytes(b"")
    code = main(["manifest", "--root", str(root), "--out", str(tmp_path / "m.parquet")])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0]
    assert not (tmp_path / "m.parquet").exists()


def test_read_manifest_rejects_other_parquet(tmp_path: Path):
    other = tmp_path / "other.parquet"
    pd.DataFrame({"path": ["x"]}).to_parquet(other)
    with pytest.raises(DataError, match="not a manifest"):
        read_manifest(str(other))


@pytest.mark.s3
def test_manifest_over_s3(tree: Path, s3_server):
    from breakhis_ray import storage

    root = s3_server.uri("manifest-test/download")
    for path in tree.rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(root, str(path.relative_to(tree))), path.read_bytes())
    out = s3_server.uri("manifest-test/out/manifest.parquet")
    assert main(["manifest", "--root", root, "--out", out]) == 0
    df = read_manifest(out)
    assert len(df) == 6 and all(p.startswith(root + "/BreaKHis_v1/BreaKHis_v1/") for p in df["path"])
    sizes = dict(zip(df["filename"], zip(df["width"], df["height"])))
    assert sizes["SOB_M_LC-14-13412-200-001.jpg"] == (16, 11)
    assert storage.exists(out + ".config.yaml") and storage.exists(out + ".versions.json")
