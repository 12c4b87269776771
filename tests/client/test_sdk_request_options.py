"""Per-call ``extra_headers``/``extra_query``/``extra_body``/``timeout`` and the typed ``round`` and
``init_reward_model`` of ``jobs.create``, against the real alignd server (the ``live_server`` fixture).

What the server saw is read from its answers (it echoes ``X-Request-ID``, filters on the query, stores the
body's fields); the outgoing requests are also recorded by a thin wrapper around httpx's real transport.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import alignd
import httpx
import pytest
from alignd.cli import main


class Recording(httpx.BaseTransport):
    """httpx's real transport, keeping each request it sends and the answer's headers."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[tuple[httpx.Request, httpx.Headers]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.sent.append((request, response.headers))
        return response

    def close(self) -> None:
        self.inner.close()

    def to(self, method: str, path: str) -> list[tuple[httpx.Request, httpx.Headers]]:
        return [(req, headers) for req, headers in self.sent if (req.method, req.url.path) == (method, path)]


class AsyncRecording(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _client(server: Any, transport: httpx.BaseTransport | None = None, **kw: Any) -> alignd.Client:
    http = httpx.Client(transport=transport) if transport is not None else None
    return alignd.Client(base_url=server.base_url, api_key=server.api_key, http_client=http, **kw)


def test_extra_headers_reach_the_server_on_every_page(live_server: Any) -> None:
    recording = Recording()
    with _client(live_server, recording) as client:
        with pytest.raises(alignd.NotFoundError) as info:
            client.models.get("model_nope", extra_headers={"X-Request-ID": "req_sdk_get"})
        assert info.value.request_id == "req_sdk_get"  # the server echoes the id it was sent

        for i in range(3):
            client.datasets.upload(live_server.sft_jsonl, kind="sft", name=f"d{i}")
        listed = list(client.datasets.list(limit=1, extra_headers={"X-Request-ID": "req_sdk_pages"}))
    assert len(listed) == 3
    pages = recording.to("GET", "/v1/datasets")
    assert len(pages) == 3  # one request per page, each with the call's header, answered with it
    assert all(headers["x-request-id"] == "req_sdk_pages" for _, headers in pages)
    # Merged over the client's headers, not instead of them.
    assert all(req.headers["authorization"] == f"Bearer {live_server.api_key}" for req, _ in pages)
    uploads = recording.to("POST", "/v1/datasets")
    assert all(headers["x-request-id"].startswith("req_") for _, headers in uploads)
    assert not any(headers["x-request-id"] == "req_sdk_pages" for _, headers in uploads)


def test_extra_body_into_form_fields_and_extra_query_into_params(live_server: Any) -> None:
    recording = Recording()
    with _client(live_server, recording) as client:
        in_round = client.datasets.upload(live_server.sft_jsonl, kind="sft", extra_body={"round": 3})
        plain = client.datasets.upload(live_server.sft_jsonl, kind="sft")
        assert (in_round.round, plain.round) == (3, None)
        found = client.datasets.list(extra_query={"round": 3})
        assert [d.id for d in found] == [in_round.id]
        assert {d.id for d in client.datasets.list()} == {in_round.id, plain.id}
    (listing, _), *_ = recording.to("GET", "/v1/datasets")
    assert listing.url.params["round"] == "3"


def test_extra_body_merges_into_the_json_body(live_server: Any) -> None:
    recording = Recording()
    with _client(live_server, recording) as client, pytest.raises(alignd.ValidationError) as info:
        client.jobs.create(
            method="sft",
            base_model="model_nope",
            datasets={"sft": "ds_nope"},
            extra_body={"no_such_field": 1},
        )
    # JobCreate forbids unknown fields: the server saw the extra one beside the typed ones.
    assert "no_such_field" in info.value.message + json.dumps(info.value.details)
    (request, _), *_ = recording.to("POST", "/v1/jobs")
    body = json.loads(request.content)
    assert body["method"] == "sft" and body["no_such_field"] == 1


def test_a_tiny_timeout_raises_the_sdk_timeout_error_for_that_call_only(live_server: Any) -> None:
    with _client(live_server, max_retries=0) as client:
        with pytest.raises(alignd.APITimeoutError):
            client.datasets.list(timeout=1e-6)
        with pytest.raises(alignd.APITimeoutError):
            client.datasets.upload(live_server.sft_jsonl, kind="sft", timeout=1e-6)
        assert client.datasets.list().data == []  # the client's own timeout is untouched


def test_async_client_applies_the_same_options(live_server: Any) -> None:
    recording = AsyncRecording()

    async def run() -> tuple[alignd.Dataset, list[str], str | None]:
        http = httpx.AsyncClient(transport=recording)
        async with alignd.AsyncClient(
            base_url=live_server.base_url, api_key=live_server.api_key, http_client=http, max_retries=0
        ) as client:
            dataset = await client.datasets.upload(live_server.sft_jsonl, kind="sft", extra_body={"round": 5})
            await client.datasets.upload(live_server.sft_jsonl, kind="sft")
            ids = [d.id async for d in client.datasets.list(extra_query={"round": 5})]
            with pytest.raises(alignd.NotFoundError) as info:
                await client.jobs.get("job_nope", extra_headers={"X-Request-ID": "req_sdk_async"})
            with pytest.raises(alignd.APITimeoutError):
                await client.models.list(timeout=1e-6)
        await http.aclose()
        return dataset, ids, info.value.request_id

    dataset, ids, request_id = asyncio.run(run())
    assert dataset.round == 5
    assert ids == [dataset.id]
    assert request_id == "req_sdk_async"
    lists = [r for r in recording.sent if r.method == "GET" and r.url.path == "/v1/datasets"]
    assert lists[0].url.params["round"] == "5"


def test_jobs_create_sends_round_and_init_reward_model(live_server: Any) -> None:
    with _client(live_server) as client:
        model = client.models.upload(live_server.tiny_model_dir, name="tiny")
        dataset = client.datasets.upload(live_server.sft_jsonl, kind="sft")
        # A reward model to continue must exist: the server checked the id it was sent.
        with pytest.raises(alignd.ValidationError) as info:
            client.jobs.create(
                method="reward_model",
                base_model=model.id,
                datasets={"preference": dataset.id},
                init_reward_model="art_nope",
            )
        fields = {(d.get("field"), d.get("code")) for d in info.value.details}
        assert ("init_reward_model", "unknown_artifact") in fields

        job = client.jobs.create(
            method="sft",
            base_model=model.id,
            datasets={"sft": dataset.id},
            round=2,
            hyperparameters={"max_steps": 1, "batch_size": 4, "max_length": 32},
        )
        try:
            assert job.round == 2
            assert [j.id for j in client.jobs.list(round=2)] == [job.id]
            assert list(client.jobs.list(round=3)) == []
        finally:
            if not client.jobs.get(job.id).is_terminal:
                client.jobs.cancel(job.id)
        done = client.jobs.wait(job.id, timeout=120, poll_interval=0.2, raise_on_failure=False)
        assert done.is_terminal

    async def async_side() -> set[tuple[Any, Any]]:
        async with alignd.AsyncClient(base_url=live_server.base_url, api_key=live_server.api_key) as client:
            with pytest.raises(alignd.ValidationError) as info:
                await client.jobs.create(
                    method="sft", base_model=model.id, datasets={"sft": dataset.id}, init_reward_model="art_x"
                )
            return {(d.get("field"), d.get("code")) for d in info.value.details}

    assert ("init_reward_model", "unexpected_field") in asyncio.run(async_side())


def test_cli_jobs_create_passes_round_and_init_reward_model(
    live_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = ["--base-url", live_server.base_url, "--api-key", live_server.api_key]
    args = ["jobs", "create", "--method", "sft", "--base-model", "model_nope", "--sft", "ds_nope"]
    assert main([*cli, *args, "--init-reward-model", "art_nope"]) == 3
    assert "init_reward_model" in capsys.readouterr().err
    assert main([*cli, *args, "--round", "-1"]) == 3  # the server's range check on round
    assert "round" in capsys.readouterr().err


def test_extras_go_on_each_request_of_a_composite_call(live_server: Any, tmp_path: Path) -> None:
    recording = Recording()
    with _client(live_server, recording) as client:
        with pytest.raises(alignd.NotFoundError):
            client.artifacts.download("art_nope", tmp_path / "x", extra_headers={"X-Request-ID": "req_dl"})
        with pytest.raises(alignd.NotFoundError):
            client.jobs.wait("job_nope", extra_query={"probe": "1"}, request_timeout=5)
    (_, headers), *_ = recording.to("GET", "/v1/artifacts/art_nope")
    assert headers["x-request-id"] == "req_dl"
    (poll, _), *_ = recording.to("GET", "/v1/jobs/job_nope")
    assert poll.url.params["probe"] == "1"
    assert poll.extensions["timeout"]["read"] == 5
