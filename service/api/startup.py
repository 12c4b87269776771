"""Schema migrations at start, retried in the background while the database is unreachable."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from service.db.session import migrate

log = logging.getLogger(__name__)


class MigrationStartup:
    """Applies migrations, retrying in the background while the database is unreachable.

    The API must come up with its database down (a restarted cluster starts pods in any order): until the
    schema is in place /readyz says so and every /v1 request answers 503 database_unavailable. Workers and
    the reconciler start only once the schema is there (``then``).
    """

    def __init__(self, engine: Engine, *, retry_seconds: float, then: Callable[[], None]) -> None:
        self.engine = engine
        self.retry_seconds = retry_seconds
        self.then = then
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None

    def _attempt(self) -> bool:
        try:
            migrate(self.engine)
        except (OperationalError, DBAPIError, OSError) as exc:
            self.last_error = f"{type(exc).__name__}: {getattr(exc, 'orig', exc)}"
            log.warning("database unavailable at start (%s); retrying", self.last_error)
            return False
        self.last_error = None
        self.ready.set()
        self.then()
        return True

    def start(self) -> None:
        if self._attempt():
            return
        self._thread = threading.Thread(target=self._retry, name="alignd-migrations", daemon=True)
        self._thread.start()

    def _retry(self) -> None:
        while not self.stopping.wait(self.retry_seconds):
            if self._attempt():
                log.info("database reachable; schema up to date")
                return

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
