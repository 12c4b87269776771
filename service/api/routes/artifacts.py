"""Artifacts: metadata, and the .tar.gz content (streamed, or a 307 to a presigned URL)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlmodel import col, select

from service.api.deps import ContextDep, PageDep, SessionDep, StoreDep, TenantDep
from service.api.errors import error_responses
from service.api.schemas import ArtifactPublic, ListResponse
from service.core.errors import NotFoundError
from service.core.jobs import JobStatus
from service.db.artifacts import CHECKPOINT_KIND
from service.db.repository import get_owned, list_owned
from service.db.tables import ArtifactRow, JobRow

router = APIRouter(tags=["artifacts"])


@router.get(
    "/v1/jobs/{job_id}/artifacts",
    response_model=ListResponse[ArtifactPublic],
    operation_id="listJobArtifacts",
    summary="List a job's artifacts, oldest first",
    responses=error_responses(404),
)
def list_job_artifacts(
    job_id: str, session: SessionDep, tenant: TenantDep, page: PageDep
) -> ListResponse[ArtifactPublic]:
    job = get_owned(session, JobRow, job_id, tenant, "job")
    statement = select(ArtifactRow).where(ArtifactRow.job_id == job_id, ArtifactRow.tenant == tenant)
    if job.status == JobStatus.succeeded.value:
        # Being deleted, by its runner right after the success or by the reconciler (db/artifacts.py).
        statement = statement.where(ArtifactRow.kind != CHECKPOINT_KIND)
    if page.after is not None:
        cursor = get_owned(session, ArtifactRow, page.after, tenant, "artifact")
        statement = statement.where(col(ArtifactRow.seq) > cursor.seq)
    rows = list(session.exec(statement.order_by(col(ArtifactRow.seq)).limit(page.limit + 1)).all())
    return ListResponse(
        data=[ArtifactPublic.of(r) for r in rows[: page.limit]], has_more=len(rows) > page.limit
    )


@router.get(
    "/v1/artifacts",
    response_model=ListResponse[ArtifactPublic],
    operation_id="listArtifacts",
    summary="List all artifacts, newest first",
    responses=error_responses(),
)
def list_artifacts(session: SessionDep, tenant: TenantDep, page: PageDep) -> ListResponse[ArtifactPublic]:
    rows, has_more = list_owned(session, ArtifactRow, page, tenant)
    return ListResponse(data=[ArtifactPublic.of(r) for r in rows], has_more=has_more)


@router.get(
    "/v1/artifacts/{artifact_id}",
    response_model=ArtifactPublic,
    operation_id="getArtifact",
    summary="Get an artifact",
    responses=error_responses(404),
)
def get_artifact(artifact_id: str, session: SessionDep, tenant: TenantDep) -> ArtifactPublic:
    return ArtifactPublic.of(get_owned(session, ArtifactRow, artifact_id, tenant, "artifact"))


@router.get(
    "/v1/artifacts/{artifact_id}/content",
    operation_id="downloadArtifact",
    summary="Download an artifact as .tar.gz (files at the archive root)",
    response_class=StreamingResponse,
    response_model=None,
    responses={
        **error_responses(404),
        200: {"description": "The .tar.gz bytes.", "content": {"application/gzip": {}}},
        307: {"description": "Redirect to a presigned storage URL (when enabled)."},
    },
)
def download_artifact(
    artifact_id: str, ctx: ContextDep, session: SessionDep, store: StoreDep, tenant: TenantDep
) -> StreamingResponse | RedirectResponse:
    row = get_owned(session, ArtifactRow, artifact_id, tenant, "artifact")
    if ctx.settings.s3_presign:
        url = store.presigned_url(row.storage_key)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    try:
        chunks = store.iter_chunks(row.storage_key)
    except KeyError:
        raise NotFoundError(
            f"The content of artifact {artifact_id} is missing from storage.", code="content_missing"
        ) from None
    return StreamingResponse(
        chunks,
        media_type="application/gzip",
        headers={
            "Content-Length": str(row.size_bytes),
            "Content-Disposition": f'attachment; filename="{artifact_id}.tar.gz"',
            "ETag": f'"{row.sha256}"',
            "X-Content-SHA256": row.sha256,
        },
    )
