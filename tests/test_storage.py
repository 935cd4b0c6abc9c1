"""breakhis_ray.storage on local paths and against the real local S3 server (signatures are checked)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breakhis_ray import storage
from breakhis_ray.errors import StorageError


# ------------------------------------------------------------------------------------------ local
def test_local_roundtrip(tmp_path):
    root = str(tmp_path / "a")
    storage.write_bytes(storage.join(root, "x", "one.bin"), b"\x00\x01")
    storage.write_text(storage.join(root, "two.txt"), "two")
    assert storage.read_bytes(storage.join(root, "x", "one.bin")) == b"\x00\x01"
    assert storage.list_files(root) == sorted([str(tmp_path / "a/x/one.bin"), str(tmp_path / "a/two.txt")])
    assert storage.list_files("file://" + root, suffixes=[".TXT"]) == [str(tmp_path / "a/two.txt")]
    assert storage.exists(root) and storage.is_dir(root) and not storage.exists(root + "/nope")
    assert storage.parent(storage.join(root, "two.txt")) == root
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(root + "/nope")
    storage.delete_dir(root)
    assert not storage.exists(root)


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.resolve("gs://bucket/x")


# --------------------------------------------------------------------------------------------- s3


@pytest.mark.s3
def test_s3_read_write_list_exists(s3_server):
    base = s3_server.uri("storage-test/rw")
    storage.write_bytes(storage.join(base, "x", "one.bin"), b"\x00\x01")
    storage.write_text(storage.join(base, "two.txt"), "two")
    assert storage.read_bytes(storage.join(base, "x", "one.bin")) == b"\x00\x01"
    assert storage.read_text(base + "/two.txt") == "two"
    assert storage.list_files(base) == [base + "/two.txt", base + "/x/one.bin"]
    assert storage.list_files(base, suffixes=[".bin"]) == [base + "/x/one.bin"]
    assert storage.exists(base + "/two.txt") and storage.exists(base + "/x")
    assert storage.is_dir(base + "/x") and not storage.is_dir(base + "/two.txt")
    assert not storage.exists(base + "/missing.txt")
    assert storage.join("s3://b/p/", "q", "r.txt") == "s3://b/p/q/r.txt"
    assert storage.parent(base + "/x/one.bin") == base + "/x"
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(base + "/missing.txt")
    with pytest.raises(StorageError, match="not found"):
        storage.list_files(s3_server.uri("storage-test/no-such-prefix"))
    storage.delete_dir(base + "/x")
    assert storage.list_files(base) == [base + "/two.txt"]


@pytest.mark.s3
def test_s3_parquet_roundtrip(s3_server):
    uri = s3_server.uri("storage-test/table.parquet")
    fs, path = storage.resolve(uri)
    table = pa.table({"path": ["a", "b"], "image": [b"\x89PNG", b""]})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)


@pytest.mark.s3
def test_wrong_secret_is_rejected_with_one_line_error(s3_server, monkeypatch):
    uri = s3_server.uri("storage-test/secret/data.txt")
    storage.write_text(uri, "payload")
    bad_secret = "definitely-not-the-secret-" + "x" * 10
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    for action in (
        lambda: storage.read_bytes(uri),
        lambda: storage.write_text(uri, "overwrite"),
        lambda: storage.list_files(s3_server.uri("storage-test/secret")),
        lambda: storage.exists(uri),
    ):
        with pytest.raises(StorageError) as info:
            action()
        message = str(info.value)
        assert "\n" not in message and uri.rsplit("/", 1)[0] in message
        assert bad_secret not in message and s3_server.secret_key not in message
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    assert storage.read_text(uri) == "payload"  # the rejected write changed nothing


@pytest.mark.s3
def test_unreachable_endpoint_fails_with_clear_error(s3_server, monkeypatch):
    import socket

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(StorageError) as info:  # a hang would fail on the per-test timeout instead
        storage.read_bytes(s3_server.uri("storage-test/anything.txt"))
    message = str(info.value)
    assert "\n" not in message and "connect" in message.lower()
    assert message.startswith("cannot read s3://")
    assert s3_server.secret_key not in message and s3_server.access_key not in message
