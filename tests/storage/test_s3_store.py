"""S3Store against a real S3 endpoint: moto's server on a free 127.0.0.1 port, spoken to over HTTP.

No in-process mocks (no ``mock_aws``): every call goes through botocore's HTTP stack, signing, retries and
the transfer manager, exactly as against MinIO or AWS. Dead endpoints are real closed ports and the 5xx
endpoint is a real HTTP server.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config

from service.storage.base import ArtifactStore, StorageUnavailable, open_store
from service.storage.local import LocalStore
from service.storage.s3 import ChecksumMismatch, MiB, S3Store

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        # Credentials through the standard chain, as in production; keep the developer's own AWS
        # profile and config files out of it.
        for name, value in AWS_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        nothing = tmp_path_factory.mktemp("aws") / "absent"
        mp.setenv("AWS_CONFIG_FILE", str(nothing))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nothing))
        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def raw(moto_url: str) -> Any:
    """A plain boto3 client for looking behind the store's back."""
    return boto3.client(
        "s3", endpoint_url=moto_url, config=Config(s3={"addressing_style": "path"}, signature_version="s3v4")
    )


@pytest.fixture
def bucket(raw: Any) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    raw.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3(moto_url: str, bucket: str) -> S3Store:
    return S3Store(bucket, prefix="pfx", endpoint_url=moto_url)


def payload(size: int, seed: int = 0) -> bytes:
    # Incompressible and position-dependent, so a shifted or swapped part would be caught.
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * 1024
        counter += 1
    return bytes(out[:size])


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- writes ----------------------------------------------------------------------------------------


def test_put_file_small_is_single_put_with_sha256(s3: S3Store, raw: Any, bucket: str, tmp_path: Path) -> None:
    data = payload(100_000)
    assert s3.put_file("models/m1/config.json", write(tmp_path / "f", data)) == len(data)
    head = raw.head_object(Bucket=bucket, Key="pfx/models/m1/config.json")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert "-" not in head["ETag"]
    assert s3.sha256("models/m1/config.json") == hashlib.sha256(data).hexdigest()


def test_put_file_large_goes_multipart(moto_url: str, bucket: str, raw: Any, tmp_path: Path) -> None:
    # 5 MiB is S3's smallest allowed part; 12 MiB -> parts of 5, 5 and 2 MiB.
    store = S3Store(bucket, "pfx", moto_url, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    data = payload(12 * MiB, seed=1)
    assert store.put_file("big.bin", write(tmp_path / "big", data)) == len(data)
    head = raw.head_object(Bucket=bucket, Key="pfx/big.bin")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # multipart ETag: md5-of-md5s "-<parts>"
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert b"".join(store.iter_chunks("big.bin")) == data
    assert raw.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_put_stream_small_and_multipart(moto_url: str, bucket: str, raw: Any) -> None:
    store = S3Store(bucket, "pfx", moto_url, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    small, large = payload(3000, seed=2), payload(11 * MiB + 17, seed=3)
    assert store.put_stream("s.bin", io.BytesIO(small)) == len(small)
    assert store.put_stream("l.bin", io.BytesIO(large)) == len(large)
    assert raw.head_object(Bucket=bucket, Key="pfx/l.bin")["ETag"].strip('"').endswith("-3")
    for key, data in (("s.bin", small), ("l.bin", large)):
        assert store.sha256(key) == hashlib.sha256(data).hexdigest()
        assert b"".join(store.iter_chunks(key, chunk_size=64 * 1024)) == data


def test_put_replaces_atomically(s3: S3Store, tmp_path: Path) -> None:
    s3.put_stream("k", io.BytesIO(b"old"))
    s3.put_file("k", write(tmp_path / "n", b"new contents"))
    assert b"".join(s3.iter_chunks("k")) == b"new contents"
    assert s3.sha256("k") == hashlib.sha256(b"new contents").hexdigest()


# -- reads and checksums ---------------------------------------------------------------------------


def test_iter_chunks_round_trip_chunk_sizes(s3: S3Store) -> None:
    data = payload(3 * MiB + 5, seed=4)
    s3.put_stream("d.jsonl", io.BytesIO(data))
    chunks = list(s3.iter_chunks("d.jsonl", chunk_size=MiB))
    assert [len(c) for c in chunks[:3]] == [MiB, MiB, MiB]
    assert b"".join(chunks) == data
    with pytest.raises(KeyError):
        s3.iter_chunks("absent")  # raised at call time, before any streaming starts


def test_get_to_path_writes_atomically_and_verifies(s3: S3Store, tmp_path: Path) -> None:
    data = payload(2 * MiB, seed=5)
    s3.put_stream("a/b.bin", io.BytesIO(data))
    dest = tmp_path / "out" / "b.bin"
    s3.get_to_path("a/b.bin", dest)
    assert dest.read_bytes() == data
    assert not dest.with_name("b.bin.part").exists()
    with pytest.raises(KeyError):
        s3.get_to_path("absent", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()


def test_corrupted_object_is_detected(s3: S3Store, raw: Any, bucket: str, tmp_path: Path) -> None:
    data = payload(500_000, seed=6)
    s3.put_stream("c.bin", io.BytesIO(data))
    stored = raw.head_object(Bucket=bucket, Key="pfx/c.bin")["Metadata"]
    # Overwrite behind the store's back with different bytes but the old checksum metadata.
    corrupt = bytearray(data)
    corrupt[1234] ^= 0xFF
    raw.put_object(Bucket=bucket, Key="pfx/c.bin", Body=bytes(corrupt), Metadata=stored)

    dest = tmp_path / "c.bin"
    dest.write_bytes(b"previous good copy")
    with pytest.raises(ChecksumMismatch, match="sha256"):
        s3.get_to_path("c.bin", dest)
    assert dest.read_bytes() == b"previous good copy"  # verified before the rename: never replaced
    assert not (tmp_path / "c.bin.part").exists()
    received = bytearray()
    with pytest.raises(ChecksumMismatch):
        for chunk in s3.iter_chunks("c.bin", chunk_size=100_000):
            received += chunk
    assert len(received) < len(data)  # the last chunk is withheld, so a streamed response ends short


def test_objects_without_checksum_are_readable(s3: S3Store, raw: Any, bucket: str, tmp_path: Path) -> None:
    raw.put_object(Bucket=bucket, Key="pfx/foreign.txt", Body=b"written by another tool")
    assert s3.sha256("foreign.txt") is None
    s3.get_to_path("foreign.txt", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"written by another tool"


# -- metadata, deletes -----------------------------------------------------------------------------


def test_exists_size_delete(s3: S3Store) -> None:
    assert not s3.exists("e/1")
    with pytest.raises(KeyError):
        s3.size("e/1")
    s3.put_stream("e/1", io.BytesIO(b"12345"))
    assert s3.exists("e/1") and s3.size("e/1") == 5
    s3.delete("e/1")
    s3.delete("e/1")  # absent is fine
    assert not s3.exists("e/1")


def test_delete_prefix_batches(moto_url: str, bucket: str, raw: Any) -> None:
    store = S3Store(bucket, "pfx", moto_url, delete_batch_size=100)
    keys = [f"models/m/{i:04d}" for i in range(250)]
    for key in keys:  # raw puts: the store's own put path is tested elsewhere, this is about deletes
        raw.put_object(Bucket=bucket, Key=f"pfx/{key}", Body=b"x")
    for key in ("models/m", "models/mm/keep", "models/keep"):
        raw.put_object(Bucket=bucket, Key=f"pfx/{key}", Body=b"x")
    calls: list[int] = []

    def count(params: dict[str, Any], **_: Any) -> None:  # a botocore event hook: observes, changes nothing
        calls.append(len(params["Delete"]["Objects"]))

    store.client.meta.events.register("provide-client-params.s3.DeleteObjects", count)
    store.delete_prefix("models/m/")
    assert calls == [100, 100, 51]  # 50 left + the plain object "models/m"
    left = {o["Key"] for o in raw.list_objects_v2(Bucket=bucket, Prefix="pfx/")["Contents"]}
    assert left == {"pfx/models/mm/keep", "pfx/models/keep"}
    store.delete_prefix("nothing/here/")  # absent is fine


def test_keys_are_confined_under_prefix(s3: S3Store) -> None:
    for bad in ("", "/abs", "a/../b", "..", "a\\b"):
        with pytest.raises(ValueError):
            s3.put_stream(bad, io.BytesIO(b"x"))
    with pytest.raises(ValueError):
        s3.delete_prefix("/")
    s3.put_stream("a//b", io.BytesIO(b"x"))  # normalised like LocalStore
    assert s3.exists("a/b")
    assert s3._key("a/b") == "pfx/a/b"
    assert S3Store("b", "/x/y/", "http://h")._key("k") == "x/y/k"
    assert S3Store("b", "", "http://h")._key("k") == "k"
    with pytest.raises(ValueError):
        S3Store("b", "x/../y", "http://h")


# -- presigned URLs --------------------------------------------------------------------------------


def test_presigned_url_downloads_without_credentials(s3: S3Store) -> None:
    data = payload(1 * MiB + 3, seed=7)
    s3.put_stream("artifacts/a1.tar.gz", io.BytesIO(data))
    url = s3.presigned_url("artifacts/a1.tar.gz", expires_in=120)
    assert url is not None and "X-Amz-Signature=" in url and "X-Amz-Expires=120" in url
    response = httpx.get(url)  # a bare HTTP client: no AWS credentials, no signing
    assert response.status_code == 200
    assert response.content == data
    default = s3.presigned_url("artifacts/a1.tar.gz")
    assert default is not None and "X-Amz-Expires=3600" in default
    with pytest.raises(ValueError):
        s3.presigned_url("artifacts/a1.tar.gz", expires_in=8 * 24 * 3600)


# -- unavailability ----------------------------------------------------------------------------------


def test_ping_ok_and_missing_bucket(moto_url: str, s3: S3Store, tmp_path: Path) -> None:
    s3.ping()
    missing = S3Store(f"absent-{uuid.uuid4().hex[:8]}", "pfx", moto_url)
    with pytest.raises(StorageUnavailable, match="does not exist"):
        missing.ping()
    # A missing bucket is a deployment problem (503), never a missing key (404).
    with pytest.raises(StorageUnavailable, match="does not exist"):
        missing.iter_chunks("k")
    with pytest.raises(StorageUnavailable):
        missing.put_file("k", write(tmp_path / "f", b"x"))
    with pytest.raises(StorageUnavailable):
        missing.put_stream("k", io.BytesIO(payload(6 * MiB)))


def test_dead_endpoint_is_unavailable_everywhere(tmp_path: Path, moto_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store("bucket", "pfx", dead)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="unreachable"):
        store.ping()
    calls: list[Callable[[], object]] = [
        lambda: store.put_file("k", write(tmp_path / "f", b"x")),
        lambda: store.put_stream("k", io.BytesIO(b"x")),
        lambda: store.iter_chunks("k"),
        lambda: store.get_to_path("k", tmp_path / "out"),
        lambda: store.exists("k"),
        lambda: store.size("k"),
        lambda: store.delete("k"),
        lambda: store.delete_prefix("k/"),
    ]
    for call in calls:
        with pytest.raises(StorageUnavailable):
            call()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.part").exists()
    assert time.monotonic() - started < 20  # connection refused fails fast, retries included


class _Failing(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint having a bad day: every request gets 503 SlowDown or 500 InternalError."""

    status = 503
    protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue" at once instead of a 1 s client wait

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        code = "SlowDown" if self.status == 503 else "InternalError"
        body = f"<Error><Code>{code}</Code><Message>try later</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_is_unavailable(status: int, tmp_path: Path) -> None:
    handler = type("Handler", (_Failing,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        # One attempt per call keeps the test quick; the mapping is what is under test here.
        client = boto3.client(
            "s3",
            endpoint_url=url,
            config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}),
        )
        store = S3Store("bucket", "pfx", url, client=client)
        for call in (
            store.ping,
            lambda: store.iter_chunks("k"),
            lambda: store.size("k"),
            lambda: store.exists("k"),
            lambda: store.put_file("k", write(tmp_path / "f", b"x")),
            lambda: store.put_stream("k", io.BytesIO(b"x")),
            lambda: store.delete("k"),
            lambda: store.delete_prefix("k/"),
        ):
            with pytest.raises(StorageUnavailable):
                call()
    finally:
        server.shutdown()
        server.server_close()


def test_bad_credentials_are_unavailable(moto_url: str, bucket: str) -> None:
    # moto accepts any credentials, so only the missing-credentials path is testable here.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ACCESS_KEY_ID")
        mp.delenv("AWS_SECRET_ACCESS_KEY")
        store = S3Store(bucket, "pfx", moto_url)
        with pytest.raises(StorageUnavailable, match="credentials"):
            store.ping()
        with pytest.raises(StorageUnavailable, match="credentials"):
            store.exists("k")


# -- open_store and the shared contract ------------------------------------------------------------


def test_open_store_s3(moto_url: str, bucket: str, raw: Any) -> None:
    store = open_store(f"s3://{bucket}/deploy/artifacts/", s3_endpoint_url=moto_url)
    assert isinstance(store, S3Store) and isinstance(store, ArtifactStore)
    store.ping()
    assert store.put_stream("datasets/d1.jsonl", io.BytesIO(b'{"a": 1}\n')) == 9
    assert raw.get_object(Bucket=bucket, Key="deploy/artifacts/datasets/d1.jsonl")["Body"].read() == (
        b'{"a": 1}\n'
    )


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "root")
    url = request.getfixturevalue("moto_url")
    return S3Store(request.getfixturevalue("bucket"), "contract", url)


def test_contract(any_store: ArtifactStore, tmp_path: Path) -> None:
    """The behaviour the API and the runner rely on, for every implementation."""
    store = any_store
    assert isinstance(store, ArtifactStore)
    store.ping()
    data = payload(300_000, seed=8)

    assert store.put_file("models/m1/model.safetensors", write(tmp_path / "w", data)) == len(data)
    assert store.put_stream("models/m1/config.json", io.BytesIO(b"{}")) == 2
    assert store.put_stream("models/m10/config.json", io.BytesIO(b"sibling")) == 7
    assert store.put_stream("empty", io.BytesIO(b"")) == 0

    assert store.exists("models/m1/model.safetensors") and not store.exists("models/m1/nope")
    assert store.size("models/m1/model.safetensors") == len(data)
    assert store.size("empty") == 0
    assert b"".join(store.iter_chunks("models/m1/model.safetensors", chunk_size=4096)) == data
    assert b"".join(store.iter_chunks("empty")) == b""

    dest = tmp_path / "dl" / "sub" / "model.safetensors"
    store.get_to_path("models/m1/model.safetensors", dest)
    assert dest.read_bytes() == data and not dest.with_name(dest.name + ".part").exists()

    for absent in (store.iter_chunks, store.size):
        with pytest.raises(KeyError):
            absent("models/m1/nope")
    with pytest.raises(KeyError):
        store.get_to_path("models/m1/nope", tmp_path / "nope")
    with pytest.raises(ValueError):
        store.exists("../escape")

    # Listing a folder: nested keys, relative to the store's root, never a sibling with the same start.
    store.put_stream("models/m1/sub/part.bin", io.BytesIO(b"p"))
    assert store.list_keys("models/m1/") == [
        "models/m1/config.json",
        "models/m1/model.safetensors",
        "models/m1/sub/part.bin",
    ]
    assert store.list_keys("models/m1") == store.list_keys("models/m1/")
    assert store.list_keys("models/none/") == []

    store.delete("models/m1/config.json")
    store.delete("models/m1/config.json")
    assert not store.exists("models/m1/config.json")
    store.delete_prefix("models/m1/")
    assert store.list_keys("models/m1/") == []
    assert not store.exists("models/m1/model.safetensors")
    assert store.exists("models/m10/config.json")  # a sibling with the same leading characters stays

    url = store.presigned_url("models/m10/config.json")
    local = store.local_path("models/m10/config.json")
    if isinstance(store, S3Store):
        assert url is not None and local is None
    else:
        assert url is None and local is not None and local.read_bytes() == b"sibling"


@pytest.mark.slow
def test_throughput_64mib(moto_url: str, bucket: str, tmp_path: Path) -> None:
    """Not a gate: prints put/get MB/s for a 64 MiB object against moto on loopback."""
    store = S3Store(bucket, "bench", moto_url)
    data = os.urandom(64 * MiB)
    src = write(tmp_path / "src", data)
    started = time.perf_counter()
    store.put_file("big", src)
    put_s = time.perf_counter() - started
    started = time.perf_counter()
    store.get_to_path("big", tmp_path / "dst")
    get_s = time.perf_counter() - started
    assert (tmp_path / "dst").read_bytes() == data
    mb = len(data) / 1e6
    print(
        f"\nmoto loopback 64 MiB: put_file {mb / put_s:.0f} MB/s ({put_s:.2f} s), "
        f"get_to_path {mb / get_s:.0f} MB/s ({get_s:.2f} s)"
    )
    store.delete("big")
