"""Jobs: submit, list, inspect, cancel, pause and resume; events (JSON or live SSE) and metrics (JSON or CSV)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlmodel import Session, col, select

from contract.evaluation import EVAL_ARTIFACT_KIND, EvaluationResult, PromptResult
from contract.methods import INTERNAL_METHODS, Method
from service.api.deps import (
    ContextDep,
    PageDep,
    QueueDep,
    SessionDep,
    StoreDep,
    TenantDep,
    authenticate,
    get_context_of,
    read_owned,
)
from service.api.errors import error_responses
from service.api.evaluation_prompts import prompt_results
from service.api.job_streams import (
    SSE_HEADERS,
    SSE_KEEPALIVE_SECONDS,
    SSE_POLL_SECONDS,
    JobFilter,
    first_page,
    metric_points,
    metrics_after,
    stream_jobs,
    stream_metrics,
)
from service.api.job_submission import enqueue, new_job_row
from service.api.schemas import (
    EventPublic,
    JobCreate,
    JobPublic,
    ListResponse,
    MetricPublic,
    parse_event_id,
)
from service.api.uploads import require_content_type
from service.core.errors import ConflictError, NotFoundError, ValidationFailed
from service.core.jobs import JobStatus, ensure_pausable, ensure_resumable, ensure_unfinished
from service.db.jobs import request_cancel, request_pause, resume
from service.db.repository import get_owned, list_owned
from service.db.tables import ArtifactRow, JobEventRow, JobRow

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
# The largest seq the tables hold (an Integer column: int4 on PostgreSQL); a larger cursor is a 422, not a
# DataError from the database.
MAX_SEQ = 2**31 - 1


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    operation_id="createJob",
    summary="Submit a training job",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=error_responses(400, 415, 422, 429),
)
def create_job(
    body: JobCreate, ctx: ContextDep, session: SessionDep, queue: QueueDep, tenant: TenantDep
) -> JobPublic:
    if body.method in INTERNAL_METHODS:  # its output is read by the resource that made it, and no other
        where = (
            "POST /openai/v1/chat/completions, which answers with its output"
            if body.method is Method.chat
            else "a feedback set (docs/feedback.md), which reads its output"
        )
        raise ValidationFailed(
            f"Method '{body.method.value}' runs only behind {where}.",
            code="method_not_available",
            details=[{"field": "method", "code": "method_not_available", "message": body.method.value}],
        )
    job = new_job_row(ctx, session, tenant, body)
    session.commit()
    enqueue(queue, job)
    return JobPublic.of(job)


@router.get(
    "",
    response_model=ListResponse[JobPublic],
    operation_id="listJobs",
    summary="List jobs, newest first; with Accept: text/event-stream the list, then every job created or changed, "
    "live",
    responses={
        **error_responses(),
        200: {
            "description": "A page of jobs, or an SSE stream when asked for text/event-stream: first `event: job` "
            "per job of the page (newest first, up to `limit`; `data` is the job as GET /v1/jobs/{id} gives "
            "it), then `event: job` for every job of the tenant matching the filters that is created or whose "
            "status, stage, progress, round, status_reason, error or monitors change (a job leaving the "
            "`status` filter is sent once more with its new status); `: keep-alive` comments while idle.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
def list_jobs(
    request: Request,
    ctx: ContextDep,
    session: SessionDep,
    tenant: TenantDep,
    page: PageDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    round: Annotated[
        int | None, Query(ge=0, le=1_000_000, description="Only jobs of this feedback round.")
    ] = None,
) -> ListResponse[JobPublic] | StreamingResponse:
    if _wants_stream(request):
        where = JobFilter(tenant=tenant, status=status, round=round)
        return StreamingResponse(
            stream_jobs(ctx, where, first_page(session, where, page), request),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    rows, has_more = list_owned(
        session, JobRow, page, tenant, status=status.value if status is not None else None, round=round
    )
    return ListResponse(data=[JobPublic.of(row) for row in rows], has_more=has_more)


def _wants_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    operation_id="getJob",
    summary="Get a job",
    responses=error_responses(404),
)
async def get_job(job_id: str, request: Request) -> Response:
    # The endpoint every client polls (the SDK's wait()), so it skips what costs more than its query:
    # FastAPI's dependency solver (a quarter of the request: context and tenant are resolved by the same
    # functions, called directly), the ORM (a prebuilt Core statement, no thread hop on SQLite) and
    # FastAPI's re-validation of the response against response_model (the body is serialised once here).
    ctx = get_context_of(request)
    row = await read_owned(ctx, JobRow, job_id, authenticate(request, ctx), "job")
    return Response(JobPublic.of(row).model_dump_json(), media_type="application/json")


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    operation_id="cancelJob",
    summary="Cancel a job (a queued job at once; a running one within the grace period)",
    responses=error_responses(404, 409),
)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    job = get_owned(session, JobRow, job_id, tenant, "job")
    ensure_unfinished(job.id, job.status)
    request_cancel(session, job)
    return JobPublic.of(job)


@router.post(
    "/{job_id}/pause",
    response_model=JobPublic,
    operation_id="pauseJob",
    summary="Pause a job (a queued one at once; a running one at its next step, after saving a checkpoint)",
    description="A running job keeps `status: running` with `pause_requested: true` until its training process "
    "has saved a checkpoint and stopped (seconds: one optimizer step), then becomes `paused`. A paused job holds "
    "no worker and keeps its checkpoints; `resume` queues it to continue from the newest. Pausing a paused job, "
    "or one whose pause is pending, changes nothing. Training before the first step (loading the model) is not "
    "kept: the job resumes from its newest checkpoint, or from the start.",
    responses=error_responses(404, 409),
)
def pause_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    job = get_owned(session, JobRow, job_id, tenant, "job")
    ensure_pausable(job.id, job.status, cancel_requested=job.cancel_requested)
    request_pause(session, job)
    return JobPublic.of(job)


@router.post(
    "/{job_id}/resume",
    response_model=JobPublic,
    operation_id="resumeJob",
    summary="Resume a paused job (queued again, it continues from its newest checkpoint)",
    description="Also withdraws a pause that has not taken effect yet (the job keeps running). A job that is "
    "neither paused nor pausing answers 409 `job_not_paused`.",
    responses=error_responses(404, 409),
)
def resume_job(job_id: str, session: SessionDep, queue: QueueDep, tenant: TenantDep) -> JobPublic:
    job = get_owned(session, JobRow, job_id, tenant, "job")
    ensure_resumable(job.id, job.status, pause_requested=job.pause_requested)
    if resume(session, job):
        enqueue(queue, job)
    return JobPublic.of(job)


def _events_after(session: Session, job_id: str, after_seq: int, limit: int) -> list[JobEventRow]:
    return list(
        session.exec(
            select(JobEventRow)
            .where(JobEventRow.job_id == job_id, col(JobEventRow.seq) > after_seq)
            .order_by(col(JobEventRow.seq))
            .limit(limit)
        ).all()
    )


@router.get(
    "/{job_id}/events",
    response_model=ListResponse[EventPublic],
    operation_id="listJobEvents",
    summary="Job events, oldest first; with Accept: text/event-stream they stream live until the job ends",
    responses={
        **error_responses(404),
        200: {
            "description": "A list of events, or an SSE stream when asked for text/event-stream.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
def list_events(
    job_id: str,
    request: Request,
    ctx: ContextDep,
    session: SessionDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="Event id (evt_...) to continue after.")] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", include_in_schema=False)] = None,
) -> ListResponse[EventPublic] | StreamingResponse:
    get_owned(session, JobRow, job_id, tenant, "job")
    after_seq = parse_event_id(last_event_id or after)
    if "text/event-stream" in request.headers.get("accept", ""):
        return StreamingResponse(
            _stream_events(ctx, job_id, after_seq, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    rows = _events_after(session, job_id, after_seq, limit + 1)
    return ListResponse(data=[EventPublic.of(row) for row in rows[:limit]], has_more=len(rows) > limit)


async def _stream_events(
    ctx: ContextDep, job_id: str, after_seq: int, request: Request
) -> AsyncIterator[str]:
    """Poll the event rows (the database is the bus: any replica can serve any job's stream)."""
    last_sent = asyncio.get_running_loop().time()
    while True:
        rows, status = await asyncio.to_thread(_poll, ctx, job_id, after_seq)
        for row in rows:
            after_seq = row.seq or after_seq
            event = EventPublic.of(row)
            yield f"id: {event.id}\nevent: event\ndata: {event.model_dump_json()}\n\n"
            last_sent = asyncio.get_running_loop().time()
        if status is None or (JobStatus(status).is_terminal and not rows):
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if await request.is_disconnected():
            return
        if asyncio.get_running_loop().time() - last_sent > SSE_KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = asyncio.get_running_loop().time()
        if not rows:
            await asyncio.sleep(SSE_POLL_SECONDS)


def _poll(ctx: ContextDep, job_id: str, after_seq: int) -> tuple[list[JobEventRow], str | None]:
    with Session(ctx.engine, expire_on_commit=False) as session:
        # Status first, then events: a terminal status read before the last events were written
        # cannot end the stream early, because the loop ends only on a terminal status with no new rows.
        status = session.exec(select(JobRow.status).where(JobRow.id == job_id)).first()
        return _events_after(session, job_id, after_seq, 500), status


@router.get(
    "/{job_id}/metrics",
    response_model=ListResponse[MetricPublic],
    operation_id="listJobMetrics",
    summary="Training metrics, in the order they were logged (?format=csv for CSV); with Accept: "
    "text/event-stream they stream live until the job ends",
    responses={
        **error_responses(404, 422),
        200: {
            "description": "Metric points; or CSV; or an SSE stream when asked for text/event-stream: "
            '`event: metrics` with `id: <seq of the batch\'s last point>` and `data: {"data": [point, ...]}` '
            "as points are written (resumed after `Last-Event-ID` or `?after=`), then `event: end` with "
            '`data: {"status": "<the job\'s status>"}` once the job has ended and every point was sent.',
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        },
    },
)
def list_metrics(
    job_id: str,
    request: Request,
    ctx: ContextDep,
    session: SessionDep,
    tenant: TenantDep,
    format: Annotated[Literal["json", "csv"], Query(description="json (default) or csv.")] = "json",
    name: Annotated[str | None, Query(description="Only this metric.")] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description="Only points whose seq is greater (a point's seq, to resume)."),
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", include_in_schema=False)] = None,
) -> ListResponse[MetricPublic] | Response:
    get_owned(session, JobRow, job_id, tenant, "job")
    resume = _metric_seq(last_event_id) if last_event_id else after
    if _wants_stream(request):
        return StreamingResponse(
            stream_metrics(ctx, job_id, resume or 0, name, request),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    points = metric_points(metrics_after(session, job_id, after=resume, name=name))
    if format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["stage", "step", "name", "value"])
        for point in points:
            writer.writerow([point.stage or "", point.step, point.name, repr(point.value)])
        return Response(content=buffer.getvalue(), media_type="text/csv")
    return ListResponse(data=points, has_more=False)


def _metric_seq(value: str) -> int:
    """A metrics stream's Last-Event-ID: the seq of the last point the client received."""
    if not value.isascii() or not value.isdigit() or len(value) > 10 or int(value) > MAX_SEQ:
        raise ValidationFailed(
            f"Last-Event-ID must be a metric point's seq (a non-negative integer), not '{value[:40]}'.",
            code="invalid_last_event_id",
            details=[{"field": "Last-Event-ID", "code": "invalid_last_event_id", "message": value[:40]}],
        )
    return int(value)


@router.get(
    "/{job_id}/evaluation",
    response_model=EvaluationResult,
    response_model_exclude_none=True,  # the baseline has no win-rates, the base candidate no adapter
    operation_id="getJobEvaluation",
    summary="An evaluate job's result (or an rlhf job's final evaluation of base, sft and its last stage): per "
    "candidate, each grader's mean and win-rate vs the baseline with 95% intervals",
    responses=error_responses(404, 409),
)
def get_evaluation(job_id: str, session: SessionDep, tenant: TenantDep) -> EvaluationResult:
    artifact = _evaluation_artifact(session, job_id, tenant)
    result = EvaluationResult.model_validate(artifact.meta["evaluation"])
    return result.model_copy(update={"per_prompt_artifact": artifact.id})


@router.get(
    "/{job_id}/evaluation/prompts",
    response_model=ListResponse[PromptResult],
    operation_id="listJobEvaluationPrompts",
    summary="An evaluation's prompts, in order: per prompt its answers from every candidate side by side, each "
    "grader's score and the references the graders compared with (the eval artifact's per_prompt.csv as JSON)",
    responses=error_responses(404, 409, 422),
)
def list_evaluation_prompts(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Prompts per page (1..1000).")] = 100,
    after: Annotated[
        int | None, Query(ge=0, le=2**31, description="Return prompts after this index (cursor).")
    ] = None,
) -> ListResponse[PromptResult]:
    artifact = _evaluation_artifact(session, job_id, tenant)
    rows = [row for row in prompt_results(store, artifact) if after is None or row.index > after]
    return ListResponse(data=rows[:limit], has_more=len(rows) > limit)


def _evaluation_artifact(session: Session, job_id: str, tenant: str) -> ArtifactRow:
    """The job's eval artifact, or the 404 / 409 that says why there is none (yet)."""
    job = get_owned(session, JobRow, job_id, tenant, "job")
    if job.method not in (Method.evaluate, Method.rlhf):
        raise NotFoundError(
            f"Job {job_id} is a '{job.method}' job; only 'evaluate' and 'rlhf' jobs have an evaluation.",
            code="evaluation_not_found",
        )
    artifact = session.exec(
        select(ArtifactRow)
        .where(ArtifactRow.job_id == job_id, ArtifactRow.kind == EVAL_ARTIFACT_KIND)
        .order_by(col(ArtifactRow.seq).desc())
    ).first()
    if artifact is None and job.method == Method.rlhf and job.status == JobStatus.succeeded:
        # final_evaluation false, or a last stage without an eval block: its events say which.
        raise NotFoundError(
            f"rlhf job {job_id} ran no final evaluation (see its events).", code="evaluation_not_found"
        )
    if artifact is None or job.status != JobStatus.succeeded:
        raise ConflictError(
            f"Job {job_id} is {job.status}; its evaluation exists once it has succeeded.",
            code="evaluation_not_ready"
            if not JobStatus(job.status).is_terminal
            else "evaluation_unavailable",
        )
    return artifact
