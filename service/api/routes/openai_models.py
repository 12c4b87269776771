"""OpenAI facade, models: ``/openai/v1/models`` lists the tenant's base models (their alignd ids, which a job's
``model`` takes) and the fine-tuned models its facade jobs made (``ft:<base>:<suffix>:<job id>``)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlmodel import col, select

from service.api.deps import SessionDep, TenantDep
from service.api.openai_errors import openai_error_responses
from service.api.openai_schemas import OpenAIList, OpenAIModel
from service.core.errors import NotFoundError
from service.core.jobs import JobStatus
from service.db import openai as db
from service.db.repository import find_owned
from service.db.tables import JobRow, ModelRow, OpenAIJobRow

router = APIRouter(prefix="/openai/v1/models", tags=["openai"])


def _fine_tuned(facade: OpenAIJobRow, job: JobRow) -> OpenAIModel:
    return OpenAIModel(
        id=facade.fine_tuned_model, created=job.finished_at or job.created_at, owned_by=job.tenant
    )


@router.get(
    "",
    response_model=OpenAIList[OpenAIModel],
    operation_id="openaiListModels",
    summary="List base models and fine-tuned models",
    responses=openai_error_responses(),
)
def list_models(session: SessionDep, tenant: TenantDep) -> OpenAIList[OpenAIModel]:
    bases = session.exec(select(ModelRow).where(ModelRow.tenant == tenant).order_by(col(ModelRow.seq))).all()
    data = [OpenAIModel(id=row.id, created=row.created_at, owned_by=tenant) for row in bases]
    data += [_fine_tuned(facade, job) for facade, job in db.succeeded_fine_tunes(session, tenant)]
    return OpenAIList[OpenAIModel](data=data)


@router.get(
    "/{model:path}",
    response_model=OpenAIModel,
    operation_id="openaiRetrieveModel",
    summary="Get a base model (by id) or a fine-tuned model (by its ft:... name)",
    responses=openai_error_responses(404),
)
def retrieve_model(model: str, session: SessionDep, tenant: TenantDep) -> OpenAIModel:
    base = find_owned(session, ModelRow, model, tenant)
    if base is not None:
        return OpenAIModel(id=base.id, created=base.created_at, owned_by=tenant)
    facade = db.fine_tuned(session, tenant, model)
    job = find_owned(session, JobRow, facade.id, tenant) if facade is not None else None
    if facade is None or job is None or job.status != JobStatus.succeeded:
        raise NotFoundError(f"No model '{model}'.", code="model_not_found")
    return _fine_tuned(facade, job)
