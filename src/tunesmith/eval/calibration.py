"""A classifier's calibration: a temperature fitted on validation logits, the confidence threshold below which it
abstains, and the metrics that judge its probabilities, with bootstrap intervals (the metric task "calibration").

Each example's calibration prediction is (confidence, correct, p_true, answered): the top label's probability,
whether the top label is the expected one, the expected label's probability, and whether the classifier answers
(its confidence reaches the threshold). From them:

* **ece**, the expected calibration error over BINS equal-width confidence bins: the share-weighted gap between
  each bin's accuracy and its mean confidence, sum_b |correct_b - confidence_b| / n (Guo et al., 2017, top-label);
* **nll**, the mean negative log-likelihood of the expected label;
* **coverage**, the share of examples answered, and **selective_accuracy**, the accuracy of the answered ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunesmith.eval import metrics as metric_functions
from tunesmith.eval.metrics import MetricTask, Totals, safe_divide
from tunesmith.eval.stats import point_indices
from tunesmith.registry import metric_tasks, metrics

BINS = 15
MIN_PROBABILITY = 1e-12  # a label given probability 0 costs -log(1e-12) = 27.6 nats, not infinity


# ---------------------------------------------------------------------------------------------- fitting


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 that minimises the mean NLL of softmax(logits / T) over the examples (Guo et al., 2017,
    temperature scaling), found by L-BFGS on log T. Dividing by T never changes which label is on top."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def mean_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def precision_threshold(confidence: np.ndarray, correct: np.ndarray, precision: float) -> float | None:
    """The lowest confidence t such that the examples with confidence >= t are at least `precision` accurate (the
    most examples answered at that precision); None when no such t exists."""
    order = np.argsort(-confidence, kind="stable")
    ranked, hits = confidence[order], correct[order].astype(float)
    answered_accuracy = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    cut = np.r_[ranked[:-1] > ranked[1:], True]  # answering the top k+1 is possible only where confidences differ
    valid = np.flatnonzero((answered_accuracy >= precision - 1e-12) & cut)
    return float(ranked[valid.max()]) if valid.size else None


def out_of_scope_threshold(
    confidence: np.ndarray, predicted: np.ndarray, expected: np.ndarray, out_of_scope: int
) -> float | None:
    """The confidence threshold below which answering `out_of_scope` gives the best balanced accuracy: the mean of
    in-scope accuracy and out-of-scope recall, which does not depend on how common out-of-scope messages are (a
    validation set may hold few, and the messages a deployed model sees many). Plain accuracy when the examples
    are all of one kind. None when sending none there is best (ties go to the lower threshold: fewer messages
    turned away)."""
    order = np.argsort(confidence, kind="stable")
    ranked = confidence[order]
    outside = expected[order] == out_of_scope
    as_top = (predicted[order] == expected[order]).astype(float)  # right if answered with the top label

    def right(mask: np.ndarray, below: np.ndarray) -> np.ndarray:
        """For j = 0..n: how many of `mask`'s examples are right when the j least confident go out of scope, each
        of them right exactly when `below` holds."""
        sent = np.r_[0.0, np.cumsum(below * mask)]
        kept = (as_top * mask).sum() - np.r_[0.0, np.cumsum(as_top * mask)]
        return sent + kept

    inside_right, outside_right = right(~outside, np.zeros(len(ranked))), right(outside, np.ones(len(ranked)))
    if outside.all() or not outside.any():
        score = (inside_right + outside_right) / len(ranked)
    else:
        score = (inside_right / (~outside).sum() + outside_right / outside.sum()) / 2
    possible = np.r_[True, ranked[:-1] < ranked[1:], True]  # a threshold cannot split equal confidences
    best = int(np.flatnonzero(possible)[np.argmax(score[possible])])
    if best == 0:
        return None
    return float(ranked[best]) if best < len(ranked) else float(np.nextafter(ranked[-1], np.inf))


# ---------------------------------------------------------------------------------------------- predictions


def calibration_predictions(
    probabilities: np.ndarray, expected: np.ndarray, threshold: float | None = None
) -> list[tuple[float, bool, float, bool]]:
    """(confidence, correct, p_true, answered) per example from (n, K) probabilities and (n,) expected indices."""
    confidence = probabilities.max(axis=1)
    top = probabilities.argmax(axis=1)
    p_true = probabilities[np.arange(len(expected)), expected]
    answered = confidence >= threshold if threshold is not None else np.ones(len(expected), dtype=bool)
    return [
        (float(c), bool(t == e), float(p), bool(a))
        for c, t, e, p, a in zip(confidence, top, expected, p_true, answered)
    ]


def reliability(predictions: Sequence[tuple[float, bool, float, bool]]) -> list[dict[str, Any]]:
    """The reliability diagram's bins: {"low", "high", "count", "confidence", "accuracy"} for every bin that holds
    an example (confidence and accuracy are the bin's means)."""
    totals = calibration_totals(prepare(predictions, None), point_indices(len(predictions)))
    bins = []
    for b in range(BINS):
        count = int(totals["bin_count"][0, b])
        if count:
            bins.append(
                {
                    "low": b / BINS,
                    "high": (b + 1) / BINS,
                    "count": count,
                    "confidence": float(totals["bin_confidence"][0, b] / count),
                    "accuracy": float(totals["bin_correct"][0, b] / count),
                }
            )
    return bins


# ---------------------------------------------------------------------------------------------- the metric task


def prepare(predictions: Sequence[tuple[float, bool, float, bool]], _: Any) -> dict[str, np.ndarray]:
    confidence = np.array([p[0] for p in predictions], dtype=float)
    return {
        "confidence": confidence,
        "bin": np.minimum((confidence * BINS).astype(np.int64), BINS - 1),
        "correct": np.array([p[1] for p in predictions], dtype=float),
        "nll": -np.log(np.maximum(np.array([p[2] for p in predictions], dtype=float), MIN_PROBABILITY)),
        "answered": np.array([p[3] for p in predictions], dtype=float),
    }


def calibration_totals(columns: dict[str, np.ndarray], indices: np.ndarray) -> Totals:
    """Per-resample sums: "count", "nll", "answered", "answered_correct" (R,); per confidence bin "bin_count",
    "bin_confidence", "bin_correct" (R, BINS), each one np.bincount over (resample * BINS + bin)."""
    resamples, n = indices.shape
    flat = (np.arange(resamples)[:, None] * BINS + columns["bin"][indices]).ravel()

    def per_bin(weights: np.ndarray | None) -> np.ndarray:
        values = None if weights is None else weights[indices].ravel()
        return np.bincount(flat, weights=values, minlength=resamples * BINS).reshape(resamples, BINS)

    correct, answered = columns["correct"][indices], columns["answered"][indices]
    return {
        "count": np.full(resamples, n),
        "nll": columns["nll"][indices].sum(axis=1),
        "answered": answered.sum(axis=1),
        "answered_correct": (answered * correct).sum(axis=1),
        "bin_count": per_bin(None),
        "bin_confidence": per_bin(columns["confidence"]),
        "bin_correct": per_bin(columns["correct"]),
    }


metric_tasks.register("calibration")(MetricTask(prepare=prepare, totals=calibration_totals))


@metrics.register("ece", task="calibration", share=False)
def ece(totals: Totals) -> np.ndarray:
    return np.abs(totals["bin_correct"] - totals["bin_confidence"]).sum(axis=1) / totals["count"]


@metrics.register("nll", task="calibration", share=False)
def nll(totals: Totals) -> np.ndarray:
    return totals["nll"] / totals["count"]


@metrics.register("coverage", task="calibration")
def coverage(totals: Totals) -> np.ndarray:
    return totals["answered"] / totals["count"]


@metrics.register("selective_accuracy", task="calibration")
def selective_accuracy(totals: Totals) -> np.ndarray:
    """Accuracy of the answered examples (undefined when none is answered)."""
    return safe_divide(totals["answered_correct"], totals["answered"], math.nan)


# ---------------------------------------------------------------------------------------------- after training


def calibrate(
    logits: torch.Tensor,
    expected: torch.Tensor,
    labels: list[str],
    abstain_precision: float | None = None,
    out_of_scope: str | None = None,
) -> dict[str, Any]:
    """What a classifier saves as calibration.json, from its validation logits (n, K) and expected indices (n,):
    the fitted temperature, the threshold (for `abstain_precision`, or the one of best balanced accuracy for the
    `out_of_scope` label), and the validation figures before and after."""
    temperature = fit_temperature(logits, expected)
    raw = torch.softmax(logits.double(), dim=-1).numpy()
    scaled = torch.softmax(logits.double() / temperature, dim=-1).numpy()
    truth = expected.numpy()
    before, after = calibration_predictions(raw, truth), calibration_predictions(scaled, truth)
    confidence, top = scaled.max(axis=1), scaled.argmax(axis=1)
    threshold = None
    if abstain_precision is not None:
        threshold = precision_threshold(confidence, top == truth, abstain_precision)
    elif out_of_scope is not None:
        threshold = out_of_scope_threshold(confidence, top, truth, labels.index(out_of_scope))
    point = point_indices(len(truth))

    def figures(predictions: list) -> dict[str, float]:
        totals = calibration_totals(prepare(predictions, None), point)
        return {"ece": float(ece(totals)[0]), "nll": float(nll(totals)[0])}

    validation: dict[str, Any] = {"n": len(truth), "before": figures(before), "after": figures(after)}
    if threshold is not None:
        answered = confidence >= threshold
        validation["coverage"] = float(answered.mean())
        validation["selective_accuracy"] = float((top == truth)[answered].mean()) if answered.any() else None
    if out_of_scope is not None:
        oos = labels.index(out_of_scope)
        answers = np.where(confidence >= (threshold if threshold is not None else -1.0), top, oos)
        validation["accuracy"] = float((answers == truth).mean())
        inside = truth != oos
        if inside.any():
            validation["in_scope_accuracy"] = float((answers == truth)[inside].mean())
        if not inside.all():
            validation["out_of_scope_recall"] = float((answers == oos)[~inside].mean())
    return {
        "temperature": temperature,
        "threshold": threshold,
        "abstain_precision": abstain_precision,
        "out_of_scope": out_of_scope,
        "validation": validation,
    }


# ---------------------------------------------------------------------------------------------- in eval.json


def calibration_section(
    probabilities: np.ndarray,
    expected: list[str],
    labels: list[str],
    saved: Any,
    answers: list[str | None],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """eval.json's "calibration" block for a classifier: its saved temperature and threshold, ECE, NLL, coverage and
    selective accuracy with intervals, the reliability diagram's bins, and with an out-of-scope label, in-scope
    accuracy and out-of-scope recall of its `answers` (where abstentions answer out-of-scope). `saved` is the
    classifier's Calibration; `probabilities` (n, K) are calibrated; every expected label is one of `labels`."""
    index = {label: k for k, label in enumerate(labels)}
    truth = np.array([index[label] for label in expected])
    predictions = calibration_predictions(probabilities, truth, saved.threshold)
    section: dict[str, Any] = {
        "temperature": saved.temperature,
        "threshold": saved.threshold,
        "bins": BINS,
        **metric_functions.score("calibration", predictions, None, resamples=resamples, seed=seed),
        "reliability": reliability(predictions),
    }
    if saved.threshold is None:
        section.pop("coverage"), section.pop("selective_accuracy")
    if saved.out_of_scope is not None:
        stats = dict(resamples=resamples, seed=seed)
        groups = {
            "in_scope_accuracy": [i for i, label in enumerate(expected) if label != saved.out_of_scope],
            # recall of out-of-scope: the share of its messages answered out-of-scope
            "out_of_scope_recall": [i for i, label in enumerate(expected) if label == saved.out_of_scope],
        }
        for name, rows in groups.items():
            if rows:
                section[name] = metric_functions.score(
                    "classification", [answers[i] for i in rows], [expected[i] for i in rows], **stats
                )["accuracy"]
    return section
