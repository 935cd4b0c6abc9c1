"""``breakhis-ray`` console script: one subcommand per stage.

Every subcommand takes ``--config FILE`` and trailing ``key.sub=value`` overrides; flags are shorthands
for config keys. Bad input prints one line (``error: ...``) and exits 2. Heavy modules are imported
only when their subcommand runs.

Logging: library modules log through ``logging.getLogger(__name__)``; the CLI sends the ``breakhis_ray``
loggers' records at ``--log-level`` (else ``$BREAKHIS_LOG_LEVEL``, else INFO) to stdout as plain text, which
is where the stage summaries a person reads appear. Other libraries' loggers stay at Python's default
(WARNING). Errors for a person (``error: ...``) go to stderr.

Relative local paths, given or defaulted (``demo --out`` is ``runs/demo``, ``bench --json`` is
``runs/bench/bench.json``), are relative to the directory the command runs in.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass, field

from breakhis_ray.errors import BreakhisError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_LEVEL_ENV = "BREAKHIS_LOG_LEVEL"
PACKAGE_LOGGER = "breakhis_ray"


@dataclass(frozen=True)
class Flag:
    name: str  # e.g. "--out"
    key: str  # config key it sets, dotted
    help: str
    type: type = str
    choices: tuple | None = None


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    config: str  # class name in breakhis_ray.config
    target: str  # "module:function" taking the validated config
    flags: tuple[Flag, ...] = field(default_factory=tuple)


COMMANDS: tuple[Command, ...] = (
    Command(
        "synth",
        "generate a synthetic BreakHis tree (PNG tiles, masks, dsfold files) with Ray tasks",
        "SynthConfig",
        "breakhis_ray.data.synthetic:run_synth",
        (
            Flag("--out", "out", "destination URI (local path or s3://bucket/prefix)"),
            Flag("--fraction", "fraction", "share of each patient's images to generate (0, 1]", float),
            Flag("--patients", "patients", "number of patient folders (keeps every subtype)", int),
            Flag("--size", "size", "image size WxH (default 700x460)"),
            Flag("--seed", "seed", "random seed (generation is deterministic for a seed)", int),
            Flag("--difficulty", "difficulty", "0 (easy) .. 1 (hard) class separation", float),
        ),
    ),
    Command(
        "manifest",
        "walk a BreakHis tree (local or s3://) and write one Parquet row per image",
        "ManifestConfig",
        "breakhis_ray.data.manifest:run_manifest",
        (
            Flag("--root", "root", "BreakHis tree URI (histology_slides/breast is found anywhere below)"),
            Flag("--out", "out", "output manifest Parquet file"),
        ),
    ),
    Command(
        "split",
        "assign every image to train/val/test per fold (patient-disjoint by default)",
        "SplitConfig",
        "breakhis_ray.data.splits:run_split",
        (
            Flag("--manifest", "manifest", "manifest Parquet written by `manifest`"),
            Flag("--out", "out", "output splits Parquet (path, fold, split)"),
            Flag("--mode", "mode", "patient (default), official (dsfold/Folds.csv) or image (leaky)",
                 choices=("patient", "official", "image")),
            Flag("--folds", "folds", "number of folds", int),
            Flag("--patient-key", "patient_key", "group patients by folder or slide number",
                 choices=("folder", "slide")),
            Flag("--folds-file", "folds_file", "dsfoldN.txt or Folds.csv for --mode official"),
        ),
    ),
    Command(
        "prepare",
        "decode, check and write Parquet shards (+ rejects, + offline augmentation) from a tree or manifest",
        "PrepareConfig",
        "breakhis_ray.data.shards:run_prepare",
        (
            Flag("--root", "root", "BreakHis tree URI or manifest Parquet"),
            Flag("--out", "out", "destination URI for shards, rejects and the manifest/splits used"),
        ),
    ),
    Command(
        "train",
        "train a classifier with Ray Train (TorchTrainer, DDP, checkpoints, resume)",
        "TrainConfig",
        "breakhis_ray.train.classifier:run_train",
    ),
    Command(
        "train-segmenter",
        "train a U-Net segmenter with Ray Train on ground-truth, user or pseudo-label masks",
        "SegTrainConfig",
        "breakhis_ray.train.segmenter:run_train_segmenter",
    ),
    Command(
        "segment-eval",
        "compare threshold, watershed and U-Net (Dice, IoU) on images with ground-truth masks",
        "SegEvalConfig",
        "breakhis_ray.segmentation.evaluate:run_segment_eval",
    ),
    Command(
        "infer",
        "batch inference (U-Net + classifier) with Ray Data: one Parquet row per input image",
        "InferConfig",
        "breakhis_ray.inference:run_infer",
        (
            Flag("--input", "input", "image tree, s3:// prefix, Parquet shards or manifest"),
            Flag("--out", "out", "output URI for the prediction Parquet"),
            Flag("--classifier", "classifier", "classifier checkpoint directory (local or s3://)"),
            Flag("--segmenter", "segmenter", "U-Net checkpoint directory, or threshold | watershed"),
            Flag("--explain", "explain.method", "class-activation heatmaps beside every prediction",
                 choices=("gradcam", "gradcam++")),
        ),
    ),
    Command(
        "export",
        "export a classifier checkpoint as TorchScript or ONNX (uint8 NHWC input, normalisation inside)",
        "ExportConfig",
        "breakhis_ray.export:run_export",
        (
            Flag("--checkpoint", "checkpoint", "classifier checkpoint directory (local or s3://)"),
            Flag("--format", "format", "torchscript or onnx", choices=("torchscript", "onnx")),
            Flag("--out", "out", "output file (local or s3://); FILE.json beside it holds the input contract"),
        ),
    ),
    Command(
        "evaluate",
        "metrics (image/patient level, per magnification) from predictions joined with the manifest",
        "EvaluateConfig",
        "breakhis_ray.evaluate:run_evaluate",
        (
            Flag("--predictions", "predictions", "prediction Parquet written by `infer`"),
            Flag("--manifest", "manifest", "manifest Parquet with the labels"),
            Flag("--out", "out", "metrics JSON file"),
        ),
    ),
    Command(
        "experiments",
        "experiment grid reproducing the papers' tables (Ray Tune over the Ray Train trainer)",
        "ExperimentsConfig",
        "breakhis_ray.experiments:run_experiments",
    ),
    Command(
        "cv",
        "cross-validation: every fold of a split under protocol MSB|MIB|MSM|MIM (Ray Tune over Ray Train), "
        "out-of-fold predictions and summary.json (mean, std, 95-percent intervals)",
        "CVConfig",
        "breakhis_ray.experiments.cv:run_cv",
        (
            Flag("--out", "out", "output directory: summary.json, summary.md, oof_predictions.parquet"),
            Flag("--protocol", "protocol", "binary (MSB, MIB) or subtype (MSM, MIM); MS*: one model per "
                 "magnification", choices=("MSB", "MIB", "MSM", "MIM")),
        ),
    ),
    Command(
        "report",
        "write a self-contained HTML report (tables, curves, confusion matrices, ROC, overlays)",
        "ReportConfig",
        "breakhis_ray.report:run_report",
        (Flag("--out", "out", "output directory for report.html and its PNGs"),),
    ),
    Command(
        "bench",
        "benchmarks: ratios against baselines and the hardware limit, side by side in one run",
        "BenchConfig",
        "breakhis_ray.bench:run_bench",
        (
            Flag("--json", "json_out", "write the results as JSON to this file (default runs/bench/bench.json, "
                 "under the current directory)"),
        ),
    ),
    Command(
        "demo",
        "the whole pipeline on a small synthetic BreakHis with a local Ray (outputs under runs/demo/)",
        "DemoConfig",
        "breakhis_ray.demo:run_demo",
        (Flag("--out", "out", "output directory (default runs/demo, under the current directory)"),),
    ),
)


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a single ``error:`` line and exits 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="breakhis-ray",
        description="Ray-native BreakHis histopathology: synthetic data, shards, training, "
        "segmentation, batch inference, evaluation and reports.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.help + ". Flags are shorthands for config keys; any key can be set as key.sub=value.",
        )
        p.add_argument("--config", help="YAML config file (defaults < file < flags < overrides)")
        p.add_argument("--log-level", dest="log_level", type=str.upper, choices=LOG_LEVELS,
                       help=f"level of this package's log lines on stdout (default: ${LOG_LEVEL_ENV} or INFO)")
        for flag in cmd.flags:
            p.add_argument(flag.name, dest=flag.key.replace(".", "__"), type=flag.type, choices=flag.choices,
                           help=f"{flag.help} [config key: {flag.key}]")
        if cmd.name == "bench":
            p.add_argument("--quick", dest="quick", action="store_const", const=True,
                           help="small sizes, about 5 minutes on 2 CPU cores [config key: quick]")
            p.add_argument("--gpu", dest="gpu__enabled", action="store_const", const=True,
                           help="the one-shot GPU check instead (a smoke run on CPU); JSON to "
                           "runs/bench/gpu_check.json unless --json [config key: gpu.enabled]")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    return parser


class _StdoutHandler(logging.StreamHandler):
    """Plain ``%(message)s`` lines on the *current* ``sys.stdout`` (looked up per record, so a redirection
    made after set-up, such as pytest's capture, receives them)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def log_level(flag: str | None) -> str:
    """The level to use: ``flag``, else ``$BREAKHIS_LOG_LEVEL``, else INFO; a bad value is a one-line error."""
    level = (flag or os.environ.get(LOG_LEVEL_ENV) or "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise BreakhisError(f"{LOG_LEVEL_ENV}={level!r} is not a log level: choose from {', '.join(LOG_LEVELS)}")
    return level


def configure_logging(level: str = "INFO") -> logging.Handler:
    """Send this package's log records at ``level`` and above to stdout as plain text.

    The handler sits on the root logger (records of every logger that propagates reach it), filtered at
    ``level``; the ``breakhis_ray`` logger is set to ``level``. Other loggers keep their own levels (the root
    logger's default is WARNING). Calling it again replaces the handler it installed before.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdoutHandler)]:
        root.removeHandler(handler)
    handler = _StdoutHandler()
    handler.setLevel(level)
    root.addHandler(handler)
    logging.getLogger(PACKAGE_LOGGER).setLevel(level)
    return handler


def run_command(name: str, config_path: str | None, values: dict, overrides: list[str]):
    """Validate the config for ``name`` and call its target; returns the target's result."""
    from breakhis_ray import config as config_module

    cmd = next(c for c in COMMANDS if c.name == name)
    cls = getattr(config_module, cmd.config)
    cfg = config_module.load_config(cls, config_path, overrides, values)
    module_name, func_name = cmd.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return func(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    values = {
        key.replace("__", "."): value
        for key, value in vars(args).items()
        if key not in ("command", "config", "overrides", "log_level") and value is not None
    }
    try:
        configure_logging(log_level(args.log_level))
        run_command(args.command, args.config, values, args.overrides)
    except BreakhisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
