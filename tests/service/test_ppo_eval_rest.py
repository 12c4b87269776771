"""The eval block over REST: an rlhf job whose ppo stage evaluates on a held-out prompts dataset. The runner
fetches that dataset, the pipeline hands it to the ppo stage, and the job's metrics carry eval/<grader>/mean
at the expected PPO updates."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import LiveServer
from tests.helpers.tiny_model import tiny_preference_jsonl
from tests.service.helpers import jsonl, upload_dataset, wait_for
from tests.service.test_rlhf import HYPERPARAMETERS, _inputs, _rlhf

HELD_OUT = jsonl(
    [{"prompt": f"What colour is the {t}?", "colour": "red"} for t in ("cherry", "ruby", "rose")]
)
GRADER = {
    "type": "string_check",
    "name": "says_colour",
    "input": "{{sample.output_text}}",
    "reference": "{{item.colour}}",
    "operation": "ilike",
}


def test_rlhf_ppo_stage_reports_held_out_eval_series(live_server: LiveServer, tmp_path: Path) -> None:
    preference = tiny_preference_jsonl(tmp_path / "prefs.jsonl", n=84).read_bytes()
    with live_server.client() as client:
        ids = _inputs(client, live_server, preference)
        held_out = upload_dataset(client, HELD_OUT, "prompts").json()["id"]
        eval_block = {"prompts": held_out, "graders": [GRADER], "every": 1, "max_new_tokens": 4}
        hyperparameters = {**HYPERPARAMETERS, "ppo": {**HYPERPARAMETERS["ppo"], "eval": eval_block}}
        response = client.post("/v1/jobs", json=_rlhf(ids, hyperparameters))
        assert response.status_code == 202, response.text
        job = response.json()
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
        assert done["status"] == "succeeded", (done, client.get(f"/v1/jobs/{job['id']}/events").json())
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
