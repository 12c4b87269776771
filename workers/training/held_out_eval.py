"""The held-out evaluation inside an online job (``hyperparameters.eval`` of ppo, grpo and rloo): the evaluate
job's sampling and grading on the policy being trained.

The policy's own PeftModel serves as the evaluate job's :class:`~workers.training.scoring.SharedModels`: the
policy adapter is the one candidate, a reward_model grader naming the job's own reward model reuses the job's
reward adapter and head, other reward models and judge adapters are loaded as frozen extra adapters on the
same base (before the loop's first checkpoint, so a resumed run has the same modules). Answers are greedy, so
an evaluation neither reads nor advances the job's sampling generator: training is the same with or without it.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from contract.evaluation import CandidateSpec, model_refs
from contract.hyperparameters import HELD_OUT_EVAL_ROLE, HeldOutEvalSettings
from workers.training import lora, rollout
from workers.training.context import RunContext
from workers.training.errors import INVALID_SPEC, TrainingError
from workers.training.evaluate import grade_answers, read_rows, sample_candidate
from workers.training.ppo import load_scalar_adapter
from workers.training.scoring import ChildScorer, SharedModels

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase


def metric(grader: str) -> str:
    return f"eval/{grader}/mean"


class HeldOutEval:
    """Reads the held-out prompts and loads the graders' models once; :meth:`run` evaluates the policy now.

    ``own_reward``: the job's reward model as (adapter name, head) when it has one on ``peft_model``, so a
    reward_model grader naming it scores with the loaded copy."""

    def __init__(
        self,
        ctx: RunContext,
        settings: HeldOutEvalSettings,
        peft_model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        device: torch.device,
        own_reward: tuple[str, torch.nn.Linear] | None,
        eos_token_id: int,
        pad_token_id: int,
        max_prompt_length: int,
    ) -> None:
        dataset = ctx.spec.datasets.get(HELD_OUT_EVAL_ROLE)
        if dataset is None:
            raise TrainingError(
                INVALID_SPEC, f"the eval block needs a dataset with role '{HELD_OUT_EVAL_ROLE}'"
            )
        self.ctx, self.settings = ctx, settings
        self.spec = settings.as_evaluation(
            [CandidateSpec(name="policy", adapter=lora.POLICY_ADAPTER)], max_prompt_length=max_prompt_length
        )
        self.rows = read_rows(dataset.path, settings.max_prompts)
        self.encoded, _ = rollout.encode_prompts(
            tokenizer, [row.messages for row in self.rows], max_length=max_prompt_length
        )
        self.shared = SharedModels(
            model=peft_model,
            tokenizer=tokenizer,
            device=device,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        self._load_grader_models(peft_model, own_reward)
        self.scorer = ChildScorer(self.shared, base_model_id=ctx.spec.base_model.id, seed=ctx.spec.seed)

    def _load_grader_models(
        self, peft_model: PeftModel, own_reward: tuple[str, torch.nn.Linear] | None
    ) -> None:
        spec = self.ctx.spec
        own_id = spec.reward_model.id if spec.reward_model is not None else None
        for _, ref, kind in model_refs(self.spec):
            if not ref.startswith("art_") or ref in self.shared.reward_heads or ref in self.shared.adapters:
                continue
            if kind == "reward_model" and ref == own_id and own_reward is not None:
                self.shared.reward_heads[ref] = own_reward
                continue
            fetched = spec.evaluation_artifacts.get(ref)
            if fetched is None:
                raise TrainingError(
                    INVALID_SPEC, f"the runner did not fetch artifact {ref} for the eval block"
                )
            if kind == "reward_model":
                name = f"eval_reward_{ref}"
                head = load_scalar_adapter(peft_model, fetched.path, name, trainable=False)
                self.shared.reward_heads[ref] = (name, head.to(self.shared.device))
            else:
                lora.add_frozen_adapter(peft_model, ref, fetched.path)
                self.shared.adapters[ref] = ref

    def due(self, update: int, total: int) -> bool:
        return update % self.settings.every == 0 or update == total

    def run(self) -> dict[str, float]:
        """The policy's greedy answers to the held-out prompts, graded: ``eval/<grader>/mean`` per grader, and
        the answers' ``eval/eos_rate``, ``eval/mean_length`` and ``eval/kl_to_base``."""
        answers = sample_candidate(
            self.ctx, self.shared, lora.POLICY_ADAPTER, self.encoded, self.spec, on_batch=lambda *_: None
        )
        scores, _ = grade_answers(self.spec, self.rows, answers, self.scorer)
        values = {metric(g.name): statistics.fmean(scores[i]) for i, g in enumerate(self.spec.graders)}
        values["eval/eos_rate"] = sum(answers.ended) / len(answers.ended)
        values["eval/mean_length"] = statistics.fmean(answers.lengths)
        values["eval/kl_to_base"] = statistics.fmean(answers.log_ratios)
        return values
