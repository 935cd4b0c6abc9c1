"""Throwaway Ray clusters for the slow tests: environments, ports, and stopping exactly what a test started.

Every process a test starts for a cluster (``ray start``, a ``ray.cluster_utils.Cluster`` driver subprocess and
everything those spawn: GCS, raylets, dashboards, agents, Ray workers, job drivers) inherits
``BREAKHIS_TEST_CLUSTER=<tag>`` in its environment. Ray workers rename themselves (``ray::IDLE``,
``ray::RayTrainWorker``), so the command line cannot identify them; the inherited environment can.
:func:`stop_tagged` signals only processes that carry the tag, never anything found by name, so other Ray
instances on the machine (other users' included) are left alone. ``ray stop`` is never used.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

TAG_VAR = "BREAKHIS_TEST_CLUSTER"
VENV_BIN = str(Path(sys.executable).parent)


def new_tag() -> str:
    return secrets.token_hex(8)


def tagged_pids(tag: str, cmdline_marker: str | None = None) -> list[int]:
    """PIDs of live processes whose environment holds ``BREAKHIS_TEST_CLUSTER=<tag>``, or whose command line
    contains ``cmdline_marker`` (e.g. a cluster's unique temp dir); never this process."""
    needle = f"{TAG_VAR}={tag}".encode()
    marker = cmdline_marker.encode() if cmdline_marker else None
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if state == "Z":
            continue
        if needle in environ.split(b"\0") or (marker is not None and marker in cmdline):
            pids.append(int(entry.name))
    return sorted(pids)


def stop_tagged(tag: str, grace: float = 10.0, cmdline_marker: str | None = None) -> list[int]:
    """SIGTERM every process :func:`tagged_pids` finds, wait up to ``grace`` seconds, SIGKILL the rest;
    returns the PIDs signalled."""
    signalled = tagged_pids(tag, cmdline_marker)
    for pid in signalled:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and tagged_pids(tag, cmdline_marker):
        time.sleep(0.2)
    for pid in tagged_pids(tag, cmdline_marker):
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and tagged_pids(tag, cmdline_marker):
        time.sleep(0.1)
    return signalled


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def free_port() -> int:
    """A TCP port free on every interface right now (bound to 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def cluster_env(tag: str, **extra: str) -> dict[str, str]:
    """This process's environment (object-storage settings included) plus the tag, the venv's ``bin`` first on
    ``PATH`` (so a job's ``python`` is the venv's) and ``extra``; ``RAY_ADDRESS`` removed."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env[TAG_VAR] = tag
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


def upload_dir(local: Path, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local or ``s3://``, credentials from the environment)."""
    import pyarrow.fs as pafs

    from breakhis_ray import storage

    fs, path = storage.resolve(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
