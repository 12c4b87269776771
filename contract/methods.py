"""Training methods and what each one consumes: the names the API, the runner and the child all use."""

from __future__ import annotations

from enum import StrEnum


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

RLHF_STAGES: tuple[Method, ...] = (Method.sft, Method.reward_model, Method.ppo)
# The online methods rlhf may run as its last stage (``rl_method`` in its hyperparameters; ppo by default).
RL_METHODS: tuple[Method, ...] = (Method.ppo, Method.grpo, Method.rloo)


def rlhf_stages(rl_method: str = Method.ppo.value) -> tuple[str, ...]:
    """The stages of an rlhf job whose last stage is ``rl_method``: sft, reward_model, then that method."""
    return (Method.sft.value, Method.reward_model.value, Method(rl_method).value)
