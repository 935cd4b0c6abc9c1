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


def _test_manifest(manifest_uri: str, splits_uri: str, out_uri: str, fold: int = 1) -> int:
    """The manifest rows of ``fold``'s test split (what the demo runs inference on)."""
    from breakhis_ray.data.manifest import read_manifest
    from breakhis_ray.data.splits import load_splits

    manifest = read_manifest(manifest_uri)
    splits = load_splits(splits_uri, manifest)
    test_paths = set(splits.loc[(splits["fold"] == fold) & (splits["split"] == "test"), "path"])
    rows = manifest[manifest["path"].isin(test_paths)].reset_index(drop=True)
    write_parquet(rows, out_uri)
    return len(rows)


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
            f"data.shards={prepared}", f"run.storage_path={out / 'train'}", *cfg.train_overrides])
        summary = run_train(train_cfg)
        stages.output("train", summary)
        best = summary["best_metrics"] or {}
        log.info("demo: validation (patient split) accuracy=%s balanced_accuracy=%s at epoch %s",
                 best.get("val_accuracy"), best.get("val_balanced_accuracy"), best.get("epoch"))
    with stages.stage("train-segmenter"):
        seg_cfg = load_config(SegTrainConfig, cfg.segmenter_config, [
            f"data.root={synth_dir}", f"run.storage_path={out / 'segmenter'}", *cfg.segmenter_overrides])
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
    with stages.stage("evaluate"):
        run_evaluate(load_config(EvaluateConfig, None, [], {
            "predictions": str(out / "predictions"), "manifest": str(manifest), "out": str(out / "metrics.json"),
            "splits": str(splits), "fold": [1]}))
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
                      ("report", out / "report" / "report.html")]:
        log.info("  %-15s %s", key, path)
    log.info("  %-15s %s  (%.0f s in all)", "timings", out / "demo.json", sum(stages.record["stages"].values()))
    return stages.record
