"""The S3 endpoint down while the runner uploads or tidies up: it waits for the store, under its lease.

Found by the fault suite (tests/faults/test_outages.py), on real moto behind a TCP proxy that is cut and
restored two seconds later:

- at success: the runner dropped the job's checkpoint rows, could not delete their objects, could not
  sweep, and marked the job succeeded: the objects stayed in the bucket for good (nothing sweeps a
  finished job). Since then the runner marks the job succeeded first and drops its checkpoints after,
  object then row, and the reconciler drops what a runner killed or cut off in between left (found by
  the fault suite too: a worker killed after the drop and before the success had its job retrained from
  step 0);
- an upload: one refused connection ended the attempt; the next one redid the training since the newest
  checkpoint and spent one of the job's tries (an outage of a few lease periods failed the job).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import select

from tests.conftest import TcpProxy, make_bucket, make_settings


@pytest.mark.usefixtures("aws_env")
def test_success_waits_for_the_store_and_then_drops_the_checkpoints(tmp_path: Path, moto_s3: str) -> None:
    import boto3
    from botocore.config import Config

    from contract.protocol import CHECKPOINT_META_FILE
    from service.core.ids import now
    from service.core.jobs import JobStatus
    from service.db.session import make_engine, migrate, session_scope
    from service.db.tables import ArtifactRow, JobRow
    from service.storage import open_store
    from workers.outputs import store_checkpoint
    from workers.runner import JobRunner
    from workers.supervise import ChildExit

    proxy = TcpProxy(int(moto_s3.rsplit(":", 1)[1])).start()
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = make_engine(url)
    migrate(engine)
    bucket = make_bucket(moto_s3)
    store = open_store(f"s3://{bucket}/x", s3_endpoint_url=f"http://127.0.0.1:{proxy.port}")
    with session_scope(engine) as session:
        session.add(JobRow(id="job_tidy", tenant="t", method="sft", base_model="m", created_at=now()))
    settings = make_settings(tmp_path / "d", database_url=url, lease_seconds=60)
    runner = JobRunner(settings=settings, engine=engine, store=store, worker_id="w")
    lease = runner.acquire("job_tidy")
    assert lease is not None
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / CHECKPOINT_META_FILE).write_text('{"stage": "sft", "step": 3}')
    store_checkpoint(
        engine, store, lease, {"type": "checkpoint", "path": str(folder), "stage": "sft", "step": 3}
    )
    s3 = boto3.client("s3", endpoint_url=moto_s3, config=Config(s3={"addressing_style": "path"}))

    def keys() -> list[str]:
        return [
            o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="x/artifacts/").get("Contents", [])
        ]

    assert len(keys()) == 1
    proxy.stop()
    restore = threading.Timer(2.0, proxy.start)
    restore.start()
    started = time.monotonic()
    try:
        status = runner._settle(lease, ChildExit(0, None, None, False), tmp_path / "child.log")
    finally:
        restore.join()
    assert status is JobStatus.succeeded
    assert time.monotonic() - started >= 2.0  # it waited for the store
    assert keys() == []  # the checkpoint's object went, and then its row
    with session_scope(engine) as session:
        assert session.get(JobRow, 1).status == "succeeded"  # type: ignore[union-attr]
        assert session.exec(select(ArtifactRow)).all() == []
    proxy.stop()
    engine.dispose()


@pytest.mark.usefixtures("aws_env")
def test_checkpoints_a_succeeded_job_kept_are_hidden_and_the_reconciler_drops_them(
    tmp_path: Path, moto_s3: str
) -> None:
    """A runner killed between the success and the drop (or cut off from the store there) leaves a succeeded
    job with its checkpoints: the job's artifact list leaves them out, and the reconciler's next pass that
    reaches the store deletes each object and then its row."""
    import boto3
    from botocore.config import Config
    from fastapi.testclient import TestClient

    from alignd_server.embedded import create_app
    from contract.protocol import CHECKPOINT_META_FILE
    from service.core.ids import now
    from service.core.jobs import JobStatus
    from service.db.session import session_scope
    from service.db.tables import ArtifactRow, JobRow
    from service.reconciler import reconcile_once
    from service.storage import open_store
    from tests.conftest import API_KEYS
    from workers import lease as leases
    from workers.outputs import store_artifact, store_checkpoint
    from workers.runner import JobRunner

    proxy = TcpProxy(int(moto_s3.rsplit(":", 1)[1])).start()
    bucket = make_bucket(moto_s3)
    settings = make_settings(
        tmp_path / "d", storage_url=f"s3://{bucket}/x", s3_endpoint_url=f"http://127.0.0.1:{proxy.port}"
    )
    s3 = boto3.client("s3", endpoint_url=moto_s3, config=Config(s3={"addressing_style": "path"}))

    def keys() -> list[str]:
        return [
            o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="x/artifacts/").get("Contents", [])
        ]

    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {API_KEYS['tenant-a']}"
        ctx = client.app.state.ctx  # type: ignore[attr-defined]
        engine, store = ctx.engine, open_store(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
        with session_scope(engine) as session:
            session.add(
                JobRow(id="job_kept", tenant="tenant-a", method="sft", base_model="m", created_at=now())
            )
        runner = JobRunner(settings=settings, engine=engine, store=store, worker_id="w")
        lease = runner.acquire("job_kept")
        assert lease is not None
        for step in (3, 6):
            folder = tmp_path / f"ckpt{step}"
            folder.mkdir()
            (folder / CHECKPOINT_META_FILE).write_text(json.dumps({"stage": "sft", "step": step}))
            store_checkpoint(
                engine,
                store,
                lease,
                {"type": "checkpoint", "path": str(folder), "stage": "sft", "step": step},
            )
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        store_artifact(engine, store, lease, {"type": "artifact", "kind": "adapter", "path": str(adapter)})
        leases.end(engine, lease, JobStatus.succeeded)  # ... and the runner is killed here
        assert len(keys()) == 3
        listed = client.get("/v1/jobs/job_kept/artifacts").json()["data"]
        assert [a["kind"] for a in listed] == ["adapter"]  # the checkpoints are on their way out

        proxy.stop()  # a pass that cannot reach the store changes nothing
        reconcile_once(engine, ctx.queue, store=store)
        assert len(keys()) == 3
        with session_scope(engine) as session:
            assert len(session.exec(select(ArtifactRow)).all()) == 3
        proxy.start()
        reconcile_once(engine, ctx.queue, store=store)
        with session_scope(engine) as session:
            rows = session.exec(select(ArtifactRow)).all()
        assert [r.kind for r in rows] == ["adapter"]
        assert keys() == [f"x/{rows[0].storage_key}"]  # no orphan object, none missing
    proxy.stop()


@pytest.mark.usefixtures("aws_env")
def test_an_upload_waits_for_the_store(tmp_path: Path, moto_s3: str) -> None:
    import boto3
    from botocore.config import Config

    from service.core.ids import now
    from service.db.session import make_engine, migrate, session_scope
    from service.db.tables import ArtifactRow, JobRow
    from service.storage import StorageUnavailable, open_store
    from workers.lease import acquire
    from workers.outputs import put_when_reachable, store_artifact

    proxy = TcpProxy(int(moto_s3.rsplit(":", 1)[1])).start()
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    bucket = make_bucket(moto_s3)
    store = open_store(f"s3://{bucket}/x", s3_endpoint_url=f"http://127.0.0.1:{proxy.port}")
    with session_scope(engine) as session:
        session.add(JobRow(id="job_up", tenant="t", method="sft", base_model="m", created_at=now()))
    lease = acquire(engine, "job_up", owner="w", lease_seconds=60)
    assert lease is not None
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")

    proxy.stop()
    restore = threading.Timer(2.0, proxy.start)
    restore.start()
    started = time.monotonic()
    try:
        store_artifact(engine, store, lease, {"type": "artifact", "kind": "adapter", "path": str(folder)})
    finally:
        restore.join()
    assert time.monotonic() - started >= 2.0
    with session_scope(engine) as session:
        (row,) = session.exec(select(ArtifactRow)).all()
    s3 = boto3.client("s3", endpoint_url=moto_s3, config=Config(s3={"addressing_style": "path"}))
    assert s3.head_object(Bucket=bucket, Key=f"x/{row.storage_key}")["ContentLength"] == row.size_bytes

    # Patience has an end, and a cancel ends the wait at once: the attempt ends as before.
    proxy.stop()
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(b"x")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        put_when_reachable(store, "artifacts/job_up/y.tar.gz", archive, lease, patience=1.0, first_wait=0.2)
    assert time.monotonic() - started < 30
    lease.cancel_requested.set()
    with pytest.raises(StorageUnavailable):
        put_when_reachable(store, "artifacts/job_up/z.tar.gz", archive, lease, first_wait=60)
    engine.dispose()
