"""Supervised fine-tuning with LoRA: a plain torch loop (no HF Trainer), so every number is ours to explain.

One optimizer step consumes ``batch_size`` examples (the API's definition), split into
``gradient_accumulation_steps`` micro-batches. The loss is summed over the step's trainable (completion)
tokens and divided by their count *for the whole step*, so accumulation gives exactly the gradient of one big
batch, and long and short examples weigh by their tokens, not per example.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from contract.hyperparameters import SFTHyperparameters
from workers.training import checkpoint, data, loop, lora
from workers.training.context import RunContext
from workers.training.errors import INVALID_SPEC, NO_TRAINABLE_EXAMPLES, TrainingError
from workers.training.modelcard import DatasetCardEntry, render_model_card

STAGE = "sft"


SFTResult = loop.AdapterResult


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not IGNORE_INDEX (fp32 for stability)."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=data.IGNORE_INDEX,
        reduction="sum",
    )


def _logits_mask_supported(model: torch.nn.Module) -> bool:
    """Whether the causal LM slices its hidden states with transformers' ``slice_logits_to_keep`` (which takes
    a boolean (batch, seq) mask and returns the kept positions flattened); most decoder LMs in transformers 5
    do. Checked on the model's own module so an architecture that does not falls back to full logits."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    module = sys.modules.get(type(base).__module__)
    return module is not None and callable(getattr(module, "slice_logits_to_keep", None))


def completion_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`token_loss_sum` computed with the LM head and log-softmax only at the positions that predict a
    label (completion tokens), not at prompt and pad positions: the same loss and gradients, less work and
    memory (on SmolLM2-135M the head is about a fifth of the step's FLOPs)."""
    labels = inputs["labels"]
    if _logits_mask_supported(model):
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != data.IGNORE_INDEX
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep
        ).logits
        if logits.dim() == 2:  # (kept positions, vocab)
            return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="sum")
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return token_loss_sum(logits, labels)


def train_sft(ctx: RunContext) -> SFTResult:
    spec, progress, cancel = ctx.spec, ctx.progress, ctx.cancel
    hp, lora_settings = loop.validated(SFTHyperparameters, spec.hyperparameters, spec.lora, method="sft")
    dataset_ref = spec.datasets.get("sft")
    if dataset_ref is None:
        raise TrainingError(INVALID_SPEC, "method sft needs a dataset with role 'sft'")

    # Data first: a bad dataset fails in a second, before the (slow) model load.
    records = data.read_sft_records(dataset_ref.path)
    dataset_sha256 = loop.local_sha256(progress, dataset_ref, stage=STAGE)
    tokenizer = lora.load_tokenizer(spec.base_model.path)
    examples, stats = data.tokenize_sft(
        tokenizer, records, max_length=hp.max_length, completion_only_loss=hp.completion_only_loss
    )
    progress.event(
        f"dataset {dataset_ref.name}: {stats.records} records -> {stats.examples} examples, "
        f"{stats.tokens} tokens ({stats.trainable_tokens} trained on), {stats.truncated} truncated to "
        f"{hp.max_length} tokens",
        stage=STAGE,
    )
    if stats.dropped_no_trainable:
        progress.event(
            f"dropped {stats.dropped_no_trainable} of {stats.records} examples with no completion tokens left "
            f"after truncation to max_length={hp.max_length}",
            stage=STAGE,
            level="warning",
        )
    if stats.prefix_fallback:
        progress.event(
            f"{stats.prefix_fallback} examples: the chat template's prompt was not a token prefix of the full "
            "conversation; masked the longest common prefix instead",
            stage=STAGE,
            level="warning",
        )
    if not examples:
        raise TrainingError(NO_TRAINABLE_EXAMPLES, "no example has a completion token left to train on")

    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        # Harmless for training: right padding is masked out of attention and labels.
        pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    collate = data.SFTCollator(int(pad_token_id))

    device = lora.pick_device()
    base = lora.load_base_model(spec.base_model.path, device=device)
    init_path = spec.init_adapter.path if spec.init_adapter else None
    model = lora.attach_adapter(base, lora_settings, init_adapter=init_path)
    if hp.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input-grad hack with frozen embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    params = lora.trainable_parameters(model)
    n_trainable, n_total = lora.count_parameters(model)
    progress.event(
        f"base {spec.base_model.name} on {device.type}: {n_total - n_trainable:,} frozen parameters, "
        f"{n_trainable:,} trainable LoRA parameters"
        + (f" (from init adapter {spec.init_adapter.id})" if spec.init_adapter else ""),
        stage=STAGE,
    )

    steps_per_epoch, total_steps = loop.count_steps(len(examples), hp)
    optimizer, scheduler = loop.build_optimizer(params, hp, total_steps)
    lengths = [example.length for example in examples]

    ckpt = checkpoint.Checkpointer(
        ctx,
        stage=STAGE,
        every=hp.checkpoint_steps,
        modules={"model": model},
        optimizer=optimizer,
        scheduler=scheduler,
    )
    logger = loop.StepLogger(progress, STAGE, every=hp.logging_steps, total=total_steps)
    step = 0
    start_epoch, skip_batches = 0, 0
    resumed = ckpt.restore()
    if resumed is not None:
        step, start_epoch, skip_batches = resumed.step, resumed.epoch, resumed.position
        logger.load(resumed.extra)
    last_epoch, last_position = start_epoch, skip_batches

    window_loss = 0.0
    window_tokens = 0
    window_inputs = 0
    window_grad_norms: list[float] = []
    window_start = time.perf_counter()
    train_start = window_start
    model.train()  # LoRA dropout on; the frozen base has its own dropout settings
    logger.report(step / total_steps)

    def batches_of(epoch: int) -> list[list[int]]:
        # A fresh, seeded batch order per epoch; the same seed gives the same run.
        return data.length_bucketed_batches(
            lengths, hp.batch_size, rng=random.Random(spec.seed * 1_000_003 + epoch)
        )

    with cancel.deferred():
        # A resumed run skips the batches its checkpoint had consumed.
        for epoch, position, batch in loop.step_batches(
            hp.epochs, batches_of, steps=total_steps - step, start_epoch=start_epoch, skip=skip_batches
        ):
            cancel.check()
            step_tokens = sum(examples[i].num_trainable for i in batch)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in data.split_micro_batches(batch, hp.gradient_accumulation_steps):
                inputs = {k: v.to(device) for k, v in collate([examples[i] for i in micro]).items()}
                loss_sum = completion_loss_sum(model, inputs)
                (loss_sum / step_tokens).backward()
                step_loss += float(loss_sum.detach())
                window_inputs += int(inputs["attention_mask"].sum())
            grad_norm, learning_rate = loop.optimizer_step(
                params, optimizer, scheduler, loss=step_loss, step=step, max_grad_norm=hp.max_grad_norm
            )
            step += 1
            window_loss += step_loss
            window_tokens += step_tokens
            window_grad_norms.append(grad_norm)

            if logger.due(step):
                now = time.perf_counter()
                values = {
                    # mean over the window's completion tokens (the step's, with logging_steps=1)
                    "loss": window_loss / window_tokens,
                    "learning_rate": learning_rate,
                    # mean pre-clipping global norm over the window's steps
                    "grad_norm": sum(window_grad_norms) / len(window_grad_norms),
                    # every non-pad input token (prompt included) per wall-clock second
                    "tokens_per_second": window_inputs / max(now - window_start, 1e-9),
                    "epoch": step / steps_per_epoch,
                }
                logger.log(step, values)
                window_loss, window_tokens, window_inputs = 0.0, 0, 0
                window_grad_norms = []
                window_start = now
            last_epoch, last_position = epoch, position
            # A checkpoint mid-way through a logging window drops that window's partial sums on resume:
            # the weights are exact, the first metric point after a resume covers fewer steps.
            ckpt.maybe_save(step, epoch=epoch, position=position, extra=logger.state())
        train_seconds = time.perf_counter() - train_start
        cancel.check()
        ckpt.save(step, epoch=last_epoch, position=last_position, extra=logger.state(), final=True)

        model.eval()
        history = logger.history
        metrics = {
            "loss": history[-1]["loss"],
            "first_loss": history[0]["loss"],
            "steps": float(step),
            "epochs": step / steps_per_epoch,
            "train_seconds": train_seconds,
            "trainable_parameters": float(n_trainable),
        }
        card = render_model_card(
            title=f"{spec.base_model.name} + LoRA (SFT)",
            method="sft",
            job_id=spec.job_id,
            base_model_name=spec.base_model.name,
            base_model_id=spec.base_model.id,
            datasets=[
                DatasetCardEntry(
                    role="sft",
                    name=dataset_ref.name,
                    id=dataset_ref.id,
                    sha256=dataset_sha256,
                    num_records=stats.records,
                    num_examples=stats.examples,
                )
            ],
            lora=model.peft_config[lora.POLICY_ADAPTER].to_dict()
            if spec.init_adapter
            else lora_settings.model_dump(),
            hyperparameters=hp.model_dump(),
            seed=spec.seed,
            metrics=metrics,
        )
        adapter_dir, card_dir = loop.write_outputs(
            model, tokenizer, Path(spec.output_dir), "adapter", card, base_model_name=spec.base_model.name
        )
        cancel.check()

    metadata = {
        "base_model": spec.base_model.id,
        "method": "sft",
        "metrics": metrics,
        "datasets": {"sft": {"id": dataset_ref.id, "sha256": dataset_sha256}},
    }
    loop.announce_outputs(
        progress,
        STAGE,
        adapter_dir,
        card_dir,
        kind="adapter",
        metadata=metadata,
        base_model_id=spec.base_model.id,
    )
    logger.report(1.0)
    progress.event(
        f"finished {step} steps in {train_seconds:.1f} s; loss {metrics['first_loss']:.4f} -> {metrics['loss']:.4f}",
        stage=STAGE,
    )
    return SFTResult(
        model=model,
        adapter_dir=adapter_dir,
        model_card_dir=card_dir,
        steps=step,
        metrics=metrics,
        history=history,
    )


def run(ctx: RunContext) -> None:
    train_sft(ctx)
