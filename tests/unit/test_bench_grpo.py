"""bench/grpo_vs_trl.py is only a fair comparison if both sides are rewarded alike and evaluated on prompts
neither trained on: TRL's reward function (``grpo_child.trl_reward``) gives every answer the reward alignd's
GRPO job gives it, and the held-out prompts share no prompt with the training ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import grpo_child, grpo_vs_trl
from contract.graders import parse_grader
from contract.hyperparameters import GRPOHyperparameters

ANSWERS = [
    ("Water is wet!", True, 5),
    ("WATER boils at 100 degrees.", False, 32),
    ("Nothing to see here!  ", True, 6),
    ("", False, 32),
    ("the waterfall", True, 4),
]


def test_trl_reward_is_alignds_grpo_reward() -> None:
    from workers.training.grpo import PromptRow, RewardScorer

    hp = GRPOHyperparameters.model_validate({"graders": [grpo_vs_trl.GRADER]})
    scorer = RewardScorer(hp, scorer=None, reward_model=None)
    rows = [PromptRow(messages=[{"role": "user", "content": "q"}], record={}) for _ in ANSWERS]
    alignd = scorer(rows, [a for a, _, _ in ANSWERS], [n for _, _, n in ANSWERS], [e for _, e, _ in ANSWERS])
    # what TRL hands its reward functions: conversational completions, ids ending with the EOS when they ended
    eos = 2
    reward = grpo_child.trl_reward(parse_grader(grpo_vs_trl.GRADER), eos)
    trl = reward(
        prompts=[[{"role": "user", "content": "q"}]] * len(ANSWERS),
        completions=[[{"role": "assistant", "content": a}] for a, _, _ in ANSWERS],
        completion_ids=[[7] * (n - 1) + [eos] if e else [7] * n for _, e, n in ANSWERS],
        trainer_state=None,
    )
    assert alignd.errors == 0
    assert alignd.total.tolist() == pytest.approx(trl)
    assert trl == [1.0, 0.5, 0.5, 0.0, 1.0]  # both parts of the rule are exercised


def test_heldout_prompts_are_not_training_prompts(tmp_path: Path) -> None:
    train = grpo_vs_trl.write_prompts(tmp_path / "train.jsonl", grpo_vs_trl._TRAIN_TOPICS)
    held = grpo_vs_trl.write_prompts(tmp_path / "held.jsonl", grpo_vs_trl._HELDOUT_TOPICS)
    train_prompts = {json.dumps(m) for m in grpo_child.read_messages(str(train))}
    held_prompts = {json.dumps(m) for m in grpo_child.read_messages(str(held))}
    assert len(train_prompts) == 96 and len(held_prompts) == 32
    assert not train_prompts & held_prompts
    assert not set(grpo_vs_trl._TRAIN_TOPICS) & set(grpo_vs_trl._HELDOUT_TOPICS)


def test_wall_budget_stops_after_the_step_that_passes_it() -> None:
    budget = grpo_child.WallBudget(seconds=10.0, max_steps=100)
    assert not budget.spent
    budget.marks = [0.0, 4.0]
    assert not budget.spent
    budget.marks = [0.0, 4.0, 10.5]
    assert budget.spent
    capped = grpo_child.WallBudget(seconds=1e9, max_steps=2)
    capped.marks = [0.0, 1.0, 2.0]
    assert capped.spent
