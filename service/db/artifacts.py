"""Artifact objects against artifact rows: the row is the truth, an object without one is an orphan.

A worker writes an artifact in two steps, the object and then its row (fenced by the job's lease). Checkpoints
are deleted row and then object while a job runs (the prune keeps the newest), object and then row once it has
succeeded (:func:`drop_checkpoints`). A worker killed between the two steps leaves
an object no row points to: never listed, never served, but paid for. Objects live under their job's prefix
(``artifacts/<job_id>/``), so the orphans of a job are found by listing one folder and comparing.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, delete
from sqlmodel import Session, col, select

from service.core.jobs import JobStatus
from service.db.session import session_scope
from service.db.tables import ArtifactRow, JobRow
from service.storage.base import ArtifactStore
from service.storage.keys import job_artifact_prefix

log = logging.getLogger(__name__)
CHECKPOINT_KIND = "checkpoint"


def sweep_orphan_objects(session: Session, store: ArtifactStore, job_id: str) -> list[str]:
    """Delete the objects under the job's prefix that no artifact row references; returns their keys.

    Call it only where no legitimate writer of this job can be between its two steps: inside the session
    that holds the job's lease (row locked, fence checked: nobody else can take the job meanwhile), or
    once the job has ended (a fenced-out writer deletes its own object when its row insert is refused).
    The store is listed before the rows are read, so an object whose row commits in between is kept.
    """
    listed = store.list_keys(job_artifact_prefix(job_id))
    if not listed:
        return []
    referenced = set(session.exec(select(ArtifactRow.storage_key).where(ArtifactRow.job_id == job_id)).all())
    orphans = [key for key in listed if key not in referenced]
    for key in orphans:
        store.delete(key)
    if orphans:
        log.info("swept %d orphan artifact object(s) of job %s: %s", len(orphans), job_id, orphans)
    return orphans


def drop_checkpoints(engine: Engine, store: ArtifactStore, job_id: str) -> bool:
    """Delete the checkpoints of a succeeded job (nothing resumes it), each object and then its row; True when
    every one went.

    Called after the job is marked succeeded, by its runner and, for what a killed or cut-off runner left, by
    the reconciler (:func:`succeeded_jobs_with_checkpoints`). Before success, a runner killed between the drop
    and the status write left a job that was neither succeeded nor resumable: its retry trained from step 0.
    Objects go first, so an interruption leaves rows whose object is gone (the next drop deletes them), never
    an object without a row. Meanwhile the job's artifact list leaves them out (api/routes/artifacts.py).
    """
    with session_scope(engine) as session:
        rows = session.exec(
            select(ArtifactRow.id, ArtifactRow.storage_key).where(
                ArtifactRow.job_id == job_id, ArtifactRow.kind == CHECKPOINT_KIND
            )
        ).all()
    gone: list[str] = []
    for artifact_id, key in rows:
        try:
            store.delete(key)
        except Exception as exc:  # the store down: the row stays, and the reconciler tries again
            log.warning("could not delete checkpoint object %s of %s: %s", key, job_id, exc)
            continue
        gone.append(artifact_id)
    if gone:
        with session_scope(engine) as session:
            session.execute(delete(ArtifactRow).where(col(ArtifactRow.id).in_(gone)))
    return len(gone) == len(rows)


def succeeded_jobs_with_checkpoints(session: Session, limit: int = 100) -> list[str]:
    """Ids of succeeded jobs that still have checkpoint rows (a runner stopped before dropping them)."""
    statement = (
        select(ArtifactRow.job_id)
        .join(JobRow, col(JobRow.id) == col(ArtifactRow.job_id))
        .where(ArtifactRow.kind == CHECKPOINT_KIND, JobRow.status == JobStatus.succeeded.value)
        .distinct()
        .limit(limit)
    )
    return list(session.exec(statement).all())
