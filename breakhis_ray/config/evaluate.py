"""Configs of the reporting stages: metrics (``breakhis-ray evaluate``) and the HTML report
(``breakhis-ray report``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from breakhis_ray.config.base import StrictModel, one_or_many


class EvaluateConfig(StrictModel):
    """``breakhis-ray evaluate``: metrics from prediction Parquet joined with the manifest labels.

    ``predictions`` takes one URI (a Parquet file or a directory of ``part-*.parquet``) or a list, one per
    fold; with several, the output also holds every fold and the mean ± std over folds. The evaluation set
    is every predicted image found in the manifest, or, with ``splits``, the images of ``split`` in
    ``fold`` (one fold per prediction set; default: the splits' folds in order).
    """

    predictions: list[str] = Field(description="prediction Parquet file or directory; a list for several folds")
    manifest: str = Field(description="manifest Parquet whose labels, patients and magnifications are used")
    out: str = Field(description="metrics JSON file (the resolved config is written beside it)")
    splits: str | None = Field(default=None, description="splits Parquet: evaluate only `split` of `fold`")
    fold: list[int] | None = Field(default=None, description="splits fold of each prediction set")
    split: Literal["train", "val", "test"] = Field(default="test", description="which split, with `splits`")
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="malignant when prob_malignant >= this")

    _predictions = field_validator("predictions", mode="before")(lambda cls, v: one_or_many(v))
    _fold = field_validator("fold", mode="before")(lambda cls, v: one_or_many(v))

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

