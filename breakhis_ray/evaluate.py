"""``breakhis-ray evaluate``: BreakHis metrics from prediction Parquet joined with the manifest.

Inputs: the predictions written by ``infer`` (a Parquet file, or a directory of ``part-*.parquet``; files whose
name starts with ``_`` or ``.`` are skipped) and the manifest, read and joined by
:mod:`breakhis_ray.evaluation.tables`. Rows are joined on ``path``; the manifest's label, patient, subtype and
magnification win over the columns of the prediction file.

Evaluation set: every predicted image found in the manifest, or, with ``splits``, the images of ``split`` in
``fold``. Nothing is dropped silently; the output counts

* ``not_in_manifest``: predicted paths the manifest does not list (excluded);
* ``outside_split``: predicted manifest images outside the evaluated split (excluded; with ``splits`` only);
* ``without_prediction``: manifest images (or split images) that have no prediction row;
* ``n_errors``: prediction rows in error (``status != "ok"`` or no probability) within the evaluation set.
  They are excluded from every metric denominator (``error_policy``) and listed by kind.

Threshold: chosen on the validation predictions by ``threshold.rule`` (``fixed``, ``youden``,
``sensitivity``; :mod:`breakhis_ray.evaluation.thresholds`) and locked for the evaluated split, whose
predictions never move it. Validation predictions: ``val_predictions`` (one per prediction set), else, with
``splits``, the rows of the fold's ``val`` split found in ``predictions``; without either the rule falls back
to ``threshold.value`` and ``overall.threshold.rule`` says so.

Metrics (malignant = positive class) are given overall, per magnification (the BreakHis convention: one
model, four magnifications) and as recall per subtype. Each block (:func:`breakhis_ray.evaluation.metrics_block`)
holds :func:`breakhis_ray.metrics.compute_metrics`, ``ci95`` (patient bootstrap), ``calibration`` (ECE, Brier,
reliability bins), ``patient_aggregation`` (mean / majority / max) and, when the predictions carry the subtype
columns (``prob_<subtype>`` for the eight :data:`~breakhis_ray.domain.SUBTYPE_CLASSES`), the subtype task's
``classes``, ``macro_f1``, ``per_class``, ``patient_level`` and the 8x8 ``confusion_matrix``. With several
prediction sets (one per fold), ``folds`` holds each fold's result and ``mean_std`` the mean ± std over folds
(:func:`aggregate_folds`); ``overall``/``per_magnification`` then hold the fold means, with confusion matrices
and counts summed over folds and ``ci95`` the interval of the mean over folds.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from breakhis_ray.artifacts import write_provenance_beside, write_text_atomic
from breakhis_ray.config import EvaluateConfig
from breakhis_ray.domain import EVALUATION_PROTOCOLS, MAGNIFICATIONS
from breakhis_ray.errors import ConfigError, DataError
from breakhis_ray.evaluation import CI_LEVEL, Threshold, choose_threshold, fold_mean_block, metrics_block
from breakhis_ray.evaluation.tables import (  # read/join/prediction_files: public here too, as before
    SUBTYPE_PROB_COLUMNS,
    error_kind,
    frame_sample,
    join_predictions,
    prediction_files,
    read_predictions,
)
from breakhis_ray.metrics import format_mean_std, mean_std_over_folds

log = logging.getLogger(__name__)

ERROR_POLICY = "excluded_from_denominators"
PROTOCOL_NOTES = {
    "patient": "patient-disjoint folds: no patient has images in both training and test data",
    "official": "official BreakHis folds (dsfold*.txt): patient-disjoint",
    "image": "image-level split: images of one patient can sit in training and test data, which inflates "
             "accuracy on BreakHis (published image-level results 97-99.5% against 84-92% patient-level)",
}


# ---------------------------------------------------------------------------------------- metrics
def _metrics(rows: pd.DataFrame, threshold: float, options: Mapping[str, int]) -> dict[str, Any]:
    out = metrics_block(frame_sample(rows), threshold, **options)
    out["n_errors"] = int((~rows["ok"]).sum())
    return out


def _by_magnification(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    mags = sorted(set(MAGNIFICATIONS) | {int(m) for m in rows["magnification"].unique()})
    return {str(m): rows[rows["magnification"] == m] for m in mags}


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


def evaluate_frame(rows: pd.DataFrame, threshold: float | Threshold = 0.5, *, bins: int = 10,
                   resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics of joined rows (see :func:`join_predictions`): ``overall``, ``per_magnification``, ``per_subtype``.

    ``threshold``: a locked :class:`~breakhis_ray.evaluation.Threshold` (a plain number: rule ``fixed``);
    ``overall.threshold`` records it. ``bins``: ECE bins; ``resamples``/``seed``: the patient bootstrap.
    ``per_magnification`` always lists 40/100/200/400 (an empty one has ``n_images`` 0 and ``None`` metrics).
    """
    if not isinstance(threshold, Threshold):
        threshold = choose_threshold("fixed", value=float(threshold))
    value, options = threshold.value, {"bins": bins, "resamples": resamples, "seed": seed}
    errors = rows.loc[~rows["ok"]]
    kinds: dict[str, int] = {}
    for err, status in zip(errors["error"], errors["status"]):
        kind = error_kind(err, status)
        kinds[kind] = kinds.get(kind, 0) + 1
    overall = _metrics(rows, value, options)
    overall["threshold"] = threshold.as_dict()
    return {
        "overall": overall,
        "per_magnification": {m: _metrics(r, value, options) for m, r in _by_magnification(rows).items()},
        "per_subtype": _per_subtype(rows, value),
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
    threshold: float | Threshold = 0.5,
    eval_paths: pd.Series | None = None,
    **options: int,
) -> dict[str, Any]:
    """Evaluate one prediction set against the manifest (optionally only ``eval_paths``) at a locked threshold
    (``options``: ``bins``, ``resamples``, ``seed`` of :func:`evaluate_frame`)."""
    return _evaluate_set(predictions, manifest, threshold, eval_paths, **options)[0]


def _evaluate_set(predictions: pd.DataFrame, manifest: pd.DataFrame, threshold: float | Threshold,
                  eval_paths: pd.Series | None, **options: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`evaluate_predictions` and the joined rows it evaluated."""
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
    joined = joined.reset_index(drop=True)
    result = evaluate_frame(joined, threshold, **options)
    counts["evaluated"] = int(joined["ok"].sum())
    counts["errors"] = result["n_errors"]
    result["counts"] = counts
    return result, joined


def validation_rows(cfg: EvaluateConfig, index: int, fold: int | None, predictions: pd.DataFrame,
                    manifest: pd.DataFrame, splits: pd.DataFrame | None,
                    eval_paths: pd.Series | None) -> tuple[pd.DataFrame | None, str | None]:
    """The joined validation predictions of prediction set ``index`` and where they come from.

    ``val_predictions[index]`` (restricted to the fold's ``val`` split with ``splits``), else with ``splits``
    the fold's ``val`` rows of ``predictions``; ``(None, None)`` when neither exists. A validation image that
    is also in the evaluated set is an error (the threshold would see test data).
    """
    val_paths = None
    if splits is not None:
        val_paths = set(splits.loc[(splits["fold"] == fold) & (splits["split"] == "val"), "path"])
    if cfg.val_predictions:
        uri = cfg.val_predictions[index]
        rows, _ = join_predictions(read_predictions(uri), manifest)
        where = uri
        if val_paths is not None:
            rows = rows[rows["path"].isin(val_paths)]
            where = f"{uri} (split 'val' of fold {fold})"
        evaluated = set(eval_paths) if eval_paths is not None else set(predictions["path"])
        both = rows["path"].isin(evaluated)
        if both.any():
            raise DataError(f"{int(both.sum())} image(s) of the validation predictions {uri} are also in the "
                            f"evaluated set, e.g. {rows.loc[both, 'path'].iloc[0]}: the threshold would see test data")
        return rows, where
    if val_paths is None or cfg.split == "val":
        return None, None
    rows, _ = join_predictions(predictions, manifest)
    rows = rows[rows["path"].isin(val_paths)]
    if rows.empty:
        return None, None
    return rows, f"split 'val' of fold {fold}, from the same prediction files"


def lock_threshold(cfg: EvaluateConfig, val: pd.DataFrame | None, source: str | None) -> Threshold:
    """The threshold of ``cfg.threshold.rule`` on the usable validation rows (the fallback without them)."""
    section = cfg.threshold
    y = p = None
    if val is not None:
        ok = val[val["ok"]]
        y, p = ok["label_id"].to_numpy(dtype=np.int64), ok["prob_malignant"].to_numpy(dtype=np.float64)
    chosen = choose_threshold(section.rule, y, p, value=section.value,
                              target_sensitivity=section.target_sensitivity)
    log.info("threshold %.4f (%s) from %s", chosen.value, chosen.rule, source or "no validation predictions")
    return chosen


def _threshold_over_folds(per_fold: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``overall.threshold`` of several folds: each fold locked its own; ``value`` is their mean."""
    chosen = [dict(f["overall"]["threshold"], fold=f["fold"]) for f in per_fold]
    rules = list(dict.fromkeys(t["rule"] for t in chosen))
    return {"value": float(np.mean([t["value"] for t in chosen])),
            "rule": rules[0] if len(rules) == 1 else "; ".join(rules),
            "requested": chosen[0]["requested"], "fallback": any(t["fallback"] for t in chosen),
            "value_over_folds": "mean of the folds' thresholds; each fold was scored at its own (per_fold)",
            "per_fold": chosen}


def magnification_mode(setting: str, fold_rows: Sequence[pd.DataFrame]) -> tuple[str | None, str]:
    """``specific`` (one model per magnification) or ``independent`` (one model for all) and how it is known:
    the config's ``magnification_mode``, else the predictions' ``classifier_checkpoint`` per magnification."""
    if setting != "auto":
        return setting, "set in the evaluate config"
    if not all("classifier_checkpoint" in r.columns for r in fold_rows):
        return None, "unknown: the predictions carry no classifier_checkpoint column"
    independent = specific = True
    for rows in fold_rows:
        ok = rows[rows["ok"] & rows["classifier_checkpoint"].notna()]
        per_mag = ok.groupby("magnification")["classifier_checkpoint"].nunique()
        independent &= ok["classifier_checkpoint"].nunique() == 1
        specific &= bool(len(per_mag) > 1 and (per_mag == 1).all()
                         and ok["classifier_checkpoint"].nunique() == len(per_mag))
    if independent:
        return "independent", "one classifier checkpoint scored every magnification"
    if specific:
        return "specific", "one classifier checkpoint per magnification"
    return None, "unknown: the predictions mix classifier checkpoints across magnifications"


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


def _with_ci(value: Any, interval: Any) -> str:
    text = _fmt(value)
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and text != "n/a":
        text += f" [{interval[0] * 100:.1f}, {interval[1] * 100:.1f}]"
    return text


def _ci_plain(interval: Any) -> str:
    ok = isinstance(interval, (list, tuple)) and len(interval) == 2
    return f"[{interval[0]:.4f}, {interval[1]:.4f}]" if ok else ""


def format_summary(result: Mapping[str, Any]) -> str:
    """Threshold, 95% intervals, calibration and patient aggregation of ``overall``, a few lines."""
    overall, boot = result["overall"], result.get("bootstrap") or {}
    thr = overall.get("threshold") or {}
    ci = overall.get("ci95") or {}
    keys = ("accuracy", "balanced_accuracy", "f1", "roc_auc", "patient_accuracy", "macro_f1")
    lines = [f"threshold {thr.get('value', float('nan')):.4f} ({thr.get('rule')})",
             f"overall, % [95% CI: patient bootstrap, {boot.get('resamples')} resamples, seed {boot.get('seed')}]: "
             + ", ".join(f"{k} {_with_ci(overall.get(k), ci.get(k))}" for k in keys if k in overall)]
    cal = overall.get("calibration") or {}
    if cal:
        num = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
        lines.append(f"calibration ({cal.get('bins')} bins): ECE {num(cal.get('ece'))} {_ci_plain(ci.get('ece'))}, "
                     f"Brier {num(cal.get('brier'))} {_ci_plain(ci.get('brier'))}")
    agg = overall.get("patient_aggregation") or {}
    if agg:
        lines.append("patient diagnosis accuracy, %: " + ", ".join(
            f"{rule} {_with_ci(v.get('accuracy'), (v.get('ci95') or {}).get('accuracy'))}" for rule, v in agg.items()))
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
    if cfg.val_predictions and len(cfg.val_predictions) != len(cfg.predictions):
        raise ConfigError(f"val_predictions lists {len(cfg.val_predictions)} set(s) for {len(cfg.predictions)} "
                          "prediction set(s): give one per prediction set")
    options = {"bins": cfg.calibration.bins, "resamples": cfg.bootstrap.resamples, "seed": cfg.bootstrap.seed}
    per_fold, fold_rows, thresholds = [], [], []
    checkpoints: list[str] = []
    for index, (uri, fold) in enumerate(zip(cfg.predictions, folds)):
        eval_paths = None
        if splits is not None:
            eval_paths = splits.loc[(splits["fold"] == fold) & (splits["split"] == cfg.split), "path"]
        predictions = read_predictions(uri)
        if "classifier_checkpoint" in predictions.columns:  # where tracking finds the training run
            checkpoints.extend(predictions["classifier_checkpoint"].dropna().unique().tolist())
        val, val_source = validation_rows(cfg, index, fold, predictions, manifest, splits, eval_paths)
        threshold = lock_threshold(cfg, val, val_source)
        result, rows = _evaluate_set(predictions, manifest, threshold, eval_paths, **options)
        result["overall"]["threshold"]["source"] = val_source
        per_fold.append({"fold": fold, "predictions": uri, **result})
        fold_rows.append(rows)
        thresholds.append(threshold.value)

    task = "subtype" if all(c in fold_rows[0].columns for c in SUBTYPE_PROB_COLUMNS) else "binary"
    mode, mode_note = magnification_mode(cfg.magnification_mode, fold_rows)
    out: dict[str, Any] = {
        "positive_class": "malignant",
        "threshold": None,
        "threshold_rule": None,
        "protocol": protocol,
        "protocol_note": PROTOCOL_NOTES.get(protocol or "", "unknown: no splits file given"),
        "evaluation_set": _source_note(cfg, protocol, folds),
        "task": task,
        "magnification_mode": mode,
        "magnification_mode_note": mode_note,
        "benhammou_protocol": next((name for name, tm in EVALUATION_PROTOCOLS.items() if tm == (task, mode)),
                                   None),
        "bootstrap": {"unit": "patient", "resamples": cfg.bootstrap.resamples, "seed": cfg.bootstrap.seed,
                      "level": CI_LEVEL, "interval": "percentile",
                      "folds": "patients resampled within each fold; interval of the mean over folds"},
        "calibration_bins": cfg.calibration.bins,
        "error_policy": ERROR_POLICY,
        "sources": {"predictions": list(cfg.predictions), "val_predictions": cfg.val_predictions,
                    "manifest": cfg.manifest, "splits": cfg.splits},
        "n_folds": len(per_fold),
    }
    if len(per_fold) == 1:
        only = per_fold[0]
        out.update({k: v for k, v in only.items() if k not in ("predictions",)})
    else:
        summary = aggregate_folds(per_fold)
        out["aggregation"] = ("mean over folds (confusion matrices and counts: sums; ci95: interval of the mean "
                              "over folds)")
        out["overall"] = fold_mean_block([f["overall"] for f in per_fold], [frame_sample(r) for r in fold_rows],
                                         thresholds, **options)
        out["overall"]["threshold"] = _threshold_over_folds(per_fold)
        mags = list(dict.fromkeys(m for f in per_fold for m in f["per_magnification"]))
        out["per_magnification"] = {
            mag: fold_mean_block([f["per_magnification"][mag] for f in per_fold if mag in f["per_magnification"]],
                                 [frame_sample(_by_magnification(r).get(mag, r.iloc[:0])) for r in fold_rows],
                                 thresholds, **options)
            for mag in sorted(mags, key=int)
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
    out["threshold"] = out["overall"]["threshold"]["value"]
    out["threshold_rule"] = out["overall"]["threshold"]["rule"]
    out = _json_safe(out)
    write_text_atomic(cfg.out, json.dumps(out, indent=2, allow_nan=False))
    write_provenance_beside(cfg.out, cfg)
    _log_summary(out, per_fold, protocol)
    log.info("wrote %s", cfg.out)
    if cfg.tracking.mlflow_uri:
        from breakhis_ray.tracking import log_evaluation

        log_evaluation(cfg.tracking, cfg.out, out, list(dict.fromkeys(checkpoints)))
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
    log.info("%s", format_summary(out))


__all__ = [
    "ERROR_POLICY",
    "SUBTYPE_PROB_COLUMNS",
    "aggregate_folds",
    "evaluate_frame",
    "evaluate_predictions",
    "format_summary",
    "format_table",
    "frame_sample",
    "join_predictions",
    "lock_threshold",
    "magnification_mode",
    "prediction_files",
    "read_predictions",
    "run_evaluate",
    "validation_rows",
]
