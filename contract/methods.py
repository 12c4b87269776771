"""Training methods and what each one consumes: the names the API, the runner and the child all use."""

from __future__ import annotations

from enum import StrEnum


class Method(StrEnum):
    sft = "sft"
    reward_model = "reward_model"
    dpo = "dpo"
    ppo = "ppo"
    rlhf = "rlhf"
    generate = "generate"
    evaluate = "evaluate"


# Methods whose training code exists; the others are accepted by the schema and refused with 422.
AVAILABLE_METHODS: frozenset[Method] = frozenset(
    {Method.sft, Method.reward_model, Method.dpo, Method.ppo, Method.rlhf, Method.generate, Method.evaluate}
)

# Which dataset kinds each method needs (role name == dataset kind).
REQUIRED_DATASETS: dict[Method, tuple[str, ...]] = {
    Method.sft: ("sft",),
    Method.reward_model: ("preference",),
    Method.dpo: ("preference",),
    Method.ppo: ("prompts",),
    Method.rlhf: ("sft", "preference", "prompts"),
    Method.generate: ("prompts",),
    Method.evaluate: ("prompts",),
}

RLHF_STAGES: tuple[Method, ...] = (Method.sft, Method.reward_model, Method.ppo)
