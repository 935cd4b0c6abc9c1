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


#: How long an idle Ray worker process may wait for its next task on a node that runs more worker processes than
#: CPUs before its raylet kills it. Ray's default (1 s) suits whole-CPU tasks. A streaming pipeline with
#: fractional CPUs runs more processes than cores by design (``infer`` on 2 cores: two decode tasks of 0.75 CPU
#: beside a 0.5-CPU model actor), so every decode worker that backpressure pauses for a second was killed and a
#: new one started (about 1.5 s of CPU for its imports) while the run went on: 1280 images took 18.5 s and
#: 31.5 s of machine CPU at 1 s, 13.4 s and 23.3 s at 10 s (``docs/BENCHMARKS.md``). Ray reads it from the
#: environment variable :data:`IDLE_WORKER_ENV` where a node starts (``ray_cluster.yaml``, KubeRay) and from
#: ``_system_config`` for a local instance (:func:`start_local_ray`).
IDLE_WORKER_KILL_MS = 30_000
_IDLE_WORKER_KEY = "idle_worker_killing_time_threshold_ms"
IDLE_WORKER_ENV = f"RAY_{_IDLE_WORKER_KEY}"

#: Ray's message when its raylet did not register with the GCS within a fixed 30 s (``ray._private.node``):
#: on a machine saturated by other processes this happens without anything being wrong. Ray raises it as a bare
#: ``Exception``, so its text is the only way to tell it apart; should a Ray release reword it, the start is
#: simply not retried (the error is raised as before).
_STARTUP_TIMEOUT = "timed out during startup"


#: GCS addresses of the local instances :func:`start_local_ray` started in this process.
_STARTED_HERE: set[str] = set()


def start_local_ray(attempts: int = 3, **init_kwargs) -> None:
    """``ray.init(address="local", **init_kwargs)``, retried (up to ``attempts`` starts in all) when Ray's fixed
    30 s node start-up wait runs out, which a busy machine can cause; any other error is raised at once.

    Idle workers are kept :data:`IDLE_WORKER_KILL_MS` (unless ``_system_config`` or the node's environment says
    otherwise)."""
    import ray

    system_config = dict(init_kwargs.pop("_system_config", None) or {})
    if IDLE_WORKER_ENV not in os.environ:
        system_config.setdefault(_IDLE_WORKER_KEY, IDLE_WORKER_KILL_MS)
    if system_config:
        init_kwargs["_system_config"] = system_config

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **init_kwargs)
            _STARTED_HERE.add(_gcs_address())
            return
        except Exception as exc:  # Ray raises a bare Exception for this one
            if _STARTUP_TIMEOUT not in str(exc) or attempt == attempts:
                raise
            log.warning("local Ray node start timed out (attempt %d of %d, machine busy?); starting again",
                        attempt, attempts)
            ray.shutdown()


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def fixed_size_cluster() -> bool:
    """Whether the connected Ray instance is one this process started (:func:`start_local_ray`): a single node
    that no autoscaler grows, so the CPUs it has at the start are all a pipeline will get. ``False`` for a
    joined cluster (``address=``, ``RAY_ADDRESS``, ``ray job submit``), which may gain nodes while a job runs,
    and before Ray is initialised."""
    import ray

    return ray.is_initialized() and _gcs_address() in _STARTED_HERE


def cpu_count() -> int:
    """Cores this process may use (respects cgroup/affinity limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
