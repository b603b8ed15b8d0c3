"""Evaluation metrics: hand-computed values, agreement with scikit-learn, bootstrap intervals, McNemar."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score, precision_recall_fscore_support, recall_score

from tunesmith.errors import UserError
from tunesmith.eval import metrics as M
from tunesmith.eval.stats import bootstrap_indices, mcnemar_p, percentile_interval, point_indices

CLASSIFICATION = ["accuracy", "macro_f1", "macro_precision", "macro_recall", "micro_f1", "weighted_f1"]


def noisy_labels(n: int, seed: int, labels=("a", "b", "c", "d", "e"), right=0.6, invalid=0.05):
    """References over `labels`, predictions right with probability `right`, '<invalid>' sometimes."""
    rng = np.random.default_rng(seed)
    references = [labels[i] for i in rng.integers(0, len(labels), n)]
    predictions = [
        reference if rng.random() < right else labels[rng.integers(0, len(labels))] for reference in references
    ]
    return [p if rng.random() > invalid else "<invalid>" for p in predictions], references


def sklearn_metrics(predictions, references) -> dict[str, float]:
    """The reference definitions: macro/weighted over the labels in the references, micro over all."""
    labels = sorted(set(references))
    averaged = {
        f"{kind}_{average}": precision_recall_fscore_support(
            references, predictions, labels=labels, average=average, zero_division=0
        )[index]
        for average in ("macro", "weighted")
        for index, kind in ((0, "p"), (1, "r"), (2, "f1"))
    }
    return {
        "accuracy": float(np.mean(np.array(predictions) == np.array(references))),
        "macro_f1": averaged["f1_macro"],
        "macro_precision": averaged["p_macro"],
        "macro_recall": averaged["r_macro"],
        "weighted_f1": averaged["f1_weighted"],
        "micro_f1": f1_score(references, predictions, average="micro", zero_division=0),
    }


# ------------------------------------------------------------------------------------ classification


def test_accuracy_three_of_four():
    result = M.score("classification", ["a", "b", "c", "a"], ["a", "b", "c", "b"], resamples=100)
    assert result["accuracy"]["value"] == 0.75 and result["accuracy"]["n"] == 4
    assert set(result) == set(CLASSIFICATION)


def test_macro_f1_on_a_three_class_toy_equals_sklearn():
    references = ["cat", "cat", "dog", "dog", "bird", "bird", "cat"]
    predictions = ["cat", "dog", "dog", "dog", "bird", "cat", "cat"]
    result = M.score("classification", predictions, references, resamples=10)
    assert result["macro_f1"]["value"] == pytest.approx(f1_score(references, predictions, average="macro"))
    # By hand: bird P=1 R=1/2, cat P=2/3 R=2/3, dog P=2/3 R=1 -> F1s 2/3, 2/3, 4/5.
    assert result["macro_f1"]["value"] == pytest.approx((2 / 3 + 2 / 3 + 4 / 5) / 3)


def test_every_classification_metric_equals_sklearn_with_invalid_predictions():
    predictions, references = noisy_labels(300, seed=1)
    assert "<invalid>" in predictions
    result = M.score("classification", predictions, references, resamples=10)
    expected = sklearn_metrics(predictions, references)
    for name in CLASSIFICATION:
        assert result[name]["value"] == pytest.approx(expected[name]), name
    # An invalid prediction is wrong, but adds no class to the macro average.
    assert result["macro_recall"]["value"] == pytest.approx(
        recall_score(references, predictions, labels=sorted(set(references)), average="macro")
    )


def test_vectorised_bootstrap_equals_a_slow_sklearn_loop():
    predictions, references = noisy_labels(60, seed=2, labels=("a", "b", "c", "d", "e", "f", "g"))
    codes = M.encode_labels(predictions, references)
    indices = bootstrap_indices(len(references), resamples=5, seed=3)
    totals = M.class_totals(codes, indices)
    for row, sample in enumerate(indices):
        expected = sklearn_metrics([predictions[i] for i in sample], [references[i] for i in sample])
        for name in CLASSIFICATION:
            assert M.metrics.get(name)(totals)[row] == pytest.approx(expected[name]), (name, row)


def test_per_label_confusion_and_top_confusions():
    references = ["a", "a", "a", "b", "b", "c"]
    predictions = ["a", "b", "<invalid>", "b", "a", "c"]
    per_label = M.per_label(predictions, references)
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predictions, labels=["a", "b", "c"], zero_division=0
    )
    assert list(per_label) == ["a", "b", "c"], "reference labels only: '<invalid>' is in the confusion matrix"
    for k, label in enumerate(["a", "b", "c"]):
        assert per_label[label]["precision"] == pytest.approx(precision[k])
        assert per_label[label]["recall"] == pytest.approx(recall[k])
        assert per_label[label]["f1"] == pytest.approx(f1[k]) and per_label[label]["support"] == support[k]
    assert M.confusion(predictions, references) == {
        "labels": ["a", "b", "c", "<other>"],
        "matrix": [[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]],
    }
    assert M.confusion(["a", "a"], ["a", "b"])["labels"] == ["a", "b"], "no extra label without outside predictions"
    top = M.top_confusions(["b", "b", "a", "x", "a"], ["a", "a", "b", "a", "a"], k=2)
    assert top == [{"expected": "a", "predicted": "b", "count": 2}, {"expected": "a", "predicted": "x", "count": 1}]


# ---------------------------------------------------------------------------------------- exact match


def test_exact_match_normalised_and_token_f1_on_squad_style_answers():
    assert M.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert M.token_f1("the big red dog", "a red dog") == pytest.approx(0.8)  # P = 2/3, R = 1
    assert M.token_f1("", "") == 1.0 and M.token_f1("the", "dog") == 0.0
    result = M.score(
        "exact_match",
        ["The Eiffel Tower", " Paris ", "red dog", "blue"],
        ["eiffel tower", "Paris", ["the big red dog", "red dog"], "green"],
        resamples=10,
    )
    assert result["exact_match"]["value"] == pytest.approx(2 / 4)  # " Paris " and the second accepted answer
    assert result["normalized_exact_match"]["value"] == pytest.approx(3 / 4)
    assert result["token_f1"]["value"] == pytest.approx(3 / 4)  # best answer per example: 1, 1, 1, 0


def test_an_empty_list_of_accepted_answers_is_a_user_error():
    with pytest.raises(UserError, match="reference 1 has no accepted answers"):
        M.score("exact_match", ["a", "b"], ["a", []], resamples=10)


# ---------------------------------------------------------------------------- regression, ppl, preference


def test_parse_number():
    assert M.parse_number("so 1,234 apples") == 1234.0 and M.parse_number("-3.5 degrees") == -3.5
    assert M.parse_number("3 + 4 = 7\n#### 42") == 42.0 and M.parse_number("$2.50 each") == 2.5
    assert M.parse_number("12,34") == 12.0 and M.parse_number(7) == 7.0 and M.parse_number("1e3") == 1000.0
    assert M.parse_number("no number") is None and M.parse_number(None) is None
    assert M.parse_number(float("nan")) is None


def test_mse_and_mae_over_parsed_predictions_only():
    result = M.score("regression", [1, "about 3", "#### 10", "no idea"], [2, 3, 7, "5"], resamples=50)
    assert result["mse"]["value"] == pytest.approx(10 / 3) and result["mae"]["value"] == pytest.approx(4 / 3)
    assert result["mse"]["n"] == 3 and result["mse"]["unparsed"] == 1
    nothing = M.score("regression", ["?", None], [1, 2], resamples=10)
    assert nothing["mse"] == {"value": None, "ci95": [None, None], "n": 0, "unparsed": 2}
    with pytest.raises(UserError, match="reference 0 is not a number"):
        M.score("regression", ["1"], ["one"], resamples=10)


def test_perplexity_is_exp_of_the_token_weighted_mean_loss():
    pairs = [(-2.0, 2), (-6.0, 3)]  # (summed log-likelihood, tokens), as Engine.loglikelihood gives
    result = M.score("perplexity", pairs, None, resamples=50)
    assert result["loss"]["value"] == pytest.approx(8 / 5)  # not the mean of per-example losses (1.5)
    assert result["perplexity"]["value"] == pytest.approx(math.exp(8 / 5))
    low, high = result["perplexity"]["ci95"]
    assert math.exp(1.0) - 1e-9 <= low <= high <= math.exp(2.0) + 1e-9
    with pytest.raises(ValueError, match="log-likelihood"):
        M.score("perplexity", [(5.0, 2)], None)


def test_preference_accuracy_counts_strict_wins():
    result = M.score("preference", [(1.0, 0.0), (0.0, 1.0), (2.0, 2.0), (3.0, 1.0)], None, resamples=50)
    assert result["preference_accuracy"]["value"] == 0.5 and result["preference_accuracy"]["n"] == 4


def test_implicit_reward_accuracy_ranks_by_the_log_ratio_to_the_base():
    from tunesmith.eval.preference_metrics import implicit_reward_accuracy

    tuned = [(-10.0, -12.0), (-20.0, -5.0), (-3.0, -3.0)]  # (chosen, rejected) log-likelihoods
    base = [(-11.0, -11.0), (-22.0, -8.0), (-3.0, -3.0)]  # ratios: +1 vs -1 (win), +2 vs +3 (loss), 0 vs 0 (tie: loss)
    result = implicit_reward_accuracy(tuned, base, resamples=100)
    assert (
        result["value"] == pytest.approx(1 / 3)
        and result["n"] == 3
        and 0 <= result["ci95"][0] <= result["ci95"][1] <= 1
    )
    # The base's own ranking by log-likelihood: -11 vs -11 (tie: loss), -22 vs -8 (loss), tie (loss): 0 of 3.
    versus = result["vs_base_loglik"]
    assert (
        versus["diff"] == pytest.approx(1 / 3) and -1 <= versus["ci95"][0] <= versus["diff"] <= versus["ci95"][1] <= 1
    )


def test_mean_reward_of_replies_and_its_paired_difference():
    tuned = [
        {"reply": "I can't help with that.", "reward": 2.0},
        {"reply": "Sure", "reward": 0.5},
        {"reply": "No", "reward": 1.0},
    ]
    base = [
        {"reply": "Here is how", "reward": 1.0},
        {"reply": "Sure thing", "reward": 0.0},
        {"reply": "Maybe", "reward": 0.5},
    ]
    result = M.score("reward", tuned, None, resamples=50)
    assert result["mean_reward"]["value"] == pytest.approx(3.5 / 3) and result["mean_reward"]["n"] == 3
    assert result["reply_words"]["value"] == pytest.approx(7 / 3)
    diff = M.compare("reward", tuned, base, None, resamples=200)["mean_reward"]
    assert diff["diff"] == pytest.approx(2.0 / 3)
    assert diff["ci95"][0] == pytest.approx(0.5) and diff["ci95"][1] == pytest.approx(1.0), (
        "every prompt gained 0.5 to 1"
    )
    with pytest.raises(ValueError, match="finite reward"):
        M.score("reward", [{"reply": "x", "reward": float("nan")}], None)


# ----------------------------------------------------------------------------------- intervals, pairing


def test_interval_contains_the_estimate_and_narrows_with_more_examples():
    widths = []
    for n in (50, 2000):
        predictions, references = noisy_labels(n, seed=4)
        result = M.score("classification", predictions, references, resamples=500)
        for name in CLASSIFICATION:
            low, high = result[name]["ci95"]
            assert low <= result[name]["value"] <= high, (name, n)
        widths.append(result["accuracy"]["ci95"][1] - result["accuracy"]["ci95"][0])
    assert widths[1] < widths[0] / 3  # ~ 1 / sqrt(n): sqrt(40) ~ 6.3 times narrower


def test_same_seed_same_interval_other_seed_other_interval():
    predictions, references = noisy_labels(200, seed=5)
    first = M.score("classification", predictions, references, resamples=200, seed=7)
    again = M.score("classification", predictions, references, resamples=200, seed=7)
    other = M.score("classification", predictions, references, resamples=200, seed=8)
    assert first == again
    assert first["macro_f1"]["ci95"] != other["macro_f1"]["ci95"]
    assert np.array_equal(bootstrap_indices(10, 3, seed=1), bootstrap_indices(10, 3, seed=1))


def test_results_are_plain_json_values():
    predictions, references = noisy_labels(40, seed=6)
    result = M.score("classification", predictions, references, resamples=20)
    comparison = M.compare("classification", predictions, references, references, resamples=20)
    json.dumps(
        [result, comparison, M.per_label(predictions, references), M.confusion(predictions, references)],
        allow_nan=False,
    )
    assert all(type(entry["value"]) is float and type(entry["n"]) is int for entry in result.values())
    assert type(comparison["mcnemar_p"]) is float and type(comparison["accuracy"]["ci95"][0]) is float


def test_a_system_compared_with_itself_differs_by_exactly_zero():
    predictions, references = noisy_labels(100, seed=7)
    comparison = M.compare("classification", predictions, predictions, references, resamples=200)
    for name in CLASSIFICATION:
        assert comparison[name] == {"diff": 0.0, "ci95": [0.0, 0.0]}
    assert comparison["mcnemar_p"] == 1.0
    pairs = [(-1.0, 2), (-3.0, 4), (-2.0, 1)]
    assert M.compare("perplexity", pairs, pairs, None, resamples=50)["loss"] == {"diff": 0.0, "ci95": [0.0, 0.0]}


def test_paired_comparison_uses_the_same_examples_for_both_systems():
    references = ["a", "b"] * 50
    better = list(references)
    worse = ["b" if i % 4 == 0 else r for i, r in enumerate(references)]  # wrong on every other 'a': 25 of 100
    comparison = M.compare("classification", better, worse, references, resamples=300)
    assert comparison["accuracy"]["diff"] == pytest.approx(0.25)
    low, high = comparison["accuracy"]["ci95"]
    assert 0 < low <= 0.25 <= high, "paired: the difference is never negative in any resample"
    assert comparison["mcnemar_p"] == pytest.approx(2 * 0.5**25)  # b = 25, c = 0


def test_percentile_interval():
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert percentile_interval(np.array([1.0, np.nan, 3.0]), level=0.5) == pytest.approx((1.5, 2.5))
    assert all(math.isnan(bound) for bound in percentile_interval(np.array([np.nan])))


def test_exact_match_comparison_reports_mcnemar_on_normalised_match():
    comparison = M.compare(
        "exact_match", ["The Eiffel Tower", "x"], ["eiffel tower", "x"], ["eiffel tower", "x"], resamples=20
    )
    assert comparison["exact_match"]["diff"] == -0.5 and comparison["mcnemar_p"] == 1.0
    assert "mcnemar_p" not in M.compare("regression", [1, 2], [1, 3], [1, 2], resamples=20)


# ------------------------------------------------------------------------------------------- McNemar


def test_mcnemar_exact_p_values():
    assert mcnemar_p([True, False, True], [True, False, True]) == 1.0
    # b = 1 (only a right), c = 6 (only b right): 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8 / 128.
    only_a, only_b = [True] + [False] * 6, [False] + [True] * 6
    assert mcnemar_p(only_a, only_b) == pytest.approx(0.125)
    rng = np.random.default_rng(0)
    a = rng.random(100) < 0.9
    b = a & (rng.random(100) < 0.5)  # b loses about half of a's right answers and gains none
    assert mcnemar_p(a, b) < 0.001
    for wins, trials in ((3, 10), (0, 1), (40, 100), (1, 30)):
        correct_a = [True] * wins + [False] * (trials - wins)
        assert mcnemar_p(correct_a, [not c for c in correct_a]) == pytest.approx(binomtest(wins, trials).pvalue)


def test_unknown_task_names_the_closest():
    with pytest.raises(UserError, match="did you mean 'classification'"):
        M.score("clasification", ["a"], ["a"])


def test_point_indices_is_the_data_itself():
    assert point_indices(3).tolist() == [[0, 1, 2]]
