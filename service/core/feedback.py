"""Human feedback, framework-free: labels -> comparisons, ratings (Elo, Bradley-Terry), agreement, assignment.

A feedback set's own rules (``service/core/feedback_sets.py``) and queries (``service/db/feedback_sets.py``)
build on these functions; the routes only load rows, call them and store results.

Vocabulary: a feedback set holds *items* (one prompt and its 2..16 candidate responses each). An annotator
labels an item with a full *ranking* (response ids, best first), *scores* (one number per response, higher is
better, ties allowed), or one *pairwise* comparison (``a`` vs ``b``: ``a``, ``b`` or ``tie``). Every label is
reduced to comparisons between two responses of one item; ratings and agreement are computed from those.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations, pairwise
from typing import Any, Literal

from service.core.errors import ValidationFailed

Winner = Literal["a", "b", "tie"]

# --- ids and presentation


def response_ids(item_id: str, count: int) -> list[str]:
    """Stable, opaque ids for an item's responses, in the candidates file's order.

    Derived from the item id, so they never change; hashed, so they do not tell an annotator (or a page that
    shows them) which response was generated first.
    """
    return [f"r_{hashlib.sha256(f'{item_id}:{i}'.encode()).hexdigest()[:8]}" for i in range(count)]


def presentation_order(item_id: str, annotator: str, count: int) -> list[int]:
    """The order one annotator sees an item's responses in: shuffled, but the same on every request.

    Position bias is real (people favour the first answer); a per-(item, annotator) shuffle spreads it evenly
    over responses, and a seeded one means a page reload shows the same order.
    """
    seed = int.from_bytes(hashlib.sha256(f"{item_id}\x00{annotator}".encode()).digest()[:8], "big")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order


# --- labels -> comparisons


@dataclass(frozen=True)
class Comparison:
    """One judgement between two responses of an item: ``winner`` is 1.0 (a better), 0.0 (b better), 0.5 tie.

    ``weight`` scales the judgement in Elo and Bradley-Terry (an export that down-weights judges or weights
    annotators by their agreement); agreement counts every judgement once, whatever its weight."""

    a: str
    b: str
    outcome: float
    annotator: str
    weight: float = 1.0


LABEL_CODES = {
    "unknown_response": "a response id that is not one of the item's",
    "invalid_ranking": "a ranking that is not a permutation of the item's response ids",
    "scores_length_mismatch": "scores that do not cover every response exactly once",
    "invalid_label": "neither ranking, scores, nor a pairwise comparison",
    "same_response": "a pairwise comparison of a response with itself",
}


def _bad(code: str, message: str, field_name: str) -> ValidationFailed:
    return ValidationFailed(
        message, code=code, details=[{"field": field_name, "code": code, "message": message}]
    )


def check_label(
    *,
    response_ids: Sequence[str],
    ranking: Sequence[str] | None,
    scores: Mapping[str, float] | None,
    a: str | None,
    b: str | None,
    winner: Winner | None,
) -> tuple[str, dict[str, Any]]:
    """Validate one label against an item; return ``(kind, payload)`` to store. Raises ValidationFailed (422).

    Exactly one form: ``ranking`` (every response id once, best first), ``scores`` (``{response id: number}``
    for every response), or ``a``/``b``/``winner``.
    """
    known = set(response_ids)
    forms = [ranking is not None, scores is not None, any(v is not None for v in (a, b, winner))]
    if sum(forms) != 1:
        raise _bad(
            "invalid_label",
            'A label is exactly one of "ranking", "scores", or "a"/"b"/"winner".',
            "body",
        )
    if ranking is not None:
        unknown = [r for r in ranking if r not in known]
        if unknown:
            raise _bad("unknown_response", f"Unknown response id(s) {unknown[:5]} for this item.", "ranking")
        if len(ranking) != len(response_ids) or set(ranking) != known:
            raise _bad(
                "invalid_ranking",
                f"A ranking orders all {len(response_ids)} responses of the item, each once (best first).",
                "ranking",
            )
        return "ranking", {"ranking": list(ranking)}
    if scores is not None:
        unknown = [r for r in scores if r not in known]
        if unknown:
            raise _bad("unknown_response", f"Unknown response id(s) {unknown[:5]} for this item.", "scores")
        if set(scores) != known:
            raise _bad(
                "scores_length_mismatch",
                f"Scores must give a number for each of the item's {len(response_ids)} responses.",
                "scores",
            )
        for value in scores.values():
            if not math.isfinite(value):
                raise _bad("invalid_label", "Scores must be finite numbers.", "scores")
        return "scores", {"scores": dict(scores)}
    if a is None or b is None or winner is None:
        raise _bad("invalid_label", 'A pairwise comparison needs "a", "b" and "winner".', "body")
    for name, rid in (("a", a), ("b", b)):
        if rid not in known:
            raise _bad("unknown_response", f"Unknown response id {rid!r} for this item.", name)
    if a == b:
        raise _bad("same_response", "A response cannot be compared with itself.", "b")
    return "pairwise", {"a": a, "b": b, "winner": winner}


def label_comparisons(kind: str, payload: Mapping[str, Any], annotator: str) -> list[Comparison]:
    """A stored label -> its comparisons (a ranking of K: all C(K,2); scores: all pairs, ties as 0.5)."""
    if kind == "ranking":
        order = payload["ranking"]
        return [Comparison(x, y, 1.0, annotator) for x, y in combinations(order, 2)]
    if kind == "scores":
        scores = payload["scores"]
        ids = sorted(scores)
        out = []
        for x, y in combinations(ids, 2):
            outcome = 1.0 if scores[x] > scores[y] else 0.0 if scores[x] < scores[y] else 0.5
            out.append(Comparison(x, y, outcome, annotator))
        return out
    if kind == "pairwise":
        outcome = {"a": 1.0, "b": 0.0, "tie": 0.5}[payload["winner"]]
        return [Comparison(payload["a"], payload["b"], outcome, annotator)]
    return []  # skips carry no judgement


def pair_key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def comparisons_of(kind: str, payload: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The unordered response pairs a label judges (to refuse a second judgement of the same pair)."""
    return {pair_key(c.a, c.b) for c in label_comparisons(kind, payload, "")}


# --- ratings


def elo(
    players: Sequence[str],
    comparisons: Iterable[Comparison],
    *,
    k: float = 16.0,
    initial: float = 1000.0,
) -> dict[str, float]:
    """Sequential Elo over comparisons in the order given (label time order): the classic online rating.

    K is 16, not chess's 32: one ranking label is a burst of C(K,2) comparisons, and a large K lets the last
    label dominate. Measured on 50 players, every pair judged by 3 simulated annotators flipping 20%: Kendall
    tau to the truth 0.75-0.85 with K=32, 0.83-0.88 with K=16 (Bradley-Terry: 0.89-0.90).

    Elo depends on order and on ``k``; it is reported because people know how to read it. Bradley-Terry
    (below) is the order-free estimate and the one exports rank by.
    """
    rating = dict.fromkeys(players, initial)
    for c in comparisons:
        expected_a = 1.0 / (1.0 + 10 ** ((rating[c.b] - rating[c.a]) / 400.0))
        delta = k * c.weight * (c.outcome - expected_a)
        rating[c.a] += delta
        rating[c.b] -= delta
    return rating


def bradley_terry(
    players: Sequence[str],
    comparisons: Iterable[Comparison],
    *,
    prior: float = 1.0,
    iterations: int = 200,
    tolerance: float = 1e-9,
) -> dict[str, float]:
    """Bradley-Terry strengths by Hunter's MM algorithm (2004), as natural-log strengths with mean 0.

    P(i beats j) = sigmoid(s_i - s_j). A tie counts as half a win for each side. ``prior`` adds that many
    virtual games (half won, half lost) against a fixed reference player of strength 1 to every player: the
    maximum-likelihood estimate does not exist for a response that never lost (or never won), and this
    shrinks such estimates to a finite value instead. MM increases the likelihood at every step.
    """
    index = {p: i for i, p in enumerate(players)}
    n = len(players)
    if n == 0:
        return {}
    wins = [prior / 2.0] * n
    games: dict[tuple[int, int], float] = defaultdict(float)
    for c in comparisons:
        i, j = index[c.a], index[c.b]
        wins[i] += c.weight * c.outcome
        wins[j] += c.weight * (1.0 - c.outcome)
        games[(i, j) if i < j else (j, i)] += c.weight
    strength = [1.0] * n
    for _ in range(iterations):
        denominators = [prior / (s + 1.0) for s in strength]  # the virtual games against strength 1
        for (i, j), count in games.items():
            share = count / (strength[i] + strength[j])
            denominators[i] += share
            denominators[j] += share
        new = [wins[i] / denominators[i] for i in range(n)]
        change = max(abs(math.log(new[i] / strength[i])) for i in range(n))
        strength = new
        if change < tolerance:
            break
    logs = [math.log(s) for s in strength]
    mean = sum(logs) / n
    return {p: logs[index[p]] - mean for p in players}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-a between two score lists (pairs tied in either count as neither concordant nor not)."""
    n = len(x)
    if n < 2:
        return 1.0
    total = 0.0
    for i, j in combinations(range(n), 2):
        total += _sign(x[i] - x[j]) * _sign(y[i] - y[j])
    return total / (n * (n - 1) / 2)


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


# --- agreement


def pairwise_agreement(comparisons: Iterable[Comparison]) -> tuple[int, int]:
    """(agreeing, total) over every two annotators who judged the same pair of responses.

    Two judgements agree when they give the same verdict (a better, b better, or tie). Per annotator and pair
    only the latest judgement counts. The rate is agreeing / total; 1.0 means every overlap agreed.
    """
    verdicts: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for c in comparisons:
        key = pair_key(c.a, c.b)
        outcome = c.outcome if (c.a, c.b) == key else 1.0 - c.outcome
        verdicts[key][c.annotator] = outcome
    agree = total = 0
    for by_annotator in verdicts.values():
        for x, y in combinations(by_annotator.values(), 2):
            total += 1
            agree += int(x == y)
    return agree, total


def kendalls_w(rankings: Sequence[Mapping[str, float]]) -> float | None:
    """Kendall's coefficient of concordance W (0: no agreement, 1: identical orders) of m annotators' full
    orderings of the same n responses, given as ``{response: rank}`` (1 = best; tied responses share the mean
    rank). None with fewer than 2 annotators or 2 responses. Without the tie correction, so ties lower W.
    """
    m = len(rankings)
    if m < 2:
        return None
    responses = sorted(rankings[0])
    n = len(responses)
    if n < 2:
        return None
    sums = [sum(r[x] for r in rankings) for x in responses]
    mean = m * (n + 1) / 2.0
    s = sum((total - mean) ** 2 for total in sums)
    return 12.0 * s / (m * m * (n**3 - n))


def ranks_of(kind: str, payload: Mapping[str, Any]) -> dict[str, float] | None:
    """A full label as ``{response: rank}`` (1 = best, ties share the mean rank); None for pairwise."""
    if kind == "ranking":
        return {r: float(i + 1) for i, r in enumerate(payload["ranking"])}
    if kind == "scores":
        scores = payload["scores"]
        ordered = sorted(scores, key=lambda r: -scores[r])
        ranks: dict[str, float] = {}
        i = 0
        while i < len(ordered):
            j = i
            while j + 1 < len(ordered) and scores[ordered[j + 1]] == scores[ordered[i]]:
                j += 1
            for r in ordered[i : j + 1]:
                ranks[r] = (i + j) / 2.0 + 1.0
            i = j + 1
        return ranks
    return None


# --- per-item summaries


@dataclass
class ResponseRating:
    id: str
    index: int
    elo: float
    bradley_terry: float
    comparisons: int
    wins: float
    """Ties count half."""


@dataclass
class ItemRatings:
    responses: list[ResponseRating]
    num_labels: int
    """Distinct annotators with at least one judgement on the item."""
    num_comparisons: int
    agreement: float | None
    """Pairwise agreement rate among this item's annotators; None when no two judged the same pair."""
    kendalls_w: float | None
    agreeing: int = 0
    overlapping: int = 0
    decisive: int = 0
    """Comparisons that were not ties."""

    def order(self) -> list[int]:
        """Response indices best first: Bradley-Terry, then Elo, then wins, then the original order."""
        ranked = sorted(self.responses, key=lambda r: (-r.bradley_terry, -r.elo, -r.wins, r.index))
        return [r.index for r in ranked]

    @property
    def has_preference(self) -> bool:
        """Some comparison was not a tie, so the order says something."""
        return self.decisive > 0


@dataclass
class StoredLabel:
    annotator: str
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)


def rate_item(
    ids: Sequence[str], labels: Sequence[StoredLabel], weights: Mapping[str, float] | None = None
) -> ItemRatings:
    """Ratings and agreement of one item from its labels (in the order they were given).

    ``weights``: annotator -> weight of their judgements in Elo and Bradley-Terry (default 1 each)."""
    comparisons = [
        c if weights is None else Comparison(c.a, c.b, c.outcome, c.annotator, weights.get(c.annotator, 1.0))
        for label in labels
        for c in label_comparisons(label.kind, label.payload, label.annotator)
    ]
    elo_ratings = elo(ids, comparisons)
    bt = bradley_terry(ids, comparisons)
    counts: dict[str, int] = defaultdict(int)
    wins: dict[str, float] = defaultdict(float)
    for c in comparisons:
        counts[c.a] += 1
        counts[c.b] += 1
        wins[c.a] += c.outcome
        wins[c.b] += 1.0 - c.outcome
    agree, total = pairwise_agreement(comparisons)
    latest_full: dict[str, dict[str, float]] = {}
    for label in labels:
        ranks = ranks_of(label.kind, label.payload)
        if ranks is not None:
            latest_full[label.annotator] = ranks  # an annotator's latest full label is their view
    return ItemRatings(
        responses=[
            ResponseRating(
                id=rid,
                index=i,
                elo=elo_ratings[rid],
                bradley_terry=bt[rid],
                comparisons=counts[rid],
                wins=wins[rid],
            )
            for i, rid in enumerate(ids)
        ],
        num_labels=len({label.annotator for label in labels if label.kind != "skip"}),
        num_comparisons=len(comparisons),
        agreement=agree / total if total else None,
        kendalls_w=kendalls_w(list(latest_full.values())),
        agreeing=agree,
        overlapping=total,
        decisive=sum(1 for c in comparisons if c.outcome != 0.5 and c.weight > 0),
    )


# --- assignment


@dataclass(frozen=True)
class ItemLoad:
    item_id: str
    labels: int
    """Annotators who labelled (or are labelling: an open assignment) the item."""


def choose_item(
    loads: Sequence[ItemLoad],
    *,
    annotator: str,
    seen: set[str],
    annotations_per_item: int,
) -> str | None:
    """The next item for ``annotator``, or None when nothing is left for them.

    Never an item in ``seen`` (the annotator was given it before, labelled it or skipped it). Among the items
    still short of ``annotations_per_item``, the least-labelled first, so labels spread evenly and every item
    reaches its target before any gets more; ties are broken by a hash of (annotator, item), so annotators
    working at the same time start on different items rather than all on the first.
    """
    best: tuple[int, bytes, str] | None = None
    for load in loads:
        if load.item_id in seen or load.labels >= annotations_per_item:
            continue
        tiebreak = hashlib.sha256(f"{annotator}\x00{load.item_id}".encode()).digest()[:8]
        candidate = (load.labels, tiebreak, load.item_id)
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[2]


# --- active ordering

ORDERINGS = ("random", "uncertainty")


def uncertainty_margin(rewards: Sequence[float]) -> float:
    """How unsure a reward model is about an item: the smallest gap between two of its responses' rewards.

    With the rewards sorted, that is the smallest gap between neighbours, i.e. the pair the model can tell
    apart least (for two responses, ``|r(a) - r(b)|``). A label on that item settles the comparison the
    model is closest to getting either way, which is where a Bradley-Terry reward model's loss has the
    steepest gradient (the logistic's slope is largest at a margin of 0)."""
    ordered = sorted(rewards)
    return min(b - a for a, b in pairwise(ordered))


@dataclass(frozen=True)
class Candidate:
    """An item as /next weighs it: how loaded it is, its reward-model margin (None: unscored), gold or not."""

    item_id: str
    labels: int
    margin: float | None = None
    gold: bool = False


@dataclass(frozen=True)
class Choice:
    """The item /next serves and why: ``reason`` is "random" (least-labelled first, an unlabelled item),
    "overlap" (least-labelled first, an item others labelled: toward its overlap target), "margin" (the
    smallest reward-model margin; ``margin`` holds it), "unscored" (uncertainty ordering before the first
    scores arrive: least-labelled first) or "gold" (a gold item mixed in)."""

    item_id: str
    reason: str
    margin: float | None = None


def _tiebreak(annotator: str, item_id: str) -> bytes:
    return hashlib.sha256(f"{annotator}\x00{item_id}".encode()).digest()[:8]


def choose_next(
    candidates: Sequence[Candidate],
    *,
    annotator: str,
    seen: set[str],
    annotations_per_item: int,
    ordering: str = "random",
    gold_due: bool = False,
) -> Choice | None:
    """The next item for ``annotator`` under ``ordering``, or None when nothing is left for them.

    The overlap target holds in both orderings: an item that has ``annotations_per_item`` annotators (open
    assignments included) is not served again, and nobody gets an item twice. ``random``: as
    :func:`choose_item`. ``uncertainty``: the scored item with the smallest margin first (then the
    least-labelled, then the per-annotator hash), so an item the model is unsure of gets all its annotators
    before a surer one gets any. Gold items are outside the overlap target (every annotator may get each one)
    and are served when ``gold_due`` while any is unseen."""
    fresh = [c for c in candidates if c.item_id not in seen]
    gold = [c for c in fresh if c.gold]
    if gold_due and gold:
        pick = min(gold, key=lambda c: (_tiebreak(annotator, c.item_id), c.item_id))
        return Choice(pick.item_id, "gold")
    open_items = [c for c in fresh if not c.gold and c.labels < annotations_per_item]
    if not open_items:
        return None
    scored = [c for c in open_items if c.margin is not None]
    if ordering == "uncertainty" and scored:
        pick = min(
            scored, key=lambda c: (c.margin or 0.0, c.labels, _tiebreak(annotator, c.item_id), c.item_id)
        )
        return Choice(pick.item_id, "margin", pick.margin)
    pick = min(open_items, key=lambda c: (c.labels, _tiebreak(annotator, c.item_id), c.item_id))
    if ordering == "uncertainty":
        return Choice(pick.item_id, "unscored")
    return Choice(pick.item_id, "overlap" if pick.labels else "random")


# --- annotator quality

JUDGE_PREFIX = "judge:"


def is_judge(annotator: str) -> bool:
    return annotator.startswith(JUDGE_PREFIX)


def oriented(c: Comparison) -> tuple[tuple[str, str], float]:
    """The comparison's unordered pair and its outcome seen from the pair's first response."""
    key = pair_key(c.a, c.b)
    return key, c.outcome if (c.a, c.b) == key else 1.0 - c.outcome


@dataclass
class Tally:
    agreeing: int = 0
    total: int = 0

    @property
    def rate(self) -> float | None:
        return self.agreeing / self.total if self.total else None

    def add(self, same: bool) -> None:
        self.total += 1
        self.agreeing += int(same)


@dataclass
class AnnotatorAgreement:
    with_majority: Tally = field(default_factory=Tally)
    """Against the strict majority verdict of the *people* other than this annotator on the same pair."""
    with_each: dict[str, Tally] = field(default_factory=dict)
    """Against each other annotator, on the pairs both judged."""


def annotator_agreement(
    verdicts: Mapping[tuple[str, str, str], dict[str, float]],
) -> dict[str, AnnotatorAgreement]:
    """Per annotator: agreement with the majority of the people (judges never vote) and with each other one.

    ``verdicts``: (item, response a, response b) -> {annotator: outcome}, one verdict per annotator and pair
    (their latest). The majority is the most common verdict among the other people on the pair when it is
    strictly the most common (a 1-1 split has none, and the pair does not count)."""
    out: dict[str, AnnotatorAgreement] = defaultdict(AnnotatorAgreement)
    for by_annotator in verdicts.values():
        for who, verdict in by_annotator.items():
            mine = out[who]
            for other, theirs in by_annotator.items():
                if other != who:
                    mine.with_each.setdefault(other, Tally()).add(verdict == theirs)
            votes: dict[float, int] = defaultdict(int)
            for other, theirs in by_annotator.items():
                if other != who and not is_judge(other):
                    votes[theirs] += 1
            if votes:
                ranked = sorted(votes.values(), reverse=True)
                if len(ranked) == 1 or ranked[0] > ranked[1]:
                    majority = max(votes, key=lambda v: votes[v])
                    mine.with_majority.add(verdict == majority)
    return dict(out)


def gold_pairs(ids: Sequence[str], gold: Sequence[int]) -> dict[tuple[str, str], float]:
    """The pairs a gold answer orders (response indices best first; a partial list puts the listed ones,
    in order, above all others), as ``{pair: outcome of the pair's first response}``."""
    listed = list(gold)
    rest = [i for i in range(len(ids)) if i not in listed]
    out: dict[tuple[str, str], float] = {}
    for rank, better in enumerate(listed):
        for worse in listed[rank + 1 :] + rest:
            key = pair_key(ids[better], ids[worse])
            out[key] = 1.0 if key[0] == ids[better] else 0.0
    return out


def passes_gold(comparisons: Iterable[Comparison], expected: Mapping[tuple[str, str], float]) -> bool | None:
    """Whether a label on a gold item agrees with it on more than half the gold-ordered pairs it judges (a
    tie counts as wrong); None when it judges none of them."""
    tally = Tally()
    for c in comparisons:
        key, outcome = oriented(c)
        if key in expected:
            tally.add(outcome == expected[key])
    return None if not tally.total else tally.agreeing * 2 > tally.total
