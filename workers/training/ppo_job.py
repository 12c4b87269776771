"""The PPO job: spec -> the roles on one shared base -> the shared training loop -> the policy adapter.

:func:`setup_ppo` reads the prompts, loads the base once and hangs every role on it (see ``ppo.py`` for the
roles and the algorithm); :class:`PPOJob` is PPO's hooks on :class:`~workers.training.loop.Trainer`, one step
being one update (a rollout and its PPO epochs, :meth:`~workers.training.ppo.PPOTrainer.step`), sharing the
checkpoints, logging, cancel checks, model card and artifact lines with every other method. :func:`train_ppo`
is the entry point (the registry's, and the rlhf pipeline's in-process call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig

from contract.hyperparameters import LoraSettings, PPOHyperparameters
from contract.protocol import DatasetRef, TrainingSpec
from workers.training import checkpoint, data, loop, lora, rollout, sharding
from workers.training.context import RunContext
from workers.training.errors import INVALID_SPEC, TrainingError
from workers.training.held_out_eval import HeldOutEval
from workers.training.keep_best import BestHeldOutPolicy
from workers.training.monitors import Alert, Monitors
from workers.training.ppo import (
    POLICY_ADAPTER,
    REWARD_ADAPTER,
    STAGE,
    VALUE_ADAPTER,
    AdapterRewardModel,
    MinibatchStats,
    PPOTrainer,
    RewardFunction,
    SharedBaseModel,
    UpdateResult,
    choose_pad_token_id,
    load_scalar_adapter,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PPOSession:
    """Everything :func:`setup_ppo` builds; :class:`PPOJob` runs the loop on it (tests may drive it)."""

    hp: PPOHyperparameters
    lora_settings: LoraSettings
    tokenizer: PreTrainedTokenizerBase
    models: SharedBaseModel
    trainer: PPOTrainer
    prompts: list[list[int]]
    num_records: int
    dataset_sha256: str
    total_updates: int
    rollout_size: int
    prompt_order: loop.IndexCycle

    def next_prompts(self) -> list[list[int]]:
        """The next update's prompts, in the seeded, resumable order."""
        return [self.prompts[i] for i in self.prompt_order()]


@dataclass
class PPOResult:
    models: SharedBaseModel
    trainer: PPOTrainer
    adapter_dir: Path
    model_card_dir: Path
    updates: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    first_minibatch: MinibatchStats | None = None


# --- spec -> roles


def _adapter_base_name(folder: Path) -> str | None:
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        return None
    return config.base_model_name_or_path


def _check_reward_base(folder: Path, base_name: str, base_path: str, progress: Any) -> None:
    recorded = _adapter_base_name(folder)
    if recorded is None or recorded in (base_name, base_path) or Path(recorded) == Path(base_path):
        return
    # Same architecture under another name loads fine (shapes are checked when the weights go in); a
    # different architecture fails there with invalid_adapter. Say what we assumed.
    progress.event(
        f"the reward model adapter names base {recorded!r}, the policy's base is {base_name!r}; loading it onto "
        "the policy's base (one shared copy). Its LoRA shapes are checked; make sure it was trained on this "
        "base model",
        stage=STAGE,
        level="warning",
    )


def _prompts_ref(
    spec: TrainingSpec, hp: PPOHyperparameters, reward_function: RewardFunction | None
) -> DatasetRef:
    """The spec's prompts dataset, after refusing a spec that lacks what PPO needs."""
    dataset_ref = spec.datasets.get("prompts")
    if dataset_ref is None:
        raise TrainingError(INVALID_SPEC, "method ppo needs a dataset with role 'prompts'")
    if reward_function is None and spec.reward_model is None:
        raise TrainingError(INVALID_SPEC, "method ppo needs a reward_model (a reward model adapter folder)")
    if hp.value_model == "adapter" and spec.reward_model is None:
        raise TrainingError(
            INVALID_SPEC, "value_model='adapter' starts from the reward model; none was given"
        )
    return dataset_ref


def _attach_roles(
    ctx: RunContext,
    hp: PPOHyperparameters,
    lora_settings: LoraSettings,
    device: torch.device,
    *,
    programmatic_reward: bool,
) -> SharedBaseModel:
    """Load the base once and put the policy, reference, reward and value adapters and heads on it."""
    spec = ctx.spec
    load_on = sharding.load_device(ctx.dist, device)
    base = lora.load_base_model(spec.base_model.path, device=load_on, precision=spec.resources.precision)
    hidden_size = int(base.config.hidden_size)
    # The reward and value adapters' initialisation draws from the global RNG too (then overwritten by their
    # weights); seeded from the spec, without disturbing callers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        init_path = spec.init_adapter.path if spec.init_adapter else None
        peft_model, reference_adapter = lora.attach_policy_and_reference(
            base, lora_settings, init_adapter=init_path, seed=spec.seed
        )
        reward_head: torch.nn.Linear | None = None
        reward_adapter = None
        if spec.reward_model is not None and not programmatic_reward:
            folder = Path(spec.reward_model.path)
            _check_reward_base(folder, spec.base_model.name, spec.base_model.path, ctx.progress)
            reward_head = load_scalar_adapter(peft_model, folder, REWARD_ADAPTER, trainable=False).to(device)
            reward_adapter = REWARD_ADAPTER
        value_adapter = None
        if hp.value_model == "adapter":
            assert spec.reward_model is not None
            value_head = load_scalar_adapter(
                peft_model, spec.reward_model.path, VALUE_ADAPTER, trainable=True
            ).to(device)
            value_adapter = VALUE_ADAPTER
        else:
            # Starts at V = 0 everywhere: a zero head is the neutral guess and keeps early advantages = returns.
            value_head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32, device=device)
            torch.nn.init.zeros_(value_head.weight)
            torch.nn.init.zeros_(value_head.bias)
    peft_model.set_adapter(POLICY_ADAPTER)
    if ctx.dist.sharded:  # before the roles record their trainable parameters: FSDP makes new ones
        ctx.progress.event(
            sharding.shard_layers(peft_model, ctx.dist, device).describe(ctx.dist.world_size), stage=STAGE
        )
    return SharedBaseModel(
        peft_model,
        value_head=value_head,
        reward_head=reward_head,
        reference_adapter=reference_adapter,
        reward_adapter=reward_adapter,
        value_adapter=value_adapter,
    )


def setup_ppo(ctx: RunContext, *, reward_function: RewardFunction | None = None) -> PPOSession:
    """Read the prompts, load the one base copy, attach every role's adapter and head, build the trainer.

    ``reward_function`` replaces the reward-model adapter (a programmatic scorer in tests); otherwise the spec
    must name a ``reward_model`` folder.
    """
    hp, lora_settings = loop.validated(
        PPOHyperparameters, ctx.spec.hyperparameters, ctx.spec.lora, method="ppo"
    )
    return build_session(ctx, hp, lora_settings, reward_function=reward_function)


def build_session(
    ctx: RunContext,
    hp: PPOHyperparameters,
    lora_settings: LoraSettings,
    *,
    reward_function: RewardFunction | None = None,
) -> PPOSession:
    """:func:`setup_ppo` on hyperparameters and LoRA settings already validated."""
    spec, progress = ctx.spec, ctx.progress
    dataset_ref = _prompts_ref(spec, hp, reward_function)
    records = rollout.read_prompt_records(dataset_ref.path)
    dataset_sha256 = data.sha256_file(dataset_ref.path)
    tokenizer = lora.load_tokenizer(spec.base_model.path)
    prompts, truncated = rollout.encode_prompts(tokenizer, records, max_length=hp.max_length)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainingError(INVALID_SPEC, "the tokenizer has no EOS token; PPO needs one to end answers")
    eos_token_id = int(eos)
    pad_token_id = choose_pad_token_id(tokenizer, eos_token_id)
    progress.event(
        f"dataset {dataset_ref.name}: {len(prompts)} prompts, {sum(map(len, prompts))} tokens"
        + (f", {truncated} cut from the left to {hp.max_length} tokens" if truncated else "")
        + f"; pad id {pad_token_id}, EOS id {eos_token_id}",
        stage=STAGE,
    )
    rollout_size = hp.rollout_batch_size or hp.batch_size
    total_updates = loop.count_updates(
        steps=hp.steps,
        epochs=hp.epochs,
        max_steps=hp.max_steps,
        n_prompts=len(prompts),
        per_update=rollout_size,
        progress=progress,
        stage=STAGE,
    )

    device = lora.pick_device()
    models = _attach_roles(ctx, hp, lora_settings, device, programmatic_reward=reward_function is not None)
    # Dropout off everywhere, for good: eval() only changes dropout here (no batch norm in these models) and
    # gradients still flow. With dropout on, the training forward would not reproduce the rollout's log-probs.
    models.peft.eval()
    reward_fn: RewardFunction = reward_function or AdapterRewardModel(models)

    n_trainable = sum(p.numel() for p in models.trainable_parameters)
    _, n_total = lora.count_parameters(models.peft)
    progress.event(
        f"base {spec.base_model.name} on {device.type}, one shared copy: {n_total:,} parameters, {n_trainable:,} "
        f"trainable (policy adapter + value {hp.value_model}); reference = "
        + ("the init adapter, frozen" if models.reference_adapter else "the base (adapter disabled)")
        + "; reward = "
        + (
            "the reward model adapter + score head"
            if models.reward_adapter
            else "a programmatic reward function"
        ),
        stage=STAGE,
    )

    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    trainer = PPOTrainer(
        models,
        reward_fn,
        hp,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        generator=generator,
        stop=rollout.StopStrings(tokenizer, hp.stop) if hp.stop else None,
        dist=ctx.dist,
    )
    return PPOSession(
        hp=hp,
        lora_settings=lora_settings,
        tokenizer=tokenizer,
        models=models,
        trainer=trainer,
        prompts=prompts,
        num_records=len(records),
        dataset_sha256=dataset_sha256,
        total_updates=total_updates,
        rollout_size=rollout_size,
        prompt_order=loop.IndexCycle(len(prompts), rollout_size, seed=spec.seed),
    )


# --- roles -> the shared loop -> outputs


class PPOJob(loop.Trainer[PPOHyperparameters, None]):
    """PPO's hooks on the shared loop: one step is one update (rollout, advantages, ``ppo_epochs`` passes).

    ``on_update(update, result)`` sees each update's full result (the benchmark times updates with it).

    After each update the reward-hacking monitors (``monitors.py``) see its metrics; each alert goes out as a
    ``monitor`` line, and one named in ``hp.monitors.stop_on`` ends the run after that update (``stopped_by``):
    the schedule yields no further update, and the loop saves the final checkpoint and the newest policy as
    usual. Metrics of a held-out evaluation run during PPO reach the monitors through :meth:`watch` (the
    ``reward_divergence`` monitor reads them by name). With a held-out evaluation, :class:`BestHeldOutPolicy`
    keeps the policy its grader scored best; a stopped run publishes that one (``monitors.keep_on_stop``).
    """

    method = STAGE

    def __init__(
        self,
        ctx: RunContext,
        *,
        reward_function: RewardFunction | None = None,
        on_update: Callable[[int, UpdateResult], None] | None = None,
    ) -> None:
        super().__init__(ctx, PPOHyperparameters)
        self.session = session = build_session(
            ctx, self.hp, self.lora_settings, reward_function=reward_function
        )
        self.on_update = on_update
        self.first_minibatch: MinibatchStats | None = None
        self.monitors = Monitors(self.hp.monitors)
        self.stopped_by: Alert | None = None
        # Built before init_loop: its extra reward/judge adapters are part of the checkpointed modules.
        self.held_out = self._held_out_eval() if self.hp.eval is not None else None
        models, trainer = session.models, session.trainer
        modules: dict[str, torch.nn.Module] = {"peft": models.peft, "value_head": models.value_head}
        self.best = self._best_keeper()
        if self.best is not None:
            modules["best_held_out"] = self.best
        # Everything an update depends on: the trainable adapter(s) and value head, Adam's moments, the sampling
        # generator (rollouts and minibatch permutations), the prompt order; dropout is off, so no global RNG.
        self.init_loop(
            total=session.total_updates,
            logging_steps=self.hp.logging_steps,
            checkpoint_steps=self.hp.checkpoint_steps,
            modules=modules,
            optimizer=trainer.optimizer,
            extra_rng={"sampling": trainer.generator, "prompt_order": session.prompt_order.rng},
        )

    def schedule(self, step: int, resumed: checkpoint.ResumeState | None) -> Iterator[tuple[int, int, None]]:
        # One update is one step; the prompt order is the position. A stopping monitor ends the schedule.
        for update in range(step + 1, self.total + 1):
            if self.stopped_by is not None:
                return
            yield 0, update, None

    def on_start(self, resumed: checkpoint.ResumeState | None) -> None:
        if resumed is not None:
            self.session.prompt_order.load(resumed.extra.get("prompt_order", []))
            self.monitors.load(resumed.extra.get("monitors", {}))
            self.session.trainer.kl_controller.load(resumed.extra.get("kl_controller", {}))
            stop = resumed.extra.get("stopped_by")
            self.stopped_by = Alert(**stop) if stop else None
            if self.best is not None:
                self.best.load(resumed.extra.get("best_held_out", {}))
        self.progress.event(self.monitors.describe(), stage=self.stage)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            **super().checkpoint_extra(),
            "prompt_order": self.session.prompt_order.state(),
            "monitors": self.monitors.state(),
            # The adaptive KL coefficient is state an update depends on, like the optimizer's moments.
            "kl_controller": self.session.trainer.kl_controller.state(),
            "stopped_by": asdict(self.stopped_by) if self.stopped_by else None,
            **({"best_held_out": self.best.state()} if self.best is not None else {}),
        }

    def train_step(self, step: int, batch: None) -> None:
        dist, trainer = self.ctx.dist, self.session.trainer
        # Every rank draws the same prompts (one seeded order) and samples its share of them.
        prompts = dist.shard(self.session.next_prompts())
        if dist.enabled:
            # Each rank its own sampling stream, a function of (seed, update, rank) alone: distinct across
            # ranks, and the same again when a resumed attempt (on any number of ranks) redoes this update.
            trainer.generator.manual_seed(((self.spec.seed * 1_000_003 + step) * 4099 + dist.rank) % 2**63)
        result = trainer.step(prompts)
        if self.first_minibatch is None:
            self.first_minibatch = result.minibatches[0]
        if self.on_update is not None:
            self.on_update(step, result)
        # The monitors see every rank's answers, so each rank decides the same (a stop included).
        lengths = [n for part in dist.gather(result.rollout.response_mask.sum(dim=1).tolist()) for n in part]
        values = dict(result.metrics)
        evaluated = self.held_out is not None and self.held_out.due(step, self.total)
        if evaluated:
            assert self.held_out is not None
            values.update(self.held_out.run())  # eval/<grader>/mean beside the training series
            if self.best is not None:
                self.best.offer(step, values)
        self.watch(step, values, lengths)
        # Every update's metrics stay in the history; the metric line goes out every logging_steps (and at
        # the update a monitor stopped the run on, its last).
        emit = self.logger.due(step) or self.stopped_by is not None or evaluated
        self.logger.log(step, values, emit=emit)

    def _held_out_eval(self) -> HeldOutEval:
        assert self.hp.eval is not None
        trainer, models = self.session.trainer, self.session.models
        return HeldOutEval(
            self.ctx,
            self.hp.eval,
            models.peft,
            self.session.tokenizer,
            device=models.value_head.weight.device,
            own_reward=(REWARD_ADAPTER, models.reward_head) if models.reward_head is not None else None,
            eos_token_id=trainer.eos_token_id,
            pad_token_id=trainer.pad_token_id,
            max_prompt_length=self.hp.max_length,
        )

    def _best_keeper(self) -> BestHeldOutPolicy | None:
        settings = self.hp.monitors
        if self.held_out is None or settings.keep_on_stop != "best_held_out" or not settings.stop_on:
            return None
        pattern = settings.held_out_metric or "eval/*/mean"
        policy = [
            (name, param)
            for name, param in self.session.models.peft.named_parameters()
            # LoRA parameter names look like "...q_proj.lora_A.<adapter>.weight".
            if "lora_" in name and name.split(".")[-2] == POLICY_ADAPTER
        ]
        return BestHeldOutPolicy(policy, pattern)

    def _keep_best(self, steps: int) -> dict[str, Any] | None:
        """A stopped run's output policy: the best by the held-out grader, when that is not the newest."""
        best = self.best
        if self.stopped_by is None or best is None or best.step is None:
            return None
        kept = {"policy": "best_held_out", "step": best.step, "series": best.series, "value": best.value}
        if best.step != steps:
            best.restore()
        self.progress.event(
            f"output: the policy of update {best.step} (best held-out {best.series} = {best.value:.4f}), "
            f"not the newest (update {steps}), since monitor {self.stopped_by.name} stopped the run",
            stage=self.stage,
        )
        return kept

    def watch(self, step: int, values: dict[str, float], lengths: list[float] | None = None) -> None:
        """Show update ``step``'s metric ``values`` (and its answers' ``lengths``) to the monitors; send each
        alert, and stop after this update when one is in ``stop_on``."""
        stop_on = set(self.hp.monitors.stop_on)
        for alert in self.monitors.observe(step, values, lengths or []):
            stop = alert.name in stop_on and self.stopped_by is None
            message = alert.message + (
                f"; stopping after this update (stop_on: {alert.name})" if stop else ""
            )
            self.progress.monitor(
                message,
                stage=self.stage,
                name=alert.name,
                step=alert.step,
                value=alert.value,
                threshold=alert.threshold,
                stop=stop,
            )
            if stop:
                self.stopped_by = alert

    def on_end(self) -> None:
        notice = self.monitors.missing_series_notice()
        if notice is not None:
            self.progress.event(notice, stage=self.stage)

    def final_metrics(self, steps: int, train_seconds: float) -> dict[str, float]:
        history = self.logger.history
        last = history[-1]
        return {
            "reward_mean": last["reward_mean"],
            "first_reward_mean": history[0]["reward_mean"],
            "score_mean": last["score_mean"],
            "kl": last["kl"],
            "eos_fraction": last["eos_fraction"],
            "response_length": last["response_length"],
            "updates": float(steps),
            "episodes": float(steps * self.session.rollout_size),
            "train_seconds": train_seconds,
            "trainable_parameters": float(sum(p.numel() for p in self.session.models.trainable_parameters)),
            "stopped_early": 1.0 if self.stopped_by is not None else 0.0,
        }

    def save_outputs(self, metrics: dict[str, float]) -> loop.Outputs:
        session = self.session
        kept = self._keep_best(int(metrics["updates"]))
        return self.publish_prompt_policy(
            session.models.peft,
            session.tokenizer,
            metrics,
            title="PPO",
            dataset_sha256=session.dataset_sha256,
            num_records=session.num_records,
            num_examples=len(session.prompts),
            setup_section=_setup_card_section(
                self.spec, self.hp, reward_adapter=session.models.reward_adapter is not None
            )
            + (
                f"\n\nThis is the policy of update {kept['step']}, the best by held-out {kept['series']} "
                f"({kept['value']:.4f}); the metrics above are of the last update.\n"
                if kept
                else ""
            ),
            stopped_by_monitor=(
                {"name": self.stopped_by.name, "step": self.stopped_by.step} if self.stopped_by else None
            ),
            kept_policy=kept,
        )

    def summary(self, metrics: dict[str, float], steps: int, train_seconds: float) -> str:
        stopped = (
            f"stopped by monitor {self.stopped_by.name} at update {steps} of {self.total}, keeping the newest "
            "policy; "
            if self.stopped_by is not None
            else ""
        )
        return (
            f"{stopped}finished {steps} PPO updates in {train_seconds:.1f} s; reward "
            f"{metrics['first_reward_mean']:.3f} -> {metrics['reward_mean']:.3f}, KL {metrics['kl']:.3f} "
            "nats/answer"
        )


def _setup_card_section(spec: TrainingSpec, hp: PPOHyperparameters, *, reward_adapter: bool) -> str:
    reward = (
        "reward model adapter `" + spec.reward_model.id + "`"
        if reward_adapter and spec.reward_model
        else "a programmatic reward function"
    )
    reference = (
        "the init adapter `" + spec.init_adapter.id + "` (frozen)" if spec.init_adapter else "the base model"
    )
    return (
        "\n## PPO setup\n\n"
        f"- reward: {reward}\n"
        f"- reference for the KL penalty: {reference}\n"
        f"- value function: {hp.value_model}; one shared copy of the base weights for all roles\n"
    )


def train_ppo(
    ctx: RunContext,
    *,
    reward_function: RewardFunction | None = None,
    on_update: Callable[[int, UpdateResult], None] | None = None,
) -> PPOResult:
    """Run the PPO job of ``ctx.spec`` and return its final metrics (the rlhf pipeline calls it in-process).

    ``reward_function``: see :func:`setup_ppo`. ``on_update(update, result)`` sees each update's full result.
    """
    job = PPOJob(ctx, reward_function=reward_function, on_update=on_update)
    finished = job.run()
    return PPOResult(
        models=job.session.models,
        trainer=job.session.trainer,
        adapter_dir=finished.outputs.model_dir,
        model_card_dir=finished.outputs.card_dir,
        updates=finished.steps,
        metrics=finished.metrics,
        history=job.logger.history,
        first_minibatch=job.first_minibatch,
    )
