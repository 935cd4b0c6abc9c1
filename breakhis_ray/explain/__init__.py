"""Explanations of classifier predictions: class-activation maps (Grad-CAM, Grad-CAM++) and their PNGs.

Plain torch / numpy (no Ray): :class:`~breakhis_ray.explain.gradcam.GradCAM` runs beside the prediction in
the batch predictor (``infer --explain gradcam``) or anywhere a model from :func:`breakhis_ray.models.create_model`
is at hand.
"""

from __future__ import annotations

from breakhis_ray.explain.gradcam import (
    EXPLAIN_METHODS,
    TARGET_LAYERS,
    GradCAM,
    colorize,
    heatmap_names,
    heatmap_pngs,
    resolve_target_layer,
)

__all__ = ["EXPLAIN_METHODS", "GradCAM", "TARGET_LAYERS", "colorize", "heatmap_names", "heatmap_pngs",
           "resolve_target_layer"]
