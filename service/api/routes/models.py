"""Base models: Hugging Face folders (config, safetensors, tokenizer) uploaded as multipart file parts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile

from service.api.deps import ContextDep, PageDep, SessionDep, StoreDep, TenantDep
from service.api.errors import error_responses
from service.api.schemas import ListResponse, ModelPublic
from service.api.uploads import require_content_type
from service.core.errors import ValidationFailed
from service.core.ids import new_id, now
from service.core.models import check_model_files
from service.db.repository import get_owned, list_owned
from service.db.tables import ModelRow
from service.db.usage import refuse_if_used, unfinished_jobs_using
from service.staging import open_staging, release_staging
from service.storage.keys import model_key, model_prefix

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post(
    "",
    status_code=201,
    response_model=ModelPublic,
    operation_id="createModel",
    summary="Upload a base model folder",
    dependencies=[Depends(require_content_type("multipart/form-data"))],
    responses=error_responses(400, 413, 415, 422),
)
def create_model(
    ctx: ContextDep,
    session: SessionDep,
    store: StoreDep,
    tenant: TenantDep,
    name: Annotated[str, Form(min_length=1, max_length=256, description="Display name.")],
    files: Annotated[list[UploadFile], File(description="The folder's files; filenames without slashes.")],
) -> ModelPublic:
    staging = open_staging(ctx.settings.data_dir, "upload")
    try:
        staged: list[tuple[str, Path]] = []
        seen: set[str] = set()
        for index, upload in enumerate(files):
            filename = upload.filename or ""
            if filename in seen:
                raise ValidationFailed(f"File '{filename}' was sent twice.", code="duplicate_file")
            seen.add(filename)
            path = staging / f"part-{index}"  # never trust the client's name as a path
            with open(path, "wb") as handle:
                shutil.copyfileobj(upload.file, handle, 1 << 20)
            staged.append((filename, path))
        info = check_model_files(staged)
        model_id = new_id("model")
        stored: list[str] = []
        try:
            for filename, path in staged:
                store.put_file(model_key(model_id, filename), path)
                stored.append(filename)
        except BaseException:
            store.delete_prefix(model_prefix(model_id))
            raise
        row = ModelRow(
            id=model_id,
            tenant=tenant,
            name=name,
            architecture=info.architecture,
            num_parameters=info.num_parameters,
            size_bytes=info.size_bytes,
            files=stored,
            created_at=now(),
        )
        session.add(row)
        try:
            session.commit()
        except BaseException:
            store.delete_prefix(model_prefix(model_id))
            raise
        return ModelPublic.of(row)
    finally:
        release_staging(staging)


@router.get(
    "",
    response_model=ListResponse[ModelPublic],
    operation_id="listModels",
    summary="List models",
    responses=error_responses(),
)
def list_models(session: SessionDep, tenant: TenantDep, page: PageDep) -> ListResponse[ModelPublic]:
    rows, has_more = list_owned(session, ModelRow, page, tenant)
    return ListResponse(data=[ModelPublic.of(row) for row in rows], has_more=has_more)


@router.get(
    "/{model_id}",
    response_model=ModelPublic,
    operation_id="getModel",
    summary="Get a model",
    responses=error_responses(404),
)
def get_model(model_id: str, session: SessionDep, tenant: TenantDep) -> ModelPublic:
    return ModelPublic.of(get_owned(session, ModelRow, model_id, tenant, "model"))


@router.delete(
    "/{model_id}",
    status_code=204,
    operation_id="deleteModel",
    summary="Delete a model (409 while an unfinished job uses it)",
    responses=error_responses(404, 409),
)
def delete_model(model_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> Response:
    row = get_owned(session, ModelRow, model_id, tenant, "model")
    refuse_if_used("model", model_id, unfinished_jobs_using(session, tenant, model_id=model_id))
    session.delete(row)
    session.commit()
    store.delete_prefix(model_prefix(model_id))
    return Response(status_code=204)
