"""``/v1/jobs``: submit, list, get, cancel, wait (with live progress), events (SSE), metrics, artifacts."""

from __future__ import annotations

import asyncio
import builtins
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, TextIO

import httpx

from alignd._base import Body, Headers, Query, RequestExtras, RequestOptions, job_body, path_id
from alignd._errors import APIConnectionError, JobFailedError, JobWaitTimeoutError
from alignd._progress import ProgressLine
from alignd._retry import backoff_delay
from alignd._sse import ServerSentEvent, SSEDecoder
from alignd.pagination import AsyncPaginator, SyncPage
from alignd.resources._resource import AsyncResource, SyncResource
from alignd.types import Artifact, Job, JobEvent, Metric, MetricList

# SSE: a quiet job may send nothing for minutes; a read timeout just means "reconnect".
STREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=30.0)
END_EVENTS = frozenset({"end", "done", "close", "eof"})
SKIP_EVENTS = frozenset({"ping", "heartbeat", "keepalive"})


def _event_from_sse(sse: ServerSentEvent) -> JobEvent:
    try:
        payload = json.loads(sse.data)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        event = JobEvent.model_validate(payload)
        if event.id is None and sse.id is not None:
            event.id = sse.id
        return event
    return JobEvent(id=sse.id, message=sse.data)


def _stream_options(
    job_id: str,
    last_event_id: str | None,
    extras: RequestExtras,
    *,
    feed: str = "events",
    params: dict[str, Any] | None = None,
) -> RequestOptions:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return RequestOptions(
        "GET",
        f"/v1/jobs/{path_id(job_id)}/{feed}",
        params=params,
        headers=headers,
        timeout=STREAM_TIMEOUT,
        max_retries=0,
        extras=extras,
    )


def _metrics_from_sse(sse: ServerSentEvent) -> list[Metric]:
    """An ``event: metrics`` batch, ``{"data": [point, ...]}``, as its points."""
    payload = json.loads(sse.data)
    return [Metric.model_validate(point) for point in payload.get("data", [])]


def _metrics_from(client_parse: Any, response: httpx.Response) -> MetricList:
    rows, _ = client_parse(response, Metric)
    return MetricList(rows)


def _check_finished(job: Job, raise_on_failure: bool) -> Job:
    if raise_on_failure and job.status in ("failed", "cancelled"):
        raise JobFailedError(job)
    return job


class Jobs(SyncResource):
    def create(
        self,
        *,
        method: str,
        base_model: str,
        datasets: Mapping[str, str] | None = None,
        init_adapter: str | None = None,
        reward_model: str | None = None,
        init_reward_model: str | None = None,
        round: int | None = None,
        lora: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        seed: int | None = None,
        name: str | None = None,
        evaluation: Mapping[str, Any] | None = None,
        resources: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        """Submit a job (202 -> queued Job).

        ``datasets`` maps a role to a dataset id: ``{"sft": "ds_..."}``; ``preference`` for reward_model and
        dpo; ``prompts`` (+ ``reward_model``, an artifact id) for ppo; all three for rlhf.
        ``init_reward_model`` (a reward_model artifact) continues one (reward_model, rlhf); ``round`` tags
        the job with a feedback round. ``evaluation``: the ``evaluate`` method's spec (``client.evals.create``
        builds it). ``resources``: ``{"processes": N}`` trains on N processes of one worker (every
        training method; docs/scale-out.md); ``{"precision": "bf16"}`` puts the base in bf16.
        """
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = job_body(
            method=method,
            base_model=base_model,
            datasets=datasets,
            init_adapter=init_adapter,
            reward_model=reward_model,
            init_reward_model=init_reward_model,
            round=round,
            lora=lora,
            hyperparameters=hyperparameters,
            seed=seed,
            name=name,
            evaluation=evaluation,
            resources=resources,
        )
        response = self._client._post("/v1/jobs", json=body, idempotency_key=idempotency_key, extras=extras)
        return self._client._parse(response, Job)

    def list(
        self,
        *,
        status: str | None = None,
        round: int | None = None,
        limit: int | None = None,
        after: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> SyncPage[Job]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        params = {"status": status, "round": round, "limit": limit}
        return self._client._list("/v1/jobs", Job, params=params, after=after, extras=extras)

    def get(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        return self._client._parse(self._client._get(f"/v1/jobs/{path_id(job_id)}", extras=extras), Job)

    retrieve = get

    def cancel(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        """Cancel a queued or running job; ConflictError (409) once it has finished."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        return self._client._parse(
            self._client._post(f"/v1/jobs/{path_id(job_id)}/cancel", extras=extras), Job
        )

    def pause(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        """Pause a job: a queued one at once; a running one stops at its next step after a checkpoint
        (``pause_requested`` until then, then ``paused``). ConflictError (409) once it has finished."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        return self._client._parse(
            self._client._post(f"/v1/jobs/{path_id(job_id)}/pause", extras=extras), Job
        )

    def resume(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        """Resume a paused job from its newest checkpoint (or withdraw a pending pause); ConflictError
        (409, ``job_not_paused``) for a job that is neither paused nor pausing."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        return self._client._parse(
            self._client._post(f"/v1/jobs/{path_id(job_id)}/resume", extras=extras), Job
        )

    def events(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> builtins.list[JobEvent]:
        """Every event so far, oldest first (no streaming; pages are followed)."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        out: builtins.list[JobEvent] = []
        after: str | None = None
        while True:
            response = self._client._get(
                f"/v1/jobs/{path_id(job_id)}/events", params={"after": after}, extras=extras
            )
            data, has_more = self._client._parse_list(response, JobEvent)
            out.extend(data)
            if not has_more or not data or data[-1].id is None:
                return out
            after = str(data[-1].id)

    def metrics(
        self,
        job_id: str,
        *,
        after: int | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> MetricList:
        """Every metric row so far (``after``: only those whose ``seq`` is greater, to poll for new ones);
        ``.as_dict()`` -> ``{name: {"step": [...], "value": [...]}}``."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(
            f"/v1/jobs/{path_id(job_id)}/metrics", params={"after": after}, extras=extras
        )
        return _metrics_from(self._client._parse_list, response)

    def metrics_csv(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> str:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(
            f"/v1/jobs/{path_id(job_id)}/metrics",
            params={"format": "csv"},
            headers={"Accept": "text/csv"},
            extras=extras,
        )
        return response.text

    def artifacts(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> builtins.list[Artifact]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(f"/v1/jobs/{path_id(job_id)}/artifacts", extras=extras)
        data, _ = self._client._parse_list(response, Artifact)
        return data

    def stream_events(
        self,
        job_id: str,
        *,
        last_event_id: str | int | None = None,
        reconnect: bool = True,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Iterator[JobEvent]:
        """Yield the job's events live over SSE until the job ends.

        A dropped connection is resumed with ``Last-Event-ID`` (so no event is lost or repeated); a stream
        that ends while the job is still unfinished is resumed too. Gives up with APIConnectionError after
        ``max_retries`` consecutive failed connection attempts. ``timeout`` replaces the stream's own
        (120 s between reads); the extras go on every connection and on the job lookups between them.
        """
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        last = None if last_event_id is None else str(last_event_id)
        failures = 0
        while True:
            try:
                with self._client.stream(_stream_options(job_id, last, extras)) as response:
                    failures = 0
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        if sse.id is not None:
                            last = sse.id
                        if sse.event in END_EVENTS:
                            return
                        if sse.event in SKIP_EVENTS or not sse.data:
                            continue
                        yield _event_from_sse(sse)
            except (httpx.TransportError, APIConnectionError) as exc:
                if not reconnect:
                    raise APIConnectionError(f"Event stream of {job_id} broke: {exc}") from exc
                failures += 1
                if failures > self._client.max_retries:
                    raise APIConnectionError(
                        f"Event stream of {job_id} could not be resumed after {failures} attempts: {exc}"
                    ) from exc
                time.sleep(backoff_delay(failures - 1))
                continue
            if not reconnect or self.get(job_id, **extras.as_kwargs()).is_terminal:
                return
            time.sleep(0.5)

    def stream_metrics(
        self,
        job_id: str,
        *,
        after: int | None = None,
        name: str | None = None,
        reconnect: bool = True,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Iterator[Metric]:
        """Yield the job's metric points live over SSE, oldest first, until the job ends and all were sent.

        ``after``: start after the point with this ``seq``; ``name``: only that metric. A dropped connection
        is resumed after the last point received (its ``seq`` as ``Last-Event-ID``), so none is lost or
        repeated; retries as :meth:`stream_events` does."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        last = None if after is None else str(after)
        failures = 0
        while True:
            options = _stream_options(job_id, last, extras, feed="metrics", params={"name": name})
            try:
                with self._client.stream(options) as response:
                    failures = 0
                    decoder = SSEDecoder()
                    for line in response.iter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        if sse.event in END_EVENTS:
                            return
                        if sse.event == "metrics" and sse.data:
                            yield from _metrics_from_sse(sse)
                            last = sse.id or last
            except (httpx.TransportError, APIConnectionError) as exc:
                if not reconnect:
                    raise APIConnectionError(f"Metric stream of {job_id} broke: {exc}") from exc
                failures += 1
                if failures > self._client.max_retries:
                    raise APIConnectionError(
                        f"Metric stream of {job_id} could not be resumed after {failures} attempts: {exc}"
                    ) from exc
                time.sleep(backoff_delay(failures - 1))
                continue
            if not reconnect or self.get(job_id, **extras.as_kwargs()).is_terminal:
                return
            time.sleep(0.5)

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        progress: bool = False,
        raise_on_failure: bool = True,
        progress_stream: TextIO | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        request_timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        """Poll until the job is ``succeeded`` (returned), ``failed`` or ``cancelled`` (JobFailedError).
        A ``paused`` job is not finished: the wait goes on until it is resumed and ends (or ``timeout``).

        ``progress=True`` draws one live line on stderr: stage, progress, latest loss/reward.
        ``timeout`` (seconds) is the whole wait: past it JobWaitTimeoutError is raised and the job keeps
        running on the server. ``request_timeout`` is each poll's own; the extras go on every poll.
        """
        extras = RequestExtras(extra_headers, extra_query, extra_body, request_timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        line = ProgressLine(progress_stream) if progress else None
        try:
            while True:
                job = self.get(job_id, **extras.as_kwargs())
                if line is not None:
                    metrics = self.metrics(job_id, **extras.as_kwargs()) if job.status != "queued" else None
                    line.update(job, metrics)
                if job.is_terminal:
                    return _check_finished(job, raise_on_failure)
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise JobWaitTimeoutError(
                            f"Job {job_id} still {job.status} after {timeout:g}s", job=job
                        )
                    time.sleep(min(poll_interval, remaining))
                else:
                    time.sleep(poll_interval)
        finally:
            if line is not None:
                line.close()


class AsyncJobs(AsyncResource):
    async def create(
        self,
        *,
        method: str,
        base_model: str,
        datasets: Mapping[str, str] | None = None,
        init_adapter: str | None = None,
        reward_model: str | None = None,
        init_reward_model: str | None = None,
        round: int | None = None,
        lora: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        seed: int | None = None,
        name: str | None = None,
        evaluation: Mapping[str, Any] | None = None,
        resources: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = job_body(
            method=method,
            base_model=base_model,
            datasets=datasets,
            init_adapter=init_adapter,
            reward_model=reward_model,
            init_reward_model=init_reward_model,
            round=round,
            lora=lora,
            hyperparameters=hyperparameters,
            seed=seed,
            name=name,
            evaluation=evaluation,
            resources=resources,
        )
        response = await self._client._post(
            "/v1/jobs", json=body, idempotency_key=idempotency_key, extras=extras
        )
        return self._client._parse(response, Job)

    def list(
        self,
        *,
        status: str | None = None,
        round: int | None = None,
        limit: int | None = None,
        after: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> AsyncPaginator[Job]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        params = {"status": status, "round": round, "limit": limit}
        return self._client._list("/v1/jobs", Job, params=params, after=after, extras=extras)

    async def get(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(f"/v1/jobs/{path_id(job_id)}", extras=extras)
        return self._client._parse(response, Job)

    retrieve = get

    async def cancel(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._post(f"/v1/jobs/{path_id(job_id)}/cancel", extras=extras)
        return self._client._parse(response, Job)

    async def pause(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._post(f"/v1/jobs/{path_id(job_id)}/pause", extras=extras)
        return self._client._parse(response, Job)

    async def resume(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._post(f"/v1/jobs/{path_id(job_id)}/resume", extras=extras)
        return self._client._parse(response, Job)

    async def events(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> builtins.list[JobEvent]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        out: builtins.list[JobEvent] = []
        after: str | None = None
        while True:
            response = await self._client._get(
                f"/v1/jobs/{path_id(job_id)}/events", params={"after": after}, extras=extras
            )
            data, has_more = self._client._parse_list(response, JobEvent)
            out.extend(data)
            if not has_more or not data or data[-1].id is None:
                return out
            after = str(data[-1].id)

    async def metrics(
        self,
        job_id: str,
        *,
        after: int | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> MetricList:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(
            f"/v1/jobs/{path_id(job_id)}/metrics", params={"after": after}, extras=extras
        )
        return _metrics_from(self._client._parse_list, response)

    async def metrics_csv(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> str:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(
            f"/v1/jobs/{path_id(job_id)}/metrics",
            params={"format": "csv"},
            headers={"Accept": "text/csv"},
            extras=extras,
        )
        return response.text

    async def artifacts(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> builtins.list[Artifact]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(f"/v1/jobs/{path_id(job_id)}/artifacts", extras=extras)
        data, _ = self._client._parse_list(response, Artifact)
        return data

    async def stream_events(
        self,
        job_id: str,
        *,
        last_event_id: str | int | None = None,
        reconnect: bool = True,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> AsyncIterator[JobEvent]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        last = None if last_event_id is None else str(last_event_id)
        failures = 0
        while True:
            try:
                async with self._client.stream(_stream_options(job_id, last, extras)) as response:
                    failures = 0
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        if sse.id is not None:
                            last = sse.id
                        if sse.event in END_EVENTS:
                            return
                        if sse.event in SKIP_EVENTS or not sse.data:
                            continue
                        yield _event_from_sse(sse)
            except (httpx.TransportError, APIConnectionError) as exc:
                if not reconnect:
                    raise APIConnectionError(f"Event stream of {job_id} broke: {exc}") from exc
                failures += 1
                if failures > self._client.max_retries:
                    raise APIConnectionError(
                        f"Event stream of {job_id} could not be resumed after {failures} attempts: {exc}"
                    ) from exc
                await asyncio.sleep(backoff_delay(failures - 1))
                continue
            if not reconnect or (await self.get(job_id, **extras.as_kwargs())).is_terminal:
                return
            await asyncio.sleep(0.5)

    async def stream_metrics(
        self,
        job_id: str,
        *,
        after: int | None = None,
        name: str | None = None,
        reconnect: bool = True,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> AsyncIterator[Metric]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        last = None if after is None else str(after)
        failures = 0
        while True:
            options = _stream_options(job_id, last, extras, feed="metrics", params={"name": name})
            try:
                async with self._client.stream(options) as response:
                    failures = 0
                    decoder = SSEDecoder()
                    async for line in response.aiter_lines():
                        sse = decoder.feed(line)
                        if sse is None:
                            continue
                        if sse.event in END_EVENTS:
                            return
                        if sse.event == "metrics" and sse.data:
                            for point in _metrics_from_sse(sse):
                                yield point
                            last = sse.id or last
            except (httpx.TransportError, APIConnectionError) as exc:
                if not reconnect:
                    raise APIConnectionError(f"Metric stream of {job_id} broke: {exc}") from exc
                failures += 1
                if failures > self._client.max_retries:
                    raise APIConnectionError(
                        f"Metric stream of {job_id} could not be resumed after {failures} attempts: {exc}"
                    ) from exc
                await asyncio.sleep(backoff_delay(failures - 1))
                continue
            if not reconnect or (await self.get(job_id, **extras.as_kwargs())).is_terminal:
                return
            await asyncio.sleep(0.5)

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = 2.0,
        progress: bool = False,
        raise_on_failure: bool = True,
        progress_stream: TextIO | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        request_timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        extras = RequestExtras(extra_headers, extra_query, extra_body, request_timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        line = ProgressLine(progress_stream) if progress else None
        try:
            while True:
                job = await self.get(job_id, **extras.as_kwargs())
                if line is not None:
                    metrics = (
                        await self.metrics(job_id, **extras.as_kwargs()) if job.status != "queued" else None
                    )
                    line.update(job, metrics)
                if job.is_terminal:
                    return _check_finished(job, raise_on_failure)
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise JobWaitTimeoutError(
                            f"Job {job_id} still {job.status} after {timeout:g}s", job=job
                        )
                    await asyncio.sleep(min(poll_interval, remaining))
                else:
                    await asyncio.sleep(poll_interval)
        finally:
            if line is not None:
                line.close()
