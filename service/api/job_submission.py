"""Submitting a job: the rules and the row, shared by ``POST /v1/jobs`` and the OpenAI facade's
``POST /openai/v1/fine_tuning/jobs`` (a facade job is an alignd job: one job system).

:func:`new_job_row` checks the tenant's queue cap and resolves the request (422s naming each field) into an
uncommitted row; the caller adds its own rows (events, the facade's record), commits, then :func:`enqueue`.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignd import validation
from sqlmodel import Session

from contract.evaluation import stored_hyperparameters
from service.api.deps import AppContext
from service.api.schemas import JobCreate
from service.core.errors import RateLimitedError
from service.core.ids import new_id, now
from service.core.jobs import JobStatus
from service.core.submission import resolve_job
from service.db.jobs import queued_jobs, resource_lookup
from service.db.tables import JobEventRow, JobRow
from service.queue import JobQueue, QueueUnavailable
from service.storage import ArtifactStore
from service.storage.keys import dataset_key

log = logging.getLogger(__name__)


def new_job_row(ctx: AppContext, session: Session, tenant: str, body: JobCreate) -> JobRow:
    """The job ``body`` asks for, resolved and with its "queued" event added to ``session``, not committed.

    Raises RateLimitedError (429) past the tenant's queued-jobs cap and ValidationFailed (422) for a request
    the submission rules refuse."""
    waiting = queued_jobs(session, tenant)
    if waiting >= ctx.settings.max_queued_jobs_per_tenant:
        raise RateLimitedError(
            f"{waiting} jobs are already queued for this tenant (limit {ctx.settings.max_queued_jobs_per_tenant}).",
            code="too_many_queued_jobs",
            headers={"Retry-After": "30"},
        )
    resolved = resolve_job(
        method=body.method,
        base_model=body.base_model,
        datasets=body.datasets.model_dump(),
        init_adapter=body.init_adapter,
        reward_model=body.reward_model,
        lora=body.lora.model_dump(exclude_none=True) if body.lora else None,
        hyperparameters=body.hyperparameters,
        seed=body.seed,
        lookup=resource_lookup(session, tenant),
        init_reward_model=body.init_reward_model,
        evaluation=body.evaluation,
        dataset_rows=lambda dataset_id: dataset_rows(ctx.store, dataset_id),
        resources=body.resources.model_dump(exclude_none=True) if body.resources else None,
        pool_max_processes=ctx.settings.pool_max_processes,
    )
    job = JobRow(
        id=new_id("job"),
        tenant=tenant,
        name=body.name,
        method=resolved.method.value,
        status=JobStatus.queued.value,
        base_model=resolved.base_model,
        datasets=resolved.datasets,
        init_adapter=resolved.init_adapter,
        reward_model=resolved.reward_model,
        init_reward_model=resolved.init_reward_model,
        round=body.round,
        hyperparameters=(
            resolved.stored_hyperparameters()
            if resolved.evaluation is None
            else stored_hyperparameters(resolved.evaluation)
        ),
        lora=resolved.lora,
        seed=resolved.seed,
        created_at=now(),
    )
    session.add(job)
    session.add(JobEventRow(job_id=job.id, created_at=job.created_at, level="info", message="Job queued."))
    return job


def enqueue(queue: JobQueue, job: JobRow) -> None:
    """Queue a committed job's id.

    The row is committed first and is the truth: if the queue is down the job is still accepted (202,
    `queued`) and the reconciler enqueues it once the queue is back. Answering 503 here would make a client
    retry and submit the job twice."""
    try:
        queue.enqueue(job.id, method=job.method, generation=job.lease_token)
    except QueueUnavailable as exc:
        log.warning(
            "job %s accepted while the queue is down (%s); the reconciler will enqueue it", job.id, exc
        )


def dataset_rows(store: ArtifactStore, dataset_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """A stored dataset's records, read where the store keeps the file or from a temporary download."""
    local = store.local_path(dataset_key(dataset_id))
    if local is not None:
        yield from validation.iter_records(local)
        return
    with tempfile.TemporaryDirectory(prefix="alignd-rows-") as folder:
        path = Path(folder) / "data.jsonl"
        store.get_to_path(dataset_key(dataset_id), path)
        yield from validation.iter_records(path)
