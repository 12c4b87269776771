"""Method name -> trainer. Trainers are named as ``module:function`` and imported only when chosen.

Adding a method (reward_model, dpo, ppo, rlhf) is one line here plus its module; ``__main__`` does not change.
A trainer takes a :class:`~workers.training.context.RunContext`, emits its own metrics and artifacts, and
returns normally on success (exit 0) or raises ``TrainingError`` / ``Cancelled``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from workers.training.context import RunContext
from workers.training.errors import METHOD_NOT_AVAILABLE, TrainingError

Trainer = Callable[[RunContext], object]

METHODS: dict[str, str] = {
    "sft": "workers.training.sft:train_sft",
    "ppo": "workers.training.ppo_job:train_ppo",
    "grpo": "workers.training.grpo_job:train_grpo",
    "rloo": "workers.training.grpo_job:train_rloo",
    "reward_model": "workers.training.reward:train_reward_model",
    "dpo": "workers.training.dpo:train_dpo",
    "generate": "workers.training.generate:run",
    "rlhf": "workers.training.pipeline:run",
    "evaluate": "workers.training.evaluate:run",
    "chat": "workers.training.chat:run",
    "score": "workers.training.feedback_jobs:run_score",
    "judge": "workers.training.feedback_jobs:run_judge",
}


def get_trainer(method: str) -> Trainer:
    target = METHODS.get(method)
    if target is None:
        raise TrainingError(
            METHOD_NOT_AVAILABLE,
            f"method {method!r} is not available in this worker (available: {', '.join(sorted(METHODS))})",
        )
    module_name, _, function = target.partition(":")
    return cast(Trainer, getattr(importlib.import_module(module_name), function))
