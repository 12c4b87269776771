"""OpenAI's error shape for everything under ``/openai/``, whichever layer answered.

alignd answers errors as ``{"error": {"code", "message", "details"}}`` from many places: the auth middleware
(401), the body cap (413), the input policy (422), idempotency, the routes' exception handlers. Rather than
teach each of them a second shape, :class:`OpenAIErrors` sits outside all of them and rewrites an error
response on an ``/openai/`` path into OpenAI's ``{"error": {"message", "type", "param", "code"}}``, keeping
alignd's ``details`` (every bad line, every refused field) beside them. ``param`` is the first detail's
field. alignd's 422 becomes OpenAI's 400 (the status OpenAI answers invalid requests with, and what a
migrated script catches as ``openai.BadRequestError``); other statuses keep their value.

It is the outermost middleware, so the request metrics (``RequestContext``) count the status alignd answered
(422) where the client saw 400.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.openai_schemas import OpenAIErrorBody

PREFIX = "/openai/"

_DESCRIPTIONS = {
    400: "Invalid request (alignd's 422s answer 400 here): `param` names the field, `details` every problem.",
    401: "Missing or invalid API key.",
    404: "No such resource for this tenant (another tenant's ids too).",
    409: "Conflicts with the resource's state (e.g. cancelling a finished job).",
    413: "Body larger than the tenant's upload cap.",
    415: "Wrong Content-Type.",
    429: "Too many queued jobs; retry after Retry-After seconds.",
    500: "The chat job failed on its worker: `code` and `message` are its error.",
    503: "A dependency (database, queue, storage) is unreachable; retry after Retry-After seconds.",
    504: "No completion within ALIGND_CHAT_TIMEOUT_SECONDS; the chat job was cancelled.",
}


def openai_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a facade route: OpenAI's error body for each status it can answer (400,
    401 and 503 always; 422 never, since it is answered as 400)."""
    codes = sorted({*statuses, 400, 401, 503})
    return {code: {"model": OpenAIErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error(body: Any, status: int) -> dict[str, Any] | None:
    """OpenAI's error object for alignd's error body, or None for a body that is not one."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or "code" not in error or "message" not in error:
        return None
    details = error.get("details") if isinstance(error.get("details"), list) else []
    first = details[0] if details and isinstance(details[0], dict) else {}
    param = first.get("field")
    return {
        "error": {
            "message": str(error["message"]),
            "type": _error_type(status),
            "param": param if isinstance(param, str) and param else None,
            "code": error["code"],
            "details": details,
        }
    }


class OpenAIErrors:
    """Pure ASGI middleware: error responses on ``/openai/`` paths in OpenAI's shape (see the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
                if int(message["status"]) >= 400 and is_json:
                    start = message  # held until the body is complete (error bodies are small)
                    return
                await send(message)
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            await _send_rewritten(send, start, b"".join(chunks))

        await self.app(scope, receive, rewrite)


async def _send_rewritten(send: Send, start: Message, body: bytes) -> None:
    status = int(start["status"])
    try:
        converted = openai_error(json.loads(body), status)
    except ValueError:
        converted = None
    if converted is not None:
        status = 400 if status == 422 else status
        body = json.dumps(converted).encode()
    headers = [(k, v) for k, v in start.get("headers") or [] if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
