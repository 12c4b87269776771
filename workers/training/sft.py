"""Supervised fine-tuning with LoRA: a plain torch loop (no HF Trainer), so every number is ours to explain.

One optimizer step consumes ``batch_size`` examples (the API's definition), split into
``gradient_accumulation_steps`` micro-batches. The loss is summed over the step's trainable (completion)
tokens and divided by their count *for the whole step*, so accumulation gives exactly the gradient of one big
batch, and long and short examples weigh by their tokens, not per example.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch
import torch.nn.functional as F

from contract.hyperparameters import SFTHyperparameters
from workers.training import checkpoint, data, loop, lora, sharding
from workers.training.context import RunContext
from workers.training.errors import INVALID_SPEC, NO_TRAINABLE_EXAMPLES, TrainingError
from workers.training.modelcard import DatasetCardEntry

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


def correct_tokens(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """How many next-token predictions (argmax) equal their label, over positions whose label is not
    IGNORE_INDEX: ``mean_token_accuracy``'s numerator (TRL's and OpenAI's metric of the same name)."""
    if logits.dim() == 2:  # already the kept positions, aligned with ``labels``
        return int((logits.argmax(-1) == labels).sum())
    shifted_labels = labels[:, 1:]
    predicted = logits[:, :-1, :].argmax(-1)
    return int(((predicted == shifted_labels) & (shifted_labels != data.IGNORE_INDEX)).sum())


def completion_loss_sum(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """:func:`token_loss_sum` computed with the LM head and log-softmax only at the positions that predict a
    label (completion tokens), not at prompt and pad positions: the same loss and gradients, less work and
    memory (on SmolLM2-135M the head is about a fifth of the step's FLOPs). Also the correct predictions."""
    labels = inputs["labels"]
    if _logits_mask_supported(model):
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != data.IGNORE_INDEX
        logits = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep
        ).logits
        if logits.dim() == 2:  # (kept positions, vocab)
            kept_labels = labels[:, 1:][keep[:, :-1]]
            loss = F.cross_entropy(logits.float(), kept_labels, reduction="sum")
            return loss, correct_tokens(logits.detach(), kept_labels)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return token_loss_sum(logits, labels), correct_tokens(logits.detach(), labels)


class SFTTrainer(loop.DatasetTrainer[SFTHyperparameters]):
    """SFT's hooks on the shared loop: completion-token batches, the summed token loss, the SFT card."""

    method = STAGE

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx, SFTHyperparameters)
        dataset_ref = self.spec.datasets.get("sft")
        if dataset_ref is None:
            raise TrainingError(INVALID_SPEC, "method sft needs a dataset with role 'sft'")
        self.dataset_ref = dataset_ref
        # Data first: a bad dataset fails in a second, before the (slow) model load.
        self._read_examples()
        self._read_validation()
        self._load_model()
        self.lengths = [example.length for example in self.examples]
        self.plan(len(self.examples))
        self.eval_every = self.hp.eval_steps or max(1, self.total // 10)

    def _read_examples(self) -> None:
        hp, progress, dataset_ref = self.hp, self.progress, self.dataset_ref
        records = data.read_sft_records(dataset_ref.path)
        self.dataset_sha256 = loop.local_sha256(progress, dataset_ref, stage=STAGE)
        self.tokenizer = tokenizer = lora.load_tokenizer(self.spec.base_model.path)
        self.examples, stats = data.tokenize_sft(
            tokenizer, records, max_length=hp.max_length, completion_only_loss=hp.completion_only_loss
        )
        self.stats = stats
        progress.event(
            f"dataset {dataset_ref.name}: {stats.records} records -> {stats.examples} examples, "
            f"{stats.tokens} tokens ({stats.trainable_tokens} trained on), {stats.truncated} truncated to "
            f"{hp.max_length} tokens",
            stage=STAGE,
        )
        if stats.dropped_no_trainable:
            progress.event(
                f"dropped {stats.dropped_no_trainable} of {stats.records} examples with no completion tokens "
                f"left after truncation to max_length={hp.max_length}",
                stage=STAGE,
                level="warning",
            )
        if stats.prefix_fallback:
            progress.event(
                f"{stats.prefix_fallback} examples: the chat template's prompt was not a token prefix of the "
                "full conversation; masked the longest common prefix instead",
                stage=STAGE,
                level="warning",
            )
        if not self.examples:
            raise TrainingError(NO_TRAINABLE_EXAMPLES, "no example has a completion token left to train on")
        pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            # Harmless for training: right padding is masked out of attention and labels.
            pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.collate = data.SFTCollator(int(pad_token_id))

    def _read_validation(self) -> None:
        """The optional held-out set (role ``validation``, kind sft), tokenised by the training set's rules."""
        self.validation: list[data.SFTExample] = []
        self.last_eval: dict[str, float] = {}
        ref = self.spec.datasets.get("validation")
        if ref is None:
            return
        hp = self.hp
        self.validation_sha256 = loop.local_sha256(self.progress, ref, stage=STAGE)
        self.validation, stats = data.tokenize_sft(
            self.tokenizer,
            data.read_sft_records(ref.path),
            max_length=hp.max_length,
            completion_only_loss=hp.completion_only_loss,
        )
        if not self.validation:
            raise TrainingError(
                NO_TRAINABLE_EXAMPLES,
                f"validation dataset {ref.name}: no example has a completion token left",
            )
        self.validation_ref, self.validation_stats = ref, stats
        self.progress.event(
            f"validation dataset {ref.name}: {stats.examples} examples, {stats.trainable_tokens} completion "
            f"tokens; evaluated every {hp.eval_steps or 'tenth of the run'} steps and at the end",
            stage=STAGE,
        )

    def _load_model(self) -> None:
        spec = self.spec
        self.device = lora.pick_device()
        base = lora.load_base_model(
            spec.base_model.path,
            device=sharding.load_device(self.ctx.dist, self.device),
            precision=spec.resources.precision,
        )
        init_path = spec.init_adapter.path if spec.init_adapter else None
        n_total = self.use_model(lora.attach_adapter(base, self.lora_settings, init_adapter=init_path))
        self.progress.event(
            f"base {spec.base_model.name} on {self.device.type}: {n_total - self.n_trainable:,} frozen "
            f"parameters, {self.n_trainable:,} trainable LoRA parameters"
            + (f" (from init adapter {spec.init_adapter.id})" if spec.init_adapter else ""),
            stage=STAGE,
        )

    def build_batches(self, epoch: int) -> list[list[int]]:
        # A fresh, seeded batch order per epoch; the same seed gives the same run.
        return data.length_bucketed_batches(
            self.lengths, self.hp.batch_size, rng=random.Random(self.spec.seed * 1_000_003 + epoch)
        )

    def batch_weight(self, batch: list[int]) -> int:
        return sum(self.examples[i].num_trainable for i in batch)

    def compute_loss(self, micro: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = {k: v.to(self.device) for k, v in self.collate([self.examples[i] for i in micro]).items()}
        loss, correct = completion_loss_sum(self.model, inputs)
        return loss, {"inputs": int(inputs["attention_mask"].sum()), "correct": correct}

    def train_step(self, step: int, batch: list[int]) -> None:
        # Counted on the whole step's batch (every rank has it), not on this rank's share of it.
        self.trained_tokens += sum(self.examples[i].length for i in batch)
        super().train_step(step, batch)

    def on_eval(self, step: int) -> dict[str, float]:
        if self.validation and (step % self.eval_every == 0 or step == self.total):
            self.last_eval = self.run_eval()
            return self.last_eval
        return {}

    @torch.no_grad()
    def run_eval(self) -> dict[str, float]:
        """Loss and token accuracy over every held-out example, per completion token (dropout off)."""
        self.model.eval()
        loss_sum, correct, tokens = 0.0, 0, 0
        try:
            # Under torchrun each rank scores its share of the held-out examples; the sums are added below.
            order = self.ctx.dist.shard(
                sorted(range(len(self.validation)), key=lambda i: self.validation[i].length)
            )
            for start in range(0, len(order), self.hp.batch_size):
                batch = [self.validation[i] for i in order[start : start + self.hp.batch_size]]
                inputs = {k: v.to(self.device) for k, v in self.collate(batch).items()}
                batch_loss, batch_correct = completion_loss_sum(self.model, inputs)
                loss_sum += float(batch_loss)
                correct += batch_correct
                tokens += sum(example.num_trainable for example in batch)
            for _ in range(self.ctx.dist.lockstep_batch_fillers(self.validation, self.hp.batch_size)):
                # fsdp: as many forwards as the rank with the most held-out batches; the result is dropped
                completion_loss_sum(
                    self.model, {k: v.to(self.device) for k, v in self.collate(self.validation[:1]).items()}
                )
        finally:
            self.model.train()
        sums = self.ctx.dist.sum_values({"loss": loss_sum, "correct": correct, "tokens": tokens})
        return {
            "eval_loss": sums["loss"] / sums["tokens"],
            "eval_mean_token_accuracy": sums["correct"] / sums["tokens"],
        }

    def on_start(self, resumed: checkpoint.ResumeState | None) -> None:
        super().on_start(resumed)
        # The newest evaluation and the token count travel in the checkpoint: the final metrics read them.
        self.trained_tokens = int(resumed.extra.get("trained_tokens", 0)) if resumed is not None else 0
        if resumed is not None:
            self.last_eval = dict(resumed.extra.get("last_eval", {}))

    def checkpoint_extra(self) -> dict[str, Any]:
        extra = {"last_eval": self.last_eval, "trained_tokens": self.trained_tokens}
        return {**super().checkpoint_extra(), **extra}

    def log_values(
        self, window: loop.MetricWindow, *, learning_rate: float, epoch: float
    ) -> dict[str, float]:
        return {
            # mean over the window's completion tokens (the step's, with logging_steps=1)
            "loss": window.mean("loss"),
            "learning_rate": learning_rate,
            "grad_norm": window.grad_norm(),
            # every non-pad input token (prompt included) per wall-clock second
            "tokens_per_second": window.per_second("inputs"),
            # argmax predictions equal to the label, over the window's completion tokens
            "mean_token_accuracy": window.mean("correct"),
            "epoch": epoch,
        }

    def final_metrics(self, steps: int, train_seconds: float) -> dict[str, float]:
        history = self.logger.history
        return {
            "loss": history[-1]["loss"],
            "first_loss": history[0]["loss"],
            "mean_token_accuracy": history[-1]["mean_token_accuracy"],
            # non-pad input tokens of every example consumed, each epoch again (OpenAI's trained_tokens)
            "trained_tokens": float(self.trained_tokens),
            **self.last_eval,
            **self.run_metrics(steps, train_seconds),
        }

    def save_outputs(self, metrics: dict[str, float]) -> loop.Outputs:
        spec, dataset_ref = self.spec, self.dataset_ref
        entry = DatasetCardEntry(
            role="sft",
            name=dataset_ref.name,
            id=dataset_ref.id,
            sha256=self.dataset_sha256,
            num_records=self.stats.records,
            num_examples=self.stats.examples,
        )
        entries = [entry]
        if self.validation:
            ref, stats = self.validation_ref, self.validation_stats
            entries.append(
                DatasetCardEntry(
                    role="validation",
                    name=ref.name,
                    id=ref.id,
                    sha256=self.validation_sha256,
                    num_records=stats.records,
                    num_examples=stats.examples,
                )
            )
        card = self.model_card(
            title=f"{spec.base_model.name} + LoRA (SFT)",
            datasets=entries,
            lora=self.policy_lora(self.model),
            metrics=metrics,
        )
        datasets = {"sft": {"id": dataset_ref.id, "sha256": self.dataset_sha256}}
        if self.validation:
            datasets["validation"] = {"id": self.validation_ref.id, "sha256": self.validation_sha256}
        return self.publish(self.model, self.tokenizer, card, metrics, datasets=datasets)

    def summary(self, metrics: dict[str, float], steps: int, train_seconds: float) -> str:
        loss = f"loss {metrics['first_loss']:.4f} -> {metrics['loss']:.4f}"
        return f"{super().summary(metrics, steps, train_seconds)}; {loss}"


def train_sft(ctx: RunContext) -> SFTResult:
    return SFTResult.train(SFTTrainer(ctx))
