"""OpenAI facade, graders: ``/openai/v1/fine_tuning/alpha/graders/validate`` and ``/run``, alignd's grader dry
run (service/core/graders.py) answered in OpenAI's shapes. The requests are alignd's own (a superset of
OpenAI's: ``model_sample`` may also be alignd's sample object)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from contract.graders import dump_grader
from service.api.deps import TenantDep
from service.api.openai_errors import openai_error_responses
from service.api.openai_schemas import (
    OpenAIGraderRunErrors,
    OpenAIGraderRunMetadata,
    OpenAIGraderRunResult,
    OpenAIGraderValidateResult,
)
from service.api.routes.graders import GraderRunRequest, GraderValidateRequest
from service.api.uploads import require_content_type
from service.core import graders as core
from service.core.openai_graders import error_flags

router = APIRouter(prefix="/openai/v1/fine_tuning/alpha/graders", tags=["openai"])


@router.post(
    "/validate",
    response_model=OpenAIGraderValidateResult,
    operation_id="openaiValidateGrader",
    summary="Validate a grader (OpenAI's grader JSON or any alignd kind); the spec with defaults filled in",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=openai_error_responses(415),
)
def validate_grader(body: GraderValidateRequest, tenant: TenantDep) -> OpenAIGraderValidateResult:
    return OpenAIGraderValidateResult(grader=dump_grader(core.validate_grader(body.grader)))


@router.post(
    "/run",
    response_model=OpenAIGraderRunResult,
    operation_id="openaiRunGrader",
    summary="Grade one sample without a job (rule graders only)",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=openai_error_responses(415),
)
def run_grader(body: GraderRunRequest, tenant: TenantDep) -> OpenAIGraderRunResult:
    result, seconds = core.dry_run(body.grader, body.model_sample, body.item)
    errors = list(result.metadata["errors"])
    metadata = OpenAIGraderRunMetadata(
        name=result.metadata["name"],
        type=result.metadata["type"],
        errors=OpenAIGraderRunErrors(**error_flags(errors)),
        error_details=errors,
        execution_time=seconds,
        scores=result.metadata["scores"],
    )
    return OpenAIGraderRunResult(reward=result.reward, metadata=metadata, sub_rewards=metadata.scores)
