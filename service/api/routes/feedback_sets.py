"""Feedback sets: candidates put up for people to rank, the labels they give, ratings, and the export.

Thin: each endpoint loads rows (``service/db/feedback_sets.py``), applies the rules
(``service/core/feedback_sets.py``, ``service/core/feedback.py``) and maps the result to a schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from alignd import validation
from fastapi import APIRouter, Depends, Query, Response
from sqlmodel import Session

from contract.methods import Method
from service.api import feedback_jobs
from service.api.deps import AppContext, ContextDep, PageDep, SessionDep, StoreDep, TenantDep
from service.api.errors import error_responses
from service.api.schemas import (
    AgreementPublic,
    AnnotatorPublic,
    AnnotatorsPublic,
    DatasetPublic,
    ExportCreate,
    FeedbackProgress,
    FeedbackSetCreate,
    FeedbackSetPublic,
    FeedbackSetUpdate,
    ItemRatingsPublic,
    JudgeAgreementPublic,
    JudgeCreate,
    LabelCreate,
    LabelPublic,
    ListResponse,
    NextItem,
    RatingsPublic,
    ResponseShown,
)
from service.api.uploads import require_content_type
from service.core import feedback as fb
from service.core import feedback_sets as rules
from service.core.errors import ValidationFailed
from service.core.jobs import resolve_hyperparameters
from service.db import feedback_sets
from service.db.datasets import add_dataset_file
from service.db.repository import get_owned, list_owned
from service.db.tables import FeedbackSetRow
from service.staging import open_staging, release_staging
from service.storage import ArtifactStore
from service.storage.keys import dataset_key

router = APIRouter(prefix="/v1/feedback-sets", tags=["feedback"])

Annotator = Annotated[
    str, Query(min_length=1, max_length=128, description="Who is labelling (a name or an id).")
]


def _public(session: Session, row: FeedbackSetRow) -> FeedbackSetPublic:
    return FeedbackSetPublic.of(row, feedback_sets.progress(session, row))


def _synced(ctx: AppContext, session: Session, feedback_set_id: str, tenant: str) -> FeedbackSetRow:
    """The tenant's set, with its finished jobs read back and a due refresh started (feedback_jobs.sync)."""
    row = get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set")
    feedback_jobs.sync(ctx, session, row)
    return row


def _refused(message: str, code: str, field: str) -> ValidationFailed:
    return ValidationFailed(message, code=code, details=[{"field": field, "code": code, "message": message}])


def _check_choice(value: str, allowed: tuple[str, ...], field: str) -> str:
    if value not in allowed:
        raise _refused(f"{field} is one of {', '.join(allowed)}, not {value!r}.", f"invalid_{field}", field)
    return value


def _create_options(session: Session, tenant: str, body: FeedbackSetCreate) -> dict[str, Any]:
    """The set's columns beyond its source, each checked (422 with a code naming the field)."""
    rules.check_ordering(body.ordering, body.reward_model)
    _check_choice(body.routing, rules.ROUTINGS, "routing")
    if body.reward_model is not None:
        feedback_jobs.reward_model_artifact(session, tenant, body.reward_model)
    if body.refresh_every_labels is not None and body.ordering != "uncertainty":
        raise _refused(
            'refresh_every_labels refreshes the reward model of ordering "uncertainty".',
            "unexpected_field",
            "refresh_every_labels",
        )
    state: dict[str, Any] = {}
    if _check_choice(body.refresh_from, rules.REFRESH_SOURCES, "refresh_from") != "latest":
        state["refresh_from"] = body.refresh_from
    if body.refresh_hyperparameters is not None:
        state["refresh_hyperparameters"] = resolve_hyperparameters(
            Method.reward_model, body.refresh_hyperparameters
        )
    return {
        "ordering": body.ordering,
        "reward_model": body.reward_model,
        "refresh_every_labels": body.refresh_every_labels,
        "guidelines": rules.check_guidelines(body.guidelines),
        "gold_every": body.gold_every,
        "gold_failure_threshold": body.gold_failure_threshold,
        "routing": body.routing,
        "state": state,
        "events": [],
    }


@contextmanager
def _staging(ctx: AppContext, purpose: str) -> Iterator[Path]:
    """A fresh staging folder (service/staging.py), deleted afterwards."""
    staging = open_staging(ctx.settings.data_dir, purpose)
    try:
        yield staging
    finally:
        release_staging(staging)


def _downloaded_records(ctx: AppContext, store: ArtifactStore, dataset_id: str) -> list[dict[str, Any]]:
    with _staging(ctx, "feedback") as staging:
        local = staging / "candidates.jsonl"
        store.get_to_path(dataset_key(dataset_id), local)
        return _read_records(local)  # validated at upload (or by the runner that wrote it)


def _read_records(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in validation.iter_records(path)]


# --- routes


@router.post(
    "",
    status_code=201,
    response_model=FeedbackSetPublic,
    operation_id="createFeedbackSet",
    summary="Put a candidates dataset up for labelling",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=error_responses(400, 415, 422),
)
def create_feedback_set(
    body: FeedbackSetCreate, ctx: ContextDep, session: SessionDep, store: StoreDep, tenant: TenantDep
) -> FeedbackSetPublic:
    dataset = feedback_sets.source_dataset(session, tenant, body.candidates)
    options = _create_options(session, tenant, body)
    row = feedback_sets.create(
        session,
        tenant=tenant,
        name=body.name,
        source=dataset,
        annotations_per_item=body.annotations_per_item,
        round=body.round,
        records=_downloaded_records(ctx, store, dataset.id),
        options=options,
    )
    if row.reward_model is not None:
        feedback_jobs.start_scoring(
            ctx, session, row, feedback_jobs.reward_model_artifact(session, tenant, row.reward_model)
        )
    return _public(session, row)


@router.get(
    "",
    response_model=ListResponse[FeedbackSetPublic],
    operation_id="listFeedbackSets",
    summary="List feedback sets",
    responses=error_responses(),
)
def list_feedback_sets(
    session: SessionDep,
    tenant: TenantDep,
    page: PageDep,
    round: Annotated[
        int | None, Query(ge=0, le=1_000_000, description="Only sets of this feedback round.")
    ] = None,
) -> ListResponse[FeedbackSetPublic]:
    rows, has_more = list_owned(session, FeedbackSetRow, page, tenant, round=round)
    return ListResponse(data=[_public(session, row) for row in rows], has_more=has_more)


@router.get(
    "/{feedback_set_id}",
    response_model=FeedbackSetPublic,
    operation_id="getFeedbackSet",
    summary="Get a feedback set with its progress",
    responses=error_responses(404),
)
def get_feedback_set(
    feedback_set_id: str, ctx: ContextDep, session: SessionDep, tenant: TenantDep
) -> FeedbackSetPublic:
    return _public(session, _synced(ctx, session, feedback_set_id, tenant))


@router.patch(
    "/{feedback_set_id}",
    response_model=FeedbackSetPublic,
    operation_id="updateFeedbackSet",
    summary="Change a set's guidelines, routing, gold-item settings or refresh cadence",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=error_responses(400, 404, 415, 422),
)
def update_feedback_set(
    feedback_set_id: str, body: FeedbackSetUpdate, session: SessionDep, tenant: TenantDep
) -> FeedbackSetPublic:
    row = get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set")
    if body.guidelines is not None:
        row.guidelines = rules.check_guidelines(body.guidelines) or None
    if body.routing is not None:
        row.routing = _check_choice(body.routing, rules.ROUTINGS, "routing")
    if body.refresh_every_labels is not None:
        if row.ordering != "uncertainty":
            raise _refused(
                'refresh_every_labels refreshes the reward model of ordering "uncertainty".',
                "unexpected_field",
                "refresh_every_labels",
            )
        row.refresh_every_labels = body.refresh_every_labels
    for name in ("gold_every", "gold_failure_threshold"):
        if getattr(body, name) is not None:
            setattr(row, name, getattr(body, name))
    session.add(row)
    session.commit()
    return _public(session, row)


@router.post(
    "/{feedback_set_id}/judges",
    status_code=202,
    response_model=FeedbackSetPublic,
    operation_id="addFeedbackJudge",
    summary="Add an AI judge: a judge job labels the items as judge:<name> (both orders, guidelines as rubric)",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=error_responses(400, 404, 409, 415, 422),
)
def add_judge(
    feedback_set_id: str, body: JudgeCreate, ctx: ContextDep, session: SessionDep, tenant: TenantDep
) -> FeedbackSetPublic:
    row = get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set")
    feedback_jobs.add_judge(
        ctx,
        session,
        row,
        name=body.name,
        model=body.model,
        hyperparameters={
            "max_items": body.max_items,
            "max_new_tokens": body.max_new_tokens,
            "verdict": body.verdict,
        },
    )
    return _public(session, row)


@router.get(
    "/{feedback_set_id}/annotators",
    response_model=AnnotatorsPublic,
    operation_id="getFeedbackAnnotators",
    summary="Per annotator: items served and why, agreement with the majority, time per label, gold items",
    responses=error_responses(404),
)
def get_annotators(
    feedback_set_id: str, ctx: ContextDep, session: SessionDep, tenant: TenantDep
) -> AnnotatorsPublic:
    feedback_set = _synced(ctx, session, feedback_set_id, tenant)
    reports = rules.annotator_reports(
        feedback_sets.items(session, feedback_set.id),
        feedback_sets.labels(session, feedback_set.id),
        feedback_sets.all_assignments(session, feedback_set.id),
        gold_failure_threshold=feedback_set.gold_failure_threshold,
    )
    return AnnotatorsPublic(
        feedback_set=feedback_set.id,
        gold_failure_threshold=feedback_set.gold_failure_threshold,
        annotators=[AnnotatorPublic.model_validate(r, from_attributes=True) for r in reports],
    )


@router.delete(
    "/{feedback_set_id}",
    status_code=204,
    operation_id="deleteFeedbackSet",
    summary="Delete a feedback set, its items and labels (exported datasets stay)",
    responses=error_responses(404),
)
def delete_feedback_set(feedback_set_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    feedback_sets.delete_set(
        session, get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set")
    )
    return Response(status_code=204)


@router.get(
    "/{feedback_set_id}/next",
    response_model=NextItem,
    operation_id="nextFeedbackItem",
    summary="The next item for an annotator (204 when nothing is left for them)",
    responses={**error_responses(404), 204: {"description": "Nothing left for this annotator."}},
)
def next_item(
    feedback_set_id: str, annotator: Annotator, ctx: ContextDep, session: SessionDep, tenant: TenantDep
) -> Any:
    feedback_set = _synced(ctx, session, feedback_set_id, tenant)
    served = feedback_sets.serve_next_item(session, feedback_set, annotator)
    if served is None:
        return Response(status_code=204)
    item, assignment = served
    order = fb.presentation_order(item.id, annotator, len(item.responses))
    done = sum(1 for a in feedback_sets.assignments_of(session, feedback_set.id, annotator) if a.done)
    return NextItem(
        id=item.id,
        feedback_set=feedback_set.id,
        annotator=annotator,
        prompt=item.prompt,
        responses=[
            ResponseShown(id=item.response_ids[i], text=rules.shown_text(item.responses[i])) for i in order
        ],
        labelled_by_you=done,
        remaining=feedback_set.num_items - done,
        reason=assignment.reason if assignment is not None else None,
        margin=assignment.margin if assignment is not None else None,
    )


@router.post(
    "/{feedback_set_id}/labels",
    status_code=201,
    response_model=LabelPublic,
    operation_id="createFeedbackLabel",
    summary="Label an item: a full ranking, scores, one pairwise comparison, or a skip",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=error_responses(400, 404, 415, 422),
)
def create_label(
    feedback_set_id: str, body: LabelCreate, session: SessionDep, tenant: TenantDep
) -> LabelPublic:
    feedback_set = get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set")
    if fb.is_judge(body.annotator):
        raise _refused(
            f"Annotator names starting with '{fb.JUDGE_PREFIX}' belong to the set's AI judges.",
            "reserved_annotator",
            "annotator",
        )
    item = feedback_sets.get_item(session, feedback_set, body.item)
    kind, payload = rules.accept_label(
        item,
        annotator=body.annotator,
        earlier=feedback_sets.labels_by(session, item, body.annotator),
        skip=body.skip,
        ranking=body.ranking,
        scores=body.scores,
        a=body.a,
        b=body.b,
        winner=body.winner,
    )
    row = feedback_sets.add_label(
        session, feedback_set, item, annotator=body.annotator, kind=kind, payload=payload
    )
    return LabelPublic.of(row)


@router.get(
    "/{feedback_set_id}/ratings",
    response_model=RatingsPublic,
    operation_id="getFeedbackRatings",
    summary="Per item and response: Elo, Bradley-Terry, comparisons; agreement and progress",
    responses=error_responses(404),
)
def get_ratings(
    feedback_set_id: str, ctx: ContextDep, session: SessionDep, tenant: TenantDep
) -> RatingsPublic:
    feedback_set = _synced(ctx, session, feedback_set_id, tenant)
    items = feedback_sets.items(session, feedback_set.id)
    labels = feedback_sets.labels(session, feedback_set.id)
    ratings = rules.rate_items(items, labels)
    people = rules.rate_items(items, rules.human_labels(labels))
    agreement = fb.annotator_agreement(rules.verdicts(labels))
    progress = rules.progress(
        labels, num_items=feedback_set.num_items, annotations_per_item=feedback_set.annotations_per_item
    )
    return RatingsPublic(
        feedback_set=feedback_set.id,
        progress=FeedbackProgress.of(progress),
        agreement=AgreementPublic.model_validate(rules.agreement(people.values()), from_attributes=True),
        judges=[
            _judge_agreement(who, agreement.get(who, fb.AnnotatorAgreement()))
            for who in sorted({label.annotator for label in labels if fb.is_judge(label.annotator)})
        ],
        items=[ItemRatingsPublic.of(item, ratings[item.id]) for item in items],
    )


def _judge_agreement(who: str, found: fb.AnnotatorAgreement) -> JudgeAgreementPublic:
    return JudgeAgreementPublic(
        annotator=who,
        with_majority=found.with_majority.rate,
        majority_comparisons=found.with_majority.total,
        with_people={
            other: tally.rate for other, tally in sorted(found.with_each.items()) if not fb.is_judge(other)
        },
    )


@router.post(
    "/{feedback_set_id}/export",
    status_code=201,
    response_model=DatasetPublic,
    operation_id="exportFeedbackSet",
    summary="Export the rated items as a new 'ranking' dataset (best response first)",
    dependencies=[Depends(require_content_type("application/json"))],
    responses=error_responses(400, 404, 415, 422),
)
def export_feedback_set(
    feedback_set_id: str,
    body: ExportCreate,
    ctx: ContextDep,
    session: SessionDep,
    store: StoreDep,
    tenant: TenantDep,
) -> DatasetPublic:
    feedback_set = _synced(ctx, session, feedback_set_id, tenant)
    _check_choice(body.judge_labels, rules.JUDGE_LABELS, "judge_labels")
    _check_choice(body.annotator_weights, rules.ANNOTATOR_WEIGHTS, "annotator_weights")
    items = feedback_sets.items(session, feedback_set.id)
    labels = rules.export_labels(feedback_sets.labels(session, feedback_set.id), body.judge_labels)
    weights = rules.export_weights(
        labels,
        judge_labels=body.judge_labels,
        judge_weight=body.judge_weight,
        annotator_weights=body.annotator_weights,
    )
    ratings = rules.rate_items(items, labels, weights)
    kept = rules.export_selection(
        items, ratings, set_id=feedback_set.id, min_labels=body.min_labels, min_agreement=body.min_agreement
    )
    with _staging(ctx, "export") as staging:
        path = staging / "ranking.jsonl"
        rules.write_ranking_file(path, kept)
        row = add_dataset_file(
            session,
            store,
            path,
            tenant=tenant,
            kind="ranking",
            name=body.name or f"{feedback_set.name} (ranking)",
            max_bytes=ctx.settings.max_dataset_bytes,
            feedback_set_id=feedback_set.id,
            round=body.round if body.round is not None else feedback_set.round,
        )
    return DatasetPublic.of(row)
