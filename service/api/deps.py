"""Annotated dependencies: the per-request database session, the caller's tenant, the store and the queue.

The dependencies that never block (context, tenant, store, queue, page) are ``async def``: FastAPI runs a
plain ``def`` dependency in its thread pool, one hop per dependency per request, and on a polled endpoint
those hops (and the GIL traffic of 40 pool threads at high concurrency) cost more than the query.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import bindparam
from sqlalchemy.engine import Engine, Row
from sqlmodel import Session, SQLModel, select

from service.api.auth import DatabaseKeys, resolve_tenant, tenant_for, tenant_of_scope
from service.api.startup import MigrationStartup
from service.core.errors import NotFoundError
from service.queue import JobQueue
from service.settings import Settings
from service.storage import ArtifactStore

RowT = TypeVar("RowT", bound=SQLModel)


class InProcessRunner(Protocol):
    """Runs a job by id in this process: what embedded mode (ALIGND_QUEUE=inline) hands its queue.

    ``workers.runner.JobRunner`` is one; the service never imports it; the composition root
    (``alignd_server.embedded``) passes a :data:`RunnerFactory` to ``create_app``.
    """

    def run(self, job_id: str) -> object: ...

    def shutdown(self) -> None: ...


# Called once in the app's lifespan, with the engine and store it opened: the runner shares both.
RunnerFactory = Callable[[Settings, Engine, ArtifactStore], InProcessRunner]


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    store: ArtifactStore
    queue: JobQueue
    startup: MigrationStartup
    runner: InProcessRunner | None = None  # embedded mode only; with arq the API only enqueues ids
    tenant_keys: dict[str, str] = field(default_factory=dict)
    api_keys: DatabaseKeys | None = None  # the database's keys (alignd-server keys), beside tenant_keys


def get_context_of(request: Request) -> AppContext:
    return request.app.state.ctx  # type: ignore[no-any-return,unused-ignore]


async def get_context(request: Request) -> AppContext:
    return get_context_of(request)


ContextDep = Annotated[AppContext, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    with Session(ctx.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_tenant(request: Request, ctx: ContextDep) -> str:
    tenant = tenant_of_scope(request.scope)
    if tenant is not None:
        return tenant
    # A route outside the auth middleware's prefixes: the same rule, the environment's keys then the database's.
    return await resolve_tenant(request.headers.get("authorization"), ctx.tenant_keys, ctx.api_keys)


TenantDep = Annotated[str, Depends(get_tenant)]


def authenticate(request: Request, ctx: AppContext) -> str:
    """The caller's tenant for hot ``/v1`` endpoints that skip ``TenantDep``: the one the auth middleware found
    before the body was read. Outside its prefixes only ALIGND_API_KEYS's keys are known here (the database's
    need an await): such routes take ``TenantDep``."""
    tenant = tenant_of_scope(request.scope)
    return tenant if tenant is not None else tenant_for(request.headers.get("authorization"), ctx.tenant_keys)


async def get_store(ctx: ContextDep) -> ArtifactStore:
    return ctx.store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


async def get_queue(ctx: ContextDep) -> JobQueue:
    return ctx.queue


QueueDep = Annotated[JobQueue, Depends(get_queue)]


@dataclass
class Page:
    limit: int
    after: str | None


async def get_page(
    limit: Annotated[int, Query(ge=1, le=100, description="Page size (1..100).")] = 20,
    after: Annotated[str | None, Query(description="Return items after this id (cursor).")] = None,
) -> Page:
    return Page(limit=limit, after=after)


PageDep = Annotated[Page, Depends(get_page)]


@functools.cache
def _owned_row_statement(table: Any) -> Any:
    # Built once per table with bound parameters: SQLAlchemy's compiled cache then serves every request.
    columns = table.__table__.c
    return select(table.__table__).where(columns.id == bindparam("id"), columns.tenant == bindparam("tenant"))


async def read_owned(
    ctx: AppContext, table: type[SQLModel], resource_id: str, tenant: str, kind: str
) -> Row[Any]:
    """The tenant's row with this id as a plain Core row (attributes named like the table's columns).

    For ``async def`` endpoints on hot polled paths (``GET /v1/jobs/{id}``, which the SDK's wait() polls):
    a Core query with a prebuilt statement costs a fraction of an ORM session's select, and SQLite, a local
    file read in WAL mode (readers never wait for the writer), runs right here on the event loop without a
    thread hop. A networked database runs in the thread pool, so a slow or unreachable server can never
    stall the loop. Another tenant's id is indistinguishable from a missing one, as in :func:`service.db.repository.get_owned`.
    """

    def run() -> Row[Any] | None:
        with ctx.engine.connect() as connection:
            return connection.execute(
                _owned_row_statement(table), {"id": resource_id, "tenant": tenant}
            ).first()

    row = run() if ctx.engine.dialect.name == "sqlite" else await run_in_threadpool(run)
    if row is None:
        raise NotFoundError.for_resource(kind, resource_id)
    return row
