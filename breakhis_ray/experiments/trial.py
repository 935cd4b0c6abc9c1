"""One grid trial, run by Ray Tune: train one config with Ray Train, score it on its fold's test split in a Ray
task, and record the result atomically as ``<out>/trials/<trial id>.json``."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from breakhis_ray import storage, tracking
from breakhis_ray.artifacts import table_bytes, write_atomic, write_json
from breakhis_ray.config import TrainConfig, validate_config
from breakhis_ray.errors import BreakhisError, DataError
from breakhis_ray.experiments.plan import METRICS


def run_trial(config: dict, specs: dict[str, dict]) -> None:
    """Ray Tune function trainable: train one config with Ray Train, score it on its test split, record it.

    ``config["trial_id"]`` picks the trial's spec from ``specs`` (shared through ``tune.with_parameters``)."""
    from ray import tune

    from breakhis_ray.train import run_train

    spec = specs[config["trial_id"]]
    cfg = validate_config(TrainConfig, spec["train"])
    start = time.perf_counter()
    summary = run_train(cfg)
    trained = time.perf_counter()
    which = spec["scoring"]["checkpoint"]
    checkpoint = summary[f"{which}_checkpoint"] or summary["latest_checkpoint"]
    if not checkpoint:
        raise BreakhisError(f"trial {spec['trial_id']}: training reported no checkpoint to score")
    scores = _score_in_task(spec, checkpoint)
    record = {
        "trial_id": spec["trial_id"],
        "protocol": spec["protocol"],
        "fold": spec["fold"],
        "run_dir": summary["run_dir"],
        "history": storage.join(summary["run_dir"], "history.json"),
        "checkpoint": checkpoint,
        "epochs_completed": summary["epochs_completed"],
        "train_seconds": round(trained - start, 2),
        "score_seconds": round(time.perf_counter() - trained, 2),
        "predictions": spec["predictions"],
        "scores": scores,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(spec["record"], record)
    overall = scores["overall"]
    tracking.log_trial_scores(summary["run_dir"], overall)  # into the trial's MLflow child run, if any
    tune.report({"trial_id": spec["trial_id"], **{k: overall.get(k) for k in METRICS},
                 "epochs_completed": summary["epochs_completed"]})


def _score_in_task(spec: dict, checkpoint: str) -> dict:
    """Score in a Ray task with the scoring resources, scheduled outside the trial's placement group."""
    import ray

    scoring = spec["scoring"]
    task = ray.remote(score_checkpoint).options(
        num_cpus=scoring["num_cpus"], num_gpus=scoring["num_gpus"] or None, scheduling_strategy="DEFAULT")
    return ray.get(task.remote(checkpoint, spec["prepared"], spec["magnifications"], spec["predictions"],
                               scoring["batch_size"], scoring["num_cpus"]))


def read_test_split(prepared: str, magnifications: list[int] | None):
    """``path`` and encoded ``image`` of the original test images of a prepared fold (a pyarrow Table)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from breakhis_ray.data.shards import shard_uris

    files = shard_uris(prepared)
    if not files:
        raise DataError(f"no shards under {prepared}/shards")
    fs, _ = storage.resolve(files[0])
    dataset = pads.dataset([storage.resolve(u)[1] for u in files], filesystem=fs, format="parquet")
    wanted = (pc.field("split") == "test") & pc.field("augmentation").is_null()
    if magnifications:
        wanted = wanted & pc.field("magnification").isin(list(magnifications))
    return dataset.to_table(columns=["path", "image"], filter=wanted)


def score_checkpoint(checkpoint: str, prepared: str, magnifications: list[int] | None, predictions_uri: str,
                     batch_size: int = 32, num_cpus: float = 1.0) -> dict:
    """Predict the fold's test images with the checkpoint (its own preprocessing and guidance) and evaluate
    them with the BreakHis conventions; writes the predictions Parquet, returns JSON-safe metrics."""
    import pandas as pd
    import pyarrow as pa

    from breakhis_ray.data.manifest import read_manifest
    from breakhis_ray.evaluate import evaluate_predictions
    from breakhis_ray.inference import Predictor

    rows = read_test_split(prepared, magnifications)
    paths, images = rows.column("path").to_pylist(), rows.column("image").to_pylist()
    if not paths:
        raise DataError(f"{prepared}: the test split holds no image"
                        + (f" at magnification(s) {magnifications}" if magnifications else ""))
    predictor = Predictor.from_checkpoint(checkpoint, device="auto", torch_threads=max(1, round(num_cpus)))
    predictions = pa.concat_tables([predictor.predict_bytes(images[i:i + batch_size], paths[i:i + batch_size])
                                    for i in range(0, len(paths), batch_size)])
    write_atomic(predictions_uri, table_bytes(predictions))
    manifest = read_manifest(storage.join(prepared, "manifest.parquet"))
    result = evaluate_predictions(predictions.to_pandas(), manifest, eval_paths=pd.Series(paths))
    return json.loads(json.dumps({k: result[k] for k in ("overall", "per_magnification", "counts", "n_errors")},
                                 default=float))
