"""Evaluations: an ``evaluate`` job (``POST /v1/jobs``, method ``evaluate``) and its result
(``GET /v1/jobs/{id}/evaluation``). docs/evaluation.md describes the spec and the statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from alignd._base import Body, Headers, Query, RequestExtras, path_id
from alignd.resources._resource import AsyncResource, SyncResource
from alignd.types import Evaluation, EvaluationPrompt, Job

PROMPTS_PAGE = 1000


def evaluation_spec(
    candidates: Sequence[Mapping[str, Any]],
    graders: Sequence[Mapping[str, Any]],
    baseline: str | None,
    sampling: Mapping[str, Any] | None,
    bootstrap_resamples: int | None,
) -> dict[str, Any]:
    """The ``evaluation`` object of the job body: the fields given, none sent as null."""
    spec: dict[str, Any] = {
        "candidates": [dict(c) for c in candidates],
        "graders": [dict(g) for g in graders],
    }
    optional = {
        "baseline": baseline,
        "sampling": dict(sampling) if sampling is not None else None,
        "bootstrap_resamples": bootstrap_resamples,
    }
    spec.update({key: value for key, value in optional.items() if value is not None})
    return spec


class Evals(SyncResource):
    def create(
        self,
        *,
        base_model: str,
        prompts: str,
        candidates: Sequence[Mapping[str, Any]],
        graders: Sequence[Mapping[str, Any]],
        baseline: str | None = None,
        sampling: Mapping[str, Any] | None = None,
        bootstrap_resamples: int | None = None,
        seed: int | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        """Submit an ``evaluate`` job (202 -> queued Job): ``client.jobs.create(method="evaluate", ...)``.

        ``candidates``: ``[{"name": "base"}, {"name": "sft", "adapter": "art_..."}]`` (no adapter: the base
        model itself); ``baseline``: the candidate the others are compared with (default: the first);
        ``graders``: grader specs (docs/graders.md); ``sampling``: ``{"max_new_tokens", "temperature",
        "num_samples", ...}``; ``prompts``: a ``prompts`` dataset id.
        """
        return self._client.jobs.create(
            method="evaluate",
            base_model=base_model,
            datasets={"prompts": prompts},
            evaluation=evaluation_spec(candidates, graders, baseline, sampling, bootstrap_resamples),
            seed=seed,
            name=name,
            idempotency_key=idempotency_key,
            extra_headers=extra_headers,
            extra_query=extra_query,
            extra_body=extra_body,
            timeout=timeout,
        )

    def retrieve(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Evaluation:
        """The job's evaluation (an evaluate job's, or an rlhf job's final one); ConflictError (409) until the
        job has succeeded, NotFoundError (404) for a job that has none. ``.table()`` formats it."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(f"/v1/jobs/{path_id(job_id)}/evaluation", extras=extras)
        return self._client._parse(response, Evaluation)

    def prompts(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> list[EvaluationPrompt]:
        """Every prompt of the evaluation in order, each with its candidates' answers and scores side by side
        (pages are followed); the same 409 / 404 as :meth:`retrieve`."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        out: list[EvaluationPrompt] = []
        while True:
            params = {"limit": PROMPTS_PAGE, "after": out[-1].index if out else None}
            response = self._client._get(
                f"/v1/jobs/{path_id(job_id)}/evaluation/prompts", params=params, extras=extras
            )
            page, has_more = self._client._parse_list(response, EvaluationPrompt)
            out += page
            if not has_more or not page:
                return out


class AsyncEvals(AsyncResource):
    async def create(
        self,
        *,
        base_model: str,
        prompts: str,
        candidates: Sequence[Mapping[str, Any]],
        graders: Sequence[Mapping[str, Any]],
        baseline: str | None = None,
        sampling: Mapping[str, Any] | None = None,
        bootstrap_resamples: int | None = None,
        seed: int | None = None,
        name: str | None = None,
        idempotency_key: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Job:
        return await self._client.jobs.create(
            method="evaluate",
            base_model=base_model,
            datasets={"prompts": prompts},
            evaluation=evaluation_spec(candidates, graders, baseline, sampling, bootstrap_resamples),
            seed=seed,
            name=name,
            idempotency_key=idempotency_key,
            extra_headers=extra_headers,
            extra_query=extra_query,
            extra_body=extra_body,
            timeout=timeout,
        )

    async def retrieve(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Evaluation:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(f"/v1/jobs/{path_id(job_id)}/evaluation", extras=extras)
        return self._client._parse(response, Evaluation)

    async def prompts(
        self,
        job_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> list[EvaluationPrompt]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        out: list[EvaluationPrompt] = []
        while True:
            params = {"limit": PROMPTS_PAGE, "after": out[-1].index if out else None}
            response = await self._client._get(
                f"/v1/jobs/{path_id(job_id)}/evaluation/prompts", params=params, extras=extras
            )
            page, has_more = self._client._parse_list(response, EvaluationPrompt)
            out += page
            if not has_more or not page:
                return out
