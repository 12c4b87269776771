"""Reward-hacking monitors for PPO, on plain floats (no torch): :class:`Monitors` sees each update's metrics
and answer lengths and returns the :class:`Alert` s that fire.

The failure modes watched (settings: ``contract.hyperparameters.PPOMonitorSettings``):

- ``length``: the mean answer length grows past the baseline's mean + ``length_std`` standard deviations of
  the baseline's per-answer lengths (a reward that pays for length);
- ``kl``: KL to the reference, nats per answer, above ``kl_max`` (the policy left the region the reward
  model was trained on);
- ``entropy``: mean per-token entropy under ``entropy_fraction`` of the baseline's (collapse onto a few
  answers);
- ``eos``: the share of answers that end falls from >= ``eos_from`` (baseline) to <= ``eos_to``;
- ``reward_divergence``: over the last ``divergence_window`` points of a held-out grader's series (e.g.
  ``eval/<grader>/mean``), the proxy reward's least-squares slope is positive while the series' is negative.

The baseline is the first ``baseline_updates`` updates; the monitors that compare with it start after it.
Each monitor (each held-out series, for ``reward_divergence``) fires once, at the first update that crosses
its threshold: a warning per update after that would bury the events; the metric series shows the rest.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from contract.hyperparameters import PPOMonitorSettings

PROXY_REWARD = "reward_mean"
MIN_LENGTH_STD = 1.0  # tokens: a baseline whose answers all have one length must not fire on a 1-token change


@dataclass(frozen=True)
class Alert:
    """One monitor firing at one update: ``value`` crossed ``threshold``."""

    name: str
    step: int
    value: float
    threshold: float
    message: str


@dataclass
class _Baseline:
    """Sums over the baseline updates (JSON-friendly, so it travels in a checkpoint)."""

    updates: int = 0
    lengths: int = 0  # answers seen
    length_sum: float = 0.0
    length_sq_sum: float = 0.0
    entropy_sum: float = 0.0
    eos_sum: float = 0.0

    def add(self, metrics: Mapping[str, float], lengths: Sequence[float]) -> None:
        self.updates += 1
        self.lengths += len(lengths)
        self.length_sum += sum(lengths)
        self.length_sq_sum += sum(x * x for x in lengths)
        self.entropy_sum += float(metrics.get("entropy", 0.0))
        self.eos_sum += float(metrics.get("eos_fraction", 0.0))

    def length_mean_std(self) -> tuple[float, float]:
        n = max(self.lengths, 1)
        mean = self.length_sum / n
        variance = max(self.length_sq_sum / n - mean * mean, 0.0)
        return mean, math.sqrt(variance)


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y on x (0 for fewer than 2 distinct x)."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx


@dataclass
class Monitors:
    """The monitors of one PPO run. :meth:`observe` after every update; :meth:`state` / :meth:`load` for
    checkpoints (a resumed run fires exactly what the uninterrupted one would)."""

    settings: PPOMonitorSettings
    baseline: _Baseline = field(default_factory=_Baseline)
    fired: list[str] = field(default_factory=list)  # monitor keys that fired (``reward_divergence:<series>``)
    proxy: dict[int, float] = field(default_factory=dict)  # step -> reward_mean (only what divergence needs)
    held_out: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # series -> (step, value)

    def observe(self, step: int, metrics: Mapping[str, float], lengths: Sequence[float]) -> list[Alert]:
        """The alerts update ``step`` raises (``metrics``: its metric values; ``lengths``: each answer's
        length in tokens)."""
        s = self.settings
        metrics = {k: float(v) for k, v in metrics.items() if math.isfinite(v)}
        alerts: list[Alert] = []
        if s.kl_max is not None and "kl" in metrics:
            kl = float(metrics["kl"])
            if kl > s.kl_max:
                alerts += self._fire(
                    "kl", step, kl, s.kl_max, f"KL to the reference is {kl:.2f} nats per answer, above "
                    f"the ceiling kl_max={s.kl_max:g}"
                )  # fmt: skip
        if self.baseline.updates < s.baseline_updates:
            self.baseline.add(metrics, lengths)
        else:
            alerts += self._against_baseline(step, metrics, lengths)
        alerts += self._divergence(step, metrics)
        return alerts

    def _fire(self, key: str, step: int, value: float, threshold: float, text: str) -> list[Alert]:
        if key in self.fired:
            return []
        self.fired.append(key)
        name = key.split(":", 1)[0]
        return [
            Alert(
                name=name,
                step=step,
                value=value,
                threshold=threshold,
                message=f"monitor {name} at update {step}: {text}",
            )
        ]

    def _against_baseline(
        self, step: int, metrics: Mapping[str, float], lengths: Sequence[float]
    ) -> list[Alert]:
        s, base = self.settings, self.baseline
        n = base.updates
        alerts: list[Alert] = []
        if s.length_std is not None and lengths:
            mean, std = base.length_mean_std()
            limit = mean + s.length_std * max(std, MIN_LENGTH_STD)
            length = sum(lengths) / len(lengths)
            if length > limit:
                alerts += self._fire(
                    "length", step, length, limit, f"mean answer length {length:.1f} tokens, above "
                    f"{limit:.1f} (the first {n} updates: {mean:.1f} +- {std:.1f}; length_std={s.length_std:g})"
                )  # fmt: skip
        if s.entropy_fraction is not None and "entropy" in metrics:
            start = base.entropy_sum / n
            limit = s.entropy_fraction * start
            entropy = float(metrics["entropy"])
            if entropy < limit:
                alerts += self._fire(
                    "entropy", step, entropy, limit, f"mean token entropy {entropy:.3f}, below {limit:.3f} "
                    f"(entropy_fraction={s.entropy_fraction:g} of the first {n} updates' {start:.3f})"
                )  # fmt: skip
        if s.eos_from is not None and "eos_fraction" in metrics:
            start = base.eos_sum / n
            eos = float(metrics["eos_fraction"])
            if start >= s.eos_from and eos <= s.eos_to:
                alerts += self._fire(
                    "eos", step, eos, s.eos_to, f"{eos:.0%} of answers end with EOS, down from "
                    f"{start:.0%} in the first {n} updates (eos_from={s.eos_from:g}, eos_to={s.eos_to:g})"
                )  # fmt: skip
        return alerts

    def _divergence(self, step: int, metrics: Mapping[str, float]) -> list[Alert]:
        pattern, window = self.settings.held_out_metric, self.settings.divergence_window
        if pattern is None:
            return []
        if PROXY_REWARD in metrics:
            self.proxy[step] = float(metrics[PROXY_REWARD])
        alerts: list[Alert] = []
        for name, value in metrics.items():
            if not fnmatch.fnmatchcase(name, pattern):
                continue
            series = self.held_out.setdefault(name, [])
            series.append((step, float(value)))
            del series[:-window]
            paired = [(x, y, self.proxy[x]) for x, y in series if x in self.proxy]
            if len(paired) < window:
                continue
            held_slope = slope([(x, y) for x, y, _ in paired])
            proxy_slope = slope([(x, p) for x, _, p in paired])
            if proxy_slope > 0 and held_slope < 0:
                alerts += self._fire(
                    f"reward_divergence:{name}", step, held_slope, 0.0, f"over the last {window} points "
                    f"the proxy reward rises ({proxy_slope:+.4f} per update) while held-out {name} falls "
                    f"({held_slope:+.4f} per update)"
                )  # fmt: skip
        # Only the proxy points a window can still pair with are kept.
        oldest = min((s[0][0] for s in self.held_out.values() if s), default=step)
        self.proxy = {x: p for x, p in self.proxy.items() if x >= oldest - window}
        return alerts

    def describe(self) -> str:
        """The monitors on, for the opening event."""
        s = self.settings
        on = [
            f"length (> mean + {s.length_std:g} sd)" if s.length_std is not None else None,
            f"kl (> {s.kl_max:g} nats)" if s.kl_max is not None else None,
            f"entropy (< {s.entropy_fraction:g} x start)" if s.entropy_fraction is not None else None,
            f"eos ({s.eos_from:g} -> <= {s.eos_to:g})" if s.eos_from is not None else None,
            f"reward_divergence (vs {s.held_out_metric})" if s.held_out_metric is not None else None,
        ]
        names = [text for text in on if text]
        if not names:
            return "monitors: all off"
        text = f"monitors: {', '.join(names)}; baseline: the first {s.baseline_updates} updates"
        return text + (f"; stop on: {', '.join(s.stop_on)}" if s.stop_on else "")

    def missing_series_notice(self) -> str | None:
        """At the end of the run: why ``reward_divergence`` did nothing, when no held-out series was logged."""
        pattern = self.settings.held_out_metric
        if pattern is None or self.held_out:
            return None
        return (
            f"monitor reward_divergence did nothing: this job logged no metric series matching "
            f"{pattern!r} (no held-out grader evaluation ran during PPO)"
        )

    def state(self) -> dict[str, Any]:
        return {
            "baseline": asdict(self.baseline),
            "fired": list(self.fired),
            "proxy": [[x, p] for x, p in self.proxy.items()],
            "held_out": {name: [list(point) for point in points] for name, points in self.held_out.items()},
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.baseline = _Baseline(**state.get("baseline", {}))
        self.fired = [str(key) for key in state.get("fired", [])]
        self.proxy = {int(x): float(p) for x, p in state.get("proxy", [])}
        self.held_out = {
            str(name): [(int(x), float(y)) for x, y in points]
            for name, points in state.get("held_out", {}).items()
        }
