"""The one rule that sizes CPU decode tasks, for training, segmentation, ``infer`` and the benchmarks.

Pure arithmetic (no Ray): the caller passes the CPUs the decode tasks may share (the cluster's CPUs, less
what other stages reserve, e.g. ``infer``'s model actors). ``ceil(free)`` tasks of ``free / ceil(free)`` CPUs
each: every core runs one decoder and together they reserve exactly what is free (2 free cores: 2 tasks of 1.0;
1.5 free: 2 tasks of 0.75). Fewer CPUs per task than that starts more decode worker processes than there are
cores, and Ray starts the extra ones on every execution (~1.5 s of CPU each on the 2-core benchmark machine);
a whole core for a fraction of one leaves the fraction idle (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math

#: What a decode task reserves when the free CPUs are unknown or below :data:`MIN_DECODE_CPUS`
#: (decoding one image is one core of work).
FALLBACK_DECODE_CPUS = 1.0
#: The smallest reservation the rule gives a decode task.
MIN_DECODE_CPUS = 0.25


def share_cpus(free: float | None) -> tuple[float, int] | None:
    """``(CPUs per decode task, tasks)`` sharing ``free`` CPUs, or ``None`` when ``free`` is unknown or below
    :data:`MIN_DECODE_CPUS` (the caller then uses :data:`FALLBACK_DECODE_CPUS`)."""
    if not free or free < MIN_DECODE_CPUS:
        return None
    tasks = max(1, math.ceil(free - 1e-9))
    return max(MIN_DECODE_CPUS, math.floor(free / tasks * 1000) / 1000), tasks


def decode_task_cpus(configured: float | None, free: float | None) -> float:
    """``configured`` when set, else the per-task share of :func:`share_cpus` (or the fallback)."""
    if configured is not None:
        return configured
    share = share_cpus(free)
    return FALLBACK_DECODE_CPUS if share is None else share[0]
