"""Parts of the evaluation section built from the evaluate JSON's additions: the protocol and threshold notes,
calibration (reliability diagram), patient aggregation and the eight-subtype task.

Every number with a ``ci95`` entry is shown with its 95% interval in brackets (patient bootstrap).
"""

from __future__ import annotations

from typing import Any, Mapping

from markupsafe import Markup

from breakhis_ray.report import html, plots
from breakhis_ray.report.context import Context
from breakhis_ray.report.html import ci_text

_MODE_TEXT = {"specific": "magnification-specific (one model per magnification)",
              "independent": "magnification-independent (one model for all magnifications)"}
_SPLIT_TEXT = {"patient": "patient split (patient-disjoint folds)",
               "official": "official BreakHis folds (patient-disjoint)",
               "image": "image split (patients shared between training and test: leaky)"}


def report_threshold(ctx: Context) -> tuple[float, str]:
    """The threshold the evaluation locked and its rule (metrics JSON), else the report config's (fixed)."""
    locked = ((ctx.metrics or {}).get("overall") or {}).get("threshold")
    if isinstance(locked, Mapping) and isinstance(locked.get("value"), (int, float)):
        return float(locked["value"]), str(locked.get("rule", "fixed"))
    return ctx.cfg.threshold, "fixed"


def protocol_note(metrics: Mapping[str, Any]) -> Markup:
    """Where the numbers come from: split protocol, task, magnification mode, Benhammou's protocol name."""
    split = _SPLIT_TEXT.get(metrics.get("protocol") or "", "split protocol not stated (no splits file)")
    mode = metrics.get("magnification_mode")
    mode_text = _MODE_TEXT.get(mode or "", "magnification handling not known")
    task = metrics.get("task") or "binary"
    task_text = "eight subtypes" if task == "subtype" else "benign / malignant"
    name = metrics.get("benhammou_protocol")
    return html.note(Markup("<strong>Protocol of every number below:</strong> {}; task {} ({}); {}{}{}.")
                     .format(split, task, task_text, mode_text,
                             f" ({metrics['magnification_mode_note']})" if metrics.get("magnification_mode_note")
                             else "", Markup(", Benhammou et al.'s <strong>{}</strong>").format(name) if name else ""),
                     "warn" if metrics.get("protocol") == "image" else "")


def threshold_note(metrics: Mapping[str, Any]) -> Markup:
    """The locked threshold, its rule and where the validation predictions came from."""
    thr = (metrics.get("overall") or {}).get("threshold")
    if not isinstance(thr, Mapping):  # an evaluate JSON from before locked thresholds
        return html.note(f"Decision threshold {metrics.get('threshold', 0.5)} on P(malignant) (fixed).")
    value = thr.get("value")
    text = Markup("<strong>Decision threshold:</strong> {} on P(malignant), rule <code>{}</code>").format(
        f"{value:.4f}" if isinstance(value, (int, float)) else "n/a", thr.get("rule", "n/a"))
    if thr.get("per_fold"):
        text += Markup(", chosen per fold on that fold's validation predictions ({}; the value shown is their "
                       "mean)").format(", ".join(f"fold {t.get('fold')}: {t.get('value', 0):.4f}"
                                                 for t in thr["per_fold"]))
    elif thr.get("source"):
        sens, spec = thr.get("val_sensitivity"), thr.get("val_specificity")
        text += Markup(", chosen on {} ({} images; validation sensitivity {}%, specificity {}%)").format(
            thr["source"], thr.get("n_val_images", "n/a"), html.pct(sens), html.pct(spec))
    text += Markup(" and locked: the test predictions never move it.")
    return html.note(text, "warn" if thr.get("fallback") else "")


def interval_note(metrics: Mapping[str, Any]) -> Markup:
    boot = metrics.get("bootstrap") or {}
    if not boot.get("resamples"):
        return html.note("No confidence intervals (bootstrap.resamples=0).")
    over = " With several folds: the interval of the mean over folds (patients resampled within each fold)." \
        if metrics.get("mean_std") else ""
    return html.note(f"Brackets: 95% interval from a bootstrap over patients ({boot['resamples']} resamples, seed "
                     f"{boot.get('seed')}, percentile interval); the threshold stays locked.{over}")


def calibration_parts(ctx: Context, metrics: Mapping[str, Any]) -> list[Markup]:
    scopes = [("overall", metrics.get("overall") or {})]
    scopes += [(f"{m}X", v) for m, v in (metrics.get("per_magnification") or {}).items() if v.get("n_images")]
    with_cal = [(name, v) for name, v in scopes if isinstance(v.get("calibration"), Mapping)]
    if not with_cal:
        return []
    bins = with_cal[0][1]["calibration"].get("bins", "n/a")
    rows = [[name, v.get("n_images", "n/a"),
             ci_text(v["calibration"].get("ece"), (v.get("ci95") or {}).get("ece"), percent=False),
             ci_text(v["calibration"].get("brier"), (v.get("ci95") or {}).get("brier"), percent=False)]
            for name, v in with_cal]
    curves = {name: v["calibration"].get("reliability") or [] for name, v in with_cal}
    return [html.heading("Calibration"),
            html.paragraph(f"Expected calibration error over {bins} equal-width bins of P(malignant) (the gap between "
                           "mean predicted probability and observed share of malignant images, weighted by the "
                           "bin's images) and Brier score (mean squared error of P(malignant)); lower is better."),
            html.table_html(["scope", "images", "ECE", "Brier"], rows),
            ctx.figures.add("reliability", plots.reliability_diagram(curves),
                            f"Reliability diagram, overall and per magnification ({bins} bins; points on the "
                            "diagonal are calibrated; bars: images per bin)"
                            + (", bins pooled over the folds' test predictions." if metrics.get("mean_std") else "."))]


_AGG_TEXT = {"mean": "mean probability ≥ threshold", "majority": "at least half of the images called malignant",
             "max": "highest image probability ≥ threshold"}


def aggregation_parts(metrics: Mapping[str, Any]) -> list[Markup]:
    agg = (metrics.get("overall") or {}).get("patient_aggregation")
    if not isinstance(agg, Mapping) or not agg:
        return []
    keys = ("accuracy", "balanced_accuracy", "recall", "specificity", "f1", "roc_auc")
    rows = []
    for rule, v in agg.items():
        ci = v.get("ci95") or {}
        rows.append([rule, _AGG_TEXT.get(rule, ""), v.get("n_patients", "n/a"),
                     *[ci_text(v.get(k), ci.get(k)) for k in keys]])
    return [html.heading("Patient diagnosis: three ways to pool a patient's images"),
            html.table_html(["rule", "patient is malignant when", "patients", "accuracy %", "balanced acc. %",
                             "sensitivity %", "specificity %", "F1 %", "ROC AUC %"], rows)]


def subtype_parts(ctx: Context, metrics: Mapping[str, Any]) -> list[Markup]:
    overall = metrics.get("overall") or {}
    classes = overall.get("classes")
    if not classes:
        return []
    ci = overall.get("ci95") or {}
    patient = overall.get("patient_level") or {}
    parts = [html.heading("Eight-subtype task"),
             html.paragraph(Markup("Image level: macro F1 {}%, balanced accuracy {}%, accuracy {}%. Patient level "
                                   "(most probable class of the mean class probabilities): macro F1 {}%, balanced "
                                   "accuracy {}% over {} patients.").format(
                 ci_text(overall.get("macro_f1"), ci.get("macro_f1")),
                 ci_text(overall.get("subtype_balanced_accuracy"), ci.get("subtype_balanced_accuracy")),
                 ci_text(overall.get("subtype_accuracy"), ci.get("subtype_accuracy")),
                 html.pct(patient.get("macro_f1")), html.pct(patient.get("subtype_balanced_accuracy")),
                 patient.get("n_patients", "n/a")))]
    rows = []
    for name in classes:
        img = (overall.get("per_class") or {}).get(name) or {}
        pat = (patient.get("per_class") or {}).get(name) or {}
        rows.append([name, img.get("support", 0), html.pct(img.get("precision")), html.pct(img.get("recall")),
                     html.pct(img.get("f1")), pat.get("support", 0), html.pct(pat.get("recall")),
                     html.pct(pat.get("f1"))])
    parts.append(html.table_html(["subtype", "images", "precision %", "recall %", "F1 %", "patients",
                                  "patient recall %", "patient F1 %"], rows))
    matrices = {"images": overall.get("confusion_matrix")}
    if patient.get("confusion_matrix"):
        matrices["patients"] = patient["confusion_matrix"]
    parts.append(ctx.figures.add("subtype-confusion", plots.confusion_matrices(matrices, labels=classes),
                                 "Subtype confusion matrices (rows: true subtype, columns: predicted), images and "
                                 "patients" + (", summed over folds." if metrics.get("mean_std") else ".")))
    return parts


__all__ = ["aggregation_parts", "calibration_parts", "interval_note", "protocol_note", "report_threshold",
           "subtype_parts", "threshold_note"]
