"""PPO rollout pieces that are pure tensor work: prompts, left padding, sampling, masks, GAE.

Kept apart from :mod:`workers.training.ppo` (which owns the models and the loop) so that each detail that
makes PPO on language models work is a small function with its own unit test:

- prompts are **left**-padded, so every row's last prompt token sits in the same column and generation
  appends in lock-step; the pad token must differ from EOS, otherwise a pad cannot be told from an ended
  answer (the masks below never look at pad ids anyway, they come from the EOS position);
- position ids come from the attention mask (``cumsum - 1``) in every forward, so a left-padded row sees the
  same positions as the unpadded sequence;
- a response ends at its first EOS: later tokens become padding and are masked everywhere;
- logits are divided by the sampling temperature before any log-softmax (rollout and training alike);
- GAE runs over masked rewards and values, and advantages are whitened over valid tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workers.training.data import read_jsonl
from workers.training.errors import INVALID_DATASET, TrainingError

# Positions counted over real tokens only (cumsum - 1): a left-padded row sees the same positions as the
# unpadded sequence. Shared with the other trainers.
from workers.training.lora import position_ids_from_mask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]


# --- prompts


def _bad(line: int, message: str) -> TrainingError:
    return TrainingError(INVALID_DATASET, f"line {line}: {message}")


def parse_prompt_record(record: Any, line: int) -> list[Message]:
    """``{"prompt": str | messages}`` or ``{"messages": [...]}`` ending with the user's turn -> messages."""
    if not isinstance(record, dict):
        raise _bad(line, "a record must be a JSON object")
    if "prompt" in record and "messages" in record:
        raise _bad(line, "has both 'prompt' and 'messages'; use one form per record")
    value = record.get("prompt", record.get("messages"))
    if isinstance(value, str):
        if not value.strip():
            raise _bad(line, "'prompt' is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _bad(line, "expected 'prompt' (a string or messages) or 'messages'")
    messages: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _bad(line, f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise _bad(line, f"messages[{i}] needs string 'role' and 'content'")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise _bad(line, "the last message must be the user's (the model answers next)")
    return messages


def read_prompt_records(path: str | Path) -> list[list[Message]]:
    return read_jsonl(path, parse_prompt_record, kind="prompts")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids the policy continues: the chat template with the assistant header, or the plain text.

    Same conventions as SFT (:func:`workers.training.data.encode_sft_record`), so a policy initialised from
    an SFT adapter sees prompts exactly as it was trained on them.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert isinstance(text, str)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(messages) == 1 and messages[0]["role"] == "user":
        text = messages[0]["content"]
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[list[Message]], *, max_length: int
) -> tuple[list[list[int]], int]:
    """Encode every prompt; cut longer ones from the **left** to ``max_length`` (the end of a prompt, with
    the assistant header, is what the answer follows). Returns (ids per prompt, how many were cut)."""
    encoded: list[list[int]] = []
    truncated = 0
    for messages in records:
        ids = encode_prompt(tokenizer, messages)
        if len(ids) > max_length:
            ids = ids[-max_length:]
            truncated += 1
        encoded.append(ids)
    return encoded, truncated


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the left so that every row ends in the last column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


# --- responses


def truncate_after_eos(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first EOS.

    Returns (responses with every token after the first EOS replaced by the pad id, response mask with 1 up to
    and including the EOS, and whether each response has an EOS at all). A response without an EOS keeps all
    its tokens: it was cut by ``max_new_tokens`` and pays the missing-EOS penalty.
    """
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(dim=-1)
    width = responses.size(1)
    # Index of the first EOS, or the width when there is none.
    first = torch.where(
        has_eos, is_eos.long().argmax(dim=-1), torch.full_like(has_eos, width, dtype=torch.long)
    )
    columns = torch.arange(width, device=responses.device).unsqueeze(0)
    mask = (columns <= first.unsqueeze(1)).long()
    return responses.masked_fill(mask == 0, pad_token_id), mask, has_eos


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of tokens whose probability reaches ``top_p`` (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach top_p (so the one that crosses is kept).
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def expand_for_group(
    logits: torch.Tensor, cache: Any, attention: torch.Tensor, positions: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
    """Repeat each row ``group_size`` times (row b -> rows b*G .. b*G+G-1): the last logits, the KV cache (a
    transformers ``Cache``, repeated in place), the attention mask and the positions."""
    cache.batch_repeat_interleave(group_size)
    return (
        logits.repeat_interleave(group_size, dim=0),
        cache,
        attention.repeat_interleave(group_size, dim=0),
        positions.repeat_interleave(group_size, dim=0),
    )


class StopStrings:
    """Stop sequences, checked on the decoded tail of each unfinished answer after every sampled token.

    A stop string may span tokens, so the check decodes the answer's last ``window`` tokens: a string of n
    UTF-8 bytes spans at most n tokens (each token is at least one byte), plus one leading token so that a
    tokenizer's quirks at the start of a slice (a dropped leading space, half a character) never touch the
    match. Special tokens are skipped in the text, as in the text graders see. The first step whose tail
    contains a stop string ends the answer; the sampler then appends EOS after that token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, strings: Sequence[str]) -> None:
        if not strings or any(not s for s in strings):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.strings = tuple(strings)
        self.window = max(len(s.encode("utf-8")) for s in self.strings) + 1

    def hits(self, tail: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Which of ``rows`` (bool, (B,)) have a stop string in the text of ``tail`` ((B, <= window) tokens)."""
        found = torch.zeros_like(rows)
        index = rows.nonzero().flatten().tolist()
        if not index:
            return found
        texts = self.tokenizer.batch_decode(tail[index].tolist(), skip_special_tokens=True)
        for row, text in zip(index, texts, strict=True):
            if any(s in text for s in self.strings):
                found[row] = True
        return found

    def cut(self, text: str) -> str:
        """The answer's text before its first stop string (OpenAI leaves the stop sequence out too)."""
        ends = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[: min(ends)] if ends else text


def close_stopped(
    tokens: torch.Tensor, ends: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> torch.Tensor:
    """Put EOS right after each stopped answer's last token (``ends``: its index, -1 for answers not stopped),
    widening by one column when an answer stopped at the last one."""
    stopped = ends >= 0
    if not bool(stopped.any()):
        return tokens
    if int(ends.max()) + 1 >= tokens.size(1):
        tokens = torch.cat([tokens, tokens.new_full((tokens.size(0), 1), pad_token_id)], dim=1)
    rows = stopped.nonzero().flatten()
    tokens[rows, ends[rows] + 1] = eos_token_id
    return tokens


# A step function of the model: (input_ids, attention_mask, position_ids, cache) -> (last logits, cache).
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, Any]]


@torch.no_grad()
def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row (B, V) -> (B,), drawn with probability ``probs`` (rows need not sum to exactly 1).

    By the inverse of the cumulative distribution: one uniform number per row, placed among the running sums.
    ``torch.multinomial`` draws an exponential number for every vocabulary entry instead: measured 7.2 ms a
    call on 8 x 49,152 probabilities, a tenth of a SmolLM2 decoding step on 2 cores. A token of probability 0
    (cut by top-p) adds nothing to the running sum and so can never be drawn.
    """
    cdf = probs.cumsum(dim=-1)
    device = generator.device if generator is not None else probs.device
    uniform = torch.rand(probs.size(0), 1, generator=generator, device=device, dtype=cdf.dtype)
    uniform = uniform.to(probs.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, uniform, right=True).squeeze(1)
    return token.clamp_(max=probs.size(-1) - 1)  # a uniform rounded up to the total lands past the end


def sample_responses(
    step: StepFn,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    group_size: int = 1,
    stop: StopStrings | None = None,
    on_token: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    finished_everywhere: Callable[[bool], bool] | None = None,
    entropies: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """KV-cached batched sampling from left-padded prompts; returns the raw responses (B, <= max_new_tokens).

    ``step`` runs the model on the new tokens with the cache of the previous call and returns the logits of
    the last position. The whole batch advances one token per call; rows that have emitted EOS keep going (the
    batch is a rectangle) but their tokens become pads, and the loop stops as soon as every row has ended.
    Sampling is from ``softmax(logits / temperature)`` (then top-p), the same distribution whose log-probs the
    trainer recomputes, so the PPO ratio starts at exactly 1. ``temperature=0`` is greedy decoding: the most
    likely token every step (the lowest id on a tie, as ``argmax`` picks), no randomness drawn.

    ``group_size`` G > 1 answers each prompt G times (GRPO's groups): the result has B * G rows, rows
    ``b * G .. b * G + G - 1`` answering prompt ``b``. The prompts are prefilled once; the cache, the last logits,
    the mask and the positions are then repeated G times (:func:`expand_for_group`), and the G continuations
    sample independently from there. With G = 1 nothing changes.

    ``stop``: an answer whose decoded tail comes to contain a stop string ends after the token that completed
    it, and EOS is appended there (:func:`close_stopped`), so the answer reads as ended downstream; an answer
    that stopped at the last step gets the one extra column (B, max_new_tokens + 1).

    ``on_token`` sees each step's tokens (B,) as they are sampled (ended rows already padded) and may return a
    bool mask (B,) of rows to end there as if they had emitted EOS: a chat job streams each row's text as it
    grows and cuts it at a stop text (workers/training/chat.py), which ``stop`` does not, and ends rows at
    its model's extra EOS ids.

    ``finished_everywhere`` (fsdp, workers/training/sharding.py) turns "every row here has ended" into "every
    row on every rank has": each step's forward is a collective there, so a rank whose answers all ended keeps
    stepping (its new tokens are pads) until the others' have too.

    ``entropies``, when given, gets each step's entropy (B,) of ``softmax(logits / temperature)``, before
    top-p: the sampling policy's entropy at each answer position, the one the trainer's forward would compute
    (GRPO logs it for the answers its training pass leaves out). Nothing is appended when greedy.
    """
    batch = prompt_ids.size(0) * group_size
    attention = prompt_mask.long()
    positions = position_ids_from_mask(attention)
    next_input = prompt_ids
    cache: Any = None
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    ends = torch.full((batch,), -1, dtype=torch.long, device=prompt_ids.device)  # where a stop string ended
    tail = prompt_ids.new_empty((batch, 0))
    tokens: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        logits, cache = step(next_input, attention, positions, cache)
        if group_size > 1 and not tokens:  # after the one prefill: G continuations of each prompt
            logits, cache, attention, positions = expand_for_group(
                logits, cache, attention, positions, group_size
            )
        if temperature == 0:
            token = logits.float().argmax(dim=-1)
        else:
            logits = logits.float() / temperature
            if entropies is not None:
                entropies.append(entropy_from_logits(logits))
            if top_p < 1.0:
                logits = _top_p_filter(logits, top_p)
            token = sample_from_probs(logits.softmax(dim=-1), generator)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        finished |= token == eos_token_id
        if stop is not None:
            tail = torch.cat([tail, token.unsqueeze(1)], dim=1)[:, -stop.window :]
            hit = stop.hits(tail, ~finished)
            ends = torch.where(hit, len(tokens) - 1, ends)
            finished |= hit
        if on_token is not None and (ended := on_token(token)) is not None:
            finished |= ended
        done = bool(finished.all())
        if done if finished_everywhere is None else finished_everywhere(done):
            break
        # Finished rows still attend to what they emit; nothing downstream reads their later positions.
        next_input = token.unsqueeze(1)
        positions = positions[:, -1:] + 1
        attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)
    return close_stopped(torch.stack(tokens, dim=1), ends, eos_token_id, pad_token_id)


# --- log-probs, KL, advantages


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under ``logits`` (already divided by the temperature), in fp32."""
    return torch.gather(logits.float().log_softmax(dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate of the policy from the reference, on the sampled tokens.

    k1 = log p - log q (unbiased, can be negative per token); k3 = (q/p - 1) - log(q/p) (unbiased, never
    negative, lower variance). See http://joschu.net/blog/kl-approx.html.
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over masked entries (unbiased variance, as TRL); masked entries come back as 0."""
    maskf = mask.to(values.dtype)
    count = maskf.sum()
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if count > 1:
        var = var * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * maskf


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    ``values[:, t]`` is V of the state before token t. Rewards and values are zeroed outside the mask, so the
    value after the last real token is 0 (the episode ends there) and padded steps add nothing. Returns
    (``advantages + values``) are the value targets; they too are 0 outside the mask.
    """
    maskf = mask.to(rewards.dtype)
    rewards = rewards * maskf
    values = values * maskf
    width = rewards.size(1)
    last = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * maskf
    return advantages, (advantages + values) * maskf


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor
    ratio: torch.Tensor  # per token, for statistics


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
) -> PolicyLoss:
    """PPO's clipped surrogate: mean over valid tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps))."""
    log_ratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(losses, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > losses).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approxkl=approxkl, ratio=ratio.detach())


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean over valid tokens of max((V - R)^2, (clip(V, V_old +- eps) - R)^2); returns (loss, clipfrac)."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((losses_clipped > losses).float(), mask)
    return loss, clipfrac
