from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alignd._async import AsyncClient
    from alignd._client import Client


class SyncResource:
    def __init__(self, client: Client) -> None:
        self._client = client


class AsyncResource:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client
