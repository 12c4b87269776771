"""The reward-model quality gate at submission: a ppo job naming a reward model whose held-out figures fail
its floor is refused with reward_model_too_weak and the figures, unless it allows a weak reward model."""

from __future__ import annotations

from typing import Any

import pytest

from contract import reward_gate
from contract.hyperparameters import RewardModelHyperparameters
from contract.methods import Method
from service.core.errors import ValidationFailed
from service.core.submission import ResolvedJob, ResourceInfo, resolve_job


def submit(metadata: dict[str, Any], **hyperparameters: Any) -> ResolvedJob:
    resources = {
        ("model", "model_1"): ResourceInfo(kind=None),
        ("dataset", "ds_1"): ResourceInfo(kind="prompts"),
        ("artifact", "art_rm"): ResourceInfo(kind="reward_model", metadata=metadata),
    }
    return resolve_job(
        method=Method.ppo,
        base_model="model_1",
        datasets={"prompts": "ds_1"},
        init_adapter=None,
        reward_model="art_rm",
        lora=None,
        hyperparameters=hyperparameters,
        seed=0,
        lookup=lambda kind, resource_id: resources.get((kind, resource_id)),
    )


def refusal(metadata: dict[str, Any], **hyperparameters: Any) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as caught:
        submit(metadata, **hyperparameters)
    assert caught.value.code == "reward_model_too_weak", caught.value.details
    assert caught.value.status == 422
    assert caught.value.details[0]["field"] == "reward_model"
    return caught.value


GATE = {"min_eval_accuracy": 0.6, "min_eval_pairs": 20}


def test_too_few_pairs_is_refused_with_the_figures() -> None:
    error = refusal({"eval_accuracy": 1 / 3, "eval_pairs": 3, "quality_gate": GATE})
    assert "held-out accuracy 0.33 on 3 pairs; floor 0.60 on >= 20 pairs" in error.message
    assert "allow_weak_reward_model" in error.message


def test_low_accuracy_on_enough_pairs_is_refused() -> None:
    error = refusal({"eval_accuracy": 0.55, "eval_pairs": 40, "quality_gate": GATE})
    assert "held-out accuracy 0.55 on 40 pairs; floor 0.60 on >= 20 pairs" in error.message


def test_no_held_out_set_is_refused() -> None:
    error = refusal({"eval_accuracy": None, "eval_pairs": 0, "quality_gate": GATE})
    assert "no held-out accuracy" in error.message


def test_a_good_reward_model_passes_and_allow_weak_lets_a_weak_one_through() -> None:
    assert submit({"eval_accuracy": 0.8, "eval_pairs": 20, "quality_gate": GATE}).reward_model == "art_rm"
    weak = {"eval_accuracy": 0.33, "eval_pairs": 3, "quality_gate": GATE}
    resolved = submit(weak, allow_weak_reward_model=True)
    assert resolved.hyperparameters["allow_weak_reward_model"] is True


def test_the_floor_is_the_reward_models_own() -> None:
    lenient = {
        "eval_accuracy": 0.55,
        "eval_pairs": 8,
        "quality_gate": {"min_eval_accuracy": 0.5, "min_eval_pairs": 5},
    }
    assert submit(lenient).reward_model == "art_rm"
    off = {
        "eval_accuracy": None,
        "eval_pairs": 0,
        "quality_gate": {"min_eval_accuracy": 0.0, "min_eval_pairs": 20},
    }
    assert submit(off).reward_model == "art_rm"  # min_eval_accuracy 0 turns the gate off
    strict = {
        "eval_accuracy": 0.85,
        "eval_pairs": 50,
        "quality_gate": {"min_eval_accuracy": 0.9, "min_eval_pairs": 20},
    }
    assert "floor 0.90 on >= 20 pairs" in refusal(strict).message


def test_artifacts_from_before_the_gate_use_their_metrics_and_the_default_floor() -> None:
    # Stored before eval_pairs and quality_gate were written at the top level: the final metrics hold them.
    old = {"eval_accuracy": 0.9, "metrics": {"eval_accuracy": 0.9, "eval_pairs": 12.0}}
    defaults = RewardModelHyperparameters()
    assert reward_gate.floor_of(old) == reward_gate.GateFloor(
        defaults.min_eval_accuracy, defaults.min_eval_pairs
    )
    assert "0.90 on 12 pairs; floor 0.60 on >= 20 pairs" in refusal(old).message
    assert "no held-out accuracy recorded" in refusal({}).message  # nothing recorded: nothing to trust


def test_other_problems_are_reported_alongside() -> None:
    with pytest.raises(ValidationFailed) as caught:
        submit({"eval_accuracy": 0.1, "eval_pairs": 3}, steps=0)
    fields = {d["field"] for d in caught.value.details}
    # An invalid hyperparameter leaves nothing resolved to read allow_weak_reward_model from: that is reported,
    # and the gate waits for a valid submission.
    assert fields == {"hyperparameters.steps"}
