"""Feedback sets in the database: a set and its items, who was handed which item, the labels given.

The rules these apply are in ``service/core/feedback_sets.py`` and ``service/core/feedback.py``.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from service.core import feedback as fb
from service.core import feedback_sets as rules
from service.core.ids import new_id, now
from service.db.repository import find_owned
from service.db.tables import (
    DatasetRow,
    FeedbackAssignmentRow,
    FeedbackItemRow,
    FeedbackLabelRow,
    FeedbackSetRow,
)


def items(session: Session, set_id: str) -> list[FeedbackItemRow]:
    """The set's items in the candidates file's order."""
    return list(
        session.exec(
            select(FeedbackItemRow)
            .where(FeedbackItemRow.set_id == set_id)
            .order_by(col(FeedbackItemRow.position))
        ).all()
    )


def labels(session: Session, set_id: str) -> list[FeedbackLabelRow]:
    """The set's labels in the order they were given."""
    return list(
        session.exec(
            select(FeedbackLabelRow)
            .where(FeedbackLabelRow.set_id == set_id)
            .order_by(col(FeedbackLabelRow.seq))
        ).all()
    )


def progress(session: Session, feedback_set: FeedbackSetRow) -> rules.Progress:
    return rules.progress(
        labels(session, feedback_set.id),
        num_items=feedback_set.num_items,
        annotations_per_item=feedback_set.annotations_per_item,
    )


def source_dataset(session: Session, tenant: str, dataset_id: str) -> DatasetRow:
    """The tenant's dataset a new set is made from; raises ValidationFailed (422) if it cannot be one."""
    dataset = find_owned(session, DatasetRow, dataset_id, tenant)
    if dataset is None:
        raise rules.unknown_dataset(dataset_id)
    rules.check_source_kind(dataset.id, dataset.kind)
    return dataset


def create(
    session: Session,
    *,
    tenant: str,
    name: str,
    source: DatasetRow,
    annotations_per_item: int,
    round: int | None,
    records: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
) -> FeedbackSetRow:
    """A new set with one item per record of ``source`` (its ``prompt``, ``responses`` and ``gold``), committed.

    ``options``: the set's ordering, reward_model, guidelines, ... (FeedbackSetRow's columns), checked."""
    golds = [rules.parse_gold(record, line) for line, record in enumerate(records, start=1)]
    row = FeedbackSetRow(
        id=new_id("feedback_set"),
        tenant=tenant,
        name=name,
        candidates=source.id,
        annotations_per_item=annotations_per_item,
        num_items=len(records),
        round=round if round is not None else source.round,
        created_at=now(),
        **(options or {}),
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
                gold=golds[position],
            )
        )
    session.commit()
    return row


def delete_set(session: Session, feedback_set: FeedbackSetRow) -> None:
    """The set, its items, assignments and labels (datasets exported from it stay), committed."""
    for table in (FeedbackLabelRow, FeedbackAssignmentRow, FeedbackItemRow):
        session.execute(delete(table).where(col(table.set_id) == feedback_set.id))
    session.delete(feedback_set)
    session.commit()


def all_assignments(session: Session, set_id: str) -> list[FeedbackAssignmentRow]:
    return list(
        session.exec(
            select(FeedbackAssignmentRow)
            .where(FeedbackAssignmentRow.set_id == set_id)
            .order_by(col(FeedbackAssignmentRow.seq))
        ).all()
    )


def assignments_of(session: Session, set_id: str, annotator: str) -> list[FeedbackAssignmentRow]:
    return list(
        session.exec(
            select(FeedbackAssignmentRow).where(
                FeedbackAssignmentRow.set_id == set_id, FeedbackAssignmentRow.annotator == annotator
            )
        ).all()
    )


def serve_next_item(
    session: Session, feedback_set: FeedbackSetRow, annotator: str
) -> tuple[FeedbackItemRow, FeedbackAssignmentRow | None] | None:
    """The item ``annotator`` should label next and its assignment (why it was chosen), recorded as handed to
    them; None when none is left."""
    mine = assignments_of(session, feedback_set.id, annotator)
    ordered = items(session, feedback_set.id)
    by_id = {item.id: item for item in ordered}
    # An item handed out and not yet labelled comes back (a reload shows the same item in the same order).
    open_one = next((a for a in sorted(mine, key=lambda a: a.served_at) if not a.done), None)
    if open_one is not None and open_one.item_id in by_id:
        return by_id[open_one.item_id], open_one
    cutoff = time.time() - rules.ASSIGNMENT_TTL_SECONDS
    set_labels = list(
        session.exec(select(FeedbackLabelRow).where(FeedbackLabelRow.set_id == feedback_set.id))
    )
    held = list(
        session.exec(
            select(FeedbackAssignmentRow).where(
                FeedbackAssignmentRow.set_id == feedback_set.id,
                col(FeedbackAssignmentRow.done).is_(False),
                FeedbackAssignmentRow.served_at >= cutoff,
            )
        )
    )
    routed_out: set[str] = set()
    if feedback_set.routing == "judge_reward_disagree" and not fb.is_judge(annotator):
        routed_out = rules.judge_agrees_with_reward_model(ordered, set_labels)
    choice = fb.choose_next(
        rules.candidates(ordered, rules.item_loads(by_id, set_labels, held), routed_out=routed_out),
        annotator=annotator,
        seen={a.item_id for a in mine},
        annotations_per_item=feedback_set.annotations_per_item,
        ordering=feedback_set.ordering,
        gold_due=rules.gold_due(len(mine), feedback_set.gold_every),
    )
    if choice is None:
        return None
    assignment = FeedbackAssignmentRow(
        set_id=feedback_set.id,
        item_id=choice.item_id,
        annotator=annotator,
        served_at=time.time(),
        reason=choice.reason,
        margin=choice.margin,
    )
    session.add(assignment)
    try:
        session.commit()
    except IntegrityError:  # a concurrent /next for the same annotator took it first: serve that one
        session.rollback()
        return by_id[choice.item_id], None
    return by_id[choice.item_id], assignment


def get_item(session: Session, feedback_set: FeedbackSetRow, item_id: str) -> FeedbackItemRow:
    """The set's item with this id; raises ValidationFailed (unknown_item, 422) otherwise."""
    item = session.exec(
        select(FeedbackItemRow).where(
            FeedbackItemRow.id == item_id, FeedbackItemRow.set_id == feedback_set.id
        )
    ).first()
    if item is None:
        raise rules.unknown_item(item_id, feedback_set.id)
    return item


def labels_by(session: Session, item: FeedbackItemRow, annotator: str) -> list[FeedbackLabelRow]:
    """The labels ``annotator`` has given ``item`` so far."""
    return list(
        session.exec(
            select(FeedbackLabelRow).where(
                FeedbackLabelRow.item_id == item.id, FeedbackLabelRow.annotator == annotator
            )
        ).all()
    )


def add_label(
    session: Session,
    feedback_set: FeedbackSetRow,
    item: FeedbackItemRow,
    *,
    annotator: str,
    kind: str,
    payload: dict[str, Any],
) -> FeedbackLabelRow:
    """Store an accepted label and mark the item done for its annotator, committed.

    ``seconds`` is the time since /next handed the item out (the first label of an open assignment only)."""
    assignment = session.exec(
        select(FeedbackAssignmentRow).where(
            FeedbackAssignmentRow.item_id == item.id, FeedbackAssignmentRow.annotator == annotator
        )
    ).first()
    row = FeedbackLabelRow(
        id=new_id("label"),
        set_id=feedback_set.id,
        item_id=item.id,
        annotator=annotator,
        kind=kind,
        payload=payload,
        created_at=now(),
        seconds=None
        if assignment is None or assignment.done
        else round(max(0.0, time.time() - assignment.served_at), 3),
    )
    session.add(row)
    if assignment is None:  # labelled without /next (a script): still never hand it to them again
        assignment = FeedbackAssignmentRow(
            set_id=feedback_set.id, item_id=item.id, annotator=annotator, served_at=time.time()
        )
    assignment.done = True
    session.add(assignment)
    session.commit()
    return row
