"""OpenAI facade, chat completions: ``POST /openai/v1/chat/completions``, answered or streamed (``stream=true``)
by a base model or a fine-tuned one on a worker's device.

The API never loads a model (it imports no torch): each request is a small alignd job of method ``chat``
(same id as the answer), queued like any job and run by a training child (workers/training/chat.py) on the
worker that takes it. The child reports each choice's text so far; the runner stores it in the request's
``openai_chat_completions`` row; this route polls that row and the job's status, every POLL_SECONDS, until
the job ends (or, streaming, sends what is new at each poll). The cost is the child's start: seconds per
request, more when the worker is busy with other jobs. docs/openai.md says so, and how to serve an adapter
with vLLM instead.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from sqlmodel import Session

from contract.methods import Method
from service.api.deps import AppContext, ContextDep, TenantDep
from service.api.job_submission import enqueue, new_job_row
from service.api.openai_chat_schemas import (
    OpenAIChatCompletion,
    OpenAIChatCompletionChoice,
    OpenAIChatCompletionChunk,
    OpenAIChatCompletionChunkChoice,
    OpenAIChatCompletionChunkDelta,
    OpenAIChatCompletionCreate,
    OpenAIChatCompletionMessage,
    OpenAICompletionUsage,
)
from service.api.openai_errors import openai_error, openai_error_responses
from service.api.schemas import JobCreate
from service.api.uploads import require_content_type
from service.core.errors import AlignError, NotFoundError, ValidationFailed
from service.core.jobs import JobStatus
from service.core.openai_chat import job_failure, text_deltas
from service.db import openai as db
from service.db.tables import OpenAIChatCompletionRow

router = APIRouter(prefix="/openai/v1/chat/completions", tags=["openai"])

POLL_SECONDS = 0.1


@dataclass(frozen=True)
class ChatJob:
    """The request's job, as the answer names it."""

    id: str
    created: int
    model: str
    n: int
    include_usage: bool


def _submit(ctx: AppContext, tenant: str, body: OpenAIChatCompletionCreate) -> ChatJob:
    """Check the request, add its chat job and output row, commit, and queue the job."""
    refused = body.refused()
    if refused:
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in refused)
        raise ValidationFailed(f"Invalid request: {summary}", code=refused[0]["code"], details=refused)
    with Session(ctx.engine, expire_on_commit=False) as session:
        named = db.chat_model_named(session, tenant, body.model)
        if named is None:
            raise NotFoundError(
                f"The model '{body.model}' does not exist or you do not have access to it.",
                code="model_not_found",
            )
        request = JobCreate(
            method=Method.chat,
            base_model=named.base_id,
            init_adapter=named.adapter,
            hyperparameters=body.hyperparameters(),
            seed=body.seed,
            name=f"chat: {body.model}"[:256],
        )
        try:
            job = new_job_row(ctx, session, tenant, request)
        except ValidationFailed as exc:  # the model's files or adapter went missing since the name resolved
            raise ValidationFailed(
                exc.message, code=exc.code, details=[{**d, "field": "model"} for d in exc.details]
            ) from None
        session.add(
            OpenAIChatCompletionRow(id=job.id, tenant=tenant, model=body.model, created_at=job.created_at)
        )
        session.commit()
    enqueue(ctx.queue, job)
    return ChatJob(job.id, job.created_at, body.model, body.n or 1, body.include_usage)


def _timed_out(job: ChatJob, ctx: AppContext) -> AlignError:
    seconds = ctx.settings.chat_timeout_seconds
    return AlignError(
        f"No completion within ALIGND_CHAT_TIMEOUT_SECONDS ({seconds:g} s), queued and running: the chat job "
        f"{job.id} was cancelled. A busy worker runs other jobs first.",
        code="chat_timeout",
        status=504,
    )


async def _wait(
    ctx: AppContext, request: Request, job: ChatJob, deadline: float, *, until_started: bool
) -> db.ChatState:
    """Poll until the job ends, or (``until_started``) until the child accepted the prompt. A client that went
    away, or the timeout, cancels the job."""
    while True:
        state = await asyncio.to_thread(db.chat_state, ctx.engine, job.id)
        if state.status.is_terminal or (until_started and state.choices):
            return state
        if time.monotonic() > deadline or await request.is_disconnected():
            await asyncio.to_thread(db.cancel_unfinished, ctx.engine, job.id)
            raise _timed_out(job, ctx)  # a client that went away reads no answer: any error ends it
        await asyncio.sleep(POLL_SECONDS)


def _usage(state: db.ChatState) -> OpenAICompletionUsage:
    usage = state.usage or {}
    return OpenAICompletionUsage(
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        total_tokens=int(usage.get("total_tokens", 0)),
    )


def _completion(job: ChatJob, state: db.ChatState) -> OpenAIChatCompletion:
    if state.status is not JobStatus.succeeded:
        raise job_failure(job.id, state.status, state.error_code, state.error_message)
    choices = [
        OpenAIChatCompletionChoice(
            index=int(choice["index"]),
            message=OpenAIChatCompletionMessage(content=str(choice["text"])),
            finish_reason=choice.get("finish_reason") or "length",
        )
        for choice in state.choices
    ]
    return OpenAIChatCompletion(
        id=job.id, created=job.created, model=job.model, choices=choices, usage=_usage(state)
    )


def _event(job: ChatJob, choices: list[OpenAIChatCompletionChunkChoice], **extra: Any) -> str:
    chunk = OpenAIChatCompletionChunk(
        id=job.id, created=job.created, model=job.model, choices=choices, **extra
    )
    return f"data: {chunk.model_dump_json()}\n\n"


def _deltas(job: ChatJob, deltas: list[tuple[int, str]]) -> str:
    # One chunk per choice, as OpenAI sends them: a client reading choices[0] reads every chunk.
    return "".join(
        _event(
            job, [OpenAIChatCompletionChunkChoice(index=i, delta=OpenAIChatCompletionChunkDelta(content=t))]
        )
        for i, t in deltas
    )


def _error_event(error: AlignError) -> str:
    return f"data: {json.dumps(openai_error(error.to_body(), error.status))}\n\n"


def _ending(job: ChatJob, state: db.ChatState) -> str:
    """The last events of a stream whose job ended: each choice's finish reason, the usage, [DONE]; or the
    error of a job that did not succeed."""
    if state.status is not JobStatus.succeeded:
        return _error_event(job_failure(job.id, state.status, state.error_code, state.error_message))
    events = "".join(
        _event(
            job,
            [
                OpenAIChatCompletionChunkChoice(
                    index=int(choice["index"]),
                    delta=OpenAIChatCompletionChunkDelta(),
                    finish_reason=choice.get("finish_reason") or "length",
                )
            ],
        )
        for choice in state.choices
    )
    if job.include_usage:
        events += _event(job, [], usage=_usage(state))
    return events + "data: [DONE]\n\n"


async def _stream(ctx: AppContext, job: ChatJob, state: db.ChatState, deadline: float) -> AsyncIterator[str]:
    """The job's text as chat.completion.chunk events, what is new at each poll, until it ends. A client that
    disconnects (the task is cancelled), or the timeout, cancels the job."""
    sent = ["" for _ in range(job.n)]
    ended = False
    try:
        yield "".join(
            _event(
                job,
                [
                    OpenAIChatCompletionChunkChoice(
                        index=i, delta=OpenAIChatCompletionChunkDelta(role="assistant", content="")
                    )
                ],
            )
            for i in range(job.n)
        )
        while True:
            deltas = text_deltas(sent, state.choices)
            if deltas is None:
                yield _error_event(
                    AlignError(
                        f"The chat job {job.id} was run again after its worker stopped, and its new text differs "
                        "from what this stream sent; retry the request.",
                        code="chat_restarted",
                        status=500,
                    )
                )
                return
            if deltas:
                yield _deltas(job, deltas)
            if state.status.is_terminal:
                ended = True
                yield _ending(job, state)
                return
            if time.monotonic() > deadline:
                yield _error_event(_timed_out(job, ctx))
                return
            await asyncio.sleep(POLL_SECONDS)
            state = await asyncio.to_thread(db.chat_state, ctx.engine, job.id)
    finally:
        if not ended:  # cancelled mid-stream, or given up on: nobody reads the rest
            db.cancel_unfinished(ctx.engine, job.id)


@router.post(
    "",
    response_model=OpenAIChatCompletion,
    operation_id="openaiCreateChatCompletion",
    summary="Create a chat completion with a base or fine-tuned model (a small alignd chat job; seconds)",
    dependencies=[Depends(require_content_type("application/json"))],
    responses={
        **openai_error_responses(404, 409, 415, 429, 500, 504),
        200: {
            "description": "A chat.completion object, or with stream=true chat.completion.chunk server-sent "
            "events (data: {...}) ending with data: [DONE].",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
async def create_chat_completion(
    body: OpenAIChatCompletionCreate, request: Request, ctx: ContextDep, tenant: TenantDep
) -> Response | OpenAIChatCompletion:
    job = await asyncio.to_thread(_submit, ctx, tenant, body)
    deadline = time.monotonic() + ctx.settings.chat_timeout_seconds
    if not body.stream:
        return _completion(job, await _wait(ctx, request, job, deadline, until_started=False))
    # Streamed once the prompt is accepted: a request the child refuses is still a plain 400 before any event.
    state = await _wait(ctx, request, job, deadline, until_started=True)
    if state.status.is_terminal and state.status is not JobStatus.succeeded:
        raise job_failure(job.id, state.status, state.error_code, state.error_message)
    return StreamingResponse(
        _stream(ctx, job, state, deadline),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
