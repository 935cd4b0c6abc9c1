"""Ingest benchmark: Parquet shards + Ray Data against a torch DataLoader over loose PNGs, in one run.

The measuring code is :mod:`breakhis_ray.bench.ingest`; this runs the ``ingest`` section of ``breakhis-ray bench``
alone, with the same config (``BenchConfig``), flags and overrides::

    python benchmarks/ingest.py [--config FILE] [--quick] [--json FILE] [ingest.KEY=VALUE ...]
"""

import sys

from _one_section import run_section

if __name__ == "__main__":
    sys.exit(run_section("ingest"))
