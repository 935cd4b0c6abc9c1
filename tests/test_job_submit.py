"""``ray job submit`` against a real ``ray start --head`` cluster, started and stopped by the test.

The head (``tests/localcluster.py``'s ``ray_head``) runs with token authentication on (``RAY_AUTH_MODE=token`` with a random token for this module, never
``~/.ray/auth_token``), binds the dashboard/job API to 127.0.0.1, and uses a unique ``--temp-dir``. Object-storage
credentials reach it through its environment, as IAM roles reach real nodes; nothing secret goes into a runtime
env or a file. The venv's ``bin`` is first on its ``PATH``, so a job's ``python`` is the venv's.

- The train contract: ``ray job submit --address http://127.0.0.1:PORT --runtime-env cluster/runtime_env.yaml
  --working-dir . -- python jobs/train.py --config jobs/configs/train_tiny.yaml data.shards=URI
  run.storage_path=URI`` ends SUCCEEDED and writes a checkpoint that ``load_model`` rebuilds.
- The head refuses a client with the wrong token.
- The ``ray job submit`` commands of ``cluster/README.md`` run as written (address and bucket substituted, size
  and CPU overrides appended): synth -> prepare -> infer, the README's pipeline.

Teardown kills exactly the processes of this head (tagged environment, or the temp dir in their command line);
``ray stop`` is never used.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest

from localcluster import ray_head as start_ray_head
from localcluster import upload_dir

REPO = Path(__file__).resolve().parents[1]
README = REPO / "cluster" / "README.md"

pytestmark = [pytest.mark.slow, pytest.mark.s3]


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """The head's environment holds the session S3 server's settings (from ``os.environ``): the node's
    environment, which its workers and job drivers inherit."""
    with start_ray_head() as head:
        yield head


@pytest.fixture(scope="module")
def train_job(ray_head, s3_server, tiny_breakhis) -> dict:
    """The train contract, submitted once for the module."""
    shards = s3_server.uri("job-submit/prepared")
    upload_dir(tiny_breakhis["prepared"], shards)
    runs = s3_server.uri("job-submit/runs")
    argv = ["ray", "job", "submit", "--address", ray_head.address, "--runtime-env", "cluster/runtime_env.yaml",
            "--working-dir", ".", "--", "python", "jobs/train.py", "--config", "jobs/configs/train_tiny.yaml",
            f"data.shards={shards}", f"run.storage_path={runs}", "run.name=job-submit", "train.epochs=2",
            "data.image_size=[48,72]"]
    job = ray_head.submit(argv)
    job.update(argv=argv, run_dir=f"{runs}/job-submit")
    return job


def test_train_job_submission_succeeds_and_writes_a_loadable_checkpoint(ray_head, train_job):
    import torch

    from breakhis_ray import storage
    from breakhis_ray.checkpoint import load_model

    assert train_job["status"] == "SUCCEEDED", train_job["output"] + train_job["logs"][-4000:]
    assert train_job["rc"] == 0
    assert "[train] epoch 2/2" in train_job["logs"]
    result = json.loads(storage.read_text(storage.join(train_job["run_dir"], "result.json")))
    assert result["epochs_completed"] == 2
    assert result["best_checkpoint"].startswith(train_job["run_dir"] + "/checkpoint_")
    model, meta = load_model(result["best_checkpoint"])
    assert meta["labels"] == ["benign", "malignant"] and meta["preprocessing"]["size"] == [48, 72]
    with torch.no_grad():
        logits = model(torch.zeros(2, 3, 48, 72))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    print(f"[job-submit] ray start {ray_head.timings['ray_start_s']:.1f}s, job API ready "
          f"{ray_head.timings['job_api_ready_s']:.1f}s, train job (2 epochs) {train_job['seconds']:.1f}s")


def test_head_refuses_a_client_with_the_wrong_token(ray_head):
    refused = ray_head.ray("job", "list", "--address", ray_head.address, token=secrets.token_hex(32), timeout=60)
    assert refused.returncode != 0
    assert re.search(r"401|403|[Uu]nauthori[sz]ed|[Aa]uthentication", refused.stdout + refused.stderr)


# --------------------------------------------------------------------------------------- README commands
def readme_submissions() -> dict[str, list[str]]:
    """``stage -> argv`` for the README's ``ray job submit`` commands that use ``cluster/runtime_env.yaml``
    (the KubeRay variant installs the package with pip into the runtime env and needs the KubeRay image)."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", README.read_text(), flags=re.S)
    commands = {}
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if "ray job submit" not in line:
                continue
            argv = shlex.split(line[line.index("ray job submit"):], comments=True)
            if argv[argv.index("--runtime-env") + 1] != "cluster/runtime_env.yaml":
                continue
            entry = argv[argv.index("--") + 1:]
            commands.setdefault(Path(entry[1]).stem, argv)
    return commands


# What changes from the README for a 2-core CPU machine: sizes, and the GPU settings of infer_gpu.yaml.
SMALL = {
    "synth": ["--patients", "16", "--fraction", "0.02", "--size", "140x92", "grid=false"],
    "prepare": ["task_cpus=0.25"],
    "infer": ["device=cpu", "num_gpus=0", "num_cpus=1", "amp=false", "concurrency=1", "batch_size=8",
              "decode_batch_size=8", "decode_num_cpus=0.25", "io_threads=4", "chunk_size=16"],
}


def test_readme_job_submissions_run_as_written(ray_head, s3_server, train_job):
    from breakhis_ray import storage
    from breakhis_ray.checkpoint import save_checkpoint
    from breakhis_ray.inference import read_predictions
    from breakhis_ray.models import create_unet

    commands = readme_submissions()
    assert {"synth", "prepare", "train", "infer"} <= set(commands), sorted(commands)
    bucket = s3_server.uri("readme")  # stands in for s3://YOUR_BUCKET

    def as_written(stage: str) -> list[str]:
        argv = [a.replace("http://127.0.0.1:8265", ray_head.address).replace("s3://YOUR_BUCKET", bucket)
                for a in commands[stage]]
        assert not any("YOUR_BUCKET" in a or ":8265" in a for a in argv), argv
        return argv + SMALL.get(stage, [])

    # The README's train command runs train_vgg16_gpu.yaml (4 GPU workers, VGG16 at 224): no GPU here. Its
    # submission flags are exactly the train contract's, which ran above; only the config after `--` differs.
    readme_train, contract = as_written("train"), train_job["argv"]
    assert readme_train[:readme_train.index("--") + 3] == contract[:contract.index("--") + 3]

    ran = {}
    for stage in ("synth", "prepare"):
        ran[stage] = job = ray_head.submit(as_written(stage))
        assert job["status"] == "SUCCEEDED", f"README {stage}:\n{job['output']}\n{job['logs'][-4000:]}"

    prepared = f"{bucket}/breakhis/prepared"
    shards = storage.list_files(storage.join(prepared, "shards"), suffixes=[".parquet"])
    assert shards, f"README prepare wrote no shards under {prepared}"

    # Infer as in the README: images under breakhis/images/, checkpoints under breakhis/checkpoints/ (the
    # classifier is the train contract's; the U-Net a random one, as the README's step needs one there).
    raw = [u for u in storage.list_files(f"{bucket}/breakhis/raw", suffixes=[".png"]) if "/masks/" not in u
           and "/BreaKHis_v1/" in u][:24]
    for uri in raw:
        storage.write_bytes(f"{bucket}/breakhis/images/{uri.rsplit('/', 1)[1]}", storage.read_bytes(uri))
    result = json.loads(storage.read_text(storage.join(train_job["run_dir"], "result.json")))
    best = result["best_checkpoint"]
    for uri in storage.list_files(best):
        storage.write_bytes(f"{bucket}/breakhis/checkpoints/classifier/{uri[len(best) + 1:]}",
                            storage.read_bytes(uri))
    unet_dir = Path(tempfile.mkdtemp(prefix="brjob-unet-"))
    try:
        save_checkpoint(str(unet_dir / "unet"), create_unet(encoder="resnet18", classes=1),
                        preprocessing={"size": [64, 64]})
        upload_dir(unet_dir / "unet", f"{bucket}/breakhis/checkpoints/unet")
    finally:
        shutil.rmtree(unet_dir, ignore_errors=True)

    ran["infer"] = job = ray_head.submit(as_written("infer"))
    assert job["status"] == "SUCCEEDED", f"README infer:\n{job['output']}\n{job['logs'][-4000:]}"
    table = read_predictions(f"{bucket}/breakhis/predictions")
    assert sorted(table.column("path").to_pylist()) == sorted(f"{bucket}/breakhis/images/{u.rsplit('/', 1)[1]}"
                                                              for u in raw)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.column("nuclei_count").null_count == 0  # the U-Net ran in the same actor
    print("[job-submit] README jobs: " + ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in ran.items()))
