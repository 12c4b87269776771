"""``/v1/models``: upload a Hugging Face model folder (safetensors only), list, get, delete."""

from __future__ import annotations

import os

import httpx

from alignd._base import (
    Body,
    Headers,
    Query,
    RequestExtras,
    RequestOptions,
    model_files_factory,
    model_folder_files,
    path_id,
)
from alignd.pagination import AsyncPaginator, SyncPage
from alignd.resources._resource import AsyncResource, SyncResource
from alignd.types import Model

# An upload is written for as long as it takes; only a stalled connection times out.
UPLOAD_TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def _upload_options(
    folder: str | os.PathLike[str], name: str | None, idempotency_key: str | None, extras: RequestExtras
) -> RequestOptions:
    paths = model_folder_files(folder)
    return RequestOptions(
        "POST",
        "/v1/models",
        data={"name": name or os.path.basename(os.path.abspath(folder))},
        files=model_files_factory(paths),
        timeout=UPLOAD_TIMEOUT,
        idempotency_key=idempotency_key,
        extras=extras,
    )


class Models(SyncResource):
    def upload(
        self,
        folder: str | os.PathLike[str],
        *,
        name: str | None = None,
        idempotency_key: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Model:
        """Upload a model folder's top-level files as repeated ``files`` parts, streamed from disk.

        ``name`` defaults to the folder's name. Each retry reopens the files and sends them again.
        ``extra_body`` adds form fields; ``timeout`` defaults to 300 s per network operation.
        """
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        opts = _upload_options(folder, name, idempotency_key, extras)
        return self._client._parse(self._client.request(opts), Model)

    def list(
        self,
        *,
        limit: int | None = None,
        after: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> SyncPage[Model]:
        """A page of models, newest first as the server orders them; iterate it to walk every page."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        return self._client._list("/v1/models", Model, params={"limit": limit}, after=after, extras=extras)

    def get(
        self,
        model_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Model:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        return self._client._parse(self._client._get(f"/v1/models/{path_id(model_id)}", extras=extras), Model)

    retrieve = get

    def delete(
        self,
        model_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> None:
        """Delete a model (204). 409 ``in_use`` -> ConflictError while an unfinished job uses it."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        self._client._delete(f"/v1/models/{path_id(model_id)}", extras=extras)


class AsyncModels(AsyncResource):
    async def upload(
        self,
        folder: str | os.PathLike[str],
        *,
        name: str | None = None,
        idempotency_key: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Model:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        opts = _upload_options(folder, name, idempotency_key, extras)
        return self._client._parse(await self._client.request(opts), Model)

    def list(
        self,
        *,
        limit: int | None = None,
        after: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> AsyncPaginator[Model]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        return self._client._list("/v1/models", Model, params={"limit": limit}, after=after, extras=extras)

    async def get(
        self,
        model_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Model:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(f"/v1/models/{path_id(model_id)}", extras=extras)
        return self._client._parse(response, Model)

    retrieve = get

    async def delete(
        self,
        model_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> None:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        await self._client._delete(f"/v1/models/{path_id(model_id)}", extras=extras)
