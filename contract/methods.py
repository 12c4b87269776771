"""Training methods and what each one consumes: the names the API, the runner and the child all use."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class Method(StrEnum):
    sft = "sft"
    reward_model = "reward_model"
    dpo = "dpo"
    ppo = "ppo"
    grpo = "grpo"
    rloo = "rloo"
    rlhf = "rlhf"
    generate = "generate"
    evaluate = "evaluate"
    # One chat completion (POST /openai/v1/chat/completions): no dataset, no training, a short job.
    chat = "chat"
    # A feedback set's jobs (service/db/feedback_jobs.py), made only by the set: score its items with a reward
    # model, or have a judge model label them.
    score = "score"
    judge = "judge"


# Methods whose training code exists; the others are accepted by the schema and refused with 422.
AVAILABLE_METHODS: frozenset[Method] = frozenset(
    {
        Method.sft,
        Method.reward_model,
        Method.dpo,
        Method.ppo,
        Method.grpo,
        Method.rloo,
        Method.rlhf,
        Method.generate,
        Method.evaluate,
        Method.chat,
        Method.score,
        Method.judge,
    }
)
# Methods a client cannot submit to POST /v1/jobs: another resource makes them and reads their output.
INTERNAL_METHODS: frozenset[Method] = frozenset({Method.chat, Method.score, Method.judge})

# Which dataset kinds each method needs (role name == dataset kind).
REQUIRED_DATASETS: dict[Method, tuple[str, ...]] = {
    Method.sft: ("sft",),
    Method.reward_model: ("preference",),
    Method.dpo: ("preference",),
    Method.ppo: ("prompts",),
    Method.grpo: ("prompts",),
    Method.rloo: ("prompts",),
    Method.rlhf: ("sft", "preference", "prompts"),
    Method.generate: ("prompts",),
    Method.evaluate: ("prompts",),
    Method.chat: (),
    Method.score: ("candidates",),
    Method.judge: ("candidates",),
}

# Datasets a method may take besides the required ones (role -> the kind it must be).
OPTIONAL_DATASETS: dict[Method, dict[str, str]] = {
    Method.sft: {"validation": "sft"},
    Method.dpo: {"validation": "preference"},
}

# The online methods rlhf may run as its last stage (``rl_method`` in its hyperparameters).
RL_METHODS: tuple[Method, ...] = (Method.ppo, Method.grpo, Method.rloo)
# A new rlhf job's last stage when it names none: grpo. On SmolLM2 against a reward model that prefers concise,
# ended answers (bench/alignment_quality.py), alignd's PPO ended 3% of held-out answers and lost judged reward;
# GRPO (groups of answers, some of which end, so the missing-EOS penalty has contrast) ended 81-100% of them,
# at under half TRL PPO's KL, with a judged gain at least TRL's in 2 of 3 seeds (docs/performance.md).
DEFAULT_RL_METHOD = Method.grpo
# Stored rlhf hyperparameters name their rl_method (resolution writes it); a row without one predates the
# choice and ran ppo, which is what it still means when read back (a resumed attempt, the worker's inputs).
STORED_RL_METHOD_WHEN_UNNAMED = Method.ppo


def stored_rl_method(hyperparameters: Mapping[str, Any] | None) -> str:
    """The last stage of a stored (resolved) rlhf job: its ``rl_method``, ppo for rows older than the key."""
    return str((hyperparameters or {}).get("rl_method", STORED_RL_METHOD_WHEN_UNNAMED.value))


def rlhf_stages(rl_method: str) -> tuple[str, ...]:
    """The stages of an rlhf job whose last stage is ``rl_method``: sft, reward_model, then that method."""
    return (Method.sft.value, Method.reward_model.value, Method(rl_method).value)
