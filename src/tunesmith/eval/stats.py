"""Uncertainty for evaluation metrics: seeded bootstrap resamples, percentile intervals, exact McNemar.

A bootstrap resample is a row of example indices drawn with replacement. Every metric is computed on a
whole batch of rows at once (see `tunesmith.eval.metrics`), so 1000 resamples cost a few array operations,
not 1000 Python calls. A paired comparison of two systems uses the *same* rows for both, so the interval
of (metric_a - metric_b) reflects only how the systems differ on the examples, not which examples were drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np


def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Example indices of `resamples` bootstrap resamples of `n` examples: int64 array (resamples, n).

    The same (n, resamples, seed) always gives the same rows. Memory is resamples * n * 8 bytes
    (8 MB for 1000 resamples of 1000 examples).
    """
    if n < 1:
        raise ValueError(f"cannot resample {n} examples")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def point_indices(n: int) -> np.ndarray:
    """The one 'resample' that is the data itself: (1, n). Metrics on it give the point estimate."""
    return np.arange(n)[None, :]


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Central percentile interval of bootstrap `values` (R,), ignoring NaN (a resample where the metric
    is undefined, e.g. no parsed number). (nan, nan) when every value is NaN."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    values = np.asarray(values, dtype=float)
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / trials`.

    Used for rates (refusal, compliance) where the bootstrap degenerates: at 0/n or n/n every resample gives
    the same value, and the percentile interval collapses to a point; Wilson's stays honest ([0, 0.019] at 0/200).
    (nan, nan) when there are no trials.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, trials], got {successes} of {trials}")
    if trials == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no float residue at 0/n or n/n
    return low, 1.0 if successes == trials else min(1.0, centre + half)


def binomial_two_sided_p(successes: int, trials: int) -> float:
    """Exact two-sided p-value of `successes` in `trials` fair coin flips (p = 0.5).

    The Binomial(trials, 0.5) distribution is symmetric, so the two-sided p-value is twice the smaller
    tail, capped at 1. Computed with exact integers: no underflow even at thousands of trials.
    """
    if trials == 0:
        return 1.0
    smaller = min(successes, trials - successes)
    tail = sum(math.comb(trials, k) for k in range(smaller + 1))
    return min(1.0, 2 * tail / 2**trials)


def mcnemar_p(correct_a: Sequence[bool] | np.ndarray, correct_b: Sequence[bool] | np.ndarray) -> float:
    """Exact two-sided McNemar test that systems a and b are equally often right, from per-example correctness.

    Only the discordant examples carry information: `only_a` where a is right and b wrong, `only_b` the
    reverse. Under the null each discordant example is a fair coin, so the p-value is the exact binomial
    test of `only_a` successes in `only_a + only_b` trials. We use the exact test, not the chi-squared
    approximation, because fine-tuning evaluations are often small (a few hundred examples, a handful of
    discordant pairs) and the approximation is poor when the discordant count is below ~25.
    1.0 when there are no discordant pairs.
    """
    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    if correct_a.shape != correct_b.shape:
        raise ValueError(f"correctness arrays differ in shape: {correct_a.shape} vs {correct_b.shape}")
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    return binomial_two_sided_p(only_a, only_a + only_b)


def cell(metric: dict[str, Any], rate: bool = True) -> str:
    """A metric as "value [low, high]": as percentages when `rate` and all three lie in [0, 1]; "n/a" if unset."""
    value, (low, high) = metric["value"], metric["ci95"]
    if value is None:
        return "n/a"
    if rate and 0.0 <= low <= high <= 1.0 and 0.0 <= value <= 1.0:
        return f"{value:.1%} [{low:.1%}, {high:.1%}]"
    return f"{value:.4g} [{low:.4g}, {high:.4g}]"


def difference(comparison: dict[str, Any], spec: str = "+.3f") -> str:
    """A paired difference as "diff [low, high]", signed, each number formatted by `spec`."""
    low, high = comparison["ci95"]
    return f"{comparison['diff']:{spec}} [{low:{spec}}, {high:{spec}}]"
