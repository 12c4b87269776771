"""The PPO reward-hacking monitors on synthetic metric series (workers/training/monitors.py, torch-free)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from contract.hyperparameters import PPOHyperparameters, PPOMonitorSettings
from workers.training.monitors import Alert, Monitors, slope

STEADY = {"reward_mean": 0.5, "kl": 1.0, "entropy": 2.0, "eos_fraction": 0.8}


def run(
    settings: PPOMonitorSettings,
    updates: list[tuple[dict[str, float], list[float]]],
) -> list[Alert]:
    monitors = Monitors(settings)
    alerts: list[Alert] = []
    for step, (metrics, lengths) in enumerate(updates, start=1):
        alerts += monitors.observe(step, metrics, lengths)
    return alerts


def steady(n: int, lengths: list[float] | None = None) -> list[tuple[dict[str, float], list[float]]]:
    return [(dict(STEADY), list(lengths or [4.0, 6.0, 5.0, 5.0])) for _ in range(n)]


def test_steady_metrics_raise_nothing() -> None:
    assert run(PPOMonitorSettings(), steady(40)) == []


def test_length_fires_once_when_answers_grow_past_k_sd() -> None:
    # Baseline lengths 4, 6, 5, 5: mean 5, sd 0.71 -> floor of 1 token -> limit 5 + 3 * 1 = 8.
    growing = [(dict(STEADY), [float(n)] * 4) for n in (6, 7, 8, 9, 10, 11)]
    alerts = run(PPOMonitorSettings(), steady(5) + growing)
    assert [(a.name, a.step) for a in alerts] == [("length", 9)]  # 9 tokens > 8.0, at update 5 + 4
    assert alerts[0].value == 9.0 and alerts[0].threshold == pytest.approx(8.0)
    assert "update 9" in alerts[0].message and "length_std=3" in alerts[0].message


def test_length_uses_the_per_answer_spread_and_ignores_shorter_answers() -> None:
    wide = [2.0, 10.0, 4.0, 8.0]  # mean 6, sd 3.16 -> limit 15.5
    alerts = run(PPOMonitorSettings(), [*steady(5, wide), (dict(STEADY), [15.0] * 4)])
    assert alerts == []
    assert run(PPOMonitorSettings(), [*steady(5, wide), (dict(STEADY), [16.0] * 4)])[0].name == "length"
    shrinking = [(dict(STEADY), [1.0] * 4) for _ in range(10)]
    assert run(PPOMonitorSettings(), steady(5, wide) + shrinking) == []


def test_kl_ceiling_applies_from_the_first_update() -> None:
    alerts = run(PPOMonitorSettings(kl_max=5.0), [({**STEADY, "kl": 5.5}, [5.0]), *steady(3)])
    assert [(a.name, a.step, a.value, a.threshold) for a in alerts] == [("kl", 1, 5.5, 5.0)]


def test_entropy_collapse_below_a_fraction_of_the_start() -> None:
    falling = [({**STEADY, "entropy": e}, [5.0]) for e in (1.5, 0.8, 0.61, 0.59, 0.1)]
    alerts = run(PPOMonitorSettings(), steady(5) + falling)  # limit 0.3 * 2.0 = 0.6
    assert [(a.name, a.step) for a in alerts] == [("entropy", 9)]


def test_eos_collapse_needs_a_high_start() -> None:
    collapse = [({**STEADY, "eos_fraction": f}, [5.0]) for f in (0.5, 0.2, 0.1, 0.0)]
    assert [(a.name, a.step) for a in run(PPOMonitorSettings(), steady(5) + collapse)] == [("eos", 8)]
    low_start = [({**STEADY, "eos_fraction": 0.3}, [5.0]) for _ in range(5)]
    assert run(PPOMonitorSettings(), low_start + collapse) == []  # never armed: 0.3 < eos_from 0.5


def test_reward_divergence_over_a_held_out_series() -> None:
    updates: list[tuple[dict[str, float], list[float]]] = []
    for step in range(1, 13):
        metrics = {**STEADY, "reward_mean": 0.1 * step}
        if step % 2 == 0:  # the held-out grader runs every other update, rising then falling
            metrics["eval/judge/mean"] = 0.5 + (0.05 * step if step <= 6 else 0.3 - 0.05 * (step - 6))
        updates.append((metrics, [5.0]))
    alerts = run(PPOMonitorSettings(divergence_window=3), updates)
    # points (6, .8), (8, .7), (10, .6) at step 10: the first window of three whose slope is negative
    assert [(a.name, a.step) for a in alerts] == [("reward_divergence", 10)]
    assert alerts[0].value < 0 and "eval/judge/mean" in alerts[0].message
    both_rise = [({**m, "eval/judge/mean": 0.1 * s}, ls) for s, (m, ls) in enumerate(updates, start=1)]
    assert run(PPOMonitorSettings(divergence_window=3), both_rise) == []


def test_no_held_out_series_is_a_no_op_with_a_notice() -> None:
    monitors = Monitors(PPOMonitorSettings())
    for step in range(1, 8):
        assert monitors.observe(step, {**STEADY, "reward_mean": float(step)}, [5.0]) == []
    notice = monitors.missing_series_notice()
    assert notice is not None and "eval/*/mean" in notice and "did nothing" in notice
    monitors.observe(8, {**STEADY, "eval/judge/mean": 0.4}, [5.0])
    assert monitors.missing_series_notice() is None
    assert Monitors(PPOMonitorSettings(held_out_metric=None)).missing_series_notice() is None


def test_state_round_trips_through_json_and_resumes_identically() -> None:
    growing = [(dict(STEADY), [float(n)] * 4) for n in (6, 7, 8, 9, 10)]
    updates = steady(5) + growing
    straight = run(PPOMonitorSettings(), updates)
    first = Monitors(PPOMonitorSettings())
    for step, (metrics, lengths) in enumerate(updates[:7], start=1):
        assert first.observe(step, metrics, lengths) == []
    second = Monitors(PPOMonitorSettings())
    second.load(json.loads(json.dumps(first.state())))
    resumed = [second.observe(s, m, ls) for s, (m, ls) in enumerate(updates[7:], start=8)]
    assert [a for alerts in resumed for a in alerts] == straight


def test_off_monitors_and_non_finite_values() -> None:
    off = PPOMonitorSettings(length_std=None, kl_max=None, entropy_fraction=None, eos_from=None)
    wild = [({**STEADY, "kl": 1e9, "entropy": 0.0, "eos_fraction": 0.0}, [99.0]) for _ in range(3)]
    assert run(off, steady(5) + wild) == []
    assert run(PPOMonitorSettings(), [({**STEADY, "kl": float("inf")}, [5.0])]) == []
    assert "all off" in Monitors(off.model_copy(update={"held_out_metric": None})).describe()


def test_slope() -> None:
    assert slope([(1, 1.0), (2, 2.0), (3, 3.0)]) == pytest.approx(1.0)
    assert slope([(1, 3.0), (3, 1.0)]) == pytest.approx(-1.0)
    assert slope([(1, 5.0)]) == 0.0 and slope([(2, 1.0), (2, 3.0)]) == 0.0


@pytest.mark.parametrize(
    ("monitors", "fragment"),
    [
        ({"stop_on": ["kl"], "kl_max": None}, "stop_on names monitors that are off: ['kl']"),
        ({"stop_on": ["sideways"]}, "stop_on"),
        ({"eos_from": 0.2, "eos_to": 0.3}, "eos_to"),
        ({"baseline_updates": 0}, "baseline_updates"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_settings_refuse_what_cannot_run(monitors: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        PPOHyperparameters.model_validate({"monitors": monitors})


def test_defaults_are_on_and_stop_nothing() -> None:
    settings = PPOHyperparameters().monitors
    assert settings.stop_on == []
    assert None not in (settings.length_std, settings.kl_max, settings.entropy_fraction, settings.eos_from)
    assert settings.held_out_metric == "eval/*/mean"
    assert all(f.description for f in PPOMonitorSettings.model_fields.values())
