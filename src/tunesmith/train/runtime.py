"""The process-level setup a run needs: device and dtype, seeds, threads, and graceful stop on signals."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
from typing import Iterator

import torch

from tunesmith import hardware
from tunesmith.config.schema import TrainConfig


def pick_device(config: TrainConfig) -> torch.device:
    """The CPU, or this process's GPU: under torchrun, the one numbered by its rank on the node (LOCAL_RANK)."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# auto picks bf16 on a CPU with native bf16 only once the main job's accuracy in bf16 is shown equal to float32's
# (issue 24); until then `train.dtype: bfloat16` asks for it.
CPU_AUTO_BF16 = False


def compute_dtype(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The dtype matmuls run in under autocast (None: plain float32, the exact path) for train.dtype on `device`,
    and why: auto is bfloat16 on a GPU that supports it and, with CPU_AUTO_BF16, on a CPU that multiplies it
    natively (hardware.py: its flags, confirmed by a cached timing), else float32 (None)."""
    if config.dtype != "auto":
        return (torch.bfloat16 if config.dtype == "bfloat16" else None), f"train.dtype={config.dtype}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports bfloat16"
        return None, "auto: this GPU has no bfloat16"
    if not CPU_AUTO_BF16:
        flags = [flag for flag in hardware.BF16_FLAGS if flag in hardware.cpu_flags()]
        hint = f"; this CPU's flags name {', '.join(flags)}: train.dtype=bfloat16 may be faster" if flags else ""
        return None, f"auto: float32 on a CPU{hint}"
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
    embedding = model.get_input_embeddings()
    if embedding.weight.dtype != torch.float32:
        embedding.register_forward_hook(lambda module, inputs, output: output.float())
    compute_in(model, dtype)


def compute_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run every entry into `model` (the whole model, its decoder, its output head: what generation, scoring,
    in-training evaluation and the losses call) under autocast to `dtype`, so weights stored in it meet inputs
    in it wherever the model is called from, not only inside the training step."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    entries = [base, base.get_decoder() if hasattr(base, "get_decoder") else None, base.get_output_embeddings()]
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


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def seed_everything(seed: int, threads: int | None) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)


class StopFlag:
    """Set by SIGINT/SIGTERM so the loop can finish its step, checkpoint and exit; a second signal is immediate."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def __bool__(self) -> bool:
        return self.signal_number is not None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    flag = StopFlag()
    previous = {}

    def request_stop(number: int, frame: object) -> None:
        if flag:  # asked twice: stop now
            signal.signal(number, previous[number])
            signal.raise_signal(number)
        flag.signal_number = number

    for number in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[number] = signal.signal(number, request_stop)
        except ValueError:  # not the main thread (e.g. inside a service worker): no handlers
            pass
    try:
        yield flag
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
