"""``alignd-server serve | migrate``: the server's command line."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from service.settings import Settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app

    settings = Settings()
    if not settings.auth_enabled and not _is_loopback(args.host):
        print(
            f"refusing to listen on {args.host} without authentication: set ALIGND_API_KEYS "
            "('tenant:key,...') or bind to 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    _configure_logging(settings)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=settings.log_level.lower())
    return 0


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
    migrate_parser = commands.add_parser("migrate", help="Apply database migrations and exit.")
    migrate_parser.set_defaults(func=migrate_command)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
