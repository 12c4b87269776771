"""The best policy by a held-out grader, kept while PPO runs, so that a run a monitor stops can publish it.

A ``stop_on`` monitor firing means the newest policy was drifting (longer answers, a KL blow-up, the proxy
reward rising while the held-out grader falls); the policy worth keeping is then the one the held-out grader
scored best, not the last one. :class:`BestHeldOutPolicy` copies the policy adapter's LoRA weights at every
held-out evaluation that beats the best score so far (a LoRA adapter is small: 0.5% of the base or less).

Its copies ride in every checkpoint: they are parameters with ``requires_grad`` set, which is what the
checkpointer saves (:func:`checkpoint.trainable_state`), but they are in no optimizer and no graph; the step,
series and score go in the checkpoint's extra JSON (:meth:`state`). So a resumed run keeps the same best.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch


def _key(name: str) -> str:
    # ParameterDict keys may not contain dots; LoRA parameter names are dotted paths.
    return name.replace(".", "__")


class BestHeldOutPolicy(torch.nn.Module):
    def __init__(self, policy: list[tuple[str, torch.nn.Parameter]], pattern: str) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the live policy must not be saved twice.
        self._policy = list(policy)
        self.pattern = pattern
        self.weights = torch.nn.ParameterDict(
            {
                _key(name): torch.nn.Parameter(param.detach().clone(), requires_grad=True)
                for name, param in policy
            }
        )
        self.step: int | None = None
        self.series: str | None = None
        self.value: float | None = None

    def series_in(self, values: Mapping[str, float]) -> str | None:
        """The held-out series this run keeps the best of: the first name matching ``pattern``, once chosen."""
        if self.series is not None:
            return self.series if self.series in values else None
        matching = sorted(name for name in values if fnmatch.fnmatchcase(name, self.pattern))
        return matching[0] if matching else None

    @torch.no_grad()
    def offer(self, step: int, values: Mapping[str, float]) -> bool:
        """After a held-out evaluation at update ``step``: keep the policy when its score is the best so far."""
        series = self.series_in(values)
        if series is None:
            return False
        value = float(values[series])
        if self.value is not None and not value > self.value:
            return False
        for name, param in self._policy:
            self.weights[_key(name)].copy_(param)
        self.step, self.series, self.value = step, series, value
        return True

    @torch.no_grad()
    def restore(self) -> None:
        """Put the kept weights back into the live policy adapter."""
        assert self.step is not None, "nothing was kept"
        for name, param in self._policy:
            param.copy_(self.weights[_key(name)])

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "series": self.series, "value": self.value}

    def load(self, state: Mapping[str, Any]) -> None:
        self.step, self.series, self.value = state.get("step"), state.get("series"), state.get("value")
