"""Direct preference optimisation (sigmoid loss) with LoRA, on one copy of the base.

Per pair, with log-probabilities summed over the response tokens only (prompt masked exactly as SFT masks it):

    logits = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))
    loss   = -(1 - eps) * logsigmoid(beta * logits) - eps * logsigmoid(-beta * logits)     (eps = label_smoothing)

The reference is never a second model. Without ``init_adapter`` it is the base itself (the same PeftModel
inside ``disable_adapter()``). With ``init_adapter`` (continuing from an SFT adapter) the policy starts from that
adapter and, by default (``reference_model="init_adapter"``), the reference is the same adapter loaded a second
time, frozen, as adapter ``"reference"`` on the same base: the reference is then the SFT policy, as in the DPO
paper and TRL. ``reference_model="base"`` uses the bare base instead.

The reference log-probs are computed once, before training, in eval mode (no LoRA dropout) and under
``no_grad``: the reference is frozen, so this is exact, and it saves a forward pass per pair and epoch. At step
1 the policy equals the reference, so the loss starts at ln 2 and the implicit rewards at 0.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from contract.hyperparameters import DPOHyperparameters
from workers.training import checkpoint, data, loop, lora, preference
from workers.training.context import RunContext
from workers.training.modelcard import render_model_card

STAGE = "dpo"


DPOResult = loop.AdapterResult


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of ``log p(token)`` over positions whose label is not IGNORE_INDEX -> ``[batch]`` (fp32)."""
    logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    mask = targets != data.IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0)
    # gather - logsumexp: the log-softmax of one token without materialising the whole log-softmax.
    token_logps = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward); rewards are ``beta * (log pi - log ref)``, detached."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    loss = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )
    rewards_chosen = beta * (policy_chosen - reference_chosen).detach()
    rewards_rejected = beta * (policy_rejected - reference_rejected).detach()
    return loss, rewards_chosen, rewards_rejected


def pair_logps(
    model: torch.nn.Module, pairs: list[data.PreferenceExample], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(chosen | prompt), log p(rejected | prompt)): both sides of every pair in one forward batch."""
    batch = {k: v.to(device) for k, v in data.collate_pairs(pairs, pad_token_id).items()}
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logps = completion_logps(logits, batch["labels"])
    return logps[: len(pairs)], logps[len(pairs) :]


@torch.no_grad()
def reference_logps(
    model: PeftModel,
    reference: str | None,
    pairs: list[data.PreferenceExample],
    pad_token_id: int,
    device: torch.device,
    *,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of every pair: adapter ``reference`` active (None: adapters disabled), eval mode."""
    was_training = model.training
    model.eval()
    chosen: list[torch.Tensor] = []
    rejected: list[torch.Tensor] = []
    try:
        with lora.use_adapter(model, reference):
            for chunk in preference.iter_chunks(list(range(len(pairs))), batch_size):
                c, r = pair_logps(model, [pairs[i] for i in chunk], pad_token_id, device)
                chosen.append(c)
                rejected.append(r)
    finally:
        model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def train_dpo(
    ctx: RunContext,
    *,
    hyperparameters: Mapping[str, Any] | None = None,
    output_dir: str | Path | None = None,
    stage: str = STAGE,
) -> DPOResult:
    spec, progress, cancel = ctx.spec, ctx.progress, ctx.cancel
    hp, lora_settings = loop.validated(
        DPOHyperparameters,
        dict(spec.hyperparameters if hyperparameters is None else hyperparameters),
        spec.lora,
        method="dpo",
    )
    prepared = preference.prepare_pairs(
        ctx, stage=stage, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length
    )
    pairs, pad_token_id = prepared.pairs, prepared.pad_token_id

    device = lora.pick_device()
    base = lora.load_base_model(spec.base_model.path, device=device)
    init_path = spec.init_adapter.path if spec.init_adapter else None
    model = lora.attach_adapter(base, lora_settings, init_adapter=init_path)
    reference: str | None = None
    if init_path is not None and hp.reference_model == "init_adapter":
        lora.add_frozen_adapter(model, lora.REFERENCE_ADAPTER, init_path)
        reference = lora.REFERENCE_ADAPTER
    if hp.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    params = lora.trainable_parameters(model)
    n_trainable, n_total = lora.count_parameters(model)
    reference_text = (
        f"init adapter {spec.init_adapter.id} (frozen copy)"
        if reference is not None and spec.init_adapter is not None
        else "the base model (adapter disabled)"
    )
    progress.event(
        f"policy on {spec.base_model.name} ({device.type}): {n_total - n_trainable:,} frozen parameters, "
        f"{n_trainable:,} trainable LoRA parameters; reference: {reference_text}",
        stage=stage,
    )

    ref_chosen, ref_rejected = reference_logps(
        model, reference, pairs, pad_token_id, device, batch_size=hp.batch_size
    )
    steps_per_epoch, total = loop.count_steps(len(pairs), hp)
    optimizer, scheduler = loop.build_optimizer(params, hp, total)
    logger = loop.StepLogger(progress, stage, every=hp.logging_steps, total=total)

    # After the reference pass, which reads the frozen reference (never the policy) and draws no random numbers.
    ckpt = checkpoint.Checkpointer(
        ctx,
        stage=stage,
        every=hp.checkpoint_steps,
        modules={"model": model},
        optimizer=optimizer,
        scheduler=scheduler,
    )
    step, start_epoch, skip_batches = 0, 0, 0
    resumed = ckpt.restore()
    if resumed is not None:
        step, start_epoch, skip_batches = resumed.step, resumed.epoch, resumed.position
        logger.load(resumed.extra)
    last_epoch, last_position = start_epoch, skip_batches
    keys = ("loss", "rewards_chosen", "rewards_rejected", "margin", "correct", "pairs")
    window = dict.fromkeys(keys, 0.0)
    window_grad_norms: list[float] = []
    train_start = time.perf_counter()
    model.train()
    logger.report(step / total)

    with cancel.deferred():
        for epoch, position, batch in loop.step_batches(
            hp.epochs,
            lambda epoch: preference.epoch_batches(pairs, hp.batch_size, seed=spec.seed, epoch=epoch),
            steps=total - step,
            start_epoch=start_epoch,
            skip=skip_batches,
        ):
            cancel.check()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in data.split_micro_batches(batch, hp.gradient_accumulation_steps):
                policy_c, policy_r = pair_logps(model, [pairs[i] for i in micro], pad_token_id, device)
                index = torch.tensor(micro, device=device)
                loss, reward_c, reward_r = dpo_loss(
                    policy_c,
                    policy_r,
                    ref_chosen[index],
                    ref_rejected[index],
                    beta=hp.beta,
                    label_smoothing=hp.label_smoothing,
                )
                # Divided by the step's pair count, so accumulation gives the big batch's mean gradient.
                (loss.sum() / len(batch)).backward()
                step_loss += float(loss.detach().sum())
                window["rewards_chosen"] += float(reward_c.sum())
                window["rewards_rejected"] += float(reward_r.sum())
                window["margin"] += float((reward_c - reward_r).sum())
                window["correct"] += float((reward_c > reward_r).sum())
            grad_norm, learning_rate = loop.optimizer_step(
                params, optimizer, scheduler, loss=step_loss, step=step, max_grad_norm=hp.max_grad_norm
            )
            step += 1
            window["loss"] += step_loss
            window["pairs"] += len(batch)
            window_grad_norms.append(grad_norm)

            if logger.due(step):
                n = window["pairs"]
                values = {
                    "loss": window["loss"] / n,
                    "rewards_chosen": window["rewards_chosen"] / n,
                    "rewards_rejected": window["rewards_rejected"] / n,
                    "margin": window["margin"] / n,
                    # share of pairs whose implicit chosen reward is strictly higher (a tie is wrong)
                    "accuracy": window["correct"] / n,
                    "learning_rate": learning_rate,
                    "grad_norm": sum(window_grad_norms) / len(window_grad_norms),
                    "epoch": step / steps_per_epoch,
                }
                logger.log(step, values)
                window = dict.fromkeys(keys, 0.0)
                window_grad_norms = []
            last_epoch, last_position = epoch, position
            ckpt.maybe_save(step, epoch=epoch, position=position, extra=logger.state())
        train_seconds = time.perf_counter() - train_start
        cancel.check()
        ckpt.save(step, epoch=last_epoch, position=last_position, extra=logger.state(), final=True)

        model.eval()
        history = logger.history
        last = history[-1]
        metrics = {
            **{k: last[k] for k in ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy")},
            "first_loss": history[0]["loss"],
            "first_margin": history[0]["margin"],
            "steps": float(step),
            "epochs": step / steps_per_epoch,
            "train_seconds": train_seconds,
            "trainable_parameters": float(n_trainable),
        }
        card = render_model_card(
            title=f"{spec.base_model.name} + LoRA (DPO)",
            method="dpo",
            job_id=spec.job_id,
            base_model_name=spec.base_model.name,
            base_model_id=spec.base_model.id,
            datasets=[prepared.card_entry()],
            lora=model.peft_config[lora.POLICY_ADAPTER].to_dict()
            if spec.init_adapter
            else lora_settings.model_dump(),
            hyperparameters=hp.model_dump(),
            seed=spec.seed,
            metrics=metrics,
            notes=f"\n## DPO reference\n\nThe reference policy was {reference_text}.\n",
        )
        adapter_dir, card_dir = loop.write_outputs(
            model,
            prepared.tokenizer,
            Path(spec.output_dir if output_dir is None else output_dir),
            "adapter",
            card,
            base_model_name=spec.base_model.name,
        )
        cancel.check()

    metadata = {
        "base_model": spec.base_model.id,
        "method": "dpo",
        "metrics": metrics,
        "datasets": {preference.ROLE: {"id": prepared.dataset_ref.id, "sha256": prepared.dataset_sha256}},
    }
    loop.announce_outputs(
        progress,
        stage,
        adapter_dir,
        card_dir,
        kind="adapter",
        metadata=metadata,
        base_model_id=spec.base_model.id,
    )
    logger.report(1.0)
    progress.event(
        f"finished {step} steps in {train_seconds:.1f} s; margin {metrics['first_margin']:.4f} -> "
        f"{metrics['margin']:.4f}, accuracy {last['accuracy']:.3f}",
        stage=stage,
    )
    return DPOResult(
        model=model,
        adapter_dir=adapter_dir,
        model_card_dir=card_dir,
        steps=step,
        metrics=metrics,
        history=history,
    )


def run(ctx: RunContext) -> None:
    train_dpo(ctx)
