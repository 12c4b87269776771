"""Datasets written with a UTF-8 byte-order mark (Notepad, Excel's "CSV UTF-8") and CRLF line ends, uploaded
over REST and trained on: the upload accepts them, so every reader behind it must read them the same way.

One server per test (embedded mode), the tiny model, one or two optimizer steps per job.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.service.helpers import upload_dataset, upload_model, wait_for

BOM = b"\xef\xbb\xbf"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
SFT: list[dict[str, Any]] = [
    {"prompt": "What colour is the sky?", "completion": "Blue."},
    {"messages": [{"role": "user", "content": "Grass?"}, {"role": "assistant", "content": "Green."}]},
]
PREFERENCE: list[dict[str, Any]] = [
    {"prompt": "What colour is snow?", "chosen": "White.", "rejected": "Purple."},
    {"prompt": [{"role": "user", "content": "Coal?"}], "chosen": "Black.", "rejected": "Yellow."},
]
PROMPTS: list[dict[str, Any]] = [
    {"prompt": "What colour is the sea?"},
    {"messages": [{"role": "user", "content": "Name a colour."}]},
]
RANKING: list[dict[str, Any]] = [
    {"prompt": "What colour is a plum?", "responses": ["Purple.", "Orange.", "Grey."], "ranking": [0, 2, 1]},
    {"prompt": "Lemons?", "responses": ["Yellow.", "Blue."], "scores": [2.0, 0.5]},
]
CANDIDATES: list[dict[str, Any]] = [
    {"prompt": "What colour is rust?", "responses": ["Brown.", "Red-brown.", "Green."]}
]
REWARD_HP = {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48, "eval_fraction": 0}


def bom_jsonl(records: list[dict[str, Any]]) -> bytes:
    """BOM, CRLF line ends and a blank line in the middle: what a Windows editor saves."""
    lines = [json.dumps(record).encode() for record in records]
    return BOM + b"\r\n".join([*lines[:1], b"", *lines[1:]]) + b"\r\n"


def _upload(client: httpx.Client, records: list[dict[str, Any]], kind: str) -> str:
    response = upload_dataset(client, bom_jsonl(records), kind)
    assert response.status_code == 201, response.text
    assert response.json()["num_records"] == len(records)
    return str(response.json()["id"])


def _succeeds(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={"lora": LORA, "seed": 0, **body})
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=180)
    assert job["status"] == "succeeded", (job["error"], client.get(f"/v1/jobs/{job['id']}/events").json())
    return job


def _reward_model(client: httpx.Client, model: str, dataset: str) -> dict[str, Any]:
    body = {"method": "reward_model", "base_model": model, "datasets": {"preference": dataset}}
    return _succeeds(client, {**body, "hyperparameters": REWARD_HP})


@pytest.fixture
def client(live_server: LiveServer) -> Any:
    with live_server.client() as client:
        yield client


@pytest.fixture
def model(client: httpx.Client, live_server: LiveServer) -> str:
    return str(upload_model(client, live_server.tiny_model_dir).json()["id"])


def test_sft_job_trains_on_a_bom_file(client: httpx.Client, model: str) -> None:
    hyperparameters = {"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3, "max_length": 48}
    body = {"method": "sft", "base_model": model, "datasets": {"sft": _upload(client, SFT, "sft")}}
    _succeeds(client, {**body, "hyperparameters": hyperparameters})


def test_reward_model_job_trains_on_a_bom_ranking_file(client: httpx.Client, model: str) -> None:
    _reward_model(client, model, _upload(client, RANKING, "ranking"))  # expanded to pairs by the runner


def test_generate_job_samples_from_a_bom_prompts_file(client: httpx.Client, model: str) -> None:
    hyperparameters = {"num_responses": 2, "max_new_tokens": 4, "temperature": 1.5, "seed": 1}
    body = {
        "method": "generate",
        "base_model": model,
        "datasets": {"prompts": _upload(client, PROMPTS, "prompts")},
    }
    _succeeds(client, {**body, "hyperparameters": hyperparameters})


def test_reward_model_and_ppo_jobs_train_on_bom_preference_and_prompts(
    client: httpx.Client, model: str
) -> None:
    scorer = _reward_model(client, model, _upload(client, PREFERENCE, "preference"))
    artifacts = client.get(f"/v1/jobs/{scorer['id']}/artifacts").json()["data"]
    reward_model = next(a["id"] for a in artifacts if a["kind"] == "reward_model")
    prompts = _upload(client, PROMPTS, "prompts")
    hyperparameters = {
        "steps": 1,
        "batch_size": 2,
        "mini_batch_size": 2,
        "ppo_epochs": 1,
        "max_new_tokens": 4,
        # A one-step reward model on a handful of pairs is under the quality gate by design: this test is about
        # reading a BOM-prefixed prompts file, so it opts out of the gate explicitly.
        "allow_weak_reward_model": True,
    }
    body = {
        "method": "ppo",
        "base_model": model,
        "datasets": {"prompts": prompts},
        "reward_model": reward_model,
    }
    _succeeds(client, {**body, "hyperparameters": {**hyperparameters, "max_length": 48}})


def test_feedback_set_reads_a_bom_candidates_file(client: httpx.Client) -> None:
    candidates = _upload(client, CANDIDATES, "candidates")
    response = client.post("/v1/feedback-sets", json={"name": "bom", "candidates": candidates})
    assert response.status_code == 201, response.text
    item = client.get(f"/v1/feedback-sets/{response.json()['id']}/next", params={"annotator": "ann"}).json()
    assert item["prompt"] == CANDIDATES[0]["prompt"]
    assert sorted(r["text"] for r in item["responses"]) == sorted(CANDIDATES[0]["responses"])
