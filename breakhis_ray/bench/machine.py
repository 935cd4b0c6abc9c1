"""What a benchmark ran on: cores, memory, CPU model, GPUs, library versions, date and load."""

from __future__ import annotations

import os
import platform
import time
from typing import Any


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, Any]:
    """``{"count": n, "names": [...]}`` of the CUDA devices torch sees (count 0 without any)."""
    import torch

    if not torch.cuda.is_available():
        return {"count": 0, "names": []}
    count = torch.cuda.device_count()
    return {"count": count, "names": [torch.cuda.get_device_name(i) for i in range(count)]}


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return None


def machine_info() -> dict[str, Any]:
    """JSON-safe description of this machine and the software versions that shape the numbers."""
    import numpy
    import ray
    import torch

    from breakhis_ray.ray_utils import cpu_count

    return {
        "cores": cpu_count(),
        "cpu_count_os": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": _meminfo_gib(),
        "gpu": gpu_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_start": load_average(),
    }


def describe(machine: dict[str, Any]) -> str:
    """One line, e.g. ``2 cores (Intel Xeon ...), 23.4 GiB RAM, no GPU; torch 2.14.0, ray 2.60.0, Python 3.11.9``."""
    gpu = machine["gpu"]
    gpus = f"{gpu['count']}x {gpu['names'][0]}" if gpu["count"] else "no GPU"
    return (f"{machine['cores']} cores ({machine['cpu_model']}), {machine['ram_gib']} GiB RAM, {gpus}; "
            f"torch {machine['torch']}, ray {machine['ray']}, Python {machine['python']}")
