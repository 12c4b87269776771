"""Graders without a job: ``POST /v1/graders/run`` (OpenAI's dry run) and ``POST /v1/graders/validate``.

The grader arrives as a plain JSON object and is validated by ``service/core/graders.py``, not by FastAPI, so
its refusals carry alignd's codes and field paths (``grader.graders.exact.reference``) rather than pydantic's
union bookkeeping. docs/graders.md documents every kind.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from contract.graders import GRADER_KINDS, Sample, dump_grader, item_fields, model_backed
from contract.inputs import InputModel
from service.api.deps import TenantDep
from service.api.errors import error_responses
from service.api.uploads import require_content_type
from service.core import graders as core

router = APIRouter(prefix="/v1/graders", tags=["graders"])

GRADER_DESCRIPTION = (
    "A grader spec: a JSON object whose 'type' is one of " + ", ".join(GRADER_KINDS) + " (docs/graders.md). "
    "'python' is refused: alignd never runs user code."
)


class GraderRunRequest(InputModel):
    grader: dict[str, Any] = Field(description=GRADER_DESCRIPTION)
    model_sample: str | Sample = Field(
        description="The output to grade: a string (as OpenAI sends it) or the sample object, which adds "
        "finish_reason and output_tokens. sample.output_json is output_text parsed as JSON."
    )
    item: dict[str, Any] = Field(default_factory=dict, description="The dataset row: the item namespace.")


class GraderError(BaseModel):
    grader: str = Field(description="The grader's name; inside a multi, the dotted path to the sub-grader.")
    code: str
    message: str


class GraderRunMetadata(BaseModel):
    name: str
    type: str
    errors: list[GraderError] = Field(description="Why a grader scored 0 without judging (missing field...).")
    scores: dict[str, float] = Field(description="A multi grader's sub-graders' rewards by name.")
    details: dict[str, Any] = Field(description="What the grader measured (matched text, parsed numbers...).")
    execution_time: float = Field(description="Seconds spent grading.")


class GraderRunResponse(BaseModel):
    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, float] = Field(description="Same as metadata.scores (OpenAI's name for it).")


class GraderValidateRequest(InputModel):
    grader: dict[str, Any] = Field(description=GRADER_DESCRIPTION)


class GraderValidateResponse(BaseModel):
    object: Literal["grader"] = "grader"
    grader: dict[str, Any] = Field(description="The spec as alignd stores it: every default filled in.")
    item_fields: list[str] = Field(description="Item fields the grader reads; a dataset's rows need them.")
    model_backed: list[str] = Field(
        description="Graders that score with a model (a worker's job, not a dry run)."
    )


@router.post(
    "/run",
    response_model=GraderRunResponse,
    operation_id="runGrader",
    summary="Grade one sample without a job (rule graders only)",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=error_responses(400, 415, 422),
)
def run_grader(body: GraderRunRequest, tenant: TenantDep) -> GraderRunResponse:
    result, seconds = core.dry_run(body.grader, body.model_sample, body.item)
    metadata = GraderRunMetadata(**result.metadata, execution_time=seconds)
    return GraderRunResponse(reward=result.reward, metadata=metadata, sub_rewards=metadata.scores)


@router.post(
    "/validate",
    response_model=GraderValidateResponse,
    operation_id="validateGrader",
    summary="Validate a grader spec and return it normalized",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=error_responses(400, 415, 422),
)
def validate_grader(body: GraderValidateRequest, tenant: TenantDep) -> GraderValidateResponse:
    grader = core.validate_grader(body.grader)
    return GraderValidateResponse(
        grader=dump_grader(grader), item_fields=item_fields(grader), model_backed=model_backed(grader)
    )
