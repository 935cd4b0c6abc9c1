"""Multi-node scenarios on one machine, each run in its own process by ``tests/test_multinode.py``.

    python tests/multinode_scenarios.py {train|infer} SPEC.json RESULT.json

A ``ray.cluster_utils.Cluster`` is built the way production clusters are laid out (``ray_cluster.yaml``): a head
that advertises ``CPU: 0`` (GCS, driver, Ray Train controller, Ray Data coordinators) and worker nodes with 3
logical CPUs each. Training workers and predictor actors ask for 2 CPUs, so no worker node fits two of them:
they must spread over the worker nodes, and the remaining CPU per node runs the decode/augment tasks. (The
remainder is a whole CPU on purpose: Ray Data 2.60's autoscaling coordinator hands out leftover CPUs per node
with a floor division, so a fractional remainder such as 0.25 gives Ray Data no CPU at all once Ray Train has
reserved its share, and a restarted run then starves waiting for its augmentation tasks.) The driver
connects through the library's own ``ensure_ray`` (``RAY_ADDRESS``) and runs the library's ``run_train`` /
``run_infer`` unchanged. Object-storage credentials reach workers on every node through the node's environment:
the nodes are started by this process, whose environment holds the S3 server's settings (nothing is forwarded in
a runtime env).

While the run works in a thread, the main thread waits until it has put its first result in shared storage
(a checkpoint in S3; a prediction part), then kills one worker node outright
(``Cluster.remove_node(allow_graceful=False)``: its raylet, object store and every worker on it get SIGKILL)
and adds a replacement node. The result file records the node placement read from the GCS actor table, the
storage timeline and timings, for the test to assert on.

Runs in its own process because a test session already holds a local Ray instance (``ray_session``); the
caller tags the environment (``tests/localcluster.py``) so that every process of this cluster can be stopped
even if this one is killed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKER_NODE = {"num_cpus": 3, "object_store_memory": 200 * 2**20}


# --------------------------------------------------------------------------------------------- cluster
def start_cluster(n_workers: int, gcs_port: int, dashboard_port: int, agent_port: int):
    """Head (0 CPU) + ``n_workers`` worker nodes (``WORKER_NODE``) under ``$RAY_TMPDIR``.

    ``RAY_ADDRESS`` is set before the first node starts, so that every Ray process of this cluster inherits
    it: Ray Train's helper actors otherwise look for "the" local cluster and may find another one.
    Returns (cluster, worker nodes, timings).
    """
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    # Under RAY_TMPDIR (set by the caller), where Ray also writes this cluster's address file.
    temp_dir = os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="brmn-"), "ray")
    os.makedirs(temp_dir, exist_ok=True)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{gcs_port}"
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "temp_dir": temp_dir, "gcs_server_port": gcs_port,
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "dashboard_agent_listen_port": agent_port, "object_store_memory": 200 * 2**20})
    assert cluster.address == os.environ["RAY_ADDRESS"], (cluster.address, os.environ["RAY_ADDRESS"])
    t1 = time.perf_counter()
    workers = [cluster.add_node(**WORKER_NODE) for _ in range(n_workers)]
    cluster.wait_for_nodes()
    t2 = time.perf_counter()
    return cluster, workers, {"head_start_s": t1 - t0, "worker_node_start_s": (t2 - t1) / max(1, n_workers)}


def actors_by_class(fragment: str) -> list[dict]:
    """GCS actor-table rows (alive or dead) whose class name contains ``fragment``."""
    import ray

    return [{"actor_id": a["ActorID"], "class": a["ActorClassName"], "node_id": a["Address"]["NodeID"],
             "state": a["State"], "restarts": a["NumRestarts"]}
            for a in ray._private.state.actors().values() if fragment in a["ActorClassName"]]


def node_alive(node_id: str) -> bool:
    import ray

    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


class NodeLoss:
    """Runs ``workload()`` in a thread while this (main) thread watches shared storage: once ``ready(progress())``
    holds, it kills the worker node hosting an actor of ``actor_class`` and adds a replacement node (Ray starts
    nodes only from the main thread). ``record`` keeps the storage timeline, the placement before the kill,
    timings, and samples of free resources afterwards; it is kept current on disk at ``record_path``, so a
    scenario that times out still shows where it stood."""

    def __init__(self, cluster, workers, actor_class: str, ready, progress, poll: float = 0.5,
                 record_path: str | None = None):
        self.cluster, self.workers, self.actor_class = cluster, list(workers), actor_class
        self.ready, self.progress, self.poll = ready, progress, poll
        self.record: dict = {"timeline": []}
        self.record_path = record_path
        self.t0 = time.perf_counter()
        self._seen = None
        self._last_sample = 0.0

    @property
    def killed(self) -> bool:
        return "killed_at" in self.record

    def _now(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def run(self, workload):
        outcome: dict = {}

        def target():
            try:
                outcome["value"] = workload()
            except BaseException as exc:  # re-raised in the main thread below
                outcome["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        while thread.is_alive():
            try:
                self.step()
            except Exception:  # a monitoring failure must not hide the workload's own result
                self.record["error"] = traceback.format_exc()
                self._save()
                self.ready = lambda state: False
            thread.join(self.poll)
        deadline = time.perf_counter() + 60
        while True:  # until the cluster has noticed the loss (when the run finished before it did)
            self.step()
            if not self.killed or "victim_dead_at" in self.record or time.perf_counter() > deadline:
                break
            time.sleep(self.poll)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def step(self) -> None:
        state = self.progress()
        if state != self._seen:
            self.record["timeline"].append({"t": self._now(), "state": state})
            self._seen = state
        if not self.killed and self.ready(state) and self._all_placed():
            self._kill(state)
        if self.killed and "victim_dead_at" not in self.record and not node_alive(self.record["victim"]):
            import ray

            self.record["victim_dead_at"] = self._now()
            self.record["alive_nodes_after"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        self._sample()
        self._save()

    def _save(self) -> None:
        if self.record_path:
            Path(self.record_path).write_text(json.dumps(self.record, indent=2, default=str))

    def _sample(self) -> None:
        """After the loss: free resources per node and placement-group states, every few seconds."""
        import ray

        if not self.killed or time.perf_counter() - self._last_sample < 3:
            return
        self._last_sample = time.perf_counter()
        pgs = {k[:8]: v["state"] for k, v in ray.util.placement_group_table().items()}
        self.record.setdefault("samples", []).append(
            {"t": self._now(), "available": ray._private.state.available_resources_per_node(), "pgs": pgs})
        self.record["samples"] = self.record["samples"][-20:]

    def _all_placed(self) -> bool:
        """One live actor of ``actor_class`` per worker node: Ray Data's actor pool starts serving as soon as its
        first actor is up, and on a busy machine the second may still be starting when the kill condition holds."""
        return len([a for a in actors_by_class(self.actor_class) if a["state"] == "ALIVE"]) >= len(self.workers)

    def _kill(self, state) -> None:
        placed = [a for a in actors_by_class(self.actor_class) if a["state"] == "ALIVE"]
        self.record["actors_before_kill"] = placed
        by_id = {n.node_id: n for n in self.workers}
        victims = [by_id[a["node_id"]] for a in placed if a["node_id"] in by_id]
        if not victims:
            raise RuntimeError(f"no live {self.actor_class} actor on a worker node: {placed}")
        victim = victims[0]
        self.record.update(victim=victim.node_id, state_at_kill=state, killed_at=self._now())
        start = time.perf_counter()
        self.cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet, object store, workers
        self.record["remove_node_s"] = time.perf_counter() - start
        start = time.perf_counter()
        replacement = self.cluster.add_node(**WORKER_NODE)
        self.record["replacement"] = replacement.node_id
        self.record["replacement_start_s"] = time.perf_counter() - start
        self.record["replacement_added_at"] = self._now()


# -------------------------------------------------------------------------------------------- scenarios
def scenario_train(spec: dict, cluster, workers) -> dict:
    from breakhis_ray import storage
    from breakhis_ray.config import TrainConfig, load_config
    from breakhis_ray.train import run_train
    from breakhis_ray.train.ray_glue import checkpoint_epoch as _checkpoint_epoch, read_history

    cfg = load_config(TrainConfig, REPO / "jobs/configs/train_tiny.yaml", spec["overrides"])
    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)

    def checkpointed_epoch() -> int:  # newest epoch with a complete checkpoint (meta.json is written last)
        if not storage.exists(run_dir):
            return 0
        metas = [u for u in storage.list_files(run_dir, suffixes=["meta.json"]) if "/checkpoint_" in u]
        return max([_checkpoint_epoch(storage.parent(u)) for u in metas], default=0)

    kill = spec.get("kill", True)  # False: the same run without a loss (a baseline for the timings)
    loss = NodeLoss(cluster, workers, "RayTrainWorker", ready=lambda n: kill and n >= 1,
                    progress=checkpointed_epoch, poll=0.25, record_path=spec.get("record_path"))
    start = time.perf_counter()
    summary = loss.run(lambda: run_train(cfg))
    return {
        "summary": summary,
        "train_seconds": time.perf_counter() - start,
        "history": read_history(run_dir),
        "train_workers": actors_by_class("RayTrainWorker"),
        "node_loss": loss.record,
    }


def scenario_infer(spec: dict, cluster, workers) -> dict:
    from breakhis_ray import storage
    from breakhis_ray.config import InferConfig, load_config
    from breakhis_ray.inference import PREDICTIONS_DIR, plan_inputs, read_predictions, run_infer

    cfg = load_config(InferConfig, None, spec["overrides"], {})
    pred_dir = storage.join(cfg.out, PREDICTIONS_DIR)
    n_chunks = plan_inputs(cfg).n_chunks

    def parts() -> int:
        if not storage.exists(pred_dir):
            return 0
        return len([u for u in storage.list_files(pred_dir, suffixes=[".parquet"]) if "/part-" in u])

    kill = spec.get("kill", True)  # False: the same run without a loss (a baseline for the timings)
    loss = NodeLoss(cluster, workers, "MapWorker", ready=lambda n: kill and n >= 1, progress=parts, poll=0.2,
                    record_path=spec.get("record_path"))
    attempts: list[dict] = []

    def infer_until_complete() -> None:
        for _ in range(3):  # the first run may carry on through the loss; else re-run with the same out
            t = time.perf_counter()
            try:
                summary = run_infer(cfg)
            except Exception as exc:  # a run that died with the node: recorded, then resumed
                if not loss.killed:
                    raise
                attempts.append({"error": f"{type(exc).__name__}: {str(exc)[:2000]}",
                                 "seconds": time.perf_counter() - t})
                continue
            attempts.append({"summary": summary, "seconds": time.perf_counter() - t})
            if summary["complete"]:
                return

    start = time.perf_counter()
    loss.run(infer_until_complete)
    table = read_predictions(cfg.out)
    return {
        "attempts": attempts,
        "infer_seconds": time.perf_counter() - start,
        "n_chunks": n_chunks,
        "paths": table.column("path").to_pylist(),
        "status": table.column("status").to_pylist(),
        "run_ids": sorted(set(table.column("run_id").to_pylist())),
        "predictor_actors": actors_by_class("MapWorker"),
        "node_loss": loss.record,
    }


SCENARIOS = {"train": scenario_train, "infer": scenario_infer}


def main(argv: list[str]) -> int:
    name, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    cluster, workers, timings = start_cluster(spec.get("worker_nodes", 2), spec["gcs_port"],
                                              spec["dashboard_port"], spec["agent_port"])
    result: dict = {"timings": timings, "head": cluster.head_node.node_id,
                    "workers": [w.node_id for w in workers]}
    try:
        from breakhis_ray.ray_utils import ensure_ray

        ensure_ray()  # joins RAY_ADDRESS, as a job on a cluster does
        result.update(SCENARIOS[name](spec, cluster, workers))
        result["ok"] = True
    except Exception:
        result["ok"] = False
        result["error"] = traceback.format_exc()
    finally:
        Path(result_path).write_text(json.dumps(result, indent=2, default=str))
        import ray

        ray.shutdown()
        cluster.shutdown()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
