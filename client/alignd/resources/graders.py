"""``/v1/graders``: grade one sample with a rule grader without a job (``run``), or check a grader spec and
get it back normalized with the item fields it reads (``validate``). docs/graders.md lists every kind."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from alignd._base import Body, Headers, Query, RequestExtras
from alignd.resources._resource import AsyncResource, SyncResource
from alignd.types import GraderRun, GraderValidation


def _run_body(
    grader: Mapping[str, Any], model_sample: str | Mapping[str, Any], item: Mapping[str, Any] | None
) -> dict[str, Any]:
    sample = model_sample if isinstance(model_sample, str) else dict(model_sample)
    return {"grader": dict(grader), "model_sample": sample, "item": dict(item or {})}


class Graders(SyncResource):
    def run(
        self,
        *,
        grader: Mapping[str, Any],
        model_sample: str | Mapping[str, Any],
        item: Mapping[str, Any] | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> GraderRun:
        """The reward ``grader`` gives ``model_sample`` (a string, or ``{"output_text", "finish_reason",
        "output_tokens"}``) for the dataset row ``item``. Model-backed graders are a 422 here (they need a
        worker): use them in an evaluate job."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = _run_body(grader, model_sample, item)
        return self._client._parse(self._client._post("/v1/graders/run", json=body, extras=extras), GraderRun)

    def validate(
        self,
        *,
        grader: Mapping[str, Any],
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> GraderValidation:
        """The grader as the server stores it (defaults filled in); ValidationError (422) naming each bad field."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._post("/v1/graders/validate", json={"grader": dict(grader)}, extras=extras)
        return self._client._parse(response, GraderValidation)


class AsyncGraders(AsyncResource):
    async def run(
        self,
        *,
        grader: Mapping[str, Any],
        model_sample: str | Mapping[str, Any],
        item: Mapping[str, Any] | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> GraderRun:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = _run_body(grader, model_sample, item)
        response = await self._client._post("/v1/graders/run", json=body, extras=extras)
        return self._client._parse(response, GraderRun)

    async def validate(
        self,
        *,
        grader: Mapping[str, Any],
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> GraderValidation:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._post(
            "/v1/graders/validate", json={"grader": dict(grader)}, extras=extras
        )
        return self._client._parse(response, GraderValidation)
