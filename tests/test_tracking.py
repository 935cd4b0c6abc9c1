"""Experiment tracking against a real ``mlflow server`` on 127.0.0.1 (SQLite backend and artifact root under the
test's temporary directory): one MLflow run per training run with per-epoch metrics, the config as params and
the best checkpoint as an artifact; evaluation logged into the training run; TensorBoard event files; the
``local`` store under the run directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from breakhis_ray.config import EvaluateConfig, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
SERVER_START_S = 420  # importing mlflow's server on a busy 2-core machine took ~100 s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a random free port of 127.0.0.1, stopped (its whole process group) at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    log_file = open(root / "server.log", "w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts")],
        stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text()[-2000:]
                pytest.fail(f"mlflow server did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(1.0)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server, its uvicorn worker and their children
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log_file.close()


def _cfg(tiny_breakhis, tmp_path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "jobs/configs/train_tiny.yaml", [
        f"data.shards={tiny_breakhis['prepared']}",
        f"run.storage_path={tmp_path / 'runs'}",
        "data.image_size=[48,72]",
        "train.epochs=2",
        "train.batch_size=16",
        *overrides,
    ])


@pytest.fixture(scope="module")
def tracked_run(tiny_breakhis, mlflow_server, tmp_path_factory):
    """The tiny config trained 2 epochs (2 DDP workers) with tracking.mlflow_uri=http://127.0.0.1:PORT."""
    from breakhis_ray.train import run_train

    tmp = tmp_path_factory.mktemp("tracked")
    cfg = _cfg(tiny_breakhis, tmp, f"tracking.mlflow_uri={mlflow_server}", "tracking.experiment=train-contract",
               "tracking.tensorboard=true", "run.name=tracked")
    return {"cfg": cfg, "summary": run_train(cfg)}


def _runs(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client, client.search_runs([exp.experiment_id])


@pytest.mark.ray
def test_training_run_is_one_mlflow_run_with_epoch_metrics_params_and_best_checkpoint(tracked_run, mlflow_server):
    summary = tracked_run["summary"]
    client, runs = _runs(mlflow_server, "train-contract")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    history = json.loads((Path(summary["run_dir"]) / "history.json").read_text())
    for key in ("val_loss", "val_balanced_accuracy"):
        points = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == [1, 2], key  # one value per epoch
        assert [m.value for m in points] == pytest.approx([h[key] for h in history]), key
    params = run.data.params
    assert params["model.name"] == "tiny_cnn" and params["train.epochs"] == "2"
    assert params["run.name"] == "tracked" and params["data.image_size"] == "[48, 72]"
    assert params["tracking.mlflow_uri"] == mlflow_server
    best = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "best_checkpoint")}
    assert {"model.pt", "meta.json"} <= best
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "history.json", "result.json"} <= top
    config = client.download_artifacts(run.info.run_id, "config.yaml")
    assert "tracking:" in Path(config).read_text()


@pytest.mark.ray
def test_tensorboard_event_files_hold_the_same_epochs(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(tracked_run["summary"]["run_dir"])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss")] == [1, 2]
    assert [e.step for e in events.Scalars("val_balanced_accuracy")] == [1, 2]


@pytest.mark.ray
def test_rerunning_the_finished_run_keeps_one_mlflow_run(tracked_run, mlflow_server):
    from breakhis_ray.train import run_train

    again = run_train(tracked_run["cfg"])  # nothing left to train: the same run directory, the same MLflow run
    client, runs = _runs(mlflow_server, "train-contract")
    assert len(runs) == 1 and again["mlflow_run_id"] == tracked_run["summary"]["mlflow_run_id"]
    assert len(client.get_metric_history(runs[0].info.run_id, "val_loss")) == 2


@pytest.mark.ray
def test_evaluate_logs_its_json_into_the_training_run(tracked_run, mlflow_server, tiny_breakhis, tmp_path):
    import pandas as pd

    from breakhis_ray.evaluate import run_evaluate
    from breakhis_ray.inference import Predictor

    best = tracked_run["summary"]["best_checkpoint"]
    manifest = pd.read_parquet(tiny_breakhis["manifest"])
    paths = manifest.groupby("label").head(4)["path"].tolist()
    predictions = tmp_path / "predictions.parquet"
    Predictor.from_checkpoint(best, device="cpu").predict_uris(paths).to_pandas().to_parquet(predictions)
    out = tmp_path / "metrics.json"
    run_evaluate(load_config(EvaluateConfig, None, [
        f"predictions={predictions}", f"manifest={tiny_breakhis['manifest']}", f"out={out}",
        "bootstrap.resamples=0", "threshold=0.5", f"tracking.mlflow_uri={mlflow_server}"]))
    client, runs = _runs(mlflow_server, "train-contract")
    run_id = tracked_run["summary"]["mlflow_run_id"]
    assert [r.info.run_id for r in runs] == [run_id]
    assert "evaluation/metrics.json" in {a.path for a in client.list_artifacts(run_id, "evaluation")}
    accuracy = json.loads(out.read_text())["overall"]["accuracy"]
    assert client.get_run(run_id).data.metrics["eval_accuracy"] == pytest.approx(accuracy)


@pytest.mark.ray
def test_local_store_under_the_run_directory(tiny_breakhis, tmp_path):
    from mlflow import MlflowClient

    from breakhis_ray.train import run_train

    cfg = _cfg(tiny_breakhis, tmp_path, "scaling.num_workers=0", "train.epochs=1", "tracking.mlflow_uri=local",
               "run.name=local-store")
    summary = run_train(cfg)
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("breakhis-ray").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == summary["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "val_balanced_accuracy")] == [1]
    # artifacts sit beside the store (in-process mode persists no checkpoint, so history and result only)
    assert {p.name for p in (run_dir / "mlartifacts").rglob("*.json")} >= {"history.json", "result.json"}


def test_flatten_and_local_uri_rules(tmp_path):
    from breakhis_ray.errors import ConfigError
    from breakhis_ray.tracking import flatten, numeric_metrics, resolve_uri

    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": "x", "f": {}}) == \
        {"a.b": "1", "a.c": "[1, 2]", "d": "null", "e": "x", "f": "{}"}
    assert numeric_metrics({"x": 1, "y": True, "z": "s", "w": float("nan")}) == {"x": 1.0, "y": 1.0}
    uri, artifacts = resolve_uri("local", str(tmp_path / "run"))
    assert uri == f"sqlite:///{tmp_path}/run/mlflow.db" and artifacts == f"file://{tmp_path}/run/mlartifacts"
    assert resolve_uri("http://127.0.0.1:5000", "s3://b/run") == ("http://127.0.0.1:5000", None)
    with pytest.raises(ConfigError, match="remote"):
        resolve_uri("local", "s3://bucket/run")


def test_tensorboard_needs_a_local_run_directory(tmp_path):
    from breakhis_ray.errors import ConfigError
    from breakhis_ray.tracking import start_training_run

    cfg = load_config(TrainConfig, None, ["data.shards=x", "run.storage_path=s3://bucket/runs",
                                          "tracking.tensorboard=true"])
    with pytest.raises(ConfigError, match="tracking.tensorboard"):
        start_training_run(cfg, "s3://bucket/runs/breakhis-train")
    off = load_config(TrainConfig, None, ["data.shards=x"])
    assert start_training_run(off, str(tmp_path)) is None  # tracking off: no MLflow import, no files
    assert not list(tmp_path.iterdir())
