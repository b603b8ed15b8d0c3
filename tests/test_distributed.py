"""Two processes on CPU (gloo), started as users start them (`tunesmith train --nproc 2`, or torchrun): DDP and
FSDP train exactly as one process does with the same effective batch, and checkpoints resume on either count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from test_dpo import PAIRS
from test_training import make_config, run

from tunesmith import rundir
from tunesmith.config.loading import write_config

# 25 rows, 2 per micro-batch, 2 micro-batches per step: each rank gets 2 rows a step, and the epoch's last step
# has a single row, so the second rank trains on a filler micro-batch that must count for nothing.
OVERRIDES = (
    "data.packing=false",
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.epochs=2",
    "train.lr=1e-2",
    "train.eval_every=4",
    "train.save_every=4",
    "data.val_fraction=0.2",
)
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # fp32; only the order of the sums differs
# Final weights after ~12 Adam steps at lr 1e-2: Adam divides by sqrt(v), so a weight whose gradients are near
# zero turns a 1e-7 difference in summation order into ~1e-5; still 100x below any real divergence.
WEIGHT_TOLERANCE = dict(rtol=1e-3, atol=1e-4)


def rows(count: int = 31) -> list[dict]:
    words = ["card", "phone", "transfer", "fee", "balance", "rate", "refund", "hello"]
    return [
        {
            "messages": [
                {"role": "user", "content": f"{words[i % 8]} question {i}"},
                {"role": "assistant", "content": f"{words[(i * 3) % 8]} answer"},
            ]
        }
        for i in range(count)
    ]


def train_processes(config, nproc: int, *overrides: str, parallel: str = "ddp", launcher: str = "tunesmith"):
    """Run `config` on `nproc` processes through the CLI, as a user would; returns the finished process."""
    path = config.output_dir.parent / f"{config.output_dir.name}.yaml"
    write_config(config, path)
    settings = [f"train.parallel={parallel}", *overrides]
    if launcher == "tunesmith":
        command = [sys.executable, "-m", "tunesmith", "train", str(path), "--nproc", str(nproc), *settings]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "tunesmith",
            "train",
            str(path),
            *settings,
        ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def logged(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step: the training and validation figures of each step."""
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step.setdefault(record["step"], {}).update(record)
    return by_step


def assert_same_run(one: Path, other: Path, figures=("loss", "grad_norm", "val_loss")) -> None:
    mine, theirs = logged(one), logged(other)
    assert mine.keys() == theirs.keys()
    for step, record in mine.items():
        for name in figures:
            if name in record:
                torch.testing.assert_close(theirs[step][name], record[name], **TOLERANCE, msg=f"{name} at step {step}")
        if "tokens" in record:
            assert theirs[step]["tokens"] == record["tokens"]
    output = "adapter/adapter_model.safetensors" if (one / "adapter").is_dir() else "model/model.safetensors"
    weights, other_weights = load_file(one / output), load_file(other / output)
    assert weights.keys() == other_weights.keys()
    for name in weights:
        torch.testing.assert_close(other_weights[name], weights[name], **WEIGHT_TOLERANCE)


# ddp also runs each step's rows in pieces of at most 20 tokens (train.micro_batch_tokens): every example alone.
@pytest.mark.parametrize(
    "parallel,adapter,budget", [("ddp", "lora", 20), ("fsdp", "lora", None), ("fsdp", "full", None)]
)
def test_two_processes_train_exactly_like_one(tmp_path, tiny_model, parallel, adapter, budget):
    overrides = (*OVERRIDES, f"adapter.type={adapter}", f"train.micro_batch_tokens={budget or 'null'}")
    config = make_config(tmp_path, tiny_model, rows(), *overrides, name="one")
    run(config)
    two = make_config(tmp_path, tiny_model, rows(), *overrides, name="two")
    done = train_processes(two, 2, parallel=parallel)
    assert_same_run(config.output_dir, two.output_dir)
    assert f"on 2 processes ({parallel})" in done.stderr
    assert logged(two.output_dir)[0]["processes"] == 2
    last = rundir.latest_checkpoint(two.output_dir / "checkpoints")
    assert (last / "rng-0.json").is_file() and (last / "rng-1.json").is_file()  # each rank's random state
    if parallel == "fsdp":  # each rank wrote its own shard
        assert len(list(last.glob("shard-*.safetensors"))) == 2


def stopped_at(run_dir: Path, step: int, into: Path) -> Path:
    """A copy of `run_dir` as it was when it stopped after `step`: its config, log and that checkpoint."""
    (into / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", into / "config.yaml")
    shutil.copy(run_dir / "metrics.jsonl", into / "metrics.jsonl")  # the resumed run drops what came after
    shutil.copytree(run_dir / "checkpoints" / f"step-{step}", into / "checkpoints" / f"step-{step}")
    return into


def test_a_checkpoint_resumes_on_another_number_of_processes(tmp_path, tiny_model):
    keep = "train.keep_last=10"
    straight = make_config(tmp_path, tiny_model, rows(), *OVERRIDES, keep, name="straight")
    run(straight)
    # Two FSDP processes stopped after step 8, the rest on one process...
    two = make_config(tmp_path, tiny_model, rows(), *OVERRIDES, keep, name="two")
    train_processes(two, 2, parallel="fsdp")
    down = two.model_copy(update={"output_dir": stopped_at(two.output_dir, 8, tmp_path / "down")})
    run(down)
    assert_same_run(straight.output_dir, down.output_dir)
    # ...and one process stopped after step 8, the rest on two DDP processes started by torchrun itself.
    up = straight.model_copy(update={"output_dir": stopped_at(straight.output_dir, 8, tmp_path / "up")})
    train_processes(up, 2, launcher="torchrun")
    assert_same_run(straight.output_dir, up.output_dir)


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_preference_recipes_on_two_processes(tmp_path, tiny_model, method):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 3)
    settings = (
        f"method={method}",
        f"data.train={pairs}",
        "data.max_length=128",
        "train.batch_size=2",
        "train.epochs=2",
        "train.lr=1e-2",
        "train.eval_every=3",
        "train.save_every=3",
        "data.val_fraction=0.2",
    )
    one = make_config(tmp_path, tiny_model, [], *settings, name="one")
    run(one)
    two = make_config(tmp_path, tiny_model, [], *settings, name="two")
    train_processes(two, 2, parallel="fsdp")
    figures = ("loss", "grad_norm", "val_loss", "reward_accuracy", "val_reward_accuracy", "reward_margin")
    assert_same_run(one.output_dir, two.output_dir, figures)
    if method == "dpo":  # the reference pass was shared by the ranks and gathered in order
        cached = [
            load_file(run_dir / "reference" / "logprobs.safetensors")["logprobs"]
            for run_dir in (one.output_dir, two.output_dir)
        ]
        torch.testing.assert_close(cached[1], cached[0], **TOLERANCE)


@pytest.mark.parametrize("method,parallel", [("grpo", "ddp"), ("ppo", "fsdp")])
def test_rl_recipes_on_two_processes(tmp_path, tiny_model, method, parallel):
    """Each rank samples and scores its share of the step's prompts; the update, the validation reward and the
    logged figures cover all of them. Under FSDP every rank generates in step with the others."""
    from test_rl import PROMPTS, spaces_reward

    config = make_config(
        tmp_path,
        tiny_model,
        PROMPTS,
        f"method={method}",
        spaces_reward(tmp_path),
        "train.batch_size=4",
        "train.max_steps=3",
        "train.epochs=2",
        "train.lr=2e-2",
        "rl.max_new_tokens=8",
        "data.val_fraction=0.25",
        "train.eval_every=3",
        "train.save_every=2",
        "grpo.num_generations=4",
    )
    train_processes(config, 2, parallel=parallel)
    lines = logged(config.output_dir)
    assert lines[0]["processes"] == 2 and all("reward" in lines[step] for step in (1, 2, 3))
    assert "val_reward" in lines[3] and lines[3]["val_response_length"] > 0
    saved = load_file(config.output_dir / "adapter" / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for name, tensor in saved.items() if "lora_B" in name)
    if method == "ppo":  # the value head trained with the policy and was checkpointed (from both ranks' shards)
        head = rundir.read_weights(rundir.latest_checkpoint(config.output_dir / "checkpoints"))
        assert head["value_head.layers.2.weight"].abs().sum() > 0


def test_rl_needs_a_step_the_ranks_can_share(tmp_path, tiny_model):
    from test_rl import PROMPTS, spaces_reward

    config = make_config(
        tmp_path,
        tiny_model,
        PROMPTS,
        "method=grpo",
        spaces_reward(tmp_path),
        "train.batch_size=3",
        "rl.max_new_tokens=8",
    )
    path = tmp_path / "rl.yaml"
    write_config(config, path)
    done = subprocess.run(
        [sys.executable, "-m", "tunesmith", "train", str(path), "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("error: train.batch_size=3") == 1  # every rank stops; rank 0 alone says why


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_loopback_train_like_one_process(tmp_path, tiny_model):
    """Two torchrun launches, one per "node", meeting at one address (what docs/distributed.md and
    examples/slurm.sh do across machines); the run directory is on storage both see."""
    one = make_config(tmp_path, tiny_model, rows(), *OVERRIDES, name="one")
    run(one)
    two = make_config(tmp_path, tiny_model, rows(), *OVERRIDES, name="nodes")
    path = tmp_path / "nodes.yaml"
    write_config(two, path)
    port = free_port()
    launches = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "tunesmith",
                "train",
                str(path),
                "train.parallel=fsdp",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for node in (0, 1)
    ]
    outputs = [launch.communicate(timeout=600) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "saved" in outputs[0][0] and "saved" not in outputs[1][0]  # the node with rank 0 reports
    assert_same_run(one.output_dir, two.output_dir)


def test_settings_several_processes_cannot_honour_are_refused_together(tiny_model):
    from tunesmith.config.loading import load_config
    from tunesmith.errors import UserError
    from tunesmith.train.distributed import World, check_settings

    config = load_config(
        None,
        [
            f"model={tiny_model}",
            "data.train=t.jsonl",
            "train.parallel=fsdp",
            "adapter.type=qlora",
            "train.unfreeze={every: 2}",
            "train.regularization.l2_sp=0.1",
            "eval.every=5",
            "train.cpu_offload=true",
        ],
    )
    with pytest.raises(UserError) as refused:
        check_settings(config, World(0, 2, 0), torch.device("cpu"))
    keys = [problem.where for problem in refused.value.problems]
    assert keys == ["train.cpu_offload", "train.unfreeze", "adapter.type", "train.regularization", "eval.every"]
    one_process = load_config(None, [f"model={tiny_model}", "data.train=t.jsonl", "train.unfreeze={every: 2}"])
    check_settings(one_process, World(), torch.device("cpu"))  # one process: nothing to refuse


def test_nproc_must_be_a_count_of_processes(tmp_path, tiny_model):
    config = make_config(tmp_path, tiny_model, rows(), name="run")
    path = tmp_path / "run.yaml"
    write_config(config, path)
    done = subprocess.run(
        [sys.executable, "-m", "tunesmith", "train", str(path), "--nproc", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        done.returncode == 2 and "Traceback" not in done.stderr and "--nproc=0" in done.stderr and "fix:" in done.stderr
    )
