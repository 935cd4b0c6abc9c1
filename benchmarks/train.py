"""Training-step benchmark: Ray Train TorchTrainer against a plain PyTorch loop, and 2 workers vs 1.

The measuring code is :mod:`breakhis_ray.bench.train`; this runs the ``train`` section of ``breakhis-ray bench``
alone, with the same config (``BenchConfig``), flags and overrides::

    python benchmarks/train.py [--config FILE] [--quick] [--json FILE] [train.KEY=VALUE ...]
"""

import sys

from _one_section import run_section

if __name__ == "__main__":
    sys.exit(run_section("train"))
