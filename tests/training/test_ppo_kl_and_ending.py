"""KL control and learning to end, on the tiny model (issue 16's acceptance tests; fixed seeds, one thread).

- The adaptive KL controller holds the KL per answer near its target where a fixed coefficient drifts past it,
  against the same reward (one that pays for ending early, which pulls the policy far from the base).
- Stop sequences make ending reachable: on a base that never ends its answers (its EOS logit pushed down), a
  reward for ending cannot teach anything without them (no answer ends, so no contrast), and with a stop string
  that its answers rarely reach, the ended rate rises from about 0 to nearly all answers within a bounded number
  of updates.

Measured with these seeds on one thread (about 0.3-0.6 s per update); each assertion's margin is noted where
it is made. Slow (a few hundred PPO updates in all): ``make test-slow``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training.test_ppo import EOS, FAST_HP, PAD, PROMPTS, ctx_for, ends_early_reward, make_spec
from workers.training import ppo_job

# Slow (make test-slow); in-process training on one torch thread (conftest.py says why).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _updates(spec_dir: Path, model_dir: Path, hp: dict[str, Any], n: int) -> list[dict[str, float]]:
    session = ppo_job.setup_ppo(
        ctx_for(make_spec(spec_dir, model_dir, hp=hp)), reward_function=ends_early_reward
    )
    return [session.trainer.step(session.next_prompts()).metrics for _ in range(n)]


# --- adaptive KL control

KL_TARGET = 2.0
# kl_coef 0.01 fixed: the reward for ending early drives the KL per answer up and up (seed 0: ~1 nat at update
# 5, 3.5 over updates 31-50, 4-5 at 45-50). A lower target, 1.0, was not reached in this setting: the
# controller raised the coefficient from 0.01 to 15 in 50 updates while the KL stayed near 2 nats (PPO's clip
# bounds how fast the policy can walk back, and a policy that ends its answers early needs ~2 nats on its EOS
# alone). The controller holds a target the policy can keep; it cannot force one it cannot.
KL_HP = {**FAST_HP, "kl_coef": 0.01, "steps": 60}


def test_the_adaptive_controller_holds_kl_near_its_target_where_a_fixed_coefficient_drifts_past_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    n = 50
    fixed = _updates(tmp_path / "fixed", tiny_model_dir, KL_HP, n)
    # horizon 32 episodes = one rollout: the coefficient may move up to 20% per update.
    adaptive_hp = {**KL_HP, "kl_control": "adaptive", "kl_target": KL_TARGET, "kl_horizon": 32}
    adaptive = _updates(tmp_path / "adaptive", tiny_model_dir, adaptive_hp, n)
    late_fixed = [h["kl"] for h in fixed[-20:]]
    late_adaptive = [h["kl"] for h in adaptive[-20:]]
    mean_fixed = sum(late_fixed) / len(late_fixed)
    mean_adaptive = sum(late_adaptive) / len(late_adaptive)
    print(
        f"KL over the last 20 updates: fixed {mean_fixed:.2f} (coef {fixed[-1]['kl_coef']:.3f}), adaptive "
        f"{mean_adaptive:.2f} (coef {adaptive[0]['kl_coef']:.3f} -> {adaptive[-1]['kl_coef']:.3f})\n"
        f"fixed: {[round(h['kl'], 2) for h in fixed]}\nadaptive: {[round(h['kl'], 2) for h in adaptive]}\n"
        f"adaptive coef: {[round(h['kl_coef'], 3) for h in adaptive]}"
    )
    assert mean_fixed > 1.5 * KL_TARGET, late_fixed  # the fixed coefficient drifts past the target
    # Measured (seed 0): fixed 3.49, adaptive 2.36 (it overshoots to 3-4 around updates 10-25 while the
    # coefficient climbs from 0.002, then comes back; coefficient 0.53 at the end).
    assert 0.6 * KL_TARGET <= mean_adaptive <= 1.4 * KL_TARGET, late_adaptive
    assert adaptive[-1]["kl_coef"] > adaptive[0]["kl_coef"]  # it held the KL by raising the coefficient
    assert all(h["kl_target"] == KL_TARGET for h in adaptive)  # the target goes out beside the kl series
    assert all("kl_target" not in h for h in fixed)


# --- learning to end


def eos_shy_copy(model_dir: Path, dest: Path) -> Path:
    """The tiny base with its EOS logit pushed down: its EOS row minus twice the direction of its mean final
    hidden state over sampled answers, so the base (almost) never ends an answer within 12 tokens."""
    shutil.copytree(model_dir, dest)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    prompts = tokenizer([f"What colour is the {t}?" for t in PROMPTS] * 4, return_tensors="pt", padding=True)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        out = model.generate(
            **prompts, do_sample=True, top_k=0, max_new_tokens=12, pad_token_id=PAD, eos_token_id=EOS
        )
        hidden = model.model(input_ids=out).last_hidden_state[:, prompts["input_ids"].size(1) - 1 :]
    direction = hidden.reshape(-1, hidden.size(-1)).mean(dim=0)
    weights = load_file(str(dest / "model.safetensors"))
    weights["lm_head.weight"][EOS] = -2.0 * direction / direction.norm()
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


# "orange" ends about 4% of the tiny base's sampled answers (a colour word its answers sometimes reach).
STOP = ["orange"]


def test_stop_sequences_let_a_reward_for_ending_raise_the_eos_rate_from_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    shy = eos_shy_copy(tiny_model_dir, tmp_path / "eos-shy")
    hp = {**FAST_HP, "missing_eos_penalty": None, "steps": 40}
    without = _updates(tmp_path / "without", shy, hp, 20)
    with_stop = _updates(tmp_path / "with", shy, {**hp, "stop": STOP}, 40)
    ended_without = [round(h["eos_fraction"], 3) for h in without]
    ended_with = [round(h["eos_fraction"], 3) for h in with_stop]
    print(f"ended without stop: {ended_without}\nended with stop {STOP}: {ended_with}")
    # Without a stop sequence no answer ends (at most one in a rollout of 32), so every reward is 0 and
    # nothing is learned: the rate stays there.
    assert max(ended_without) <= 1 / 32 and sum(ended_without[-5:]) / 5 <= 1 / 32, ended_without
    # With one, few answers end at first; the reward for those teaches the policy to reach the stop string.
    # Measured (seed 0): 0.125 at update 1, 0.84 at update 6, 1.0 from update 9 on.
    assert ended_with[0] <= 0.15, ended_with
    assert sum(ended_with[-5:]) / 5 >= 0.9, ended_with
