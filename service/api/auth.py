"""Authentication as pure ASGI middleware, ahead of everything that reads a request body.

FastAPI reads (and Starlette spools to disk) a whole request body, multipart files included, before it
resolves a route's dependencies, so a key checked in a dependency lets anyone make the server receive and
store gigabytes before hearing 401. :class:`Authenticate` answers 401 from the headers alone, before the
body is received, and puts the caller's tenant into ``scope["state"]``, where ``TenantDep`` reads it and the
idempotency and upload-size middleware after it find it.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.errors import AlignError, AuthenticationError
from service.settings import DEFAULT_TENANT

# Where the tenant lives in the ASGI scope's per-request state (``request.state.tenant``).
TENANT_STATE_KEY = "tenant"
# Paths whose requests need a key. Everything else is public: /healthz, /readyz, /metrics, the OpenAPI
# document and docs pages, and the labeling page's HTML (its script sends the key on its /v1 calls).
PROTECTED_PREFIXES = ("/v1/",)


def tenant_for(authorization: str | None, tenant_keys: Mapping[str, str]) -> str:
    """The tenant an ``Authorization: Bearer <key>`` header names; AuthenticationError when none does.

    With no keys configured auth is off and every caller is the single default tenant.
    """
    if not tenant_keys:
        return DEFAULT_TENANT
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "Missing API key: send 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    presented = token.strip().encode()
    for key, tenant in tenant_keys.items():
        # Constant-time comparison: no timing oracle on the keys.
        if hmac.compare_digest(key.encode(), presented):
            return tenant
    raise AuthenticationError(
        "Invalid API key.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def tenant_of_scope(scope: Mapping[str, Any]) -> str | None:
    """The tenant :class:`Authenticate` stored for this request, or None (a public path, or no middleware)."""
    state = scope.get("state")
    if isinstance(state, dict):
        tenant = state.get(TENANT_STATE_KEY)
        if isinstance(tenant, str):
            return tenant
    return None


def header_of(scope: Mapping[str, Any], name: bytes) -> str | None:
    """One request header (lower-case ``name``) from the raw ASGI headers, decoded as latin-1."""
    for key, value in scope.get("headers") or ():
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES)


async def send_error(scope: Scope, receive: Receive, send: Send, error: AlignError) -> None:
    """Answer with the service's error JSON. Sending a response never calls ``receive``."""
    response = JSONResponse(status_code=error.status, content=error.to_body(), headers=error.headers or None)
    await response(scope, receive, send)


class Authenticate:
    """Pure ASGI middleware: 401 for a protected path without a valid bearer key, before any body is read."""

    def __init__(self, app: ASGIApp, *, tenant_keys: Mapping[str, str]) -> None:
        self.app = app
        self.tenant_keys = dict(tenant_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            tenant = tenant_for(header_of(scope, b"authorization"), self.tenant_keys)
        except AuthenticationError as error:
            await send_error(scope, receive, send, error)
            return
        # uvicorn and Starlette's TestClient give each request its own copy of the state dict.
        scope.setdefault("state", {})[TENANT_STATE_KEY] = tenant
        await self.app(scope, receive, send)
