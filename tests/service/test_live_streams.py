"""The console's live streams: the job list and a job's metric points over SSE, on SQLite and PostgreSQL.

Rows are written straight into the database while a stream is open (the database is the bus the streams
poll); the jobs written so are ``running`` under a live lease of an owner that does not exist, so neither the
embedded runner nor the reconciler touches them. One test runs a real tiny job end to end.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from tests.conftest import API_KEYS, UvicornThread, make_settings, pg_database
from tests.service.helpers import assert_error, upload_dataset, upload_model, wait_for

SSE = {"Accept": "text/event-stream"}


@dataclass
class Server:
    base_url: str
    engine: Engine

    def client(self, tenant: str = "tenant-a") -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEYS[tenant]}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    from alignd_server.embedded import create_app
    from service.db.session import make_engine

    with contextlib.ExitStack() as stack:
        overrides = (
            {"database_url": stack.enter_context(pg_database())} if request.param == "postgresql" else {}
        )
        settings = make_settings(tmp_path / "alignd", **overrides)
        running = stack.enter_context(UvicornThread(create_app(settings)))
        engine = make_engine(settings.resolved_database_url)
        stack.callback(engine.dispose)
        yield Server(base_url=running.base_url, engine=engine)


class EventReader:
    """Reads an SSE response in a thread; ``next()`` waits for the next event as (event, id, data)."""

    def __init__(self, client: httpx.Client, url: str, headers: dict[str, str] | None = None) -> None:
        self._events: queue.Queue[tuple[str, str | None, Any]] = queue.Queue()
        self._context = client.stream("GET", url, headers={**SSE, **(headers or {})})
        self.response = self._context.__enter__()
        assert self.response.status_code == 200, self.response.read()
        assert self.response.headers["content-type"].startswith("text/event-stream")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        name, event_id, data = "message", None, None
        with contextlib.suppress(httpx.HTTPError):
            for line in self.response.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                elif line == "" and data is not None:
                    self._events.put((name, event_id, data))
                    name, event_id, data = "message", None, None

    def next(self, timeout: float = 10) -> tuple[str, str | None, Any]:
        return self._events.get(timeout=timeout)

    def jobs(self, count: int) -> list[dict[str, Any]]:
        got = []
        for _ in range(count):
            name, _, data = self.next()
            assert name == "job", (name, data)
            got.append(data)
        return got

    def nothing_more(self, seconds: float = 1.5) -> None:
        with pytest.raises(queue.Empty):
            self._events.get(timeout=seconds)

    def close(self) -> None:
        # Shut the socket first: the reading thread is blocked in a read that closing the response from this
        # thread would not end, and the server must see the client go (as a browser closing the tab).
        stream = self.response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._context.__exit__(None, None, None)


def _job(engine: Engine, tenant: str, *, status: str = "running", **fields: Any) -> str:
    """A job row as a worker holding its lease would leave it (the lease outlives the test)."""
    from service.core.ids import new_id, now
    from service.db.tables import JobRow

    row = JobRow(
        id=new_id("job"), tenant=tenant, method="sft", status=status, base_model="model_x", created_at=now(),
        lease_owner="test-owner", lease_token=1, lease_expires_at=time.time() + 3600, **fields,
    )  # fmt: skip
    with Session(engine, expire_on_commit=False) as session:
        session.add(row)
        session.commit()
    return row.id


def _update(engine: Engine, job_id: str, **fields: Any) -> None:
    from sqlmodel import select

    from service.db.tables import JobRow

    with Session(engine) as session:
        row = session.exec(select(JobRow).where(JobRow.id == job_id)).one()
        for key, value in fields.items():
            setattr(row, key, value)
        session.add(row)
        session.commit()


def _metrics(engine: Engine, job_id: str, *points: tuple[str, int, float]) -> None:
    from service.core.ids import now
    from service.db.tables import JobMetricRow

    with Session(engine) as session:
        for name, step, value in points:
            session.add(
                JobMetricRow(job_id=job_id, stage="sft", step=step, name=name, value=value, created_at=now())
            )
            session.commit()  # one by one, as the runner relays them


def test_job_list_stream_sends_the_page_then_every_change(server: Server) -> None:
    done = _job(server.engine, "tenant-a", status="succeeded", round=1)
    running = _job(server.engine, "tenant-a", round=1)
    _job(server.engine, "tenant-b")
    with server.client() as client, server.client("tenant-b") as other:
        everything = EventReader(client, "/v1/jobs")
        only_running = EventReader(client, "/v1/jobs?status=running")
        newest = EventReader(client, "/v1/jobs?limit=1")
        of_b = EventReader(other, "/v1/jobs?round=1")
        try:
            first = everything.jobs(2)
            assert [j["id"] for j in first] == [running, done]  # newest first, tenant B's job not among them
            assert first[0] == client.get(f"/v1/jobs/{running}").json()  # exactly what GET /v1/jobs/{id} says
            assert [j["id"] for j in only_running.jobs(1)] == [running]
            assert [j["id"] for j in newest.jobs(1)] == [running]

            _update(server.engine, running, progress=0.25, stage="sft")
            for reader in (everything, only_running, newest):
                (moved,) = reader.jobs(1)
                assert (moved["id"], moved["progress"], moved["stage"]) == (running, 0.25, "sft")

            _update(server.engine, running, name="renamed")  # not a field a list shows: nothing sent
            created = _job(server.engine, "tenant-a", round=1)
            for reader in (everything, only_running, newest):
                assert [j["id"] for j in reader.jobs(1)] == [created]

            _update(server.engine, created, status="failed", error_code="oops", error_message="it broke")
            (failed,) = everything.jobs(1)
            assert failed["id"] == created and failed["error"] == {"code": "oops", "message": "it broke"}
            # It leaves the status filter: sent once more with the status that took it out, then never again.
            assert only_running.jobs(1)[0]["status"] == "failed"
            monitors = [
                {"stage": "sft", "name": "kl", "step": 3, "value": 30.0, "threshold": 20.0, "message": "m"}
            ]
            _update(server.engine, running, monitors=monitors)
            assert everything.jobs(1)[0]["monitors"][0]["name"] == "kl"
            assert only_running.jobs(1)[0]["id"] == running
            of_b.nothing_more()  # tenant B's round 1 holds none of A's jobs, before or after the changes
        finally:
            for reader in (everything, only_running, newest, of_b):
                reader.close()
        assert_error(client.get("/v1/jobs", params={"limit": 0}, headers=SSE), 422, "invalid_request")
        assert_error(client.get("/v1/jobs", params={"after": "job_nope"}, headers=SSE), 422, "invalid_cursor")
        assert_error(other.get("/v1/jobs", params={"after": done}, headers=SSE), 422, "invalid_cursor")
        assert_error(client.get("/v1/jobs", params={"status": "nope"}, headers=SSE), 422, "invalid_request")


def test_job_list_stream_stops_polling_when_the_client_goes(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The list stream never ends by itself: a client that goes must end its polling (the server runs in this
    process, so its polls are counted here)."""
    from service.api import job_streams

    polls: list[float] = []
    poll = job_streams._poll_jobs

    def counted(*args: Any) -> Any:
        polls.append(time.monotonic())
        return poll(*args)

    monkeypatch.setattr(job_streams, "_poll_jobs", counted)
    _job(server.engine, "tenant-a")
    with server.client() as client:
        reader = EventReader(client, "/v1/jobs")
        reader.jobs(1)
        deadline = time.monotonic() + 10
        while len(polls) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(polls) >= 2  # polling while the client listens
        reader.close()
        time.sleep(2 * job_streams.SSE_POLL_SECONDS + 0.5)  # a poll under way when it went may still finish
        settled = len(polls)
        time.sleep(4 * job_streams.SSE_POLL_SECONDS)
        assert len(polls) == settled, "the stream kept polling after its client went"


def test_metrics_stream_resumes_and_ends_after_the_last_point(server: Server) -> None:
    job = _job(server.engine, "tenant-a")
    _metrics(server.engine, job, ("loss", 1, 2.0), ("lr", 1, 0.1), ("loss", 2, 1.5))
    with server.client() as client, server.client("tenant-b") as other:
        points = client.get(f"/v1/jobs/{job}/metrics").json()["data"]
        seqs = [p["seq"] for p in points]
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        later = client.get(f"/v1/jobs/{job}/metrics", params={"after": seqs[0], "name": "loss"}).json()[
            "data"
        ]
        assert [(p["step"], p["value"]) for p in later] == [(2, 1.5)]

        reader = EventReader(client, f"/v1/jobs/{job}/metrics")
        losses = EventReader(client, f"/v1/jobs/{job}/metrics?name=loss")
        try:
            name, event_id, data = reader.next()
            assert name == "metrics" and event_id == str(seqs[-1]) and data["data"] == points
            assert [p["value"] for p in losses.next()[2]["data"]] == [2.0, 1.5]
            _metrics(
                server.engine, job, ("loss", 3, 1.0), ("lr", 3, 0.05)
            )  # written while the streams are open
            arrived: list[dict[str, Any]] = []
            while len(arrived) < 2:
                name, event_id, data = reader.next()
                assert name == "metrics" and event_id == str(data["data"][-1]["seq"])
                arrived += data["data"]
            assert [(p["name"], p["step"]) for p in arrived] == [("loss", 3), ("lr", 3)]
            assert [p["value"] for p in losses.next()[2]["data"]] == [1.0]
            _update(server.engine, job, status="succeeded")
            assert reader.next() == ("end", None, {"status": "succeeded"})
            assert losses.next() == ("end", None, {"status": "succeeded"})
        finally:
            reader.close()
            losses.close()

        # Resuming: Last-Event-ID (what a browser's EventSource sends back) or ?after=, then the end at once.
        resumed = EventReader(client, f"/v1/jobs/{job}/metrics", headers={"Last-Event-ID": str(seqs[-1])})
        try:
            name, event_id, data = resumed.next()
            assert [(p["name"], p["step"]) for p in data["data"]] == [("loss", 3), ("lr", 3)]
            assert resumed.next() == ("end", None, {"status": "succeeded"})
        finally:
            resumed.close()
        after = EventReader(client, f"/v1/jobs/{job}/metrics?after={arrived[0]['seq']}")
        try:
            assert [p["name"] for p in after.next()[2]["data"]] == ["lr"]
            assert after.next()[0] == "end"
        finally:
            after.close()

        assert_error(other.get(f"/v1/jobs/{job}/metrics"), 404, "job_not_found")
        assert_error(other.get(f"/v1/jobs/{job}/metrics", headers=SSE), 404, "job_not_found")
        largest = client.get(f"/v1/jobs/{job}/metrics", params={"after": 2**31 - 1})
        assert largest.status_code == 200 and largest.json()["data"] == []
        for params in ({"after": -1}, {"after": "x"}, {"after": 2**31}):
            assert_error(client.get(f"/v1/jobs/{job}/metrics", params=params), 422, "invalid_request")
        for bad in ("evt_3", "-1", "1e3", str(2**31), "9" * 30):
            response = client.get(f"/v1/jobs/{job}/metrics", headers={**SSE, "Last-Event-ID": bad})
            assert_error(response, 422, "invalid_last_event_id")


def test_streams_follow_a_real_job(tmp_path: Path, tiny_model_dir: Path, sft_jsonl: Path) -> None:
    """A tiny SFT job on the embedded runner: the list stream sees it queued, running and succeeded, and the
    metrics stream delivers every point the JSON list holds at the end, each once, then ends."""
    from alignd_server.embedded import create_app

    settings = make_settings(tmp_path / "alignd")
    with (
        UvicornThread(create_app(settings)) as running,
        httpx.Client(
            base_url=running.base_url, headers={"Authorization": "Bearer key-a"}, timeout=60
        ) as client,
    ):
        model = upload_model(client, tiny_model_dir).json()["id"]
        dataset = upload_dataset(client, sft_jsonl, "sft").json()["id"]
        jobs = EventReader(client, "/v1/jobs")
        try:
            job = client.post(
                "/v1/jobs",
                json={
                    "method": "sft", "base_model": model, "datasets": {"sft": dataset},
                    "hyperparameters": {"max_steps": 4, "batch_size": 4, "max_length": 64},
                },
            ).json()  # fmt: skip
            metrics = EventReader(client, f"/v1/jobs/{job['id']}/metrics")
            try:
                streamed: list[dict[str, Any]] = []
                while (got := metrics.next(timeout=120))[0] == "metrics":
                    streamed += got[2]["data"]
                assert got == ("end", None, {"status": "succeeded"})
            finally:
                metrics.close()
            statuses: list[str] = []
            while not statuses or statuses[-1] != "succeeded":
                update = jobs.jobs(1)[0]
                assert update["id"] == job["id"]
                statuses.append(update["status"])
        finally:
            jobs.close()
        assert statuses[-1] == "succeeded" and "running" in statuses
        assert streamed == client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
        assert {"loss", "learning_rate"} <= {p["name"] for p in streamed}
        wait_for(client, job["id"], {"succeeded"})


def test_sdk_stream_metrics_sync_and_async(tmp_path: Path) -> None:
    """The SDK's jobs.stream_metrics: points written while it reads arrive once each, in order; it ends with
    the job; ``after`` and ``name`` resume and filter (the async twin the same)."""
    import asyncio

    import alignd

    from alignd_server.embedded import create_app
    from service.db.session import make_engine

    settings = make_settings(tmp_path / "alignd")
    with UvicornThread(create_app(settings)) as running:
        engine = make_engine(settings.resolved_database_url)
        job = _job(engine, "tenant-a")
        _metrics(engine, job, ("loss", 1, 2.0), ("lr", 1, 0.1))
        got: list[alignd.Metric] = []
        with alignd.Client(base_url=running.base_url, api_key=API_KEYS["tenant-a"]) as client:
            reader = threading.Thread(target=lambda: got.extend(client.jobs.stream_metrics(job)), daemon=True)
            reader.start()
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            _metrics(engine, job, ("loss", 2, 1.5), ("lr", 2, 0.05))
            _update(engine, job, status="succeeded")
            reader.join(timeout=10)
            assert not reader.is_alive()
        assert [(m.name, m.step) for m in got] == [("loss", 1), ("lr", 1), ("loss", 2), ("lr", 2)]
        seqs = [m.seq for m in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4

        async def read_async() -> list[alignd.Metric]:
            async with alignd.AsyncClient(base_url=running.base_url, api_key=API_KEYS["tenant-a"]) as client:
                return [m async for m in client.jobs.stream_metrics(job, after=seqs[0], name="loss")]

        assert [(m.name, m.step, m.value) for m in asyncio.run(read_async())] == [("loss", 2, 1.5)]
        engine.dispose()
