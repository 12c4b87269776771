"""Writes of a job's status (each one a compare-and-set on the row, built only for a legal move), and the
queries submission and cancellation share."""

from __future__ import annotations

from sqlalchemy import Update, update
from sqlmodel import Session, col, func, select

from service.core.ids import now
from service.core.jobs import JobStatus, transition
from service.core.submission import Lookup, ResourceInfo
from service.db.tables import ArtifactRow, DatasetRow, JobEventRow, JobRow, ModelRow


def status_change(job_id: str, current: JobStatus, new: JobStatus) -> Update:
    """``UPDATE jobs SET status = new WHERE id = job_id AND status = current``; chain ``.where()`` (a lease
    token, say) and ``.values()`` (the other columns) onto it. A rowcount of 0 means the row had moved on.

    Raises ``IllegalTransition`` before touching the database when ``current -> new`` is not allowed.
    """
    return (
        update(JobRow)
        .where(col(JobRow.id) == job_id, col(JobRow.status) == current.value)
        .values(status=transition(current, new).value)
    )


def queued_jobs(session: Session, tenant: str) -> int:
    """How many of the tenant's jobs wait in the queue (the per-tenant cap counts them)."""
    return session.exec(
        select(func.count())
        .select_from(JobRow)
        .where(JobRow.tenant == tenant, JobRow.status == JobStatus.queued)
    ).one()


def resource_lookup(session: Session, tenant: str) -> Lookup:
    """What the submission rules ask about a referenced model, dataset or artifact of the tenant."""

    def lookup(resource: str, resource_id: str) -> ResourceInfo | None:
        if resource == "model":
            model = session.exec(
                select(ModelRow.id).where(ModelRow.id == resource_id, ModelRow.tenant == tenant)
            ).first()
            return ResourceInfo(kind=None) if model else None
        if resource == "dataset":
            kind = session.exec(
                select(DatasetRow.kind).where(DatasetRow.id == resource_id, DatasetRow.tenant == tenant)
            ).first()
            return ResourceInfo(kind=kind) if kind else None
        artifact = session.exec(
            select(ArtifactRow.kind, ArtifactRow.meta).where(
                ArtifactRow.id == resource_id, ArtifactRow.tenant == tenant
            )
        ).first()
        return ResourceInfo(kind=artifact[0], metadata=artifact[1] or {}) if artifact else None

    return lookup


def request_cancel(session: Session, job: JobRow) -> None:
    """Cancel an unfinished job and commit: a queued one at once, a running one by flagging it (the runner
    that holds the lease stops the child: SIGTERM, then SIGKILL). The caller checked it is unfinished."""
    # Queued or paused: cancel outright (compare-and-set, in case a worker takes it this instant).
    cancelled = any(
        session.execute(
            status_change(job.id, waiting, JobStatus.cancelled).values(
                cancel_requested=True, finished_at=now()
            )
        ).rowcount  # type: ignore[attr-defined]
        == 1
        for waiting in (JobStatus.queued, JobStatus.paused)
    )
    if cancelled:
        session.add(JobEventRow(job_id=job.id, created_at=now(), level="info", message="Job cancelled."))
    else:
        session.execute(update(JobRow).where(col(JobRow.id) == job.id).values(cancel_requested=True))
        session.add(
            JobEventRow(
                job_id=job.id, created_at=now(), level="info", message="Cancel requested.", stage=job.stage
            )
        )
    session.commit()
    session.refresh(job)


def _event(job: JobRow, message: str) -> JobEventRow:
    return JobEventRow(job_id=job.id, created_at=now(), level="info", message=message, stage=job.stage)


def request_pause(session: Session, job: JobRow) -> None:
    """Pause an unfinished job and commit: a queued one at once, a running one by flagging it (the runner
    stops its child at the next step boundary, a checkpoint first, and marks it paused). A paused job, or a
    running one already flagged, is left as it is: pausing twice is one pause."""
    # Queued: paused outright. The generation (lease token) moves on so that a resume enqueues an entry of
    # its own: a queue that remembers the old entry (arq keeps results) would drop a second one of the same id.
    result = session.execute(
        status_change(job.id, JobStatus.queued, JobStatus.paused).values(
            pause_requested=False, lease_token=col(JobRow.lease_token) + 1
        )
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        session.add(_event(job, "Job paused before it started."))
    elif job.status == JobStatus.running and not job.pause_requested:
        flagged = session.execute(
            update(JobRow)
            .where(col(JobRow.id) == job.id, col(JobRow.status) == JobStatus.running.value)
            .values(pause_requested=True)
        )
        if flagged.rowcount == 1:  # type: ignore[attr-defined]
            session.add(
                _event(job, "Pause requested: training stops at the next step, after saving a checkpoint.")
            )
    session.commit()
    session.refresh(job)


def resume(session: Session, job: JobRow) -> bool:
    """Resume a paused job (back to `queued`; it continues from its newest checkpoint) or withdraw a pause
    the runner has not acted on yet, and commit. Returns whether the job needs enqueueing."""
    result = session.execute(
        status_change(job.id, JobStatus.paused, JobStatus.queued).values(pause_requested=False)
    )
    requeued = result.rowcount == 1  # type: ignore[attr-defined]
    if requeued:
        session.add(_event(job, "Job resumed: queued to continue from its newest checkpoint."))
    elif job.status == JobStatus.running and job.pause_requested:
        session.execute(
            update(JobRow)
            .where(col(JobRow.id) == job.id, col(JobRow.status) == JobStatus.running.value)
            .values(pause_requested=False)
        )
        session.add(_event(job, "Pause withdrawn before it took effect."))
    session.commit()
    session.refresh(job)
    return requeued
