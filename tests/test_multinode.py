"""Multi-node behaviour on one machine: placement over nodes, and surviving the loss of a worker node.

Each scenario runs ``tests/multinode_scenarios.py`` in a subprocess that builds a ``ray.cluster_utils.Cluster``
(a 0-CPU head + two 3-CPU worker nodes, like ``ray_cluster.yaml``'s layout), because this test session already
holds a local Ray instance. Data, checkpoints and predictions live in the session's local S3 server (shared
storage, as multi-node runs need); credentials reach workers on every node through the node's environment (the
scenario process that starts the nodes has the S3 settings in its environment), never through a runtime env.

- training: the two DDP workers land on different nodes; one worker node is SIGKILLed after the first
  checkpoint reached S3 and a replacement node joins; the run finishes every epoch, none repeated or skipped,
  the epochs after the loss ran after one restore from the newest checkpoint in S3 (``resumes`` 0 -> 1 right
  after the loss), and the new worker group used the surviving and the replacement node.
- inference: the two predictor actors land on different nodes; a worker node is killed after the first part
  was written; whether Ray Data finished the run through the loss or a re-run with the same ``out`` resumed
  it, the output holds exactly one row per input, none duplicated, none lost.

Every process of a scenario's cluster carries a tag in its environment and is stopped by it afterwards, also
when the scenario fails or times out (``tests/localcluster.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from localcluster import cluster_env, free_port, new_tag, stop_tagged, tagged_pids, upload_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "multinode_scenarios.py"

pytestmark = [pytest.mark.slow, pytest.mark.s3]


@pytest.fixture(scope="module")
def s3_data(s3_server, tiny_breakhis) -> dict:
    """The tiny BreakHis shards and its images (337), copied into the shared S3 storage."""
    shards = s3_server.uri("multinode/prepared")
    upload_dir(tiny_breakhis["prepared"], shards)
    images = s3_server.uri("multinode/images")
    upload_dir(tiny_breakhis["synthetic"] / "BreaKHis_v1", images)  # images only, no masks
    return {"shards": shards, "images": images}


def run_scenario(name: str, overrides: list[str], tmp_path: Path, timeout: float, kill: bool = True) -> dict:
    """Run one scenario in a subprocess on its own tagged cluster; return its result (fail with its log)."""
    tag = new_tag()
    ray_tmp = tempfile.mkdtemp(prefix="brmn-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    spec_path, result_path, log_path = tmp_path / f"{name}.json", tmp_path / f"{name}-result.json", \
        tmp_path / f"{name}.log"
    record_path = tmp_path / f"{name}-node-loss.json"
    spec = {"overrides": overrides, "gcs_port": free_port(), "dashboard_port": free_port(),
            "agent_port": free_port(), "record_path": str(record_path), "kill": kill}
    spec_path.write_text(json.dumps(spec))
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, str(SCRIPT), name, str(spec_path), str(result_path)],
                                    cwd=REPO, env=cluster_env(tag, RAY_TMPDIR=ray_tmp), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:  # everything of this cluster: tagged environment, or its temp dir on the command line
        stop_tagged(tag, cmdline_marker=ray_tmp)
        leftover = tagged_pids(tag, cmdline_marker=ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not leftover, f"processes of the scenario's cluster survived the cleanup: {leftover}"
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
    if not result_path.exists():
        record = record_path.read_text() if record_path.exists() else "(none)"
        pytest.fail(f"scenario {name} wrote no result (exit {proc.returncode}); node-loss record:\n{record}\n"
                    f"log tail:\n{tail}")
    result = json.loads(result_path.read_text())
    if not result.get("ok"):
        pytest.fail(f"scenario {name} failed:\n{result.get('error')}\nlog tail:\n{tail}")
    assert "error" not in result["node_loss"], result["node_loss"]["error"]
    result["log"] = log_path
    return result


def _report(name: str, numbers: dict) -> None:
    print(f"[multinode] {name}: " + ", ".join(f"{k}={v:.1f}s" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in numbers.items()))


def test_training_spreads_over_nodes_and_survives_losing_one(s3_server, s3_data, tmp_path):
    epochs = 4
    storage_path = s3_server.uri("multinode/runs")
    result = run_scenario("train", [
        f"data.shards={s3_data['shards']}", f"run.storage_path={storage_path}", "run.name=node-loss",
        "data.image_size=[48,72]", "train.batch_size=16", f"train.epochs={epochs}",
        "scaling.num_workers=2", "scaling.cpus_per_worker=2", "run.max_failures=3",
    ], tmp_path, timeout=420)
    loss, history = result["node_loss"], result["history"]
    workers = set(result["workers"])

    # Placement: before the loss, one training worker on each worker node (none on the 0-CPU head).
    before = loss["actors_before_kill"]
    assert len(before) == 2 and {a["node_id"] for a in before} == workers, before

    # The node died mid-run, after epoch k's checkpoint reached S3 (k < last epoch); it is gone from the cluster.
    k = loss["state_at_kill"]
    assert 1 <= k < epochs and loss["victim"] in workers, loss
    assert "victim_dead_at" in loss and loss["victim"] not in loss["alive_nodes_after"]

    # Every epoch ran exactly once; the epochs after the loss ran on a worker group restored from the newest
    # checkpoint in S3: epoch k's, or k+1's when rank 0 (on the surviving node) was uploading it as the other
    # node died. One restore, and no epoch before the loss was repeated.
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), history
    assert result["summary"]["epochs_completed"] == epochs
    resumes = [h["resumes"] for h in history]
    first_resumed = resumes.index(1) + 1 if 1 in resumes else None
    assert first_resumed in (k + 1, k + 2), history
    assert resumes == [0] * (first_resumed - 1) + [1] * (epochs - first_resumed + 1), history
    assert result["summary"]["latest_checkpoint"].startswith("s3://")

    # The restarted worker group used the replacement node and the surviving one, never the dead node again.
    after = [a for a in result["train_workers"] if a["actor_id"] not in {b["actor_id"] for b in before}]
    assert after, result["train_workers"]
    assert {a["node_id"] for a in after} == (workers - {loss["victim"]}) | {loss["replacement"]}, after

    def at(epoch: int) -> float:  # when the monitor first saw epoch's checkpoint (or a later one) in S3
        return next(e["t"] for e in loss["timeline"] if e["state"] >= epoch)

    _report("train", {**result["timings"], "replacement_node_start_s": loss["replacement_start_s"],
                      "node_marked_dead_s": loss["victim_dead_at"] - loss["killed_at"],
                      f"kill_to_epoch{first_resumed}_checkpoint_s": at(first_resumed) - loss["killed_at"],
                      "later_epochs_s": (at(epochs) - at(first_resumed)) / max(1, epochs - first_resumed),
                      "train_total_s": result["train_seconds"]})


def test_inference_spreads_over_nodes_and_keeps_one_row_per_input_after_losing_one(
        s3_server, s3_data, tmp_path):
    import torch

    from breakhis_ray import storage
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.models import create_model

    torch.manual_seed(0)
    classifier = s3_server.uri("multinode/classifier")
    local_ckpt = tmp_path / "classifier"
    save_checkpoint(str(local_ckpt), create_model("tiny_cnn", num_classes=2, width=4),
                    preprocessing={"size": [48, 72]})
    upload_dir(local_ckpt, classifier)
    out = s3_server.uri("multinode/predictions")
    result = run_scenario("infer", [
        f"input={s3_data['images']}", f"out={out}", f"classifier={classifier}", "segmenter=watershed",
        "chunk_size=12", "batch_size=6", "decode_batch_size=6", "concurrency=2", "num_cpus=2", "torch_threads=1",
        "decode_num_cpus=0.25", "decode_max_calls=0",
    ], tmp_path, timeout=300)
    loss = result["node_loss"]
    workers = set(result["workers"])
    inputs = sorted(u for u in storage.list_files(s3_data["images"])
                    if u.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff")))

    # Placement: one predictor actor on each worker node before the loss.
    before = loss["actors_before_kill"]
    assert len(before) == 2 and {a["node_id"] for a in before} == workers, before

    # The node died mid-run (some parts written, not all).
    assert 1 <= loss["state_at_kill"] < result["n_chunks"], (loss["state_at_kill"], result["n_chunks"])
    assert "victim_dead_at" in loss and loss["victim"] not in loss["alive_nodes_after"]

    # Exactly one row per input: nothing lost, nothing duplicated, every row a prediction.
    assert len(result["paths"]) == len(inputs)
    assert sorted(result["paths"]) == inputs
    assert result["status"] == ["ok"] * len(inputs)
    assert "summary" in result["attempts"][-1], result["attempts"]
    last = result["attempts"][-1]["summary"]
    assert last["complete"] and last["chunks_remaining"] == 0

    # How it recovered: Ray Data carried the run through the loss, or a re-run resumed the missing chunks.
    first = result["attempts"][0]
    if len(result["attempts"]) > 1:
        assert "error" in first or not first["summary"]["complete"]
        assert last["chunks_skipped"] >= loss["state_at_kill"]  # finished parts were not redone
    _report("infer", {**result["timings"], "replacement_node_start_s": loss["replacement_start_s"],
                      "node_marked_dead_s": loss["victim_dead_at"] - loss["killed_at"],
                      "attempts": len(result["attempts"]),
                      "first_attempt": "survived" if "summary" in first else first["error"][:120],
                      "infer_total_s": result["infer_seconds"], "images": len(inputs)})
