"""Every knob of every method: LoRA settings and one ``*Hyperparameters`` model per method.

These models are the single definition of each knob: the API validates a submission against them (unknown
names are refused; ``service/core/jobs.py`` turns pydantic's errors into API errors), stores the *resolved*
values (defaults filled in) on the job row, and the training child reads the same models back. Each field
carries its help text, as TRL's config dataclasses do.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_serializer, field_validator, model_validator

from contract.evaluation import CandidateSpec, EvaluationSpec, SamplingSettings
from contract.graders import Grader, leaves
from contract.inputs import InputModel
from contract.methods import RL_METHODS, Method, stored_rl_method


class _Strict(InputModel):
    """Strict ints and bools, finite floats, no unknown fields (contract/inputs.py)."""


# Stop sequences, as OpenAI's API takes them: up to 4 non-empty strings. The length cap keeps the per-step tail
# the sampler decodes short (a stop string of n UTF-8 bytes spans at most n tokens).
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
StopSequences = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP_SEQUENCES)
]
STOP_HELP = (
    f"Up to {MAX_STOP_SEQUENCES} stop sequences (1-{MAX_STOP_CHARS} characters each), as OpenAI's API has: "
    "an answer whose decoded text (special tokens skipped) comes to contain one ends there. Its tokens are kept "
    "through the one that completes the stop sequence and EOS is appended, so it counts as ended (no "
    "missing-EOS penalty; the EOS is in its mask and trained on); the text graders see stops before the stop "
    "sequence, which OpenAI also leaves out of the returned text. [] (the default): answers end at EOS only."
)


class LoraSettings(_Strict):
    """LoRA adapter shape, passed to ``peft.LoraConfig``."""

    r: int = Field(16, ge=1, le=1024, description="Rank of the low-rank update matrices.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    # 0 by default (peft's default too): on CPU, a dropout mask per adapted layer was 30% of an SFT step and
    # 4.5 GB of its peak memory on SmolLM2-135M (docs/performance.md, SFT); set it for regularisation.
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input during training (0 = off: faster and lighter; 0.05-0.1 to "
        "regularise small datasets).",
    )
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Module names (or suffixes) to adapt, or 'all-linear' for every linear layer but the "
        "output head.",
    )

    @model_validator(mode="after")
    def _non_empty_targets(self) -> LoraSettings:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        return self


class CommonHyperparameters(_Strict):
    """Knobs every method accepts."""

    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Hard cap on optimizer steps; training stops there even mid-epoch."
    )
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per optimizer step (per device).")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak AdamW learning rate.")
    max_length: int = Field(
        512, ge=8, le=131072, description="Token budget per example; longer examples are truncated."
    )


class OptimizerHyperparameters(CommonHyperparameters):
    """Optimizer and schedule knobs shared by the gradient-descent stages (SFT, reward model, DPO)."""

    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches summed into one optimizer step."
    )
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Share of steps spent warming up the lr.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold (global L2 norm).")
    logging_steps: int = Field(1, ge=1, description="Report metrics every this many optimizer steps.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, about 30% slower."
    )
    checkpoint_steps: int | None = Field(
        None,
        ge=1,
        description="Save a resumable checkpoint every this many optimizer steps (and at the end).",
    )


class SFTHyperparameters(OptimizerHyperparameters):
    """Supervised fine-tuning: next-token loss on completion tokens only."""

    completion_only_loss: bool = Field(
        True, description="Train on completion/assistant tokens only (prompt tokens are masked)."
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="With a 'validation' dataset: its loss and token accuracy (eval_loss, "
        "eval_mean_token_accuracy) every this many optimizer steps and at the end; default: ten times over the "
        "run. Ignored without one.",
    )


class RewardModelHyperparameters(OptimizerHyperparameters):
    """Reward model: a scalar head on the base (LoRA on the body), pairwise loss on chosen vs rejected."""

    epochs: int = Field(1, ge=1, le=1000, description="Passes over the preference pairs.")
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Peak AdamW learning rate.")
    eval_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of pairs held out and scored every eval step (0: no held-out set).",
    )
    eval_steps: int = Field(10, ge=1, description="Score the held-out pairs every this many optimizer steps.")
    margin: float = Field(
        0.0, ge=0, description="Required reward gap: loss is -logsigmoid(r_chosen - r_rejected - margin)."
    )
    center_rewards_coefficient: float = Field(
        0.0, ge=0, description="Weight of the (r_chosen + r_rejected)^2 term that keeps rewards centred on 0."
    )
    min_eval_accuracy: float = Field(
        0.6,
        ge=0,
        le=1,
        description="Quality gate: a reward model whose held-out pair accuracy is below this (or measured on "
        "fewer than min_eval_pairs pairs) does not drive PPO: rlhf stops before PPO (reward_model_too_weak), "
        "and a ppo job naming this reward model is refused at submission unless it sets "
        "allow_weak_reward_model. 0 turns the gate off.",
    )
    min_eval_pairs: int = Field(
        20,
        ge=0,
        le=1_000_000,
        description="Quality gate: the fewest held-out pairs an accuracy is trusted on (3 pairs say little: "
        "0.67 is 2 of 3). Fewer held-out pairs fail the gate whatever the accuracy.",
    )


class DPOHyperparameters(OptimizerHyperparameters):
    """Direct preference optimisation; the reference is the same base with the adapter disabled."""

    epochs: int = Field(1, ge=1, le=1000, description="Passes over the preference pairs.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Peak AdamW learning rate.")
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint to the reference.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO: assumed label-noise rate."
    )
    max_prompt_length: int = Field(256, ge=1, description="Token budget for the prompt part of each pair.")
    eval_steps: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="With a 'validation' dataset (preference pairs): its DPO loss, reward accuracy and margin "
        "(eval_loss, eval_accuracy, eval_margin) every this many optimizer steps and at the end; default: ten "
        "times over the run. Ignored without one.",
    )
    # With an init adapter (the SFT policy) the literature's reference is that SFT policy, not the bare base;
    # the worker loads it a second time as a frozen adapter on the same base, so it costs no second model.
    reference_model: Literal["init_adapter", "base"] = Field(
        "init_adapter",
        description="Reference policy when init_adapter is given: a frozen copy of the init adapter (the SFT "
        "model, as in the DPO paper) or the bare base. Without init_adapter it is always the base.",
    )


MonitorName = Literal["length", "kl", "entropy", "eos", "reward_divergence"]


class PPOMonitorSettings(_Strict):
    """Reward-hacking monitors, checked after every PPO update (a warning event and an entry in the job's
    ``monitors`` the first time each one fires). Baselines are the first ``baseline_updates`` updates."""

    baseline_updates: int = Field(
        5,
        ge=1,
        le=10000,
        description="Updates whose metrics are the baseline of the length, entropy and EOS monitors.",
    )
    length_std: float | None = Field(
        3.0,
        gt=0,
        description="length: fires when an update's mean response length exceeds the baseline's mean by more "
        "than this many standard deviations of the baseline's per-answer lengths (at least 1 token). Growth "
        "only: answers getting shorter is not flagged. null: off.",
    )
    kl_max: float | None = Field(
        20.0,
        gt=0,
        description="kl: fires when an update's KL to the reference (nats per answer, summed over its tokens) "
        "is above this ceiling. null: off.",
    )
    entropy_fraction: float | None = Field(
        0.3,
        gt=0,
        lt=1,
        description="entropy: fires when an update's mean per-token entropy falls below this fraction of the "
        "baseline's mean (the policy collapsing onto a few answers). null: off.",
    )
    eos_from: float | None = Field(
        0.5,
        gt=0,
        le=1,
        description="eos: armed when the baseline's mean EOS rate (share of answers that end) is at least "
        "this; fires when an update's EOS rate then falls to eos_to or below (answers stop ending: a length "
        "hack). null: off.",
    )
    eos_to: float = Field(0.1, ge=0, lt=1, description="eos: the EOS rate at or below which it fires.")
    held_out_metric: str | None = Field(
        "eval/*/mean",
        min_length=1,
        max_length=128,
        description="reward_divergence: the metric series of a held-out grader (a name or an fnmatch pattern; "
        "every matching series is watched). Fires when, over the last divergence_window points of such a "
        "series, the proxy reward (reward_mean) rises while the series falls (least-squares slopes). A job "
        "that logs no such series says so in an event and the monitor does nothing. null: off.",
    )
    divergence_window: int = Field(
        5, ge=2, le=10000, description="reward_divergence: points of the held-out series the slopes use."
    )
    stop_on: list[MonitorName] = Field(
        default_factory=list,
        description="Monitors that end the job when they fire: PPO stops after that update and the job "
        "succeeds with status_reason 'stopped_by_monitor'; its output is chosen by keep_on_stop.",
    )
    keep_on_stop: Literal["best_held_out", "newest"] = Field(
        "best_held_out",
        description="The output of a run a stop_on monitor ended. best_held_out: the policy at the held-out "
        "evaluation point (hyperparameters.eval) with the highest score on the first series matching "
        "held_out_metric (sorted by name; a tie keeps the earlier policy, nearer the reference), since the stop "
        "means the newest policy was drifting; newest when no held-out evaluation ran. newest: always the policy of the update the run stopped after.",
    )

    @model_validator(mode="after")
    def _stop_on_monitors_that_run(self) -> PPOMonitorSettings:
        off = {
            "length": self.length_std is None,
            "kl": self.kl_max is None,
            "entropy": self.entropy_fraction is None,
            "eos": self.eos_from is None,
            "reward_divergence": self.held_out_metric is None,
        }
        stopped_but_off = sorted({name for name in self.stop_on if off[name]})
        if stopped_but_off:
            raise ValueError(f"stop_on names monitors that are off: {stopped_but_off}")
        if self.eos_from is not None and self.eos_to >= self.eos_from:
            raise ValueError(f"eos_to ({self.eos_to}) must be below eos_from ({self.eos_from})")
        return self


class HeldOutEvalSettings(_Strict):
    """A held-out evaluation inside an online job (ppo, grpo, rloo): every ``every`` updates (and after the
    last) the current policy answers the first ``max_prompts`` prompts of the ``prompts`` dataset greedily, each
    answer is graded by every grader (the evaluate job's scoring), and the means go out as metric series
    ``eval/<grader>/mean``. An rlhf job's final evaluation runs on its last stage's block."""

    prompts: str = Field(
        description="A prompts dataset id (ds_...) held out from training; its rows are the graders' items."
    )
    graders: list[Grader] = Field(
        min_length=1,
        max_length=16,
        description="Graders as in an evaluate job (docs/graders.md); reward_model graders name an artifact.",
    )
    every: int = Field(10, ge=1, le=100000, description="Evaluate after every this many updates.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Answer length limit in tokens.")
    max_prompts: int | None = Field(
        64, ge=1, le=100000, description="Evaluate the dataset's first N prompts (None: all of them)."
    )
    batch_size: int = Field(8, ge=1, le=512, description="Prompts answered together.")

    @field_serializer("graders")
    def _graders_json(self, graders: list[Any]) -> list[dict[str, Any]]:
        # Stored and handed to the child in their JSON form (json_schema's spec under its OpenAI name).
        return [grader.model_dump(mode="json", by_alias=True) for grader in graders]

    def as_evaluation(
        self, candidates: list[CandidateSpec], *, max_prompt_length: int, baseline: str | None = None
    ) -> EvaluationSpec:
        """The block as an evaluate job's spec for ``candidates``: its graders, greedy answers of at most its
        max_new_tokens, its max_prompts and batch_size, prompts cut to ``max_prompt_length`` tokens (>= 8)."""
        return EvaluationSpec(
            candidates=candidates,
            baseline=baseline,
            graders=self.graders,
            sampling=SamplingSettings(
                max_new_tokens=self.max_new_tokens,
                temperature=0.0,
                max_prompt_length=max(8, max_prompt_length),
                batch_size=self.batch_size,
                max_prompts=self.max_prompts,
            ),
        )


# The TrainingSpec dataset role under which the runner hands the child the eval block's prompts.
HELD_OUT_EVAL_ROLE = "eval_prompts"


def held_out_eval_block(method: str, hyperparameters: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(The resolved eval block of a ppo, grpo or rloo job or of an rlhf job's last stage, or None; its field
    path)."""
    if method in RL_METHODS:
        values, prefix = hyperparameters, "hyperparameters"
    elif method == Method.rlhf:
        stage = stored_rl_method(hyperparameters)
        values, prefix = hyperparameters.get(stage) or {}, f"hyperparameters.{stage}"
    else:
        return None, ""
    block = values.get("eval") if isinstance(values, dict) else None
    return (block if isinstance(block, dict) else None), f"{prefix}.eval"


class PPOHyperparameters(CommonHyperparameters):
    """PPO against a reward model with a per-token KL penalty to the reference (the adapter disabled)."""

    epochs: int | None = Field(  # type: ignore[assignment]
        None,
        ge=1,
        le=1000,
        description="Cap on passes over the prompts; unset: prompts are recycled until `steps` updates.",
    )
    steps: int = Field(100, ge=1, le=100000, description="PPO updates (one rollout batch each).")
    batch_size: int = Field(8, ge=1, le=4096, description="Alias of rollout_batch_size for uniformity.")
    rollout_batch_size: int | None = Field(
        None, ge=1, le=4096, description="Prompts generated per PPO update (default: batch_size)."
    )
    mini_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Episodes per optimizer step within an update (default: the rollout).",
    )
    ppo_epochs: int = Field(4, ge=1, le=100, description="Passes over each rollout, fresh permutation each.")
    # Measured on SmolLM2-135M + LoRA r16 (shared/NOTES.md): TRL's 3e-6 leaves a LoRA policy unchanged in
    # 30 updates; 1e-4 raises held-out reward clearly. LoRA needs a higher lr than full fine-tuning.
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Adam learning rate (eps 1e-5).")
    max_length: int = Field(256, ge=8, le=131072, description="Token budget for the prompt (left-truncated).")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Longest sampled response.")
    temperature: float = Field(
        0.7, gt=0, le=10, description="Sampling temperature (logits are divided by it)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    kl_coef: float = Field(
        0.05,
        ge=0,
        description="Per-token KL penalty coefficient; with kl_control 'adaptive', its starting value.",
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="Per-token KL estimator in the penalty (and in the kl metric and the adaptive controller): "
        "k1 = log p - log q (TRL's default; unbiased, negative on some tokens), k3 = q/p - 1 - log(q/p) "
        "(unbiased, never negative, lower variance); p the policy, q the reference, on the sampled token.",
    )
    # "fixed" stays the default until the alignment benchmark (issue 16) measures the adaptive controller on a
    # real model; the adaptive controller's defaults are TRL's former AdaptiveKLController's.
    kl_control: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="fixed: kl_coef throughout. adaptive: Ziegler et al. 2019's controller (TRL's former "
        "AdaptiveKLController): after each update, with e = clip(kl / kl_target - 1, -0.2, 0.2) from that "
        "update's kl (nats per answer), kl_coef *= 1 + e * rollout_size / kl_horizon. The default stays fixed "
        "until a benchmark on a real model shows the adaptive one does better.",
    )
    kl_target: float = Field(
        6.0,
        gt=0,
        le=1000,
        description="adaptive: the KL per answer (nats, summed over its tokens) the controller steers to.",
    )
    kl_horizon: int = Field(
        10000,
        ge=1,
        le=10_000_000,
        description="adaptive: the controller's time constant in episodes; each update moves kl_coef by at "
        "most a factor 1 +- 0.2 * rollout_size / kl_horizon.",
    )
    stop: StopSequences = Field(default_factory=list, description=STOP_HELP)
    cliprange: float = Field(0.2, gt=0, lt=1, description="Policy ratio clip.")
    cliprange_value: float = Field(0.2, gt=0, description="Value prediction clip around the old values.")
    vf_coef: float = Field(0.1, ge=0, description="Value-loss weight.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards before GAE.")
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="Subtracted from the score of a response that never emits EOS."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold (global L2 norm).")
    value_model: Literal["head", "adapter"] = Field(
        "head",
        description="Value function: a head on the policy's trunk, or a third adapter from the reward model.",
    )
    logging_steps: int = Field(1, ge=1, description="Report metrics every this many PPO updates.")
    checkpoint_steps: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every this many PPO updates (and at the end)."
    )
    monitors: PPOMonitorSettings = Field(
        default_factory=PPOMonitorSettings,
        description="Reward-hacking monitors (length, KL, entropy, EOS rate, proxy vs held-out reward) and "
        "which of them stop the job.",
    )
    eval: HeldOutEvalSettings | None = Field(
        None,
        description="Held-out evaluation during training (prompts, graders, every): metric series "
        "eval/<grader>/mean, read by the reward_divergence monitor.",
    )
    allow_weak_reward_model: bool = Field(
        False,
        description="Run PPO on a reward model that fails its quality gate (held-out accuracy under its "
        "min_eval_accuracy, or fewer than min_eval_pairs held-out pairs); otherwise the job is refused with "
        "reward_model_too_weak (rlhf: stopped before PPO).",
    )

    @model_validator(mode="after")
    def _adaptive_needs_a_coefficient(self) -> PPOHyperparameters:
        # The controller multiplies the coefficient: from 0 it could never move.
        if self.kl_control == "adaptive" and self.kl_coef == 0:
            raise ValueError("kl_control 'adaptive' needs kl_coef > 0 (its starting value)")
        return self


# Stage defaults of an rlhf job that differ from the method's own (the stage's given values win). Its grpo stage
# optimises the reward model its reward stage just trained, which a policy can exploit, so beta (the KL weight)
# is 0.2 rather than grpo's 0 (TRL's default, made for rule graders): on SmolLM2 (bench/alignment_quality.py)
# beta 0.04 let the KL reach 8.29 nats per answer, above TRL PPO's 4.78; beta 0.2 held it to 2.39-3.23, under
# half of TRL's in the same runs.
RLHF_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {Method.grpo.value: {"beta": 0.2}}


class RLHFSettings(_Strict):
    """The rlhf job's own knobs, beside its one object per stage (``sft``, ``reward_model``, ``<rl_method>``)."""

    rl_method: Literal["ppo", "grpo", "rloo"] = Field(
        "grpo",  # DEFAULT_RL_METHOD (a Literal needs the value written out; a unit test keeps them equal)
        description="The last stage: ppo, grpo or rloo (its knobs under the key of that name). grpo by default: "
        "it learned to end answers where ppo did not, at under half TRL PPO's KL (docs/performance.md). The "
        "grpo stage's beta defaults to 0.2 here (RLHF_STAGE_DEFAULTS), not grpo's 0.",
    )
    final_evaluation: bool = Field(
        True,
        description="After the last stage, evaluate the base, the SFT adapter and the final policy on that "
        "stage's held-out eval block (its prompts and graders; greedy, its max_new_tokens), baseline the base, "
        "as an evaluate job does: an eval artifact, read at GET /v1/jobs/{id}/evaluation. A job whose last "
        "stage has no eval block (only ppo takes one) evaluates nothing and says so in an event.",
    )


# Grader names become metric names (reward/<name>), which hold 64 characters.
REWARD_NAME_PATTERN = r"[A-Za-z0-9_.-]{1,48}"
REWARD_MODEL_SERIES = "reward_model"  # the job's reward model's series: reward/reward_model


class GroupHyperparameters(CommonHyperparameters):
    """GRPO and RLOO: a group of answers per prompt, advantages from the group, a token-level clipped loss.

    Rewards are the weighted sum of ``graders`` (rule graders, or a score_model judge that is the job's base
    model) and, when the job names a ``reward_model``, that reward model's score times ``reward_model_weight``.
    """

    epochs: int | None = Field(  # type: ignore[assignment]
        None,
        ge=1,
        le=1000,
        description="Cap on passes over the prompts; unset: prompts are recycled until `steps` updates.",
    )
    steps: int = Field(100, ge=1, le=100000, description="Updates (one group of answers per prompt each).")
    batch_size: int = Field(
        4, ge=1, le=4096, description="Prompts per update; each is answered num_generations times."
    )
    num_generations: int = Field(8, ge=2, le=64, description="Answers sampled per prompt (the group, G).")
    num_iterations: int = Field(
        1,
        ge=1,
        le=100,
        description="Optimizer steps on each group of answers (TRL's num_iterations, the PPO epochs). Above 1 the "
        "later passes are off-policy and the importance ratio (clipped by epsilon) corrects for it.",
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Answers per forward/backward pass; their gradients are summed into one optimizer step "
        "(default: all batch_size * num_generations at once).",
    )
    # As PPO (shared/NOTES.md): a LoRA policy needs a far higher learning rate than TRL's full-model 1e-6.
    learning_rate: float = Field(1e-4, gt=0, lt=1, description="Adam learning rate (eps 1e-5, constant).")
    max_length: int = Field(256, ge=8, le=131072, description="Token budget for the prompt (left-truncated).")
    max_new_tokens: int = Field(
        64, ge=1, le=4096, description="Longest sampled answer (TRL's max_completion_length)."
    )
    temperature: float = Field(
        1.0, gt=0, le=10, description="Sampling temperature (logits are divided by it)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    stop: StopSequences = Field(default_factory=list, description=STOP_HELP)
    beta: float = Field(
        0.0,
        ge=0,
        description="KL coefficient to the reference (the base with the adapter disabled, or the frozen "
        "init_adapter). 0: no KL term (TRL's default); the KL is still measured and logged, every "
        "kl_metric_steps updates.",
    )
    kl_metric_steps: int = Field(
        10,
        ge=1,
        le=1_000_000,
        description="With beta 0 the KL to the reference is a metric only, and measuring it costs a no-grad "
        "forward of the reference (about 14% of an update on SmolLM2): it is measured at the first update, "
        "every this many, and at the last. 1: every update. With beta > 0 it is every update (the loss needs it).",
    )
    epsilon: float = Field(
        0.2, gt=0, lt=1, description="Clip of the importance ratio: [1 - epsilon, 1 + epsilon_high]."
    )
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip (DAPO's clip-higher, e.g. 0.28); default: epsilon."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Advantage scaling after the baseline: divide by the group's reward std ('group'), by the "
        "std over the whole batch ('batch'), or not at all ('none', Dr. GRPO's advice).",
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo",
        description="How per-token losses are averaged: grpo: per answer over its tokens, then over answers; "
        "bnpo: over the tokens of each micro-batch; dr_grpo: summed and divided by answers * max_new_tokens; "
        "dapo: over the tokens of the whole update (TRL's default).",
    )
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the reward of an answer cut by max_new_tokens (no EOS)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold (global L2 norm).")
    gradient_checkpointing: bool = Field(
        True,
        description="Keep only each decoder layer's inputs in the training pass and recompute the rest in the "
        "backward: far less memory for one more forward of the layers (as TRL's GRPO default; docs/grpo.md "
        "has both measured). false: faster where memory is plentiful.",
    )
    graders: list[Grader] = Field(
        default_factory=list,
        max_length=16,
        description="Reward graders (docs/graders.md), each scoring every answer; {{item.<field>}} reads the "
        "prompt's dataset row. reward_model graders are refused: name the reward model as the job's "
        "reward_model.",
    )
    reward_weights: list[float] | None = Field(
        None, description="One weight per grader, in order (default: 1 each). The reward is the weighted sum."
    )
    reward_model_weight: float = Field(
        1.0, description="Weight of the job's reward_model score in the reward (when the job names one)."
    )
    logging_steps: int = Field(1, ge=1, description="Report metrics every this many updates.")
    checkpoint_steps: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every this many updates (and at the end)."
    )
    eval: HeldOutEvalSettings | None = Field(
        None,
        description="Held-out evaluation during training (prompts, graders, every): metric series "
        "eval/<grader>/mean, eval/eos_rate, eval/mean_length, eval/kl_to_base; an rlhf job's final evaluation "
        "runs on it.",
    )

    @field_validator("graders")
    @classmethod
    def _graders(cls, graders: list[Any]) -> list[Any]:
        names = [grader.name for grader in graders]
        for name in names:
            if re.fullmatch(REWARD_NAME_PATTERN, name) is None:
                raise ValueError(
                    f"grader name {name!r} must match {REWARD_NAME_PATTERN} (it names reward/<name>)"
                )
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"grader names must be unique (they name reward/<name>): {duplicates}")
        if REWARD_MODEL_SERIES in names:
            raise ValueError(
                f"'{REWARD_MODEL_SERIES}' names the job's reward model series; rename the grader"
            )
        for grader in graders:
            if any(leaf.type == "reward_model" for _, leaf in leaves(grader)):
                raise ValueError(
                    f"grader {grader.name!r}: reward_model graders are not used here; name the reward model "
                    "as the job's reward_model (weighted by reward_model_weight)"
                )
        return graders

    @field_validator("reward_weights")
    @classmethod
    def _one_weight_per_grader(cls, weights: list[float] | None, info: ValidationInfo) -> list[float] | None:
        graders = info.data.get("graders")
        if weights is not None and graders is not None and len(weights) != len(graders):
            raise ValueError(f"{len(weights)} weights for {len(graders)} graders: give one per grader")
        return weights

    def weights(self) -> list[float]:
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * len(self.graders)


class GRPOHyperparameters(GroupHyperparameters):
    """GRPO: advantage = reward - the group's mean (scaled by scale_rewards); KL (k3) in the loss with beta."""


class RLOOHyperparameters(GroupHyperparameters):
    """RLOO: advantage = reward - the mean of the other answers of the group (leave-one-out); with beta > 0
    the answer's KL to the reference (summed k3) is subtracted from its reward, as in the RLOO paper and TRL."""

    batch_size: int = Field(
        8, ge=1, le=4096, description="Prompts per update; each is answered num_generations times."
    )
    num_generations: int = Field(4, ge=2, le=64, description="Answers sampled per prompt (the group, K).")
    beta: float = Field(
        0.05,
        ge=0,
        description="KL coefficient: beta * (the answer's summed k3 KL to the reference) is subtracted from its "
        "reward (TRL's RLOO default 0.05). 0: no KL term; the KL is still logged.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "none",
        description="Advantage scaling after the leave-one-out baseline: by the group's reward std, the batch's, "
        "or none (the default, as TRL's normalize_advantages=False).",
    )


class GenerateHyperparameters(_Strict):
    """Candidate generation: K sampled answers per prompt, written as a ``candidates`` dataset for labelling."""

    num_responses: int = Field(
        4, ge=2, le=16, description="Answers sampled per prompt (the K annotators will rank; 2..16)."
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Longest sampled answer, in tokens.")
    temperature: float = Field(
        1.0, gt=0, le=10, description="Sampling temperature; lower gives safer, more similar answers."
    )
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling threshold.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Sampling seed (default: the job's seed).")
    batch_size: int = Field(8, ge=1, le=1024, description="Prompts sampled together (each K times).")
    max_length: int = Field(
        512, ge=8, le=131072, description="Token budget for the prompt; longer prompts keep their end."
    )
    max_prompts: int | None = Field(
        None, ge=1, description="Use only the first this many prompts of the dataset."
    )


# The longest completion a chat job samples, in tokens (the facade refuses a larger max_tokens with a 400).
MAX_CHAT_TOKENS = 4096
# Completions sampled for one chat request (OpenAI's ``n``): all in one batch, on the worker's device.
MAX_CHAT_CHOICES = 8
# A chat job's error codes for a request the model cannot take as sent (found by the child, which holds the
# tokenizer and the model's config): the facade answers them 400 naming ``messages``; other failures are 500s.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
INVALID_MESSAGES = "invalid_messages"


class ChatMessage(_Strict):
    """One message of a chat job, already in alignd's terms (the facade maps OpenAI's spellings onto these)."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatHyperparameters(_Strict):
    """One chat completion: the messages, under the base model's chat template, and the sampling settings.

    The job behind ``POST /openai/v1/chat/completions`` (docs/openai.md). The job's ``seed`` seeds the sampler.
    """

    messages: list[ChatMessage] = Field(min_length=1, max_length=1000, description="The conversation so far.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_CHAT_TOKENS,
        description="Longest completion, in tokens; None: what the model's context leaves after the prompt, "
        f"at most {MAX_CHAT_TOKENS}.",
    )
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature; 0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1: off).")
    n: int = Field(1, ge=1, le=MAX_CHAT_CHOICES, description="Completions sampled, in one batch.")
    stop: StopSequences = Field(
        default_factory=list,
        description=f"Up to {MAX_STOP_SEQUENCES} texts (1-{MAX_STOP_CHARS} characters each) that end a "
        "completion where they first appear, left out of it.",
    )


class ScoreHyperparameters(_Strict):
    """A feedback set's ``score`` job: the job's reward model scores every response of every item."""

    max_length: int = Field(
        512, ge=8, le=131072, description="Token budget per (prompt, response); longer ones keep their end."
    )


# The artifact kinds a feedback set's jobs write; their metadata carries the result the set reads.
ITEM_SCORES_KIND = "item_scores"
JUDGE_LABELS_KIND = "judge_labels"


class JudgeHyperparameters(_Strict):
    """A feedback set's ``judge`` job: a causal LM (the base, or the base with ``init_adapter``) compares
    every pair of each item's responses in both orders, under the set's guidelines as its rubric."""

    name: str = Field(min_length=1, max_length=64, description="The judge's name; it labels as judge:<name>.")
    rubric: str = Field("", max_length=20_000, description="The set's guidelines (Markdown).")
    max_new_tokens: int = Field(8, ge=1, le=256, description="Longest answer the judge gives per question.")
    max_length: int = Field(1024, ge=16, le=131072, description="Token budget per question (left-cut).")
    max_items: int | None = Field(None, ge=1, description="Judge only the first this many items.")
    verdict: Literal["answer", "logprobs"] = Field(
        "answer",
        description="'answer': the judge's greedy answer, a pair labelled only when both orders name the same "
        "response. 'logprobs': no generation; the log-odds of '1' over '2' as the answer's first token in "
        "each order, and the pair labelled by their difference, so a constant preference for a position "
        "cancels and every pair gets a verdict (an exact tie excepted).",
    )


HYPERPARAMETER_MODELS: dict[Method, type[_Strict]] = {
    Method.sft: SFTHyperparameters,
    Method.reward_model: RewardModelHyperparameters,
    Method.dpo: DPOHyperparameters,
    Method.ppo: PPOHyperparameters,
    Method.grpo: GRPOHyperparameters,
    Method.rloo: RLOOHyperparameters,
    Method.generate: GenerateHyperparameters,
    Method.chat: ChatHyperparameters,
    Method.score: ScoreHyperparameters,
    Method.judge: JudgeHyperparameters,
}
