"""Liveness and readiness."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import ContextDep
from service.api.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic, operation_id="healthz", summary="The process is alive")
async def healthz() -> HealthPublic:
    return HealthPublic(status="ok")


def _check_all(ctx: ContextDep) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with ctx.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        if not ctx.startup.ready.is_set():
            checks["database"] = "unavailable: schema not applied yet (migrations retrying)"
        else:
            checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    for name, ping in (("storage", ctx.store.ping), ("queue", ctx.queue.ping)):
        try:
            ping()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {exc}"
    return checks


@router.get(
    "/readyz",
    response_model=HealthPublic,
    operation_id="readyz",
    summary="Database, storage and queue reachable (else 503, naming which)",
    responses={503: {"model": HealthPublic, "description": "A dependency is unreachable."}},
)
async def readyz(ctx: ContextDep) -> HealthPublic | JSONResponse:
    checks = await asyncio.to_thread(_check_all, ctx)
    if all(value == "ok" for value in checks.values()):
        return HealthPublic(status="ok", checks=checks)
    body = HealthPublic(status="unavailable", checks=checks)
    return JSONResponse(status_code=503, content=body.model_dump(), headers={"Retry-After": "5"})
