"""BreakHis manifest: one row per image file of a local or ``s3://`` tree.

This is the only module that knows BreakHis names. ``SOB_B_A-14-22549AB-40-001.png`` reads: procedure ``SOB``,
class ``B``/``M``, subtype code, year (``14``/``15``), slide number with optional section letters (``22549`` +
``AB``), magnification without ``X`` and a 3-digit sequence number (not always contiguous). The patient folder
is the same name with ``_`` before the year (``SOB_B_A_14-22549AB``). Below ``histology_slides/breast`` (found
anywhere under the root, e.g. ``BreaKHis_v1/BreaKHis_v1/``) the layout is
``{benign,malignant}/SOB/{subtype}/{patient folder}/{40,100,200,400}X/{file}``.

Policy: a file whose name cannot be parsed, whose folders disagree with its name, or whose name repeats one
already seen is *excluded* from the manifest and returned as a :class:`Problem` (``run_manifest`` logs each
one and a count): nothing is dropped silently. Image sizes come from the file header only; an unreadable header
leaves ``width``/``height`` null and the row stays, so a later stage records it as a reject.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from breakhis_ray import storage
from breakhis_ray.artifacts import write_parquet, write_provenance_beside
from breakhis_ray.config import ManifestConfig
from breakhis_ray.data.decode import ImageRejected, image_size
from breakhis_ray.domain import BENIGN, LABEL_IDS, LABELS, MAGNIFICATIONS, MALIGNANT, SUBTYPE_LABELS, SUBTYPES
from breakhis_ray.errors import DataError

log = logging.getLogger(__name__)

PROCEDURE = "SOB"
CLASS_LETTERS = {"B": BENIGN, "M": MALIGNANT}
YEARS = (14, 15)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "tif")  # case-sensitive, as in the dataset
BREAST_ROOT = ("histology_slides", "breast")
LAYOUT = "<class>/SOB/<subtype>/<patient folder>/<mag>X/<file>"
HEADER_BYTES = 64 * 1024

#: Manifest columns and their pandas dtypes (see docs/ARCHITECTURE.md).
COLUMNS: dict[str, str | type] = {
    "path": str,
    "filename": str,
    "label": str,
    "label_id": "int8",
    "subtype": str,
    "subtype_code": str,
    "patient_id": str,
    "slide_id": str,
    "magnification": "int16",
    "seq": "int16",
    "width": "Int32",
    "height": "Int32",
}

_NAME_RE = re.compile(
    r"^(?P<procedure>[A-Za-z]+)_(?P<cls>[A-Za-z])_(?P<code>[A-Za-z]+)-(?P<year>\d+)-(?P<slide>\d+)"
    r"(?P<section>[A-Za-z]*)-(?P<mag>\d+)-(?P<seq>\d+)\.(?P<ext>[A-Za-z]+)$"
)
_PATIENT_RE = re.compile(r"^SOB_[BM]_[A-Z]+_(?P<slide>\d+-\d+[A-Z]*)$")


@dataclass(frozen=True)
class ParsedName:
    """The fields of one BreakHis image file name."""

    label: str  # benign | malignant
    subtype_code: str  # A F PT TA DC LC MC PC
    subtype: str  # folder name, e.g. adenosis
    year: int  # 14 or 15
    slide_number: str  # digits, e.g. "22549"
    section: str  # section letters, possibly empty, e.g. "AB"
    magnification: int  # 40 100 200 400
    seq: int
    extension: str = "png"

    @property
    def class_letter(self) -> str:
        return "B" if self.label == BENIGN else "M"

    @property
    def patient_folder(self) -> str:
        return f"{PROCEDURE}_{self.class_letter}_{self.subtype_code}_{self.year}-{self.slide_number}{self.section}"

    @property
    def slide_id(self) -> str:
        return f"{self.year}-{self.slide_number}"

    @property
    def magnification_folder(self) -> str:
        return f"{self.magnification}X"

    @property
    def filename(self) -> str:
        return (f"{PROCEDURE}_{self.class_letter}_{self.subtype_code}-{self.year}-{self.slide_number}"
                f"{self.section}-{self.magnification}-{self.seq:03d}.{self.extension}")

    def relative_path(self) -> str:
        """Path below ``histology_slides/breast``."""
        return "/".join((self.label, PROCEDURE, self.subtype, self.patient_folder, self.magnification_folder,
                         self.filename))


@dataclass(frozen=True)
class Problem:
    """A file left out of the manifest, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def explain_filename(name: str) -> ParsedName | str:
    """Parse a file name; on failure return the reason (a string) instead of a :class:`ParsedName`."""
    m = _NAME_RE.match(name)
    if not m:
        return "not a BreakHis image name (expected e.g. SOB_B_A-14-22549AB-40-001.png)"
    g = m.groupdict()
    if g["ext"] not in IMAGE_EXTENSIONS:
        return f"extension .{g['ext']} is not one of " + ", ".join("." + e for e in IMAGE_EXTENSIONS)
    if g["procedure"] != PROCEDURE:
        return f"procedure {g['procedure']!r} is not {PROCEDURE}"
    if g["cls"] not in CLASS_LETTERS:
        return f"class letter {g['cls']!r} is not B or M"
    if g["code"] not in SUBTYPES:
        return f"subtype code {g['code']!r} is not one of {', '.join(SUBTYPES)}"
    label = CLASS_LETTERS[g["cls"]]
    if SUBTYPE_LABELS[g["code"]] != label:
        return f"subtype {g['code']} is {SUBTYPE_LABELS[g['code']]} but the class letter is {g['cls']}"
    if int(g["year"]) not in YEARS or len(g["year"]) != 2:
        return f"year {g['year']!r} is not one of {', '.join(map(str, YEARS))}"
    if g["section"] and not g["section"].isupper():
        return f"section letters {g['section']!r} must be upper case"
    if int(g["mag"]) not in MAGNIFICATIONS or g["mag"].startswith("0"):
        return f"magnification {g['mag']!r} is not one of {', '.join(map(str, MAGNIFICATIONS))}"
    if len(g["seq"]) != 3:
        return f"sequence number {g['seq']!r} is not 3 digits"
    return ParsedName(
        label=label,
        subtype_code=g["code"],
        subtype=SUBTYPES[g["code"]],
        year=int(g["year"]),
        slide_number=g["slide"],
        section=g["section"],
        magnification=int(g["mag"]),
        seq=int(g["seq"]),
        extension=g["ext"],
    )


def parse_filename(name: str) -> ParsedName | None:
    """Parse ``SOB_B_A-14-22549AB-40-001.png``; ``None`` when the name is not a BreakHis image name."""
    parsed = explain_filename(name)
    return parsed if isinstance(parsed, ParsedName) else None


def same_slide_folders(df: pd.DataFrame) -> list[tuple[str, ...]]:
    """Patient folders holding the same slide (year, number and section letters) under different subtypes.

    In BreakHis this is ``SOB_M_DC_14-13412`` and ``SOB_M_LC_14-13412``: the same images under two labels.
    Folders that only share the slide number (``22549AB``/``22549CD``) are different sections, not copies.
    """
    by_slide: dict[str, list[str]] = {}
    for folder in sorted(df["patient_id"].unique()):
        m = _PATIENT_RE.match(folder)
        if m:
            by_slide.setdefault(m.group("slide"), []).append(folder)
    return [tuple(folders) for folders in by_slide.values() if len(folders) > 1]


# ------------------------------------------------------------------------------------------- tree scan
@dataclass(frozen=True)
class _Entry:
    path: str
    name: ParsedName


def _breast_index(parts: list[str]) -> int | None:
    """Index just past the last ``histology_slides/breast`` in ``parts``, or ``None``."""
    for i in range(len(parts) - 2, -1, -1):
        if (parts[i], parts[i + 1]) == BREAST_ROOT:
            return i + 2
    return None


def _check_file(path: str, rel: list[str]) -> ParsedName | str:
    """Parse the file name and cross-check it with the folders ``rel`` (layout below the breast root)."""
    parsed = explain_filename(rel[-1])
    if isinstance(parsed, str):
        return parsed
    expected = parsed.relative_path().split("/")
    if len(rel) != len(expected):
        return f"expected {LAYOUT} below histology_slides/breast, found {'/'.join(rel)}"
    what = ("class", "procedure", "subtype", "patient", "magnification")
    wrong = [f"{w} folder {got!r} should be {want!r}" for w, got, want in zip(what, rel, expected) if got != want]
    return "; ".join(wrong) if wrong else parsed


def _scan(paths: Iterable[str]) -> tuple[list[_Entry], list[Problem], list[str], int]:
    """Classify listed files: (images, problems, breast roots used, files outside those roots).

    A ``histology_slides/breast`` folder counts as a dataset root when at least one BreakHis image name lies
    below it (a mirrored tree of mask files does not). With no such root, every file is checked by its last
    six path components, so ``--root .../breast`` or a tree without ``histology_slides`` works as well.
    """
    files = sorted(str(p) for p in paths)
    located: list[tuple[str, str | None, list[str]]] = []
    roots_with_images: set[str] = set()
    for path in files:
        parts = path.split("/")
        cut = _breast_index(parts)
        root = "/".join(parts[:cut]) if cut is not None else None
        rel = parts[cut:] if cut is not None else parts[-6:]
        located.append((path, root, rel))
        if root is not None and parse_filename(rel[-1]) is not None:
            roots_with_images.add(root)
    entries: list[_Entry] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    outside = 0
    for path, root, rel in located:
        if roots_with_images and root not in roots_with_images:
            outside += 1
            continue
        checked = _check_file(path, rel)
        if isinstance(checked, str):
            problems.append(Problem(path, checked))
        elif checked.filename in seen:
            problems.append(Problem(path, f"duplicate file name, first seen at {seen[checked.filename]}"))
        else:
            seen[checked.filename] = path
            entries.append(_Entry(path, checked))
    return entries, problems, sorted(roots_with_images), outside


def _frame(entries: list[_Entry], sizes: Mapping[str, tuple[int, int] | None] | None) -> pd.DataFrame:
    sizes = sizes or {}
    dims = [sizes.get(e.path) for e in entries]
    data = {
        "path": [e.path for e in entries],
        "filename": [e.name.filename for e in entries],
        "label": [e.name.label for e in entries],
        "label_id": [LABEL_IDS[e.name.label] for e in entries],
        "subtype": [e.name.subtype for e in entries],
        "subtype_code": [e.name.subtype_code for e in entries],
        "patient_id": [e.name.patient_folder for e in entries],
        "slide_id": [e.name.slide_id for e in entries],
        "magnification": [e.name.magnification for e in entries],
        "seq": [e.name.seq for e in entries],
        "width": [d[0] if d else None for d in dims],
        "height": [d[1] if d else None for d in dims],
    }
    return pd.DataFrame({col: pd.Series(data[col], dtype=dtype) for col, dtype in COLUMNS.items()})


def manifest_from_paths(
    paths: Iterable[str], sizes: Mapping[str, tuple[int, int] | None] | None = None
) -> tuple[pd.DataFrame, list[Problem]]:
    """Manifest rows from file paths alone (no I/O); ``sizes`` maps a path to ``(width, height)``."""
    entries, problems, _, _ = _scan(paths)
    return _frame(entries, sizes), problems


def find_breast_roots(uri: str) -> list[str]:
    """Every ``.../histology_slides/breast`` folder below ``uri`` that holds BreakHis images (one listing)."""
    return _scan(storage.list_files(uri))[2]


# ------------------------------------------------------------------------------------------ image sizes
def _header_size(fs, path: str) -> tuple[int, int] | None:
    """(width, height) from the image header (:func:`~breakhis_ray.data.decode.image_size`): the first
    ``HEADER_BYTES``, the whole file only if needed; ``None`` when unreadable."""
    try:
        with fs.open_input_file(path) as f:
            head = f.read_at(HEADER_BYTES, 0)
            try:
                return image_size(head)
            except ImageRejected:
                if f.size() <= len(head):
                    return None
            f.seek(0)
            return image_size(f)  # the header lies further in (e.g. a large EXIF block)
    except (ImageRejected, OSError):
        return None


def read_image_sizes(uris: list[str], threads: int = 16) -> dict[str, tuple[int, int] | None]:
    """Header sizes of many images, read concurrently; ``None`` for an unreadable one."""
    if not uris:
        return {}
    fs, _ = storage.resolve(uris[0])
    fs_paths = [u[len("s3://"):] if storage.is_s3(u) else storage.resolve(u)[1] for u in uris]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        sizes = list(pool.map(lambda p: _header_size(fs, p), fs_paths))
    return dict(zip(uris, sizes))


# --------------------------------------------------------------------------------------------- build
def build_manifest(
    root_uri: str, read_sizes: bool = True, threads: int = 16
) -> tuple[pd.DataFrame, list[Problem]]:
    """Walk ``root_uri`` (one recursive listing) and return ``(manifest, problems)``.

    ``manifest.attrs`` records ``roots`` (the ``histology_slides/breast`` folders used) and ``ignored``
    (how many listed files lie outside them, e.g. masks or fold files beside the tree).
    """
    entries, problems, roots, outside = _scan(storage.list_files(root_uri))
    sizes = read_image_sizes([e.path for e in entries], threads) if read_sizes else None
    df = _frame(entries, sizes)
    df.attrs.update(roots=roots, ignored=outside)
    return df, problems


def class_magnification_table(df: pd.DataFrame) -> pd.DataFrame:
    """Images per magnification and class with totals (Table 1 of the BreakHis paper)."""
    counts = {
        (mag, label): int(((df["magnification"] == mag) & (df["label"] == label)).sum())
        for mag in MAGNIFICATIONS
        for label in LABELS
    }
    table = pd.DataFrame(
        [[counts[(mag, label)] for label in LABELS] for mag in MAGNIFICATIONS],
        index=[f"{mag}X" for mag in MAGNIFICATIONS],
        columns=[label.capitalize() for label in LABELS],
    )
    table["Total"] = table.sum(axis=1)
    table.loc["Total"] = table.sum(axis=0)
    table.index.name = "Magnification"
    return table


def patient_summary(df: pd.DataFrame) -> str:
    """One line: images, patient folders per class and distinct slides."""
    per_label = df.groupby("label")["patient_id"].nunique()
    parts = ", ".join(f"{int(per_label.get(label, 0))} {label}" for label in LABELS)
    return (f"{len(df)} images, {df['patient_id'].nunique()} patient folders ({parts}), "
            f"{df['slide_id'].nunique()} distinct slides")


# ------------------------------------------------------------------------------------------ Parquet I/O
def read_parquet(uri: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read one Parquet file; return the frame and its non-pandas schema metadata."""
    data = storage.read_bytes(uri)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{uri} is not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"pandas"}
    return table.to_pandas(), meta


def read_manifest(uri: str) -> pd.DataFrame:
    """Read a manifest written by :func:`run_manifest`, checking its columns."""
    df, _ = read_parquet(uri)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{uri} is not a manifest: missing column(s) {', '.join(missing)}")
    return df


def run_manifest(cfg: ManifestConfig) -> pd.DataFrame:
    """CLI stage: build the manifest, write it with ``<out>.config.yaml`` and ``<out>.versions.json`` beside it,
    log Table 1 and every problem."""
    df, problems = build_manifest(cfg.root, read_sizes=cfg.read_sizes, threads=cfg.io_threads)
    for problem in problems:
        log.warning("problem: %s", problem)
    if problems:
        log.warning("%d file(s) excluded from the manifest (listed above)", len(problems))
    if df.empty:
        raise DataError(f"no BreakHis image found under {cfg.root} (expected .../histology_slides/breast/"
                        f"{LAYOUT} with names like SOB_B_A-14-22549AB-40-001.png)")
    for root in df.attrs.get("roots", []):
        log.info("images under %s", root)
    if df.attrs.get("ignored"):
        log.info("%d file(s) outside histology_slides/breast not considered", df.attrs["ignored"])
    write_parquet(df, cfg.out)
    write_provenance_beside(cfg.out, cfg)
    log.info("%s", class_magnification_table(df).to_string())
    log.info("%s", patient_summary(df))
    if cfg.read_sizes:
        unreadable = int(df["width"].isna().sum())
        if unreadable:
            log.warning("%d image(s) with an unreadable header (null width/height; rejected later)", unreadable)
    log.info("wrote %s", cfg.out)
    return df
