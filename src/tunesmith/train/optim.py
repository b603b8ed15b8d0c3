"""Optimizer and learning-rate schedule. Schedule shapes are registered functions of progress in [0, 1]."""
from __future__ import annotations

import math

import torch

from tunesmith.config import TrainConfig
from tunesmith.registry import schedules


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
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    return int(config.warmup) if config.warmup >= 1 else round(config.warmup * total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then the chosen shape down over the remaining steps."""
    warmup = warmup_steps(config, total_steps)
    shape = schedules.get(config.schedule, key="train.schedule")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return shape(min(1.0, (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
