"""A fused forward and backward for PEFT's LoRA linear layers: the same numbers, fewer passes over memory.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the scaling multiplies and the sum adds a
full (tokens x out_features) tensor, and in backward autograd scales the gradient and adds the two input
gradients, again at full size, on every adapted layer. Here the scaling goes on the rank-r product and
the LoRA term is accumulated into the base output inside the GEMM (`addmm_`), in both directions:

    forward   xa = x A^T                  out = x W^T + b;   out += s * xa B^T
    backward  gb = g B                    grad_x = g W;      grad_x += s * gb A
              grad_B = s * g^T xa         grad_A = s * gb^T x

Only x (which the base layer's input already is) and the small xa are saved. Under selective recompute the
sum goes into a new tensor instead (`accumulate_out_of_place`), since the kept base product must not change.
The layer stays PEFT's own module, so saving, loading, merging and every case this path does not cover
(dropout while training, DoRA and other variants, several active adapters, merged or disabled adapters,
per-call adapter names) go through PEFT's forward unchanged.
"""

from __future__ import annotations

import torch

IN_PLACE = "_tunesmith_fused_in_place"  # a layer attribute: False when its base product must not be modified


def linear_forward(
    flat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    in_place: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """flat W^T + b, plus s (flat A^T) B^T with a LoRA pair: the output and flat A^T (None without LoRA)."""
    out = torch.nn.functional.linear(flat, weight, bias)
    if lora_a is None:
        return out, None
    xa = flat @ lora_a.t()
    if in_place:
        out.addmm_(xa, lora_b.t(), alpha=scaling)
    else:  # selective recompute keeps the base product: it must stay as computed
        out = torch.addmm(out, xa, lora_b.t(), alpha=scaling)
    return out, xa


def linear_backward(
    grad: torch.Tensor,
    flat: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    xa: torch.Tensor | None,
    scaling: float,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `linear_forward` (grad and flat 2-D) for (flat, weight, bias, lora_a, lora_b), each only
    where `needs` says so."""
    need_x, need_w, need_bias, need_a, need_b = needs
    gb = grad @ lora_b if lora_a is not None else None
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    if need_x:
        grad_x = grad @ weight
        if gb is not None:
            grad_x.addmm_(gb, lora_a, alpha=scaling)
    if need_w:
        grad_w = grad.t() @ flat
    if need_bias:
        grad_bias = grad.sum(0)
    if need_b:
        grad_b = (grad.t() @ xa).mul_(scaling)
    if need_a:
        grad_a = (gb.t() @ flat).mul_(scaling)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


class LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        in_place: bool = True,
    ) -> torch.Tensor:
        out, xa = linear_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling, in_place)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        grad_x, grad_w, grad_bias, grad_a, grad_b = linear_backward(
            grad.reshape(-1, grad.shape[-1]),
            x.reshape(-1, x.shape[-1]),
            weight,
            lora_a,
            lora_b,
            xa,
            ctx.scaling,
            ctx.needs_input_grad[:5],
        )
        return grad_x if grad_x is None else grad_x.view(x.shape), grad_w, grad_bias, grad_a, grad_b, None, None


class GatedDown(torch.autograd.Function):
    """down(silu(gate) * up), the tail of a SwiGLU MLP (Llama, Qwen, Mistral), with or without a LoRA pair on
    down: the same numbers as autograd's, with 2 of its 4 saved (tokens x intermediate) tensors gone.

    Autograd keeps gate (for SiLU), silu(gate) and up (for the product) and the product (down's input) for
    backward; here only gate and up are kept, and backward recomputes silu(gate) and the product from them
    (two element-wise passes against half the MLP's activation memory).
    """

    @staticmethod
    def forward(
        ctx,
        gate: torch.Tensor,
        up: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        scaling: float,
        in_place: bool,
    ) -> torch.Tensor:
        gated = torch.nn.functional.silu(gate).mul_(up)
        out, xa = linear_forward(gated.view(-1, gated.shape[-1]), weight, bias, lora_a, lora_b, scaling, in_place)
        ctx.save_for_backward(gate, up, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        return out.view(*gate.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, weight, lora_a, lora_b, xa = ctx.saved_tensors
        silu = torch.nn.functional.silu(gate)
        gated = silu * up
        width = gate.shape[-1]
        needs = ctx.needs_input_grad
        grad_gated, grad_w, grad_bias, grad_a, grad_b = linear_backward(
            grad.reshape(-1, grad.shape[-1]),
            gated.view(-1, width),
            weight,
            lora_a,
            lora_b,
            xa,
            ctx.scaling,
            (needs[0] or needs[1], *needs[2:6]),
        )
        del gated
        grad_gate = grad_up = None
        if grad_gated is not None:
            grad_gated = grad_gated.view(gate.shape)
            if needs[1]:
                grad_up = silu.mul_(grad_gated)  # silu's last use: its buffer becomes up's gradient
            if needs[0]:
                grad_gate = torch.ops.aten.silu_backward(grad_gated.mul_(up), gate)
        return grad_gate, grad_up, grad_w, grad_bias, grad_a, grad_b, None, None


def _fusable(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active vanilla-LoRA adapter this call can take the fused path for, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity) and layer.training:
        return None
    base = layer.get_base_layer()
    if (
        type(base) is not torch.nn.Linear
        or base.weight.requires_grad
        or (base.bias is not None and base.bias.requires_grad)
        or layer.lora_A[name].bias is not None
    ):
        return None
    return name


def kernel_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a fused kernel computes `tensor`'s products in: autocast's where it is on for its device (bf16
    training), else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def _in_compute_dtype(function, tensors: tuple, *options):
    """`function(*tensors, *options)` with the tensors in one dtype: autocast's where it is on (the GEMMs then
    run in it), else their own; None when they differ outside autocast (the caller takes the unfused path)."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = kernel_dtype(tensors[0])
        with torch.autocast(device, enabled=False):
            return function(*(t if t is None else t.to(dtype) for t in tensors), *options)
    if len({t.dtype for t in tensors if t is not None}) != 1:
        return None
    return function(*tensors, *options)


def _fused_forward(layer, peft_forward):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _fusable(layer, x, args, kwargs)
        if name is None:
            return peft_forward(x, *args, **kwargs)
        base = layer.get_base_layer()
        tensors = (x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight)
        out = _in_compute_dtype(LoraLinear.apply, tensors, layer.scaling[name], getattr(layer, IN_PLACE, True))
        return peft_forward(x, *args, **kwargs) if out is None else out

    return forward


def _down_operands(down: torch.nn.Module, x: torch.Tensor) -> tuple | None:
    """(weight, bias, lora_a, lora_b, scaling, in_place) for GatedDown: a plain Linear, or a LoRA layer the
    fused path takes; None for anything else (a 4-bit base, DoRA, dropout while training...)."""
    if type(down) is torch.nn.Linear:
        return down.weight, down.bias, None, None, 1.0, True
    name = _fusable(down, x, (), {}) if hasattr(down, "lora_A") else None
    if name is None:
        return None
    base = down.get_base_layer()
    return (
        base.weight,
        base.bias,
        down.lora_A[name].weight,
        down.lora_B[name].weight,
        down.scaling[name],
        getattr(down, IN_PLACE, True),
    )


def _gated_forward(mlp, original_forward):
    def forward(x: torch.Tensor) -> torch.Tensor:
        operands = _down_operands(mlp.down_proj, x)
        if operands is None:
            return original_forward(x)
        weight, bias, lora_a, lora_b, scaling, in_place = operands
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        out = _in_compute_dtype(GatedDown.apply, (gate, up, weight, bias, lora_a, lora_b), scaling, in_place)
        return mlp.down_proj(mlp.act_fn(gate) * up) if out is None else out

    return forward


def fuse_gated_mlps(model: torch.nn.Module) -> int:
    """Give every SwiGLU MLP in `model` (gate_proj, up_proj, down_proj and a SiLU: Llama, Qwen, Mistral...)
    the GatedDown path; returns how many took it. Others (GELU, a fused gate_up_proj) are left as they are."""
    from transformers.activations import SiLUActivation

    count = 0
    for module in model.modules():
        gated = all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        if gated and isinstance(module.act_fn, (torch.nn.SiLU, SiLUActivation)) and "forward" not in module.__dict__:
            module.forward = _gated_forward(module, module.forward)
            count += 1
    return count


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA Linear in `model` the fused path; returns how many layers took it."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and "forward" not in module.__dict__:
            module.forward = _fused_forward(module, module.forward)
            count += 1
    return count


def accumulate_out_of_place(model: torch.nn.Module) -> None:
    """Make the fused layers add the LoRA term into a new tensor, leaving the base product as computed. Selective
    recompute keeps that product for backward; the in-place sum (about 6% faster otherwise) would change it."""
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear:
            setattr(module, IN_PLACE, False)
