"""The synchronous client: ``alignd.Client``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
from alignd.pagination import SyncPage
from alignd.resources.artifacts import Artifacts
from alignd.resources.datasets import Datasets
from alignd.resources.evals import Evals
from alignd.resources.feedback_sets import FeedbackSets
from alignd.resources.graders import Graders
from alignd.resources.jobs import Jobs
from alignd.resources.models import Models

__all__ = ["Client"]


class Client(BaseClient):
    """A client for one alignd server.

    >>> with alignd.Client(base_url="http://127.0.0.1:8000", api_key="key1") as client:
    ...     model = client.models.upload("./SmolLM2-135M-Instruct")

    ``base_url`` and ``api_key`` default to ``ALIGND_BASE_URL`` (else ``http://127.0.0.1:8000``) and
    ``ALIGND_API_KEY``. ``timeout`` is seconds per network operation (or an ``httpx.Timeout``);
    ``max_retries`` how many times a retryable failure is retried (connection errors, timeouts, 429, 502,
    503, 504), honouring ``Retry-After``.
    """

    models: Models
    datasets: Datasets
    feedback_sets: FeedbackSets
    jobs: Jobs
    artifacts: Artifacts
    evals: Evals
    graders: Graders

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        default_headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
        )
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self.timeout, follow_redirects=False)
        self.models = Models(self)
        self.datasets = Datasets(self)
        self.feedback_sets = FeedbackSets(self)
        self.jobs = Jobs(self)
        self.artifacts = Artifacts(self)
        self.evals = Evals(self)
        self.graders = Graders(self)

    def with_options(
        self, *, timeout: float | httpx.Timeout | None = None, max_retries: int | None = None
    ) -> Client:
        """A client with other defaults sharing this one's connection pool."""
        return Client(
            self.base_url,
            self.api_key,
            timeout=timeout if timeout is not None else self.timeout,
            max_retries=self.max_retries if max_retries is None else max_retries,
            default_headers=self._default_headers,
            http_client=self._http,
        )

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------------

    def _send(self, request: httpx.Request, *, follow_redirects: bool) -> httpx.Response:
        response = self._http.send(request, stream=True)
        hops = 0
        while follow_redirects:
            follow = self._redirect_request(response)
            if follow is None:
                break
            response.close()
            hops += 1
            if hops > MAX_REDIRECTS:
                raise APIConnectionError(f"More than {MAX_REDIRECTS} redirects from {request.url}")
            response = self._http.send(follow, stream=True)
        return response

    def request(self, opts: RequestOptions, *, stream: bool = False) -> httpx.Response:
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
                response = self._send(request, follow_redirects=opts.follow_redirects)
                if response.status_code >= 400 or not stream:
                    response.read()
            except httpx.UnsupportedProtocol as exc:
                raise APIConnectionError(f"Unsupported URL {request.url}: {exc}", request=request) from exc
            except httpx.TimeoutException as exc:
                if response is not None:
                    response.close()
                if attempt < retries:
                    time.sleep(retry_delay(attempt))
                    attempt += 1
                    continue
                raise APITimeoutError(
                    f"Request to {request.method} {request.url} timed out after {attempt + 1} attempt(s): "
                    f"{type(exc).__name__}",
                    request=request,
                ) from exc
            except httpx.TransportError as exc:
                if response is not None:
                    response.close()
                if attempt < retries:
                    time.sleep(retry_delay(attempt))
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
                response.close()
                if should_retry_response(response) and attempt < retries:
                    time.sleep(retry_delay(attempt, response))
                    attempt += 1
                    continue
                raise make_status_error(response)
            if not stream:
                response.close()
            return response

    @contextmanager
    def stream(self, opts: RequestOptions) -> Iterator[httpx.Response]:
        response = self.request(opts, stream=True)
        try:
            yield response
        finally:
            response.close()

    # -- helpers for resources --------------------------------------------------------------------

    def _get(self, path: str, *, params: Mapping[str, Any] | None = None, **kw: Any) -> httpx.Response:
        return self.request(RequestOptions("GET", path, params=params, **kw))

    def _post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request(RequestOptions("POST", path, **kw))

    def _patch(self, path: str, **kw: Any) -> httpx.Response:
        return self.request(RequestOptions("PATCH", path, **kw))

    def _delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.request(RequestOptions("DELETE", path, **kw))

    def _list(
        self,
        path: str,
        model: type[T],
        *,
        params: Mapping[str, Any],
        after: str | None,
        extras: RequestExtras,
    ) -> SyncPage[T]:
        """One page of a cursor list; the next pages are fetched with the same params and extras."""
        response = self._get(path, params={**params, "after": after}, extras=extras)
        data, has_more = self._parse_list(response, model)
        return SyncPage(
            data=data,
            has_more=has_more,
            fetch=lambda cursor: self._list(path, model, params=params, after=cursor, extras=extras),
        )
