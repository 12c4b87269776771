"""Artifact objects against artifact rows: the row is the truth, an object without one is an orphan.

A worker writes an artifact in two steps, the object and then its row (fenced by the job's lease), and
deletes checkpoints the other way round, row and then object. A worker killed between the two steps leaves
an object no row points to: never listed, never served, but paid for. Objects live under their job's prefix
(``artifacts/<job_id>/``), so the orphans of a job are found by listing one folder and comparing.
"""

from __future__ import annotations

import logging

from sqlmodel import Session, select

from service.db.tables import ArtifactRow
from service.storage.base import ArtifactStore
from service.storage.keys import job_artifact_prefix

log = logging.getLogger(__name__)


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
