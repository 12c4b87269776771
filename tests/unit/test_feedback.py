"""The feedback domain without a server: ranking expansion, ratings, agreement, assignment, label checks."""

from __future__ import annotations

import json
import random
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from service.core import feedback as fb
from service.core import ranking
from service.core.errors import ValidationFailed

# --- expansion to pairs


def test_ranking_expands_to_all_ordered_pairs_best_first() -> None:
    assert ranking.ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    for k in range(2, 17):
        pairs = ranking.ranking_pairs(list(range(k)))
        assert len(pairs) == k * (k - 1) // 2 == len(set(pairs))
        assert all(a < b for a, b in pairs)  # identity ranking: the lower index is always better


def test_scores_expand_without_ties_in_score_order() -> None:
    assert ranking.score_pairs([0.1, 0.9, 0.5]) == [(1, 2), (1, 0), (2, 0)]
    assert ranking.score_pairs([1, 1, 0]) == [(0, 2), (1, 2)]  # the 0-1 tie gives no pair
    assert ranking.score_pairs([3, 3, 3]) == []


def test_expand_file_keeps_the_prompt_and_groups_by_line(tmp_path: Path) -> None:
    src = tmp_path / "r.jsonl"
    lines: list[dict[str, Any]] = [
        {"prompt": "p1", "responses": ["a", "b", "c"], "ranking": [1, 2, 0]},
        {"prompt": [{"role": "user", "content": "p2"}], "responses": ["x", "y", "z"], "scores": [1, 2, 2]},
        {"prompt": "p3", "responses": ["u", "v"], "scores": [0, 0]},
    ]
    src.write_text(json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[1:]) + "\n")
    stats = ranking.expand_file(src, tmp_path / "p.jsonl")
    out = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert (stats.records, stats.pairs, stats.ties_skipped, stats.records_without_pairs) == (3, 5, 2, 1)
    assert [(p["chosen"], p["rejected"], p["group"]) for p in out] == [
        ("b", "c", 1),
        ("b", "a", 1),
        ("c", "a", 1),
        ("y", "x", 3),
        ("z", "x", 3),
    ]
    assert out[3]["prompt"] == lines[1]["prompt"]


def test_group_batches_never_split_a_group() -> None:
    groups = [g for g in range(10) for _ in range(g % 4 + 1)] + [None] * 5  # sizes 1..4, plus lone pairs
    batches = ranking.group_batches(groups, 6, rng=random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(len(groups)))
    for g in range(10):
        assert sum(1 for b in batches if any(groups[i] == g for i in b)) == 1
    assert all(len(b) <= 6 for b in batches)
    assert ranking.group_batches([1] * 10, 4, rng=random.Random(0)) == [list(range(10))]  # kept whole


# --- ratings recover a known order from noisy annotators


def _noisy_comparisons(
    n: int, annotators: int, flip: float, seed: int
) -> tuple[list[str], list[fb.Comparison]]:
    """Each annotator judges every pair once, in a random order, and flips the true verdict with ``flip``."""
    rng = random.Random(seed)
    players = [f"p{i}" for i in range(n)]  # p0 is the best, p{n-1} the worst
    out = []
    for annotator in range(annotators):
        pairs = list(combinations(range(n), 2))
        rng.shuffle(pairs)
        for i, j in pairs:
            if rng.random() < 0.5:
                i, j = j, i
            outcome = 1.0 if i < j else 0.0
            if rng.random() < flip:
                outcome = 1.0 - outcome
            out.append(fb.Comparison(players[i], players[j], outcome, f"ann{annotator}"))
    return players, out


@pytest.mark.parametrize("method", ["elo", "bradley_terry"])
def test_ratings_recover_the_order_with_20_percent_flips(method: str) -> None:
    players, comparisons = _noisy_comparisons(50, 3, 0.2, seed=0)
    rate = fb.elo if method == "elo" else fb.bradley_terry
    ratings = rate(players, comparisons)
    truth = [-float(i) for i in range(50)]
    tau = fb.kendall_tau(truth, [ratings[p] for p in players])
    assert tau >= 0.8, tau


def test_bradley_terry_is_finite_for_unbeaten_and_order_free() -> None:
    comparisons = [fb.Comparison("a", "b", 1.0, "x"), fb.Comparison("b", "c", 1.0, "x")]
    bt = fb.bradley_terry(["a", "b", "c"], comparisons)
    assert bt["a"] > bt["b"] > bt["c"] and abs(sum(bt.values())) < 1e-9
    assert fb.bradley_terry(["a", "b", "c"], comparisons[::-1]) == pytest.approx(bt)
    elo = fb.elo(["a", "b"], [fb.Comparison("a", "b", 0.5, "x")])
    assert elo == {"a": 1000.0, "b": 1000.0}


# --- agreement


def test_pairwise_agreement_and_kendalls_w() -> None:
    same = [fb.Comparison("a", "b", 1.0, "x"), fb.Comparison("b", "a", 0.0, "y")]  # same verdict, flipped
    assert fb.pairwise_agreement(same) == (1, 1)
    differ = [*same, fb.Comparison("a", "b", 0.0, "z")]
    assert fb.pairwise_agreement(differ) == (1, 3)
    assert fb.pairwise_agreement([fb.Comparison("a", "b", 1.0, "x")]) == (0, 0)

    ranks = {"a": 1.0, "b": 2.0, "c": 3.0}
    assert fb.kendalls_w([ranks, ranks]) == pytest.approx(1.0)
    assert fb.kendalls_w([ranks, {"a": 3.0, "b": 2.0, "c": 1.0}]) == pytest.approx(0.0)
    assert fb.kendalls_w([ranks]) is None
    assert fb.ranks_of("scores", {"scores": {"a": 2, "b": 2, "c": 1}}) == {"a": 1.5, "b": 1.5, "c": 3.0}


def test_rate_item_summarises_labels() -> None:
    ids = ["r1", "r2", "r3"]
    labels = [
        fb.StoredLabel("x", "ranking", {"ranking": ["r2", "r1", "r3"]}),
        fb.StoredLabel("y", "scores", {"scores": {"r1": 1, "r2": 5, "r3": 0}}),
        fb.StoredLabel("z", "pairwise", {"a": "r3", "b": "r1", "winner": "a"}),
        fb.StoredLabel("w", "skip", {}),
    ]
    item = fb.rate_item(ids, labels)
    assert item.order() == [1, 0, 2]
    assert item.num_labels == 3 and item.num_comparisons == 7
    assert [r.comparisons for r in item.responses] == [5, 4, 5]
    # x and y agree on all 3 pairs; on r1-r3 z disagrees with both: 3 of 5 overlaps agree
    assert (item.agreeing, item.overlapping) == (3, 5)
    assert item.kendalls_w == pytest.approx(1.0)


# --- label checks


def test_check_label_codes() -> None:
    ids = ["r1", "r2", "r3"]

    def code(**kw: object) -> str:
        args: dict[str, object] = {
            "ranking": None,
            "scores": None,
            "a": None,
            "b": None,
            "winner": None,
            **kw,
        }
        with pytest.raises(ValidationFailed) as info:
            fb.check_label(response_ids=ids, **args)  # type: ignore[arg-type]
        return info.value.code

    assert code() == "invalid_label"
    assert code(ranking=["r1", "r2", "r9"]) == "unknown_response"
    assert code(ranking=["r1", "r2"]) == "invalid_ranking"
    assert code(ranking=["r1", "r2", "r2"]) == "invalid_ranking"
    assert code(scores={"r1": 1, "r2": 2}) == "scores_length_mismatch"
    assert code(scores={"r1": 1, "r2": 2, "rx": 3}) == "unknown_response"
    assert code(a="r1", b="r1", winner="a") == "same_response"
    assert code(a="r1", b="zz", winner="a") == "unknown_response"
    assert code(a="r1", winner="a") == "invalid_label"
    assert code(ranking=["r1", "r2", "r3"], a="r1") == "invalid_label"
    ok = fb.check_label(response_ids=ids, ranking=None, scores=None, a="r1", b="r2", winner="tie")
    assert ok == ("pairwise", {"a": "r1", "b": "r2", "winner": "tie"})


def test_response_ids_and_presentation_are_stable() -> None:
    assert fb.response_ids("fbi_1", 3) == fb.response_ids("fbi_1", 3)
    assert len(set(fb.response_ids("fbi_1", 16))) == 16
    assert fb.presentation_order("fbi_1", "ann", 8) == fb.presentation_order("fbi_1", "ann", 8)
    orders = {tuple(fb.presentation_order("fbi_1", f"ann{i}", 4)) for i in range(20)}
    assert len(orders) > 5  # shuffled per annotator


# --- assignment


def test_assignment_never_repeats_and_balances() -> None:
    items = [f"fbi_{i}" for i in range(10)]
    target = 3
    labels: Counter[str] = Counter()
    seen: dict[str, set[str]] = {f"ann{a}": set() for a in range(5)}
    rng = random.Random(1)
    served: list[tuple[str, str]] = []
    while True:
        progressed = False
        for annotator in rng.sample(sorted(seen), len(seen)):
            loads = [fb.ItemLoad(i, labels[i]) for i in items]
            item = fb.choose_item(
                loads, annotator=annotator, seen=seen[annotator], annotations_per_item=target
            )
            if item is None:
                continue
            assert item not in seen[annotator]
            seen[annotator].add(item)
            labels[item] += 1
            served.append((annotator, item))
            progressed = True
            # balance: no item is ever more than one label ahead of the least-labelled open one
            assert max(labels.values()) - min(labels[i] for i in items) <= 1 or min(labels.values()) >= target
        if not progressed:
            break
    assert len(served) == len(set(served)) == 30
    assert all(labels[i] == target for i in items)
    # with fewer annotators than the target, every item gets one label per annotator and no more
    assert fb.choose_item([fb.ItemLoad("x", 0)], annotator="a", seen={"x"}, annotations_per_item=5) is None
    assert fb.choose_item([fb.ItemLoad("x", 2)], annotator="a", seen=set(), annotations_per_item=2) is None


def test_choose_item_spreads_simultaneous_annotators() -> None:
    loads = [fb.ItemLoad(f"fbi_{i}", 0) for i in range(20)]
    first = {fb.choose_item(loads, annotator=f"a{n}", seen=set(), annotations_per_item=1) for n in range(10)}
    assert len(first) > 5


# --- uncertainty ordering, agreement with the majority, gold items, weights


def test_uncertainty_margin_is_the_smallest_gap_between_neighbours() -> None:
    assert fb.uncertainty_margin([0.3, -0.2]) == pytest.approx(0.5)
    assert fb.uncertainty_margin([1.0, 0.0, 0.9, -3.0]) == pytest.approx(0.1)


def test_choose_next_serves_smallest_margins_first_and_keeps_the_overlap_target() -> None:
    margins = {"a": 0.9, "b": 0.05, "c": 0.4, "d": 0.01}
    labels = {k: 0 for k in margins}
    served: list[tuple[str, str]] = []
    seen: dict[str, set[str]] = {"x": set(), "y": set(), "z": set()}
    for annotator in ["x", "y", "z"] * 4:
        loads = [fb.Candidate(k, labels[k], margins[k]) for k in margins]
        choice = fb.choose_next(
            loads, annotator=annotator, seen=seen[annotator], annotations_per_item=2, ordering="uncertainty"
        )
        if choice is None:
            continue
        assert choice.reason == "margin" and choice.margin == margins[choice.item_id]
        served.append((annotator, choice.item_id))
        seen[annotator].add(choice.item_id)
        labels[choice.item_id] += 1
    assert [item for _, item in served] == ["d", "d", "b", "b", "c", "c", "a", "a"]
    assert all(n == 2 for n in labels.values())  # never more than the target
    # random ordering ignores margins; unscored uncertainty falls back to least-labelled first
    plain = [fb.Candidate(k, 0, margins[k]) for k in margins]
    assert fb.choose_next(plain, annotator="x", seen=set(), annotations_per_item=1).reason == "random"  # type: ignore[union-attr]
    unscored = [fb.Candidate(k, 0) for k in margins]
    got = fb.choose_next(unscored, annotator="x", seen=set(), annotations_per_item=1, ordering="uncertainty")
    assert got is not None and got.reason == "unscored"


def test_gold_items_are_mixed_in_outside_the_overlap_target() -> None:
    loads = [fb.Candidate("g", 5, gold=True), fb.Candidate("a", 0)]
    assert fb.choose_next(
        loads, annotator="x", seen=set(), annotations_per_item=1, gold_due=True
    ) == fb.Choice("g", "gold")
    assert fb.choose_next(loads, annotator="x", seen=set(), annotations_per_item=1).item_id == "a"  # type: ignore[union-attr]
    assert fb.choose_next(loads, annotator="x", seen={"a"}, annotations_per_item=1) is None
    expected = fb.gold_pairs(["r0", "r1", "r2"], [2])
    assert expected == {("r0", "r2"): 0.0, ("r1", "r2"): 0.0}
    good = fb.label_comparisons("ranking", {"ranking": ["r2", "r0", "r1"]}, "x")
    bad = fb.label_comparisons("ranking", {"ranking": ["r0", "r1", "r2"]}, "x")
    assert fb.passes_gold(good, expected) is True and fb.passes_gold(bad, expected) is False


def test_agreement_with_the_majority_of_people_judges_do_not_vote() -> None:
    verdicts = {
        ("i", "a", "b"): {"p1": 1.0, "p2": 1.0, "p3": 0.0, "judge:j": 1.0},
        ("i", "a", "c"): {"p1": 1.0, "p2": 0.0, "judge:j": 0.0},  # p1 vs p2: no majority for the judge
    }
    found = fb.annotator_agreement(verdicts)
    assert (found["p3"].with_majority.agreeing, found["p3"].with_majority.total) == (0, 1)
    assert (found["p1"].with_majority.agreeing, found["p1"].with_majority.total) == (0, 1)  # a b: 1-1 split
    assert (found["judge:j"].with_majority.agreeing, found["judge:j"].with_majority.total) == (1, 1)
    assert found["judge:j"].with_each["p2"].rate == 1.0 and found["judge:j"].with_each["p3"].rate == 0.0


def test_weights_scale_judgements_in_bradley_terry() -> None:
    ids = ["a", "b"]
    labels = [
        fb.StoredLabel("p", "pairwise", {"a": "a", "b": "b", "winner": "a"}),
        fb.StoredLabel("judge:j", "pairwise", {"a": "a", "b": "b", "winner": "b"}),
    ]
    equal = fb.rate_item(ids, labels)
    weighted = fb.rate_item(ids, labels, {"judge:j": 0.25})
    assert equal.responses[0].bradley_terry == pytest.approx(0.0, abs=1e-9)
    assert weighted.responses[0].bradley_terry > 0 and weighted.order() == [0, 1]


def test_routing_keeps_from_people_the_items_where_judge_and_reward_model_agree() -> None:
    from types import SimpleNamespace

    from service.core import feedback_sets as rules

    def item(item_id: str, rewards: list[float] | None) -> Any:
        return SimpleNamespace(
            id=item_id, response_ids=[f"{item_id}a", f"{item_id}b"], rewards=rewards, gold=None
        )

    def judged(item_id: str, winner: str) -> Any:
        payload = {"a": f"{item_id}a", "b": f"{item_id}b", "winner": winner}
        return SimpleNamespace(
            item_id=item_id, annotator="judge:j", kind="pairwise", payload=payload, seconds=None
        )

    items = [item("x", [1.0, 0.0]), item("y", [0.0, 1.0]), item("z", None), item("w", [0.5, 0.2])]
    labels = [judged("x", "a"), judged("y", "a"), judged("z", "a")]  # y: the judge disagrees; w: not judged
    assert rules.judge_agrees_with_reward_model(items, labels) == {"x"}
    loads = rules.item_loads([i.id for i in items], labels, [])
    offered = rules.candidates(items, loads, routed_out={"x"})
    assert [c.item_id for c in offered] == ["y", "z", "w"]
    assert [c.margin for c in offered] == [pytest.approx(1.0), None, pytest.approx(0.3)]
