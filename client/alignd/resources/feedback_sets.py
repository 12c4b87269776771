"""``/v1/feedback-sets``: put candidates up for labelling, hand items to annotators, label, rate, export."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from alignd._base import Body, Headers, Query, RequestExtras, path_id
from alignd.pagination import AsyncPaginator, SyncPage
from alignd.resources._resource import AsyncResource, SyncResource
from alignd.types import (
    Dataset,
    FeedbackAnnotators,
    FeedbackItem,
    FeedbackLabel,
    FeedbackRatings,
    FeedbackSet,
)


def _create_body(
    name: str,
    candidates: str,
    annotations_per_item: int | None,
    round: int | None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "candidates": candidates}
    if annotations_per_item is not None:
        body["annotations_per_item"] = annotations_per_item
    if round is not None:
        body["round"] = round
    body.update({k: v for k, v in (options or {}).items() if v is not None})
    return body


def _options(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _label_body(
    item: str,
    annotator: str,
    ranking: Sequence[str] | None,
    scores: Mapping[str, float] | None,
    a: str | None,
    b: str | None,
    winner: str | None,
    skip: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"item": item, "annotator": annotator}
    if ranking is not None:
        body["ranking"] = list(ranking)
    if scores is not None:
        body["scores"] = dict(scores)
    for key, value in (("a", a), ("b", b), ("winner", winner)):
        if value is not None:
            body[key] = value
    if skip:
        body["skip"] = True
    return body


def _export_body(
    name: str | None,
    min_labels: int | None,
    min_agreement: float | None,
    round: int | None,
    weighting: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    optional = {
        "name": name,
        "min_labels": min_labels,
        "min_agreement": min_agreement,
        "round": round,
        **(weighting or {}),
    }
    return {k: v for k, v in optional.items() if v is not None}


def _next_or_none(parse: Any, response: httpx.Response) -> FeedbackItem | None:
    if response.status_code == 204:
        return None
    item: FeedbackItem = parse(response, FeedbackItem)
    return item


class FeedbackSets(SyncResource):
    def create(
        self,
        *,
        name: str,
        candidates: str,
        annotations_per_item: int | None = None,
        round: int | None = None,
        ordering: str | None = None,
        reward_model: str | None = None,
        refresh_every_labels: int | None = None,
        refresh_from: str | None = None,
        guidelines: str | None = None,
        gold_every: int | None = None,
        gold_failure_threshold: float | None = None,
        routing: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackSet:
        """Put a ``candidates`` dataset up for labelling; each item wants ``annotations_per_item`` labels."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        options = _options(
            ordering=ordering,
            reward_model=reward_model,
            refresh_every_labels=refresh_every_labels,
            refresh_from=refresh_from,
            guidelines=guidelines,
            gold_every=gold_every,
            gold_failure_threshold=gold_failure_threshold,
            routing=routing,
        )
        body = _create_body(name, candidates, annotations_per_item, round, options)
        response = self._client._post("/v1/feedback-sets", json=body, extras=extras)
        return self._client._parse(response, FeedbackSet)

    def list(
        self,
        *,
        round: int | None = None,
        limit: int | None = None,
        after: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> SyncPage[FeedbackSet]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        params = {"round": round, "limit": limit}
        return self._client._list("/v1/feedback-sets", FeedbackSet, params=params, after=after, extras=extras)

    def get(
        self,
        feedback_set_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackSet:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(f"/v1/feedback-sets/{path_id(feedback_set_id)}", extras=extras)
        return self._client._parse(response, FeedbackSet)

    retrieve = get

    def delete(
        self,
        feedback_set_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> None:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        self._client._delete(f"/v1/feedback-sets/{path_id(feedback_set_id)}", extras=extras)

    def next(
        self,
        feedback_set_id: str,
        *,
        annotator: str,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackItem | None:
        """The next item for ``annotator`` (responses in their shuffled order), or None when nothing is left."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/next",
            params={"annotator": annotator},
            extras=extras,
        )
        return _next_or_none(self._client._parse, response)

    def label(
        self,
        feedback_set_id: str,
        *,
        item: str,
        annotator: str,
        ranking: Sequence[str] | None = None,
        scores: Mapping[str, float] | None = None,
        a: str | None = None,
        b: str | None = None,
        winner: str | None = None,
        skip: bool = False,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackLabel:
        """One label: ``ranking`` (response ids, best first), ``scores``, ``a``/``b``/``winner``, or ``skip``."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = _label_body(item, annotator, ranking, scores, a, b, winner, skip)
        response = self._client._post(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/labels", json=body, extras=extras
        )
        return self._client._parse(response, FeedbackLabel)

    def ratings(
        self,
        feedback_set_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackRatings:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(f"/v1/feedback-sets/{path_id(feedback_set_id)}/ratings", extras=extras)
        return self._client._parse(response, FeedbackRatings)

    def export(
        self,
        feedback_set_id: str,
        *,
        name: str | None = None,
        min_labels: int | None = None,
        min_agreement: float | None = None,
        round: int | None = None,
        judge_labels: str | None = None,
        judge_weight: float | None = None,
        annotator_weights: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Dataset:
        """A new ``ranking`` dataset (best response first) of the items that pass the thresholds."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        weighting = _options(
            judge_labels=judge_labels, judge_weight=judge_weight, annotator_weights=annotator_weights
        )
        body = _export_body(name, min_labels, min_agreement, round, weighting)
        response = self._client._post(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/export", json=body, extras=extras
        )
        return self._client._parse(response, Dataset)

    def update(
        self,
        feedback_set_id: str,
        *,
        guidelines: str | None = None,
        routing: str | None = None,
        gold_every: int | None = None,
        gold_failure_threshold: float | None = None,
        refresh_every_labels: int | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackSet:
        """Change the set's guidelines, routing, gold-item settings or refresh cadence."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = _options(
            guidelines=guidelines,
            routing=routing,
            gold_every=gold_every,
            gold_failure_threshold=gold_failure_threshold,
            refresh_every_labels=refresh_every_labels,
        )
        response = self._client._patch(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}", json=body, extras=extras
        )
        return self._client._parse(response, FeedbackSet)

    def add_judge(
        self,
        feedback_set_id: str,
        *,
        name: str,
        model: str,
        max_items: int | None = None,
        max_new_tokens: int | None = None,
        verdict: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackSet:
        """An AI judge (a model id or an adapter artifact) labels the items as ``judge:<name>``, in a job."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = {
            "name": name,
            "model": model,
            **_options(max_items=max_items, max_new_tokens=max_new_tokens, verdict=verdict),
        }
        response = self._client._post(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/judges", json=body, extras=extras
        )
        return self._client._parse(response, FeedbackSet)

    def annotators(
        self,
        feedback_set_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackAnnotators:
        """Per annotator: items served and why, agreement with the majority, time per label, gold items."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = self._client._get(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/annotators", extras=extras
        )
        return self._client._parse(response, FeedbackAnnotators)


class AsyncFeedbackSets(AsyncResource):
    async def create(
        self,
        *,
        name: str,
        candidates: str,
        annotations_per_item: int | None = None,
        round: int | None = None,
        ordering: str | None = None,
        reward_model: str | None = None,
        refresh_every_labels: int | None = None,
        refresh_from: str | None = None,
        guidelines: str | None = None,
        gold_every: int | None = None,
        gold_failure_threshold: float | None = None,
        routing: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackSet:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        options = _options(
            ordering=ordering,
            reward_model=reward_model,
            refresh_every_labels=refresh_every_labels,
            refresh_from=refresh_from,
            guidelines=guidelines,
            gold_every=gold_every,
            gold_failure_threshold=gold_failure_threshold,
            routing=routing,
        )
        body = _create_body(name, candidates, annotations_per_item, round, options)
        response = await self._client._post("/v1/feedback-sets", json=body, extras=extras)
        return self._client._parse(response, FeedbackSet)

    def list(
        self,
        *,
        round: int | None = None,
        limit: int | None = None,
        after: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> AsyncPaginator[FeedbackSet]:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        params = {"round": round, "limit": limit}
        return self._client._list("/v1/feedback-sets", FeedbackSet, params=params, after=after, extras=extras)

    async def get(
        self,
        feedback_set_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackSet:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(f"/v1/feedback-sets/{path_id(feedback_set_id)}", extras=extras)
        return self._client._parse(response, FeedbackSet)

    retrieve = get

    async def delete(
        self,
        feedback_set_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> None:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        await self._client._delete(f"/v1/feedback-sets/{path_id(feedback_set_id)}", extras=extras)

    async def next(
        self,
        feedback_set_id: str,
        *,
        annotator: str,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackItem | None:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/next",
            params={"annotator": annotator},
            extras=extras,
        )
        return _next_or_none(self._client._parse, response)

    async def label(
        self,
        feedback_set_id: str,
        *,
        item: str,
        annotator: str,
        ranking: Sequence[str] | None = None,
        scores: Mapping[str, float] | None = None,
        a: str | None = None,
        b: str | None = None,
        winner: str | None = None,
        skip: bool = False,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackLabel:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = _label_body(item, annotator, ranking, scores, a, b, winner, skip)
        response = await self._client._post(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/labels", json=body, extras=extras
        )
        return self._client._parse(response, FeedbackLabel)

    async def ratings(
        self,
        feedback_set_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackRatings:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/ratings", extras=extras
        )
        return self._client._parse(response, FeedbackRatings)

    async def export(
        self,
        feedback_set_id: str,
        *,
        name: str | None = None,
        min_labels: int | None = None,
        min_agreement: float | None = None,
        round: int | None = None,
        judge_labels: str | None = None,
        judge_weight: float | None = None,
        annotator_weights: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> Dataset:
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        weighting = _options(
            judge_labels=judge_labels, judge_weight=judge_weight, annotator_weights=annotator_weights
        )
        body = _export_body(name, min_labels, min_agreement, round, weighting)
        response = await self._client._post(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/export", json=body, extras=extras
        )
        return self._client._parse(response, Dataset)

    async def update(
        self,
        feedback_set_id: str,
        *,
        guidelines: str | None = None,
        routing: str | None = None,
        gold_every: int | None = None,
        gold_failure_threshold: float | None = None,
        refresh_every_labels: int | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackSet:
        """Change the set's guidelines, routing, gold-item settings or refresh cadence."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = _options(
            guidelines=guidelines,
            routing=routing,
            gold_every=gold_every,
            gold_failure_threshold=gold_failure_threshold,
            refresh_every_labels=refresh_every_labels,
        )
        response = await self._client._patch(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}", json=body, extras=extras
        )
        return self._client._parse(response, FeedbackSet)

    async def add_judge(
        self,
        feedback_set_id: str,
        *,
        name: str,
        model: str,
        max_items: int | None = None,
        max_new_tokens: int | None = None,
        verdict: str | None = None,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackSet:
        """An AI judge (a model id or an adapter artifact) labels the items as ``judge:<name>``, in a job."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        body = {
            "name": name,
            "model": model,
            **_options(max_items=max_items, max_new_tokens=max_new_tokens, verdict=verdict),
        }
        response = await self._client._post(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/judges", json=body, extras=extras
        )
        return self._client._parse(response, FeedbackSet)

    async def annotators(
        self,
        feedback_set_id: str,
        *,
        extra_headers: Headers | None = None,
        extra_query: Query | None = None,
        extra_body: Body | None = None,
        timeout: float | httpx.Timeout | None = None,
    ) -> FeedbackAnnotators:
        """Per annotator: items served and why, agreement with the majority, time per label, gold items."""
        extras = RequestExtras(extra_headers, extra_query, extra_body, timeout)
        response = await self._client._get(
            f"/v1/feedback-sets/{path_id(feedback_set_id)}/annotators", extras=extras
        )
        return self._client._parse(response, FeedbackAnnotators)


__all__ = ["AsyncFeedbackSets", "FeedbackSets"]
