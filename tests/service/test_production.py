"""Production mode with real processes: the API (arq mode) + separate `alignd-server worker` processes against
PostgreSQL, a private redis-server and moto's S3 server. Crashes are real: SIGKILL, Redis killed and
restarted empty.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

import httpx
import pytest

from tests.conftest import ProductionStack, free_port
from tests.service.helpers import upload_dataset, upload_model, wait_for

TERMINAL = {"succeeded", "failed", "cancelled"}


def _sft(model: str, dataset: str, **hyper: Any) -> dict[str, Any]:
    hyperparameters = {"epochs": 1, "batch_size": 4, "learning_rate": 3e-3, "max_length": 64, **hyper}
    return {
        "method": "sft",
        "base_model": model,
        "datasets": {"sft": dataset},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "hyperparameters": hyperparameters,
        "seed": 3,
    }


def _inputs(
    client: httpx.Client, stack: ProductionStack, tiny_model_dir: Any, sft_jsonl: Any
) -> tuple[str, str]:
    model = upload_model(client, tiny_model_dir)
    assert model.status_code == 201, model.text
    dataset = upload_dataset(client, sft_jsonl, "sft")
    assert dataset.status_code == 201, dataset.text
    return model.json()["id"], dataset.json()["id"]


def _scrape(url: str) -> str:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    return response.text


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        if all(f'{key}="{val}"' in series for key, val in labels.items()):
            return float(value)
    return None


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_process_runs_sft_on_postgres_redis_s3_and_presigned_download(
    production_stack: ProductionStack, tiny_model_dir: Any, sft_jsonl: Any
) -> None:
    stack = production_stack
    metrics_port = free_port()
    worker = stack.start_worker(ALIGND_WORKER_METRICS_PORT=str(metrics_port))
    with stack.client() as client:
        model, dataset = _inputs(client, stack, tiny_model_dir, sft_jsonl)
        job = client.post("/v1/jobs", json=_sft(model, dataset, max_steps=4))
        assert job.status_code == 202, job.text
        done = wait_for(client, job.json()["id"], TERMINAL, timeout=90)
        assert done["status"] == "succeeded", (done, worker.log()[-3000:])

        artifacts = client.get(f"/v1/jobs/{done['id']}/artifacts").json()["data"]
        adapter = next(a for a in artifacts if a["kind"] == "adapter")
        redirect = client.get(f"/v1/artifacts/{adapter['id']}/content")
        assert redirect.status_code == 307, redirect.text
        location = redirect.headers["location"]
        assert location.startswith(stack.s3_endpoint) and "X-Amz-Signature" in location
        # The presigned URL needs no alignd credentials.
        body = httpx.get(location, timeout=30)
        assert body.status_code == 200
        assert hashlib.sha256(body.content).hexdigest() == adapter["sha256"]
        assert len(body.content) == adapter["size_bytes"]

        # API metrics: route templates (not raw paths), status codes, jobs by status, queue depth.
        api_metrics = _scrape(f"{stack.base_url}/metrics")
        assert _sample(api_metrics, "alignd_http_requests_total", route="/v1/jobs/{job_id}", status="200")
        assert _sample(api_metrics, "alignd_http_requests_total", route="/v1/jobs", status="202") == 1
        assert _sample(api_metrics, "alignd_http_request_duration_seconds_count", route="/v1/models")
        assert job.json()["id"] not in api_metrics
        assert _sample(api_metrics, "alignd_jobs", status="succeeded") == 1
        assert _sample(api_metrics, "alignd_jobs", status="queued") == 0
        assert _sample(api_metrics, "alignd_queue_depth") == 0

    # Worker metrics on ALIGND_WORKER_METRICS_PORT.
    worker_metrics = _scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    assert _sample(worker_metrics, "alignd_worker_jobs_total", status="succeeded") == 1
    assert _sample(worker_metrics, "alignd_worker_job_duration_seconds_count", status="succeeded") == 1
    assert (_sample(worker_metrics, "alignd_worker_training_tokens_per_second") or 0) > 0
    assert _sample(worker_metrics, "alignd_worker_running_jobs") == 0

    # JSON logs carry the job id.
    assert worker.stop() == 0
    import json

    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert any(entry.get("job_id") == done["id"] for entry in lines), worker.log()[-2000:]


def _child_pid(client: httpx.Client, job_id: str) -> int | None:
    for event in reversed(client.get(f"/v1/jobs/{job_id}/events").json()["data"]):
        found = re.search(r"Training process started \(pid (\d+)\)", event["message"])
        if found:
            return int(found.group(1))
    return None


def test_sigkilled_worker_job_finishes_on_a_new_worker_once(
    production_stack: ProductionStack, tiny_model_dir: Any, sft_jsonl: Any
) -> None:
    import os
    import signal

    import boto3
    from botocore.config import Config

    stack = production_stack
    first = stack.start_worker()
    with stack.client() as client:
        model, dataset = _inputs(client, stack, tiny_model_dir, sft_jsonl)
        job_id = client.post("/v1/jobs", json=_sft(model, dataset, max_steps=30)).json()["id"]
        # Mid-job: the child is training (metrics are arriving).
        _wait(lambda: client.get(f"/v1/jobs/{job_id}/metrics").json()["data"], 60, "training metrics")
        child = _child_pid(client, job_id)
        assert child is not None
        first.kill(signal.SIGKILL)  # the worker's process group...
        os.killpg(child, signal.SIGKILL)  # ...and the training child's own group (it has its own session)
        first.process.wait()  # type: ignore[union-attr]
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # the row still says so

        stack.start_worker()
        done = wait_for(client, job_id, TERMINAL, timeout=120)
        assert done["status"] == "succeeded", done

        messages = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json()["data"]]
        assert any("stopped heartbeating" in m for m in messages), messages
        assert any("(attempt 2)" in m for m in messages), messages
        assert messages.count("Job succeeded.") == 1
        # The dead worker's arq entry was dropped with its lease: nothing lingers "in progress".
        # (arq removes the entry just after the runner commits the final status, hence the wait.)
        redis = stack.redis.client()
        _wait(
            lambda: redis.zcard("alignd:queue:sft") == 0,
            10,
            f"empty queue: {redis.zrange('alignd:queue:sft', 0, -1)}",
        )
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
        assert sorted(a["kind"] for a in artifacts) == ["adapter", "model_card"]

    # One set of artifact objects in the bucket: the killed attempt published nothing.
    s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint, config=Config(s3={"addressing_style": "path"}))
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=stack.bucket, Prefix="alignd/artifacts/").get("Contents", [])
    ]
    assert sorted(keys) == sorted(f"alignd/artifacts/{job_id}/{a['id']}.tar.gz" for a in artifacts), keys


def test_redis_restarted_empty_every_accepted_job_still_finishes(
    production_stack: ProductionStack, tiny_model_dir: Any, sft_jsonl: Any
) -> None:
    stack = production_stack
    stack.start_worker(ALIGND_WORKER_CONCURRENCY="2")
    with stack.client() as client:
        model, dataset = _inputs(client, stack, tiny_model_dir, sft_jsonl)
        ids = [client.post("/v1/jobs", json=_sft(model, dataset, max_steps=2)).json()["id"] for _ in range(3)]
        wait_for(client, ids[0], {"running", *TERMINAL}, timeout=60)
        assert stack.redis.client().zcard("alignd:queue:sft") == 3  # two running, one waiting

        stack.redis.stop()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        assert ready.json()["checks"]["queue"].startswith("unavailable")
        assert ready.json()["checks"]["database"] == "ok"
        # Accepted while Redis is down: the row is the truth, the reconciler enqueues it later.
        late = client.post("/v1/jobs", json=_sft(model, dataset, max_steps=2))
        assert late.status_code == 202, late.text
        assert late.json()["status"] == "queued"
        ids.append(late.json()["id"])
        time.sleep(1.5)  # a few reconcile passes fail meanwhile

        stack.redis.start()  # empty: every arq entry is gone
        for job_id in ids:
            done = wait_for(client, job_id, TERMINAL, timeout=120)
            assert done["status"] == "succeeded", (done, stack.workers[0].log()[-3000:])
        assert client.get("/readyz").status_code == 200


@pytest.mark.usefixtures("aws_env")
def test_stale_runner_cannot_publish_artifacts(tmp_path: Any, pg_url: str, moto_s3: str) -> None:
    """Fencing: a runner whose lease was handed to another worker can neither store nor finish."""
    from sqlmodel import select

    from service.core.ids import now
    from service.core.jobs import JobStatus
    from service.db.session import make_engine, migrate, session_scope
    from service.db.tables import ArtifactRow, JobRow
    from service.queue.inline import InlineQueue
    from service.reconciler import reconcile_once
    from service.storage import open_store
    from tests.conftest import make_bucket, make_settings
    from workers.runner import JobRunner, LeaseLost

    settings = make_settings(tmp_path / "d", database_url=pg_url, lease_seconds=0.2)
    engine = make_engine(pg_url)
    migrate(engine)
    bucket = make_bucket(moto_s3)
    store = open_store(f"s3://{bucket}/x", s3_endpoint_url=moto_s3)
    with session_scope(engine) as session:
        session.add(JobRow(id="job_fenced", tenant="t", method="sft", base_model="m", created_at=now()))
    stale = JobRunner(settings=settings, engine=engine, store=store, worker_id="stale")
    fresh = JobRunner(settings=settings, engine=engine, store=store, worker_id="fresh")
    old_lease = stale.acquire("job_fenced")
    assert old_lease is not None
    time.sleep(0.3)  # the stale runner stops heartbeating; its lease expires
    assert reconcile_once(engine, InlineQueue(lambda _id: None))["requeued"] == 1
    new_lease = fresh.acquire("job_fenced")
    assert new_lease is not None and new_lease.token > old_lease.token

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(LeaseLost):
        stale._store_artifact(old_lease, {"type": "artifact", "kind": "adapter", "path": str(folder)})
    with pytest.raises(LeaseLost):
        stale.finish(old_lease, JobStatus.succeeded)
    with pytest.raises(LeaseLost):
        stale.heartbeat(old_lease)
    with session_scope(engine) as session:
        assert session.exec(select(ArtifactRow)).all() == []
        job = session.exec(select(JobRow).where(JobRow.id == "job_fenced")).one()
        assert job.status == "running" and job.lease_owner == "fresh"
    # The stale upload was deleted again: nothing but what the fresh runner stores will be in the bucket.
    fresh._store_artifact(new_lease, {"type": "artifact", "kind": "adapter", "path": str(folder)})
    with session_scope(engine) as session:
        (artifact,) = session.exec(select(ArtifactRow)).all()
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=moto_s3, config=Config(s3={"addressing_style": "path"}))

    def bucket_keys() -> list[str]:
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="x/").get("Contents", []))

    assert artifact.storage_key == f"artifacts/job_fenced/{artifact.id}.tar.gz"
    assert bucket_keys() == [f"x/{artifact.storage_key}"]

    # An object the stale runner got into the job's folder without a row (killed before its insert).
    orphan = "artifacts/job_fenced/artifact_left_behind.tar.gz"
    s3.put_object(Bucket=bucket, Key=f"x/{orphan}", Body=b"half an attempt")
    with pytest.raises(LeaseLost):
        stale._sweep_orphans(old_lease)  # a stale runner may not sweep: the new owner may be mid-upload
    assert bucket_keys() == sorted([f"x/{artifact.storage_key}", f"x/{orphan}"])
    fresh.finish(new_lease, JobStatus.succeeded)  # the owner sweeps as the job ends
    assert bucket_keys() == [f"x/{artifact.storage_key}"]
    engine.dispose()


def test_job_timeout_stops_the_child_and_fails_the_job(
    production_stack: ProductionStack, tiny_model_dir: Any, sft_jsonl: Any
) -> None:
    stack = production_stack
    stack.start_worker(ALIGND_JOB_TIMEOUT_SECONDS="8")
    with stack.client() as client:
        model, dataset = _inputs(client, stack, tiny_model_dir, sft_jsonl)
        job_id = client.post("/v1/jobs", json=_sft(model, dataset, epochs=1000)).json()["id"]
        done = wait_for(client, job_id, TERMINAL, timeout=60)
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "job_timeout"
        assert client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"] == []
