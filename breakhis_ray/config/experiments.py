"""Configs of the composite commands: the papers' experiment grid (``breakhis-ray experiments``) and the
demo pipeline (``breakhis-ray demo``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from breakhis_ray.config.base import StrictModel, magnification_list, shipped_config, wh_size
from breakhis_ray.config.common import RayConfig
from breakhis_ray.config.data import SplitOptions
from breakhis_ray.config.trials import GridScoringSection, TrialRunConfig, distinct  # noqa: F401 (GridScoringSection: re-exported)
from breakhis_ray.domain import MAGNIFICATIONS


GRID_TABLES = ("vgg_tab3", "vgg_fig4", "vgg_tab4", "cancernet_tab1")


class LossTableSection(StrictModel):
    """VGG paper Tab. 3: one model per loss (cross-entropy, class-weighted cross-entropy, focal)."""

    losses: list[Literal["ce", "weighted_ce", "focal"]] = Field(default_factory=lambda: ["ce", "weighted_ce", "focal"])
    overrides: list[str] = Field(default_factory=list, description="TrainConfig key=value for this table's runs")


class StrategyTableSection(StrictModel):
    """VGG paper Fig. 4: one model per transfer-learning strategy (they need model.weights to mean anything)."""

    strategies: list[Literal["scratch", "frozen", "finetune", "finetune_aug", "warmup_finetune"]] = Field(
        default_factory=lambda: ["scratch", "frozen", "finetune", "finetune_aug"])
    overrides: list[str] = Field(default_factory=list)


class MagnificationTableSection(StrictModel):
    """VGG paper Tab. 4: accuracy per magnification, from one model per magnification
    (``per_magnification``) or from one magnification-independent model scored per magnification (``shared``)."""

    magnifications: list[int] = Field(default_factory=lambda: list(MAGNIFICATIONS))
    mode: Literal["per_magnification", "shared"] = "per_magnification"
    overrides: list[str] = Field(default_factory=list)

    _magnifications = field_validator("magnifications", mode="before")(lambda cls, v: magnification_list(v))


class SegmentationTableSection(StrictModel):
    """CancerNet Table 1: each CNN without and with nuclear segmentation guidance (``unet``, or the classical
    ``threshold`` / ``watershed``), scored by precision, recall and F1. Defaults follow the paper's training
    (categorical cross-entropy, Adam at lr 0.001, pixels in [0, 1])."""

    models: list[str] = Field(default_factory=lambda: ["vgg16_bn", "resnet50", "densenet121"])
    segmentations: list[Literal["none", "threshold", "watershed", "unet"]] = Field(
        default_factory=lambda: ["none", "unet"])
    guidance_mode: Literal["channel", "emphasis"] = Field(
        default="channel", description="channel: the mask as a 4th input channel; emphasis: non-nuclei faded")
    overrides: list[str] = Field(default_factory=lambda: ["loss.name=ce", "data.scale=unit",
                                                          "train.optimizer=adam", "train.lr=0.001"])


class GridSegmenterSection(StrictModel):
    """The U-Net behind ``segmentation: unet``: an existing checkpoint, or one trained once for the grid
    (``breakhis-ray train-segmenter`` on ``root``: ground-truth masks, or pseudo-labels via overrides)."""

    checkpoint: str | None = Field(default=None, description="U-Net checkpoint directory; null: train one")
    config: str = Field(default_factory=lambda: shipped_config("train_segmenter_tiny.yaml"),
                        description="SegTrainConfig YAML; default: the shipped jobs/configs/train_segmenter_tiny.yaml")
    overrides: list[str] = Field(default_factory=list, description="SegTrainConfig key=value overrides")


class ExperimentsConfig(TrialRunConfig):
    """``breakhis-ray experiments``: the papers' tables as a Ray Tune grid over Ray Train runs.

    Every (table cell, protocol, fold) becomes a training config: ``base_train_config`` < ``base_overrides``
    < the table's ``overrides`` < the cell's setting; cells with the same resolved config share one trial.
    Each protocol gets its own splits and, per fold, its own prepared shards under ``<out>/data``. A re-run
    with the same ``out`` skips finished stages and trials (``resume``). ``out`` holds grid.json and tables.md.
    """

    tables: list[Literal["vgg_tab3", "vgg_fig4", "vgg_tab4", "cancernet_tab1"]] = Field(
        default_factory=lambda: list(GRID_TABLES))
    protocols: list[Literal["patient", "official", "image"]] = Field(default_factory=lambda: ["patient", "image"])
    folds: list[int] = Field(default_factory=lambda: [1], description="folds to run; an int N means 1..N")
    vgg_tab3: LossTableSection = Field(default_factory=LossTableSection)
    vgg_fig4: StrategyTableSection = Field(default_factory=StrategyTableSection)
    vgg_tab4: MagnificationTableSection = Field(default_factory=MagnificationTableSection)
    cancernet_tab1: SegmentationTableSection = Field(default_factory=SegmentationTableSection)
    segmenter: GridSegmenterSection = Field(default_factory=GridSegmenterSection)

    _distinct = field_validator("tables", "protocols")(lambda cls, v: distinct(v))

    @field_validator("split")
    @classmethod
    def _mode_from_protocols(cls, value: SplitOptions) -> SplitOptions:
        if value.mode != "patient":  # the default; dumped configs carry it
            raise ValueError("split.mode is set per protocol: list the protocols in `protocols` instead")
        return value

    @field_validator("protocols")
    @classmethod
    def _official_needs_folds_file(cls, value: list[str], info) -> list[str]:
        split = info.data.get("split")
        if "official" in value and split is not None and not split.folds_file:
            raise ValueError("protocol 'official' needs split.folds_file (dsfoldN.txt or Folds.csv)")
        return value

    @field_validator("folds")
    @classmethod
    def _folds_in_split(cls, value: list[int], info) -> list[int]:
        split = info.data.get("split")
        n = split.folds if split is not None else None
        distinct(value)
        if n is not None and any(not 1 <= f <= n for f in value):
            raise ValueError(f"folds must lie in 1..split.folds={n}, got {value}")
        return value


class DemoConfig(StrictModel):
    """``make demo``: synth -> manifest -> split -> prepare -> train -> U-Net -> infer -> evaluate -> holdout
    cohort (synth with another seed -> manifest -> infer -> evaluate) -> report.

    ``size`` is the synthetic tiles' ``(width, height)``, as :class:`SynthConfig`'s.
    """

    out: str = Field(default="runs/demo", description="output directory (relative: to the working directory)")
    seed: int = Field(default=0, description="one seed for the whole run: the synthetic cohort, the patient split, "
                      "and both trainers' weight init (train.seed), data order and augmentation (data.seed)")
    fraction: float = Field(default=0.05, gt=0.0, le=1.0, description="share of BreakHis' 7,909 images")
    size: tuple[int, int] = (350, 230)
    difficulty: float = Field(default=0.2, ge=0.0, le=1.0, description="synthetic class overlap (0.2: the tiny "
                              "demo model learns within the demo's minutes; at 0.5 it reached test ROC AUC 0.95 but "
                              "0.76 on a cohort of another seed; the patient vs image split gap stays, README)")
    train_config: str = Field(default_factory=lambda: shipped_config("train_tiny.yaml"),
                              description="TrainConfig YAML; default: the shipped jobs/configs/train_tiny.yaml")
    segmenter_config: str = Field(default_factory=lambda: shipped_config("train_segmenter_tiny.yaml"),
                                  description="SegTrainConfig YAML; default: the shipped "
                                  "jobs/configs/train_segmenter_tiny.yaml")
    train_overrides: list[str] = Field(default_factory=list, description="key=value overrides for training")
    segmenter_overrides: list[str] = Field(default_factory=list)
    infer_segmenter: Literal["unet", "threshold", "watershed"] = "unet"
    holdout: bool = Field(default=True, description="also score the classifier on a second synthetic cohort "
                          "rendered with another seed (new pixels for every patient): stage `holdout`")
    holdout_seed: int | None = Field(default=None, description="that cohort's seed; null: seed + 1000")
    holdout_fraction: float = Field(default=0.02, gt=0.0, le=1.0, description="its share of BreakHis' images")
    ray: RayConfig = RayConfig()

    _size = field_validator("size", mode="before")(lambda cls, v: wh_size(v))
