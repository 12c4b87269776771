"""The rules of a feedback set: what it may be made from, which labels it accepts, what it exports.

Framework-free, on plain records (the database rows fit the protocols below). The per-item mathematics
(label checks, Elo / Bradley-Terry, agreement, choosing the next item) is in ``service/core/feedback.py``;
the queries are in ``service/db/feedback_sets.py``.
"""

from __future__ import annotations

import json
import statistics
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


# Guidelines are Markdown shown on every labeling page and prepended to every judge prompt: capped so a page
# stays light and a judge's prompt fits a small model's context.
MAX_GUIDELINES_CHARS = 20_000
ROUTINGS = ("all", "judge_reward_disagree")
# What a refresh continues: the last refreshed reward model ("latest": each refresh builds on the one before,
# so early labels are trained on again at every refresh), or the set's own reward model ("initial": every
# refresh is the set's model trained once on all labels so far, the model a fresh reward_model job on them
# would give).
REFRESH_SOURCES = ("latest", "initial")
JUDGE_LABELS = ("include", "exclude", "down_weight")
ANNOTATOR_WEIGHTS = ("equal", "agreement")


class Item(Protocol):
    id: str
    prompt: Any
    responses: list[Any]
    response_ids: list[str]
    rewards: list[float] | None
    gold: list[int] | None


class Label(Protocol):
    item_id: str
    annotator: str
    kind: str
    payload: dict[str, Any]
    seconds: float | None


class Assignment(Protocol):
    item_id: str
    annotator: str
    reason: str | None
    margin: float | None


def _refused(message: str, code: str, field_name: str) -> ValidationFailed:
    return ValidationFailed(
        message, code=code, details=[{"field": field_name, "code": code, "message": message}]
    )


def check_guidelines(text: str | None) -> str | None:
    """Guidelines as stored: refused (422) with a NUL character or past MAX_GUIDELINES_CHARS."""
    if text is None:
        return None
    if "\x00" in text:
        raise _refused("Guidelines may not contain NUL characters.", "invalid_guidelines", "guidelines")
    if len(text) > MAX_GUIDELINES_CHARS:
        raise _refused(
            f"Guidelines are {len(text)} characters; at most {MAX_GUIDELINES_CHARS}.",
            "guidelines_too_long",
            "guidelines",
        )
    return text


def check_ordering(ordering: str, reward_model: str | None) -> None:
    """``uncertainty`` needs a reward model to measure margins with; ``random`` needs none."""
    if ordering not in fb.ORDERINGS:
        raise _refused(
            f"ordering is one of {', '.join(fb.ORDERINGS)}, not {ordering!r}.", "invalid_ordering", "ordering"
        )
    if ordering == "uncertainty" and reward_model is None:
        raise _refused(
            'ordering "uncertainty" needs a reward_model (a reward_model artifact id) to score the items.',
            "missing_reward_model",
            "reward_model",
        )


def parse_gold(record: Mapping[str, Any], line: int) -> list[int] | None:
    """A candidates row's ``gold``: the index of the best response, or response indices best first."""
    if "gold" not in record or record["gold"] is None:
        return None
    raw = record["gold"]
    gold = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
    count = len(record["responses"])
    if (
        not isinstance(gold, list)
        or not gold
        or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count for i in gold)
        or len(set(gold)) != len(gold)
    ):
        raise ValidationFailed(
            f"Line {line}: gold is the index of the best response or distinct response indices best first "
            f"(0..{count - 1}).",
            code="invalid_gold",
            details=[{"line": line, "field": "gold", "code": "invalid_gold", "message": repr(raw)[:100]}],
        )
    return list(gold)


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


def candidates(
    items: Sequence[Item],
    loads: Sequence[fb.ItemLoad],
    *,
    routed_out: set[str] | frozenset[str] = frozenset(),
) -> list[fb.Candidate]:
    """What /next weighs per item: its load, its reward-model margin (when scored), whether it is gold.

    ``routed_out``: items people are not given (the judge and the reward model agree on them)."""
    load = {entry.item_id: entry.labels for entry in loads}
    return [
        fb.Candidate(
            item_id=item.id,
            labels=load.get(item.id, 0),
            margin=fb.uncertainty_margin(item.rewards) if item.rewards else None,
            gold=item.gold is not None,
        )
        for item in items
        if item.id not in routed_out
    ]


def gold_due(served: int, gold_every: int) -> bool:
    """Every ``gold_every``-th item served to an annotator is a gold one (while unseen gold items are left)."""
    return gold_every > 0 and (served + 1) % gold_every == 0


# --- ratings and export


def rate_items(
    items: Sequence[Item], labels: Sequence[Label], weights: Mapping[str, float] | None = None
) -> dict[str, fb.ItemRatings]:
    """Each item's ratings from its labels (``labels`` in the order they were given)."""
    by_item: dict[str, list[fb.StoredLabel]] = defaultdict(list)
    for label in labels:
        by_item[label.item_id].append(fb.StoredLabel(label.annotator, label.kind, label.payload))
    return {item.id: fb.rate_item(item.response_ids, by_item[item.id], weights) for item in items}


def verdicts(labels: Iterable[Label]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(item, pair) -> {annotator: outcome}: each annotator's latest verdict on each pair."""
    out: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for label in labels:
        for c in fb.label_comparisons(label.kind, label.payload, label.annotator):
            key, outcome = fb.oriented(c)
            out[(label.item_id, *key)][c.annotator] = outcome
    return out


def human_labels(labels: Iterable[Label]) -> list[Label]:
    return [label for label in labels if not fb.is_judge(label.annotator)]


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


def export_labels(labels: Sequence[Label], judge_labels: str) -> list[Label]:
    """The labels an export rates: every one, or without the judges' (``judge_labels="exclude"``)."""
    if judge_labels == "exclude":
        return human_labels(labels)
    return list(labels)


def export_weights(
    labels: Sequence[Label], *, judge_labels: str, judge_weight: float, annotator_weights: str
) -> dict[str, float] | None:
    """Annotator -> weight of their judgements in an export's ratings (None: all 1).

    ``annotator_weights="agreement"``: each person's agreement with the majority of the others (one with no
    majority to compare against keeps 1). ``judge_labels="down_weight"``: every judge's weight is
    ``judge_weight`` (an included judge otherwise weighs as a person with the same agreement rule)."""
    if annotator_weights == "equal" and judge_labels != "down_weight":
        return None
    weights: dict[str, float] = {}
    if annotator_weights == "agreement":
        for who, agreement in fb.annotator_agreement(verdicts(labels)).items():
            rate = agreement.with_majority.rate
            weights[who] = 1.0 if rate is None else rate
    if judge_labels == "down_weight":
        for label in labels:
            if fb.is_judge(label.annotator):
                weights[label.annotator] = judge_weight
    return weights


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


# --- the annotator report


@dataclass
class AnnotatorReport:
    annotator: str
    judge: bool
    items_served: int
    labels: int
    skips: int
    reasons: dict[str, int]
    """How /next chose the items it served them: reason -> count (see feedback.Choice)."""
    mean_margin: float | None
    """Mean reward-model margin of the items served for their margin."""
    agreement_with_majority: float | None
    majority_comparisons: int
    agreement_with: dict[str, float | None]
    median_seconds_per_label: float | None
    gold_labelled: int
    gold_failed: int
    flagged: bool
    flag_reasons: list[str]


def _gold_results(items: Sequence[Item], labels: Sequence[Label]) -> dict[str, tuple[int, int]]:
    """Annotator -> (gold items labelled, failed), from each one's labels of gold items."""
    gold_items = {item.id: item for item in items if item.gold is not None}
    comparisons: dict[tuple[str, str], list[fb.Comparison]] = defaultdict(list)
    for label in labels:
        if label.item_id in gold_items:
            comparisons[(label.annotator, label.item_id)] += fb.label_comparisons(
                label.kind, label.payload, label.annotator
            )
    out: dict[str, tuple[int, int]] = {}
    for (who, item_id), found in comparisons.items():
        item = gold_items[item_id]
        passed = fb.passes_gold(found, fb.gold_pairs(item.response_ids, item.gold or []))
        if passed is None:
            continue
        seen, failed = out.get(who, (0, 0))
        out[who] = (seen + 1, failed + int(not passed))
    return out


def annotator_reports(
    items: Sequence[Item],
    labels: Sequence[Label],
    assignments: Sequence[Assignment],
    *,
    gold_failure_threshold: float,
) -> list[AnnotatorReport]:
    """Per annotator (people and judges): what they were served and why, their agreement, speed and gold.

    Flagged: failed more than ``gold_failure_threshold`` of the gold items they labelled."""
    agreement = fb.annotator_agreement(verdicts(labels))
    gold = _gold_results(items, labels)
    served: dict[str, list[Assignment]] = defaultdict(list)
    for assignment in assignments:
        served[assignment.annotator].append(assignment)
    mine: dict[str, list[Label]] = defaultdict(list)
    for label in labels:
        mine[label.annotator].append(label)
    reports = []
    for who in sorted(set(served) | set(mine)):
        reasons: dict[str, int] = defaultdict(int)
        margins = []
        for assignment in served[who]:
            reasons[assignment.reason or "random"] += 1
            if assignment.reason == "margin" and assignment.margin is not None:
                margins.append(assignment.margin)
        seconds = [label.seconds for label in mine[who] if label.seconds is not None]
        found = agreement.get(who, fb.AnnotatorAgreement())
        gold_seen, gold_failed = gold.get(who, (0, 0))
        flags = []
        if gold_seen and gold_failed / gold_seen > gold_failure_threshold:
            flags.append(
                f"failed {gold_failed} of {gold_seen} gold items (threshold {gold_failure_threshold:g})"
            )
        reports.append(
            AnnotatorReport(
                annotator=who,
                judge=fb.is_judge(who),
                items_served=len(served[who]),
                labels=sum(1 for label in mine[who] if label.kind != "skip"),
                skips=sum(1 for label in mine[who] if label.kind == "skip"),
                reasons=dict(reasons),
                mean_margin=sum(margins) / len(margins) if margins else None,
                agreement_with_majority=found.with_majority.rate,
                majority_comparisons=found.with_majority.total,
                agreement_with={other: tally.rate for other, tally in sorted(found.with_each.items())},
                median_seconds_per_label=statistics.median(seconds) if seconds else None,
                gold_labelled=gold_seen,
                gold_failed=gold_failed,
                flagged=bool(flags),
                flag_reasons=flags,
            )
        )
    return reports


# --- judges beside the reward model


def reward_order_verdicts(item: Item) -> dict[tuple[str, str], float]:
    """The reward model's verdict on every pair of a scored item (higher reward wins; equal: a tie)."""
    rewards = item.rewards or []
    out: dict[tuple[str, str], float] = {}
    for i in range(len(rewards)):
        for j in range(i + 1, len(rewards)):
            key = fb.pair_key(item.response_ids[i], item.response_ids[j])
            first, second = (i, j) if key[0] == item.response_ids[i] else (j, i)
            gap = rewards[first] - rewards[second]
            out[key] = 1.0 if gap > 0 else 0.0 if gap < 0 else 0.5
    return out


def judge_agrees_with_reward_model(items: Sequence[Item], labels: Sequence[Label]) -> set[str]:
    """Items on which some judge gave a verdict and every judge verdict matches the reward model's order.

    These are the items routing ``judge_reward_disagree`` keeps from people: the two machine views agree, so
    a person's label there teaches least. An item with no judge verdict or no scores is never in the set."""
    scored = {item.id: reward_order_verdicts(item) for item in items if item.rewards}
    agree: dict[str, bool] = {}
    for label in labels:
        if not fb.is_judge(label.annotator) or label.item_id not in scored:
            continue
        expected = scored[label.item_id]
        for c in fb.label_comparisons(label.kind, label.payload, label.annotator):
            key, outcome = fb.oriented(c)
            agree[label.item_id] = agree.get(label.item_id, True) and expected.get(key) == outcome
    return {item_id for item_id, ok in agree.items() if ok}
