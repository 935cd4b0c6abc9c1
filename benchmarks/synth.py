"""Synthetic-generation benchmark: run_synth with Ray tasks against the same task function in one process.

The measuring code is :mod:`breakhis_ray.bench.synth`; this runs the ``synth`` section of ``breakhis-ray bench``
alone, with the same config (``BenchConfig``), flags and overrides::

    python benchmarks/synth.py [--config FILE] [--quick] [--json FILE] [synth.KEY=VALUE ...]
"""

import sys

from _one_section import run_section

if __name__ == "__main__":
    sys.exit(run_section("synth"))
