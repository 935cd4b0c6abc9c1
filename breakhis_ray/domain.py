"""BreakHis domain constants: one home each.

Labels, subtype codes, magnifications and the normalisation constants are defined here and imported everywhere
else (the manifest still owns file-name parsing; this module only names things). Pure Python: no Ray, no torch.
"""

from __future__ import annotations

#: Binary classes, in label-id order (0 benign, 1 malignant).
BENIGN = "benign"
MALIGNANT = "malignant"
LABELS: tuple[str, ...] = (BENIGN, MALIGNANT)
LABEL_IDS: dict[str, int] = {label: i for i, label in enumerate(LABELS)}

#: Subtype code -> folder name, benign subtypes first (the BreakHis order).
SUBTYPES: dict[str, str] = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
#: Folder name -> subtype code.
SUBTYPE_CODES: dict[str, str] = {folder: code for code, folder in SUBTYPES.items()}
#: Subtype code -> binary label.
SUBTYPE_LABELS: dict[str, str] = {code: (BENIGN if i < 4 else MALIGNANT) for i, code in enumerate(SUBTYPES)}
#: The eight subtype class names in class-id order (the subtype task).
SUBTYPE_CLASSES: tuple[str, ...] = tuple(SUBTYPES.values())
#: Subtype class name (folder) -> binary label.
SUBTYPE_CLASS_LABELS: dict[str, str] = {folder: SUBTYPE_LABELS[code] for code, folder in SUBTYPES.items()}

#: Classification tasks: ``binary`` (benign / malignant) and ``subtype`` (the eight subtypes).
TASKS: tuple[str, ...] = ("binary", "subtype")


def task_classes(task: str) -> tuple[str, ...]:
    """Class names of a task, in class-id order (the classifier's outputs and its checkpoint's ``labels``)."""
    if task == "binary":
        return LABELS
    if task == "subtype":
        return SUBTYPE_CLASSES
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def task_of_classes(classes) -> str | None:
    """The task whose class names are ``classes`` (in order), else ``None``."""
    names = tuple(str(c) for c in classes)
    return next((task for task in TASKS if task_classes(task) == names), None)


#: Benhammou et al.'s evaluation protocols: name -> (task, magnification mode). Magnification-specific
#: (``specific``): one model per magnification; magnification-independent (``independent``): one model for all.
EVALUATION_PROTOCOLS: dict[str, tuple[str, str]] = {
    "MSB": ("binary", "specific"),
    "MIB": ("binary", "independent"),
    "MSM": ("subtype", "specific"),
    "MIM": ("subtype", "independent"),
}

#: Optical magnifications of BreakHis, in order.
MAGNIFICATIONS: tuple[int, ...] = (40, 100, 200, 400)

#: ImageNet normalisation (torchvision's pretrained weights expect it).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Plain [0, 1] scaling (CancerNet's preprocessing).
UNIT_MEAN: tuple[float, float, float] = (0.0, 0.0, 0.0)
UNIT_STD: tuple[float, float, float] = (1.0, 1.0, 1.0)
