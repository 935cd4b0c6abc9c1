"""Sections shared by several stages: Ray, Ray Train scaling and run bookkeeping, the optimiser, failure
injection, and image decoding."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from breakhis_ray.config.base import StrictModel

#: Default decompression-bomb guard (width * height) of the one decoder, for ``prepare``, training and
#: ``infer`` alike. The decoder may import it from here (config sits below ``breakhis_ray.data``).
DEFAULT_MAX_PIXELS = 64_000_000
#: PNG decoder backends of :mod:`breakhis_ray.data.decode` (``auto``: the fastest installed, else PIL).
DECODE_BACKENDS = ("auto", "pil", "wuffs", "imagecodecs", "opencv")


class RayConfig(StrictModel):
    """How to reach Ray. ``address=None`` joins ``RAY_ADDRESS`` if set, else starts a local instance."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1, description="only for a local instance we start")
    dashboard: bool = Field(default=True, description="a local instance we start serves Ray's dashboard on "
                            "127.0.0.1 (it also answers the state API that Ray Train's placement-group cleaner "
                            "polls; without it that cleaner logs a warning every few seconds)")


class DecodeSection(StrictModel):
    """Image decoding limits and backend, the same for every stage that decodes image files."""

    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1, description="decompression-bomb guard: larger "
                            "images (width*height, read from the header before decoding) are rejected")
    backend: Literal[DECODE_BACKENDS] = Field(
        default="auto", description="decoder of 8-bit RGB PNGs (every other image goes through PIL); the pixels "
        "are identical whichever decodes. auto: $BREAKHIS_DECODE_BACKEND if set, else the fastest installed "
        "(wuffs, imagecodecs, opencv), else pil")


def lift_max_pixels(data: object) -> object:
    """Accept the former top-level ``max_pixels`` key as ``decode.max_pixels`` (YAML, flags, overrides)."""
    if not isinstance(data, dict) or "max_pixels" not in data:
        return data
    decode = data.get("decode")
    if isinstance(decode, DecodeSection):
        decode = decode.model_dump(exclude_unset=True)
    if decode is not None and not isinstance(decode, dict):
        return data  # pydantic reports the bad section
    data = dict(data)
    value = data.pop("max_pixels")
    decode = dict(decode or {})
    if "max_pixels" in decode:
        raise ValueError("give max_pixels or decode.max_pixels, not both")
    data["decode"] = {**decode, "max_pixels": value}
    return data


class ScalingSection(StrictModel):
    """Ray Train workers and their resources."""

    num_workers: int = Field(default=1, ge=0, description="0 runs the loop in the driver process")
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    gpus_per_worker: float = Field(default=1.0, gt=0.0)
    backend: Literal["gloo", "nccl"] | None = None


class FailureInjection(StrictModel):
    """Chaos testing: fail once on ``rank`` at the start of ``epoch`` (0-based) or, with ``step``, right after
    that epoch's ``step``-th optimiser step (after the mid-epoch checkpoint due at that step, if any).
    ``kill`` sends SIGKILL to the worker process (nothing is cleaned up, as when a node dies); ``exception``
    raises in the train loop."""

    epoch: int = Field(ge=0)
    step: int | None = Field(default=None, ge=1, description="steps into the epoch; null: at the epoch's start")
    rank: int = Field(default=0, ge=0)
    mode: Literal["exception", "kill"] = "kill"


class RunSection(StrictModel):
    """Where a Ray Train run keeps its checkpoints and how it ranks and retries them.

    ``storage_path`` is a URI (local or ``s3://``); a relative local path is taken relative to the working
    directory of the command, like any path given on the command line. The shipped YAMLs set it.
    """

    name: str = "breakhis-train"
    storage_path: str = "runs/train"
    max_failures: int = Field(default=2, ge=-1)
    keep_checkpoints: int = Field(default=2, ge=1)
    checkpoint_metric: str = "val_balanced_accuracy"
    checkpoint_mode: Literal["max", "min"] = "max"
    checkpoint_every_steps: int | None = Field(
        default=None, ge=1, description="also checkpoint every N optimiser steps inside an epoch (resume there "
        "exactly: the step, per-rank RNG and partial sums are saved); null: at epoch ends only")
    deterministic: bool = Field(default=False, description="deterministic CUDA kernels (torch."
                                "use_deterministic_algorithms, no cuDNN autotuning, fixed cuBLAS workspace)")
    inject_failure: FailureInjection | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    data_progress_bars: bool = False


class OptimConfig(StrictModel):
    """The classifier's optimisation: transfer-learning strategy, optimiser, schedule, epochs."""

    strategy: Literal["scratch", "frozen", "finetune", "finetune_aug", "warmup_finetune"] = "finetune_aug"
    epochs: int = Field(default=25, ge=1)
    batch_size: int = Field(default=32, ge=1)
    eval_batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    backbone_lr_factor: float = Field(default=1.0, gt=0.0, description="backbone lr = lr * factor")
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    scheduler: Literal["none", "cosine", "step"] = "cosine"
    step_size: int = Field(default=10, ge=1)
    warmup_epochs: int = Field(default=1, ge=0, description="frozen-backbone epochs for warmup_finetune")
    early_stopping_patience: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=None, gt=0.0)
    amp: bool = Field(default=True, description="bf16 autocast on GPU; ignored on CPU")
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    seed: int = 0


class TrackingSection(StrictModel):
    """Experiment tracking (:mod:`breakhis_ray.tracking`): MLflow runs and TensorBoard event files.

    ``mlflow_uri``: any MLflow tracking URI (``http://host:5000``, ``sqlite:///file.db``, ``databricks``, ...);
    ``local`` keeps a SQLite store and the artifacts under the run's own directory; null turns MLflow off.
    A training run becomes one MLflow run (params: the resolved config flattened; per-epoch metrics of every
    rank-0 report; artifacts: ``config.yaml``, the best checkpoint, ``history.json``, ``result.json``); grid and
    cross-validation trials become child runs of one parent run; ``evaluate`` logs its JSON into the run that
    trained the predictions' checkpoint (or ``run_id``).
    """

    mlflow_uri: str | None = Field(default=None, description="MLflow tracking URI, 'local' (a store under the "
                                   "run directory) or null (off)")
    experiment: str = Field(default="breakhis-ray", description="MLflow experiment name (created when absent)")
    tensorboard: bool = Field(default=False, description="also write TensorBoard event files to "
                              "<run_dir>/tensorboard (local run.storage_path only)")
    parent_run_id: str | None = Field(default=None, description="nest the run under this MLflow run (set by "
                                      "the grid and cv drivers for their trials)")
    run_id: str | None = Field(default=None, description="evaluate: log into this MLflow run instead of the "
                               "checkpoint's training run")
