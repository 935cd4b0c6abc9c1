"""``keep_freed_memory``: large allocations stop costing page faults once freed memory is kept (glibc)."""

from __future__ import annotations

import subprocess
import sys

from conftest import skip_or_fail

# Allocate, touch and free a 64 MiB tensor 20 times after a warm-up (as a CNN's activations are, every batch); print the
# minor page faults it cost. The probe turns transparent huge pages off for itself first (prctl PR_SET_THP_DISABLE),
# so its counts are in 4 KiB pages whatever /sys/kernel/mm/transparent_hugepage/enabled says (with THP "always" a
# fresh 64 MiB mapping faults in 2 MiB pages, 512 times fewer).
_PROBE = """
import ctypes, resource, sys
PR_SET_THP_DISABLE = 41
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(PR_SET_THP_DISABLE) failed: errno {ctypes.get_errno()}")
import torch
from breakhis_ray.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(10):  # the heap grows to its working size first
    torch.ones(64 << 20, dtype=torch.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(64 << 20, dtype=torch.uint8)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


def test_kept_memory_removes_the_page_faults_of_repeated_large_allocations():
    if not sys.platform.startswith("linux"):
        skip_or_fail("mallopt is glibc's")
    _, default = _faults("default")
    applied, kept = _faults("keep")
    assert applied == "True"
    pages = 20 * (64 << 20) // 4096
    assert default > pages // 2, default  # glibc maps and unmaps each 64 MiB buffer: every page faults again
    assert kept < pages // 20, kept       # kept in the heap: the pages stay mapped


def test_keep_freed_memory_is_idempotent():
    from breakhis_ray.allocator import keep_freed_memory

    assert keep_freed_memory() == keep_freed_memory()
