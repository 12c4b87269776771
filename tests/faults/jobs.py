"""The jobs the fault suite runs: short, on the tiny model, checkpointing often so every kill has a
checkpoint to resume from. Each spec says which metric series must come out as steps 1..N exactly once."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.service.helpers import jsonl, upload_dataset, upload_model

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
PROMPTS = jsonl(
    [
        {"prompt": f"What colour is the {thing}?"}
        for thing in ("apple", "sky", "grass", "snow", "coal", "plum")
    ]
)
SFT_STEPS = 24
# rlhf: the reward model must clear its quality gate (min_eval_accuracy) on the tiny task, as in
# tests/service/test_rlhf.py; checkpoint_steps is set in every stage.
RLHF_HYPERPARAMETERS: dict[str, Any] = {
    "rl_method": "ppo",
    "sft": {
        "epochs": 10,
        "max_steps": 9,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "max_length": 64,
        "checkpoint_steps": 3,
    },
    "reward_model": {
        "epochs": 20,
        "max_steps": 40,
        "batch_size": 16,
        "learning_rate": 5e-3,
        "max_length": 64,
        "eval_fraction": 0.25,
        "eval_steps": 20,
        "center_rewards_coefficient": 0.01,
        "min_eval_accuracy": 0.75,
        "checkpoint_steps": 5,
    },
    "ppo": {
        "steps": 6,
        "batch_size": 4,
        "mini_batch_size": 4,
        "ppo_epochs": 2,
        "max_new_tokens": 8,
        "max_length": 64,
        "learning_rate": 1e-3,
        "checkpoint_steps": 1,
    },
}
# (stage, metric name) -> the last step: that series must be exactly 1..last in the order it was written.
SERIES = {
    "sft": {("sft", "loss"): SFT_STEPS},
    "rlhf": {
        ("sft", "loss"): RLHF_HYPERPARAMETERS["sft"]["max_steps"],
        ("reward_model", "loss"): RLHF_HYPERPARAMETERS["reward_model"]["max_steps"],
        ("ppo", "reward_mean"): RLHF_HYPERPARAMETERS["ppo"]["steps"],
    },
}
# The artifacts a succeeded job keeps (its checkpoints are dropped): (stage, kind) -> how many.
EXPECTED_ARTIFACTS = {
    "sft": {("sft", "adapter"): 1, ("sft", "model_card"): 1},
    "rlhf": {
        ("sft", "adapter"): 1,
        ("sft", "model_card"): 1,
        ("reward_model", "reward_model"): 1,
        ("reward_model", "model_card"): 1,
        ("ppo", "adapter"): 1,
        ("ppo", "model_card"): 1,
    },
}


@dataclass(frozen=True)
class Inputs:
    model: str
    sft: str
    preference: str
    prompts: str


def upload_inputs(client: httpx.Client, tiny_model_dir: Path, sft_jsonl: Path, tmp_path: Path) -> Inputs:
    from tests.helpers.tiny_model import tiny_preference_jsonl

    def created(response: httpx.Response) -> str:
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    preference = tiny_preference_jsonl(tmp_path / "preference.jsonl", n=84)
    return Inputs(
        model=created(upload_model(client, tiny_model_dir)),
        sft=created(upload_dataset(client, sft_jsonl, "sft")),
        preference=created(upload_dataset(client, preference, "preference")),
        prompts=created(upload_dataset(client, PROMPTS, "prompts")),
    )


def sft_job(
    inputs: Inputs, *, seed: int, max_steps: int = SFT_STEPS, checkpoint_steps: int = 3
) -> dict[str, Any]:
    return {
        "method": "sft",
        "base_model": inputs.model,
        "datasets": {"sft": inputs.sft},
        "lora": LORA,
        "hyperparameters": {
            "epochs": 100,
            "max_steps": max_steps,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "max_length": 48,
            "checkpoint_steps": checkpoint_steps,
        },
        "seed": seed,
    }


def rlhf_job(inputs: Inputs, *, seed: int) -> dict[str, Any]:
    return {
        "method": "rlhf",
        "base_model": inputs.model,
        "datasets": {"sft": inputs.sft, "preference": inputs.preference, "prompts": inputs.prompts},
        "lora": LORA,
        "hyperparameters": RLHF_HYPERPARAMETERS,
        # One seed for every rlhf job: the reward model's gate is known to pass with it.
        "seed": 0,
    }


def random_job(inputs: Inputs, rng: random.Random, *, rlhf_share: float) -> dict[str, Any]:
    if rng.random() < rlhf_share:
        return rlhf_job(inputs, seed=0)
    return sft_job(inputs, seed=rng.randrange(1 << 16))


def submit(client: httpx.Client, body: dict[str, Any], *, timeout: float = 120) -> str:
    """POST the job until it is accepted (202): a 503 while a dependency is down is retried after its
    Retry-After, as the SDK does. Anything else is a failure of the test."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            response = client.post("/v1/jobs", json=body)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 202:
            return str(response.json()["id"])
        if response is not None and response.status_code != 503:
            raise AssertionError(f"job refused: {response.status_code} {response.text}")
        assert time.monotonic() < deadline, "job not accepted in time"
        time.sleep(float(response.headers.get("retry-after", 1)) if response is not None else 1)
