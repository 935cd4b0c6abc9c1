"""Train/val/test assignment per fold, patient-disjoint unless asked otherwise.

Output: one row per image per fold, columns ``path, fold (1-based), split (train|val|test)``; the Parquet file
carries ``protocol``, ``patient_key`` and ``dc_lc_policy`` metadata so :func:`load_splits` can re-check it.

Modes (``SplitConfig.mode``):

* ``patient`` (default): stratified patient-grouped K-fold. Fold k tests patient group k; ``val_fraction`` of the
  remaining patients (stratified by class, spread over subtypes) validate; the rest train.
* ``official``: the published ``dsfold1..5.txt`` (or a Kaggle ``Folds.csv``) train/test lists, matched by file
  name; validation patients are carved from each fold's train part (the files define the folds: ``folds`` is
  not used).
* ``image``: random stratified by image, as in image-level papers. It leaks patients between train and test.

Patient groups (``patient_key``): ``folder`` (one patient folder) or ``slide`` (every folder of one year-slide
number, e.g. 22549AB/CD/G). Folders that are copies of one slide under two labels (13412 as DC and LC) follow
``dc_lc_policy``: ``merge`` them into one group, ``keep`` them apart (may leak), or ``drop`` the less common copy.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd

from breakhis_ray import storage
from breakhis_ray.artifacts import write_parquet, write_provenance_beside
from breakhis_ray.config import SplitConfig
from breakhis_ray.data.manifest import read_manifest, read_parquet, same_slide_folders
from breakhis_ray.domain import LABELS
from breakhis_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PROTOCOLS = ("patient", "official", "image")
_DSFOLD_RE = re.compile(r"^dsfold(\d+)\.txt$")


# ------------------------------------------------------------------------------------------ patient groups
def patient_groups(manifest: pd.DataFrame, key: str = "folder", dc_lc_policy: str = "keep") -> pd.Series:
    """Patient group of every manifest row (same index): folder or slide id; ``merge`` joins slide copies."""
    if key == "slide":
        return manifest["slide_id"].astype(str)
    if key != "folder":
        raise ConfigError(f"unknown patient_key {key!r}: use folder or slide")
    groups = manifest["patient_id"].astype(str)
    if dc_lc_policy == "merge":
        for copies in same_slide_folders(manifest):
            groups = groups.mask(groups.isin(copies), "+".join(copies))
    return groups


def _copies_to_drop(manifest: pd.DataFrame) -> list[str]:
    """For each set of slide copies, every folder but the one whose subtype has the most patient folders."""
    folders_per_subtype = manifest.groupby("subtype")["patient_id"].nunique()
    subtype_of = manifest.drop_duplicates("patient_id").set_index("patient_id")["subtype"]
    dropped = []
    for copies in same_slide_folders(manifest):
        keep = max(copies, key=lambda f: (folders_per_subtype[subtype_of[f]], -copies.index(f)))
        dropped += [f for f in copies if f != keep]
    return dropped


def apply_dc_lc_policy(manifest: pd.DataFrame, key: str, policy: str, *, warn: bool = True) -> pd.DataFrame:
    """Rows that take part in the splits under ``policy``; logs what the policy does (nothing is silent)."""
    copies = same_slide_folders(manifest)
    if policy == "drop" and copies:
        dropped = _copies_to_drop(manifest)
        mask = manifest["patient_id"].isin(dropped)
        log.info("dc_lc_policy=drop: excluded %d image(s) of %s from every fold (the same slide as %s under "
                 "another label)", int(mask.sum()), ", ".join(dropped),
                 ", ".join(f for c in copies for f in c if f not in dropped))
        return manifest[~mask]
    if policy == "keep" and key == "folder" and copies and warn:
        for group in copies:
            log.warning("dc_lc_policy=keep treats %s (the same images under different labels) as separate "
                        "patients; they may leak across train/val/test", " and ".join(group))
    return manifest


def _mode(values: pd.Series) -> str:
    counts = values.value_counts().sort_index()
    return str(counts.idxmax())


def _group_table(manifest: pd.DataFrame, groups: pd.Series) -> pd.DataFrame:
    """One row per group: majority label and subtype, image count; sorted by group id."""
    frame = pd.DataFrame({"group": groups.to_numpy(), "label": manifest["label"].to_numpy(),
                          "subtype": manifest["subtype"].to_numpy()})
    return frame.groupby("group").agg(
        label=("label", _mode), subtype=("subtype", _mode), images=("label", "size")
    ).sort_index()


# ------------------------------------------------------------------------------------------- assignment
def _assign_folds(table: pd.DataFrame, k: int, rng: np.random.Generator) -> pd.Series:
    """Stratified group K-fold: spread each (label, subtype) stratum's groups round-robin over the folds,
    largest first, breaking ties by the folds' patient and image counts of that label."""
    label_groups = {label: np.zeros(k) for label in table["label"].unique()}
    label_images = {label: np.zeros(k) for label in table["label"].unique()}
    fold_of: dict[str, int] = {}
    strata = table.groupby(["label", "subtype"])["images"].sum().sort_values(ascending=False, kind="stable")
    for label, subtype in strata.index:
        members = table[(table["label"] == label) & (table["subtype"] == subtype)]
        members = members.iloc[rng.permutation(len(members))].sort_values("images", ascending=False, kind="stable")
        stratum_groups = np.zeros(k)
        for group, images in members["images"].items():
            tie = rng.random(k)
            fold = min(range(k), key=lambda f: (stratum_groups[f], label_groups[label][f],
                                                 label_images[label][f], tie[f]))
            fold_of[group] = fold + 1
            stratum_groups[fold] += 1
            label_groups[label][fold] += 1
            label_images[label][fold] += images
    return pd.Series(fold_of).reindex(table.index)


def _carve_val(table: pd.DataFrame, fraction: float, rng: np.random.Generator) -> set[str]:
    """About ``fraction`` of the groups in ``table`` per label (at least one, never all), spread over subtypes."""
    chosen: set[str] = set()
    if fraction <= 0:
        return chosen
    for _, members in table.groupby("label"):
        n = len(members)
        n_val = min(max(1, round(fraction * n)), n - 1)
        buckets = [list(rng.permutation(g.index.to_numpy()))
                   for _, g in sorted(members.groupby("subtype"), key=lambda kv: (-len(kv[1]), kv[0]))]
        order = [b[i] for i in range(max(map(len, buckets))) for b in buckets if i < len(b)]
        chosen.update(order[:n_val])
    return chosen


def _fold_frame(paths: pd.Series, fold: int, split: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"path": paths.to_numpy(), "fold": np.full(len(paths), fold, dtype="int16"),
                         "split": split})


def _grouped_splits(manifest: pd.DataFrame, groups: pd.Series, test_fold: Mapping[int, pd.Series],
                    val_fraction: float, seed: int) -> pd.DataFrame:
    """Per fold: rows whose flag in ``test_fold[k]`` is true test; val groups carved from the others."""
    table = _group_table(manifest, groups)
    frames = []
    for fold, is_test in sorted(test_fold.items()):
        rest = table.loc[sorted(set(groups[~is_test]))]
        val = _carve_val(rest, val_fraction, np.random.default_rng([seed, fold]))
        split = np.where(is_test, "test", np.where(groups.isin(val), "val", "train"))
        frames.append(_fold_frame(manifest["path"], fold, split))
    return pd.concat(frames, ignore_index=True)


def _patient_splits(manifest: pd.DataFrame, groups: pd.Series, cfg: SplitConfig) -> pd.DataFrame:
    table = _group_table(manifest, groups)
    if len(table) < cfg.folds:
        raise DataError(f"only {len(table)} patient group(s) (patient_key={cfg.patient_key}) for {cfg.folds} "
                        "folds: lower --folds")
    for label, n in table["label"].value_counts().sort_index().items():
        if n < cfg.folds:
            log.warning("only %d %s patient group(s) for %d folds: some test folds have no %s patient",
                        n, label, cfg.folds, label)
    fold_of_group = _assign_folds(table, cfg.folds, np.random.default_rng(cfg.seed))
    row_fold = groups.map(fold_of_group)
    return _grouped_splits(manifest, groups, {k: row_fold == k for k in range(1, cfg.folds + 1)},
                           cfg.val_fraction, cfg.seed)


def _image_splits(manifest: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Random K-fold by image, stratified by (label, subtype, magnification). Leaks patients."""
    log.warning("mode=image splits images at random, so the same patient appears in train and test; "
                "scores are optimistic and only comparable to image-level papers")
    rng = np.random.default_rng(cfg.seed)
    n = len(manifest)
    row_fold = np.zeros(n, dtype=int)
    strata = manifest.groupby(["label", "subtype", "magnification"], sort=True).indices
    offset = 0
    for key in sorted(strata):
        idx = rng.permutation(strata[key])
        row_fold[idx] = (offset + np.arange(len(idx))) % cfg.folds + 1
        offset += len(idx)
    frames = []
    for fold in range(1, cfg.folds + 1):
        split = np.where(row_fold == fold, "test", "train").astype(object)
        fold_rng = np.random.default_rng([cfg.seed, fold])
        for idx in strata.values():
            rest = idx[row_fold[idx] != fold]
            n_val = round(cfg.val_fraction * len(rest))
            split[fold_rng.choice(rest, size=n_val, replace=False)] = "val"
        frames.append(_fold_frame(manifest["path"], fold, split))
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------ official folds
def _parse_dsfold(text: str, source: str) -> tuple[list[tuple[str, int, int, str]], list[str]]:
    rows, bad = [], []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        fields = [f.strip() for f in line.split("|")]
        if (len(fields) != 4 or not fields[1].isdigit() or not fields[2].isdigit()
                or fields[3].lower() not in ("train", "test")):
            bad.append(f"{source}:{number}: expected filename|mag|fold|train or test, got {line!r}")
            continue
        rows.append((fields[0], int(fields[1]), int(fields[2]), fields[3].lower()))
    return rows, bad


def _parse_folds_csv(data: bytes, source: str) -> tuple[list[tuple[str, int, int, str]], list[str]]:
    try:
        table = pd.read_csv(io.BytesIO(data), dtype=str)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{source} is not a readable CSV file: {str(exc).splitlines()[0]}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("fold", "mag", "grp", "filename") if c not in table.columns]
    if missing:
        raise DataError(f"{source} lacks column(s) {', '.join(missing)} (expected fold,mag,grp,filename)")
    text = "\n".join(
        f"{str(r.filename).replace(chr(92), '/').rsplit('/', 1)[-1]}|{r.mag}|{r.fold}|{r.grp}"
        for r in table.itertuples(index=False)
    )
    rows, bad = _parse_dsfold(text, source)
    return rows, [b.replace(f"{source}:", f"{source} row ", 1) for b in bad]


def _folds_sources(uri: str) -> list[str]:
    """The folds file itself, or for ``dsfoldN.txt`` every ``dsfold1..5.txt`` (and N) beside it."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    m = _DSFOLD_RE.match(name)
    if not m:
        return [uri]
    folder = storage.parent(uri)
    candidates = [storage.join(folder, f"dsfold{i}.txt") for i in range(1, max(5, int(m.group(1))) + 1)]
    found = [c for c in candidates if c == uri or storage.exists(c)]
    return found


def read_official_folds(uri: str) -> pd.DataFrame:
    """Rows ``filename, magnification, fold, split`` (train|test) from dsfold*.txt files or a Folds.csv.

    Malformed rows are logged one per line with a count; none valid at all raises :class:`DataError`.
    """
    rows, bad = [], []
    sources = _folds_sources(uri)
    for source in sources:
        data = storage.read_bytes(source)
        if source.lower().endswith(".csv"):
            got, wrong = _parse_folds_csv(data, source)
        else:
            got, wrong = _parse_dsfold(data.decode("utf-8", errors="replace"), source)
        rows += got
        bad += wrong
    for line in bad:
        log.warning("problem: %s", line)
    if bad:
        log.warning("%d malformed folds row(s) ignored (listed above)", len(bad))
    if not rows:
        raise DataError(f"no valid folds row in {', '.join(sources)}")
    log.info("official folds from %s", ", ".join(sources))
    frame = pd.DataFrame(rows, columns=["filename", "magnification", "fold", "split"])
    duplicated = frame.duplicated(["filename", "fold"])
    if duplicated.any():
        log.warning("%d repeated (file name, fold) row(s) ignored; the first one is used", int(duplicated.sum()))
    return frame[~duplicated].reset_index(drop=True)


def _official_assignment(manifest: pd.DataFrame, kept: pd.DataFrame, uri: str) -> tuple[pd.DataFrame, list[int]]:
    """Official train/test rows for the kept manifest rows, reporting names the manifest lacks."""
    folds = read_official_folds(uri)
    unknown = sorted(set(folds["filename"]) - set(manifest["filename"]))
    for name in unknown:
        log.warning("unmatched: %s (in the folds file, not in the manifest)", name)
    if unknown:
        log.warning("%d folds-file name(s) not in the manifest (listed above)", len(unknown))
    matched = folds.merge(kept[["filename", "path"]], on="filename", how="inner")
    fold_ids = sorted(folds["fold"].unique())
    for fold in fold_ids:
        missing = len(kept) - int((matched["fold"] == fold).sum())
        if missing:
            log.warning("fold %s: %d manifest image(s) not listed in the folds file, left out of this fold",
                        fold, missing)
    if matched.empty:
        raise DataError(f"no image of the manifest is named in {uri}")
    return matched[["path", "fold", "split"]], fold_ids


def _official_splits(manifest: pd.DataFrame, kept: pd.DataFrame, cfg: SplitConfig) -> tuple[pd.DataFrame, str]:
    """Official folds with val carved from train; returns the splits and the dc_lc_policy they satisfy."""
    if not cfg.folds_file:
        raise ConfigError("mode=official needs --folds-file (a dsfoldN.txt or a Folds.csv)")
    official, fold_ids = _official_assignment(manifest, kept, cfg.folds_file)
    policy = cfg.dc_lc_policy
    leak = _find_leak(official, _group_lookup(kept, cfg.patient_key, policy))
    if leak and cfg.patient_key == "folder" and policy == "merge":
        if _find_leak(official, _group_lookup(kept, "folder", "keep")) is None:
            log.warning("the official folds split copies of one slide (%s); dc_lc_policy=merge cannot hold for "
                        "given folds, so they count as separate patients (use dc_lc_policy=drop to exclude a copy)",
                        leak)
            policy, leak = "keep", None
    if leak:
        raise DataError(f"the official folds are not patient-disjoint under patient_key={cfg.patient_key}: {leak}")
    groups = patient_groups(kept, cfg.patient_key, policy)
    frames = []
    for fold in fold_ids:
        part = official[official["fold"] == fold]
        rows = kept[kept["path"].isin(part["path"])]
        is_test = rows["path"].map(part.set_index("path")["split"]) == "test"
        frames.append(_grouped_splits(rows, groups.loc[rows.index], {fold: is_test}, cfg.val_fraction, cfg.seed))
    return pd.concat(frames, ignore_index=True), policy


# ---------------------------------------------------------------------------------------------- public API
def make_splits(manifest_df: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Rows ``path, fold, split`` for every image and fold; ``attrs`` hold the Parquet metadata to write."""
    if manifest_df.empty:
        raise DataError("the manifest holds no image")
    manifest = manifest_df.reset_index(drop=True)
    kept = apply_dc_lc_policy(manifest, cfg.patient_key, cfg.dc_lc_policy, warn=cfg.mode != "image")
    policy = cfg.dc_lc_policy
    if cfg.mode == "image":
        splits = _image_splits(kept, cfg)
    elif cfg.mode == "official":
        splits, policy = _official_splits(manifest, kept, cfg)
    else:
        splits = _patient_splits(kept, patient_groups(kept, cfg.patient_key, policy), cfg)
    splits = splits.sort_values(["fold", "path"], kind="stable").reset_index(drop=True)
    splits.attrs.update(protocol=cfg.mode, patient_key=cfg.patient_key, dc_lc_policy=policy)
    return splits


def _group_lookup(manifest: pd.DataFrame, key: str, dc_lc_policy: str) -> pd.Series:
    """Patient group indexed by path."""
    return pd.Series(patient_groups(manifest, key, dc_lc_policy).to_numpy(), index=manifest["path"].to_numpy())


def _find_leak(splits: pd.DataFrame, group_of_path: pd.Series) -> str | None:
    """Describe the first patient group found in two splits of one fold, or ``None``."""
    frame = pd.DataFrame({"fold": splits["fold"].to_numpy(), "split": splits["split"].to_numpy(),
                          "group": splits["path"].map(group_of_path).to_numpy()})
    per_group = frame.groupby(["fold", "group"])["split"].nunique()
    leaking = per_group[per_group > 1]
    if leaking.empty:
        return None
    fold, group = leaking.index[0]
    where = frame[(frame["fold"] == fold) & (frame["group"] == group)]["split"]
    names = [s for s in SPLITS if s in set(where)]
    return f"patient {group} is in {' and '.join(names)} of fold {fold}"


def assert_patient_disjoint(splits_df: pd.DataFrame, manifest_df: pd.DataFrame, key: str = "folder",
                            dc_lc_policy: str = "keep") -> None:
    """Raise :class:`DataError` naming a patient found in two splits of one fold (or an unknown image)."""
    lookup = _group_lookup(manifest_df, key, dc_lc_policy)
    unknown = ~splits_df["path"].isin(lookup.index)
    if unknown.any():
        raise DataError(f"{int(unknown.sum())} split row(s) name images missing from the manifest, "
                        f"e.g. {splits_df['path'][unknown].iloc[0]}")
    leak = _find_leak(splits_df, lookup)
    if leak:
        raise DataError(f"splits leak patients (patient_key={key}): {leak}")


def write_splits(splits_df: pd.DataFrame, uri: str) -> None:
    """Write splits Parquet with its ``protocol``/``patient_key``/``dc_lc_policy`` metadata."""
    write_parquet(splits_df, uri, metadata={k: str(v) for k, v in splits_df.attrs.items()})


def load_splits(uri: str, manifest_df: pd.DataFrame) -> pd.DataFrame:
    """Read splits written by :func:`run_split` and re-check them (patient-disjoint unless protocol=image)."""
    splits, meta = read_parquet(uri)
    protocol = meta.get("protocol")
    if protocol not in PROTOCOLS:
        raise DataError(f"{uri} has no split protocol metadata (expected one of {', '.join(PROTOCOLS)})")
    missing = [c for c in ("path", "fold", "split") if c not in splits.columns]
    if missing:
        raise DataError(f"{uri} is not a splits file: missing column(s) {', '.join(missing)}")
    odd = sorted(set(splits["split"]) - set(SPLITS))
    if odd:
        raise DataError(f"{uri} has unknown split value(s) {', '.join(map(str, odd))}")
    repeated = splits.duplicated(["path", "fold"])
    if repeated.any():
        row = splits[repeated].iloc[0]
        raise DataError(f"{uri} lists {row['path']} more than once in fold {row['fold']}")
    if protocol != "image":
        assert_patient_disjoint(splits, manifest_df, meta.get("patient_key", "folder"),
                                meta.get("dc_lc_policy", "keep"))
    splits.attrs.update(meta)
    return splits


def split_summary(splits_df: pd.DataFrame, manifest_df: pd.DataFrame, key: str = "folder",
                  dc_lc_policy: str = "keep") -> pd.DataFrame:
    """Patients and images per fold and split, with images per class."""
    info = pd.DataFrame({"path": manifest_df["path"].to_numpy(), "label": manifest_df["label"].to_numpy(),
                         "group": patient_groups(manifest_df, key, dc_lc_policy).to_numpy()})
    frame = splits_df.merge(info, on="path", how="left")
    summary = frame.groupby(["fold", "split"]).agg(patients=("group", "nunique"), images=("path", "size"))
    for label in LABELS:
        summary[label] = frame.assign(hit=frame["label"] == label).groupby(["fold", "split"])["hit"].sum()
    summary = summary.reset_index()
    summary["order"] = summary["split"].map({s: i for i, s in enumerate(SPLITS)})
    return summary.sort_values(["fold", "order"]).drop(columns="order").reset_index(drop=True)


def run_split(cfg: SplitConfig) -> pd.DataFrame:
    """CLI stage: read the manifest, make and write the splits with ``<out>.config.yaml`` and
    ``<out>.versions.json`` beside them, log per-fold counts."""
    manifest = read_manifest(cfg.manifest)
    splits = make_splits(manifest, cfg)
    write_splits(splits, cfg.out)
    write_provenance_beside(cfg.out, cfg)
    summary = split_summary(splits, manifest, cfg.patient_key, splits.attrs["dc_lc_policy"])
    log.info("%s", summary.to_string(index=False))
    log.info("wrote %s (protocol=%s, patient_key=%s)", cfg.out, cfg.mode, cfg.patient_key)
    return splits
