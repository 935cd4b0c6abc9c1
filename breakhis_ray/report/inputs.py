"""Reading the report's inputs: JSON files, result tables, class x magnification tables, run histories, tiles.

An input that is given but unreadable raises :class:`~breakhis_ray.errors.DataError` naming the file.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pandas as pd

from breakhis_ray import storage
from breakhis_ray.domain import MAGNIFICATIONS
from breakhis_ray.errors import DataError


def read_json(uri: str, what: str) -> Any:
    """The JSON document at ``uri``; ``what`` names it in the error message."""
    text = storage.read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} {uri} is not valid JSON: {exc.msg} at line {exc.lineno}") from None


def _records(obj: Any, uri: str) -> list[dict]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        for key in ("trials", "results", "rows", "records", "data"):
            if isinstance(obj.get(key), list):
                return obj[key]
    raise DataError(f"{uri} holds no list of records (expected a list, or a 'trials'/'results' list)")


def read_table(uri: str) -> pd.DataFrame:
    """A results table from Parquet, CSV or JSON (a list of records, or under ``trials``/``results``)."""
    lower = uri.lower()
    if lower.endswith(".parquet") or storage.is_dir(uri):
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = [uri] if not storage.is_dir(uri) else storage.list_files(uri, [".parquet"])
        if not files:
            raise DataError(f"no *.parquet file under {uri}")
        frames = []
        for file in files:
            try:
                frames.append(pq.read_table(pa.BufferReader(storage.read_bytes(file))).to_pandas())
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{file} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None
        return pd.concat(frames, ignore_index=True)
    if lower.endswith(".csv"):
        try:
            return pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
        except (ValueError, pd.errors.ParserError) as exc:
            raise DataError(f"{uri} is not a readable CSV file: {str(exc).splitlines()[0]}") from None
    return pd.DataFrame.from_records(_records(read_json(uri, "grid"), uri))


def frame_from_json(obj: Any) -> pd.DataFrame | None:
    """A class x magnification table from JSON: ``{"columns", "data"[, "index"]}``, records or dict of dicts."""
    df = None
    if isinstance(obj, dict) and "columns" in obj and "data" in obj:
        df = pd.DataFrame(obj["data"], columns=obj["columns"], index=obj.get("index"))
    elif isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        df = pd.DataFrame.from_records(obj)
        for col in df.columns:
            if str(col).lower() in ("magnification", "mag"):
                df = df.set_index(col)
                break
    elif isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        df = pd.DataFrame.from_dict(obj, orient="index")
    if df is None or df.empty:
        return None
    df.columns = [str(c).capitalize() if str(c).lower() in ("benign", "malignant", "total") else str(c)
                  for c in df.columns]
    df.index = [f"{i}X" if str(i).isdigit() else str(i).capitalize() if str(i).lower() == "total" else str(i)
                for i in df.index]
    return df


def history_from_run(run_dir: str) -> tuple[list[dict], str, dict | None]:
    """Per-epoch metrics of a run directory; returns ``(history, source, result_json)``.

    ``history.json`` first, else the latest checkpoint's ``train_state.pt`` history, else the metrics kept
    with ``result.json``'s ``kept_checkpoints`` (partial).
    """
    result = None
    result_uri = storage.join(run_dir, "result.json")
    if storage.exists(result_uri):
        result = read_json(result_uri, "training result")
    history_uri = storage.join(run_dir, "history.json")
    if storage.exists(history_uri):
        data = read_json(history_uri, "training history")
        history = data.get("history", []) if isinstance(data, dict) else data
        return [h for h in history if isinstance(h, dict)], "history.json", result
    if result is None:
        raise DataError(f"training run {run_dir} has neither history.json nor result.json")
    latest = result.get("latest_checkpoint")
    if latest and storage.exists(latest):
        from breakhis_ray.checkpoint import load_train_state

        state = load_train_state(latest)
        if state and state.get("history"):
            return list(state["history"]), "latest checkpoint train_state.pt", result
    kept = [m for m in result.get("kept_checkpoints") or [] if isinstance(m, dict)]
    return sorted(kept, key=lambda m: m.get("epoch", 0)), "result.json kept checkpoints (partial)", result


def reference_table() -> pd.DataFrame:
    """Tab. 1 of the full BreakHis, from the per-patient counts shipped with the package."""
    from importlib import resources

    text = resources.files("breakhis_ray.data").joinpath("resources/patients.tsv").read_text("utf-8")
    counts = pd.read_csv(io.StringIO(text), sep="\t")
    table = counts.groupby("class")[[f"{m}X" for m in MAGNIFICATIONS]].sum().T
    table.columns = [str(c).capitalize() for c in table.columns]
    table["Total"] = table.sum(axis=1)
    table.loc["Total"] = table.sum(axis=0)
    return table


def read_tile(path: str, size: int = 320) -> np.ndarray | None:
    """A thumbnail of the image at ``path``; ``None`` when it cannot be read (shown as such in the grid)."""
    from PIL import Image

    from breakhis_ray.data.decode import decode_rgb
    from breakhis_ray.errors import StorageError

    try:
        pixels = decode_rgb(storage.read_bytes(path))
    except (StorageError, DataError):
        return None
    img = Image.fromarray(pixels)
    img.thumbnail((size, size))
    return np.asarray(img)
