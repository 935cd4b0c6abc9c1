"""The grid's results: one row per table cell from the trial records, the papers' tables as Markdown (mean ± std
over folds per protocol), and the files written under ``out``."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from breakhis_ray import storage
from breakhis_ray.artifacts import write_atomic, write_json
from breakhis_ray.config import ExperimentsConfig, ReportConfig, config_yaml
from breakhis_ray.experiments.plan import METRICS, TRIALS_DIR, Cell, GridInputs, record_uri
from breakhis_ray.papers import METRIC_LABELS, grid_columns


def finished_trials(out: str) -> set[str]:
    folder = storage.join(out, TRIALS_DIR)
    if not storage.exists(folder):
        return set()
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(folder, suffixes=[".json"])]
    return {n[:-len(".json")] for n in names if not n.startswith(".")}


def grid_rows(cfg: ExperimentsConfig, cells: list[Cell]) -> list[dict]:
    """One record per table cell whose trial has finished: settings, protocol, fold and test metrics."""
    records: dict[str, dict] = {}
    rows = []
    for cell in cells:
        if cell.trial_id not in records:
            uri = record_uri(cfg.out, cell.trial_id)
            if not storage.exists(uri):
                continue
            records[cell.trial_id] = json.loads(storage.read_text(uri))
        record = records[cell.trial_id]
        scores = record["scores"]
        metrics = scores["overall"] if cell.magnification == "all" else \
            scores["per_magnification"].get(cell.magnification, {})
        rows.append({**asdict(cell), **{k: metrics.get(k) for k in METRICS},
                     "epochs": record["epochs_completed"], "train_seconds": record["train_seconds"],
                     "run_dir": record["run_dir"], "history": record["history"],
                     "checkpoint": record["checkpoint"], "predictions": record["predictions"]})
    return rows



def fold_stats(folds: list[dict]) -> dict[str, dict]:
    """Mean ± std over folds (``metrics.mean_std_over_folds``); no std from a single fold."""
    from breakhis_ray.metrics import mean_std_over_folds

    stats = mean_std_over_folds(folds)
    return {k: {**v, "std": v["std"] if v["n"] > 1 else None} for k, v in stats.items()}


def format_tables(rows: list[dict], protocols: list[str]) -> str:
    """Markdown: per paper table, one line per setting, mean ± std over folds for each protocol side by side,
    and the accuracy gap image - patient when both protocols ran."""
    import pandas as pd

    from breakhis_ray.metrics import format_mean_std

    if not rows:
        return "(no finished trial yet)\n"
    df = pd.DataFrame(rows)
    blocks = []
    for name in dict.fromkeys(df["table"]):
        title, keys, metrics, percent = grid_columns(name)
        sub = df[df["table"] == name]
        ran = [p for p in protocols if p in set(sub["protocol"])]
        unit = " %" if percent else ""
        headers = [*keys, *[f"{p}: {METRIC_LABELS.get(m, m)}{unit}" for p in ran for m in metrics], "folds"]
        gap = "patient" in ran and "image" in ran and "accuracy" in metrics
        if gap:
            headers.append(f"accuracy gap image - patient{unit}")
        lines = [f"### {name}: {title}", "", "| " + " | ".join(headers) + " |",
                 "|" + "---|" * len(headers)]
        for key_values, group in sub.groupby(keys, sort=False):
            key_values = key_values if isinstance(key_values, tuple) else (key_values,)
            cells, means = [], {}
            for protocol in ran:
                folds = group[group["protocol"] == protocol]
                stats = fold_stats(folds[metrics].to_dict("records"))
                cells += [format_mean_std(stats, m, percent=percent, digits=2 if percent else 3) for m in metrics]
                means[protocol] = (stats.get("accuracy") or {}).get("mean")
            line = [*map(str, key_values), *cells, str(group["fold"].nunique())]
            if gap:
                diff = None if None in (means["image"], means["patient"]) else means["image"] - means["patient"]
                line.append("n/a" if diff is None else f"{diff * 100:+.2f}" if percent else f"{diff:+.3f}")
            lines.append("| " + " | ".join(line) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# ----------------------------------------------------------------------------------------- outputs
def _distribution(inputs: GridInputs) -> dict:
    """Tab. 1 (before) / Tab. 2 (after enhancement) per protocol and fold, from each prepare.json."""
    out: dict[str, Any] = {}
    for (protocol, fold), uri in inputs.prepare_summaries.items():
        summary = json.loads(storage.read_text(uri))
        out.setdefault(protocol, {})[f"fold{fold}"] = {"prepare_summary": uri, "tables": summary.get("tables")}
    return out


def _report_config(cfg: ExperimentsConfig, inputs: GridInputs, rows: list[dict]) -> ReportConfig:
    """A ready ``breakhis-ray report --config`` for this grid: its tables, Tab. 1/2 and CancerNet's curves."""
    first = (cfg.protocols[0], cfg.folds[0])
    curves = [r["run_dir"] for r in rows if r["table"] == "cancernet_tab1" and (r["protocol"], r["fold"]) == first]
    if not curves:
        curves = [r["run_dir"] for r in rows if (r["protocol"], r["fold"]) == first]
    return ReportConfig(
        out=storage.join(cfg.out, "report"),
        title="BreakHis experiment grid: the papers' tables under patient and image splits",
        data_source="synthetic" if cfg.synthetic is not None else "unspecified",
        manifest=inputs.manifest,
        prepare_summary=inputs.prepare_summaries[first],
        train_runs=list(dict.fromkeys(curves)),
        grid=storage.join(cfg.out, "grid.json"),
        configs=[storage.join(cfg.out, "config.yaml")],
    )


def write_outputs(cfg: ExperimentsConfig, inputs: GridInputs, rows: list[dict], tables: str) -> dict[str, str]:
    import pandas as pd

    uris = {name: storage.join(cfg.out, name) for name in
            ("grid.json", "grid.csv", "tables.md", "distribution.json", "report.yaml")}
    write_json(uris["grid.json"], rows)
    write_atomic(uris["grid.csv"], pd.DataFrame(rows).to_csv(index=False).encode())
    write_atomic(uris["tables.md"], tables.encode())
    write_json(uris["distribution.json"], _distribution(inputs))
    write_atomic(uris["report.yaml"], config_yaml(_report_config(cfg, inputs, rows)).encode())
    return uris
