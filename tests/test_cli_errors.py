"""User mistakes at the command line: exit code 2, a message that names the file/line and the fix, no traceback."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from tunesmith.cli import main

GOOD_ROWS = [
    {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]}
    for i in range(4)
]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_config(tmp_path: Path, model: Path, train: Path, extra: str = "") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"model: {model}\nmethod: sft\ndata:\n  train: {train}\n  max_length: 64\n"
        f"train:\n  max_steps: 1\n  batch_size: 2\n  progress: false\n"
        f"output_dir: {tmp_path / 'run'}\n{extra}",
        encoding="utf-8",
    )
    return path


def test_train_with_a_missing_config_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", "missing.yaml")
    assert code == 2
    assert "missing.yaml: config file not found" in err and "fix:" in err
    assert "Traceback" not in err and out == ""


def test_train_with_bad_data_lines_refuses_and_writes_no_adapter(tmp_path, capsys, tiny_model):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS[:2] + ["{not json", {"messages": []}] + GOOD_ROWS[2:])
    config = write_config(tmp_path, tiny_model, data)
    code, _, err = run_cli(capsys, "train", config)
    assert code == 2
    assert f"{data}:3: invalid JSON" in err
    assert f"{data}:4: field 'messages' is an empty list" in err
    assert "nothing was trained" in err and "Traceback" not in err
    run_dir = tmp_path / "run"
    assert not (run_dir / "adapter").exists() and not (run_dir / "model").exists()
    assert not any((run_dir / "checkpoints").glob("step-*"))


def test_train_with_a_missing_data_file(tmp_path, capsys, tiny_model):
    config = write_config(tmp_path, tiny_model, tmp_path / "nope.jsonl")
    code, _, err = run_cli(capsys, "train", config)
    assert code == 2
    assert f"{tmp_path / 'nope.jsonl'}: data file not found" in err and "Traceback" not in err


def test_train_with_config_mistakes_reports_them_all_before_loading_anything(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    config = write_config(tmp_path, tmp_path / "no-model", data, extra="adapter: {type: lorra}\n")
    code, _, err = run_cli(capsys, "train", config, "train.lrr=1")
    assert code == 2
    assert f"{config}:11: 'adapter.type' = 'lorra'" in err and "did you mean 'lora'" in err
    assert "command line: unknown key 'train.lrr' (did you mean 'lr'?)" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_train_with_an_unknown_model(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    config = write_config(tmp_path, tmp_path / "no-model", data)
    code, _, err = run_cli(capsys, "train", config)
    assert code == 2
    assert "no-model" in err and "fix:" in err and "Traceback" not in err


def test_validate_a_good_file(tmp_path, capsys):
    data = write_jsonl(tmp_path / "good.jsonl", GOOD_ROWS)
    code, out, err = run_cli(capsys, "validate", data)
    assert (code, err) == (0, "")
    assert f"{data}: 4 examples OK (format messages, method sft)" in out


def test_validate_a_bad_file(tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", GOOD_ROWS + [{"messages": [{"role": "user", "content": "no reply"}]}])
    code, out, err = run_cli(capsys, "validate", data)
    assert code == 2 and out == ""
    assert err.startswith(f"{data}:5: field 'messages' has no assistant turn")
    assert f"{data}: 1 problem(s) in 5 rows" in err


def test_generate_with_a_hub_model_that_is_not_here(capsys):
    code, out, err = run_cli(capsys, "generate", "someorg/somemodel", "--prompt", "hi")
    assert code == 2 and out == ""
    assert "someorg/somemodel: no such run directory or model" in err  # a path or a hub id: either way, not here
    assert "does not download from the Hugging Face hub" in err and "fix:" in err
    assert "Traceback" not in err


def test_generate_without_a_prompt(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    code, _, err = run_cli(capsys, "generate", "smollm2-135m-instruct")
    assert code == 2
    assert "no prompt given; fix: pass --prompt" in err


def test_eval_without_data(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", tmp_path)
    assert code == 2
    assert "no evaluation data; fix: pass --data" in err


def test_argument_mistakes_exit_with_2(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["trian", "config.yaml"])
    assert caught.value.code == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err


def python_m_tunesmith(tmp_path: Path, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNESMITH_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_python_m_tunesmith_validate_a_bad_file_prints_no_traceback(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", GOOD_ROWS[:1] + ["[1, 2, 3]", {"messages": "hi"}])
    result = python_m_tunesmith(tmp_path, "validate", data)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{data}:2: each line must be a JSON object, got list" in result.stderr
    assert f"{data}:3: field 'messages' must be a list" in result.stderr


def test_python_m_tunesmith_train_a_bad_config_prints_no_traceback(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("data: {train: t.jsonl}\nmethod: sftt\n", encoding="utf-8")
    result = python_m_tunesmith(tmp_path, "train", config)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{config}:2: 'method' = 'sftt'" in result.stderr


def broken_copy(source: Path, directory: Path, drop: tuple[str, ...] = (), config: dict | None = None) -> Path:
    """A copy of the model directory `source` without the files whose names contain any of `drop`, its config.json
    updated with `config`."""
    import json
    import shutil

    directory.mkdir()
    for path in source.iterdir():
        if not any(part in path.name for part in drop):
            shutil.copy(path, directory / path.name)
    if config:
        settings = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**settings, **config}))
    return directory


@pytest.mark.parametrize(
    "drop, config, message",
    [
        ((".safetensors",), None, "has no \\*.safetensors weights.*; fix:"),
        (("tokenizer",), None, "has no tokenizer .* fix:"),
        ((), {"model_type": "mystery", "auto_map": {"AutoModelForCausalLM": "modeling_mystery.M"}}, "config.json:1: "
         "model_type 'mystery' is not an architecture transformers ships and its config.json's auto_map names code "
         "shipped with the model .*never runs code .* fix:"),
    ],
)  # fmt: skip
def test_train_with_a_model_directory_tunesmith_cannot_load(tmp_path, capsys, tiny_model, drop, config, message):
    model = broken_copy(tiny_model, tmp_path / "model", drop, config)
    if drop == (".safetensors",):
        (model / "pytorch_model.bin").write_bytes(b"not loaded")
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    code, _, err = run_cli(capsys, "train", write_config(tmp_path, model, data))
    assert code == 2 and "Traceback" not in err
    assert re.search(message, err), err
    if drop == (".safetensors",):
        assert "only pytorch_model.bin: pickle files, which tunesmith never loads" in err


def test_train_with_a_gguf_the_reader_cannot_convert(tmp_path, capsys):
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv6")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    for model, message in [(path, "holds a rwkv6 model, an architecture transformers' GGUF reader cannot convert"),
                           (tmp_path / "junk.gguf", "is not a readable GGUF file")]:  # fmt: skip
        code, _, err = run_cli(capsys, "train", write_config(tmp_path, model, data))
        assert code == 2 and "Traceback" not in err and message in err and "fix:" in err, err
