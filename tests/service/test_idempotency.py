"""Idempotency-Key on POSTs, against real uvicorn servers on SQLite and PostgreSQL (arq mode, no worker:
jobs stay queued, so counting job rows counts exactly what the API created)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.engine import Engine

from tests.conftest import API_KEYS, RedisServer, UvicornThread, make_settings, pg_database
from tests.service.api_process import ApiProcess, api_env
from tests.service.helpers import assert_error, upload_dataset, upload_model

KEY_A = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
KEY_B = {"Authorization": f"Bearer {API_KEYS['tenant-b']}"}


@dataclass
class Server:
    base_url: str
    engine: Engine
    job: dict[str, Any]  # a valid POST /v1/jobs body (tenant A's model and dataset)
    settings: Any

    def client(self, headers: dict[str, str] = KEY_A) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def key_reserved(self, key: str) -> bool:
        from service.api.idempotency import TABLE

        with self.engine.connect() as connection:
            return (
                connection.execute(select(TABLE.c.seq).where(TABLE.c.idempotency_key == key)).first()
                is not None
            )

    def job_rows(self) -> int:
        from service.db.tables import JobRow

        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(JobRow)).scalar_one())


@contextlib.contextmanager
def serve(
    tmp_path: Path,
    redis: RedisServer,
    tiny_model_dir: Path,
    sft_jsonl: Path,
    database_url: str | None,
    *,
    process: bool = False,
    **kw: Any,
) -> Iterator[Server]:
    """The API in arq mode on a free port: a thread here, or (``process``) its own process and GIL."""
    from service.api.app import create_app

    settings = make_settings(
        tmp_path / "alignd", queue="arq", redis_url=redis.url, database_url=database_url, **kw
    )
    with contextlib.ExitStack() as stack:
        if process:
            extra = {"redis_url": redis.url, **({"database_url": database_url} if database_url else {})}
            env = api_env(settings.data_dir, **extra, **{name: str(value) for name, value in kw.items()})
            base_url = stack.enter_context(ApiProcess(env, tmp_path / "api.log")).base_url
        else:
            base_url = stack.enter_context(UvicornThread(create_app(settings))).base_url
        engine = create_engine(settings.resolved_database_url)
        stack.callback(engine.dispose)
        with httpx.Client(base_url=base_url, headers=KEY_A, timeout=60) as client:
            model = upload_model(client, tiny_model_dir)
            dataset = upload_dataset(client, sft_jsonl, "sft")
            assert model.status_code == dataset.status_code == 201, (model.text, dataset.text)
        job = {"method": "sft", "base_model": model.json()["id"], "datasets": {"sft": dataset.json()["id"]}}
        yield Server(base_url, engine, job, settings)


@pytest.fixture(params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_server: RedisServer,
    tiny_model_dir: Path,
    sft_jsonl: Path,
) -> Iterator[Server]:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_database()) if request.param == "postgresql" else None
        yield stack.enter_context(serve(tmp_path, redis_server, tiny_model_dir, sft_jsonl, url))


async def _concurrent_posts(
    base_url: str, body: dict[str, Any], key: str, count: int
) -> list[httpx.Response]:
    """``count`` POSTs in flight at once, each on its own connection. Spread over 25 clients: one httpx
    pool's bookkeeping grows with the square of its connections (a 1000-connection pool spends most of a
    minute of CPU on itself)."""
    groups = 25
    clients = [
        httpx.AsyncClient(
            base_url=base_url,
            headers=KEY_A,
            timeout=120,
            limits=httpx.Limits(max_connections=count // groups),
        )
        for _ in range(groups)
    ]
    start = asyncio.Event()

    async def post(index: int) -> httpx.Response:
        await start.wait()
        return await clients[index % groups].post("/v1/jobs", json=body, headers={"Idempotency-Key": key})

    try:
        tasks = [asyncio.create_task(post(index)) for index in range(count)]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.gather(*tasks)
    finally:
        for client in clients:
            await client.aclose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_1000_concurrent_posts_with_one_key_make_one_job(
    database: str, tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(pg_database()) if database == "postgresql" else None
        # Its own process: the thousand client connections here would otherwise share the server's GIL.
        server = stack.enter_context(
            serve(tmp_path, redis_server, tiny_model_dir, sft_jsonl, url, process=True)
        )
        started = time.monotonic()
        responses = asyncio.run(_concurrent_posts(server.base_url, server.job, "one-key-for-1000", 1000))
        elapsed = time.monotonic() - started
        first = _check_one_job(server, responses, elapsed)
        # Once it has finished, concurrent retries are all replays of it (200: the point is made, and the
        # test stays fast).
        again = asyncio.run(_concurrent_posts(server.base_url, server.job, "one-key-for-1000", 200))
        assert all(r.status_code == 202 and r.headers["idempotent-replayed"] == "true" for r in again)
        assert {r.content for r in again} == {first.content}
        assert server.job_rows() == 1


def _check_one_job(server: Server, responses: list[httpx.Response], elapsed: float) -> httpx.Response:
    """One 202 that ran, every other answer its replay or 409 in use, one job row; returns the 202."""
    by_status: dict[int, int] = {}
    for response in responses:
        by_status[response.status_code] = by_status.get(response.status_code, 0) + 1
    assert set(by_status) <= {202, 409}, by_status
    accepted = [r for r in responses if r.status_code == 202]
    first = [r for r in accepted if "idempotent-replayed" not in r.headers]
    assert len(first) == 1, by_status
    # Every replay is the first answer, byte for byte.
    replays = [r for r in accepted if r is not first[0]]
    assert all(r.content == first[0].content and r.headers["idempotent-replayed"] == "true" for r in replays)
    for refused in (r for r in responses if r.status_code == 409):
        assert refused.json()["error"]["code"] == "idempotency_key_in_use"
        assert refused.headers["x-should-retry"] == "true" and int(refused.headers["retry-after"]) >= 1
    assert server.job_rows() == 1
    print(f"1000 POSTs with one key: {by_status} in {elapsed:.1f} s")
    return first[0]


def test_replay_reuse_and_tenants(server: Server) -> None:
    with server.client() as client:
        first = client.post("/v1/jobs", json=server.job, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 202 and "idempotent-replayed" not in first.headers
        again = client.post("/v1/jobs", json=server.job, headers={"Idempotency-Key": "k1"})
        assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        assert again.headers["content-type"] == first.headers["content-type"]

        other_body = {**server.job, "seed": 7}
        reused = assert_error(
            client.post("/v1/jobs", json=other_body, headers={"Idempotency-Key": "k1"}),
            422,
            "idempotency_key_reused",
        )
        assert "different request" in reused["message"]
        other_path = client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers={"Idempotency-Key": "k1"})
        assert_error(other_path, 422, "idempotency_key_reused")
        # A stored 4xx is replayed too: the same mistake gets the same answer without running again.
        bad = {**server.job, "base_model": "model_nope"}
        assert_error(
            client.post("/v1/jobs", json=bad, headers={"Idempotency-Key": "k2"}), 422, "unknown_model"
        )
        replayed_error = client.post("/v1/jobs", json=bad, headers={"Idempotency-Key": "k2"})
        assert replayed_error.status_code == 422 and replayed_error.headers["idempotent-replayed"] == "true"

        too_long = client.post("/v1/jobs", json=server.job, headers={"Idempotency-Key": "x" * 256})
        assert_error(too_long, 400, "invalid_idempotency_key")
        assert server.job_rows() == 1

    # Keys are per tenant: tenant B's "k1" is its own (its model id is unknown to it: 422, stored as B's).
    with server.client(KEY_B) as other:
        theirs = other.post("/v1/jobs", json=server.job, headers={"Idempotency-Key": "k1"})
        assert_error(theirs, 422, "unknown_model")
        assert "idempotent-replayed" not in theirs.headers


def test_429_is_not_stored_so_the_retry_runs(
    tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    with (
        serve(
            tmp_path, redis_server, tiny_model_dir, sft_jsonl, None, max_queued_jobs_per_tenant=1
        ) as server,
        server.client() as client,
    ):
        blocker = client.post("/v1/jobs", json=server.job)
        assert blocker.status_code == 202
        refused = client.post("/v1/jobs", json=server.job, headers={"Idempotency-Key": "busy"})
        assert_error(refused, 429, "too_many_queued_jobs")
        assert client.post(f"/v1/jobs/{blocker.json()['id']}/cancel").status_code == 200
        retried = client.post("/v1/jobs", json=server.job, headers={"Idempotency-Key": "busy"})
        assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers
        assert server.job_rows() == 2


def test_expired_key_is_free_again(
    tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    ttl_hours = 1.0 / 3600  # one second
    with (
        serve(
            tmp_path, redis_server, tiny_model_dir, sft_jsonl, None, idempotency_ttl_hours=ttl_hours
        ) as server,
        server.client() as client,
    ):
        assert (
            client.post("/v1/jobs", json=server.job, headers={"Idempotency-Key": "short"}).status_code == 202
        )
        time.sleep(1.2)
        later = client.post("/v1/jobs", json={**server.job, "seed": 3}, headers={"Idempotency-Key": "short"})
        assert later.status_code == 202 and "idempotent-replayed" not in later.headers
        assert server.job_rows() == 2


def _multipart(boundary: str, content: bytes) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="kind"\r\n\r\nsft\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n'
            f"Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )


def test_upload_in_flight_is_409_then_replayed_despite_a_new_boundary(
    server: Server, sft_jsonl: Path
) -> None:
    """A held-open upload keeps its key in use; the retry (httpx draws a new multipart boundary) replays."""
    content = sft_jsonl.read_bytes()
    body = _multipart("first-attempt-boundary", content)
    release = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[:100]
        release.wait(30)
        yield body[100:]

    result: dict[str, httpx.Response] = {}

    def first_attempt() -> None:
        with server.client() as client:
            result["first"] = client.post(
                "/v1/datasets",
                content=slow_body(),
                headers={
                    "Idempotency-Key": "upload-1",
                    "Content-Type": "multipart/form-data; boundary=first-attempt-boundary",
                },
            )

    thread = threading.Thread(target=first_attempt)
    thread.start()
    try:
        with server.client() as client:
            deadline = time.monotonic() + 30
            while not server.key_reserved("upload-1"):  # until the first attempt holds the key
                assert time.monotonic() < deadline, "the first attempt never reserved its key"
                time.sleep(0.05)
            busy = upload_dataset_with_key(client, content, "upload-1")
            assert_error(busy, 409, "idempotency_key_in_use")
            release.set()
            thread.join(30)
            assert result["first"].status_code == 201, result["first"].text
            retried = upload_dataset_with_key(client, content, "upload-1")
            assert retried.status_code == 201 and retried.headers["idempotent-replayed"] == "true"
            assert retried.json() == result["first"].json()
            changed = upload_dataset_with_key(client, content + content, "upload-1")
            assert_error(changed, 422, "idempotency_key_reused")
            listed = client.get("/v1/datasets").json()["data"]
            assert sum(1 for d in listed if d["id"] == result["first"].json()["id"]) == 1
            assert len(listed) == 2  # the fixture's dataset and this one
    finally:
        release.set()
        thread.join(30)


def upload_dataset_with_key(client: httpx.Client, content: bytes, key: str) -> httpx.Response:
    return client.post(
        "/v1/datasets",
        data={"kind": "sft"},
        files={"file": ("d.jsonl", content, "application/jsonl")},
        headers={"Idempotency-Key": key},
    )


def test_sdk_create_timing_out_and_retrying_makes_one_job(
    tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    """The job insert is held up (a lock on the jobs table) past the SDK's read timeout: each attempt times
    out or hears 409 in use, the SDK retries with its one key, and once the insert lands it gets the replay."""
    import alignd

    with (
        pg_database() as url,
        serve(tmp_path, redis_server, tiny_model_dir, sft_jsonl, url) as server,
        alignd.Client(
            base_url=server.base_url,
            api_key=API_KEYS["tenant-a"],
            timeout=httpx.Timeout(10.0, read=0.3),
            max_retries=6,
        ) as sdk,
    ):
        blocked = threading.Event()
        done = threading.Event()

        def hold_jobs_table() -> None:
            with server.engine.begin() as connection:
                connection.execute(text("LOCK TABLE jobs IN EXCLUSIVE MODE"))
                blocked.set()
                done.wait(2.5)

        holder = threading.Thread(target=hold_jobs_table)
        holder.start()
        assert blocked.wait(10)
        try:
            job = sdk.jobs.create(**server.job)
        finally:
            done.set()
            holder.join(10)
        assert server.job_rows() == 1
        assert sdk.jobs.list().data[0].id == job.id


def test_stale_lock_is_taken_over_and_the_old_holder_cannot_complete(tmp_path: Path) -> None:
    """A replica that died mid-request leaves its key locked; after lock_seconds the next request takes it."""
    from service.api.idempotency import TABLE, complete, purge_expired, release, reserve
    from service.db.session import make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    migrate(engine)

    def claim(owner: str) -> bool:
        return reserve(
            engine, tenant="t", key="k", owner=owner, ttl_seconds=3600.0, lock_seconds=30.0
        ).acquired

    assert claim("dead")
    assert not claim("next")  # in use
    with engine.begin() as connection:
        connection.execute(update(TABLE).values(locked_at=time.time() - 31))
    assert claim("next")
    complete(
        engine, tenant="t", key="k", owner="dead", request_hash="h", status=201, content_type=None, body=b"x"
    )
    release(engine, tenant="t", key="k", owner="dead")  # neither touches the new holder's row
    with engine.connect() as connection:
        row = connection.execute(select(TABLE)).one()
    assert row.owner == "next" and row.response_status is None
    assert purge_expired(engine) == 0
    assert purge_expired(engine, now=time.time() + 3601) == 1
    engine.dispose()


def test_5xx_is_not_stored_and_the_key_is_released(tmp_path: Path) -> None:
    """The middleware on a real SQLite database in front of a handler that fails once with 503, then works."""
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from service.api.auth import Authenticate
    from service.api.idempotency import Idempotency
    from service.db.session import make_engine, migrate

    calls: list[bytes] = []

    async def create(request: Request) -> JSONResponse:
        calls.append(await request.body())
        if len(calls) == 1:
            return JSONResponse({"error": {"code": "storage_unavailable"}}, status_code=503)
        if len(calls) == 2:
            raise RuntimeError("handler crashed")
        return JSONResponse({"made": len(calls)}, status_code=201)

    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    migrate(engine)
    app = Starlette(routes=[Route("/v1/things", create, methods=["POST"])])
    app.state.ctx = type("Ctx", (), {"engine": engine})()
    app.add_middleware(Idempotency, ttl_seconds=3600, lock_seconds=30)
    app.add_middleware(Authenticate, tenant_keys={})
    with TestClient(app, raise_server_exceptions=False) as client:
        headers = {"Idempotency-Key": "flaky"}
        assert client.post("/v1/things", content=b"same", headers=headers).status_code == 503
        assert client.post("/v1/things", content=b"same", headers=headers).status_code == 500
        made = client.post("/v1/things", content=b"same", headers=headers)
        assert made.status_code == 201 and "idempotent-replayed" not in made.headers
        replay = client.post("/v1/things", content=b"same", headers=headers)
        assert replay.json() == {"made": 3} and replay.headers["idempotent-replayed"] == "true"
        assert len(calls) == 3
    engine.dispose()


def test_fingerprint_ignores_the_multipart_boundary_and_chunking() -> None:
    from service.api.idempotency import RequestFingerprint

    def digest(boundary: str, content: bytes, chunk: int) -> str:
        scope = {
            "method": "POST",
            "path": "/v1/datasets",
            "query_string": b"",
            "headers": [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
        }
        fingerprint = RequestFingerprint(scope)
        body = _multipart(boundary, content)
        for start in range(0, len(body), chunk):
            fingerprint.update(body[start : start + chunk])
        return fingerprint.hexdigest()

    content = b'{"prompt": "a", "completion": "b"}\n' * 50
    reference = digest("aaaa1111", content, 1 << 16)
    assert digest("b" * 32, content, 1) == reference  # a longer boundary, fed byte by byte
    assert digest("cccc2222", content, 7) == reference
    assert digest("aaaa1111", content + b"\n", 1 << 16) != reference
