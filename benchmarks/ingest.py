"""Ingest benchmark: Parquet shards + Ray Data against a torch DataLoader over loose PNGs, in one run.

The measuring code lives in :mod:`breakhis_ray.bench.ingest` (it is part of ``breakhis-ray bench``); this
script runs that section alone: ``python benchmarks/ingest.py --help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breakhis_ray.bench.ingest import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
