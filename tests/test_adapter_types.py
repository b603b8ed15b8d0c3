"""Every adapter type: what trains and what stays frozen, training's forward equals PEFT's own, saved
weights reload to the same logits in plain transformers + peft, and a resumed run equals a straight one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_training import make_config, metric_lines, run, straight_and_resumed

from tunesmith.config.schema import AdapterConfig, TrainConfig
from tunesmith.data.packing import collate
from tunesmith.data.tokenize import TokenizedExample
from tunesmith.models import load_model
from tunesmith.models.adapters import apply_adapter, load_options, parameter_counts, save_final
from tunesmith.train.distributed import Runner
from tunesmith.train.loss import token_loss_sum
from tunesmith.train.optim import build_optimizer, build_scheduler
from tunesmith.train.step import train_step

PEFT_TYPES = ["lora", "qlora", "dora", "ia3", "llama_adapter", "prompt_tuning", "prefix_tuning"]
ALL_TYPES = PEFT_TYPES + ["full", "freeze"]
OPTIONS = {
    "freeze": {"layers": 1, "modules": ["norm"]},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "llama_adapter": {"num_virtual_tokens": 4, "layers": 1},
}


def adapted(model_dir, adapter_type: str):
    config = AdapterConfig(type=adapter_type, r=4, alpha=8, **OPTIONS.get(adapter_type, {}))
    torch.manual_seed(0)
    model, tokenizer = load_model(str(model_dir), **load_options(adapter_type))
    return apply_adapter(model, config), tokenizer


def examples(count: int = 3, seed: int = 0) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [9, 14, 6, 11][:count]
    return [
        TokenizedExample(torch.randint(5, 300, (n,), generator=generator).tolist(), [False] * 3 + [True] * (n - 3))
        for n in lengths
    ]


def peft_forward_loss(model, example: TokenizedExample) -> torch.Tensor:
    """The summed loss of one example through the model's own forward (PEFT adds its soft prompt itself)."""
    ids = torch.tensor([example.input_ids])
    labels = torch.tensor([[t if m else -100 for t, m in zip(example.input_ids[1:], example.loss_mask[1:])] + [-100]])
    logits = model(input_ids=ids).logits[:, -ids.shape[1] :].float()
    return torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum", ignore_index=-100)


@pytest.mark.parametrize("adapter_type", ALL_TYPES)
def test_trainable_parameters_move_and_frozen_ones_do_not(tiny_model, adapter_type):
    model, _ = adapted(tiny_model, adapter_type)
    counts = parameter_counts(model)
    assert 0 < counts["trainable_parameters"] <= counts["total_parameters"]
    assert (counts["trainable_share"] == 1.0) == (adapter_type == "full")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(lr=1e-2, warmup=0, schedule="constant")
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, 4)
    for _ in range(2):  # two steps: LoRA's B and the adapters' zero-initialised gates move first, then the rest
        train_step(Runner(model), [collate(examples())], optimizer, scheduler, 1.0, torch.device("cpu"), None)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable, (sorted(trainable - moved)[:3], sorted(moved - trainable)[:3])
    if adapter_type == "freeze":
        assert all(".layers.1." in name or "norm" in name for name in trainable)
        assert any(".layers.1." in name for name in trainable) and not any(
            ".layers.0.self_attn" in n for n in trainable
        )


@pytest.mark.parametrize("adapter_type", ["prompt_tuning", "prefix_tuning", "llama_adapter", "ia3", "dora"])
def test_packed_training_loss_equals_the_models_own_forward_per_example(tiny_model, adapter_type):
    """Training runs examples packed in one flat row; each must get exactly what PEFT's forward gives it alone."""
    model, _ = adapted(tiny_model, adapter_type)
    with torch.no_grad():  # make the adapter act (several start as an identity)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    model.eval()
    batch = examples()
    packed = token_loss_sum(model, collate(batch))
    alone = sum(peft_forward_loss(model, example) for example in batch)
    assert torch.allclose(packed, alone, rtol=1e-4), (float(packed), float(alone))


@pytest.mark.parametrize("adapter_type", ALL_TYPES)
def test_saved_weights_reload_to_identical_logits(tiny_model, tmp_path, adapter_type):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = adapted(tiny_model, adapter_type)
    config = TrainConfig(lr=1e-2, warmup=0, schedule="constant")
    optimizer = build_optimizer(model, config)
    train_step(
        Runner(model),
        [collate(examples())],
        optimizer,
        build_scheduler(optimizer, config, 2),
        1.0,
        torch.device("cpu"),
        None,
    )
    save_final(model, tokenizer, tmp_path / "out")
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        if adapter_type in ("full", "freeze"):
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        else:
            base, _ = load_model(str(tiny_model), **load_options(adapter_type))
            reloaded = PeftModel.from_pretrained(base, tmp_path / "out")
        assert torch.allclose(reloaded.eval()(input_ids=ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("adapter_type", ["qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "freeze"])
def test_resume_is_exact(tmp_path, tiny_model, chat_rows, monkeypatch, adapter_type):
    overrides = [
        f"adapter.type={adapter_type}",
        "train.max_steps=4",
        "adapter.r=4",
        "adapter.num_virtual_tokens=4",
        "adapter.layers=1",
    ]
    straight, interrupted = straight_and_resumed(tmp_path, tiny_model, chat_rows, overrides, 2, monkeypatch)
    assert metric_lines(straight.output_dir) == metric_lines(interrupted.output_dir)
    folder, name = (
        ("model", "model.safetensors") if adapter_type == "freeze" else ("adapter", "adapter_model.safetensors")
    )
    a, b = load_file(straight.output_dir / folder / name), load_file(interrupted.output_dir / folder / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainable_count_is_reported_at_start(tmp_path, tiny_model, chat_rows):
    import json

    config = make_config(tmp_path, tiny_model, chat_rows, "adapter.type=ia3", "train.max_steps=1")
    run(config)
    first = json.loads((config.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < first["trainable_parameters"] < first["total_parameters"] and 0 < first["trainable_share"] < 0.1


def test_freeze_without_a_choice_is_a_config_error(tmp_path, tiny_model, chat_rows):
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match="adapter.layers"):
        make_config(tmp_path, tiny_model, chat_rows, "adapter.type=freeze")


@pytest.mark.parametrize("adapter_type", ["prompt_tuning", "prefix_tuning"])
def test_a_disabled_soft_prompt_gives_the_base_model(tiny_model, adapter_type):
    """Baselines switch the adapter off: soft prompts too must vanish from the packed training/scoring path."""
    model, _ = adapted(tiny_model, adapter_type)
    base, _ = load_model(str(tiny_model))
    batch = collate(examples())
    with torch.no_grad():
        with model.disable_adapter():
            disabled = token_loss_sum(model, batch)
        assert torch.allclose(disabled, token_loss_sum(base, batch), rtol=1e-5)
        assert not torch.allclose(token_loss_sum(model, batch), disabled, rtol=1e-3)
