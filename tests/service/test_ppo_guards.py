"""PPO's guards over REST on the tiny model: a reward model too weak for PPO is refused at submission with
its figures (reward_model_too_weak), ``allow_weak_reward_model`` lets it through, and a monitor in
``stop_on`` ends the job early as succeeded / stopped_by_monitor with the alert on the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import LiveServer
from tests.helpers.tiny_model import tiny_preference_jsonl
from tests.service.helpers import assert_error, jsonl, upload_dataset, upload_model, wait_for

PROMPTS = jsonl([{"prompt": f"What colour is the {thing}?"} for thing in ("apple", "sky", "grass", "snow")])
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
PPO_HP: dict[str, Any] = {
    "steps": 6,
    "batch_size": 4,
    "mini_batch_size": 4,
    "ppo_epochs": 2,
    "max_new_tokens": 6,
    "max_length": 64,
    "learning_rate": 3e-3,
}


def test_weak_reward_model_refused_then_allowed_and_a_monitor_stops_the_job(
    live_server: LiveServer, tmp_path: Path
) -> None:
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        prompts = upload_dataset(client, PROMPTS, "prompts").json()["id"]
        preference = upload_dataset(client, tiny_preference_jsonl(tmp_path / "p.jsonl", n=40), "preference")
        # 4 of 40 pairs held out: whatever its accuracy, too few pairs to trust.
        reward_job = client.post(
            "/v1/jobs",
            json={
                "method": "reward_model",
                "base_model": model,
                "datasets": {"preference": preference.json()["id"]},
                "lora": LORA,
                "hyperparameters": {"max_steps": 2, "batch_size": 8, "max_length": 64, "eval_fraction": 0.1},
                "seed": 0,
            },
        ).json()
        done = wait_for(client, reward_job["id"], {"succeeded", "failed", "cancelled"}, timeout=180)
        assert done["status"] == "succeeded", done
        artifacts = client.get(f"/v1/jobs/{reward_job['id']}/artifacts").json()["data"]
        reward_model = next(a["id"] for a in artifacts if a["kind"] == "reward_model")

        body = {
            "method": "ppo",
            "base_model": model,
            "datasets": {"prompts": prompts},
            "reward_model": reward_model,
            "lora": LORA,
            "hyperparameters": PPO_HP,
            "seed": 0,
        }
        error = assert_error(client.post("/v1/jobs", json=body), 422, "reward_model_too_weak")
        assert "on 4 pairs; floor 0.60 on >= 20 pairs" in error["message"], error
        assert "held-out accuracy" in error["message"] and "allow_weak_reward_model" in error["message"]
        assert error["details"][0]["field"] == "reward_model"

        # Allowed explicitly; a KL ceiling no update can stay under (update 1 has KL 0: the policy is the
        # reference until it is trained) stops the job after the first update that moved it.
        monitors = {"kl_max": 1e-6, "stop_on": ["kl"]}
        allowed = {
            **body,
            "hyperparameters": {**PPO_HP, "allow_weak_reward_model": True, "monitors": monitors},
        }
        response = client.post("/v1/jobs", json=allowed)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        assert response.json()["monitors"] == [] and response.json()["status_reason"] is None
        job = wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
        assert (job["status"], job["status_reason"]) == ("succeeded", "stopped_by_monitor"), job
        fired = job["monitors"]
        assert [(m["stage"], m["name"], m["stop"]) for m in fired] == [("ppo", "kl", True)], fired
        stopped_at = fired[0]["step"]
        assert 2 <= stopped_at < PPO_HP["steps"] and fired[0]["value"] > fired[0]["threshold"] == 1e-6
        listed = client.get("/v1/jobs").json()["data"]
        assert next(j for j in listed if j["id"] == job_id)["monitors"] == fired

        events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
        warnings = [e["message"] for e in events if e["level"] == "warning"]
        assert any(f"monitor kl at update {stopped_at}" in w and "stop_on: kl" in w for w in warnings), events
        assert events[-1]["message"] == (
            f"Job succeeded: stopped early by monitor kl at update {stopped_at} (stop_on); the newest policy "
            "is the output."
        )
        steps = {m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]}
        assert max(steps) == stopped_at
        kinds = {a["kind"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]}
        assert kinds == {"adapter", "model_card"}
