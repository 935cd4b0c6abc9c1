"""Splits: patient-disjoint folds, the 13412 policies, official folds, the leaky image mode, re-checks (no Ray)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from breakhis_ray.artifacts import write_parquet
from breakhis_ray.cli import main
from breakhis_ray.config import SplitConfig
from breakhis_ray.data.manifest import manifest_from_paths, parse_filename
from breakhis_ray.data.splits import (
    assert_patient_disjoint,
    load_splits,
    make_splits,
    patient_groups,
    read_official_folds,
    write_splits,
)
from breakhis_ray.errors import ConfigError, DataError

BREAST = "/data/BreaKHis_v1/histology_slides/breast"
DC, LC = "SOB_M_DC_14-13412", "SOB_M_LC_14-13412"
FOLDERS = [  # a small BreakHis: every subtype, sections of one slide, the 13412 copies, the year-15 patient
    "SOB_B_A_14-22549AB", "SOB_B_A_14-22549CD", "SOB_B_A_14-22549G", "SOB_B_A_14-29960CD",
    "SOB_B_F_14-14134", "SOB_B_F_14-14134E", "SOB_B_F_14-21998CD", "SOB_B_F_14-21998EF", "SOB_B_F_14-9133",
    "SOB_B_PT_14-21998AB", "SOB_B_PT_14-22704", "SOB_B_TA_14-13200", "SOB_B_TA_14-15275",
    DC, "SOB_M_DC_14-2523", "SOB_M_DC_14-6241", "SOB_M_DC_14-9461", "SOB_M_DC_14-10926", "SOB_M_DC_14-11031",
    "SOB_M_DC_14-11520", "SOB_M_DC_14-13993", "SOB_M_DC_14-16716", "SOB_M_DC_14-17901",
    LC, "SOB_M_LC_14-12204", "SOB_M_LC_14-15570", "SOB_M_LC_14-15570C",
    "SOB_M_MC_14-10147", "SOB_M_MC_14-12773", "SOB_M_MC_14-18842", "SOB_M_MC_14-18842D",
    "SOB_M_PC_15-190EF", "SOB_M_PC_14-12465", "SOB_M_PC_14-9146",
]
PER_MAG = 3


def _warned(caplog, text: str = "") -> bool:
    """Whether a WARNING record (containing ``text``) was logged."""
    return any(r.levelno == logging.WARNING and text in r.getMessage() for r in caplog.records)


def folder_paths(folder: str, per_mag: int = PER_MAG) -> list[str]:
    head, slide = folder.rsplit("_", 1)
    prefix = head + "-" + slide  # file names use "-" before the year
    return [f"{BREAST}/{parse_filename(f'{prefix}-{mag}-{seq:03d}.png').relative_path()}"
            for mag in (40, 100, 200, 400) for seq in range(1, per_mag + 1)]


def small_manifest(folders: list[str] = FOLDERS) -> pd.DataFrame:
    df, problems = manifest_from_paths([p for f in folders for p in folder_paths(f)])
    assert problems == []
    return df


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return small_manifest()


def config(**kw) -> SplitConfig:
    return SplitConfig(manifest="manifest.parquet", out="splits.parquet", **kw)


def check_structure(splits: pd.DataFrame, paths: set[str], folds: list[int], partition: bool = True) -> None:
    """One row per image per fold; the folds' test sets partition the images (unless told otherwise)."""
    assert list(splits.columns) == ["path", "fold", "split"]
    assert sorted(splits["fold"].unique()) == folds
    assert not splits.duplicated(["path", "fold"]).any()
    for _, part in splits.groupby("fold"):
        assert set(part["path"]) == paths
    assert set(splits["split"]) == {"train", "val", "test"}
    if partition:
        test = splits[splits["split"] == "test"]
        assert test["path"].is_unique and set(test["path"]) == paths


def split_of(splits: pd.DataFrame, manifest: pd.DataFrame, folder: str) -> pd.Series:
    """The split of ``folder`` in each fold (one value per fold: folders are never cut)."""
    rows = splits.merge(manifest[["path", "patient_id"]], on="path")
    rows = rows[rows["patient_id"] == folder]
    assert (rows.groupby("fold")["split"].nunique() == 1).all()
    return rows.groupby("fold")["split"].first()


# ------------------------------------------------------------------------------------------ patient mode
@pytest.mark.parametrize("key", ["folder", "slide"])
@pytest.mark.parametrize("policy", ["keep", "drop", "merge"])
def test_patient_mode_is_disjoint(manifest, key, policy, caplog):
    with caplog.at_level(logging.INFO, logger="breakhis_ray"):
        splits = make_splits(manifest, config(patient_key=key, dc_lc_policy=policy))
    printed = caplog.text
    kept = manifest[manifest["patient_id"] != LC] if policy == "drop" else manifest
    check_structure(splits, set(kept["path"]), [1, 2, 3, 4, 5])
    assert splits.attrs == {"protocol": "patient", "patient_key": key, "dc_lc_policy": policy}
    assert_patient_disjoint(splits, manifest, key, policy)
    if policy == "drop":
        assert f"excluded {4 * PER_MAG} image(s) of {LC}" in printed
    else:
        assert (policy == "keep" and key == "folder") == _warned(caplog)
    if policy == "merge" or (key == "slide" and policy != "drop"):
        assert split_of(splits, manifest, DC).equals(split_of(splits, manifest, LC))
    if key == "slide":
        sections = [split_of(splits, manifest, f) for f in FOLDERS[:3]]
        assert sections[0].equals(sections[1]) and sections[0].equals(sections[2])


def test_keep_lets_the_copies_part(manifest):
    """keep treats DC and LC 13412 as two patients: some seed puts them in different splits of a fold."""
    for seed in range(10):
        splits = make_splits(manifest, config(dc_lc_policy="keep", seed=seed))
        assert_patient_disjoint(splits, manifest, "folder", "keep")
        if not split_of(splits, manifest, DC).equals(split_of(splits, manifest, LC)):
            with pytest.raises(DataError, match="13412"):
                assert_patient_disjoint(splits, manifest, "folder", "merge")
            return
    pytest.fail("dc_lc_policy=keep never separated the 13412 copies")


def test_merge_never_parts_the_copies(manifest):
    for seed in range(10):
        splits = make_splits(manifest, config(seed=seed))
        assert split_of(splits, manifest, DC).equals(split_of(splits, manifest, LC))
        assert_patient_disjoint(splits, manifest, "folder", "merge")


def test_stratification_and_validation_share(manifest):
    splits = make_splits(manifest, config(folds=4, val_fraction=0.2))
    rows = splits.merge(manifest[["path", "label", "patient_id"]], on="path")
    benign_share = (manifest["label"] == "benign").mean()
    for _, part in rows.groupby("fold"):
        for split in ("train", "val", "test"):
            labels = part[part["split"] == split]["label"]
            assert set(labels) == {"benign", "malignant"}
        test_share = (part[part["split"] == "test"]["label"] == "benign").mean()
        assert abs(test_share - benign_share) < 0.15
        val_patients = part[part["split"] == "val"]["patient_id"].nunique()
        rest_patients = part[part["split"] != "test"]["patient_id"].nunique()
        assert 0.1 <= val_patients / rest_patients <= 0.3
    per_fold_test = rows[rows["split"] == "test"].groupby("fold")["patient_id"].nunique()
    assert per_fold_test.max() - per_fold_test.min() <= 2


def test_no_validation_when_fraction_is_zero(manifest):
    splits = make_splits(manifest, config(val_fraction=0.0))
    assert set(splits["split"]) == {"train", "test"}


def test_deterministic_for_a_seed(manifest):
    a, b = make_splits(manifest, config(seed=3)), make_splits(manifest, config(seed=3))
    assert a.equals(b)
    assert not a.equals(make_splits(manifest, config(seed=4)))


def test_too_few_patients_for_the_folds():
    few = small_manifest(["SOB_B_A_14-22549AB", "SOB_M_DC_14-2523", "SOB_M_DC_14-6241"])
    with pytest.raises(DataError, match="3 patient group"):
        make_splits(few, config(folds=5))


def test_patient_groups_keys(manifest):
    folder = patient_groups(manifest, "folder", "merge")
    slide = patient_groups(manifest, "slide")
    assert folder.nunique() == len(FOLDERS) - 1 and f"{DC}+{LC}" in set(folder)
    assert slide[manifest["patient_id"] == "SOB_B_A_14-22549G"].iloc[0] == "14-22549"
    with pytest.raises(ConfigError):
        patient_groups(manifest, "bed")


# -------------------------------------------------------------------------------------------- image mode
def test_image_mode_leaks_and_says_so(manifest, caplog):
    with caplog.at_level(logging.INFO, logger="breakhis_ray"):
        splits = make_splits(manifest, config(mode="image"))
    assert _warned(caplog, "mode=image")
    check_structure(splits, set(manifest["path"]), [1, 2, 3, 4, 5])
    rows = splits[splits["fold"] == 1].merge(manifest[["path", "patient_id"]], on="path")
    shared = set(rows[rows["split"] == "train"]["patient_id"]) & set(rows[rows["split"] == "test"]["patient_id"])
    assert shared
    with pytest.raises(DataError, match="leak"):
        assert_patient_disjoint(splits, manifest, "folder")


# ----------------------------------------------------------------------------------------- official mode
def official_rows(manifest: pd.DataFrame) -> list[tuple[str, int, int, str]]:
    """Folder-disjoint official-style folds; like the published ones, 13412 DC trains while LC tests."""
    folders = sorted(f for f in manifest["patient_id"].unique() if f not in (DC, LC))
    rows = []
    for fold in range(1, 6):
        test = {f for i, f in enumerate(folders) if i % 5 == fold - 1} | {LC}
        for r in manifest.itertuples():
            rows.append((r.filename, r.magnification, fold, "test" if r.patient_id in test else "train"))
    return rows


@pytest.fixture()
def dsfolds(tmp_path: Path, manifest) -> Path:
    rows = official_rows(manifest)
    for fold in range(1, 6):
        lines = [f"{name}|{mag}|{f}|{split}" for name, mag, f, split in rows if f == fold]
        if fold == 1:
            lines.append("SOB_B_A-14-99999-40-001.png|40|1|train")
        if fold == 2:
            lines.append("garbage line")
        (tmp_path / f"dsfold{fold}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_official_dsfold_files(manifest, dsfolds: Path, caplog):
    with caplog.at_level(logging.INFO, logger="breakhis_ray"):
        splits = make_splits(manifest, config(mode="official", folds_file=str(dsfolds / "dsfold3.txt")))
    printed = caplog.text
    assert "unmatched: SOB_B_A-14-99999-40-001.png" in printed and "1 folds-file name(s)" in printed
    assert "dsfold2.txt:" in printed and "1 malformed" in printed
    assert _warned(caplog, "the official folds split copies of one slide")
    check_structure(splits, set(manifest["path"]), [1, 2, 3, 4, 5], partition=False)  # LC tests in every fold
    assert splits.attrs == {"protocol": "official", "patient_key": "folder", "dc_lc_policy": "keep"}
    assert_patient_disjoint(splits, manifest, "folder", "keep")
    official = pd.DataFrame(official_rows(manifest), columns=["filename", "mag", "fold", "split"])
    official = official.merge(manifest[["filename", "path"]], on="filename")
    got = splits.merge(official, on=["path", "fold"], suffixes=("", "_official"))
    assert len(got) == len(splits)
    assert ((got["split"] == "test") == (got["split_official"] == "test")).all()  # val comes from train only
    assert (got["split"] == "val").any()


def test_official_folds_with_drop_and_slide_key(manifest, dsfolds: Path, caplog):
    with caplog.at_level(logging.INFO, logger="breakhis_ray"):
        dropped = make_splits(manifest, config(mode="official", folds_file=str(dsfolds / "dsfold1.txt"),
                                               dc_lc_policy="drop"))
    assert not _warned(caplog, "copies of one slide") and not _warned(caplog, "may leak")
    assert not dropped["path"].isin(manifest.loc[manifest["patient_id"] == LC, "path"]).any()
    assert dropped.attrs["dc_lc_policy"] == "drop"
    with pytest.raises(DataError, match="not patient-disjoint under patient_key=slide"):
        make_splits(manifest, config(mode="official", folds_file=str(dsfolds / "dsfold1.txt"),
                                     patient_key="slide"))


def test_official_folds_csv_matches_dsfold(manifest, dsfolds: Path, tmp_path: Path):
    rel = manifest["path"].str.replace("/data/", "", regex=False)
    names = dict(zip(manifest["filename"], rel))
    rows = [f"{fold},{mag},{split},{names[name]}" for name, mag, fold, split in official_rows(manifest)]
    csv = tmp_path / "Folds.csv"
    csv.write_text("fold,mag,grp,filename\n" + "\n".join(rows) + "\n")
    assert len(read_official_folds(str(csv))) == len(rows)
    from_csv = make_splits(manifest, config(mode="official", folds_file=str(csv)))
    from_txt = make_splits(manifest, config(mode="official", folds_file=str(dsfolds / "dsfold1.txt")))
    assert from_csv.equals(from_txt)


def test_official_needs_a_matching_folds_file(manifest, tmp_path: Path):
    with pytest.raises(ConfigError, match="folds-file"):
        make_splits(manifest, config(mode="official"))
    other = tmp_path / "dsfold1.txt"
    other.write_text("SOB_B_A-14-99999-40-001.png|40|1|train\n")
    with pytest.raises(DataError, match="no image of the manifest"):
        make_splits(manifest, config(mode="official", folds_file=str(other)))


# ---------------------------------------------------------------------------------------- load and CLI
def test_load_splits_round_trip_and_tamper(manifest, tmp_path: Path):
    uri = str(tmp_path / "splits.parquet")
    splits = make_splits(manifest, config())
    write_splits(splits, uri)
    loaded = load_splits(uri, manifest)
    assert loaded.equals(splits) and loaded.attrs["protocol"] == "patient"

    tampered = splits.copy()
    rows = tampered.merge(manifest[["path", "patient_id"]], on="path")
    victim = rows[(rows["fold"] == 1) & (rows["split"] == "test")].iloc[0]
    tampered.loc[(tampered["fold"] == 1) & (tampered["path"] == victim["path"]), "split"] = "train"
    write_splits(tampered, uri)
    with pytest.raises(DataError, match=victim["patient_id"]):
        load_splits(uri, manifest)

    write_parquet(splits, uri)  # no protocol metadata
    with pytest.raises(DataError, match="protocol"):
        load_splits(uri, manifest)


def test_load_splits_accepts_image_protocol(manifest, tmp_path: Path):
    uri = str(tmp_path / "image.parquet")
    write_splits(make_splits(manifest, config(mode="image")), uri)
    assert load_splits(uri, manifest).attrs["protocol"] == "image"


def test_cli_split(manifest, tmp_path: Path, capsys, caplog):
    m, out = str(tmp_path / "manifest.parquet"), str(tmp_path / "splits.parquet")
    write_parquet(manifest, m)
    with caplog.at_level(logging.INFO, logger="breakhis_ray"):
        assert main(["split", "--manifest", m, "--out", out, "--folds", "3", "--patient-key", "slide"]) == 0
    printed = caplog.text
    assert "patients" in printed and "malignant" in printed
    loaded = load_splits(out, manifest)
    assert loaded.attrs["patient_key"] == "slide" and sorted(loaded["fold"].unique()) == [1, 2, 3]
    assert "patient_key: slide" in Path(out + ".config.yaml").read_text()
    assert json.loads(Path(out + ".versions.json").read_text())["pyarrow"]

    assert main(["split", "--manifest", m, "--out", out, "--mode", "official"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0]


# -------------------------------------------------------------------------------------- the real list
def test_real_list_patient_folds(shared_dir: Path):
    paths = (shared_dir / "breakhis" / "breakhis_v1_paths.txt").read_text().split()
    real, _ = manifest_from_paths(paths)
    splits = make_splits(real, config())
    check_structure(splits, set(real["path"]), [1, 2, 3, 4, 5])
    assert_patient_disjoint(splits, real, "folder", "merge")
    rows = splits[splits["split"] == "test"].merge(real[["path", "label", "patient_id"]], on="path")
    for _, part in rows.groupby("fold"):
        assert 14 <= part["patient_id"].nunique() <= 18
        assert 0.25 <= (part["label"] == "benign").mean() <= 0.40

