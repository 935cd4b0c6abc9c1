"""The output contract of ``infer``: the prediction schema, its column groups and the output layout names.

Output layout::

    <out>/predictions/part-00000.parquet ...   PREDICTION_SCHEMA, rows sorted by path
    <out>/predictions/_plan.json               input digest, chunking and model settings (resume check)
    <out>/masks/part-00000/<stem>-<hash>_nuclei.png   uint16 nuclei instance ids (write_masks=true)
    <out>/heatmaps/part-00000/<stem>-<hash>_gradcam.png   --explain: class-activation overlay at the input
                                                          size, raw map beside it (_gradcam_raw.png;
                                                          gradcampp for gradcam++)
    <out>/config.yaml  <out>/versions.json  <out>/summary.json

Prediction schema (``PREDICTION_SCHEMA``; one row per input image):

==========================  ==================  =========================================================
column                      type                meaning
==========================  ==================  =========================================================
``path``                    string              input URI (shards: the ``path`` stored in the shard)
``status``                  string              ``ok`` or ``error``
``error``                   string              null when ok; else ``<kind>: <detail>`` with kind one of
                                                ``read_error``, ``empty``, ``not_an_image``, ``too_large``,
                                                ``decode_error`` (decoder reasons map onto these kinds:
                                                :func:`breakhis_ray.data.decode.error_text`)
``prob_malignant``          float32             softmax probability of ``malignant``; null on error
``pred_label``              string              ``benign`` or ``malignant``; null on error
``patient_id``              string              BreakHis patient folder from the file name, else null
``magnification``           int16               40/100/200/400 from a BreakHis name, else null
``label``                   string              true label from a BreakHis name, else null
``image_height``            int32               decoded size before resizing; null on error
``image_width``             int32
``nuclei_count``            int32               nuclear features at the segmenter's input size; null
``nuclear_area_fraction``   float32             without a segmenter or on error
``mean_nuclear_area_px``    float32
``std_nuclear_area_px``     float32
``mean_hematoxylin``        float32
``mask_uri``                string              nuclei mask PNG when ``write_masks=true``, else null
``heatmap_uri``             string              class-activation overlay PNG with ``--explain gradcam`` or
                                                ``gradcam++`` (raw map beside it: ``*_raw.png``); null
                                                without it and on error
``classifier_checkpoint``   string              ``--classifier`` as given
``segmenter_checkpoint``    string              ``--segmenter`` as given (or null)
``run_id``                  string              id of the run that wrote the row
``processed_at``            timestamp[us, UTC]  when the model stage processed the row
==========================  ==================  =========================================================

A subtype classifier (checkpoint ``task: subtype``) writes :data:`SUBTYPE_PREDICTION_SCHEMA`: the columns above
plus, right after ``pred_label``, ``pred_subtype`` (string: the most probable of the eight subtypes; null on
error) and one float32 ``prob_<subtype>`` per subtype (:data:`SUBTYPE_PROB_COLUMNS`, in
:data:`~breakhis_ray.domain.SUBTYPE_CLASSES` order, summing to 1; null on error). Its ``prob_malignant`` is the
sum of the four malignant subtypes' probabilities and ``pred_label`` thresholds that at 0.5. A binary
classifier's output has exactly :data:`PREDICTION_SCHEMA` (the subtype columns are absent, not null).
Probabilities are calibrated when the checkpoint carries a temperature (``meta.json`` ``calibration``), and
averaged over flips and quarter turns with ``tta: true``.
"""

from __future__ import annotations

import pyarrow as pa

from breakhis_ray.domain import SUBTYPE_CLASSES

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("prob_malignant", pa.float32()),
        pa.field("pred_label", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("magnification", pa.int16()),
        pa.field("label", pa.string()),
        pa.field("image_height", pa.int32()),
        pa.field("image_width", pa.int32()),
        pa.field("nuclei_count", pa.int32()),
        pa.field("nuclear_area_fraction", pa.float32()),
        pa.field("mean_nuclear_area_px", pa.float32()),
        pa.field("std_nuclear_area_px", pa.float32()),
        pa.field("mean_hematoxylin", pa.float32()),
        pa.field("mask_uri", pa.string()),
        pa.field("heatmap_uri", pa.string()),
        pa.field("classifier_checkpoint", pa.string()),
        pa.field("segmenter_checkpoint", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("processed_at", pa.timestamp("us", tz="UTC")),
    ]
)
"""The output contract of ``infer`` (see the module docstring for the meaning of every column)."""

#: The subtype task's probability columns, in class order.
SUBTYPE_PROB_COLUMNS: tuple[str, ...] = tuple(f"prob_{name}" for name in SUBTYPE_CLASSES)
#: Columns a subtype classifier adds after ``pred_label``.
SUBTYPE_COLUMNS: tuple[str, ...] = ("pred_subtype", *SUBTYPE_PROB_COLUMNS)


def _with_subtype_columns(schema: pa.Schema) -> pa.Schema:
    fields = list(schema)
    at = schema.get_field_index("pred_label") + 1
    extra = [pa.field("pred_subtype", pa.string())] + [pa.field(c, pa.float32()) for c in SUBTYPE_PROB_COLUMNS]
    return pa.schema(fields[:at] + extra + fields[at:])


#: The output of a subtype classifier: :data:`PREDICTION_SCHEMA` plus :data:`SUBTYPE_COLUMNS` after ``pred_label``.
SUBTYPE_PREDICTION_SCHEMA = _with_subtype_columns(PREDICTION_SCHEMA)


def schema_for(names) -> pa.Schema:
    """The prediction schema of a table or file with column ``names`` (subtype columns or not)."""
    return SUBTYPE_PREDICTION_SCHEMA if "pred_subtype" in set(names) else PREDICTION_SCHEMA

FEATURE_COLUMNS = (
    "nuclei_count",
    "nuclear_area_fraction",
    "mean_nuclear_area_px",
    "std_nuclear_area_px",
    "mean_hematoxylin",
)
CLASSICAL_SEGMENTERS = ("threshold", "watershed")
PREDICTIONS_DIR = "predictions"
MASKS_DIR = "masks"
HEATMAPS_DIR = "heatmaps"
PLAN_FILE = "_plan.json"
PLAN_FORMAT = "breakhis-ray-predictions"
#: Internal column carrying each row's chunk id from the work units to the writer (never written).
CHUNK_COLUMN = "_chunk"
