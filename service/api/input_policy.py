"""One input policy at the edge: every string a request carries is text, and every number is finite.

Text means valid UTF-8 without a NUL character (PostgreSQL refuses NUL in text and jsonb, so a NUL that reached
a query answered 500 there) and without an unpaired surrogate (not a character: it cannot be encoded as UTF-8,
so it fails the database driver or the JSON response that echoes it). Finite means no NaN or Infinity: Python's
json reads those literals, and 1e999 as inf, though JSON has neither and a JSON column stored them as invalid
JSON. Each refusal is a 422 naming the field: ``invalid_characters`` or ``non_finite_number``.

Where each part of a request is checked, once, for every route (a new route cannot forget it):

- :class:`InputPolicy`, pure ASGI middleware in front of routing: the URL path and every query parameter name
  and value (percent-decoded: bytes that are UTF-8 without NUL), and JSON bodies (what FastAPI parses as JSON:
  ``application/json``, ``*/*+json`` or no Content-Type), parsed here with the same ``json.loads`` and walked.
- :func:`form_problems`, called where forms are parsed (``service/api/uploads.require_content_type``): form
  field names and values and upload filenames. A multipart body streams to disk, so it is never buffered here.

Pydantic's side of the same policy (strict ints and bools, finite floats) is ``contract.inputs.InputModel``.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.datastructures import FormData, UploadFile
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import ValidationFailed

INVALID_CHARACTERS = "invalid_characters"
NON_FINITE_NUMBER = "non_finite_number"
# A JSON body larger than this is passed on unchecked: only upload routes accept one (BodySizeLimit caps the
# others at 1 MiB), and those refuse anything but multipart with 415 before reading it.
MAX_CHECKED_JSON_BYTES = 1 << 20
MAX_DETAILS = 20

_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")
_PERCENT, _NUL = ord("%"), 0  # ``int in bytes`` is one memchr


def text_problem(value: str) -> str | None:
    """Why ``value`` is not text (a NUL character, an unpaired surrogate), or None."""
    if value.isascii():
        return "contains a NUL character (U+0000)" if "\x00" in value else None
    found = _BAD_CHARACTER.search(value)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        return "contains a NUL character (U+0000)"
    # A surrogate that pairs up was decoded into one character already: any left here stands alone.
    return f"contains an unpaired surrogate (U+{ord(char):04X})"


def shown(name: str) -> str:
    """A name safe to echo in an error body: non-text characters escaped (the body must encode as UTF-8)."""
    return ascii(name)[1:-1] if text_problem(name) else name


def _detail(field: str, code: str, message: str) -> dict[str, str]:
    return {"field": field, "code": code, "message": message}


def refusal(details: list[dict[str, str]]) -> ValidationFailed:
    """The 422 for ``details``; its code is the first problem's."""
    summary = "; ".join(f"{d['field'] or 'body'}: {d['message']}" for d in details[:5])
    return ValidationFailed(
        f"Invalid request: {summary}", code=details[0]["code"], details=details[:MAX_DETAILS]
    )


# --- the URL


def _url_part_problem(raw: bytes) -> str | None:
    """Why a raw path or query part is not text once percent-decoded, or None."""
    if _PERCENT not in raw and _NUL not in raw and raw.isascii():
        return None  # nearly every request: nothing encoded, nothing to decode
    decoded = unquote_to_bytes(raw)
    if _NUL in decoded:
        return "contains a NUL character (%00)"
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        # Starlette would decode these bytes to U+FFFD; an encoded surrogate (%ED%A0%80) is one of them.
        return "is not valid UTF-8 once percent-decoded"
    return None


def url_problems(scope: Scope) -> list[dict[str, str]]:
    """The problems of the request's path and query string (empty when both are text)."""
    details = []
    raw_path = scope.get("raw_path")
    # A server that sends no raw_path has decoded the path already.
    problem = _url_part_problem(raw_path) if raw_path is not None else text_problem(scope["path"])
    if problem is not None:
        details.append(_detail("path", INVALID_CHARACTERS, f"the URL path {problem}"))
    query: bytes = scope.get("query_string") or b""
    if query and _url_part_problem(query) is not None:
        for part in query.split(b"&"):
            raw_name, _, raw_value = part.partition(b"=")
            name = unquote_to_bytes(raw_name.replace(b"+", b" ")).decode("utf-8", "replace")
            for what, raw in (("name", raw_name), ("value", raw_value)):
                problem = _url_part_problem(raw.replace(b"+", b" "))
                if problem is not None:
                    message = f"the query parameter's {what} {problem}"
                    details.append(_detail(shown(name), INVALID_CHARACTERS, message))
    return details


# --- JSON values


def json_problems(value: Any) -> list[dict[str, str]]:
    """Strings that are not text and numbers that are not finite in a parsed JSON value, by dotted field path
    (the form of FastAPI's validation errors), in document order."""
    details: list[dict[str, str]] = []
    stack: list[tuple[str, Any]] = [("", value)]
    while stack and len(details) < MAX_DETAILS:
        path, item = stack.pop()
        if type(item) is str:
            problem = text_problem(item)
            if problem is not None:
                details.append(_detail(path, INVALID_CHARACTERS, problem))
        elif type(item) is float:
            if not math.isfinite(item):
                message = "must be a finite number (JSON has no NaN or Infinity; 1e999 is past a double)"
                details.append(_detail(path, NON_FINITE_NUMBER, message))
        elif type(item) is dict:
            children = []
            for key, child in item.items():
                problem = text_problem(key)
                name = f"{path}.{shown(key)}" if path else shown(key)
                if problem is not None:
                    details.append(_detail(name, INVALID_CHARACTERS, f"the key {problem}"))
                children.append((name, child))
            stack.extend(reversed(children))
        elif type(item) is list:
            stack.extend(reversed([(f"{path}.{i}" if path else str(i), x) for i, x in enumerate(item)]))
    return details


def _has_json_body(scope: Scope) -> bool:
    """Whether FastAPI would parse the request's body as JSON (and there is a body). One pass over the
    headers: it runs on every request."""
    has_body = False
    content_type = None
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            has_body = has_body or value != b"0"
        elif name == b"transfer-encoding":
            has_body = True
        elif name == b"content-type":
            content_type = bytes(value)
    if not has_body:
        return False
    if content_type is None:
        return True  # FastAPI reads a body without a Content-Type as JSON
    media = content_type.split(b";", 1)[0].strip().lower()
    main, _, sub = media.partition(b"/")
    return main == b"application" and (sub == b"json" or sub.endswith(b"+json"))


def _replay(messages: Iterable[Message], receive: Receive, error: BaseException | None) -> Receive:
    """A receive that hands out the buffered messages, then ``error`` (if reading failed), then the rest."""
    pending = deque(messages)

    async def replayed() -> Message:
        if pending:
            return pending.popleft()
        if error is not None:
            raise error
        return await receive()

    return replayed


async def _buffer(receive: Receive) -> tuple[list[Message], bytes | None, BaseException | None]:
    """The body's messages, the whole body (None if it did not end within the cap or the client left), and
    the exception reading it raised (BodySizeLimit's 413, raised again to the route that reads it)."""
    messages: list[Message] = []
    size = 0
    try:
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None, None
            size += len(message.get("body", b""))
            if size > MAX_CHECKED_JSON_BYTES:
                return messages, None, None
            if not message.get("more_body", False):
                return messages, b"".join(m.get("body", b"") for m in messages), None
    except Exception as exc:
        return messages, None, exc


class InputPolicy:
    """Pure ASGI middleware: 422 for a path, query or JSON body holding text that is not text (a NUL, an
    unpaired surrogate) or a number that is not finite. See the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        details = url_problems(scope)
        if not details and _has_json_body(scope):
            messages, body, error = await _buffer(receive)
            receive = _replay(messages, receive, error)
            if body is not None:
                try:
                    value = json.loads(body)  # what FastAPI's request.json() does
                except (ValueError, RecursionError):
                    pass  # not JSON: the route answers that (400 invalid_json)
                else:
                    details = json_problems(value)
        if details:
            error = refusal(details)
            await JSONResponse(status_code=error.status, content=error.to_body())(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- forms


def form_problems(form: FormData) -> list[dict[str, str]]:
    """Form field names and values, and upload filenames, that are not text."""
    details = []
    for name, value in form.multi_items():
        problem = text_problem(name)
        if problem is not None:
            details.append(_detail(shown(name), INVALID_CHARACTERS, f"the field name {problem}"))
        if isinstance(value, UploadFile):
            problem = text_problem(value.filename or "")
            if problem is not None:
                details.append(_detail(shown(name), INVALID_CHARACTERS, f"the filename {problem}"))
        else:
            problem = text_problem(value)
            if problem is not None:
                details.append(_detail(shown(name), INVALID_CHARACTERS, problem))
    return details
