"""One chat completion: the ``chat`` method, the job behind ``POST /openai/v1/chat/completions`` (docs/openai.md).

The messages go through the base model's chat template with the assistant header (``rollout.encode_prompt``,
as SFT trains on them; plain ``role: content`` lines for a tokenizer without a template). The policy (the base,
or the base with ``init_adapter``: a fine-tuned model) samples ``n`` completions in one batch, the prompt
prefilled once (``rollout.sample_responses``): greedy at temperature 0, else softmax(logits / T) with top-p,
from a generator seeded with the job's seed.

A completion ends at an EOS id (the tokenizer's and those of the model's generation_config.json), at the first
stop text (left out of it), or after ``max_tokens`` tokens (``finish_reason`` "length"). Its text is decoded
incrementally (:class:`ChoiceText`), so the text a stream has shown only ever grows, and a streamed and an
unstreamed completion of the same request are the same string.

The runner hears of it through ``chat`` lines (contract/protocol.py) carrying each choice's whole text so far:
one once the prompt is accepted and the model loaded, then at most every :data:`REPORT_SECONDS` while
sampling, and the final one. A request the model cannot take is refused with a code the facade answers as a
400: ``context_length_exceeded`` (the prompt and ``max_tokens`` overflow the model's context) and
``invalid_messages`` (the chat template refused the messages).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jinja2.exceptions import TemplateError
from pydantic import ValidationError

from contract.hyperparameters import (
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_MESSAGES,
    MAX_CHAT_TOKENS,
    ChatHyperparameters,
    LoraSettings,
)
from contract.protocol import ProgressWriter
from workers.training import lora, rollout
from workers.training.context import RunContext
from workers.training.errors import INVALID_HYPERPARAMETERS, INVALID_SPEC, TrainingError
from workers.training.generate import load_sampler
from workers.training.ppo import choose_pad_token_id

STAGE = "chat"
# The child's reports while it samples: each is a database write in the runner, and the facade polls about
# twice as often, so a stream gets the text generated in about this long per chunk.
REPORT_SECONDS = 0.2
# Where config.json keeps the context length, by architecture family (Llama-likes, GPT-2, others).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ChoiceText:
    """One completion's text, decoded token by token as streaming servers do it.

    The tokens since ``_prefix`` are decoded, and what they add beyond the text of the tokens up to ``_read``
    is appended, unless it ends in U+FFFD (a character whose bytes are not all sampled yet), which waits for
    the next token. Text is only ever appended, and cut once, at the first stop text; :attr:`shown` holds back
    an end that could still become a stop text, so what a stream has sent is always a prefix of the result.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self._decode = decode
        self._stops = list(stops)
        self._longest_stop = max((len(stop) for stop in self._stops), default=0)
        self._ids: list[int] = []
        self._prefix = self._read = 0
        self.text = ""
        self.sampled = 0  # tokens sampled for this choice, its EOS included (usage.completion_tokens)
        self.finish_reason: str | None = None

    def push(self, token: int, *, eos: bool) -> None:
        if self.finish_reason is not None:  # its batch row samples on until every row has ended
            return
        self.sampled += 1
        if eos:
            self.end("stop")
            return
        self._ids.append(token)
        self._advance(final=False)

    def end(self, reason: str) -> None:
        """Finish with ``reason`` (EOS: "stop"; out of tokens: "length"), decoding what was held back."""
        if self.finish_reason is None:
            self._advance(final=True)
        if self.finish_reason is None:  # the flushed text may hold a stop text, which then is the reason
            self.finish_reason = reason

    def _advance(self, *, final: bool) -> None:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return
        searched_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        found = [at for at in (self.text.find(stop, searched_from) for stop in self._stops) if at >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.finish_reason = "stop"

    @property
    def shown(self) -> str:
        """The text a reader may see now: all of it once finished, else without an end that a stop text
        could start with (it may yet be cut)."""
        if self.finish_reason is not None:
            return self.text
        for size in range(min(self._longest_stop - 1, len(self.text)), 0, -1):
            if any(stop.startswith(self.text[-size:]) for stop in self._stops):
                return self.text[:-size]
        return self.text


class Completion:
    """The ``n`` choices of one request, fed a step's tokens at a time by ``rollout.sample_responses``."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        *,
        n: int,
        stops: Sequence[str],
        eos_ids: set[int],
        max_tokens: int,
        prompt_tokens: int,
    ) -> None:
        self.choices = [ChoiceText(decode, stops) for _ in range(n)]
        self.eos_ids = eos_ids
        self.max_tokens = max_tokens
        self.prompt_tokens = prompt_tokens

    def on_tokens(self, tokens: Sequence[int]) -> list[bool]:
        """Take one sampled token per choice (ended choices ignore theirs); which choices have ended."""
        for choice, token in zip(self.choices, tokens, strict=True):
            if choice.finish_reason is None:
                choice.push(token, eos=token in self.eos_ids)
                if choice.finish_reason is None and choice.sampled >= self.max_tokens:
                    choice.end("length")
        return [choice.finish_reason is not None for choice in self.choices]

    def finish(self) -> None:
        for choice in self.choices:
            choice.end("length")

    def report(self) -> dict[str, Any]:
        """The ``chat`` line's fields: each choice's text so far, and the token counts."""
        completion_tokens = sum(choice.sampled for choice in self.choices)
        return {
            "choices": [
                {"index": index, "text": choice.shown, "finish_reason": choice.finish_reason}
                for index, choice in enumerate(self.choices)
            ],
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens,
            },
        }


def context_length(model_path: str) -> int | None:
    """The model's context in tokens as its config.json gives it; None when it does not say."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading the model says what is wrong with it
    for key in _CONTEXT_KEYS:
        value = config.get(key, (config.get("text_config") or {}).get(key))
        if type(value) is int and value > 0:
            return value
    return None


def token_budget(prompt_tokens: int, asked: int | None, context: int | None) -> int:
    """How many tokens a completion may take: ``max_tokens`` as asked, refused when the prompt and it overflow
    the context; unasked, what the context leaves after the prompt (at most MAX_CHAT_TOKENS)."""
    if context is None:
        return asked or MAX_CHAT_TOKENS
    room = context - prompt_tokens
    if (asked or 1) > room:
        wanted = f"max_tokens asks for {asked} more" if asked else "no room is left for an answer"
        raise TrainingError(
            CONTEXT_LENGTH_EXCEEDED,
            f"This model's context is {context} tokens: the messages take {prompt_tokens} and {wanted}. "
            "Shorten the messages or lower max_tokens.",
        )
    return asked or min(room, MAX_CHAT_TOKENS)


def eos_ids(tokenizer: Any, model_path: str) -> set[int]:
    """The ids that end an answer: the tokenizer's EOS and the model's generation_config.json ``eos_token_id``
    (chat models often end a turn with a token of their own, e.g. Llama 3's <|eot_id|>)."""
    if tokenizer.eos_token_id is None:
        raise TrainingError(INVALID_SPEC, "the tokenizer has no EOS token; answers could never end")
    ids = {int(tokenizer.eos_token_id)}
    try:
        config = json.loads((Path(model_path) / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ids
    extra = config.get("eos_token_id") if isinstance(config, dict) else None
    ids.update(value for value in (extra if isinstance(extra, list) else [extra]) if type(value) is int)
    return ids


def encode_messages(tokenizer: Any, hp: ChatHyperparameters) -> list[int]:
    messages = [{"role": message.role, "content": message.content} for message in hp.messages]
    try:
        return rollout.encode_prompt(tokenizer, messages)
    except (TemplateError, ValueError) as exc:  # e.g. a template that wants user and assistant to alternate
        raise TrainingError(
            INVALID_MESSAGES, f"the base model's chat template refused the messages: {exc}"
        ) from None


class _Reporter:
    """Sends the completion so far as a ``chat`` line when it changed and REPORT_SECONDS have passed."""

    def __init__(self, progress: ProgressWriter, completion: Completion) -> None:
        self.progress = progress
        self.completion = completion
        self.sent: dict[str, Any] | None = None
        self.at = 0.0

    def send(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.at < REPORT_SECONDS:
            return
        report = self.completion.report()
        if force or report["choices"] != (self.sent or {}).get("choices"):
            self.progress.chat(**report)
            self.sent, self.at = report, time.monotonic()


def run(ctx: RunContext) -> None:
    spec, progress = ctx.spec, ctx.progress
    try:
        hp = ChatHyperparameters.model_validate(spec.hyperparameters)
        lora_settings = LoraSettings.model_validate(spec.lora)
    except ValidationError as exc:
        raise TrainingError(INVALID_HYPERPARAMETERS, f"invalid chat settings: {exc}") from None
    base = spec.base_model.path
    tokenizer = lora.load_tokenizer(base)
    prompt = encode_messages(tokenizer, hp)
    max_tokens = token_budget(len(prompt), hp.max_tokens, context_length(base))
    ends = eos_ids(tokenizer, base)
    eos = int(tokenizer.eos_token_id)
    pad = choose_pad_token_id(tokenizer, eos)
    step, device = load_sampler(spec, lora_settings, progress, stage=STAGE)
    completion = Completion(
        lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
        n=hp.n,
        stops=hp.stop,
        eos_ids=ends,
        max_tokens=max_tokens,
        prompt_tokens=len(prompt),
    )
    reporter = _Reporter(progress, completion)
    reporter.send(force=True)  # the prompt is accepted: the facade may start a stream now

    def on_token(tokens: torch.Tensor) -> torch.Tensor:
        ended = completion.on_tokens([int(token) for token in tokens.tolist()])
        reporter.send()
        return torch.tensor(ended, dtype=torch.bool, device=tokens.device)

    ids, mask = rollout.left_pad([prompt], pad)
    started = time.perf_counter()
    rollout.sample_responses(
        step,
        ids.to(device),
        mask.to(device),
        max_new_tokens=max_tokens,
        temperature=hp.temperature,
        top_p=hp.top_p,
        eos_token_id=eos,
        pad_token_id=pad,
        generator=torch.Generator(device=device).manual_seed(spec.seed),
        group_size=hp.n,
        on_token=on_token,
    )
    completion.finish()
    reporter.send(force=True)
    seconds = time.perf_counter() - started
    tokens = completion.report()["usage"]["completion_tokens"]
    progress.event(
        f"{hp.n} completion(s) of a {len(prompt)}-token prompt: {tokens} tokens in {seconds:.2f} s "
        f"({tokens / max(seconds, 1e-9):.1f} tokens/s) on {device.type}",
        stage=STAGE,
    )
