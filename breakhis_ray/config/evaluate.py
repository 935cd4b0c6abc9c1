"""Configs of the reporting stages: metrics (``breakhis-ray evaluate``) and the HTML report
(``breakhis-ray report``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from breakhis_ray.config.base import StrictModel, one_or_many
from breakhis_ray.config.common import TrackingSection


class ThresholdSection(StrictModel):
    """The decision threshold on ``prob_malignant``: chosen on the validation predictions by ``rule``, then
    locked for the evaluated split (its predictions never move it).

    ``fixed``: ``value``, validation not looked at. ``youden``: the validation threshold maximising
    sensitivity + specificity - 1. ``sensitivity``: the highest validation threshold whose sensitivity reaches
    ``target_sensitivity``. Without validation predictions (or with one class only in them) the rule falls back
    to ``value`` and the metrics JSON says so. A bare number (``threshold=0.3``) means ``rule: fixed``.
    """

    rule: Literal["fixed", "youden", "sensitivity"] = Field(
        default="youden", description="fixed | youden | sensitivity, applied to the validation predictions")
    value: float = Field(default=0.5, gt=0.0, lt=1.0, description="the threshold of rule fixed, and the "
                         "fallback when no validation predictions are given")
    target_sensitivity: float = Field(default=0.95, gt=0.0, le=1.0,
                                      description="rule sensitivity: the validation sensitivity to reach")


def _threshold_section(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"rule": "fixed", "value": value}
    return value


class BootstrapSection(StrictModel):
    """95% intervals from a bootstrap that resamples patients (all images of a drawn patient come along)."""

    resamples: int = Field(default=1000, ge=0, description="bootstrap resamples; 0 turns the intervals off")
    seed: int = Field(default=0, ge=0, description="seed of numpy's default_rng for the patient draws")


class CalibrationMetricsSection(StrictModel):
    """Calibration metrics of ``prob_malignant``: expected calibration error over equal-width bins, Brier."""

    bins: int = Field(default=10, ge=1, le=100, description="equal-width probability bins of ECE and the "
                      "reliability diagram")


class EvaluateConfig(StrictModel):
    """``breakhis-ray evaluate``: metrics from prediction Parquet joined with the manifest labels.

    ``predictions`` takes one URI (a Parquet file or a directory of ``part-*.parquet``) or a list, one per
    fold; with several, the output also holds every fold and the mean ± std over folds. The evaluation set
    is every predicted image found in the manifest, or, with ``splits``, the images of ``split`` in
    ``fold`` (one fold per prediction set; default: the splits' folds in order). The threshold is chosen on
    the validation predictions (``val_predictions``, else the ``val`` rows of ``predictions``) and locked.
    """

    predictions: list[str] = Field(description="prediction Parquet file or directory; a list for several folds")
    manifest: str = Field(description="manifest Parquet whose labels, patients and magnifications are used")
    out: str = Field(description="metrics JSON file (the resolved config is written beside it)")
    splits: str | None = Field(default=None, description="splits Parquet: evaluate only `split` of `fold`")
    fold: list[int] | None = Field(default=None, description="splits fold of each prediction set")
    split: Literal["train", "val", "test"] = Field(default="test", description="which split, with `splits`")
    val_predictions: list[str] | None = Field(
        default=None, description="prediction Parquet of the validation images, one per prediction set (the "
        "threshold rule's input); null: with `splits`, the `val` rows of `predictions` themselves")
    threshold: ThresholdSection = Field(default_factory=ThresholdSection,
                                        description="malignant when prob_malignant >= the locked threshold")
    bootstrap: BootstrapSection = Field(default_factory=BootstrapSection)
    calibration: CalibrationMetricsSection = Field(default_factory=CalibrationMetricsSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="MLflow: log the metrics "
                                      "JSON into the run that trained the predictions' checkpoint")
    magnification_mode: Literal["auto", "specific", "independent"] = Field(
        default="auto", description="magnification-specific (one model per magnification) or -independent "
        "(one model for all); auto: from the predictions' classifier_checkpoint per magnification")

    _predictions = field_validator("predictions", mode="before")(lambda cls, v: one_or_many(v))
    _fold = field_validator("fold", mode="before")(lambda cls, v: one_or_many(v))
    _val_predictions = field_validator("val_predictions", mode="before")(lambda cls, v: one_or_many(v))
    _threshold = field_validator("threshold", mode="before")(lambda cls, v: _threshold_section(v))

    @field_validator("predictions")
    @classmethod
    def _some_predictions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("predictions must name at least one Parquet file or directory")
        return value


# ------------------------------------------------------------------------------------------ report
class ReportConfig(StrictModel):
    """``breakhis-ray report``: one self-contained ``report.html`` (+ its PNGs) from whatever inputs exist.

    Every input is optional; a section whose input is not given is kept with a visible note. An input that
    is given but cannot be read is an error.
    """

    out: str = Field(description="output directory: report.html, figures/*.png, config.yaml")
    title: str = "BreakHis benign/malignant classification report"
    data_source: Literal["synthetic", "real", "unspecified"] = Field(
        default="unspecified", description="what the images are: the synthetic BreakHis or the real dataset")
    protocol: Literal["patient", "official", "image"] | None = Field(
        default=None, description="split protocol shown in the header; null: taken from the metrics JSON")
    manifest: str | None = Field(default=None, description="manifest Parquet (dataset tables)")
    prepare_summary: str | None = Field(default=None, description="prepare.json (Tab. 1 before / Tab. 2 after)")
    train_runs: list[str] = Field(default_factory=list, description="training run directories (history.json)")
    metrics: str | None = Field(default=None, description="metrics JSON written by `evaluate`")
    predictions: str | None = Field(default=None, description="prediction Parquet file or directory (ROC, tiles)")
    segmentation: str | None = Field(default=None, description="segmentation evaluation JSON (Dice/IoU, overlays)")
    grid: str | None = Field(default=None, description="experiment grid results (JSON, Parquet or CSV)")
    samples_grid: str | None = Field(default=None, description="PNG of synthetic samples")
    configs: list[str] = Field(default_factory=list, description="YAML files shown in the configuration section")
    sample_tiles: int = Field(default=8, ge=0, le=64, description="predicted tiles shown with their probability")
    seed: int = Field(default=0, description="which tiles are shown (deterministic for a seed)")
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="malignant when prob_malignant >= this")
    embed_images: bool = Field(default=True, description="embed PNGs as data URIs (they are written as files too)")

    _train_runs = field_validator("train_runs", "configs", mode="before")(
        lambda cls, v: [] if v is None else one_or_many(v))

