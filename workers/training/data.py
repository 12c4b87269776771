"""Training data: reading JSONL, tokenising with masks, padding collator, length-bucketed batches; SFT records
and (at the end) preference pairs, which reuse the SFT prompt/answer boundary.

Record forms (validated at upload and checked again here with the same ``alignd.validation`` rules, because
the child must never trust its input):

- ``{"prompt": str, "completion": str}``
- ``{"messages": [{"role": str, "content": str}, ...]}`` whose last message is the assistant's.

The loss is on the completion: for the messages form that is the **last** assistant message; earlier turns,
assistant ones included, are context. (Training on every assistant turn needs a per-turn boundary search that
chat templates do not make reliable; one boundary per example we can verify, see :func:`encode_sft_record`.)
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from alignd import validation

from workers.training.errors import INVALID_DATASET, TrainingError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value torch's cross_entropy skips
Message = dict[str, str]
T = TypeVar("T")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bad(line: int, message: str) -> TrainingError:
    return TrainingError(INVALID_DATASET, f"line {line}: {message}")


def parse_sft_record(record: Any, line: int) -> tuple[list[Message], str]:
    """One record -> (prompt messages, completion text). Raises ``invalid_dataset`` naming the line."""
    if not isinstance(record, dict):
        raise _bad(line, "a record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _bad(line, "'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise _bad(line, f"messages[{i}] must be an object")
            role, content = message.get("role"), message.get("content")
            if not isinstance(role, str) or not role or not isinstance(content, str):
                raise _bad(line, f"messages[{i}] needs string 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise _bad(line, "the last message must be the assistant's")
        if len(messages) < 2:
            raise _bad(line, "'messages' needs at least one message before the assistant's answer")
        if not messages[-1]["content"].strip():
            raise _bad(line, "the assistant's answer is empty")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        return prompt, messages[-1]["content"]
    prompt_text, completion = record.get("prompt"), record.get("completion")
    if prompt_text is None or completion is None:
        raise _bad(line, "expected 'prompt' and 'completion', or 'messages'")
    if not isinstance(prompt_text, str) or not isinstance(completion, str):
        raise _bad(line, "'prompt' and 'completion' must be strings")
    if not completion.strip():
        raise _bad(line, "'completion' is empty")
    return [{"role": "user", "content": prompt_text}], completion


def read_jsonl(path: str | Path, parse: Callable[[Any, int], T], *, kind: str) -> list[T]:
    """Every record of ``path`` parsed by ``parse(record, line_number)``; errors name the line.

    Read by the SDK's one JSONL reader and re-checked with the upload's ``kind`` rules: the child does not
    trust its input, and a bad line fails here with the code and message the upload would have given it.
    """
    records: list[T] = []
    try:
        for number, record in validation.iter_records(path, kind=kind):
            records.append(parse(record, number))
    except validation.DatasetLineError as exc:
        raise _bad(exc.line, exc.message) from None
    except OSError as exc:
        raise TrainingError(INVALID_DATASET, f"cannot read {path}: {exc}") from None
    if not records:
        raise TrainingError(INVALID_DATASET, f"{path} holds no records")
    return records


def read_sft_records(path: str | Path) -> list[tuple[list[Message], str]]:
    return read_jsonl(path, parse_sft_record, kind="sft")


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_trainable(self) -> int:
        # Position 0 is never a target: the model predicts token t from tokens < t.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class TokenizeStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_trainable: int = 0
    prefix_fallback: int = 0  # chat template did not reproduce the prompt as a prefix
    tokens: int = 0
    trainable_tokens: int = 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_sft_record(
    tokenizer: PreTrainedTokenizerBase, prompt: list[Message], completion: str
) -> tuple[list[int], int, bool]:
    """Tokenise one example; return (token ids, prompt length, whether the prefix fallback was needed).

    With a chat template: the prompt is rendered with ``add_generation_prompt=True`` (so it ends with the
    assistant header) and the full conversation without it; both texts already contain any BOS, so they are
    encoded with ``add_special_tokens=False``. The prompt's tokens should be exactly the first tokens of the
    full sequence; templates that rewrite earlier turns, or merges across the boundary, can break that. Then
    the boundary is the longest common prefix of the two encodings: it never masks a completion token, at the
    price of training on the few prompt tokens after the first difference.

    Without a template: ``prompt + completion + eos`` with the prompt and completion encoded separately, so the
    boundary is exact by construction (the tokenizer adds BOS to the prompt if it normally does).
    """
    if getattr(tokenizer, "chat_template", None):
        full_messages = [*prompt, {"role": "assistant", "content": completion}]
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(full_messages, tokenize=False)
        assert isinstance(prompt_text, str) and isinstance(full_text, str)
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        full_ids = list(tokenizer(full_text, add_special_tokens=False)["input_ids"])
        if full_ids[: len(prompt_ids)] == prompt_ids:
            return full_ids, len(prompt_ids), False
        return full_ids, _common_prefix(prompt_ids, full_ids), True

    if len(prompt) == 1 and prompt[0]["role"] == "user":
        prompt_text = prompt[0]["content"]
    else:
        # Chat records on a tokenizer without a template: a plain transcript ending in an assistant cue.
        prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(int(tokenizer.eos_token_id))
    return prompt_ids + completion_ids, len(prompt_ids), False


def tokenize_sft(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[tuple[list[Message], str]],
    *,
    max_length: int,
    completion_only_loss: bool = True,
) -> tuple[list[SFTExample], TokenizeStats]:
    """Tokenise, mask and truncate every record; drop (and count) examples left with nothing to learn.

    Truncation keeps the start (right truncation): the prompt survives and the completion's tail is cut. An
    example whose completion is cut away entirely (prompt >= ``max_length``) has no trainable tokens and is
    dropped; the caller reports the count rather than silently training on nothing.
    """
    stats = TokenizeStats(records=len(records))
    examples: list[SFTExample] = []
    for prompt, completion in records:
        ids, prompt_len, fallback = encode_sft_record(tokenizer, prompt, completion)
        stats.prefix_fallback += int(fallback)
        if len(ids) > max_length:
            ids = ids[:max_length]
            stats.truncated += 1
        if completion_only_loss:
            labels = [IGNORE_INDEX] * min(prompt_len, len(ids)) + ids[prompt_len:]
        else:
            labels = list(ids)
        example = SFTExample(input_ids=ids, labels=labels)
        if example.num_trainable == 0:
            stats.dropped_no_trainable += 1
            continue
        examples.append(example)
        stats.tokens += example.length
        stats.trainable_tokens += example.num_trainable
    stats.examples = len(examples)
    return examples, stats


class SFTCollator:
    """Pads a list of examples on the right into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Right padding suits training: real tokens keep positions 0..n-1, so default position ids are right, and
    padded positions are masked out of attention and carry IGNORE_INDEX labels. (Generation wants left padding;
    that belongs to the PPO rollout code, not here.)
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[SFTExample]) -> dict[str, torch.Tensor]:
        import torch

        width = max(example.length for example in examples)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = example.length
            input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, *, rng: random.Random, chunk_batches: int = 16
) -> list[list[int]]:
    """Shuffle, then sort by length within chunks of ``chunk_batches * batch_size``, then shuffle the batches.

    Why: a batch is as wide as its longest member, so mixing a 20-token and a 500-token example wastes ~96% of
    the short one's compute on padding. Sorting the whole set would remove nearly all padding but make the
    order a function of length (all long examples together, at a fixed point of the lr schedule) and identical
    every epoch. Sorting only inside random chunks keeps most of the saving while batches still come from a
    fresh random mix each epoch, and shuffling the batch order removes the short-to-long drift within a chunk.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * chunk_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def split_micro_batches(batch: Sequence[int], accumulation_steps: int) -> list[list[int]]:
    """Split one optimizer step's examples into at most ``accumulation_steps`` micro-batches (none for none:
    a rank's share of a small last batch may be empty)."""
    if not batch:
        return []
    size = math.ceil(len(batch) / accumulation_steps)
    return [list(batch[i : i + size]) for i in range(0, len(batch), size)]


# --- preference pairs (reward model, DPO)


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: list[Message]
    chosen: str
    rejected: str
    group: Any = None
    """Pairs expanded from one ranking share a group (service/core/ranking.py); None for plain pairs."""


def _check_messages(value: list[Any], line: int, field: str) -> list[Message]:
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _bad(line, f"{field}[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise _bad(line, f"{field}[{i}] needs string 'role' and 'content'")
        messages.append({"role": role, "content": content})
    return messages


def _response_text(value: Any, line: int, field: str) -> str:
    """A response is a string or a list of assistant messages; a list counts as its contents joined by
    newlines, which is also how the upload validator reads it (one answer, one loss boundary)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and value:
        messages = _check_messages(value, line, field)
        if any(m["role"] != "assistant" for m in messages):
            raise _bad(line, f"'{field}' messages must all be the assistant's")
        text = "\n".join(m["content"] for m in messages)
    else:
        raise _bad(line, f"'{field}' must be a string or a non-empty list of assistant messages")
    if not text.strip():
        raise _bad(line, f"'{field}' is empty")
    return text


def parse_preference_record(record: Any, line: int) -> PreferenceRecord:
    """``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``."""
    if not isinstance(record, dict):
        raise _bad(line, "a record must be a JSON object")
    if any(name not in record for name in ("prompt", "chosen", "rejected")):
        raise _bad(line, "expected 'prompt', 'chosen' and 'rejected'")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _bad(line, "'prompt' is empty")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = _check_messages(prompt, line, "prompt")
        if messages[-1]["role"] != "user":
            raise _bad(line, "the prompt's last message must be the user's")
    else:
        raise _bad(line, "'prompt' must be a string or a non-empty list of messages")
    chosen = _response_text(record["chosen"], line, "chosen")
    rejected = _response_text(record["rejected"], line, "rejected")
    return PreferenceRecord(prompt=messages, chosen=chosen, rejected=rejected, group=record.get("group"))


def read_preference_records(path: str | Path) -> list[PreferenceRecord]:
    return read_jsonl(path, parse_preference_record, kind="preference")


@dataclass(frozen=True)
class PreferenceExample:
    """One pair, each side tokenised like an SFT example: ``labels`` mask the prompt (IGNORE_INDEX)."""

    chosen: SFTExample
    rejected: SFTExample
    group: Any = None


@dataclass
class PreferenceStats:
    records: int = 0
    pairs: int = 0
    truncated: int = 0  # pairs with either side cut (prompt from the left, response from the right)
    dropped: int = 0  # pairs left with no response tokens on a side, or with identical sides
    prefix_fallback: int = 0
    tokens: int = 0


def _encode_side(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[Message],
    response: str,
    *,
    max_length: int,
    max_prompt_length: int | None,
) -> tuple[SFTExample, bool, bool]:
    """(example, truncated, prefix fallback). The prompt/response boundary is SFT's (encode_sft_record)."""
    ids, prompt_len, fallback = encode_sft_record(tokenizer, prompt, response)
    truncated = False
    if max_prompt_length is not None and prompt_len > max_prompt_length:
        # Keep the prompt's end: the latest turn and the assistant header are what the answer follows.
        ids = ids[prompt_len - max_prompt_length :]
        prompt_len = max_prompt_length
        truncated = True
    if len(ids) > max_length:
        ids = ids[:max_length]
        truncated = True
    labels = [IGNORE_INDEX] * min(prompt_len, len(ids)) + ids[prompt_len:]
    return SFTExample(input_ids=ids, labels=labels), truncated, fallback


def tokenize_preference(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[PreferenceRecord],
    *,
    max_length: int,
    max_prompt_length: int | None = None,
) -> tuple[list[PreferenceExample], PreferenceStats]:
    """Tokenise each side as ``prompt + response`` (chat template when the tokenizer has one).

    ``max_prompt_length`` cuts the prompt from the left first; then each side is cut from the right to
    ``max_length``. A pair whose response is cut away on either side, or whose two sides end up identical, can
    teach nothing and is dropped (counted).
    """
    stats = PreferenceStats(records=len(records))
    examples: list[PreferenceExample] = []
    for record in records:
        chosen, cut_c, fb_c = _encode_side(
            tokenizer,
            record.prompt,
            record.chosen,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        rejected, cut_r, fb_r = _encode_side(
            tokenizer,
            record.prompt,
            record.rejected,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        stats.prefix_fallback += int(fb_c or fb_r)
        stats.truncated += int(cut_c or cut_r)
        if not chosen.num_trainable or not rejected.num_trainable or chosen.input_ids == rejected.input_ids:
            stats.dropped += 1
            continue
        examples.append(PreferenceExample(chosen=chosen, rejected=rejected, group=record.group))
        stats.tokens += chosen.length + rejected.length
    stats.pairs = len(examples)
    return examples, stats


def collate_pairs(pairs: Sequence[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch: rows ``[0, n)`` are the chosen sides, rows ``[n, 2n)`` the rejected ones.

    Both sides of a pair go through the same forward pass, so they see the same dropout mask statistics and
    the same weights, and the model runs once per step instead of twice.
    """
    return SFTCollator(pad_token_id)([p.chosen for p in pairs] + [p.rejected for p in pairs])


def holdout_split(n: int, fraction: float, *, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) index lists: a seeded permutation, the first ``round(n * fraction)`` held out.

    With a positive fraction at least one item is held out and at least one kept for training (n >= 2).
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if fraction > 0 and n >= 2:
        n_eval = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def grouped_holdout_split(
    groups: Sequence[Any], fraction: float, *, seed: int
) -> tuple[list[int], list[int]]:
    """:func:`holdout_split` over whole groups: pairs from one ranking are all held out or all trained on, so a
    held-out pair never shares its prompt and answers with training pairs (that would flatter the accuracy).

    Pairs without a group (None) are groups of their own, so plain preference data splits exactly as
    :func:`holdout_split` does.
    """
    keys: dict[Any, list[int]] = {}
    for index, group in enumerate(groups):
        keys.setdefault(("pair", index) if group is None else ("group", group), []).append(index)
    members = list(keys.values())
    train, held = holdout_split(len(members), fraction, seed=seed)
    return sorted(i for k in train for i in members[k]), sorted(i for k in held for i in members[k])
