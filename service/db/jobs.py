"""Writes of a job's status: each one a compare-and-set on the row, built only for a legal move."""

from __future__ import annotations

from sqlalchemy import Update, update
from sqlmodel import col

from service.core.jobs import JobStatus, transition
from service.db.tables import JobRow


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
