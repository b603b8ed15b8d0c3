"""train.gradient_checkpointing: full and selective recompute give the gradients of no recompute; selective keeps
the matrix products and attention and recomputes the element-wise ops."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config.schema import AdapterConfig, TrainConfig
from tunesmith.models import load_model
from tunesmith.models.adapters import apply_adapter
from tunesmith.train import build

MODES = (False, True, "selective")


def model_in(mode, tiny_model, adapter: str):
    from tunesmith.models.adapters import load_options

    torch.manual_seed(0)
    model = load_model(str(tiny_model), **(load_options(adapter) if adapter != "full" else {}))[0]
    model = apply_adapter(model, AdapterConfig(type=adapter, r=4, alpha=8))
    if adapter != "full":
        torch.manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # non-zero, so the LoRA term and its gradients are live
                torch.nn.init.normal_(parameter, std=0.3)
    if mode:
        build.enable_gradient_checkpointing(model, mode)
    return model.train()


def loss_and_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", ["lora", "full", "qlora"])
def test_every_recompute_mode_gives_the_same_loss_and_gradients(tiny_model, adapter):
    if adapter == "qlora":
        pytest.importorskip("bitsandbytes")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {mode: loss_and_grads(model_in(mode, tiny_model, adapter), ids) for mode in MODES}
    loss, grads = results[False]
    assert len(grads) > 10
    for mode in MODES[1:]:
        assert torch.allclose(results[mode][0], loss, atol=1e-6), mode
        for name, grad in grads.items():
            assert torch.allclose(results[mode][1][name], grad, atol=1e-6, rtol=1e-5), (mode, name)


@pytest.fixture
def decisions(monkeypatch) -> dict[str, set]:
    """What selective recompute's policy decides per op name, recorded from here on."""
    recorded: dict[str, set] = {}
    policy = build.keep_products

    def recording(context, op, *args, **kwargs):
        decision = policy(context, op, *args, **kwargs)
        recorded.setdefault(op._overloadpacket.__name__, set()).add(decision)
        return decision

    monkeypatch.setattr(build, "keep_products", recording)
    return recorded


def test_selective_recompute_keeps_products_and_attention_and_recomputes_the_element_wise_ops(tiny_model, decisions):
    from torch.utils.checkpoint import CheckpointPolicy

    model = model_in("selective", tiny_model, "lora")
    loss_and_grads(model, torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0)))
    keep, redo = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    attention = [name for name in decisions if "scaled_dot_product" in name]
    assert attention and all(decisions[name] == {keep} for name in attention)
    assert decisions["mm"] == {keep}  # the base products and the LoRA down-projections (x A^T)
    # the LoRA up-projections added to them (inner dimension r=4): recomputed where the output is 32 or 64 wide,
    # kept for the 16-wide key and value projections (4 * 8 > 16)
    assert decisions["addmm"] == {keep, redo}
    for element_wise in ("silu", "mul", "rsqrt", "pow", "mean", "add"):
        assert decisions[element_wise] == {redo}, element_wise


def test_selective_recompute_is_a_config_value_and_other_words_are_refused():
    assert TrainConfig(gradient_checkpointing="selective").gradient_checkpointing == "selective"
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing is True
    with pytest.raises(ValueError, match="selective"):
        TrainConfig(gradient_checkpointing="partial")


def test_tunesmith_train_with_selective_recompute_logs_the_losses_of_a_run_without(tmp_path, tiny_model, chat_rows):
    import json

    from conftest import write_config_file

    from tunesmith.cli import main

    losses = {}
    for mode in ("false", "selective"):
        directory = tmp_path / mode
        directory.mkdir()
        config = write_config_file(
            directory,
            tiny_model,
            chat_rows,
            f"max_steps: 3, batch_size: 2, lr: 1.0e-2, warmup: 0, progress: false, gradient_checkpointing: {mode}",
        )
        assert main(["train", str(config)]) == 0
        rows = [json.loads(line) for line in (directory / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [row["loss"] for row in rows if "loss" in row]
    assert len(losses["false"]) == 3
    assert losses["selective"] == pytest.approx(losses["false"], abs=1e-5)


def test_packed_rows_through_the_chunked_attention_give_every_mode_the_same_gradients_and_selective_keeps_it(
    tiny_model, monkeypatch, decisions
):
    from torch.utils.checkpoint import CheckpointPolicy

    from tunesmith.data.packing import collate
    from tunesmith.data.tokenize import TokenizedExample
    from tunesmith.models import attention
    from tunesmith.train.loss import token_loss_sum

    monkeypatch.setitem(attention.CHUNKED, "min_key_heads", 1)
    monkeypatch.setitem(attention.CHUNKED, "min_length", 1)
    monkeypatch.setattr(attention, "CHUNK_ROWS", 8)  # several chunks per example
    generator = torch.Generator().manual_seed(0)
    batch = collate(
        [TokenizedExample(torch.randint(0, 300, (16,), generator=generator).tolist(), [True] * 16) for _ in range(3)]
    )
    results = {}
    for mode in MODES:
        model = model_in(mode, tiny_model, "lora")
        loss = token_loss_sum(model, batch)
        loss.backward()
        results[mode] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert decisions["causal_attention"] == {CheckpointPolicy.MUST_SAVE}
    assert not any("scaled_dot_product" in name for name in decisions)
    loss, grads = results[False]
    for mode in MODES[1:]:
        assert torch.allclose(results[mode][0], loss, atol=1e-5), mode
        for name, grad in grads.items():
            assert torch.allclose(results[mode][1][name], grad, atol=1e-6, rtol=1e-5), (mode, name)
