"""The rlhf job's final evaluation, without a model: the ``final_evaluation`` knob at submission, and which
evaluation (or which reason for none) the child plans from its resolved hyperparameters. The run itself is
tests/service/test_rlhf.py::test_rlhf_end_to_end (on) and tests/service/test_ppo_eval_rest.py (off)."""

from __future__ import annotations

from typing import Any

import pytest

from contract.hyperparameters import RLHFSettings
from contract.methods import Method
from service.core.errors import ValidationFailed
from service.core.jobs import resolve_hyperparameters
from workers.resume import job_stages
from workers.training import rlhf_eval

GRADER = {"type": "ends_with_eos", "name": "ends"}


def _eval_block() -> dict[str, Any]:
    return {"prompts": "ds_eval", "graders": [GRADER], "max_new_tokens": 5, "max_prompts": 3}


def test_final_evaluation_defaults_on_and_is_a_strict_bool() -> None:
    resolved = resolve_hyperparameters(Method.rlhf, {})
    assert resolved["final_evaluation"] is True and resolved["rl_method"] == "ppo"
    assert resolve_hyperparameters(Method.rlhf, {"final_evaluation": False})["final_evaluation"] is False
    with pytest.raises(ValidationFailed) as refused:
        resolve_hyperparameters(Method.rlhf, {"final_evaluation": "no"})
    assert [d["field"] for d in refused.value.details] == ["hyperparameters.final_evaluation"]


def test_the_plan_names_why_nothing_is_evaluated() -> None:
    ppo = resolve_hyperparameters(Method.rlhf, {"ppo": {"eval": _eval_block()}})["ppo"]
    block, reason = rlhf_eval.plan(RLHFSettings(), "ppo", ppo)
    assert block is not None and block.max_new_tokens == 5 and reason == ""

    block, reason = rlhf_eval.plan(RLHFSettings(final_evaluation=False), "ppo", ppo)
    assert block is None and reason == "no final evaluation: final_evaluation is false"

    bare = resolve_hyperparameters(Method.rlhf, {})["ppo"]
    block, reason = rlhf_eval.plan(RLHFSettings(), "ppo", bare)
    assert block is None and "the ppo stage has none (hyperparameters.ppo.eval)" in reason

    grpo = resolve_hyperparameters(Method.rlhf, {"rl_method": "grpo"})["grpo"]
    block, reason = rlhf_eval.plan(RLHFSettings(rl_method="grpo"), "grpo", grpo)
    assert block is None and "only ppo takes an eval block" in reason


def test_the_evaluation_compares_base_sft_and_the_final_policy_greedily() -> None:
    ppo = resolve_hyperparameters(Method.rlhf, {"ppo": {"eval": _eval_block()}})["ppo"]
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
