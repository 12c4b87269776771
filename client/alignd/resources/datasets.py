"""``/v1/datasets``: upload a JSONL file (streamed), validate it locally first, list, get, delete."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from alignd._base import RequestOptions, dataset_file_factory, path_id
from alignd.pagination import AsyncPage, AsyncPaginator, SyncPage
from alignd.resources._resource import AsyncResource, SyncResource
from alignd.types import Dataset
from alignd.validation import ValidationReport, validate_path

UPLOAD_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
KINDS = ("sft", "preference", "prompts", "ranking", "candidates")


def _upload_options(
    path: str | os.PathLike[str],
    kind: str,
    name: str | None,
    timeout: float | httpx.Timeout | None,
    idempotency_key: str | None,
) -> RequestOptions:
    file_path = Path(path)
    data = {"kind": kind}
    if name is not None:
        data["name"] = name
    return RequestOptions(
        "POST",
        "/v1/datasets",
        data=data,
        files=dataset_file_factory(file_path),
        timeout=timeout if timeout is not None else UPLOAD_TIMEOUT,
        idempotency_key=idempotency_key,
    )


class Datasets(SyncResource):
    def upload(
        self,
        path: str | os.PathLike[str],
        *,
        kind: str,
        name: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        idempotency_key: str | None = None,
    ) -> Dataset:
        """Upload a JSONL file as ``kind`` (``sft`` | ``preference`` | ``prompts`` | ``ranking`` | ``candidates``),
        streamed from disk.

        A file with bad lines raises :class:`alignd.ValidationError` (code ``invalid_dataset``) whose
        ``details`` list each bad line as ``{"line", "code", "message"}``.
        """
        opts = _upload_options(path, kind, name, timeout, idempotency_key)
        return self._client._parse(self._client.request(opts), Dataset)

    @staticmethod
    def validate(path: str | os.PathLike[str], *, kind: str) -> ValidationReport:
        """Check a file locally with the server's own rules (no network). ``report.ok``, ``report.issues``."""
        return validate_path(path, kind)

    def list(
        self,
        *,
        limit: int | None = None,
        after: str | None = None,
        round: int | None = None,
        job: str | None = None,
    ) -> SyncPage[Dataset]:
        """Newest first; ``round`` and ``job`` (the job that generated it) filter."""
        params = {"limit": limit, "after": after, "round": round, "job": job}
        data, has_more = self._client._parse_list(self._client._get("/v1/datasets", params=params), Dataset)
        return SyncPage(
            data=data,
            has_more=has_more,
            fetch=lambda cursor: self.list(limit=limit, after=cursor, round=round, job=job),
        )

    def get(self, dataset_id: str) -> Dataset:
        return self._client._parse(self._client._get(f"/v1/datasets/{path_id(dataset_id)}"), Dataset)

    retrieve = get

    def delete(self, dataset_id: str) -> None:
        self._client._delete(f"/v1/datasets/{path_id(dataset_id)}")


class AsyncDatasets(AsyncResource):
    async def upload(
        self,
        path: str | os.PathLike[str],
        *,
        kind: str,
        name: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        idempotency_key: str | None = None,
    ) -> Dataset:
        opts = _upload_options(path, kind, name, timeout, idempotency_key)
        return self._client._parse(await self._client.request(opts), Dataset)

    @staticmethod
    def validate(path: str | os.PathLike[str], *, kind: str) -> ValidationReport:
        """Local and CPU-bound; call it via ``asyncio.to_thread`` for a huge file in an event loop."""
        return validate_path(path, kind)

    def list(self, *, limit: int | None = None, after: str | None = None) -> AsyncPaginator[Dataset]:
        async def first() -> AsyncPage[Dataset]:
            return await self._page(limit, after)

        return AsyncPaginator(first)

    async def _page(self, limit: int | None, after: str | None) -> AsyncPage[Dataset]:
        response = await self._client._get("/v1/datasets", params={"limit": limit, "after": after})
        data, has_more = self._client._parse_list(response, Dataset)
        return AsyncPage(data=data, has_more=has_more, fetch=lambda cursor: self._page(limit, cursor))

    async def get(self, dataset_id: str) -> Dataset:
        return self._client._parse(await self._client._get(f"/v1/datasets/{path_id(dataset_id)}"), Dataset)

    retrieve = get

    async def delete(self, dataset_id: str) -> None:
        await self._client._delete(f"/v1/datasets/{path_id(dataset_id)}")
