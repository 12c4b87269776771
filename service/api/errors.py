"""Documented error responses for the OpenAPI contract, and the exception -> JSON mapping."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.schemas import ErrorBody
from service.core.errors import AlignError, ServiceUnavailableError
from service.queue import QueueUnavailable
from service.storage import StorageUnavailable

log = logging.getLogger(__name__)

_DESCRIPTIONS = {
    400: "Malformed request (e.g. a body that is not JSON).",
    401: "Missing or invalid API key.",
    404: "No such resource for this tenant.",
    409: "Conflicts with the resource's state.",
    413: "Body larger than the configured cap.",
    415: "Wrong Content-Type.",
    422: "Well-formed but invalid: the code and details say what and where.",
    429: "Too many requests or queued jobs; retry after Retry-After seconds.",
    503: "A dependency (database, queue, storage) is unreachable; retry after Retry-After seconds.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the error statuses a route can answer.

    401, 422 and 503 are always possible on /v1 routes; listing 422 here also replaces FastAPI's default
    validation schema with ours, which is what the exception handler really answers.
    """
    codes = sorted({*statuses, 401, 422, 503})
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def _json(
    status: int,
    code: str,
    message: str,
    details: list[Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"code": code, "message": message, "details": details or []}},
        headers=headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AlignError)
    async def _align_error(_request: Request, exc: AlignError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content=exc.to_body(), headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return _json(400, "invalid_json", "The request body is not valid JSON.")
        details = []
        for err in errors:
            loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path")]
            code = (
                "unknown_field" if err.get("type") == "extra_forbidden" else str(err.get("type", "invalid"))
            )
            details.append({"field": ".".join(loc), "code": code, "message": str(err.get("msg", ""))})
        summary = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details[:5])
        return _json(422, "invalid_request", f"Invalid request: {summary}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return _json(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    async def _unavailable(code: str, message: str) -> JSONResponse:
        error = ServiceUnavailableError(message, code=code)
        return JSONResponse(status_code=503, content=error.to_body(), headers=error.headers)

    @app.exception_handler(OperationalError)
    async def _db_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        return await _unavailable("database_unavailable", "The database is unreachable; retry shortly.")

    @app.exception_handler(DBAPIError)
    async def _db_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return await _unavailable(
                "database_unavailable", "The database connection was lost; retry shortly."
            )
        if isinstance(exc, DataError):
            # The last line behind service/api/input_policy.py: a value the database refuses (PostgreSQL: NUL
            # in text, a byte sequence invalid in its encoding, a number out of its column's range) came with
            # the request. Logged with its traceback, since a route that let one through needs a fix.
            log.warning("database refused a value (answered 422): %s", exc.orig, exc_info=exc)
            return _json(
                422,
                "invalid_data",
                "The database refused a value of this request (a NUL character, text that is not valid in its "
                "encoding, or a number out of range).",
            )
        log.exception("database error")
        return _json(500, "internal_error", "Internal database error.")

    @app.exception_handler(UnicodeEncodeError)
    async def _not_text(_request: Request, exc: UnicodeEncodeError) -> JSONResponse:
        # A lone surrogate cannot be encoded as UTF-8: the database driver binding it (psycopg and sqlite3
        # raise this, not a database error) or the response echoing it fails. The input policy refuses them
        # in requests and the dataset validator in files, so one here came from data stored before those.
        if exc.reason != "surrogates not allowed":
            raise exc
        log.warning("text with an unpaired surrogate (answered 422)", exc_info=exc)
        return _json(
            422,
            "invalid_characters",
            "A value of this request, or data it reads, holds an unpaired surrogate, which is not text.",
        )

    @app.exception_handler(StorageUnavailable)
    async def _storage_down(_request: Request, exc: StorageUnavailable) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return await _unavailable("storage_unavailable", "Artifact storage is unreachable; retry shortly.")

    @app.exception_handler(QueueUnavailable)
    async def _queue_down(_request: Request, exc: QueueUnavailable) -> JSONResponse:
        log.warning("queue unavailable: %s", exc)
        return await _unavailable("queue_unavailable", "The job queue is unreachable; retry shortly.")
