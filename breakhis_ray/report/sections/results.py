"""The result sections: training curves, evaluation (tables, confusion matrices, ROC), sample predictions."""

from __future__ import annotations

import posixpath
from typing import Any, Mapping

import numpy as np
import pandas as pd
from markupsafe import Markup

from breakhis_ray import storage
from breakhis_ray.domain import BENIGN, LABEL_IDS, MALIGNANT
from breakhis_ray.papers import METRIC_LABELS
from breakhis_ray.report import html, plots
from breakhis_ray.report.context import Context
from breakhis_ray.report.html import ci_suffix, ci_text, mean_std_text, pct
from breakhis_ray.report.inputs import history_from_run, read_tile
from breakhis_ray.report.sections import evaluation as extras

#: Metric columns of the evaluation table, in order.
EVAL_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "balanced_accuracy",
                "patient_recognition_rate", "patient_accuracy")


# ------------------------------------------------------------------------------------------ training
def _run_name(run_dir: str, train_runs: list[str], taken: Mapping[str, Any]) -> str:
    """The run's folder name; its parent too when two runs share a name; primed while still taken."""
    parts = str(run_dir).rstrip("/").split("/")
    name = parts[-1] or str(run_dir)
    if any(posixpath.basename(str(d).rstrip("/")) == name for d in train_runs if d != run_dir):
        name = "/".join(parts[-2:])  # same run name under two storage paths
    while name in taken:
        name += "'"
    return name


def training(ctx: Context) -> Markup:
    cfg = ctx.cfg
    if not cfg.train_runs:
        return html.skipped("train_runs", Markup("Set <code>train_runs=[DIR, ...]</code> to training run "
                                                 "directories (each with history.json or result.json)."))
    runs: dict[str, list[dict]] = {}
    rows = []
    for run_dir in cfg.train_runs:
        history, source, result = history_from_run(run_dir)
        name = _run_name(run_dir, cfg.train_runs, runs)
        runs[name] = history
        last = history[-1] if history else {}
        best = max((h.get("val_accuracy") for h in history if isinstance(h.get("val_accuracy"), (int, float))),
                   default=None)
        speeds = [h["train_images_per_s"] for h in history if isinstance(h.get("train_images_per_s"), (int, float))]
        rows.append([name, len(history), pct(last.get("train_accuracy")), pct(last.get("val_accuracy")),
                     pct(best), pct(last.get("val_balanced_accuracy")),
                     f"{last['val_loss']:.4f}" if isinstance(last.get("val_loss"), (int, float)) else "n/a",
                     f"{np.mean(speeds):.1f}" if speeds else "n/a", source,
                     (result or {}).get("best_checkpoint") or "n/a"])
        config_uri = storage.join(run_dir, "config.yaml")
        if storage.exists(config_uri):
            ctx.run_configs.append((f"training run {name}: config.yaml", storage.read_text(config_uri)))
    return html.join([
        html.table_html(["run", "epochs", "final train acc %", "final val acc %", "best val acc %",
                         "final val bal. acc %", "final val loss", "train img/s", "history from",
                         "best checkpoint"], rows),
        ctx.figures.add("training-curves", plots.training_curves(runs),
                        "Accuracy and loss per epoch (solid: training, dashed: validation), as in "
                        "CancerNet Figs. 3-4."),
    ])


# ---------------------------------------------------------------------------------------- evaluation
def metric_rows(metrics: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the evaluation table: overall, then per magnification (mean ± std over folds), each
    value with its 95% interval where the JSON has one; macro F1 too in the subtype task."""
    summary = metrics.get("mean_std")
    scopes = [("overall", metrics.get("overall") or {}, (summary or {}).get("overall"))]
    for mag, values in (metrics.get("per_magnification") or {}).items():
        scopes.append((f"{mag}X", values, ((summary or {}).get("per_magnification") or {}).get(mag)))
    keys = EVAL_METRICS + (("macro_f1",) if (metrics.get("overall") or {}).get("classes") else ())
    labels = {**METRIC_LABELS, "macro_f1": "subtype macro F1"}
    headers = ["scope", "images", "patients", "errors", *[f"{labels[k]} %" for k in keys]]
    rows = []
    for name, values, stats in scopes:
        ci = values.get("ci95") or {}
        cells = [mean_std_text(stats.get(k)) + ci_suffix(ci.get(k)) if stats else ci_text(values.get(k), ci.get(k))
                 for k in keys]
        rows.append([name, values.get("n_images", "n/a"), values.get("n_patients", "n/a"),
                     values.get("n_errors", 0), *cells])
    return headers, rows


def labelled_predictions(ctx: Context) -> pd.DataFrame | None:
    """Predictions with ``label_id`` (manifest labels when a manifest is given, else the file's ``label``)."""
    pred = ctx.predictions
    if pred is None:
        return None
    if ctx.manifest is not None:
        from breakhis_ray.evaluate import join_predictions

        joined, _ = join_predictions(pred, ctx.manifest)
        return joined
    out = pred.copy()
    out["ok"] = (out["status"] == "ok") & out["prob_malignant"].notna()
    out["label_id"] = out["label"].map(LABEL_IDS) if "label" in out.columns else np.nan
    return out


def _metrics_parts(ctx: Context, metrics: Mapping[str, Any]) -> list[Markup]:
    protocol = metrics.get("protocol")
    kind = "warn" if protocol == "image" else ""
    parts = [html.note(Markup("<strong>Evaluation set:</strong> {}. <strong>Split protocol:</strong> {} ({}).")
                       .format(metrics.get("evaluation_set", "n/a"), protocol or "not stated",
                               metrics.get("protocol_note", "")), kind),
             extras.protocol_note(metrics), extras.threshold_note(metrics), extras.interval_note(metrics)]
    n_folds = metrics.get("n_folds", 1)
    if metrics.get("mean_std"):
        parts.append(html.note(f"Values are mean ± std over {n_folds} folds; images, patients and errors are "
                               "totals over folds."))
    n_err = metrics.get("n_errors", 0)
    kinds = ", ".join(f"{k}: {v}" for k, v in (metrics.get("errors_by_kind") or {}).items())
    parts.append(html.paragraph(
        Markup("{} prediction(s) in error, excluded from the metric denominators (policy <code>{}</code>){}.")
        .format(n_err, metrics.get("error_policy", "n/a"), " — " + kinds if kinds else "")))
    counts = metrics.get("counts")
    if isinstance(counts, dict):
        parts.append(html.table_html(["count", "value"], [[k, v] for k, v in counts.items()]))
    headers, rows = metric_rows(metrics)
    parts += [html.heading("Overall and per magnification (malignant = positive class)"),
              html.table_html(headers, rows)]
    def binary(values: Mapping[str, Any]) -> Any:  # the subtype task keeps the 2x2 one beside its 8x8
        return values.get("binary_confusion_matrix", values.get("confusion_matrix"))

    matrices = {"overall": binary(metrics.get("overall") or {})}
    for mag, values in (metrics.get("per_magnification") or {}).items():
        matrices[f"{mag}X"] = binary(values)
    parts.append(ctx.figures.add("confusion-matrices", plots.confusion_matrices(matrices),
                                 "Confusion matrices (rows: true class, columns: predicted), overall and "
                                 "per magnification."))
    per_mag = {f"{m}X": v for m, v in (metrics.get("per_magnification") or {}).items()}
    errors = None
    summary = metrics.get("mean_std")
    if summary:
        errors = {f"{m}X": {k: (e or {}).get("std") for k, e in s.items()}
                  for m, s in (summary.get("per_magnification") or {}).items()}
    if per_mag:
        parts.append(ctx.figures.add(
            "per-magnification", plots.metric_bars(per_mag, ["accuracy", "patient_recognition_rate",
                                                             "patient_accuracy", "f1"],
                                                   errors=errors, title="Per magnification"),
            "Image recognition rate (accuracy), patient recognition rate, patient diagnosis accuracy and F1 "
            "per magnification" + (" (error bars: std over folds)." if errors else ".")))
    parts += extras.aggregation_parts(metrics)
    parts += extras.calibration_parts(ctx, metrics)
    parts += extras.subtype_parts(ctx, metrics)
    subtypes = metrics.get("per_subtype") or {}
    if subtypes:
        rows = [[name, v.get("label", ""), v.get("n_images", "n/a"), v.get("n_patients", "n/a"),
                 pct(v.get("recall"))] for name, v in subtypes.items()]
        parts += [html.heading("Recall per subtype"),
                  html.paragraph("Share of each subtype's images predicted as its own class (benign subtypes: "
                                 "specificity; malignant subtypes: sensitivity)."),
                  html.table_html(["subtype", "class", "images", "patients", "recall %"], rows)]
    return parts


def _roc_figure(ctx: Context, labelled: pd.DataFrame) -> Markup:
    from breakhis_ray.metrics import roc_auc

    ok = labelled[labelled["ok"] & labelled["label_id"].notna()]
    groups = [("all magnifications", ok)]
    if "magnification" in ok.columns:
        groups += [(f"{int(m)}X", ok[ok["magnification"] == m])
                   for m in sorted(ok["magnification"].dropna().unique())]
    curves = {}
    for name, rows in groups:
        y, s = rows["label_id"].astype(int).to_numpy(), rows["prob_malignant"].to_numpy(dtype=float)
        fpr, tpr, _ = plots.roc_curve(y, s)
        curves[name] = (fpr, tpr, roc_auc(y, s) if len(y) else None)
    undefined = [name for name, (fpr, _, _) in curves.items() if len(fpr) == 0]
    return ctx.figures.add("roc", plots.roc_plot(curves),
                           f"ROC curves from {len(ok):,} predictions with a known label, overall and per "
                           "magnification" + (f" (undefined, one class only: {', '.join(undefined)})"
                                              if undefined else "") + ".")


def evaluation(ctx: Context) -> Markup:
    if ctx.metrics is None:
        parts = [html.skipped("metrics", Markup("Set <code>metrics=PATH</code> to the JSON written by "
                                                "<code>breakhis-ray evaluate</code>."))]
    else:
        parts = _metrics_parts(ctx, ctx.metrics)
    labelled = labelled_predictions(ctx)
    if labelled is None:
        parts.append(html.skipped("predictions", Markup("The ROC curve is computed from "
                                                        "<code>predictions=PATH</code>.")))
    else:
        parts.append(_roc_figure(ctx, labelled))
    return html.join(parts)


# --------------------------------------------------------------------------------------- predictions
def pick_tiles(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` rows, balanced over the true class when known, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    if "label_id" in rows.columns and rows["label_id"].notna().any():
        picks = []
        groups = [g for _, g in rows.groupby("label_id")]
        per = -(-n // max(1, len(groups)))
        for g in groups:
            picks.append(g.iloc[np.sort(rng.permutation(len(g))[:per])])
        picked = pd.concat(picks)
        return picked.sort_values("path").head(n)
    return rows.iloc[np.sort(rng.permutation(len(rows))[:n])]


def predictions(ctx: Context) -> Markup:
    cfg = ctx.cfg
    labelled = labelled_predictions(ctx)
    if labelled is None:
        return html.skipped("predictions", Markup("Set <code>predictions=PATH</code> to the prediction Parquet "
                                                  "written by <code>breakhis-ray infer</code> (file or "
                                                  "directory)."))
    total, n_err = len(ctx.predictions), int((ctx.predictions["status"] != "ok").sum())
    parts = [html.paragraph(f"{total:,} prediction rows, {n_err} in error.")]
    if cfg.sample_tiles == 0:
        return html.join(parts + [html.note("sample_tiles=0: no tiles shown.")])
    candidates = labelled[labelled["ok"] & ~labelled["path"].astype(str).str.contains("#", regex=False)]
    if candidates.empty:
        return html.join(parts + [html.note("No successful prediction to show.")])
    picked = pick_tiles(candidates, cfg.sample_tiles, cfg.seed)
    threshold = extras.report_threshold(ctx)[0]
    tiles, rows = [], []
    for _, r in picked.iterrows():
        prob = float(r["prob_malignant"])
        pred = MALIGNANT if prob >= threshold else BENIGN
        true = None if pd.isna(r.get("label_id")) else (MALIGNANT if int(r["label_id"]) == 1 else BENIGN)
        correct = None if true is None else true == pred
        conf = prob if pred == MALIGNANT else 1.0 - prob
        mag = f" {int(r['magnification'])}X" if "magnification" in r and pd.notna(r.get("magnification")) else ""
        caption = f"true: {true or '?'} | pred: {pred}\np({pred}) = {conf:.1%}{mag}"
        tiles.append((read_tile(str(r["path"])), caption, correct))
        rows.append([posixpath.basename(str(r["path"])), true or "?", pred, f"{prob:.4f}",
                     "yes" if correct else ("no" if correct is False else "?")])
    parts.append(ctx.figures.add("prediction-tiles", plots.prediction_tiles(tiles),
                                 "Predicted tiles with the probability of the predicted class (green: correct, "
                                 "red: wrong), as in CancerNet Figs. 5-6."))
    parts.append(html.table_html(["file", "true", "predicted", "P(malignant)", "correct"], rows))
    return html.join(parts)
