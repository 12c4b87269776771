"""A feedback round over REST on the tiny model: SFT policy -> generate -> feedback set -> scripted annotators
-> export -> reward model (from the ranking) -> PPO from the previous policy; every step listed and linked.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import LiveServer
from tests.service.helpers import (
    artifact_of,
    assert_error,
    jsonl,
    run_job,
    upload_dataset,
    upload_model,
)

PROMPTS = jsonl([{"prompt": f"What colour is the {thing}?"} for thing in ("apple", "sky", "grass", "snow")])
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
ROUND = 1


def _annotate(client: httpx.Client, fbs: str, annotator: str) -> int:
    """A scripted annotator: the longer answer is better (a simple rule standing in for people)."""
    count = 0
    while True:
        response = client.get(f"/v1/feedback-sets/{fbs}/next", params={"annotator": annotator})
        if response.status_code == 204:
            return count
        item = response.json()
        ranking = [r["id"] for r in sorted(item["responses"], key=lambda r: (-len(r["text"]), r["id"]))]
        label = client.post(
            f"/v1/feedback-sets/{fbs}/labels",
            json={"item": item["id"], "annotator": annotator, "ranking": ranking},
        )
        assert label.status_code == 201, label.text
        count += 1


def test_feedback_round_over_rest(live_server: LiveServer) -> None:
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        sft = upload_dataset(client, live_server.sft_jsonl, "sft").json()["id"]
        prompts = upload_dataset(client, PROMPTS, "prompts").json()["id"]

        # round 0's policy: a short SFT run
        policy = run_job(
            client,
            {
                "method": "sft",
                "base_model": model,
                "datasets": {"sft": sft},
                "lora": LORA,
                "hyperparameters": {"max_steps": 2, "batch_size": 8, "learning_rate": 3e-3, "max_length": 64},
                "seed": 0,
            },
        )
        policy_adapter = artifact_of(client, policy, "adapter")

        # 1. candidates from the previous policy
        generate = run_job(
            client,
            {
                "method": "generate",
                "base_model": model,
                "datasets": {"prompts": prompts},
                "init_adapter": policy_adapter["id"],
                "hyperparameters": {"num_responses": 3, "max_new_tokens": 8, "temperature": 1.2, "seed": 3},
                "round": ROUND,
                "seed": 0,
            },
        )
        assert generate["round"] == ROUND
        metrics = {m["name"] for m in client.get(f"/v1/jobs/{generate['id']}/metrics").json()["data"]}
        assert {"tokens_per_second", "eos_rate", "candidates_written"} <= metrics
        made = client.get("/v1/datasets", params={"job": generate["id"]}).json()["data"]
        assert len(made) == 1, made
        candidates = made[0]
        assert (candidates["kind"], candidates["job"], candidates["round"]) == (
            "candidates",
            generate["id"],
            ROUND,
        )
        assert 1 <= candidates["num_records"] <= 4

        # 2. a feedback set; 3. two scripted annotators label every item
        fbs = client.post(
            "/v1/feedback-sets",
            json={"name": "round 1", "candidates": candidates["id"], "annotations_per_item": 2},
        ).json()
        assert fbs["round"] == ROUND  # taken from the candidates
        assert _annotate(client, fbs["id"], "ann") == candidates["num_records"]
        assert _annotate(client, fbs["id"], "bob") == candidates["num_records"]
        ratings = client.get(f"/v1/feedback-sets/{fbs['id']}/ratings").json()
        assert ratings["progress"]["items_complete"] == candidates["num_records"]
        assert ratings["agreement"]["pairwise"] is not None

        # 4. export to a ranking dataset
        exported = client.post(f"/v1/feedback-sets/{fbs['id']}/export", json={"min_labels": 2})
        assert exported.status_code == 201, exported.text
        ranking = exported.json()
        assert (ranking["kind"], ranking["feedback_set"], ranking["round"]) == ("ranking", fbs["id"], ROUND)

        # 5. a reward model on the ranking (expanded to pairs by the runner)
        reward_body = {
            "method": "reward_model",
            "base_model": model,
            "datasets": {"preference": ranking["id"]},
            "lora": LORA,
            "hyperparameters": {
                "max_steps": 4,
                "batch_size": 6,
                "learning_rate": 5e-3,
                "max_length": 64,
                "eval_fraction": 0.25,
                "eval_steps": 2,
            },
            "round": ROUND,
            "seed": 0,
        }
        ppo_body: dict[str, Any] = {
            "method": "ppo",
            "base_model": model,
            "datasets": {"prompts": prompts},
            "init_adapter": policy_adapter["id"],
            "lora": LORA,
            "hyperparameters": {
                "steps": 1,
                "batch_size": 2,
                "mini_batch_size": 2,
                "ppo_epochs": 1,
                "max_new_tokens": 8,
                "max_length": 64,
            },
            "round": ROUND,
            "seed": 0,
        }
        reward = run_job(client, reward_body)
        events = " ".join(e["message"] for e in client.get(f"/v1/jobs/{reward['id']}/events").json()["data"])
        reward_metrics = client.get(f"/v1/jobs/{reward['id']}/metrics").json()["data"]
        eval_accuracy = [m["value"] for m in reward_metrics if m["name"] == "eval_accuracy"]
        assert eval_accuracy and 0.0 <= eval_accuracy[-1] <= 1.0, events  # held-out pair accuracy, reported
        reward_model = artifact_of(client, reward, "reward_model")
        # the next round continues this reward model rather than starting over
        again = run_job(client, {**reward_body, "init_reward_model": reward_model["id"], "round": ROUND + 1})
        assert again["init_reward_model"] == reward_model["id"]
        events = [e["message"] for e in client.get(f"/v1/jobs/{again['id']}/events").json()["data"]]
        assert any(f"continuing reward model {reward_model['id']}" in e for e in events), events
        assert_error(
            client.post("/v1/jobs", json={**ppo_body, "init_reward_model": reward_model["id"]}),
            422,
            "unexpected_field",
        )

        # 6. PPO from the previous policy against the new reward model: one prompt's 3 pairs held out are too
        # few to trust, so the quality gate refuses it until the round says it accepts a weak reward model.
        ppo_body["reward_model"] = reward_model["id"]
        refused = assert_error(client.post("/v1/jobs", json=ppo_body), 422, "reward_model_too_weak")
        assert "on 3 pairs; floor 0.60 on >= 20 pairs" in refused["message"], refused
        ppo_body["hyperparameters"] = {**ppo_body["hyperparameters"], "allow_weak_reward_model": True}
        ppo = run_job(client, ppo_body)
        assert ppo["hyperparameters"]["allow_weak_reward_model"] is True
        assert ppo["init_adapter"] == policy_adapter["id"] and ppo["reward_model"] == reward_model["id"]
        new_policy = artifact_of(client, ppo, "adapter")
        assert new_policy["job"] == ppo["id"]

        # every step of the round is listed and linked
        jobs = client.get("/v1/jobs", params={"round": ROUND}).json()["data"]
        assert [j["method"] for j in jobs] == ["ppo", "reward_model", "generate"]
        datasets = client.get("/v1/datasets", params={"round": ROUND}).json()["data"]
        assert [(d["kind"], d["job"], d["feedback_set"]) for d in datasets] == [
            ("ranking", None, fbs["id"]),
            ("candidates", generate["id"], None),
        ]
        assert reward["datasets"] == {"preference": ranking["id"]}
