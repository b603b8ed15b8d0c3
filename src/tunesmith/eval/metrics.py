"""Evaluation metrics with 95% bootstrap intervals, and paired comparisons between two systems.

Two small registries (registry.py) hold the pieces:

* a **metric task** (`metric_tasks`, named like the eval tasks' `metric_task`) turns raw predictions and
  references into per-example arrays once (`prepare`), and sums them over a batch of bootstrap resamples
  (`totals`: indices (R, n) -> arrays (R,) or (R, K));
* a **metric** (`metrics`) is a short function of those per-resample totals returning (R,) values,
  registered under its eval.json name with the metric task it belongs to, or a tuple of them when several
  tasks share it (ROUGE-L, chrF and BLEU score both short answers and free text), and `share=False` when it
  is an amount, such as an error or a reward, rather than a share of examples; summaries print shares as %.

The point estimate is the same metric on the single "resample" `arange(n)`, so value and interval always
come from one definition. `score` and `compare` return plain Python values, ready for `json.dumps`;
a value that is undefined (no parsed number) or not finite is `None`.

What `predictions` and `references` mean per task:

| task | predictions | references |
| --- | --- | --- |
| classification | predicted label strings (any string; one outside the labels is wrong) | expected label strings |
| exact_match | answer strings | an accepted answer string, or a list of them, per example |
| text | free-text replies | a reference reply, or a list of them, per example |
| regression | model outputs: numbers, None, or text that `parse_number` reads | numbers (or numeric strings) |
| perplexity | (summed log-likelihood in nats, token count) per example, from `Engine.loglikelihood` | unused |
| preference | (score of the chosen reply, score of the rejected reply) per example | unused |
| judge | (P(chosen better) shown as A, shown as B) per pair, from `Judge.compare` | unused |
| reward | {"reply": text, "reward": number} per prompt: a generated reply and its reward-model score | unused |
| rating | a judge's score of each reply against its reference (a number) | unused |
| rating_agreement | a judge's score of each scored reply (a number) | the human score of that reply |

Perplexity, preference, judge and reward carry all their numbers in each prediction, so comparing two systems
needs nothing beyond their predictions; their `references` may be None. Preference, judge, reward and
rating_agreement are defined in eval/preference_metrics.py; text, rating and the exact_match metric task (its
answer columns from here, its text statistics from there) in eval/text_metrics.py.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunesmith.errors import UserError
from tunesmith.eval.stats import bootstrap_indices, mcnemar_p, percentile_interval, point_indices
from tunesmith.registry import metric_names, metric_tasks, metrics

Totals = dict[str, np.ndarray]  # per-resample sums; every task's totals include "count" (R,): examples scored
MetricFn = Callable[[Totals], np.ndarray]  # totals -> (R,) metric values

OTHER_LABEL = "<other>"  # confusion-matrix bucket for predictions outside the reference labels
_BLOCK_ELEMENTS = 1 << 22  # resamples are summed in blocks of ~4M (row, example) cells to bound temporaries


@dataclass(frozen=True)
class MetricTask:
    """How one task's raw outputs become the per-resample totals its metrics read.

    `correct` gives per-example correctness (n,) bool, for McNemar's test; None when the task has none.
    """

    prepare: Callable[[Sequence[Any], Sequence[Any] | None], Any]
    totals: Callable[[Any, np.ndarray], Totals]
    correct: Callable[[Any], np.ndarray] | None = None


def is_share(name: str) -> bool:
    """Whether metric `name` is a share of examples (shown as a percentage), not an amount."""
    return name not in metrics or metrics.info(name).get("share", True)


# ---------------------------------------------------------------------------------------------- scoring


def score(
    task: str, predictions: Sequence[Any], references: Sequence[Any] | None, *, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Every metric of `task`: {name: {"value", "ci95": [lo, hi], "n"}} with a percentile-bootstrap interval.

    `n` is the number of examples the metric scored; regression entries also carry `unparsed`, the
    number of predictions in which no number was found (left out of mse and mae).
    """
    spec = metric_tasks.get(task, key="task")
    n = _check_lengths(predictions, references)
    prepared = spec.prepare(predictions, references)
    point = spec.totals(prepared, point_indices(n))
    resampled = _resampled_totals(spec, prepared, bootstrap_indices(n, resamples, seed))
    results: dict[str, dict[str, Any]] = {}
    for name in metric_names(task):
        metric = metrics.get(name)
        low, high = percentile_interval(metric(resampled))
        entry = {
            "value": _json_float(metric(point)[0]),
            "ci95": [_json_float(low), _json_float(high)],
            "n": int(point["count"][0]),
        }
        if "unparsed" in point:
            entry["unparsed"] = int(point["unparsed"][0])
        results[name] = entry
    return results


def compare(
    task: str,
    predictions_a: Sequence[Any],
    predictions_b: Sequence[Any],
    references: Sequence[Any] | None,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """System a minus system b on the same examples: {metric: {"diff", "ci95"}}, plus "mcnemar_p"
    (classification, exact_match) from per-example correctness.

    The bootstrap draws the same example indices for both systems (a paired bootstrap), so the interval
    reflects how the systems differ on the examples, not which examples happened to be drawn.
    """
    spec = metric_tasks.get(task, key="task")
    n = _check_lengths(predictions_a, references)
    if len(predictions_b) != n:
        raise ValueError(f"system a has {n} predictions but system b has {len(predictions_b)}")
    prepared_a, prepared_b = spec.prepare(predictions_a, references), spec.prepare(predictions_b, references)
    indices = bootstrap_indices(n, resamples, seed)
    point_a, point_b = spec.totals(prepared_a, point_indices(n)), spec.totals(prepared_b, point_indices(n))
    resampled_a = _resampled_totals(spec, prepared_a, indices)
    resampled_b = _resampled_totals(spec, prepared_b, indices)
    results: dict[str, Any] = {}
    for name in metric_names(task):
        metric = metrics.get(name)
        with np.errstate(invalid="ignore"):  # inf - inf in a degenerate resample is NaN, and skipped
            low, high = percentile_interval(metric(resampled_a) - metric(resampled_b))
            diff = metric(point_a)[0] - metric(point_b)[0]
        results[name] = {"diff": _json_float(diff), "ci95": [_json_float(low), _json_float(high)]}
    if spec.correct is not None:
        results["mcnemar_p"] = mcnemar_p(spec.correct(prepared_a), spec.correct(prepared_b))
    return results


def _resampled_totals(spec: MetricTask, prepared: Any, indices: np.ndarray) -> Totals:
    rows = max(1, _BLOCK_ELEMENTS // indices.shape[1])
    blocks = [spec.totals(prepared, indices[start : start + rows]) for start in range(0, len(indices), rows)]
    return {name: np.concatenate([block[name] for block in blocks]) for name in blocks[0]}


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any] | None) -> int:
    if references is not None and len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("no examples to score")
    return len(predictions)


def _json_float(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def safe_divide(numerator: np.ndarray, denominator: np.ndarray, empty: float) -> np.ndarray:
    """numerator / denominator elementwise, `empty` where the denominator is 0."""
    out = np.full(np.broadcast(numerator, denominator).shape, empty, dtype=float)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)


def sum_columns(columns: Mapping[str, np.ndarray], indices: np.ndarray) -> Totals:
    """Totals of tasks whose metrics are ratios of per-example sums: {name: (R,)} over resamples (R, n)."""
    return {name: column[indices].sum(axis=1) for name, column in columns.items()}


# ---------------------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class LabelCodes:
    """Labels as integer codes. Code k < K is labels[k]; code K is any prediction outside the labels."""

    labels: list[str]  # sorted reference labels, K of them
    expected: np.ndarray  # (n,) int64 in [0, K)
    predicted: np.ndarray  # (n,) int64 in [0, K]


def _label(value: Any) -> str:
    return "" if value is None else str(value).strip()


def encode_labels(predictions: Sequence[Any], references: Sequence[Any]) -> LabelCodes:
    """Labels are compared as strings after stripping surrounding whitespace; nothing else is normalised
    (map free text to labels before scoring, e.g. with constrained decoding)."""
    expected_text = [_label(reference) for reference in references]
    predicted_text = [_label(prediction) for prediction in predictions]
    labels = sorted(set(expected_text))
    code = {label: k for k, label in enumerate(labels)}
    return LabelCodes(
        labels=labels,
        expected=np.array([code[text] for text in expected_text], dtype=np.int64),
        predicted=np.array([code.get(text, len(labels)) for text in predicted_text], dtype=np.int64),
    )


def class_totals(codes: LabelCodes, indices: np.ndarray) -> Totals:
    """Per-resample, per-label counts: "true", "predicted", "hits" (R, K); "correct", "count" (R,).

    One np.bincount per count over (resample * (K + 1) + code): bin K of each resample collects the
    predictions outside the labels, which are wrong and are dropped from the per-label counts.
    """
    resamples, n = indices.shape
    bins = len(codes.labels) + 1
    expected = codes.expected[indices]  # (R, n)
    predicted = codes.predicted[indices]  # (R, n)
    offset = np.arange(resamples)[:, None] * bins  # (R, 1)
    hit = expected == predicted

    def count(flat_bins: np.ndarray) -> np.ndarray:
        return np.bincount(flat_bins, minlength=resamples * bins).reshape(resamples, bins)[:, :-1]

    return {
        "count": np.full(resamples, n),
        "correct": hit.sum(axis=1),
        "true": count((offset + expected).ravel()),
        "predicted": count((offset + predicted).ravel()),
        "hits": count((offset + expected)[hit]),
    }


def class_scores(totals: Totals) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label precision, recall and F1, each (R, K); 0 where undefined (sklearn's zero_division=0)."""
    hits, true, predicted = totals["hits"], totals["true"], totals["predicted"]
    precision = safe_divide(hits, predicted, 0.0)
    recall = safe_divide(hits, true, 0.0)
    f1 = safe_divide(2 * hits, true + predicted, 0.0)  # = 2PR / (P + R), and 0 when P + R = 0
    return precision, recall, f1


def _macro(per_label: np.ndarray, totals: Totals) -> np.ndarray:
    """Unweighted mean over the labels that occur in this resample's references.

    This is sklearn's average='macro' with labels = sorted(set(references)) of the scored sample: a
    prediction outside the labels lowers its true label's recall but adds no phantom class, and a label
    that a resample happens not to contain is left out rather than counted as F1 = 0.
    """
    present = totals["true"] > 0
    return (per_label * present).sum(axis=1) / present.sum(axis=1)


def _classification_correct(codes: LabelCodes) -> np.ndarray:
    return codes.expected == codes.predicted


metric_tasks.register("classification")(
    MetricTask(prepare=encode_labels, totals=class_totals, correct=_classification_correct)
)


@metrics.register("accuracy", task="classification")
def accuracy(totals: Totals) -> np.ndarray:
    return totals["correct"] / totals["count"]


@metrics.register("micro_f1", task="classification")
def micro_f1(totals: Totals) -> np.ndarray:
    """Counting each prediction outside the labels as its own (wrong) class, micro precision = micro recall
    = accuracy for single-label data (sklearn's average='micro' with its default labels). Kept because
    reports compare it across papers."""
    return totals["correct"] / totals["count"]


@metrics.register("macro_f1", task="classification")
def macro_f1(totals: Totals) -> np.ndarray:
    return _macro(class_scores(totals)[2], totals)


@metrics.register("macro_precision", task="classification")
def macro_precision(totals: Totals) -> np.ndarray:
    return _macro(class_scores(totals)[0], totals)


@metrics.register("macro_recall", task="classification")
def macro_recall(totals: Totals) -> np.ndarray:
    return _macro(class_scores(totals)[1], totals)


@metrics.register("weighted_f1", task="classification")
def weighted_f1(totals: Totals) -> np.ndarray:
    """Per-label F1 weighted by the label's support (its count in the references)."""
    return (class_scores(totals)[2] * totals["true"]).sum(axis=1) / totals["true"].sum(axis=1)


def per_label(
    predictions: Sequence[Any], references: Sequence[Any], *, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """{label: {"precision", "recall", "f1", "support", "ci95": {"precision", "recall", "f1"}}} for each reference
    label, sorted by label, with percentile-bootstrap intervals from the same resamples as `score`'s."""
    n = _check_lengths(predictions, references)
    codes = encode_labels(predictions, references)
    point = class_scores(class_totals(codes, point_indices(n)))
    resampled = class_scores(
        _resampled_totals(metric_tasks.get("classification"), codes, bootstrap_indices(n, resamples, seed))
    )
    support = class_totals(codes, point_indices(n))["true"][0]
    names = ("precision", "recall", "f1")
    return {
        label: {
            **{name: float(value[0, k]) for name, value in zip(names, point)},
            "support": int(support[k]),
            "ci95": {
                name: [_json_float(bound) for bound in percentile_interval(value[:, k])]
                for name, value in zip(names, resampled)
            },
        }
        for k, label in enumerate(codes.labels)
    }


def confusion(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, list[Any]]:
    """{"labels", "matrix"}: matrix[i][j] counts examples expected labels[i] and predicted labels[j].

    The labels are the sorted reference labels, plus one last label, "<other>", only when some prediction
    falls outside them; it collects all such predictions (their row is all zeros, keeping the matrix
    square). `top_confusions` names the actual strings.
    """
    _check_lengths(predictions, references)
    codes = encode_labels(predictions, references)
    labels = list(codes.labels)
    if (codes.predicted == len(labels)).any():
        other = OTHER_LABEL
        while other in labels:
            other = f"<{other}>"
        labels.append(other)
    size = len(labels)
    matrix = np.bincount(codes.expected * size + codes.predicted, minlength=size * size).reshape(size, size)
    return {"labels": labels, "matrix": matrix.tolist()}


def top_confusions(predictions: Sequence[Any], references: Sequence[Any], k: int = 10) -> list[dict[str, Any]]:
    """The k most frequent (expected, predicted) pairs with expected != predicted, most frequent first
    (ties by expected, then predicted). Predictions outside the labels keep their own text."""
    _check_lengths(predictions, references)
    pairs = Counter((_label(reference), _label(prediction)) for prediction, reference in zip(predictions, references))
    wrong = sorted(
        ((-count, expected, predicted) for (expected, predicted), count in pairs.items() if expected != predicted)
    )
    return [{"expected": expected, "predicted": predicted, "count": -count} for count, expected, predicted in wrong[:k]]


# ------------------------------------------------------------------------------------------- exact match


_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the,
    collapse whitespace. Kept to SQuAD's exact rules so numbers compare with published ones."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, answer: str) -> float:
    """SQuAD token-overlap F1 between normalised answers; when either has no tokens, 1 if both have none."""
    predicted_tokens, answer_tokens = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not predicted_tokens or not answer_tokens:
        return float(predicted_tokens == answer_tokens)
    overlap = sum((Counter(predicted_tokens) & Counter(answer_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted_tokens), overlap / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def accepted_answers(reference: Any, index: int) -> list[str]:
    answers = [reference] if isinstance(reference, str) else list(reference)
    if not answers:
        raise UserError(f"reference {index} has no accepted answers; give at least one string")
    if any(answer is None for answer in answers):
        raise UserError(f"reference {index} has no answer text (None); give a string")
    return [str(answer) for answer in answers]


def answer_scores(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per-example exact_match, normalized_exact_match, token_f1 (n,), each the best over the accepted answers."""
    columns: dict[str, list[float]] = {"exact_match": [], "normalized_exact_match": [], "token_f1": []}
    for index, (prediction, reference) in enumerate(zip(predictions, references)):
        prediction = "" if prediction is None else str(prediction)
        answers = accepted_answers(reference, index)
        columns["exact_match"].append(max(float(prediction.strip() == answer.strip()) for answer in answers))
        columns["normalized_exact_match"].append(
            max(float(normalize_answer(prediction) == normalize_answer(answer)) for answer in answers)
        )
        columns["token_f1"].append(max(token_f1(prediction, answer) for answer in answers))
    arrays = {name: np.array(values) for name, values in columns.items()}
    return {"count": np.ones(len(predictions)), **arrays}


# The exact_match metric task (these answer columns, and the text statistics of ROUGE-L, chrF and BLEU) is
# registered in eval/text_metrics.py.


@metrics.register("exact_match", task="exact_match")
def exact_match(totals: Totals) -> np.ndarray:
    """Prediction equal to an accepted answer after stripping surrounding whitespace."""
    return totals["exact_match"] / totals["count"]


@metrics.register("normalized_exact_match", task="exact_match")
def normalized_exact_match(totals: Totals) -> np.ndarray:
    return totals["normalized_exact_match"] / totals["count"]


@metrics.register("token_f1", task="exact_match")
def mean_token_f1(totals: Totals) -> np.ndarray:
    return totals["token_f1"] / totals["count"]


# -------------------------------------------------------------------------------------------- regression


# A number with optional sign, thousands commas ("1,234"), decimals and exponent.
_NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: Any) -> float | None:
    """The first number in `text` ("1,234" -> 1234.0, "-3.5", "$2.50"), read after the last "####" when
    there is one (GSM8K's answer marker); None when there is no finite number. Numbers pass through."""
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, (int, float, np.integer, np.floating)):
        value = float(text)
        return value if math.isfinite(value) else None
    text = str(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group().replace(",", ""))
    return value if math.isfinite(value) else None


def regression_errors(predictions: Sequence[Any], references: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per-example squared and absolute errors (n,); an unparsed prediction counts 0 in "count" and 1 in
    "unparsed", so mse and mae average over the parsed predictions only."""
    expected = []
    for index, reference in enumerate(references):
        value = parse_number(reference)
        if value is None:
            raise UserError(f"reference {index} is not a number: {reference!r}; regression needs numeric answers")
        expected.append(value)
    parsed = [parse_number(prediction) for prediction in predictions]
    scored = np.array([value is not None for value in parsed])
    error = np.array([0.0 if value is None else value for value in parsed]) - np.array(expected)
    error[~scored] = 0.0
    return {
        "count": scored.astype(float),
        "unparsed": (~scored).astype(float),
        "squared_error": error**2,
        "absolute_error": np.abs(error),
    }


metric_tasks.register("regression")(MetricTask(prepare=regression_errors, totals=sum_columns))


@metrics.register("mse", task="regression", share=False)
def mse(totals: Totals) -> np.ndarray:
    return safe_divide(totals["squared_error"], totals["count"], math.nan)


@metrics.register("mae", task="regression", share=False)
def mae(totals: Totals) -> np.ndarray:
    return safe_divide(totals["absolute_error"], totals["count"], math.nan)


# ------------------------------------------------------------------------------------------- perplexity


def number_pairs(predictions: Sequence[Any], what: str) -> tuple[np.ndarray, np.ndarray]:
    """The two columns of per-example number pairs (n, 2), each (n,) float."""
    pairs = np.asarray(predictions, dtype=float)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.isfinite(pairs).all():
        raise ValueError(f"each prediction must be a pair of finite numbers: {what}")
    return pairs[:, 0], pairs[:, 1]


# Summed log-probabilities are <= 0; a little above 0 is float rounding (log-softmax of a near-certain token).
_LOGPROB_TOLERANCE = 1e-3  # nats per token


def token_losses(predictions: Sequence[Any], references: Sequence[Any] | None = None) -> dict[str, np.ndarray]:
    """Per-example negated summed log-likelihood ("nll", nats) and token count ("tokens"), (n,) each."""
    logprob, tokens = number_pairs(predictions, "(summed log-likelihood, token count)")
    if (tokens < 0).any() or (logprob > _LOGPROB_TOLERANCE * np.maximum(tokens, 1)).any():
        raise ValueError(
            "perplexity needs (summed log-likelihood <= 0, token count >= 0) pairs, as "
            "Engine.loglikelihood returns them; a positive sum looks like a negative log-likelihood"
        )
    return {"count": np.ones(len(tokens)), "nll": -logprob, "tokens": tokens}


metric_tasks.register("perplexity")(MetricTask(prepare=token_losses, totals=sum_columns))


@metrics.register("loss", task="perplexity", share=False)
def loss(totals: Totals) -> np.ndarray:
    """Mean negative log-likelihood per token, in nats: total loss over total tokens, so long examples
    weigh by their length."""
    return safe_divide(totals["nll"], totals["tokens"], math.nan)


@metrics.register("perplexity", task="perplexity", share=False)
def perplexity(totals: Totals) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.exp(loss(totals))
