"""An online job's (and an rlhf job's last stage's) ``eval`` block is checked at submission as an evaluate
job's graders are: the prompts dataset, grader names, the artifacts graders name, and each line's item fields;
it runs in one process, so more processes are refused."""

from __future__ import annotations

from typing import Any

import pytest

from contract.methods import Method
from service.core.errors import ValidationFailed
from service.core.submission import ResolvedJob, ResourceInfo, resolve_job

PASSING_RM = {"eval_accuracy": 0.9, "eval_pairs": 40, "min_eval_accuracy": 0.6, "min_eval_pairs": 20}
RESOURCES = {
    ("model", "model_1"): ResourceInfo(kind=None),
    ("dataset", "ds_train"): ResourceInfo(kind="prompts"),
    ("dataset", "ds_eval"): ResourceInfo(kind="prompts"),
    ("dataset", "ds_sft"): ResourceInfo(kind="sft"),
    ("dataset", "ds_pref"): ResourceInfo(kind="preference"),
    ("artifact", "art_rm"): ResourceInfo(kind="reward_model", metadata=PASSING_RM),
    ("artifact", "art_ad"): ResourceInfo(kind="adapter"),
}
ROWS = {"ds_eval": [(1, {"prompt": "a", "answer": "x"}), (2, {"prompt": "b"}), (3, {"prompt": "c"})]}
ITEM_GRADER = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def submit(
    eval_block: dict[str, Any],
    method: Method = Method.ppo,
    *,
    rl_method: str = "ppo",
    resources: dict[str, Any] | None = None,
) -> ResolvedJob:
    """A job whose eval block is ``eval_block``: ppo or grpo on reward model art_rm, or an rlhf job whose
    ``rl_method`` stage carries it."""
    hyperparameters: dict[str, Any] = {"eval": eval_block}
    datasets: dict[str, str | None] = {"prompts": "ds_train"}
    if method is Method.rlhf:
        hyperparameters = {"rl_method": rl_method, rl_method: hyperparameters}
        datasets = {"sft": "ds_sft", "preference": "ds_pref", "prompts": "ds_train"}
    return resolve_job(
        method=method,
        base_model="model_1",
        datasets=datasets,
        init_adapter=None,
        reward_model="art_rm" if method in (Method.ppo, Method.grpo) else None,
        lora=None,
        hyperparameters=hyperparameters,
        seed=0,
        lookup=lambda kind, resource_id: RESOURCES.get((kind, resource_id)),
        dataset_rows=lambda dataset_id: iter(ROWS.get(dataset_id, [])),
        resources=resources,
        pool_max_processes=4,
    )


def refused(eval_block: dict[str, Any], method: Method = Method.ppo, **how: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationFailed) as caught:
        submit(eval_block, method, **how)
    assert caught.value.status == 422
    return caught.value.details


def test_a_valid_block_is_stored_resolved_with_graders_in_json_form() -> None:
    reward = {"type": "reward_model", "name": "rm", "artifact": "art_rm"}
    job = submit({"prompts": "ds_eval", "graders": [reward], "every": 3})
    stored = job.hyperparameters["eval"]
    assert len(stored["graders"]) == 1 and stored["graders"][0].items() >= reward.items()
    assert stored["every"] == 3 and stored["max_prompts"] == 64


def test_lines_lacking_an_item_field_are_refused_with_their_numbers() -> None:
    details = refused({"prompts": "ds_eval", "graders": [ITEM_GRADER]})
    assert [(d["field"], d["line"], d["code"]) for d in details] == [
        ("hyperparameters.eval.prompts", 2, "missing_item_field"),
        ("hyperparameters.eval.prompts", 3, "missing_item_field"),
    ]


def test_only_the_evaluated_lines_are_checked() -> None:
    submit({"prompts": "ds_eval", "graders": [ITEM_GRADER], "max_prompts": 1})


@pytest.mark.parametrize(
    ("block", "field", "code"),
    [
        ({"prompts": "ds_nope", "graders": [ITEM_GRADER]}, "hyperparameters.eval.prompts", "unknown_dataset"),
        (
            {"prompts": "ds_sft", "graders": [ITEM_GRADER]},
            "hyperparameters.eval.prompts",
            "wrong_dataset_kind",
        ),
        (
            {"prompts": "ds_eval", "graders": [{"type": "reward_model", "name": "rm", "artifact": "art_ad"}]},
            "hyperparameters.eval.graders[0].artifact",
            "wrong_artifact_kind",
        ),
        (
            {"prompts": "ds_eval", "graders": [{**ITEM_GRADER, "name": "x" * 30}]},
            "hyperparameters.eval.graders[0].name",
            "invalid_name",
        ),
    ],
    ids=["unknown-dataset", "wrong-kind", "wrong-artifact", "long-name"],
)
def test_bad_blocks_name_the_field(block: dict[str, Any], field: str, code: str) -> None:
    details = refused(block)
    assert (details[0]["field"], details[0]["code"]) == (field, code), details


def test_rlhf_ppo_stage_block_is_checked_under_its_stage() -> None:
    details = refused({"prompts": "ds_nope", "graders": [ITEM_GRADER]}, Method.rlhf)
    assert [(d["field"], d["code"]) for d in details] == [
        ("hyperparameters.ppo.eval.prompts", "unknown_dataset")
    ]


@pytest.mark.parametrize("rl_method", ["grpo", "rloo"])
def test_a_group_stage_block_is_checked_under_its_stage(rl_method: str) -> None:
    details = refused({"prompts": "ds_nope", "graders": [ITEM_GRADER]}, Method.rlhf, rl_method=rl_method)
    assert [(d["field"], d["code"]) for d in details] == [
        (f"hyperparameters.{rl_method}.eval.prompts", "unknown_dataset")
    ]


def test_a_grpo_job_takes_the_block_and_refuses_it_on_more_processes() -> None:
    block = {"prompts": "ds_eval", "graders": [ITEM_GRADER], "max_prompts": 1, "every": 2}
    assert submit(block, Method.grpo).hyperparameters["eval"]["every"] == 2
    details = refused(block, Method.grpo, resources={"processes": 2})
    assert [(d["field"], d["code"]) for d in details] == [("hyperparameters.eval", "processes_not_supported")]
    details = refused(block, Method.rlhf, rl_method="grpo", resources={"processes": 2})
    assert [(d["field"], d["code"]) for d in details] == [
        ("hyperparameters.grpo.eval", "processes_not_supported")
    ]
