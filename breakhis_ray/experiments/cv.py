"""``breakhis-ray cv``: k-fold cross-validation under one evaluation protocol, as one command.

Stages (the grid's own machinery: :mod:`.stages`, :mod:`.plan`, :mod:`.trial`, :mod:`.tuning`)::

    synthetic tree (optional) -> manifest -> the split (split.mode) -> prepared shards per fold
      -> trials: one per fold (MI*: magnification-independent) or per fold and magnification (MS*)
      -> Ray Tune over the pending trials: each trains with Ray Train (run_train), predicts its fold's test
         images (of its magnifications) with its own checkpoint and records <out>/trials/<trial id>.json
      -> per fold: the fold's predictions evaluated together (evaluate_predictions)
      -> <out>/oof_predictions.parquet, <out>/summary.json, <out>/summary.md

``summary.json``: ``protocol``, ``task``, ``magnification_mode``, ``split``, ``classes``, ``folds`` (one entry
per fold: its trials, ``metrics`` (the numbers of ``overall``, flattened), ``overall``, ``per_magnification``,
``counts``), ``mean``, ``std`` (sample, over folds), ``ci95`` (Student's t over folds, ``[lo, hi]`` per
metric, ``ci95_method``), ``pooled`` (``evaluate`` of all out-of-fold predictions, with its own intervals) and
the output URIs. Every metric is on each fold's test images, predicted by a model that never saw them (nor,
under the patient split, their patients).

Resume: a trial with a record is finished; re-running with the same ``out`` trains only the others (a trial
killed mid-training resumes from its last checkpoint) and rewrites the summary from every record.
"""

from __future__ import annotations

import logging
import time

from breakhis_ray import storage
from breakhis_ray.artifacts import table_bytes, write_atomic, write_json, write_provenance
from breakhis_ray.config import CVConfig, TrainConfig, load_config, validate_config
from breakhis_ray.domain import MAGNIFICATIONS, task_classes
from breakhis_ray.errors import BreakhisError, ConfigError, DataError
from breakhis_ray.experiments.cv_summary import CI_METHOD, flat_metrics, fold_statistics, format_summary
from breakhis_ray.experiments.plan import (
    STATE_DIR,
    GridInputs,
    absolute_paths,
    finish_train,
    prepared_uri,
    trial_id_for,
    trial_spec,
)
from breakhis_ray.experiments.results import finished_trials

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"
SUMMARY_MD = "summary.md"
OOF_FILE = "oof_predictions.parquet"


# ------------------------------------------------------------------------------------------- plan
def magnification_groups(cfg: CVConfig) -> list[list[int]]:
    """The magnifications each model of a fold trains and is scored on (one group per model)."""
    if cfg.magnification_mode == "specific":
        return [[m] for m in cfg.magnifications]
    return [list(cfg.magnifications)]


def _mags_override(mags: list[int]) -> str:
    value = "all" if sorted(mags) == list(MAGNIFICATIONS) else "[" + ",".join(str(m) for m in mags) + "]"
    return f"data.magnifications={value}"


def plan_cv(cfg: CVConfig, inputs: GridInputs) -> list[dict]:
    """One Tune trial spec per fold (and magnification, for MS*); every TrainConfig resolved and validated."""
    from breakhis_ray.models import CLASSIFIER_NAMES

    specs = []
    mode = cfg.split.mode
    for fold in cfg.fold_list:
        prepared = inputs.prepared[(mode, fold)]
        for mags in magnification_groups(cfg):
            train = load_config(TrainConfig, cfg.base_train_config,
                                [*cfg.base_overrides, f"task={cfg.task}", _mags_override(mags),
                                 f"data.shards={prepared}"])
            if train.model.name not in CLASSIFIER_NAMES:
                raise ConfigError(f"unknown model {train.model.name!r}; choose from {', '.join(CLASSIFIER_NAMES)}")
            trial_id = trial_id_for(train, mode, fold)
            spec = trial_spec(cfg, finish_train(cfg, train, trial_id), trial_id, mode, fold, prepared)
            spec["cv_magnifications"] = list(mags)
            specs.append(spec)
    return specs


# ----------------------------------------------------------------------------------------- driver
def _absolute(cfg: CVConfig) -> CVConfig:
    """Local paths made absolute: Ray Tune runs each trial in its own working directory."""
    return validate_config(CVConfig, absolute_paths(cfg))


def _with_task_balance(cfg: CVConfig) -> CVConfig:
    """The subtype task's enhancement balances the eight subtypes unless ``prepare_overrides`` say otherwise."""
    overrides = list(cfg.prepare_overrides)
    if cfg.task == "subtype" and not any(o.split("=", 1)[0].strip() == "enhance.balance" for o in overrides):
        overrides.append("enhance.balance=subtype")
    return cfg.model_copy(update={"prepare_overrides": overrides})


def _check_before_work(cfg: CVConfig) -> None:
    """A missing root, a bad override or a refused resume fail before any data stage or Ray work."""
    if cfg.synthetic is None and not storage.exists(cfg.tree_root):
        raise DataError(f"root not found: {cfg.tree_root}")
    plan_cv(cfg, GridInputs(manifest="", prepared={(cfg.split.mode, f): prepared_uri(cfg, cfg.split.mode, f)
                                                   for f in cfg.fold_list}))
    done = finished_trials(cfg.out)
    if not cfg.resume and (done or storage.exists(storage.join(cfg.out, STATE_DIR))):
        raise ConfigError(f"{cfg.out} already holds a cross-validation ({len(done)} finished trial(s)): set "
                          "resume=true to continue it, or use a new out")


def run_cv(cfg: CVConfig) -> dict:
    """CLI stage: data stages, one trial per fold (x magnification), Ray Tune over the pending ones, then the
    out-of-fold predictions and ``summary.json``; returns the summary."""
    from breakhis_ray.experiments.stages import prepare_folds
    from breakhis_ray.experiments.tuning import run_tune
    from breakhis_ray.ray_utils import ensure_ray

    cfg = _absolute(cfg)
    _check_before_work(cfg)
    write_provenance(cfg.out, cfg)
    ensure_ray(cfg.ray)
    inputs = prepare_folds(_with_task_balance(cfg), [cfg.split.mode], cfg.fold_list)
    specs = plan_cv(cfg, inputs)
    done = finished_trials(cfg.out)
    pending = [s for s in specs if s["trial_id"] not in done]
    folds_done = sorted({s["fold"] for s in specs} - {s["fold"] for s in pending})
    log.info("cv: %s (%s, magnification-%s), %s split, folds %s: %d trial(s), %d finished earlier (folds %s "
             "complete), %d to run", cfg.protocol, cfg.task, cfg.magnification_mode, cfg.split.mode, cfg.fold_list,
             len(specs), len(specs) - len(pending), folds_done or "none", len(pending))
    start = time.perf_counter()
    errors = run_tune(cfg, pending) if pending else []
    if errors:
        listed = "; ".join(f"{tid}: {msg}" for tid, msg in errors[:3])
        raise BreakhisError(f"{len(errors)} of {len(pending)} cross-validation trial(s) failed ({listed}); re-run "
                            "with the same out to retry only those")
    summary = summarise_cv(cfg, inputs, specs)
    summary["ran"] = [s["trial_id"] for s in pending]
    summary["seconds"] = round(time.perf_counter() - start, 1)
    log.info("%s", format_summary(summary).rstrip("\n"))
    log.info("cv: %d fold(s), %d trial(s) run now (%.0f s); summary: %s", len(summary["folds"]), len(pending),
             summary["seconds"], summary["summary"])
    return summary


# ---------------------------------------------------------------------------------------- summary
def _read_table(uri: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)))


def _json_safe(obj):
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj


def summarise_cv(cfg: CVConfig, inputs: GridInputs, specs: list[dict]) -> dict:
    """Evaluate each fold's out-of-fold predictions, pool them, write the outputs; the summary dict."""
    import json

    import pandas as pd
    import pyarrow as pa

    from breakhis_ray.data.manifest import read_manifest
    from breakhis_ray.data.splits import load_splits
    from breakhis_ray.evaluate import PROTOCOL_NOTES, evaluate_predictions

    mode = cfg.split.mode
    first = inputs.prepared[(mode, cfg.fold_list[0])]
    manifest = read_manifest(storage.join(first, "manifest.parquet"))
    splits = load_splits(storage.join(first, "splits.parquet"), manifest)
    in_mags = set(manifest.loc[manifest["magnification"].astype(int).isin(cfg.magnifications), "path"])
    folds, tables, test_paths = [], [], []
    for fold in cfg.fold_list:
        fold_specs = [s for s in specs if s["fold"] == fold]
        parts = []
        for spec in fold_specs:
            table = _read_table(spec["predictions"])
            n = table.num_rows
            table = table.append_column("fold", pa.array([fold] * n, pa.int16()))
            parts.append(table.append_column("trial_id", pa.array([spec["trial_id"]] * n, pa.string())))
        fold_table = pa.concat_tables(parts)
        tables.append(fold_table)
        wanted = splits.loc[(splits["fold"] == fold) & (splits["split"] == "test"), "path"]
        wanted = wanted[wanted.isin(in_mags)]
        test_paths.append(wanted)
        result = evaluate_predictions(fold_table.to_pandas(), manifest, eval_paths=wanted)
        records = [json.loads(storage.read_text(s["record"])) for s in fold_specs]
        folds.append({
            "fold": fold,
            "trials": [s["trial_id"] for s in fold_specs],
            "magnifications": [s["cv_magnifications"] for s in fold_specs],
            "checkpoints": [r["checkpoint"] for r in records],
            "metrics": flat_metrics(result["overall"]),
            "overall": result["overall"],
            "per_magnification": result["per_magnification"],
            "counts": result["counts"],
        })
    oof = pa.concat_tables(tables)
    oof_uri = storage.join(cfg.out, OOF_FILE)
    write_atomic(oof_uri, table_bytes(oof))
    pooled = evaluate_predictions(oof.to_pandas(), manifest, eval_paths=pd.concat(test_paths))
    stats = fold_statistics([f["metrics"] for f in folds])
    summary = _json_safe({
        "protocol": cfg.protocol,
        "task": cfg.task,
        "magnification_mode": cfg.magnification_mode,
        "magnifications": list(cfg.magnifications),
        "split": mode,
        "split_note": PROTOCOL_NOTES.get(mode),
        "classes": list(task_classes(cfg.task)),
        "n_folds": len(folds),
        "folds": folds,
        "mean": stats["mean"],
        "std": stats["std"],
        "ci95": stats["ci95"],
        "ci95_method": CI_METHOD,
        "n": stats["n"],
        "pooled": {k: pooled[k] for k in ("overall", "per_magnification", "counts") if k in pooled},
        "oof_predictions": oof_uri,
        "summary": storage.join(cfg.out, SUMMARY_FILE),
        "out": cfg.out,
    })
    write_json(summary["summary"], summary)
    write_atomic(storage.join(cfg.out, SUMMARY_MD), format_summary(summary).encode())
    return summary


def read_summary(out: str) -> dict:
    """``<out>/summary.json`` of a finished cross-validation."""
    import json

    uri = storage.join(out, SUMMARY_FILE)
    if not storage.exists(uri):
        raise DataError(f"no cross-validation summary at {uri} (run `breakhis-ray cv --out {out}` first)")
    return json.loads(storage.read_text(uri))


def side_by_side(outs: dict[str, str]) -> str:
    """Markdown table of several cross-validations (``{column label: out}``), one column each."""
    from breakhis_ray.experiments.cv_summary import format_side_by_side

    return format_side_by_side({label: read_summary(out) for label, out in outs.items()})


__all__ = ["magnification_groups", "plan_cv", "read_summary", "run_cv", "side_by_side", "summarise_cv"]