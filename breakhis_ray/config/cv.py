"""Config of cross-validation (``breakhis-ray cv``): every fold of one split, one evaluation protocol."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from breakhis_ray.config.base import magnification_list
from breakhis_ray.config.trials import TrialRunConfig, distinct
from breakhis_ray.domain import EVALUATION_PROTOCOLS, MAGNIFICATIONS


class CVConfig(TrialRunConfig):
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
    ``out`` holds summary.json, summary.md and oof_predictions.parquet.
    """

    protocol: Literal["MSB", "MIB", "MSM", "MIM"] = Field(
        default="MIB", description="MSB|MIB: binary, MSM|MIM: eight subtypes; MS*: one model per magnification, "
        "MI*: one model for all")
    magnifications: list[int] = Field(default_factory=lambda: list(MAGNIFICATIONS),
                                      description="magnifications used (MS*: one model each)")
    base_overrides: list[str] = Field(default_factory=list, description="TrainConfig key=value for every fold "
                                      "(not task or data.magnifications: the protocol sets them)")
    folds: list[int] | None = Field(default=None, description="folds to run (an int N means 1..N); "
                                    "null: every fold of the split")
    max_concurrent_trials: int = Field(default=5, ge=1, description="trials (folds, or fold x magnification) "
                                       "at a time, lowered to what the cluster's CPUs allow")

    _magnifications = field_validator("magnifications", mode="before")(lambda cls, v: magnification_list(v))
    _distinct = field_validator("magnifications")(lambda cls, v: sorted(distinct(v)))

    @field_validator("base_overrides")
    @classmethod
    def _protocol_keys(cls, value: list[str]) -> list[str]:
        for item in value:
            key = item.split("=", 1)[0].strip()
            if key in ("task", "data.magnifications"):
                raise ValueError(f"{key!r} is set by the protocol (MSB, MIB, MSM, MIM) and magnifications, "
                                 "not by base_overrides")
        return value

    @model_validator(mode="after")
    def _folds_in_split(self) -> "CVConfig":
        if self.split.mode == "official" and not self.split.folds_file:
            raise ValueError("split.mode=official needs split.folds_file (dsfoldN.txt or Folds.csv)")
        if self.folds is not None:
            distinct(self.folds, "folds must be")
            if any(not 1 <= f <= self.split.folds for f in self.folds):
                raise ValueError(f"folds must lie in 1..split.folds={self.split.folds}, got {self.folds}")
        return self

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
