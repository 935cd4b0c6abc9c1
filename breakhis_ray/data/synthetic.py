"""A faithful synthetic BreakHis: the real tree, file names and per-patient counts, procedural H&E pixels.

Layout written under ``cfg.out`` (a local path or ``s3://`` prefix)::

    BreaKHis_v1/histology_slides/breast/{benign,malignant}/SOB/{subtype}/{patient folder}/{mag}X/
        SOB_B_A-14-22549AB-40-001.png                      700x460 RGB (or cfg.size)
    masks/<same relative path>_nuclei.png                  16-bit instance ids (0 = no nucleus)
    masks/<same relative path>_tissue.png                  8-bit: 0 background/lumen/mucin, 1 stroma, 2 epithelium
    dsfold1.txt .. dsfold5.txt                             ``filename|mag|fold|train|test`` rows
    samples_grid.png                                       8 subtypes x 4 magnifications
    synth.json, config.yaml, versions.json                 summary, resolved config, library versions

Per-patient image counts are BreakHis's own (:mod:`.cohort`: 82 folders, 7,909 images),
scaled by ``fraction`` (at least one image per patient and magnification) and optionally restricted to
``patients`` folders that still cover every subtype and both classes. Sequence numbers run 1..n per
patient and magnification, so a smaller ``fraction`` gives a subset of the full tree, pixel for pixel.
Slide 13412 is filed under both ductal and lobular carcinoma with the same pixels, as in BreakHis.

Generation runs one Ray task per (patient, magnification); each task renders its tiles and writes its
files itself, so object-storage output needs no round trip through the driver. ``use_ray=False`` runs the
same task function in this process (for benchmarks and byte-for-byte comparisons).
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from breakhis_ray import storage
from breakhis_ray.artifacts import write_json, write_provenance
from breakhis_ray.config import SynthConfig, dump_config, validate_config
from breakhis_ray.data.cohort import SHARED_SLIDE, TREE_ROOT, PatientRow, load_patients
from breakhis_ray.data.render import patient_params_for_index, render_tile, um_per_px
from breakhis_ray.domain import MAGNIFICATIONS, SUBTYPE_LABELS, SUBTYPES

log = logging.getLogger(__name__)

MASK_ROOT = "masks"
#: Selection order when fewer patients than subtypes are asked for: alternate the classes.
SUBTYPE_ORDER = ("A", "DC", "F", "LC", "PT", "MC", "TA", "PC")
N_FOLDS = 5
TEST_SHARE = 0.3
THUMB_WIDTH = 175


# ---------------------------------------------------------------------------------- selection
def select_patients(n: int | None, seed: int) -> list[PatientRow]:
    """``n`` patient folders (all when ``None``) covering every subtype (when ``n >= 8``) and both classes.

    Deterministic in ``seed``: folders are shuffled within each subtype, then taken round by round,
    subtypes in proportion to their share of folders, so larger subtypes keep more patients.
    """
    rows = load_patients()
    if n is None or n >= len(rows):
        return list(rows)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, 3]))
    ranked = []
    for order, code in enumerate(SUBTYPE_ORDER):
        members = [r for r in rows if r.code == code]
        for j, k in enumerate(rng.permutation(len(members))):
            ranked.append((j / len(members), order, members[k]))
    ranked.sort(key=lambda t: (t[0], t[1]))
    chosen = {t[2].index for t in ranked[:n]}
    return [r for r in rows if r.index in chosen]


def image_count(row: PatientRow, magnification: int, fraction: float) -> int:
    """Images generated for one patient and magnification: the real count scaled, at least one."""
    real = row.count(magnification)
    return min(real, max(1, int(math.floor(real * fraction + 0.5))))


@dataclass(frozen=True)
class Job:
    index: int  # patient row
    magnification: int
    count: int  # sequence numbers 1..count


def plan_jobs(cfg: SynthConfig) -> list[Job]:
    """One job per selected (patient, magnification), in tree order."""
    return [
        Job(row.index, mag, image_count(row, mag, cfg.fraction))
        for row in select_patients(cfg.patients, cfg.seed)
        for mag in MAGNIFICATIONS
    ]


# ------------------------------------------------------------------------------------- folds
def official_folds(rows: list[PatientRow], seed: int, n_folds: int = N_FOLDS) -> list[dict[str, str]]:
    """Per fold, ``folder -> "train" | "test"``: patient-disjoint, ~70/30 within every subtype.

    As in BreakHis's own dsfold files, when both folders of slide 13412 are present the ductal copy is
    always in train and the lobular copy in test (the same images on both sides: a known leak).
    """
    folds = []
    pair = [r for r in rows if r.slide == SHARED_SLIDE]
    forced = {}
    if len(pair) == 2:
        forced = {r.folder: ("train" if r.code == "DC" else "test") for r in pair}
    for fold in range(n_folds):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, 5, fold]))
        split = {}
        for code in SUBTYPE_ORDER:
            members = [r for r in rows if r.code == code]
            n_test = max(1, int(round(TEST_SHARE * len(members)))) if len(members) >= 2 else 0
            free = [r for r in members if r.folder not in forced]
            n_test -= sum(1 for r in members if forced.get(r.folder) == "test")
            picked = set(rng.choice(len(free), size=max(0, min(n_test, len(free) - 1)), replace=False).tolist())
            for j, r in enumerate(free):
                split[r.folder] = "test" if j in picked else "train"
            for r in members:
                if r.folder in forced:
                    split[r.folder] = forced[r.folder]
        folds.append(split)
    return folds


def dsfold_text(jobs: list[Job], split: dict[str, str], fold: int) -> str:
    """One ``dsfoldN.txt``: ``filename|mag|fold|train|test`` rows, e.g. ``SOB_M_DC-14-13412-100-001.png|100|1|train``."""
    rows = load_patients()
    lines = []
    for job in jobs:
        row = rows[job.index]
        for seq in range(1, job.count + 1):
            lines.append(f"{row.filename(job.magnification, seq)}|{job.magnification}|{fold}|{split[row.folder]}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ writing
def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding (RGB uint8, grey uint8 or 16-bit grey uint16), deterministic."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def generate_group(cfg_data: dict, index: int, magnification: int, count: int) -> dict:
    """Render and write one patient's images at one magnification (the Ray task body).

    Takes the dumped config and re-validates it, like every worker. Returns the written file names, a
    thumbnail of the first tile (for the samples grid) and the time spent.
    """
    cfg = validate_config(SynthConfig, cfg_data)
    start = time.perf_counter()
    row = load_patients()[index]
    params = patient_params_for_index(cfg.seed, index, cfg.difficulty)
    names, thumb = [], None
    for seq in range(1, count + 1):
        rgb, nuclei, tissue = render_tile(cfg.seed, params, magnification, seq, cfg.size, cfg.difficulty)
        rel = row.relative_path(magnification, seq)
        storage.write_bytes(storage.join(cfg.out, rel), png_bytes(rgb))
        if cfg.masks:
            stem = rel[: -len(".png")]
            storage.write_bytes(storage.join(cfg.out, MASK_ROOT, stem + "_nuclei.png"), png_bytes(nuclei))
            storage.write_bytes(storage.join(cfg.out, MASK_ROOT, stem + "_tissue.png"), png_bytes(tissue))
        if thumb is None:
            h = max(1, round(rgb.shape[0] * THUMB_WIDTH / rgb.shape[1]))
            thumb = np.asarray(Image.fromarray(rgb).resize((THUMB_WIDTH, h), Image.Resampling.BOX))
        names.append(row.filename(magnification, seq))
    return {
        "index": index,
        "magnification": magnification,
        "files": names,
        "thumb": thumb,
        "seconds": time.perf_counter() - start,
    }


def samples_grid_png(thumbs: dict[tuple[str, int], np.ndarray]) -> bytes:
    """A labelled grid: one row per subtype, one column per magnification."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * 2.1, 8 * 1.45), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(8, 4, squeeze=False)
    for i, code in enumerate(SUBTYPES):  # benign subtypes first, the BreakHis order
        for j, mag in enumerate(MAGNIFICATIONS):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            thumb = thumbs.get((code, mag))
            if thumb is not None:
                ax.imshow(thumb)
            else:
                ax.text(0.5, 0.5, "not generated", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            if i == 0:
                ax.set_title(f"{mag}X", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{SUBTYPES[code].replace('_', ' ')}\n({SUBTYPE_LABELS[code]})", fontsize=8)
    fig.suptitle("Synthetic BreakHis: first image of the first patient per subtype", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------- run
def _run_ray(cfg: SynthConfig, jobs: list[Job], report) -> list[dict]:
    import ray

    from breakhis_ray.ray_utils import ensure_ray

    ensure_ray(cfg.ray)
    task = ray.remote(generate_group).options(num_cpus=cfg.task_cpus)
    data = dump_config(cfg)
    # largest groups first keeps the tail short
    pending = [task.remote(data, j.index, j.magnification, j.count) for j in sorted(jobs, key=lambda j: -j.count)]
    results = []
    while pending:
        done, pending = ray.wait(pending, num_returns=min(len(pending), max(1, len(jobs) // 50)))
        for ref in done:
            results.append(ray.get(ref))
            report(results[-1])
    return results


def _run_local(cfg: SynthConfig, jobs: list[Job], report) -> list[dict]:
    data = dump_config(cfg)
    results = []
    for j in jobs:
        results.append(generate_group(data, j.index, j.magnification, j.count))
        report(results[-1])
    return results


def summarize(jobs: list[Job]) -> dict:
    rows = load_patients()
    by_class: dict[str, int] = {}
    by_subtype: dict[str, int] = {}
    by_mag: dict[str, int] = {}
    for j in jobs:
        row = rows[j.index]
        by_class[row.label] = by_class.get(row.label, 0) + j.count
        by_subtype[row.subtype] = by_subtype.get(row.subtype, 0) + j.count
        by_mag[f"{j.magnification}X"] = by_mag.get(f"{j.magnification}X", 0) + j.count
    return {
        "images": sum(j.count for j in jobs),
        "patients": len({j.index for j in jobs}),
        "by_class": by_class,
        "by_subtype": by_subtype,
        "by_magnification": by_mag,
    }


def run_synth(cfg: SynthConfig, use_ray: bool = True) -> dict:
    """Generate the synthetic tree described in this module's docstring; returns a small summary."""
    jobs = plan_jobs(cfg)
    counts = summarize(jobs)
    total = counts["images"]
    mode = "ray" if use_ray else "single-process"
    log.info("synth: %d images of %d patients at %dx%d (%d groups, %s) -> %s", total, counts["patients"],
             cfg.size[0], cfg.size[1], len(jobs), mode, cfg.out)
    start = time.perf_counter()
    state = {"groups": 0, "images": 0, "next": 0.1}

    def report(result: dict) -> None:
        state["groups"] += 1
        state["images"] += len(result["files"])
        if state["groups"] / len(jobs) >= state["next"] or state["groups"] == len(jobs):
            rate = state["images"] / max(time.perf_counter() - start, 1e-9)
            log.info("synth: %d/%d groups, %d/%d images, %.1f img/s", state["groups"], len(jobs),
                     state["images"], total, rate)
            state["next"] = math.floor(state["groups"] / len(jobs) * 10 + 1) / 10

    results = _run_ray(cfg, jobs, report) if use_ray else _run_local(cfg, jobs, report)
    seconds = time.perf_counter() - start

    rows = load_patients()
    written = []
    if cfg.folds_files:
        selected = sorted({rows[j.index] for j in jobs}, key=lambda r: r.index)
        for fold, split in enumerate(official_folds(selected, cfg.seed), start=1):
            uri = storage.join(cfg.out, f"dsfold{fold}.txt")
            storage.write_text(uri, dsfold_text(jobs, split, fold))
            written.append(uri)
    if cfg.grid:
        thumbs: dict[tuple[str, int], np.ndarray] = {}
        for res in sorted(results, key=lambda r: (r["index"], r["magnification"])):
            thumbs.setdefault((rows[res["index"]].code, res["magnification"]), res["thumb"])
        uri = storage.join(cfg.out, "samples_grid.png")
        storage.write_bytes(uri, samples_grid_png(thumbs))
        written.append(uri)
    summary = {
        **counts,
        "out": cfg.out,
        "tree": storage.join(cfg.out, TREE_ROOT),
        "masks": storage.join(cfg.out, MASK_ROOT) if cfg.masks else None,
        "seed": cfg.seed,
        "size": list(cfg.size),
        "difficulty": cfg.difficulty,
        "fraction": cfg.fraction,
        "um_per_px": {f"{m}X": um_per_px(m, cfg.size[0]) for m in MAGNIFICATIONS},
        "mode": mode,
        "seconds": round(seconds, 3),
        "images_per_second": round(total / max(seconds, 1e-9), 2),
    }
    write_json(storage.join(cfg.out, "synth.json"), summary)
    write_provenance(cfg.out, cfg)  # config.yaml + versions.json
    log.info("synth: wrote %d images in %.1f s (%s img/s)", total, seconds, summary["images_per_second"])
    log.info("synth: tree %s", summary["tree"])
    if cfg.masks:
        log.info("synth: masks %s", summary["masks"])
    for uri in written:
        log.info("synth: wrote %s", uri)
    return summary


def generate_single_process(cfg: SynthConfig) -> dict:
    """``run_synth`` without Ray: the same task function, called in a loop in this process."""
    return run_synth(cfg, use_ray=False)
