"""Retries against a real HTTP server: Retry-After honoured, one idempotency key, what is and isn't retried."""

from __future__ import annotations

import email.utils
import random
import socket
import time
from pathlib import Path
from typing import Any

import alignd
import httpx
import pytest
from alignd._retry import MAX_BACKOFF, backoff_delay, parse_retry_after

from tests.client.scripted import Reply, ScriptedServer, error_reply, job_body, model_body

JOB_ARGS: dict[str, Any] = {"method": "sft", "base_model": "model_1", "datasets": {"sft": "ds_1"}}


def _unavailable(retry_after: str = "1") -> Reply:
    return error_reply(503, "service_unavailable", "queue unreachable", **{"Retry-After": retry_after})


def test_503_twice_then_201_three_attempts_wait_honoured_one_idempotency_key(server: ScriptedServer) -> None:
    server.route("POST", "/v1/jobs", [_unavailable(), _unavailable(), Reply(201, job_body())])
    with alignd.Client(base_url=server.base_url, api_key="k", max_retries=2) as client:
        job = client.jobs.create(**JOB_ARGS)
    assert job.id == "job_1"
    calls = server.calls("POST", "/v1/jobs")
    assert len(calls) == 3
    # The server's clock: each retry came at least ~1 s (Retry-After: 1) after the previous answer.
    assert calls[1].at - calls[0].at >= 0.9
    assert calls[2].at - calls[1].at >= 0.9
    keys = {c.headers.get("idempotency-key") for c in calls}
    assert len(keys) == 1 and None not in keys
    assert all(c.headers["authorization"] == "Bearer k" for c in calls)


def test_each_logical_post_gets_its_own_key(server: ScriptedServer) -> None:
    server.route("POST", "/v1/jobs", Reply(202, job_body()))
    with alignd.Client(base_url=server.base_url) as client:
        client.jobs.create(**JOB_ARGS)
        client.jobs.create(**JOB_ARGS)
        client.jobs.create(**JOB_ARGS, idempotency_key="mine")
    keys = [c.headers["idempotency-key"] for c in server.calls("POST", "/v1/jobs")]
    assert keys[0] != keys[1]
    assert keys[2] == "mine"
    assert "authorization" not in server.calls("POST", "/v1/jobs")[0].headers  # no key configured


def test_gets_carry_no_idempotency_key(server: ScriptedServer) -> None:
    server.route("GET", "/v1/models/model_1", Reply(200, model_body()))
    with alignd.Client(base_url=server.base_url) as client:
        client.models.get("model_1")
    assert "idempotency-key" not in server.requests[0].headers


def test_429_is_retried_after_retry_after(server: ScriptedServer) -> None:
    server.route(
        "GET",
        "/v1/models/model_1",
        [error_reply(429, "rate_limited", "slow down", **{"Retry-After": "1"}), Reply(200, model_body())],
    )
    with alignd.Client(base_url=server.base_url, max_retries=2) as client:
        assert client.models.get("model_1").id == "model_1"
    calls = server.calls("GET", "/v1/models/model_1")
    assert len(calls) == 2
    assert calls[1].at - calls[0].at >= 0.9


def test_429_exhausted_raises_rate_limit_error(server: ScriptedServer) -> None:
    server.route("GET", "/v1/models", error_reply(429, "rate_limited", "slow down", **{"Retry-After": "0"}))
    with (
        alignd.Client(base_url=server.base_url, max_retries=2) as client,
        pytest.raises(alignd.RateLimitError),
    ):
        client.models.list()
    assert len(server.calls("GET", "/v1/models")) == 3


def test_retry_after_as_http_date(server: ScriptedServer) -> None:
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # 1..2 s from now at 1 s resolution
    server.route("GET", "/v1/models/model_1", [_unavailable(when), Reply(200, model_body())])
    with alignd.Client(base_url=server.base_url) as client:
        client.models.get("model_1")
    calls = server.calls("GET", "/v1/models/model_1")
    assert len(calls) == 2
    assert calls[1].at - calls[0].at >= 0.5


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_errors_are_retried(server: ScriptedServer, status: int) -> None:
    server.route(
        "GET",
        "/v1/models/model_1",
        [Reply(status, "bad gateway", {"Retry-After": "0"}), Reply(200, model_body())],
    )
    with alignd.Client(base_url=server.base_url) as client:
        client.models.get("model_1")
    assert len(server.calls("GET", "/v1/models/model_1")) == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, alignd.BadRequestError),
        (401, alignd.AuthenticationError),
        (404, alignd.NotFoundError),
        (409, alignd.ConflictError),
        (413, alignd.PayloadTooLargeError),
        (415, alignd.UnsupportedMediaTypeError),
        (422, alignd.ValidationError),
        (500, alignd.ServerError),
    ],
)
def test_non_retryable_statuses_are_not_retried(
    server: ScriptedServer, status: int, error: type[alignd.APIStatusError]
) -> None:
    server.route("POST", "/v1/jobs", error_reply(status, "nope", "refused", **{"Retry-After": "0"}))
    with alignd.Client(base_url=server.base_url, max_retries=3) as client, pytest.raises(error):
        client.jobs.create(**JOB_ARGS)
    assert len(server.calls("POST", "/v1/jobs")) == 1


def test_x_should_retry_false_wins(server: ScriptedServer) -> None:
    server.route("GET", "/v1/models", Reply(503, "", {"x-should-retry": "false"}))
    with alignd.Client(base_url=server.base_url) as client, pytest.raises(alignd.ServiceUnavailableError):
        client.models.list()
    assert len(server.calls("GET", "/v1/models")) == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused_raises_after_retries() -> None:
    port = _closed_port()
    client = alignd.Client(base_url=f"http://127.0.0.1:{port}", max_retries=2)
    with client, pytest.raises(alignd.APIConnectionError) as info:
        client.models.list()
    assert not isinstance(info.value, alignd.APITimeoutError)
    assert "after 3 attempt(s)" in str(info.value)
    assert info.value.status is None
    assert isinstance(info.value, alignd.AlignError)


def test_timeouts_are_retried_then_raise_api_timeout_error(server: ScriptedServer) -> None:
    server.route(
        "GET", "/v1/models", Reply(200, {"object": "list", "data": [], "has_more": False}, delay=1.0)
    )
    client = alignd.Client(base_url=server.base_url, timeout=0.2, max_retries=1)
    with client, pytest.raises(alignd.APITimeoutError):
        client.models.list()
    assert len(server.calls("GET", "/v1/models")) == 2


def test_upload_is_resent_whole_on_retry(server: ScriptedServer, tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    weights = bytes(random.Random(0).getrandbits(8) for _ in range(300_000))
    (folder / "model.safetensors").write_bytes(weights)
    (folder / ".gitattributes").write_text("ignored")
    server.route("POST", "/v1/models", [_unavailable("0"), Reply(201, model_body())])
    with alignd.Client(base_url=server.base_url) as client:
        model = client.models.upload(folder, name="tiny")
    assert model.id == "model_1"
    first, second = server.calls("POST", "/v1/models")
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]
    assert first.headers["content-type"].startswith("multipart/form-data")
    for call in (first, second):
        assert weights in call.body
        assert b'name="files"; filename="model.safetensors"' in call.body
        assert b'filename="config.json"' in call.body
        assert b".gitattributes" not in call.body
        assert b'name="name"' in call.body
    # Same boundary-free payload length both times: every byte was re-sent.
    assert abs(len(first.body) - len(second.body)) < 200


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"retry-after": "1.5"})) == 1.5
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    now = time.time()
    date = email.utils.formatdate(now + 10, usegmt=True)
    parsed = parse_retry_after(httpx.Headers({"retry-after": date}), now=now)
    assert parsed is not None and 8.5 <= parsed <= 10.5
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(10):
        for _ in range(50):
            delay = backoff_delay(attempt, rng=rng)
            assert 0.0 <= delay <= min(MAX_BACKOFF, 0.5 * 2**attempt)
