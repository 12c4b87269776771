"""The OpenAI facade's queries and its files' life: stored as sent, converted to alignd datasets when a job uses
them (service/core/openai_files.py), and the facade's jobs read next to the alignd jobs they are.

Every query filters on the tenant, so another tenant's file, job or model is "not found", as everywhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from alignd import validation
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from service.core.errors import ValidationFailed
from service.core.ids import new_id, now
from service.core.jobs import JobStatus
from service.core.openai_files import DATASET_KINDS, FileFormat, convert, file_issues
from service.db.datasets import store_validated_dataset
from service.db.jobs import request_cancel
from service.db.repository import PageRequest, find_owned, get_owned, paginate
from service.db.tables import (
    ArtifactRow,
    DatasetRow,
    JobEventRow,
    JobMetricRow,
    JobRow,
    ModelRow,
    OpenAIChatCompletionRow,
    OpenAIFileRow,
    OpenAIJobRow,
)
from service.db.usage import unfinished_jobs_using
from service.staging import open_staging, release_staging
from service.storage import ArtifactStore
from service.storage.keys import dataset_key, openai_file_key

# How many bad lines the 400's message spells out; all of them (up to 100) are in its details.
_MESSAGE_ISSUES = 3


# --- files


def store_file(
    session: Session, store: ArtifactStore, staged: Path, *, tenant: str, filename: str, sha256: str
) -> OpenAIFileRow:
    """Store an uploaded file and commit its row (storage first; the object goes if the row cannot be written)."""
    row = OpenAIFileRow(
        id=new_id("openai_file"),
        tenant=tenant,
        filename=filename[:256],
        purpose="fine-tune",
        size_bytes=staged.stat().st_size,
        sha256=sha256,
        created_at=now(),
    )
    store.put_file(openai_file_key(row.id), staged)
    session.add(row)
    try:
        session.commit()
    except BaseException:
        store.delete(openai_file_key(row.id))
        raise
    return row


def list_files(
    session: Session, tenant: str, page: PageRequest, *, ascending: bool
) -> tuple[list[OpenAIFileRow], bool]:
    statement = select(OpenAIFileRow).where(OpenAIFileRow.tenant == tenant)
    return paginate(session, statement, OpenAIFileRow, page, tenant, ascending=ascending)


def delete_file(session: Session, store: ArtifactStore, row: OpenAIFileRow) -> None:
    """Delete a file, and the datasets converted from it that no unfinished job uses (those stay alignd
    datasets, listed under /v1/datasets, until deleted there)."""
    datasets = [entry["id"] for entry in row.datasets.values()]
    session.delete(row)
    session.commit()
    store.delete(openai_file_key(row.id))
    for dataset_id in datasets:
        dataset = find_owned(session, DatasetRow, dataset_id, row.tenant)
        if dataset is not None and not unfinished_jobs_using(session, row.tenant, dataset_id=dataset_id):
            session.delete(dataset)
            session.commit()
            store.delete(dataset_key(dataset_id))


def _invalid_file(
    param: str, row: OpenAIFileRow, fmt: FileFormat, issues: list[validation.Issue]
) -> NoReturn:
    kind = DATASET_KINDS[fmt]
    if any(issue["code"] == validation.EMPTY_DATASET for issue in issues):
        message = f"{param}: file {row.id} has no records (it is empty or has only blank lines)."
    else:
        noun = "line" if len(issues) == 1 else "lines"
        shown = "; ".join(f"line {i['line']}: {i['code']}: {i['message']}" for i in issues[:_MESSAGE_ISSUES])
        more = f" (and {len(issues) - _MESSAGE_ISSUES} more)" if len(issues) > _MESSAGE_ISSUES else ""
        message = (
            f"{param}: {len(issues)} bad {noun} in file {row.id} read as {fmt.value} data (alignd's "
            f"'{kind}' dataset rules): {shown}{more}"
        )
    raise ValidationFailed(
        message, code=f"invalid_{param}", details=[{"field": param, **issue} for issue in issues]
    )


def file_dataset(
    session: Session,
    store: ArtifactStore,
    row: OpenAIFileRow,
    fmt: FileFormat,
    *,
    param: str,
    data_dir: Path,
) -> tuple[DatasetRow, dict[str, int]]:
    """The alignd dataset of ``row`` read in ``fmt``'s format, and the conversion's notes (counts behind the
    job's warning events): the one an earlier job made, or converted and validated now and remembered.

    Raises ValidationFailed (code ``invalid_<param>``, one detail per bad line with its number) when the file
    does not hold ``fmt``'s data by alignd's rules."""
    kind = DATASET_KINDS[fmt]
    cached = row.datasets.get(kind)
    if cached is not None:
        dataset = find_owned(session, DatasetRow, cached["id"], row.tenant)
        if dataset is not None:
            return dataset, dict(cached.get("notes") or {})
    staging = open_staging(data_dir, "openai")
    try:
        raw, converted = staging / "upload.jsonl", staging / "data.jsonl"
        local = store.local_path(openai_file_key(row.id))
        if local is None:
            store.get_to_path(openai_file_key(row.id), raw)
        with open(local or raw, "rb") as source, open(converted, "wb") as sink:
            conversion = convert(source, sink, fmt)
        report = validation.validate_path(converted, kind)
        issues = file_issues(conversion, report, fmt)
        if issues:
            _invalid_file(param, row, fmt, issues)
        name = f"{row.filename} ({row.id}, {fmt.value})"
        dataset = store_validated_dataset(
            session, store, converted, report, tenant=row.tenant, kind=kind, name=name
        )
    finally:
        release_staging(staging)
    notes = conversion.notes()
    row.datasets = {**row.datasets, kind: {"id": dataset.id, "notes": notes}}  # a new dict: JSON columns
    session.add(row)
    session.commit()
    return dataset, notes


# --- base and fine-tuned models


def base_model(session: Session, tenant: str, model: str) -> ModelRow | None:
    """The tenant's base model with this id, else the one with this name; ValidationFailed when the name is
    not unique (the id then says which)."""
    by_id = find_owned(session, ModelRow, model, tenant)
    if by_id is not None:
        return by_id
    named = list(session.exec(select(ModelRow).where(ModelRow.tenant == tenant, ModelRow.name == model)))
    if len(named) > 1:
        ids = ", ".join(row.id for row in named[:5])
        raise ValidationFailed(
            f"model: {len(named)} base models are named {model!r} ({ids}); give the id instead.",
            code="model_ambiguous",
            details=[{"field": "model", "code": "model_ambiguous", "message": ids}],
        )
    return named[0] if named else None


@dataclass(frozen=True)
class NamedModel:
    """What a request's ``model`` names: a base model, or a fine-tuned one (its base and its adapter)."""

    base_id: str
    base_name: str  # as it appears in ft:<base>:...
    adapter: str | None  # the fine-tuned model's adapter artifact; None for a base model


def model_named(session: Session, tenant: str, model: str) -> NamedModel | None:
    """The tenant's model a request names: a base model by id or name, or an ``ft:`` name of a succeeded
    facade job that has its adapter. None when it names none of them (or another tenant's)."""
    if model.startswith("ft:"):
        facade = fine_tuned(session, tenant, model)
        job = find_owned(session, JobRow, facade.id, tenant) if facade else None
        adapter = adapters(session, [job.id]).get(job.id) if job else None
        if job is None or job.status != JobStatus.succeeded or adapter is None:
            return None
        return NamedModel(job.base_model, model.split(":")[1], adapter.id)
    row = base_model(session, tenant, model)
    return NamedModel(row.id, row.name, None) if row is not None else None


def fine_tuned(session: Session, tenant: str, name: str) -> OpenAIJobRow | None:
    return session.exec(
        select(OpenAIJobRow).where(OpenAIJobRow.tenant == tenant, OpenAIJobRow.fine_tuned_model == name)
    ).first()


class AdapterInfo(NamedTuple):
    id: str
    trained_tokens: int | None  # from the adapter's final metrics, where the method counts them (sft)


def adapters(session: Session, job_ids: Sequence[str]) -> dict[str, AdapterInfo]:
    """Each job's newest adapter artifact (a succeeded sft, dpo or grpo job has exactly one)."""
    if not job_ids:
        return {}
    rows = session.exec(
        select(ArtifactRow.job_id, ArtifactRow.id, ArtifactRow.meta)
        .where(col(ArtifactRow.job_id).in_(list(job_ids)), ArtifactRow.kind == "adapter")
        .order_by(col(ArtifactRow.seq))
    ).all()
    out = {}
    for job_id, artifact_id, meta in rows:
        tokens = ((meta or {}).get("metrics") or {}).get("trained_tokens")
        out[job_id] = AdapterInfo(artifact_id, int(tokens) if isinstance(tokens, int | float) else None)
    return out


def succeeded_fine_tunes(session: Session, tenant: str) -> list[tuple[OpenAIJobRow, JobRow]]:
    """The tenant's facade jobs that succeeded (their fine-tuned models), oldest first."""
    rows = session.exec(
        select(OpenAIJobRow, JobRow)
        .join(JobRow, col(JobRow.id) == col(OpenAIJobRow.id))
        .where(OpenAIJobRow.tenant == tenant, JobRow.status == JobStatus.succeeded.value)
        .order_by(col(OpenAIJobRow.seq))
    ).all()
    return [(facade, job) for facade, job in rows]


# --- chat completions


@dataclass(frozen=True)
class ChatState:
    """A chat job as the request that made it polls it: the job's status and error, the output so far."""

    status: JobStatus
    error_code: str | None
    error_message: str | None
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None


def chat_state(engine: Engine, job_id: str) -> ChatState:
    """Read in one statement: the runner stores a chat job's last output before it ends the job, so a
    finished status comes with the final output."""
    statement = (
        sa_select(
            col(JobRow.status),
            col(JobRow.error_code),
            col(JobRow.error_message),
            col(OpenAIChatCompletionRow.choices),
            col(OpenAIChatCompletionRow.usage),
        )
        .join(OpenAIChatCompletionRow, col(OpenAIChatCompletionRow.id) == col(JobRow.id))
        .where(col(JobRow.id) == job_id)
    )
    with engine.connect() as connection:
        status, code, message, choices, usage = connection.execute(statement).one()
    return ChatState(JobStatus(status), code, message, list(choices or []), usage)


def cancel_unfinished(engine: Engine, job_id: str) -> None:
    """Cancel a chat job nobody waits for any more (its client went away, or it ran out of time)."""
    with Session(engine, expire_on_commit=False) as session:
        job = session.exec(select(JobRow).where(JobRow.id == job_id)).first()
        if job is not None and not JobStatus(job.status).is_terminal:
            request_cancel(session, job)


# --- jobs


def facade_job(session: Session, tenant: str, job_id: str) -> tuple[OpenAIJobRow, JobRow]:
    """The tenant's facade job: its OpenAI record and the alignd job it is. 404 for an alignd job made through
    /v1 (it has no OpenAI fields to answer) and for another tenant's."""
    facade = get_owned(session, OpenAIJobRow, job_id, tenant, "fine_tuning_job")
    return facade, get_owned(session, JobRow, job_id, tenant, "fine_tuning_job")


def list_facade_jobs(
    session: Session, tenant: str, page: PageRequest
) -> tuple[list[tuple[OpenAIJobRow, JobRow]], bool]:
    facades, has_more = paginate(
        session, select(OpenAIJobRow).where(OpenAIJobRow.tenant == tenant), OpenAIJobRow, page, tenant
    )
    ids = [facade.id for facade in facades]
    jobs = {job.id: job for job in session.exec(select(JobRow).where(col(JobRow.id).in_(ids)))}
    return [(facade, jobs[facade.id]) for facade in facades if facade.id in jobs], has_more


def events_page(
    session: Session, job_id: str, *, after: int | None, limit: int
) -> tuple[list[JobEventRow], bool]:
    """A job's events newest first (OpenAI's order); ``after``: the seq of the last event already seen."""
    statement = select(JobEventRow).where(JobEventRow.job_id == job_id)
    if after is not None:
        statement = statement.where(col(JobEventRow.seq) < after)
    rows = list(session.exec(statement.order_by(col(JobEventRow.seq).desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def checkpoint_artifacts(
    session: Session, tenant: str, job_id: str, page: PageRequest
) -> tuple[list[ArtifactRow], bool]:
    """A job's resumable checkpoints and its final adapter, newest first."""
    statement = select(ArtifactRow).where(
        ArtifactRow.job_id == job_id, col(ArtifactRow.kind).in_(["checkpoint", "adapter"])
    )
    return paginate(session, statement, ArtifactRow, page, tenant)


def metric_series(session: Session, job_id: str, name: str) -> dict[int, float]:
    """One metric of a job by step (the newest value when a resumed run logged a step again)."""
    rows = session.exec(
        select(JobMetricRow.step, JobMetricRow.value)
        .where(JobMetricRow.job_id == job_id, JobMetricRow.name == name)
        .order_by(col(JobMetricRow.seq))
    ).all()
    return {step: value for step, value in rows}


def artifact_step(artifact: ArtifactRow) -> int:
    """The training step an adapter or checkpoint artifact was saved at (0 when it does not say)."""
    meta: dict[str, Any] = artifact.meta or {}
    step: Any = meta.get("step")
    if step is None:
        step = (meta.get("metrics") or {}).get("steps")
    with contextlib.suppress(TypeError, ValueError):
        return int(step)
    return 0
