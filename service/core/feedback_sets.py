"""The rules of a feedback set: what it may be made from, which labels it accepts, what it exports.

Framework-free, on plain records (the database rows fit the protocols below). The per-item mathematics
(label checks, Elo / Bradley-Terry, agreement, choosing the next item) is in ``service/core/feedback.py``;
the queries are in ``service/db/feedback_sets.py``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service.core import feedback as fb
from service.core.errors import ValidationFailed

# An item handed out by /next counts toward its annotations for this long, so people working at the same
# time are spread over different items; an abandoned item goes back to the pool afterwards.
ASSIGNMENT_TTL_SECONDS = 15 * 60
SOURCE_KINDS = ("candidates", "ranking")


class Item(Protocol):
    id: str
    prompt: Any
    responses: list[Any]
    response_ids: list[str]


class Label(Protocol):
    item_id: str
    annotator: str
    kind: str
    payload: dict[str, Any]


class Assignment(Protocol):
    item_id: str
    annotator: str


def unknown_dataset(dataset_id: str) -> ValidationFailed:
    return ValidationFailed(
        f"No dataset '{dataset_id}'.",
        code="unknown_dataset",
        details=[{"field": "candidates", "code": "unknown_dataset", "message": dataset_id}],
    )


def check_source_kind(dataset_id: str, kind: str) -> None:
    """A feedback set is made from a ``candidates`` dataset, or a ``ranking`` one to label again."""
    if kind not in SOURCE_KINDS:
        raise ValidationFailed(
            f"Dataset '{dataset_id}' is of kind '{kind}', expected 'candidates' or 'ranking'.",
            code="wrong_dataset_kind",
            details=[{"field": "candidates", "code": "wrong_dataset_kind", "message": kind}],
        )


def shown_text(response: Any) -> str:
    """A response as shown: a string, or assistant messages joined as the dataset rules read them."""
    if isinstance(response, str):
        return response
    return "\n".join(str(m.get("content", "")) for m in response)


@dataclass(frozen=True)
class Progress:
    items: int
    items_labelled: int  # items with at least one label
    items_complete: int  # items with annotations_per_item labels or more
    labels: int  # skips excluded
    skips: int
    annotators: int


def progress(labels: Sequence[Label], *, num_items: int, annotations_per_item: int) -> Progress:
    per_item: dict[str, set[str]] = defaultdict(set)
    skips = 0
    for label in labels:
        if label.kind == "skip":
            skips += 1
        else:
            per_item[label.item_id].add(label.annotator)
    return Progress(
        items=num_items,
        items_labelled=len(per_item),
        items_complete=sum(1 for a in per_item.values() if len(a) >= annotations_per_item),
        labels=len(labels) - skips,
        skips=skips,
        annotators=len({label.annotator for label in labels}),
    )


# --- labels


def unknown_item(item_id: str, set_id: str) -> ValidationFailed:
    return ValidationFailed(
        f"No item '{item_id}' in feedback set {set_id}.",
        code="unknown_item",
        details=[{"field": "item", "code": "unknown_item", "message": item_id}],
    )


def accept_label(
    item: Item,
    *,
    annotator: str,
    earlier: Sequence[Label],
    skip: bool,
    ranking: Sequence[str] | None,
    scores: Mapping[str, float] | None,
    a: str | None,
    b: str | None,
    winner: fb.Winner | None,
) -> tuple[str, dict[str, Any]]:
    """Check a new label of ``item`` given the annotator's ``earlier`` labels of it; return (kind, payload).

    An annotator labels an item once, except with pairwise comparisons, one per pair of responses.
    """
    if skip:
        if any(v is not None for v in (ranking, scores, a, b, winner)):
            raise ValidationFailed(
                "A skip carries no judgement.",
                code="invalid_label",
                details=[{"field": "skip", "code": "invalid_label", "message": "skip with a judgement"}],
            )
        kind: str = "skip"
        payload: dict[str, Any] = {}
    else:
        kind, payload = fb.check_label(
            response_ids=item.response_ids, ranking=ranking, scores=scores, a=a, b=b, winner=winner
        )
    judged = {pair for e in earlier for pair in fb.comparisons_of(e.kind, e.payload)}
    whole = any(e.kind != "pairwise" for e in earlier)
    if (earlier and (kind != "pairwise" or whole)) or judged & fb.comparisons_of(kind, payload):
        raise ValidationFailed(
            f"Annotator '{annotator}' has already labelled item {item.id}"
            + (" (this pair)." if kind == "pairwise" and not whole else "."),
            code="already_labelled",
            details=[{"field": "annotator", "code": "already_labelled", "message": annotator}],
        )
    return kind, payload


# --- assignment


def item_loads(
    item_ids: Iterable[str], labels: Iterable[Label], open_assignments: Iterable[Assignment]
) -> list[fb.ItemLoad]:
    """Per item, the annotators who labelled it (skips aside) or hold an open assignment of it."""
    load: dict[str, set[str]] = defaultdict(set)
    for label in labels:
        if label.kind != "skip":
            load[label.item_id].add(label.annotator)
    for assignment in open_assignments:
        load[assignment.item_id].add(assignment.annotator)
    return [fb.ItemLoad(item_id, len(load[item_id])) for item_id in item_ids]


# --- ratings and export


def rate_items(items: Sequence[Item], labels: Sequence[Label]) -> dict[str, fb.ItemRatings]:
    """Each item's ratings from its labels (``labels`` in the order they were given)."""
    by_item: dict[str, list[fb.StoredLabel]] = defaultdict(list)
    for label in labels:
        by_item[label.item_id].append(fb.StoredLabel(label.annotator, label.kind, label.payload))
    return {item.id: fb.rate_item(item.response_ids, by_item[item.id]) for item in items}


@dataclass(frozen=True)
class Agreement:
    pairwise: float | None  # agreeing share over every two annotators who judged the same pair
    overlapping_judgements: int
    kendalls_w: float | None  # mean over items with 2+ full labels
    items_with_overlap: int


def agreement(ratings: Iterable[fb.ItemRatings]) -> Agreement:
    rated = list(ratings)
    agree = sum(r.agreeing for r in rated)
    overlap = sum(r.overlapping for r in rated)
    ws = [r.kendalls_w for r in rated if r.kendalls_w is not None]
    return Agreement(
        pairwise=agree / overlap if overlap else None,
        overlapping_judgements=overlap,
        kendalls_w=sum(ws) / len(ws) if ws else None,
        items_with_overlap=sum(1 for r in rated if r.overlapping),
    )


def export_selection(
    items: Sequence[Item],
    ratings: Mapping[str, fb.ItemRatings],
    *,
    set_id: str,
    min_labels: int,
    min_agreement: float | None,
) -> list[tuple[Item, fb.ItemRatings]]:
    """The items an export keeps: enough labels, some preference, and (if asked) enough agreement."""
    kept = []
    for item in items:
        r = ratings[item.id]
        if r.num_labels < min_labels or not r.has_preference:
            continue
        if min_agreement is not None and (r.agreement is None or r.agreement < min_agreement):
            continue
        kept.append((item, r))
    if not kept:
        raise ValidationFailed(
            f"No item of {set_id} passes the thresholds (min_labels={min_labels}, "
            f"min_agreement={min_agreement}) with a preference to export.",
            code="nothing_to_export",
        )
    return kept


def write_ranking_file(path: Path, kept: Iterable[tuple[Item, fb.ItemRatings]]) -> None:
    """The kept items as a ``ranking`` dataset file, each with its responses' order, best first."""
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
