"""Reward model: a scalar head on the base (LoRA on the body, the head trained in full), pairwise loss.

The model is ``AutoModelForSequenceClassification(num_labels=1)`` on the job's base, so the saved adapter
(LoRA + the ``score`` head via peft's ``modules_to_save``) loads with plain peft as a sequence classifier.
Loss per pair (as TRL's RewardTrainer): ``-logsigmoid(r_chosen - r_rejected - margin)`` plus
``center_rewards_coefficient * (r_chosen + r_rejected)^2``, which pins the otherwise free offset of the
rewards near 0 (PPO whitens advantages, but the KL penalty is added to raw rewards, so their scale matters).
Both sides of a pair run in the same forward batch; the reward is read at each row's last real token.

:func:`train_reward_model` is the in-process entry point (the rlhf pipeline calls it); :func:`run` is the
registry's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from contract.hyperparameters import RewardModelHyperparameters
from workers.training import checkpoint, data, loop, lora, preference
from workers.training.context import RunContext
from workers.training.modelcard import render_model_card

STAGE = "reward_model"
HEAD = "score"  # transformers' name for the head of *ForSequenceClassification models


@dataclass
class RewardModelResult:
    model: torch.nn.Module
    reward_model_dir: Path
    model_card_dir: Path
    steps: int
    metrics: dict[str, float]  # final: loss, accuracy, margin, eval_accuracy, eval_margin, ...
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def eval_accuracy(self) -> float | None:
        """Held-out pair accuracy at the end (the rlhf quality gate); None without a held-out set."""
        return self.metrics.get("eval_accuracy")


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, *, margin: float = 0.0, center_coefficient: float = 0.0
) -> torch.Tensor:
    """Per-pair loss ``[n]``: Bradley-Terry with a required gap, plus the reward-centring penalty."""
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected) ** 2
    return loss


def score_pairs(
    model: torch.nn.Module, pairs: list[data.PreferenceExample], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) for ``pairs``, both sides in one forward batch."""
    batch = data.collate_pairs(pairs, pad_token_id)
    rewards = lora.score_last_token(
        model, batch["input_ids"].to(device), batch["attention_mask"].to(device), head=HEAD
    )
    return rewards[: len(pairs)], rewards[len(pairs) :]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    pairs: list[data.PreferenceExample],
    pad_token_id: int,
    device: torch.device,
    *,
    batch_size: int,
    hp: RewardModelHyperparameters,
) -> dict[str, float]:
    """Held-out pair accuracy (r_chosen > r_rejected; a tie counts as wrong), mean margin and loss."""
    was_training = model.training
    model.eval()
    correct = 0
    margin_sum = loss_sum = 0.0
    try:
        for chunk in preference.iter_chunks(list(range(len(pairs))), batch_size):
            chosen, rejected = score_pairs(model, [pairs[i] for i in chunk], pad_token_id, device)
            correct += int((chosen > rejected).sum())
            margin_sum += float((chosen - rejected).sum())
            loss_sum += float(
                pairwise_loss(
                    chosen, rejected, margin=hp.margin, center_coefficient=hp.center_rewards_coefficient
                ).sum()
            )
    finally:
        model.train(was_training)
    n = len(pairs)
    return {"eval_accuracy": correct / n, "eval_margin": margin_sum / n, "eval_loss": loss_sum / n}


def train_reward_model(
    ctx: RunContext,
    *,
    hyperparameters: Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
    stage: str = STAGE,
    progress_span: tuple[float, float] = (0.0, 1.0),
) -> RewardModelResult:
    """Train a reward model on the spec's ``preference`` dataset; write and announce its artifacts.

    ``hyperparameters`` defaults to ``ctx.spec.hyperparameters`` (the rlhf pipeline passes its
    ``reward_model`` stage's), ``output_dir`` to ``ctx.spec.output_dir``; ``progress_span`` maps this stage's
    0..1 into the job's progress. Returns the final metrics (``eval_accuracy`` included when there is a held-out
    set) with the live model, so a caller may go on using it.
    """
    spec, progress, cancel = ctx.spec, ctx.progress, ctx.cancel
    hp, lora_settings = loop.validated(
        RewardModelHyperparameters,
        dict(spec.hyperparameters if hyperparameters is None else hyperparameters),
        spec.lora,
        method="reward_model",
    )
    prepared = preference.prepare_pairs(ctx, stage=stage, max_length=hp.max_length)
    pairs, pad_token_id = prepared.pairs, prepared.pad_token_id
    # Whole groups: a ranking's pairs of one prompt are held out together (no prompt on both sides).
    groups = [p.group for p in pairs]
    train_idx, eval_idx = data.grouped_holdout_split(groups, hp.eval_fraction, seed=spec.seed)
    train_pairs = [pairs[i] for i in train_idx]
    eval_pairs = [pairs[i] for i in eval_idx]
    progress.event(
        f"{len(train_pairs)} training pairs, {len(eval_pairs)} held out (eval_fraction={hp.eval_fraction}, "
        f"seed {spec.seed})",
        stage=stage,
    )
    if spec.init_adapter is not None:
        # An SFT adapter is a causal-LM adapter without a score head; starting a classifier from it would
        # need a merge we do not do. Say so rather than pretend.
        progress.event(
            f"init_adapter {spec.init_adapter.id} is ignored: a reward model starts from the base model",
            stage=stage,
            level="warning",
        )

    from transformers import AutoModelForSequenceClassification

    device = lora.pick_device()
    base = lora.load_base_model(
        spec.base_model.path,
        device=device,
        model_class=AutoModelForSequenceClassification,
        num_labels=1,
    )
    # transformers' classifier refuses batches > 1 without a pad id, and a user loading the artifact with
    # plain peft relies on it to find the last token; we read the last token from the attention mask.
    base.config.pad_token_id = pad_token_id
    # A new feedback round continues the previous round's reward model (its LoRA and its score head).
    init_reward = spec.init_reward_model
    model = lora.attach_adapter(
        base,
        lora_settings,
        task_type="SEQ_CLS",
        modules_to_save=[HEAD],
        init_adapter=init_reward.path if init_reward is not None else None,
    )
    if init_reward is not None:
        progress.event(f"continuing reward model {init_reward.id} (LoRA and {HEAD} head)", stage=stage)
    if hp.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = lora.trainable_parameters(model)
    n_trainable, n_total = lora.count_parameters(model)
    progress.event(
        f"reward model on {spec.base_model.name} ({device.type}): {n_total - n_trainable:,} frozen parameters, "
        f"{n_trainable:,} trainable (LoRA + {HEAD} head)",
        stage=stage,
    )

    steps_per_epoch, total = loop.count_steps(len(train_pairs), hp)
    optimizer, scheduler = loop.build_optimizer(params, hp, total)
    logger = loop.StepLogger(progress, stage, every=hp.logging_steps, total=total, span=progress_span)

    def run_eval() -> dict[str, float]:
        return evaluate(model, eval_pairs, pad_token_id, device, batch_size=hp.batch_size, hp=hp)

    ckpt = checkpoint.Checkpointer(
        ctx,
        stage=stage,
        every=hp.checkpoint_steps,
        modules={"model": model},  # LoRA and the score head (peft's modules_to_save copy)
        optimizer=optimizer,
        scheduler=scheduler,
    )
    step, start_epoch, skip_batches = 0, 0, 0
    resumed = ckpt.restore()
    if resumed is not None:
        step, start_epoch, skip_batches = resumed.step, resumed.epoch, resumed.position
        logger.load(resumed.extra)
        # The evaluations so far travel in the checkpoint: the final metrics and the gate read them.
        initial_eval = dict(resumed.extra.get("initial_eval", {}))
        last_eval = dict(resumed.extra.get("last_eval", {}))
        last_train = dict(resumed.extra.get("last_train", {}))
    else:
        initial_eval = run_eval() if eval_pairs else {}
        if initial_eval:
            progress.event(
                f"before training: held-out accuracy {initial_eval['eval_accuracy']:.3f}, "
                f"margin {initial_eval['eval_margin']:.4f}",
                stage=stage,
            )
        last_eval = dict(initial_eval)
        last_train = {}
    last_epoch, last_position = start_epoch, skip_batches

    def ckpt_extra() -> dict[str, Any]:
        return {
            **logger.state(),
            "initial_eval": initial_eval,
            "last_eval": last_eval,
            "last_train": last_train,
        }

    window: dict[str, float] = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "pairs": 0.0}
    window_grad_norms: list[float] = []
    train_start = time.perf_counter()
    model.train()
    logger.report(step / total)

    with cancel.deferred():
        for epoch, position, batch in loop.step_batches(
            hp.epochs,
            lambda epoch: preference.epoch_batches(train_pairs, hp.batch_size, seed=spec.seed, epoch=epoch),
            steps=total - step,
            start_epoch=start_epoch,
            skip=skip_batches,
        ):
            cancel.check()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in data.split_micro_batches(batch, hp.gradient_accumulation_steps):
                chosen, rejected = score_pairs(model, [train_pairs[i] for i in micro], pad_token_id, device)
                per_pair = pairwise_loss(
                    chosen, rejected, margin=hp.margin, center_coefficient=hp.center_rewards_coefficient
                )
                # Divided by the step's pair count, so accumulation gives the big batch's mean gradient.
                (per_pair.sum() / len(batch)).backward()
                step_loss += float(per_pair.detach().sum())
                window["correct"] += float((chosen > rejected).sum())
                window["margin"] += float((chosen - rejected).detach().sum())
            grad_norm, learning_rate = loop.optimizer_step(
                params, optimizer, scheduler, loss=step_loss, step=step, max_grad_norm=hp.max_grad_norm
            )
            step += 1
            window["loss"] += step_loss
            window["pairs"] += len(batch)
            window_grad_norms.append(grad_norm)

            values: dict[str, float] = {}
            if logger.due(step):
                last_train = {
                    "loss": window["loss"] / window["pairs"],
                    "accuracy": window["correct"] / window["pairs"],
                    "margin": window["margin"] / window["pairs"],
                    "learning_rate": learning_rate,
                    "grad_norm": sum(window_grad_norms) / len(window_grad_norms),
                    "epoch": step / steps_per_epoch,
                }
                values.update(last_train)
                window = dict.fromkeys(window, 0.0)
                window_grad_norms = []
            if eval_pairs and (step % hp.eval_steps == 0 or step == total):
                last_eval = run_eval()
                values.update(last_eval)
            if values:
                logger.log(step, values)
            last_epoch, last_position = epoch, position
            ckpt.maybe_save(step, epoch=epoch, position=position, extra=ckpt_extra())
        train_seconds = time.perf_counter() - train_start
        cancel.check()
        ckpt.save(step, epoch=last_epoch, position=last_position, extra=ckpt_extra(), final=True)

        model.eval()
        metrics: dict[str, float] = {
            **{k: v for k, v in last_train.items() if k in ("loss", "accuracy", "margin")},
            **last_eval,
            "steps": float(step),
            "epochs": step / steps_per_epoch,
            "train_seconds": train_seconds,
            "trainable_parameters": float(n_trainable),
            "train_pairs": float(len(train_pairs)),
            "eval_pairs": float(len(eval_pairs)),
        }
        if initial_eval:
            metrics["initial_eval_accuracy"] = initial_eval["eval_accuracy"]
        card = render_model_card(
            title=f"{spec.base_model.name} + LoRA reward model",
            method="reward_model",
            job_id=spec.job_id,
            base_model_name=spec.base_model.name,
            base_model_id=spec.base_model.id,
            datasets=[prepared.card_entry()],
            lora=lora_settings.model_dump(),
            hyperparameters=hp.model_dump(),
            seed=spec.seed,
            metrics=metrics,
            loader="AutoModelForSequenceClassification",
            loader_args=", num_labels=1",
            notes=_reward_notes(pad_token_id, metrics.get("eval_accuracy"), len(eval_pairs)),
        )
        rm_dir, card_dir = loop.write_outputs(
            model,
            prepared.tokenizer,
            Path(spec.output_dir if output_dir is None else output_dir),
            "reward_model",
            card,
            base_model_name=spec.base_model.name,
        )
        cancel.check()

    metadata = {
        "base_model": spec.base_model.id,
        "method": "reward_model",
        "metrics": metrics,
        # Read by the rlhf quality gate; None when eval_fraction was 0 (nothing held out to judge by).
        "eval_accuracy": metrics.get("eval_accuracy"),
        "datasets": {preference.ROLE: {"id": prepared.dataset_ref.id, "sha256": prepared.dataset_sha256}},
    }
    loop.announce_outputs(
        progress,
        stage,
        rm_dir,
        card_dir,
        kind="reward_model",
        metadata=metadata,
        base_model_id=spec.base_model.id,
    )
    logger.report(1.0)
    summary = f"finished {step} steps in {train_seconds:.1f} s"
    if "eval_accuracy" in metrics:
        summary += (
            f"; held-out accuracy {metrics.get('initial_eval_accuracy', float('nan')):.3f} -> "
            f"{metrics['eval_accuracy']:.3f}"
        )
    progress.event(summary, stage=stage)
    return RewardModelResult(
        model=model,
        reward_model_dir=rm_dir,
        model_card_dir=card_dir,
        steps=step,
        metrics=metrics,
        history=logger.history,
    )


def _reward_notes(pad_token_id: int, eval_accuracy: float | None, n_eval: int) -> str:
    accuracy = (
        f"Final held-out pair accuracy: **{eval_accuracy:.4f}** on {n_eval} pairs."
        if eval_accuracy is not None
        else "No held-out pairs (eval_fraction=0): no held-out accuracy."
    )
    return f"""
## Reward model

{accuracy}

`model(input_ids, attention_mask).logits[:, 0]` is the reward of each sequence (prompt + response, chat
template applied as in training). transformers finds each row's last token through `config.pad_token_id`;
training used pad id {pad_token_id}: set `base.config.pad_token_id = {pad_token_id}` if the base config has
none, and keep EOS distinct from the pad token.
"""


def run(ctx: RunContext) -> None:
    train_reward_model(ctx)
