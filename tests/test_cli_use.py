"""The command line as a user meets it: train with no YAML, --version, generate --system, help that shows
defaults, targets that are not there, what a resumed or finished run says, and bitsandbytes only for 4-bit work."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import write_jsonl

from tunesmith.cli import main
from tunesmith.engine.generation import Engine


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train_arguments(tmp_path, tiny_model, chat_rows, *extra: str, name: str = "run") -> list[str]:
    """`tunesmith train` with every key on the command line (no YAML): the tiny model, short rows."""
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows)
    return [
        "train",
        f"model={tiny_model}",
        f"data.train={data}",
        f"output_dir={tmp_path / name}",
        "data.max_length=64",
        "train.batch_size=4",
        "train.progress=false",
        *extra,
    ]


def logged_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row and "event" not in row]


# ---------------------------------------------------------------------------------------------
# train with overrides alone; resumed and finished runs.


def test_train_needs_no_yaml_when_every_key_is_on_the_command_line(tmp_path, tiny_model, chat_rows, capsys):
    code, out, err = run_cli(capsys, *train_arguments(tmp_path, tiny_model, chat_rows, "train.max_steps=2"))
    assert code == 0, err
    assert "trained 2 steps" in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())  # the resolved config, defaults filled in
    assert saved["model"] == str(tiny_model) and saved["train"]["max_steps"] == 2 and saved["adapter"]["type"] == "lora"
    assert saved["data"]["train"] == str(tmp_path / "train.jsonl")


def test_train_with_no_yaml_names_the_missing_keys_and_the_fix(capsys):
    code, out, err = run_cli(capsys, "train", "model=smollm2-135m-instruct", "train.lr=1e-4")
    assert code == 2 and out == ""
    assert "command line: 'data.train' is required; fix: add data.train=" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "train")
    assert code == 2
    assert "needs a config" in err and "data.train=" in err and "CONFIG.yaml" in err


def test_resuming_says_from_where_and_a_finished_run_says_it_is_complete(tmp_path, tiny_model, chat_rows, capsys):
    arguments = train_arguments(tmp_path, tiny_model, chat_rows)
    assert run_cli(capsys, *arguments, "train.max_steps=2")[0] == 0
    code, out, err = run_cli(capsys, *arguments, "train.max_steps=2")
    assert code == 0, err
    final = logged_losses(tmp_path / "run")[-1]
    assert f"{tmp_path / 'run'} is already complete: 2 steps; final loss {final:.4g}" in out
    assert "raise train.max_steps above 2 (e.g. train.max_steps=4)" in out and "None" not in out

    code, out, err = run_cli(capsys, *arguments, "train.max_steps=4")
    assert code == 0, err
    assert "resuming from checkpoint step-2 (of 4)" in err
    assert "trained 4 steps" in out and "already complete" not in out


# ---------------------------------------------------------------------------------------------
# --version, generate --system, help texts.


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"tunesmith {importlib.metadata.version('tunesmith')}"


def test_generate_puts_the_system_message_first(tiny_model, capsys, monkeypatch):
    conversations = []

    def record(engine, batch, sampling):
        conversations.extend(batch)
        return ["ok"] * len(batch)

    monkeypatch.setattr(Engine, "generate", record)
    code, out, err = run_cli(
        capsys, "generate", tiny_model, "--system", "Answer in French.", "--prompt", "hi", "--prompt", "bye"
    )
    assert code == 0, err
    assert conversations == [
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "bye"}],
    ]


def option_help(text: str) -> dict[str, str]:
    """Each option's help text, its wrapped lines joined."""
    options: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("  -"):
            name = line.split()[0].rstrip(",")
            options[name] = line
        elif name and line.startswith("    "):
            options[name] += " " + line.strip()
        else:
            name = None
    return options


def test_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no default is wrapped apart
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    lines = option_help(capsys.readouterr().out)
    assert "(default: 256)" in lines["--max-new-tokens"] and "(default: 0.0)" in lines["--temperature"]
    assert "(default: 1.0)" in lines["--top-p"]
    assert "default" not in lines["--jsonl"] and "default" not in lines["--prompt"]  # a switch; no default


def test_help_config_prints_defaults_as_yaml(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help-config"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert lines["output_dir"].endswith("[default: runs/run]")
    assert lines["train.max_steps"].endswith("[default: null]")
    assert lines["train.progress"].endswith("[default: true]")
    assert lines["train.betas"].endswith("[default: [0.9, 0.999]]")
    assert lines["data.train"].endswith("[default: (required)]")
    assert not [line for line in lines.values() if "PosixPath" in line or "default: None]" in line]


# ---------------------------------------------------------------------------------------------
# A target that names a path which is not there.


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "runs/nope", "--prompt", "hi"],
        ["chat", "runs/nope"],
        ["eval", "runs/nope"],
        ["eval", "runs/nope", "--data", "rows.jsonl"],
        ["score", "runs/nope", "--data", "rows.jsonl"],
        ["redteam", "runs/nope"],
        ["label", "rows.jsonl", "--policy", "runs/nope", "--output", "labelled.jsonl"],
    ],
)
def test_a_target_that_is_not_there_says_so(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi", "response": "hello", "text": "hi", "label": "greeting"}])
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: runs/nope: no such run directory or model; fix:")
    assert "tunesmith models list" in err and "output_dir" in err
    assert "hub" not in err and "evaluation data" not in err and "Traceback" not in err


def test_a_missing_path_target_gets_a_did_you_mean(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    code, _, err = run_cli(capsys, "generate", "./runs/my-rnu", "--prompt", "hi")
    assert code == 2
    assert "./runs/my-rnu: no such run directory or model (did you mean 'runs/my-run'?)" in err


# ---------------------------------------------------------------------------------------------
# bitsandbytes: only for 4-bit work, quiet, and no hub lookup for its kernels.


def test_bitsandbytes_loads_only_for_4bit_work_quietly(tmp_path, tiny_model, chat_rows):
    """Real command lines (main() reading sys.argv, as the `tunesmith` script does) in one process: a LoRA run and
    generate leave bitsandbytes unimported; a QLoRA run after them imports it and trains, saying nothing about it."""
    lora = train_arguments(tmp_path, tiny_model, chat_rows, "train.max_steps=1", name="lora")
    qlora = train_arguments(tmp_path, tiny_model, chat_rows, "train.max_steps=1", "adapter.type=qlora", name="qlora")
    script = textwrap.dedent(f"""
        import json, sys
        from tunesmith.cli import main

        def command(argv):
            sys.argv = ["tunesmith", *argv]
            code = main()
            return [code, sys.modules.get("bitsandbytes") is not None]

        results = [command({lora!r}), command(["generate", {str(tmp_path / "lora")!r}, "--prompt", "hi",
                                                "--max-new-tokens", "2"]), command({qlora!r})]
        print(json.dumps(results))
    """)
    env = {**os.environ, "TUNESMITH_ALLOCATOR": "system", "OMP_NUM_THREADS": "1"}  # no re-exec: one process
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[0, False], [0, False], [0, True]]
    assert (tmp_path / "qlora" / "adapter" / "adapter_model.safetensors").is_file()
    said = done.stderr.replace(str(tmp_path), "TMP")  # the test's own directory is named after bitsandbytes
    for noise in ("bitsandbytes", "kernels-community", "trust_remote_code"):
        assert noise not in said
