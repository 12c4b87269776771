"""The numbers an evaluation reports: means and paired win-rates, each with a seeded 95% bootstrap interval.

Torch-free (numpy only), so the evaluate child and the tests compute them the same way.

- :func:`mean_with_ci`: the mean of per-prompt scores and its **percentile bootstrap** interval: ``resamples``
  times, draw ``n`` prompts with replacement, take the mean; the interval is the 2.5th and 97.5th percentile
  of those means (numpy's default linear interpolation).
- :func:`win_rate_with_ci`: the **paired** win-rate of a candidate against the baseline. Per prompt the
  candidate scores 1 when its score is higher than the baseline's on the same prompt, 0 when lower and 0.5 on
  a tie (with several samples per prompt, the per-prompt *means* are compared). The win-rate is the mean of
  those per-prompt outcomes, and its interval is the percentile bootstrap over prompts: one draw takes whole
  prompts, so each keeps its (candidate, baseline) pair. The baseline against itself ties everywhere: 0.5
  with the interval [0.5, 0.5].

With no true difference (both answers' scores drawn from one distribution) the win-rate's expectation is
exactly 0.5, by symmetry, and the interval covers it about 95% of the time (tests/unit/test_statistics.py
measures it over 400 synthetic evaluations).

Seeds: every interval takes a ``seed`` (ints or a tuple of ints, fed to ``numpy.random.default_rng``), so the
same inputs and seed give the same interval on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
CONFIDENCE = 0.95
MAX_DRAW_CELLS = 4_000_000  # prompt indices drawn at once (32 MB of int64)

Seed = int | Sequence[int]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval (``low <= estimate <= high`` unless the data is odd)."""

    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _as_array(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("need a non-empty sequence of numbers")
    if not np.isfinite(array).all():
        raise ValueError("every value must be a finite number")
    return array


def _bootstrap(array: np.ndarray, *, resamples: int, seed: Seed) -> Interval:
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    estimate = float(array.mean())
    rng = np.random.default_rng(seed)
    # Each row of a (rows x n) draw of prompt indices is one bootstrap sample of the prompts; drawn in chunks
    # so memory stays bounded on big datasets (the same stream as one draw, so chunking never changes a result).
    rows = max(1, MAX_DRAW_CELLS // array.size)
    means = np.concatenate(
        [
            array[rng.integers(0, array.size, size=(min(rows, resamples - start), array.size))].mean(axis=1)
            for start in range(0, resamples, rows)
        ]
    )
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(estimate=estimate, low=float(low), high=float(high))


def mean_with_ci(values: Sequence[float], *, seed: Seed, resamples: int = DEFAULT_RESAMPLES) -> Interval:
    """The mean of ``values`` (one per prompt) with its 95% percentile bootstrap interval."""
    return _bootstrap(_as_array(values), resamples=resamples, seed=seed)


def paired_outcomes(candidate: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    """Per prompt: 1 where the candidate's score beats the baseline's, 0 where it loses, 0.5 on a tie."""
    ours, theirs = _as_array(candidate), _as_array(baseline)
    if ours.shape != theirs.shape:
        raise ValueError(
            f"paired scores need one value per prompt on both sides ({ours.size} vs {theirs.size})"
        )
    return np.where(ours > theirs, 1.0, np.where(ours < theirs, 0.0, 0.5))


def win_rate_with_ci(
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    seed: Seed,
    resamples: int = DEFAULT_RESAMPLES,
) -> Interval:
    """Paired win-rate of ``candidate`` over ``baseline`` (per-prompt scores, same order) and its 95% interval
    from the bootstrap over prompts."""
    return _bootstrap(paired_outcomes(candidate, baseline), resamples=resamples, seed=seed)


def per_prompt_means(scores: Sequence[float], num_samples: int) -> list[float]:
    """Scores laid out prompt by prompt (``num_samples`` consecutive values each) -> one mean per prompt."""
    if num_samples < 1 or len(scores) % num_samples:
        raise ValueError(f"{len(scores)} scores do not split into groups of {num_samples}")
    array = np.asarray(scores, dtype=np.float64).reshape(-1, num_samples)
    return [float(value) for value in array.mean(axis=1)]
