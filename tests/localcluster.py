"""Throwaway Ray clusters for the slow tests: environments, ports, and stopping exactly what a test started.

Every process a test starts for a cluster (``ray start``, a ``ray.cluster_utils.Cluster`` driver subprocess and
everything those spawn: GCS, raylets, dashboards, agents, Ray workers, job drivers) inherits
``BREAKHIS_TEST_CLUSTER=<tag>`` in its environment. Ray workers rename themselves (``ray::IDLE``,
``ray::RayTrainWorker``), so the command line cannot identify them; the inherited environment can.
:func:`stop_tagged` signals only processes that carry the tag, never anything found by name, so other Ray
instances on the machine (other users' included) are left alone. ``ray stop`` is never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

TAG_VAR = "BREAKHIS_TEST_CLUSTER"
VENV_BIN = str(Path(sys.executable).parent)
REPO = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------------------------- a `ray start` head
class RayHead:
    """One ``ray start --head`` cluster started by a test: its address, client environment, timings."""

    def __init__(self, tag: str, temp_dir: str, token: str, dashboard_port: int):
        self.tag, self.temp_dir, self.token = tag, temp_dir, token
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.timings: dict[str, float] = {}

    def client_env(self, token: str | None = None, **extra: str) -> dict[str, str]:
        return cluster_env(self.tag, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token or self.token, **extra)

    def ray(self, *args: str, timeout: float = 300, token: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", *args], cwd=REPO, env=self.client_env(token), capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, argv: list[str], timeout: float = 420, env: dict[str, str] | None = None) -> dict:
        """Run ``argv`` (a full ``ray job submit ...`` command; ``env``: extra client environment), then read
        the job's final status and logs; the result also holds the submission id and the client's output."""
        assert argv[:3] == ["ray", "job", "submit"] and "--submission-id" not in argv
        sid = f"brtest-{secrets.token_hex(4)}"
        start = time.perf_counter()
        proc = subprocess.run([*argv[:3], "--submission-id", sid, *argv[3:]], cwd=REPO,
                              env=self.client_env(**(env or {})), capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        info = self.job_info(sid)
        logs = self.ray("job", "logs", "--address", self.address, sid, timeout=60).stdout
        return {"rc": proc.returncode, "status": info.get("status"), "message": info.get("message"),
                "seconds": seconds, "logs": logs, "output": proc.stdout[-4000:] + proc.stderr[-4000:],
                "submission_id": sid, "client_output": proc.stdout + proc.stderr}

    def api(self, path: str) -> str:
        """The dashboard's answer to ``GET <path>`` (bearer token), as text."""
        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read().decode("utf-8", errors="replace")

    def job_info(self, submission_id: str) -> dict:
        """The job's record from the job REST API (``GET /api/jobs/<id>``, bearer token)."""
        return json.loads(self.api(f"/api/jobs/{submission_id}"))


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, **env: str) -> Iterator[RayHead]:
    """``ray start --head`` with token authentication (a random token, never ``~/.ray/auth_token``), the dashboard
    and job API on 127.0.0.1, a unique ``--temp-dir``, the venv first on ``PATH`` and ``env`` added to the
    head's environment (what its Ray workers and job drivers inherit: the node's environment). On exit, exactly
    this head's processes are stopped (tagged environment, or the temp dir in their command line)."""
    from ray._private.services import get_node_ip_address

    tag, token = new_tag(), secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="brjob-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs_port, dashboard_port = free_port(), free_port()
    head = RayHead(tag, temp_dir, token, dashboard_port)
    # RAY_ADDRESS in the head's environment: Ray Train's helper actors then find this cluster, not another one
    # on the same machine.
    head_env = cluster_env(tag, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                           RAY_ADDRESS=f"{get_node_ip_address()}:{gcs_port}", **env)
    cmd = ["ray", "start", "--head", f"--temp-dir={temp_dir}", f"--port={gcs_port}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
           f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--num-cpus={num_cpus}", "--disable-usage-stats"]
    try:
        start = time.perf_counter()
        started = subprocess.run(cmd, cwd=REPO, env=head_env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        head.timings["ray_start_s"] = time.perf_counter() - start
        deadline = time.monotonic() + 90
        while True:  # the job API answers once the dashboard is up
            listed = head.ray("job", "list", "--address", head.address, timeout=60)
            if listed.returncode == 0:
                break
            assert time.monotonic() < deadline, f"job API did not answer:\n{listed.stderr[-3000:]}"
            time.sleep(1.0)
        head.timings["job_api_ready_s"] = time.perf_counter() - start
        yield head
    finally:
        stop_tagged(tag, cmdline_marker=temp_dir)
        leftover = tagged_pids(tag, cmdline_marker=temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"processes of the test's Ray head survived the cleanup: {leftover}"
