"""Datasets alignd writes itself (generated candidates, exported rankings): stored exactly like uploads.

One path for the API (feedback exports) and the runner (a ``generate`` job's output): the file goes through
the same rules as an upload (``service.core.datasets``), so a dataset alignd made is never one a user could
not have uploaded, then into storage under the dataset key, then into a row. Storage first, row second, and
the stored object removed if the row cannot be written, so a failure leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

from alignd.validation import ValidationReport
from sqlmodel import Session

from service.core.datasets import validate_upload
from service.core.ids import new_id, now
from service.db.tables import DatasetRow
from service.storage import ArtifactStore
from service.storage.keys import dataset_key


def add_dataset_file(
    session: Session,
    store: ArtifactStore,
    path: Path,
    *,
    tenant: str,
    kind: str,
    name: str,
    max_bytes: int,
    job_id: str | None = None,
    feedback_set_id: str | None = None,
    round: int | None = None,
) -> DatasetRow:
    """Validate ``path`` as ``kind``, store it and commit its row; raises ValidationFailed (422) for bad data."""
    with open(path, "rb", buffering=0) as handle:
        report = validate_upload(handle, kind, max_bytes=max_bytes)
    return store_validated_dataset(
        session,
        store,
        path,
        report,
        tenant=tenant,
        kind=kind,
        name=name,
        job_id=job_id,
        feedback_set_id=feedback_set_id,
        round=round,
    )


def store_validated_dataset(
    session: Session,
    store: ArtifactStore,
    path: Path,
    report: ValidationReport,
    *,
    tenant: str,
    kind: str,
    name: str,
    job_id: str | None = None,
    feedback_set_id: str | None = None,
    round: int | None = None,
) -> DatasetRow:
    """Store a file that ``report`` says is valid and commit its row (uploads validate while receiving)."""
    dataset_id = new_id("dataset")
    store.put_file(dataset_key(dataset_id), path)
    row = DatasetRow(
        id=dataset_id,
        tenant=tenant,
        name=name[:256],
        kind=kind,
        num_records=report.num_records,
        size_bytes=report.size_bytes,
        sha256=report.sha256,
        created_at=now(),
        job_id=job_id,
        feedback_set_id=feedback_set_id,
        round=round,
    )
    session.add(row)
    try:
        session.commit()
    except BaseException:
        store.delete(dataset_key(dataset_id))
        raise
    return row
