"""Typed configuration: pydantic v2 models, YAML files and dotted ``key=value`` overrides.

Precedence: model defaults < YAML file (``--config``) < CLI flags < ``key.sub=value`` overrides.
One model per CLI subcommand, built with :func:`load_config`; every public name is re-exported here, so
``from breakhis_ray.config import TrainConfig`` is the import to use.

Modules:

- :mod:`~breakhis_ray.config.base`: ``StrictModel``, the value parsers (``parse_hw``: the one size parser,
  ``(H, W)``; bytes; magnifications) and load / validate / dump.
- :mod:`~breakhis_ray.config.common`: sections shared by stages (Ray, scaling, run, optimiser, failure
  injection, decode).
- :mod:`~breakhis_ray.config.data`: ``synth``, ``manifest``, ``split``, ``prepare``.
- :mod:`~breakhis_ray.config.train`: ``train`` (data pipeline, augmentation, model, loss, guidance).
- :mod:`~breakhis_ray.config.segment`: ``train-segmenter``, ``segment-eval``.
- :mod:`~breakhis_ray.config.infer`: ``infer``.
- :mod:`~breakhis_ray.config.evaluate`: ``evaluate``, ``report``.
- :mod:`~breakhis_ray.config.experiments`: ``experiments`` (the papers' grid), ``demo``.
- :mod:`~breakhis_ray.config.cv`: ``cv`` (cross-validation under one evaluation protocol).
- :mod:`~breakhis_ray.config.bench`: ``bench``.

Nothing here imports ``breakhis_ray.data`` or any stage module.
"""

from __future__ import annotations

from breakhis_ray.config.base import (
    SHIPPED_CONFIGS,
    ModelT,
    StrictModel,
    config_yaml,
    dump_config,
    format_validation_error,
    load_config,
    one_or_many,
    parse_bytes,
    parse_hw,
    parse_hw_or_none,
    magnification_list,
    parse_magnifications,
    parse_override,
    read_yaml,
    shipped_config,
    size_string,
    validate_config,
    wh_size,
)
from breakhis_ray.config.bench import (
    BENCH_QUICK,
    GPU_SMOKE,
    BenchConfig,
    BenchGpuSection,
    BenchInferenceSection,
    BenchIngestSection,
    BenchSynthSection,
    BenchTrainSection,
)
from breakhis_ray.config.common import (
    DEFAULT_MAX_PIXELS,
    DecodeSection,
    FailureInjection,
    OptimConfig,
    RayConfig,
    RunSection,
    ScalingSection,
    TrackingSection,
)
from breakhis_ray.config.data import (
    ENHANCE_TRANSFORMS,
    EnhanceConfig,
    ManifestConfig,
    PrepareConfig,
    SplitConfig,
    SplitOptions,
    SynthConfig,
)
from breakhis_ray.config.cv import CVConfig
from breakhis_ray.config.evaluate import (
    BootstrapSection,
    CalibrationMetricsSection,
    EvaluateConfig,
    ReportConfig,
    ThresholdSection,
)
from breakhis_ray.config.experiments import (
    GRID_TABLES,
    DemoConfig,
    ExperimentsConfig,
    GridScoringSection,
    GridSegmenterSection,
    LossTableSection,
    MagnificationTableSection,
    SegmentationTableSection,
    StrategyTableSection,
)
from breakhis_ray.config.export import ExportConfig
from breakhis_ray.config.trials import TrialRunConfig
from breakhis_ray.config.infer import ExplainSection, InferConfig
from breakhis_ray.config.segment import (
    SegDataConfig,
    SegEvalConfig,
    SegLossConfig,
    SegModelConfig,
    SegOptimConfig,
    SegRunSection,
    SegSourceSection,
    SegSplitSection,
    SegTrainConfig,
)
from breakhis_ray.config.train import (
    AugmentConfig,
    CalibrationSection,
    DataConfig,
    GuidanceConfig,
    LossConfig,
    ModelConfig,
    TrainConfig,
)
from breakhis_ray.domain import MAGNIFICATIONS


__all__ = [
    "AugmentConfig", "BENCH_QUICK", "CalibrationSection", "BenchConfig", "BenchGpuSection", "BenchInferenceSection",
    "BenchIngestSection", "GPU_SMOKE",
    "BenchSynthSection", "BenchTrainSection", "CVConfig", "DEFAULT_MAX_PIXELS", "DataConfig", "DecodeSection", "DemoConfig",
    "ENHANCE_TRANSFORMS", "EnhanceConfig", "EvaluateConfig", "ExperimentsConfig", "FailureInjection",
    "ExplainSection", "ExportConfig", "GRID_TABLES", "GridScoringSection", "GridSegmenterSection", "GuidanceConfig", "InferConfig",
    "LossConfig", "LossTableSection", "MAGNIFICATIONS", "MagnificationTableSection", "ManifestConfig",
    "ModelConfig", "ModelT", "OptimConfig", "PrepareConfig", "RayConfig", "ReportConfig", "RunSection", "TrackingSection",
    "SHIPPED_CONFIGS", "ScalingSection", "SegDataConfig", "SegEvalConfig", "SegLossConfig", "SegModelConfig",
    "SegOptimConfig", "SegRunSection", "SegSourceSection", "SegSplitSection", "SegTrainConfig",
    "SegmentationTableSection", "SplitConfig", "SplitOptions", "StrategyTableSection", "StrictModel", "TrialRunConfig",
    "SynthConfig", "TrainConfig", "config_yaml", "dump_config", "format_validation_error", "load_config",
    "magnification_list", "one_or_many", "parse_bytes", "parse_hw", "parse_hw_or_none", "parse_magnifications", "parse_override",
    "read_yaml", "shipped_config", "size_string", "validate_config", "wh_size",
    "BootstrapSection", "CalibrationMetricsSection", "ThresholdSection",
]
