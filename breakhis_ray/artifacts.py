"""Writing outputs: atomic files, Parquet, and the provenance written beside every output.

Every stage writes its resolved ``config.yaml`` and a ``versions.json`` beside what it produces
(:func:`write_provenance`), so any artifact can be traced to the exact configuration and library versions.
Writes are atomic where the store allows it: a temporary name and a rename locally, one PUT on ``s3://``.
"""

from __future__ import annotations

import io
import json
import os
import platform
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from breakhis_ray import storage
from breakhis_ray.errors import StorageError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pyarrow as pa
    from pydantic import BaseModel

CONFIG_FILE = "config.yaml"
VERSIONS_FILE = "versions.json"
_VERSIONED = ("torch", "torchvision", "ray", "pyarrow", "numpy", "pillow", "segmentation-models-pytorch")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_atomic(uri: str, data: bytes) -> None:
    """Write a file so readers see all of it or nothing: temp name + rename locally, one PUT on s3."""
    if storage.is_s3(uri):
        storage.write_bytes(uri, data)
        return
    _, path = storage.resolve(uri)
    directory, name = os.path.split(path)
    os.makedirs(directory or ".", exist_ok=True)
    tmp = os.path.join(directory, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {_first_line(exc)}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(uri: str, text: str) -> None:
    write_atomic(uri, text.encode("utf-8"))


def write_json(uri: str, obj: object) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text_atomic(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def table_bytes(table: "pa.Table", compression: str = "zstd") -> bytes:
    """Serialise an Arrow table as one Parquet file."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    return buf.getvalue()


def with_metadata(table: "pa.Table", metadata: Mapping[str, str] | None) -> "pa.Table":
    """``table`` with ``metadata`` merged into its schema metadata (values as strings)."""
    if not metadata:
        return table
    merged = dict(table.schema.metadata or {})
    merged.update({str(k).encode(): str(v).encode() for k, v in metadata.items()})
    return table.replace_schema_metadata(merged)


def write_parquet(df: "pd.DataFrame", uri: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``df`` as one Parquet file (local or s3://), adding ``metadata`` to the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = with_metadata(pa.Table.from_pandas(df, preserve_index=False), metadata)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(uri, buf.getvalue())


def versions() -> dict[str, str]:
    """Python, platform and library versions, recorded beside every output."""
    import importlib.metadata as md

    import breakhis_ray

    out = {"python": platform.python_version(), "platform": platform.platform(),
           "breakhis_ray": breakhis_ray.__version__}
    for dist in _VERSIONED:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def config_text(cfg: "BaseModel") -> str:
    """The resolved config as YAML (the same text ``config.yaml`` holds)."""
    from breakhis_ray.config import config_yaml

    return config_yaml(cfg)


def write_provenance(out_dir: str, cfg: "BaseModel", *, prefix: str = "") -> dict[str, str]:
    """Write ``config.yaml`` and ``versions.json`` into ``out_dir`` (names optionally prefixed); return their URIs.

    ``prefix`` serves stages whose output is a single file: ``write_provenance(dir, cfg, prefix="metrics.")``
    writes ``metrics.config.yaml`` and ``metrics.versions.json``.
    """
    config_uri = storage.join(out_dir, f"{prefix}{CONFIG_FILE}")
    versions_uri = storage.join(out_dir, f"{prefix}{VERSIONS_FILE}")
    write_text_atomic(config_uri, config_text(cfg))
    write_json(versions_uri, versions())
    return {"config": config_uri, "versions": versions_uri}


def write_provenance_beside(out_file: str, cfg: "BaseModel") -> dict[str, str]:
    """Provenance for a single-file output: ``<out>.config.yaml`` and ``<out>.versions.json`` beside it."""
    config_uri = f"{out_file}.config.yaml"
    versions_uri = f"{out_file}.versions.json"
    write_text_atomic(config_uri, config_text(cfg))
    write_json(versions_uri, versions())
    return {"config": config_uri, "versions": versions_uri}
