"""`tunesmith plan` and train's memory check (train/plan.py): the counts are the built model's, the activation probe
extrapolates from its one- and two-layer copies to the whole model, and a run that would not fit is refused with the
settings that would, before the model loads."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model_dir, write_config_file

from tunesmith import hardware
from tunesmith.cli import main
from tunesmith.config.loading import load_config, resolve_paths
from tunesmith.models import load_tokenizer
from tunesmith.train import footprint
from tunesmith.train import plan as planning
from tunesmith.train.build import build_model


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A tiny Llama with four decoder layers, so that the probe's one and two layers stand for more."""
    from transformers import AutoConfig

    directory = build_model_dir(tmp_path_factory.mktemp("tiny-4"))
    config = AutoConfig.from_pretrained(directory)
    config.num_hidden_layers = 4
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def make_config(tmp_path, model_dir, chat_rows, train: str = "max_steps: 2, batch_size: 2", **extra):
    path = write_config_file(tmp_path, model_dir, chat_rows * 4, train)
    overrides = [f"{key}={value}" for key, value in extra.items()]
    return path, resolve_paths(load_config(path, overrides))


def prepared(config):
    from tunesmith.config.auto import resolve_training
    from tunesmith.train.build import examples_per_row

    data, _ = planning.load_data(config, load_tokenizer(config.model))
    resolve_training(config, len(data.train), examples_per_row(config, data), announce=False)
    return data


@pytest.mark.parametrize("adapter,dtype", [("lora", None), ("full", None), ("lora", torch.bfloat16)])
def test_the_planned_weights_are_the_built_models(tmp_path, four_layers, chat_rows, adapter, dtype):
    _, config = make_config(tmp_path, four_layers, chat_rows, **{"adapter.type": adapter})
    structure = footprint.Structure.of(config, dtype, None)
    model = build_model(str(four_layers), config.adapter, torch.device("cpu"), None, dtype)
    parameters = list(model.parameters())
    assert structure.parameters == sum(p.numel() for p in parameters)
    assert structure.trainable == sum(p.numel() for p in parameters if p.requires_grad)
    assert structure.weight_bytes == sum(p.numel() * p.element_size() for p in parameters)


@pytest.mark.parametrize("recompute", [False, True])
def test_the_probe_extrapolates_to_every_layer(tmp_path, four_layers, chat_rows, recompute):
    """One and two probe layers predict what a step of the four-layer model holds, measured the same way."""
    _, config = make_config(tmp_path, four_layers, chat_rows, **{"train.gradient_checkpointing": str(recompute)})
    segments = (40, 24, 60)
    probe = footprint.probe_activations(config, None, None, segments)
    assert len(probe.per_layer) == 4 and (probe.per_layer[0] > 0 or recompute)  # recompute: an input per layer
    whole = footprint.step_peak(config, None, None, segments, ["full_attention"] * 4)
    assert probe.activations == pytest.approx(whole, rel=0.05)
    longer = footprint.probe_activations(config, None, None, (80, 48, 120))
    assert longer.activations > probe.activations  # a larger micro-batch holds more


def test_plan_prints_each_part_and_the_runs_steps(tmp_path, four_layers, chat_rows, capsys):
    path, config = make_config(tmp_path, four_layers, chat_rows, train="epochs: 2, batch_size: 2")
    assert main(["plan", str(path), "train.micro_batch_tokens=64"]) == 0
    printed = capsys.readouterr().out
    for part in ("runtime", "weights", "gradients", "optimizer state", "activations", "peak of CPU RAM", "time:"):
        assert part in printed
    planned = planning.plan_run(resolve_paths(load_config(path, ["train.micro_batch_tokens=64"])))
    assert f"steps: {planned.steps}" in printed
    assert planned.micro_batch_tokens <= 64 or planned.micro_batches == 1
    assert main(["train", str(path), "train.micro_batch_tokens=64"]) == 0
    assert f"trained {planned.steps} steps" in capsys.readouterr().out


def test_processes_split_the_memory_as_their_parallelism_does(tmp_path, four_layers, chat_rows):
    _, config = make_config(tmp_path, four_layers, chat_rows, **{"adapter.type": "full"})
    data = prepared(config)
    one = planning.plan_memory(config, data, torch.device("cpu"), None, 1).memory
    ddp = planning.plan_memory(config, data, torch.device("cpu"), None, 2).memory
    assert ddp.gradients == 2 * one.gradients and ddp.optimizer == one.optimizer
    config.train.parallel = "fsdp"
    fsdp = planning.plan_memory(config, data, torch.device("cpu"), None, 2)
    assert fsdp.memory.optimizer == one.optimizer / 2 and fsdp.memory.gradients == one.gradients / 2
    assert fsdp.machine_peak == pytest.approx(2 * fsdp.memory.peak)  # both processes share one machine's RAM


def test_train_refuses_a_run_that_would_not_fit(tmp_path, four_layers, chat_rows, capsys, monkeypatch):
    path, _ = make_config(tmp_path, four_layers, chat_rows)
    monkeypatch.setattr(hardware, "available_memory", lambda device: 2.0**20)
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err
    assert "error: this run needs about" in error and "MiB" not in error and "1 of" not in error
    for knob in ("train.micro_batch_tokens", "train.gradient_checkpointing=true", "adapter.type=qlora"):
        assert knob in error
    assert "train.memory_check=false" in error and "Traceback" not in error
    assert not (tmp_path / "run" / "adapter").exists()
    assert main(["train", str(path), "train.memory_check=false"]) == 0
    assert (tmp_path / "run" / "adapter").is_dir()


def test_plan_refuses_rl_methods_with_the_way_to_size_them(tmp_path, four_layers, capsys):
    rows = [{"prompt": f"Say {i}.", "answer": str(i)} for i in range(8)]
    path = write_config_file(tmp_path, four_layers, rows, "max_steps: 1")
    assert main(["plan", str(path), "method=grpo"]) == 2
    error = capsys.readouterr().err
    assert "method grpo" in error and "fix:" in error and "Traceback" not in error


def test_measure_times_real_steps(tmp_path, four_layers, chat_rows):
    _, config = make_config(tmp_path, four_layers, chat_rows)
    measured = planning.plan_run(config, measure=True)
    assert measured.seconds_per_step > 0 and "measured" in measured.estimate
    assert measured.measured["peak_rss_bytes"] > measured.memory.runtime / 2
    assert not (tmp_path / "run").exists()  # the short run trains in a scratch directory


def test_a_distillation_teacher_is_counted_in_memory(tmp_path, four_layers, chat_rows):
    """Every process of a distillation run holds its teacher too, in the compute dtype: a model's weights, or a
    finished run's base's."""
    from tunesmith.models import load_model

    _, config = make_config(tmp_path, four_layers, chat_rows, method="distill", **{"distill.teacher": str(four_layers)})
    teacher = sum(parameter.numel() for parameter in load_model(str(four_layers))[0].parameters())
    assert footprint.teacher_bytes(config, None) == 4 * teacher
    assert footprint.teacher_bytes(config, torch.bfloat16) == 2 * teacher
    assert footprint.teacher_bytes(config.model_copy(update={"method": "sft"}), None) == 0
