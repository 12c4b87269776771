"""The rlhf job's final evaluation, without a model: the ``final_evaluation`` knob at submission, and which
evaluation (or which reason for none) the child plans from its resolved hyperparameters. The run itself is
tests/service/test_rlhf.py::test_rlhf_end_to_end (on) and tests/service/test_ppo_eval_rest.py (off)."""

from __future__ import annotations

from typing import Any

import pytest

from contract.hyperparameters import RLHFSettings
from contract.methods import DEFAULT_RL_METHOD, Method
from service.core.errors import ValidationFailed
from service.core.jobs import resolve_hyperparameters
from workers.resume import job_stages
from workers.training import rlhf_eval

GRADER = {"type": "ends_with_eos", "name": "ends"}


def _eval_block() -> dict[str, Any]:
    return {"prompts": "ds_eval", "graders": [GRADER], "max_new_tokens": 5, "max_prompts": 3}


def test_final_evaluation_defaults_on_and_is_a_strict_bool() -> None:
    resolved = resolve_hyperparameters(Method.rlhf, {})
    assert resolved["final_evaluation"] is True and resolved["rl_method"] == "grpo"
    assert resolve_hyperparameters(Method.rlhf, {"final_evaluation": False})["final_evaluation"] is False
    with pytest.raises(ValidationFailed) as refused:
        resolve_hyperparameters(Method.rlhf, {"final_evaluation": "no"})
    assert [d["field"] for d in refused.value.details] == ["hyperparameters.final_evaluation"]


def test_the_plan_names_why_nothing_is_evaluated() -> None:
    for stage in ("ppo", "grpo", "rloo"):
        given = {"rl_method": stage, stage: {"eval": _eval_block()}}
        values = resolve_hyperparameters(Method.rlhf, given)[stage]
        block, reason = rlhf_eval.plan(RLHFSettings(rl_method=stage), stage, values)
        assert block is not None and block.max_new_tokens == 5 and reason == ""

        block, reason = rlhf_eval.plan(RLHFSettings(final_evaluation=False), stage, values)
        assert block is None and reason == "no final evaluation: final_evaluation is false"

        bare = resolve_hyperparameters(Method.rlhf, {"rl_method": stage})[stage]
        block, reason = rlhf_eval.plan(RLHFSettings(rl_method=stage), stage, bare)
        assert block is None and f"the {stage} stage has none (hyperparameters.{stage}.eval)" in reason


def test_rlhf_runs_grpo_last_unless_told_with_a_kl_term_its_stage_can_override() -> None:
    resolved = resolve_hyperparameters(Method.rlhf, {})
    assert RLHFSettings().rl_method == DEFAULT_RL_METHOD.value == "grpo"
    assert resolved["rl_method"] == "grpo" and set(resolved) == {
        "rl_method", "final_evaluation", "sft", "reward_model", "grpo"
    }  # fmt: skip
    # rlhf's grpo stage optimises a learned reward model: beta 0.2 there, grpo's own default (0) elsewhere.
    assert resolved["grpo"]["beta"] == 0.2
    assert resolve_hyperparameters(Method.grpo, {"graders": [GRADER]})["beta"] == 0.0
    assert resolve_hyperparameters(Method.rlhf, {"grpo": {"beta": 0.0}})["grpo"]["beta"] == 0.0
    # rloo keeps its own default (its KL lives in the reward), ppo has no beta.
    rloo = resolve_hyperparameters(Method.rlhf, {"rl_method": "rloo"})["rloo"]
    assert rloo["beta"] == resolve_hyperparameters(Method.rloo, {"graders": [GRADER]})["beta"]
    # A stored row from before rl_method existed ran ppo, and still reads as ppo.
    assert job_stages("rlhf", {}) == ("sft", "reward_model", "ppo", "evaluate")
    assert job_stages("rlhf", resolved) == ("sft", "reward_model", "grpo", "evaluate")


def test_the_evaluation_compares_base_sft_and_the_final_policy_greedily() -> None:
    ppo = resolve_hyperparameters(Method.rlhf, {"rl_method": "ppo", "ppo": {"eval": _eval_block()}})["ppo"]
    block, _ = rlhf_eval.plan(RLHFSettings(), "ppo", ppo)
    assert block is not None
    spec = rlhf_eval.evaluation_spec(block, "ppo", max_prompt_length=64)
    assert [(c.name, c.adapter) for c in spec.candidates] == [("base", None), ("sft", "sft"), ("ppo", "ppo")]
    assert spec.baseline_name == "base" and [g.name for g in spec.graders] == ["ends"]
    sampling = spec.sampling
    assert (sampling.temperature, sampling.num_samples, sampling.max_new_tokens) == (0.0, 1, 5)
    assert (sampling.max_prompts, sampling.max_prompt_length) == (3, 64)


def test_a_resume_past_the_last_stage_redoes_the_final_evaluation() -> None:
    # The final evaluation is the rlhf job's last stage for resume: its outputs and metrics are redone whole.
    assert job_stages("rlhf", {"rl_method": "ppo"}) == ("sft", "reward_model", "ppo", "evaluate")
    assert job_stages("ppo") == ("ppo",)
