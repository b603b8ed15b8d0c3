"""Classification: the base model as a sequence classifier with one output per label, trained with cross-entropy.

The data is {text, label} rows (format classification) or conversations whose final assistant turn is the label.
The label set is the training data's, sorted; each example's input is the conversation before its label, with the
generation prompt, and the classifier reads its last token: where a generating model would begin the label. The
loop is the SFT loop (`train_loop`) with the base loaded as a sequence classifier (its new head trains with the
adapter) and `ClassifyObjective` as its loss and validation loss (val_loss, val_accuracy).

What it saves loads in plain transformers as a sequence classifier whose config names the labels (id2label):
full fine-tuning (and `freeze`) writes RUN/model/; LoRA (QLoRA, DoRA) writes RUN/adapter/ in PEFT's SEQ_CLS
format, the trained head inside it.
"""

from __future__ import annotations

import sys
from collections import Counter

from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData
from tunesmith.data.validate import load_file, report
from tunesmith.engine.classifier import save_labels
from tunesmith.errors import Problem, UserError
from tunesmith.recipes.sft import train_loop
from tunesmith.registry import methods
from tunesmith.train.classify_loss import ClassifyObjective, balanced_weights
from tunesmith.train.session import RunResult, check_classifier_settings

ACCEPTS = ("chat",)
MAX_LABELS = 10_000


@methods.register("classify", accepts=ACCEPTS)
def run_classify(config: Config) -> RunResult:
    check_classifier_settings(config, "classifier", "val_accuracy")
    labels = training_labels(config)
    result = train_loop(
        config,
        accepts=ACCEPTS,
        build_objective=lambda data, *_: build_classify_objective(config, data, len(labels)),
        validate_objective=True,
        labels=labels,
    )
    if result.output.is_dir():  # the label names travel with the weights (each rank writes the same file)
        save_labels(result.output, labels)
    return result


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
