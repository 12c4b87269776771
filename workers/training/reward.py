"""Reward model: a scalar head on the base (LoRA on the body, the head trained in full), pairwise loss.

The model is ``AutoModelForSequenceClassification(num_labels=1)`` on the job's base, so the saved adapter
(LoRA + the ``score`` head via peft's ``modules_to_save``) loads with plain peft as a sequence classifier.
Loss per pair (as TRL's RewardTrainer): ``-logsigmoid(r_chosen - r_rejected - margin)`` plus
``center_rewards_coefficient * (r_chosen + r_rejected)^2``, which pins the otherwise free offset of the
rewards near 0 (PPO whitens advantages, but the KL penalty is added to raw rewards, so their scale matters).
Both sides of a pair run in the same forward batch; the reward is read at each row's last real token.

:func:`train_reward_model` is the entry point (the registry's, and the rlhf pipeline's in-process call).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from contract.hyperparameters import RewardModelHyperparameters
from workers.training import checkpoint, data, loop, lora, preference, sharding
from workers.training.context import RunContext

STAGE = "reward_model"
HEAD = "score"  # transformers' name for the head of *ForSequenceClassification models


@dataclass
class RewardModelResult(loop.AdapterResult):
    """The trained reward model; ``metrics``: loss, accuracy, margin, eval_accuracy, eval_margin, ..."""

    @property
    def reward_model_dir(self) -> Path:
        """The reward model's adapter folder (LoRA and the score head)."""
        return self.adapter_dir

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


class RewardTrainer(loop.DatasetTrainer[RewardModelHyperparameters]):
    """The reward model's hooks on the shared loop: pair batches, the pairwise loss, held-out evaluations."""

    method = STAGE

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx, RewardModelHyperparameters)
        hp, spec, progress = self.hp, self.spec, self.progress
        self.prepared = preference.prepare_pairs(ctx, stage=STAGE, max_length=hp.max_length)
        pairs, self.pad_token_id = self.prepared.pairs, self.prepared.pad_token_id
        # Whole groups: a ranking's pairs of one prompt are held out together (no prompt on both sides).
        groups = [p.group for p in pairs]
        train_idx, eval_idx = data.grouped_holdout_split(groups, hp.eval_fraction, seed=spec.seed)
        self.train_pairs = [pairs[i] for i in train_idx]
        self.eval_pairs = [pairs[i] for i in eval_idx]
        progress.event(
            f"{len(self.train_pairs)} training pairs, {len(self.eval_pairs)} held out "
            f"(eval_fraction={hp.eval_fraction}, seed {spec.seed})",
            stage=STAGE,
        )
        if spec.init_adapter is not None:
            # An SFT adapter is a causal-LM adapter without a score head; starting a classifier from it would
            # need a merge we do not do. Say so rather than pretend.
            progress.event(
                f"init_adapter {spec.init_adapter.id} is ignored: a reward model starts from the base model",
                stage=STAGE,
                level="warning",
            )
        self._load_model()
        # The evaluations so far: before training, the newest, and the newest training window's metrics.
        self.initial_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self.plan(len(self.train_pairs))

    def _load_model(self) -> None:
        from transformers import AutoModelForSequenceClassification

        spec, progress = self.spec, self.progress
        self.device = lora.pick_device()
        base = lora.load_base_model(
            spec.base_model.path,
            device=sharding.load_device(self.ctx.dist, self.device),
            precision=spec.resources.precision,
            model_class=AutoModelForSequenceClassification,
            num_labels=1,
        )
        # transformers' classifier refuses batches > 1 without a pad id, and a user loading the artifact with
        # plain peft relies on it to find the last token; we read the last token from the attention mask.
        base.config.pad_token_id = self.pad_token_id
        # A new feedback round continues the previous round's reward model (its LoRA and its score head).
        init_reward = spec.init_reward_model
        model = lora.attach_adapter(
            base,
            self.lora_settings,
            task_type="SEQ_CLS",
            modules_to_save=[HEAD],
            init_adapter=init_reward.path if init_reward is not None else None,
        )
        if init_reward is not None:
            progress.event(f"continuing reward model {init_reward.id} (LoRA and {HEAD} head)", stage=STAGE)
        # The checkpoint's "model" holds the LoRA and the score head (peft's modules_to_save copy).
        n_total = self.use_model(model)
        progress.event(
            f"reward model on {spec.base_model.name} ({self.device.type}): {n_total - self.n_trainable:,} "
            f"frozen parameters, {self.n_trainable:,} trainable (LoRA + {HEAD} head)",
            stage=STAGE,
        )

    def run_eval(self) -> dict[str, float]:
        hp, dist = self.hp, self.ctx.dist
        if not dist.enabled:
            return evaluate(
                self.model, self.eval_pairs, self.pad_token_id, self.device, batch_size=hp.batch_size, hp=hp
            )
        # Each rank scores its share of the held-out pairs; the means are of all of them.
        share = dist.shard(self.eval_pairs)
        local = (
            evaluate(self.model, share, self.pad_token_id, self.device, batch_size=hp.batch_size, hp=hp)
            if share
            else {}
        )
        for _ in range(dist.lockstep_batch_fillers(self.eval_pairs, hp.batch_size)):
            # fsdp: as many forwards as the rank with the most held-out batches; the result is dropped
            with torch.no_grad():
                score_pairs(self.model, self.eval_pairs[:1], self.pad_token_id, self.device)
        sums = dist.sum_values({key: value * len(share) for key, value in local.items()} | {"n": len(share)})
        n = sums.pop("n")
        return {key: sums[key] / n for key in ("eval_accuracy", "eval_margin", "eval_loss")}

    def on_start(self, resumed: checkpoint.ResumeState | None) -> None:
        if resumed is not None:
            # The evaluations so far travel in the checkpoint: the final metrics and the gate read them.
            self.initial_eval = dict(resumed.extra.get("initial_eval", {}))
            self.last_eval = dict(resumed.extra.get("last_eval", {}))
            self.last_train = dict(resumed.extra.get("last_train", {}))
        else:
            self.initial_eval = self.run_eval() if self.eval_pairs else {}
            if self.initial_eval:
                self.progress.event(
                    f"before training: held-out accuracy {self.initial_eval['eval_accuracy']:.3f}, "
                    f"margin {self.initial_eval['eval_margin']:.4f}",
                    stage=STAGE,
                )
            self.last_eval = dict(self.initial_eval)
            self.last_train = {}
        super().on_start(resumed)

    def checkpoint_extra(self) -> dict[str, Any]:
        return {
            **super().checkpoint_extra(),
            "initial_eval": self.initial_eval,
            "last_eval": self.last_eval,
            "last_train": self.last_train,
        }

    def build_batches(self, epoch: int) -> list[list[int]]:
        return preference.epoch_batches(
            self.train_pairs, self.hp.batch_size, seed=self.spec.seed, epoch=epoch
        )

    def batch_weight(self, batch: list[int]) -> int:
        return len(batch)  # the step's mean over pairs

    def compute_loss(self, micro: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        hp = self.hp
        pairs = [self.train_pairs[i] for i in micro]
        chosen, rejected = score_pairs(self.model, pairs, self.pad_token_id, self.device)
        per_pair = pairwise_loss(
            chosen, rejected, margin=hp.margin, center_coefficient=hp.center_rewards_coefficient
        )
        return per_pair.sum(), {
            "correct": float((chosen > rejected).sum()),
            "margin": float((chosen - rejected).detach().sum()),
        }

    def log_values(
        self, window: loop.MetricWindow, *, learning_rate: float, epoch: float
    ) -> dict[str, float]:
        self.last_train = {
            "loss": window.mean("loss"),
            "accuracy": window.mean("correct"),
            "margin": window.mean("margin"),
            "learning_rate": learning_rate,
            "grad_norm": window.grad_norm(),
            "epoch": epoch,
        }
        return dict(self.last_train)

    def on_eval(self, step: int) -> dict[str, float]:
        if self.eval_pairs and (step % self.hp.eval_steps == 0 or step == self.total):
            self.last_eval = self.run_eval()
            return self.last_eval
        return {}

    def final_metrics(self, steps: int, train_seconds: float) -> dict[str, float]:
        metrics: dict[str, float] = {
            **{k: v for k, v in self.last_train.items() if k in ("loss", "accuracy", "margin")},
            **self.last_eval,
            **self.run_metrics(steps, train_seconds),
            "train_pairs": float(len(self.train_pairs)),
            "eval_pairs": float(len(self.eval_pairs)),
        }
        if self.initial_eval:
            metrics["initial_eval_accuracy"] = self.initial_eval["eval_accuracy"]
        return metrics

    def save_outputs(self, metrics: dict[str, float]) -> loop.Outputs:
        card = self.model_card(
            title=f"{self.spec.base_model.name} + LoRA reward model",
            datasets=[self.prepared.card_entry()],
            lora=self.lora_settings.model_dump(),
            metrics=metrics,
            loader="AutoModelForSequenceClassification",
            loader_args=", num_labels=1",
            notes=_reward_notes(self.pad_token_id, metrics.get("eval_accuracy"), len(self.eval_pairs)),
        )
        return self.publish(
            self.model,
            self.prepared.tokenizer,
            card,
            metrics,
            name="reward_model",
            kind="reward_model",
            # Read by the quality gate (contract/reward_gate.py: rlhf before PPO, the API for a ppo job naming
            # this artifact): the accuracy (None when eval_fraction was 0), the pairs it was measured on, and
            # the floor this reward model was trained under.
            eval_accuracy=metrics.get("eval_accuracy"),
            eval_pairs=len(self.eval_pairs),
            quality_gate={
                "min_eval_accuracy": self.hp.min_eval_accuracy,
                "min_eval_pairs": self.hp.min_eval_pairs,
            },
            datasets=self.prepared.dataset_metadata(),
        )

    def summary(self, metrics: dict[str, float], steps: int, train_seconds: float) -> str:
        summary = super().summary(metrics, steps, train_seconds)
        if "eval_accuracy" in metrics:
            summary += (
                f"; held-out accuracy {metrics.get('initial_eval_accuracy', float('nan')):.3f} -> "
                f"{metrics['eval_accuracy']:.3f}"
            )
        return summary


def train_reward_model(ctx: RunContext) -> RewardModelResult:
    """Train a reward model on the spec's ``preference`` dataset; write and announce its artifacts.

    Returns the final metrics (``eval_accuracy`` included when there is a held-out set) with the live model,
    so a caller (the rlhf pipeline's quality gate) may go on using it.
    """
    return RewardModelResult.train(RewardTrainer(ctx))


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
