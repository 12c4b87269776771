"""The key is checked before a body is read: a request without a valid key never makes the server receive,
parse or spool its body. Checked at the ASGI level (``receive`` is never called) and against a real server
in its own process with a fresh TMPDIR (nothing written there or in its data folder)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from tests.conftest import API_KEYS, RedisServer, make_settings, require_or_skip
from tests.service.api_process import ApiProcess, api_env
from tests.service.helpers import assert_error, jsonl, upload_dataset

SIXTY_MB = 60 << 20
TENANT_A_DATASET_CAP = 4096


def _scope(path: str, headers: dict[str, str], method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _call(app: Any, scope: dict[str, Any]) -> tuple[int, dict[bytes, bytes], bytes, int]:
    """Run one request through ``app``; (status, headers, body, how many times it called receive)."""
    receive_calls = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal receive_calls
        receive_calls += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body, receive_calls


@pytest.mark.parametrize(
    "path",
    [
        "/v1/datasets",
        "/v1/models",
        "/v1/jobs",
        "/v1/feedback-sets/fbs_x/labels",
        "/openai/v1/files",  # the OpenAI facade: the same keys, checked as early
        "/openai/v1/fine_tuning/jobs",
        "/openai/v1/chat/completions",
    ],
)
@pytest.mark.parametrize(
    ("authorization", "code"),
    [(None, "missing_api_key"), ("Bearer wrong", "invalid_api_key"), ("Basic a2V5LWE=", "missing_api_key")],
)
def test_401_without_calling_receive(tmp_path: Path, path: str, authorization: str | None, code: str) -> None:
    from service.api.app import create_app

    app = create_app(make_settings(tmp_path / "alignd", queue="arq"))
    headers = {"content-type": "multipart/form-data; boundary=b", "content-length": str(SIXTY_MB)}
    if authorization:
        headers["authorization"] = authorization
    status, response_headers, body, receive_calls = asyncio.run(_call(app, _scope(path, headers)))
    assert (status, json.loads(body)["error"]["code"]) == (401, code)
    assert response_headers[b"www-authenticate"] == b"Bearer"
    assert receive_calls == 0


def test_a_valid_key_reaches_the_route_with_its_tenant_in_the_scope() -> None:
    from service.api.auth import TENANT_STATE_KEY, Authenticate

    seen: dict[str, Any] = {}

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        seen["tenant"] = scope["state"][TENANT_STATE_KEY]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = Authenticate(route, tenant_keys={key: tenant for tenant, key in API_KEYS.items()})
    scope = _scope("/v1/jobs", {"authorization": f"Bearer {API_KEYS['tenant-b']}"})
    assert asyncio.run(_call(app, scope))[0] == 204
    assert seen["tenant"] == "tenant-b"
    # Auth off (no keys): the single default tenant, as before.
    assert asyncio.run(_call(Authenticate(route, tenant_keys={}), _scope("/v1/jobs", {})))[0] == 204
    assert seen["tenant"] == "default"


@dataclass
class Api:
    base_url: str
    port: int
    data_dir: Path
    tmpdir: Path


@pytest.fixture(scope="module")
def api_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    if shutil.which("redis-server") is None:
        require_or_skip("redis-server is not installed")
    root = tmp_path_factory.mktemp("auth-first")
    redis = RedisServer(root / "redis")
    redis.start()
    tmpdir = root / "server-tmp"  # the server's tempfile.gettempdir(): where Starlette would spool
    tmpdir.mkdir()
    env = api_env(
        root / "alignd", redis_url=redis.url, tenant_max_dataset_bytes=f"tenant-a:{TENANT_A_DATASET_CAP}"
    )
    env["TMPDIR"] = str(tmpdir)
    try:
        with ApiProcess(env, root / "api.log") as process:
            yield Api(process.base_url, process.port, root / "alignd", tmpdir)
    finally:
        redis.stop()


def _listing(*folders: Path) -> set[str]:
    return {str(path) for folder in folders for path in folder.rglob("*")}


def _raw_exchange(port: int, head: bytes, first_body_bytes: bytes, timeout: float = 15) -> bytes:
    """Send a request head announcing a big body plus its first bytes only; the whole answer back, or b""
    when none comes within ``timeout`` (the server is waiting for the rest of the body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + first_body_bytes)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < _length(answer):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pass
        return answer


def _length(answer: bytes) -> int:
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def _head(path: str, content_length: int, authorization: str | None = None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: multipart/form-data; boundary=xyz",
        f"Content-Length: {content_length}",
    ]
    if authorization:
        lines.append(f"Authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_anonymous_60mb_upload_is_401_and_nothing_is_written(api_process: Api) -> None:
    before = _listing(api_process.data_dir, api_process.tmpdir)
    # The answer comes while 60 MB are still announced and unsent: the server did not wait for the body.
    answer = _raw_exchange(api_process.port, _head("/v1/datasets", SIXTY_MB), b"--xyz\r\n")
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert b"missing_api_key" in answer and b"www-authenticate: Bearer" in answer
    wrong_key = _raw_exchange(api_process.port, _head("/v1/models", SIXTY_MB, "Bearer nope"), b"--xyz\r\n")
    assert wrong_key.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in wrong_key

    # And a real client sending every byte of a 60 MB multipart upload hears 401 too.
    payload = os.urandom(1 << 20) * 60
    with httpx.Client(base_url=api_process.base_url, timeout=120) as client:
        response = client.post("/v1/datasets", data={"kind": "sft"}, files={"file": ("big.jsonl", payload)})
    assert_error(response, 401, "missing_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert _listing(api_process.data_dir, api_process.tmpdir) == before
    assert not any(api_process.tmpdir.iterdir())


def test_per_tenant_upload_cap(api_process: Api) -> None:
    # Over tenant A's cap (plus multipart framing) by its Content-Length: 413 before the body is read.
    announced = TENANT_A_DATASET_CAP + (2 << 20)
    over = _raw_exchange(
        api_process.port, _head("/v1/datasets", announced, f"Bearer {API_KEYS['tenant-a']}"), b"--xyz\r\n"
    )
    assert over.startswith(b"HTTP/1.1 413") and b"payload_too_large" in over
    records = [
        {"prompt": f"Question {i}?", "completion": "An answer long enough to add up."} for i in range(200)
    ]
    data = jsonl(records)
    assert len(data) > TENANT_A_DATASET_CAP
    headers_a = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
    headers_b = {"Authorization": f"Bearer {API_KEYS['tenant-b']}"}
    with httpx.Client(base_url=api_process.base_url, timeout=60) as client:
        client.headers.update(headers_a)
        error = assert_error(upload_dataset(client, data, "sft"), 413, "dataset_too_large")
        assert str(TENANT_A_DATASET_CAP) in error["message"]
        client.headers.update(headers_b)  # no cap of its own: the server-wide one
        assert upload_dataset(client, data, "sft").status_code == 201


def test_public_paths_stay_public(api_process: Api) -> None:
    with httpx.Client(base_url=api_process.base_url, timeout=30) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc"):
            assert client.get(path).status_code == 200, path
        page = client.get("/label/fbs_anything")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert_error(client.get("/v1/models"), 401, "missing_api_key")
