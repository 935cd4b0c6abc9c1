"""Prediction tables: reading ``infer``'s Parquet, joining it with the manifest, and the arrays of a table.

``read_predictions(uri)`` reads a Parquet file, or every ``*.parquet`` below a directory (files whose name starts
with ``_`` or ``.`` are skipped); ``join_predictions`` keeps the rows the manifest lists and takes the
manifest's label, patient, subtype and magnification; ``frame_sample`` turns the usable rows into a
:class:`~breakhis_ray.evaluation.sample.Sample`. The subtype task's columns are ``prob_<subtype>`` for the
eight :data:`~breakhis_ray.domain.SUBTYPE_CLASSES` (all or none) and ``pred_subtype``.
"""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis_ray import storage
from breakhis_ray.domain import SUBTYPE_CLASSES
from breakhis_ray.errors import DataError, StorageError
from breakhis_ray.evaluation.sample import Sample, subtype_prob_column

#: The prediction columns of the subtype task: one probability per class, in SUBTYPE_CLASSES order.
SUBTYPE_PROB_COLUMNS = tuple(subtype_prob_column(name) for name in SUBTYPE_CLASSES)
_MANIFEST_COLUMNS = ("path", "label_id", "label", "subtype", "patient_id", "magnification")


def prediction_files(uri: str) -> list[str]:
    """The Parquet file ``uri``, or every ``*.parquet`` below the directory ``uri`` (sorted)."""
    if not storage.exists(uri):
        raise StorageError(f"predictions not found: {uri}")
    if not storage.is_dir(uri):
        return [uri]
    files = [f for f in storage.list_files(uri, [".parquet"])
             if not posixpath.basename(f).startswith(("_", "."))]
    if not files:
        raise DataError(f"no *.parquet prediction file under {uri}")
    return files


def read_predictions(uri: str) -> pd.DataFrame:
    """All prediction rows of a file or directory; needs columns ``path`` and ``prob_malignant``.

    A missing ``status`` column is derived (``ok`` where a probability exists). ``path`` must be unique.
    """
    frames = []
    for file in prediction_files(uri):
        try:
            table = pq.read_table(pa.BufferReader(storage.read_bytes(file)))
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{file} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None
        frames.append(table.to_pandas())
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    missing = [c for c in ("path", "prob_malignant") if c not in df.columns]
    if missing:
        raise DataError(f"{uri} is not a prediction file: missing column(s) {', '.join(missing)}")
    if "status" not in df.columns:
        df["status"] = np.where(df["prob_malignant"].notna(), "ok", "error")
    if "error" not in df.columns:
        df["error"] = None
    repeated = df["path"].duplicated()
    if repeated.any():
        path = df.loc[repeated, "path"].iloc[0]
        raise DataError(f"{uri} holds {int(repeated.sum())} repeated path(s), e.g. {path}: "
                        "predictions need one row per image")
    return df


def error_kind(row_error: Any, status: Any) -> str:
    if isinstance(row_error, str) and row_error:
        return row_error.split(":", 1)[0].strip() or "error"
    if status == "ok":
        return "missing_probability"
    return str(status) if isinstance(status, str) and status else "error"


def has_subtype_columns(predictions: pd.DataFrame) -> bool:
    """Whether ``predictions`` carry the subtype task's ``prob_<subtype>`` columns (all eight, or none)."""
    present = [c for c in SUBTYPE_PROB_COLUMNS if c in predictions.columns]
    if present and len(present) != len(SUBTYPE_PROB_COLUMNS):
        missing = [c for c in SUBTYPE_PROB_COLUMNS if c not in predictions.columns]
        raise DataError(f"predictions carry {len(present)} of the {len(SUBTYPE_PROB_COLUMNS)} subtype probability "
                        f"columns: missing {', '.join(missing)}")
    return bool(present)


def join_predictions(predictions: pd.DataFrame, manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Predictions restricted to manifest paths, with the manifest's columns; plus join counts.

    Returned columns: the manifest's ``path, label_id, label, subtype, patient_id, magnification`` and the
    prediction's ``status, error, prob_malignant`` (plus ``prob_<subtype>``, ``pred_subtype`` and
    ``classifier_checkpoint`` where present) plus ``ok`` (bool: usable probabilities).
    """
    man = manifest.loc[:, list(_MANIFEST_COLUMNS)].drop_duplicates("path")
    in_manifest = predictions["path"].isin(man["path"])
    subtypes = has_subtype_columns(predictions)
    extra = [c for c in (*SUBTYPE_PROB_COLUMNS, "pred_subtype", "classifier_checkpoint", "label")
             if c in predictions.columns]
    pred = predictions.loc[in_manifest, ["path", "status", "error", "prob_malignant", *extra]]
    pred = pred.rename(columns={"label": "label_in_prediction"})
    joined = pred.merge(man, on="path", how="left", validate="one_to_one")
    disagree = 0
    if "label_in_prediction" in joined.columns:
        known = joined["label_in_prediction"].notna()
        disagree = int((joined.loc[known, "label_in_prediction"] != joined.loc[known, "label"]).sum())
        joined = joined.drop(columns="label_in_prediction")
    prob = pd.to_numeric(joined["prob_malignant"], errors="coerce")
    joined["prob_malignant"] = prob.astype(np.float64)
    joined["ok"] = (joined["status"] == "ok") & prob.notna() & np.isfinite(prob.fillna(0.0))
    if subtypes:
        probs = joined.loc[:, list(SUBTYPE_PROB_COLUMNS)].apply(pd.to_numeric, errors="coerce").astype(np.float64)
        joined[list(SUBTYPE_PROB_COLUMNS)] = probs
        joined["ok"] &= np.isfinite(probs.to_numpy()).all(axis=1)
    joined["magnification"] = joined["magnification"].astype(int)
    joined["label_id"] = joined["label_id"].astype(int)
    counts = {
        "predictions": int(len(predictions)),
        "prediction_errors_total": int((predictions["status"] != "ok").sum()),
        "not_in_manifest": int((~in_manifest).sum()),
        "label_disagreements": disagree,
    }
    return joined, counts


def frame_sample(rows: pd.DataFrame) -> Sample:
    """The usable rows (``ok``) of joined predictions (:func:`join_predictions`) as arrays; with the subtype
    columns, the manifest's ``subtype`` becomes the true class id in :data:`SUBTYPE_CLASSES` order."""
    ok = rows[rows["ok"]]
    y, prob = ok["label_id"].to_numpy(dtype=np.int64), ok["prob_malignant"].to_numpy(dtype=np.float64)
    patients = ok["patient_id"].astype(str).to_numpy()
    if not all(c in ok.columns for c in SUBTYPE_PROB_COLUMNS):
        return Sample(y, prob, patients)
    ids = ok["subtype"].map({name: i for i, name in enumerate(SUBTYPE_CLASSES)})
    if ids.isna().any():
        bad = ok.loc[ids.isna(), "subtype"].iloc[0]
        raise DataError(f"manifest subtype {bad!r} is not one of the eight BreakHis subtypes "
                        f"({', '.join(SUBTYPE_CLASSES)}): the subtype predictions cannot be scored")
    return Sample(y, prob, patients, ids.to_numpy(dtype=np.int64),
                  ok.loc[:, list(SUBTYPE_PROB_COLUMNS)].to_numpy(dtype=np.float64), SUBTYPE_CLASSES)


__all__ = ["SUBTYPE_PROB_COLUMNS", "error_kind", "frame_sample", "has_subtype_columns", "join_predictions",
           "prediction_files", "read_predictions"]
