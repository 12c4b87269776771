"""Feedback sets: candidates put up for people to rank, the labels they give, ratings, and the export.

Thin: rows in and out; the rules (label checks, assignment, Elo / Bradley-Terry, agreement) are in
``service/core/feedback.py``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from service.api.deps import ContextDep, PageDep, SessionDep, StoreDep, TenantDep, get_owned, paginate
from service.api.errors import error_responses
from service.api.schemas import DatasetPublic, ListResponse
from service.api.uploads import require_content_type
from service.core import feedback as fb
from service.core.errors import ValidationFailed
from service.core.ids import new_id, now
from service.db.datasets import add_dataset_file
from service.db.tables import (
    DatasetRow,
    FeedbackAssignmentRow,
    FeedbackItemRow,
    FeedbackLabelRow,
    FeedbackSetRow,
)
from service.storage.keys import dataset_key

router = APIRouter(prefix="/v1/feedback-sets", tags=["feedback"])

# An item handed out by /next counts toward its annotations for this long, so people working at the same
# time are spread over different items; an abandoned item goes back to the pool afterwards.
ASSIGNMENT_TTL_SECONDS = 15 * 60
SOURCE_KINDS = ("candidates", "ranking")

Annotator = Annotated[
    str, Query(min_length=1, max_length=128, description="Who is labelling (a name or an id).")
]

# --- schemas


class FeedbackSetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    candidates: str = Field(description="Dataset id of kind 'candidates' (or 'ranking', to label again).")
    annotations_per_item: int = Field(
        1, ge=1, le=100, description="Annotators each item should get before /next stops handing it out."
    )
    round: int | None = Field(
        None, ge=0, le=1_000_000, description="Feedback round (default: the candidates dataset's round)."
    )


class FeedbackProgress(BaseModel):
    items: int
    items_labelled: int = Field(description="Items with at least one label.")
    items_complete: int = Field(description="Items with annotations_per_item labels or more.")
    labels: int = Field(description="Labels given, skips excluded.")
    skips: int
    annotators: int


class FeedbackSetPublic(BaseModel):
    id: str
    object: Literal["feedback_set"] = "feedback_set"
    name: str
    candidates: str
    annotations_per_item: int
    num_items: int
    round: int | None
    progress: FeedbackProgress
    created_at: int


class ResponseShown(BaseModel):
    id: str
    text: str


class NextItem(BaseModel):
    id: str
    object: Literal["feedback_item"] = "feedback_item"
    feedback_set: str
    annotator: str
    prompt: str | list[dict[str, Any]] = Field(description="As in the candidates file: text or messages.")
    responses: list[ResponseShown] = Field(description="Shuffled per item and annotator; ids are stable.")
    labelled_by_you: int = Field(description="Items this annotator has labelled or skipped in this set.")
    remaining: int = Field(
        description="Items of the set this annotator has not labelled or skipped (an upper bound on what is "
        "left for them: items that reached their annotations are not handed out)."
    )


class LabelCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item: str = Field(description="Item id (fbi_...).")
    annotator: str = Field(min_length=1, max_length=128)
    ranking: list[str] | None = Field(None, description="Every response id once, best first.", max_length=16)
    scores: dict[str, float] | None = Field(None, description="{response id: score}, higher is better.")
    a: str | None = Field(None, description="Pairwise: first response id.")
    b: str | None = Field(None, description="Pairwise: second response id.")
    winner: Literal["a", "b", "tie"] | None = Field(None, description="Pairwise verdict.")
    skip: bool = Field(False, description="The annotator passes on this item (no judgement).")


class LabelPublic(BaseModel):
    id: str
    object: Literal["feedback_label"] = "feedback_label"
    feedback_set: str
    item: str
    annotator: str
    kind: Literal["ranking", "scores", "pairwise", "skip"]
    ranking: list[str] | None = None
    scores: dict[str, float] | None = None
    a: str | None = None
    b: str | None = None
    winner: Literal["a", "b", "tie"] | None = None
    created_at: int

    @classmethod
    def of(cls, row: FeedbackLabelRow) -> LabelPublic:
        return cls(
            id=row.id,
            feedback_set=row.set_id,
            item=row.item_id,
            annotator=row.annotator,
            kind=row.kind,
            created_at=row.created_at,
            **row.payload,
        )


class ResponseRatingPublic(BaseModel):
    id: str
    index: int = Field(description="Position in the candidates file's responses.")
    elo: float = Field(description="Sequential Elo (K=16, start 1000) over the item's comparisons.")
    bradley_terry: float = Field(description="Bradley-Terry log-strength (mean 0 within the item).")
    comparisons: int
    wins: float = Field(description="Comparisons won; a tie counts half.")


class ItemRatingsPublic(BaseModel):
    item: str
    num_labels: int
    num_comparisons: int
    agreement: float | None = Field(description="Pairwise agreement rate among the item's annotators.")
    kendalls_w: float | None = Field(description="Kendall's W of the item's full rankings/scores.")
    order: list[str] = Field(description="Response ids, best first (Bradley-Terry, then Elo).")
    responses: list[ResponseRatingPublic]


class AgreementPublic(BaseModel):
    pairwise: float | None = Field(
        description="Share of agreeing judgements over every two annotators who judged the same pair."
    )
    overlapping_judgements: int
    kendalls_w: float | None = Field(description="Mean Kendall's W over items with 2+ full labels.")
    items_with_overlap: int


class RatingsPublic(BaseModel):
    object: Literal["feedback_set.ratings"] = "feedback_set.ratings"
    feedback_set: str
    progress: FeedbackProgress
    agreement: AgreementPublic
    items: list[ItemRatingsPublic]


class ExportCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=256)
    min_labels: int = Field(1, ge=1, le=100, description="Leave out items with fewer labels.")
    min_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Leave out items whose pairwise agreement is lower; items that no two annotators "
        "judged on a common pair have no agreement and are left out too when this is set.",
    )
    round: int | None = Field(None, ge=0, le=1_000_000, description="Default: the feedback set's round.")


# --- helpers


def _items(session: Session, set_id: str) -> list[FeedbackItemRow]:
    return list(
        session.exec(
            select(FeedbackItemRow)
            .where(FeedbackItemRow.set_id == set_id)
            .order_by(col(FeedbackItemRow.position))
        ).all()
    )


def _labels(session: Session, set_id: str) -> list[FeedbackLabelRow]:
    return list(
        session.exec(
            select(FeedbackLabelRow)
            .where(FeedbackLabelRow.set_id == set_id)
            .order_by(col(FeedbackLabelRow.seq))
        ).all()
    )


def _progress(feedback_set: FeedbackSetRow, labels: list[FeedbackLabelRow]) -> FeedbackProgress:
    per_item: dict[str, set[str]] = defaultdict(set)
    skips = 0
    for label in labels:
        if label.kind == "skip":
            skips += 1
        else:
            per_item[label.item_id].add(label.annotator)
    return FeedbackProgress(
        items=feedback_set.num_items,
        items_labelled=len(per_item),
        items_complete=sum(1 for a in per_item.values() if len(a) >= feedback_set.annotations_per_item),
        labels=len(labels) - skips,
        skips=skips,
        annotators=len({label.annotator for label in labels}),
    )


def _public(session: Session, row: FeedbackSetRow) -> FeedbackSetPublic:
    return FeedbackSetPublic(
        id=row.id,
        name=row.name,
        candidates=row.candidates,
        annotations_per_item=row.annotations_per_item,
        num_items=row.num_items,
        round=row.round,
        progress=_progress(row, _labels(session, row.id)),
        created_at=row.created_at,
    )


def _text(response: Any) -> str:
    """A response as shown: a string, or assistant messages joined as the dataset rules read them."""
    if isinstance(response, str):
        return response
    return "\n".join(str(m.get("content", "")) for m in response)


def _read_records(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8-sig") as handle:
        return [json.loads(line) for line in handle if line.strip()]


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
    dataset = session.exec(
        select(DatasetRow).where(DatasetRow.id == body.candidates, DatasetRow.tenant == tenant)
    ).first()
    if dataset is None:
        raise ValidationFailed(
            f"No dataset '{body.candidates}'.",
            code="unknown_dataset",
            details=[{"field": "candidates", "code": "unknown_dataset", "message": body.candidates}],
        )
    if dataset.kind not in SOURCE_KINDS:
        raise ValidationFailed(
            f"Dataset '{dataset.id}' is of kind '{dataset.kind}', expected 'candidates' or 'ranking'.",
            code="wrong_dataset_kind",
            details=[{"field": "candidates", "code": "wrong_dataset_kind", "message": dataset.kind}],
        )
    tmp_root = ctx.settings.data_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="feedback-", dir=tmp_root))
    try:
        local = staging / "candidates.jsonl"
        store.get_to_path(dataset_key(dataset.id), local)
        records = _read_records(local)  # validated at upload (or by the runner that wrote it)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    row = FeedbackSetRow(
        id=new_id("feedback_set"),
        tenant=tenant,
        name=body.name,
        candidates=dataset.id,
        annotations_per_item=body.annotations_per_item,
        num_items=len(records),
        round=body.round if body.round is not None else dataset.round,
        created_at=now(),
    )
    session.add(row)
    for position, record in enumerate(records):
        item_id = new_id("feedback_item")
        session.add(
            FeedbackItemRow(
                id=item_id,
                set_id=row.id,
                position=position,
                prompt=record["prompt"],
                responses=list(record["responses"]),
                response_ids=fb.response_ids(item_id, len(record["responses"])),
            )
        )
    session.commit()
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
    statement = select(FeedbackSetRow).where(FeedbackSetRow.tenant == tenant)
    if round is not None:
        statement = statement.where(FeedbackSetRow.round == round)
    rows, has_more = paginate(session, statement, FeedbackSetRow, page, tenant)
    return ListResponse(data=[_public(session, row) for row in rows], has_more=has_more)


@router.get(
    "/{feedback_set_id}",
    response_model=FeedbackSetPublic,
    operation_id="getFeedbackSet",
    summary="Get a feedback set with its progress",
    responses=error_responses(404),
)
def get_feedback_set(feedback_set_id: str, session: SessionDep, tenant: TenantDep) -> FeedbackSetPublic:
    return _public(session, get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set"))


@router.delete(
    "/{feedback_set_id}",
    status_code=204,
    operation_id="deleteFeedbackSet",
    summary="Delete a feedback set, its items and labels (exported datasets stay)",
    responses=error_responses(404),
)
def delete_feedback_set(feedback_set_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    row = get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set")
    for table in (FeedbackLabelRow, FeedbackAssignmentRow, FeedbackItemRow):
        session.execute(delete(table).where(col(table.set_id) == row.id))
    session.delete(row)
    session.commit()
    return Response(status_code=204)


def _next_item(session: Session, feedback_set: FeedbackSetRow, annotator: str) -> FeedbackItemRow | None:
    mine = session.exec(
        select(FeedbackAssignmentRow).where(
            FeedbackAssignmentRow.set_id == feedback_set.id, FeedbackAssignmentRow.annotator == annotator
        )
    ).all()
    items = {item.id: item for item in _items(session, feedback_set.id)}
    # An item handed out and not yet labelled comes back (a reload shows the same item in the same order).
    open_item = next((a.item_id for a in sorted(mine, key=lambda a: a.served_at) if not a.done), None)
    if open_item is not None and open_item in items:
        return items[open_item]
    cutoff = time.time() - ASSIGNMENT_TTL_SECONDS
    load: dict[str, set[str]] = defaultdict(set)
    for label in session.exec(select(FeedbackLabelRow).where(FeedbackLabelRow.set_id == feedback_set.id)):
        if label.kind != "skip":
            load[label.item_id].add(label.annotator)
    for assignment in session.exec(
        select(FeedbackAssignmentRow).where(
            FeedbackAssignmentRow.set_id == feedback_set.id,
            col(FeedbackAssignmentRow.done).is_(False),
            FeedbackAssignmentRow.served_at >= cutoff,
        )
    ):
        load[assignment.item_id].add(assignment.annotator)
    chosen = fb.choose_item(
        [fb.ItemLoad(item_id, len(load[item_id])) for item_id in items],
        annotator=annotator,
        seen={a.item_id for a in mine},
        annotations_per_item=feedback_set.annotations_per_item,
    )
    if chosen is None:
        return None
    session.add(
        FeedbackAssignmentRow(
            set_id=feedback_set.id, item_id=chosen, annotator=annotator, served_at=time.time()
        )
    )
    try:
        session.commit()
    except IntegrityError:  # a concurrent /next for the same annotator took it first: serve that one
        session.rollback()
    return items[chosen]


@router.get(
    "/{feedback_set_id}/next",
    response_model=NextItem,
    operation_id="nextFeedbackItem",
    summary="The next item for an annotator (204 when nothing is left for them)",
    responses={**error_responses(404), 204: {"description": "Nothing left for this annotator."}},
)
def next_item(feedback_set_id: str, annotator: Annotator, session: SessionDep, tenant: TenantDep) -> Any:
    feedback_set = get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set")
    item = _next_item(session, feedback_set, annotator)
    if item is None:
        return Response(status_code=204)
    order = fb.presentation_order(item.id, annotator, len(item.responses))
    mine = session.exec(
        select(FeedbackAssignmentRow).where(
            FeedbackAssignmentRow.set_id == feedback_set.id, FeedbackAssignmentRow.annotator == annotator
        )
    ).all()
    done = sum(1 for a in mine if a.done)
    return NextItem(
        id=item.id,
        feedback_set=feedback_set.id,
        annotator=annotator,
        prompt=item.prompt,
        responses=[ResponseShown(id=item.response_ids[i], text=_text(item.responses[i])) for i in order],
        labelled_by_you=done,
        remaining=feedback_set.num_items - done,
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
    item = session.exec(
        select(FeedbackItemRow).where(
            FeedbackItemRow.id == body.item, FeedbackItemRow.set_id == feedback_set.id
        )
    ).first()
    if item is None:
        raise ValidationFailed(
            f"No item '{body.item}' in feedback set {feedback_set.id}.",
            code="unknown_item",
            details=[{"field": "item", "code": "unknown_item", "message": body.item}],
        )
    if body.skip:
        if any(v is not None for v in (body.ranking, body.scores, body.a, body.b, body.winner)):
            raise ValidationFailed(
                "A skip carries no judgement.",
                code="invalid_label",
                details=[{"field": "skip", "code": "invalid_label", "message": "skip with a judgement"}],
            )
        kind: str = "skip"
        payload: dict[str, Any] = {}
    else:
        kind, payload = fb.check_label(
            response_ids=item.response_ids,
            ranking=body.ranking,
            scores=body.scores,
            a=body.a,
            b=body.b,
            winner=body.winner,
        )
    earlier = session.exec(
        select(FeedbackLabelRow).where(
            FeedbackLabelRow.item_id == item.id, FeedbackLabelRow.annotator == body.annotator
        )
    ).all()
    judged = {pair for e in earlier for pair in fb.comparisons_of(e.kind, e.payload)}
    whole = any(e.kind != "pairwise" for e in earlier)
    if (earlier and (kind != "pairwise" or whole)) or judged & fb.comparisons_of(kind, payload):
        raise ValidationFailed(
            f"Annotator '{body.annotator}' has already labelled item {item.id}"
            + (" (this pair)." if kind == "pairwise" and not whole else "."),
            code="already_labelled",
            details=[{"field": "annotator", "code": "already_labelled", "message": body.annotator}],
        )
    row = FeedbackLabelRow(
        id=new_id("label"),
        set_id=feedback_set.id,
        item_id=item.id,
        annotator=body.annotator,
        kind=kind,
        payload=payload,
        created_at=now(),
    )
    session.add(row)
    assignment = session.exec(
        select(FeedbackAssignmentRow).where(
            FeedbackAssignmentRow.item_id == item.id, FeedbackAssignmentRow.annotator == body.annotator
        )
    ).first()
    if assignment is None:  # labelled without /next (a script): still never hand it to them again
        assignment = FeedbackAssignmentRow(
            set_id=feedback_set.id, item_id=item.id, annotator=body.annotator, served_at=time.time()
        )
    assignment.done = True
    session.add(assignment)
    session.commit()
    return LabelPublic.of(row)


def _rate(
    session: Session, feedback_set: FeedbackSetRow
) -> tuple[list[FeedbackItemRow], list[FeedbackLabelRow], dict[str, fb.ItemRatings]]:
    items = _items(session, feedback_set.id)
    labels = _labels(session, feedback_set.id)
    by_item: dict[str, list[fb.StoredLabel]] = defaultdict(list)
    for label in labels:
        by_item[label.item_id].append(fb.StoredLabel(label.annotator, label.kind, label.payload))
    return items, labels, {item.id: fb.rate_item(item.response_ids, by_item[item.id]) for item in items}


@router.get(
    "/{feedback_set_id}/ratings",
    response_model=RatingsPublic,
    operation_id="getFeedbackRatings",
    summary="Per item and response: Elo, Bradley-Terry, comparisons; agreement and progress",
    responses=error_responses(404),
)
def get_ratings(feedback_set_id: str, session: SessionDep, tenant: TenantDep) -> RatingsPublic:
    feedback_set = get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set")
    items, labels, ratings = _rate(session, feedback_set)
    agree = sum(r.agreeing for r in ratings.values())
    overlap = sum(r.overlapping for r in ratings.values())
    ws = [r.kendalls_w for r in ratings.values() if r.kendalls_w is not None]
    public_items = []
    for item in items:
        r = ratings[item.id]
        public_items.append(
            ItemRatingsPublic(
                item=item.id,
                num_labels=r.num_labels,
                num_comparisons=r.num_comparisons,
                agreement=r.agreement,
                kendalls_w=r.kendalls_w,
                order=[item.response_ids[i] for i in r.order()],
                responses=[
                    ResponseRatingPublic(
                        id=x.id,
                        index=x.index,
                        elo=round(x.elo, 3),
                        bradley_terry=round(x.bradley_terry, 6),
                        comparisons=x.comparisons,
                        wins=x.wins,
                    )
                    for x in r.responses
                ],
            )
        )
    return RatingsPublic(
        feedback_set=feedback_set.id,
        progress=_progress(feedback_set, labels),
        agreement=AgreementPublic(
            pairwise=agree / overlap if overlap else None,
            overlapping_judgements=overlap,
            kendalls_w=sum(ws) / len(ws) if ws else None,
            items_with_overlap=sum(1 for r in ratings.values() if r.overlapping),
        ),
        items=public_items,
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
    feedback_set = get_owned(session, FeedbackSetRow, feedback_set_id, tenant, "feedback_set")
    items, _, ratings = _rate(session, feedback_set)
    kept = []
    for item in items:
        r = ratings[item.id]
        if r.num_labels < body.min_labels or not r.has_preference:
            continue
        if body.min_agreement is not None and (r.agreement is None or r.agreement < body.min_agreement):
            continue
        kept.append((item, r))
    if not kept:
        raise ValidationFailed(
            f"No item of {feedback_set.id} passes the thresholds (min_labels={body.min_labels}, "
            f"min_agreement={body.min_agreement}) with a preference to export.",
            code="nothing_to_export",
        )
    tmp_root = ctx.settings.data_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="export-", dir=tmp_root))
    try:
        path = staging / "ranking.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for item, r in kept:
                record = {
                    "prompt": item.prompt,
                    "responses": item.responses,
                    "ranking": r.order(),
                    # Extra fields are ignored by the rules and the trainers; they keep the provenance.
                    "item": item.id,
                    "num_labels": r.num_labels,
                    "agreement": r.agreement,
                    "bradley_terry": [round(x.bradley_terry, 6) for x in r.responses],
                }
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
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
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return DatasetPublic.of(row)
