"""Ranking datasets in the preference trainers: a prompt's pairs batch together and are held out together."""

from __future__ import annotations

import json
from pathlib import Path

from service.core import ranking
from workers.training import data, preference


def _example(length: int, group: object) -> data.PreferenceExample:
    side = data.SFTExample(input_ids=[1] * length, labels=[1] * length)
    return data.PreferenceExample(chosen=side, rejected=side, group=group)


def test_expanded_ranking_reads_with_groups(tmp_path: Path) -> None:
    src = tmp_path / "ranking.jsonl"
    src.write_text(json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 1, 0]}) + "\n")
    ranking.expand_file(src, tmp_path / "pairs.jsonl")
    records = data.read_preference_records(tmp_path / "pairs.jsonl")
    assert [(r.chosen, r.rejected, r.group) for r in records] == [("c", "b", 1), ("c", "a", 1), ("b", "a", 1)]


def test_grouped_pairs_batch_and_hold_out_together() -> None:
    pairs = [_example(5 + i, g) for i, g in enumerate([1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4])]
    for epoch in range(3):
        batches = preference.epoch_batches(pairs, 6, seed=0, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(12))
        for g in (1, 2, 3, 4):
            assert sum(1 for b in batches if any(pairs[i].group == g for i in b)) == 1
    train, held = data.grouped_holdout_split([p.group for p in pairs], 0.25, seed=0)
    assert len(held) == 3 and {pairs[i].group for i in held}.isdisjoint({pairs[i].group for i in train})
    plain = [None] * 10  # plain preference pairs split exactly as before
    assert data.grouped_holdout_split(plain, 0.3, seed=4) == data.holdout_split(10, 0.3, seed=4)
