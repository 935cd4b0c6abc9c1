"""Image/mask pairs for U-Net training and segmentation evaluation, as Ray datasets.

Rows come from the manifest of a BreakHis-layout tree (:func:`breakhis_ray.data.manifest.build_manifest`), so
the patient of every image is known from its file name. Masks:

* ``ground_truth``: ``<mask_root>/<image path relative to root, without extension><mask_suffix>``; the
  synthetic tree's ``masks/.../<stem>_nuclei.png`` (uint16 instance ids) is the default. Any non-zero pixel is
  nucleus, so instance maps and 0/255 masks both work.
* ``threshold`` / ``watershed``: pseudo-labels, the classical segmenter's mask of the full-resolution image
  (for trees without masks, such as BreakHis itself).

Split (:func:`split_patients`): deterministic and patient-grouped, no patient in both train and val.

Ray Data stages (:func:`build_seg_datasets`)::

    from_pandas(rows) -> map_batches(LoadPairs)        deterministic: read, decode, mask, resize
                                                        (image bilinear, mask nearest)
      -> materialize()                                  decoded once, cached
      -> randomize_block_order -> map_batches(PairAugment)   train: new flips/turns every epoch

With ``seed`` set the datasets are read in order and the per-epoch order and draws are keyed by the epoch,
as the classifier's (:mod:`breakhis_ray.data.pipeline`): repeated and resumed runs see the same batches.

Rows leaving the pipeline: ``image`` uint8 ``(H, W, 3)`` and ``mask`` uint8 ``(H, W)`` in {0, 1}.
:class:`breakhis_ray.data.augment.PairAugment` (per-row, per-epoch generators) applies the same flips and
quarter turns to every pixel column (``mask`` included) and the colour jitter to ``image`` only.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from breakhis_ray import storage
from breakhis_ray.config import SegDataConfig, SegSourceSection, SegSplitSection
from breakhis_ray.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from breakhis_ray.data.transforms import PreprocessSpec

SEG_SPLITS = ("train", "val")
#: columns of the pair table handed to Ray Data
PAIR_COLUMNS = ("path", "mask_path", "patient_id", "split")


# ------------------------------------------------------------------------------------------------ paths
def _norm(uri: str) -> str:
    return storage.join(str(uri)).rstrip("/")


def default_mask_root(root: str) -> str:
    from breakhis_ray.data.synthetic import MASK_ROOT

    return storage.join(root, MASK_ROOT)


def mask_uri(image_uri: str, root: str, mask_root: str | None = None, suffix: str = "_nuclei.png") -> str:
    """The mask file of ``image_uri``: same path relative to ``root``, extension replaced by ``suffix``."""
    root_n, image_n = _norm(root), str(image_uri)
    if not image_n.startswith(root_n + "/"):
        raise DataError(f"image {image_uri} does not lie under root {root}")
    rel = image_n[len(root_n) + 1:]
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return storage.join(mask_root or default_mask_root(root), stem + suffix)


def _hash_rank(seed: int, value: str) -> bytes:
    return hashlib.blake2b(f"{int(seed)}:{value}".encode("utf-8"), digest_size=8).digest()


# ------------------------------------------------------------------------------------------------ split
def split_patients(manifest: "pd.DataFrame", split: SegSplitSection) -> "pd.Series":
    """``"train"`` / ``"val"`` for every manifest row (same index), grouped by patient.

    Groups: :func:`breakhis_ray.data.splits.patient_groups` (folders with the DC/LC copies of one slide
    merged, or slide numbers). Within each class the groups are ranked by a seeded hash of their id and the
    first ``round(val_fraction * n)`` (at least 1, never all) go to val.
    """
    import pandas as pd

    from breakhis_ray.data.splits import patient_groups

    if manifest.empty:
        raise DataError("no images to split")
    groups = patient_groups(manifest, key=split.patient_key, dc_lc_policy="merge")
    label_of = pd.DataFrame({"group": groups.to_numpy(), "label": manifest["label"].to_numpy()})
    label_of = label_of.groupby("group")["label"].agg(lambda s: s.value_counts().sort_index().idxmax())
    val: set[str] = set()
    for _, members in label_of.groupby(label_of):
        ranked = sorted(members.index, key=lambda g: _hash_rank(split.seed, g))
        if len(ranked) >= 2:
            n_val = min(max(1, round(split.val_fraction * len(ranked))), len(ranked) - 1)
            val.update(ranked[:n_val])
    if not val:
        ranked = sorted(label_of.index, key=lambda g: _hash_rank(split.seed, g))
        if len(ranked) < 2:
            raise DataError(f"only {len(ranked)} patient group(s): a patient-grouped split needs at least 2")
        val.add(ranked[0])
    return pd.Series(np.where(groups.isin(val), "val", "train"), index=manifest.index, name="split")


def cap_rows(rows: "pd.DataFrame", max_images: int | None, seed: int) -> "pd.DataFrame":
    """At most ``max_images`` rows, spread over patients (round robin over a seeded order).

    The order hashes each image's file name, not its full path, so the same tree picks the same images wherever
    it lies (BreakHis file names are unique; rows with equal names keep their order)."""
    if max_images is None or len(rows) <= max_images:
        return rows
    ranked = rows.assign(_rank=[_hash_rank(seed, posixpath.basename(str(p))) for p in rows["path"]])
    ranked = ranked.sort_values("_rank", kind="stable")
    ranked["_turn"] = ranked.groupby("patient_id").cumcount()
    ranked = ranked.sort_values(["_turn", "_rank"], kind="stable").head(max_images)
    return ranked.drop(columns=["_rank", "_turn"]).sort_values("path", kind="stable")


def pair_table(source: SegSourceSection, *, masks: bool = True) -> "pd.DataFrame":
    """Rows ``path, mask_path, patient_id, label, magnification, split`` of every usable image, sorted by path.

    ``masks=False`` (pseudo-labels) leaves ``mask_path`` empty. With masks, every selected image must have its
    mask file (one listing of the mask tree checks them all).
    """
    import pandas as pd

    from breakhis_ray.data.manifest import build_manifest

    manifest, _ = build_manifest(source.root, read_sizes=False)
    if manifest.empty:
        raise DataError(f"no BreakHis images under {source.root}")
    if source.magnifications != "all":
        manifest = manifest[manifest["magnification"].isin(list(source.magnifications))]
        if manifest.empty:
            raise DataError(f"no images at magnification(s) {source.magnifications} under {source.root}")
    manifest = manifest.reset_index(drop=True)
    manifest["split"] = split_patients(manifest, source.split)
    rows = manifest[["path", "patient_id", "label", "magnification", "split"]].copy()
    rows["mask_path"] = ""
    if masks:
        mask_root = source.mask_root or default_mask_root(source.root)
        rows["mask_path"] = [mask_uri(p, source.root, mask_root, source.mask_suffix) for p in rows["path"]]
    parts = [cap_rows(rows[rows["split"] == s], source.max_images, source.split.seed) for s in SEG_SPLITS]
    rows = pd.concat(parts).sort_values("path", kind="stable").reset_index(drop=True)
    if masks:
        check_masks(rows["mask_path"].tolist(), source.mask_root or default_mask_root(source.root))
    return rows


def check_masks(mask_paths: Sequence[str], mask_root: str) -> None:
    """Raise :class:`DataError` naming the first missing mask (one recursive listing of ``mask_root``)."""
    if not mask_paths:
        return
    if not storage.exists(mask_root):
        raise DataError(f"no mask tree at {mask_root} (set data.mask_root, or mask_source=threshold|watershed "
                        "for pseudo-labels)")
    present = set(storage.list_files(mask_root))
    missing = [m for m in mask_paths if m not in present]
    if missing:
        raise DataError(f"{len(missing)} of {len(mask_paths)} image(s) have no mask, e.g. {missing[0]} "
                        "(check mask_root and mask_suffix)")


def write_split(uri: str, rows: "pd.DataFrame", extra: dict | None = None) -> None:
    """``split.json``: the train/val paths and patients of a run (``segment-eval split_file=`` reads it)."""
    doc: dict[str, Any] = dict(extra or {})
    for s in SEG_SPLITS:
        part = rows[rows["split"] == s]
        doc[s] = {"images": int(len(part)), "patients": sorted(set(part["patient_id"])),
                  "paths": part["path"].tolist()}
    storage.write_text(uri, json.dumps(doc, indent=2) + "\n")


def read_split_paths(uri: str, subset: str = "val") -> list[str]:
    """The ``subset`` paths of a ``split.json`` (``all``: train and val)."""
    try:
        doc = json.loads(storage.read_text(uri))
    except ValueError as exc:
        raise DataError(f"{uri} is not a split.json ({exc})") from None
    subsets = SEG_SPLITS if subset == "all" else (subset,)
    try:
        return [p for s in subsets for p in doc[s]["paths"]]
    except (KeyError, TypeError):
        raise DataError(f"{uri} has no {subset!r} paths (expected split.json from train-segmenter)") from None


# ------------------------------------------------------------------------------------- decode stage
def read_mask(data: bytes) -> np.ndarray:
    """Encoded mask (8/16-bit grey, instance ids, palette, RGB) -> bool ``(H, W)``: True where any stored value is
    non-zero. Decoded by the one decoder (:func:`breakhis_ray.data.decode.decode_labels`): same guards."""
    from breakhis_ray.data.decode import ImageRejected, decode_labels

    try:
        arr = decode_labels(data)
    except ImageRejected as exc:
        raise DataError(f"cannot decode mask ({len(data)} bytes): {exc}") from None
    return arr.any(axis=-1) if arr.ndim == 3 else arr != 0


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask to ``size = (H, W)`` (uint8 0/1 out; no new label values)."""
    from PIL import Image

    height, width = int(size[0]), int(size[1])
    mask = np.asarray(mask).astype(np.uint8)
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def pseudo_segmenter(method: str, options: dict | None = None):
    """The classical segmenter that makes pseudo-labels (``threshold`` or ``watershed``)."""
    from breakhis_ray.segmentation import create_segmenter

    if method not in ("threshold", "watershed"):
        raise DataError(f"pseudo-labels come from threshold or watershed, not {method!r}")
    return create_segmenter(method, **dict(options or {}))


def load_pair(path: str, mask_path: str | None, spec: "PreprocessSpec",
              segmenter=None) -> tuple[np.ndarray, np.ndarray]:
    """One training pair: uint8 image ``spec.size`` (bilinear) and uint8 0/1 mask (nearest).

    The mask is read from ``mask_path``, or computed by ``segmenter`` on the full-resolution image.
    """
    from breakhis_ray.data.decode import decode_rgb as decode_image
    from breakhis_ray.data.transforms import prepare_uint8

    try:
        full = decode_image(storage.read_bytes(path))
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    if segmenter is not None:
        mask = segmenter.segment(full).masks[0]
    else:
        mask = read_mask(storage.read_bytes(mask_path))
        if mask.shape != full.shape[:2]:
            raise DataError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{full.shape[1]}x{full.shape[0]}")
    return prepare_uint8(full, spec), resize_mask(mask, spec.size)


class LoadPairs:
    """``map_batches`` function: ``path``/``mask_path`` rows -> ``image``, ``mask`` (+ ``key`` for augmentation)."""

    def __init__(self, spec: dict[str, Any], mask_source: str = "ground_truth", pseudo_options: dict | None = None,
                 with_key: bool = False):
        self.spec = dict(spec)
        self.mask_source = mask_source
        self.pseudo_options = dict(pseudo_options or {})
        self.with_key = with_key

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from breakhis_ray.data.augment import path_keys
        from breakhis_ray.data.transforms import PreprocessSpec

        spec = PreprocessSpec.from_dict(self.spec)
        segmenter = None
        if self.mask_source != "ground_truth":
            segmenter = pseudo_segmenter(self.mask_source, self.pseudo_options)
        paths, mask_paths = [str(p) for p in batch["path"]], [str(p) for p in batch["mask_path"]]
        images = np.empty((len(paths), *spec.size, 3), dtype=np.uint8)
        masks = np.empty((len(paths), *spec.size), dtype=np.uint8)
        for i, (path, mask_path) in enumerate(zip(paths, mask_paths)):
            images[i], masks[i] = load_pair(path, mask_path or None, spec, segmenter)
        out = {"image": images, "mask": masks}
        if self.with_key:
            out["key"] = path_keys(paths)
        return out


# ------------------------------------------------------------------------------------------- datasets
def _from_rows(rows: "pd.DataFrame", block_rows: int):
    import ray.data

    table = rows[list(PAIR_COLUMNS)].reset_index(drop=True)
    n_blocks = max(1, -(-len(table) // max(1, block_rows)))
    return ray.data.from_pandas([table.iloc[i::n_blocks] for i in range(n_blocks)])


def load_stage(ds, cfg: SegDataConfig, spec: "PreprocessSpec", with_key: bool):
    from breakhis_ray.data.pipeline import decode_cpus

    return ds.map_batches(
        LoadPairs(spec.to_dict(), cfg.mask_source, cfg.pseudo_options, with_key=with_key),
        batch_size=cfg.decode_batch_size,
        batch_format="numpy",
        num_cpus=decode_cpus(cfg.decode_num_cpus),
        concurrency=cfg.decode_concurrency,
        udf_modifying_row_count=False,
    )


def build_seg_datasets(cfg: SegDataConfig, spec: "PreprocessSpec", rows: "pd.DataFrame | None" = None) -> dict:
    """``{"train", "val"}`` Ray datasets of ``image``/``mask`` pairs (module docstring) and the pair table
    under ``"rows"``."""
    from ray.data import RandomSeedConfig

    from breakhis_ray.data.augment import PairAugment, execution_index
    from breakhis_ray.data.pipeline import ordered

    if tuple(spec.size) != tuple(cfg.image_size):
        raise DataError(f"preprocess size {spec.size} differs from data.image_size {cfg.image_size}")
    rows = pair_table(cfg, masks=cfg.mask_source == "ground_truth") if rows is None else rows
    out: dict[str, Any] = {"rows": rows}
    for split in SEG_SPLITS:
        part = rows[rows["split"] == split]
        if part.empty:
            raise DataError(f"the {split} split is empty (too few patients under {cfg.root}?)")
        ds = load_stage(ordered(_from_rows(part, cfg.decode_batch_size), cfg.seed is not None), cfg, spec,
                        with_key=split == "train")
        if cfg.materialize:
            ds = ds.materialize()
        if split == "train":
            ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))
            if cfg.augment.enabled:
                udf = PairAugment(cfg.augment, cfg.seed, first_execution=execution_index(ds.context))
                ds = ds.map_batches(udf, batch_size=cfg.augment.batch_size,
                                    batch_format="numpy", num_cpus=cfg.augment.num_cpus,
                                    concurrency=cfg.augment.concurrency, udf_modifying_row_count=False)
            else:
                ds = ds.drop_columns(["key"])
        out[split] = ds
    return out


def iter_seg_batches(shard, batch_size: int, device, spec: "PreprocessSpec", *, prefetch_batches: int = 2,
                     drop_last: bool = False, epoch: int | None = None) -> Iterator[tuple[Any, Any]]:
    """``(x float32 (N, 3, H, W), y float32 (N, 1, H, W) in {0, 1})`` on ``device`` from a dataset or shard;
    ``epoch`` (training): rows augmented for another epoch stop the run."""
    import torch

    from breakhis_ray.data.pipeline import tensor_collate
    from breakhis_ray.data.transforms import normalize

    device = torch.device(device)
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        collate_fn=tensor_collate(("image", "mask"), combine_chunks=device.type == "cpu", epoch=epoch),
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
    )
    for batch in batches:
        yield normalize(batch["image"], spec), batch["mask"].unsqueeze(1).to(torch.float32)
