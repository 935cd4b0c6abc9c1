"""Config of cross-validation (``breakhis-ray cv``): every fold of one split, one evaluation protocol."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from breakhis_ray.config.base import StrictModel, parse_magnifications, shipped_config
from breakhis_ray.config.common import RayConfig, ScalingSection, TrackingSection
from breakhis_ray.config.data import SplitOptions, SynthConfig
from breakhis_ray.config.experiments import GridScoringSection
from breakhis_ray.domain import EVALUATION_PROTOCOLS, MAGNIFICATIONS


class CVConfig(StrictModel):
    """``breakhis-ray cv``: train every fold of a split (Ray Tune trials over the Ray Train trainer), predict each
    fold's test images with that fold's own model, and summarise the out-of-fold predictions.

    ``protocol`` is one of Benhammou et al.'s four: ``MSB`` / ``MIB`` (binary) and ``MSM`` / ``MIM`` (the eight
    subtypes), magnification-specific (``MS*``: one model per magnification in ``magnifications``, each scored
    on its own magnification's test images) or magnification-independent (``MI*``: one model trained and scored
    on all of them). It sets the training config's ``task`` and ``data.magnifications``; for the subtype task
    the offline enhancement balances the eight subtypes (``enhance.balance=subtype`` is added to
    ``prepare_overrides`` unless they set ``enhance.balance``).

    The split (``split.mode``: patient, official or image) is made once; each fold is prepared under
    ``<out>/data``. A re-run with the same ``out`` keeps the data stages and skips finished trials (``resume``).
    """

    out: str = Field(description="output directory (local or s3://): summary.json, summary.md, "
                     "oof_predictions.parquet, runs, trials, data")
    root: str | None = Field(default=None, description="BreakHis tree URI or manifest Parquet; "
                             "default: synthetic.out")
    synthetic: SynthConfig | None = Field(default=None, validate_default=True,
                                          description="generate this synthetic BreakHis first (kept when "
                                          "already there) and use it as root")
    protocol: Literal["MSB", "MIB", "MSM", "MIM"] = Field(
        default="MIB", description="MSB|MIB: binary, MSM|MIM: eight subtypes; MS*: one model per magnification, "
        "MI*: one model for all")
    magnifications: list[int] = Field(default_factory=lambda: list(MAGNIFICATIONS),
                                      description="magnifications used (MS*: one model each)")
    base_train_config: str = Field(default_factory=lambda: shipped_config("train_tiny.yaml"),
                                   description="TrainConfig YAML; default: the shipped jobs/configs/train_tiny.yaml")
    base_overrides: list[str] = Field(default_factory=list, description="TrainConfig key=value for every fold "
                                      "(not task or data.magnifications: the protocol sets them)")
    split: SplitOptions = Field(default_factory=SplitOptions, description="the split whose folds are run")
    folds: list[int] | None = Field(default=None, description="folds to run (an int N means 1..N); "
                                    "null: every fold of the split")
    prepare_overrides: list[str] = Field(default_factory=lambda: ["enhance.enabled=true"],
                                         description="PrepareConfig key=value for every fold")
    scaling: ScalingSection | None = Field(default=None, description="Ray Train workers of every fold "
                                           "(null: the base config's); num_workers >= 1")
    trial_cpus: float = Field(default=0.1, gt=0.0, description="CPUs held by each trial's driver process")
    max_concurrent_trials: int = Field(default=5, ge=1, description="trials (folds, or fold x magnification) "
                                       "at a time, lowered to what the cluster's CPUs allow")
    trial_retries: int = Field(default=0, ge=0, description="Ray Tune retries of a failed trial")
    scoring: GridScoringSection = Field(default_factory=GridScoringSection,
                                        description="prediction of each fold's test images with its model")
    resume: bool = Field(default=True, description="skip finished stages and trials found in out; false: "
                         "refuse an out that already holds finished trials")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="MLflow: one parent run "
                                      "per out, each fold's training run a child of it")
    ray: RayConfig = RayConfig()

    _magnifications = field_validator("magnifications", mode="before")(
        lambda cls, v: list(MAGNIFICATIONS) if parse_magnifications(v) == "all" else parse_magnifications(v))

    @field_validator("synthetic")
    @classmethod
    def _one_root(cls, value: SynthConfig | None, info) -> SynthConfig | None:
        root = info.data.get("root")
        if root is None and value is None:
            raise ValueError("set root (a BreakHis tree or manifest Parquet) or synthetic (to generate one)")
        if root is not None and value is not None and root.rstrip("/") != value.out.rstrip("/"):
            raise ValueError(f"synthetic.out {value.out!r} differs from root {root!r}: give one of them")
        return value

    @field_validator("magnifications")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"must be a non-empty list without repeats, got {value}")
        return sorted(value)

    @field_validator("base_overrides")
    @classmethod
    def _protocol_keys(cls, value: list[str]) -> list[str]:
        for item in value:
            key = item.split("=", 1)[0].strip()
            if key in ("task", "data.magnifications"):
                raise ValueError(f"{key!r} is set by the protocol (MSB, MIB, MSM, MIM) and magnifications, "
                                 "not by base_overrides")
        return value

    @field_validator("folds", mode="before")
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

    @model_validator(mode="after")
    def _folds_in_split(self) -> "CVConfig":
        if self.split.mode == "official" and not self.split.folds_file:
            raise ValueError("split.mode=official needs split.folds_file (dsfoldN.txt or Folds.csv)")
        if self.folds is not None:
            if not self.folds or len(set(self.folds)) != len(self.folds):
                raise ValueError(f"folds must be a non-empty list without repeats, got {self.folds}")
            if any(not 1 <= f <= self.split.folds for f in self.folds):
                raise ValueError(f"folds must lie in 1..split.folds={self.split.folds}, got {self.folds}")
        return self

    @property
    def tree_root(self) -> str:
        """The BreakHis tree or manifest the folds are made from (``root``, else ``synthetic.out``)."""
        return self.root if self.root is not None else self.synthetic.out

    @property
    def task(self) -> str:
        """``binary`` or ``subtype``, from the protocol."""
        return EVALUATION_PROTOCOLS[self.protocol][0]

    @property
    def magnification_mode(self) -> str:
        """``specific`` (one model per magnification) or ``independent`` (one for all), from the protocol."""
        return EVALUATION_PROTOCOLS[self.protocol][1]

    @property
    def fold_list(self) -> list[int]:
        """The folds run: ``folds``, else every fold of the split."""
        return list(self.folds) if self.folds is not None else list(range(1, self.split.folds + 1))
