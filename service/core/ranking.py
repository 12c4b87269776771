"""Ranked and scored feedback as preference pairs: the expansion a reward model trains on, and its batching.

A ``ranking`` record orders K responses to one prompt (or scores them). A reward model learns from pairs, so a
record becomes every ordered pair (better, worse): C(K,2) of them for a full ranking, fewer for scores with
ties (a tie says neither is better, so it yields no pair). InstructGPT (Ouyang et al., 2022, section 3.5)
trains on all C(K,2) comparisons of one prompt *as one batch element*: shuffled into separate batches the
pairs of a prompt are strongly correlated, and the model over-fits them pair by pair. Each expanded pair
therefore carries a ``group`` key (its source line) and :func:`group_batches` keeps a group in one batch.

Framework-free and torch-free: the runner expands a ``ranking`` dataset into the ``preference`` lines the
trainers already read, and the trainer imports :func:`group_batches`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignd import validation

__all__ = [
    "ExpansionStats",
    "expand_file",
    "expand_record",
    "group_batches",
    "ranking_pairs",
    "score_pairs",
]

GROUP_FIELD = "group"


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """All C(K,2) ordered pairs ``(better, worse)`` of a best-first ranking of response indices.

    In rank order: the best response against every other first, then the second best, and so on.
    """
    return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]


def score_pairs(scores: Sequence[float]) -> list[tuple[int, int]]:
    """Ordered pairs ``(better, worse)`` from per-response scores (higher is better); ties give no pair.

    Responses are taken best first (equal scores by index), so the order matches :func:`ranking_pairs`.
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [
        (order[i], order[j])
        for i in range(len(order))
        for j in range(i + 1, len(order))
        if scores[order[i]] > scores[order[j]]
    ]


def expand_record(record: dict[str, Any], group: int | str) -> list[dict[str, Any]]:
    """One validated ``ranking`` record -> ``preference`` records ``{"prompt", "chosen", "rejected", "group"}``."""
    responses = record["responses"]
    pairs = ranking_pairs(record["ranking"]) if "ranking" in record else score_pairs(record["scores"])
    return [
        {"prompt": record["prompt"], "chosen": responses[a], "rejected": responses[b], GROUP_FIELD: group}
        for a, b in pairs
    ]


@dataclass
class ExpansionStats:
    records: int = 0
    pairs: int = 0
    ties_skipped: int = 0
    """Pairs of responses with equal scores: no preference, no pair."""
    records_without_pairs: int = 0
    """Records whose scores are all equal."""


def expand_file(src: str | Path, dest: str | Path) -> ExpansionStats:
    """Expand a validated ``ranking`` JSONL file into a ``preference`` JSONL file; ``group`` is the source line.

    Streams (one record in memory at a time); writes ``dest`` atomically (a temp name, then a rename), so a
    crash never leaves a half-expanded file that a later run would take as complete.
    """
    stats = ExpansionStats()
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for number, record in validation.iter_records(src):  # validated at upload: read, not re-checked
            stats.records += 1
            k = len(record["responses"])
            pairs = expand_record(record, number)
            stats.ties_skipped += k * (k - 1) // 2 - len(pairs)
            if not pairs:
                stats.records_without_pairs += 1
            for pair in pairs:
                out.write(json.dumps(pair, ensure_ascii=False) + "\n")
            stats.pairs += len(pairs)
    tmp.replace(dest)
    return stats


def group_batches(groups: Sequence[Any], batch_size: int, *, rng: random.Random) -> list[list[int]]:
    """Batches of indices into ``groups`` (one key per pair) that never split a group.

    Groups are shuffled (by ``rng``), then packed greedily up to ``batch_size`` pairs per batch; a group larger
    than ``batch_size`` gets a batch of its own, whole (splitting it is what this exists to avoid). Pairs
    without a group (``None``) are groups of one, so plain preference data batches as before.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    members: dict[Any, list[int]] = {}
    for index, key in enumerate(groups):
        members.setdefault(("pair", index) if key is None else ("group", key), []).append(index)
    order = list(members.values())
    rng.shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    for group in order:
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        current = current + group
        if len(current) >= batch_size:
            batches.append(current)
            current = []
    if current:
        batches.append(current)
    return batches
