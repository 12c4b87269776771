"""PPO's reward-hacking monitors on the tiny model: a reward that pays for length raises the length alert and
``stop_on: ["length"]`` ends the run early with the newest policy as the output; sound rewards raise none.

The length hack needs answers with room to grow: the tiny random model almost never samples EOS (its answers
run to max_new_tokens from the start), so the hack runs on a copy whose EOS logit is raised ("eager EOS":
answers of about 3 tokens at first). Measured (seed 0, one thread): the hack crosses the limit at update 12
of 20 (mean length 13.8 tokens against 3.4 +- 2.9 in the first two updates), in 4-9 s.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract.protocol import DatasetRef, ProgressWriter, ResumeRef, TrainingSpec, parse_line
from tests.training.test_ppo import EOS, FAST_HP, ends_early_reward, make_spec
from workers.training.context import RunContext
from workers.training.ppo_job import PPOJob, PPOResult, train_ppo

MAX_NEW = 16
HP: dict[str, Any] = {
    **FAST_HP,
    "steps": 20,
    "batch_size": 16,
    "mini_batch_size": 8,
    "ppo_epochs": 4,
    "learning_rate": 3e-3,
    "max_new_tokens": MAX_NEW,
    # A fast learner on a tiny model: the first two updates are the baseline (later ones already moved).
    "monitors": {"baseline_updates": 2, "stop_on": ["length"]},
}
Reward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# In-process training runs torch on one thread (conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eager_eos_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its EOS output row pointed along its mean final hidden state (norm 4)."""
    dest = tmp_path_factory.mktemp("eager-eos") / "model"
    shutil.copytree(tiny_model_dir, dest)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(
        ["What colour is the apple? The apple is red. The quick brown fox jumps"], return_tensors="pt"
    )
    with torch.no_grad():
        mean = model.model(**ids).last_hidden_state[0].mean(0)
    weights = {k: v.clone() for k, v in load_file(str(tiny_model_dir / "model.safetensors")).items()}
    weights["lm_head.weight"][EOS] = 4.0 * mean / mean.norm()
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _answers(prompt_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = attention_mask[:, prompt_ids.size(1) :].float()
    return mask, mask.sum(dim=1)


def pays_for_length(
    prompt_ids: torch.Tensor, response_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Deliberately hackable: the longer the answer, the higher the reward, whatever it says."""
    return _answers(prompt_ids, attention_mask)[1] / MAX_NEW


def about_five_tokens(
    prompt_ids: torch.Tensor, response_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Sound for a length target: an answer that ends, the closer to 5 tokens the better (bounded, no way up)."""
    mask, length = _answers(prompt_ids, attention_mask)
    ended = ((response_ids == EOS).float() * mask).sum(dim=1) > 0
    return ended.float() * (1.0 - (length - 5).abs() / MAX_NEW)


def _run(spec: TrainingSpec, reward: Reward) -> tuple[PPOResult, list[dict[str, Any]]]:
    stream = io.StringIO()
    result = train_ppo(RunContext(spec=spec, progress=ProgressWriter(stream)), reward_function=reward)
    return result, [m for m in map(parse_line, stream.getvalue().splitlines()) if m is not None]


def test_a_length_hack_raises_the_length_alert_and_stop_on_ends_the_run(
    eager_eos_model_dir: Path, tmp_path: Path
) -> None:
    spec = make_spec(tmp_path / "hack", eager_eos_model_dir, hp=HP)
    spec = spec.model_copy(update={"checkpoint_dir": str(tmp_path / "ckpt")})
    result, messages = _run(spec, pays_for_length)
    alerts = [m for m in messages if m["type"] == "monitor"]
    print([(a["name"], a["step"], round(a["value"], 2), round(a["threshold"], 2)) for a in alerts])
    length = [a for a in alerts if a["name"] == "length"]
    assert len(length) == 1 and length[0]["stop"] is True, alerts
    stopped_at = length[0]["step"]
    assert length[0]["value"] > length[0]["threshold"]
    assert "stopping after this update (stop_on: length)" in length[0]["message"]
    assert stopped_at < HP["steps"] and result.updates == stopped_at
    assert [m["step"] for m in messages if m["type"] == "metric"] == list(range(1, stopped_at + 1))
    # The run ends as a finished one: the newest policy and its card are announced, the summary says why.
    artifacts = {m["kind"]: m for m in messages if m["type"] == "artifact"}
    assert set(artifacts) == {"adapter", "model_card"}
    assert artifacts["adapter"]["metadata"]["stopped_by_monitor"] == {"name": "length", "step": stopped_at}
    assert artifacts["adapter"]["metadata"]["metrics"]["stopped_early"] == 1.0
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    summary = [m for m in messages if m["type"] == "event"][-1]["message"]
    assert f"stopped by monitor length at update {stopped_at} of {HP['steps']}" in summary

    # A resumed attempt from the final checkpoint does not train past the stop.
    final = [m for m in messages if m["type"] == "checkpoint"][-1]
    assert final["step"] == stopped_at
    resume = ResumeRef(path=final["path"], stage="ppo", step=stopped_at)
    again = spec.model_copy(update={"resume_from": resume, "output_dir": str(tmp_path / "out2")})
    resumed, resumed_messages = _run(again, pays_for_length)
    assert resumed.updates == stopped_at
    assert not [m for m in resumed_messages if m["type"] in ("metric", "monitor")]


@pytest.mark.parametrize(
    ("model", "reward"),
    [("tiny", ends_early_reward), ("eager_eos", about_five_tokens)],
    ids=["ends-early-reward", "five-token-reward"],
)
def test_sound_rewards_raise_no_alert(
    model: str, reward: Reward, tiny_model_dir: Path, eager_eos_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = tiny_model_dir if model == "tiny" else eager_eos_model_dir
    hp = HP
    if reward is ends_early_reward:
        # This reward's best answer is EOS at once: a policy that learns it is meant to become near
        # deterministic, so its entropy falling is no false alarm and that monitor is off here. (Seen: entropy
        # 4.2 -> 1.1 at update 18 as reward_mean reached 0.86, rollout.sample_from_probs' draws.)
        hp = {**HP, "monitors": {**HP["monitors"], "entropy_fraction": None}}
    result, messages = _run(make_spec(tmp_path, model_dir, hp=hp), reward)
    rewards = [h["reward_mean"] for h in result.history]
    print(f"reward {rewards[0]:.3f} -> {rewards[-1]:.3f}; max KL {max(h['kl'] for h in result.history):.2f}")
    assert result.updates == HP["steps"]
    assert [m for m in messages if m["type"] == "monitor"] == []
    # The policy moved (the monitors had something to watch) and still no alert. The five-token reward starts
    # near its ceiling (0.84 of 1), so whether its last updates beat its first depends on the CPU's rounding
    # (it did on one machine, not on another); the ends-early reward starts at 0.05 and must have learned.
    assert max(h["kl"] for h in result.history) > 1.0
    if reward is ends_early_reward:
        assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5
    events = [m["message"] for m in messages if m["type"] == "event"]
    assert any(e.startswith("monitors: length") and "stop on: length" in e for e in events), events
    # No held-out grader ran: the divergence monitor says it did nothing.
    assert any("reward_divergence did nothing" in e and "eval/*/mean" in e for e in events), events
    assert json.dumps(result.metrics)  # finite, serialisable final metrics


def test_a_stopped_run_keeps_the_policy_its_held_out_grader_scored_best(
    eager_eos_model_dir: Path, tmp_path: Path
) -> None:
    # The held-out grader wants short answers (at most 4 tokens); the length hack makes them longer.
    held_out = {"type": "length", "name": "short", "unit": "tokens", "max": 4}
    hp = {**HP, "eval": {"prompts": "ds_eval", "graders": [held_out], "every": 2, "max_new_tokens": MAX_NEW}}
    spec = make_spec(tmp_path / "keep", eager_eos_model_dir, hp=hp)
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("".join(json.dumps({"prompt": f"colour {i}?"}) + "\n" for i in range(6)), "utf-8")
    ref = DatasetRef(
        id="ds_eval", name="eval", kind="prompts", sha256="0" * 64, num_records=6, path=str(eval_path)
    )
    spec = spec.model_copy(update={"datasets": {**spec.datasets, "eval_prompts": ref}})
    policy_at: dict[int, dict[str, torch.Tensor]] = {}

    def remember(update: int, _result: Any) -> None:
        # Called after the update's optimizer steps, before its evaluation: the weights the evaluation sees.
        policy_at[update] = {k: v.detach().clone() for k, v in job_policy().items()}

    stream = io.StringIO()
    ctx = RunContext(spec=spec, progress=ProgressWriter(stream))
    job = PPOJob(ctx, reward_function=pays_for_length, on_update=remember)

    def job_policy() -> dict[str, torch.Tensor]:
        return {
            name: param
            for name, param in job.session.models.peft.named_parameters()
            if "lora_" in name and name.split(".")[-2] == "default"
        }

    finished = job.run()
    messages = [m for m in map(parse_line, stream.getvalue().splitlines()) if m is not None]
    scores = {
        m["step"]: m["values"]["eval/short/mean"]
        for m in messages
        if "eval/short/mean" in m.get("values", {})
    }
    stopped_at = finished.steps
    print(scores, "stopped at", stopped_at)
    assert stopped_at < HP["steps"], "the length hack must be stopped for this test to mean anything"
    best = max(scores, key=lambda s: (scores[s], -s))  # the first update with the highest score
    kept = finished.outputs.metadata["kept_policy"]
    assert kept == {
        "policy": "best_held_out",
        "step": best,
        "series": "eval/short/mean",
        "value": scores[best],
    }
    # The first evaluation (eager EOS: one-token greedy answers) scores the most a length grader can; ties keep
    # the earlier policy, the one nearer the reference.
    assert best != stopped_at and scores[best] >= scores[stopped_at]
    saved = load_file(str(finished.outputs.model_dir / "adapter_model.safetensors"))
    # peft saves the default adapter's tensors without the adapter name in their keys.
    at_best = {name.replace(".default.", "."): t for name, t in policy_at[best].items()}
    assert sorted(saved) == sorted(at_best)
    assert all(torch.equal(saved[name], at_best[name]) for name in saved)
    newest = policy_at[stopped_at]
    assert not all(torch.equal(policy_at[best][name], newest[name]) for name in newest)
    assert any("not the newest" in m["message"] for m in messages if m["type"] == "event")
