"""Which unfinished jobs use a resource: a model, dataset or artifact an unfinished job needs cannot go."""

from __future__ import annotations

from sqlmodel import Session, col, select

from service.core.errors import ConflictError
from service.core.jobs import TERMINAL_STATUSES
from service.db.tables import JobRow


def unfinished_jobs_using(
    session: Session, tenant: str, *, model_id: str | None = None, dataset_id: str | None = None
) -> list[str]:
    statement = select(JobRow).where(
        JobRow.tenant == tenant, col(JobRow.status).not_in([s.value for s in TERMINAL_STATUSES])
    )
    if model_id is not None:
        statement = statement.where(JobRow.base_model == model_id)
    jobs = session.exec(statement).all()
    if dataset_id is not None:  # a JSON column: filtered here, portably across SQLite and PostgreSQL
        jobs = [job for job in jobs if dataset_id in job.datasets.values()]
    return [job.id for job in jobs]


def refuse_if_used(kind: str, resource_id: str, job_ids: list[str]) -> None:
    if job_ids:
        raise ConflictError(
            f"{kind.capitalize()} {resource_id} is used by unfinished jobs: {', '.join(job_ids[:5])}.",
            code="in_use",
            details=[{"job": job_id} for job_id in job_ids],
        )
