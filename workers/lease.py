"""The lease on a job row and every write made under it (fencing).

The runner takes a lease (owner + fencing token + expiry) with a compare-and-set on the row; every later write
checks the token, so a runner whose lease was handed to another worker (after a long pause, say) can no longer
touch the job. Cancellation is a flag on the row, read at every heartbeat, so a cancel accepted by any API
replica reaches the process that runs the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from service.core.ids import now
from service.core.jobs import JobStatus, transition
from service.db.jobs import status_change
from service.db.session import session_scope
from service.db.tables import JobEventRow, JobMetricRow, JobRow

log = logging.getLogger(__name__)

FINAL_EVENT_TEXT = {
    JobStatus.succeeded: "Job succeeded.",
    JobStatus.cancelled: "Job cancelled.",
    JobStatus.queued: "Job released and queued again.",
}
# The job's status_reason when a monitor in stop_on ended PPO early (the job succeeds with its newest policy).
STOPPED_BY_MONITOR = "stopped_by_monitor"


class LeaseLost(Exception):
    """Another runner owns the job now (or it was reset): stop writing."""


@dataclass
class Lease:
    job_id: str
    token: int
    owner: str
    # Set by the lease keeper thread (see keep_lease), read by the relay loop.
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    pause_requested: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)


def acquire(engine: Engine, job_id: str, *, owner: str, lease_seconds: float) -> Lease | None:
    """Take the job if it is queued (compare-and-set on status). None when someone else has it."""
    with session_scope(engine) as session:
        job = session.exec(select(JobRow).where(JobRow.id == job_id)).first()
        if job is None or job.status != JobStatus.queued:
            return None
        token = job.lease_token + 1
        result = session.execute(
            status_change(job_id, JobStatus.queued, JobStatus.running)
            .where(col(JobRow.lease_token) == job.lease_token)
            .values(
                lease_owner=owner,
                lease_token=token,
                lease_expires_at=time.time() + lease_seconds,
                started_at=job.started_at or now(),
                attempts=job.attempts + 1,
                error_code=None,
                error_message=None,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
    return Lease(job_id=job_id, token=token, owner=owner)


def queued_hyperparameters(engine: Engine, job_id: str) -> dict[str, Any] | None:
    """A queued job's hyperparameters column (its resources are there), None when it is not queued."""
    with session_scope(engine) as session:
        job = session.exec(select(JobRow).where(JobRow.id == job_id)).first()
        if job is None or job.status != JobStatus.queued:
            return None
        return dict(job.hyperparameters or {})


def note_waiting(engine: Engine, job_id: str, message: str, *, prefix: str) -> None:
    """Add ``message`` to a queued job that waits (no lease: the job is not taken), unless its newest event
    already starts with ``prefix``: a job passed over again and again says so once."""
    with session_scope(engine) as session:
        job = session.exec(select(JobRow).where(JobRow.id == job_id)).first()
        if job is None or job.status != JobStatus.queued:
            return
        newest = session.exec(
            select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(col(JobEventRow.seq).desc())
        ).first()
        if newest is not None and newest.message.startswith(prefix):
            return
        session.add(JobEventRow(job_id=job_id, created_at=now(), level="warning", message=message))


def fenced(session: Any, lease: Lease) -> JobRow:
    """The job's row, locked, if ``lease`` still holds it; raises LeaseLost otherwise."""
    job = session.exec(select(JobRow).where(JobRow.id == lease.job_id).with_for_update()).first()
    if job is None or job.lease_token != lease.token or job.status != JobStatus.running:
        raise LeaseLost(lease.job_id)
    return job


def fenced_job(engine: Engine, lease: Lease) -> JobRow:
    """A detached copy of the job's row (expire_on_commit is off), read under the fence."""
    with session_scope(engine) as session:
        return fenced(session, lease)


def heartbeat(engine: Engine, lease: Lease, *, lease_seconds: float) -> bool:
    """Extend the lease; returns whether a cancel was requested (and sets ``lease.pause_requested`` when a
    pause was). Raises LeaseLost."""
    with session_scope(engine) as session:
        job = fenced(session, lease)
        job.lease_expires_at = time.time() + lease_seconds
        session.add(job)
        if job.pause_requested:
            lease.pause_requested.set()
        return job.cancel_requested


def keep_lease(
    beat: Callable[[Lease], bool], lease: Lease, stop: threading.Event, *, every_seconds: float
) -> None:
    """Call ``beat`` (a heartbeat) every ``every_seconds`` from its own thread, for the whole attempt.

    A thread of its own, because the relay loop is not the only long step: downloading a base model,
    uploading an artifact or a checkpoint can each outlast the lease, and a lease that lapses meanwhile
    hands a healthy job to another worker.
    """
    while not stop.wait(every_seconds):
        try:
            if beat(lease):
                lease.cancel_requested.set()
        except LeaseLost:
            lease.lost.set()
            return
        except Exception as exc:  # a database blip: the lease has slack, try again next beat
            log.warning("heartbeat for %s failed: %s", lease.job_id, exc)


def add_event(
    engine: Engine, lease: Lease, message: str, *, level: str = "info", stage: str | None = None
) -> None:
    with session_scope(engine) as session:
        job = fenced(session, lease)
        session.add(
            JobEventRow(
                job_id=lease.job_id, created_at=now(), level=level, stage=stage or job.stage, message=message
            )
        )


def add_metrics(
    engine: Engine, lease: Lease, values: dict[str, Any], *, step: Any, stage: str | None
) -> None:
    """One metric row per value of a ``metric`` message (``step`` as the child sent it)."""
    with session_scope(engine) as session:
        job = fenced(session, lease)
        created = now()
        for name, value in values.items():
            session.add(
                JobMetricRow(
                    job_id=lease.job_id,
                    stage=stage or job.stage,
                    step=int(step),
                    name=str(name)[:64],
                    value=float(value),
                    created_at=created,
                )
            )


def add_monitor(engine: Engine, lease: Lease, message: Mapping[str, Any], *, stage: str | None) -> None:
    """A ``monitor`` message: a warning event and an entry in the job's ``monitors``; one that stops the job
    sets its ``status_reason``. One entry per (stage, monitor, update): a resumed attempt that fires the same
    monitor at the same update again replaces it."""
    with session_scope(engine) as session:
        job = fenced(session, lease)
        entry: dict[str, Any] = {
            "stage": stage or job.stage,
            "name": str(message.get("name", "")),
            "step": int(message.get("step", 0)),
            "value": float(message.get("value", 0.0)),
            "threshold": float(message.get("threshold", 0.0)),
            "message": str(message.get("message", "")),
            "stop": bool(message.get("stop", False)),
        }
        key = (entry["stage"], entry["name"], entry["step"])
        kept = [m for m in job.monitors if (m.get("stage"), m.get("name"), m.get("step")) != key]
        job.monitors = [*kept, entry]  # a new list: the JSON column is saved on assignment
        if entry["stop"]:
            job.status_reason = STOPPED_BY_MONITOR
        session.add(job)
        session.add(
            JobEventRow(
                job_id=lease.job_id,
                created_at=now(),
                level="warning",
                stage=entry["stage"],
                message=entry["message"],
            )
        )


def _succeeded_text(job: JobRow) -> str:
    stop = next((m for m in reversed(job.monitors) if m.get("stop")), None)
    if job.status_reason != STOPPED_BY_MONITOR or stop is None:
        return FINAL_EVENT_TEXT[JobStatus.succeeded]
    return (
        f"Job succeeded: stopped early by monitor {stop['name']} at update {stop['step']} (stop_on); the "
        "newest policy is the output."
    )


def set_progress(engine: Engine, lease: Lease, message: Mapping[str, Any], *, stage: str | None) -> None:
    """Record a progress message's value (the row keeps its own when it has none) and, when given, its stage."""
    with session_scope(engine) as session:
        job = fenced(session, lease)
        job.progress = float(message.get("progress", job.progress))
        if stage:
            job.stage = stage
        session.add(job)


def attempts(engine: Engine, lease: Lease) -> int:
    with session_scope(engine) as session:
        return int(fenced(session, lease).attempts)


def end(engine: Engine, lease: Lease, status: JobStatus, *, error: tuple[str, str] | None = None) -> None:
    """Write the job's final status (and error), give up the lease, and say so in an event."""
    with session_scope(engine) as session:
        job = fenced(session, lease)
        job.status = transition(job.status, status)
        job.finished_at = now()
        job.lease_owner = None
        job.lease_expires_at = None
        if status is JobStatus.succeeded:
            job.progress = 1.0
        else:
            job.status_reason = None  # a monitor's early stop explains a success only
        if error is not None:
            job.error_code, job.error_message = error
        session.add(job)
        if status is JobStatus.failed:
            text = f"Job failed: {error[1] if error else 'unknown error'}"
        elif status is JobStatus.succeeded:
            text = _succeeded_text(job)
        else:
            text = FINAL_EVENT_TEXT[status]
        level = "error" if status is JobStatus.failed else "info"
        session.add(
            JobEventRow(job_id=lease.job_id, created_at=now(), level=level, stage=job.stage, message=text)
        )


def _hand_back(session: Any, job: JobRow, status: JobStatus, message: str, *, level: str) -> None:
    """The runner lets go of a job it leased (queued again, or paused): no owner, no expiry, one event."""
    job.status = transition(job.status, status)
    job.lease_owner = None
    job.lease_expires_at = None
    session.add(job)
    session.add(JobEventRow(job_id=job.id, created_at=now(), level=level, stage=job.stage, message=message))


def pause(engine: Engine, lease: Lease) -> JobStatus:
    """The child stopped for a pause: the job becomes `paused` (no lease, checkpoints kept). If the pause was
    withdrawn (resume) while the child was stopping, the job goes back to the queue instead and continues."""
    with session_scope(engine) as session:
        job = fenced(session, lease)
        status = JobStatus.paused if job.pause_requested else JobStatus.queued
        job.pause_requested = False
        text = (
            "Job paused; resume continues from its newest checkpoint."
            if status is JobStatus.paused
            else "Pause withdrawn while the training process was stopping: queued again to continue."
        )
        _hand_back(session, job, status, text, level="info")
        return status


def release(engine: Engine, lease: Lease, reason: str) -> None:
    """Give a running job back to the queue (worker shutting down): it will run again, resuming."""
    with session_scope(engine) as session:
        _hand_back(session, fenced(session, lease), JobStatus.queued, reason, level="warning")
