"""``/v1/models``: upload a Hugging Face model folder (safetensors only), list, get, delete."""

from __future__ import annotations

import os

import httpx

from alignd._base import RequestOptions, model_files_factory, model_folder_files, path_id
from alignd.pagination import AsyncPage, AsyncPaginator, SyncPage
from alignd.resources._resource import AsyncResource, SyncResource
from alignd.types import Model

# An upload is written for as long as it takes; only a stalled connection times out.
UPLOAD_TIMEOUT = httpx.Timeout(300.0, connect=10.0)


class Models(SyncResource):
    def upload(
        self,
        folder: str | os.PathLike[str],
        *,
        name: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        idempotency_key: str | None = None,
    ) -> Model:
        """Upload a model folder's top-level files as repeated ``files`` parts, streamed from disk.

        ``name`` defaults to the folder's name. Each retry reopens the files and sends them again.
        """
        paths = model_folder_files(folder)
        opts = RequestOptions(
            "POST",
            "/v1/models",
            data={"name": name or os.path.basename(os.path.abspath(folder))},
            files=model_files_factory(paths),
            timeout=timeout if timeout is not None else UPLOAD_TIMEOUT,
            idempotency_key=idempotency_key,
        )
        return self._client._parse(self._client.request(opts), Model)

    def list(self, *, limit: int | None = None, after: str | None = None) -> SyncPage[Model]:
        """A page of models, newest first as the server orders them; iterate it to walk every page."""
        response = self._client._get("/v1/models", params={"limit": limit, "after": after})
        data, has_more = self._client._parse_list(response, Model)
        return SyncPage(
            data=data, has_more=has_more, fetch=lambda cursor: self.list(limit=limit, after=cursor)
        )

    def get(self, model_id: str) -> Model:
        return self._client._parse(self._client._get(f"/v1/models/{path_id(model_id)}"), Model)

    retrieve = get

    def delete(self, model_id: str) -> None:
        """Delete a model (204). 409 ``in_use`` -> ConflictError while an unfinished job uses it."""
        self._client._delete(f"/v1/models/{path_id(model_id)}")


class AsyncModels(AsyncResource):
    async def upload(
        self,
        folder: str | os.PathLike[str],
        *,
        name: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        idempotency_key: str | None = None,
    ) -> Model:
        paths = model_folder_files(folder)
        opts = RequestOptions(
            "POST",
            "/v1/models",
            data={"name": name or os.path.basename(os.path.abspath(folder))},
            files=model_files_factory(paths),
            timeout=timeout if timeout is not None else UPLOAD_TIMEOUT,
            idempotency_key=idempotency_key,
        )
        return self._client._parse(await self._client.request(opts), Model)

    def list(self, *, limit: int | None = None, after: str | None = None) -> AsyncPaginator[Model]:
        async def first() -> AsyncPage[Model]:
            return await self._page(limit, after)

        return AsyncPaginator(first)

    async def _page(self, limit: int | None, after: str | None) -> AsyncPage[Model]:
        response = await self._client._get("/v1/models", params={"limit": limit, "after": after})
        data, has_more = self._client._parse_list(response, Model)
        return AsyncPage(data=data, has_more=has_more, fetch=lambda cursor: self._page(limit, cursor))

    async def get(self, model_id: str) -> Model:
        return self._client._parse(await self._client._get(f"/v1/models/{path_id(model_id)}"), Model)

    retrieve = get

    async def delete(self, model_id: str) -> None:
        await self._client._delete(f"/v1/models/{path_id(model_id)}")
