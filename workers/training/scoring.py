"""Model-backed grading in the child: one base model, every adapter the graders need on it.

:class:`SharedModels` holds the base loaded once and wrapped once in a ``PeftModel``; candidate and judge
adapters are frozen named adapters on it, and each reward model is its LoRA adapter plus its ``score`` head
(loaded as PPO loads its reward model, ``ppo.load_scalar_adapter``). :class:`ChildScorer` implements
``contract.grading.ModelScorer`` with them:

- ``reward_model`` graders: ``(prompt, response)`` tokenised as the reward trainer tokenises one side of a
  pair (``data.encode_sft_record``: the chat template when the tokenizer has one), run through the body with
  the reward adapter active, the head applied at the last real token. The score is the head's raw scalar.
- ``score_model`` graders: the judge (the base with adapters disabled when ``model`` is the job's base model,
  else the named adapter) reads the rendered messages (``developer`` turns become ``system`` turns for chat
  templates), answers greedily (or sampled, seeded, when its ``sampling_params.temperature`` is above 0) up to
  ``max_completions_tokens`` (default 16) tokens, and the first number in its answer is the score. An answer
  with no number is a grading error (score 0, recorded). Judges grade one answer at a time (pointwise): a
  candidate's answer is never shown beside another's, so the order of two answers cannot bias the judge.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel, get_peft_model

from contract.graders import RewardModelGrader, ScoreModelGrader
from contract.hyperparameters import LoraSettings
from workers.training import data, lora, rollout
from workers.training.errors import INVALID_ADAPTER, INVALID_SPEC, TrainingError
from workers.training.ppo import choose_pad_token_id, load_scalar_adapter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

JUDGE_MAX_TOKENS = 16
_FIRST_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
# peft needs one adapter to build a PeftModel; this one is never activated (LoRA B starts at 0 anyway).
_PLACEHOLDER = "placeholder"


@dataclass
class SharedModels:
    """The base (``model``, a PeftModel when any adapter is loaded) and the names of what is on it."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    eos_token_id: int
    pad_token_id: int
    adapters: dict[str, str] = field(default_factory=dict)  # artifact id -> adapter name
    reward_heads: dict[str, tuple[str, torch.nn.Linear]] = field(default_factory=dict)  # artifact id -> ...

    @contextmanager
    def active(self, artifact_id: str | None) -> Iterator[None]:
        """Run the block as the base (``None``) or the base with the adapter of ``artifact_id``."""
        if not isinstance(self.model, PeftModel):  # nothing but the base was loaded
            yield
            return
        name = None if artifact_id is None else self.adapters.get(artifact_id) or artifact_id
        with lora.use_adapter(self.model, name):
            yield

    def body(self) -> torch.nn.Module:
        inner: Any = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        body: torch.nn.Module = getattr(inner, inner.base_model_prefix)
        return body

    def step(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """One KV-cached decoding step for ``rollout.sample_responses`` (whatever adapter is active)."""
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        return out.logits[:, -1], out.past_key_values


def _causal_placeholder(base: torch.nn.Module) -> PeftModel:
    config = lora.lora_config(LoraSettings(r=1, alpha=1))
    return get_peft_model(base, config, adapter_name=_PLACEHOLDER)


def load_shared_models(
    base_path: str,
    *,
    adapters: Mapping[str, str],
    reward_models: Mapping[str, str],
    device: torch.device,
    precision: str = "auto",
) -> SharedModels:
    """The base once, ``adapters`` (artifact id -> folder) as frozen adapters and ``reward_models`` (artifact
    id -> folder) as adapters with their heads, all on that one base."""
    tokenizer = lora.load_tokenizer(base_path)
    if tokenizer.eos_token_id is None:
        raise TrainingError(INVALID_ADAPTER, "the tokenizer has no EOS token; answers could never end")
    eos = int(tokenizer.eos_token_id)
    base = lora.load_base_model(base_path, device=device, precision=precision)
    base.eval()
    shared = SharedModels(
        model=base,
        tokenizer=tokenizer,
        device=device,
        eos_token_id=eos,
        pad_token_id=choose_pad_token_id(tokenizer, eos),
    )
    if not adapters and not reward_models:
        return shared
    model = _causal_placeholder(base)
    for artifact_id, folder in adapters.items():
        lora.add_frozen_adapter(model, artifact_id, folder)
        shared.adapters[artifact_id] = artifact_id
    for artifact_id, folder in reward_models.items():
        name = f"reward_{artifact_id}"
        head = load_scalar_adapter(model, folder, name, trainable=False).to(device)
        shared.reward_heads[artifact_id] = (name, head)
    model.requires_grad_(False)
    model.eval()
    shared.model = model
    return shared


def _messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError("the prompt must be a string or a list of {role, content} messages")


class ChildScorer:
    """``contract.grading.ModelScorer`` on :class:`SharedModels` (see the module docstring)."""

    def __init__(self, models: SharedModels, *, base_model_id: str, seed: int) -> None:
        self.models = models
        self.base_model_id = base_model_id
        self.seed = seed

    def score_reward_model(self, grader: RewardModelGrader, *, prompt: Any, response: str) -> float:
        return reward_of(self.models, grader.artifact, prompt=prompt, response=response)

    def score_judge(self, grader: ScoreModelGrader, messages: list[dict[str, str]]) -> float:
        params = grader.sampling_params
        answer = judge_answer(
            self.models,
            messages,
            judge=None if grader.model == self.base_model_id else grader.model,
            max_new_tokens=(params.max_completions_tokens if params else None) or JUDGE_MAX_TOKENS,
            temperature=params.temperature if params is not None and params.temperature else 0.0,
            top_p=(params.top_p if params else None) or 1.0,
            seed=params.seed if params is not None and params.seed is not None else self.seed,
        )
        number = first_number(answer)
        if number is None:
            raise ValueError(f"the judge's answer has no number: {answer[:120]!r}")
        return number


@torch.no_grad()
def reward_of(models: SharedModels, artifact_id: str, *, prompt: Any, response: str) -> float:
    """The reward model ``artifact_id``'s scalar for ``(prompt, response)``, tokenised as in its training."""
    name, head = models.reward_heads[artifact_id]
    ids, _, _ = data.encode_sft_record(models.tokenizer, _messages(prompt), response)
    input_ids = torch.tensor([ids], device=models.device)
    mask = torch.ones_like(input_ids)
    with lora.use_adapter(models.model, name):  # type: ignore[arg-type]
        hidden = models.body()(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=lora.position_ids_from_mask(mask),
            use_cache=False,
        ).last_hidden_state
    return float(head(hidden[0, -1].float()).item())


@torch.no_grad()
def rewards_of(
    models: SharedModels,
    artifact_id: str,
    examples: list[tuple[Any, str]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[float]:
    """:func:`reward_of` for many ``(prompt, response)`` at once: right-padded batches, each row's reward read
    at its last real token (causal attention: the padding after it changes nothing), longer rows keeping
    their end. The same numbers as one at a time, up to float rounding, at a fraction of the calls."""
    name, head = models.reward_heads[artifact_id]
    encoded = [data.encode_sft_record(models.tokenizer, _messages(p), r)[0] for p, r in examples]
    if max_length is not None:
        encoded = [ids[-max_length:] for ids in encoded]
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start : start + batch_size]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), models.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        input_ids, mask = input_ids.to(models.device), mask.to(models.device)
        with lora.use_adapter(models.model, name):  # type: ignore[arg-type]
            hidden = models.body()(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=lora.position_ids_from_mask(mask),
                use_cache=False,
            ).last_hidden_state
        last = hidden[torch.arange(len(rows), device=hidden.device), lora.last_token_index(mask)]
        out += [float(x) for x in head(last.float()).reshape(-1).tolist()]
    return out


def _judge_prompt_ids(
    models: SharedModels, messages: list[dict[str, str]], max_prompt_tokens: int | None
) -> list[int]:
    """The judge's prompt (``developer`` turns as ``system``), cut from the left to ``max_prompt_tokens``:
    the question is at the end, so the rubric is cut first."""
    turns = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    prompt_ids = rollout.encode_prompt(models.tokenizer, turns)
    if max_prompt_tokens is not None and len(prompt_ids) > max_prompt_tokens:
        prompt_ids = prompt_ids[-max_prompt_tokens:]
    return prompt_ids


@torch.no_grad()
def judge_answer(
    models: SharedModels,
    messages: list[dict[str, str]],
    *,
    judge: str | None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
) -> str:
    """The judge's answer to ``messages`` (``developer`` turns as ``system``): the base when ``judge`` is
    None, else the base with that adapter; greedy at temperature 0, else sampled from ``seed``."""
    prompt_ids = _judge_prompt_ids(models, messages, max_prompt_tokens)
    generator = torch.Generator(device=models.device).manual_seed(seed)
    ids, mask = rollout.left_pad([prompt_ids], models.pad_token_id)
    with models.active(judge):
        raw = rollout.sample_responses(
            models.step,
            ids.to(models.device),
            mask.to(models.device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=models.eos_token_id,
            pad_token_id=models.pad_token_id,
            generator=generator,
        )
    tokens, response_mask, _ = rollout.truncate_after_eos(raw, models.eos_token_id, models.pad_token_id)
    length = int(response_mask[0].sum())
    return str(models.tokenizer.decode(tokens[0, :length].tolist(), skip_special_tokens=True))


def _first_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The single tokens an answer ``text`` can start with: the bare text and the space-led one, where the
    tokenizer has each as one token (a template may or may not leave a space before the answer)."""
    found = []
    for variant in (text, " " + text):
        ids = tokenizer.encode(variant, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in found:
            found.append(ids[0])
    if not found:
        raise TrainingError(
            INVALID_SPEC, f"verdict 'logprobs': the judge's tokenizer has no single token for {text!r}"
        )
    return found


@torch.no_grad()
def answer_log_odds(
    models: SharedModels,
    messages: list[dict[str, str]],
    *,
    judge: str | None,
    choices: tuple[str, str] = ("1", "2"),
    max_prompt_tokens: int | None = None,
) -> float:
    """log P(answer starts with choices[0]) - log P(... choices[1]) under the judge, from one forward of the
    prompt (no generation): what a greedy judge leans to, as a number that can be compared across orders."""
    prompt_ids = _judge_prompt_ids(models, messages, max_prompt_tokens)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=models.device)
    with models.active(judge):  # the head at the last position only: the answer's first token is all we read
        logits = models.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    first, second = (
        torch.logsumexp(logprobs[_first_tokens(models.tokenizer, choice)], dim=0) for choice in choices
    )
    return float(first - second)


def first_number(answer: str) -> float | None:
    """The first number in a judge's answer (how judges answer in alignd), None when there is none."""
    found = _FIRST_NUMBER.search(answer)
    return None if found is None else float(found.group(0))
