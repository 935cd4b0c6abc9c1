"""Keep freed heap memory in model processes, so CPU forward passes stop paying page faults on every batch.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` when freed. A CNN's activations on a batch of 224x224 images are far above that (``tiny_cnn``'s first
feature map at batch 16 is ~100 MiB), so each forward pass re-faults gigabytes of zeroed pages. Measured here
(2 cores): a CPU inference actor spent 43% of its time in the kernel and ran the model at 55 img/s; with freed
memory kept in the heap it ran at 105 img/s with no kernel time. The cost: a process keeps its peak heap
resident, which for a long-lived actor or training worker is its working set anyway.

Two settings are needed, and the first only works from process start:

* one malloc arena (``MALLOC_ARENA_MAX=1``): Ray runs the training loop and Ray Data's model UDF in threads, and a
  thread's own arena lives in 64 MiB heaps that cannot hold a large activation, so glibc ``mmap``\\ s it whatever the
  other settings say;
* no ``mmap`` for large blocks and no trimming of the heap top (``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_``).

:data:`MODEL_PROCESS_ENV` carries all three to Ray Train workers and inference actors (``runtime_env``);
:func:`keep_freed_memory` applies the last two at run time to work in the calling process's main thread (the
benchmarks' baselines, so comparisons stay fair). Neither does anything where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes: keep up to 2 GiB of free heap top

#: environment for processes that run models (read by glibc at process start)
MODEL_PROCESS_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD_BYTES),
}

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Serve large allocations of this process's main arena from the heap and keep them once freed (glibc);
    True when applied. Threads that already have their own arena are not affected (see the module docstring)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
