"""PPO with LoRA: policy, reference, reward and value on ONE copy of the base weights.

The base causal LM is loaded once and wrapped once in a ``PeftModel``. Each role is a way of running that
same module tree:

- **policy**: the trainable adapter ``"default"`` (fresh, or initialised from ``init_adapter``: the SFT
  adapter). Its adapter folder is the job's output.
- **reference**: what the KL penalty measures against. Without ``init_adapter`` it is the base itself (the
  policy adapter disabled). With one, it is the SFT policy: a frozen second copy of the init adapter
  (``"reference"``, a few MB of LoRA weights), as in the literature and TRL, where the reference is the SFT
  model. Measuring KL to the raw base instead would pull the policy back past its SFT behaviour.
- **reward**: the reward model's LoRA adapter (``"reward"``), loaded from its folder onto the *causal LM's*
  body (a reward model is a sequence classifier on the same body: same module names), plus its ``score``
  head, a small ``Linear`` applied to the last hidden state at the last real token.
- **value**: a value head on the policy's trunk (``value_model="head"``, the default: one forward gives
  logits and values), or a third adapter initialised from the reward model with a copy of its head
  (``value_model="adapter"``, TRL's choice of initialisation, at the cost of a second forward per minibatch).

Switching roles toggles adapters, never weights, so the frozen base exists once in memory; only adapters and
heads are trainable (the test suite counts storages to prove it). The reference and reward passes run without
gradients. Only a reward model trained on a *different* base could need a second base; that is refused with
a clear error rather than silently scoring with mismatched weights.

The math follows TRL's PPO trainer (``trl/experimental/ppo/ppo_trainer.py``) with three deliberate
differences, each a correctness fix: the "old" log-probs are recomputed by the training forward rather than
taken from generation scores (so the first minibatch's ratio is exactly 1; that forward, run with gradients,
is also the first minibatch's training forward); the score lands on the last real
token (TRL adds it one position after it); and values are masked with the same mask as everything else.

This module is the algorithm (the roles, rollout scoring, GAE, the clipped losses); the job around it (spec ->
roles -> the shared training loop -> the policy adapter) is ``ppo_job.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from peft import LoraConfig, PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from contract.hyperparameters import PPOHyperparameters
from workers.training import lora, rollout, sharding
from workers.training.allocator import release_freed_memory
from workers.training.distributed import SINGLE, Dist
from workers.training.errors import (
    INVALID_ADAPTER,
    INVALID_SPEC,
    MODEL_LOAD_FAILED,
    TRAINING_DIVERGED,
    TrainingError,
)
from workers.training.rollout import PolicyLoss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

STAGE = "ppo"
POLICY_ADAPTER = lora.POLICY_ADAPTER
REFERENCE_ADAPTER = lora.REFERENCE_ADAPTER
REWARD_ADAPTER = "reward"
VALUE_ADAPTER = "value"
ROLES = ("policy", "reference", "reward", "value")


class RewardFunction(Protocol):
    """Scores a batch of finished episodes; one float per episode (higher is better).

    ``prompt_ids``: (B, P) left-padded prompts. ``response_ids``: (B, R) responses, every token after the
    first EOS replaced by the pad id. ``attention_mask``: (B, P + R), 1 on the real prompt tokens and the
    response up to and including its EOS. The missing-EOS penalty is applied by the trainer, not here.
    """

    def __call__(
        self, prompt_ids: torch.Tensor, response_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...


# --- the shared model and its roles


class SharedBaseModel:
    """One ``PeftModel`` and the small heads beside it; :meth:`role` switches which adapter runs.

    Invariant: outside and inside every role, ``requires_grad`` is True exactly on the trainable adapter(s)
    and the value head. (peft's ``set_adapter`` and ``disable_adapter`` flip ``requires_grad`` on adapter
    weights as a side effect; we put the flags back after every switch.)
    """

    def __init__(
        self,
        peft_model: PeftModel,
        *,
        value_head: torch.nn.Linear,
        reward_head: torch.nn.Linear | None,
        reference_adapter: str | None,
        reward_adapter: str | None,
        value_adapter: str | None,
    ) -> None:
        self.peft = peft_model
        base = peft_model.get_base_model()
        # Run the decoder body ourselves: we need its final (normed) hidden states for the heads, and logits
        # only for response positions (the LM head is most of the compute on a large vocabulary).
        prefix = str(getattr(base, "base_model_prefix", "model"))
        self.body: torch.nn.Module = getattr(base, prefix)
        lm_head = base.get_output_embeddings()  # type: ignore[operator]  # transformers' typing
        if not isinstance(lm_head, torch.nn.Module):
            raise TrainingError(MODEL_LOAD_FAILED, "the base model has no output embedding (LM head)")
        self.lm_head: torch.nn.Module = lm_head
        self.value_head = value_head
        self.reward_head = reward_head
        self.reference_adapter = reference_adapter
        self.reward_adapter = reward_adapter
        self.value_adapter = value_adapter
        trainable_adapters = {POLICY_ADAPTER} | ({value_adapter} if value_adapter else set())
        self._trainable: list[torch.nn.Parameter] = []
        for name, param in peft_model.named_parameters():
            # LoRA parameter names look like "...q_proj.lora_A.<adapter>.weight".
            keep = "lora_" in name and name.split(".")[-2] in trainable_adapters
            param.requires_grad_(keep)
            if keep:
                self._trainable.append(param)
        value_head.requires_grad_(True)
        if reward_head is not None:
            reward_head.requires_grad_(False)
        self._trainable.extend(value_head.parameters())
        self._trainable_ids = {id(p) for p in self._trainable}

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._trainable)

    def _restore_requires_grad(self) -> None:
        for param in self.peft.parameters():
            param.requires_grad_(id(param) in self._trainable_ids)

    @contextmanager
    def role(self, name: str) -> Iterator[None]:
        """Run the body as ``name`` (policy, reference, reward, value) inside the block."""
        if name == "policy" or (name == "value" and self.value_adapter is None):
            yield  # the policy adapter is the resting state; a head-only value shares the policy's trunk
            return
        if name == "reference" and self.reference_adapter is None:
            try:
                with self.peft.disable_adapter():
                    yield
            finally:
                self._restore_requires_grad()
            return
        adapter = {
            "reference": self.reference_adapter,
            "reward": self.reward_adapter,
            "value": self.value_adapter,
        }.get(name)
        if adapter is None:
            raise ValueError(f"no adapter for role {name!r}")
        self.peft.set_adapter(adapter)
        self._restore_requires_grad()
        try:
            yield
        finally:
            self.peft.set_adapter(POLICY_ADAPTER)
            self._restore_requires_grad()

    def role_modules(self) -> dict[str, list[torch.nn.Module]]:
        """Every module each role computes with (for the single-base-copy test and memory accounting)."""
        reward: list[torch.nn.Module] = [self.peft]
        if self.reward_head is not None:
            reward.append(self.reward_head)
        return {
            "policy": [self.peft],
            "reference": [self.peft],
            "reward": reward,
            "value": [self.peft, self.value_head],
        }

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the body under the current role; positions from the attention mask."""
        out = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=rollout.position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def generation_step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """One KV-cached step for :func:`rollout.sample_responses`: logits of the last position only."""
        return lora.decoding_step(self.body, self.lm_head, input_ids, attention_mask, position_ids, cache)

    def response_logits(self, hidden: torch.Tensor, prompt_width: int, temperature: float) -> torch.Tensor:
        """Logits (divided by the temperature) that predicted each response token: positions P-1 .. P+R-2."""
        width = hidden.size(1) - prompt_width
        logits = lora.project_to_vocab(self.lm_head, hidden[:, prompt_width - 1 : prompt_width - 1 + width])
        return logits.float() / temperature

    def response_values(self, hidden: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """V(state before response token t), from the same positions as the logits."""
        width = hidden.size(1) - prompt_width
        states = hidden[:, prompt_width - 1 : prompt_width - 1 + width].float()
        values: torch.Tensor = self.value_head(states).squeeze(-1)
        return values


class AdapterRewardModel:
    """The default :class:`RewardFunction`: the reward adapter on the shared body plus its score head."""

    def __init__(self, models: SharedBaseModel) -> None:
        if models.reward_adapter is None or models.reward_head is None:
            raise ValueError("the shared model has no reward adapter")
        self.models = models
        self.head: torch.nn.Linear = models.reward_head

    @torch.no_grad()
    def __call__(
        self, prompt_ids: torch.Tensor, response_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        input_ids = torch.cat([prompt_ids, response_ids], dim=1)
        with self.models.role("reward"):
            hidden = self.models.hidden_states(input_ids, attention_mask)
        rows = torch.arange(hidden.size(0), device=hidden.device)
        # The reward sits at the last real token: the EOS of an ended answer, else the last sampled token.
        last = hidden[rows, lora.last_token_index(attention_mask)].float()
        scores: torch.Tensor = self.head(last).squeeze(-1)
        return scores


def load_scalar_adapter(
    model: PeftModel, folder: str | Path, adapter_name: str, *, trainable: bool
) -> torch.nn.Linear:
    """Load a sequence-classifier LoRA folder (reward model) onto the causal LM as adapter ``adapter_name``.

    The folder is what ``PeftModel.from_pretrained(AutoModelForSequenceClassification(base, num_labels=1),
    folder)`` loads: LoRA weights on the body plus the ``score`` head saved through ``modules_to_save``. The
    body's module names are the same in the causal LM, so the LoRA weights go onto it unchanged; the head
    becomes a separate ``Linear`` (fp32). Returns the head.
    """
    path = Path(folder)
    weights_file = path / "adapter_model.safetensors"
    try:
        config = LoraConfig.from_pretrained(str(path))
        state = load_file(str(weights_file))
    except (OSError, ValueError, TypeError) as exc:
        raise TrainingError(
            INVALID_ADAPTER, f"cannot read the reward model adapter in {path}: {exc}"
        ) from None
    head_state = {k: v for k, v in state.items() if "lora_" not in k}
    lora_state = {k: v for k, v in state.items() if "lora_" in k}
    weight_keys = [k for k in head_state if k.endswith(".weight")]
    if (
        len(weight_keys) != 1
        or head_state[weight_keys[0]].dim() != 2
        or head_state[weight_keys[0]].size(0) != 1
    ):
        raise TrainingError(
            INVALID_ADAPTER,
            f"{path} is not a reward model: expected one scalar head (a 'score' weight of shape [1, hidden]) "
            f"next to the LoRA weights, found {sorted(head_state)}",
        )
    head_weight = head_state[weight_keys[0]]
    bias_key = weight_keys[0][: -len("weight")] + "bias"
    # As a causal-LM adapter: the head is ours to apply, so nothing is "saved" as a module here.
    causal_config = replace(config, task_type="CAUSAL_LM", modules_to_save=None, inference_mode=not trainable)
    try:
        model.add_adapter(adapter_name, causal_config)
        result = set_peft_model_state_dict(model, lora_state, adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise TrainingError(
            INVALID_ADAPTER, f"cannot load the reward model adapter {path} onto this base model: {exc}"
        ) from None
    expected = [n for n, _ in model.named_parameters() if "lora_" in n and n.split(".")[-2] == adapter_name]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected or len(lora_state) != len(expected):
        raise TrainingError(
            INVALID_ADAPTER,
            f"the reward model adapter {path} does not fit this base model "
            f"({len(lora_state)} LoRA tensors for {len(expected)} slots; "
            f"unexpected: {unexpected[:3]})",
        )
    hidden_size = head_weight.size(1)
    head = torch.nn.Linear(hidden_size, 1, bias=bias_key in head_state, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(head_weight.float())
        if head.bias is not None:
            head.bias.copy_(head_state[bias_key].float())
    return head


# --- KL control


class KLController:
    """The KL penalty's coefficient: fixed, or adapted after each update (Ziegler et al. 2019, TRL's former
    ``AdaptiveKLController``).

    Adaptive: with ``e = clip(kl / target - 1, -0.2, 0.2)`` from an update's KL (nats per answer, the mean
    over its episodes), ``coef *= 1 + e * n_steps / horizon``, ``n_steps`` being that update's episodes. The
    clip bounds how fast one noisy update can move the coefficient. Plain Python floats, so the state saved in a
    checkpoint (JSON, which round-trips floats exactly) resumes bit-exact.
    """

    def __init__(self, coef: float, *, adaptive: bool, target: float, horizon: int) -> None:
        self.coef = coef
        self.adaptive = adaptive
        self.target = target
        self.horizon = horizon

    @classmethod
    def from_hyperparameters(cls, hp: PPOHyperparameters) -> KLController:
        return cls(
            hp.kl_coef, adaptive=hp.kl_control == "adaptive", target=hp.kl_target, horizon=hp.kl_horizon
        )

    def update(self, kl: float, n_steps: int) -> None:
        if not self.adaptive:
            return
        proportional_error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + proportional_error * n_steps / self.horizon

    def state(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load(self, state: dict[str, Any]) -> None:
        if "coef" in state:
            self.coef = float(state["coef"])


# --- one PPO update


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    responses: torch.Tensor  # (B, R) pads after the first EOS
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first EOS
    has_eos: torch.Tensor  # (B,)
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    logprobs: torch.Tensor  # (B, R) old log-probs, recomputed by the training forward
    ref_logprobs: torch.Tensor
    values: torch.Tensor  # (B, R) old values, 0 outside the mask
    entropy: torch.Tensor  # (B, R) per-token entropy of the sampling distribution
    scores: torch.Tensor  # (B,) raw reward-function scores
    rewards: torch.Tensor  # (B,) scores after the missing-EOS penalty
    kl: torch.Tensor  # (B, R) per-token KL estimate (the penalised one), 0 outside the mask
    advantages: torch.Tensor  # (B, R) whitened, 0 outside the mask
    returns: torch.Tensor  # (B, R) value targets
    first_order: torch.Tensor  # the first PPO epoch's permutation, used to chunk the old-logprob pass
    generation_seconds: float
    # The first minibatch's old-logprob forward, run with gradients and kept (log-probs, values, graph
    # alive) so that learn()'s first step is its backward rather than the same forward again; None when the
    # value function has its own adapter (two trunks, backwarded one at a time).
    first_forward: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class MinibatchStats:
    epoch: int
    index: int
    policy_loss: float
    value_loss: float
    clipfrac: float
    value_clipfrac: float
    approxkl: float
    ratio_mean: float
    ratio_max_deviation: float  # max |ratio - 1| over valid tokens
    grad_norm: float


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    minibatches: list[MinibatchStats]
    rollout: Rollout


def _chunks(order: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [order[i : i + size] for i in range(0, order.numel(), size)]


class PPOTrainer:
    """Rollout, advantages and clipped updates on a :class:`SharedBaseModel`; no I/O (the job loop is
    :class:`workers.training.ppo_job.PPOJob`), so tests can drive it update by update."""

    def __init__(
        self,
        models: SharedBaseModel,
        reward_function: RewardFunction,
        hp: PPOHyperparameters,
        *,
        eos_token_id: int,
        pad_token_id: int,
        generator: torch.Generator,
        stop: rollout.StopStrings | None = None,
        dist: Dist = SINGLE,
    ) -> None:
        if pad_token_id == eos_token_id:
            raise ValueError("the pad token must differ from EOS")
        self.models = models
        self.reward_function = reward_function
        self.hp = hp
        self.stop = stop  # hp.stop with the tokenizer (the job builds it)
        self.kl_controller = KLController.from_hyperparameters(hp)
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.generator = generator
        rollout_size = hp.rollout_batch_size or hp.batch_size
        self.mini_batch_size = min(hp.mini_batch_size or rollout_size, rollout_size)
        # Under torchrun each rank samples and trains on its share of every rollout and minibatch (the API
        # checks both split evenly); whitening, the KL controller and the metrics are over all ranks.
        self.dist = dist
        self.mini_batch_size //= dist.world_size
        # Adam with eps 1e-5 (TRL's and the usual PPO setting): the default 1e-8 makes early steps on tiny
        # gradients needlessly large. No weight decay: LoRA B starts at 0 and decay would only pull it back.
        self.optimizer = torch.optim.Adam(models.trainable_parameters, lr=hp.learning_rate, eps=1e-5)
        self.device = next(models.peft.parameters()).device

    # The training forward, also used (without gradients) to compute the old log-probs and values, so that
    # both are the same computation on the same rows and the ratio is exactly 1 before the first step.
    def _policy_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_width: int,
        responses: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs of the responses, values, logits) under the current policy and value function."""
        models = self.models
        hidden = models.hidden_states(input_ids, attention_mask)
        logits = models.response_logits(hidden, prompt_width, self.hp.temperature)
        logprobs = rollout.token_logprobs(logits, responses)
        if models.value_adapter is None:
            values = models.response_values(hidden, prompt_width)
        else:
            with models.role("value"):
                values = models.response_values(models.hidden_states(input_ids, attention_mask), prompt_width)
        return logprobs, values, logits

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> Rollout:
        hp, models = self.hp, self.models
        prompt_ids, prompt_mask = rollout.left_pad(prompts, self.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        started = time.perf_counter()
        raw = rollout.sample_responses(
            models.generation_step,
            prompt_ids,
            prompt_mask,
            max_new_tokens=hp.max_new_tokens,
            temperature=hp.temperature,
            top_p=hp.top_p,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            generator=self.generator,
            stop=self.stop,
            finished_everywhere=self.dist.finished_everywhere(),
        )
        generation_seconds = time.perf_counter() - started
        responses, response_mask, has_eos = rollout.truncate_after_eos(
            raw, self.eos_token_id, self.pad_token_id
        )
        input_ids = torch.cat([prompt_ids, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        width = prompt_ids.size(1)
        batch = input_ids.size(0)
        maskf = response_mask.float()

        # Old log-probs and values, minibatch by minibatch in the first PPO epoch's order: the first
        # minibatch of the update is exactly this computation (same rows, same shapes; dropout is off), so
        # its forward runs with gradients here and learn() backwards it: one forward of a minibatch saved per
        # update, and the first ratio is exactly 1 by construction.
        first_order = torch.randperm(batch, generator=self.generator).to(self.device)
        logprobs = torch.zeros_like(maskf)
        values = torch.zeros_like(maskf)
        entropy = torch.zeros_like(maskf)
        first_forward = None
        for index, rows in enumerate(_chunks(first_order, self.mini_batch_size)):
            keep = index == 0 and models.value_adapter is None
            with torch.enable_grad() if keep else nullcontext():
                lp, v, logits = self._policy_forward(
                    input_ids[rows], attention_mask[rows], width, responses[rows]
                )
            if keep:
                first_forward = (lp, v)
            logprobs[rows], values[rows] = lp.detach(), v.detach()
            entropy[rows] = rollout.entropy_from_logits(logits.detach())
            del logits
        ref_logprobs = torch.zeros_like(maskf)
        with models.role("reference"):
            for rows in _chunks(first_order, self.mini_batch_size):
                hidden = models.hidden_states(input_ids[rows], attention_mask[rows])
                ref_logits = models.response_logits(hidden, width, hp.temperature)
                ref_logprobs[rows] = rollout.token_logprobs(ref_logits, responses[rows])
                del hidden, ref_logits
        scores = self.reward_function(prompt_ids, responses, attention_mask).float().reshape(batch)
        rewards_seq = scores.clone()
        if hp.missing_eos_penalty is not None:
            # An answer cut by max_new_tokens is not an answer; without this, PPO never learns to stop.
            rewards_seq = rewards_seq - hp.missing_eos_penalty * (~has_eos).float()

        logprobs, ref_logprobs, values = logprobs * maskf, ref_logprobs * maskf, values * maskf
        # The penalised KL is the configured estimator's (k1 or k3); its coefficient the controller's current one.
        kl = rollout.kl_penalty(logprobs, ref_logprobs, hp.kl_estimator) * maskf
        token_rewards = -self.kl_controller.coef * kl
        last = response_mask.sum(dim=1) - 1  # index of the EOS, or of the last token when there is none
        token_rewards[torch.arange(batch, device=self.device), last] += rewards_seq
        if hp.whiten_rewards:
            token_rewards = self._whiten(token_rewards, response_mask, shift_mean=False)
        advantages, returns = rollout.compute_gae(
            token_rewards, values, response_mask, gamma=hp.gamma, lam=hp.lam
        )
        advantages = self._whiten(advantages, response_mask)
        return Rollout(
            prompt_ids=prompt_ids,
            responses=responses,
            response_mask=response_mask,
            has_eos=has_eos,
            input_ids=input_ids,
            attention_mask=attention_mask,
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            values=values,
            entropy=entropy,
            scores=scores,
            rewards=rewards_seq,
            kl=kl,
            advantages=advantages,
            returns=returns,
            first_order=first_order,
            generation_seconds=generation_seconds,
            first_forward=first_forward,
        )

    def _whiten(self, values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
        """:func:`rollout.masked_whiten` over the whole rollout: this rank's rows and, under torchrun, every
        other rank's (mean and unbiased variance from all-reduced sums)."""
        if not self.dist.enabled:
            return rollout.masked_whiten(values, mask, shift_mean=shift_mean)
        maskf = mask.to(values.dtype)
        first = self.dist.sum_tensor(torch.stack([(values * maskf).sum(), maskf.sum()]))
        count = first[1].clamp(min=1)
        mean = first[0] / count
        squares = self.dist.sum_tensor(((values - mean) ** 2 * maskf).sum())
        var = squares / count
        if first[1] > 1:
            var = var * first[1] / (first[1] - 1)
        whitened = (values - mean) * torch.rsqrt(var + 1e-8)
        if not shift_mean:
            whitened = whitened + mean
        return whitened * maskf

    def _global_metrics(self, metrics: dict[str, float], ro: Rollout) -> dict[str, float]:
        """Under torchrun: every rank's update metrics averaged (equal shares of the rollout), throughput
        added, the reward's spread over the whole rollout."""
        n = self.dist.world_size
        summed = self.dist.sum_values({**metrics, "reward_sq_mean": float((ro.rewards**2).mean())})
        combined = {key: value / n for key, value in summed.items()}
        combined["episodes_per_second"] = summed["episodes_per_second"]
        combined["reward_std"] = math.sqrt(
            max(0.0, combined.pop("reward_sq_mean") - combined["reward_mean"] ** 2)
        )
        return combined

    def _minibatch_backward(
        self, ro: Rollout, rows: torch.Tensor, forward: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[PolicyLoss, torch.Tensor, torch.Tensor]:
        """Forward and backward of the minibatch ``rows``: (policy loss, value loss, value clip fraction);
        ``forward``: its (log-probs, values) already computed with gradients (the rollout's first)."""
        hp, models = self.hp, self.models
        width = ro.prompt_ids.size(1)
        mask = ro.response_mask[rows]
        input_ids, attention_mask = ro.input_ids[rows], ro.attention_mask[rows]

        def policy_loss(logprobs: torch.Tensor) -> PolicyLoss:
            return rollout.clipped_policy_loss(
                logprobs, ro.logprobs[rows], ro.advantages[rows], mask, cliprange=hp.cliprange
            )

        def value_loss(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rollout.clipped_value_loss(
                values * mask, ro.values[rows], ro.returns[rows], mask, cliprange_value=hp.cliprange_value
            )

        if models.value_adapter is None:
            # One trunk: the policy's forward gives log-probs and values; one backward.
            if forward is None:
                logprobs, values, _ = self._policy_forward(
                    input_ids, attention_mask, width, ro.responses[rows]
                )
            else:
                logprobs, values = forward
            pg = policy_loss(logprobs)
            vf_loss, vf_clipfrac = value_loss(values)
            (pg.loss + hp.vf_coef * vf_loss).backward()
            return pg, vf_loss, vf_clipfrac
        # Two trunks (policy and value adapters): backward each loss as soon as it is built, so only one graph
        # is alive at a time. The adapters are disjoint, so the gradients are the same.
        hidden = models.hidden_states(input_ids, attention_mask)
        logits = models.response_logits(hidden, width, hp.temperature)
        pg = policy_loss(rollout.token_logprobs(logits, ro.responses[rows]))
        pg.loss.backward()
        del hidden, logits
        with models.role("value"):
            values = models.response_values(models.hidden_states(input_ids, attention_mask), width)
        vf_loss, vf_clipfrac = value_loss(values)
        (hp.vf_coef * vf_loss).backward()
        return pg, vf_loss, vf_clipfrac

    def learn(self, ro: Rollout) -> list[MinibatchStats]:
        """``ppo_epochs`` passes over the rollout, a fresh permutation each (the first is ``first_order``)."""
        hp = self.hp
        stats: list[MinibatchStats] = []
        params = self.models.trainable_parameters
        for epoch in range(hp.ppo_epochs):
            order = (
                ro.first_order
                if epoch == 0
                else torch.randperm(ro.responses.size(0), generator=self.generator)
            )
            for index, rows in enumerate(_chunks(order.to(self.device), self.mini_batch_size)):
                self.optimizer.zero_grad(set_to_none=True)
                forward = ro.first_forward if epoch == 0 and index == 0 else None
                ro.first_forward = None  # its graph is freed by this backward (or dropped, if unused)
                pg, vf_loss, vf_clipfrac = self._minibatch_backward(ro, rows, forward)
                release_freed_memory()  # the pass's activations are freed: their pages back (allocator.py)
                # Each rank's loss is a mean over its share: the gradients are averaged, as DDP does.
                self.dist.reduce_gradients(params, mean=True)
                grad_norm = sharding.clip_grad_norm(params, hp.max_grad_norm)
                if not math.isfinite(grad_norm) or not math.isfinite(float(pg.loss.detach())):
                    raise TrainingError(
                        TRAINING_DIVERGED,
                        f"PPO loss or gradient became non-finite (policy loss {float(pg.loss)}, grad norm "
                        f"{grad_norm}); try a lower learning_rate",
                    )
                self.optimizer.step()
                valid = ro.response_mask[rows].bool()
                ratio = pg.ratio[valid]
                stats.append(
                    MinibatchStats(
                        epoch=epoch,
                        index=index,
                        policy_loss=float(pg.loss.detach()),
                        value_loss=float(vf_loss.detach()),
                        clipfrac=float(pg.clipfrac),
                        value_clipfrac=float(vf_clipfrac),
                        approxkl=float(pg.approxkl),
                        ratio_mean=float(ratio.mean()) if ratio.numel() else 1.0,
                        ratio_max_deviation=float((ratio - 1).abs().max()) if ratio.numel() else 0.0,
                        grad_norm=grad_norm,
                    )
                )
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def step(self, prompts: list[list[int]]) -> UpdateResult:
        """One PPO update: rollout, then ``ppo_epochs`` of clipped minibatch steps; returns its metrics."""
        started = time.perf_counter()
        ro = self.rollout(prompts)
        minibatches = self.learn(ro)
        seconds = time.perf_counter() - started
        mask = ro.response_mask.float()
        n = len(minibatches)

        def mean_of(attr: str) -> float:
            return sum(getattr(m, attr) for m in minibatches) / n

        kl = float(ro.kl.sum(dim=1).mean())
        if self.dist.enabled:  # the controller adapts to the whole rollout's KL, the same on every rank
            kl = self.dist.mean_values({"kl": kl})["kl"]
        kl_coef = self.kl_controller.coef  # the coefficient this update's rewards were penalised with
        # Then adapted to this update's KL, for the next rollout.
        self.kl_controller.update(kl, ro.responses.size(0) * self.dist.world_size)
        metrics = {
            "reward_mean": float(ro.rewards.mean()),
            "reward_std": float(ro.rewards.std(unbiased=False)),
            "score_mean": float(ro.scores.mean()),
            # nats per sequence (sum over the response's tokens), averaged over episodes, as TRL reports it
            "kl": kl,
            "kl_coef": kl_coef,
            **({"kl_target": self.kl_controller.target} if self.kl_controller.adaptive else {}),
            "entropy": float(rollout.masked_mean(ro.entropy, mask)),
            "policy_loss": mean_of("policy_loss"),
            "value_loss": mean_of("value_loss"),
            "clipfrac": mean_of("clipfrac"),
            "value_clipfrac": mean_of("value_clipfrac"),
            "approxkl": mean_of("approxkl"),
            "ratio_mean": mean_of("ratio_mean"),
            "grad_norm": mean_of("grad_norm"),
            "response_length": float(mask.sum(dim=1).mean()),
            "eos_fraction": float(ro.has_eos.float().mean()),
            "episodes_per_second": ro.responses.size(0) / max(seconds, 1e-9),
            "generation_seconds": ro.generation_seconds,
            "update_seconds": seconds,
            "learning_rate": float(self.optimizer.param_groups[0]["lr"]),
        }
        if self.dist.enabled:
            metrics = self._global_metrics(metrics, ro)
        return UpdateResult(metrics=metrics, minibatches=minibatches, rollout=ro)


# --- tokens


def choose_pad_token_id(tokenizer: PreTrainedTokenizerBase, eos_token_id: int) -> int:
    """A pad id distinct from EOS, without resizing the embeddings.

    Our masks never read pad ids (they come from prompt lengths and the EOS position), but reward models and
    programmatic scorers may, and a pad equal to EOS makes an ended answer look padded. SmolLM2 pads with its
    end token; its ``<|endoftext|>`` (id 0) is a real token that a chat answer never needs.
    """
    pad = tokenizer.pad_token_id
    if pad is not None and pad != eos_token_id:
        return int(pad)
    candidates = [tokenizer.get_vocab().get("<|endoftext|>"), tokenizer.bos_token_id, 0]
    for candidate in candidates:
        if isinstance(candidate, int) and candidate >= 0 and candidate != eos_token_id:
            return candidate
    raise TrainingError(INVALID_SPEC, "cannot find a pad token distinct from the EOS token")
