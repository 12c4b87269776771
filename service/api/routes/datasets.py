"""Datasets: JSONL files validated line by line at upload (one pass: validate, hash, stage), then stored."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile

from service.api.deps import ContextDep, PageDep, SessionDep, StoreDep, TenantDep
from service.api.errors import error_responses
from service.api.schemas import DatasetPublic, ListResponse
from service.api.uploads import require_content_type
from service.core.datasets import DatasetKind, validate_and_store
from service.db.datasets import store_validated_dataset
from service.db.repository import get_owned, list_owned
from service.db.tables import DatasetRow
from service.db.usage import refuse_if_used, unfinished_jobs_using
from service.staging import open_staging, release_staging
from service.storage.keys import dataset_key

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=DatasetPublic,
    operation_id="createDataset",
    summary="Upload and validate a JSONL dataset",
    dependencies=[Depends(require_content_type("multipart/form-data"))],
    responses=error_responses(400, 413, 415, 422),
)
def create_dataset(
    ctx: ContextDep,
    session: SessionDep,
    store: StoreDep,
    tenant: TenantDep,
    file: Annotated[UploadFile, File(description="JSONL, UTF-8, one record per line.")],
    kind: Annotated[DatasetKind, Form(description="sft | preference | prompts | ranking | candidates")],
    name: Annotated[str | None, Form(max_length=256)] = None,
    round: Annotated[
        int | None, Form(ge=0, le=1_000_000, description="Feedback round this dataset belongs to.")
    ] = None,
) -> DatasetPublic:
    staging = open_staging(ctx.settings.data_dir, "upload")
    try:
        staged = staging / "data.jsonl"
        # Raises 422 invalid_dataset / empty_dataset or 413 before anything is stored.
        with open(staged, "wb") as sink:
            report = validate_and_store(file.file, kind, sink, max_bytes=ctx.settings.dataset_cap(tenant))
        row = store_validated_dataset(
            session,
            store,
            staged,
            report,
            tenant=tenant,
            kind=kind.value,
            name=name or file.filename or "dataset.jsonl",
            round=round,
        )
        return DatasetPublic.of(row)
    finally:
        release_staging(staging)


@router.get(
    "",
    response_model=ListResponse[DatasetPublic],
    operation_id="listDatasets",
    summary="List datasets",
    responses=error_responses(),
)
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    page: PageDep,
    kind: Annotated[DatasetKind | None, Query(description="Only datasets of this kind.")] = None,
    round: Annotated[
        int | None, Query(ge=0, le=1_000_000, description="Only datasets of this feedback round.")
    ] = None,
    job: Annotated[str | None, Query(description="Only datasets this job generated.")] = None,
) -> ListResponse[DatasetPublic]:
    rows, has_more = list_owned(
        session,
        DatasetRow,
        page,
        tenant,
        kind=kind.value if kind is not None else None,
        round=round,
        job_id=job,
    )
    return ListResponse(data=[DatasetPublic.of(row) for row in rows], has_more=has_more)


@router.get(
    "/{dataset_id}",
    response_model=DatasetPublic,
    operation_id="getDataset",
    summary="Get a dataset",
    responses=error_responses(404),
)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetPublic:
    return DatasetPublic.of(get_owned(session, DatasetRow, dataset_id, tenant, "dataset"))


@router.delete(
    "/{dataset_id}",
    status_code=204,
    operation_id="deleteDataset",
    summary="Delete a dataset (409 while an unfinished job uses it)",
    responses=error_responses(404, 409),
)
def delete_dataset(dataset_id: str, session: SessionDep, store: StoreDep, tenant: TenantDep) -> Response:
    row = get_owned(session, DatasetRow, dataset_id, tenant, "dataset")
    refuse_if_used("dataset", dataset_id, unfinished_jobs_using(session, tenant, dataset_id=dataset_id))
    session.delete(row)
    session.commit()
    store.delete(dataset_key(dataset_id))
    return Response(status_code=204)
