"""GRPO and RLOO jobs over REST on the tiny model: a grpo job rewarded by a multi grader (regex + length)
succeeds, its adapter loads with plain peft and its metric series carry the documented names; bad rewards are
refused at submission naming the field (or the dataset lines); an evaluate job shows a GRPO adapter beating the
base on held-out prompts."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LiveServer
from tests.service.helpers import assert_error, jsonl, upload_dataset, upload_model, wait_for

THINGS = ["apple", "sky", "grass", "snow", "coal", "plum"]
SHAPE = {
    "type": "multi",
    "name": "shape",
    "graders": {
        "has_the": {"type": "regex", "name": "has_the", "pattern": "the", "ignore_case": True},
        "short": {"type": "length", "name": "short", "max": 20},
    },
    "calculate_output": "0.5 * has_the + 0.5 * short",
}
NAMES_IT = {
    "type": "string_check",
    "name": "names_it",
    "input": "{{sample.output_text}}",
    "reference": "{{item.thing}}",
    "operation": "ilike",
}
SERIES = {
    "reward_mean", "reward_std", "reward/shape", "reward/names_it", "frac_reward_zero_std", "kl", "clip_ratio",
    "entropy", "completion_length", "eos_fraction", "episodes_per_second", "generation_seconds",
}  # fmt: skip


def _prompts(rows: list[dict[str, Any]] | None = None) -> bytes:
    return jsonl(rows or [{"prompt": f"What colour is the {t}?", "thing": t} for t in THINGS])


def _job(model: str, prompts: str, *, method: str = "grpo", **hyperparameters: Any) -> dict[str, Any]:
    hp = {"steps": 3, "batch_size": 2, "num_generations": 4, "max_new_tokens": 8, "learning_rate": 1e-3}
    return {
        "method": method,
        "base_model": model,
        "datasets": {"prompts": prompts},
        "lora": {"r": 4, "alpha": 8},
        "hyperparameters": {
            **hp,
            "graders": [SHAPE, NAMES_IT],
            "reward_weights": [1.0, 0.5],
            **hyperparameters,
        },
        "seed": 0,
    }


@pytest.fixture
def uploaded(live_server: LiveServer) -> tuple[LiveServer, str, str]:
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        prompts = upload_dataset(client, _prompts(), "prompts").json()["id"]
    return live_server, model, prompts


def test_a_grpo_job_with_a_multi_grader_succeeds_and_its_adapter_loads_with_peft(
    uploaded: tuple[LiveServer, str, str], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    server, model, prompts = uploaded
    with server.client() as client:
        created = client.post("/v1/jobs", json=_job(model, prompts))
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["hyperparameters"]["graders"][0]["graders"]["short"]["unit"] == "chars"  # stored resolved
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert done["status"] == "succeeded", client.get(f"/v1/jobs/{job['id']}/events").json()
        points = client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
        artifacts = {a["kind"]: a for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]}
        content = client.get(f"/v1/artifacts/{artifacts['adapter']['id']}/content")
        assert content.status_code == 200
    assert {p["stage"] for p in points} == {"grpo"}
    assert sorted({p["step"] for p in points}) == [1, 2, 3]
    names = {p["name"] for p in points}
    assert names >= SERIES, SERIES - names
    assert all(0.0 <= p["value"] <= 1.0 for p in points if p["name"] == "reward/shape")
    folder = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(content.content), mode="r:gz") as archive:
        archive.extractall(folder, filter="data")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(server.tiny_model_dir), str(folder)
    )
    # An update trains only through groups whose rewards differ; "short" (at most 20 characters) splits the tiny
    # model's 8-token answers (at 40 every answer of every group passed, and nothing trained).
    assert any(p["value"] < 1 for p in points if p["name"] == "frac_reward_zero_std")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in peft_model.named_parameters())  # it trained
    assert "GRPO setup" in (folder / "README.md").read_text()


def _refused(uploaded: tuple[LiveServer, str, str], body: dict[str, Any], code: str) -> dict[str, Any]:
    server, _, _ = uploaded
    with server.client() as client:
        return assert_error(client.post("/v1/jobs", json=body), 422, code)


def test_bad_rewards_are_refused_naming_the_field(uploaded: tuple[LiveServer, str, str]) -> None:
    _, model, prompts = uploaded
    error = _refused(uploaded, _job(model, prompts, graders=[], reward_weights=None), "missing_reward")
    assert error["details"][0]["field"] == "hyperparameters.graders"

    nested = {
        **SHAPE,
        "graders": {"bad": {"type": "regex", "name": "b", "pattern": "(a+)+"}},
        "calculate_output": "bad",
    }
    error = _refused(uploaded, _job(model, prompts, graders=[nested], reward_weights=None), "unsafe_regex")
    assert error["details"][0]["field"] == "hyperparameters.graders[0].graders.bad.pattern"

    error = _refused(uploaded, _job(model, prompts, method="rloo", reward_weights=[1.0]), "invalid_value")
    assert error["details"][0]["field"] == "hyperparameters.reward_weights"

    rm = {"type": "reward_model", "name": "rm", "artifact": "art_x"}
    error = _refused(uploaded, _job(model, prompts, graders=[rm], reward_weights=None), "invalid_value")
    assert (
        error["details"][0]["field"] == "hyperparameters.graders" and "job's reward_model" in error["message"]
    )

    judge = {
        "type": "score_model",
        "name": "judge",
        "model": "model_someoneelse",
        "input": [{"role": "user", "content": "Rate {{sample.output_text}} from 0 to 1."}],
    }
    error = _refused(
        uploaded, _job(model, prompts, graders=[judge], reward_weights=None), "judge_model_not_supported"
    )
    assert error["details"][0]["field"] == "hyperparameters.graders[0].model"

    rlhf = {"method": "rlhf", "base_model": model, "hyperparameters": {"rl_method": "dpo"}}
    error = _refused(uploaded, rlhf, "missing_dataset")  # the first problem's code; every problem is listed
    assert {
        "field": "hyperparameters.rl_method",
        "code": "invalid_value",
        "message": "one of ppo, grpo, rloo",
    } in (error["details"])


def test_a_grader_item_field_missing_in_rows_is_refused_with_line_numbers(
    uploaded: tuple[LiveServer, str, str],
) -> None:
    server, model, _ = uploaded
    rows = [
        {"prompt": "a?", "thing": "a"},
        {"prompt": "b?"},
        {"prompt": "c?", "thing": "c"},
        {"prompt": "d?"},
    ]
    with server.client() as client:
        prompts = upload_dataset(client, _prompts(rows), "prompts").json()["id"]
    error = _refused(uploaded, _job(model, prompts), "missing_item_field")
    assert [(d["field"], d["line"]) for d in error["details"]] == [
        ("datasets.prompts", 2),
        ("datasets.prompts", 4),
    ]
    assert "'thing'" in error["details"][0]["message"] and "names_it" in error["details"][0]["message"]
    # A grader that reads no item field needs nothing of the rows.
    with server.client() as client:
        accepted = client.post("/v1/jobs", json=_job(model, prompts, graders=[SHAPE], reward_weights=None))
        assert accepted.status_code == 202, accepted.text
        client.post(f"/v1/jobs/{accepted.json()['id']}/cancel")


def test_bad_stop_sequences_are_refused_at_submission(uploaded: tuple[LiveServer, str, str]) -> None:
    """Empty, too long (over 64 characters) and more than 4: 422 naming the field, as OpenAI's API refuses."""
    _, model, prompts = uploaded
    for stop, field in (([""], "stop.0"), (["x" * 65], "stop.0"), (["a", "b", "c", "d", "e"], "stop")):
        error = _refused(uploaded, _job(model, prompts, stop=stop), "invalid_value")
        assert error["details"][0]["field"] == f"hyperparameters.{field}", error


ENDS = {"type": "ends_with_eos", "name": "ends"}
HELD_OUT_THINGS = ["banana", "lemon", "cherry", "leaf", "sea", "orange"]


# A 60-update GRPO job and an evaluate job: longer than the default suite's budget allows, so `make test-slow`.
@pytest.mark.slow
def test_an_evaluate_job_shows_a_grpo_adapter_beating_the_base_on_held_out_prompts(
    live_server: LiveServer,
) -> None:
    """GRPO rewarded for ending within 8 tokens (the rule tests/training/test_grpo.py learns in process), then
    an evaluate job over REST on prompts about things no training prompt names: the adapter ends more of its
    answers than the base, and its paired win-rate's interval is above 0.5."""
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        prompts = upload_dataset(client, _prompts(), "prompts").json()["id"]
        held_out = upload_dataset(
            client, jsonl([{"prompt": f"What colour is the {t}?"} for t in HELD_OUT_THINGS]), "prompts"
        ).json()["id"]
        body = _job(model, prompts, steps=60, batch_size=6, num_generations=8, learning_rate=3e-3)
        body["hyperparameters"].update(graders=[ENDS], reward_weights=None)
        body["lora"] = {"r": 8, "alpha": 16}
        trained = client.post("/v1/jobs", json=body).json()
        done = wait_for(client, trained["id"], {"succeeded", "failed", "cancelled"}, timeout=600)
        assert done["status"] == "succeeded", client.get(f"/v1/jobs/{trained['id']}/events").json()
        artifacts = {
            a["kind"]: a["id"] for a in client.get(f"/v1/jobs/{trained['id']}/artifacts").json()["data"]
        }
        evaluation = {
            "candidates": [{"name": "base"}, {"name": "grpo", "adapter": artifacts["adapter"]}],
            "baseline": "base",
            "graders": [ENDS],
            "sampling": {"max_new_tokens": 8, "temperature": 0, "num_samples": 1},
        }
        job = client.post(
            "/v1/jobs",
            json={
                "method": "evaluate",
                "base_model": model,
                "datasets": {"prompts": held_out},
                "evaluation": evaluation,
                "seed": 3,
            },
        ).json()
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert done["status"] == "succeeded", client.get(f"/v1/jobs/{job['id']}/events").json()
        result = client.get(f"/v1/jobs/{job['id']}/evaluation").json()
    by_name = {c["name"]: c["graders"]["ends"] for c in result["candidates"]}
    print("evaluation:", by_name)
    assert by_name["grpo"]["mean"] > by_name["base"]["mean"], by_name
    assert by_name["grpo"]["win_rate_ci_low"] > 0.5, by_name
