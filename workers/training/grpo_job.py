"""The GRPO and RLOO jobs: spec -> the roles on one shared base -> the shared training loop -> the policy adapter.

:func:`build_session` reads the prompts (their rows too: graders read ``{{item.<field>}}``), loads the base
once and hangs the policy, the reference and the reward model on it (see ``grpo.py`` for the algorithm);
:class:`GroupJob` is the hooks on :class:`~workers.training.loop.Trainer`, one step being one update, sharing
the checkpoints, logging, cancel checks, model card and artifact lines with every other method.
:func:`train_grpo` and :func:`train_rloo` are the entry points (the registry's, and the rlhf pipeline's).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from contract.graders import RewardModelGrader, leaves
from contract.hyperparameters import (
    REWARD_MODEL_SERIES,
    GroupHyperparameters,
    GRPOHyperparameters,
    LoraSettings,
    RLOOHyperparameters,
)
from contract.protocol import DatasetRef, TrainingSpec
from workers.training import checkpoint, data, loop, lora, rollout, sharding
from workers.training.context import RunContext
from workers.training.distributed import SINGLE, Dist
from workers.training.errors import INVALID_SPEC, TrainingError
from workers.training.grpo import (
    REWARD_ADAPTER,
    GroupModels,
    GroupTrainer,
    PromptRow,
    RewardScorer,
    StepResult,
    read_prompt_rows,
)
from workers.training.held_out_eval import HeldOutEval
from workers.training.ppo import choose_pad_token_id, load_scalar_adapter
from workers.training.scoring import ChildScorer, SharedModels

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class GroupSession:
    """Everything :func:`build_session` builds; :class:`GroupJob` runs the loop on it (tests may drive it)."""

    method: str
    hp: GroupHyperparameters
    tokenizer: PreTrainedTokenizerBase
    models: GroupModels
    trainer: GroupTrainer
    rows: list[PromptRow]
    prompts: list[list[int]]
    dataset_sha256: str
    total_updates: int
    prompt_order: loop.IndexCycle
    seed: int = 0

    def step(self, *, dist: Dist = SINGLE, update: int = 0, measure_kl: bool = True) -> StepResult:
        """One update on the next prompts (what the job's train_step does, without the logging).

        Under torchrun every rank draws the same prompts and samples the groups of its share, from a sampling
        stream of (seed, update, rank) alone: distinct across ranks, the same again on a resumed attempt."""
        indices = dist.shard(self.prompt_order())
        if dist.enabled:
            seed = ((self.seed * 1_000_003 + update) * 4099 + dist.rank) % 2**63
            self.trainer.generator.manual_seed(seed)
        return self.trainer.step(
            [self.prompts[i] for i in indices], [self.rows[i] for i in indices], measure_kl=measure_kl
        )


# --- spec -> roles


def _check_spec(spec: TrainingSpec, hp: GroupHyperparameters, method: str) -> DatasetRef:
    """The spec's prompts dataset, after refusing a spec that lacks what the method needs."""
    dataset_ref = spec.datasets.get("prompts")
    if dataset_ref is None:
        raise TrainingError(INVALID_SPEC, f"method {method} needs a dataset with role 'prompts'")
    if not hp.graders and spec.reward_model is None:
        raise TrainingError(INVALID_SPEC, f"method {method} needs graders, a reward_model, or both")
    for grader in hp.graders:
        for path, leaf in leaves(grader):
            if leaf.type == "score_model" and spec.resources.strategy == "fsdp":
                # The judge decodes a different number of tokens on each rank; sharded layers need lock-step.
                raise TrainingError(
                    INVALID_SPEC,
                    f"grader {path}: a score_model judge cannot run with strategy 'fsdp'; use 'ddp'",
                )
            if leaf.type == "score_model" and leaf.model != spec.base_model.id:
                raise TrainingError(
                    INVALID_SPEC,
                    f"grader {path}: a score_model judge here is the job's base model ({spec.base_model.id}), "
                    f"not {leaf.model!r}",
                )
    return dataset_ref


def _attach_roles(
    ctx: RunContext,
    lora_settings: LoraSettings,
    device: torch.device,
    tokenizer: PreTrainedTokenizerBase,
    *,
    eos_token_id: int,
    pad_token_id: int,
    checkpoint_layers: bool,
) -> GroupModels:
    """Load the base once; the policy adapter, the reference (frozen init adapter, or none: the adapters
    disabled) and the reward model's adapter and head go onto it."""
    spec = ctx.spec
    load_on = sharding.load_device(ctx.dist, device)
    base = lora.load_base_model(spec.base_model.path, device=load_on, precision=spec.resources.precision)
    init_path = spec.init_adapter.path if spec.init_adapter else None
    peft_model, reference_adapter = lora.attach_policy_and_reference(
        base, lora_settings, init_adapter=init_path, seed=spec.seed
    )
    shared = SharedModels(
        model=peft_model,
        tokenizer=tokenizer,
        device=device,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if spec.reward_model is not None:
        head = load_scalar_adapter(peft_model, spec.reward_model.path, REWARD_ADAPTER, trainable=False)
        shared.reward_heads[_artifact_id(spec)] = (REWARD_ADAPTER, head.to(device))
    peft_model.set_adapter(lora.POLICY_ADAPTER)
    # Dropout off for good: with it on, the training forward would not reproduce the sampling log-probs.
    peft_model.eval()
    if ctx.dist.sharded:  # before GroupModels records the trainable parameters: FSDP makes new ones
        sharded = sharding.shard_layers(peft_model, ctx.dist, device)
        ctx.progress.event(sharded.describe(ctx.dist.world_size), stage=spec.method)
    return GroupModels(
        peft_model,
        reference_adapter=reference_adapter,
        shared=shared,
        share_prompts=not ctx.dist.sharded,
        checkpoint_layers=checkpoint_layers,
    )


def build_session(
    ctx: RunContext, hp: GroupHyperparameters, lora_settings: LoraSettings, *, method: str
) -> GroupSession:
    """Read the prompts, load the one base copy with every role on it, build the trainer."""
    spec, progress = ctx.spec, ctx.progress
    dataset_ref = _check_spec(spec, hp, method)
    rows = read_prompt_rows(dataset_ref.path)
    tokenizer = lora.load_tokenizer(spec.base_model.path)
    prompts, truncated = rollout.encode_prompts(
        tokenizer, [r.messages for r in rows], max_length=hp.max_length
    )
    if tokenizer.eos_token_id is None:
        raise TrainingError(
            INVALID_SPEC, f"the tokenizer has no EOS token; {method} needs one to end answers"
        )
    eos = int(tokenizer.eos_token_id)
    pad = choose_pad_token_id(tokenizer, eos)
    progress.event(
        f"dataset {dataset_ref.name}: {len(prompts)} prompts, {sum(map(len, prompts))} tokens"
        + (f", {truncated} cut from the left to {hp.max_length} tokens" if truncated else "")
        + f"; {hp.num_generations} answers per prompt, {hp.batch_size} prompts per update",
        stage=method,
    )
    total_updates = loop.count_updates(
        steps=hp.steps,
        epochs=hp.epochs,
        max_steps=hp.max_steps,
        n_prompts=len(prompts),
        per_update=hp.batch_size,
        progress=progress,
        stage=method,
    )
    device = lora.pick_device()
    models = _attach_roles(
        ctx,
        lora_settings,
        device,
        tokenizer,
        eos_token_id=eos,
        pad_token_id=pad,
        checkpoint_layers=hp.gradient_checkpointing,
    )
    needs_scorer = spec.reward_model is not None or any(
        leaf.type == "score_model" for grader in hp.graders for _, leaf in leaves(grader)
    )
    reward_model = (
        RewardModelGrader(type="reward_model", name=REWARD_MODEL_SERIES, artifact=_artifact_id(spec))
        if spec.reward_model is not None
        else None
    )
    scorer = (
        ChildScorer(models.shared, base_model_id=spec.base_model.id, seed=spec.seed) if needs_scorer else None
    )
    _, n_total = lora.count_parameters(models.peft)
    progress.event(
        f"base {spec.base_model.name} on {device.type}, one shared copy: {n_total:,} parameters, "
        f"{sum(p.numel() for p in models.trainable):,} trainable (the policy adapter); reference = "
        + ("the init adapter, frozen" if models.reference_adapter else "the base (adapter disabled)")
        + "; reward = "
        + " + ".join(f"{w:g} x {g.name}" for g, w in zip(hp.graders, hp.weights(), strict=True))
        + (" + " if hp.graders and reward_model else "")
        + (f"{hp.reward_model_weight:g} x the reward model adapter" if reward_model else ""),
        stage=method,
    )
    trainer = GroupTrainer(
        models,
        RewardScorer(hp, scorer=scorer, reward_model=reward_model),
        hp,
        tokenizer=tokenizer,
        leave_one_out=method == "rloo",
        eos_token_id=eos,
        pad_token_id=pad,
        generator=torch.Generator(device="cpu").manual_seed(spec.seed),
        dist=ctx.dist,
    )
    return GroupSession(
        method=method,
        hp=hp,
        tokenizer=tokenizer,
        models=models,
        trainer=trainer,
        rows=rows,
        prompts=prompts,
        dataset_sha256=data.sha256_file(dataset_ref.path),
        total_updates=total_updates,
        prompt_order=loop.IndexCycle(len(prompts), hp.batch_size, seed=spec.seed),
        seed=spec.seed,
    )


def _artifact_id(spec: TrainingSpec) -> str:
    # ChildScorer finds a reward model by artifact id; an rlhf stage's reward model is named
    # "<job>/reward_model", which is not an art_... id, so the grader gets a stand-in of the right shape.
    assert spec.reward_model is not None
    return spec.reward_model.id if spec.reward_model.id.startswith("art_") else "art_stage"


# --- roles -> the shared loop -> outputs


class GroupJob(loop.Trainer[GroupHyperparameters, None]):
    """GRPO's or RLOO's hooks on the shared loop: one step is one update (sample, score, ``num_iterations``)."""

    hyperparameters_model: ClassVar[type[GroupHyperparameters]]
    title: ClassVar[str]

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx, self.hyperparameters_model)
        self.session = session = build_session(ctx, self.hp, self.lora_settings, method=self.method)
        # Built before init_loop: its extra reward/judge adapters are part of the checkpointed modules.
        self.held_out = self._held_out_eval() if self.hp.eval is not None else None
        # Everything an update depends on: the policy adapter, Adam's moments, the sampling generator, the
        # prompt order; dropout is off, so no global RNG. Judges draw from their own seeded generators.
        self.init_loop(
            total=session.total_updates,
            logging_steps=self.hp.logging_steps,
            checkpoint_steps=self.hp.checkpoint_steps,
            modules={"peft": session.models.peft},
            optimizer=session.trainer.optimizer,
            extra_rng={"sampling": session.trainer.generator, "prompt_order": session.prompt_order.rng},
        )

    def schedule(self, step: int, resumed: checkpoint.ResumeState | None) -> Iterator[tuple[int, int, None]]:
        for update in range(step + 1, self.total + 1):
            yield 0, update, None

    def on_start(self, resumed: checkpoint.ResumeState | None) -> None:
        if resumed is not None:
            self.session.prompt_order.load(resumed.extra.get("prompt_order", []))

    def checkpoint_extra(self) -> dict[str, Any]:
        return {**super().checkpoint_extra(), "prompt_order": self.session.prompt_order.state()}

    def train_step(self, step: int, batch: None) -> None:
        # At beta 0 the KL is a metric only: measured at this attempt's first update, every kl_metric_steps
        # and at the last (the trainer measures every update when beta > 0).
        every = self.hp.kl_metric_steps
        measure_kl = not self.logger.history or step % every == 0 or step == self.total
        result = self.session.step(dist=self.ctx.dist, update=step, measure_kl=measure_kl)
        values = dict(result.metrics)
        evaluated = self.held_out is not None and self.held_out.due(step, self.total)
        if self.held_out is not None and evaluated:
            values.update(self.held_out.run())  # eval/<grader>/mean beside the training series
        # Every update's metrics stay in the history; the metric line goes out every logging_steps (and with
        # every held-out evaluation).
        self.logger.log(step, values, emit=self.logger.due(step) or evaluated)

    def _held_out_eval(self) -> HeldOutEval:
        assert self.hp.eval is not None
        spec, models, trainer = self.spec, self.session.models, self.session.trainer
        own = models.shared.reward_heads.get(_artifact_id(spec)) if spec.reward_model is not None else None
        return HeldOutEval(
            self.ctx,
            self.hp.eval,
            models.peft,
            self.session.tokenizer,
            device=models.shared.device,
            own_reward=own,
            eos_token_id=trainer.eos_token_id,
            pad_token_id=trainer.pad_token_id,
            max_prompt_length=self.hp.max_length,
        )

    def final_metrics(self, steps: int, train_seconds: float) -> dict[str, float]:
        history = self.logger.history
        last = history[-1]
        sources = {k: v for k, v in last.items() if k.startswith("reward/")}
        # The KL of the last update that measured it (the last one does, unless a wall budget ended the run).
        kl = next(h["kl"] for h in reversed(history) if "kl" in h)
        return {
            "reward_mean": last["reward_mean"],
            "first_reward_mean": history[0]["reward_mean"],
            **sources,
            "kl": kl,
            "eos_fraction": last["eos_fraction"],
            "completion_length": last["completion_length"],
            "frac_reward_zero_std": last["frac_reward_zero_std"],
            "updates": float(steps),
            "episodes": float(steps * self.hp.batch_size * self.hp.num_generations),
            "train_seconds": train_seconds,
            "trainable_parameters": float(sum(p.numel() for p in self.session.models.trainable)),
        }

    def save_outputs(self, metrics: dict[str, float]) -> loop.Outputs:
        session = self.session
        return self.publish_prompt_policy(
            session.models.peft,
            session.tokenizer,
            metrics,
            title=self.title,
            dataset_sha256=session.dataset_sha256,
            num_records=len(session.rows),
            num_examples=len(session.prompts),
            setup_section=_setup_card_section(self.spec, self.hp, self.title),
            graders=[grader.name for grader in self.hp.graders],
        )

    def summary(self, metrics: dict[str, float], steps: int, train_seconds: float) -> str:
        return (
            f"finished {steps} {self.title} updates in {train_seconds:.1f} s; reward "
            f"{metrics['first_reward_mean']:.3f} -> {metrics['reward_mean']:.3f}, KL {metrics['kl']:.3f} "
            "nats/answer"
        )


class GRPOJob(GroupJob):
    method = "grpo"
    title = "GRPO"
    hyperparameters_model = GRPOHyperparameters


class RLOOJob(GroupJob):
    method = "rloo"
    title = "RLOO"
    hyperparameters_model = RLOOHyperparameters


def _setup_card_section(spec: TrainingSpec, hp: GroupHyperparameters, title: str) -> str:
    sources = [f"{w:g} x grader `{g.name}` ({g.type})" for g, w in zip(hp.graders, hp.weights(), strict=True)]
    if spec.reward_model is not None:
        sources.append(f"{hp.reward_model_weight:g} x reward model `{spec.reward_model.id}`")
    reference = (
        "the init adapter `" + spec.init_adapter.id + "` (frozen)" if spec.init_adapter else "the base model"
    )
    baseline = "the mean of the group's other answers" if title == "RLOO" else "the group's mean"
    return (
        f"\n## {title} setup\n\n"
        f"- reward: {' + '.join(sources)}\n"
        f"- {hp.num_generations} answers per prompt; baseline: {baseline}; scale_rewards: {hp.scale_rewards}; "
        f"loss_type: {hp.loss_type}\n"
        f"- reference for the KL (beta {hp.beta:g}): {reference}; one shared copy of the base weights, no value "
        "model\n"
    )


@dataclass
class GroupResult:
    session: GroupSession
    adapter_dir: Path
    model_card_dir: Path
    updates: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def _train(job: GroupJob) -> GroupResult:
    finished = job.run()
    return GroupResult(
        session=job.session,
        adapter_dir=finished.outputs.model_dir,
        model_card_dir=finished.outputs.card_dir,
        updates=finished.steps,
        metrics=finished.metrics,
        history=job.logger.history,
    )


def train_grpo(ctx: RunContext) -> GroupResult:
    """Run the GRPO job of ``ctx.spec`` (the registry's entry point, and the rlhf pipeline's last stage)."""
    return _train(GRPOJob(ctx))


def train_rloo(ctx: RunContext) -> GroupResult:
    """Run the RLOO job of ``ctx.spec`` (the registry's entry point, and the rlhf pipeline's last stage)."""
    return _train(RLOOJob(ctx))
