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
    # Queued: cancel outright (compare-and-set, in case a worker takes it this instant).
    result = session.execute(
        status_change(job.id, JobStatus.queued, JobStatus.cancelled).values(
            cancel_requested=True, finished_at=now()
        )
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
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
