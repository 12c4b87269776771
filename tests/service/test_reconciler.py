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
