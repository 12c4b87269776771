"""The eval block over REST: an rlhf job whose ppo stage evaluates on a held-out prompts dataset. The runner
fetches that dataset, the pipeline hands it to the ppo stage, and the job's metrics carry eval/<grader>/mean
at the expected PPO updates. With ``final_evaluation: false`` the job ends without its final evaluation
(test_rlhf_end_to_end has the default, on)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import LiveServer
from tests.helpers.tiny_model import tiny_preference_jsonl
from tests.service.helpers import assert_error, jsonl, upload_dataset, wait_for
from tests.service.test_rlhf import HYPERPARAMETERS, _eval_block, _inputs, _rlhf


def test_rlhf_ppo_stage_reports_held_out_eval_series(live_server: LiveServer, tmp_path: Path) -> None:
    preference = tiny_preference_jsonl(tmp_path / "prefs.jsonl", n=84).read_bytes()
    with live_server.client() as client:
        ids = _inputs(client, live_server, preference)
        eval_block = _eval_block(client, every=1)
        hyperparameters = {
            **HYPERPARAMETERS,
            "final_evaluation": False,
            "ppo": {**HYPERPARAMETERS["ppo"], "eval": eval_block},
        }
        response = client.post("/v1/jobs", json=_rlhf(ids, hyperparameters))
        assert response.status_code == 202, response.text
        job = response.json()
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert done["status"] == "succeeded", (done, client.get(f"/v1/jobs/{job['id']}/events").json())
        assert done["stage"] == "ppo"

        # final_evaluation false: no eval artifact, no evaluation, and an event saying so.
        artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
        assert "eval" not in {a["kind"] for a in artifacts}
        assert_error(client.get(f"/v1/jobs/{job['id']}/evaluation"), 404, "evaluation_not_found")
        events = [e["message"] for e in client.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
        assert "no final evaluation: final_evaluation is false" in events
        metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
        points = [
            (m["stage"], m["step"], m["value"]) for m in metrics if m["name"] == "eval/says_colour/mean"
        ]
        assert [(stage, step) for stage, step, _ in points] == [("ppo", 1), ("ppo", 2)], points
        assert all(0.0 <= value <= 1.0 for _, _, value in points)

        # A line lacking the grader's item field is refused at submission, with its line number.
        bad = upload_dataset(client, jsonl([{"prompt": "no colour here"}]), "prompts").json()["id"]
        refused = {
            **HYPERPARAMETERS,
            "ppo": {**HYPERPARAMETERS["ppo"], "eval": {**eval_block, "prompts": bad}},
        }
        response = client.post("/v1/jobs", json=_rlhf(ids, refused))
        assert response.status_code == 422, response.text
        details = response.json()["error"]["details"]
        assert [(d["field"], d.get("line")) for d in details] == [("hyperparameters.ppo.eval.prompts", 1)], (
            details
        )
