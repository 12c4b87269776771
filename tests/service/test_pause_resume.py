"""Pause and resume over REST on the tiny model (embedded server, one worker thread).

A running job asked to pause saves a checkpoint of the step it finished and stops; paused, it holds no worker
(a queued job behind it may run) and keeps its checkpoints; resumed, it continues from exactly that step, so
its loss series has every step once. A queued job pauses at once and is never taken while paused. The
lifecycle's refusals (finished, not paused, cancelling, another tenant's) answer 404/409 with a code.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import alignd
import httpx
import pytest

from tests.conftest import API_KEYS, UvicornThread, make_settings
from tests.service.helpers import assert_error, upload_dataset, upload_model, wait_for

# Enough steps that the pause (read at a 0.2 s heartbeat) lands mid-run even on a quiet machine.
STEPS = 250


@pytest.fixture
def client(tmp_path: Path) -> Iterator[httpx.Client]:
    from alignd_server.embedded import create_app

    settings = make_settings(tmp_path / "alignd", reconcile_interval_seconds=0.5, heartbeat_seconds=0.2)
    with (
        UvicornThread(create_app(settings)) as server,
        httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEYS['tenant-a']}"}, timeout=60
        ) as http,
    ):
        yield http


def _messages(client: httpx.Client, job_id: str) -> list[str]:
    return [
        e["message"] for e in client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    ]


def _sft(client: httpx.Client, model: str, dataset: str, *, steps: int) -> dict[str, Any]:
    response = client.post(
        "/v1/jobs",
        json={
            "method": "sft",
            "base_model": model,
            "datasets": {"sft": dataset},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            # Periodic checkpoints far apart: the one the resume uses can only be the pause's own.
            "hyperparameters": {"epochs": 100, "max_steps": steps, "batch_size": 4, "learning_rate": 1e-3,
                                "max_length": 48, "checkpoint_steps": 1000},
            "seed": 1,
        },
    )  # fmt: skip
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def _wait_for_steps(client: httpx.Client, job_id: str, at_least: int) -> None:
    deadline = time.monotonic() + 90
    while True:
        points = client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss"}).json()["data"]
        if points and points[-1]["step"] >= at_least:
            return
        assert time.monotonic() < deadline, _messages(client, job_id)
        time.sleep(0.1)


def test_pause_keeps_every_step_and_resume_continues_from_it(
    client: httpx.Client, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    model = upload_model(client, tiny_model_dir).json()["id"]
    dataset = upload_dataset(client, sft_jsonl, "sft").json()["id"]
    running = _sft(client, model, dataset, steps=STEPS)["id"]
    waiting = _sft(client, model, dataset, steps=5)["id"]
    _wait_for_steps(client, running, 5)

    # The queued job pauses at once; the running one says the pause is pending, twice asked or not.
    queued_pause = client.post(f"/v1/jobs/{waiting}/pause")
    assert queued_pause.status_code == 200 and queued_pause.json()["status"] == "paused", queued_pause.text
    with alignd.Client(base_url=str(client.base_url), api_key=API_KEYS["tenant-a"]) as sdk:
        first, again = sdk.jobs.pause(running), sdk.jobs.pause(running)  # the SDK's twin of the REST call
    assert first.status in ("running", "paused") and again.status in ("running", "paused")
    assert first.pause_requested or first.status == "paused"
    paused = wait_for(client, running, {"paused", "succeeded", "failed", "cancelled"}, timeout=60)
    assert paused["status"] == "paused", paused
    assert paused["pause_requested"] is False
    messages = _messages(client, running)
    assert messages.count("Pause requested: training stops at the next step, after saving a checkpoint.") == 1
    stopped = [m for m in messages if m.startswith("Stopping for the pause after step")]
    assert len(stopped) == 1, messages
    pause_step = int(re.search(r"step (\d+)", stopped[0]).group(1))  # type: ignore[union-attr]
    assert 5 <= pause_step < STEPS
    assert "Job paused; resume continues from its newest checkpoint." in messages
    assert "stopped for the pause" in messages and not any("received SIGTERM" in m for m in messages)
    kinds = [a["kind"] for a in client.get(f"/v1/jobs/{running}/artifacts").json()["data"]]
    assert "checkpoint" in kinds, kinds

    # Paused, neither job is taken by the (free) worker.
    time.sleep(1.5)
    assert client.get(f"/v1/jobs/{waiting}").json()["status"] == "paused"
    assert client.get(f"/v1/jobs/{running}").json()["status"] == "paused"

    # Another tenant sees neither; the paused queued job is cancelled; the refusals carry codes.
    with httpx.Client(
        base_url=str(client.base_url), headers={"Authorization": f"Bearer {API_KEYS['tenant-b']}"}
    ) as other:
        assert_error(other.post(f"/v1/jobs/{running}/resume"), 404, "job_not_found")
        assert_error(other.post(f"/v1/jobs/{running}/pause"), 404, "job_not_found")
    assert client.post(f"/v1/jobs/{waiting}/cancel").json()["status"] == "cancelled"
    assert_error(client.post(f"/v1/jobs/{waiting}/resume"), 409, "job_not_paused")
    assert_error(client.post(f"/v1/jobs/{waiting}/pause"), 409, "job_finished")

    with alignd.Client(base_url=str(client.base_url), api_key=API_KEYS["tenant-a"]) as sdk:
        assert sdk.jobs.resume(running).status in ("queued", "running")
    done = wait_for(client, running, {"succeeded", "failed", "cancelled", "paused"}, timeout=120)
    assert done["status"] == "succeeded", done
    messages = _messages(client, running)
    resumes = [m for m in messages if m.startswith("Resuming from checkpoint")]
    assert len(resumes) == 1 and f"step {pause_step}" in resumes[0], messages
    # Every step once: the second run went on at pause_step + 1 (a restart would repeat 1..pause_step,
    # a resume from an older checkpoint would repeat the steps after it).
    steps = [
        p["step"] for p in client.get(f"/v1/jobs/{running}/metrics", params={"name": "loss"}).json()["data"]
    ]
    assert steps == list(range(1, STEPS + 1)), steps
    with (
        alignd.Client(base_url=str(client.base_url), api_key=API_KEYS["tenant-a"]) as sdk,
        pytest.raises(alignd.ConflictError, match="not paused"),
    ):
        sdk.jobs.resume(running)
