"""Classification: the base model as a sequence classifier with one output per label, trained with cross-entropy.

The data is {text, label} rows (format classification) or conversations whose final assistant turn is the label.
The label set is the training data's, sorted; each example's input is the conversation before its label, with the
generation prompt, and the classifier reads its last token: where a generating model would begin the label. The
loop is the SFT loop (`train_loop`) with the base loaded as a sequence classifier (its new head trains with the
adapter) and `ClassifyObjective` as its loss and validation loss (val_loss, val_accuracy).

What it saves loads in plain transformers as a sequence classifier whose config names the labels (id2label):
full fine-tuning (and `freeze`) writes RUN/model/; LoRA (QLoRA, DoRA) writes RUN/adapter/ in PEFT's SEQ_CLS
format, the trained head inside it. With a validation set, the saved classifier is then calibrated on it
(eval/calibration.py): a temperature, and the confidence threshold of classify.abstain_precision or
classify.out_of_scope, written beside the weights as calibration.json.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch

from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData
from tunesmith.data.files import write_atomically
from tunesmith.data.validate import load_file, report
from tunesmith.engine.classifier import CALIBRATION_FILE, Classifier, save_labels
from tunesmith.errors import Problem, UserError
from tunesmith.eval.calibration import calibrate
from tunesmith.recipes.sft import train_loop
from tunesmith.registry import methods
from tunesmith.train.classify_loss import ClassifyObjective, balanced_weights
from tunesmith.train.session import RunResult, check_classifier_settings

ACCEPTS = ("chat",)
MAX_LABELS = 10_000


@methods.register("classify", accepts=ACCEPTS, labels=lambda config: training_labels(config))
def run_classify(config: Config) -> RunResult:
    check_classifier_settings(config, "classifier", "val_accuracy")
    labels = training_labels(config)
    check_out_of_scope(config, labels)
    held_out: list = []

    def build(data: PreparedData, *_) -> ClassifyObjective:
        held_out[:] = data.validation
        return build_classify_objective(config, data, len(labels))

    result = train_loop(config, accepts=ACCEPTS, build_objective=build, validate_objective=True, labels=labels)
    if result.output.is_dir():  # the label names travel with the weights (each rank writes the same file)
        save_labels(result.output, labels)
        if config.classify.calibrate and held_out:
            calibrate_saved(config, result, held_out, labels)
    return result


def calibrate_saved(config: Config, result: RunResult, validation: list, labels: list[str]) -> None:
    """Fit the saved classifier's calibration on the validation examples and write it beside its weights."""
    classifier = Classifier.load(result.run_dir, calibrated=False)
    logits = classifier.unit_logits(validation, config.train.batch_size * 8)
    expected = torch.tensor([unit.label for unit in validation])
    fitted = calibrate(logits, expected, labels, config.classify.abstain_precision, config.classify.out_of_scope)
    write_atomically(result.output / CALIBRATION_FILE, json.dumps(fitted, indent=1) + "\n")
    print(calibration_line(fitted), file=sys.stderr)


def calibration_line(fitted: dict) -> str:
    """One line on what calibration fitted, with the validation figures that chose it."""
    shown = fitted["validation"]
    before, after = shown["before"], shown["after"]
    line = (
        f"calibration on {shown['n']} validation examples: temperature {fitted['temperature']:.3f} "
        f"(NLL {before['nll']:.3f} -> {after['nll']:.3f}, ECE {before['ece']:.3f} -> {after['ece']:.3f})"
    )
    threshold = fitted["threshold"]
    if fitted["abstain_precision"] is not None:
        if threshold is None:
            return line + (
                f"; warning: no confidence threshold reaches precision {fitted['abstain_precision']:.3f} on the "
                f"validation set, so the classifier never abstains; fix: lower classify.abstain_precision"
            )
        return line + (
            f"; abstains below confidence {threshold:.3f} (validation: coverage {shown['coverage']:.1%}, "
            f"precision {shown['selective_accuracy']:.1%})"
        )
    if fitted["out_of_scope"] is not None:
        sent = "never" if threshold is None else f"below confidence {threshold:.3f}"
        scores = ", ".join(
            f"{name.replace('_', ' ')} {shown[name]:.1%}"
            for name in ("accuracy", "in_scope_accuracy", "out_of_scope_recall")
            if name in shown
        )
        return line + f"; answers {fitted['out_of_scope']} {sent} (validation: {scores})"
    return line


def check_out_of_scope(config: Config, labels: list[str]) -> None:
    name = config.classify.out_of_scope
    if name is not None and name not in labels:
        raise UserError(
            f"classify.out_of_scope: {name!r} is not a label of {config.data.train}; the classifier must learn "
            f"it from examples; fix: add out-of-scope examples labelled {name!r}, or name one of the labels"
        )
    if (name is not None or config.classify.abstain_precision is not None) and not (
        config.data.validation or config.data.val_fraction
    ):
        raise UserError(
            "classify: a confidence threshold is chosen on the validation set, and there is none; fix: set "
            "data.validation or data.val_fraction"
        )


def build_classify_objective(config: Config, data: PreparedData, classes: int) -> ClassifyObjective:
    """The loss with the config's label smoothing, and balanced class weights from the training examples' labels."""
    weights = None
    if config.classify.class_weights == "balanced":
        weights = balanced_weights([unit.label for unit in data.train], classes)
    return ClassifyObjective(config.classify.label_smoothing, weights)


def training_labels(config: Config) -> list[str]:
    """The training data's labels, sorted: the text of each example's final assistant turn. A row whose last turn
    is not the assistant's is refused by line; a single class, or more than MAX_LABELS, is refused; a class with
    one example is named in a warning (a held-out split cannot hold it back for validation)."""
    data = config.data
    loaded = load_file(data.train, data.format, ACCEPTS, "classify", columns=data.columns)
    problems = list(loaded.problems)
    counts: Counter[str] = Counter()
    for example in loaded.examples:
        last = example.messages[-1]
        if last["role"] != "assistant" or not last["content"].strip():
            problems.append(
                Problem(
                    f"{data.train}:{example.line}",
                    "a classification row ends with its label as the assistant's turn; fix: give each row a "
                    "non-empty label (format classification: {text, label})",
                )
            )
            continue
        counts[last["content"]] += 1
    if problems and not data.skip_bad_rows:
        raise UserError(f"{data.train}: {len(problems)} problem(s); nothing was trained\n{report(problems)}")
    if len(counts) < 2:
        raise UserError(
            f"{data.train}: the labels hold {len(counts)} class{'' if len(counts) == 1 else 'es'} "
            f"({', '.join(counts) or 'none'}); a classifier needs at least two; fix: add rows of the other classes"
        )
    if len(counts) > MAX_LABELS:
        raise UserError(
            f"{data.train}: {len(counts)} distinct labels, more than {MAX_LABELS:,}; is the label column the text? "
            f"fix: map the label column (data.columns, e.g. label=intent)"
        )
    single = sorted(label for label, count in counts.items() if count == 1)
    if single:
        shown = ", ".join(single[:10]) + (f" and {len(single) - 10} more" if len(single) > 10 else "")
        print(
            f"warning: {data.train}: {len(single)} label(s) have one training example ({shown}); a validation split "
            f"cannot hold one back, and the model sees each once",
            file=sys.stderr,
        )
    return sorted(counts)
