"""A classifier's calibration: temperature scaling lowers the NLL of a miscalibrated model without changing its
labels, the expected calibration error matches its hand-computed value, the abstain threshold meets the asked
precision on the data it was chosen on, the out-of-scope threshold is the one of best accuracy, and a classify
run with a validation set saves its calibration, which eval reports with ECE, a reliability diagram and coverage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_classify import ROWS, WORDS, classify_config
from test_training import run

from tunesmith.eval.calibration import (
    calibration_predictions,
    calibration_totals,
    ece,
    fit_temperature,
    mean_nll,
    out_of_scope_threshold,
    precision_threshold,
    prepare,
    reliability,
)
from tunesmith.eval.stats import point_indices


def overconfident(n: int = 2000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model whose probabilities are too sharp: the true scores, multiplied by 4."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    scores = torch.randn(n, classes, generator=generator)
    scores[torch.arange(n), labels] += 1.0  # informative, not certain
    return scores * 4.0, labels


def test_temperature_scaling_lowers_the_nll_of_an_overconfident_model_and_keeps_its_labels():
    logits, labels = overconfident()
    temperature = fit_temperature(logits, labels)
    assert 3.0 < temperature < 5.0  # it undoes the sharpening
    assert mean_nll(logits, labels, temperature) < mean_nll(logits, labels) - 0.5
    for other in (temperature * 0.9, temperature * 1.1):  # a minimum, not merely lower
        assert mean_nll(logits, labels, temperature) < mean_nll(logits, labels, other)
    assert torch.equal((logits / temperature).argmax(-1), logits.argmax(-1))
    raw = calibration_predictions(torch.softmax(logits, -1).numpy(), labels.numpy())
    scaled = calibration_predictions(torch.softmax(logits / temperature, -1).numpy(), labels.numpy())

    def ece_of(predictions):
        return float(ece(calibration_totals(prepare(predictions, None), point_indices(len(predictions))))[0])

    assert ece_of(scaled) < 0.03 < 0.1 < ece_of(raw)


def test_ece_and_the_reliability_bins_match_hand_computed_values():
    # confidences in two bins of 15: 0.95 (bin 14) x3, two right; 0.5 (bin 7) x2, one right
    predictions = [(0.95, True, 0.95, True), (0.95, True, 0.95, True), (0.95, False, 0.02, True)]
    predictions += [(0.5, True, 0.5, True), (0.5, False, 0.3, True)]
    totals = calibration_totals(prepare(predictions, None), point_indices(5))
    expected = (3 / 5) * abs(2 / 3 - 0.95) + (2 / 5) * abs(1 / 2 - 0.5)
    assert float(ece(totals)[0]) == pytest.approx(expected)
    bins = reliability(predictions)
    assert [(b["count"], b["accuracy"]) for b in bins] == [(2, 0.5), (3, pytest.approx(2 / 3))]
    assert bins[0]["low"] == pytest.approx(7 / 15) and bins[1]["high"] == pytest.approx(1.0)


@pytest.mark.parametrize("precision", [0.8, 0.9, 0.97])
def test_the_abstain_threshold_meets_the_asked_precision_and_answers_the_most(precision):
    logits, labels = overconfident(seed=1)
    probabilities = torch.softmax(logits / fit_temperature(logits, labels), -1).numpy()
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels.numpy()
    assert correct.mean() < 0.8  # abstaining is needed to reach every asked precision
    threshold = precision_threshold(confidence, correct, precision)
    answered = confidence >= threshold
    assert correct[answered].mean() >= precision and 0 < answered.mean() < 1
    lower = confidence[confidence < threshold].max()  # answering one more confidence level misses the precision
    assert correct[confidence >= lower].mean() < precision
    assert precision_threshold(np.array([0.9, 0.8]), np.array([False, False]), 0.5) is None


def test_the_out_of_scope_threshold_weighs_rare_out_of_scope_messages_as_much_as_the_rest():
    # ten in-scope messages, all right; two out-of-scope ones, both given an in-scope label with middling confidence
    confidence = np.array([0.9] * 8 + [0.45, 0.45] + [0.4, 0.5])
    expected = np.array([1] * 10 + [0, 0])
    predicted = np.array([1] * 10 + [1, 2])
    threshold = out_of_scope_threshold(confidence, predicted, expected, 0)
    assert threshold == pytest.approx(0.9)  # in-scope accuracy 80%, out-of-scope recall 100%: balanced 90%
    # the threshold of best plain accuracy (11/12) would catch one out-of-scope message of two
    answers = np.where(confidence >= threshold, predicted, 0)
    assert (answers[expected == 0] == 0).all() and (answers[expected == 1] == 1).mean() == pytest.approx(0.8)


def test_the_out_of_scope_threshold_sends_the_unsure_messages_out_of_scope():
    # label 0 is out of scope; confident answers are right, unsure ones are out-of-scope messages
    confidence = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.35, 0.6])
    predicted = np.array([1, 2, 1, 2, 1, 0, 2])
    expected = np.array([1, 2, 1, 0, 0, 0, 2])
    threshold = out_of_scope_threshold(confidence, predicted, expected, 0)
    assert threshold == pytest.approx(0.6)  # below 0.6 every message is out of scope: 7/7 right
    answers = np.where(confidence >= threshold, predicted, 0)
    assert (answers == expected).all()
    assert out_of_scope_threshold(confidence, expected, expected, 0) is None  # already right: turn none away


def test_a_classify_run_saves_its_calibration_and_eval_reports_it(tmp_path, tiny_model):
    from conftest import write_jsonl

    from tunesmith.engine.classifier import CALIBRATION_FILE, Classifier
    from tunesmith.eval.evaluate import EvalOptions, evaluate

    rows = ROWS * 3
    config = classify_config(
        tmp_path,
        tiny_model,
        rows,
        "data.val_fraction=0.25",
        "classify.abstain_precision=0.9",
        "train.epochs=3",
        "train.lr=1e-2",
        "train.batch_size=4",
    )
    result = run(config)
    saved = json.loads((result.output / CALIBRATION_FILE).read_text())
    assert saved["temperature"] > 0 and saved["validation"]["n"] == 9
    assert saved["validation"]["after"]["nll"] <= saved["validation"]["before"]["nll"] + 1e-9
    assert saved["threshold"] is None or saved["validation"]["selective_accuracy"] >= 0.9
    classifier = Classifier.load(result.run_dir)
    assert classifier.calibration.temperature == pytest.approx(saved["temperature"])

    test = write_jsonl(tmp_path / "test.jsonl", ROWS)
    report = evaluate(str(config.output_dir), test, EvalOptions(task="classification", resamples=50), tmp_path / "e")
    section = report["calibration"]
    assert section["temperature"] == pytest.approx(saved["temperature"])
    assert 0 <= section["ece"]["value"] <= 1 and len(section["ece"]["ci95"]) == 2
    assert sum(b["count"] for b in section["reliability"]) == len(ROWS)
    if saved["threshold"] is not None:
        answers = classifier.classify([[{"role": "user", "content": row["text"]}] for row in ROWS])
        assert section["coverage"]["value"] == pytest.approx(np.mean([not a.abstained for a in answers]))
    per_label = report["per_label"]
    assert set(per_label) == set(WORDS) and all(len(entry["ci95"]["f1"]) == 2 for entry in per_label.values())
    html = (tmp_path / "e" / "report.html").read_text()
    assert "Calibration" in html and "reliability" in html.lower()


def test_eval_refuses_labels_the_classifier_never_saw_by_line(tmp_path, tiny_model):
    from conftest import write_jsonl

    from tunesmith.errors import UserError
    from tunesmith.eval.evaluate import EvalOptions, evaluate

    config = classify_config(tmp_path, tiny_model, ROWS, "train.max_steps=1")
    run(config)
    test = write_jsonl(tmp_path / "test.jsonl", [ROWS[0], {"text": "hello", "label": "greeting"}])
    with pytest.raises(UserError) as refused:
        evaluate(str(config.output_dir), test, EvalOptions(task="classification"), tmp_path / "e")
    assert f"{test}:2" in str(refused.value) and "'greeting'" in str(refused.value)


def test_out_of_scope_must_be_a_training_label_and_needs_a_validation_set(tmp_path, tiny_model):
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match="'oos' is not a label"):
        run(classify_config(tmp_path, tiny_model, ROWS, "classify.out_of_scope=oos", "data.val_fraction=0.2"))
    with pytest.raises(UserError, match="no.*validation|there is none"):
        run(classify_config(tmp_path, tiny_model, ROWS, "classify.abstain_precision=0.9", name="other"))


def test_eval_counts_abstentions_as_out_of_scope_for_in_scope_accuracy_and_out_of_scope_recall():
    from tunesmith.engine.classifier import Calibration
    from tunesmith.eval.calibration import calibration_section

    labels = ["a", "b", "oos"]
    probabilities = np.array([[0.9, 0.05, 0.05], [0.3, 0.5, 0.2], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    expected = ["a", "oos", "oos", "a"]
    answers = ["a", "oos", "a", "b"]  # Classifier.answers: below confidence 0.6 it answers oos
    section = calibration_section(probabilities, expected, labels, Calibration(1.0, 0.6, "oos"), answers, resamples=50)
    assert section["in_scope_accuracy"]["value"] == pytest.approx(0.5)  # a right; a answered b
    assert section["out_of_scope_recall"]["value"] == pytest.approx(0.5)  # one abstained; one answered a
    assert section["coverage"]["value"] == pytest.approx(0.75) and section["selective_accuracy"]["value"] == 1 / 3
