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

from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from contract.hyperparameters import DPOHyperparameters
from workers.training import checkpoint, data, loop, lora, preference, sharding
from workers.training.context import RunContext

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


class DPOTrainer(loop.DatasetTrainer[DPOHyperparameters]):
    """DPO's hooks on the shared loop: pair batches, the sigmoid loss against reference log-probs computed once."""

    method = STAGE

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx, DPOHyperparameters)
        hp = self.hp
        self.prepared = preference.prepare_pairs(
            ctx, stage=STAGE, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length
        )
        self.pairs, self.pad_token_id = self.prepared.pairs, self.prepared.pad_token_id
        self.validation = preference.prepare_validation_pairs(
            ctx, self.prepared, stage=STAGE, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length
        )
        self._load_model()
        # Reads the frozen reference (never the policy) and draws no random numbers, so it can run before the
        # checkpoint's RNG states are restored.
        self.ref_chosen, self.ref_rejected = reference_logps(
            self.model, self.reference, self.pairs, self.pad_token_id, self.device, batch_size=hp.batch_size
        )
        self.last_eval: dict[str, float] = {}
        if self.validation is not None:
            self.val_ref_chosen, self.val_ref_rejected = reference_logps(
                self.model,
                self.reference,
                self.validation.pairs,
                self.pad_token_id,
                self.device,
                batch_size=hp.batch_size,
            )
        self.plan(len(self.pairs))
        self.eval_every = hp.eval_steps or max(1, self.total // 10)

    def _load_model(self) -> None:
        spec = self.spec
        self.device = lora.pick_device()
        base = lora.load_base_model(
            spec.base_model.path,
            device=sharding.load_device(self.ctx.dist, self.device),
            precision=spec.resources.precision,
        )
        init_path = spec.init_adapter.path if spec.init_adapter else None
        model = lora.attach_adapter(base, self.lora_settings, init_adapter=init_path)
        self.reference: str | None = None
        if init_path is not None and self.hp.reference_model == "init_adapter":
            lora.add_frozen_adapter(model, lora.REFERENCE_ADAPTER, init_path)
            self.reference = lora.REFERENCE_ADAPTER
        n_total = self.use_model(model)
        self.reference_text = (
            f"init adapter {spec.init_adapter.id} (frozen copy)"
            if self.reference is not None and spec.init_adapter is not None
            else "the base model (adapter disabled)"
        )
        self.progress.event(
            f"policy on {spec.base_model.name} ({self.device.type}): {n_total - self.n_trainable:,} frozen "
            f"parameters, {self.n_trainable:,} trainable LoRA parameters; reference: {self.reference_text}",
            stage=STAGE,
        )

    def build_batches(self, epoch: int) -> list[list[int]]:
        return preference.epoch_batches(self.pairs, self.hp.batch_size, seed=self.spec.seed, epoch=epoch)

    def batch_weight(self, batch: list[int]) -> int:
        return len(batch)  # the step's mean over pairs

    def compute_loss(self, micro: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        policy_c, policy_r = pair_logps(
            self.model, [self.pairs[i] for i in micro], self.pad_token_id, self.device
        )
        index = torch.tensor(micro, device=self.device)
        loss, reward_c, reward_r = dpo_loss(
            policy_c,
            policy_r,
            self.ref_chosen[index],
            self.ref_rejected[index],
            beta=self.hp.beta,
            label_smoothing=self.hp.label_smoothing,
        )
        return loss.sum(), {
            "rewards_chosen": float(reward_c.sum()),
            "rewards_rejected": float(reward_r.sum()),
            "margin": float((reward_c - reward_r).sum()),
            "correct": float((reward_c > reward_r).sum()),
        }

    def on_eval(self, step: int) -> dict[str, float]:
        if self.validation is not None and (step % self.eval_every == 0 or step == self.total):
            self.last_eval = self.run_eval()
            return self.last_eval
        return {}

    @torch.no_grad()
    def run_eval(self) -> dict[str, float]:
        """The DPO loss, reward accuracy and margin over every held-out pair (dropout off), per pair."""
        assert self.validation is not None
        pairs, hp = self.validation.pairs, self.hp
        sums = {"loss": 0.0, "correct": 0.0, "margin": 0.0, "chosen": 0.0, "rejected": 0.0}
        self.model.eval()
        try:
            # Under torchrun each rank scores its share of the held-out pairs; the sums are added below.
            share = self.ctx.dist.shard(list(range(len(pairs))))
            for chunk in preference.iter_chunks(share, hp.batch_size):
                policy_c, policy_r = pair_logps(
                    self.model, [pairs[i] for i in chunk], self.pad_token_id, self.device
                )
                index = torch.tensor(chunk, device=self.device)
                loss, reward_c, reward_r = dpo_loss(
                    policy_c,
                    policy_r,
                    self.val_ref_chosen[index],
                    self.val_ref_rejected[index],
                    beta=hp.beta,
                    label_smoothing=hp.label_smoothing,
                )
                sums["loss"] += float(loss.sum())
                sums["correct"] += float((reward_c > reward_r).sum())
                sums["margin"] += float((reward_c - reward_r).sum())
                sums["chosen"] += float(reward_c.sum())
                sums["rejected"] += float(reward_r.sum())
            for _ in range(self.ctx.dist.lockstep_batch_fillers(pairs, hp.batch_size)):
                # fsdp: as many forwards as the rank with the most held-out batches; the result is dropped
                pair_logps(self.model, pairs[:1], self.pad_token_id, self.device)
        finally:
            self.model.train()
        sums = self.ctx.dist.sum_values(sums)
        n = len(pairs)
        return {
            "eval_loss": sums["loss"] / n,
            "eval_accuracy": sums["correct"] / n,
            "eval_margin": sums["margin"] / n,
            "eval_rewards_chosen": sums["chosen"] / n,
            "eval_rewards_rejected": sums["rejected"] / n,
        }

    def on_start(self, resumed: checkpoint.ResumeState | None) -> None:
        super().on_start(resumed)
        if resumed is not None:  # the newest evaluation travels in the checkpoint: the final metrics read it
            self.last_eval = dict(resumed.extra.get("last_eval", {}))

    def checkpoint_extra(self) -> dict[str, Any]:
        return {**super().checkpoint_extra(), "last_eval": self.last_eval}

    def log_values(
        self, window: loop.MetricWindow, *, learning_rate: float, epoch: float
    ) -> dict[str, float]:
        return {
            "loss": window.mean("loss"),
            "rewards_chosen": window.mean("rewards_chosen"),
            "rewards_rejected": window.mean("rewards_rejected"),
            "margin": window.mean("margin"),
            # share of pairs whose implicit chosen reward is strictly higher (a tie is wrong)
            "accuracy": window.mean("correct"),
            "learning_rate": learning_rate,
            "grad_norm": window.grad_norm(),
            "epoch": epoch,
        }

    def final_metrics(self, steps: int, train_seconds: float) -> dict[str, float]:
        history = self.logger.history
        last = history[-1]
        return {
            **{k: last[k] for k in ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy")},
            "first_loss": history[0]["loss"],
            "first_margin": history[0]["margin"],
            **self.last_eval,
            **self.run_metrics(steps, train_seconds),
        }

    def save_outputs(self, metrics: dict[str, float]) -> loop.Outputs:
        card = self.model_card(
            title=f"{self.spec.base_model.name} + LoRA (DPO)",
            datasets=[self.prepared.card_entry()]
            + ([self.validation.card_entry()] if self.validation is not None else []),
            lora=self.policy_lora(self.model),
            metrics=metrics,
            notes=f"\n## DPO reference\n\nThe reference policy was {self.reference_text}.\n",
        )
        datasets = self.prepared.dataset_metadata()
        if self.validation is not None:
            datasets["validation"] = {
                "id": self.validation.dataset_ref.id,
                "sha256": self.validation.dataset_sha256,
            }
        return self.publish(self.model, self.prepared.tokenizer, card, metrics, datasets=datasets)

    def summary(self, metrics: dict[str, float], steps: int, train_seconds: float) -> str:
        moved = f"margin {metrics['first_margin']:.4f} -> {metrics['margin']:.4f}, accuracy {metrics['accuracy']:.3f}"
        return f"{super().summary(metrics, steps, train_seconds)}; {moved}"


def train_dpo(ctx: RunContext) -> DPOResult:
    return DPOResult.train(DPOTrainer(ctx))
