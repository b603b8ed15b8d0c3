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

import threading
import weakref

import torch

from tunesmith.models.precision import kernel_dtype

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
        state=None,
    ) -> torch.Tensor:
        matrix = materialise(weight, state, x.dtype)
        out, xa = linear_forward(x.reshape(-1, x.shape[-1]), matrix, bias, lora_a, lora_b, scaling, in_place)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.state = scaling, state
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        grad_x, grad_w, grad_bias, grad_a, grad_b = linear_backward(
            grad.reshape(-1, grad.shape[-1]),
            x.reshape(-1, x.shape[-1]),
            materialise(weight, ctx.state, x.dtype),
            lora_a,
            lora_b,
            xa,
            ctx.scaling,
            ctx.needs_input_grad[:5],
        )
        grad_x = grad_x if grad_x is None else grad_x.view(x.shape)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


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
        state=None,
    ) -> torch.Tensor:
        gated = torch.nn.functional.silu(gate).mul_(up)
        matrix = materialise(weight, state, gate.dtype)
        out, xa = linear_forward(gated.view(-1, gated.shape[-1]), matrix, bias, lora_a, lora_b, scaling, in_place)
        ctx.save_for_backward(gate, up, weight, lora_a, lora_b, xa)
        ctx.scaling, ctx.state = scaling, state
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
            materialise(weight, ctx.state, gate.dtype),
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
        return grad_gate, grad_up, grad_w, grad_bias, grad_a, grad_b, None, None, None


def quant_state(base: torch.nn.Module):
    """A bitsandbytes 4-bit layer's quantisation state (QLoRA's NF4 base), else None (also for PEFT's LoRA layer
    over one, which shares its class name)."""
    bitsandbytes_4bit = type(base).__name__ == "Linear4bit" and type(base).__module__.startswith("bitsandbytes")
    return getattr(base.weight, "quant_state", None) if bitsandbytes_4bit else None


def materialise(weight: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The weight matrix to multiply by: `weight` itself, or a 4-bit weight (with its `state`) dequantised to `dtype`.
    The dequantised copy lives only for one product: a fused layer saves the packed 4-bit weight for backward and
    dequantises it again there (about 0.2 ms for a 576 x 1536 matrix on one core), so QLoRA never holds more than one
    layer's matrix in 16 or 32 bits."""
    if state is None:
        return weight
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight, state).to(dtype)


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
        (type(base) is not torch.nn.Linear and quant_state(base) is None)
        or base.weight.requires_grad
        or (base.bias is not None and base.bias.requires_grad)
        or layer.lora_A[name].bias is not None
    ):
        return None
    return name


class _LastCast(threading.local):
    """The input most recently cast to the compute dtype, with its cast (one per thread)."""

    source: weakref.ref | None = None
    version: int = -1
    cast: torch.Tensor | None = None


_LAST_CAST = _LastCast()


class _SharedCast(torch.autograd.Function):
    """One reader's view of an input's shared cast; its gradient goes back to the input in the input's dtype, so
    the readers' gradients add up there (in float32), not in the cast's dtype."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = tensor.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None


def cast_once(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, cast once for the layers that read it in turn: q, k and v (gate and up) share one input,
    so they share its one cast, and backward saves one copy of it instead of three. Their gradients still add up in
    the input's own dtype (_SharedCast)."""
    if tensor.dtype == dtype:
        return tensor
    if torch.compiler.is_compiling():  # a compiled layer (train.compile) dedupes its casts itself; the cache below
        return tensor.to(dtype)  # is Python state its guards cannot follow
    last = _LAST_CAST
    fresh = not (last.source is not None and last.source() is tensor and last.version == tensor._version)
    if fresh or last.cast.dtype != dtype:
        with torch.no_grad():
            cast = tensor.to(dtype)
        last.source, last.version, last.cast = weakref.ref(tensor), tensor._version, cast
    return _SharedCast.apply(tensor, last.cast) if tensor.requires_grad else last.cast


def _in_compute_dtype(function, tensors: tuple, *options):
    """`function(*tensors, *options)` with the tensors in one dtype: autocast's where it is on (the GEMMs then
    run in it; the input cast once for the layers that share it), else their own; None when they differ outside
    autocast (the caller takes the unfused path)."""
    device = tensors[0].device.type
    if torch.is_autocast_enabled(device):
        dtype = kernel_dtype(tensors[0])
        with torch.autocast(device, enabled=False):
            x, *rest = tensors
            rest = [t if t is None or not t.is_floating_point() else t.to(dtype) for t in rest]  # 4-bit: as it is
            return function(cast_once(x, dtype), *rest, *options)
    if len({t.dtype for t in tensors if t is not None and t.is_floating_point()}) != 1:
        return None
    return function(*tensors, *options)


def _fused_forward(layer, peft_forward):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _fusable(layer, x, args, kwargs)
        if name is None:
            return peft_forward(x, *args, **kwargs)
        base = layer.get_base_layer()
        tensors = (x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight)
        options = (layer.scaling[name], getattr(layer, IN_PLACE, True), quant_state(base))
        out = _in_compute_dtype(LoraLinear.apply, tensors, *options)
        return peft_forward(x, *args, **kwargs) if out is None else out

    return forward


def _down_operands(down: torch.nn.Module, x: torch.Tensor) -> tuple | None:
    """(weight, bias, lora_a, lora_b, scaling, in_place, state) for GatedDown: a plain Linear or 4-bit layer, or a
    LoRA layer the fused path takes; None for anything else (DoRA, dropout while training...)."""
    state = quant_state(down)
    if type(down) is torch.nn.Linear or state is not None:
        return down.weight, down.bias, None, None, 1.0, True, state
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
        quant_state(base),
    )


def _gated_forward(mlp, original_forward):
    def forward(x: torch.Tensor) -> torch.Tensor:
        operands = _down_operands(mlp.down_proj, x)
        if operands is None:
            return original_forward(x)
        weight, bias, lora_a, lora_b, scaling, in_place, state = operands
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        out = _in_compute_dtype(GatedDown.apply, (gate, up, weight, bias, lora_a, lora_b), scaling, in_place, state)
        return mlp.down_proj(mlp.act_fn(gate) * up) if out is None else out

    return forward


def fuse_gated_mlps(model: torch.nn.Module) -> int:
    """Give every SwiGLU MLP in `model` (gate_proj, up_proj, down_proj and a SiLU: Llama, Qwen, Mistral...)
    the GatedDown path; returns how many took it. Others (GELU, a fused gate_up_proj) are left as they are."""
    count = 0
    for module in model.modules():
        if gated_down_refusal(module) is None and "forward" not in module.__dict__:
            module.forward = _gated_forward(module, module.forward)
            count += 1
    return count


def gated_down_refusal(mlp: torch.nn.Module) -> str | None:
    """Why `mlp` cannot take the GatedDown path, or None where it can (a SwiGLU MLP)."""
    from transformers.activations import SiLUActivation

    if hasattr(mlp, "experts") or hasattr(mlp, "router") or hasattr(mlp, "gate") and not hasattr(mlp, "gate_proj"):
        return "a mixture of experts"
    if hasattr(mlp, "gate_up_proj"):
        return "its gate and up projections are one fused linear"
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return "no gated MLP"
    if not isinstance(mlp.act_fn, (torch.nn.SiLU, SiLUActivation)):
        return f"its activation is {type(mlp.act_fn).__name__}, the kernel's is SiLU"
    return None


def is_lora_linear(module: torch.nn.Module) -> bool:
    """A PEFT LoRA Linear: over a plain Linear, or over bitsandbytes' 4-bit Linear (QLoRA; peft's lora.bnb, matched
    by name so plain LoRA never imports bitsandbytes)."""
    from peft.tuners.lora.layer import Linear, LoraLayer

    return type(module) is Linear or (isinstance(module, LoraLayer) and type(module).__name__ == "Linear4bit")


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA Linear in `model` the fused path; returns how many layers took it."""
    count = 0
    for module in model.modules():
        if is_lora_linear(module) and "forward" not in module.__dict__:
            module.forward = _fused_forward(module, module.forward)
            count += 1
    return count


def accumulate_out_of_place(model: torch.nn.Module) -> None:
    """Make the fused layers add the LoRA term into a new tensor, leaving the base product as computed. Selective
    recompute keeps that product for backward; the in-place sum (about 6% faster otherwise) would change it."""
    for module in model.modules():
        if is_lora_linear(module):
            setattr(module, IN_PLACE, False)
