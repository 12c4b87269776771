"""Live SSE streams over the database: the tenant's job list and one job's metric points.

The database is the bus (as for ``GET /v1/jobs/{id}/events``): each stream polls its rows in a worker thread
every :data:`SSE_POLL_SECONDS`, so any API replica can serve any stream, and a browser that reconnects resumes
from what it last saw. No schema change is needed: the job list compares an in-memory snapshot of the fields a
list shows, and metric points are resumed by their row's ``seq``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sqlalchemy import func, or_
from sqlmodel import Session, col, select

from service.api.deps import AppContext, Page
from service.api.schemas import JobPublic, MetricPublic
from service.core.jobs import TERMINAL_STATUSES, JobStatus
from service.db.repository import list_owned
from service.db.tables import JobMetricRow, JobRow

SSE_POLL_SECONDS = 0.5
SSE_KEEPALIVE_SECONDS = 15.0
METRIC_BATCH = 1000
ACTIVE_STATUSES = tuple(s.value for s in JobStatus if s not in TERMINAL_STATUSES)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Clock:
    """When the stream last wrote something, so an idle stream sends a keep-alive comment now and then."""

    def __init__(self) -> None:
        self.last_sent = asyncio.get_running_loop().time()

    def sent(self) -> None:
        self.last_sent = asyncio.get_running_loop().time()

    def keep_alive_due(self) -> bool:
        return asyncio.get_running_loop().time() - self.last_sent > SSE_KEEPALIVE_SECONDS


# --- the job list


@dataclass(frozen=True)
class JobFilter:
    """The JSON list's filters; ``round`` never changes on a row, ``status`` does (checked in Python)."""

    tenant: str
    status: JobStatus | None
    round: int | None

    def matches(self, row: JobRow) -> bool:
        return self.status is None or row.status == self.status.value


def _snapshot(row: JobRow) -> tuple[Any, ...]:
    """The fields whose change the stream reports (started_at and finished_at move with the status)."""
    monitors = json.dumps(row.monitors or [], sort_keys=True, default=str)
    return (row.status, row.stage, row.progress, row.round, row.status_reason, row.error_code,
            row.error_message, monitors, row.pause_requested)  # fmt: skip


@dataclass
class _JobWatch:
    """What the stream has seen: each job's snapshot, and the highest job seq read (new rows lie above it)."""

    snapshots: dict[str, tuple[Any, ...]]
    max_seq: int
    active: set[str]  # ids last seen queued or running: the only rows that can still change

    def changed(self, rows: Sequence[JobRow], where: JobFilter) -> list[JobRow]:
        """The rows to send: new ones that match, and known ones whose snapshot moved (a job that leaves a
        status filter is sent once more, with the status that took it out, so a client can drop it)."""
        out = []
        for row in rows:
            self.max_seq = max(self.max_seq, row.seq or 0)
            if row.status in ACTIVE_STATUSES:
                self.active.add(row.id)
            else:
                self.active.discard(row.id)
            snapshot = _snapshot(row)
            before = self.snapshots.get(row.id)
            if before == snapshot:
                continue
            was_listed = before is not None and (where.status is None or before[0] == where.status.value)
            self.snapshots[row.id] = snapshot
            if where.matches(row) or was_listed:
                out.append(row)
        return out


def first_page(session: Session, where: JobFilter, page: Page) -> tuple[list[JobRow], _JobWatch]:
    """The list as the JSON endpoint gives it, and a watch primed with every row that could change later
    (so a running job beyond the first page is reported when it changes, not the moment the stream opens).

    Read in the request, before the stream starts: a bad cursor is still a 422, not a broken stream."""
    # max seq first: a job inserted after it is read is picked up by the first poll, never lost between.
    max_seq = session.exec(select(func.max(JobRow.seq)).where(JobRow.tenant == where.tenant)).one()
    status = where.status.value if where.status is not None else None
    rows, _ = list_owned(session, JobRow, page, where.tenant, status=status, round=where.round)
    active = select(JobRow).where(JobRow.tenant == where.tenant, col(JobRow.status).in_(ACTIVE_STATUSES))
    if where.round is not None:
        active = active.where(JobRow.round == where.round)
    watch = _JobWatch(snapshots={}, max_seq=max_seq or 0, active=set())
    watch.changed([*rows, *session.exec(active).all()], where)
    return rows, watch


def _poll_jobs(ctx: AppContext, where: JobFilter, watch: _JobWatch) -> list[JobRow]:
    """Rows that are new, still active, or were active at the last poll (the ones that may have just ended)."""
    with Session(ctx.engine, expire_on_commit=False) as session:
        maybe_changed = or_(
            col(JobRow.seq) > watch.max_seq,
            col(JobRow.status).in_(ACTIVE_STATUSES),
            col(JobRow.id).in_(sorted(watch.active)),
        )
        statement = select(JobRow).where(JobRow.tenant == where.tenant, maybe_changed)
        if where.round is not None:
            statement = statement.where(JobRow.round == where.round)
        return list(session.exec(statement.order_by(col(JobRow.seq))).all())


def _job_event(row: JobRow) -> str:
    return f"event: job\ndata: {JobPublic.of(row).model_dump_json()}\n\n"


async def stream_jobs(
    ctx: AppContext, where: JobFilter, first: tuple[list[JobRow], _JobWatch], request: Request
) -> AsyncIterator[str]:
    """``event: job`` for each job of the first page (newest first), then for every job created or changed."""
    clock = _Clock()
    rows, watch = first
    for row in rows:
        yield _job_event(row)
    clock.sent()
    while True:
        if await request.is_disconnected():
            return
        await asyncio.sleep(SSE_POLL_SECONDS)
        for row in watch.changed(await asyncio.to_thread(_poll_jobs, ctx, where, watch), where):
            yield _job_event(row)
            clock.sent()
        if clock.keep_alive_due():
            yield ": keep-alive\n\n"
            clock.sent()


# --- one job's metric points


def metric_points(rows: Sequence[JobMetricRow]) -> list[MetricPublic]:
    return [
        MetricPublic(seq=row.seq or 0, stage=row.stage, step=row.step, name=row.name, value=row.value)
        for row in rows
    ]


def metrics_after(
    session: Session, job_id: str, *, after: int | None, name: str | None, limit: int | None = None
) -> list[JobMetricRow]:
    statement = select(JobMetricRow).where(JobMetricRow.job_id == job_id)
    if after is not None:
        statement = statement.where(col(JobMetricRow.seq) > after)
    if name is not None:
        statement = statement.where(JobMetricRow.name == name)
    statement = statement.order_by(col(JobMetricRow.seq))
    if limit is not None:
        statement = statement.limit(limit)
    return list(session.exec(statement).all())


def _poll_metrics(
    ctx: AppContext, job_id: str, after: int, name: str | None
) -> tuple[list[JobMetricRow], str | None]:
    with Session(ctx.engine, expire_on_commit=False) as session:
        # Status first, then points: a terminal status read before the last points were written cannot end the
        # stream early, because it ends only on a terminal status with no new rows (as the events stream).
        status = session.exec(select(JobRow.status).where(JobRow.id == job_id)).first()
        return metrics_after(session, job_id, after=after, name=name, limit=METRIC_BATCH), status


async def stream_metrics(
    ctx: AppContext, job_id: str, after: int, name: str | None, request: Request
) -> AsyncIterator[str]:
    """``event: metrics`` batches (``id`` the last point's seq) until the job has ended and all were sent."""
    clock = _Clock()
    while True:
        rows, status = await asyncio.to_thread(_poll_metrics, ctx, job_id, after, name)
        if rows:
            after = rows[-1].seq or after
            body = json.dumps({"data": [point.model_dump(mode="json") for point in metric_points(rows)]})
            yield f"id: {after}\nevent: metrics\ndata: {body}\n\n"
            clock.sent()
        if status is None or (JobStatus(status).is_terminal and not rows):
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if await request.is_disconnected():
            return
        if clock.keep_alive_due():
            yield ": keep-alive\n\n"
            clock.sent()
        if len(rows) < METRIC_BATCH:  # a full batch: more may be waiting, read again at once
            await asyncio.sleep(SSE_POLL_SECONDS)
