"""What the commands that run Ray Tune trials over folds share (``breakhis-ray experiments`` and
``breakhis-ray cv``): where the images come from, the base training config, the Ray Tune knobs, the scoring
of each trial's checkpoint and resumption."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from breakhis_ray.config.base import StrictModel, shipped_config
from breakhis_ray.config.common import RayConfig, ScalingSection, TrackingSection
from breakhis_ray.config.data import SplitOptions, SynthConfig


class GridScoringSection(StrictModel):
    """Scoring of each trial's checkpoint on the test split of its fold (one Ray task per trial)."""

    checkpoint: Literal["best", "latest"] = "best"
    batch_size: int = Field(default=32, ge=1)
    num_cpus: float = Field(default=0.5, gt=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)


class TrialRunConfig(StrictModel):
    """Base of the configs whose command trains one Ray Train run per Ray Tune trial, fold by fold.

    Subclasses declare ``folds`` (the ``int N`` shorthand for ``1..N`` is parsed here) and their own fields.
    """

    out: str = Field(description="output directory (local or s3://): the command's tables and summaries, "
                     "runs, trials, data")
    root: str | None = Field(default=None, description="BreakHis tree URI or manifest Parquet; "
                             "default: synthetic.out")
    synthetic: SynthConfig | None = Field(default=None, validate_default=True,
                                          description="generate this synthetic BreakHis first (kept when "
                                          "already there) and use it as root")
    base_train_config: str = Field(default_factory=lambda: shipped_config("train_tiny.yaml"),
                                   description="TrainConfig YAML; default: the shipped jobs/configs/train_tiny.yaml")
    base_overrides: list[str] = Field(default_factory=list, description="TrainConfig key=value for every trial")
    split: SplitOptions = Field(default_factory=SplitOptions, description="how folds are made")
    prepare_overrides: list[str] = Field(default_factory=lambda: ["enhance.enabled=true"],
                                         description="PrepareConfig key=value for every fold")
    scaling: ScalingSection | None = Field(default=None, description="Ray Train workers of every trial "
                                           "(null: the base config's); num_workers >= 1")
    trial_cpus: float = Field(default=0.1, gt=0.0, description="CPUs held by each trial's driver process "
                              "(it launches Ray Train and waits; workers get scaling's resources)")
    max_concurrent_trials: int = Field(default=1, ge=1, description="trials at a time, lowered to what the "
                                       "cluster's CPUs allow")
    trial_retries: int = Field(default=0, ge=0, description="Ray Tune retries of a failed trial")
    scoring: GridScoringSection = Field(default_factory=GridScoringSection,
                                        description="prediction of each fold's test images with its model")
    resume: bool = Field(default=True, description="skip finished stages and trials found in out; false: "
                         "refuse an out that already holds finished trials")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="MLflow: one parent run "
                                      "per out, one child run per trial ('local': a store under out)")
    ray: RayConfig = RayConfig()

    @field_validator("synthetic")
    @classmethod
    def _one_root(cls, value: SynthConfig | None, info) -> SynthConfig | None:
        root = info.data.get("root")
        if root is None and value is None:
            raise ValueError("set root (a BreakHis tree or manifest Parquet) or synthetic (to generate one)")
        if root is not None and value is not None and root.rstrip("/") != value.out.rstrip("/"):
            raise ValueError(f"synthetic.out {value.out!r} differs from root {root!r}: give one of them")
        return value

    @field_validator("folds", mode="before", check_fields=False)
    @classmethod
    def _fold_count(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return list(range(1, value + 1))
        return value

    @field_validator("scaling")
    @classmethod
    def _workers(cls, value: ScalingSection | None) -> ScalingSection | None:
        if value is not None and value.num_workers < 1:
            raise ValueError("must have num_workers >= 1: Ray Train's in-process mode (0) does not run inside a "
                             "Ray Tune trial and persists no checkpoint to score")
        return value

    @property
    def tree_root(self) -> str:
        """The BreakHis tree or manifest the folds are made from (``root``, else ``synthetic.out``)."""
        return self.root if self.root is not None else self.synthetic.out


def distinct(value: list, what: str = "must be") -> list:
    """``value`` unchanged when it is a non-empty list without repeats; else a ``ValueError``."""
    if not value or len(set(value)) != len(value):
        raise ValueError(f"{what} a non-empty list without repeats, got {value}")
    return value
