"""Run ONE section of ``breakhis-ray bench`` through the same CLI and config (:class:`BenchConfig`).

``python benchmarks/<section>.py [--config FILE] [--quick] [--json FILE] [key=value ...]`` is
``breakhis-ray bench ... <the other sections>.enabled=false``: the same flags, overrides, defaults and
output (table, JSON, profile, provenance). Without ``--json``/``--config``/``json_out=`` the JSON goes to
``runs/bench/<section>.json``, so a one-section run does not replace the full run's ``bench.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when run from a source tree

from breakhis_ray.cli import main  # noqa: E402

SECTIONS = ("ingest", "train", "inference", "synth")


def section_argv(section: str, argv: list[str]) -> list[str]:
    """``breakhis-ray`` arguments that run ``section`` alone with the user's ``argv`` (overrides stay trailing)."""
    if section not in SECTIONS:
        raise ValueError(f"unknown bench section {section!r}; choose one of {', '.join(SECTIONS)}")
    extra = [f"{other}.enabled=false" for other in SECTIONS if other != section]
    extra.append(f"{section}.enabled=true")
    names_output = any(a.startswith(("--json", "--config", "json_out=")) for a in argv)
    if not names_output and not any(a in ("-h", "--help") for a in argv):
        extra.append(f"json_out=runs/bench/{section}.json")
    return ["bench", *argv, *extra]


def run_section(section: str, argv: list[str] | None = None) -> int:
    return main(section_argv(section, sys.argv[1:] if argv is None else argv))
