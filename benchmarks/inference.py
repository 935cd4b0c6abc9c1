"""Batch-inference benchmark: the Ray Data pipeline against the bare model, and its memory at N vs 10N images.

The measuring code lives in :mod:`breakhis_ray.bench.inference` (it is part of ``breakhis-ray bench``); this
script runs that section alone: ``python benchmarks/inference.py --help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breakhis_ray.bench.inference import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
