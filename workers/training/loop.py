"""The one training loop every method runs (:class:`Trainer`), and the plain pieces it is built from.

A method is a subclass that fills in hooks; the loop around them is written once here, as TRL's trainers share
one loop and override the loss. :class:`Trainer` owns the job's skeleton: restore the newest checkpoint of the
stage, the steps left with a cancel check before each, a checkpoint every ``checkpoint_steps``, the final
checkpoint, the final metrics, the adapter folder with its model card, the artifact lines and the closing event.
:class:`DatasetTrainer` adds what the methods that train on a fixed dataset share (SFT, reward model, DPO):
seeded batches epoch by epoch, micro-batches with gradient accumulation, AdamW with its schedule and clipping,
and one logging window of sums. PPO (``ppo_job.py``) plugs into :class:`Trainer` directly, one step being one
update (a rollout and its PPO epochs).

The pieces, kept as plain functions:

- :func:`validated`: the spec's hyperparameters and LoRA settings checked again, as clear error codes;
- :func:`local_sha256`: the dataset's hash, with a warning when the local file is not the one the spec named;
- :func:`count_steps`, :func:`build_optimizer`, :func:`optimizer_step`: AdamW with warm-up and decay, the
  divergence check, gradient clipping and the step itself;
- :func:`count_updates`, :class:`IndexCycle`: how many updates an online method runs, and the seeded,
  resumable order its prompts are drawn in;
- :func:`step_batches`: the batches of the remaining steps, epoch by epoch, skipping what a checkpoint had
  consumed;
- :class:`StepLogger`: metric points, progress and the history the final metrics are read from;
- :func:`write_outputs`, :func:`announce_outputs`: the adapter folder with its model card, then the
  artifact lines the runner stores.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Self, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from contract.hyperparameters import LoraSettings, OptimizerHyperparameters
from contract.protocol import DatasetRef, ProgressWriter
from workers.training import checkpoint, data, lora, sharding
from workers.training.context import RunContext
from workers.training.errors import (
    INVALID_HYPERPARAMETERS,
    INVALID_LORA,
    TRAINING_DIVERGED,
    Cancelled,
    TrainingError,
)
from workers.training.modelcard import DatasetCardEntry, render_model_card

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

H = TypeVar("H", bound=BaseModel)
OH = TypeVar("OH", bound=OptimizerHyperparameters)
B = TypeVar("B")  # what one step consumes (a batch of example indices; nothing for PPO, which draws prompts)


def validated(
    model: type[H], raw_hp: Mapping[str, Any], raw_lora: Mapping[str, Any], *, method: str
) -> tuple[H, LoraSettings]:
    # The runner passes resolved values; validating again turns a corrupt spec into a clear error code.
    try:
        hp = model.model_validate(dict(raw_hp))
    except ValidationError as exc:
        raise TrainingError(INVALID_HYPERPARAMETERS, f"invalid {method} hyperparameters: {exc}") from None
    try:
        settings = LoraSettings.model_validate(dict(raw_lora))
    except ValidationError as exc:
        raise TrainingError(INVALID_LORA, f"invalid LoRA settings: {exc}") from None
    return hp, settings


def local_sha256(progress: ProgressWriter, dataset_ref: DatasetRef, *, stage: str) -> str:
    """sha256 of the dataset file as read here (what the model card records); warns when it is not the
    spec's."""
    sha256 = data.sha256_file(dataset_ref.path)
    if sha256 != dataset_ref.sha256:
        progress.event(
            f"dataset {dataset_ref.id}: sha256 of the local file ({sha256}) differs from the spec's "
            f"({dataset_ref.sha256}); the model card records the local file's",
            stage=stage,
            level="warning",
        )
    return sha256


def lr_lambda(kind: str, *, warmup_steps: int, total_steps: int) -> Any:
    """Multiplier of the peak lr at optimizer step ``s`` (0-based): linear warm-up, then the decay."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress  # linear

    return factor


def count_steps(n_items: int, hp: OptimizerHyperparameters) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) for ``n_items`` at ``batch_size`` a step, ``max_steps``
    applied."""
    per_epoch = math.ceil(n_items / hp.batch_size)
    total = hp.epochs * per_epoch
    if hp.max_steps is not None:
        total = min(total, hp.max_steps)
    return per_epoch, total


def count_updates(
    *,
    steps: int,
    epochs: float | None,
    max_steps: int | None,
    n_prompts: int,
    per_update: int,
    progress: ProgressWriter,
    stage: str,
) -> int:
    """Updates an online method (PPO, GRPO, RLOO) runs, with a warning when fewer than ``steps`` will.

    ``steps`` counts updates and prompts are recycled to reach it; ``epochs`` (passes over the prompts) caps it
    only when given, and ``max_steps`` always does.
    """
    by_epochs = math.ceil(epochs * n_prompts / per_update) if epochs is not None else steps
    total = min(steps, by_epochs, max_steps or steps)
    if total < steps:
        progress.event(
            f"running {total} updates, not steps={steps}: epochs={epochs} over {n_prompts} prompts at "
            f"{per_update} per update allows {by_epochs}"
            + (f" and max_steps={max_steps}" if max_steps else ""),
            stage=stage,
            level="warning",
        )
    return total


class IndexCycle:
    """Prompt indices for each update of an online method: shuffled passes over ``n`` prompts, a fresh seeded
    pass whenever one runs out.

    Its state for a checkpoint is ``rng`` (an extra RNG of the checkpoint) plus the rest of the current pass
    (:meth:`state`), so a resumed run draws the same prompts the uninterrupted one would.
    """

    def __init__(self, n: int, size: int, *, seed: int) -> None:
        self.n = n
        self.size = size
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def __call__(self) -> list[int]:
        batch: list[int] = []
        while len(batch) < self.size:
            if not self.order:
                self.order.extend(self.rng.sample(range(self.n), self.n))
            batch.append(self.order.pop())
        return batch

    def state(self) -> list[int]:
        return list(self.order)

    def load(self, order: list[int]) -> None:
        self.order = [int(i) for i in order]


def build_optimizer(
    params: list[torch.nn.Parameter], hp: OptimizerHyperparameters, total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on ``params`` and its schedule: ``warmup_ratio`` of ``total`` steps of warm-up, then the decay."""
    warmup = math.ceil(hp.warmup_ratio * total)
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(hp.lr_scheduler, warmup_steps=warmup, total_steps=total)
    )
    return optimizer, scheduler


def step_batches(
    epochs: int,
    batches_of: Callable[[int], list[list[int]]],
    *,
    steps: int,
    start_epoch: int = 0,
    skip: int = 0,
) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, position in the epoch from 1, batch) for the next ``steps`` optimizer steps.

    ``batches_of(epoch)`` is the epoch's batch order, drawn from (seed, epoch) alone; a resumed loop passes the
    checkpoint's epoch and position as ``start_epoch`` and ``skip`` and gets exactly the batches the
    uninterrupted run went on with.
    """
    for epoch in range(start_epoch, epochs):
        if steps <= 0:
            return
        for position, batch in enumerate(batches_of(epoch), start=1):
            if steps <= 0:
                return
            if epoch == start_epoch and position <= skip:
                continue
            steps -= 1
            yield epoch, position, batch


def optimizer_step(
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    loss: float,
    step_number: int,
    max_grad_norm: float,
) -> tuple[float, float]:
    """Refuse a non-finite ``loss`` of step ``step_number`` (from 1), clip, step optimizer and schedule.

    Returns (pre-clipping global grad norm, the learning rate the step used)."""
    if not math.isfinite(loss):
        raise TrainingError(
            TRAINING_DIVERGED, f"loss became {loss} at step {step_number}; try a lower learning_rate"
        )
    grad_norm = sharding.clip_grad_norm(params, max_grad_norm)
    learning_rate = float(scheduler.get_last_lr()[0])
    optimizer.step()
    scheduler.step()
    return grad_norm, learning_rate


@dataclass
class AdapterResult:
    """What a dataset trainer (SFT, DPO, the reward model) hands back to in-process callers."""

    model: torch.nn.Module
    adapter_dir: Path
    model_card_dir: Path
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def train(cls, trainer: DatasetTrainer[Any]) -> Self:
        """Run ``trainer``'s loop; what it trained and wrote."""
        finished = trainer.run()
        return cls(
            model=trainer.model,
            adapter_dir=finished.outputs.model_dir,
            model_card_dir=finished.outputs.card_dir,
            steps=finished.steps,
            metrics=finished.metrics,
            history=trainer.logger.history,
        )


class StepLogger:
    """Metric points of one stage: the ``metric`` line, the progress bar and the in-memory history.

    ``due(step)``: every ``every`` steps and at the last one. Only the first and last points travel in a
    checkpoint (:meth:`state`, :meth:`load`): the final metrics are read from them.
    """

    def __init__(self, progress: ProgressWriter, stage: str, *, every: int, total: int) -> None:
        self.progress = progress
        self.stage = stage
        self.every = every
        self.total = total
        self.history: list[dict[str, float]] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def report(self, fraction: float) -> None:
        # The rlhf pipeline maps each stage's 0..1 into the job's bar (pipeline.StageWriter).
        self.progress.progress(fraction, stage=self.stage)

    def log(self, step: int, values: Mapping[str, float], *, emit: bool = True, keep: bool = True) -> None:
        """Keep ``values`` as the point of ``step``; with ``emit``, send the metric line and the progress.
        ``keep=False``: send it without keeping it (a held-out evaluation between training points: the history
        holds the training points the final metrics are read from)."""
        if emit:
            self.progress.metric(stage=self.stage, step=step, values=dict(values))
            self.report(step / self.total)
        if keep:
            self.history.append({"step": float(step), **values})

    def state(self) -> dict[str, Any]:
        history = self.history
        return {"history": history[:1] + history[-1:] if len(history) > 1 else list(history)}

    def load(self, extra: Mapping[str, Any]) -> None:
        self.history = [dict(point) for point in extra.get("history", [])]


def write_outputs(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    name: str,
    card: str,
    *,
    base_model_name: str,
    adapter_name: str = lora.POLICY_ADAPTER,
) -> tuple[Path, Path]:
    """Save the adapter as ``out/name`` with ``card`` as its README (over peft's generic one), and the card
    alone in ``out/model_card``. Returns (adapter folder, card folder)."""
    adapter_dir = lora.save_adapter(
        model, tokenizer, out / name, adapter_name=adapter_name, base_model_name=base_model_name
    )
    (adapter_dir / "README.md").write_text(card, encoding="utf-8")
    card_dir = out / "model_card"
    card_dir.mkdir(parents=True, exist_ok=True)
    (card_dir / "README.md").write_text(card, encoding="utf-8")
    return adapter_dir, card_dir


def announce_outputs(
    progress: ProgressWriter,
    stage: str,
    adapter_dir: Path,
    card_dir: Path,
    *,
    kind: Literal["adapter", "reward_model"],
    metadata: dict[str, Any],
    base_model_id: str,
) -> None:
    """The artifact lines for :func:`write_outputs`' folders (the runner packs each as it reads it)."""
    progress.artifact(str(adapter_dir), stage=stage, kind=kind, metadata=metadata)
    progress.artifact(str(card_dir), stage=stage, kind="model_card", metadata={"base_model": base_model_id})


# --- the loop


@dataclass
class Outputs:
    """What :meth:`Trainer.save_outputs` wrote: the model folder, its card folder, and their artifact lines'
    kind and metadata (announced by the loop once the block that may still be cancelled is done)."""

    model_dir: Path
    card_dir: Path
    kind: Literal["adapter", "reward_model"]
    metadata: dict[str, Any]


@dataclass
class Finished:
    """What :meth:`Trainer.run` hands back: steps done, training wall time, final metrics, outputs."""

    steps: int
    train_seconds: float
    metrics: dict[str, float]
    outputs: Outputs


class Trainer(ABC, Generic[H, B]):
    """One job's training loop; a method is a subclass that fills in the hooks.

    :meth:`run` is the loop, the same for every method::

        resumed = checkpointer.restore()      # None, or the stage's newest checkpoint: weights, optimizer, RNGs
        on_start(resumed)                     # the method's own state back from resumed.extra, or fresh
        for epoch, position, batch in schedule(step, resumed):   # the steps left
            cancel.check(); step += 1
            train_step(step, batch)           # one optimizer step (PPO: one update), logging its metrics
            checkpointer.maybe_save(step, ..., extra=checkpoint_extra())
        checkpointer.save(step, ..., final=True); on_end()
        metrics = final_metrics(step, seconds); outputs = save_outputs(metrics)
        artifact lines for outputs; event summary(metrics, step, seconds)

    The loop runs inside ``cancel.deferred()``: SIGTERM stops it at a step boundary, never mid-step, and after
    the last check nothing is announced half-written.

    A subclass's ``__init__`` calls ``super().__init__(ctx, HyperparametersModel)`` (which validates the spec's
    hyperparameters and LoRA settings into ``self.hp`` and ``self.lora_settings``), does its setup (data first,
    so a bad dataset fails before the slow model load; then the model and optimizer), and ends with
    :meth:`init_loop`, which builds the step logger and the checkpointer. Setup must draw every random number
    it needs (adapter init) before :meth:`run`: ``restore`` puts the RNG states of the saved step back, and
    the steps after it must draw exactly what the uninterrupted run drew.

    Hooks (abstract ones marked *):

    - ``schedule(step, resumed)`` *: ``(epoch, position, batch)`` for each step left after ``step``; a resumed
      run continues at ``resumed.epoch`` / ``resumed.position``. :class:`DatasetTrainer` draws seeded batches
      epoch by epoch; an online method (PPO, and GRPO or RLOO later) yields ``(0, update, None)`` for each
      update left and samples its own prompts in ``train_step``.
    - ``train_step(step, batch)`` *: one step numbered from 1: compute, backward, optimizer step, and
      ``self.logger.log(step, values)`` when there is something to log (``self.logger.due(step)``).
    - ``on_start(resumed)``: restore the method's own state from ``resumed.extra`` (the reward model's evals,
      PPO's prompt order) or, on a fresh start, compute it (the reward model's first evaluation).
    - ``checkpoint_extra()``: the JSON state saved with each checkpoint (call ``super()``: the logger's
      first and last metric points travel there).
    - ``on_end()``: after the final checkpoint, before the outputs (dropout off).
    - ``final_metrics(steps, train_seconds)`` *: the metrics of the model card and the artifacts.
    - ``save_outputs(metrics)`` *: write the model folder and its card (:meth:`model_card`,
      :meth:`publish`) and return them as :class:`Outputs`.
    - ``summary(metrics, steps, train_seconds)``: the closing event's text (steps and time; add to it).

    A new online method (GRPO, RLOO) is ``schedule`` over updates and a ``train_step`` that samples a group of
    answers per prompt, scores them, and takes its loss's optimizer step; the checkpoints, logging, cancel
    checks, card and artifact lines are inherited (``ppo_job.PPOJob`` is the worked example). An ``evaluate``
    method would schedule evaluation batches, score them in ``train_step`` under ``no_grad`` and write its
    report in ``save_outputs``; what it lacks today is a checkpointer without an optimizer (``init_loop``
    takes one, as :class:`~workers.training.checkpoint.Checkpointer` saves its state).
    """

    method: ClassVar[str]  # the spec's method; also the stage name of its metrics, events and checkpoints
    logger: StepLogger
    checkpointer: checkpoint.Checkpointer
    total: int  # steps in the whole run

    def __init__(self, ctx: RunContext, hyperparameters: type[H]) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.progress = ctx.progress
        self.cancel = ctx.cancel
        self.stage = self.method
        self.hp, self.lora_settings = validated(
            hyperparameters, self.spec.hyperparameters, self.spec.lora, method=self.method
        )

    def init_loop(
        self,
        *,
        total: int,
        logging_steps: int,
        checkpoint_steps: int | None,
        modules: Mapping[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        extra_rng: Mapping[str, checkpoint.ExtraRng] | None = None,
    ) -> None:
        """The end of setup: ``total`` steps, logged every ``logging_steps``; ``modules``' trainable
        parameters, the optimizer, the schedule and ``extra_rng`` go into every checkpoint."""
        self.total = total
        self.logger = StepLogger(self.progress, self.stage, every=logging_steps, total=total)
        self.checkpointer = checkpoint.Checkpointer(
            self.ctx,
            stage=self.stage,
            every=checkpoint_steps,
            modules=modules,
            optimizer=optimizer,
            scheduler=scheduler,
            extra_rng=extra_rng,
        )

    # --- hooks

    @abstractmethod
    def schedule(self, step: int, resumed: checkpoint.ResumeState | None) -> Iterator[tuple[int, int, B]]: ...

    @abstractmethod
    def train_step(self, step: int, batch: B) -> None: ...

    def on_start(self, resumed: checkpoint.ResumeState | None) -> None:
        return None

    def checkpoint_extra(self) -> dict[str, Any]:
        return self.logger.state()

    def on_end(self) -> None:
        return None

    @abstractmethod
    def final_metrics(self, steps: int, train_seconds: float) -> dict[str, float]: ...

    @abstractmethod
    def save_outputs(self, metrics: dict[str, float]) -> Outputs: ...

    def summary(self, metrics: dict[str, float], steps: int, train_seconds: float) -> str:
        """The closing event; a method adds what moved (``super().summary(...) + "; loss ..."``)."""
        return f"finished {steps} steps in {train_seconds:.1f} s"

    # --- the loop

    def _stop_if_asked(self, ckpt: checkpoint.Checkpointer, step: int, epoch: int, position: int) -> None:
        """At a step boundary: raise Cancelled if a stop was asked for, saving the finished step first when it
        is a pause (a cancel or a worker shutdown does not wait for one). One collective reading decides both
        (CancelToken.stop_requested)."""
        if not self.cancel.stop_requested():
            return
        if step > 0 and self.cancel.pause_flagged and ckpt.enabled:
            ckpt.save(step, epoch=epoch, position=position, extra=self.checkpoint_extra())
            self.progress.event(
                f"Stopping for the pause after step {step}, checkpoint saved.", stage=self.stage
            )
        raise Cancelled()

    def run(self) -> Finished:
        ckpt, cancel, logger = self.checkpointer, self.cancel, self.logger
        step, epoch, position = 0, 0, 0
        resumed = ckpt.restore()
        if resumed is not None:
            step, epoch, position = resumed.step, resumed.epoch, resumed.position
            logger.load(resumed.extra)
        self.on_start(resumed)
        train_start = time.perf_counter()
        logger.report(step / self.total)
        with cancel.deferred():
            for epoch, position, batch in self.schedule(step, resumed):
                self._stop_if_asked(ckpt, step, epoch, position)
                step += 1
                self.train_step(step, batch)
                # A checkpoint mid-way through a logging window drops that window's partial sums on resume:
                # the weights are exact, the first metric point after a resume covers fewer steps.
                ckpt.maybe_save(step, epoch=epoch, position=position, extra=self.checkpoint_extra())
                self._stop_if_asked(ckpt, step, epoch, position)
            train_seconds = time.perf_counter() - train_start
            cancel.check()
            ckpt.save(step, epoch=epoch, position=position, extra=self.checkpoint_extra(), final=True)
            self.on_end()
            metrics = self.final_metrics(step, train_seconds)
            outputs = self.save_outputs(metrics)
            cancel.check()
        announce_outputs(
            self.progress,
            self.stage,
            outputs.model_dir,
            outputs.card_dir,
            kind=outputs.kind,
            metadata=outputs.metadata,
            base_model_id=self.spec.base_model.id,
        )
        logger.report(1.0)
        self.progress.event(self.summary(metrics, step, train_seconds), stage=self.stage)
        return Finished(steps=step, train_seconds=train_seconds, metrics=metrics, outputs=outputs)

    # --- for save_outputs

    def policy_lora(self, model: PeftModel) -> dict[str, Any]:
        """The policy adapter's LoRA settings for its card: a continued adapter's own (its weights fix its
        shape), else the spec's."""
        if self.spec.init_adapter:
            config: dict[str, Any] = model.peft_config[lora.POLICY_ADAPTER].to_dict()
            return config
        return self.lora_settings.model_dump()

    def model_card(
        self,
        *,
        title: str,
        datasets: list[DatasetCardEntry],
        lora: Mapping[str, Any],
        metrics: Mapping[str, float],
        **extra: str,
    ) -> str:
        """The model card of this job (``extra``: render_model_card's loader, loader_args, notes)."""
        spec = self.spec
        return render_model_card(
            title=title,
            method=self.method,
            job_id=spec.job_id,
            base_model_name=spec.base_model.name,
            base_model_id=spec.base_model.id,
            datasets=datasets,
            lora=lora,
            hyperparameters=self.hp.model_dump(),
            seed=spec.seed,
            metrics=metrics,
            **extra,
        )

    def publish(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        card: str,
        metrics: dict[str, float],
        *,
        name: str = "adapter",
        kind: Literal["adapter", "reward_model"] = "adapter",
        **metadata: Any,
    ) -> Outputs:
        """Write ``output_dir/name`` (the policy adapter, with ``card``) and ``output_dir/model_card``; the
        artifact metadata is the base model, method and metrics, then ``metadata``."""
        spec = self.spec
        model_dir, card_dir = write_outputs(
            model, tokenizer, Path(spec.output_dir), name, card, base_model_name=spec.base_model.name
        )
        return Outputs(
            model_dir,
            card_dir,
            kind,
            {"base_model": spec.base_model.id, "method": self.method, "metrics": metrics, **metadata},
        )

    def publish_prompt_policy(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        metrics: dict[str, float],
        *,
        title: str,
        dataset_sha256: str,
        num_records: int,
        num_examples: int,
        setup_section: str,
        **metadata: Any,
    ) -> Outputs:
        """The online methods' outputs (PPO, GRPO, RLOO): the policy adapter trained on the ``prompts`` dataset,
        its card (``setup_section`` appended: the method's own set-up) and the artifact metadata naming the
        prompts, the reward model and the init adapter, then ``metadata``."""
        spec = self.spec
        dataset_ref = spec.datasets["prompts"]
        entry = DatasetCardEntry(
            role="prompts",
            name=dataset_ref.name,
            id=dataset_ref.id,
            sha256=dataset_sha256,
            num_records=num_records,
            num_examples=num_examples,
        )
        card = self.model_card(
            title=f"{spec.base_model.name} + LoRA ({title})",
            datasets=[entry],
            lora=self.policy_lora(model),
            metrics=metrics,
        )
        return self.publish(
            model,
            tokenizer,
            card + setup_section,
            metrics,
            datasets={"prompts": {"id": dataset_ref.id, "sha256": dataset_sha256}},
            reward_model=spec.reward_model.id if spec.reward_model else None,
            init_adapter=spec.init_adapter.id if spec.init_adapter else None,
            **metadata,
        )


class MetricWindow:
    """Sums over the steps since the last metric point: ``loss`` and ``weight`` (what each step's loss sum is
    divided by: tokens, pairs), a method's own sums, and the steps' gradient norms."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.weight = 0.0
        self.grad_norms: list[float] = []
        self.started = time.perf_counter()

    def add(self, sums: Mapping[str, float]) -> None:
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def end_step(self, loss: float, weight: int, grad_norm: float) -> None:
        self.add({"loss": loss})
        self.weight += weight
        self.grad_norms.append(grad_norm)

    def mean(self, key: str) -> float:
        """``key``'s sum per unit of weight (per token, per pair)."""
        return self.sums.get(key, 0.0) / self.weight

    def grad_norm(self) -> float:
        """Mean pre-clipping global gradient norm over the window's steps."""
        return sum(self.grad_norms) / len(self.grad_norms)

    def per_second(self, key: str) -> float:
        return self.sums.get(key, 0.0) / max(time.perf_counter() - self.started, 1e-9)


class DatasetTrainer(Trainer[OH, list[int]]):
    """The loop of a method that trains on a fixed dataset (SFT, reward model, DPO).

    One optimizer step consumes ``batch_size`` examples (the API's definition), split into
    ``gradient_accumulation_steps`` micro-batches; each micro-batch's summed loss is divided by the weight of the
    whole step (``batch_weight``), so accumulation gives exactly the gradient of one big batch. AdamW with
    warm-up and decay, clipping, the divergence check, a metric point every ``logging_steps``.

    Setup calls :meth:`use_model` on the model to train, then :meth:`plan` with the number of training items.
    Hooks, besides :class:`Trainer`'s ``final_metrics``, ``save_outputs`` and ``summary``:

    - ``build_batches(epoch)``: the epoch's batches of item indices, drawn from (seed, epoch) alone, so that a
      resumed run skips exactly the batches its checkpoint had consumed;
    - ``batch_weight(batch)``: what the step's loss sum is divided by (completion tokens, pairs);
    - ``compute_loss(micro)``: (the micro-batch's summed loss, with its graph; sums for the logging window);
    - ``log_values(window, learning_rate=, epoch=)``: the metric point of a logging window;
    - ``on_eval(step)``: metrics to log at ``step`` besides the window's (a held-out evaluation), or none.
    """

    model: PeftModel
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    n_trainable: int
    window: MetricWindow

    def use_model(self, model: PeftModel) -> int:
        """Train ``model``'s trainable parameters (gradient checkpointing as asked); returns the count of all
        its parameters."""
        self.model = model
        if self.hp.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input-grad hack with frozen embeddings.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.params = lora.trainable_parameters(model)
        self.n_trainable, n_total = lora.count_parameters(model)
        dist = self.ctx.dist
        dist.broadcast_parameters(self.params)  # replicas start equal (they do with one seed)
        if dist.sharded:
            sharded = sharding.shard_layers(model, dist, lora.pick_device())
            self.params = lora.trainable_parameters(model)  # FSDP made them new (sharded) parameters
            self.progress.event(sharded.describe(dist.world_size), stage=self.stage)
        return n_total

    def plan(self, n_items: int) -> None:
        """Steps for ``n_items`` training items, the optimizer and its schedule, the logger and checkpointer."""
        hp = self.hp
        self.steps_per_epoch, total = count_steps(n_items, hp)
        self.optimizer, self.scheduler = build_optimizer(self.params, hp, total)
        self.window = MetricWindow()
        self.init_loop(
            total=total,
            logging_steps=hp.logging_steps,
            checkpoint_steps=hp.checkpoint_steps,
            modules={"model": self.model},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )

    @abstractmethod
    def build_batches(self, epoch: int) -> list[list[int]]: ...

    @abstractmethod
    def batch_weight(self, batch: list[int]) -> int: ...

    @abstractmethod
    def compute_loss(self, micro: list[int]) -> tuple[torch.Tensor, dict[str, float]]: ...

    @abstractmethod
    def log_values(self, window: MetricWindow, *, learning_rate: float, epoch: float) -> dict[str, float]: ...

    def on_eval(self, step: int) -> dict[str, float]:
        return {}

    def schedule(
        self, step: int, resumed: checkpoint.ResumeState | None
    ) -> Iterator[tuple[int, int, list[int]]]:
        return step_batches(
            self.hp.epochs,
            self.build_batches,
            steps=self.total - step,
            start_epoch=resumed.epoch if resumed else 0,
            skip=resumed.position if resumed else 0,
        )

    def on_start(self, resumed: checkpoint.ResumeState | None) -> None:
        self.window.reset()
        self.model.train()  # LoRA dropout on; the frozen base has its own dropout settings

    def train_step(self, step: int, batch: list[int]) -> None:
        hp, window, dist = self.hp, self.window, self.ctx.dist
        # The whole step's weight, from the full batch (every rank draws the same one).
        weight = self.batch_weight(batch)
        self.optimizer.zero_grad(set_to_none=True)
        step_sums: dict[str, float] = {"loss": 0.0}

        # This rank's share of the step (all of it in one process): distributed.py explains the split.
        def micro_batches(share: list[int]) -> list[list[int]]:
            return data.split_micro_batches(share, hp.gradient_accumulation_steps)

        for micro in micro_batches(dist.shard(batch)):
            loss, sums = self.compute_loss(micro)
            # Divided by the whole step's weight, so accumulation (and the ranks' sum) gives exactly the big
            # batch's gradient.
            (loss / weight).backward()
            step_sums["loss"] += float(loss.detach())
            for key, value in sums.items():
                step_sums[key] = step_sums.get(key, 0.0) + value
        for _ in range(dist.lockstep_fillers(batch, lambda share: len(micro_batches(share)))):
            # fsdp: a rank with fewer micro-batches matches the others' forwards and backwards; adds nothing.
            loss, _sums = self.compute_loss(batch[:1])
            (loss * 0.0).backward()
        if dist.enabled:
            dist.reduce_gradients(self.params)
            step_sums = dist.sum_values(step_sums)
        step_loss = step_sums.pop("loss")
        window.add(step_sums)
        grad_norm, learning_rate = optimizer_step(
            self.params,
            self.optimizer,
            self.scheduler,
            loss=step_loss,
            step_number=step,
            max_grad_norm=hp.max_grad_norm,
        )
        window.end_step(step_loss, weight, grad_norm)
        values: dict[str, float] = {}
        due = self.logger.due(step)
        if due:
            values = self.log_values(window, learning_rate=learning_rate, epoch=step / self.steps_per_epoch)
            window.reset()
        values.update(self.on_eval(step))
        if values:
            self.logger.log(step, values, keep=due)

    def on_end(self) -> None:
        self.model.eval()

    def run_metrics(self, steps: int, train_seconds: float) -> dict[str, float]:
        """The final metrics every dataset method reports after its own."""
        return {
            "steps": float(steps),
            "epochs": steps / self.steps_per_epoch,
            "train_seconds": train_seconds,
            "trainable_parameters": float(self.n_trainable),
        }
