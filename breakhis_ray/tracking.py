"""Experiment tracking: MLflow runs through Ray's MLflow integration, and TensorBoard event files.

Configured by :class:`~breakhis_ray.config.TrackingSection` (``tracking.*`` of ``train``, ``experiments`` and
``evaluate``); off unless ``tracking.mlflow_uri`` is set. ``import mlflow`` happens only when it is.

* **One MLflow run per training run.** The driver (:func:`start_training_run`) creates the run (or finds it
  again: ``<run_dir>/tracking.json`` records it, so a resumed or re-run training continues the same MLflow run),
  logs the resolved config as ``config.yaml``, and at the end the best checkpoint (``best_checkpoint/``),
  ``history.json`` and ``result.json``, then marks the run finished (failed on error).
* **Per-epoch metrics from rank 0** (:class:`EpochTracker`, inside the Ray Train loop): rank 0 re-attaches the
  driver's run and calls :func:`ray.air.integrations.mlflow.setup_mlflow`, which logs the flattened config as
  params; every epoch's reported metrics are logged with ``step = epoch``. Other ranks log nothing.
  ``tracking.tensorboard`` also writes the same scalars with ``torch.utils.tensorboard.SummaryWriter`` to
  ``<run_dir>/tensorboard``.
* **Trials of a Tune grid** (:func:`start_parent_run` + :func:`nest_trials`): one parent run per grid output
  (``<out>/tracking.json``), every trial's training run tagged ``mlflow.parentRunId`` (a child run), and the
  trial's test scores logged into its child run (:func:`log_trial_scores`).
* **Evaluation** (:func:`log_evaluation`): the metrics JSON becomes an artifact of the run that trained the
  predictions' checkpoint (found through the checkpoint's run directory), ``tracking.run_id``, or a new run.

``tracking.mlflow_uri=local`` means a SQLite store ``mlflow.db`` and artifacts ``mlartifacts/`` under the run
directory (the grid's ``out``); MLflow's plain-file store is in maintenance mode and refused by MLflow 3.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

from breakhis_ray import storage
from breakhis_ray.artifacts import config_text, write_json
from breakhis_ray.errors import ConfigError, StorageError

if TYPE_CHECKING:  # pragma: no cover
    from breakhis_ray.config import TrackingSection

log = logging.getLogger(__name__)
TRACKING_FILE = "tracking.json"
LOCAL = "local"
PARENT_TAG = "mlflow.parentRunId"
_PARAM_VALUE_MAX = 6000


def enabled(section: "TrackingSection | None") -> bool:
    return bool(section is not None and section.mlflow_uri)


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise ConfigError("tracking.mlflow_uri needs mlflow: pip install 'breakhis-ray[tracking]'") from None
    return mlflow


def _client(uri: str):
    return _mlflow().MlflowClient(tracking_uri=uri)


def resolve_uri(uri: str, base_dir: str) -> tuple[str, str | None]:
    """``(tracking URI, artifact location for a new experiment or None)``; ``local`` -> SQLite under ``base_dir``."""
    if uri != LOCAL:
        return uri, None
    if storage.is_remote(base_dir):
        raise ConfigError(f"tracking.mlflow_uri=local keeps the store under the run directory, which is remote "
                          f"({base_dir}): give an MLflow server URI instead")
    root = os.path.abspath(storage.join(base_dir))
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{root}/mlflow.db", "file://" + os.path.join(root, "mlartifacts")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"section.key": "value"}`` (lists and dicts below a leaf as JSON), as MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_PARAM_VALUE_MAX]
    return out


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers (booleans as 0/1) of a metrics dict."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


@dataclass(frozen=True)
class RunRef:
    """Where an MLflow run lives: tracking URI, experiment id, run id."""

    tracking_uri: str
    experiment_id: str
    run_id: str

    def save(self, uri: str) -> None:
        write_json(uri, asdict(self))

    @classmethod
    def load(cls, uri: str) -> "RunRef | None":
        if not storage.exists(uri):
            return None
        try:
            return cls(**json.loads(storage.read_text(uri)))
        except (ValueError, TypeError) as exc:
            raise StorageError(f"{uri} is not a tracking record ({exc})") from None


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created meanwhile by a concurrent trial
        return client.get_experiment_by_name(name).experiment_id


def _attach_or_create(section: "TrackingSection", base_dir: str, record: str, run_name: str,
                      tags: Mapping[str, str]) -> RunRef:
    """The run recorded in ``record`` when it still exists in the same store, else a new one (recorded)."""
    from mlflow.exceptions import MlflowException

    uri, artifacts = resolve_uri(section.mlflow_uri, base_dir)
    client = _client(uri)
    ref = RunRef.load(record)
    if ref is not None and ref.tracking_uri == uri:
        try:
            client.get_run(ref.run_id)
            client.update_run(ref.run_id, status="RUNNING")
            return ref
        except MlflowException:
            log.warning("tracking: MLflow run %s recorded in %s is gone; starting a new one", ref.run_id, record)
    experiment_id = _experiment_id(client, section.experiment, artifacts)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    ref = RunRef(uri, experiment_id, run.info.run_id)
    ref.save(record)
    return ref


def _log_dir(client, run_id: str, uri: str, artifact_path: str) -> None:
    """Log a storage directory (local or ``s3://``) as artifacts under ``artifact_path``."""
    if not storage.is_remote(uri):
        client.log_artifacts(run_id, storage.join(uri), artifact_path)
        return
    root = uri.rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        for file in storage.list_files(root):
            local = os.path.join(tmp, file[len(root) + 1:])
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as fh:
                fh.write(storage.read_bytes(file))
        client.log_artifacts(run_id, tmp, artifact_path)


def _log_file(client, run_id: str, uri: str, artifact_path: str | None = None) -> None:
    if not storage.exists(uri):
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
        with open(local, "wb") as fh:
            fh.write(storage.read_bytes(uri))
        client.log_artifact(run_id, local, artifact_path)


# ------------------------------------------------------------------------------------ training runs
class TrainingRun:
    """The driver's handle on the MLflow run of one training run (:func:`start_training_run`)."""

    def __init__(self, ref: RunRef, run_dir: str) -> None:
        self.ref = ref
        self.run_dir = run_dir

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Best checkpoint, history and result as artifacts; the run marked finished."""
        client = _client(self.ref.tracking_uri)
        best = summary.get("best_checkpoint") or summary.get("latest_checkpoint")
        if best:
            _log_dir(client, self.ref.run_id, best, "best_checkpoint")
        for name in ("history.json", "result.json"):
            _log_file(client, self.ref.run_id, storage.join(self.run_dir, name))
        client.set_terminated(self.ref.run_id, "FINISHED")
        log.info("tracking: MLflow run %s (%s)", self.ref.run_id, self.ref.tracking_uri)

    def fail(self) -> None:
        _client(self.ref.tracking_uri).set_terminated(self.ref.run_id, "FAILED")


def start_training_run(cfg, run_dir: str) -> TrainingRun | None:
    """Create (or find again) the MLflow run of the training run in ``run_dir``; ``None`` when tracking is off.

    Writes ``<run_dir>/tracking.json`` (which the rank-0 worker reads) and logs ``config.yaml``."""
    section = getattr(cfg, "tracking", None)
    if section is not None and section.tensorboard and storage.is_remote(run_dir):
        raise ConfigError(f"tracking.tensorboard writes event files under the run directory, which is remote "
                          f"({run_dir}): use a local run.storage_path or turn it off")
    if not enabled(section):
        return None
    storage.makedirs(run_dir)
    tags = {"breakhis.run_dir": run_dir, "breakhis.stage": "train"}
    if section.parent_run_id:
        tags[PARENT_TAG] = section.parent_run_id
    ref = _attach_or_create(section, run_dir, storage.join(run_dir, TRACKING_FILE), cfg.run.name, tags)
    _client(ref.tracking_uri).log_text(ref.run_id, config_text(cfg), "config.yaml")
    return TrainingRun(ref, run_dir)


class EpochTracker:
    """Rank 0's per-epoch logger inside the Ray Train loop; a no-op on other ranks and when tracking is off."""

    def __init__(self, mlflow=None, writer=None) -> None:
        self.mlflow = mlflow
        self.writer = writer

    @classmethod
    def open(cls, cfg, rank: int) -> "EpochTracker":
        section = getattr(cfg, "tracking", None)
        if rank != 0 or section is None or not (section.mlflow_uri or section.tensorboard):
            return cls()
        run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
        mlflow = None
        if section.mlflow_uri:
            ref = RunRef.load(storage.join(run_dir, TRACKING_FILE))
            if ref is None:
                raise StorageError(f"tracking is on but {run_dir}/{TRACKING_FILE} is missing (the driver writes "
                                   "it before training starts)")
            mlflow = _attach(ref, cfg)
        writer = None
        if section.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=storage.join(run_dir, "tensorboard"))
        return cls(mlflow, writer)

    def log_epoch(self, metrics: Mapping[str, Any]) -> None:
        values = numeric_metrics(metrics)
        step = int(metrics.get("epoch", 0))
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.writer is not None:
            self.writer.close()


def _attach(ref: RunRef, cfg):
    """Make the driver's run the active run of this process, then Ray's ``setup_mlflow`` logs the params."""
    from ray.air.integrations.mlflow import setup_mlflow

    from breakhis_ray.config import dump_config

    mlflow = _mlflow()
    mlflow.set_tracking_uri(ref.tracking_uri)
    active = mlflow.active_run()
    if active is not None and active.info.run_id != ref.run_id:
        mlflow.end_run()
    if mlflow.active_run() is None:
        mlflow.start_run(run_id=ref.run_id)
    params = flatten(dump_config(cfg))
    logged = mlflow.get_run(ref.run_id).data.params
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if changed:  # MLflow params are immutable: a resumed run with new settings keeps the first values
        log.warning("tracking: params %s changed since the MLflow run started; MLflow keeps the first values",
                    ", ".join(changed[:5]))
    fresh = {k: v for k, v in params.items() if k not in logged}
    return setup_mlflow(config=fresh, tracking_uri=ref.tracking_uri, experiment_id=ref.experiment_id,
                        rank_zero_only=True)


# ------------------------------------------------------------------------------------------- grids
def start_parent_run(section: "TrackingSection | None", out: str, run_name: str,
                     params: Mapping[str, Any] | None = None) -> RunRef | None:
    """The parent run of a Tune grid writing to ``out`` (found again through ``<out>/tracking.json``)."""
    if not enabled(section):
        return None
    ref = _attach_or_create(section, out, storage.join(out, TRACKING_FILE), run_name,
                            {"breakhis.out": out, "breakhis.stage": "grid"})
    if params:
        client = _client(ref.tracking_uri)
        logged = client.get_run(ref.run_id).data.params
        from mlflow.entities import Param

        fresh = [Param(k, v) for k, v in flatten(params).items() if k not in logged]
        for i in range(0, len(fresh), 100):
            client.log_batch(ref.run_id, params=fresh[i:i + 100])
    return ref


def finish_parent_run(ref: RunRef | None, failed: bool) -> None:
    if ref is not None:
        _client(ref.tracking_uri).set_terminated(ref.run_id, "FAILED" if failed else "FINISHED")


def nest_trials(specs: list[dict], section: "TrackingSection", parent: RunRef | None) -> list[dict]:
    """Trial specs whose training configs log child runs of ``parent`` (unchanged when ``parent`` is None)."""
    if parent is None:
        return specs
    tracking = {"mlflow_uri": parent.tracking_uri, "experiment": section.experiment,
                "tensorboard": section.tensorboard, "parent_run_id": parent.run_id, "run_id": None}
    return [{**spec, "train": {**spec["train"], "tracking": tracking}} for spec in specs]


def log_trial_scores(run_dir: str, scores: Mapping[str, Any], prefix: str = "test_") -> None:
    """A trial's test scores (``overall`` numbers) into its training run's MLflow run, when it has one."""
    ref = RunRef.load(storage.join(run_dir, TRACKING_FILE))
    if ref is None:
        return
    client = _client(ref.tracking_uri)
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    values = numeric_metrics(scores)
    client.log_batch(ref.run_id, metrics=[Metric(prefix + k, v, stamp, 0) for k, v in values.items()])


# -------------------------------------------------------------------------------------- evaluation
def _training_run_of(checkpoints: list[str]) -> RunRef | None:
    for checkpoint in checkpoints:
        ref = RunRef.load(storage.join(storage.parent(str(checkpoint).rstrip("/")), TRACKING_FILE))
        if ref is not None:
            return ref
    return None


def log_evaluation(section: "TrackingSection | None", out: str, result: Mapping[str, Any],
                   checkpoints: list[str]) -> str | None:
    """Log the metrics JSON ``out`` (artifact) and its overall numbers (``eval_*`` metrics); the run id used.

    The run: ``tracking.run_id``, else the training run of the predictions' checkpoint (its run directory's
    ``tracking.json``; with ``local``, that run's own store), else a new run named ``evaluate``."""
    if not enabled(section):
        return None
    ref = _training_run_of(checkpoints) if not section.run_id else None
    if section.run_id:
        uri, _ = resolve_uri(section.mlflow_uri, storage.parent(out))
        ref = RunRef(uri, "", section.run_id)
    elif ref is None or (section.mlflow_uri != LOCAL and ref.tracking_uri != section.mlflow_uri):
        ref = _attach_or_create(section, storage.parent(out), f"{out}.tracking.json", "evaluate",
                                {"breakhis.stage": "evaluate"})
    client = _client(ref.tracking_uri)
    _log_file(client, ref.run_id, out, "evaluation")
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    values = numeric_metrics(result.get("overall") or {})
    client.log_batch(ref.run_id, metrics=[Metric("eval_" + k, v, stamp, 0) for k, v in values.items()])
    log.info("tracking: evaluation logged to MLflow run %s (%s)", ref.run_id, ref.tracking_uri)
    return ref.run_id
