"""The process-level setup a run needs: device and dtype, seeds, threads, and graceful stop on signals."""

from __future__ import annotations

import contextlib
import os
import random
import signal
from typing import Iterator

import torch

from tunesmith.config.schema import TrainConfig
from tunesmith.hardware import cpu_bf16


def pick_device(config: TrainConfig) -> torch.device:
    """The CPU, or this process's GPU: under torchrun, the one numbered by its rank on the node (LOCAL_RANK)."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def compute_dtype(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The dtype matmuls run in under autocast (None: plain float32, the exact path) for train.dtype on `device`,
    and why: auto is bfloat16 on a GPU that supports it and on a CPU that
    multiplies it natively (hardware.py: its flags, confirmed by a cached timing), else float32 (None)."""
    if config.dtype != "auto":
        return (torch.bfloat16 if config.dtype == "bfloat16" else None), f"train.dtype={config.dtype}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: this GPU supports bfloat16"
        return None, "auto: this GPU has no bfloat16"
    support = cpu_bf16()
    return (torch.bfloat16 if support.native else None), f"auto: {support.reason}"


def store_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Keep `model`'s frozen weight matrices in `dtype` (half float32's RAM for bfloat16), where autocast would
    cast them at every product anyway. Trainable weights stay float32 (the optimizer's master copies), and so do
    vectors (norms, biases) and the residual stream: the input embedding's output is cast back to float32, so
    the sums between layers accumulate in float32. Returns how many tensors changed."""
    changed = 0
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.ndim >= 2 and parameter.is_floating_point():
            if parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)
                changed += 1
    embedding = model.get_input_embeddings()
    if embedding.weight.dtype != torch.float32:
        embedding.register_forward_hook(lambda module, inputs, output: output.float())
    return changed


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
