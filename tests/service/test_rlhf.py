"""The rlhf pipeline over REST on the tiny model: SFT -> reward model -> PPO (or GRPO, the default) in one job,
and its quality gate."""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import LiveServer
from tests.helpers.tiny_model import tiny_preference_jsonl
from tests.service.helpers import jsonl, upload_dataset, upload_model, wait_for

PROMPTS = jsonl(
    [
        {"prompt": f"What colour is the {thing}?"}
        for thing in ("apple", "sky", "grass", "snow", "coal", "plum")
    ]
    + [{"messages": [{"role": "user", "content": "Name a colour."}]}]
)
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
# Small enough for a busy 2-core box: a few SFT steps, a reward model that learns the colour table, 2 PPO updates.
HYPERPARAMETERS: dict[str, Any] = {
    "rl_method": "ppo",  # these tests are about the ppo stage (grpo, the default, has its own below)
    "sft": {"epochs": 1, "max_steps": 6, "batch_size": 8, "learning_rate": 3e-3, "max_length": 64},
    "reward_model": {
        "epochs": 20,
        "max_steps": 40,
        "batch_size": 16,
        "learning_rate": 5e-3,
        "max_length": 64,
        "eval_fraction": 0.25,
        "eval_steps": 20,
        "logging_steps": 5,
        "center_rewards_coefficient": 0.01,
        "min_eval_accuracy": 0.75,
    },
    "ppo": {
        "steps": 2,
        "batch_size": 4,
        "mini_batch_size": 4,
        "ppo_epochs": 2,
        "max_new_tokens": 8,
        "max_length": 64,
        "learning_rate": 1e-3,
    },
}

# Held out from every stage: the ppo stage's eval block, and so the final evaluation.
HELD_OUT = jsonl(
    [{"prompt": f"What colour is the {t}?", "colour": "red"} for t in ("cherry", "ruby", "rose")]
)
COLOUR_GRADER = {
    "type": "string_check",
    "name": "says_colour",
    "input": "{{sample.output_text}}",
    "reference": "{{item.colour}}",
    "operation": "ilike",
}


def _inputs(client: httpx.Client, server: LiveServer, preference: bytes) -> dict[str, str]:
    return {
        "model": upload_model(client, server.tiny_model_dir).json()["id"],
        "sft": upload_dataset(client, server.sft_jsonl, "sft").json()["id"],
        "preference": upload_dataset(client, preference, "preference").json()["id"],
        "prompts": upload_dataset(client, PROMPTS, "prompts").json()["id"],
    }


def _rlhf(ids: dict[str, str], hyperparameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": "rlhf",
        "base_model": ids["model"],
        "datasets": {"sft": ids["sft"], "preference": ids["preference"], "prompts": ids["prompts"]},
        "lora": LORA,
        "hyperparameters": hyperparameters,
        "seed": 0,
    }


def _download(client: httpx.Client, artifact: dict[str, Any], dest: Path) -> Path:
    content = client.get(f"/v1/artifacts/{artifact['id']}/content")
    assert content.status_code == 200, content.text
    with tarfile.open(fileobj=io.BytesIO(content.content), mode="r:gz") as archive:
        archive.extractall(dest, filter="data")
    return dest


def _eval_block(client: httpx.Client, *, every: int) -> dict[str, Any]:
    """A held-out eval block on 3 prompts no stage trains on, 4-token answers (cheap on the tiny model)."""
    held_out = upload_dataset(client, HELD_OUT, "prompts").json()["id"]
    return {"prompts": held_out, "graders": [COLOUR_GRADER], "every": every, "max_new_tokens": 4}


def _check_final_evaluation(
    client: httpx.Client, job_id: str, artifacts: list[dict[str, Any]], rl: str = "ppo"
) -> None:
    """The job ended with an evaluation of base, sft and its last stage ``rl`` vs base, served as an evaluate
    job's is."""
    evaluation = client.get(f"/v1/jobs/{job_id}/evaluation")
    assert evaluation.status_code == 200, evaluation.text
    body = evaluation.json()
    eval_artifact = next(a for a in artifacts if a["kind"] == "eval")
    assert eval_artifact["stage"] == "evaluate"
    assert body["baseline"] == "base" and body["per_prompt_artifact"] == eval_artifact["id"]
    assert body["num_prompts"] == 3 and body["num_samples"] == 1
    assert [c["name"] for c in body["candidates"]] == ["base", "sft", rl]
    for candidate in body["candidates"]:
        assert {"eos_rate", "mean_length", "kl_to_base", "graders"} <= set(candidate)
        assert "adapter" not in candidate  # local folders in the child; the job's sft and rl adapters
        grader = candidate["graders"]["says_colour"]
        assert grader["ci_low"] <= grader["mean"] <= grader["ci_high"]
        wins = {"win_rate", "win_rate_ci_low", "win_rate_ci_high"}
        if candidate["name"] == "base":
            assert not wins & set(grader) and candidate["kl_to_base"] == 0.0
        else:
            assert grader["win_rate_ci_low"] <= grader["win_rate"] <= grader["win_rate_ci_high"]
    events = [e["message"] for e in client.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    assert any(m.startswith(f"final evaluation: base, sft and {rl} answer") for m in events), events
    summary = next(m for m in events if m.startswith("final evaluation on 3 held-out prompts"))
    assert "sft: says_colour" in summary and f"{rl}: says_colour" in summary and summary.count("wins") == 2
    prompts = client.get(f"/v1/jobs/{job_id}/evaluation/prompts").json()["data"]
    assert [p["index"] for p in prompts] == [0, 1, 2]
    for prompt in prompts:
        assert [a["candidate"] for a in prompt["answers"]] == ["base", "sft", rl]
        assert all(set(a["scores"]) == {"says_colour"} for a in prompt["answers"])
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    assert f"eval/{rl}/says_colour/win_rate" in {m["name"] for m in metrics if m["stage"] == "evaluate"}


def test_rlhf_end_to_end(live_server: LiveServer, tmp_path: Path) -> None:
    preference = tiny_preference_jsonl(tmp_path / "prefs.jsonl", n=84).read_bytes()
    with live_server.client() as client:
        ids = _inputs(client, live_server, preference)
        # every 100: the ppo stage evaluates after its last update only; then the final evaluation.
        ppo = {**HYPERPARAMETERS["ppo"], "eval": _eval_block(client, every=100)}
        response = client.post("/v1/jobs", json=_rlhf(ids, {**HYPERPARAMETERS, "ppo": ppo}))
        assert response.status_code == 202, response.text
        job = response.json()
        assert set(job["hyperparameters"]) == {"rl_method", "final_evaluation", "sft", "reward_model", "ppo"}
        assert job["hyperparameters"]["rl_method"] == "ppo"  # the default last stage
        assert job["hyperparameters"]["final_evaluation"] is True  # on by default
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert done["status"] == "succeeded", (done, client.get(f"/v1/jobs/{job['id']}/events").json())
        assert done["progress"] == 1.0 and done["stage"] == "evaluate"

        # Stages in order, in the events and in the metrics.
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        stage_order = [e["stage"] for e in events if e["stage"] in ("sft", "reward_model", "ppo")]
        first_seen = sorted(set(stage_order), key=stage_order.index)
        assert first_seen == ["sft", "reward_model", "ppo"], stage_order
        assert any("quality gate passed" in e["message"] for e in events)
        metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
        by_stage: dict[str, set[str]] = {}
        for point in metrics:
            by_stage.setdefault(point["stage"], set()).add(point["name"])
        assert {"loss"} <= by_stage["sft"]
        assert {"loss", "accuracy", "eval_accuracy"} <= by_stage["reward_model"]
        assert {"reward_mean", "kl"} <= by_stage["ppo"]
        assert {"loss", "accuracy", "eval_accuracy", "reward_mean", "kl"} <= {m["name"] for m in metrics}

        # Each stage's artifacts and the final evaluation's; checkpoints were dropped when the job succeeded.
        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        kinds = sorted((a["stage"], a["kind"]) for a in artifacts)
        assert kinds == [
            ("evaluate", "eval"),
            ("ppo", "adapter"),
            ("ppo", "model_card"),
            ("reward_model", "model_card"),
            ("reward_model", "reward_model"),
            ("sft", "adapter"),
            ("sft", "model_card"),
        ], kinds
        folders = {
            (a["stage"], a["kind"]): _download(client, a, tmp_path / f"{a['stage']}-{a['kind']}")
            for a in artifacts
        }
        _check_final_evaluation(client, job["id"], artifacts)
    with open(folders[("evaluate", "eval")] / "per_prompt.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["prompt_index"], r["candidate"]) for r in rows] == [
        (str(p), c) for p in range(3) for c in ("base", "sft", "ppo")
    ]

    # Every stage's output loads with plain peft on the original base.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_dir = live_server.tiny_model_dir
    for stage in ("sft", "ppo"):
        folder = folders[(stage, "adapter")]
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder)
        assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n), stage
        card = (folder / "README.md").read_text()
        assert "## rlhf pipeline" in card and "PeftModel.from_pretrained" in card
        for dataset in (ids["sft"], ids["preference"], ids["prompts"]):
            assert dataset in card
    sft_weights = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), folders[("sft", "adapter")]
    ).state_dict()
    ppo_weights = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), folders[("ppo", "adapter")]
    ).state_dict()
    lora_keys = [k for k in sft_weights if "lora_" in k]
    # PPO started from the SFT adapter and moved it.
    assert any(not torch.equal(sft_weights[k], ppo_weights[k]) for k in lora_keys)

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    base.config.pad_token_id = 0
    scorer = PeftModel.from_pretrained(base, folders[("reward_model", "reward_model")]).eval()
    with torch.no_grad():
        out = scorer(
            input_ids=torch.tensor([[1, 5, 6, 2]]), attention_mask=torch.ones(1, 4, dtype=torch.long)
        )
    assert out.logits.shape == (1, 1)
    assert "held-out" in (folders[("reward_model", "reward_model")] / "README.md").read_text()


def _random_labels(path: Path) -> bytes:
    """The learnable colour pairs with chosen/rejected swapped by a coin flip: nothing left to learn."""
    rng = random.Random(0)
    lines = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if rng.random() < 0.5:
            record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
        lines.append(record)
    return jsonl(lines)


def test_rlhf_gate_stops_a_weak_reward_model_before_ppo(live_server: LiveServer, tmp_path: Path) -> None:
    preference = _random_labels(tiny_preference_jsonl(tmp_path / "prefs.jsonl", n=84))
    hyperparameters = {
        **HYPERPARAMETERS,
        "sft": {**HYPERPARAMETERS["sft"], "max_steps": 2},
        "reward_model": {
            **HYPERPARAMETERS["reward_model"],
            "max_steps": 10,
            "eval_fraction": 0.4,
            "min_eval_accuracy": 0.95,
        },
    }
    with live_server.client() as client:
        ids = _inputs(client, live_server, preference)
        job = client.post("/v1/jobs", json=_rlhf(ids, hyperparameters)).json()
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "reward_model_too_weak", done
        message = done["error"]["message"]
        assert "0.95" in message and "held-out accuracy" in message
        metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
        assert {m["stage"] for m in metrics} == {"sft", "reward_model"}  # no PPO time spent
        assert not any(m["name"] in ("reward_mean", "kl") for m in metrics)
        kinds = {
            (a["stage"], a["kind"]) for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        }
        assert ("ppo", "adapter") not in kinds and ("reward_model", "reward_model") in kinds


def test_rlhf_gate_needs_a_held_out_set(live_server: LiveServer, tmp_path: Path) -> None:
    preference = tiny_preference_jsonl(tmp_path / "prefs.jsonl", n=16).read_bytes()
    hyperparameters = {
        **HYPERPARAMETERS,
        "reward_model": {**HYPERPARAMETERS["reward_model"], "eval_fraction": 0, "min_eval_accuracy": 0.7},
    }
    with live_server.client() as client:
        ids = _inputs(client, live_server, preference)
        job = client.post("/v1/jobs", json=_rlhf(ids, hyperparameters)).json()
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
        assert done["status"] == "failed" and done["error"]["code"] == "invalid_hyperparameters", done
        assert "eval_fraction" in done["error"]["message"]
        assert client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"] == []  # refused before SFT


def test_rlhf_runs_grpo_last_by_default_and_evaluates_it(live_server: LiveServer, tmp_path: Path) -> None:
    """No rl_method: SFT -> reward model -> GRPO from the SFT adapter (beta 0.2, rlhf's default for it),
    rewarded by the job's reward model plus a grader of its own; its eval block reports eval series during
    GRPO and the job ends with the final evaluation of base, sft and grpo."""
    preference = tiny_preference_jsonl(tmp_path / "prefs.jsonl", n=84).read_bytes()
    grpo = {
        "steps": 2, "batch_size": 2, "num_generations": 4, "max_new_tokens": 8, "max_length": 64,
        "learning_rate": 1e-3, "graders": [{"type": "ends_with_eos", "name": "ends"}],
    }  # fmt: skip
    hyperparameters = {"sft": HYPERPARAMETERS["sft"], "reward_model": HYPERPARAMETERS["reward_model"]}
    with live_server.client() as client:
        ids = _inputs(client, live_server, preference)
        hyperparameters["grpo"] = {**grpo, "eval": _eval_block(client, every=1)}
        response = client.post("/v1/jobs", json=_rlhf(ids, hyperparameters))
        assert response.status_code == 202, response.text
        job = response.json()
        assert set(job["hyperparameters"]) == {"rl_method", "final_evaluation", "sft", "reward_model", "grpo"}
        assert job["hyperparameters"]["rl_method"] == "grpo" and job["hyperparameters"]["grpo"]["beta"] == 0.2
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert done["status"] == "succeeded", (done, client.get(f"/v1/jobs/{job['id']}/events").json())
        assert done["progress"] == 1.0 and done["stage"] == "evaluate"
        metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
        grpo_points = [p for p in metrics if p["stage"] == "grpo"]
        assert {
            "reward_mean",
            "reward/ends",
            "reward/reward_model",
            "kl",
            "frac_reward_zero_std",
        } <= {p["name"] for p in grpo_points}
        # every 1: the held-out grader after each of the 2 updates, with the answers' shape beside it.
        assert sorted(p["step"] for p in grpo_points if p["name"] == "eval/says_colour/mean") == [1, 2]
        assert {"eval/eos_rate", "eval/mean_length", "eval/kl_to_base"} <= {p["name"] for p in grpo_points}
        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        assert ("grpo", "adapter") in {(a["stage"], a["kind"]) for a in artifacts}
        _check_final_evaluation(client, job["id"], artifacts, rl="grpo")
        adapter = next(a for a in artifacts if (a["stage"], a["kind"]) == ("grpo", "adapter"))
        card = (_download(client, adapter, tmp_path / "grpo") / "README.md").read_text()
    assert "## rlhf pipeline" in card and "-> GRPO" in card and "GRPO setup" in card
