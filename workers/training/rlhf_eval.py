"""The rlhf job's final evaluation: the base, the SFT adapter and the final policy, side by side, so each stage's
contribution shows.

After its last stage the rlhf child runs the evaluate job itself (``evaluate.run``, no second implementation)
on a copy of the job's spec narrowed to it: candidates ``base`` (no adapter), ``sft`` (the SFT stage's adapter)
and the final policy named by its stage (``grpo``, ``ppo`` or ``rloo``), baseline ``base``, on the last stage's
held-out eval block (``hyperparameters.<rl_method>.eval``: its prompts and graders), answered greedily up to its ``max_new_tokens``, its
``max_prompts`` and ``batch_size``, prompts cut from the left to the stage's ``max_length``. What comes out is
what an evaluate job gives: stage ``evaluate`` metrics and events, and an ``eval`` artifact (evaluation.json,
per_prompt.csv) that ``GET /v1/jobs/{id}/evaluation`` serves for the rlhf job too.

The two adapters are local folders inside the child (the stages' outputs, or the stored ones a resumed attempt
was handed), so they are evaluate's ``local_adapters`` and their candidates carry no ``adapter`` id; the job's
artifacts of stage ``sft`` and the last stage are those adapters. ``final_evaluation: false`` turns it off; a
last stage without an eval block evaluates nothing, and one event says why either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contract.evaluation import STAGE, CandidateSpec, EvaluationResult, EvaluationSpec
from contract.hyperparameters import HELD_OUT_EVAL_ROLE, HeldOutEvalSettings, RLHFSettings
from contract.protocol import DatasetRef, ProgressWriter
from workers.training.context import RunContext
from workers.training.errors import INVALID_SPEC, TrainingError

BASELINE = "base"


def plan(
    settings: RLHFSettings, rl_stage: str, stage_hyperparameters: Mapping[str, Any]
) -> tuple[HeldOutEvalSettings | None, str]:
    """(The eval block to evaluate on, or None; why there is no final evaluation when None)."""
    if not settings.final_evaluation:
        return None, "no final evaluation: final_evaluation is false"
    block = stage_hyperparameters.get("eval")
    if not isinstance(block, dict):
        return None, (
            f"no final evaluation of base, sft and {rl_stage}: it needs held-out prompts and graders, and the "
            f"{rl_stage} stage has none (hyperparameters.{rl_stage}.eval)"
        )
    return HeldOutEvalSettings.model_validate(block), ""


def evaluation_spec(block: HeldOutEvalSettings, rl_stage: str, *, max_prompt_length: int) -> EvaluationSpec:
    """base, sft and the final policy on the block, vs base; the adapter refs name local folders."""
    candidates = [
        CandidateSpec(name=BASELINE),
        CandidateSpec(name="sft", adapter="sft"),
        CandidateSpec(name=rl_stage, adapter=rl_stage),
    ]
    return block.as_evaluation(candidates, max_prompt_length=max_prompt_length, baseline=BASELINE)


def summary(result: EvaluationResult) -> str:
    """One line naming every candidate's means and, but for the baseline, its win-rates with intervals."""
    from workers.training.evaluate import describe

    return (
        f"final evaluation on {result.num_prompts} held-out prompts, win-rates vs {result.baseline}: "
        + " | ".join(describe(candidate) for candidate in result.candidates)
    )


def run(
    ctx: RunContext,
    block: HeldOutEvalSettings,
    rl_stage: str,
    *,
    max_prompt_length: int,
    adapters: Mapping[str, str],
    progress: ProgressWriter,
) -> EvaluationResult:
    """Evaluate base, sft and ``rl_stage`` (``adapters``: stage -> local adapter folder) as an evaluate job."""
    from workers.training import evaluate  # torch: imported when the evaluation runs

    dataset: DatasetRef | None = ctx.spec.datasets.get(HELD_OUT_EVAL_ROLE)
    if dataset is None:
        raise TrainingError(
            INVALID_SPEC, f"the final evaluation needs a dataset with role '{HELD_OUT_EVAL_ROLE}'"
        )
    spec = evaluation_spec(block, rl_stage, max_prompt_length=max_prompt_length)
    progress.event(
        f"final evaluation: base, sft and {rl_stage} answer the held-out prompts of {dataset.name} "
        f"({dataset.id}) greedily, up to {block.max_new_tokens} tokens, graded by "
        f"{', '.join(g.name for g in block.graders)}; baseline {BASELINE}",
        stage=STAGE,
    )
    narrowed = ctx.spec.model_copy(
        update={
            "method": "evaluate",
            "datasets": {evaluate.ROLE: dataset},
            "hyperparameters": {},
            "output_dir": str(Path(ctx.spec.output_dir) / STAGE),
            "resume_from": None,
            "stage_artifacts": {},
            "init_adapter": None,
            "reward_model": None,
            "evaluation": spec,
        }
    )
    local = {ref: adapters[ref] for ref in ("sft", rl_stage)}
    result = evaluate.run(
        RunContext(spec=narrowed, progress=progress, cancel=ctx.cancel), local_adapters=local
    )
    progress.event(summary(result), stage=STAGE)
    return result
