"""The app factory: ``create_app(settings)`` wires database, storage, queue and routes.

No worker code here: embedded mode gets its in-process runner from the composition root
(``alignd_server.embedded``) through ``create_app(runner_factory=...)``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract.methods import Method
from service import __version__
from service.api.auth import Authenticate, DatabaseKeys, is_protected
from service.api.console import ConsoleFiles, ConsoleHeaders, console_router
from service.api.deps import AppContext, InProcessRunner, RunnerFactory
from service.api.errors import install_error_handlers
from service.api.gc_policy import freeze_startup_heap, release_startup_heap
from service.api.idempotency import Idempotency
from service.api.input_policy import InputPolicy
from service.api.label_page import label_router
from service.api.openai_errors import OpenAIErrors
from service.api.routes import (
    artifacts,
    datasets,
    feedback_sets,
    graders,
    health,
    jobs,
    models,
    openai_chat,
    openai_files,
    openai_graders,
    openai_jobs,
    openai_models,
)
from service.api.startup import MigrationStartup
from service.api.uploads import BodySizeLimit, upload_limits
from service.core.errors import ServiceUnavailableError
from service.db.session import make_engine
from service.logs import request_id_var
from service.metrics import ApiMetrics
from service.queue import JobQueue
from service.queue.inline import InlineQueue
from service.reconciler import Reconciler
from service.settings import Settings
from service.staging import sweep_staging
from service.storage import open_store

log = logging.getLogger(__name__)

MISSING_RUNNER = (
    "embedded mode (ALIGND_QUEUE=inline) runs jobs in this process and needs a runner: start it with "
    "`alignd-server serve` (alignd_server.embedded.create_app), or set ALIGND_QUEUE=arq"
)


def _open_queue(settings: Settings, runner: InProcessRunner | None) -> JobQueue:
    if settings.queue == "arq":
        from service.queue.arq import ArqQueue

        return ArqQueue(settings.redis_url, methods=[method.value for method in Method])
    assert runner is not None
    return InlineQueue(runner.run, concurrency=settings.worker_concurrency)


class RequestContext:
    """Pure ASGI middleware: request id (context var + X-Request-ID header), per-route metrics, and 503 on /v1
    (and the OpenAI facade's /openai/v1) until the schema is in place.

    Pure ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs every request
    through an extra task and memory streams, which cost about a fifth of a GET's server CPU here.
    """

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope.get("headers") or ():
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        rid = rid or f"req_{secrets.token_hex(8)}"
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            ctx: AppContext | None = getattr(scope["app"].state, "ctx", None)
            if ctx is not None and not ctx.startup.ready.is_set() and is_protected(scope["path"]):
                error = ServiceUnavailableError(
                    "The database is unreachable (schema not applied yet); retry shortly.",
                    code="database_unavailable",
                )
                response = JSONResponse(status_code=503, content=error.to_body(), headers=error.headers)
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe(scope["method"], template, status, elapsed)
            log.debug("%s %s -> %s in %.1f ms", scope["method"], scope["path"], status, elapsed * 1000)
            request_id_var.reset(token)


def create_app(settings: Settings | None = None, *, runner_factory: RunnerFactory | None = None) -> FastAPI:
    """The API. ``runner_factory`` builds the in-process runner embedded mode (ALIGND_QUEUE=inline) needs;
    the service never imports the workers, so ``alignd_server.embedded.create_app`` supplies it."""
    settings = settings or Settings()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Checked at start, not in create_app: an app built without a runner still serves its OpenAPI.
        if settings.queue == "inline" and runner_factory is None:
            raise RuntimeError(MISSING_RUNNER)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # What a server killed mid-upload left half-written (the reconciler sweeps again on every pass).
        await asyncio.to_thread(
            sweep_staging, settings.data_dir, older_than=settings.staging_sweep_after_seconds
        )
        engine = make_engine(settings.resolved_database_url)
        store = open_store(settings.resolved_storage_url, s3_endpoint_url=settings.s3_endpoint_url)
        runner: InProcessRunner | None = None
        if settings.queue == "inline" and runner_factory is not None:
            # Embedded mode runs jobs in this process; with arq the API only enqueues ids.
            runner = runner_factory(settings, engine, store)
        queue = _open_queue(settings, runner)
        reconciler = Reconciler(
            engine,
            queue,
            interval=settings.reconcile_interval_seconds,
            max_tries=settings.job_max_tries,
            store=store,
            data_dir=settings.data_dir,
            staging_sweep_after=settings.staging_sweep_after_seconds,
        )

        def start_work() -> None:
            queue.start()
            reconciler.start()

        startup = MigrationStartup(engine, retry_seconds=settings.db_retry_seconds, then=start_work)
        app.state.ctx = AppContext(
            settings=settings,
            engine=engine,
            store=store,
            queue=queue,
            startup=startup,
            runner=runner,
            tenant_keys=settings.tenant_keys(),
            api_keys=DatabaseKeys(engine),
        )
        metrics.watch_state(lambda: engine if startup.ready.is_set() else None, queue.depth)
        await asyncio.to_thread(startup.start)
        if settings.gc_freeze:
            freeze_startup_heap()
        try:
            yield
        finally:
            if settings.gc_freeze:
                release_startup_heap()
            startup.stop()
            reconciler.stop()
            if runner is not None:
                runner.shutdown()
            queue.stop()
            engine.dispose()

    app = FastAPI(
        title="alignd",
        version=__version__,
        summary="Self-hosted alignment-as-a-service: SFT, reward models, PPO, DPO and RLHF with LoRA.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Routes are matched in order, one by one: jobs first, since GET /v1/jobs/{id} is what clients poll.
    for router in (
        jobs.router,
        health.router,
        models.router,
        datasets.router,
        artifacts.router,
        feedback_sets.router,
        graders.router,
        # The OpenAI-compatible facade (docs/openai.md): its own prefix, never clashing with /v1.
        openai_jobs.router,
        openai_files.router,
        openai_models.router,
        openai_graders.router,
        openai_chat.router,
    ):
        app.include_router(router)
    # The web console and the labeling page: files read once here, named by their content hash.
    static = ConsoleFiles()
    app.include_router(console_router(static))
    app.include_router(label_router(static))

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # The last added runs first: request context, then the key check (401 before any body is read), then
    # the tenant's body cap, then the input policy (422 for a path, query or JSON body that is not text or
    # holds a non-finite number, before a key is reserved), then idempotency (it hashes the capped body on
    # its way to the route). Outermost, the OpenAI facade's error shape, whichever of them answered.
    app.add_middleware(
        Idempotency,
        ttl_seconds=settings.idempotency_ttl_hours * 3600,
        lock_seconds=settings.idempotency_lock_seconds,
    )
    app.add_middleware(InputPolicy)
    app.add_middleware(BodySizeLimit, limits=upload_limits(settings))
    app.add_middleware(Authenticate, tenant_keys=settings.tenant_keys())
    app.add_middleware(RequestContext, metrics=metrics)
    app.add_middleware(OpenAIErrors)
    app.add_middleware(ConsoleHeaders)
    return app
