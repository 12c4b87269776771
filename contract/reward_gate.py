"""The reward-model quality gate: is a reward model's held-out accuracy good enough, on enough pairs, to
drive PPO?

One rule, used in two places: the rlhf pipeline checks its freshly trained reward model before PPO
(``workers/training/pipeline.py``), and the API checks the ``reward_model`` artifact a ``ppo`` job names at
submission (``service/core/submission.py``). The figures come from the artifact's metadata, which the reward
model trainer writes (``workers/training/reward.py``): ``eval_accuracy``, ``eval_pairs`` and the floor it was
trained under, ``quality_gate`` (its job's ``min_eval_accuracy`` and ``min_eval_pairs``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contract.hyperparameters import RewardModelHyperparameters

REWARD_MODEL_TOO_WEAK = "reward_model_too_weak"

_DEFAULTS = RewardModelHyperparameters.model_fields


@dataclass(frozen=True)
class GateFloor:
    """The bar: held-out accuracy at least ``accuracy``, measured on at least ``pairs`` pairs."""

    accuracy: float = float(_DEFAULTS["min_eval_accuracy"].default)
    pairs: int = int(_DEFAULTS["min_eval_pairs"].default)

    @property
    def off(self) -> bool:
        return self.accuracy <= 0


@dataclass(frozen=True)
class Quality:
    """What was measured: held-out accuracy (None: nothing was held out) on ``pairs`` pairs."""

    accuracy: float | None
    pairs: int


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def quality_of(metadata: Mapping[str, Any]) -> Quality:
    """A reward model artifact's held-out figures. Artifacts stored before ``eval_pairs`` was written at the
    top level carry it in their final metrics; none at all counts as 0 pairs (the gate cannot trust it)."""
    metrics = metadata.get("metrics")
    metrics = metrics if isinstance(metrics, Mapping) else {}
    accuracy = _number(metadata.get("eval_accuracy"))
    if accuracy is None:
        accuracy = _number(metrics.get("eval_accuracy"))
    pairs = _number(metadata.get("eval_pairs"))
    if pairs is None:
        pairs = _number(metrics.get("eval_pairs"))
    return Quality(accuracy=accuracy, pairs=int(pairs or 0))


def floor_of(metadata: Mapping[str, Any]) -> GateFloor:
    """The floor the reward model was trained under (its job's settings), else the defaults."""
    recorded = metadata.get("quality_gate")
    if not isinstance(recorded, Mapping):
        return GateFloor()
    accuracy = _number(recorded.get("min_eval_accuracy"))
    pairs = _number(recorded.get("min_eval_pairs"))
    default = GateFloor()
    return GateFloor(
        accuracy=default.accuracy if accuracy is None else accuracy,
        pairs=default.pairs if pairs is None else int(pairs),
    )


def describe(quality: Quality, floor: GateFloor) -> str:
    """``held-out accuracy 0.33 on 3 pairs; floor 0.60 on >= 20 pairs``"""
    measured = (
        f"held-out accuracy {quality.accuracy:.2f} on {quality.pairs} pairs"
        if quality.accuracy is not None
        else "no held-out accuracy recorded (eval_fraction 0 holds out no pairs)"
    )
    return f"{measured}; floor {floor.accuracy:.2f} on >= {floor.pairs} pairs"


def failure(quality: Quality, floor: GateFloor) -> str | None:
    """Why ``quality`` fails ``floor`` (the figures, see :func:`describe`), or None when it passes."""
    if floor.off:
        return None
    weak = quality.accuracy is None or quality.accuracy < floor.accuracy or quality.pairs < floor.pairs
    return describe(quality, floor) if weak else None
