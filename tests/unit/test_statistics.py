"""Evaluation statistics: bootstrap means and paired win-rates, their intervals, and that the win-rate is
unbiased (a candidate no better than the baseline is at 0.5, and its interval covers 0.5 about 95% of the
time)."""

from __future__ import annotations

import numpy as np
import pytest

from contract import statistics
from contract.statistics import mean_with_ci, paired_outcomes, per_prompt_means, win_rate_with_ci


def test_mean_and_interval_by_hand() -> None:
    values = [0.0, 1.0, 1.0, 1.0]
    interval = mean_with_ci(values, seed=0)
    assert interval.estimate == 0.75
    # Every bootstrap mean is k/4 for k zeros..ones drawn: the interval lies on that grid, around 0.75.
    assert interval.low in (0.25, 0.5) and interval.high == 1.0
    assert interval.contains(0.75)


def test_constant_scores_have_a_point_interval() -> None:
    interval = mean_with_ci([0.4] * 7, seed=3)
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((0.4, 0.4, 0.4))


def test_same_seed_same_interval_other_seed_other_interval() -> None:
    values = list(np.random.default_rng(1).normal(size=30))
    first, again = mean_with_ci(values, seed=(7, 1)), mean_with_ci(values, seed=(7, 1))
    assert first == again
    assert mean_with_ci(values, seed=(7, 2)) != first


def test_chunked_draws_match_one_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    values = list(np.random.default_rng(2).random(50))
    whole = mean_with_ci(values, seed=5, resamples=300)
    monkeypatch.setattr(statistics, "MAX_DRAW_CELLS", 50 * 7)  # 7 rows per chunk: 43 chunks
    assert mean_with_ci(values, seed=5, resamples=300) == whole


def test_interval_narrows_with_more_prompts() -> None:
    rng = np.random.default_rng(0)
    small = mean_with_ci(list(rng.random(20)), seed=0)
    large = mean_with_ci(list(rng.random(2000)), seed=0)
    assert large.high - large.low < (small.high - small.low) / 5


def test_paired_outcomes_count_ties_half() -> None:
    assert list(paired_outcomes([1, 0, 0.5, 2], [0, 1, 0.5, 2])) == [1.0, 0.0, 0.5, 0.5]


def test_the_baseline_against_itself_is_exactly_one_half() -> None:
    scores = list(np.random.default_rng(4).random(25))
    interval = win_rate_with_ci(scores, scores, seed=0)
    assert interval.estimate == 0.5 and interval.low == 0.5 and interval.high == 0.5
    assert interval.contains(0.5)


def test_a_candidate_that_always_wins() -> None:
    interval = win_rate_with_ci([1.0] * 12, [0.0] * 12, seed=0)
    assert (interval.estimate, interval.low, interval.high) == (1.0, 1.0, 1.0)


def test_the_bootstrap_keeps_pairs_together() -> None:
    # Every prompt's candidate beats its own baseline, though the sides overlap a lot when unpaired: an
    # unpaired resampling would lose most of the wins.
    baseline = [float(i) for i in range(30)]
    candidate = [b + 0.5 for b in baseline]
    assert win_rate_with_ci(candidate, baseline, seed=0).low == 1.0


def test_no_true_difference_covers_one_half_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(20240601)
    simulations, covered, estimates = 400, 0, []
    for index in range(simulations):
        prompts = int(rng.integers(20, 60))
        # Scores with ties (a 0/1 rule grader) half the time, continuous (a reward model) otherwise; both sides
        # from one distribution, whose level varies per prompt as real prompt difficulty does.
        difficulty = rng.random(prompts)
        if index % 2:
            candidate = (rng.random(prompts) < difficulty).astype(float)
            baseline = (rng.random(prompts) < difficulty).astype(float)
        else:
            candidate = difficulty + rng.normal(size=prompts)
            baseline = difficulty + rng.normal(size=prompts)
        interval = win_rate_with_ci(list(candidate), list(baseline), seed=(index,))
        covered += interval.contains(0.5)
        estimates.append(interval.estimate)
    coverage = covered / simulations
    assert 0.90 <= coverage <= 0.99, coverage
    # Unbiased: the estimates centre on 0.5 (their standard error here is about 0.004).
    assert abs(float(np.mean(estimates)) - 0.5) < 0.015, np.mean(estimates)


def test_a_real_difference_is_detected() -> None:
    rng = np.random.default_rng(9)
    baseline = rng.random(80)
    candidate = baseline + rng.normal(0.3, 0.2, size=80)
    interval = win_rate_with_ci(list(candidate), list(baseline), seed=0)
    assert interval.estimate > 0.8 and interval.low > 0.5


def test_per_prompt_means() -> None:
    assert per_prompt_means([1, 0, 0, 0, 1, 1], 2) == [0.5, 0.0, 1.0]
    with pytest.raises(ValueError):
        per_prompt_means([1, 0, 1], 2)


@pytest.mark.parametrize(("candidate", "baseline"), [([], []), ([1.0], [1.0, 2.0]), ([float("nan")], [0.0])])
def test_bad_input_is_refused(candidate: list[float], baseline: list[float]) -> None:
    with pytest.raises(ValueError):
        win_rate_with_ci(candidate, baseline, seed=0)
