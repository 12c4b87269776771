"""OpenAI facade, files: ``/openai/v1/files`` as OpenAI's Files API answers it, for ``purpose=fine-tune``.

A file is stored as sent: OpenAI's files have no kind, so it is read (converted and checked by alignd's
dataset rules) only when a job uses it, in the format of that job's method (service/db/openai.py).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from service.api.deps import ContextDep, Page, SessionDep, StoreDep, TenantDep
from service.api.openai_errors import openai_error_responses
from service.api.openai_schemas import OpenAIFile, OpenAIFileDeleted, OpenAIList
from service.api.uploads import require_content_type
from service.core.errors import NotFoundError, PayloadTooLargeError, ValidationFailed
from service.db.openai import delete_file, list_files, store_file
from service.db.repository import get_owned
from service.db.tables import OpenAIFileRow
from service.staging import open_staging, release_staging
from service.storage.keys import openai_file_key

router = APIRouter(prefix="/openai/v1/files", tags=["openai"])

_CHUNK = 1 << 20


def _public(row: OpenAIFileRow) -> OpenAIFile:
    return OpenAIFile(id=row.id, bytes=row.size_bytes, created_at=row.created_at, filename=row.filename)


def _refuse_unsupported(purpose: str, expires_after: str | None) -> None:
    if purpose != "fine-tune":
        raise ValidationFailed(
            f"purpose {purpose!r} is not served: alignd's OpenAI facade stores files for fine-tuning only "
            "(purpose 'fine-tune').",
            code="unsupported_purpose",
            details=[{"field": "purpose", "code": "unsupported_purpose", "message": purpose}],
        )
    if expires_after is not None:
        raise ValidationFailed(
            "expires_after is not supported: alignd keeps a file until it is deleted.",
            code="unsupported_parameter",
            details=[{"field": "expires_after", "code": "unsupported_parameter", "message": "not supported"}],
        )


@router.post(
    "",
    response_model=OpenAIFile,
    operation_id="openaiCreateFile",
    summary="Upload a fine-tuning file (OpenAI's Files API; JSONL, read when a job uses it)",
    dependencies=[Depends(require_content_type("multipart/form-data"))],
    responses=openai_error_responses(413, 415),
)
def create_file(
    ctx: ContextDep,
    session: SessionDep,
    store: StoreDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="JSONL in the format of the method that will use it.")],
    purpose: Annotated[str, Form(max_length=64, description="'fine-tune' (the only purpose served).")],
    expires_after: Annotated[
        str | None,
        Form(alias="expires_after[anchor]", max_length=64, description="Refused: files do not expire."),
    ] = None,
) -> OpenAIFile:
    _refuse_unsupported(purpose, expires_after)
    cap = ctx.settings.dataset_cap(tenant)
    staging = open_staging(ctx.settings.data_dir, "openai")
    try:
        staged = staging / "upload.jsonl"
        digest = hashlib.sha256()
        size = 0
        with open(staged, "wb") as sink:
            while chunk := file.file.read(_CHUNK):
                size += len(chunk)
                if size > cap:
                    raise PayloadTooLargeError(
                        f"The file is larger than the limit of {cap} bytes.",
                        code="file_too_large",
                        details=[{"field": "file", "max_bytes": cap}],
                    )
                digest.update(chunk)
                sink.write(chunk)
        row = store_file(
            session,
            store,
            staged,
            tenant=tenant,
            filename=file.filename or "file.jsonl",
            sha256=digest.hexdigest(),
        )
        return _public(row)
    finally:
        release_staging(staging)


@router.get(
    "",
    response_model=OpenAIList[OpenAIFile],
    operation_id="openaiListFiles",
    summary="List files (OpenAI's cursor page; newest first unless order=asc)",
    responses=openai_error_responses(),
)
def list_openai_files(
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="A file id: the page after it.")] = None,
    limit: Annotated[
        int, Query(ge=1, le=10_000, description="Page size (OpenAI's default 10,000).")
    ] = 10_000,
    order: Annotated[Literal["asc", "desc"], Query(description="By creation time.")] = "desc",
    purpose: Annotated[str | None, Query(description="Only this purpose (all are 'fine-tune').")] = None,
) -> OpenAIList[OpenAIFile]:
    if purpose is not None and purpose != "fine-tune":
        return OpenAIList[OpenAIFile](data=[])
    rows, has_more = list_files(session, tenant, Page(limit=limit, after=after), ascending=order == "asc")
    return OpenAIList[OpenAIFile].page([_public(row) for row in rows], has_more)


@router.get(
    "/{file_id}",
    response_model=OpenAIFile,
    operation_id="openaiRetrieveFile",
    summary="Get a file",
    responses=openai_error_responses(404),
)
def retrieve_file(file_id: str, session: SessionDep, tenant: TenantDep) -> OpenAIFile:
    return _public(get_owned(session, OpenAIFileRow, file_id, tenant, "file"))


@router.get(
    "/{file_id}/content",
    operation_id="openaiFileContent",
    summary="Download a file's bytes as uploaded",
    response_class=StreamingResponse,
    response_model=None,
    responses={
        **openai_error_responses(404),
        200: {"description": "The file as uploaded.", "content": {"application/octet-stream": {}}},
    },
)
def file_content(file_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> StreamingResponse:
    row = get_owned(session, OpenAIFileRow, file_id, tenant, "file")
    try:
        chunks = store.iter_chunks(openai_file_key(row.id))
    except KeyError:
        raise NotFoundError(
            f"The content of file {file_id} is missing from storage.", code="content_missing"
        ) from None
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"Content-Length": str(row.size_bytes), "X-Content-SHA256": row.sha256},
    )


@router.delete(
    "/{file_id}",
    response_model=OpenAIFileDeleted,
    operation_id="openaiDeleteFile",
    summary="Delete a file (and the datasets made from it that no unfinished job uses)",
    responses=openai_error_responses(404),
)
def delete_openai_file(
    file_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep
) -> OpenAIFileDeleted:
    delete_file(session, store, get_owned(session, OpenAIFileRow, file_id, tenant, "file"))
    return OpenAIFileDeleted(id=file_id)
