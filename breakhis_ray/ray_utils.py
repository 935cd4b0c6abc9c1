"""Connecting to Ray the same way from every stage: join a running cluster or start a local one."""

from __future__ import annotations

import logging
import os

from breakhis_ray.config import RayConfig

log = logging.getLogger(__name__)


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
        start_local_ray(num_cpus=cfg.num_cpus, include_dashboard=cfg.dashboard, dashboard_host="127.0.0.1", **kwargs)


#: Ray's message when its raylet did not register with the GCS within a fixed 30 s (``ray._private.node``):
#: on a machine saturated by other processes this happens without anything being wrong. Ray raises it as a bare
#: ``Exception``, so its text is the only way to tell it apart; should a Ray release reword it, the start is
#: simply not retried (the error is raised as before).
_STARTUP_TIMEOUT = "timed out during startup"


def start_local_ray(attempts: int = 3, **init_kwargs) -> None:
    """``ray.init(address="local", **init_kwargs)``, retried (up to ``attempts`` starts in all) when Ray's fixed
    30 s node start-up wait runs out, which a busy machine can cause; any other error is raised at once."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **init_kwargs)
            return
        except Exception as exc:  # Ray raises a bare Exception for this one
            if _STARTUP_TIMEOUT not in str(exc) or attempt == attempts:
                raise
            log.warning("local Ray node start timed out (attempt %d of %d, machine busy?); starting again",
                        attempt, attempts)
            ray.shutdown()


def cpu_count() -> int:
    """Cores this process may use (respects cgroup/affinity limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
