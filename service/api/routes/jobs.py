"""Jobs: submit, list, inspect, cancel; events (JSON or live SSE) and metrics (JSON or CSV)."""

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

from contract.evaluation import EVAL_ARTIFACT_KIND, EvaluationResult
from contract.methods import INTERNAL_METHODS, Method
from service.api.deps import (
    ContextDep,
    PageDep,
    QueueDep,
    SessionDep,
    TenantDep,
    authenticate,
    get_context_of,
    read_owned,
)
from service.api.errors import error_responses
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
from service.core.jobs import JobStatus
from service.db.jobs import request_cancel
from service.db.repository import get_owned, list_owned
from service.db.tables import ArtifactRow, JobEventRow, JobMetricRow, JobRow

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0


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
    summary="List jobs",
    responses=error_responses(),
)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    page: PageDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    round: Annotated[
        int | None, Query(ge=0, le=1_000_000, description="Only jobs of this feedback round.")
    ] = None,
) -> ListResponse[JobPublic]:
    rows, has_more = list_owned(
        session, JobRow, page, tenant, status=status.value if status is not None else None, round=round
    )
    return ListResponse(data=[JobPublic.of(row) for row in rows], has_more=has_more)


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
    if JobStatus(job.status).is_terminal:
        raise ConflictError(f"Job {job_id} already finished with status '{job.status}'.", code="job_finished")
    request_cancel(session, job)
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
    summary="Training metrics, in the order they were logged (?format=csv for CSV)",
    responses={
        **error_responses(404),
        200: {"description": "Metric points.", "content": {"text/csv": {"schema": {"type": "string"}}}},
    },
)
def list_metrics(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    format: Annotated[Literal["json", "csv"], Query(description="json (default) or csv.")] = "json",
    name: Annotated[str | None, Query(description="Only this metric.")] = None,
) -> ListResponse[MetricPublic] | Response:
    get_owned(session, JobRow, job_id, tenant, "job")
    statement = select(JobMetricRow).where(JobMetricRow.job_id == job_id)
    if name is not None:
        statement = statement.where(JobMetricRow.name == name)
    rows = session.exec(statement.order_by(col(JobMetricRow.seq))).all()
    points = [MetricPublic(stage=row.stage, step=row.step, name=row.name, value=row.value) for row in rows]
    if format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["stage", "step", "name", "value"])
        for point in points:
            writer.writerow([point.stage or "", point.step, point.name, repr(point.value)])
        return Response(content=buffer.getvalue(), media_type="text/csv")
    return ListResponse(data=points, has_more=False)


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
    result = EvaluationResult.model_validate(artifact.meta["evaluation"])
    return result.model_copy(update={"per_prompt_artifact": artifact.id})
