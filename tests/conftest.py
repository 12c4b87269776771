"""Shared fixtures: settings in a temp dir, the app in-process and over real HTTP, a tiny model and data.

Nothing here mocks a part that runs on this machine: the HTTP server is uvicorn on a free port, the
database a real SQLite file, the training a real child process.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

API_KEYS = {"tenant-a": "key-a", "tenant-b": "key-b"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(data_dir: Path, **overrides: Any) -> Any:
    from service.settings import Settings

    values: dict[str, Any] = {
        "data_dir": data_dir,
        "api_keys": ",".join(f"{tenant}:{key}" for tenant, key in API_KEYS.items()),
        "cancel_grace_seconds": 3.0,
        "torch_threads": 1,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=0)


@pytest.fixture(scope="session")
def sft_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_model import tiny_sft_jsonl

    return tiny_sft_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", n=48)


class UvicornThread:
    """uvicorn serving an app on 127.0.0.1:<free port> in a background thread (lifespan included)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass
class LiveServer:
    base_url: str
    api_key: str
    other_api_key: str
    data_dir: Path
    tiny_model_dir: Path
    sft_jsonl: Path
    settings: Any

    def client(self, api_key: str | None = None, **kwargs: Any) -> httpx.Client:
        key = self.api_key if api_key is None else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60, **kwargs)


@pytest.fixture
def live_server(tmp_path: Path, tiny_model_dir: Path, sft_jsonl: Path) -> Iterator[LiveServer]:
    """A real alignd server (embedded mode, auth on with two tenants) on a free port."""
    from service.api.app import create_app

    settings = make_settings(tmp_path / "alignd")
    with UvicornThread(create_app(settings)) as server:
        yield LiveServer(
            base_url=server.base_url,
            api_key=API_KEYS["tenant-a"],
            other_api_key=API_KEYS["tenant-b"],
            data_dir=settings.data_dir,
            tiny_model_dir=tiny_model_dir,
            sft_jsonl=sft_jsonl,
            settings=settings,
        )


@pytest.fixture(params=["in-process", "http"])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[httpx.Client]:
    """The same API two ways: FastAPI's in-process TestClient and real HTTP to uvicorn. Tenant A's key."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    settings = make_settings(tmp_path / "alignd")
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
    if request.param == "in-process":
        with TestClient(app, headers=headers) as client:
            client.app_settings = settings  # type: ignore[attr-defined]
            yield client
    else:
        with (
            UvicornThread(app) as server,
            httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client,
        ):
            client.app_settings = settings  # type: ignore[attr-defined]
            yield client
