"""Dependencies going away and coming back: real PostgreSQL and moto S3 behind a TCP proxy the test closes,
a private redis-server the test kills. Every case: 503 with Retry-After and a clear code, /readyz names
the dependency, nothing accepted is lost, recovery without a restart.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer, TcpProxy, UvicornThread, make_bucket, make_settings
from tests.service.helpers import assert_error, jsonl, upload_dataset

ROW = jsonl([{"prompt": "p", "completion": "c"}])
KEY = {"Authorization": "Bearer key-a"}


def _eventually(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_postgres_down_at_boot_and_later(tmp_path: Path, pg_url: str) -> None:
    from alignd_server.embedded import create_app

    proxy = TcpProxy(5432)  # not started: PostgreSQL is "down" at boot
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    settings = make_settings(tmp_path / "a", database_url=url, db_retry_seconds=0.3)
    try:
        with (
            UvicornThread(create_app(settings)) as server,  # starts although the database is unreachable
            httpx.Client(base_url=server.base_url, headers=KEY, timeout=30) as client,
        ):
            assert client.get("/healthz").status_code == 200
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.headers["retry-after"]
            assert ready.json()["checks"]["database"].startswith("unavailable")
            assert ready.json()["checks"]["storage"] == "ok"
            response = client.get("/v1/models")
            assert_error(response, 503, "database_unavailable")
            assert int(response.headers["retry-after"]) > 0

            proxy.start()  # the database comes up: migrations run in the background, the API recovers
            assert _eventually(lambda: client.get("/readyz").status_code == 200)
            created = upload_dataset(client, ROW, "sft")
            assert created.status_code == 201, created.text

            proxy.stop()  # goes away again while serving: pooled connections are cut
            down = client.get("/v1/datasets")
            assert_error(down, 503, "database_unavailable")
            assert down.headers["retry-after"]
            # The polled job read has its own path (Core query in the thread pool): same answer.
            polled = client.get("/v1/jobs/job_00000000000000000000000000")
            assert_error(polled, 503, "database_unavailable")
            assert polled.headers["retry-after"]
            assert client.get("/readyz").json()["checks"]["database"].startswith("unavailable")

            proxy.start()
            assert _eventually(lambda: client.get("/v1/datasets").status_code == 200)
            assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [created.json()["id"]]
    finally:
        proxy.stop()


@pytest.mark.usefixtures("aws_env")
def test_s3_down_is_503_and_recovers(tmp_path: Path, moto_s3: str) -> None:
    from alignd_server.embedded import create_app

    backend = int(moto_s3.rsplit(":", 1)[1])
    proxy = TcpProxy(backend).start()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    bucket = make_bucket(moto_s3)
    settings = make_settings(tmp_path / "s", storage_url=f"s3://{bucket}/p", s3_endpoint_url=endpoint)
    try:
        with (
            UvicornThread(create_app(settings)) as server,
            httpx.Client(base_url=server.base_url, headers=KEY, timeout=60) as client,
        ):
            kept = upload_dataset(client, ROW, "sft")
            assert kept.status_code == 201, kept.text

            proxy.stop()
            refused = upload_dataset(client, ROW, "sft")
            assert_error(refused, 503, "storage_unavailable")
            assert refused.headers["retry-after"]
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["storage"].startswith("unavailable")
            assert ready.json()["checks"]["database"] == "ok"
            assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [kept.json()["id"]]

            proxy.start()
            assert _eventually(lambda: client.get("/readyz").status_code == 200)
            again = upload_dataset(client, ROW, "sft")
            assert again.status_code == 201, again.text
            ids = {d["id"] for d in client.get("/v1/datasets").json()["data"]}
            assert ids == {kept.json()["id"], again.json()["id"]}
    finally:
        proxy.stop()


def test_redis_down_job_accepted_and_enqueued_when_it_returns(
    tmp_path: Path, redis_server: RedisServer, tiny_model_dir: Path
) -> None:
    """arq mode without a worker: the API only enqueues; the reconciler repairs what Redis lost."""
    from service.api.app import create_app
    from tests.service.helpers import upload_model

    settings = make_settings(
        tmp_path / "r", queue="arq", redis_url=redis_server.url, reconcile_interval_seconds=0.3
    )
    redis = redis_server.client()
    with (
        UvicornThread(create_app(settings)) as server,
        httpx.Client(base_url=server.base_url, headers=KEY, timeout=30) as client,
    ):
        model = upload_model(client, tiny_model_dir).json()["id"]
        dataset = upload_dataset(client, ROW, "sft").json()["id"]
        body = {"method": "sft", "base_model": model, "datasets": {"sft": dataset}}
        first = client.post("/v1/jobs", json=body).json()
        time.sleep(1)  # several reconcile passes re-enqueue the same queued row: still one entry
        assert redis.zrange("alignd:queue:sft", 0, -1) == [f"{first['id']}:0".encode()]

        redis_server.stop()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        assert ready.json()["checks"]["queue"].startswith("unavailable")
        accepted = client.post("/v1/jobs", json=body)
        assert accepted.status_code == 202, accepted.text
        assert client.get(f"/v1/jobs/{accepted.json()['id']}").json()["status"] == "queued"

        redis_server.start()  # empty
        redis = redis_server.client()
        expected = {f"{first['id']}:0".encode(), f"{accepted.json()['id']}:0".encode()}
        assert _eventually(lambda: set(redis.zrange("alignd:queue:sft", 0, -1)) == expected)
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
        assert "alignd_queue_depth 2.0" in metrics
        assert 'alignd_jobs{status="queued"} 2.0' in metrics


def test_arq_dedupe_does_not_block_reenqueue_after_the_entry_finished(redis_server: RedisServer) -> None:
    """A queued id is enqueued once; after arq ran it (success or failure) the same id can be enqueued again,
    and a new generation (a job handed back after a dead worker) is a new entry even while the old one is
    still held "in progress"."""
    from arq.worker import Worker, func

    from service.queue.arq import TASK_NAME, ArqQueue, json_deserializer, json_serializer, queue_name
    from workers.tasks import WorkerSettings

    queue = ArqQueue(redis_server.url, methods=["sft"])
    queue.start()
    redis = redis_server.client()
    try:
        queue.enqueue("job_a", method="sft")
        queue.enqueue("job_a", method="sft")  # no-op
        queue.enqueue("job_b", method="sft")
        assert redis.zcard("alignd:queue:sft") == 2
        queue.enqueue("job_a", method="sft", generation=1)  # handed back: a new entry
        assert redis.zcard("alignd:queue:sft") == 3
        assert queue.depth() == 3

        seen: list[str] = []

        async def fake_run(_ctx: dict[str, Any], job_id: str) -> str:
            seen.append(job_id)
            if job_id == "job_b":
                raise RuntimeError("boom")
            return "succeeded"

        async def drain() -> None:
            worker = Worker(
                functions=[func(fake_run, name=TASK_NAME)],
                queue_name=queue_name("sft"),
                burst=True,
                handle_signals=False,
                keep_result=WorkerSettings.keep_result,
                job_serializer=json_serializer,
                job_deserializer=json_deserializer,
                poll_delay=0.05,
                **_redis_settings(redis_server.url),
            )
            try:
                await worker.main()
            finally:
                await worker.close()

        asyncio.run(drain())
        assert sorted(seen) == ["job_a", "job_a", "job_b"]
        assert redis.zcard("alignd:queue:sft") == 0
        # Finished (job_a) and failed (job_b) entries leave nothing behind that blocks a re-enqueue.
        queue.enqueue("job_a", method="sft")
        queue.enqueue("job_b", method="sft")
        assert redis.zcard("alignd:queue:sft") == 2
    finally:
        queue.stop()


def _redis_settings(url: str) -> dict[str, Any]:
    from arq.connections import RedisSettings

    return {"redis_settings": RedisSettings.from_dsn(url)}


def test_queue_ping_fails_fast_when_redis_is_down() -> None:
    from service.queue import QueueUnavailable
    from service.queue.arq import ArqQueue
    from tests.conftest import free_port

    queue = ArqQueue(f"redis://127.0.0.1:{free_port()}/0", methods=["sft"])
    try:
        started = time.monotonic()
        with pytest.raises(QueueUnavailable):
            queue.ping()
        with pytest.raises(QueueUnavailable):
            queue.enqueue("job_x", method="sft")
        assert queue.depth() is None
        assert time.monotonic() - started < 10
    finally:
        queue.stop()


def test_json_logs_carry_the_request_id(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from alignd_server.embedded import create_app
    from service.logs import configure_logging

    settings = make_settings(tmp_path / "l", log_json=True, log_level="DEBUG")
    buffer = io.StringIO()
    root = logging.getLogger()
    level = root.level
    configure_logging(settings, stream=buffer)
    try:
        with TestClient(create_app(settings), headers=KEY) as client:
            response = client.get("/v1/models", headers={"X-Request-ID": "req_test123"})
            assert response.headers["x-request-id"] == "req_test123"
    finally:
        for handler in list(root.handlers):
            if getattr(handler, "_alignd", False):
                root.removeHandler(handler)
        root.setLevel(level)
    entries = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    assert entries, "no log lines"
    mine = [e for e in entries if e.get("request_id") == "req_test123"]
    assert mine and mine[0]["level"] in {"debug", "info"} and "/v1/models" in mine[0]["message"]
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)
