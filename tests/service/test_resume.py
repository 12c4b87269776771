"""A job whose training child is SIGKILLed after a checkpoint runs again and resumes from that checkpoint.

Over REST on the tiny model: the runner sees the attempt end with SIGKILL (no cancel asked), puts the job back
to `queued`, the reconciler hands it to the queue again, and the second attempt continues from the newest
stored checkpoint: the loss series goes on from the checkpoint's step instead of restarting at 1.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEYS, UvicornThread, make_settings
from tests.service.helpers import upload_dataset, upload_model, wait_for


@pytest.fixture
def client(tmp_path: Path) -> Iterator[httpx.Client]:
    from alignd_server.embedded import create_app

    # A fast reconciler: the killed attempt's job is queued again within half a second.
    settings = make_settings(tmp_path / "alignd", reconcile_interval_seconds=0.5, job_max_tries=3)
    with (
        UvicornThread(create_app(settings)) as server,
        httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEYS['tenant-a']}"}, timeout=60
        ) as http,
    ):
        yield http


def _events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    return data


def test_sigkilled_child_resumes_from_its_checkpoint(
    client: httpx.Client, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    model = upload_model(client, tiny_model_dir).json()["id"]
    dataset = upload_dataset(client, sft_jsonl, "sft").json()["id"]
    job = client.post(
        "/v1/jobs",
        json={
            "method": "sft",
            "base_model": model,
            "datasets": {"sft": dataset},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "hyperparameters": {
                "epochs": 100,
                "max_steps": 120,
                "batch_size": 4,
                "learning_rate": 1e-3,
                "max_length": 48,
                "checkpoint_steps": 10,
            },
            "seed": 1,
        },
    ).json()
    job_id = job["id"]

    # Wait for the first stored checkpoint, then kill the child the way the OOM killer would.
    pid = checkpoint_step = None
    deadline = time.monotonic() + 90
    while checkpoint_step is None:
        assert time.monotonic() < deadline, _events(client, job_id)
        for event in _events(client, job_id):
            started = re.search(r"Training process started \(pid (\d+)\)", event["message"])
            if started:
                pid = int(started.group(1))
            stored = re.search(
                r"Stored checkpoint artifact \S+ \(\d+ bytes\) at step (\d+)", event["message"]
            )
            if stored:
                checkpoint_step = int(stored.group(1))
        time.sleep(0.05)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    done = wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
    assert done["status"] == "succeeded", done
    messages = [e["message"] for e in _events(client, job_id)]
    assert any("killed by SIGKILL (attempt 1 of 3)" in m for m in messages), messages
    assert sum(m.startswith("Training process started") for m in messages) == 2
    resumed = [m for m in messages if m.startswith("Resuming from checkpoint")]
    assert len(resumed) == 1, messages
    resume_step = int(re.search(r"step (\d+)", resumed[0]).group(1))  # type: ignore[union-attr]
    # The newest stored checkpoint when the child died: the first one or a later one.
    assert resume_step >= checkpoint_step >= 10 and resume_step % 10 == 0
    assert messages.count("Job succeeded.") == 1

    # One loss point per step 1..120, in order: the second attempt went on at resume_step + 1. A restart
    # from 0 would have sent steps 1..resume_step again.
    losses = [m for m in client.get(f"/v1/jobs/{job_id}/metrics").json()["data"] if m["name"] == "loss"]
    steps = [m["step"] for m in losses]
    assert steps == list(range(1, 121)), steps
    assert Counter(steps).most_common(1)[0][1] == 1

    # One final adapter (and its card); the checkpoints were dropped once the job succeeded.
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    assert sorted(a["kind"] for a in artifacts) == ["adapter", "model_card"], artifacts


def test_rlhf_killed_in_ppo_resumes_ppo_from_its_checkpoint(
    client: httpx.Client, tiny_model_dir: Path, sft_jsonl: Path, tmp_path: Path
) -> None:
    from tests.helpers.tiny_model import tiny_preference_jsonl
    from tests.service.test_rlhf import HYPERPARAMETERS, LORA, PROMPTS

    updates = 24
    ppo_hp = {**HYPERPARAMETERS["ppo"], "steps": updates, "checkpoint_steps": 3}
    ids = {
        "sft": upload_dataset(client, sft_jsonl, "sft").json()["id"],
        "preference": upload_dataset(
            client, tiny_preference_jsonl(tmp_path / "prefs.jsonl", n=84), "preference"
        ).json()["id"],
        "prompts": upload_dataset(client, PROMPTS, "prompts").json()["id"],
    }
    job_id = client.post(
        "/v1/jobs",
        json={
            "method": "rlhf",
            "base_model": upload_model(client, tiny_model_dir).json()["id"],
            "datasets": ids,
            "lora": LORA,
            "hyperparameters": {**HYPERPARAMETERS, "ppo": ppo_hp},
            "seed": 0,
        },
    ).json()["id"]

    # Wait for the first stored PPO checkpoint (not the sft/reward_model stage_complete ones), then SIGKILL.
    pid = checkpoint_step = None
    deadline = time.monotonic() + 240
    while checkpoint_step is None:
        assert time.monotonic() < deadline, _events(client, job_id)
        for event in _events(client, job_id):
            started = re.search(r"Training process started \(pid (\d+)\)", event["message"])
            if started:
                pid = int(started.group(1))
            stored = re.search(
                r"Stored checkpoint artifact \S+ \(\d+ bytes\) at step (\d+)", event["message"]
            )
            if stored and event["stage"] == "ppo":
                checkpoint_step = int(stored.group(1))
        time.sleep(0.05)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    done = wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded", done
    messages = [e["message"] for e in _events(client, job_id)]
    assert any("killed by SIGKILL (attempt 1 of 3)" in m for m in messages), messages
    resumed = [m for m in messages if m.startswith("Resuming from checkpoint")]
    assert len(resumed) == 1 and "stage ppo" in resumed[0], messages
    resume_step = int(re.search(r"step (\d+)", resumed[0]).group(1))  # type: ignore[union-attr]
    assert resume_step >= checkpoint_step >= 3 and resume_step % 3 == 0 and resume_step < updates
    assert messages.count("Job succeeded.") == 1

    # PPO went on at resume_step + 1: one reward_mean point per update 1..24, none sent twice.
    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["data"]
    steps = [m["step"] for m in metrics if m["name"] == "reward_mean"]
    assert steps == list(range(1, updates + 1)), steps
    # The sft and reward_model stages were not trained again: their loss series appear once.
    sft_steps = [m["step"] for m in metrics if m["name"] == "loss" and m["stage"] == "sft"]
    assert Counter(sft_steps).most_common(1)[0][1] == 1
