"""Request-level guards for uploads: Content-Type checks and a streaming body-size cap."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.exceptions import HTTPException

from service.api.auth import tenant_of_scope
from service.api.input_policy import form_problems, refusal
from service.core.errors import UnsupportedMediaTypeError
from service.settings import Settings

# Multipart framing and form fields on top of the file bytes themselves.
MULTIPART_OVERHEAD = 1 << 20
JSON_BODY_LIMIT = 1 << 20


FORM_MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def require_content_type(expected: str) -> Callable[[Request], Awaitable[None]]:
    """A route dependency: 415 unless the request's media type is ``expected``. For a form type it also
    refuses (422 ``invalid_characters``) form field names and values and filenames that are not text: the
    input policy's form half (service/api/input_policy.py), here because FastAPI has parsed the form by the
    time a route's dependencies run, and a streamed multipart body is never buffered in front of it."""

    async def check(request: Request) -> None:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != expected:
            raise UnsupportedMediaTypeError(
                f"Expected Content-Type {expected}, got {content_type or 'none'}.",
                code="unsupported_media_type",
            )
        if expected in FORM_MEDIA_TYPES:
            details = form_problems(await request.form())  # FastAPI's parsed form, not a second parse
            if details:
                raise refusal(details)

    return check


# (method, path, tenant or None on an unauthenticated path) -> the largest body accepted, in bytes.
BodyLimits = Callable[[str, str, str | None], int]


def upload_limits(settings: Settings) -> BodyLimits:
    """The body caps per route: the upload routes get their tenant's cap plus multipart framing, the rest
    JSON_BODY_LIMIT. A tenant's cap (ALIGND_TENANT_MAX_*_BYTES) only ever lowers the server-wide one."""

    def limit(_method: str, path: str, tenant: str | None) -> int:
        route = path.rstrip("/")
        if route in ("/v1/datasets", "/openai/v1/files"):  # a facade file becomes a dataset
            cap = settings.max_dataset_bytes if tenant is None else settings.dataset_cap(tenant)
            return cap + MULTIPART_OVERHEAD
        if route == "/v1/models":
            cap = settings.max_model_bytes if tenant is None else settings.model_cap(tenant)
            return cap + MULTIPART_OVERHEAD
        return JSON_BODY_LIMIT

    return limit


class BodySizeLimit:
    """Pure ASGI middleware: refuse bodies over the cap for their route, before and while they stream.

    Starlette spools multipart files to disk with no size limit, so the cap must sit in front of it; it sits
    after authentication, whose tenant picks the cap.
    """

    def __init__(self, app: Any, *, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limits(scope["method"], scope["path"], tenant_of_scope(scope))
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, limit)
            return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException passes through FastAPI's body parsing unchanged (others become 400).
                    raise HTTPException(413, detail=_too_large_message(limit))
            return message

        await self.app(scope, limited_receive, send)


def _too_large_message(limit: int) -> str:
    return f"Request body exceeds the limit of {limit} bytes."


async def _send_413(send: Any, limit: int) -> None:
    import json

    body = json.dumps(
        {"error": {"code": "payload_too_large", "message": _too_large_message(limit), "details": []}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
