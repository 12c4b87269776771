"""API keys kept in the database: made, listed and revoked by ``alignd-server keys``, looked up by the auth
middleware on every request that presents one.

A secret is ``ak_live_`` and 32 random bytes (URL-safe base64), and only its SHA-256 is stored. Not bcrypt,
scrypt or argon2: those are slow on purpose so that guessing a low-entropy *password* from its hash costs a
lot per guess, but 256 random bits cannot be guessed however fast the hash is, while the lookup runs on every
request, where a deliberately slow hash would spend tens of milliseconds of CPU per call. An unsalted hash is
also what lets the lookup be one indexed equality query (a salted one would need the row before the hash).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import inspect, or_, select, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from service.core.ids import new_id, now
from service.db.tables import ApiKeyRow

SECRET_PREFIX = "ak_live_"
SECRET_BYTES = 32
# How many random characters after SECRET_PREFIX listings show: enough to tell a team's keys apart, and 24 bits
# of 256 give a guesser nothing.
SHOWN_RANDOM_CHARS = 4
# last_used_at is written at most once per key in this many seconds (across API replicas: the UPDATE's own
# condition decides), so a client polling a job does not make every GET a database write.
LAST_USED_RESOLUTION_SECONDS = 60
# No whitespace, ',' or ':' so that any tenant can also be named in ALIGND_API_KEYS ('tenant:key,...').
TENANT_PATTERN = re.compile(r"[^\s,:]{1,128}")
MAX_NAME_LENGTH = 256
# Longer bearer tokens are not ours: refused without hashing or querying.
MAX_SECRET_LENGTH = 128

TABLE = ApiKeyRow.__table__  # type: ignore[attr-defined]
COLUMNS = TABLE.c


class InvalidKeyRequest(ValueError):
    """A tenant or name ``keys create`` cannot store; the message says which and why."""


@dataclass(frozen=True)
class KeyMatch:
    """The key a presented secret belongs to."""

    key_id: str
    tenant: str
    revoked: bool
    last_used_at: int | None

    def use_due(self, at: int) -> bool:
        """Whether a use at ``at`` should be written (the last one recorded is a resolution step old)."""
        return self.last_used_at is None or at - self.last_used_at >= LAST_USED_RESOLUTION_SECONDS


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def could_be_secret(token: str) -> bool:
    """Whether a bearer token has the shape of a database key (others never reach the database)."""
    return token.startswith(SECRET_PREFIX) and len(token) <= MAX_SECRET_LENGTH


def create_key(engine: Engine, *, tenant: str, name: str | None = None) -> tuple[ApiKeyRow, str]:
    """A new key for ``tenant``: its row and its secret, which exists nowhere else from here on."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidKeyRequest(
            f"tenant {tenant!r} must be 1 to 128 characters without whitespace, ',' or ':'"
        )
    if name is not None and not (0 < len(name) <= MAX_NAME_LENGTH):
        raise InvalidKeyRequest(f"name must be 1 to {MAX_NAME_LENGTH} characters")
    secret = new_secret()
    row = ApiKeyRow(
        id=new_id("api_key"),
        tenant=tenant,
        name=name,
        key_hash=hash_secret(secret),
        prefix=secret[: len(SECRET_PREFIX) + SHOWN_RANDOM_CHARS],
        created_at=now(),
    )
    with Session(engine, expire_on_commit=False) as session:
        session.add(row)
        session.commit()
    return row, secret


def list_keys(engine: Engine, *, tenant: str | None = None) -> list[ApiKeyRow]:
    """Every key (or one tenant's), oldest first, revoked ones included."""
    statement = select(ApiKeyRow).order_by(col(ApiKeyRow.seq))
    if tenant is not None:
        statement = statement.where(col(ApiKeyRow.tenant) == tenant)
    with Session(engine, expire_on_commit=False) as session:
        return list(session.scalars(statement).all())


def revoke_key(engine: Engine, key_id: str) -> tuple[ApiKeyRow, bool] | None:
    """Revoke a key now: its row, and whether this call revoked it (a key revoked before keeps its first
    revocation time); None for an unknown id."""
    with Session(engine, expire_on_commit=False) as session:
        row = session.scalars(select(ApiKeyRow).where(col(ApiKeyRow.id) == key_id)).first()
        if row is None:
            return None
        if row.revoked_at is not None:
            return row, False
        row.revoked_at = now()
        session.add(row)
        session.commit()
        return row, True


def find_key(engine: Engine, secret: str) -> KeyMatch | None:
    """The key whose secret this is, revoked or not; None when there is none.

    The database compares hashes, not secrets: how long the index takes to rule a hash out can at most tell
    an attacker how a *hash* of their guess begins, which brings them no closer to a secret (that would need
    a SHA-256 preimage). So no constant-time comparison is needed here, unlike for ALIGND_API_KEYS's
    plaintext keys.
    """
    statement = select(COLUMNS.id, COLUMNS.tenant, COLUMNS.revoked_at, COLUMNS.last_used_at).where(
        COLUMNS.key_hash == hash_secret(secret)
    )
    with engine.connect() as connection:
        found: Any = connection.execute(statement).first()
    if found is None:
        return None
    return KeyMatch(
        key_id=found.id,
        tenant=found.tenant,
        revoked=found.revoked_at is not None,
        last_used_at=found.last_used_at,
    )


def record_use(engine: Engine, key_id: str, *, at: int) -> bool:
    """Set the key's last_used_at to ``at`` unless a use less than a resolution step old is recorded.

    The condition is in the UPDATE itself, so of several replicas seeing the same key at once one writes.
    True when this call wrote.
    """
    statement = (
        update(TABLE)
        .where(COLUMNS.id == key_id)
        .where(
            or_(
                COLUMNS.last_used_at.is_(None),
                COLUMNS.last_used_at <= at - LAST_USED_RESOLUTION_SECONDS,
            )
        )
        .values(last_used_at=at)
    )
    with engine.begin() as connection:
        return bool(connection.execute(statement).rowcount)


def any_keys(engine: Engine) -> bool:
    """Whether the database holds any key, revoked ones included."""
    with engine.connect() as connection:
        return connection.execute(select(COLUMNS.seq).limit(1)).first() is not None


def database_has_keys(engine: Engine) -> bool:
    """:func:`any_keys` for a database that may not be migrated yet (no table: no keys)."""
    return inspect(engine).has_table(TABLE.name) and any_keys(engine)
