"""Batch-inference benchmark: the Ray Data pipeline against the bare model, and its memory at N vs 10N images.

The measuring code is :mod:`breakhis_ray.bench.inference`; this runs the ``inference`` section of ``breakhis-ray bench``
alone, with the same config (``BenchConfig``), flags and overrides::

    python benchmarks/inference.py [--config FILE] [--quick] [--json FILE] [inference.KEY=VALUE ...]
"""

import sys

from _one_section import run_section

if __name__ == "__main__":
    sys.exit(run_section("inference"))
