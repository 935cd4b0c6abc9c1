"""Local Ray as the stages start it: idle worker processes outlive a pause instead of being killed and restarted.

Each case runs a small driver in a subprocess with its own local Ray (one CPU, tagged environment, private temp
dir), so the session's Ray is not touched. The driver runs a task (worker A), starts an actor (a second worker
process: more workers than CPUs, the state in which Ray kills idle workers), then watches worker A's process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile

import pytest

from breakhis_ray.ray_utils import IDLE_WORKER_ENV
from localcluster import REPO, cluster_env, new_tag, stop_tagged

DRIVER = r"""
import json, os, sys, time
import ray
from breakhis_ray.ray_utils import start_local_ray

temp_dir, watch_s = sys.argv[1], float(sys.argv[2])
start_local_ray(num_cpus=1, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                configure_logging=False)

@ray.remote(num_cpus=0.5)
def worker_pid():
    return os.getpid()

@ray.remote(num_cpus=0.5)
class Holder:
    def pid(self):
        return os.getpid()

first = ray.get(worker_pid.remote())
holder = Holder.remote()
ray.get(holder.pid.remote())
deadline = time.monotonic() + watch_s
while time.monotonic() < deadline and os.path.exists(f"/proc/{first}"):
    time.sleep(0.1)
print(json.dumps({"alive": os.path.exists(f"/proc/{first}")}))
ray.shutdown()
"""


def _idle_worker_survives(watch_s: float, **env: str) -> bool:
    tag, temp_dir = new_tag(), tempfile.mkdtemp(prefix="brtest-ray-")
    try:
        proc = subprocess.run([sys.executable, "-c", DRIVER, temp_dir, str(watch_s)], cwd=REPO,
                              env=cluster_env(tag, **env), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["alive"]
    finally:
        stop_tagged(tag, cmdline_marker=temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_an_idle_worker_outlives_a_pause_beside_an_actor():
    assert _idle_worker_survives(5.0), "the raylet killed an idle worker after a 5 s pause"


@pytest.mark.slow
def test_with_rays_one_second_default_the_same_worker_is_killed():
    # the control: the scenario above does put the node over its worker limit
    assert not _idle_worker_survives(60.0, **{IDLE_WORKER_ENV: "1000"})


FIXED_SIZE_DRIVER = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from breakhis_ray.ray_utils import fixed_size_cluster, start_local_ray

temp_dir = sys.argv[1]
seen = {"before": fixed_size_cluster()}
start_local_ray(num_cpus=1, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
                configure_logging=False)
seen["started_here"] = fixed_size_cluster()
ray.shutdown()
seen["after_shutdown"] = fixed_size_cluster()
cluster = Cluster(initialize_head=True, connect=False,
                  head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": temp_dir})
try:
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    seen["joined"] = fixed_size_cluster()
    ray.shutdown()
finally:
    cluster.shutdown()
print(json.dumps(seen))
"""


def test_only_an_instance_this_process_started_counts_as_fixed_size():
    """``infer`` caps its decode tasks only where the cluster cannot grow: a local instance this process started,
    not a cluster it joined (which an autoscaler may grow), nor after that instance has shut down."""
    tag, temp_dir = new_tag(), tempfile.mkdtemp(prefix="brtest-ray-")
    try:
        proc = subprocess.run([sys.executable, "-c", FIXED_SIZE_DRIVER, temp_dir], cwd=REPO,
                              env=cluster_env(tag), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        stop_tagged(tag, cmdline_marker=temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert seen == {"before": False, "started_here": True, "after_shutdown": False, "joined": False}
