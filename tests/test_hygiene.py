"""The test session keeps to its temporary directories: nothing lands in the user's home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import conftest


def test_home_and_caches_point_into_the_session_temp_dir(fake_home):
    assert Path.home() == fake_home
    assert conftest.REAL_HOME == "" or not fake_home.is_relative_to(Path(conftest.REAL_HOME))
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "TORCH_HOME"):
        assert Path(os.environ[var]).is_relative_to(fake_home), var


def test_ray_token_file_and_child_processes_use_the_session_home(fake_home):
    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    assert _get_default_token_path().is_relative_to(fake_home)
    # A process started by a test (e.g. `ray start`) inherits the redirected home.
    out = subprocess.run([sys.executable, "-c", "from pathlib import Path; print(Path.home())"],
                         capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == fake_home
