"""The pieces every training loop here shares (SFT, reward model, DPO, PPO), kept as plain functions:

- :func:`validated`: the spec's hyperparameters and LoRA settings checked again, as clear error codes;
- :func:`local_sha256`: the dataset's hash, with a warning when the local file is not the one the spec named;
- :func:`count_steps`, :func:`build_optimizer`, :func:`optimizer_step`: AdamW with warm-up and decay, the
  divergence check, gradient clipping and the step itself;
- :func:`step_batches`: the batches of the remaining steps, epoch by epoch, skipping what a checkpoint had
  consumed;
- :class:`StepLogger`: metric points, progress and the history the final metrics are read from;
- :func:`write_outputs`, :func:`announce_outputs`: the adapter folder with its model card, then the
  artifact lines the runner stores.

Each trainer keeps its own loop body (what a step computes differs); only what is the same lives here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from contract.hyperparameters import LoraSettings, OptimizerHyperparameters
from contract.protocol import DatasetRef, ProgressWriter
from workers.training import data, lora
from workers.training.errors import INVALID_HYPERPARAMETERS, INVALID_LORA, TRAINING_DIVERGED, TrainingError

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

H = TypeVar("H", bound=BaseModel)


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
    step: int,
    max_grad_norm: float,
) -> tuple[float, float]:
    """Refuse a non-finite ``loss`` (for step ``step + 1``), clip, step optimizer and schedule.

    Returns (pre-clipping global grad norm, the learning rate the step used)."""
    if not math.isfinite(loss):
        raise TrainingError(
            TRAINING_DIVERGED, f"loss became {loss} at step {step + 1}; try a lower learning_rate"
        )
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    learning_rate = float(scheduler.get_last_lr()[0])
    optimizer.step()
    scheduler.step()
    return grad_norm, learning_rate


@dataclass
class AdapterResult:
    """What a trainer that ends with a causal-LM adapter (SFT, DPO) hands back to in-process callers."""

    model: torch.nn.Module
    adapter_dir: Path
    model_card_dir: Path
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


class StepLogger:
    """Metric points of one stage: the ``metric`` line, the progress bar and the in-memory history.

    ``due(step)``: every ``every`` steps and at the last one. Only the first and last points travel in a
    checkpoint (:meth:`state`, :meth:`load`): the final metrics are read from them.
    """

    def __init__(
        self,
        progress: ProgressWriter,
        stage: str,
        *,
        every: int,
        total: int,
        span: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.progress = progress
        self.stage = stage
        self.every = every
        self.total = total
        self.span = span
        self.history: list[dict[str, float]] = []

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def report(self, fraction: float) -> None:
        start, end = self.span
        self.progress.progress(start + (end - start) * fraction, stage=self.stage)

    def log(self, step: int, values: Mapping[str, float], *, emit: bool = True) -> None:
        """Keep ``values`` as the point of ``step``; with ``emit``, send the metric line and the progress."""
        if emit:
            self.progress.metric(stage=self.stage, step=step, values=dict(values))
            self.report(step / self.total)
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
