"""The adapter library: add, list, show, weighted merge, and several adapters switched on one loaded base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_config, run

from tunesmith.cli import main
from tunesmith.engine.generation import Engine
from tunesmith.models import library

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 31]])


@pytest.fixture
def two_runs(tmp_path, tiny_model, chat_rows):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first = make_config(tmp_path / "a", tiny_model, chat_rows, "train.max_steps=3", "train.lr=2e-2", name="intents")
    second = make_config(
        tmp_path / "b",
        tiny_model,
        list(reversed(chat_rows)),
        "train.max_steps=3",
        "train.lr=2e-2",
        "train.seed=5",
        name="style",
    )
    run(first), run(second)
    return first.output_dir, second.output_dir


def logits(engine: Engine) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(input_ids=IDS).logits


def test_add_list_show(two_runs, capsys):
    intents, style = two_runs
    assert main(["adapters", "add", str(intents)]) == 0
    (intents / "eval.json").write_text(
        json.dumps(
            {
                "task": "classification",
                "data": "test.jsonl",
                "metrics": {"accuracy": {"value": 0.5, "ci95": [0.4, 0.6], "n": 100}},
            }
        )
    )
    assert main(["adapters", "add", str(style), "--name", "house-style"]) == 0
    assert main(["adapters", "add", str(intents), "--force"]) == 0  # re-added, now with its eval figures
    capsys.readouterr()
    assert main(["adapters", "list"]) == 0
    listing = capsys.readouterr().out
    assert "intents" in listing and "house-style" in listing and "accuracy 0.500" in listing
    assert main(["adapters", "show", "intents"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["adapter"]["type"] == "lora" and card["method"] == "sft"
    assert len(card["data"]["train"]["sha256"]) == 64 and card["eval"]["metrics"]["accuracy"]["ci95"] == [0.4, 0.6]
    saved = load_file(library.adapter_dir("intents") / "adapter_model.safetensors")
    original = load_file(intents / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(saved[k], original[k]) for k in original)


def test_library_mistakes_are_clear_errors(two_runs, tmp_path, capsys):
    intents, _ = two_runs
    assert main(["adapters", "add", str(tmp_path / "nowhere")]) == 2
    assert "not a finished adapter run" in capsys.readouterr().err
    assert main(["adapters", "add", str(intents)]) == 0
    assert main(["adapters", "add", str(intents)]) == 2
    assert "already has an adapter named 'intents'" in capsys.readouterr().err
    assert main(["adapters", "show", "intent"]) == 2
    assert "did you mean 'intents'" in capsys.readouterr().err
    assert main(["adapters", "add", str(intents), "--name", "bad name!"]) == 2
    assert main(["adapters", "merge", "intents", "intents", "--name", "m", "--weights", "1,x"]) == 2
    assert main(["adapters", "merge", "intents", "--name", "m"]) == 2


def test_several_adapters_on_one_base_switch_per_call(two_runs):
    intents, style = two_runs
    library.add(intents), library.add(style)
    alone = {name: logits(Engine.load(str(path))) for name, path in (("intents", intents), ("style", style))}
    engine = Engine.load_library(["intents", "style"])
    base_weight = engine.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    pointer = base_weight.data_ptr()
    for name in ["intents", "style", "intents"]:
        engine.use(name)
        assert torch.allclose(logits(engine), alone[name], atol=1e-5)
    assert not torch.allclose(alone["intents"], alone["style"], atol=1e-3)
    assert base_weight.data_ptr() == pointer  # the base was never reloaded or rewritten
    with engine.base_model():
        base = logits(engine)
    assert not torch.allclose(base, alone["intents"], atol=1e-3)


def test_weighted_merge_is_the_weighted_sum_of_updates(two_runs, capsys):
    intents, style = two_runs
    library.add(intents), library.add(style)
    assert main(["adapters", "merge", "intents", "style", "--weights", "0.7,0.3", "--name", "blend"]) == 0
    card = library.card("blend")
    assert card["merged_from"] == [{"name": "intents", "weight": 0.7}, {"name": "style", "weight": 0.3}]

    def update(directory, scaling):
        state = load_file(directory / "adapter_model.safetensors")
        return {
            key.replace(".lora_A.weight", ""): scaling * state[key.replace("lora_A", "lora_B")] @ state[key]
            for key in state
            if "lora_A" in key
        }

    blend = update(library.adapter_dir("blend"), card["adapter"]["alpha"] / card["adapter"]["r"])
    parts = [update(path / "adapter", 32 / 16) for path in (intents, style)]
    assert blend.keys() == parts[0].keys()
    for key in blend:
        assert torch.allclose(blend[key], 0.7 * parts[0][key] + 0.3 * parts[1][key], atol=1e-6), key
    merged = Engine.load("blend")
    assert merged.model.active_adapter == "blend"


def test_swap_command_answers_with_each_adapter(two_runs, capsys):
    intents, style = two_runs
    library.add(intents), library.add(style)
    capsys.readouterr()
    assert main(["adapters", "swap", "intents", "style", "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["adapter"] for line in lines] == ["intents", "style"]
    assert all(line["prompt"] == "hello" and line["switch_ms"] < 1000 for line in lines)
