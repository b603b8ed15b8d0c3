"""Metric tasks for systems compared on preferences: a model's (or reward model's) ranking of human pairs, a
judge's agreement with them (or with human scores of replies), and the reward its own generated replies earn.
See eval/metrics.py for the registries and the bootstrap; this module only registers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tunesmith.eval.metrics import MetricTask, Totals, number_pairs, safe_divide, sum_columns
from tunesmith.eval.stats import bootstrap_indices, percentile_interval
from tunesmith.registry import metric_tasks, metrics

# ------------------------------------------------------------------------------------------- preference


def preference_wins(predictions: Sequence[Any], references: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """1 where the chosen reply scored strictly higher than the rejected one; a tie is not a win."""
    chosen, rejected = number_pairs(predictions, "(chosen score, rejected score)")
    return {"count": np.ones(len(chosen)), "wins": (chosen > rejected).astype(float)}


metric_tasks.register("preference")(MetricTask(prepare=preference_wins, totals=sum_columns))


@metrics.register("preference_accuracy", task="preference")
def preference_accuracy(totals: Totals) -> np.ndarray:
    return totals["wins"] / totals["count"]


def implicit_reward_accuracy(
    tuned: Sequence[Any], base: Sequence[Any], *, resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """DPO's own held-out figure: the share of pairs whose implicit reward, log p_tuned - log p_base of each reply,
    is higher for the chosen one, with a 95% bootstrap interval. The base has no preference by this reward (it
    is 0 for both replies), so the interval is read against 50%; its own preference is its log-likelihood
    ranking, and `vs_base_loglik` is the paired difference from that ranking's accuracy on the same resamples.
    Both arguments are the preference task's (chosen, rejected) log-likelihoods of the same pairs."""
    tuned_chosen, tuned_rejected = number_pairs(tuned, "(chosen score, rejected score)")
    base_chosen, base_rejected = number_pairs(base, "(chosen score, rejected score)")
    wins = ((tuned_chosen - base_chosen) > (tuned_rejected - base_rejected)).astype(float)
    base_wins = (base_chosen > base_rejected).astype(float)
    indices = bootstrap_indices(len(wins), resamples, seed)
    low, high = percentile_interval(wins[indices].mean(axis=1))
    diff_low, diff_high = percentile_interval((wins - base_wins)[indices].mean(axis=1))
    return {
        "value": float(wins.mean()),
        "ci95": [float(low), float(high)],
        "n": len(wins),
        "vs_base_loglik": {"diff": float((wins - base_wins).mean()), "ci95": [float(diff_low), float(diff_high)]},
    }


# ------------------------------------------------------------------------------------------------ judge


def judge_verdicts(predictions: Sequence[Any], references: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """A judge against human labels. Per pair: the judge's probability that the human-chosen reply is better
    when shown first (as A) and when shown second (as B). It agrees when both exceed 0.5, ties when they differ
    in side (it followed the position), disagrees when both fall below."""
    as_a, as_b = number_pairs(predictions, "(P(chosen better) shown as A, shown as B)")
    agree, disagree = (as_a > 0.5) & (as_b > 0.5), (as_a < 0.5) & (as_b < 0.5)
    return {
        "count": np.ones(len(as_a)),
        "agree": agree.astype(float),
        "tie": (~agree & ~disagree).astype(float),
        "debiased": ((as_a + as_b) / 2 > 0.5).astype(float),
    }


metric_tasks.register("judge")(
    MetricTask(prepare=judge_verdicts, totals=sum_columns, correct=lambda columns: columns["agree"] == 1)
)


@metrics.register("agreement", task="judge")
def judge_agreement(totals: Totals) -> np.ndarray:
    """Share of pairs where the judge picks the human-chosen reply in both orders (a tie counts as a miss)."""
    return totals["agree"] / totals["count"]


@metrics.register("tie_rate", task="judge")
def judge_tie_rate(totals: Totals) -> np.ndarray:
    """Share of pairs whose verdict flips when the replies swap places: position bias, not preference."""
    return totals["tie"] / totals["count"]


@metrics.register("decided_agreement", task="judge")
def judge_decided_agreement(totals: Totals) -> np.ndarray:
    """Agreement among the pairs the judge decided (no tie); undefined when it decided none."""
    return safe_divide(totals["agree"], totals["count"] - totals["tie"], math.nan)


@metrics.register("debiased_agreement", task="judge")
def judge_debiased_agreement(totals: Totals) -> np.ndarray:
    """Share of pairs where the judge's probability averaged over both orders favours the human-chosen reply."""
    return totals["debiased"] / totals["count"]


def rating_pairs(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, np.ndarray]:
    """A judge's 1..K score of each reply (predictions) against a person's score of it (references): the sums
    Pearson's correlation is made of, the absolute difference, and whether the nearest whole scores agree."""
    judge = np.asarray(predictions, dtype=float)
    human = np.asarray(references, dtype=float)
    if judge.shape != human.shape or judge.ndim != 1 or not (np.isfinite(judge).all() and np.isfinite(human).all()):
        raise ValueError("each prediction and reference must be one finite score")
    nearest = np.floor(judge + 0.5) == np.floor(human + 0.5)  # halves round up, as eval/tasks.py nearest_score
    return {
        "count": np.ones(len(judge)),
        "judge": judge,
        "human": human,
        "judge_squared": judge**2,
        "human_squared": human**2,
        "product": judge * human,
        "absolute_difference": np.abs(judge - human),
        "same": nearest.astype(float),
    }


metric_tasks.register("rating_agreement")(
    MetricTask(prepare=rating_pairs, totals=sum_columns, correct=lambda columns: columns["same"] == 1)
)


@metrics.register("rating_correlation", task="rating_agreement", share=False)
def rating_correlation(totals: Totals) -> np.ndarray:
    """Pearson's r between the judge's and the people's scores, from per-resample sums; undefined (NaN) when
    either side has no spread."""
    n = totals["count"]
    covariance = n * totals["product"] - totals["judge"] * totals["human"]
    spread = (n * totals["judge_squared"] - totals["judge"] ** 2) * (n * totals["human_squared"] - totals["human"] ** 2)
    with np.errstate(invalid="ignore"):
        r = safe_divide(covariance, np.sqrt(np.maximum(spread, 0.0)), math.nan)
    return np.clip(r, -1.0, 1.0)  # float rounding can step just past +-1


@metrics.register("rating_mae", task="rating_agreement", share=False)
def rating_mae(totals: Totals) -> np.ndarray:
    """Mean absolute difference between the judge's expected score and the people's score, in scale points."""
    return totals["absolute_difference"] / totals["count"]


@metrics.register("rating_agreement", task="rating_agreement")
def rating_agreement(totals: Totals) -> np.ndarray:
    """Share of replies whose judge score, rounded to the nearest whole score, equals the people's."""
    return totals["same"] / totals["count"]


# ----------------------------------------------------------------------------------------------- reward


def reply_rewards(predictions: Sequence[Any], references: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """Per prompt: the reward-model score of the system's own reply, and that reply's length in words."""
    rewards = np.asarray([p["reward"] for p in predictions], dtype=float)
    if not np.isfinite(rewards).all():
        raise ValueError("each prediction must carry a finite reward: {'reply': text, 'reward': number}")
    words = np.asarray([len(str(p["reply"]).split()) for p in predictions], dtype=float)
    return {"count": np.ones(len(rewards)), "reward": rewards, "words": words}


metric_tasks.register("reward")(MetricTask(prepare=reply_rewards, totals=sum_columns))


@metrics.register("mean_reward", task="reward", share=False)
def mean_reward(totals: Totals) -> np.ndarray:
    """The reward model's mean score of the replies; its scale is the reward model's own."""
    return totals["reward"] / totals["count"]


@metrics.register("reply_words", task="reward", share=False)
def reply_words(totals: Totals) -> np.ndarray:
    """Mean reply length in words: a reward that grows only with length is a reward hacked."""
    return totals["words"] / totals["count"]
