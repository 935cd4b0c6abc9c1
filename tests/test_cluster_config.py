"""Cluster specs are valid for the tools that read them and agree with the package.

- ``ray_cluster.yaml`` passes Ray's own cluster-launcher validation (the first thing ``ray up`` does; offline),
  and broken copies fail with a clear message.
- The KubeRay manifests validate against the RayCluster/RayJob CRD schemas (``../shared/kuberay``; skipped
  when absent, failed under ``CI=true``), with unknown fields rejected as ``kubectl apply --validate=strict`` would.
- KubeRay security: token authentication from a Secret on every cluster, S3 credentials only from Secrets
  (``envFrom``), RayJob submitters authenticated, and a NetworkPolicy that admits only what must reach the head.
- Both agree with the package: entry points and configs exist and validate (overrides included), one Ray
  version everywhere (= the installed Ray's major.minor), GPUs enough for the configs' workers/actors, S3 by
  IAM role (no keys), no public dashboard, and a ``ray job submit`` upload far below Ray's 100 MiB limit.
- The ``ray job submit`` commands in cluster/README.md put their flags before ``--`` and run real jobs.

Unit tier: no Ray cluster, no network.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

import ray
from conftest import skip_or_fail
from breakhis_ray import config as config_module
from breakhis_ray.cli import COMMANDS
from breakhis_ray.ray_utils import IDLE_WORKER_ENV, IDLE_WORKER_KILL_MS

REPO = Path(__file__).resolve().parents[1]
SHARED_KUBERAY = REPO.parent / "shared" / "kuberay"
CLUSTER_YAML = REPO / "ray_cluster.yaml"
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
README = REPO / "cluster" / "README.md"
KUBERAY = REPO / "cluster" / "kuberay"
MANIFESTS = {name: KUBERAY / name for name in ("raycluster.yaml", "rayjob-train.yaml", "rayjob-infer.yaml")}
NETWORK_POLICY = KUBERAY / "networkpolicy.yaml"
AUTH_SECRET = "breakhis-ray-auth"
POD_LABEL = ("app.kubernetes.io/name", "breakhis-ray")
SUBMITTER_LABEL = ("app.kubernetes.io/component", "breakhis-ray-submitter")
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-(?P<py>py3\d+)-gpu$")
KEY_PATTERNS = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|"
                          r"AWS_SESSION_TOKEN", re.IGNORECASE)
UPLOAD_LIMIT = 100 * 2**20


# --------------------------------------------------------------------------------------------- helpers
def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def prepared_cluster_config(raw: dict) -> dict:
    """What ``ray up`` validates: defaults merged in, then Ray's JSON schema and consistency checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster_raw() -> dict:
    return load_yaml(CLUSTER_YAML)


@pytest.fixture(scope="module")
def cluster(cluster_raw) -> dict:
    return prepared_cluster_config(cluster_raw)


def image_version(image: str) -> tuple[str, str]:
    match = IMAGE_RE.match(image)
    assert match, f"image {image!r} is not rayproject/ray:<x.y.z>-py3NN-gpu (the ray-ml images are discontinued)"
    return match["version"], match["py"]


def command_class(command: str):
    cmd = next((c for c in COMMANDS if c.name == command), None)
    assert cmd is not None, f"no subcommand {command!r}"
    cls = getattr(config_module, cmd.config, None)
    assert cls is not None, f"breakhis_ray.config has no {cmd.config} (config of `breakhis-ray {command}`)"
    return cls


def check_job_command(argv: list[str], where: str):
    """``python jobs/<stage>.py [--config FILE] [--flag v] [key=value ...]``: script and config exist, and
    the resolved config (file < flags < overrides) validates. Returns the validated config."""
    assert argv[:1] == ["python"] and len(argv) >= 2, f"{where}: entrypoint must be `python jobs/<stage>.py`"
    script = REPO / argv[1]
    assert argv[1].startswith("jobs/") and script.is_file(), f"{where}: {argv[1]} does not exist"
    command = script.stem.replace("_", "-")
    cls = command_class(command)
    cmd = next(c for c in COMMANDS if c.name == command)
    flags = {f.name: f for f in cmd.flags}
    config_path, values, overrides = None, {}, []
    args = iter(argv[2:])
    for arg in args:
        if arg == "--config":
            config_path = REPO / next(args)
            assert config_path.is_file(), f"{where}: config {config_path.relative_to(REPO)} does not exist"
        elif arg in flags:
            values[flags[arg].key] = flags[arg].type(next(args))
        elif arg.startswith("--"):
            pytest.fail(f"{where}: unknown flag {arg} for `breakhis-ray {command}`")
        else:
            overrides.append(arg)
    return config_module.load_config(cls, config_path, overrides, values)


# ----------------------------------------------------------------------------- ray_cluster.yaml: Ray
def test_cluster_yaml_passes_ray_validation(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["head_node_type"] in cluster["available_node_types"]


def test_cluster_yaml_node_type_without_resources_is_rejected(cluster_raw):
    import jsonschema

    broken = copy.deepcopy(cluster_raw)
    del broken["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        prepared_cluster_config(broken)


def test_cluster_yaml_unknown_key_is_rejected(cluster_raw):
    import jsonschema

    broken = copy.deepcopy(cluster_raw)
    broken["max_worker"] = broken.pop("max_workers")  # a typo
    with pytest.raises(jsonschema.ValidationError, match=r"'max_worker' was unexpected"):
        prepared_cluster_config(broken)
    broken = copy.deepcopy(cluster_raw)
    broken["docker"]["imgae"] = broken["docker"]["image"]
    with pytest.raises(jsonschema.ValidationError, match=r"'imgae' was unexpected"):
        prepared_cluster_config(broken)


def test_cluster_yaml_min_workers_over_global_max_is_rejected(cluster_raw):
    broken = copy.deepcopy(cluster_raw)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        prepared_cluster_config(broken)


# ------------------------------------------------------------------------ ray_cluster.yaml: package
def test_cluster_image_matches_installed_ray(cluster):
    version, _ = image_version(cluster["docker"]["image"])
    assert version.split(".")[:2] == ray.__version__.split(".")[:2], (
        f"cluster image Ray {version} vs installed ray {ray.__version__}: client and cluster must match")
    assert "head_image" not in cluster["docker"] and "worker_image" not in cluster["docker"]


def test_cluster_node_types(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), (
        "head advertises CPU 0 and no GPU: no tasks, actors or Train workers there (drivers still run)")
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    assert gpu and cpu, "one autoscaling GPU worker type and one CPU worker type"
    for t in workers.values():
        assert t["min_workers"] == 0 < t["max_workers"], "workers scale from zero"
    assert cluster["max_workers"] >= sum(t["max_workers"] for t in workers.values())


def test_cluster_gpu_capacity_fits_the_gpu_configs(cluster):
    train = config_module.load_config(config_module.TrainConfig, REPO / "jobs/configs/train_vgg16_gpu.yaml")
    gpu_types = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    per_node = max(t["resources"]["GPU"] for t in gpu_types)
    total = sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_types)
    assert train.scaling.use_gpu and per_node >= train.scaling.gpus_per_worker
    assert total >= train.scaling.num_workers * train.scaling.gpus_per_worker
    node_cpus = max(t["resources"]["CPU"] for t in gpu_types)
    assert node_cpus >= math.ceil(per_node / train.scaling.gpus_per_worker) * train.scaling.cpus_per_worker
    infer = check_job_command(["python", "jobs/infer.py", "--config", "jobs/configs/infer_gpu.yaml"], "infer_gpu")
    assert infer.num_gpus > 0 and total >= infer.concurrency * infer.num_gpus


def test_cluster_installs_this_package(cluster):
    mounts = {remote: local for remote, local in cluster["file_mounts"].items() if local == "."}
    assert len(mounts) == 1, "the repository is copied with file_mounts {remote: '.'}"
    (remote,) = mounts
    setup = " && ".join(cluster["setup_commands"])
    assert f"pip install -q -e {remote}" in setup or f"pip install -e {remote}" in setup
    assert {".git", ".venv", "runs", "data"} <= set(cluster["rsync_exclude"])


def test_cluster_has_no_public_dashboard_and_no_keys(cluster, cluster_raw):
    commands = [*cluster["head_start_ray_commands"], *cluster["worker_start_ray_commands"]]
    assert not any("0.0.0.0" in c for c in commands), "the dashboard must not bind to every interface"
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "reach the dashboard through `ray dashboard` (SSH)"
    extra_rules = cluster["provider"].get("security_group", {}).get("IpPermissions", [])
    assert all(r.get("FromPort") == r.get("ToPort") == 22 for r in extra_rules), "security group: SSH only"
    for name, node_type in cluster_raw["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], f"{name}: S3 through an IAM instance profile"
    assert not KEY_PATTERNS.search(CLUSTER_YAML.read_text()), "no AWS keys in ray_cluster.yaml"


# ---------------------------------------------------------------------------------------- KubeRay
def _strict(node):
    """Reject unknown fields where Kubernetes would prune them (objects with declared properties)."""
    if isinstance(node, dict):
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


@lru_cache(maxsize=None)
def crd_validator(kind: str, api_version: str):
    import jsonschema

    path = SHARED_KUBERAY / CRDS[kind]
    if not path.is_file():
        skip_or_fail(f"KubeRay CRD schema {path} not present (../shared/kuberay)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group = crd["spec"]["group"]
    for version in crd["spec"]["versions"]:
        if f"{group}/{version['name']}" == api_version:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            # OpenAPI v3 schemas are JSON Schema with extensions (x-kubernetes-*, nullable): Draft 7 ignores them.
            return jsonschema.Draft7Validator(schema)
    pytest.fail(f"{api_version} is not a version of the {kind} CRD")


def manifest_docs(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(MANIFESTS[name].read_text()) if d]
    assert docs, f"{name} is empty"
    return docs


def ray_cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_templates(spec: dict):
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def gpus(container: dict) -> tuple[float, float]:
    res = container.get("resources", {})
    return (float(res.get("requests", {}).get("nvidia.com/gpu", 0)),
            float(res.get("limits", {}).get("nvidia.com/gpu", 0)))


def cpus(container: dict) -> float:
    value = str(container["resources"]["limits"]["cpu"])
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_kuberay_manifest_matches_crd(name):
    for doc in manifest_docs(name):
        validator = crd_validator(doc["kind"], doc["apiVersion"])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{name}: {'.'.join(map(str, e.path))}: {e.message[:200]}" for e in errors)


def test_kuberay_strict_schema_catches_typos():
    doc = manifest_docs("rayjob-train.yaml")[0]
    validator = crd_validator(doc["kind"], doc["apiVersion"])
    broken = copy.deepcopy(doc)
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e.message for e in validator.iter_errors(broken))
    broken = copy.deepcopy(doc)
    container = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["cpu"] = "twelve"
    assert any(list(e.path)[-1] == "cpu" for e in validator.iter_errors(broken))


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_kuberay_images_match_cluster_yaml_and_installed_ray(name, cluster_raw):
    version, py = image_version(cluster_raw["docker"]["image"])
    for doc in manifest_docs(name):
        spec = ray_cluster_spec(doc)
        assert spec["rayVersion"] == version, f"{name}: rayVersion {spec['rayVersion']} != {version}"
        for group, template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                assert image_version(container["image"]) == (version, py), f"{name}/{group}: {container['image']}"
    assert version.split(".")[:2] == ray.__version__.split(".")[:2]


def test_every_node_keeps_idle_workers_as_local_ray_does(cluster):
    setting = f"{IDLE_WORKER_ENV}={IDLE_WORKER_KILL_MS}"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in cluster[key] if "ray start" in c]
        assert setting in shlex.split(start.split("ray start")[0].split(";")[-1]), f"{key}: {start}"
    for name in MANIFESTS:
        for doc in manifest_docs(name):
            for group, template in pod_templates(ray_cluster_spec(doc)):
                for container in template["spec"]["containers"]:
                    env = {e["name"]: e.get("value") for e in container.get("env", [])}
                    assert env.get(IDLE_WORKER_ENV) == str(IDLE_WORKER_KILL_MS), f"{name}/{group}: {setting}"


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_kuberay_pods_use_irsa_and_request_resources(name):
    assert not KEY_PATTERNS.search(MANIFESTS[name].read_text()), f"{name}: S3 through IRSA, no keys"
    for doc in manifest_docs(name):
        spec = ray_cluster_spec(doc)
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{name}: no work on the head"
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        assert not spec["headGroupSpec"].get("enableIngress"), f"{name}: no public dashboard"
        for group, template in pod_templates(spec):
            where = f"{name}/{group}"
            assert template["spec"].get("serviceAccountName"), f"{where}: needs the IRSA service account"
            for container in template["spec"]["containers"]:
                res = container["resources"]
                assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), where
                requested, limited = gpus(container)
                assert requested == limited, f"{where}: nvidia.com/gpu requests must equal limits"
                assert (requested > 0) == (group != "head" and group.startswith("gpu")), where


def _gpu_capacity(spec: dict, use_max: bool) -> tuple[float, float, float]:
    """(GPUs per pod, total GPUs, CPUs per GPU pod) of the GPU worker groups."""
    per_pod, total, pod_cpus = 0.0, 0.0, 0.0
    for group in spec.get("workerGroupSpecs", []):
        container = group["template"]["spec"]["containers"][0]
        gpu = gpus(container)[1]
        if gpu:
            per_pod, pod_cpus = max(per_pod, gpu), max(pod_cpus, cpus(container))
            total += gpu * (group["maxReplicas"] if use_max else group.get("replicas", group["minReplicas"]))
    return per_pod, total, pod_cpus


def rayjob_entrypoint(name: str) -> tuple[dict, list[str]]:
    (doc,) = manifest_docs(name)
    assert doc["kind"] == "RayJob"
    return doc, shlex.split(doc["spec"]["entrypoint"])


def test_rayjob_train_runs_the_gpu_training_config():
    doc, argv = rayjob_entrypoint("rayjob-train.yaml")
    cfg = check_job_command(argv, "rayjob-train entrypoint")
    assert isinstance(cfg, config_module.TrainConfig)
    per_pod, total, pod_cpus = _gpu_capacity(doc["spec"]["rayClusterSpec"], use_max=False)
    s = cfg.scaling
    assert s.use_gpu, "the GPU job must train with scaling.use_gpu"
    assert per_pod >= s.gpus_per_worker, "a Train worker needs its GPUs in one pod"
    assert total >= s.num_workers * s.gpus_per_worker, (
        f"{total:g} GPUs at start for {s.num_workers} workers x {s.gpus_per_worker:g} GPU")
    assert pod_cpus >= math.ceil(per_pod / s.gpus_per_worker) * s.cpus_per_worker
    assert cfg.run.storage_path.startswith("s3://") and cfg.data.shards.startswith("s3://")


def test_rayjob_infer_runs_the_gpu_inference_config():
    doc, argv = rayjob_entrypoint("rayjob-infer.yaml")
    cfg = check_job_command(argv, "rayjob-infer entrypoint")
    per_pod, total, pod_cpus = _gpu_capacity(doc["spec"]["rayClusterSpec"], use_max=False)
    assert cfg.num_gpus > 0 and per_pod >= cfg.num_gpus
    assert total >= cfg.concurrency * cfg.num_gpus, f"{total:g} GPUs for {cfg.concurrency} actors"
    assert pod_cpus >= math.floor(per_pod / cfg.num_gpus) * cfg.num_cpus
    assert cfg.out.startswith("s3://")


def test_raycluster_can_grow_to_the_gpu_configs():
    (doc,) = manifest_docs("raycluster.yaml")
    spec = doc["spec"]
    assert spec.get("enableInTreeAutoscaling") is True
    per_pod, total, _ = _gpu_capacity(spec, use_max=True)
    train = config_module.load_config(config_module.TrainConfig, REPO / "jobs/configs/train_vgg16_gpu.yaml")
    assert per_pod >= train.scaling.gpus_per_worker
    assert total >= train.scaling.num_workers * train.scaling.gpus_per_worker


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-infer.yaml"])
def test_rayjob_lifecycle_and_runtime_env(name):
    doc, _ = rayjob_entrypoint(name)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, f"{name}: delete the cluster when the job ends"
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict), f"{name}: runtimeEnvYAML must be a YAML mapping"
    working_dir = env["working_dir"]
    assert re.match(r"^(s3|gs|https)://.+\.zip$", working_dir), (
        f"{name}: a RayJob submitter has no local checkout: working_dir must be a remote .zip, got {working_dir}")
    packages = env["pip"]["packages"] if isinstance(env["pip"], dict) else env["pip"]
    assert "${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}" in packages, f"{name}: install the package from working_dir"
    assert not KEY_PATTERNS.search(spec["runtimeEnvYAML"])


# ------------------------------------------------------------------------------- working_dir upload
def _excluded(root: Path, patterns: list[str]):
    """Ray's own matcher for runtime_env ``excludes`` (gitwildmatch), fnmatch over path parts as fallback."""
    try:
        from ray._private.runtime_env.packaging import _get_excludes

        return _get_excludes(root, patterns)
    except ImportError:  # private API moved: same semantics for the simple patterns we use
        from fnmatch import fnmatch

        return lambda p: any(fnmatch(part, pat) for part in p.relative_to(root).parts for pat in patterns)


def test_ray_job_submit_upload_is_small():
    env = load_yaml(RUNTIME_ENV)
    patterns = env.get("excludes", [])
    excluded = _excluded(REPO, patterns)
    for heavy in (".git", ".venv", "runs", "data"):
        assert excluded(REPO / heavy), f"cluster/runtime_env.yaml excludes must cover {heavy}/"
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        skip_or_fail("not a git checkout (or git missing): cannot list the files `ray job submit` would upload")
    files = [REPO / p for p in listing.decode().split("\0") if p]
    # Ray also honours .gitignore, which `--exclude-standard` applies here; excludes apply to any path prefix.
    def skipped(path: Path) -> bool:  # Ray does not descend into an excluded directory
        parts = path.relative_to(REPO).parts
        return any(excluded(REPO.joinpath(*parts[:i])) for i in range(1, len(parts) + 1))

    kept = [p for p in files if p.is_file() and not skipped(p)]
    size = sum(p.stat().st_size for p in kept)
    assert size < UPLOAD_LIMIT, f"working_dir upload would be {size / 2**20:.1f} MiB (limit 100 MiB)"
    assert (REPO / "jobs" / "train.py") in kept and (REPO / "breakhis_ray" / "cli.py") in kept


# ----------------------------------------------------------------------------------- README commands
def readme_commands() -> list[str]:
    text = README.read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if "ray job submit" in line]
    return commands


def test_readme_job_submissions_are_runnable():
    commands = readme_commands()
    assert len(commands) >= 3, "cluster/README.md shows ray job submit for prepare, train and infer"
    stages = set()
    for line in commands:
        line = line[line.index("ray job submit"):]
        argv = shlex.split(line, comments=True)
        assert "--" in argv, f"README: `{line}` needs `--` before the entrypoint"
        split = argv.index("--")
        flags, entry = argv[3:split], argv[split + 1:]
        assert all(not a.startswith("--") for a in entry[:2]), f"README: flags after `--` in `{line}`"
        assert "--address" in flags, f"README: `{line}`: give --address (before `--`)"
        if "--runtime-env" in flags:
            env_path = flags[flags.index("--runtime-env") + 1]
            assert env_path.startswith("/tmp/") or (REPO / env_path).is_file(), f"README: {env_path} missing"
        check_job_command(entry, f"README `{line[:60]}...`")
        stages.add(Path(entry[1]).stem)
    assert {"prepare", "train", "infer"} <= stages, f"README job submissions cover {sorted(stages)}"


# ------------------------------------------------------------------------------------- KubeRay security
def _containers(name: str):
    for doc in manifest_docs(name):
        for group, template in pod_templates(ray_cluster_spec(doc)):
            for container in template["spec"]["containers"]:
                yield f"{name}/{group}", template, container


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_kuberay_clusters_require_a_token_from_a_secret(name):
    for doc in manifest_docs(name):
        auth = ray_cluster_spec(doc).get("authOptions") or {}
        assert auth.get("mode") == "token", f"{name}: authOptions.mode must be token"
        assert auth.get("secretName") == AUTH_SECRET, f"{name}: the token comes from Secret {AUTH_SECRET}"
    for doc in manifest_docs(name):
        for node in _walk(doc):
            if isinstance(node, dict) and node.get("name") == "RAY_AUTH_TOKEN":
                assert "value" not in node, f"{name}: a token value must never be written into a manifest"


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_kuberay_s3_credentials_only_from_secrets(name):
    for where, template, container in _containers(name):
        refs = [src.get("secretRef", {}) for src in container.get("envFrom", [])]
        assert {"name": "breakhis-s3", "optional": True} in refs, f"{where}: S3 keys via envFrom Secret (optional)"
        for env in container.get("env", []):
            assert "value" not in env or not KEY_PATTERNS.search(env["name"]), f"{where}: literal {env['name']}"
        assert tuple(template["metadata"]["labels"].items()) >= (POD_LABEL,) or \
            template["metadata"]["labels"].get(POD_LABEL[0]) == POD_LABEL[1], f"{where}: NetworkPolicy label"


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-infer.yaml"])
def test_rayjob_submitter_authenticates_and_is_admitted(name):
    (doc,) = manifest_docs(name)
    template = doc["spec"]["submitterPodTemplate"]
    assert template["metadata"]["labels"].get(SUBMITTER_LABEL[0]) == SUBMITTER_LABEL[1]
    assert POD_LABEL[0] not in template["metadata"]["labels"], "the submitter must not get Ray-internal access"
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": "auth_token"}


def _policy() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(NETWORK_POLICY.read_text()) if d]
    assert (doc["apiVersion"], doc["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    return doc


def _admitted_ports(policy: dict, peer_labels: dict, peer_in_same_namespace: bool = True) -> set | str:
    """Ports of the selected pods that a peer with ``peer_labels`` may reach: a set, or "all"."""
    ports: set = set()
    for rule in policy["spec"].get("ingress", []):
        for peer in rule.get("from", []):
            if "ipBlock" in peer:
                raise AssertionError("no ipBlock peers: pod networking only")
            if "namespaceSelector" not in peer and not peer_in_same_namespace:
                continue
            want = peer.get("podSelector", {}).get("matchLabels", {})
            if "namespaceSelector" in peer and not peer.get("podSelector"):
                raise AssertionError("a namespaceSelector alone admits every pod of those namespaces")
            if all(peer_labels.get(k) == v for k, v in want.items()):
                if not rule.get("ports"):
                    return "all"
                ports |= {p["port"] for p in rule["ports"]}
    return ports


def test_network_policy_selects_every_ray_pod_and_denies_by_default():
    policy = _policy()
    assert policy["spec"]["podSelector"]["matchLabels"] == dict([POD_LABEL])
    assert "Ingress" in policy["spec"]["policyTypes"]
    for name in MANIFESTS:
        for where, template, _ in _containers(name):
            assert template["metadata"]["labels"].get(POD_LABEL[0]) == POD_LABEL[1], f"{where}: not selected"


def test_network_policy_admits_only_what_must_reach_the_head():
    policy = _policy()
    assert _admitted_ports(policy, dict([POD_LABEL])) == "all", "Ray pods talk to each other on any port"
    assert _admitted_ports(policy, dict([SUBMITTER_LABEL])) == {8265}
    assert _admitted_ports(policy, {"app.kubernetes.io/name": "kuberay-operator"}, False) == {8265}
    for stranger in ({}, {"app": "web"}, {"app.kubernetes.io/name": "other"}):
        assert _admitted_ports(policy, stranger) == set(), f"{stranger} must reach nothing (6379, 8265, 10001)"
        assert _admitted_ports(policy, stranger, False) == set()


def test_network_policy_checker_catches_an_open_rule():
    policy = copy.deepcopy(_policy())
    policy["spec"]["ingress"].append({"from": [{"podSelector": {}}], "ports": [{"port": 6379}]})
    assert _admitted_ports(policy, {"app": "web"}) == {6379}
