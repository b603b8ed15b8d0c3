"""A fused forward and backward for PEFT's LoRA linear layers: the same numbers, fewer passes over memory.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the scaling multiplies and the sum adds a
full (tokens x out_features) tensor, and in backward autograd scales the gradient and adds the two input
gradients, again at full size, on every adapted layer. Here the scaling goes on the rank-r product and
the LoRA term is accumulated into the base output inside the GEMM (`addmm_`), in both directions:

    forward   xa = x A^T                  out = x W^T + b;   out += s * xa B^T
    backward  gb = g B                    grad_x = g W;      grad_x += s * gb A
              grad_B = s * g^T xa         grad_A = s * gb^T x

Only x (which the base layer's input already is) and the small xa are saved. Under selective recompute the
sum goes into a new tensor instead (`accumulate_out_of_place`), since the kept base product must not change. The layer stays PEFT's own
module, so saving, loading, merging and every case this path does not cover (dropout while training,
DoRA and other variants, several active adapters, merged or disabled adapters, per-call adapter names)
go through PEFT's forward unchanged.
"""
from __future__ import annotations

import torch

IN_PLACE = "_tunesmith_fused_in_place"  # a layer attribute: False when its base product must not be modified


class LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, in_place: bool = True) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        xa = flat @ lora_a.t()
        out = torch.nn.functional.linear(flat, weight, bias)
        if in_place:
            out.addmm_(xa, lora_b.t(), alpha=scaling)
        else:  # selective recompute keeps the base product: it must stay as computed
            out = torch.addmm(out, xa, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        scaling = ctx.scaling
        grad = grad.reshape(-1, grad.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        gb = grad @ lora_b
        grad_x = grad_b = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).addmm_(gb, lora_a, alpha=scaling).view(x.shape)
        if ctx.needs_input_grad[4]:
            grad_b = (grad.t() @ xa).mul_(scaling)
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ flat).mul_(scaling)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise RuntimeError("the fused LoRA path is for frozen base layers")
        return grad_x, None, None, grad_a, grad_b, None, None


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
    if type(base) is not torch.nn.Linear or base.weight.requires_grad or \
            (base.bias is not None and base.bias.requires_grad) or layer.lora_A[name].bias is not None:
        return None
    return name


def _fused_forward(layer, peft_forward):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = _fusable(layer, x, args, kwargs)
        if name is None:
            return peft_forward(x, *args, **kwargs)
        base = layer.get_base_layer()
        tensors = (x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight)
        in_place = getattr(layer, IN_PLACE, True)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # cast as autocast would, then run the GEMMs in that dtype
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return LoraLinear.apply(*(t if t is None else t.to(dtype) for t in tensors), layer.scaling[name],
                                        in_place)
        if len({t.dtype for t in tensors if t is not None}) != 1:
            return peft_forward(x, *args, **kwargs)
        return LoraLinear.apply(*tensors, layer.scaling[name], in_place)

    return forward


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
