"""Pagination, SSE events with resume, wait with progress, metrics: the sync and async clients over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator

import alignd
import pytest

from tests.client.scripted import Recorded, Reply, ScriptedServer, job_body, model_body

MODELS = [model_body(f"model_{i:02d}") for i in range(7)]


def _paged(req: Recorded, n: int) -> Reply:
    limit = int(req.param("limit") or 20)
    after = req.param("after")
    start = 0 if after is None else [m["id"] for m in MODELS].index(after) + 1
    chunk = MODELS[start : start + limit]
    return Reply(200, {"object": "list", "data": chunk, "has_more": start + limit < len(MODELS)})


def test_auto_paging_walks_every_page(server: ScriptedServer) -> None:
    server.route("GET", "/v1/models", _paged)
    with alignd.Client(base_url=server.base_url) as client:
        page = client.models.list(limit=3)
        assert [m.id for m in page.data] == ["model_00", "model_01", "model_02"]
        assert page.has_more
        ids = [m.id for m in page]
    assert ids == [m["id"] for m in MODELS]
    afters = [c.param("after") for c in server.calls("GET", "/v1/models")]
    assert afters == [None, "model_02", "model_05"]  # the first page is not fetched again


def test_async_auto_paging(server: ScriptedServer) -> None:
    server.route("GET", "/v1/models", _paged)

    async def run() -> tuple[list[str], int]:
        async with alignd.AsyncClient(base_url=server.base_url) as client:
            ids = [m.id async for m in client.models.list(limit=2)]
            first = await client.models.list(limit=2)
            return ids, len(first.data)

    ids, first_len = asyncio.run(run())
    assert ids == [m["id"] for m in MODELS]
    assert first_len == 2


def test_models_tolerate_extra_fields(server: ScriptedServer) -> None:
    server.route("GET", "/v1/models/model_1", Reply(200, model_body(quantization="none", tags=["x"])))
    with alignd.Client(base_url=server.base_url) as client:
        model = client.models.get("model_1")
    assert model.model_extra == {"quantization": "none", "tags": ["x"]}


def _sse(events: list[dict[str, object]], *, end: bool) -> Iterator[bytes]:
    yield b": keep-alive\n\n"
    for event in events:
        yield f"id: {event['id']}\ndata: {json.dumps(event)}\n\n".encode()
    if end:
        yield b"event: end\ndata: {}\n\n"


EVENTS = [
    {"id": i, "created_at": 1_700_000_000 + i, "level": "info", "stage": "sft", "message": f"event {i}"}
    for i in range(1, 6)
]


def test_stream_events_resumes_with_last_event_id(server: ScriptedServer) -> None:
    def events(req: Recorded, n: int) -> Reply:
        if n == 0:  # the connection drops after two events
            return Reply(200, _sse(EVENTS[:2], end=False), {"Content-Type": "text/event-stream"})
        last = int(req.headers["last-event-id"])
        return Reply(200, _sse(EVENTS[last:], end=True), {"Content-Type": "text/event-stream"})

    server.route("GET", "/v1/jobs/job_1/events", events)
    server.route("GET", "/v1/jobs/job_1", Reply(200, job_body(status="running")))
    with alignd.Client(base_url=server.base_url) as client:
        got = list(client.jobs.stream_events("job_1"))
    assert [e.message for e in got] == [f"event {i}" for i in range(1, 6)]
    calls = server.calls("GET", "/v1/jobs/job_1/events")
    assert len(calls) == 2
    assert calls[0].headers["accept"] == "text/event-stream"
    assert "last-event-id" not in calls[0].headers
    assert calls[1].headers["last-event-id"] == "2"


def test_stream_events_stops_when_job_finished(server: ScriptedServer) -> None:
    server.route("GET", "/v1/jobs/job_1/events", Reply(200, _sse(EVENTS, end=False)))
    server.route("GET", "/v1/jobs/job_1", Reply(200, job_body(status="succeeded")))
    with alignd.Client(base_url=server.base_url) as client:
        assert len(list(client.jobs.stream_events("job_1"))) == 5
    assert len(server.calls("GET", "/v1/jobs/job_1/events")) == 1


def test_async_stream_events(server: ScriptedServer) -> None:
    server.route("GET", "/v1/jobs/job_1/events", Reply(200, _sse(EVENTS, end=True)))

    async def run() -> list[alignd.JobEvent]:
        async with alignd.AsyncClient(base_url=server.base_url) as client:
            return [e async for e in client.jobs.stream_events("job_1")]

    assert [e.id for e in asyncio.run(run())] == [1, 2, 3, 4, 5]


METRICS = {
    "object": "list",
    "data": [
        {"stage": "sft", "step": 1, "name": "loss", "value": 2.5},
        {"stage": "sft", "step": 1, "name": "learning_rate", "value": 1e-4},
        {"stage": "sft", "step": 2, "name": "loss", "value": 2.0},
    ],
}


def _job_progress(req: Recorded, n: int) -> Reply:
    states = [
        job_body(status="queued"),
        job_body(status="running", stage="sft", progress=0.5),
        job_body(status="succeeded", stage="sft", progress=1.0),
    ]
    return Reply(200, states[min(n, 2)])


def test_wait_returns_finished_job_and_draws_progress(server: ScriptedServer) -> None:
    server.route("GET", "/v1/jobs/job_1", _job_progress)
    server.route("GET", "/v1/jobs/job_1/metrics", Reply(200, METRICS))
    stream = io.StringIO()
    with alignd.Client(base_url=server.base_url) as client:
        job = client.jobs.wait("job_1", poll_interval=0.05, progress=True, progress_stream=stream)
    assert job.status == "succeeded" and job.succeeded
    text = stream.getvalue()
    assert "running" in text and "stage sft" in text and "50.0%" in text and "loss 2" in text
    assert "step 2" in text


def test_wait_raises_job_failed_error(server: ScriptedServer) -> None:
    failed = job_body(status="failed", error={"code": "training_error", "message": "CUDA out of memory"})
    server.route("GET", "/v1/jobs/job_1", Reply(200, failed))
    with alignd.Client(base_url=server.base_url) as client, pytest.raises(alignd.JobFailedError) as info:
        client.jobs.wait("job_1", poll_interval=0.01)
    assert info.value.job.status == "failed"
    assert info.value.code == "training_error"
    assert "CUDA out of memory" in str(info.value)


def test_wait_cancelled_raises_and_timeout_raises(server: ScriptedServer) -> None:
    server.route("GET", "/v1/jobs/job_c", Reply(200, job_body("job_c", status="cancelled")))
    server.route("GET", "/v1/jobs/job_r", Reply(200, job_body("job_r", status="running")))
    with alignd.Client(base_url=server.base_url) as client:
        with pytest.raises(alignd.JobFailedError):
            client.jobs.wait("job_c")
        with pytest.raises(alignd.JobWaitTimeoutError):
            client.jobs.wait("job_r", timeout=0.2, poll_interval=0.05)


def test_async_wait(server: ScriptedServer) -> None:
    server.route("GET", "/v1/jobs/job_1", _job_progress)

    async def run() -> alignd.Job:
        async with alignd.AsyncClient(base_url=server.base_url) as client:
            return await client.jobs.wait("job_1", poll_interval=0.01)

    assert asyncio.run(run()).status == "succeeded"


def test_metrics_as_dict(server: ScriptedServer) -> None:
    server.route("GET", "/v1/jobs/job_1/metrics", Reply(200, METRICS))
    with alignd.Client(base_url=server.base_url) as client:
        metrics = client.jobs.metrics("job_1")
    assert len(metrics) == 3
    assert metrics.as_dict() == {
        "loss": {"step": [1, 2], "value": [2.5, 2.0]},
        "learning_rate": {"step": [1], "value": [1e-4]},
    }
    assert metrics.as_dict(stage="reward_model") == {}
    latest = metrics.latest("loss")
    assert latest is not None and latest.value == 2.0


def test_job_create_body_and_cancel(server: ScriptedServer) -> None:
    server.route("POST", "/v1/jobs", Reply(202, job_body()))
    server.route("POST", "/v1/jobs/job_1/cancel", Reply(200, job_body(status="cancelled")))
    with alignd.Client(base_url=server.base_url) as client:
        client.jobs.create(
            method="sft",
            base_model="model_1",
            datasets={"sft": "ds_1"},
            lora={"r": 8},
            hyperparameters={"max_steps": 2},
            seed=1,
        )
        assert client.jobs.cancel("job_1").status == "cancelled"
    body = json.loads(server.calls("POST", "/v1/jobs")[0].body)
    assert body == {
        "method": "sft",
        "base_model": "model_1",
        "datasets": {"sft": "ds_1"},
        "lora": {"r": 8},
        "hyperparameters": {"max_steps": 2},
        "seed": 1,
    }
    assert "idempotency-key" in server.calls("POST", "/v1/jobs/job_1/cancel")[0].headers


def test_env_defaults(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIGND_BASE_URL", server.base_url + "/")
    monkeypatch.setenv("ALIGND_API_KEY", "from-env")
    server.route("GET", "/v1/models/model_1", Reply(200, model_body()))
    with alignd.Client() as client:
        assert client.base_url == server.base_url
        client.models.get("model_1")
    assert server.requests[0].headers["authorization"] == "Bearer from-env"
    assert server.requests[0].headers["user-agent"].startswith("alignd-python/")
