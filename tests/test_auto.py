"""The "auto" defaults: method classify for label rows and sft otherwise; epochs, batch size and learning rate
resolved from the data (enough steps to learn on a small file, a batch of about 16 examples, a rate per adapter),
printed with their reasons, recorded in the run's config, and the same rules in the service's jobs."""

from __future__ import annotations

import pytest
import yaml
from test_classify import ROWS
from test_training import run

from tunesmith.config.auto import MIN_STEPS, resolve_settings
from tunesmith.config.loading import load_config, resolve_paths
from tunesmith.serve import jobs


def test_a_small_file_gets_enough_steps_and_a_large_one_a_single_pass():
    small = resolve_settings("classify", "lora", 1500, 20.0)  # 1,500 short rows, 20 to a packed row
    assert small["batch_size"].value == 1  # one row of 20 examples: about 16
    steps = -(-1500 // 20)
    assert small["epochs"].value == -(-MIN_STEPS // steps) and small["epochs"].value * steps >= MIN_STEPS
    assert "steps per epoch" in small["epochs"].reason
    large = resolve_settings("sft", "lora", 100_000, 1.0)
    assert (large["epochs"].value, large["batch_size"].value) == (1, 16)
    tiny = resolve_settings("sft", "lora", 12, 1.0)
    assert (tiny["batch_size"].value, tiny["epochs"].value) == (1, 10)  # capped at 10 passes
    assert resolve_settings("sft", "lora", 1500, 1.0, max_steps=30)["epochs"].value == 1


@pytest.mark.parametrize(
    ("method", "adapter", "rate"),
    [("sft", "lora", 1e-3), ("classify", "full", 5e-5), ("sft", "prompt_tuning", 3e-2), ("dpo", "lora", 1e-4)],
)
def test_the_learning_rate_follows_the_adapter_and_method(method, adapter, rate):
    assert resolve_settings(method, adapter, 1000, 1.0)["lr"].value == pytest.approx(rate)


def test_the_minimal_config_trains_a_classifier_with_resolved_settings_recorded(tmp_path, tiny_model, capsys):
    from conftest import write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    config = resolve_paths(
        load_config(
            None,
            [f"model={tiny_model}", f"data.train={train}", f"output_dir={tmp_path / 'run'}", "train.progress=false"],
        )
    )
    assert (config.method, config.train.epochs, config.train.batch_size, config.train.lr) == ("auto",) * 4
    run(config)
    printed = capsys.readouterr().err
    assert "auto: method=classify" in printed and "auto: train.epochs=10" in printed
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["method"] == "classify"
    assert (saved["train"]["epochs"], saved["train"]["batch_size"], saved["train"]["lr"]) == (10, 1, 1e-3)


def test_given_settings_are_kept_and_non_label_rows_train_with_sft(tmp_path, tiny_model, capsys):
    from conftest import write_jsonl

    rows = [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(6)
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    overrides = [
        f"model={tiny_model}",
        f"data.train={train}",
        f"output_dir={tmp_path / 'run'}",
        "train.epochs=2",
        "train.progress=false",
    ]
    run(resolve_paths(load_config(None, overrides)))
    printed = capsys.readouterr().err
    assert "auto: method=sft" in printed and "train.epochs" not in printed and "auto: train.lr=0.001" in printed
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["method"], saved["train"]["epochs"], saved["train"]["batch_size"]) == ("sft", 2, 1)


def test_the_service_resolves_auto_by_the_same_rules():
    settings = resolve_settings("sft", "lora", 640, 1.0)
    resolved = jobs.resolve({"n_epochs": "auto", "batch_size": "auto"}, 640, "supervised")
    assert (resolved["n_epochs"], resolved["batch_size"]) == (settings["epochs"].value, settings["batch_size"].value)
    assert jobs.resolve({"n_epochs": 3}, 640)["n_epochs"] == 3
    config = jobs.build_config({"method": "dpo", "seed": 0}, "tiny", "train.jsonl", None, jobs.resolve({}, 640, "dpo"))
    assert config["train"]["lr"] == pytest.approx(resolve_settings("dpo", "lora", 640, 1.0)["lr"].value)
