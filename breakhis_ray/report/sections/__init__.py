"""The report's ten sections, in page order: id, title, builder and whether its input was given.

A builder takes the :class:`~breakhis_ray.report.context.Context` and returns the section body (``Markup``);
a section whose input is not given still renders, with a note saying how to give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from markupsafe import Markup

from breakhis_ray.config import ReportConfig
from breakhis_ray.report.context import Context
from breakhis_ray.report.sections import data, explanations, overview, reproduction, results, segmentation


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    build: Callable[[Context], Markup]
    #: whether the section's input was given (sections without one are still rendered, with a note)
    has_input: Callable[[ReportConfig], bool]


REGISTRY: tuple[Section, ...] = (
    Section("model-card", "Model card", overview.model_card, lambda cfg: True),
    Section("dataset", "Dataset", data.dataset, lambda cfg: bool(cfg.manifest)),
    Section("enhancement", "Data enhancement", data.enhancement, lambda cfg: bool(cfg.prepare_summary)),
    Section("samples", "Synthetic samples", data.samples, lambda cfg: bool(cfg.samples_grid)),
    Section("training", "Training curves", results.training, lambda cfg: bool(cfg.train_runs)),
    Section("evaluation", "Evaluation", results.evaluation, lambda cfg: bool(cfg.metrics or cfg.predictions)),
    Section("predictions", "Sample predictions", results.predictions, lambda cfg: bool(cfg.predictions)),
    Section("explanations", "Explanations (Grad-CAM)", explanations.gallery, lambda cfg: bool(cfg.predictions)),
    Section("segmentation", "Segmentation", segmentation.segmentation, lambda cfg: bool(cfg.segmentation)),
    Section("reproduction", "The papers' tables", reproduction.reproduction, lambda cfg: bool(cfg.grid)),
    Section("configuration", "Run configuration", overview.configuration, lambda cfg: True),
)

#: ``(id, title)`` of every section, in page order.
SECTIONS: tuple[tuple[str, str], ...] = tuple((s.id, s.title) for s in REGISTRY)

__all__ = ["REGISTRY", "SECTIONS", "Section"]
