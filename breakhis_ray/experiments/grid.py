"""``breakhis-ray experiments`` driver: checks, data stages, trial plan, Ray Tune over the pending trials, then
the tables from every record."""

from __future__ import annotations

import logging
import time

from breakhis_ray import storage
from breakhis_ray.artifacts import write_provenance
from breakhis_ray.config import ExperimentsConfig, validate_config
from breakhis_ray.errors import BreakhisError, ConfigError, DataError
from breakhis_ray.experiments.plan import STATE_DIR, GridInputs, absolute_paths, plan_trials, prepared_uri
from breakhis_ray.experiments.results import finished_trials, format_tables, grid_rows, write_outputs
from breakhis_ray.experiments.stages import prepare_inputs
from breakhis_ray.experiments.tuning import run_tune

log = logging.getLogger(__name__)


def _check_resume(cfg: ExperimentsConfig, done: set[str]) -> None:
    if not cfg.resume and (done or storage.exists(storage.join(cfg.out, STATE_DIR))):
        raise ConfigError(f"{cfg.out} already holds a grid ({len(done)} finished trial(s)): set resume=true to "
                          "continue it, or use a new out")


def _absolute(cfg: ExperimentsConfig) -> ExperimentsConfig:
    """Local paths made absolute: Ray Tune runs each trial in its own working directory."""
    data = absolute_paths(cfg)
    if cfg.segmenter.checkpoint and "://" not in cfg.segmenter.checkpoint:
        data["segmenter"]["checkpoint"] = storage.join(cfg.segmenter.checkpoint)
    return validate_config(ExperimentsConfig, data)


def _check_before_work(cfg: ExperimentsConfig) -> None:
    """Fail on a missing root or a bad table setting before any data stage or Ray work starts."""
    if cfg.synthetic is None and not storage.exists(cfg.tree_root):
        raise DataError(f"root not found: {cfg.tree_root}")
    unet = cfg.segmenter.checkpoint or storage.join(cfg.out, "segmenter", "<trained by the grid>")
    plan_trials(cfg, GridInputs(manifest="", unet_checkpoint=unet, prepared={
        (p, f): prepared_uri(cfg, p, f) for p in cfg.protocols for f in cfg.folds}))
    _check_resume(cfg, finished_trials(cfg.out))


def run_experiments(cfg: ExperimentsConfig) -> dict:
    """CLI stage: data stages, trial plan, Ray Tune over the pending trials, then the tables from every record."""
    from breakhis_ray.ray_utils import ensure_ray

    cfg = _absolute(cfg)
    _check_before_work(cfg)
    write_provenance(cfg.out, cfg)
    ensure_ray(cfg.ray)
    inputs = prepare_inputs(cfg)
    cells, specs = plan_trials(cfg, inputs)
    done = finished_trials(cfg.out)
    pending = [s for s in specs if s["trial_id"] not in done]
    log.info("experiments: %d table cells -> %d trials over protocols %s and folds %s: %d finished earlier, "
             "%d to run (at most %d at a time)", len(cells), len(specs), cfg.protocols, cfg.folds,
             len(specs) - len(pending), len(pending), cfg.max_concurrent_trials)
    start = time.perf_counter()
    errors = run_tune(cfg, pending) if pending else []
    rows = grid_rows(cfg, cells)
    tables = format_tables(rows, cfg.protocols)
    uris = write_outputs(cfg, inputs, rows, tables)
    log.info("%s", tables.rstrip("\n"))
    log.info("experiments: %d of %d rows in %s (%.0f s for %d trial(s)); report: breakhis-ray report --config %s",
             len(rows), len(cells), uris["grid.json"], time.perf_counter() - start, len(pending), uris["report.yaml"])
    if errors:
        listed = "; ".join(f"{tid}: {msg}" for tid, msg in errors[:3])
        raise BreakhisError(f"{len(errors)} of {len(pending)} trial(s) failed ({listed}); re-run with the same "
                            f"out to retry only those")
    return {"out": cfg.out, "cells": len(cells), "trials": [s["trial_id"] for s in specs],
            "ran": [s["trial_id"] for s in pending], "rows": len(rows), **uris}

