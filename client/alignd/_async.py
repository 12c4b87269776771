"""The asynchronous client: ``alignd.AsyncClient``, the same surface as ``Client`` with ``await``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import httpx

from alignd._base import (
    DEFAULT_MAX_RETRIES,
    MAX_REDIRECTS,
    BaseClient,
    RequestExtras,
    RequestOptions,
    T,
    close_all,
)
from alignd._errors import APIConnectionError, APITimeoutError, make_status_error
from alignd._retry import retry_delay, should_retry_response
from alignd.pagination import AsyncPage, AsyncPaginator
from alignd.resources.artifacts import AsyncArtifacts
from alignd.resources.datasets import AsyncDatasets
from alignd.resources.evals import AsyncEvals
from alignd.resources.feedback_sets import AsyncFeedbackSets
from alignd.resources.graders import AsyncGraders
from alignd.resources.jobs import AsyncJobs
from alignd.resources.models import AsyncModels

__all__ = ["AsyncClient"]


class AsyncClient(BaseClient):
    """A client for one alignd server.

    >>> async with alignd.AsyncClient(api_key="key1") as client:
    ...     model = await client.models.upload("./SmolLM2-135M-Instruct")

    ``base_url`` and ``api_key`` default to ``ALIGND_BASE_URL`` (else ``http://127.0.0.1:8000``) and
    ``ALIGND_API_KEY``. ``timeout`` is seconds per network operation (or an ``httpx.Timeout``);
    ``max_retries`` how many times a retryable failure is retried (connection errors, timeouts, 429, 502,
    503, 504), honouring ``Retry-After``.
    """

    models: AsyncModels
    datasets: AsyncDatasets
    feedback_sets: AsyncFeedbackSets
    jobs: AsyncJobs
    artifacts: AsyncArtifacts
    evals: AsyncEvals
    graders: AsyncGraders

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        self.models = AsyncModels(self)
        self.datasets = AsyncDatasets(self)
        self.feedback_sets = AsyncFeedbackSets(self)
        self.jobs = AsyncJobs(self)
        self.artifacts = AsyncArtifacts(self)
        self.evals = AsyncEvals(self)
        self.graders = AsyncGraders(self)

    def with_options(
        self, *, timeout: float | httpx.Timeout | None = None, max_retries: int | None = None
    ) -> AsyncClient:
        """A client with other defaults sharing this one's connection pool."""
        return AsyncClient(
            self.base_url,
            self.api_key,
            timeout=timeout if timeout is not None else self.timeout,
            max_retries=self.max_retries if max_retries is None else max_retries,
            default_headers=self._default_headers,
            http_client=self._http,
        )

    # -- lifecycle --------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- transport --------------------------------------------------------------------------------

    async def _send(self, request: httpx.Request, *, follow_redirects: bool) -> httpx.Response:
        response = await self._http.send(request, stream=True)
        hops = 0
        while follow_redirects:
            follow = self._redirect_request(response)
            if follow is None:
                break
            await response.aclose()
            hops += 1
            if hops > MAX_REDIRECTS:
                raise APIConnectionError(f"More than {MAX_REDIRECTS} redirects from {request.url}")
            response = await self._http.send(follow, stream=True)
        return response

    async def request(self, opts: RequestOptions, *, stream: bool = False) -> httpx.Response:
        """Send one logical request with retries; raise the mapped error for a 4xx/5xx answer.

        With ``stream=False`` the body is read and the connection released; with ``stream=True`` the caller
        must close the response (see :meth:`stream`).
        """
        key = self._idempotency_key(opts)
        retries = self.max_retries if opts.max_retries is None else opts.max_retries
        attempt = 0
        while True:
            request, opened = self._build_request(self._http, opts, key)
            response: httpx.Response | None = None
            try:
                response = await self._send(request, follow_redirects=opts.follow_redirects)
                if response.status_code >= 400 or not stream:
                    await response.aread()
            except httpx.UnsupportedProtocol as exc:
                raise APIConnectionError(f"Unsupported URL {request.url}: {exc}", request=request) from exc
            except httpx.TimeoutException as exc:
                if response is not None:
                    await response.aclose()
                if attempt < retries:
                    await asyncio.sleep(retry_delay(attempt))
                    attempt += 1
                    continue
                raise APITimeoutError(
                    f"Request to {request.method} {request.url} timed out after {attempt + 1} attempt(s): "
                    f"{type(exc).__name__}",
                    request=request,
                ) from exc
            except httpx.TransportError as exc:
                if response is not None:
                    await response.aclose()
                if attempt < retries:
                    await asyncio.sleep(retry_delay(attempt))
                    attempt += 1
                    continue
                raise APIConnectionError(
                    f"Could not reach {self.base_url} ({request.method} {request.url.path}) after "
                    f"{attempt + 1} attempt(s): {exc or type(exc).__name__}",
                    request=request,
                ) from exc
            finally:
                close_all(opened)
            if response.status_code >= 400:
                await response.aclose()
                if should_retry_response(response) and attempt < retries:
                    await asyncio.sleep(retry_delay(attempt, response))
                    attempt += 1
                    continue
                raise make_status_error(response)
            if not stream:
                await response.aclose()
            return response

    @asynccontextmanager
    async def stream(self, opts: RequestOptions) -> AsyncIterator[httpx.Response]:
        response = await self.request(opts, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    # -- helpers for resources --------------------------------------------------------------------

    async def _get(self, path: str, *, params: Mapping[str, Any] | None = None, **kw: Any) -> httpx.Response:
        return await self.request(RequestOptions("GET", path, params=params, **kw))

    async def _post(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request(RequestOptions("POST", path, **kw))

    async def _patch(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request(RequestOptions("PATCH", path, **kw))

    async def _delete(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request(RequestOptions("DELETE", path, **kw))

    def _list(
        self,
        path: str,
        model: type[T],
        *,
        params: Mapping[str, Any],
        after: str | None,
        extras: RequestExtras,
    ) -> AsyncPaginator[T]:
        """A cursor list: awaited for its first page, or iterated; every page with the same params and extras."""

        async def page(cursor: str | None) -> AsyncPage[T]:
            response = await self._get(path, params={**params, "after": cursor}, extras=extras)
            data, has_more = self._parse_list(response, model)
            return AsyncPage(data=data, has_more=has_more, fetch=page)

        return AsyncPaginator(lambda: page(after))
