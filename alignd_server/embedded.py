"""Embedded mode: the API with an in-process job runner (ALIGND_QUEUE=inline, the default).

``alignd-server serve`` runs this app; with ALIGND_QUEUE=arq it is the plain API and workers run elsewhere.
"""

from __future__ import annotations

import secrets
import socket

from fastapi import FastAPI
from sqlalchemy.engine import Engine

from service.api.app import create_app as create_service_app
from service.settings import Settings
from service.storage import ArtifactStore
from workers.runner import JobRunner


def build_runner(settings: Settings, engine: Engine, store: ArtifactStore) -> JobRunner:
    """The runner embedded mode's queue threads call, sharing the app's engine and store."""
    # Unique per process: leases name their owner, and two servers on one host must not share a name.
    worker_id = f"{socket.gethostname()}-{secrets.token_hex(3)}"
    return JobRunner(settings=settings, engine=engine, store=store, worker_id=worker_id)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API; in embedded mode its jobs run in this process (one training child per running job)."""
    return create_service_app(settings, runner_factory=build_runner)
