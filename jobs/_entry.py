"""Shared launcher for the job entry points: makes the package importable from a ``ray job submit``
working_dir upload (where it may not be pip-installed) and forwards argv to ``breakhis-ray <command>``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breakhis_ray.cli import main  # noqa: E402


def run(command: str, argv: list[str] | None = None) -> int:
    """``breakhis-ray <command> *argv`` (``argv`` defaults to the process's arguments); the exit status."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])
