"""The resumable output of ``infer``: one Parquet part per chunk, the plan record, and reading it back.

Rows are gathered per chunk and each complete chunk is written atomically as
``<out>/predictions/part-<chunk>.parquet`` (:func:`breakhis_ray.artifacts.write_atomic`: temp file + rename
locally, one PUT on s3). A re-run with the same ``--out`` lists the existing parts and processes only the
missing chunks (:func:`done_chunks`), so a killed job ends, once re-run, with exactly one row per input.
``<out>/predictions/_plan.json`` pins the input list and the model settings (:func:`check_or_write_plan`);
a re-run with different ones is refused instead of mixing predictions.
"""

from __future__ import annotations

import json
import posixpath
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from breakhis_ray import storage
from breakhis_ray.artifacts import table_bytes, write_atomic
from breakhis_ray.config import InferConfig
from breakhis_ray.errors import ConfigError, DataError
from breakhis_ray.inference.plan import InputPlan
from breakhis_ray.inference.schema import (
    CHUNK_COLUMN,
    PLAN_FILE,
    PLAN_FORMAT,
    PREDICTION_SCHEMA,
    PREDICTIONS_DIR,
    schema_for,
)


def part_name(chunk: int) -> str:
    """File name of a chunk's part: ``part-00007.parquet``."""
    return f"part-{chunk:05d}.parquet"


def _chunk_of(uri: str) -> int | None:
    name = posixpath.basename(uri.replace("\\", "/"))
    if name.startswith("part-") and name.endswith(".parquet"):
        digits = name[len("part-"):-len(".parquet")]
        if digits.isdigit():
            return int(digits)
    return None


def plan_record(plan: InputPlan, cfg: InferConfig) -> dict:
    """What ``_plan.json`` pins: the inputs (count, digest, chunking) and every setting that changes a row."""
    return {
        "format": PLAN_FORMAT,
        "format_version": 1,
        "input": cfg.input,
        "mode": plan.mode,
        "n_inputs": len(plan.paths),
        "chunk_size": plan.chunk_size,
        "n_chunks": plan.n_chunks,
        "inputs_sha256": plan.digest(),
        "settings": {
            "classifier": cfg.classifier,
            "segmenter": cfg.segmenter,
            "segmenter_options": cfg.segmenter_options,
            "segment_size": list(cfg.segment_size) if cfg.segment_size else None,
            "max_pixels": cfg.max_pixels,
            "include_augmented": cfg.include_augmented,
            "write_masks": cfg.write_masks,
            # absent when off, so plans written before explanations existed still match
            **({"explain": cfg.explain.model_dump()} if cfg.explain.method else {}),
            **({"tta": True} if cfg.tta else {}),  # absent when off: outputs of earlier versions still resume
        },
    }


def check_or_write_plan(pred_dir: str, record: dict) -> bool:
    """Compare with the plan of an earlier run in the same output; write it when there is none.

    Returns ``True`` when an earlier plan exists (a resume).
    """
    uri = storage.join(pred_dir, PLAN_FILE)
    if storage.exists(uri):
        try:
            old = json.loads(storage.read_text(uri))
        except ValueError:
            raise DataError(f"{uri} is not valid JSON: remove it (and the parts beside it) or use a new --out") \
                from None
        before = {**{k: old.get(k) for k in ("mode", "n_inputs", "chunk_size")}, **(old.get("settings") or {})}
        now = {**{k: record[k] for k in ("mode", "n_inputs", "chunk_size")}, **record["settings"]}
        diff = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in now if before.get(k) != now.get(k)]
        if old.get("inputs_sha256") != record["inputs_sha256"]:
            diff.append("the list of inputs changed")
        if diff:
            what = ", ".join(diff)
            raise ConfigError(f"{storage.parent(pred_dir)} already holds predictions for other inputs or settings "
                              f"({what}); use a new --out, or the same settings to resume")
        return True
    write_atomic(uri, (json.dumps(record, indent=2) + "\n").encode())
    return False


def done_chunks(pred_dir: str, n_chunks: int) -> set[int]:
    """Chunks whose part is already written (a part exists only once complete: writes are atomic)."""
    if not storage.exists(pred_dir):
        return set()
    done = {_chunk_of(f) for f in storage.list_files(pred_dir, suffixes=[".parquet"])}
    return {c for c in done if c is not None and c < n_chunks}


class ChunkWriter:
    """Gathers predicted rows per chunk and writes each chunk once it is complete."""

    def __init__(self, plan: InputPlan, pred_dir: str, chunks: Sequence[int]):
        self.plan = plan
        self.pred_dir = pred_dir
        self.expected = {c: plan.chunk_count(c) for c in chunks}
        self.buffers: dict[int, list[pa.Table]] = {c: [] for c in chunks}
        self.received = dict.fromkeys(chunks, 0)
        self.written = 0
        self.ok = 0
        self.errors = 0

    def add(self, table: pa.Table) -> None:
        ids = table.column(CHUNK_COLUMN).to_numpy()
        for c in np.unique(ids):
            c = int(c)
            if c not in self.expected:
                raise RuntimeError(f"inference produced rows for chunk {c}, which was not scheduled")
            part = table.filter(pc.equal(table.column(CHUNK_COLUMN), c))
            self.buffers[c].append(part)
            self.received[c] += len(part)
            if self.received[c] > self.expected[c]:
                raise RuntimeError(f"chunk {c}: {self.received[c]} rows for {self.expected[c]} inputs")
            if self.received[c] == self.expected[c]:
                self._write(c)

    def _write(self, chunk: int) -> None:
        table = pa.concat_tables(self.buffers.pop(chunk)).drop_columns([CHUNK_COLUMN])
        table = table.sort_by("path").cast(schema_for(table.column_names))
        write_atomic(storage.join(self.pred_dir, part_name(chunk)), table_bytes(table))
        status = table.column("status").to_numpy(zero_copy_only=False)
        self.ok += int((status == "ok").sum())
        self.errors += int((status == "error").sum())
        self.written += 1

    def missing(self) -> dict[int, int]:
        return {c: self.expected[c] - self.received[c] for c in self.buffers}


def read_predictions(out: str) -> pa.Table:
    """Every prediction row under ``<out>/predictions`` as one table (sorted by path)."""
    pred_dir = storage.join(out, PREDICTIONS_DIR)
    parts = [f for f in storage.list_files(pred_dir, suffixes=[".parquet"]) if _chunk_of(f) is not None]
    if not parts:
        return PREDICTION_SCHEMA.empty_table()
    tables = []
    for uri in parts:
        fs, path = storage.resolve(uri)
        schema = schema_for(pq.read_schema(path, filesystem=fs).names)
        tables.append(pq.read_table(path, filesystem=fs, schema=schema))
    return pa.concat_tables(tables).sort_by("path")
