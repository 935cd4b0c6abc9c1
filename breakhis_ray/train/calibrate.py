"""Temperature scaling after training (``calibration.temperature_scaling: true``).

For the run's best and latest checkpoints, a Ray task (``calibration.num_cpus`` / ``num_gpus``, scheduled
outside any enclosing placement group, e.g. a Ray Tune trial's) runs the checkpoint's model over the validation
split, and :func:`breakhis_ray.temperature.fit_temperature` picks the ``T`` minimising the validation NLL. ``T``
is written into the checkpoint's ``meta.json`` as ``calibration`` (with the NLL before and after and the number
of images), where :class:`~breakhis_ray.inference.Predictor` reads it; the run summary (``result.json``) lists
it too. The weights are not touched, so predicted classes stay the same; only the probabilities change.
"""

from __future__ import annotations

import logging

from breakhis_ray import storage
from breakhis_ray.artifacts import write_json
from breakhis_ray.config import TrainConfig
from breakhis_ray.train.ray_glue import RESULT_FILE

log = logging.getLogger(__name__)
TAG = "train"


def validation_logits(checkpoint: str, val_ds, batch_size: int, num_cpus: float, use_gpu: bool):
    """``(logits (N, C) float64, labels (N,))`` of a checkpoint's model over the validation dataset."""
    import numpy as np
    import torch

    from breakhis_ray.checkpoint import load_model
    from breakhis_ray.data.pipeline import iter_train_batches
    from breakhis_ray.data.transforms import PreprocessSpec

    torch.set_num_threads(max(1, round(num_cpus)))
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    model, meta = load_model(checkpoint, map_location=device)
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    in_channels = int(meta["model_args"].get("in_channels", 3))
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in iter_train_batches(val_ds, batch_size, device, spec, in_channels=in_channels):
            logits.append(model(x).float().cpu().numpy())
            labels.append(y.cpu().numpy())
    if not logits:
        return np.zeros((0, len(meta["labels"]))), np.zeros(0, dtype=np.int64)
    return np.concatenate(logits).astype(np.float64), np.concatenate(labels).astype(np.int64)


def fit_checkpoint(checkpoint: str, val_ds, batch_size: int, num_cpus: float, use_gpu: bool) -> dict:
    """The ``calibration`` record of one checkpoint: ``temperature``, NLL before/after, images used."""
    from breakhis_ray.errors import DataError
    from breakhis_ray.temperature import fit_temperature, nll

    logits, labels = validation_logits(checkpoint, val_ds, batch_size, num_cpus, use_gpu)
    if not len(labels):
        raise DataError(f"temperature scaling of {checkpoint}: the validation split is empty")
    temperature = fit_temperature(logits, labels)
    return {"temperature": temperature, "method": "temperature_scaling", "fitted_on": "val",
            "n_images": int(len(labels)), "nll_before": nll(logits, labels, 1.0),
            "nll_after": nll(logits, labels, temperature)}


def calibrate_run(cfg: TrainConfig, val_ds, summary: dict) -> dict:
    """Fit and save a temperature for the best and latest checkpoints of a finished run; the updated summary."""
    import ray

    from breakhis_ray.checkpoint import update_meta

    uris = list(dict.fromkeys(u for u in (summary.get("best_checkpoint"), summary.get("latest_checkpoint")) if u))
    task = ray.remote(fit_checkpoint).options(num_cpus=cfg.calibration.num_cpus,
                                             num_gpus=cfg.calibration.num_gpus or None,
                                             scheduling_strategy="DEFAULT")
    use_gpu = cfg.calibration.num_gpus > 0
    records = ray.get([task.remote(u, val_ds, cfg.train.eval_batch_size, cfg.calibration.num_cpus, use_gpu)
                       for u in uris])
    calibration = {}
    for uri, record in zip(uris, records):
        update_meta(uri, calibration=record)
        calibration[uri] = record
        log.info("[%s] temperature scaling: T=%.4f (val NLL %.4f -> %.4f on %d images) saved with %s", TAG,
                 record["temperature"], record["nll_before"], record["nll_after"], record["n_images"], uri)
    summary = {**summary, "calibration": calibration}
    write_json(storage.join(summary["run_dir"], RESULT_FILE), summary)
    return summary
