"""Using a trained run: generate, chat and eval through the CLI, with the adapter applied."""
from __future__ import annotations

import io
import json

import pytest

from conftest import write_config_file, write_jsonl
from tunesmith.cli import main
from tunesmith.serve.engine import Engine, Sampling


def trained_run(tmp_path, tiny_model, chat_rows):
    config = write_config_file(tmp_path, tiny_model, chat_rows, "epochs: 8, batch_size: 4, progress: false, lr: 1.0e-2, warmup: 0")
    assert main(["train", str(config)]) == 0
    return tmp_path / "run"


def test_generate_chat_and_eval_use_the_adapter(tmp_path, tiny_model, chat_rows, capsys, monkeypatch):
    run_dir = trained_run(tmp_path, tiny_model, chat_rows)
    capsys.readouterr()

    engine = Engine.load(str(run_dir))
    assert engine.has_adapter
    prompt = [[{"role": "user", "content": "my card has not arrived 0"}]]
    sampling = Sampling(max_new_tokens=12)
    tuned = engine.generate(prompt, sampling)
    with engine.base_model():
        base = engine.generate(prompt, sampling)
    assert tuned[0].endswith("_arrival") and tuned != base, "the adapter is applied: the tuned model learnt the label's shape"

    assert main(["generate", str(run_dir), "--prompt", "my card has not arrived 0", "--max-new-tokens", "12", "--jsonl"]) == 0
    assert json.loads(capsys.readouterr().out)["reply"] == tuned[0]

    monkeypatch.setattr("sys.stdin", io.StringIO("my card has not arrived 0\n\n"))
    assert main(["chat", str(run_dir), "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == tuned[0]

    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "my card has not arrived 0", "label": "card_arrival"}] * 3)
    assert main(["eval", str(run_dir), "--data", str(test), "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "tuned" in printed
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["metrics"]["tuned"]["accuracy"] == {"value": 1.0, "ci95": pytest.approx([0.4385, 1.0], abs=1e-3), "n": 3}
    assert results["predictions"][0]["tuned"] == tuned[0] and results["predictions"][0]["base"] == base[0]


def test_wilson_interval_is_sound():
    from tunesmith.eval.classification import accuracy, wilson_interval

    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.25 < high < 0.35
    low, high = wilson_interval(50, 100)
    assert abs((low + high) / 2 - 0.5) < 1e-9 and 0.39 < low < 0.41
    assert accuracy(["Card_Arrival.", "x"], ["card_arrival", "y"])["value"] == 0.5
