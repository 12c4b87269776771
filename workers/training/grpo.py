"""GRPO and RLOO with LoRA: policy, reference and reward model on ONE copy of the base weights, no value model.

One update (:meth:`GroupTrainer.step`):

1. ``batch_size`` prompts, each answered ``num_generations`` (G) times by the policy: the prompts are prefilled
   once and their KV cache repeated G times (``rollout.sample_responses(group_size=G)``); answers end at
   their first EOS (later tokens are masked everywhere);
2. each answer is scored: the weighted sum of the ``graders`` (``contract.grading.grade``, the answer as the
   sample and the prompt's dataset row as the item) plus ``reward_model_weight`` times the job's reward model
   (its adapter and score head on the same base, scored by ``scoring.ChildScorer``), minus
   ``missing_eos_penalty`` for an answer cut by ``max_new_tokens``;
3. advantages from the group (:func:`group_advantages`): GRPO subtracts the group's mean, RLOO the mean of
   the *other* answers (leave-one-out); then ``scale_rewards`` divides by the group's or the batch's std. A
   group whose rewards are all equal gets advantage exactly 0 (and counts in ``frac_reward_zero_std``);
4. ``num_iterations`` optimizer steps on the answers with TRL's token-level clipped loss
   (:func:`token_losses`, averaged as ``loss_type`` says, :func:`aggregate_loss`). The importance ratio is
   against the policy that sampled: recomputed by the same forward on the same rows (so it is exactly 1 in the
   first iteration), or, with one iteration and no KL in the reward, the detached log-probs themselves.

KL to the reference (the base with the adapter disabled, or a frozen copy of ``init_adapter``), k3 per token:
GRPO adds ``beta * k3`` to each token's loss (TRL's GRPO); RLOO subtracts ``beta * sum(k3)`` from the answer's
reward before the baseline (the RLOO paper's and TRL's RLOO placement). With beta > 0 the KL is measured every
update; with beta 0 it is a metric only, and ``kl`` is logged on the updates the job asks for
(``kl_metric_steps``): the reference's no-grad forward is skipped on the others, as TRL skips it at beta 0.

The job around it (spec -> roles -> the shared loop -> the policy adapter) is ``grpo_job.py``, on
:class:`~workers.training.loop.Trainer` as PPO's ``ppo_job.PPOJob`` is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel

from contract.graders import RewardModelGrader, Sample
from contract.grading import ModelScorer, grade
from contract.hyperparameters import (
    REWARD_MODEL_SERIES,
    GroupHyperparameters,
)
from workers.training import activation_checkpointing, data, fused, kv_cache, lora, rollout, sharding
from workers.training.allocator import release_freed_memory
from workers.training.distributed import SINGLE, Dist
from workers.training.errors import (
    MODEL_LOAD_FAILED,
    TRAINING_DIVERGED,
    TrainingError,
)
from workers.training.scoring import SharedModels

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

POLICY_ADAPTER = lora.POLICY_ADAPTER
REFERENCE_ADAPTER = lora.REFERENCE_ADAPTER
REWARD_ADAPTER = "reward"
ROLES = ("policy", "reference", "reward")
STD_EPS = 1e-4  # TRL's: added to the std before dividing, so a tiny spread cannot blow advantages up


# --- pure pieces (each with its unit test)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, leave_one_out: bool, scale_rewards: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, whether each answer's group had all-equal rewards), rows grouped as ``b * G + g``.

    The baseline is the group's mean (GRPO) or the mean of the group's other answers (RLOO); ``scale_rewards``
    then divides by the group's std ("group", unbiased as TRL), the whole batch's ("batch") or nothing. A
    group whose rewards are all equal has advantage exactly 0: its mean, computed in floating point, need not
    equal the common value, and a tiny difference divided by a zero std would be noise pushed into the policy.
    """
    grouped = rewards.float().view(-1, group_size)
    if leave_one_out:
        baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    else:
        baseline = grouped.mean(dim=1, keepdim=True)
    advantages = grouped - baseline
    if scale_rewards == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.float().std() + STD_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}")
    equal = grouped.amax(dim=1) == grouped.amin(dim=1)
    advantages = torch.where(equal.unsqueeze(1), torch.zeros_like(advantages), advantages)
    return advantages.reshape(-1), equal.repeat_interleave(group_size)


@dataclass(frozen=True)
class TokenLosses:
    per_token: torch.Tensor  # (rows, R) with its graph; 0 where the mask is 0 after aggregation
    ratio: torch.Tensor  # (rows, R) detached importance ratios
    clipped: torch.Tensor  # (rows, R) bool: the clip decided the token's loss (TRL's clip_ratio/region)


def token_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    ref_logprobs: torch.Tensor | None,
) -> TokenLosses:
    """TRL's per-token GRPO loss: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (+ beta * k3 KL)."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    per_token = -torch.min(unclipped, clipped)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        per_token = per_token + beta * rollout.kl_penalty(logprobs, ref_logprobs, "k3")
    with torch.no_grad():
        r = ratio.detach()
        low = (r < 1.0 - epsilon_low) & (adv < 0)
        high = (r > 1.0 + epsilon_high) & (adv > 0)
    return TokenLosses(per_token=per_token, ratio=r, clipped=low | high)


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    total_rows: int,
    total_tokens: int,
    micro_batches: int,
    max_new_tokens: int,
    micro_batch_tokens: int | None = None,
) -> torch.Tensor:
    """One micro-batch's share of the update's loss, so that the micro-batches' sum is TRL's loss of the batch.

    grpo: each answer's token mean, averaged over the ``total_rows`` answers; bnpo: the micro-batch's token mean
    (TRL's per local batch), averaged over ``micro_batches``; dr_grpo: the token sum over ``total_rows *
    max_new_tokens``; dapo: the token sum over the update's ``total_tokens`` (its whole batch).
    ``micro_batch_tokens``: bnpo's micro-batch token count when ``mask`` holds only some of its rows (the rest
    left out with a loss of exactly 0); default: the mask's.
    """
    maskf = mask.to(per_token.dtype)
    summed = per_token * maskf
    if loss_type == "grpo":
        return (summed.sum(dim=1) / maskf.sum(dim=1).clamp(min=1.0)).sum() / total_rows
    if loss_type == "bnpo":
        tokens = maskf.sum() if micro_batch_tokens is None else maskf.new_tensor(float(micro_batch_tokens))
        return summed.sum() / tokens.clamp(min=1.0) / micro_batches
    if loss_type == "dr_grpo":
        return summed.sum() / (total_rows * max_new_tokens)
    if loss_type == "dapo":
        return summed.sum() / max(total_tokens, 1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def shared_prefix_rows(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(the first row of each distinct prompt, each row's index into those) when some prompt repeats; None
    when every row's prompt is its own. Rows are the same prompt when their ids and mask are equal."""
    keys = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    distinct, owner = torch.unique(keys, dim=0, return_inverse=True)
    if distinct.size(0) == keys.size(0):
        return None
    rows = torch.arange(keys.size(0), device=keys.device)
    first = torch.full((distinct.size(0),), keys.size(0), dtype=torch.long, device=keys.device)
    first = first.scatter_reduce(0, owner, rows, reduce="amin")
    return first, owner


def _columns(steps: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-step (N,) values as (N, width) columns; zeros in a last column no step sampled (the EOS closing an
    answer cut at a stop string in the last step)."""
    if not steps:
        raise ValueError("no sampling steps recorded")
    stacked = torch.stack(steps, dim=1)
    if stacked.size(1) < width:
        stacked = torch.cat([stacked, stacked.new_zeros(stacked.size(0), width - stacked.size(1))], dim=1)
    return stacked[:, :width]


def _chunks(rows: int, size: int) -> list[torch.Tensor]:
    order = torch.arange(rows)
    return [order[i : i + size] for i in range(0, rows, size)]


# --- the roles on one base


class GroupModels:
    """One ``PeftModel``: the policy adapter (trainable), the reference (a frozen adapter, or the adapters
    disabled) and the reward model's adapter with its head (through :attr:`shared`, for ``ChildScorer``).

    Only the policy's LoRA weights ever have ``requires_grad``; every role switch puts the flags back."""

    def __init__(
        self,
        peft: PeftModel,
        *,
        reference_adapter: str | None,
        shared: SharedModels,
        share_prompts: bool = True,
        checkpoint_layers: bool = True,
    ) -> None:
        self.peft = peft
        # gradient_checkpointing: the training pass keeps each decoder layer's inputs only and recomputes the
        # rest in the backward (activation_checkpointing.py)
        self.checkpoint_layers = checkpoint_layers
        # fsdp turns off the shared prompt forward: whether a micro-batch repeats a prompt is each rank's own
        # data, and a sharded layer's forwards must come in the same number on every rank.
        self.share_prompts = share_prompts and self._plain_cache()
        self.reference_adapter = reference_adapter
        self.shared = shared
        base = peft.get_base_model()
        prefix = str(getattr(base, "base_model_prefix", "model"))
        self.body: torch.nn.Module = getattr(base, prefix)
        lm_head = base.get_output_embeddings()  # type: ignore[operator]  # transformers' typing
        if not isinstance(lm_head, torch.nn.Module):
            raise TrainingError(MODEL_LOAD_FAILED, "the base model has no output embedding (LM head)")
        self.lm_head: torch.nn.Module = lm_head
        self.trainable = [
            p for n, p in peft.named_parameters() if "lora_" in n and n.split(".")[-2] == POLICY_ADAPTER
        ]
        self.restore_requires_grad()

    def restore_requires_grad(self) -> None:
        trainable = {id(p) for p in self.trainable}
        for param in self.peft.parameters():
            param.requires_grad_(id(param) in trainable)
        for _, head in self.shared.reward_heads.values():
            head.requires_grad_(False)

    @contextmanager
    def reference(self) -> Iterator[None]:
        try:
            with lora.use_adapter(self.peft, self.reference_adapter):
                yield
        finally:
            self.restore_requires_grad()

    def role_modules(self) -> dict[str, list[torch.nn.Module]]:
        """Every module each role computes with (the single-base-copy test counts their storages)."""
        return {"policy": [self.peft], "reference": [self.peft], "reward": [self.shared.model]}

    def response_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) of each response token under the current role, at ``temperature``.

        Through a plain head they come chunk by chunk (``fused.token_logprobs_and_entropy``: the answers'
        vocabulary-wide logits never exist whole, in the forward or the backward); any other head goes
        through the whole logits."""
        recompute = self.checkpoint_layers and torch.is_grad_enabled()
        with activation_checkpointing.checkpointed_layers(self.body) if recompute else nullcontext():
            answer_hidden = self.answer_hidden(input_ids, attention_mask, prompt_width)
        responses = input_ids[:, prompt_width:]
        chunked = fused.token_logprobs_and_entropy(self.lm_head, answer_hidden, responses, temperature)
        if chunked is not None:
            return chunked
        logits = lora.project_to_vocab(self.lm_head, answer_hidden).float() / temperature
        with torch.no_grad():
            entropy = rollout.entropy_from_logits(logits.detach())
        return rollout.token_logprobs(logits, responses), entropy

    def answer_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
    ) -> torch.Tensor:
        """The final hidden states that predict each answer token: positions ``prompt_width - 1`` onwards but
        the last, (rows, answer width, hidden).

        Rows answering the same prompt (a group) share its forward: the distinct prompts run once, their KV
        cache is repeated for their rows, and the answers run on top of it (:func:`shared_prefix_rows`). The
        backward sums each answer's gradient into its prompt's one pass. On SmolLM2 (bench
        ``grpo_vs_trl``: 2 prompts of about 41 tokens, G 4, 32-token answers) that forwards 334 token rows
        instead of 600 (counted), and keeps that much less for the backward. Without a repeated prompt, under
        fsdp, or on a model whose cache is not the plain growing one (a sliding window), it is one forward over
        whole rows.
        """
        positions = rollout.position_ids_from_mask(attention_mask)
        width = input_ids.size(1) - prompt_width
        shared = (
            shared_prefix_rows(input_ids[:, :prompt_width], attention_mask[:, :prompt_width])
            if self.share_prompts
            else None
        )
        if shared is None:
            hidden = self.body(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
            ).last_hidden_state
            return hidden[:, prompt_width - 1 : prompt_width - 1 + width]
        first, owner = shared
        prefix = self.body(
            input_ids=input_ids[first, :prompt_width],
            attention_mask=attention_mask[first, :prompt_width],
            position_ids=positions[first, :prompt_width],
            use_cache=True,
        )
        last_prompt = prefix.last_hidden_state[owner, -1:]
        if width == 1:
            return last_prompt
        cache = prefix.past_key_values
        cache.batch_select_indices(owner)  # each row gets its prompt's keys and values (gradients sum back)
        end = prompt_width + width - 1  # the last answer token predicts nothing
        rest = self.body(
            input_ids=input_ids[:, prompt_width:end],
            attention_mask=attention_mask[:, :end],
            position_ids=positions[:, prompt_width:end],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        return torch.cat([last_prompt, rest], dim=1)

    def _plain_cache(self) -> bool:
        return kv_cache.plain_growing_cache(getattr(self.peft.get_base_model(), "config", None))

    def generation_step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """One KV-cached step for :func:`rollout.sample_responses`: logits of the last position only."""
        return lora.decoding_step(self.body, self.lm_head, input_ids, attention_mask, position_ids, cache)


# --- rewards


@dataclass(frozen=True)
class PromptRow:
    messages: list[dict[str, str]]
    record: dict[str, Any]  # the dataset row: graders read {{item.<field>}} from it


def read_prompt_rows(path: str | Path) -> list[PromptRow]:
    def parse(record: Any, line: int) -> PromptRow:
        return PromptRow(messages=rollout.parse_prompt_record(record, line), record=dict(record))

    return data.read_jsonl(path, parse, kind="prompts")


@dataclass
class Scores:
    total: torch.Tensor  # (N,) the weighted reward, before the missing-EOS penalty
    by_source: dict[str, torch.Tensor]  # grader name (and "reward_model") -> (N,) its raw score
    errors: int  # answers x graders that could not score (scored 0)


class RewardScorer:
    """The weighted sum of the graders and the job's reward model, for a batch of decoded answers."""

    def __init__(
        self,
        hp: GroupHyperparameters,
        *,
        scorer: ModelScorer | None,
        reward_model: RewardModelGrader | None,
    ) -> None:
        self.graders = list(hp.graders)
        self.weights = hp.weights()
        self.scorer = scorer
        self.reward_model = reward_model
        self.reward_model_weight = hp.reward_model_weight

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.graders] + ([REWARD_MODEL_SERIES] if self.reward_model else [])

    def __call__(
        self, rows: list[PromptRow], texts: list[str], lengths: list[int], ended: list[bool]
    ) -> Scores:
        by_source: dict[str, list[float]] = {name: [] for name in self.names}
        errors = 0
        for row, text, length, stop in zip(rows, texts, lengths, ended, strict=True):
            sample = Sample(
                output_text=text, finish_reason="stop" if stop else "length", output_tokens=length
            )
            for grader in self.graders:
                result = grade(grader, sample, row.record, model_scorer=self.scorer)
                by_source[grader.name].append(result.reward)
                errors += len(result.metadata["errors"])
            if self.reward_model is not None:
                assert self.scorer is not None
                score = self.scorer.score_reward_model(self.reward_model, prompt=row.messages, response=text)
                by_source[REWARD_MODEL_SERIES].append(float(score))
        tensors = {name: torch.tensor(values, dtype=torch.float32) for name, values in by_source.items()}
        total = torch.zeros(len(texts), dtype=torch.float32)
        for grader, weight in zip(self.graders, self.weights, strict=True):
            total = total + weight * tensors[grader.name]
        if self.reward_model is not None:
            total = total + self.reward_model_weight * tensors[REWARD_MODEL_SERIES]
        return Scores(total=total, by_source=tensors, errors=errors)


# --- one update


@dataclass
class GroupBatch:
    """One update's answers: N = prompts x G rows, grouped as ``b * G + g``."""

    prompt_ids: torch.Tensor  # (N, P) left-padded, each prompt repeated G times
    responses: torch.Tensor  # (N, R) pads after the first EOS
    response_mask: torch.Tensor  # (N, R) 1 up to and including the first EOS
    has_eos: torch.Tensor  # (N,)
    input_ids: torch.Tensor  # (N, P + R)
    attention_mask: torch.Tensor  # (N, P + R)
    rows: list[PromptRow]  # the dataset row of each answer
    texts: list[str]
    generation_seconds: float
    sampling_entropy: torch.Tensor  # (N, R) each answer token's entropy as sampled (0 outside the mask)


@dataclass
class StepResult:
    metrics: dict[str, float]
    batch: GroupBatch
    rewards: torch.Tensor  # (N,) after the penalty (and, for RLOO with beta > 0, the KL)
    advantages: torch.Tensor  # (N,)
    zero_std: torch.Tensor  # (N,) bool
    first_ratio_max_deviation: float  # max |ratio - 1| over valid tokens in the first iteration
    iteration_losses: list[float] = field(default_factory=list)


class GroupTrainer:
    """Sampling, scoring, advantages and the clipped updates on :class:`GroupModels`; no I/O, so tests can drive
    it update by update (the job loop is ``grpo_job.GroupJob``)."""

    def __init__(
        self,
        models: GroupModels,
        rewards: RewardScorer,
        hp: GroupHyperparameters,
        *,
        tokenizer: PreTrainedTokenizerBase,
        leave_one_out: bool,
        eos_token_id: int,
        pad_token_id: int,
        generator: torch.Generator,
        dist: Dist = SINGLE,
    ) -> None:
        if pad_token_id == eos_token_id:
            raise ValueError("the pad token must differ from EOS")
        self.models = models
        self.rewards = rewards
        # Under torchrun each rank samples whole groups for its share of the prompts (group advantages stay
        # exact); each rank's loss is its share of the whole batch's, so the gradients are summed.
        self.dist = dist
        self.hp = hp
        self.tokenizer = tokenizer
        self.stop = rollout.StopStrings(tokenizer, hp.stop) if hp.stop else None
        self.leave_one_out = leave_one_out
        # RLOO folds the KL into the reward; GRPO puts it in the loss.
        self.kl_in_reward = leave_one_out
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.generator = generator
        # Adam eps 1e-5 and no weight decay, as PPO here: LoRA B starts at 0 and decay would only pull it back.
        self.optimizer = torch.optim.Adam(models.trainable, lr=hp.learning_rate, eps=1e-5)
        self.device = next(models.peft.parameters()).device

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], rows: list[PromptRow]) -> GroupBatch:
        """G answers to each prompt from the policy (one prefill per prompt), decoded for the graders."""
        hp, g = self.hp, self.hp.num_generations
        prompt_ids, prompt_mask = rollout.left_pad(prompts, self.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        started = time.perf_counter()
        entropies: list[torch.Tensor] = []
        raw = rollout.sample_responses(
            self.models.generation_step,
            prompt_ids,
            prompt_mask,
            max_new_tokens=hp.max_new_tokens,
            temperature=hp.temperature,
            top_p=hp.top_p,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            generator=self.generator,
            group_size=g,
            stop=self.stop,
            finished_everywhere=self.dist.finished_everywhere(),
            entropies=entropies,
        )
        generation_seconds = time.perf_counter() - started
        responses, response_mask, has_eos = rollout.truncate_after_eos(
            raw, self.eos_token_id, self.pad_token_id
        )
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0)
        lengths = response_mask.sum(dim=1).tolist()
        texts = [
            str(self.tokenizer.decode(responses[i, : int(n)].tolist(), skip_special_tokens=True))
            for i, n in enumerate(lengths)
        ]
        if self.stop is not None:  # graders see the text before the stop sequence, as OpenAI returns it
            texts = [self.stop.cut(text) for text in texts]
        return GroupBatch(
            prompt_ids=prompt_ids,
            responses=responses,
            response_mask=response_mask,
            has_eos=has_eos,
            input_ids=torch.cat([prompt_ids, responses], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
            rows=[row for row in rows for _ in range(g)],
            texts=texts,
            generation_seconds=generation_seconds,
            sampling_entropy=_columns(entropies, responses.size(1)) * response_mask,
        )

    def _micro_batches(self, batch: GroupBatch) -> list[torch.Tensor]:
        rows = batch.input_ids.size(0)
        return [c.to(self.device) for c in _chunks(rows, self.hp.micro_batch_size or rows)]

    def _logprobs(self, batch: GroupBatch, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs of the answers' tokens, their entropies) under the current role for ``rows``."""
        width = batch.prompt_ids.size(1)
        return self.models.response_logprobs(
            batch.input_ids[rows], batch.attention_mask[rows], width, self.hp.temperature
        )

    @torch.no_grad()
    def _no_grad_logprobs(self, batch: GroupBatch, *, reference: bool) -> torch.Tensor:
        out = torch.zeros_like(batch.response_mask, dtype=torch.float32)
        with self.models.reference() if reference else _nothing():
            for rows in self._micro_batches(batch):
                out[rows] = self._logprobs(batch, rows)[0]
        return out * batch.response_mask

    def _rewards(self, batch: GroupBatch, kl_per_answer: torch.Tensor | None) -> tuple[torch.Tensor, Scores]:
        lengths = [int(n) for n in batch.response_mask.sum(dim=1).tolist()]
        scores = self.rewards(batch.rows, batch.texts, lengths, [bool(x) for x in batch.has_eos.tolist()])
        self.models.restore_requires_grad()  # a judge or reward model switched adapters
        rewards = scores.total.to(self.device)
        if self.hp.missing_eos_penalty is not None:
            # An answer cut by max_new_tokens is not an answer; without this a policy may never learn to stop.
            rewards = rewards - self.hp.missing_eos_penalty * (~batch.has_eos).float()
        if kl_per_answer is not None:
            rewards = rewards - self.hp.beta * kl_per_answer
        return rewards, scores

    def step(self, prompts: list[list[int]], rows: list[PromptRow], *, measure_kl: bool = True) -> StepResult:
        """One update: sample G answers per prompt, score, advantages, ``num_iterations`` optimizer steps.
        ``measure_kl=False`` (honoured at beta 0 only) skips the reference forward; the metrics then have no
        ``kl``."""
        hp = self.hp
        started = time.perf_counter()
        batch = self.sample(prompts, rows)
        mask = batch.response_mask
        ref_logprobs = self._no_grad_logprobs(batch, reference=True) if measure_kl or hp.beta > 0 else None
        # The sampling policy's log-probs, before any step: needed when later iterations are off-policy, and by
        # RLOO's KL in the reward. Same forward, same rows as the first iteration, so its ratio is exactly 1.
        old_logprobs: torch.Tensor | None = None
        if hp.num_iterations > 1 or (self.kl_in_reward and hp.beta > 0):
            old_logprobs = self._no_grad_logprobs(batch, reference=False)
        kl_in_reward = None
        if old_logprobs is not None and ref_logprobs is not None and self.kl_in_reward and hp.beta > 0:
            kl_in_reward = (rollout.kl_penalty(old_logprobs, ref_logprobs, "k3") * mask).sum(dim=1)
        rewards, scores = self._rewards(batch, kl_in_reward)
        advantages, zero_std = group_advantages(
            rewards, hp.num_generations, leave_one_out=self.leave_one_out, scale_rewards=hp.scale_rewards
        )
        learned = self.learn(batch, advantages.to(self.device), old_logprobs, ref_logprobs)
        seconds = time.perf_counter() - started
        metrics = self._metrics(batch, rewards, scores, zero_std, learned, seconds=seconds)
        return StepResult(
            metrics=metrics,
            batch=batch,
            rewards=rewards,
            advantages=advantages,
            zero_std=zero_std,
            first_ratio_max_deviation=learned.first_ratio_max_deviation,
            iteration_losses=learned.losses,
        )

    def learn(
        self,
        batch: GroupBatch,
        advantages: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
    ) -> Learned:
        """``num_iterations`` optimizer steps over the answers, micro-batches' gradients summed into each.

        Answers whose advantage is exactly 0 (a group of equal rewards) have a loss of exactly 0 and no
        gradient when the loss has no KL term (beta 0, or RLOO's KL in the reward): they are left out of the
        training forward and backward (:meth:`_learning_rows`); their entropies for the metrics are the
        sampler's, their log-probs for the KL metric a no-grad forward's. The update is the same; on the GRPO
        benchmark 46% of the groups had equal rewards."""
        hp = self.hp
        mask = batch.response_mask
        micro = self._micro_batches(batch)
        local = {"total_rows": mask.size(0), "total_tokens": int(mask.sum()), "micro_batches": len(micro)}
        totals = {key: int(value) for key, value in self.dist.sum_values(local).items()}
        learned = Learned(entropy=torch.zeros_like(mask, dtype=torch.float32))
        learning = [(rows, self._learning_rows(rows, advantages)) for rows in micro]
        self._metrics_of_rows_left_out(
            batch, learning, learned, measure_kl=ref_logprobs is not None, old_logprobs=old_logprobs
        )
        for iteration in range(hp.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, clipped, deviation = 0.0, 0.0, 0.0
            for rows, active in learning:
                if active.numel() == 0:
                    continue
                logprobs, entropy = self._logprobs(batch, active)
                if iteration == 0:
                    learned.entropy[active] = entropy.detach()
                    learned.first_logprobs.append((active, logprobs.detach()))
                old = logprobs.detach() if old_logprobs is None else old_logprobs[active]
                losses = token_losses(
                    logprobs,
                    old,
                    advantages[active],
                    epsilon_low=hp.epsilon,
                    epsilon_high=hp.epsilon_high if hp.epsilon_high is not None else hp.epsilon,
                    beta=0.0 if self.kl_in_reward else hp.beta,
                    ref_logprobs=None if ref_logprobs is None else ref_logprobs[active],
                )
                loss = aggregate_loss(
                    losses.per_token,
                    mask[active],
                    hp.loss_type,
                    max_new_tokens=hp.max_new_tokens,
                    micro_batch_tokens=int(mask[rows].sum()),
                    **totals,
                )
                loss.backward()
                valid = mask[active].bool()
                loss_sum += float(loss.detach())
                clipped += float(losses.clipped[valid].sum())
                deviation = max(
                    deviation, float((losses.ratio[valid] - 1).abs().max()) if valid.any() else 0.0
                )
            self._zero_missing_gradients()
            if self.dist.enabled:
                self.dist.reduce_gradients(self.models.trainable)
                summed = self.dist.sum_values({"loss": loss_sum, "clipped": clipped})
                loss_sum, clipped = summed["loss"], summed["clipped"]
                deviation = max(self.dist.gather(deviation))
            grad_norm = sharding.clip_grad_norm(self.models.trainable, hp.max_grad_norm)
            if not math.isfinite(grad_norm) or not math.isfinite(loss_sum):
                raise TrainingError(
                    TRAINING_DIVERGED,
                    f"loss or gradient became non-finite (loss {loss_sum}, grad norm {grad_norm}); try a lower "
                    "learning_rate",
                )
            self.optimizer.step()
            release_freed_memory()  # the iteration's activations are freed: their pages back (allocator.py)
            learned.record(
                iteration, loss_sum, clipped / max(totals["total_tokens"], 1), grad_norm, deviation
            )
        self.optimizer.zero_grad(set_to_none=True)
        if ref_logprobs is not None:
            learned.kl = self._kl(learned, ref_logprobs, mask)
        return learned

    def _learning_rows(self, rows: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
        """The rows of a micro-batch that can move the policy: all of them when the loss has a KL term (it has
        a gradient at advantage 0) or under fsdp (a sharded layer needs the same forwards on every rank);
        else those whose advantage is not exactly 0."""
        kl_in_loss = self.hp.beta != 0.0 and not self.kl_in_reward
        if kl_in_loss or self.dist.sharded:
            return rows
        return rows[advantages[rows] != 0]

    @torch.no_grad()
    def _metrics_of_rows_left_out(
        self,
        batch: GroupBatch,
        learning: list[tuple[torch.Tensor, torch.Tensor]],
        learned: Learned,
        *,
        measure_kl: bool,
        old_logprobs: torch.Tensor | None,
    ) -> None:
        """The entropies of the rows no training forward will see, as the sampler measured them; their
        log-probs (for the KL metric), on the updates that measure the KL only: the sampling policy's
        ``old_logprobs`` when the update computed them, else a no-grad forward (about 40% of the cost of
        training the rows)."""
        left_out = torch.cat([rows[~torch.isin(rows, active)] for rows, active in learning])
        if left_out.numel() == 0:
            return
        learned.entropy[left_out] = batch.sampling_entropy[left_out]
        if not measure_kl:
            return
        if old_logprobs is not None:
            learned.first_logprobs.append((left_out, old_logprobs[left_out]))
            return
        for chunk in left_out.split(self.hp.micro_batch_size or left_out.numel()):
            learned.first_logprobs.append((chunk, self._logprobs(batch, chunk)[0]))

    def _zero_missing_gradients(self) -> None:
        """A zero gradient where no forward reached a parameter (every row left out): Adam then takes the same
        (momentum-only) step it would have taken from the zero gradient of a zero loss."""
        for param in self.models.trainable:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    @staticmethod
    def _kl(learned: Learned, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-answer KL (summed k3) of the policy that sampled, from the first iteration's log-probs."""
        policy = torch.zeros_like(ref_logprobs)
        for rows, logprobs in learned.first_logprobs:
            policy[rows] = logprobs
        return (rollout.kl_penalty(policy * mask, ref_logprobs, "k3") * mask).sum(dim=1)

    def _metrics(
        self,
        batch: GroupBatch,
        rewards: torch.Tensor,
        scores: Scores,
        zero_std: torch.Tensor,
        learned: Learned,
        *,
        seconds: float,
    ) -> dict[str, float]:
        mask = batch.response_mask.float()
        grouped = rewards.view(-1, self.hp.num_generations)
        metrics = {
            "reward_mean": float(rewards.mean()),
            # TRL's reward_std: the mean over groups of the within-group std
            "reward_std": float(grouped.std(dim=1).mean()),
            **{f"reward/{name}": float(values.mean()) for name, values in scores.by_source.items()},
            "reward_errors": float(scores.errors),
            "frac_reward_zero_std": float(zero_std.float().mean()),
            **({"kl": float(learned.kl.mean())} if learned.kl is not None else {}),
            "clip_ratio": sum(learned.clip_ratios) / len(learned.clip_ratios),
            "entropy": float(rollout.masked_mean(learned.entropy, mask)),
            "completion_length": float(mask.sum(dim=1).mean()),
            "eos_fraction": float(batch.has_eos.float().mean()),
            "loss": sum(learned.losses) / len(learned.losses),
            "grad_norm": sum(learned.grad_norms) / len(learned.grad_norms),
            "episodes_per_second": batch.input_ids.size(0) / max(seconds, 1e-9),
            "generation_seconds": batch.generation_seconds,
            "update_seconds": seconds,
            "learning_rate": float(self.optimizer.param_groups[0]["lr"]),
        }
        if self.dist.enabled:
            # Equal shares of whole groups: the ranks' means average to the batch's; loss, clip ratio and grad
            # norm are already the batch's (the same on every rank); throughput and grader errors add up.
            combined = self.dist.mean_values(metrics)
            for key in ("episodes_per_second", "reward_errors"):
                combined[key] = combined[key] * self.dist.world_size
            metrics = combined
        return metrics


@dataclass
class Learned:
    """What :meth:`GroupTrainer.learn` measured: per iteration, and the first iteration's log-probs."""

    entropy: torch.Tensor
    losses: list[float] = field(default_factory=list)
    clip_ratios: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    first_ratio_max_deviation: float = 0.0
    first_logprobs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    kl: torch.Tensor | None = None  # per answer; None when the update did not measure it

    def record(
        self, iteration: int, loss: float, clip_ratio: float, grad_norm: float, deviation: float
    ) -> None:
        self.losses.append(loss)
        self.clip_ratios.append(clip_ratio)
        self.grad_norms.append(grad_norm)
        if iteration == 0:
            self.first_ratio_max_deviation = deviation


@contextmanager
def _nothing() -> Iterator[None]:
    yield
