"""``alignd-server keys create | list | revoke``: API keys in the database named by ``ALIGND_DATABASE_URL``.

Like ``alignd-server migrate``, these talk to the database directly (no API call, no running server needed),
so in production they run inside an API pod (``kubectl exec``). They never change the schema: a database
without the ``api_keys`` table is reported, and ``alignd-server migrate`` (or a first ``serve``) creates it.
A secret is printed once, by ``create``; nothing else ever prints one, since only its hash is stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from service.settings import Settings

if TYPE_CHECKING:
    from service.db.tables import ApiKeyRow


def add_parser(commands: Any) -> None:
    """The ``keys`` command and its three subcommands, on the top-level subparsers ``commands``."""
    parser = commands.add_parser(
        "keys", help="Create, list and revoke API keys in the database (ALIGND_DATABASE_URL)."
    )
    actions = parser.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="Make a key for a tenant and print its secret (once).")
    create.add_argument("--tenant", required=True, help="The tenant the key acts as.")
    create.add_argument("--name", help="A label, e.g. who or what uses the key.")
    create.set_defaults(keys_func=_create)
    listing = actions.add_parser("list", help="List keys (never their secrets), revoked ones included.")
    listing.add_argument("--tenant", help="Only this tenant's keys.")
    listing.set_defaults(keys_func=_list)
    revoke = actions.add_parser("revoke", help="Revoke a key: requests with it get 401 from then on.")
    revoke.add_argument("key_id", metavar="KEY_ID", help="The key's id (key_...), as `keys list` shows it.")
    revoke.set_defaults(keys_func=_revoke)
    for action in (create, listing, revoke):
        action.add_argument("--json", action="store_true", help="Print JSON (for scripts).")
    parser.set_defaults(func=keys_command)


def keys_command(args: argparse.Namespace) -> int:
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    from service.db.api_keys import TABLE, InvalidKeyRequest
    from service.db.session import make_engine

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # where the default SQLite file lives
    engine = make_engine(settings.resolved_database_url)
    try:
        if not inspect(engine).has_table(TABLE.name):
            print(
                "the database has no api_keys table yet: run `alignd-server migrate` first", file=sys.stderr
            )
            return 1
        return int(args.keys_func(engine, args))
    except InvalidKeyRequest as exc:
        print(f"alignd-server keys {args.keys_command}: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        # The driver's own message (it names host and port, never the password), not the SQL around it.
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"database error: {reason}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def _create(engine: Any, args: argparse.Namespace) -> int:
    from service.db.api_keys import create_key

    row, secret = create_key(engine, tenant=args.tenant, name=args.name)
    if args.json:
        print(json.dumps({**_public(row), "secret": secret}))
        return 0
    label = f" (name {row.name!r})" if row.name else ""
    print(f"created {row.id} for tenant {row.tenant!r}{label}")
    print("secret, shown only now (only its hash is stored): send it as 'Authorization: Bearer <secret>'")
    print(secret)
    return 0


def _list(engine: Any, args: argparse.Namespace) -> int:
    from service.db.api_keys import list_keys

    rows = list_keys(engine, tenant=args.tenant)
    if args.json:
        print(json.dumps([_public(row) for row in rows]))
        return 0
    header = ("ID", "TENANT", "NAME", "PREFIX", "CREATED", "LAST USED", "REVOKED")
    lines = [header] + [
        (
            row.id,
            row.tenant,
            row.name or "-",
            row.prefix + "...",
            _when(row.created_at),
            _when(row.last_used_at),
            _when(row.revoked_at),
        )
        for row in rows
    ]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0


def _revoke(engine: Any, args: argparse.Namespace) -> int:
    from service.db.api_keys import revoke_key

    revoked = revoke_key(engine, args.key_id)
    if revoked is None:
        print(f"no API key with id {args.key_id!r}", file=sys.stderr)
        return 1
    row, now_revoked = revoked
    if args.json:
        print(json.dumps(_public(row)))
    elif now_revoked:
        print(f"revoked {row.id} (tenant {row.tenant!r}): requests with it now get 401")
    else:
        print(f"{row.id} (tenant {row.tenant!r}) was already revoked at {_when(row.revoked_at)}")
    return 0


def _public(row: ApiKeyRow) -> dict[str, Any]:
    """What a listing may show of a key: everything but its hash (and the secret, which is not stored)."""
    return {
        "id": row.id,
        "tenant": row.tenant,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": row.created_at,
        "last_used_at": row.last_used_at,
        "revoked_at": row.revoked_at,
    }


def _when(unix_seconds: int | None) -> str:
    if unix_seconds is None:
        return "-"
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
