"""The ``rlhf`` method: SFT -> reward model -> an RL stage (GRPO by default, PPO or RLOO) in one child
process, with a quality gate before the RL stage.

Each stage is the standalone trainer (``train_sft``, ``train_reward_model``, ``train_ppo``) called in-process
on a copy of the job's spec narrowed to that stage: its hyperparameters (``spec.hyperparameters[stage]``),
its dataset, its output folder, and the earlier stages' outputs as inputs (PPO starts from the SFT adapter and
scores with this job's reward model). So every stage emits exactly what the method alone would (metrics,
artifacts with their model cards) with ``stage`` moving sft -> reward_model -> ppo, and the job's progress is
each stage's 0..1 mapped into its share of the whole.

The last stage is the job's ``rl_method`` (``hyperparameters.rl_method``: grpo, the default, ppo or rloo; its
knobs under that key): GRPO and RLOO start from the SFT adapter too and are rewarded by this job's reward model
(times ``reward_model_weight``) plus any graders of their own (see grpo.py).

Base weights: each trainer loads the base itself (a causal LM for SFT and PPO, a sequence classifier for the
reward model) and the previous stage's model is released first, so at most one stage's models are in memory.
PPO itself holds one copy for policy, reference, reward and value (see ppo.py and ppo_job.py).

Quality gate: after the reward stage, held-out pair accuracy below ``reward_model.min_eval_accuracy``, or
measured on fewer than ``reward_model.min_eval_pairs`` pairs, stops the job with ``reward_model_too_weak``
before any PPO time is spent (the reward model's artifacts stay stored, to look at); the rule is
``contract/reward_gate.py``, which the API applies to ppo jobs too. ``ppo.allow_weak_reward_model`` turns the
stop into a warning. A job asking for a gate with no held-out set (``eval_fraction`` 0) is refused before SFT
starts (unless it allows a weak reward model).

Final evaluation (rlhf_eval.py): after the last stage, when that stage has a held-out eval block
(``hyperparameters.<rl_method>.eval``) and ``final_evaluation`` is on (the default), the same child evaluates the base,
the SFT adapter and the final policy on it with the evaluate job's code: stage ``evaluate``, an ``eval``
artifact, ``GET /v1/jobs/{id}/evaluation``. Otherwise an event says why nothing was evaluated.

Resume: after each stage the pipeline writes a ``stage_complete`` checkpoint (after that stage's artifacts);
a resumed attempt skips completed stages, taking their outputs from ``spec.stage_artifacts`` (the runner
passes the stored artifacts back), and resumes the stage it was in from that stage's newest step checkpoint
(SFT, reward model and PPO each save one every ``checkpoint_steps`` and at their end).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from contract import reward_gate
from contract.evaluation import STAGE as EVAL_STAGE
from contract.hyperparameters import (
    HELD_OUT_EVAL_ROLE,
    GRPOHyperparameters,
    HeldOutEvalSettings,
    PPOHyperparameters,
    RewardModelHyperparameters,
    RLHFSettings,
    RLOOHyperparameters,
    SFTHyperparameters,
)
from contract.methods import RL_METHODS, rlhf_stages, stored_rl_method
from contract.protocol import AdapterRef, ProgressWriter, TrainingSpec
from workers.training import checkpoint, rlhf_eval
from workers.training.context import RunContext
from workers.training.errors import (
    INVALID_HYPERPARAMETERS,
    INVALID_SPEC,
    REWARD_MODEL_TOO_WEAK,
    TrainingError,
)

DATASET_ROLE = {
    "sft": "sft",
    "reward_model": "preference",
    "ppo": "prompts",
    "grpo": "prompts",
    "rloo": "prompts",
}
HYPERPARAMETER_MODELS: dict[str, type[BaseModel]] = {
    "sft": SFTHyperparameters,
    "reward_model": RewardModelHyperparameters,
    "ppo": PPOHyperparameters,
    "grpo": GRPOHyperparameters,
    "rloo": RLOOHyperparameters,
}
# Share of the job's progress bar per stage. Fixed rather than derived from step counts: a PPO update
# (generation + several training passes) costs tens of SFT steps, and a bar that crawls at the end is worse
# than one that is roughly right. Tuned on the demo (SmolLM2-135M, 2 cores).
PROGRESS_SPANS: dict[str, tuple[float, float]] = {
    "sft": (0.0, 0.3),
    "reward_model": (0.3, 0.5),
    "ppo": (0.5, 1.0),
    "grpo": (0.5, 1.0),
    "rloo": (0.5, 1.0),
    # The final evaluation (rlhf_eval.py) when it runs: the last stage's span then ends where it starts.
    EVAL_STAGE: (0.95, 1.0),
}


class StageWriter(ProgressWriter):
    """The job's writer seen from one stage: progress mapped into the stage's span, artifacts hooked."""

    def __init__(
        self,
        inner: ProgressWriter,
        span: tuple[float, float],
        on_artifact: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(inner._stream)
        self._inner = inner
        self._span = span
        self._on_artifact = on_artifact

    def _emit(self, payload: dict[str, Any]) -> None:
        if payload["type"] == "progress":
            start, end = self._span
            payload = {**payload, "progress": start + (end - start) * float(payload["progress"])}
        elif payload["type"] == "artifact" and self._on_artifact is not None:
            self._on_artifact(payload)  # before the line: the runner packs the folder as soon as it reads it
        self._inner._emit(payload)


@dataclass
class RLHFResult:
    stages_run: list[str]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # stage -> local folder of its main artifact


def _stages(spec: TrainingSpec) -> tuple[str, ...]:
    """sft, reward_model, then the job's ``rl_method`` (ppo, grpo or rloo; as resolved by the API, ppo for a
    row stored before the key existed)."""
    rl_method = stored_rl_method(spec.hyperparameters)
    if rl_method not in RL_METHODS:  # str members: a name compares equal to its Method
        raise TrainingError(
            INVALID_HYPERPARAMETERS, f"rlhf rl_method must be ppo, grpo or rloo, not {rl_method!r}"
        )
    return rlhf_stages(rl_method)


def _allow_weak(hyperparameters: Mapping[str, Any], stage: str) -> bool:
    # Only PPO has allow_weak_reward_model; a grpo or rloo stage always stops on a weak reward model.
    return bool(hyperparameters[stage].get("allow_weak_reward_model", False))


def _settings(spec: TrainingSpec) -> RLHFSettings:
    """The job's own knobs beside its stages (rl_method, final_evaluation), as the API resolved them."""
    own = {k: v for k, v in spec.hyperparameters.items() if k in RLHFSettings.model_fields}
    try:
        return RLHFSettings.model_validate(own)
    except ValidationError as exc:
        raise TrainingError(INVALID_HYPERPARAMETERS, f"invalid rlhf hyperparameters: {exc}") from None


def _stage_hyperparameters(spec: TrainingSpec) -> dict[str, dict[str, Any]]:
    raw = spec.hyperparameters
    stages = _stages(spec)
    unknown = sorted(set(raw) - set(stages) - set(RLHFSettings.model_fields))
    if unknown:
        raise TrainingError(
            INVALID_HYPERPARAMETERS, f"rlhf hyperparameters are keyed by stage; unknown: {unknown}"
        )
    resolved: dict[str, dict[str, Any]] = {}
    for stage in stages:
        try:
            resolved[stage] = HYPERPARAMETER_MODELS[stage].model_validate(raw.get(stage) or {}).model_dump()
        except ValidationError as exc:
            raise TrainingError(INVALID_HYPERPARAMETERS, f"invalid {stage} hyperparameters: {exc}") from None
    return resolved


def _stage_spec(
    spec: TrainingSpec, stage: str, hyperparameters: dict[str, Any], **inputs: Any
) -> TrainingSpec:
    role = DATASET_ROLE[stage]
    resume = spec.resume_from if spec.resume_from and spec.resume_from.stage == stage else None
    update: dict[str, Any] = {
        "method": stage,
        # The last stage's eval block (hyperparameters.<rl_method>.eval) reads its held-out prompts under their
        # own role.
        "datasets": {
            name: ref
            for name, ref in spec.datasets.items()
            if name == role or (name == HELD_OUT_EVAL_ROLE and stage in RL_METHODS)
        },
        "hyperparameters": hyperparameters,
        "output_dir": str(Path(spec.output_dir) / stage),
        "resume_from": resume,
        "stage_artifacts": {},
        "init_adapter": None,
        "reward_model": None,
        **inputs,
    }
    return spec.model_copy(update=update)


def _pipeline_card_section(spec: TrainingSpec, stage: str, hyperparameters: Mapping[str, Any]) -> str:
    stages = _stages(spec)
    rl = stages[-1].upper()
    rows = "\n".join(
        f"| {s} | {DATASET_ROLE[s]} | {spec.datasets[DATASET_ROLE[s]].name} | `{spec.datasets[DATASET_ROLE[s]].id}` "
        f"| `{spec.datasets[DATASET_ROLE[s]].sha256}` |"
        for s in stages
    )
    floor = hyperparameters["reward_model"]["min_eval_accuracy"]
    pairs = hyperparameters["reward_model"]["min_eval_pairs"]
    gate = (
        "ran even if the reward model failed its quality gate (`ppo.allow_weak_reward_model`; see the job's "
        "events)"
        if _allow_weak(hyperparameters, stages[-1])
        else f"ran only because the reward model's held-out accuracy met the floor `min_eval_accuracy` = "
        f"{floor} on at least `min_eval_pairs` = {pairs} pairs"
    )
    return f"""
## rlhf pipeline

Stage `{stage}` ({stages.index(stage) + 1} of {len(stages)}) of the rlhf job `{spec.job_id}`: SFT -> reward model
-> {rl} on base `{spec.base_model.name}`. {rl} starts from the SFT adapter, uses this job's reward model, and
{gate}.

| stage | role | dataset | id | sha256 |
|---|---|---|---|---|
{rows}
"""


def _check_gate(
    progress: ProgressWriter,
    quality: reward_gate.Quality,
    gate: reward_gate.GateFloor,
    *,
    allow_weak: bool,
    rl_stage: str,
) -> None:
    """Stop before the RL stage when the fresh reward model fails the gate (only warn with ``allow_weak``)."""
    failure = reward_gate.failure(quality, gate)
    if failure is None:
        if not gate.off:
            progress.event(
                f"quality gate passed: {reward_gate.describe(quality, gate)}", stage="reward_model"
            )
        return
    name = rl_stage.upper()
    if allow_weak:
        progress.event(
            f"quality gate failed ({failure}); running {name} anyway because {rl_stage}.allow_weak_reward_model "
            "is set",
            stage="reward_model",
            level="warning",
        )
        return
    way_out = ", or set ppo.allow_weak_reward_model" if rl_stage == "ppo" else ""
    raise TrainingError(
        REWARD_MODEL_TOO_WEAK,
        f"reward model too weak to drive {name}: {failure}. {name} against it would optimise noise. Stopped "
        f"before {name}: improve the preference data (more pairs, a larger eval_fraction, consistent labels) "
        f"or lower reward_model.min_eval_accuracy / min_eval_pairs{way_out}",
    )


def train_rlhf(ctx: RunContext) -> RLHFResult:
    # Imported here: each pulls in torch and transformers, and a bad spec should fail before that.
    from workers.training.__main__ import seed_everything
    from workers.training.reward import train_reward_model
    from workers.training.sft import train_sft

    spec, progress, cancel = ctx.spec, ctx.progress, ctx.cancel
    hyperparameters = _stage_hyperparameters(spec)
    stages = _stages(spec)
    missing = [DATASET_ROLE[s] for s in stages if DATASET_ROLE[s] not in spec.datasets]
    if missing:
        raise TrainingError(INVALID_SPEC, f"method rlhf needs datasets with roles {missing}")
    reward_hp = hyperparameters["reward_model"]
    floor = float(reward_hp["min_eval_accuracy"])
    gate = reward_gate.GateFloor(accuracy=floor, pairs=int(reward_hp["min_eval_pairs"]))
    allow_weak = _allow_weak(hyperparameters, stages[-1])
    if floor > 0 and reward_hp["eval_fraction"] == 0 and not allow_weak:
        raise TrainingError(
            INVALID_HYPERPARAMETERS,
            f"reward_model.min_eval_accuracy={floor} needs held-out pairs to judge the reward model, but "
            "reward_model.eval_fraction is 0: set eval_fraction > 0, or min_eval_accuracy 0 to skip the gate",
        )

    start = _start(spec, stages)
    final, no_final = rlhf_eval.plan(_settings(spec), stages[-1], hyperparameters[stages[-1]])

    def writer(stage: str) -> StageWriter:
        section = _pipeline_card_section(spec, stage, hyperparameters)

        def annotate(payload: dict[str, Any]) -> None:
            readme = Path(str(payload["path"])) / "README.md"
            if readme.is_file():
                readme.write_text(readme.read_text(encoding="utf-8") + section, encoding="utf-8")

        span = PROGRESS_SPANS[stage]
        if final is not None and stage == stages[-1]:
            span = (span[0], PROGRESS_SPANS[EVAL_STAGE][0])  # the final evaluation's share follows
        return StageWriter(progress, span, on_artifact=annotate)

    result = RLHFResult(stages_run=[])
    sft_adapter: AdapterRef | None = spec.stage_artifacts.get("sft")
    reward_model: AdapterRef | None = spec.stage_artifacts.get("reward_model")
    progress.event(
        "rlhf pipeline: "
        + " -> ".join(stages)
        + (" -> final evaluation of base, sft and " + stages[-1] if final is not None else "")
        + (f", resuming at {stages[start] if start < len(stages) else 'the end'}" if start else "")
        + f"; quality gate: held-out reward accuracy >= {floor} on >= {gate.pairs} pairs"
        + (" (ppo.allow_weak_reward_model: a weak reward model only warns)" if allow_weak else ""),
        stage=stages[min(start, len(stages) - 1)],
    )

    if start <= 0:
        # Every stage starts from the same seeded RNG whether or not earlier stages ran in this process, so a
        # resumed attempt that skips them trains exactly as the uninterrupted run did.
        seed_everything(spec.seed)
        stage_spec = _stage_spec(spec, "sft", hyperparameters["sft"], init_adapter=spec.init_adapter)
        sft = train_sft(RunContext(spec=stage_spec, progress=writer("sft"), cancel=cancel, dist=ctx.dist))
        sft_adapter = AdapterRef(id=f"{spec.job_id}/sft", path=str(sft.adapter_dir))
        result.stages_run.append("sft")
        result.metrics["sft"] = dict(sft.metrics)
        steps = sft.steps
        del sft  # the SFT model: the reward stage loads its own base
        gc.collect()
        checkpoint.mark_stage_complete(ctx, stage="sft", step=steps)

    if start <= 1:
        seed_everything(spec.seed)
        stage_spec = _stage_spec(spec, "reward_model", reward_hp)
        rm = train_reward_model(
            RunContext(spec=stage_spec, progress=writer("reward_model"), cancel=cancel, dist=ctx.dist)
        )
        reward_model = AdapterRef(id=f"{spec.job_id}/reward_model", path=str(rm.reward_model_dir))
        result.stages_run.append("reward_model")
        result.metrics["reward_model"] = dict(rm.metrics)
        steps = rm.steps
        quality = reward_gate.Quality(
            accuracy=rm.metrics.get("eval_accuracy"), pairs=int(rm.metrics.get("eval_pairs", 0))
        )
        del rm
        gc.collect()
        _check_gate(progress, quality, gate, allow_weak=allow_weak, rl_stage=stages[-1])
        checkpoint.mark_stage_complete(ctx, stage="reward_model", step=steps)

    if start <= 2:
        assert sft_adapter is not None and reward_model is not None
        seed_everything(spec.seed)
        _rl_stage(ctx, stages[-1], hyperparameters, sft_adapter, reward_model, writer, result)
    else:
        progress.event(
            "every stage was already complete; " + ("nothing left to run" if final is None else "evaluating"),
            stage=stages[-1],
        )

    if sft_adapter is not None:
        result.outputs["sft"] = sft_adapter.path
    if reward_model is not None:
        result.outputs["reward_model"] = reward_model.path
    _final_evaluation(ctx, stages[-1], hyperparameters[stages[-1]], final, no_final, result)
    return result


def _final_evaluation(
    ctx: RunContext,
    stage: str,
    stage_hyperparameters: Mapping[str, Any],
    block: HeldOutEvalSettings | None,
    why_not: str,
    result: RLHFResult,
) -> None:
    """base, sft and the last stage evaluated on ``block`` (rlhf_eval.py), or one event saying why not."""
    if block is None:
        ctx.progress.event(why_not, stage=stage)
        return
    for done, ref in ctx.spec.stage_artifacts.items():
        result.outputs.setdefault(done, ref.path)  # stages a resumed attempt skipped: their stored outputs
    rlhf_eval.run(
        ctx,
        block,
        stage,
        max_prompt_length=int(stage_hyperparameters["max_length"]),
        adapters=result.outputs,
        progress=StageWriter(ctx.progress, PROGRESS_SPANS[EVAL_STAGE]),
    )


def _start(spec: TrainingSpec, stages: tuple[str, ...]) -> int:
    """The index of the first stage this attempt runs (len(stages): every stage is complete)."""
    start = 0
    if spec.resume_from is not None:
        if spec.resume_from.stage not in stages:
            raise TrainingError(INVALID_SPEC, f"resume_from names unknown stage {spec.resume_from.stage!r}")
        start = stages.index(spec.resume_from.stage) + (1 if spec.resume_from.stage_complete else 0)
    for stage in stages[:start]:
        if stage not in spec.stage_artifacts:
            raise TrainingError(
                INVALID_SPEC, f"resuming after stage {stage} needs its output in stage_artifacts"
            )
    return start


def _rl_stage(
    ctx: RunContext,
    stage: str,
    hyperparameters: Mapping[str, dict[str, Any]],
    sft_adapter: AdapterRef,
    reward_model: AdapterRef,
    writer: Callable[[str], StageWriter],
    result: RLHFResult,
) -> None:
    """The last stage (ppo, grpo or rloo) from the SFT adapter, rewarded by this job's reward model."""
    from workers.training.grpo_job import train_grpo, train_rloo
    from workers.training.ppo_job import train_ppo

    train: Callable[[RunContext], Any] = train_grpo if stage == "grpo" else train_rloo
    if stage == "ppo":
        train = train_ppo
    stage_spec = _stage_spec(
        ctx.spec, stage, hyperparameters[stage], init_adapter=sft_adapter, reward_model=reward_model
    )
    trained = train(RunContext(spec=stage_spec, progress=writer(stage), cancel=ctx.cancel, dist=ctx.dist))
    result.stages_run.append(stage)
    result.metrics[stage] = dict(trained.metrics)
    result.outputs[stage] = str(trained.adapter_dir)
    updates = trained.updates
    del trained
    gc.collect()
    checkpoint.mark_stage_complete(ctx, stage=stage, step=updates)


def run(ctx: RunContext) -> None:
    train_rlhf(ctx)
