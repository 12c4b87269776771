"""Authentication as pure ASGI middleware, ahead of everything that reads a request body.

FastAPI reads (and Starlette spools to disk) a whole request body, multipart files included, before it
resolves a route's dependencies, so a key checked in a dependency lets anyone make the server receive and
store gigabytes before hearing 401. :class:`Authenticate` answers 401 from the headers alone, before the
body is received, and puts the caller's tenant into ``scope["state"]``, where ``TenantDep`` reads it and the
idempotency and upload-size middleware after it find it.

Keys come from two places, checked in this order: ``ALIGND_API_KEYS`` (plaintext in the environment, compared
in constant time) and the database's ``api_keys`` table (``alignd-server keys``; looked up by SHA-256, see
:mod:`service.db.api_keys`). Authentication is on when either holds a key; with neither, every caller is the
single default tenant (embedded mode on loopback).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping
from typing import Any

from anyio import to_thread
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.errors import AlignError, AuthenticationError, ServiceUnavailableError
from service.core.ids import now
from service.db.api_keys import any_keys, could_be_secret, find_key, record_use
from service.settings import DEFAULT_TENANT

log = logging.getLogger(__name__)

# Where the tenant lives in the ASGI scope's per-request state (``request.state.tenant``).
TENANT_STATE_KEY = "tenant"
# Paths whose requests need a key: alignd's API and its OpenAI-compatible facade (the same keys and tenants).
# Everything else is public: /healthz, /readyz, /metrics, the OpenAPI document and docs pages, and the web
# console's and labeling page's files and /ui/config.json (their scripts send the key on their /v1 calls).
PROTECTED_PREFIXES = ("/v1/", "/openai/v1/")
# While the database holds no key, how often a request asks it again (a key made meanwhile is enforced from
# then on); once it holds one, it is never asked again, since keys are revoked, never deleted.
NO_KEYS_RECHECK_SECONDS = 1.0
DATABASE_ERRORS = (OperationalError, DBAPIError, PoolTimeout)
CHALLENGE = {"WWW-Authenticate": "Bearer"}


class DatabaseKeys:
    """The ``api_keys`` table as the middleware asks it.

    A presented key is looked up on every request, never cached, so a key revoked with ``alignd-server keys
    revoke`` is refused from the next request on. Only "does the table hold any key" is remembered: once yes,
    for good; while no, for :data:`NO_KEYS_RECHECK_SECONDS`. Queries run in worker threads: on the event loop,
    a wait for a pooled connection would stall every request.
    """

    def __init__(self, engine: Engine, *, recheck_seconds: float = NO_KEYS_RECHECK_SECONDS) -> None:
        self.engine = engine
        self.recheck_seconds = recheck_seconds
        self._seen_a_key = False
        self._next_check = 0.0

    async def any(self) -> bool:
        if self._seen_a_key:
            return True
        moment = time.monotonic()
        if moment < self._next_check:
            return False
        found = await self._query(any_keys, self.engine)
        # Set only after an answer: while the database fails, every request asks (and hears 503), so an
        # outage can never pass for "no keys", which would let callers in as the default tenant.
        self._seen_a_key, self._next_check = found, moment + self.recheck_seconds
        return found

    async def tenant_of(self, secret: str) -> str | None:
        """The tenant of a database key; None for a secret that is no key; 401 for a revoked one."""
        match = await self._query(find_key, self.engine, secret)
        if match is None:
            return None
        if match.revoked:
            raise AuthenticationError(
                "This API key was revoked.", code="api_key_revoked", headers=dict(CHALLENGE)
            )
        at = now()
        if match.use_due(at):
            try:
                await to_thread.run_sync(lambda: record_use(self.engine, match.key_id, at=at))
            except DATABASE_ERRORS as exc:  # bookkeeping only: the key itself was found and is valid
                log.warning("could not record the use of API key %s: %s", match.key_id, exc)
        return match.tenant

    @staticmethod
    async def _query(function: Any, *args: Any) -> Any:
        try:
            return await to_thread.run_sync(function, *args)
        except DATABASE_ERRORS as exc:
            log.warning("database unavailable while checking an API key: %s", exc)
            raise ServiceUnavailableError(
                "The database is unreachable; retry shortly.", code="database_unavailable"
            ) from exc


def bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError(
            "Missing API key: send 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers=dict(CHALLENGE),
        )
    return token.strip()


def _invalid_key() -> AuthenticationError:
    return AuthenticationError("Invalid API key.", code="invalid_api_key", headers=dict(CHALLENGE))


def _environment_tenant(token: str, tenant_keys: Mapping[str, str]) -> str | None:
    presented = token.encode()
    for key, tenant in tenant_keys.items():
        # Constant-time comparison: no timing oracle on the keys.
        if hmac.compare_digest(key.encode(), presented):
            return tenant
    return None


def tenant_for(authorization: str | None, tenant_keys: Mapping[str, str]) -> str:
    """The tenant an ``Authorization: Bearer <key>`` header names among ALIGND_API_KEYS's keys only;
    AuthenticationError when none does. With no keys, every caller is the single default tenant."""
    if not tenant_keys:
        return DEFAULT_TENANT
    tenant = _environment_tenant(bearer_token(authorization), tenant_keys)
    if tenant is None:
        raise _invalid_key()
    return tenant


async def resolve_tenant(
    authorization: str | None, tenant_keys: Mapping[str, str], database: DatabaseKeys | None
) -> str:
    """The caller's tenant by the environment's keys, then the database's; the default tenant when neither
    holds any key. AuthenticationError (401) for a missing, unknown or revoked key."""
    if not tenant_keys and (database is None or not await database.any()):
        return DEFAULT_TENANT
    token = bearer_token(authorization)
    tenant = _environment_tenant(token, tenant_keys)
    if tenant is None and database is not None and could_be_secret(token):
        tenant = await database.tenant_of(token)
    if tenant is None:
        raise _invalid_key()
    return tenant


def database_keys_of(scope: Mapping[str, Any]) -> DatabaseKeys | None:
    """The app's :class:`DatabaseKeys` (``AppContext.api_keys``), once its lifespan has opened the database."""
    state = getattr(scope.get("app"), "state", None)
    keys = getattr(getattr(state, "ctx", None), "api_keys", None)
    return keys if isinstance(keys, DatabaseKeys) else None


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
    """Pure ASGI middleware: 401 for a protected path without a valid bearer key, before any body is read.

    ``tenant_keys`` are ALIGND_API_KEYS's; the database's keys are found through the app's context.
    """

    def __init__(self, app: ASGIApp, *, tenant_keys: Mapping[str, str]) -> None:
        self.app = app
        self.tenant_keys = dict(tenant_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            tenant = await resolve_tenant(
                header_of(scope, b"authorization"), self.tenant_keys, database_keys_of(scope)
            )
        except AlignError as error:  # 401, or 503 when the database cannot be asked
            await send_error(scope, receive, send, error)
            return
        # uvicorn and Starlette's TestClient give each request its own copy of the state dict.
        scope.setdefault("state", {})[TENANT_STATE_KEY] = tenant
        await self.app(scope, receive, send)
