"""method: classify: the base as a sequence classifier over the training data's labels. It learns, its head and
adapter train while the base stays, the saved adapter or model reloads in plain transformers (+ peft) with the
same logits and the label names, resume is exact, and bad labels are refused by line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_config, metric_lines, run, straight_and_resumed

from tunesmith import rundir
from tunesmith.data.formats import convert_classification
from tunesmith.data.packing import collate
from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.engine.reward_model import sequence_logits
from tunesmith.errors import UserError
from tunesmith.models import load_model
from tunesmith.models.adapters import apply_adapter, load_trainable_state

WORDS = {"card_lost": "I lost my card", "refund": "please refund the payment", "fee": "why was I charged a fee"}
ROWS = [{"text": f"{text} {i}", "label": label} for i in range(4) for label, text in WORDS.items()]


def classify_config(tmp_path, model_dir, rows, *overrides, name="run"):
    return make_config(tmp_path, model_dir, rows, "method=classify", "data.max_length=64", *overrides, name=name)


def trained_logits(config, rows: list[dict]) -> tuple[torch.Tensor, list[list[int]]]:
    """The trained classifier's logits for `rows` through the training path, and each input's token ids."""
    model, tokenizer = load_model(str(config.model), num_labels=len(WORDS))
    model = apply_adapter(model, config.adapter)
    load_trainable_state(model, rundir.read_weights(rundir.latest_checkpoint(config.output_dir / "checkpoints")))
    chat = ChatTokenizer(tokenizer)
    units = [chat.tokenize_input(convert_classification(row).messages[:-1]) for row in rows]
    with torch.no_grad():
        return sequence_logits(model.eval(), collate(units)), [unit.input_ids for unit in units]


def test_lora_learns_the_labels_and_the_adapter_reloads_in_plain_transformers(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    config = classify_config(tmp_path, tiny_model, ROWS, "train.epochs=8", "train.lr=1e-2", "train.batch_size=4")
    result = run(config)
    steps = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [step for step in steps if "loss" in step]
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["accuracy"] == 1.0

    saved = load_file(result.output / "adapter_model.safetensors")
    assert json.loads((result.output / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert any("score" in name for name in saved), "the trained head ships inside the adapter"
    base, _ = load_model(str(tiny_model))
    frozen = dict(base.named_parameters())
    model, _ = load_model(str(tiny_model), num_labels=len(WORDS))
    model = apply_adapter(model, config.adapter)
    load_trainable_state(model, rundir.read_weights(rundir.latest_checkpoint(config.output_dir / "checkpoints")))
    compared = 0
    for name, parameter in model.named_parameters():  # the base's weights are the base's: only adapter and head train
        plain_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if not parameter.requires_grad and plain_name in frozen:
            torch.testing.assert_close(parameter, frozen[plain_name])
            compared += 1
    assert compared > 10 and any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())

    logits, ids = trained_logits(config, ROWS)
    labels = sorted(WORDS)
    assert [labels[i] for i in logits.argmax(-1).tolist()] == [row["label"] for row in ROWS]
    plain = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=len(WORDS)), result.output
    ).eval()
    with torch.no_grad():
        reloaded = torch.stack([plain(input_ids=torch.tensor([row])).logits[0] for row in ids])
    torch.testing.assert_close(reloaded, logits)


def test_full_fine_tuning_saves_a_classifier_that_names_its_labels(tmp_path, tiny_model):
    from transformers import AutoModelForSequenceClassification

    config = classify_config(tmp_path, tiny_model, ROWS, "adapter.type=full", "train.epochs=6", "train.lr=2e-3")
    result = run(config)
    plain = AutoModelForSequenceClassification.from_pretrained(result.output).eval()
    assert plain.config.id2label == dict(enumerate(sorted(WORDS)))
    assert plain.config.label2id == {label: i for i, label in enumerate(sorted(WORDS))}
    logits, ids = trained_logits(config, ROWS)
    with torch.no_grad():
        reloaded = torch.stack([plain(input_ids=torch.tensor([row])).logits[0] for row in ids])
    torch.testing.assert_close(reloaded, logits, rtol=1e-4, atol=1e-4)


def test_the_new_head_trains_at_head_lr_while_the_body_keeps_train_lr(tiny_model):
    from tunesmith.config.schema import AdapterConfig, TrainConfig
    from tunesmith.train.optim import build_optimizer

    for adapter in ("full", "lora"):
        model = apply_adapter(load_model(str(tiny_model), num_labels=3)[0], AdapterConfig(type=adapter, r=4, alpha=8))
        for train, head_rate in (
            (TrainConfig(lr=5e-5), 1e-3),
            (TrainConfig(lr=2e-3), 2e-3),
            (TrainConfig(lr=5e-5, head_lr=3e-4), 3e-4),
        ):
            optimizer = build_optimizer(model, train)
            rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
            trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
            heads = [rate[id(p)] for name, p in trained if "score" in name]
            body = [rate[id(p)] for name, p in trained if "score" not in name]
            assert heads and body, adapter
            assert heads == pytest.approx([head_rate] * len(heads)) and body == pytest.approx([train.lr] * len(body))
            assert optimizer.param_groups[0]["lr"] == pytest.approx(train.lr)  # the logged rate is the body's


def test_full_fine_tuning_at_its_small_rate_still_trains_the_head_fast(tmp_path, tiny_model):
    """A zero head at full fine-tuning's 5e-5 barely moves (bench/classify.py: 60.7% on banking77); at the auto
    head_lr, the same run's loss falls many times further."""

    def loss_fall(*overrides: str, name: str) -> float:
        config = classify_config(
            tmp_path, tiny_model, ROWS, "adapter.type=full", "train.lr=5e-5", "train.epochs=6", *overrides, name=name
        )
        run(config)
        steps = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [step["loss"] for step in steps if "loss" in step]
        return losses[0] - losses[-1]

    assert loss_fall(name="auto") > 5 * max(loss_fall("train.head_lr=5e-5", name="slow"), 0.0)


def test_classify_resume_is_exact(tmp_path, tiny_model, monkeypatch):
    overrides = ["method=classify", "train.epochs=2", "data.val_fraction=0.25"]
    straight, resumed = straight_and_resumed(tmp_path, tiny_model, ROWS, overrides, 3, monkeypatch)
    assert metric_lines(resumed.output_dir) == metric_lines(straight.output_dir)
    assert metric_lines(resumed.output_dir, "val_accuracy") == metric_lines(straight.output_dir, "val_accuracy")
    a = load_file(straight.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "rows, words",
    [
        ([{"text": f"row {i}", "label": "only"} for i in range(4)], "at least two"),
        ([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": " "}], ":3:"),
    ],
    ids=["one class", "empty label"],
)
def test_bad_labels_are_refused_before_any_compute(tmp_path, tiny_model, rows, words):
    with pytest.raises(UserError, match=words):
        run(classify_config(tmp_path, tiny_model, rows))


def test_a_validation_label_unseen_in_training_is_refused_by_line(tmp_path, tiny_model):
    from conftest import write_jsonl

    validation = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "refund"}, {"text": "y", "label": "new"}])
    with pytest.raises(UserError) as refused:
        run(classify_config(tmp_path, tiny_model, ROWS, f"data.validation={validation}"))
    assert f"{validation}:2" in str(refused.value) and "'new' is not among the 3 labels" in str(refused.value)


def test_eval_of_a_classifier_run_names_labels_with_its_head_and_compares_the_base(tmp_path, tiny_model):
    from conftest import write_jsonl

    from tunesmith.engine.classifier import Classifier, read_labels
    from tunesmith.eval.evaluate import EvalOptions, evaluate

    config = classify_config(tmp_path, tiny_model, ROWS, "train.epochs=8", "train.lr=1e-2", "train.batch_size=4")
    result = run(config)
    assert read_labels(result.output) == sorted(WORDS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:6])
    report = evaluate(
        str(config.output_dir),
        test,
        EvalOptions(task="classification", baselines=("base",), resamples=50),
        tmp_path / "eval",
    )
    classifier = Classifier.load(config.output_dir)
    predicted = classifier.predict([[{"role": "user", "content": row["text"]}] for row in ROWS[:6]])
    accuracy = sum(p == row["label"] for p, row in zip(predicted, ROWS[:6])) / 6
    assert report["metrics"]["accuracy"]["value"] == pytest.approx(accuracy) and accuracy == 1.0
    assert "accuracy" in report["baselines"]["base"]["metrics"]
    probabilities = classifier.probabilities([[{"role": "user", "content": ROWS[0]["text"]}]])
    assert probabilities.shape == (1, len(WORDS)) and float(probabilities.sum()) == pytest.approx(1.0)


def test_a_task_other_than_classification_is_refused_for_a_classifier(tmp_path, tiny_model):
    from conftest import write_jsonl

    from tunesmith.eval.evaluate import EvalOptions, evaluate

    config = classify_config(tmp_path, tiny_model, ROWS, "train.max_steps=1")
    run(config)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:2])
    with pytest.raises(UserError, match="--task classification"):
        evaluate(str(config.output_dir), test, EvalOptions(task="exact_match"), tmp_path / "eval")


def test_an_adapter_that_leaves_the_head_untrained_and_eval_every_are_refused_together(tmp_path, tiny_model):
    config = classify_config(tmp_path, tiny_model, ROWS, "adapter.type=prompt_tuning", "eval.every=5")
    with pytest.raises(UserError) as refused:
        run(config)
    assert [problem.where for problem in refused.value.problems] == ["adapter.type", "eval.every"]
    assert "cannot train a classifier's new head" in str(refused.value) and "val_accuracy" in str(refused.value)


def test_balanced_weights_and_the_weighted_smoothed_loss_match_hand_computed_values():
    import math

    from tunesmith.train.classify_loss import balanced_weights, class_loss

    weights = balanced_weights([0, 0, 0, 1], 3)  # n / (classes x count): 4/9, 4/3, and 0 for a class with none
    torch.testing.assert_close(weights, torch.tensor([4 / 9, 4 / 3, 0.0]))
    every = [0, 0, 0, 1, 2]  # every class present, as in training data: the examples' weights average 1
    assert float(balanced_weights(every, 3)[every].mean()) == pytest.approx(1.0)
    logits, labels = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 1])
    nll = [math.log(math.exp(2) + 2) - 2, math.log(math.exp(1) + 2) - 1]
    assert float(class_loss(logits, labels)) == pytest.approx(sum(nll))
    assert float(class_loss(logits, labels, weights)) == pytest.approx(4 / 9 * nll[0] + 4 / 3 * nll[1])
    smoothing = 0.3  # target: 0.1 on every label, 0.7 + 0.1 on the true one
    expected = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        logsumexp = math.log(sum(math.exp(value) for value in row))
        expected += sum((0.1 + (0.7 if k == label else 0.0)) * (logsumexp - row[k]) for k in range(3))
    assert float(class_loss(logits, labels, label_smoothing=smoothing)) == pytest.approx(expected)


def test_balanced_weights_and_label_smoothing_train_end_to_end(tmp_path, tiny_model):
    rows = ROWS + [{"text": f"extra refund {i}", "label": "refund"} for i in range(6)]  # refund is now common
    config = classify_config(
        tmp_path,
        tiny_model,
        rows,
        "classify.class_weights=balanced",
        "classify.label_smoothing=0.1",
        "train.epochs=6",
        "train.lr=1e-2",
        "train.batch_size=4",
    )
    run(config)
    steps = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [step for step in steps if "loss" in step]
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["accuracy"] == 1.0


def test_truncate_keeps_the_end_of_a_long_input_in_training_and_in_use(tmp_path, tiny_model):
    from tunesmith.data.dataset import prepare_data
    from tunesmith.engine.classifier import Classifier
    from tunesmith.models.loading import load_tokenizer

    long_row = {"text": "word " * 80 + "refund please", "label": "refund"}
    config = classify_config(
        tmp_path, tiny_model, ROWS + [long_row], "data.truncation=truncate", "data.max_length=96", "train.max_steps=1"
    )
    tokenizer = load_tokenizer(str(tiny_model))
    chat = ChatTokenizer(tokenizer)
    whole = chat.tokenize_input(convert_classification(long_row).messages[:-1])
    prepared = prepare_data(config.data, tokenizer, ("chat",), "classify", 0, sorted(WORDS))
    kept = prepared.train[-1]
    assert len(whole) > 96 and kept.input_ids == whole.input_ids[-96:] and prepared.truncated == 1
    run(config)
    classifier = Classifier.load(config.output_dir)
    logits = classifier.logits([[{"role": "user", "content": long_row["text"]}]])
    with torch.no_grad():
        direct = sequence_logits(classifier.model, collate([kept]))
    torch.testing.assert_close(logits, direct.float())
