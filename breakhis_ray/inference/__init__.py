"""Batch inference with Ray Data: segmentation + classification over any number of images.

``breakhis-ray infer --input URI --out URI --classifier CKPT [--segmenter CKPT|threshold|watershed]``

Modules, from the bottom up (imports point downwards):

* :mod:`~breakhis_ray.inference.schema`: the output contract (``PREDICTION_SCHEMA``, layout names);
* :mod:`~breakhis_ray.inference.plan`: list ``--input`` once, order the inputs, cut them into chunks;
* :mod:`~breakhis_ray.inference.decode_stage`: the CPU stage, bytes -> model inputs through
  :mod:`breakhis_ray.data.decode` (bad inputs become error rows);
* :mod:`~breakhis_ray.inference.predictor`: the :class:`Predictor`, plain torch, usable without Ray;
* :mod:`~breakhis_ray.inference.decoding_predictor`: :class:`DecodingPredictor`, a Predictor that decodes its own
  inputs (``decode_placement=actors``);
* :mod:`~breakhis_ray.inference.writer`: resumable chunk parts, the plan record, :func:`read_predictions`;
* :mod:`~breakhis_ray.inference.driver`: the Ray Data pipeline (:func:`build_dataset`) and :func:`run_infer`.

Nothing here imports Ray or torch at import time.
"""

from breakhis_ray.inference.decode_stage import (
    BatchDecoder,
    decode_for_models,
    read_and_decode,
    read_and_decode_shards,
)
from breakhis_ray.inference.decoding_predictor import DecodingPredictor
from breakhis_ray.inference.driver import build_dataset, run_infer
from breakhis_ray.inference.plan import InputPlan, plan_inputs
from breakhis_ray.inference.predictor import Predictor, build_segmenter, new_run_id, resolve_sizes
from breakhis_ray.inference.schema import (
    CLASSICAL_SEGMENTERS,
    FEATURE_COLUMNS,
    MASKS_DIR,
    PREDICTION_SCHEMA,
    PREDICTIONS_DIR,
    SUBTYPE_PREDICTION_SCHEMA,
    SUBTYPE_PROB_COLUMNS,
)
from breakhis_ray.inference.writer import read_predictions

__all__ = [
    "BatchDecoder",
    "CLASSICAL_SEGMENTERS",
    "DecodingPredictor",
    "FEATURE_COLUMNS",
    "InputPlan",
    "MASKS_DIR",
    "PREDICTIONS_DIR",
    "PREDICTION_SCHEMA",
    "Predictor",
    "SUBTYPE_PREDICTION_SCHEMA",
    "SUBTYPE_PROB_COLUMNS",
    "build_dataset",
    "build_segmenter",
    "decode_for_models",
    "new_run_id",
    "plan_inputs",
    "read_and_decode",
    "read_and_decode_shards",
    "read_predictions",
    "resolve_sizes",
    "run_infer",
]
