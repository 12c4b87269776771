"""sft's and dpo's optional ``validation`` dataset at submission: accepted when it is an sft dataset of the tenant,
refused with the field named otherwise, and not a role any other method takes."""

from __future__ import annotations

from typing import Any

import pytest

from contract.methods import Method
from service.core.errors import ValidationFailed
from service.core.submission import ResolvedJob, ResourceInfo, resolve_job

RESOURCES = {
    ("model", "model_1"): ResourceInfo(kind=None),
    ("dataset", "ds_sft"): ResourceInfo(kind="sft"),
    ("dataset", "ds_held_out"): ResourceInfo(kind="sft"),
    ("dataset", "ds_pref"): ResourceInfo(kind="preference"),
}


def submit(method: Method, datasets: dict[str, str | None]) -> ResolvedJob:
    return resolve_job(
        method=method,
        base_model="model_1",
        datasets=datasets,
        init_adapter=None,
        reward_model=None,
        lora=None,
        hyperparameters={"eval_steps": 5} if method is Method.sft else None,
        seed=0,
        lookup=lambda kind, resource_id: RESOURCES.get((kind, resource_id)),
    )


def refusal(method: Method, datasets: dict[str, str | None]) -> dict[str, Any]:
    with pytest.raises(ValidationFailed) as caught:
        submit(method, datasets)
    assert caught.value.status == 422 and len(caught.value.details) == 1, caught.value.details
    detail: dict[str, Any] = caught.value.details[0]
    return detail


def test_an_sft_held_out_set_is_taken() -> None:
    job = submit(Method.sft, {"sft": "ds_sft", "validation": "ds_held_out"})
    assert job.datasets == {"sft": "ds_sft", "validation": "ds_held_out"}
    assert job.hyperparameters["eval_steps"] == 5


@pytest.mark.parametrize(
    ("method", "datasets", "code"),
    [
        (Method.sft, {"sft": "ds_sft", "validation": "ds_pref"}, "wrong_dataset_kind"),
        (Method.sft, {"sft": "ds_sft", "validation": "ds_someone_elses"}, "unknown_dataset"),
        (Method.reward_model, {"preference": "ds_pref", "validation": "ds_pref"}, "unexpected_dataset"),
        (Method.dpo, {"preference": "ds_pref", "validation": "ds_held_out"}, "wrong_dataset_kind"),
    ],
)
def test_a_wrong_held_out_set_names_the_field(
    method: Method, datasets: dict[str, str | None], code: str
) -> None:
    detail = refusal(method, datasets)
    assert (detail["field"], detail["code"]) == ("datasets.validation", code)
    if code == "wrong_dataset_kind":  # the training set's kind: sft for sft, preference for dpo
        assert ("expected 'sft'" if method is Method.sft else "expected 'preference'") in detail["message"]
