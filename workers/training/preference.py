"""What the two preference methods (reward model, DPO) share: reading and tokenising pairs, and step-sized
batches of pairs (the optimizer and logging are every loop's: ``loop.py``). The losses live in ``reward.py`` and
``dpo.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from contract.protocol import DatasetRef
from service.core import ranking
from workers.training import data, loop, lora
from workers.training.context import RunContext
from workers.training.errors import INVALID_SPEC, NO_TRAINABLE_EXAMPLES, TrainingError
from workers.training.modelcard import DatasetCardEntry

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLE = "preference"


@dataclass
class PreparedPairs:
    dataset_ref: DatasetRef
    dataset_sha256: str
    tokenizer: PreTrainedTokenizerBase
    pairs: list[data.PreferenceExample]
    stats: data.PreferenceStats
    pad_token_id: int

    def card_entry(self) -> DatasetCardEntry:
        return DatasetCardEntry(
            role=ROLE,
            name=self.dataset_ref.name,
            id=self.dataset_ref.id,
            sha256=self.dataset_sha256,
            num_records=self.stats.records,
            num_examples=self.stats.pairs,
        )

    def dataset_metadata(self) -> dict[str, dict[str, str]]:
        """The ``datasets`` entry of the artifact metadata: the file trained on, by id and local hash."""
        return {ROLE: {"id": self.dataset_ref.id, "sha256": self.dataset_sha256}}


def prepare_pairs(
    ctx: RunContext, *, stage: str, max_length: int, max_prompt_length: int | None = None
) -> PreparedPairs:
    """Read, check and tokenise the ``preference`` dataset, reporting what was cut or dropped.

    Data first: a bad dataset fails in a second, before the (slow) model load.
    """
    spec, progress = ctx.spec, ctx.progress
    dataset_ref = spec.datasets.get(ROLE)
    if dataset_ref is None:
        raise TrainingError(INVALID_SPEC, f"method {spec.method} needs a dataset with role '{ROLE}'")
    records = data.read_preference_records(dataset_ref.path)
    sha256 = loop.local_sha256(progress, dataset_ref, stage=stage)
    tokenizer = lora.load_tokenizer(spec.base_model.path)
    pairs, stats = data.tokenize_preference(
        tokenizer, records, max_length=max_length, max_prompt_length=max_prompt_length
    )
    progress.event(
        f"dataset {dataset_ref.name}: {stats.records} records -> {stats.pairs} pairs, {stats.tokens} tokens, "
        f"{stats.truncated} truncated",
        stage=stage,
    )
    if stats.dropped:
        progress.event(
            f"dropped {stats.dropped} of {stats.records} pairs with no response tokens left after truncation "
            f"(max_length={max_length}) or with identical sides",
            stage=stage,
            level="warning",
        )
    if stats.prefix_fallback:
        progress.event(
            f"{stats.prefix_fallback} pairs: the chat template's prompt was not a token prefix of the full "
            "conversation; masked the longest common prefix instead",
            stage=stage,
            level="warning",
        )
    if not pairs:
        raise TrainingError(NO_TRAINABLE_EXAMPLES, "no preference pair has response tokens left to train on")
    pad = tokenizer.pad_token_id
    if pad is None:
        # Right padding is masked out of attention and labels, and rewards are read at the last *attended*
        # token, so any id works; EOS is the usual choice.
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return PreparedPairs(dataset_ref, sha256, tokenizer, pairs, stats, int(pad))


VALIDATION_ROLE = "validation"


@dataclass
class ValidationPairs:
    dataset_ref: DatasetRef
    dataset_sha256: str
    pairs: list[data.PreferenceExample]
    stats: data.PreferenceStats

    def card_entry(self) -> DatasetCardEntry:
        return DatasetCardEntry(
            role=VALIDATION_ROLE,
            name=self.dataset_ref.name,
            id=self.dataset_ref.id,
            sha256=self.dataset_sha256,
            num_records=self.stats.records,
            num_examples=self.stats.pairs,
        )


def prepare_validation_pairs(
    ctx: RunContext, prepared: PreparedPairs, *, stage: str, max_length: int, max_prompt_length: int | None
) -> ValidationPairs | None:
    """The optional held-out pairs (role ``validation``), tokenised by the training pairs' rules; None when
    the job has none."""
    ref = ctx.spec.datasets.get(VALIDATION_ROLE)
    if ref is None:
        return None
    sha256 = loop.local_sha256(ctx.progress, ref, stage=stage)
    pairs, stats = data.tokenize_preference(
        prepared.tokenizer,
        data.read_preference_records(ref.path),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )
    if not pairs:
        raise TrainingError(
            NO_TRAINABLE_EXAMPLES, f"validation dataset {ref.name}: no pair has response tokens left"
        )
    ctx.progress.event(
        f"validation dataset {ref.name}: {stats.pairs} held-out pairs ({stats.dropped} dropped)", stage=stage
    )
    return ValidationPairs(ref, sha256, pairs, stats)


def epoch_batches(
    pairs: list[data.PreferenceExample], batch_size: int, *, seed: int, epoch: int
) -> list[list[int]]:
    """Length-bucketed batches of pair indices (a pair is as long as its longer side), fresh per epoch.

    Pairs expanded from a ranking carry a group (their prompt): those batch by group instead, every pair of a
    prompt in the same batch, as InstructGPT trains on a prompt's C(K,2) comparisons together (a group larger
    than ``batch_size`` makes a batch of its own).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    if any(p.group is not None for p in pairs):
        return ranking.group_batches([p.group for p in pairs], batch_size, rng=rng)
    lengths = [max(p.chosen.length, p.rejected.length) for p in pairs]
    return data.length_bucketed_batches(lengths, batch_size, rng=rng)


def iter_chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]
