"""One optimizer step with gradient accumulation, and validation loss; shared by every recipe.

A recipe's loss is an `Objective`: the summed loss of a micro-batch, and the count the step averages it
over (target tokens for next-token losses, pairs for preference losses), plus any figures it wants logged.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tunesmith.data.packing import Batch
from tunesmith.train.loss import token_loss_sum
from tunesmith.train.runtime import autocast



class Objective:
    """Next-token cross-entropy over the target tokens; recipes subclass it for their own losses."""

    def __call__(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The loss summed (not averaged) over the micro-batch."""
        return token_loss_sum(model, batch)

    def count(self, batch: Batch) -> int:
        """How many things the summed loss covers: the step divides by the total over its micro-batches."""
        return batch.num_loss_tokens

    def record(self, figures: dict[str, torch.Tensor]) -> None:
        """Add per-unit figures of one micro-batch (each a (units,) tensor) to what `take_stats` reports."""
        sums, units = self.__dict__.setdefault("_sums", {}), self.__dict__.get("_units", 0)
        for name, values in figures.items():
            sums[name] = sums.get(name, 0.0) + float(values.detach().sum())
        self._units = units + next(iter(figures.values())).shape[0]

    def take_stats(self) -> dict[str, float]:
        """The means of the figures recorded since the last call, for the metrics log; then starts afresh."""
        sums, units = self.__dict__.pop("_sums", {}), self.__dict__.pop("_units", 0)
        return {name: total / units for name, total in sums.items()} if units else {}

    def save(self, directory: Path) -> None:
        """Write what the final weights need beside them (a reward model's score scale); nothing by default."""


TOKEN_LOSS = Objective()


@dataclass
class StepResult:
    loss: float  # mean loss per target token over the whole step
    tokens: int  # real tokens processed
    loss_count: int  # what the loss was averaged over (target tokens, or pairs)
    grad_norm: float | None
    seconds: float
    skipped: bool  # the loss or gradient was not finite, so the update was not applied
    penalty: float | None = None  # the regularisation term added this step (train.regularization)


def train_step(model: torch.nn.Module, micro_batches: list[Batch], optimizer: torch.optim.Optimizer, scheduler,
               max_grad_norm: float | None, device: torch.device, amp_dtype: torch.dtype | None,
               objective: Objective = TOKEN_LOSS, penalty: Callable[[], torch.Tensor] | None = None) -> StepResult:
    """Accumulate over micro-batches so the update equals the one large batch would give.

    Each micro-batch's summed loss is divided by the objective's count over the whole step (target tokens,
    not micro-batches), so 1 x 8 and 8 x 1 give the same gradient whatever the padding or packing.
    `penalty` (a regulariser on the weights) is added once per step, after the data's gradients.
    """
    started = time.perf_counter()
    model.train()
    total_targets = sum(objective.count(batch) for batch in micro_batches)
    accumulated = 0.0
    for batch in micro_batches:
        batch = batch.to(device)
        with autocast(device, amp_dtype):
            summed = objective(model, batch)
        (summed / max(total_targets, 1)).backward()
        accumulated += summed.item()
    loss = accumulated / max(total_targets, 1)
    penalty_value = None
    if penalty is not None:
        term = penalty()
        if term.requires_grad:
            term.backward()
        penalty_value = float(term.detach())
    parameters = [p for p in model.parameters() if p.requires_grad]
    grad_norm = None
    if math.isfinite(loss):
        limit = max_grad_norm if max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, limit))
    skipped = not math.isfinite(loss) or grad_norm is None or not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()  # the schedule follows steps taken, skipped or not, so resume positions agree
    return StepResult(loss, sum(b.num_tokens for b in micro_batches), total_targets, grad_norm,
                      time.perf_counter() - started, skipped, penalty_value)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device, amp_dtype: torch.dtype | None,
                  objective: Objective = TOKEN_LOSS) -> float:
    """The objective's mean loss over all validation batches (per target token, for token losses)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with autocast(device, amp_dtype):
            total += objective(model, batch.to(device)).item()
        count += objective.count(batch)
    model.train()
    return total / max(count, 1)
