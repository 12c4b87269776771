"""``alignd-server serve | worker | migrate | keys | trainjob``: the server's command line.

It starts the service and the workers alike (``serve`` runs embedded mode's in-process runner, ``worker``
the arq worker), so it lives in the composition root, not in ``service``, which never imports the workers.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from urllib.parse import urlparse

from alignd_server import keys, trainjob
from service.settings import Settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _configure_logging(settings: Settings) -> None:
    from service.logs import configure_logging

    configure_logging(settings)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from alignd_server.embedded import create_app

    settings = Settings()
    if not _is_loopback(args.host) and not _authenticated(settings):
        print(
            f"refusing to listen on {args.host} without authentication: set ALIGND_API_KEYS "
            "('tenant:key,...'), create a key with `alignd-server keys create --tenant T`, or bind to 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    _configure_logging(settings)
    # log_config=None: keep our handlers (JSON when ALIGND_LOG_JSON) instead of uvicorn's own.
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        log_config=None,
    )
    return 0


def _authenticated(settings: Settings) -> bool:
    """Whether the server will demand a key: ALIGND_API_KEYS holds one, or the database does (keys are revoked,
    never deleted, so the server cannot lose its last one while it runs)."""
    if settings.auth_enabled:
        return True
    from sqlalchemy.exc import SQLAlchemyError

    from service.db.api_keys import database_has_keys
    from service.db.session import make_engine

    engine = make_engine(settings.resolved_database_url)
    try:
        return database_has_keys(engine)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"could not look for API keys in the database: {reason}", file=sys.stderr)
        return False
    finally:
        engine.dispose()


def worker_command(args: argparse.Namespace) -> int:
    import asyncio

    settings = Settings()
    if settings.queue != "arq":
        print("alignd-server worker needs ALIGND_QUEUE=arq (and ALIGND_REDIS_URL)", file=sys.stderr)
        return 2
    from redis.exceptions import RedisError

    from workers import tasks

    try:
        tasks.served_methods(settings)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.check:
        try:
            healthy = asyncio.run(tasks.check_health(settings))
        except (OSError, RedisError) as exc:  # unreachable: one line for the probe's log, not a traceback
            print(f"redis unreachable at {_redis_address(settings.redis_url)}: {exc}", file=sys.stderr)
            return 1
        print("healthy" if healthy else "no recent health check from a worker on every served queue")
        return 0 if healthy else 1
    _configure_logging(settings)
    asyncio.run(tasks.serve(settings))
    return 0


def _redis_address(url: str) -> str:
    """host:port of a Redis URL, never its password."""
    parsed = urlparse(url)
    return f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"


def migrate_command(_args: argparse.Namespace) -> int:
    from service.db.session import make_engine, migrate

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    migrate(engine)
    print("database schema is up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignd-server", description="alignd: alignment as a service.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="Run the REST API (embedded mode needs nothing else).")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.set_defaults(func=serve)
    worker_parser = commands.add_parser(
        "worker",
        help="Run an arq worker (ALIGND_QUEUE=arq): ALIGND_WORKER_CONCURRENCY jobs at once, "
        "methods from ALIGND_WORKER_METHODS.",
    )
    worker_parser.add_argument(
        "--check",
        action="store_true",
        help="Exit 0 if workers recently reported health on every served queue.",
    )
    worker_parser.set_defaults(func=worker_command)
    migrate_parser = commands.add_parser("migrate", help="Apply database migrations and exit.")
    migrate_parser.set_defaults(func=migrate_command)
    keys.add_parser(commands)
    trainjob.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
