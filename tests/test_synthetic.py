"""Synthetic BreakHis: real counts and names, patient selection, dsfold files, Ray == single process,
and a class signal that is learnable but harder across patients than across images."""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breakhis_ray.config import SynthConfig, dump_config
from breakhis_ray.data import render, stain, synthetic
from breakhis_ray.data.cohort import load_patients, pixel_source
from breakhis_ray.domain import MAGNIFICATIONS, SUBTYPE_CODES

FILENAME = re.compile(r"^SOB_(B|M)_(A|F|PT|TA|DC|LC|MC|PC)-(\d\d)-(\d+[A-Z]*)-(40|100|200|400)-(\d{3})\.png$")


# -------------------------------------------------------------------------------------- the table
def test_patient_table_matches_breakhis():
    rows = load_patients()
    assert len(rows) == 82
    assert Counter(r.label for r in rows) == {"benign": 24, "malignant": 58}
    assert sum(sum(r.counts) for r in rows) == 7909
    per_mag = {m: sum(r.count(m) for r in rows) for m in MAGNIFICATIONS}
    assert per_mag == {40: 1995, 100: 2081, 200: 2013, 400: 1820}
    by_code = Counter()
    for r in rows:
        by_code[r.code] += sum(r.counts)
    assert by_code == {"A": 444, "F": 1014, "PT": 453, "TA": 569, "DC": 3451, "LC": 626, "MC": 792, "PC": 560}


def test_names_follow_breakhis_and_13412_is_filed_twice():
    rows = load_patients()
    first = rows[0]
    assert first.folder == "SOB_B_A_14-22549AB"
    assert first.relative_path(40, 1) == (
        "BreaKHis_v1/histology_slides/breast/benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png"
    )
    for r in rows:
        m = FILENAME.match(r.filename(100, 12))
        assert m and m.group(2) == r.code and r.folder.startswith(f"SOB_{m.group(1)}_{r.code}_")
    pair = [r for r in rows if r.slide == "14-13412"]
    assert sorted(r.code for r in pair) == ["DC", "LC"] and pair[0].counts == pair[1].counts
    assert pixel_source(pair[1]) == pair[0]
    assert render.patient_params_for_index(0, pair[0].index) == render.patient_params_for_index(0, pair[1].index)


def test_13412_pair_writes_identical_pixels(tmp_path):
    cfg = SynthConfig(out=str(tmp_path), size=(64, 48))
    data = dump_config(cfg)
    pair = [r for r in load_patients() if r.slide == "14-13412"]
    for r in pair:
        synthetic.generate_group(data, r.index, 100, 2)
    for seq in (1, 2):
        a, b = ((tmp_path / r.relative_path(100, seq)).read_bytes() for r in pair)
        assert a == b


# -------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("fraction", [1.0, 0.3, 0.01])
def test_fraction_scales_counts_and_keeps_every_group(fraction):
    jobs = synthetic.plan_jobs(SynthConfig(fraction=fraction))
    rows = load_patients()
    assert len(jobs) == 82 * 4 and all(j.count >= 1 for j in jobs)
    total = sum(j.count for j in jobs)
    if fraction == 1.0:
        assert total == 7909
    else:
        expected = sum(max(1.0, n * fraction) for r in rows for n in r.counts)
        assert abs(total - expected) <= 82 * 4 * 0.5
    assert all(j.count <= rows[j.index].count(j.magnification) for j in jobs)
    assert {rows[j.index].code for j in jobs} == set(SUBTYPE_CODES.values())


@pytest.mark.parametrize("n", [2, 5, 8, 12, 40])
def test_patient_selection_covers_subtypes_and_classes(n):
    chosen = synthetic.select_patients(n, seed=0)
    assert len(chosen) == n
    assert {r.label for r in chosen} == {"benign", "malignant"}
    assert len({r.code for r in chosen}) == min(n, 8)
    assert [r.folder for r in synthetic.select_patients(n, seed=0)] == [r.folder for r in chosen]
    if n >= 40:  # larger subtypes keep more patients
        by_code = Counter(r.code for r in chosen)
        assert by_code["DC"] == max(by_code.values())


# ------------------------------------------------------------------------------------------ folds
def _parse_dsfold(text: str) -> list[tuple[str, int, int, str]]:
    rows = []
    for line in text.splitlines():
        name, mag, fold, split = line.split("|")
        assert FILENAME.match(name) and f"-{mag}-" in name and split in ("train", "test")
        rows.append((name, int(mag), int(fold), split))
    return rows


def test_official_folds_are_patient_disjoint_and_keep_the_13412_leak():
    rows = list(load_patients())
    folds = synthetic.official_folds(rows, seed=0)
    assert len(folds) == 5
    assert len({tuple(sorted(f.items())) for f in folds}) == 5  # five different splits
    jobs = synthetic.plan_jobs(SynthConfig(fraction=0.05))
    for fold, split in enumerate(folds, start=1):
        assert set(split) == {r.folder for r in rows}
        test_share = sum(v == "test" for v in split.values()) / len(split)
        assert 0.22 <= test_share <= 0.38
        for code in SUBTYPE_CODES.values():
            sides = {split[r.folder] for r in rows if r.code == code}
            assert sides == {"train", "test"}
        assert split["SOB_M_DC_14-13412"] == "train" and split["SOB_M_LC_14-13412"] == "test"
        parsed = _parse_dsfold(synthetic.dsfold_text(jobs, split, fold))
        assert len(parsed) == sum(j.count for j in jobs) and {p[2] for p in parsed} == {fold}
        # filename -> folder is unique, so a folder's images are all on one side
        side_of_folder: dict[str, set] = {}
        for name, _, _, side in parsed:
            m = FILENAME.match(name)
            side_of_folder.setdefault((m.group(2), m.group(4)), set()).add(side)
        assert all(len(s) == 1 for s in side_of_folder.values())


# ------------------------------------------------------------------------------- Ray vs one process
def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("synth.json", "config.yaml", "versions.json", "samples_grid.png")
    }


@pytest.mark.ray
def test_ray_run_writes_the_tree_and_matches_single_process(ray_session, tmp_path, caplog):
    from breakhis_ray.cli import main

    out_ray, out_local = tmp_path / "ray", tmp_path / "local"
    args = ["--patients", "9", "--fraction", "0.05", "--size", "64x48", "--seed", "3"]
    with caplog.at_level(logging.INFO, logger="breakhis_ray"):
        assert main(["synth", "--out", str(out_ray), *args, "task_cpus=0.5"]) == 0
    printed = caplog.text
    assert "img/s" in printed and str(out_ray) in printed

    cfg = SynthConfig(out=str(out_local), patients=9, fraction=0.05, size=(64, 48), seed=3)
    summary = synthetic.generate_single_process(cfg)
    ray_files, local_files = _files(out_ray), _files(out_local)
    assert ray_files == local_files

    jobs = synthetic.plan_jobs(cfg)
    images = [k for k in ray_files if k.startswith("BreaKHis_v1/") and k.endswith(".png")]
    assert len(images) == sum(j.count for j in jobs) == summary["images"]
    assert {k.split("/")[3] for k in images} == {"benign", "malignant"}
    assert {k.split("/")[5] for k in images} == set(SUBTYPE_CODES)
    assert {f"dsfold{i}.txt" for i in range(1, 6)} <= set(ray_files)
    for path in images[:5]:
        rgb = np.asarray(Image.open(io.BytesIO(ray_files[path])))
        assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
        stem = "masks/" + path[: -len(".png")]
        nuclei = np.asarray(Image.open(io.BytesIO(ray_files[stem + "_nuclei.png"])))
        tissue = np.asarray(Image.open(io.BytesIO(ray_files[stem + "_tissue.png"])))
        assert nuclei.shape == tissue.shape == (48, 64) and nuclei.dtype == np.uint16
        assert set(np.unique(tissue)) <= {0, 1, 2}
    on_disk = json.loads((out_ray / "synth.json").read_text())
    assert on_disk["images"] == summary["images"] and on_disk["mode"] == "ray"
    assert "difficulty: 0.5" in (out_ray / "config.yaml").read_text()
    assert "numpy" in json.loads((out_ray / "versions.json").read_text())
    grid = Image.open(out_ray / "samples_grid.png")
    assert grid.size[0] > 400 and grid.size[1] > 600


# --------------------------------------------------------------------------------- class signal
def _features(rgb: np.ndarray) -> np.ndarray:
    """Cheap colour and stain statistics, the kind of shortcut a weak classifier would find."""
    x = rgb.reshape(-1, 3).astype(np.float32)
    h = stain.hematoxylin_density(rgb).ravel()
    e = stain.eosin_density(rgb).ravel()
    grey = x.mean(1)
    return np.concatenate([
        x.mean(0), x.std(0), np.percentile(x, [10, 50, 90], axis=0).ravel(),
        [h.mean(), h.std(), np.percentile(h, 90), (h > 0.5).mean(), e.mean(), e.std(),
         (grey < 120).mean(), (grey < 160).mean(), (grey > 220).mean()],
    ])


def test_class_signal_is_learnable_and_patient_split_is_harder():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, groups = [], [], []
    for row in load_patients():
        params = render.patient_params_for_index(0, row.index, 0.5)
        for mag in MAGNIFICATIONS:
            for seq in (1, 2):
                rgb, _, _ = render.render_tile(0, params, mag, seq, (140, 92), 0.5)
                X.append(_features(rgb))
                y.append(row.label == "malignant")
                groups.append(row.index)
    X, y, groups = np.array(X), np.array(y), np.array(groups)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))

    def scores(cv, **kw):
        pred = cross_val_predict(clf, X, y, cv=cv, **kw)
        acc = (pred == y).mean()
        balanced = 0.5 * ((pred[y] == 1).mean() + (pred[~y] == 0).mean())
        return acc, balanced

    patient_acc, patient_bal = scores(StratifiedGroupKFold(5, shuffle=True, random_state=0), groups=groups)
    image_acc, image_bal = scores(StratifiedKFold(5, shuffle=True, random_state=0))
    print(f"patient split {patient_acc:.3f} (balanced {patient_bal:.3f}); "
          f"image split {image_acc:.3f} (balanced {image_bal:.3f})")
    assert patient_bal > 0.65  # clearly above chance (0.5)
    assert patient_acc > y.mean() + 0.04  # and above always answering "malignant"
    assert image_acc - patient_acc >= 0.03  # patients leak across an image split
    assert image_bal - patient_bal >= 0.03
    assert image_acc < 0.97  # not trivial


@pytest.mark.ray
@pytest.mark.s3
def test_ray_tasks_write_to_object_storage(ray_session, s3_server):
    from breakhis_ray import storage

    out = s3_server.uri("synthetic-test")
    cfg = SynthConfig(out=out, patients=8, fraction=0.01, size=(48, 32), grid=False)
    summary = synthetic.run_synth(cfg)
    files = storage.list_files(out)
    masks = [f for f in files if "/masks/" in f]
    images = [f for f in files if "/BreaKHis_v1/" in f and f not in masks]
    assert len(images) == summary["images"] == 32 and len(masks) == 2 * len(images)
    assert all(f.startswith("s3://") for f in files)
    first = load_patients()[synthetic.plan_jobs(cfg)[0].index]
    assert storage.exists(storage.join(out, first.relative_path(40, 1)))
    assert json.loads(storage.read_text(storage.join(out, "synth.json")))["images"] == 32
