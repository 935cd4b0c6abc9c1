"""Connecting to Ray the same way from every stage: join a running cluster or start a local one."""

from __future__ import annotations

import os

from breakhis_ray.config import RayConfig


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once per process.

    Precedence: an already-initialised Ray (e.g. inside ``ray job submit`` or a test session) is reused;
    else ``cfg.address``; else ``RAY_ADDRESS``; else a new local instance with ``cfg.num_cpus``.
    No runtime env is set here: object-storage credentials reach workers through their node's environment
    (a local instance inherits this process's), never through a ``runtime_env``, which Ray shows on its
    dashboard and job API and writes to its logs.
    """
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"configure_logging": True, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, dashboard_host="127.0.0.1",
                 **kwargs)


def cpu_count() -> int:
    """Cores this process may use (respects cgroup/affinity limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
