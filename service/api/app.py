"""The app factory: ``create_app(settings)`` wires database, storage, queue and routes."""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from service import __version__
from service.api.deps import AppContext
from service.api.errors import install_error_handlers
from service.api.routes import artifacts, datasets, health, jobs, models
from service.api.uploads import JSON_BODY_LIMIT, MULTIPART_OVERHEAD, BodySizeLimit
from service.db.session import make_engine, migrate
from service.queue.inline import InlineQueue
from service.reconciler import Reconciler
from service.settings import Settings
from service.storage import open_store
from workers.runner import JobRunner

log = logging.getLogger(__name__)


def _body_limits(settings: Settings) -> Callable[[str, str], int]:
    def limit(_method: str, path: str) -> int:
        if path.rstrip("/") == "/v1/datasets":
            return settings.max_dataset_bytes + MULTIPART_OVERHEAD
        if path.rstrip("/") == "/v1/models":
            return settings.max_model_bytes + MULTIPART_OVERHEAD
        return JSON_BODY_LIMIT

    return limit


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url)
        migrate(engine)
        store = open_store(settings.resolved_storage_url, s3_endpoint_url=settings.s3_endpoint_url)
        worker_id = f"{socket.gethostname()}-{secrets.token_hex(3)}"
        runner = JobRunner(settings=settings, engine=engine, store=store, worker_id=worker_id)
        queue = InlineQueue(runner.run, concurrency=settings.worker_concurrency)
        ctx = AppContext(
            settings=settings, engine=engine, store=store, queue=queue, tenant_keys=settings.tenant_keys()
        )
        ctx.extras["runner"] = runner
        app.state.ctx = ctx
        queue.start()
        reconciler = Reconciler(engine, queue)
        reconciler.start()
        try:
            yield
        finally:
            reconciler.stop()
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
    for router in (health.router, models.router, datasets.router, jobs.router, artifacts.router):
        app.include_router(router)

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = request.headers.get("x-request-id") or f"req_{secrets.token_hex(8)}"
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        log.debug(
            "%s %s -> %s in %.1f ms",
            request.method,
            request.url.path,
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response

    app.add_middleware(BodySizeLimit, limits=_body_limits(settings))
    return app
