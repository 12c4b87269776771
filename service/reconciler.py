"""Repairs the queue from the database: the row is the truth, the queue only a hint.

- A `running` job whose lease expired (its worker died) goes back to `queued`, fenced by a compare-and-set
  on the lease token so that a live runner's heartbeat and the reconciler cannot both win.
- The oldest `queued` jobs (up to ENQUEUE_PER_PASS) are (re-)enqueued; queues de-duplicate ids, so this
  also repairs a queue that lost its entries (a Redis restarted empty) without double-running anything: a
  runner takes a job only by moving its row from `queued` to `running`. The row's lease token goes along as the entry's generation
  (see service/queue/arq.py): a job handed back after a dead worker gets a fresh entry even while arq still
  holds the dead worker's one "in progress".

Every API replica runs one; their writes are compare-and-sets on the row, so running several is safe.
Each pass also sweeps the replica's abandoned upload staging folders (service/staging.py).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from service.core.ids import now
from service.core.jobs import JobStatus
from service.db.artifacts import drop_checkpoints, succeeded_jobs_with_checkpoints, sweep_orphan_objects
from service.db.jobs import status_change
from service.db.session import session_scope
from service.db.tables import JobEventRow, JobRow
from service.queue import JobQueue
from service.staging import sweep_staging
from service.storage.base import ArtifactStore

log = logging.getLogger(__name__)


# The oldest queued jobs (re-)enqueued per pass: enough to keep every worker fed after a Redis restart (the
# ones behind come as these leave the queue), and a pass bounded whatever the backlog (unbounded, 4,000
# queued jobs made every pass 4,000 enqueues, each a Redis round trip with arq, in the API process).
ENQUEUE_PER_PASS = 200


def reconcile_once(
    engine: Engine, queue: JobQueue, *, max_tries: int | None = None, store: ArtifactStore | None = None
) -> dict[str, int]:
    """One repair pass. ``max_tries``: a job whose lease lapsed in its last allowed attempt fails
    (``worker_lost``) instead of going round again: a job that keeps killing its worker must end.
    ``store``: where the objects such a job's dead worker left without a row are swept (no runner will)."""
    requeued = 0
    failed = 0
    lost: list[tuple[str, str, int]] = []
    ended: list[str] = []
    with session_scope(engine) as session:
        expired = session.exec(
            select(JobRow).where(
                JobRow.status == JobStatus.running.value,
                col(JobRow.lease_expires_at) < time.time(),
            )
        ).all()
        for job in expired:
            out_of_tries = max_tries is not None and job.attempts >= max_tries
            lease_unchanged = col(JobRow.lease_token) == job.lease_token
            if out_of_tries:
                message = (
                    f"Worker {job.lease_owner} stopped heartbeating in attempt {job.attempts}, the last of "
                    f"ALIGND_JOB_MAX_TRIES={max_tries}."
                )
                result = session.execute(
                    status_change(job.id, JobStatus.running, JobStatus.failed)
                    .where(lease_unchanged)
                    .values(
                        lease_owner=None,
                        lease_expires_at=None,
                        finished_at=now(),
                        error_code="worker_lost",
                        error_message=message,
                    )
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    failed += 1
                    ended.append(job.id)
                    lost.append((job.id, job.method, job.lease_token - 1))
                    session.add(
                        JobEventRow(
                            job_id=job.id, created_at=now(), level="error", stage=job.stage, message=message
                        )
                    )
                continue
            result = session.execute(
                status_change(job.id, JobStatus.running, JobStatus.queued)
                .where(lease_unchanged)
                .values(lease_owner=None, lease_expires_at=None)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                requeued += 1
                # The entry that delivered the lost attempt was queued under the token before it.
                lost.append((job.id, job.method, job.lease_token - 1))
                session.add(
                    JobEventRow(
                        job_id=job.id,
                        created_at=now(),
                        level="warning",
                        stage=job.stage,
                        message=f"Worker {job.lease_owner} stopped heartbeating; job queued again.",
                    )
                )
    if store is not None:
        for job_id in ended:
            try:
                with session_scope(engine) as session:
                    sweep_orphan_objects(session, store, job_id)
            except Exception as exc:  # the objects cost space, not correctness; the pass goes on
                log.warning("reconciler could not sweep the orphan objects of %s: %s", job_id, exc)
    if store is not None:
        drop_leftover_checkpoints(engine, store)
    forget = getattr(queue, "forget", None)  # only queues that remember entries (arq) have it
    if forget is not None:
        for job_id, method, generation in lost:
            try:
                forget(job_id, method=method, generation=generation)
            except Exception as exc:  # harmless if it stays: a stale delivery finds the row not queued
                log.warning("reconciler could not drop the lost queue entry of %s: %s", job_id, exc)
    with session_scope(engine) as session:
        queued = session.exec(
            select(JobRow.id, JobRow.method, JobRow.lease_token)
            .where(JobRow.status == JobStatus.queued.value)
            .order_by(col(JobRow.seq))
            .limit(ENQUEUE_PER_PASS)
        ).all()
    enqueued = 0
    for job_id, method, generation in queued:
        try:
            queue.enqueue(job_id, method=method, generation=generation)
            enqueued += 1
        except Exception as exc:  # queue down: the rows stay queued; the next pass retries
            log.warning("reconciler could not enqueue %s: %s", job_id, exc)
            break
    return {"requeued": requeued, "failed": failed, "enqueued": enqueued}


def drop_leftover_checkpoints(engine: Engine, store: ArtifactStore) -> int:
    """Drop the checkpoints a succeeded job still has: its runner was killed, or the store was down, between
    the success and the drop (service/db/artifacts.py). Returns how many jobs were finished off."""
    try:
        with session_scope(engine) as session:
            job_ids = succeeded_jobs_with_checkpoints(session)
    except Exception as exc:  # the database down: the pass goes on, the next one asks again
        log.warning("reconciler could not look for leftover checkpoints: %s", exc)
        return 0
    done = 0
    for job_id in job_ids:
        try:
            done += drop_checkpoints(engine, store, job_id)
        except Exception as exc:  # space, not correctness: try again next pass
            log.warning("reconciler could not drop the checkpoints of %s: %s", job_id, exc)
    return done


class Reconciler:
    def __init__(
        self,
        engine: Engine,
        queue: JobQueue,
        *,
        interval: float = 10.0,
        max_tries: int | None = None,
        store: ArtifactStore | None = None,
        data_dir: Path | None = None,
        staging_sweep_after: float = 900.0,
    ) -> None:
        """``data_dir``: whose staging folders each pass sweeps (``staging_sweep_after``: see
        service/staging.py); None sweeps nothing."""
        self._max_tries = max_tries
        self._data_dir = data_dir
        self._staging_sweep_after = staging_sweep_after
        self._store = store
        self._engine = engine
        self._queue = queue
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="alignd-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                reconcile_once(self._engine, self._queue, max_tries=self._max_tries, store=self._store)
            except Exception as exc:  # database down: try again next round
                log.warning("reconcile pass failed: %s", exc)
            if self._data_dir is not None:  # local files: swept even while the database is down
                try:
                    sweep_staging(self._data_dir, older_than=self._staging_sweep_after)
                except OSError as exc:
                    log.warning("staging sweep failed: %s", exc)
            self._stop.wait(self._interval)
