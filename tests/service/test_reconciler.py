"""The reconciler against a real database: lapsed leases go back to the queue, until tries run out."""

from __future__ import annotations

import time
from pathlib import Path

from sqlmodel import select

from service.core.jobs import JobStatus
from service.db.session import make_engine, migrate, session_scope
from service.db.tables import JobRow
from service.queue.inline import InlineQueue
from service.reconciler import reconcile_once


def _running_job(engine: object, job_id: str, *, attempts: int) -> None:
    with session_scope(engine) as session:  # type: ignore[arg-type]
        session.add(
            JobRow(
                id=job_id,
                tenant="t",
                method="sft",
                status=JobStatus.running.value,
                base_model="model_x",
                created_at=int(time.time()),
                lease_owner="dead-worker",
                lease_token=attempts,
                lease_expires_at=time.time() - 1,  # lapsed
                attempts=attempts,
            )
        )


def test_lapsed_lease_requeues_then_fails_on_the_last_try(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    ran: list[str] = []
    queue = InlineQueue(ran.append)  # not started: enqueued ids only wait
    _running_job(engine, "job_retry", attempts=1)
    _running_job(engine, "job_last", attempts=3)

    counts = reconcile_once(engine, queue, max_tries=3)

    assert counts["requeued"] == 1 and counts["failed"] == 1
    with session_scope(engine) as session:
        jobs = {job.id: job for job in session.exec(select(JobRow)).all()}
    assert jobs["job_retry"].status == JobStatus.queued.value
    assert jobs["job_last"].status == JobStatus.failed.value
    assert jobs["job_last"].error_code == "worker_lost"
    assert "ALIGND_JOB_MAX_TRIES=3" in (jobs["job_last"].error_message or "")
    # Without a cap the last one would have gone round again.
    _running_job(engine, "job_uncapped", attempts=9)
    assert reconcile_once(engine, queue)["requeued"] == 1


def test_job_failed_as_worker_lost_has_its_orphan_objects_swept(tmp_path: Path) -> None:
    """No runner will finish a job the reconciler fails, so the reconciler sweeps what its worker left."""
    import io

    from service.db.tables import ArtifactRow
    from service.storage.keys import artifact_key
    from service.storage.local import LocalStore

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    store = LocalStore(tmp_path / "storage")
    _running_job(engine, "job_retry", attempts=1)
    _running_job(engine, "job_last", attempts=3)
    kept = artifact_key("job_last", "artifact_kept")
    with session_scope(engine) as session:
        session.add(
            ArtifactRow(
                id="artifact_kept",
                tenant="t",
                job_id="job_last",
                kind="checkpoint",
                sha256="0" * 64,
                storage_key=kept,
                created_at=int(time.time()),
            )
        )
    for key in (
        kept,
        artifact_key("job_last", "artifact_orphan"),
        artifact_key("job_retry", "artifact_next"),
    ):
        store.put_stream(key, io.BytesIO(b"x"))

    counts = reconcile_once(engine, InlineQueue(lambda _id: None), max_tries=3, store=store)

    assert counts["failed"] == 1 and counts["requeued"] == 1
    assert store.list_keys("artifacts/job_last/") == [kept]  # the row's object stays, the orphan went
    # A job going round again is left alone: its next attempt sweeps under its own lease.
    assert store.list_keys("artifacts/job_retry/") == [artifact_key("job_retry", "artifact_next")]


def test_a_pass_enqueues_the_oldest_queued_jobs_up_to_its_bound(tmp_path: Path) -> None:
    """A backlog far past ENQUEUE_PER_PASS costs a pass that many enqueues, the oldest first."""
    from service.reconciler import ENQUEUE_PER_PASS

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    migrate(engine)
    backlog = ENQUEUE_PER_PASS + 50
    with session_scope(engine) as session:
        for index in range(backlog):
            session.add(JobRow(id=f"job_{index:04d}", tenant="t", method="sft", base_model="m", created_at=0))
    queue = InlineQueue(lambda _id: None)  # not started: what is enqueued stays in it, in order
    assert reconcile_once(engine, queue)["enqueued"] == ENQUEUE_PER_PASS
    assert queue.depth() == ENQUEUE_PER_PASS
    enqueued = [queue._pending.get_nowait() for _ in range(ENQUEUE_PER_PASS)]
    assert enqueued == [f"job_{index:04d}" for index in range(ENQUEUE_PER_PASS)]
    engine.dispose()
