"""``breakhis-ray evaluate``: BreakHis metrics from prediction Parquet joined with the manifest.

Inputs: the predictions written by ``infer`` (a Parquet file, or a directory of ``part-*.parquet``; files whose
name starts with ``_`` or ``.`` are skipped) and the manifest. Rows are joined on ``path``; the manifest's
label, patient, subtype and magnification win over the columns of the prediction file.

Evaluation set: every predicted image found in the manifest, or, with ``splits``, the images of ``split`` in
``fold``. Nothing is dropped silently; the output counts

* ``not_in_manifest``: predicted paths the manifest does not list (excluded);
* ``outside_split``: predicted manifest images outside the evaluated split (excluded; with ``splits`` only);
* ``without_prediction``: manifest images (or split images) that have no prediction row;
* ``n_errors``: prediction rows in error (``status != "ok"`` or no probability) within the evaluation set.
  They are excluded from every metric denominator (``error_policy``) and listed by kind.

Metrics (``breakhis_ray.metrics.compute_metrics``, malignant = positive class) are given overall, per
magnification (the BreakHis convention: one model, four magnifications) and as recall per subtype. With
several prediction sets (one per fold), ``folds`` holds each fold's result and ``mean_std`` the mean ± std
over folds (:func:`aggregate_folds`); ``overall``/``per_magnification`` then hold the fold means, with
``confusion_matrix``, ``n_images``, ``n_patients`` and ``n_errors`` summed over folds.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis_ray import storage
from breakhis_ray.artifacts import write_provenance_beside, write_text_atomic
from breakhis_ray.config import EvaluateConfig
from breakhis_ray.domain import MAGNIFICATIONS
from breakhis_ray.errors import ConfigError, DataError, StorageError
from breakhis_ray.metrics import METRIC_KEYS, compute_metrics, format_mean_std, mean_std_over_folds

log = logging.getLogger(__name__)

ERROR_POLICY = "excluded_from_denominators"
SUMMED_KEYS = ("confusion_matrix", "n_images", "n_patients", "n_errors")
PROTOCOL_NOTES = {
    "patient": "patient-disjoint folds: no patient has images in both training and test data",
    "official": "official BreakHis folds (dsfold*.txt): patient-disjoint",
    "image": "image-level split: images of one patient can sit in training and test data, which inflates "
             "accuracy on BreakHis (published image-level results 97-99.5% against 84-92% patient-level)",
}
_MANIFEST_COLUMNS = ("path", "label_id", "label", "subtype", "patient_id", "magnification")


# ----------------------------------------------------------------------------------------- reading
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


def _error_kind(row_error: Any, status: Any) -> str:
    if isinstance(row_error, str) and row_error:
        return row_error.split(":", 1)[0].strip() or "error"
    if status == "ok":
        return "missing_probability"
    return str(status) if isinstance(status, str) and status else "error"


def join_predictions(predictions: pd.DataFrame, manifest: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Predictions restricted to manifest paths, with the manifest's columns; plus join counts.

    Returned columns: the manifest's ``path, label_id, label, subtype, patient_id, magnification`` and the
    prediction's ``status, error, prob_malignant`` plus ``ok`` (bool: usable probability).
    """
    man = manifest.loc[:, list(_MANIFEST_COLUMNS)].drop_duplicates("path")
    in_manifest = predictions["path"].isin(man["path"])
    pred = predictions.loc[in_manifest, ["path", "status", "error", "prob_malignant"]
                           + (["label"] if "label" in predictions.columns else [])]
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
    joined["magnification"] = joined["magnification"].astype(int)
    joined["label_id"] = joined["label_id"].astype(int)
    counts = {
        "predictions": int(len(predictions)),
        "prediction_errors_total": int((predictions["status"] != "ok").sum()),
        "not_in_manifest": int((~in_manifest).sum()),
        "label_disagreements": disagree,
    }
    return joined, counts


# ---------------------------------------------------------------------------------------- metrics
def _metrics(rows: pd.DataFrame, threshold: float) -> dict[str, Any]:
    ok = rows[rows["ok"]]
    out = compute_metrics(ok["label_id"].to_numpy(), ok["prob_malignant"].to_numpy(),
                          patient_ids=ok["patient_id"].astype(str).to_numpy(), threshold=threshold)
    out["n_errors"] = int((~rows["ok"]).sum())
    return out


def _per_subtype(rows: pd.DataFrame, threshold: float) -> dict[str, dict[str, Any]]:
    """Recall per subtype: share of the subtype's images predicted as its own class (benign or malignant)."""
    out = {}
    ok = rows[rows["ok"]]
    for subtype in sorted(rows["subtype"].unique()):
        sub = ok[ok["subtype"] == subtype]
        all_rows = rows[rows["subtype"] == subtype]
        pred = (sub["prob_malignant"].to_numpy() >= threshold).astype(int)
        correct = int(np.sum(pred == sub["label_id"].to_numpy()))
        out[str(subtype)] = {
            "label": str(all_rows["label"].iloc[0]),
            "recall": correct / len(sub) if len(sub) else None,
            "n_correct": correct,
            "n_images": int(len(sub)),
            "n_patients": int(sub["patient_id"].nunique()),
            "n_errors": int(len(all_rows) - len(sub)),
        }
    return out


def evaluate_frame(rows: pd.DataFrame, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of joined rows (see :func:`join_predictions`): ``overall``, ``per_magnification``, ``per_subtype``.

    ``per_magnification`` always lists 40/100/200/400 (an empty one has ``n_images`` 0 and ``None`` metrics).
    """
    mags = sorted(set(MAGNIFICATIONS) | {int(m) for m in rows["magnification"].unique()})
    errors = rows.loc[~rows["ok"]]
    kinds: dict[str, int] = {}
    for err, status in zip(errors["error"], errors["status"]):
        kind = _error_kind(err, status)
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "overall": _metrics(rows, threshold),
        "per_magnification": {str(m): _metrics(rows[rows["magnification"] == m], threshold) for m in mags},
        "per_subtype": _per_subtype(rows, threshold),
        "n_errors": int(len(errors)),
        "errors_by_kind": dict(sorted(kinds.items())),
        "error_examples": [{"path": str(p), "error": None if e is None or e != e else str(e)}
                           for p, e in zip(errors["path"].head(5), errors["error"].head(5))],
    }


def aggregate_folds(folds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over folds (``metrics.mean_std_over_folds``).

    Given evaluate results (dicts with ``overall``), returns ``{"n_folds", "overall", "per_magnification",
    "per_subtype"}`` each holding ``{key: {"mean", "std", "n"}}``; given plain metric dicts, returns
    ``mean_std_over_folds(folds)``.
    """
    folds = list(folds)
    if not folds or "overall" not in folds[0]:
        return mean_std_over_folds(folds)
    mags: list[str] = []
    subtypes: list[str] = []
    for fold in folds:
        mags.extend(m for m in fold.get("per_magnification", {}) if m not in mags)
        subtypes.extend(s for s in fold.get("per_subtype", {}) if s not in subtypes)
    return {
        "n_folds": len(folds),
        "overall": mean_std_over_folds([f["overall"] for f in folds]),
        "per_magnification": {
            m: mean_std_over_folds([f["per_magnification"][m] for f in folds if m in f.get("per_magnification", {})])
            for m in sorted(mags, key=int)
        },
        "per_subtype": {
            s: mean_std_over_folds([f["per_subtype"][s] for f in folds if s in f.get("per_subtype", {})])
            for s in subtypes
        },
    }


def _fold_means(per_fold: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> dict[str, Any]:
    """One metrics dict from several folds: means of the rates, sums of the counts."""
    out: dict[str, Any] = {}
    keys = list(METRIC_KEYS) + ["n_errors"]
    for key in keys:
        if key in SUMMED_KEYS:
            values = [f.get(key) for f in per_fold if f.get(key) is not None]
            out[key] = (np.sum(np.asarray(values), axis=0).astype(int).tolist() if values else None)
        else:
            entry = summary.get(key)
            out[key] = entry["mean"] if entry else None
    return out


# ------------------------------------------------------------------------------------------ driver
def _resolve_folds(cfg: EvaluateConfig, splits: pd.DataFrame | None) -> list[int | None]:
    n_sets = len(cfg.predictions)
    if splits is None:
        if cfg.fold is not None:
            raise ConfigError("fold needs splits=PATH (the splits Parquet whose fold is evaluated)")
        return [None] * n_sets
    available = sorted(int(f) for f in splits["fold"].unique())
    folds = cfg.fold
    if folds is None:
        if n_sets == 1 and len(available) == 1:
            folds = available
        elif n_sets == len(available):
            folds = available
        else:
            raise ConfigError(f"{cfg.splits} holds folds {available}: set fold=N (or a list, one per prediction "
                              f"set; {n_sets} given)")
    if len(folds) != n_sets:
        raise ConfigError(f"fold lists {len(folds)} fold(s) for {n_sets} prediction set(s)")
    unknown = [f for f in folds if f not in available]
    if unknown:
        raise ConfigError(f"fold {unknown[0]} is not in {cfg.splits} (folds: {available})")
    return list(folds)


def evaluate_predictions(
    predictions: pd.DataFrame,
    manifest: pd.DataFrame,
    threshold: float = 0.5,
    eval_paths: pd.Series | None = None,
) -> dict[str, Any]:
    """Evaluate one prediction set against the manifest (optionally only ``eval_paths``)."""
    joined, counts = join_predictions(predictions, manifest)
    if eval_paths is not None:
        wanted = set(eval_paths)
        inside = joined["path"].isin(wanted)
        counts["outside_split"] = int((~inside).sum())
        joined = joined[inside]
        counts["without_prediction"] = int(len(wanted - set(joined["path"])))
        counts["evaluation_set_size"] = len(wanted)
    else:
        counts["without_prediction"] = int((~manifest["path"].isin(predictions["path"])).sum())
    result = evaluate_frame(joined.reset_index(drop=True), threshold)
    counts["evaluated"] = int(joined["ok"].sum())
    counts["errors"] = result["n_errors"]
    result["counts"] = counts
    return result


def _source_note(cfg: EvaluateConfig, protocol: str | None, folds: list[int | None]) -> str:
    if protocol is None:
        return ("every predicted image found in the manifest (no splits file given: the split protocol is "
                "not known to this evaluation)")
    named = ", ".join(str(f) for f in folds)
    return f"split '{cfg.split}' of fold(s) {named} in {cfg.splits} (protocol: {protocol})"


def _fmt(value: Any, percent: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * 100:.2f}" if percent else str(value)


TABLE_COLUMNS = (
    ("accuracy", "acc%"),
    ("precision", "prec%"),
    ("recall", "rec%"),
    ("f1", "f1%"),
    ("roc_auc", "auc%"),
    ("patient_recognition_rate", "PRR%"),
    ("patient_accuracy", "pat.acc%"),
)


def format_table(result: Mapping[str, Any]) -> str:
    """A compact text table: overall and per magnification (mean ± std when there are several folds)."""
    summary = result.get("mean_std")
    width = 16 if summary else 10
    header = (f"{'scope':<8}{'images':>8}{'patients':>9}{'errors':>7}"
              + "".join(f"{t:>{width}}" for _, t in TABLE_COLUMNS))
    lines = [header]
    scopes = [("overall", result["overall"], summary["overall"] if summary else None)]
    for mag, metrics in result["per_magnification"].items():
        scopes.append((f"{mag}X", metrics, summary["per_magnification"].get(mag) if summary else None))
    for name, metrics, stats in scopes:
        cells = []
        for key, _ in TABLE_COLUMNS:
            cells.append(format_mean_std(stats, key) if stats is not None else _fmt(metrics.get(key)))
        lines.append(f"{name:<8}{metrics.get('n_images') or 0:>8}{metrics.get('n_patients') or 0:>9}"
                     f"{metrics.get('n_errors') or 0:>7}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return None if math.isnan(value) or math.isinf(value) else value
    return obj


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """CLI stage: evaluate every prediction set, write the metrics JSON with ``<out>.config.yaml`` and
    ``<out>.versions.json`` beside it, and log a summary table."""
    from breakhis_ray.data.manifest import read_manifest

    manifest = read_manifest(cfg.manifest)
    splits, protocol = None, None
    if cfg.splits:
        from breakhis_ray.data.splits import load_splits

        splits = load_splits(cfg.splits, manifest)
        protocol = splits.attrs.get("protocol")
    folds = _resolve_folds(cfg, splits)
    per_fold = []
    for uri, fold in zip(cfg.predictions, folds):
        eval_paths = None
        if splits is not None:
            eval_paths = splits.loc[(splits["fold"] == fold) & (splits["split"] == cfg.split), "path"]
        result = evaluate_predictions(read_predictions(uri), manifest, cfg.threshold, eval_paths)
        result = {"fold": fold, "predictions": uri, **result}
        per_fold.append(result)

    out: dict[str, Any] = {
        "positive_class": "malignant",
        "threshold": cfg.threshold,
        "protocol": protocol,
        "protocol_note": PROTOCOL_NOTES.get(protocol or "", "unknown: no splits file given"),
        "evaluation_set": _source_note(cfg, protocol, folds),
        "error_policy": ERROR_POLICY,
        "sources": {"predictions": list(cfg.predictions), "manifest": cfg.manifest, "splits": cfg.splits},
        "n_folds": len(per_fold),
    }
    if len(per_fold) == 1:
        only = per_fold[0]
        out.update({k: v for k, v in only.items() if k not in ("predictions",)})
    else:
        summary = aggregate_folds(per_fold)
        out["aggregation"] = "mean over folds (confusion_matrix, n_images, n_patients, n_errors: sums)"
        out["overall"] = _fold_means([f["overall"] for f in per_fold], summary["overall"])
        out["per_magnification"] = {
            mag: _fold_means([f["per_magnification"][mag] for f in per_fold if mag in f["per_magnification"]],
                             stats)
            for mag, stats in summary["per_magnification"].items()
        }
        out["per_subtype"] = {
            s: {"label": next(f["per_subtype"][s]["label"] for f in per_fold if s in f["per_subtype"]),
                **{k: v["mean"] for k, v in stats.items()}}
            for s, stats in summary["per_subtype"].items()
        }
        out["n_errors"] = sum(f["n_errors"] for f in per_fold)
        kinds: dict[str, int] = {}
        for f in per_fold:
            for kind, n in f["errors_by_kind"].items():
                kinds[kind] = kinds.get(kind, 0) + n
        out["errors_by_kind"] = dict(sorted(kinds.items()))
        out["mean_std"] = summary
        out["folds"] = per_fold
    out = _json_safe(out)
    write_text_atomic(cfg.out, json.dumps(out, indent=2, allow_nan=False))
    write_provenance_beside(cfg.out, cfg)
    _log_summary(out, per_fold, protocol)
    log.info("wrote %s", cfg.out)
    return out


def _log_summary(out: Mapping[str, Any], per_fold: Sequence[Mapping[str, Any]], protocol: str | None) -> None:
    """The human summary of an evaluation: what was evaluated, what was excluded, the metric table."""
    log.info("evaluation set: %s", out["evaluation_set"])
    for fold in per_fold:
        c = fold["counts"]
        where = f"fold {fold['fold']}: " if fold["fold"] is not None else ""
        log.info("%s", f"{where}{c['predictions']} prediction row(s), {c['evaluated']} evaluated, "
                 f"{c['not_in_manifest']} not in the manifest, {c['without_prediction']} without prediction"
                 + (f", {c['outside_split']} outside the split" if "outside_split" in c else "")
                 + (f", {c['label_disagreements']} label disagreement(s) (manifest labels used)"
                    if c["label_disagreements"] else ""))
    if out["n_errors"]:
        kinds = ", ".join(f"{k}: {n}" for k, n in out["errors_by_kind"].items())
        log.info("%d prediction(s) in error excluded from the metric denominators (%s)", out["n_errors"], kinds)
    if protocol == "image":
        log.warning("%s", PROTOCOL_NOTES["image"])
    log.info("%s", format_table(out))


__all__ = [
    "ERROR_POLICY",
    "aggregate_folds",
    "evaluate_frame",
    "evaluate_predictions",
    "format_table",
    "join_predictions",
    "prediction_files",
    "read_predictions",
    "run_evaluate",
]
