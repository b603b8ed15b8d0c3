"""Optimizer and learning-rate schedule. Schedule shapes are registered functions of progress in [0, 1]."""

from __future__ import annotations

import math

import torch

from tunesmith.config.auto import head_learning_rate
from tunesmith.config.schema import TrainConfig
from tunesmith.registry import schedules
from tunesmith.train.strategies import layer_lr_groups


@schedules.register("cosine")
def cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@schedules.register("linear")
def linear(progress: float) -> float:
    return 1.0 - progress


@schedules.register("constant")
def constant(progress: float) -> float:
    return 1.0


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors); with
    train.layer_lr_decay, each layer's rate is the one above it times the decay (train/strategies.py); a sequence
    classifier's head at train.head_lr (config/auto.py)."""
    groups = layer_lr_groups(model, config.weight_decay, config.layer_lr_decay)
    head_lr = head_learning_rate(config)
    for group in groups:
        group["lr"] = (head_lr if group.pop("head") else config.lr) * group.pop("lr_scale")
    parameters = [parameter for group in groups for parameter in group["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=fusable(parameters))


def fusable(parameters: list[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel takes these: plain float32 tensors on CPU or CUDA (not FSDP's sharded DTensors).
    It updates each tensor in one pass where the default loops over elementwise ops: 135M parameters (the built-in
    model's full fine-tuning) in 96 ms a step against 610 on 2 CPU cores."""
    return all(
        type(parameter) in (torch.Tensor, torch.nn.Parameter)
        and parameter.device.type in ("cpu", "cuda")
        and parameter.dtype == torch.float32
        for parameter in parameters
    )


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    return int(config.warmup) if config.warmup >= 1 else round(config.warmup * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then the chosen shape down over the remaining steps."""
    warmup = warmup_steps(config, total_steps)
    shape = schedules.get(config.schedule, key="train.schedule")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return shape(min(1.0, (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
