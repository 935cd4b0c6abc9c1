"""``breakhis-ray bench``: ratio benchmarks measured side by side in one run (see :mod:`.runner`).

The measuring code (a library, configured by :class:`~breakhis_ray.config.BenchConfig` only):
:mod:`.ingest` (Ray Data over shards vs DataLoader vs PIL decode), :mod:`.train` (TorchTrainer vs a plain
loop), :mod:`.inference` (pipeline vs raw model, memory at N vs 10N), :mod:`.synth` (Ray tasks vs one
process), :mod:`.machine`, :mod:`.memory` and :mod:`.table` (targets, table, profile). The runnable entry
points are ``breakhis-ray bench``, ``jobs/bench.py`` and ``benchmarks/<section>.py`` (one section alone).
"""

from breakhis_ray.bench.runner import run_bench

__all__ = ["run_bench"]
