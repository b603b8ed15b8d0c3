"""Free-text answers scored against their references: ROUGE-L (rouge-score), chrF and BLEU (sacrebleu), and a
judge's 1..K score of each reply against its reference. Each comes with the same bootstrap interval and paired
comparison as every other metric (eval/metrics.py: `score`, `compare`); this module only registers.

BLEU and chrF are corpus-level: a corpus's score is not the mean of its sentences' scores but a function of
n-gram counts summed over the corpus. So `prepare` keeps sacrebleu's own per-example sufficient statistics
(BLEU: hypothesis and closest-reference length, matched and total n-grams of orders 1-4; chrF: hypothesis,
reference and matched counts of character 1-6-grams against the best-matching reference), `totals`
sums them over each resample's examples, and each metric hands the summed statistics to sacrebleu's own
score-from-statistics function — the route sacrebleu's paired bootstrap takes. On the full set that is
exactly `corpus_score`. ROUGE-L is a per-example F-measure (the best over the references), averaged.

Several references (the `answers` list of a QA row) are scored as the libraries define it: multi-reference
BLEU and chrF (a reply's n-grams may match any reference), ROUGE-L against the reference it matches best.
Scales follow the libraries: BLEU and chrF 0-100; ROUGE-L 0-1 (a share, printed as %); judge_score 1-K.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from tunesmith.eval.metrics import MetricTask, Totals, accepted_answers, answer_scores
from tunesmith.registry import metric_tasks, metrics

TEXT_TASKS = ("exact_match", "text")  # the metric tasks ROUGE-L, chrF and BLEU score


@cache
def _bleu():
    from sacrebleu.metrics import BLEU  # imported on first use: metrics are imported by light modules (reports)

    return BLEU()  # sacrebleu's defaults: 13a tokenisation, exponential smoothing, n-grams up to 4


@cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()  # chrF with sacrebleu's defaults: character 6-grams, no word n-grams, beta 2


@cache
def _rouge():
    from rouge_score import rouge_scorer  # ~2 s to import (nltk): only when text is scored

    return rouge_scorer.RougeScorer(["rougeL"])


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-example reference lists as sacrebleu takes them: one stream per reference position, each with one entry
    per example; None where an example has fewer references (sacrebleu skips it)."""
    width = max(len(answers) for answers in references)
    return [[answers[k] if k < len(answers) else None for answers in references] for k in range(width)]


def text_statistics(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per example: "rouge_l" (n,), the ROUGE-L F-measure against the best reference; "bleu_statistics" (n, 10)
    and "chrf_statistics" (n, 18), sacrebleu's sufficient statistics; "count" (n,)."""
    hypotheses = ["" if prediction is None else str(prediction) for prediction in predictions]
    answers = [accepted_answers(reference, index) for index, reference in enumerate(references)]
    streams = reference_streams(answers)
    bleu = np.asarray(_bleu()._extract_corpus_statistics(hypotheses, streams), dtype=float)
    chrf = np.asarray(_chrf()._extract_corpus_statistics(hypotheses, streams), dtype=float)
    scorer = _rouge()
    rouge = np.array(
        [scorer.score_multi(options, hypothesis)["rougeL"].fmeasure for hypothesis, options in zip(hypotheses, answers)]
    )
    return {"count": np.ones(len(hypotheses)), "rouge_l": rouge, "bleu_statistics": bleu, "chrf_statistics": chrf}


def resample_sums(columns: dict[str, np.ndarray], indices: np.ndarray) -> Totals:
    """Each column (n,) or (n, K) summed over each resample's examples: {name: (R,) or (R, K)}.

    A product of the (R, n) multiplicity matrix (how often each resample drew each example) with the column,
    not a gather: gathering K statistics per drawn example would hold R x n x K numbers at once. Integer
    statistics stay exact in float64, so the sums equal sacrebleu's own.
    """
    resamples, n = indices.shape
    flat = (np.arange(resamples)[:, None] * n + indices).ravel()
    multiplicity = np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(float)  # (R, n)
    return {name: multiplicity @ column for name, column in columns.items()}


def answer_and_text_scores(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, np.ndarray]:
    """The exact_match metric task's columns: exact match and token F1 (eval/metrics.py), and the text statistics."""
    return {**answer_scores(predictions, references), **text_statistics(predictions, references)}


# Correct = normalised exact match, the same notion as the exact_match eval task's per-example `correct`.
metric_tasks.register("exact_match")(
    MetricTask(
        prepare=answer_and_text_scores,
        totals=resample_sums,
        correct=lambda columns: columns["normalized_exact_match"] == 1,
    )
)
metric_tasks.register("text")(MetricTask(prepare=text_statistics, totals=resample_sums))


@metrics.register("rouge_l", task=TEXT_TASKS)
def rouge_l(totals: Totals) -> np.ndarray:
    """Mean ROUGE-L F-measure (longest common subsequence of words), each reply against its best reference."""
    return totals["rouge_l"] / totals["count"]


@metrics.register("bleu", task=TEXT_TASKS, share=False)
def corpus_bleu(totals: Totals) -> np.ndarray:
    """sacrebleu's corpus BLEU (0-100) of each resample, from its summed statistics."""
    return np.array([_bleu()._compute_score_from_stats(row.tolist()).score for row in totals["bleu_statistics"]])


@metrics.register("chrf", task=TEXT_TASKS, share=False)
def corpus_chrf(totals: Totals) -> np.ndarray:
    """sacrebleu's corpus chrF (0-100) of each resample, from its summed statistics."""
    return np.array([_chrf()._compute_score_from_stats(row.tolist()).score for row in totals["chrf_statistics"]])


# --------------------------------------------------------------------------------------------- judge score


def judge_scores(predictions: Sequence[Any], references: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """A judge's score of each reply against its reference (eval/judge.py, `Judge.rate_against`)."""
    scores = np.asarray(predictions, dtype=float)
    if scores.ndim != 1 or not np.isfinite(scores).all():
        raise ValueError("each prediction must be one finite judge score")
    return {"count": np.ones(len(scores)), "score": scores}


metric_tasks.register("rating")(MetricTask(prepare=judge_scores, totals=resample_sums))


@metrics.register("judge_score", task="rating", share=False)
def judge_score(totals: Totals) -> np.ndarray:
    """The judge's mean score of the replies against their references, on its 1..K scale."""
    return totals["score"] / totals["count"]
