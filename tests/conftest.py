"""Shared fixtures: one local Ray instance per test session, paths to ../shared reference data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The reference folder beside the checkout; tests that need it skip cleanly without it."""
    if not (SHARED / "breakhis" / "breakhis_v1_paths.txt").is_file():
        pytest.skip("../shared/breakhis reference data not present")
    return SHARED


@pytest.fixture(scope="session")
def ray_session():
    """A private local Ray instance (never joins or stops anyone else's cluster)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    temp_dir = tempfile.mkdtemp(prefix="brtest-ray-")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(
        address="local",
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
