"""Using a trained run: generate, chat and eval through the CLI, with the adapter applied."""

from __future__ import annotations

import io
import json

from conftest import write_config_file, write_jsonl

from tunesmith.cli import main
from tunesmith.engine.generation import Engine, Sampling


def trained_run(tmp_path, tiny_model, chat_rows):
    config = write_config_file(
        tmp_path, tiny_model, chat_rows, "epochs: 8, batch_size: 4, progress: false, lr: 1.0e-2, warmup: 0"
    )
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
    assert tuned[0].endswith("_arrival") and tuned != base, (
        "the adapter is applied: the tuned model learnt the label's shape"
    )

    assert (
        main(["generate", str(run_dir), "--prompt", "my card has not arrived 0", "--max-new-tokens", "12", "--jsonl"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["reply"] == tuned[0]

    monkeypatch.setattr("sys.stdin", io.StringIO("my card has not arrived 0\n\n"))
    assert main(["chat", str(run_dir), "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == tuned[0]

    test = write_jsonl(
        tmp_path / "test.jsonl",
        [
            {"text": "my card has not arrived 0", "label": "card_arrival"},
            {"text": "I lost my phone 1", "label": "lost_or_stolen_phone"},
        ]
        * 2,
    )
    assert main(["eval", str(run_dir), "--data", str(test), "--baseline", "base", "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    assert "tuned" in printed and "base" in printed and "report.html" in printed
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["metrics"]["accuracy"]["n"] == 4 and (run_dir / "report.html").is_file()
    # Constrained to the label set: every prediction is a label, for the tuned and the base model alike.
    labels = {
        "card_arrival",
        "lost_or_stolen_phone",
        "cancel_transfer",
        "fee",
        "top_up",
        "exchange_rate",
        "refund",
        "greeting",
    }
    assert results["examples"][0]["predicted"] == "card_arrival"
    assert all(
        row["predicted"] in labels and row["baselines"]["base"]["predicted"] in labels for row in results["examples"]
    )
    assert "base" in results["comparisons"] and "mcnemar_p" in results["comparisons"]["base"]
