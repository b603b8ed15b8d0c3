"""Strategies against forgetting: the penalty's gradient, the frozen set at each step, per-layer rates."""

from __future__ import annotations

import json

import pytest
import torch
from test_training import make_config, metric_lines, run, straight_and_resumed

from tunesmith.config.schema import AdapterConfig, RegularizationConfig, TrainConfig, UnfreezeConfig
from tunesmith.models import load_model
from tunesmith.models.adapters import apply_adapter
from tunesmith.recipes import sft
from tunesmith.train.optim import build_optimizer
from tunesmith.train.strategies import GradualUnfreezing, Regularization


def model_with(tiny_model, adapter_type: str):
    torch.manual_seed(0)
    return apply_adapter(load_model(str(tiny_model))[0], AdapterConfig(type=adapter_type, r=4, alpha=8))


@pytest.mark.parametrize("l2, l1", [(0.3, 0.0), (0.0, 0.2), (0.3, 0.2)])
def test_penalty_gradient_pulls_full_weights_toward_pretrained(tiny_model, l2, l1):
    model = model_with(tiny_model, "full")
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    regularization = Regularization(model, RegularizationConfig(l2_sp=l2, l1_sp=l1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    penalty = regularization.penalty()
    penalty.backward()
    expected_value = 0.0
    for name, p in model.named_parameters():
        delta = p.detach() - start[name]
        assert torch.allclose(p.grad, 2 * l2 * delta + l1 * delta.sign(), atol=1e-6), name
        expected_value += float(l2 * delta.pow(2).sum() + l1 * delta.abs().sum())
    assert penalty.item() == pytest.approx(expected_value, rel=1e-5)


def test_lora_penalty_is_on_the_update_b_a(tiny_model):
    model = model_with(tiny_model, "lora")
    regularization = Regularization(model, RegularizationConfig(l2_sp=0.5, l1_sp=0.1))
    assert regularization.penalty().item() == 0.0  # B starts at zero: no update yet, whatever A is
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    regularization.penalty().backward()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    update = s * (b @ a)
    expected_b = 2 * 0.5 * s * (update @ a.T) + 0.1 * s * (update.sign() @ a.T)
    expected_a = 2 * 0.5 * s * (b.T @ update) + 0.1 * s * (b.T @ update.sign())
    assert torch.allclose(b.grad, expected_b.detach(), atol=1e-5)
    assert torch.allclose(a.grad, expected_a.detach(), atol=1e-5)


def test_gradual_unfreezing_opens_one_group_every_n_steps_from_the_top(tiny_model):
    model = model_with(tiny_model, "full")  # 2 layers: [head, final norm, layer 1], [layer 0], [embeddings]
    schedule = GradualUnfreezing(model, UnfreezeConfig(every=2))
    assert len(schedule.groups) == 3
    trainable_at = {}
    for step in range(7):
        schedule.apply(step, 0, step)
        trainable_at[step] = {name for name, p in model.named_parameters() if p.requires_grad}
        schedule.release()
    assert all(".layers.1." in n or "norm.weight" == n.split("model.")[-1] or "lm_head" in n for n in trainable_at[0])
    assert any(".layers.1." in n for n in trainable_at[0]) and not any(".layers.0." in n for n in trainable_at[1])
    assert any(".layers.0." in n for n in trainable_at[2]) and not any("embed" in n for n in trainable_at[3])
    assert trainable_at[4] == trainable_at[6] == {name for name, _ in model.named_parameters()}
    assert trainable_at[0] < trainable_at[2] < trainable_at[4]


def test_unfreezing_in_a_run_moves_only_open_groups_and_logs_each_stage(tmp_path, tiny_model, chat_rows, monkeypatch):
    config = make_config(tmp_path, tiny_model, chat_rows, "train.max_steps=4", "train.unfreeze.every=2")
    seen = []
    original = sft.train_step

    def spy(model, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
        result = original(model, *args, **kwargs)
        seen.append({n for n, p in model.named_parameters() if "lora" in n and not torch.equal(p.detach(), before[n])})
        return result

    monkeypatch.setattr(sft, "train_step", spy)
    run(config)
    assert seen[0] and all(".layers.1." in n for n in seen[0] | seen[1])
    assert any(".layers.0." in n for n in seen[2] | seen[3])
    events = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["groups"]) for e in events if e.get("event") == "unfreeze"] == [(0, 1), (2, 2)]


def test_layer_lr_decay_scales_each_layer_below_the_top(tiny_model):
    model = model_with(tiny_model, "full")
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, layer_lr_decay=0.5))
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert rate[id(named["model.layers.1.mlp.up_proj.weight"])] == pytest.approx(1e-3)
    assert rate[id(named["model.norm.weight"])] == pytest.approx(1e-3)
    assert rate[id(named["model.layers.0.mlp.up_proj.weight"])] == pytest.approx(5e-4)
    assert rate[id(named["model.embed_tokens.weight"])] == pytest.approx(2.5e-4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the logged rate is the top layer's


def test_adamw_runs_its_fused_kernel_on_float32_cpu_weights_and_its_loop_elsewhere(tiny_model):
    model = model_with(tiny_model, "full")
    fused = build_optimizer(model, TrainConfig(lr=1e-3))
    assert all(group["fused"] for group in fused.param_groups)
    reference = torch.optim.AdamW(
        [p.detach().clone().requires_grad_() for p in fused.param_groups[0]["params"]], lr=1e-3
    )
    for parameter, twin in zip(fused.param_groups[0]["params"], reference.param_groups[0]["params"]):
        parameter.grad = twin.grad = torch.randn_like(parameter)
    fused.step(), reference.step()  # the same update, to float32 rounding
    for parameter, twin in zip(fused.param_groups[0]["params"], reference.param_groups[0]["params"]):
        torch.testing.assert_close(parameter, twin)
    model.model.norm.weight.data = model.model.norm.weight.data.half()
    assert not any(group["fused"] for group in build_optimizer(model, TrainConfig(lr=1e-3)).param_groups)


def test_l2_sp_keeps_full_fine_tuning_closer_to_the_pretrained_weights(tmp_path, tiny_model, chat_rows):
    from safetensors.torch import load_file

    pretrained = {k: v for k, v in load_file(tiny_model / "model.safetensors").items()}

    def drift(*overrides: str, name: str) -> float:
        config = make_config(
            tmp_path, tiny_model, chat_rows, "adapter.type=full", "train.max_steps=6", *overrides, name=name
        )
        run(config)
        tuned = load_file(config.output_dir / "model" / "model.safetensors")
        return sum(float((tuned[k] - pretrained[k]).pow(2).sum()) for k in pretrained if k in tuned)

    assert drift("train.regularization.l2_sp=50", name="l2sp") < 0.5 * drift(name="plain")


def test_resume_is_exact_with_unfreezing_and_regularization(tmp_path, tiny_model, chat_rows, monkeypatch):
    overrides = (
        "train.max_steps=5",
        "train.unfreeze.every=2",
        "train.regularization.l2_sp=0.1",
        "train.layer_lr_decay=0.7",
    )
    straight, interrupted = straight_and_resumed(tmp_path, tiny_model, chat_rows, overrides, 3, monkeypatch)
    assert metric_lines(straight.output_dir) == metric_lines(interrupted.output_dir)
    assert metric_lines(straight.output_dir, "penalty") == metric_lines(interrupted.output_dir, "penalty")
