"""Idempotent POSTs (Stripe's semantics): a retried request with the same ``Idempotency-Key`` runs once.

The key is reserved per tenant by inserting a database row before the handler runs; a unique index on
(tenant, key) makes that insert the lock, across API replicas. The request's fingerprint (method, path,
query, media type and body bytes, hashed while the body streams through to the handler, never buffered) and
the response are stored when the handler answers. Then, for as long as the key lives:

- same key, same request: the first response again (status, content type, body) with ``Idempotent-Replayed:
  true``; the handler does not run;
- same key, another request: 422 ``idempotency_key_reused``;
- same key while the first request still runs: 409 ``idempotency_key_in_use`` with ``x-should-retry: true``
  and ``Retry-After``, so the SDK waits and then gets the replay.

Not stored, so that a retry runs the request again: 5xx and 429 answers (the SDK retries those with the same
key), answers to a request whose body was not read to its end (413, a client that went away), and bodies over
:data:`MAX_STORED_RESPONSE_BYTES`. Expired keys are deleted when their key comes back and, every
:data:`PURGE_INTERVAL_SECONDS`, all at once in the background (started by the first request with a key).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from anyio import to_thread
from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.auth import header_of, send_error, tenant_of_scope
from service.core.errors import AlignError, ConflictError, ServiceUnavailableError, ValidationFailed
from service.db.tables import IdempotencyKeyRow

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
# Create answers are one resource's JSON; anything larger is passed through without being stored.
MAX_STORED_RESPONSE_BYTES = 1 << 20
PURGE_INTERVAL_SECONDS = 600.0
IN_USE_RETRY_AFTER_SECONDS = 1
REPLAYED_HEADER = (b"idempotent-replayed", b"true")
# Multipart boundaries are random per attempt (httpx draws one per request), so a retried upload differs
# from its first attempt only in them; the fingerprint puts this in their place.
BOUNDARY_PLACEHOLDER = b"--alignd-idempotency-boundary"

TABLE = IdempotencyKeyRow.__table__  # type: ignore[attr-defined]
COLUMNS = TABLE.c


# ---------------------------------------------------------------------------------------------------------
# The request's fingerprint
# ---------------------------------------------------------------------------------------------------------


class RequestFingerprint:
    """sha256 of method, path, query, media type and body, fed chunk by chunk as the body streams past."""

    def __init__(self, scope: Scope) -> None:
        content_type = header_of(scope, b"content-type") or ""
        media_type, _, params = content_type.partition(";")
        self._sha = hashlib.sha256()
        for part in (
            scope["method"].encode(),
            scope["path"].encode(),
            bytes(scope.get("query_string", b"")),
            media_type.strip().lower().encode(),
        ):
            # Length-prefixed, so no two different requests concatenate to the same bytes.
            self._sha.update(len(part).to_bytes(8, "big") + part)
        boundary = _multipart_boundary(media_type, params)
        self._delimiter = b"--" + boundary if boundary else b""
        self._carry = b""
        self.complete = False

    def update(self, chunk: bytes) -> None:
        if not self._delimiter:
            self._sha.update(chunk)
            return
        pieces = (self._carry + chunk).split(self._delimiter)
        for piece in pieces[:-1]:
            self._sha.update(piece + BOUNDARY_PLACEHOLDER)
        # A delimiter may straddle two chunks: hold back what could be its beginning.
        tail = pieces[-1]
        keep = min(len(tail), len(self._delimiter) - 1)
        self._sha.update(tail[: len(tail) - keep])
        self._carry = tail[len(tail) - keep :]

    def feed(self, message: Message) -> None:
        """Hash one ``http.request`` message; the last one marks the fingerprint complete."""
        if message["type"] == "http.request":
            self.update(message.get("body", b""))
            if not message.get("more_body", False):
                self.complete = True

    def hexdigest(self) -> str:
        digest = self._sha.copy()
        digest.update(self._carry)
        return digest.hexdigest()


def _multipart_boundary(media_type: str, params: str) -> bytes:
    if media_type.strip().lower() != "multipart/form-data":
        return b""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"').encode("latin-1")
    return b""


# ---------------------------------------------------------------------------------------------------------
# The key's row: reserve, complete, release (synchronous; the middleware runs them in worker threads)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reservation:
    """What reserving a key found: ``acquired`` (run the request), or a stored response, or neither (in use)."""

    acquired: bool
    request_hash: str | None = None
    status: int | None = None
    content_type: str | None = None
    body: bytes | None = None


IN_USE = Reservation(acquired=False)
ACQUIRED = Reservation(acquired=True)


def _insert_if_absent(connection: Connection, values: dict[str, Any]) -> bool:
    """Insert the row unless (tenant, key) exists; True when this call inserted it."""
    # ON CONFLICT DO NOTHING: a taken key is an answer, not an error (no rolled-back statement, no
    # "duplicate key" line in PostgreSQL's log per retried request).
    name = connection.dialect.name
    statement: Any = None
    if name == "sqlite":
        statement = sqlite_insert(TABLE).values(**values).on_conflict_do_nothing()
    elif name == "postgresql":
        statement = postgresql_insert(TABLE).values(**values).on_conflict_do_nothing()
    if statement is not None:
        # RETURNING, not rowcount: with the primary key returned implicitly, psycopg's rowcount is not 1.
        return connection.execute(statement.returning(COLUMNS.seq)).first() is not None
    try:
        with connection.begin_nested():
            connection.execute(insert(TABLE).values(**values))
    except IntegrityError:
        return False
    return True


def _row_of(tenant: str, key: str) -> Any:
    return (COLUMNS.tenant == tenant) & (COLUMNS.idempotency_key == key)


def _decided_by(row: Any, *, now: float, lock_seconds: float) -> Reservation | None:
    """What an existing row answers on its own: its stored response, or in use; None when it is expired or
    its holder's lock went stale, which only a write can settle."""
    if row.expires_at <= now:
        return None
    if row.response_status is not None:
        return Reservation(
            acquired=False,
            request_hash=row.request_hash,
            status=row.response_status,
            content_type=row.response_content_type,
            body=row.response_body,
        )
    if row.locked_at >= now - lock_seconds:
        return IN_USE
    return None


def peek(engine: Engine, *, tenant: str, key: str, lock_seconds: float) -> Reservation | None:
    """Read-only first look: a retry of a stored or running request is answered without a write (on SQLite,
    many of them at once would otherwise queue on its single writer). None: reserve() must decide."""
    with engine.connect() as connection:
        row = connection.execute(select(TABLE).where(_row_of(tenant, key))).first()
    return None if row is None else _decided_by(row, now=time.time(), lock_seconds=lock_seconds)


def reserve(
    engine: Engine, *, tenant: str, key: str, owner: str, ttl_seconds: float, lock_seconds: float
) -> Reservation:
    """Claim the key for ``owner``, or say who has it. One transaction per attempt; the insert is the lock."""
    for _ in range(3):
        now = time.time()
        with engine.begin() as connection:
            values = {
                "tenant": tenant,
                "idempotency_key": key,
                "owner": owner,
                "locked_at": now,
                "expires_at": now + ttl_seconds,
                "created_at": int(now),
            }
            if _insert_if_absent(connection, values):
                return ACQUIRED
            row = connection.execute(select(TABLE).where(_row_of(tenant, key))).first()
            if row is None:
                continue  # deleted (released or purged) between the insert and the read: try again
            decided = _decided_by(row, now=now, lock_seconds=lock_seconds)
            if decided is not None:
                return decided
            if row.expires_at <= now:
                # Lazy purge: an expired key is free again.
                connection.execute(delete(TABLE).where(COLUMNS.seq == row.seq, COLUMNS.expires_at <= now))
                continue
            # The holder stopped refreshing its lock (its replica died mid-request): take the key over.
            taken = connection.execute(
                update(TABLE)
                .where(COLUMNS.seq == row.seq, COLUMNS.owner == row.owner, COLUMNS.response_status.is_(None))
                .values(owner=owner, locked_at=now)
            )
            if taken.rowcount == 1:
                log.warning("idempotency key of tenant %s taken over from a stale request", tenant)
                return ACQUIRED
    return IN_USE


def complete(
    engine: Engine,
    *,
    tenant: str,
    key: str,
    owner: str,
    request_hash: str,
    status: int,
    content_type: str | None,
    body: bytes,
) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(TABLE)
            .where(_row_of(tenant, key), COLUMNS.owner == owner, COLUMNS.response_status.is_(None))
            .values(
                request_hash=request_hash,
                response_status=status,
                response_content_type=content_type,
                response_body=body,
            )
        )


def release(engine: Engine, *, tenant: str, key: str, owner: str) -> None:
    """Give the key back unused, so that a retry runs the request."""
    with engine.begin() as connection:
        connection.execute(
            delete(TABLE).where(
                _row_of(tenant, key), COLUMNS.owner == owner, COLUMNS.response_status.is_(None)
            )
        )


def refresh_lock(engine: Engine, *, tenant: str, key: str, owner: str) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(TABLE)
            .where(_row_of(tenant, key), COLUMNS.owner == owner, COLUMNS.response_status.is_(None))
            .values(locked_at=time.time())
        )


def purge_expired(engine: Engine, *, now: float | None = None) -> int:
    """Delete every expired key; the number deleted."""
    with engine.begin() as connection:
        result = connection.execute(delete(TABLE).where(COLUMNS.expires_at <= (now or time.time())))
        return int(result.rowcount or 0)


# ---------------------------------------------------------------------------------------------------------
# The middleware
# ---------------------------------------------------------------------------------------------------------


def storable(status: int) -> bool:
    """Whether a response may be replayed: not 5xx or 429, which the SDK retries with the same key."""
    return status < 500 and status != 429


class _Recorder:
    """A copy of the response as it is sent, up to MAX_STORED_RESPONSE_BYTES."""

    def __init__(self) -> None:
        self.status = 500
        self.content_type: str | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.truncated = False

    def start(self, message: Message) -> None:
        self.status = int(message["status"])
        for name, value in message.get("headers", []):
            if name.lower() == b"content-type":
                self.content_type = bytes(value).decode("latin-1")

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > MAX_STORED_RESPONSE_BYTES:
            self.truncated = True
            self.chunks = []
        elif not self.truncated:
            self.chunks.append(chunk)


class Idempotency:
    """Pure ASGI middleware for POSTs that carry ``Idempotency-Key``; it sits after authentication (it needs
    the tenant from the scope) and the body-size cap (whose receive it wraps)."""

    def __init__(self, app: ASGIApp, *, ttl_seconds: float, lock_seconds: float) -> None:
        self.app = app
        self.ttl_seconds = ttl_seconds
        self.lock_seconds = lock_seconds
        self._next_purge = 0.0
        self._running: set[tuple[str, str]] = set()  # (tenant, key) of the requests this process runs
        self._purge_task: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = header_of(scope, b"idempotency-key") if scope["type"] == "http" else None
        tenant = tenant_of_scope(scope)
        if key is None or tenant is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        key = key.strip()
        if not key or len(key) > MAX_KEY_LENGTH:
            error = AlignError(
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.", code="invalid_idempotency_key"
            )
            await send_error(scope, receive, send, error)
            return
        slot = (tenant, key)
        if slot in self._running:
            # Held by a request in this process: answered without a database round trip, so a burst of
            # retries cannot starve the running request of worker threads and connections.
            await send_error(scope, receive, send, _in_use())
            return
        engine: Engine = scope["app"].state.ctx.engine
        self._maybe_purge(engine)
        owner = secrets.token_hex(8)
        found = await self._reserve(engine, tenant, key, owner)
        if found is not None and found.acquired:
            self._running.add(slot)
            try:
                fingerprint = RequestFingerprint(scope)
                await self._run_once(scope, receive, send, engine, tenant, key, owner, fingerprint)
            finally:
                self._running.discard(slot)
        elif found is None:
            unavailable = ServiceUnavailableError(
                "The database is unreachable; retry shortly.", code="database_unavailable"
            )
            await send_error(scope, receive, send, unavailable)
        elif found.status is None:
            await send_error(scope, receive, send, _in_use())
        else:
            await _replay_or_refuse(scope, receive, send, found, RequestFingerprint(scope))

    async def _reserve(self, engine: Engine, tenant: str, key: str, owner: str) -> Reservation | None:
        """The key's state, claimed for ``owner`` when free; None when the database is unreachable."""
        try:
            found = await self._peek(engine, tenant, key)
            if found is not None:
                return found
            return await to_thread.run_sync(
                lambda: reserve(
                    engine,
                    tenant=tenant,
                    key=key,
                    owner=owner,
                    ttl_seconds=self.ttl_seconds,
                    lock_seconds=self.lock_seconds,
                )
            )
        except (OperationalError, DBAPIError, PoolTimeout) as exc:
            # Outside the routes, where FastAPI's handlers for these do not reach: the caller answers 503.
            log.warning("database unavailable while reserving an idempotency key: %s", exc)
            return None

    async def _peek(self, engine: Engine, tenant: str, key: str) -> Reservation | None:
        # In a thread even on SQLite: on the loop, a wait for a pooled connection held by a request whose
        # session closes on the loop would stall every request.
        return await to_thread.run_sync(
            lambda: peek(engine, tenant=tenant, key=key, lock_seconds=self.lock_seconds)
        )

    def _maybe_purge(self, engine: Engine) -> None:
        """Delete expired keys in the background, at most every PURGE_INTERVAL_SECONDS; no request waits."""
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_INTERVAL_SECONDS
        self._purge_task = asyncio.create_task(self._purge(engine))  # held: the loop keeps weak references

    async def _purge(self, engine: Engine) -> None:
        try:
            purged = await to_thread.run_sync(lambda: purge_expired(engine))
        except SQLAlchemyError as exc:  # housekeeping: the next interval tries again
            log.warning("purging expired idempotency keys failed: %s", exc)
            return
        if purged:
            log.info("purged %d expired idempotency keys", purged)

    async def _run_once(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        engine: Engine,
        tenant: str,
        key: str,
        owner: str,
        fingerprint: RequestFingerprint,
    ) -> None:
        """Run the handler with the key held; store its response, or give the key back."""
        recorder = _Recorder()
        settled = False

        async def hashing_receive() -> Message:
            message = await receive()
            fingerprint.feed(message)
            return message

        async def recording_send(message: Message) -> None:
            nonlocal settled
            if message["type"] == "http.response.start":
                recorder.start(message)
            elif message["type"] == "http.response.body":
                recorder.add(message.get("body", b""))
                if not message.get("more_body", False) and not settled:
                    # Stored before the last bytes go out: a client that has the answer finds it stored.
                    settled = True
                    await self._settle(engine, tenant, key, owner, fingerprint, recorder)
                    self._running.discard((tenant, key))
            await send(message)

        keeper = asyncio.create_task(self._keep_locked(engine, tenant, key, owner))
        try:
            await self.app(scope, hashing_receive, recording_send)
        finally:
            keeper.cancel()
            if not settled:
                # The handler raised or never finished its answer: the request may run again.
                with contextlib.suppress(SQLAlchemyError):
                    await to_thread.run_sync(lambda: release(engine, tenant=tenant, key=key, owner=owner))

    async def _settle(
        self,
        engine: Engine,
        tenant: str,
        key: str,
        owner: str,
        fingerprint: RequestFingerprint,
        recorder: _Recorder,
    ) -> None:
        try:
            if storable(recorder.status) and fingerprint.complete and not recorder.truncated:
                body = b"".join(recorder.chunks)
                request_hash = fingerprint.hexdigest()
                await to_thread.run_sync(
                    lambda: complete(
                        engine,
                        tenant=tenant,
                        key=key,
                        owner=owner,
                        request_hash=request_hash,
                        status=recorder.status,
                        content_type=recorder.content_type,
                        body=body,
                    )
                )
            else:
                await to_thread.run_sync(lambda: release(engine, tenant=tenant, key=key, owner=owner))
        except SQLAlchemyError as exc:
            # The answer still goes out. The key stays locked until its lock lapses (lock_seconds), so a
            # retry in between hears 409 rather than running the request a second time at once.
            log.warning("could not record the response of an idempotent request: %s", exc)

    async def _keep_locked(self, engine: Engine, tenant: str, key: str, owner: str) -> None:
        """Refresh the lock while the request runs (a long upload), so no other replica takes it over."""
        while True:
            await asyncio.sleep(self.lock_seconds / 3)
            try:
                await to_thread.run_sync(lambda: refresh_lock(engine, tenant=tenant, key=key, owner=owner))
            except SQLAlchemyError as exc:
                log.warning("could not refresh an idempotency key's lock: %s", exc)


def _in_use() -> AlignError:
    return ConflictError(
        "A request with this Idempotency-Key is still in progress; retry after it finishes.",
        code="idempotency_key_in_use",
        headers={"Retry-After": str(IN_USE_RETRY_AFTER_SECONDS), "x-should-retry": "true"},
    )


async def _replay_or_refuse(
    scope: Scope, receive: Receive, send: Send, found: Reservation, fingerprint: RequestFingerprint
) -> None:
    """Read this request's body through the fingerprint (nothing kept), then replay or answer 422."""
    try:
        while not fingerprint.complete:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            fingerprint.feed(message)
    except HTTPException as exc:  # the body-size cap's 413, raised from its receive
        too_large = AlignError(str(exc.detail), code="payload_too_large", status=exc.status_code)
        await send_error(scope, receive, send, too_large)
        return
    if fingerprint.hexdigest() != found.request_hash:
        error = ValidationFailed(
            "This Idempotency-Key was already used with a different request (method, path, query or body); "
            "use a new key for a new request.",
            code="idempotency_key_reused",
        )
        await send_error(scope, receive, send, error)
        return
    body = found.body or b""
    headers = [(b"content-length", str(len(body)).encode()), REPLAYED_HEADER]
    if found.content_type:
        headers.append((b"content-type", found.content_type.encode("latin-1")))
    await send({"type": "http.response.start", "status": found.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
