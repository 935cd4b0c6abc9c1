"""Resident memory and CPU time of a process tree (Linux ``/proc``), and the machine's busy CPU time."""

from __future__ import annotations

import os
import threading
import time


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree_rss(root: int | None = None) -> int:
    """Resident bytes of ``root`` (default: this process) and all its descendants (Linux ``/proc``)."""
    root = root or os.getpid()
    children = _children_map()
    page = os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            continue
    return total


def _tree(root: int | None = None) -> list[int]:
    children = _children_map()
    pids, stack = [], [root or os.getpid()]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def machine_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot, all cores (``/proc/stat``), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_ticks(root: int | None = None) -> dict[int, int]:
    """Own CPU ticks (user + system, children excluded) of each living process of the tree."""
    ticks = {}
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


class OthersCpu:
    """Context manager: average cores busy with processes outside this process tree while it was open
    (``cores``; None off Linux), and the CPU seconds attributed to this tree (``own_seconds``).

    The tree's own CPU time is sampled per process every ``interval`` seconds (``samples`` counts them), so
    short-lived workers of this run (Ray Train workers, DataLoader workers, decode tasks' processes) count as ours
    even after they exit; at most the time since the last sample of each exited process is missed (and counted
    as others').
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.cores = None
        self.own_seconds = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self._last.update(_tree_cpu_ticks())
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "OthersCpu":
        self._first = _tree_cpu_ticks()
        self._last = dict(self._first)
        self._start = (time.perf_counter(), machine_cpu_seconds())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        wall0, busy0 = self._start
        busy = machine_cpu_seconds()
        own = sum(t - self._first.get(pid, 0) for pid, t in self._last.items()) / os.sysconf("SC_CLK_TCK")
        self.own_seconds = own
        if busy is None or busy0 is None:
            return
        wall = max(time.perf_counter() - wall0, 1e-9)
        self.cores = round(max(0.0, (busy - busy0) - own) / wall, 2)


class PeakSampler:
    """Samples :func:`process_tree_rss` in a thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, process_tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, process_tree_rss())
