"""The whole pipeline on a small synthetic BreakHis with a local Ray: what ``make demo`` runs.

Every stage is the same library call the CLI makes, fed with a config built from the stage's YAML and
overrides that point it at the demo's output folder. Timings and output paths go to ``<out>/demo.json``; the
resolved :class:`~breakhis_ray.config.DemoConfig` and the library versions to ``<out>/demo_config.yaml`` and
``<out>/demo_versions.json`` (each stage also writes its own provenance beside its outputs).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from breakhis_ray.artifacts import write_json, write_parquet, write_provenance
from breakhis_ray.config import (
    DemoConfig,
    EvaluateConfig,
    InferConfig,
    ManifestConfig,
    PrepareConfig,
    ReportConfig,
    SegEvalConfig,
    SegTrainConfig,
    SplitConfig,
    SynthConfig,
    TrainConfig,
    load_config,
)
from breakhis_ray.ray_utils import ensure_ray

log = logging.getLogger(__name__)


class _Stages:
    """Runs named stages, timing each; the record is written to ``demo.json`` after every stage."""

    def __init__(self, out: Path):
        self.out = out
        self.record: dict = {"stages": {}, "outputs": {}}

    @contextmanager
    def stage(self, name: str):
        log.info("=== demo: %s ===", name)
        start = time.perf_counter()
        yield
        seconds = round(time.perf_counter() - start, 1)
        self.record["stages"][name] = seconds
        log.info("=== demo: %s done in %s s ===", name, seconds)
        self.save()

    def output(self, key: str, value) -> None:
        self.record["outputs"][key] = value
        self.save()

    def save(self) -> None:
        write_json(str(self.out / "demo.json"), self.record)


def _test_manifest(manifest_uri: str, splits_uri: str, out_uri: str, fold: int = 1, split: str = "test") -> int:
    """The manifest rows of ``fold``'s ``split`` (the demo runs inference on the test and the val split)."""
    from breakhis_ray.data.manifest import read_manifest
    from breakhis_ray.data.splits import load_splits

    manifest = read_manifest(manifest_uri)
    splits = load_splits(splits_uri, manifest)
    test_paths = set(splits.loc[(splits["fold"] == fold) & (splits["split"] == split), "path"])
    rows = manifest[manifest["path"].isin(test_paths)].reset_index(drop=True)
    write_parquet(rows, out_uri)
    return len(rows)


def _seeded(seed: int) -> list[str]:
    """The demo's one ``seed`` as a trainer's weight-init (``train.seed``) and data-order/augmentation
    (``data.seed``) seeds, placed before the user's overrides so that those still win."""
    return [f"train.seed={seed}", f"data.seed={seed}"]


def headline(metrics: dict) -> dict:
    """Balanced accuracy and ROC AUC (images, overall) of an ``evaluate`` result, plus its size."""
    overall = metrics.get("overall") or {}
    return {k: overall.get(k) for k in ("balanced_accuracy", "roc_auc", "n_images", "n_patients") if k in overall}


def score_holdout_cohort(cfg: DemoConfig, classifier: str, out: Path) -> dict:
    """Render a second synthetic cohort with another seed (every patient's latent parameters and pixels drawn
    anew), list it, run the classifier over all of it and evaluate: how the model does on data it has never
    seen from a cohort it has never seen. The same as::

        breakhis-ray synth --out OUT/synthetic --seed S2 --fraction F --size WxH --difficulty D
        breakhis-ray manifest --root OUT/synthetic --out OUT/manifest.parquet
        breakhis-ray infer --input OUT/manifest.parquet --out OUT/predictions --classifier CKPT
        breakhis-ray evaluate --predictions OUT/predictions --manifest OUT/manifest.parquet --out OUT/metrics.json

    No validation predictions of that cohort exist, so the threshold of its accuracy figures is 0.5 (the
    metrics JSON says so); the ROC AUC does not depend on it.
    """
    from breakhis_ray.data.manifest import run_manifest
    from breakhis_ray.data.synthetic import run_synth
    from breakhis_ray.evaluate import run_evaluate
    from breakhis_ray.inference import run_infer

    seed = cfg.seed + 1000 if cfg.holdout_seed is None else cfg.holdout_seed
    run_synth(SynthConfig(out=str(out / "synthetic"), fraction=cfg.holdout_fraction, size=cfg.size, seed=seed,
                          difficulty=cfg.difficulty, masks=False, grid=False, folds_files=False))
    run_manifest(ManifestConfig(root=str(out / "synthetic"), out=str(out / "manifest.parquet")))
    run_infer(load_config(InferConfig, None, [], {
        "input": str(out / "manifest.parquet"), "out": str(out / "predictions"), "classifier": classifier,
        "segmenter": None}))
    metrics = run_evaluate(load_config(EvaluateConfig, None, [], {
        "predictions": str(out / "predictions"), "manifest": str(out / "manifest.parquet"),
        "out": str(out / "metrics.json")}))
    scores = {"seed": seed, **headline(metrics), "metrics": str(out / "metrics.json")}
    log.info("demo: holdout cohort (seed %d, %s images): balanced accuracy %s, ROC AUC %s", seed,
             scores.get("n_images"), scores.get("balanced_accuracy"), scores.get("roc_auc"))
    return scores


def run_demo(cfg: DemoConfig) -> dict:
    from breakhis_ray.data.manifest import run_manifest
    from breakhis_ray.data.shards import run_prepare
    from breakhis_ray.data.splits import run_split
    from breakhis_ray.data.synthetic import run_synth
    from breakhis_ray.evaluate import run_evaluate
    from breakhis_ray.inference import run_infer
    from breakhis_ray.report import run_report
    from breakhis_ray.segmentation.evaluate import RESULT_FILE, run_segment_eval
    from breakhis_ray.train import run_train_segmenter
    from breakhis_ray.train import run_train

    out = Path(cfg.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    write_provenance(str(out), cfg, prefix="demo_")  # demo_config.yaml, demo_versions.json
    stages = _Stages(out)
    ensure_ray(cfg.ray)
    synth_dir, manifest, splits = out / "synthetic", out / "manifest.parquet", out / "splits.parquet"
    prepared, test_manifest = out / "prepared", out / "test_manifest.parquet"
    val_manifest = out / "val_manifest.parquet"

    with stages.stage("synth"):
        run_synth(SynthConfig(out=str(synth_dir), fraction=cfg.fraction, size=cfg.size, seed=cfg.seed,
                              difficulty=cfg.difficulty))
        stages.output("samples_grid", str(synth_dir / "samples_grid.png"))
    with stages.stage("manifest"):
        run_manifest(ManifestConfig(root=str(synth_dir), out=str(manifest)))
    with stages.stage("split"):
        run_split(SplitConfig(manifest=str(manifest), out=str(splits), mode="patient", seed=cfg.seed))
    with stages.stage("prepare"):
        run_prepare(load_config(PrepareConfig, None, [], {
            "root": str(manifest), "out": str(prepared), "splits": str(splits), "enhance.enabled": True}))
    with stages.stage("train"):
        train_cfg = load_config(TrainConfig, cfg.train_config, [
            f"data.shards={prepared}", f"run.storage_path={out / 'train'}", *_seeded(cfg.seed),
            *cfg.train_overrides])
        summary = run_train(train_cfg)
        stages.output("train", summary)
        best = summary["best_metrics"] or {}
        log.info("demo: validation (patient split) accuracy=%s balanced_accuracy=%s at epoch %s",
                 best.get("val_accuracy"), best.get("val_balanced_accuracy"), best.get("epoch"))
    with stages.stage("train-segmenter"):
        seg_cfg = load_config(SegTrainConfig, cfg.segmenter_config, [
            f"data.root={synth_dir}", f"run.storage_path={out / 'segmenter'}", *_seeded(cfg.seed),
            *cfg.segmenter_overrides])
        seg_summary = run_train_segmenter(seg_cfg)
        stages.output("train_segmenter", seg_summary)
    segment_eval = out / "segment_eval"
    with stages.stage("segment-eval"):
        seg_eval = run_segment_eval(SegEvalConfig(
            root=str(synth_dir), out=str(segment_eval), unet_checkpoint=seg_summary["best_checkpoint"],
            split_file=seg_summary["split_file"], magnifications=seg_cfg.data.magnifications,
            max_images=seg_cfg.data.max_images, split=seg_cfg.data.split, mask_root=seg_cfg.data.mask_root,
            mask_suffix=seg_cfg.data.mask_suffix, ray=cfg.ray))
        log.info("demo: nuclei segmentation on held-out patients (Dice / IoU): %s", ", ".join(
            f"{name} {m['dice']:.3f} / {m['iou']:.3f}" for name, m in seg_eval["methods"].items()))
        stages.output("segment_eval", str(segment_eval / RESULT_FILE))
    classifier = summary["best_checkpoint"]
    segmenter = seg_summary["best_checkpoint"] if cfg.infer_segmenter == "unet" else cfg.infer_segmenter
    checkpoints = {"classifier": classifier, "segmenter": segmenter}
    write_json(str(out / "checkpoints.json"), checkpoints)
    with stages.stage("infer"):
        n_test = _test_manifest(str(manifest), str(splits), str(test_manifest))
        log.info("demo: %d test-split images (fold 1, patient-disjoint from training)", n_test)
        run_infer(load_config(InferConfig, None, [], {
            "input": str(test_manifest), "out": str(out / "predictions"), "classifier": classifier,
            "segmenter": segmenter}))
        # the validation split too: evaluate locks its decision threshold on these, never on the test split
        n_val = _test_manifest(str(manifest), str(splits), str(val_manifest), split="val")
        log.info("demo: %d validation-split images (fold 1), for the decision threshold", n_val)
        run_infer(load_config(InferConfig, None, [], {
            "input": str(val_manifest), "out": str(out / "val_predictions"), "classifier": classifier,
            "segmenter": None}))
    with stages.stage("evaluate"):
        test_metrics = run_evaluate(load_config(EvaluateConfig, None, [], {
            "predictions": str(out / "predictions"), "manifest": str(manifest), "out": str(out / "metrics.json"),
            "splits": str(splits), "fold": [1], "val_predictions": [str(out / "val_predictions")]}))
        stages.output("scores", {"test": headline(test_metrics)})
    if cfg.holdout:
        with stages.stage("holdout"):
            scores = score_holdout_cohort(cfg, classifier, out / "holdout")
            stages.output("scores", {**stages.record["outputs"]["scores"], "holdout": scores})
    with stages.stage("report"):
        run_report(load_config(ReportConfig, None, [], {
            "out": str(out / "report"), "data_source": "synthetic", "protocol": "patient",
            "manifest": str(manifest), "prepare_summary": str(prepared / "prepare.json"),
            "train_runs": [summary["run_dir"]], "metrics": str(out / "metrics.json"),
            "predictions": str(out / "predictions"), "samples_grid": str(synth_dir / "samples_grid.png"),
            "segmentation": str(segment_eval / RESULT_FILE),
            "configs": [str(out / "demo_config.yaml"), cfg.train_config, cfg.segmenter_config]}))
        stages.output("report", str(out / "report" / "report.html"))

    log.info("=== demo: outputs ===")
    for key, path in [("synthetic tree", synth_dir), ("samples grid", synth_dir / "samples_grid.png"),
                      ("manifest", manifest), ("splits", splits), ("shards", prepared / "shards"),
                      ("training run", summary["run_dir"]), ("U-Net run", seg_summary["run_dir"]),
                      ("segmentation", segment_eval), ("checkpoints", out / "checkpoints.json"),
                      ("predictions", out / "predictions"), ("metrics", out / "metrics.json"),
                      *([("holdout", out / "holdout" / "metrics.json")] if cfg.holdout else []),
                      ("report", out / "report" / "report.html")]:
        log.info("  %-15s %s", key, path)
    log.info("  %-15s %s  (%.0f s in all)", "timings", out / "demo.json", sum(stages.record["stages"].values()))
    return stages.record
