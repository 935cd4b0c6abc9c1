"""Prepared data (``breakhis-ray prepare``): decode and check every image, write Parquet shards with Ray tasks.

``--out`` receives (docs/ARCHITECTURE.md, "Prepared data"):

``shards/part-00000.parquet ...``
    one row per usable image of the fold: every manifest column, ``image`` (encoded bytes), ``image_format``,
    ``image_width``/``image_height`` (after the optional resize), ``fold``, ``split``, ``source_path``,
    ``augmentation`` (null for originals) and ``converted_from`` (null unless the pixels were converted, below).
``rejects.parquet``
    one row per input that could not be used: ``path, reason, stage, detail``.
``manifest.parquet``, ``splits.parquet``, ``prepare.json`` (counts, Tab. 1 / Tab. 2), ``config.yaml``.

Work is split into deterministic chunks of the path-sorted manifest (``shard_size`` images and/or a
``shard_bytes`` estimate per chunk); one Ray task per chunk reads its images through
:mod:`breakhis_ray.storage` (local or ``s3://``), checks them and writes its own ``part-{i:05d}.parquet``.
Offline enhancement copies (:mod:`breakhis_ray.data.enhance`) follow in further parts. Re-running on the
same input rewrites the same files with the same rows and deletes ``part-*.parquet`` files left by an
earlier, larger run.

Checks and their reject ``reason`` (``stage``):

* ``bad_name`` / ``duplicate`` (manifest): a file under the tree that is not a well-placed BreakHis image name;
* ``not_in_split`` (split): the splits leave the image out of this fold (``dc_lc_policy: drop``, official folds);
* ``missing`` / ``zero_byte`` (read): the file vanished or is empty;
* ``not_an_image`` / ``truncated`` / ``corrupt`` / ``too_large`` (decode): no known image format, the data
  ends early, it is damaged, or it has more than ``max_pixels`` pixels (decompression-bomb guard, checked
  from the header before decoding);
* ``unsupported_mode`` / ``wrong_size`` (check): a pixel mode that cannot be converted to RGB, or a decoded
  size that differs from the manifest's header size or from ``expected_size``.

Decoding and conversions are :mod:`breakhis_ray.data.decode`'s, the same as in training and ``infer``;
``converted_from`` records the original mode of converted pixels (``L``, ``P``, ``1``, ``CMYK``, ``YCbCr``,
``RGBA``, ``LA``, ``I;16``, ``F``, ``RGB;16``, ...). Unconverted 8-bit RGB PNGs are stored byte for byte when
no resize is asked and the format is PNG.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import posixpath
import re
from collections import Counter
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from breakhis_ray import storage
from breakhis_ray.config import (
    PrepareConfig,
    SplitConfig,
    config_yaml,
    dump_config,
    validate_config,
    wh_size,
)
from breakhis_ray.artifacts import write_parquet
from breakhis_ray.data import enhance
from breakhis_ray.data.decode import ImageRejected, decode
from breakhis_ray.data.manifest import COLUMNS, build_manifest, read_manifest
from breakhis_ray.data.splits import SPLITS, load_splits, make_splits, write_splits
from breakhis_ray.errors import BreakhisError, ConfigError, DataError, StorageError

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")
_MAX_LISTED_REJECTS = 20
# reject reason -> the ``stage`` column (every other decoder reason is "decode")
_STAGE_OF_REASON = {"missing": "read", "zero_byte": "read", "unsupported_mode": "check", "wrong_size": "check"}

SHARD_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("filename", pa.string()),
    ("label", pa.string()),
    ("label_id", pa.int8()),
    ("subtype", pa.string()),
    ("subtype_code", pa.string()),
    ("patient_id", pa.string()),
    ("slide_id", pa.string()),
    ("magnification", pa.int16()),
    ("seq", pa.int16()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("image", pa.binary()),
    ("image_format", pa.string()),
    ("image_width", pa.int32()),
    ("image_height", pa.int32()),
    ("fold", pa.int16()),
    ("split", pa.string()),
    ("source_path", pa.string()),
    ("augmentation", pa.string()),
    ("converted_from", pa.string()),
])
#: Parquet options of the shard writer. The ``image`` column holds already-compressed PNG/JPEG/WebP bytes:
#: snappy and a dictionary find nothing to remove there (synthetic BreakHis PNGs: snappy output 0.005%
#: larger) yet cost a pass over every byte when reading (``pq.read_table`` of a 237-image shard, CPU:
#: 0.61 ms/image with snappy, 0.21 without), and min/max statistics of whole images are never kept.
#: Every other column stays snappy with dictionaries and statistics.
SHARD_WRITE_OPTIONS = {
    "compression": {name: ("none" if name == "image" else "snappy") for name in SHARD_SCHEMA.names},
    "use_dictionary": [name for name in SHARD_SCHEMA.names if name != "image"],
    "write_statistics": [name for name in SHARD_SCHEMA.names if name != "image"],
}
REJECT_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string()), ("stage", pa.string()),
                           ("detail", pa.string())])


# ---------------------------------------------------------------------------------------- decode/check
def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _stage(reason: str) -> str:
    """The ``stage`` column of a reject: where in prepare the reason is found."""
    return _STAGE_OF_REASON.get(reason, "decode")


def encode_image(pixels: np.ndarray, image_format: str, quality: int = 95) -> bytes:
    """Encode ``uint8 (H, W, 3)`` as PNG (lossless), JPEG or WebP (``quality``); deterministic."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if image_format == "png":
        img.save(buf, format="PNG")
    elif image_format == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    elif image_format == "webp":
        img.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise ConfigError(f"unknown image_format {image_format!r}: use png, jpeg or webp")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- worker side
def _read(fs: pafs.FileSystem, uri: str) -> bytes:
    """Bytes of one input; a missing file is a reject, any other storage failure stops the run."""
    path = uri[len("s3://"):] if storage.is_s3(uri) else storage.resolve(uri)[1]
    try:
        return storage.read_file(fs, path)
    except FileNotFoundError:
        raise ImageRejected("missing", "file not found") from None
    except OSError as exc:
        if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
            raise ImageRejected("missing", "file not found") from None
        raise StorageError(f"cannot read {uri}: {_one_line(exc)}") from None


def _process_row(fs, row: dict, ctx: dict) -> dict:
    """One output row (image encoded, sizes, conversion) or :class:`ImageRejected`."""
    from breakhis_ray.data.transforms import resize_uint8

    source = row["source_path"]
    data = _read(fs, source)
    decoded = decode(data, max_pixels=ctx["max_pixels"], backend=ctx.get("decode_backend"))
    pixels, converted = decoded.pixels, decoded.converted_from
    height, width = pixels.shape[:2]
    if row.get("width") is not None and (row["width"], row["height"]) != (width, height):
        raise ImageRejected("wrong_size",
                            f"decoded {width}x{height}, manifest says {row['width']}x{row['height']}")
    expected = ctx["expected_size"]
    if expected is not None and (width, height) != tuple(expected):
        raise ImageRejected("wrong_size", f"{width}x{height}, expected {expected[0]}x{expected[1]}")
    resize = ctx["resize"]
    if resize is not None:
        pixels = resize_uint8(pixels, (resize[1], resize[0]))
    recipe = row.get("recipe")
    if recipe is not None:
        pixels = enhance.apply_recipe(pixels, enhance.Recipe(**recipe), ctx["enhance_seed"], source)
    unchanged = recipe is None and converted is None and (resize is None or tuple(resize) == (width, height))
    if unchanged and ctx["image_format"] == "png" and decoded.format == "PNG":
        encoded = data  # lossless PNG of 8-bit RGB: keep the original bytes
    else:
        encoded = encode_image(pixels, ctx["image_format"], ctx["quality"])
    out = {name: row.get(name) for name in SHARD_SCHEMA.names}
    out.update(image=encoded, image_format=ctx["image_format"], image_width=int(pixels.shape[1]),
               image_height=int(pixels.shape[0]), converted_from=converted)
    return out


def process_chunk(index: int, rows: list[dict], ctx: dict) -> dict:
    """Check/encode ``rows`` and write ``<out>/shards/part-{index:05d}.parquet`` (skipped when none survive).

    Returns ``{"part", "rows", "bytes", "rejects", "kept"}``; ``kept`` holds ``(path, image_width,
    image_height, converted_from)`` per written row.
    """
    part_name = f"part-{index:05d}.parquet"
    part_uri = storage.join(ctx["out"], SHARDS_DIR, part_name)
    in_fs = storage.resolve(rows[0]["source_path"])[0] if rows else None
    rejects: list[dict] = []
    kept: list[tuple] = []
    writer = stream = None
    pending: list[dict] = []
    written_bytes = 0

    def flush() -> None:
        nonlocal writer, stream
        if not pending:
            return
        if writer is None:
            out_fs, out_path = storage.resolve(part_uri)
            try:
                stream = out_fs.open_output_stream(out_path)
            except OSError as exc:
                raise StorageError(f"cannot write {part_uri}: {_one_line(exc)}") from None
            writer = pq.ParquetWriter(stream, SHARD_SCHEMA, **SHARD_WRITE_OPTIONS)
        writer.write_table(pa.Table.from_pylist(pending, schema=SHARD_SCHEMA), row_group_size=len(pending))
        pending.clear()

    try:
        for row in rows:
            try:
                out = _process_row(in_fs, row, ctx)
            except ImageRejected as rej:
                rejects.append({"path": row["path"], "reason": rej.reason, "stage": _stage(rej.reason),
                                "detail": rej.detail})
                continue
            pending.append(out)
            kept.append((out["path"], out["image_width"], out["image_height"], out["converted_from"]))
            written_bytes += len(out["image"])
            if len(pending) >= ctx["row_group_size"]:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
        if stream is not None:
            stream.close()
    return {"part": part_name if kept else None, "rows": len(kept), "bytes": written_bytes,
            "rejects": rejects, "kept": kept}


# -------------------------------------------------------------------------------------------- planning
def plan_chunks(sizes: list[int], shard_size: int, shard_bytes: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` ranges: at most ``shard_size`` items, and a new chunk before ``shard_bytes`` is passed."""
    chunks, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        full = i - start >= shard_size or (shard_bytes is not None and i > start and total + size > shard_bytes)
        if full:
            chunks.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        chunks.append((start, len(sizes)))
    return chunks


def _source_sizes(uris: list[str]) -> dict[str, int]:
    """File sizes of the inputs, from one recursive listing of their common folder (0 if not found)."""
    if not uris:
        return {}
    fs, _ = storage.resolve(uris[0])
    paths = [u[len("s3://"):] if storage.is_s3(u) else storage.resolve(u)[1] for u in uris]
    common = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
    try:
        infos = fs.get_file_info(pafs.FileSelector(common, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list {common}: {_one_line(exc)}") from None
    by_path = {info.path: int(info.size or 0) for info in infos if info.type == pafs.FileType.File}
    return {uri: by_path.get(path, 0) for uri, path in zip(uris, paths)}


def _estimated_bytes(rows: list[dict], cfg: PrepareConfig, sizes: dict[str, int]) -> list[int]:
    resize = wh_size(cfg.resize) if cfg.resize else None
    out = []
    for row in rows:
        size = sizes.get(row["source_path"], 0)
        if resize and row.get("width") and row.get("height"):
            size = int(size * resize[0] * resize[1] / (row["width"] * row["height"]))
        out.append(size)
    return out


def _auto_size(manifest: pd.DataFrame) -> tuple[int, int] | None:
    dims = manifest[["width", "height"]].dropna()
    if dims.empty:
        return None
    counts = Counter(zip(dims["width"].astype(int), dims["height"].astype(int)))
    return max(sorted(counts), key=lambda wh: counts[wh])


def _records(df: pd.DataFrame) -> list[dict]:
    """Plain-Python rows (``None`` for missing values, ints not numpy scalars)."""
    out = []
    for rec in df.astype(object).where(df.notna(), None).to_dict("records"):
        out.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in rec.items()})
    return out


# ----------------------------------------------------------------------------------------- driver side
def _run_tasks(chunks: list[tuple[int, list[dict]]], ctx: dict, cfg: PrepareConfig) -> list[dict]:
    """One task per chunk; object-storage credentials come from the workers' node environment."""
    import ray

    task = ray.remote(process_chunk).options(num_cpus=cfg.task_cpus)
    refs = [task.remote(index, rows, ctx) for index, rows in chunks]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BreakhisError):
            raise type(cause)(str(cause)) from None
        raise


def shard_uris(out: str) -> list[str]:
    """The ``part-*.parquet`` files under ``<out>/shards``, sorted."""
    folder = storage.join(out, SHARDS_DIR)
    if not storage.exists(folder):
        return []
    return [u for u in storage.list_files(folder) if PART_RE.match(u.rsplit("/", 1)[-1])]


def read_shards(out: str, columns: list[str] | None = None) -> pd.DataFrame:
    """All shard rows of a prepared ``out`` as one frame (small data and tests; pipelines use Ray Data)."""
    frames = []
    for uri in shard_uris(out):
        fs, path = storage.resolve(uri)
        frames.append(pq.read_table(path, filesystem=fs, columns=columns, schema=SHARD_SCHEMA).to_pandas())
    if not frames:
        return SHARD_SCHEMA.empty_table().to_pandas()
    return pd.concat(frames, ignore_index=True)


def _manifest_rejects(problems: Iterable) -> list[dict]:
    out = []
    for problem in problems:
        reason = "duplicate" if problem.reason.startswith("duplicate") else "bad_name"
        out.append({"path": problem.path, "reason": reason, "stage": "manifest", "detail": problem.reason})
    return out


def _load_inputs(cfg: PrepareConfig) -> tuple[pd.DataFrame, list]:
    if cfg.root.lower().endswith(".parquet"):
        return read_manifest(cfg.root), []
    manifest, problems = build_manifest(cfg.root)
    if manifest.empty:
        raise DataError(f"no BreakHis image found under {cfg.root}")
    return manifest, problems


def _load_splits(cfg: PrepareConfig, manifest: pd.DataFrame) -> pd.DataFrame:
    if cfg.splits:
        return load_splits(cfg.splits, manifest)
    split_cfg = SplitConfig(manifest=storage.join(cfg.out, "manifest.parquet"),
                            out=storage.join(cfg.out, "splits.parquet"), **cfg.split.model_dump())
    return make_splits(manifest, split_cfg)


def _log_rejects(rejects: list[dict]) -> None:
    for rej in rejects[:_MAX_LISTED_REJECTS]:
        log.info("reject: %s: %s (%s)", rej["path"], rej["reason"], rej["detail"])
    if len(rejects) > _MAX_LISTED_REJECTS:
        log.info("... and %d more (see rejects.parquet)", len(rejects) - _MAX_LISTED_REJECTS)


def _log_counts(summary: dict, shards_uri: str) -> None:
    reasons = ", ".join(f"{k} {v}" for k, v in summary["rejects_by_reason"].items()) or "none"
    converted = ", ".join(f"{k} {v}" for k, v in summary["converted"].items()) or "none"
    log.info("input %s, written %s, rejected %s (%s), augmented %s; converted: %s", summary["input"],
             summary["written"], summary["rejected"], reasons, summary["augmented"], converted)
    log.info("wrote %d shard(s), %s rows, to %s", len(summary["shards"]), summary["rows"], shards_uri)


def _copy_rows(plan: pd.DataFrame, rows: list[dict], valid: pd.DataFrame, transforms: list[str]) -> list[dict]:
    """Task rows for the planned enhancement copies: the source's metadata, the copy's path and recipe."""
    by_path = {r["path"]: r for r in rows}
    shape = valid.set_index("path")[["image_width", "image_height"]]
    out = []
    for item in plan.itertuples(index=False):
        width, height = shape.loc[item.source_path]
        rec = enhance.recipe(transforms, bool(width == height), int(item.copy))
        out.append({**by_path[item.source_path], "path": item.path, "source_path": item.source_path,
                    "augmentation": item.augmentation, "recipe": dataclasses.asdict(rec)})
    return out


def _remove_stale_parts(out: str, written: set[str]) -> None:
    """Delete ``part-*.parquet`` files an earlier, larger run left behind (nothing else is touched)."""
    for uri in shard_uris(out):
        if uri.rsplit("/", 1)[-1] in written:
            continue
        fs, path = storage.resolve(uri)
        try:
            fs.delete_file(path)
        except OSError as exc:
            raise StorageError(f"cannot delete stale shard {uri}: {_one_line(exc)}") from None


def _write_rejects(out: str, rejects: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rejects, columns=REJECT_SCHEMA.names).sort_values("path", kind="stable")
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, schema=REJECT_SCHEMA, preserve_index=False), buf)
    storage.write_bytes(storage.join(out, "rejects.parquet"), buf.getvalue())
    return frame.reset_index(drop=True)


def run_prepare(cfg: PrepareConfig) -> dict:
    """CLI stage ``prepare``: manifest -> splits -> checked shards (+ enhancement) -> rejects and summary."""
    from breakhis_ray.ray_utils import ensure_ray

    cfg = validate_config(PrepareConfig, dump_config(cfg))
    manifest, problems = _load_inputs(cfg)
    manifest = manifest.sort_values("path", kind="stable").reset_index(drop=True)
    splits = _load_splits(cfg, manifest)
    fold_ids = sorted(int(f) for f in splits["fold"].unique())
    if cfg.fold not in fold_ids:
        raise ConfigError(f"fold {cfg.fold} is not in the splits (folds: {', '.join(map(str, fold_ids))})")
    write_parquet(manifest, storage.join(cfg.out, "manifest.parquet"))
    write_splits(splits, storage.join(cfg.out, "splits.parquet"))

    fold = splits[splits["fold"] == cfg.fold][["path", "split"]]
    rows_df = manifest.merge(fold, on="path", how="left")
    rejects = _manifest_rejects(problems)
    for path in rows_df.loc[rows_df["split"].isna(), "path"]:
        rejects.append({"path": path, "reason": "not_in_split", "stage": "split",
                        "detail": f"not assigned to a split in fold {cfg.fold}"})
    rows_df = rows_df[rows_df["split"].notna()].copy()
    rows_df["fold"] = cfg.fold
    rows_df["source_path"] = rows_df["path"]
    rows_df["augmentation"] = None
    rows = _records(rows_df[[*COLUMNS, "fold", "split", "source_path", "augmentation"]])

    expected = _auto_size(manifest) if cfg.expected_size == "auto" else (
        wh_size(cfg.expected_size) if cfg.expected_size else None)
    ctx = {
        "out": cfg.out,
        "image_format": cfg.image_format,
        "quality": cfg.quality,
        "resize": wh_size(cfg.resize) if cfg.resize else None,
        "expected_size": expected,
        "max_pixels": cfg.max_pixels,
        "decode_backend": cfg.decode.backend,
        "row_group_size": cfg.row_group_size,
        "enhance_seed": cfg.enhance.seed,
    }
    sizes = _source_sizes([r["source_path"] for r in rows]) if cfg.shard_bytes else {}

    def chunked(items: list[dict], first_index: int) -> list[tuple[int, list[dict]]]:
        estimates = _estimated_bytes(items, cfg, sizes) if cfg.shard_bytes else [0] * len(items)
        ranges = plan_chunks(estimates, cfg.shard_size, cfg.shard_bytes)
        return [(first_index + i, items[a:b]) for i, (a, b) in enumerate(ranges)]

    if not storage.is_s3(cfg.out):
        storage.makedirs(storage.join(cfg.out, SHARDS_DIR))
    ensure_ray(cfg.ray)
    originals = chunked(rows, 0)
    results = _run_tasks(originals, ctx, cfg) if originals else []
    for res in results:
        rejects += res["rejects"]

    # offline enhancement from the originals that were written
    kept = pd.DataFrame([k for res in results for k in res["kept"]],
                        columns=["path", "image_width", "image_height", "converted_from"])
    valid = rows_df.merge(kept, on="path", how="inner")
    plan, notes = enhance.plan_enhancement(valid, cfg.enhance)
    aug_results: list[dict] = []
    if not plan.empty:
        aug_rows = _copy_rows(plan, rows, valid, cfg.enhance.transforms)
        aug_results = _run_tasks(chunked(aug_rows, len(originals)), ctx, cfg)
        for res in aug_results:
            rejects += [{**rej, "stage": "enhance"} for rej in res["rejects"]]

    written = {res["part"] for res in results + aug_results if res["part"]}
    _remove_stale_parts(cfg.out, written)
    rejects_df = _write_rejects(cfg.out, rejects)

    n_written = sum(res["rows"] for res in results)
    n_aug = sum(res["rows"] for res in aug_results)
    info = valid.set_index("path")[["label", "subtype", "magnification", "split"]]
    source_of = dict(zip(plan["path"], plan["source_path"]))
    aug_paths = [k[0] for res in aug_results for k in res["kept"]]
    after = pd.concat([valid[["label", "subtype", "magnification", "split"]],
                       info.loc[[source_of[p] for p in aug_paths]].reset_index(drop=True)], ignore_index=True)
    train_before = valid[valid["split"] == "train"]
    train_after = after[after["split"] == "train"]
    summary = {
        "root": cfg.root,
        "out": cfg.out,
        "fold": cfg.fold,
        "input": int(len(manifest) + len(problems)),
        "written": int(n_written),
        "rejected": int(len(rejects_df)),
        "augmented": int(n_aug),
        "rows": int(n_written + n_aug),
        "shards": sorted(written),
        "shard_bytes": int(sum(res["bytes"] for res in results + aug_results)),
        "rejects_by_reason": dict(sorted(Counter(rejects_df["reason"]).items())),
        "converted": dict(sorted(Counter(valid["converted_from"].dropna()).items())),
        "splits": {s: int((after["split"] == s).sum()) for s in SPLITS},
        "protocol": splits.attrs.get("protocol"),
        "expected_size": f"{expected[0]}x{expected[1]}" if expected else None,
        "tables": {
            "tab1_all": enhance.distribution(valid),
            "tab1_train": enhance.distribution(train_before),
            "tab2_train": enhance.distribution(train_after),
            "tab2_all": enhance.distribution(after),
            **({"subtypes_train_before": enhance.subtype_distribution(train_before),
                "subtypes_train_after": enhance.subtype_distribution(train_after)}
               if cfg.enhance.balance == "subtype" else {}),
        },
        "enhance_notes": notes,
    }
    storage.write_text(storage.join(cfg.out, "prepare.json"), json.dumps(summary, indent=2) + "\n")
    storage.write_text(storage.join(cfg.out, "config.yaml"), config_yaml(cfg))

    _log_rejects(rejects_df.to_dict("records"))
    log.info("%s", enhance.format_distribution(valid, f"Tab. 1  images before enhancement (fold {cfg.fold}, "
                                                      "all splits)"))
    if cfg.enhance.enabled:
        log.info("%s", enhance.format_distribution(train_before, "Tab. 1  train split before enhancement"))
        log.info("%s", enhance.format_distribution(train_after, "Tab. 2  train split after enhancement"))
        for note in notes:
            log.info("enhance: %s", note)
    _log_counts(summary, storage.join(cfg.out, SHARDS_DIR))
    return summary
