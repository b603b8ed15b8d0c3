"""The fused LoRA path gives PEFT's numbers: outputs and every gradient, and falls back where it does not apply."""

from __future__ import annotations

import pytest
import torch

from tunesmith.config.schema import AdapterConfig
from tunesmith.models import load_model
from tunesmith.models.adapters import apply_adapter


def lora_pair(model_dir, dropout: float = 0.0):
    """The same LoRA model twice: through tunesmith (fused) and through PEFT alone, B set non-zero."""
    from peft import LoraConfig, get_peft_model

    fused = apply_adapter(load_model(str(model_dir))[0], AdapterConfig(type="lora", r=4, alpha=8, dropout=dropout))
    plain = get_peft_model(
        load_model(str(model_dir))[0],
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    torch.manual_seed(1)
    for name, parameter in fused.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_loss_and_gradients(fused, plain, ids, trained: str) -> float:
    """The fused model's loss and every gradient equal the plain one's (some named with `trained` among them);
    returns the loss."""
    loss_f, grads_f = loss_and_grads(fused, ids)
    loss_p, grads_p = loss_and_grads(plain, ids)
    assert abs(loss_f - loss_p) < 1e-5
    assert grads_f.keys() == grads_p.keys() and any(trained in n for n in grads_f)
    for name in grads_p:
        assert torch.allclose(grads_f[name], grads_p[name], atol=1e-5, rtol=1e-4), name
    return loss_f


def test_fused_lora_matches_peft_in_loss_and_every_gradient(tiny_model):
    fused, plain = lora_pair(tiny_model)
    assert all(
        "forward" in m.__dict__ for m in fused.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")
    )
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    loss_f = assert_same_loss_and_gradients(fused, plain, ids, "lora_A")
    # the LoRA term is live: with B at zero the loss would differ
    with torch.no_grad():
        for name, parameter in fused.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    assert abs(fused(input_ids=ids, labels=ids).loss.detach() - loss_f) > 1e-3


def test_fused_lora_under_bf16_autocast_is_as_close_to_fp32_as_peft(tiny_model):
    fused, plain = lora_pair(tiny_model)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    exact = plain(input_ids=ids).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f = fused(input_ids=ids).logits.detach()
        out_p = plain(input_ids=ids).logits.detach()
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    error_fused, error_peft = (out_f.float() - exact).abs().mean(), (out_p.float() - exact).abs().mean()
    assert error_fused < 1.5 * error_peft and error_fused < 0.05


@pytest.mark.parametrize("training", [True, False])
def test_dropout_while_training_goes_through_peft(tiny_model, training):
    fused, plain = lora_pair(tiny_model, dropout=0.5)
    fused.train(training), plain.train(training)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    out_f = fused(input_ids=ids).logits
    torch.manual_seed(3)
    out_p = plain(input_ids=ids).logits
    assert torch.allclose(out_f, out_p, atol=1e-5)
    torch.manual_seed(4)
    assert torch.allclose(fused(input_ids=ids).logits, out_f, atol=1e-5) != training  # dropout acts only in training


def test_disabled_adapter_gives_the_base_model(tiny_model):
    fused, _ = lora_pair(tiny_model)
    base = load_model(str(tiny_model))[0]
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with fused.disable_adapter():
        assert torch.allclose(fused(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)
    assert not torch.allclose(fused(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


def saved_bytes(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `module(x)` runs, its weights aside."""
    weights = {parameter.untyped_storage().data_ptr() for parameter in module.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_gated_mlp_gives_autograds_gradients_and_keeps_half_the_activations(tiny_model, adapter):
    """The SwiGLU MLP's fused tail (GatedDown): the loss and every gradient of the unfused model, for LoRA (down's
    LoRA pair) and full fine-tuning (down's own weight); each MLP keeps 2 (tokens x intermediate) tensors, not 4."""
    from tunesmith.models.fused_lora import fuse_gated_mlps

    if adapter == "lora":
        fused, plain = lora_pair(tiny_model)
    else:
        torch.manual_seed(0)
        fused = apply_adapter(load_model(str(tiny_model))[0], AdapterConfig(type="full"))
        plain = load_model(str(tiny_model))[0]
        plain.load_state_dict(fused.state_dict())
    mlps = [m for m in fused.modules() if type(m).__name__ == "LlamaMLP"]
    assert mlps and all("forward" in m.__dict__ for m in mlps) and fuse_gated_mlps(fused) == 0  # once only
    assert_same_loss_and_gradients(
        fused, plain, torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0)), "down_proj"
    )
    x = torch.randn(2, 24, mlps[0].gate_proj.in_features, requires_grad=True)
    intermediate = 2 * 24 * mlps[0].down_proj.in_features * 4
    plain_mlp = [m for m in plain.modules() if type(m).__name__ == "LlamaMLP"][0]
    kept, kept_before = saved_bytes(mlps[0], x), saved_bytes(plain_mlp, x)
    assert kept_before - kept == 2 * intermediate


def qlora_pair(model_dir, dtype: torch.dtype = torch.float32):
    """The same QLoRA model (a 4-bit NF4 base) twice: tunesmith's, whose LoRA layers and MLPs take the fused path and
    dequantise the base for each product, and PEFT's own over bitsandbytes' layers; B set non-zero."""
    from peft import LoraConfig, get_peft_model

    def base():
        return load_model(str(model_dir), dtype=dtype, quantization="nf4")[0]

    fused = apply_adapter(base(), AdapterConfig(type="qlora", r=4, alpha=8))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    plain = get_peft_model(base(), config)
    torch.manual_seed(1)
    for name, parameter in fused.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    plain.load_state_dict(fused.state_dict(), strict=False)
    return fused, plain


def test_fused_qlora_dequantises_the_4bit_base_per_product_and_matches_peft_over_bitsandbytes(tiny_model):
    pytest.importorskip("bitsandbytes")
    fused, plain = qlora_pair(tiny_model)
    lora_layers = [m for m in fused.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    assert lora_layers and all("forward" in m.__dict__ for m in lora_layers)
    assert all(m.get_base_layer().weight.dtype == torch.uint8 for m in lora_layers)  # the base stays packed
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    assert_same_loss_and_gradients(fused, plain, ids, "lora_A")
