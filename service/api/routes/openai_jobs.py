"""OpenAI facade, fine-tuning jobs: ``/openai/v1/fine_tuning/jobs`` as OpenAI's API answers it.

A facade job is an alignd job (same id, visible under /v1/jobs too) plus an ``openai_jobs`` row for the
OpenAI fields alignd's job has no column for. Creating one reads its files in its method's format (a bad
line is a 400 naming it), maps the method (service/core/openai_jobs.py) and submits through the same path as
``POST /v1/jobs`` (service/api/job_submission.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from sqlmodel import Session

from service.api.deps import ContextDep, Page, QueueDep, SessionDep, TenantDep
from service.api.job_submission import enqueue, new_job_row
from service.api.openai_errors import openai_error_responses
from service.api.openai_schemas import (
    OpenAIAligndLinks,
    OpenAICheckpointMetrics,
    OpenAIFineTuningJob,
    OpenAIFineTuningJobCheckpoint,
    OpenAIFineTuningJobCreate,
    OpenAIFineTuningJobEvent,
    OpenAIJobErrorObject,
    OpenAIJobHyperparameters,
    OpenAIList,
)
from service.api.schemas import JobCreate, JobDatasets, event_id, parse_event_id
from service.api.uploads import require_content_type
from service.core.errors import ValidationFailed
from service.core.ids import now
from service.core.jobs import JobStatus, ensure_pausable, ensure_resumable, ensure_unfinished
from service.core.openai_files import DATASET_KINDS, FileFormat
from service.core.openai_graders import job_grader
from service.core.openai_jobs import fine_tuned_model_name, in_openai_terms, resolve_method
from service.db import openai as db
from service.db.jobs import request_cancel, request_pause, resume
from service.db.repository import find_owned
from service.db.tables import JobEventRow, JobRow, OpenAIFileRow, OpenAIJobRow

router = APIRouter(prefix="/openai/v1/fine_tuning/jobs", tags=["openai"])

# alignd's event levels -> OpenAI's (info, warn, error).
_LEVELS: dict[str, Literal["info", "warn", "error"]] = {"warning": "warn", "error": "error"}


def _method_of(body: OpenAIFineTuningJobCreate) -> tuple[FileFormat, dict[str, Any], dict[str, Any] | None]:
    """(The method's format, its given hyperparameters, the reinforcement grader) of a request."""
    legacy = body.hyperparameters.model_dump(exclude_unset=True) if body.hyperparameters else None
    if body.method is None:
        return FileFormat.supervised, legacy or {}, None
    fmt = FileFormat(body.method.type)
    given = body.method.hyperparameters()
    if legacy is not None and (fmt is not FileFormat.supervised or given):
        raise ValidationFailed(
            "hyperparameters: OpenAI deprecated top-level hyperparameters for method; give them in "
            f"method.{fmt.value}.hyperparameters only.",
            code="invalid_hyperparameters",
            details=[{"field": "hyperparameters", "code": "conflicting_field", "message": "use method"}],
        )
    grader = body.method.reinforcement.grader if body.method.reinforcement is not None else None
    if fmt is FileFormat.reinforcement and grader is None:
        raise ValidationFailed(
            "method.reinforcement.grader: a reinforcement job needs a grader.",
            code="missing_grader",
            details=[{"field": "method.reinforcement.grader", "code": "missing_field", "message": "missing"}],
        )
    return fmt, legacy if legacy is not None else given, grader


def _model_not_available(model: str, why: str) -> ValidationFailed:
    return ValidationFailed(
        f"model: {model!r} is not available for fine-tuning: {why}",
        code="model_not_available",
        details=[{"field": "model", "code": "model_not_available", "message": why}],
    )


def _base_of(session: Session, tenant: str, model: str) -> db.NamedModel:
    """The base model (and the adapter to continue from) a job's ``model`` names; 400 when none."""
    named = db.model_named(session, tenant, model)
    if named is None and model.startswith("ft:"):
        raise _model_not_available(model, "no succeeded fine-tuning job of this tenant made it")
    if named is None:
        raise _model_not_available(
            model,
            "alignd holds no base model with this id or name for this tenant; upload one (POST /v1/models) "
            "and name it here by its id (model_...) or its name",
        )
    return named


def _file(session: Session, tenant: str, file_id: str, param: str) -> OpenAIFileRow:
    row = find_owned(session, OpenAIFileRow, file_id, tenant)
    if row is None:
        raise ValidationFailed(
            f"{param}: no file '{file_id}'.",
            code="file_not_found",
            details=[{"field": param, "code": "file_not_found", "message": f"no file '{file_id}'"}],
        )
    return row


_HELD_OUT_FORMATS = (FileFormat.supervised, FileFormat.dpo)


def _warnings(body: OpenAIFineTuningJobCreate, fmt: FileFormat, notes: dict[str, int]) -> list[str]:
    """What the job was asked for that alignd does differently, said once in its events."""
    warnings = []
    if notes.get("earlier_assistant_turns"):
        warnings.append(
            f"{notes['earlier_assistant_turns']} lines of the training file have assistant messages before the "
            "last one: alignd trains on the last assistant message of each line only (OpenAI trains on every "
            "assistant message without weight 0)."
        )
    if body.validation_file is not None and fmt is FileFormat.reinforcement:
        warnings.append(
            f"validation_file {body.validation_file} was checked but is not used: alignd's "
            f"{fmt.value} training has no held-out loss yet (checkpoints report no valid_loss)."
        )
    if body.integrations:
        warnings.append("integrations are ignored: alignd reports to no experiment tracker.")
    return warnings


def _public(facade: OpenAIJobRow, job: JobRow, adapter: db.AdapterInfo | None) -> OpenAIFineTuningJob:
    status = JobStatus(job.status)
    error = None
    if status is JobStatus.failed:
        error = OpenAIJobErrorObject(code=job.error_code or "failed", message=job.error_message or "")
    block = facade.method.get(facade.method["type"], {})
    hyperparameters = block.get("hyperparameters", {})
    return OpenAIFineTuningJob(
        id=job.id,
        created_at=job.created_at,
        error=error,
        fine_tuned_model=facade.fine_tuned_model if status is JobStatus.succeeded else None,
        finished_at=job.finished_at,
        hyperparameters=OpenAIJobHyperparameters(
            **{k: hyperparameters[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
        ),
        model=facade.model,
        organization_id=job.tenant,
        seed=job.seed,
        status=status.value,
        trained_tokens=adapter.trained_tokens if adapter is not None else None,
        training_file=facade.training_file,
        validation_file=facade.validation_file,
        metadata=facade.meta,
        method=facade.method,
        alignd=OpenAIAligndLinks(
            job=job.id,
            method=job.method,
            adapter=adapter.id if adapter else None,
            adapter_url=f"/v1/artifacts/{adapter.id}/content" if adapter else None,
        ),
    )


@router.post(
    "",
    response_model=OpenAIFineTuningJob,
    operation_id="openaiCreateFineTuningJob",
    summary="Create a fine-tuning job (an alignd sft, dpo or grpo job)",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=openai_error_responses(415, 429),
)
def create_fine_tuning_job(
    body: OpenAIFineTuningJobCreate, ctx: ContextDep, session: SessionDep, queue: QueueDep, tenant: TenantDep
) -> OpenAIFineTuningJob:
    fmt, given, grader = _method_of(body)
    mapped = resolve_method(fmt, given)
    source = _base_of(session, tenant, body.model)
    training = _file(session, tenant, body.training_file, "training_file")
    validation = (
        _file(session, tenant, body.validation_file, "validation_file") if body.validation_file else None
    )
    store, data_dir = ctx.store, ctx.settings.data_dir
    dataset, notes = db.file_dataset(session, store, training, fmt, param="training_file", data_dir=data_dir)
    held_out = None
    if validation is not None:
        held_out, _ = db.file_dataset(
            session, store, validation, fmt, param="validation_file", data_dir=data_dir
        )
    warnings = [*mapped.warnings, *_warnings(body, fmt, notes)]
    hyperparameters = mapped.for_records(dataset.num_records)
    block: dict[str, Any] = {"hyperparameters": mapped.openai}
    if grader is not None:
        alignd_grader, named = job_grader(grader)
        hyperparameters["graders"] = [alignd_grader]
        block["grader"] = grader
        warnings.extend(named)
    request = JobCreate(
        method=mapped.method,
        base_model=source.base_id,
        datasets=JobDatasets(
            **{DATASET_KINDS[fmt]: dataset.id},
            # supervised and dpo: the validation file is the job's held-out set (valid_loss, and for sft
            # valid_mean_token_accuracy); reinforcement checks it only (a warning event says so)
            **({"validation": held_out.id} if held_out is not None and fmt in _HELD_OUT_FORMATS else {}),
        ),
        init_adapter=source.adapter,
        hyperparameters=hyperparameters,
        seed=body.seed,
    )
    try:
        job = new_job_row(ctx, session, tenant, request)
    except ValidationFailed as exc:
        raise in_openai_terms(exc, fmt) from None
    facade = OpenAIJobRow(
        id=job.id,
        tenant=tenant,
        model=body.model,
        training_file=training.id,
        validation_file=validation.id if validation else None,
        fine_tuned_model=fine_tuned_model_name(source.base_name, body.suffix, job.id),
        suffix=body.suffix,
        method={"type": fmt.value, fmt.value: block},
        meta=body.metadata,
        created_at=job.created_at,
    )
    job.name = facade.fine_tuned_model[:256]
    session.add(facade)
    for message in warnings:
        session.add(JobEventRow(job_id=job.id, created_at=now(), level="warning", message=message))
    session.commit()
    enqueue(queue, job)
    return _public(facade, job, None)


@router.get(
    "",
    response_model=OpenAIList[OpenAIFineTuningJob],
    operation_id="openaiListFineTuningJobs",
    summary="List the fine-tuning jobs made through this facade, newest first",
    responses=openai_error_responses(),
)
def list_fine_tuning_jobs(
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="A job id: the page after it.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
) -> OpenAIList[OpenAIFineTuningJob]:
    filters = sorted(name for name in request.query_params if name.startswith("metadata"))
    if filters:
        raise ValidationFailed(
            "Filtering jobs by metadata is not supported yet; list them all and filter on the client.",
            code="unsupported_parameter",
            details=[{"field": filters[0], "code": "unsupported_parameter", "message": "not supported"}],
        )
    pairs, has_more = db.list_facade_jobs(session, tenant, Page(limit=limit, after=after))
    adapters = db.adapters(session, [job.id for _, job in pairs])
    return OpenAIList[OpenAIFineTuningJob].page(
        [_public(facade, job, adapters.get(job.id)) for facade, job in pairs], has_more
    )


@router.get(
    "/{fine_tuning_job_id}",
    response_model=OpenAIFineTuningJob,
    operation_id="openaiRetrieveFineTuningJob",
    summary="Get a fine-tuning job",
    responses=openai_error_responses(404),
)
def retrieve_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep
) -> OpenAIFineTuningJob:
    facade, job = db.facade_job(session, tenant, fine_tuning_job_id)
    return _public(facade, job, db.adapters(session, [job.id]).get(job.id))


@router.post(
    "/{fine_tuning_job_id}/cancel",
    response_model=OpenAIFineTuningJob,
    operation_id="openaiCancelFineTuningJob",
    summary="Cancel a fine-tuning job (a queued one at once; a running one within the grace period)",
    responses=openai_error_responses(404, 409),
)
def cancel_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep
) -> OpenAIFineTuningJob:
    facade, job = db.facade_job(session, tenant, fine_tuning_job_id)
    ensure_unfinished(job.id, job.status)
    request_cancel(session, job)
    return _public(facade, job, None)


@router.post(
    "/{fine_tuning_job_id}/pause",
    response_model=OpenAIFineTuningJob,
    operation_id="openaiPauseFineTuningJob",
    summary="Pause a fine-tuning job (alignd's pause: a running job stops at its next step after a checkpoint)",
    responses=openai_error_responses(404, 409),
)
def pause_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, tenant: TenantDep
) -> OpenAIFineTuningJob:
    facade, job = db.facade_job(session, tenant, fine_tuning_job_id)
    ensure_pausable(job.id, job.status, cancel_requested=job.cancel_requested)
    request_pause(session, job)
    return _public(facade, job, None)


@router.post(
    "/{fine_tuning_job_id}/resume",
    response_model=OpenAIFineTuningJob,
    operation_id="openaiResumeFineTuningJob",
    summary="Resume a paused fine-tuning job from its newest checkpoint",
    responses=openai_error_responses(404, 409),
)
def resume_fine_tuning_job(
    fine_tuning_job_id: str, session: SessionDep, queue: QueueDep, tenant: TenantDep
) -> OpenAIFineTuningJob:
    facade, job = db.facade_job(session, tenant, fine_tuning_job_id)
    ensure_resumable(job.id, job.status, pause_requested=job.pause_requested)
    if resume(session, job):
        enqueue(queue, job)
    return _public(facade, job, None)


@router.get(
    "/{fine_tuning_job_id}/events",
    response_model=OpenAIList[OpenAIFineTuningJobEvent],
    operation_id="openaiListFineTuningEvents",
    summary="A fine-tuning job's events (alignd's job events), newest first",
    responses=openai_error_responses(404),
)
def list_fine_tuning_events(
    fine_tuning_job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="An event id: the older events after it.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Page size.")] = 20,
) -> OpenAIList[OpenAIFineTuningJobEvent]:
    _, job = db.facade_job(session, tenant, fine_tuning_job_id)
    rows, has_more = db.events_page(session, job.id, after=parse_event_id(after) or None, limit=limit)
    events = [
        OpenAIFineTuningJobEvent(
            id=event_id(row.seq or 0),
            created_at=row.created_at,
            level=_LEVELS.get(row.level, "info"),
            message=row.message,
            data={"stage": row.stage} if row.stage else {},
        )
        for row in rows
    ]
    return OpenAIList[OpenAIFineTuningJobEvent].page(events, has_more)


@router.get(
    "/{fine_tuning_job_id}/checkpoints",
    response_model=OpenAIList[OpenAIFineTuningJobCheckpoint],
    operation_id="openaiListFineTuningCheckpoints",
    summary="A fine-tuning job's checkpoints (its final adapter; resumable checkpoints while it runs)",
    responses=openai_error_responses(404),
)
def list_fine_tuning_checkpoints(
    fine_tuning_job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[str | None, Query(description="A checkpoint id: the older ones after it.")] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 10,
) -> OpenAIList[OpenAIFineTuningJobCheckpoint]:
    facade, job = db.facade_job(session, tenant, fine_tuning_job_id)
    artifacts, has_more = db.checkpoint_artifacts(session, tenant, job.id, Page(limit=limit, after=after))
    losses = db.metric_series(session, job.id, "loss")
    series = {name: db.metric_series(session, job.id, name) for name in _CHECKPOINT_SERIES}
    data = []
    for artifact in artifacts:
        step = db.artifact_step(artifact) or (max(losses) if losses else 0)
        final = artifact.kind == "adapter"
        data.append(
            OpenAIFineTuningJobCheckpoint(
                id=artifact.id,
                created_at=artifact.created_at,
                fine_tuned_model_checkpoint=(
                    facade.fine_tuned_model if final else f"{facade.fine_tuned_model}:ckpt-step-{step}"
                ),
                fine_tuning_job_id=job.id,
                metrics=_checkpoint_metrics(step, losses, series),
                step_number=step,
            )
        )
    return OpenAIList[OpenAIFineTuningJobCheckpoint].page(data, has_more)


# alignd's metric -> OpenAI's checkpoint metric. The held-out evaluation runs every eval_steps, so a checkpoint
# reports the newest one at or before its step; alignd scores the whole validation file every time, which is
# what OpenAI calls full_valid_*: valid_* (OpenAI's sampled batch) carry the same values.
_CHECKPOINT_SERIES = {
    "mean_token_accuracy": ("train_mean_token_accuracy",),
    "eval_loss": ("valid_loss", "full_valid_loss"),
    "eval_mean_token_accuracy": ("valid_mean_token_accuracy", "full_valid_mean_token_accuracy"),
}


def _checkpoint_metrics(
    step: int, losses: dict[int, float], series: dict[str, dict[int, float]]
) -> OpenAICheckpointMetrics:
    values: dict[str, float | None] = {}
    for name, fields in _CHECKPOINT_SERIES.items():
        points = series[name]
        if name.startswith("eval_"):
            earlier = [s for s in points if s <= step]
            value = points[max(earlier)] if earlier else None
        else:
            value = points.get(step)
        values.update(dict.fromkeys(fields, value))
    return OpenAICheckpointMetrics(step=step, train_loss=losses.get(step), **values)
