"""The BreakHis cohort: its 82 patient folders and their image counts per magnification.

Read from ``resources/patients.tsv`` (7,909 images). The synthetic generator (:mod:`.synthetic`) writes this
tree and the renderer (:mod:`.render`) draws each folder's pixels; both take the table from here, so imports
point one way: ``synthetic -> render -> cohort``. Pure Python: no Ray, no numpy.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from breakhis_ray.domain import MAGNIFICATIONS, SUBTYPE_CODES

#: Where the tree lies below a synthetic dataset's root (the layout of the BreakHis archive).
TREE_ROOT = "BreaKHis_v1/histology_slides/breast"
#: The slide filed under two subtypes (ductal and lobular carcinoma) with the same images.
SHARED_SLIDE = "14-13412"


@dataclass(frozen=True)
class PatientRow:
    """One BreakHis patient folder and its image count per magnification."""

    index: int
    label: str  # benign | malignant
    subtype: str  # folder name, e.g. adenosis
    folder: str  # e.g. SOB_B_A_14-22549AB
    counts: tuple[int, int, int, int]  # images at 40X, 100X, 200X, 400X

    @property
    def code(self) -> str:
        return SUBTYPE_CODES[self.subtype]

    @property
    def slide(self) -> str:
        """Year and slide with section letters, e.g. ``14-22549AB`` (equal for the DC/LC 13412 pair)."""
        return self.folder.split("_", 3)[3]

    def count(self, magnification: int) -> int:
        return self.counts[MAGNIFICATIONS.index(magnification)]

    def filename(self, magnification: int, seq: int) -> str:
        return f"SOB_{self.label[0].upper()}_{self.code}-{self.slide}-{magnification}-{seq:03d}.png"

    def relative_dir(self, magnification: int) -> str:
        return f"{TREE_ROOT}/{self.label}/SOB/{self.subtype}/{self.folder}/{magnification}X"

    def relative_path(self, magnification: int, seq: int) -> str:
        return f"{self.relative_dir(magnification)}/{self.filename(magnification, seq)}"


@lru_cache(maxsize=1)
def load_patients() -> tuple[PatientRow, ...]:
    """The 82 BreakHis patient folders with their per-magnification image counts, in table order."""
    text = resources.files("breakhis_ray.data").joinpath("resources/patients.tsv").read_text("utf-8")
    rows = []
    for i, rec in enumerate(csv.DictReader(io.StringIO(text), delimiter="\t")):
        counts = tuple(int(rec[f"{m}X"]) for m in MAGNIFICATIONS)
        rows.append(PatientRow(i, rec["class"], rec["subtype"], rec["patient_folder"], counts))
    return tuple(rows)


def pixel_source(row: PatientRow) -> PatientRow:
    """The first folder holding the same slide: its parameters render this folder's pixels."""
    return next(r for r in load_patients() if r.slide == row.slide)
