"""The dtype a model computes in: float32, or bfloat16 where the hardware multiplies it natively.

In bfloat16, frozen weight matrices are stored in it (half float32's RAM) and every entry into the model runs under
autocast to it; what trains (and its optimizer state), norms, losses and the residual stream stay in float32.
Training (train.dtype) and inference (Engine, Classifier, the service) choose and apply it here, one way.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from tunesmith import hardware
from tunesmith.config.schema import TrainConfig
from tunesmith.models.heads import output_head


def compute_dtype(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The dtype matmuls run in under autocast (None: plain float32, the exact path) for train.dtype on `device`,
    and why: auto is bfloat16 on a GPU that supports it and on a CPU that multiplies it natively (hardware.py: its
    flags, confirmed by a cached timing; the main job's accuracy in it matches float32's: bench/dtype_parity.json),
    else float32 (None)."""
    if config.dtype != "auto":
        return (torch.bfloat16 if config.dtype == "bfloat16" else None), f"train.dtype={config.dtype}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports bfloat16"
        return None, "auto: this GPU has no bfloat16"
    support = hardware.cpu_bf16()
    return (torch.bfloat16 if support.native else None), f"auto: {support.reason}"


def store_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep `model`'s frozen weight matrices in `dtype` (half float32's RAM for bfloat16), where autocast would
    cast them at every product anyway, and everything else in float32: trainable weights (the optimizer's master
    copies: a base loaded in `dtype` gives PEFT's new weights and a classifier's head its dtype) and vectors
    (norms, biases: a few kilobytes). The residual stream stays float32 too: the input embedding's output is cast
    back to it, so the sums between layers accumulate in float32."""
    for parameter in model.parameters():
        if not parameter.is_floating_point():
            continue  # 4-bit weights (QLoRA)
        wanted = dtype if parameter.ndim >= 2 and not parameter.requires_grad else torch.float32
        if parameter.dtype != wanted:
            parameter.data = parameter.data.to(wanted)
    keep_residual_in_float32(model)
    compute_in(model, dtype)


def for_inference(model: torch.nn.Module, train: TrainConfig | None = None) -> torch.nn.Module:
    """`model` set to infer in the dtype its run's `train` settings resolve to on its device (a model that is not a
    run's: train.dtype auto), through store_for_inference."""
    device = next(model.parameters()).device
    return store_for_inference(model, compute_dtype(train or TrainConfig(), device)[0])


def store_for_inference(model: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """`model` (adapters loaded) made to infer in `dtype`; None leaves it in float32. Its weight matrices go to
    `dtype` except the output head's (the language-model head, and the input embedding it is tied to, or a
    classifier's head), which keeps float32 and computes outside autocast: the final norm hands it float32, so
    logits, log-probabilities and scores keep float32's precision while the layers run at `dtype`'s speed."""
    if dtype is None:
        return model
    head = output_head(model)
    kept = {id(parameter) for parameter in (head.parameters() if head is not None else ())}
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.ndim >= 2 and id(parameter) not in kept:
            parameter.data = parameter.data.to(dtype)
    keep_residual_in_float32(model)
    compute_in(model, dtype, head=False)
    if head is not None and "forward" not in head.__dict__:
        head.forward = _in_float32(head.forward)
    return model


def keep_residual_in_float32(model: torch.nn.Module) -> None:
    """Cast the input embedding's output back to float32 where the embedding is stored in a lower dtype, so the
    residual stream (the sums between layers) accumulates in float32."""
    embedding = model.get_input_embeddings()
    if embedding.weight.dtype != torch.float32:
        embedding.register_forward_hook(lambda module, inputs, output: output.float())


def compute_in(model: torch.nn.Module, dtype: torch.dtype, head: bool = True) -> None:
    """Run every entry into `model` (the whole model, its decoder, its output head: what generation, scoring,
    in-training evaluation and the losses call) under autocast to `dtype`, so weights stored in it meet inputs
    in it wherever the model is called from, not only inside the training step; without `head`, the output head is
    left as it is (store_for_inference keeps it in float32)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    entries = [base, base.get_decoder() if hasattr(base, "get_decoder") else None]
    entries += [base.get_output_embeddings()] if head else []
    for module in entries:
        if module is not None and "forward" not in module.__dict__:
            module.forward = _under_autocast(module.forward, dtype)


def _under_autocast(forward, dtype: torch.dtype):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        device = next(forward.__self__.parameters()).device.type
        with torch.autocast(device, dtype=dtype):
            return forward(*args, **kwargs)

    return run


def _in_float32(forward):
    @functools.wraps(forward)
    def run(hidden: torch.Tensor, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False):
            return forward(hidden.float(), *args, **kwargs)

    return run


def kernel_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a fused kernel computes `tensor`'s products in: autocast's where it is on for its device (bf16
    training and inference), else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
