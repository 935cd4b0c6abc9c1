"""Ray Tune over the pending trials: one trial per trial id, ``max_concurrent_trials`` at a time (lowered when
the trials' held CPUs would leave none for their Ray Data tasks)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from breakhis_ray import storage, tracking
from breakhis_ray.config import ExperimentsConfig, TrainConfig, dump_config, validate_config
from breakhis_ray.data.cpu_share import decode_task_cpus
from breakhis_ray.experiments.trial import run_trial

log = logging.getLogger(__name__)


def _trial_name(trial) -> str:
    return trial.config["trial_id"]


def _error_line(error: BaseException) -> str:
    """The raised exception's own message: the last line of a (Ray-wrapped) error."""
    text = str(error).strip()
    return text.splitlines()[-1][:300] if text else type(error).__name__


def _trial_cpus(cfg: ExperimentsConfig, spec: dict, cluster_cpus: float) -> tuple[float, float]:
    """(CPUs a training trial holds: its driver + its Train workers; the largest single Ray Data or
    scoring task it starts)."""
    train = validate_config(TrainConfig, spec["train"])
    held = cfg.trial_cpus + train.scaling.num_workers * train.scaling.cpus_per_worker
    tasks = [decode_task_cpus(train.data.decode_num_cpus, cluster_cpus), train.data.augment.num_cpus, cfg.scoring.num_cpus]
    if train.guidance.method != "none":
        tasks.append(train.guidance.num_cpus)
    return held, max(tasks)


def concurrency(cfg: ExperimentsConfig, specs: list[dict], cluster_cpus: float) -> int:
    """``max_concurrent_trials``, lowered so that trials holding their CPUs still leave room for one Ray Data
    or scoring task: Train workers whose input tasks cannot be scheduled wait forever."""
    held, task = (max(v) for v in zip(*(_trial_cpus(cfg, s, cluster_cpus) for s in specs)))
    fits = int((cluster_cpus - task) // held) if held > 0 else cfg.max_concurrent_trials
    return max(1, min(cfg.max_concurrent_trials, fits))


def run_tune(cfg: ExperimentsConfig, specs: list[dict]) -> list[tuple[str, str]]:
    """One Ray Tune trial per spec, ``max_concurrent_trials`` at a time; returns ``(trial id, error)`` pairs."""
    import ray
    from ray import tune

    cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
    n = concurrency(cfg, specs, cluster_cpus)
    if n < cfg.max_concurrent_trials:
        log.warning("experiments: running %d trial(s) at a time, not max_concurrent_trials=%d: the cluster's "
                    "%g CPUs leave no room for the trials' Ray Data tasks beyond that", n,
                    cfg.max_concurrent_trials, cluster_cpus)

    fs, path = storage.resolve(storage.join(cfg.out, "tune"))
    name = f"grid-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    # MLflow (tracking.mlflow_uri): one parent run per output, every trial's training run a child of it
    section = getattr(cfg, "tracking", None)
    parent = tracking.start_parent_run(section, cfg.out, f"{type(cfg).__name__.removesuffix('Config').lower()} "
                                       f"{storage.join(cfg.out)}", params=dump_config(cfg))
    specs = tracking.nest_trials(specs, section, parent)
    trainable = tune.with_parameters(run_trial, specs={s["trial_id"]: s for s in specs})
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": cfg.trial_cpus}),
        param_space={"trial_id": tune.grid_search([s["trial_id"] for s in specs])},
        tune_config=tune.TuneConfig(max_concurrent_trials=n, reuse_actors=True,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=cfg.trial_retries)),
    )
    try:
        results = tuner.fit()
    except BaseException:
        tracking.finish_parent_run(parent, failed=True)
        raise
    errors = [(r.config["trial_id"], _error_line(r.error)) for r in results if r.error]
    tracking.finish_parent_run(parent, failed=bool(errors))
    return errors
