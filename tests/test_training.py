"""End-to-end behaviour of the SFT/pretrain recipe on a tiny model: what trains, what is saved, exact resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import write_config_file, write_jsonl
from safetensors.torch import load_file

from tunesmith import rundir
from tunesmith.config.loading import load_config, resolve_paths
from tunesmith.errors import TrainingStopped
from tunesmith.models import load_model
from tunesmith.models.adapters import apply_adapter, load_trainable_state
from tunesmith.registry import methods
from tunesmith.train import session


def make_config(tmp_path: Path, model_dir: Path, rows: list, *overrides: str, name: str = "run"):
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    base = [
        f"model={model_dir}",
        "method=sft",
        f"data.train={train_file}",
        f"output_dir={tmp_path / name}",
        "data.max_length=64",
        "train.epochs=1",
        "train.batch_size=2",
        "train.lr=5e-3",
        "train.eval_every=3",
        "train.save_every=2",
        "train.progress=false",
        "train.warmup=0",
    ]
    return resolve_paths(load_config(None, base + list(overrides)))


def run(config):
    return methods.get(config.method)(config)


def stop_by_signal_at(config, step: int, monkeypatch) -> TrainingStopped:
    """Run `config` until SIGTERM arrives right after `step`; the recipe checkpoints and stops. Run it again to
    resume."""
    original = session.advance

    def advance_then_signal(state, plan, result):
        original(state, plan, result)
        if state.step == step:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(session, "advance", advance_then_signal)
    with pytest.raises(TrainingStopped) as stopped:
        run(config)
    monkeypatch.setattr(session, "advance", original)
    return stopped.value


def straight_and_resumed(tmp_path: Path, model_dir: Path, rows: list, overrides, stop_at: int, monkeypatch):
    """The same config run straight through, and stopped by SIGTERM after `stop_at` then resumed:
    (straight, resumed)."""
    straight = make_config(tmp_path, model_dir, rows, *overrides, name="straight")
    run(straight)
    resumed = make_config(tmp_path, model_dir, rows, *overrides, name="interrupted")
    stop_by_signal_at(resumed, stop_at, monkeypatch)
    run(resumed)
    return straight, resumed


def metric_lines(run_dir: Path, key: str = "loss") -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key], r.get("lr"), r.get("grad_norm")) for r in rows if key in r]


def test_lora_trains_adapter_only_and_ships_peft_format(tmp_path, tiny_model, chat_rows):
    config = make_config(tmp_path, tiny_model, chat_rows, "train.epochs=2")
    result = run(config)
    adapter = config.output_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    saved = load_file(adapter / "adapter_model.safetensors")
    lora_b = [name for name in saved if "lora_B" in name]
    assert lora_b and all(saved[name].abs().sum() > 0 for name in lora_b), "LoRA B starts at zero: it must have moved"
    planned = json.loads((config.output_dir / "metrics.jsonl").read_text().splitlines()[0])["total_steps"]
    assert result.steps == planned > 0 and result.final_loss is not None

    # The saved adapter loads in plain transformers + peft and gives the logits of the trained weights.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    ours, _ = load_model(str(tiny_model))
    torch.manual_seed(config.train.seed)
    ours = apply_adapter(ours, config.adapter)
    last = rundir.latest_checkpoint(config.output_dir / "checkpoints")
    load_trainable_state(ours, rundir.read_weights(last))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours.eval()(ids).logits)


def test_frozen_parameters_do_not_move_and_trainable_ones_do(tiny_model):
    from tunesmith.config.schema import AdapterConfig, TrainConfig
    from tunesmith.data.formats import convert_classification
    from tunesmith.data.packing import BatchPlan
    from tunesmith.data.tokenize import ChatTokenizer
    from tunesmith.train.distributed import Runner
    from tunesmith.train.optim import build_optimizer, build_scheduler
    from tunesmith.train.step import train_step

    for adapter_type in ("lora", "full"):
        model, tokenizer = load_model(str(tiny_model))
        model = apply_adapter(model, AdapterConfig(type=adapter_type))
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        chat = ChatTokenizer(tokenizer)
        examples = [chat(convert_classification({"text": f"message {i}", "label": "card_arrival"})) for i in range(6)]
        plan = BatchPlan(examples, capacity=64, packing=True, batch_size=2, grad_accum=1, seed=0)
        optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
        scheduler = build_scheduler(optimizer, TrainConfig(lr=1e-2, warmup=0), 3)
        for step in range(2):
            train_step(Runner(model), plan.step(0, step), optimizer, scheduler, 1.0, torch.device("cpu"), None)
        for name, parameter in model.named_parameters():
            moved = not torch.equal(before[name], parameter.detach())
            if parameter.requires_grad and "lora_A" not in name and "norm" not in name:
                assert moved, f"{adapter_type}: trainable {name} did not move"
            if not parameter.requires_grad:
                assert not moved, f"{adapter_type}: frozen {name} moved"
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert (adapter_type == "full") == (len(trainable) == len(before))


@pytest.mark.parametrize("stop_at", [1, 4, 7])
def test_stop_and_resume_is_bit_identical(tmp_path, tiny_model, chat_rows, monkeypatch, stop_at):
    """A run stopped by SIGTERM at any step and resumed equals the uninterrupted run, bit for bit."""
    overrides = ("train.epochs=2", "data.val_fraction=0.2", "train.grad_accum=2", "adapter.dropout=0.1")
    straight = make_config(tmp_path, tiny_model, chat_rows, *overrides, name="straight")
    run(straight)

    interrupted = make_config(tmp_path, tiny_model, chat_rows, *overrides, name="interrupted")
    stopped = stop_by_signal_at(interrupted, stop_at, monkeypatch)
    assert stopped.exit_code == 128 + signal.SIGTERM
    assert rundir.latest_checkpoint(interrupted.output_dir / "checkpoints").name == f"step-{stop_at}"
    assert not (interrupted.output_dir / "adapter").exists()
    run(interrupted)

    a = load_file(straight.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(interrupted.output_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metric_lines(straight.output_dir) == metric_lines(interrupted.output_dir)
    assert metric_lines(straight.output_dir, "val_loss") == metric_lines(interrupted.output_dir, "val_loss")


def test_gradient_accumulation_equals_large_batch(tiny_model, chat_rows):
    """1 micro-batch of 8 rows, 8 micro-batches of 1 row, and the 8 rows in pieces of at most 40 tokens
    (train.micro_batch_tokens) give the same loss and the same update."""
    from tunesmith.config.schema import AdapterConfig
    from tunesmith.data.formats import convert_messages
    from tunesmith.data.packing import BatchPlan
    from tunesmith.data.tokenize import ChatTokenizer
    from tunesmith.train.distributed import Runner
    from tunesmith.train.step import train_step

    results = []
    for batch_size, grad_accum, max_tokens in ((8, 1, None), (1, 8, None), (8, 1, 40)):
        model, tokenizer = load_model(str(tiny_model))
        torch.manual_seed(0)
        model = apply_adapter(model, AdapterConfig(type="full"))
        chat = ChatTokenizer(tokenizer)
        examples = [chat(convert_messages(row)) for row in chat_rows]
        plan = BatchPlan(
            examples,
            capacity=40,
            packing=True,
            batch_size=batch_size,
            grad_accum=grad_accum,
            seed=0,
            max_tokens=max_tokens,
        )
        # Plain SGD with lr 1: the update is the gradient itself (Adam's first step would divide it by its magnitude).
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        micro_batches = plan.step(0, 0)
        step = train_step(Runner(model), micro_batches, optimizer, scheduler, None, torch.device("cpu"), None)
        if max_tokens is None:
            assert len(micro_batches) == grad_accum
        else:  # pieces of at most 40 tokens; an example longer than that is a piece alone
            assert len(micro_batches) > 1
            assert all(batch.num_tokens <= max_tokens or len(batch.segment_lengths) == 1 for batch in micro_batches)
        results.append((step.loss, step.loss_count, [p.detach().clone() for p in model.parameters()]))
    loss_a, tokens_a, params_a = results[0]
    for loss_b, tokens_b, params_b in results[1:]:
        assert tokens_a == tokens_b
        assert loss_a == pytest.approx(loss_b, rel=1e-6)
        for a, b in zip(params_a, params_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_packed_loss_equals_unpacked_loss(tiny_model, chat_rows):
    """Packing changes nothing a model computes: no attention or targets cross example boundaries."""
    from tunesmith.data.formats import convert_messages
    from tunesmith.data.packing import collate
    from tunesmith.data.tokenize import ChatTokenizer
    from tunesmith.train.loss import token_loss_sum

    model, tokenizer = load_model(str(tiny_model))
    chat = ChatTokenizer(tokenizer)
    examples = [chat(convert_messages(row)) for row in chat_rows[:6]]
    packed = collate(examples)  # six examples in one flat row
    alone = [collate([example]) for example in examples]
    with torch.no_grad():
        packed_sum = token_loss_sum(model, packed)
        separate_sum = sum(token_loss_sum(model, batch) for batch in alone)
    assert packed.num_loss_tokens == sum(batch.num_loss_tokens for batch in alone)
    torch.testing.assert_close(packed_sum, separate_sum, rtol=1e-5, atol=1e-5)
    # Positions restart per example, so even position-dependent computation cannot tell packing apart.
    assert packed.position_ids[0, len(examples[0])].item() == 0 and packed.num_tokens == sum(map(len, examples))


def test_full_fine_tuning_saves_a_loadable_model(tmp_path, tiny_model, chat_rows):
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, tiny_model, chat_rows, "adapter.type=full", "train.max_steps=4")
    result = run(config)
    assert result.output.name == "model"
    tuned = AutoModelForCausalLM.from_pretrained(result.output).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, base(ids).logits)
    assert (result.output / "tokenizer.json").is_file()


def test_pretrain_trains_every_token_of_raw_text(tmp_path, tiny_model):
    rows = [{"text": "the quick brown fox jumps over the lazy dog " * 3} for _ in range(6)]
    config = make_config(
        tmp_path,
        tiny_model,
        rows,
        "method=pretrain",
        "data.truncation=split",
        "data.max_length=16",
        "train.max_steps=3",
    )
    result = run(config)
    first = json.loads((config.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["format"] == "text" and first["truncated"] == 6
    assert result.steps == 3 and (result.output / "adapter_model.safetensors").is_file()


def test_early_stopping_keeps_the_best_weights(tmp_path, tiny_model, chat_rows, monkeypatch):
    losses = iter([1.0, 0.5, 0.9, 0.95, 0.99])
    monkeypatch.setattr(session, "evaluate_loss", lambda *args, **kwargs: next(losses))
    config = make_config(
        tmp_path,
        tiny_model,
        chat_rows,
        "train.epochs=3",
        "data.val_fraction=0.2",
        "train.eval_every=2",
        "train.early_stopping.patience=2",
    )
    result = run(config)
    assert result.steps == 8, "evals at 2, 4 (best), 6, 8: two without improvement stop the run"
    assert result.best_val_loss == 0.5
    best = rundir.best_checkpoint(config.output_dir / "checkpoints")
    assert best.name == "best-step-4"
    shipped = load_file(config.output_dir / "adapter" / "adapter_model.safetensors")
    best_weights = rundir.read_weights(best)
    for name, tensor in shipped.items():
        match = [
            key for key in best_weights if key.replace(".default", "").endswith(name.split("base_model.model.")[-1])
        ]
        assert match and torch.equal(best_weights[match[0]], tensor)
    run(config)  # resuming a finished (early-stopped) run trains nothing more
    assert rundir.latest_checkpoint(config.output_dir / "checkpoints").name == "step-8"


def test_non_finite_losses_skip_then_stop(tmp_path, tiny_model, chat_rows, monkeypatch):
    from tunesmith.train import step as step_module

    real = step_module.token_loss_sum
    calls = {"n": 0}

    def sometimes_nan(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] in (2, 5, 6, 7) else loss

    monkeypatch.setattr(step_module, "token_loss_sum", sometimes_nan)
    # (no memory check: its probe runs the loss too, and would take calls from the count)
    config = make_config(
        tmp_path, tiny_model, chat_rows, "train.epochs=3", "train.max_bad_steps=3", "train.memory_check=false"
    )
    with pytest.raises(TrainingStopped, match="not finite for 3 steps in a row"):
        run(config)
    records = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [row for row in records if row.get("event") == "skipped"]
    assert [row["step"] for row in skipped] == [2, 5, 6, 7]


def test_checkpoints_are_atomic_and_pruned(tmp_path, tiny_model, chat_rows):
    config = make_config(tmp_path, tiny_model, chat_rows, "train.epochs=2", "train.keep_last=2", "train.save_every=1")
    run(config)
    directory = config.output_dir / "checkpoints"
    last = json.loads((config.output_dir / "metrics.jsonl").read_text().splitlines()[0])["total_steps"]
    assert sorted(p.name for p in directory.iterdir()) == [f"step-{last - 1}", f"step-{last}"]
    (directory / f".tmp-step-{last + 1}").mkdir()  # what a crash mid-write leaves behind
    assert rundir.latest_checkpoint(directory).name == f"step-{last}"
    files = {p.name for p in (directory / f"step-{last}").iterdir()}
    assert files == {
        "shard-00001-model-00001-of-00001.safetensors",
        "optimizer.json",
        "scheduler.json",
        "rng-0.json",
        "state.json",
    }


def test_a_changed_config_is_not_resumed(tmp_path, tiny_model, chat_rows):
    from tunesmith.errors import UserError

    run(make_config(tmp_path, tiny_model, chat_rows, "train.max_steps=2"))
    with pytest.raises(UserError, match="train.lr"):
        run(make_config(tmp_path, tiny_model, chat_rows, "train.max_steps=2", "train.lr=1e-3"))
    with pytest.raises(UserError, match="already holds checkpoints"):
        run(make_config(tmp_path, tiny_model, chat_rows, "train.max_steps=2", "train.resume=never"))


def test_sigterm_to_a_real_process_checkpoints_and_resume_finishes(tmp_path, tiny_model, chat_rows):
    import os
    import subprocess
    import sys
    import time

    config = write_config_file(
        tmp_path, tiny_model, chat_rows, "epochs: 400, batch_size: 2, save_every: 100000, progress: false"
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "train", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or metrics.read_text().count('"loss"') < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "checkpoint was saved" in stderr
    stopped_at = rundir.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert stopped_at is not None and int(stopped_at.name.split("-")[1]) >= 3
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "train",
            str(config),
            "train.max_steps=" + str(int(stopped_at.name.split("-")[1]) + 2),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_eval_task_during_training_chooses_the_best_checkpoint(tmp_path, tiny_model, chat_rows, monkeypatch):
    from tunesmith.eval import in_training

    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"text": "cancel a transfer 2", "label": "cancel_transfer"}] * 2)
    accuracies = iter([0.2, 0.9, 0.5, 0.4])
    real_call = in_training.InTrainingEval.__call__

    def scripted(self, model, seed):  # the real task runs; its accuracy is replaced by a known sequence
        result = real_call(self, model, seed)
        result["accuracy"]["value"] = next(accuracies)
        return result

    monkeypatch.setattr(in_training.InTrainingEval, "__call__", scripted)
    config = make_config(
        tmp_path,
        tiny_model,
        chat_rows,
        "train.epochs=3",
        f"eval.data={eval_file}",
        "eval.every=3",
        "train.early_stopping.metric=accuracy",
        "train.early_stopping.patience=2",
        "eval.max_new_tokens=8",
    )
    result = run(config)
    records = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 12] and {"accuracy", "macro_f1"} <= set(evals[0]["eval"])
    assert rundir.best_checkpoint(config.output_dir / "checkpoints").name == "best-step-6"
    assert result.steps == 12 and any(r.get("event") == "early_stop" and r["best_step"] == 6 for r in records)


def test_selection_metric_must_be_computed():
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match="eval.every"):
        load_config(None, ["data.train=x.jsonl", "train.early_stopping.metric=accuracy"])
    with pytest.raises(UserError, match="did you mean 'accuracy'"):
        load_config(
            None, ["data.train=x.jsonl", "train.early_stopping.metric=acuracy", "eval.every=5", "eval.data=e.jsonl"]
        )


@pytest.mark.parametrize("train_head", [False, True])
def test_fused_head_cross_entropy_matches_autograd(train_head):
    """HeadCrossEntropy gives the loss and gradients of plain cross-entropy over the full logits."""
    from tunesmith.train import loss as loss_module

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=train_head)
    targets = torch.randint(0, 50, (37,))
    old_chunk, loss_module.HEAD_CHUNK = loss_module.HEAD_CHUNK, 8  # several chunks, the last one short
    try:
        fused = loss_module.HeadCrossEntropy.apply(hidden, weight, targets)
        (fused * 0.5).backward()
    finally:
        loss_module.HEAD_CHUNK = old_chunk
    grads = (hidden.grad.clone(), weight.grad.clone() if train_head else None)
    hidden.grad, weight.grad = None, None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (reference * 0.5).backward()
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(grads[0], hidden.grad)
    if train_head:
        torch.testing.assert_close(grads[1], weight.grad)
    else:
        assert weight.grad is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_layers_train_like_eager_layers(tmp_path, tiny_model, chat_rows, dtype, monkeypatch):
    """train.compile changes speed, not results: the same losses as eager, to float tolerance."""
    from tunesmith.models import fused_lora

    monkeypatch.setattr(fused_lora, "_LAST_CAST", fused_lora._LastCast())  # as a fresh process: no cast cached yet
    common = ("train.max_steps=3", "data.packing=true", f"train.dtype={dtype}")
    eager = make_config(tmp_path, tiny_model, chat_rows, *common, name="eager")
    compiled = make_config(tmp_path, tiny_model, chat_rows, *common, "train.compile=true", name="compiled")
    run(compiled)  # first, so its layers meet the empty cast cache
    run(eager)
    eager_losses = [loss for _, loss, _, _ in metric_lines(eager.output_dir)]
    compiled_losses = [loss for _, loss, _, _ in metric_lines(compiled.output_dir)]
    assert len(eager_losses) == len(compiled_losses) == 3
    assert compiled_losses == pytest.approx(
        eager_losses, rel=1e-4 if dtype == "float32" else 2e-3
    )  # bf16: 2^-8 a rounding


def test_a_run_saved_before_a_config_key_existed_still_resumes(tmp_path, tiny_model, chat_rows):
    """Keys added to the schema later (with defaults) are not a config change for an older run directory."""
    import yaml

    config = make_config(tmp_path, tiny_model, chat_rows, "train.max_steps=2")
    run(config)
    saved = yaml.safe_load((config.output_dir / "config.yaml").read_text())
    del saved["train"]["regularization"], saved["adapter"]["rslora"]
    (config.output_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    run(make_config(tmp_path, tiny_model, chat_rows, "train.max_steps=2"))  # resumes (nothing left to do), no error


def forty_rows() -> list[dict]:
    """40 one-turn conversations: with batch_size 8 and no packing, exactly 5 steps per epoch."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i % 5}"},
            ]
        }
        for i in range(40)
    ]


MAX_STEPS_OVERRIDES = ("train.batch_size=8", "data.packing=false", "train.epochs=1", "train.save_every=100")


def test_max_steps_is_the_exact_step_count_cycling_through_the_data(tmp_path, tiny_model, monkeypatch, capsys):
    """max_steps overrides epochs (as HF Trainer's does): 15 steps on 5 steps' worth of data is 3 epochs; a stop
    at step 7 (inside the second epoch) resumes into the same data order and learning-rate schedule."""
    overrides = (*MAX_STEPS_OVERRIDES, "train.max_steps=15", "train.warmup=2")
    straight, resumed = straight_and_resumed(tmp_path, tiny_model, forty_rows(), overrides, 7, monkeypatch)
    records = [json.loads(line) for line in (straight.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["total_steps"] == 15
    steps = [row for row in records if "loss" in row and "event" not in row]
    assert [row["step"] for row in steps] == list(range(1, 16))
    assert [row["epoch"] for row in steps] == [0] * 4 + [1] * 5 + [2] * 5 + [3], "5 steps an epoch, 3 epochs in all"
    assert steps[-1]["lr"] < steps[5]["lr"], "one schedule over all 15 steps"
    assert metric_lines(straight.output_dir) == metric_lines(resumed.output_dir)
    a = load_file(straight.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert "resuming from checkpoint step-7 (of 15)" in capsys.readouterr().err


def test_max_steps_below_an_epoch_stops_there(tmp_path, tiny_model):
    result = run(make_config(tmp_path, tiny_model, forty_rows(), *MAX_STEPS_OVERRIDES, "train.max_steps=3"))
    assert result.steps == 3
