from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.client.scripted import ScriptedServer, scripted_server


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    """A scripted stdlib HTTP server on a free 127.0.0.1 port."""
    with scripted_server() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGND_API_KEY", raising=False)
    monkeypatch.delenv("ALIGND_BASE_URL", raising=False)
