"""``/v1/datasets``: upload a JSONL file (streamed), validate it locally first, list, get, delete."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from alignd._base import Body, Headers, Query, RequestExtras, RequestOptions, dataset_file_factory, path_id
from alignd.pagination import AsyncPaginator, SyncPage
from alignd.resources._resource import AsyncResource, SyncResource
from alignd.types import Dataset
from alignd.validation import ValidationReport, validate_path

UPLOAD_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
KINDS = ("sft", "preference", "prompts", "ranking", "candidates")


def _upload_options(
    path: str | os.PathLike[str],
    kind: str,
    name: str | None,
    idempotency_key: str | None,
    extras: RequestExtras,
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
        timeout=UPLOAD_TIMEOUT,
        idempotency_key=idempotency_key,
        extras=extras,
    )


class Datasets(SyncResource):
    def upload(
        self,
        path: str | os.PathLike[str],
        *,
        kind: str,
        name: str | None = None,
        idempotency_key: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Dataset:
        """Upload a JSONL file as ``kind`` (``sft`` | ``preference`` | ``prompts`` | ``ranking`` | ``candidates``),
        streamed from disk.

        A file with bad lines raises :class:`alignd.ValidationError` (code ``invalid_dataset``) whose
        ``details`` list each bad line as ``{"line", "code", "message"}``. ``extra_body`` adds form fields;
        ``timeout`` defaults to 300 s per network operation.
        """
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        opts = _upload_options(path, kind, name, idempotency_key, extras)
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
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> SyncPage[Dataset]:
        """Newest first; ``round`` and ``job`` (the job that generated it) filter."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        params = {"limit": limit, "round": round, "job": job}
        return self._client._list("/v1/datasets", Dataset, params=params, after=after, extras=extras)

    def get(
        self,
        dataset_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Dataset:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(f"/v1/datasets/{path_id(dataset_id)}", extras=extras)
        return self._client._parse(response, Dataset)

    retrieve = get

    def delete(
        self,
        dataset_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> None:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        self._client._delete(f"/v1/datasets/{path_id(dataset_id)}", extras=extras)


class AsyncDatasets(AsyncResource):
    async def upload(
        self,
        path: str | os.PathLike[str],
        *,
        kind: str,
        name: str | None = None,
        idempotency_key: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Dataset:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        opts = _upload_options(path, kind, name, idempotency_key, extras)
        return self._client._parse(await self._client.request(opts), Dataset)

    @staticmethod
    def validate(path: str | os.PathLike[str], *, kind: str) -> ValidationReport:
        """Local and CPU-bound; call it via ``asyncio.to_thread`` for a huge file in an event loop."""
        return validate_path(path, kind)

    def list(
        self,
        *,
        limit: int | None = None,
        after: str | None = None,
        round: int | None = None,
        job: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> AsyncPaginator[Dataset]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        params = {"limit": limit, "round": round, "job": job}
        return self._client._list("/v1/datasets", Dataset, params=params, after=after, extras=extras)

    async def get(
        self,
        dataset_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Dataset:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(f"/v1/datasets/{path_id(dataset_id)}", extras=extras)
        return self._client._parse(response, Dataset)

    retrieve = get

    async def delete(
        self,
        dataset_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> None:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        await self._client._delete(f"/v1/datasets/{path_id(dataset_id)}", extras=extras)
