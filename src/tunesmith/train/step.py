"""One optimizer step with gradient accumulation, and validation loss; shared by every recipe.

A recipe's loss is an `Objective`: the summed loss of a micro-batch, and the count the step averages it
over (target tokens for next-token losses, pairs for preference losses), plus any figures it wants logged.
Both run the model through a runner (train/distributed.py), on one process or several.

How one SFT step runs, file by file:

    recipes/sft.py        train_loop asks the plan for this step's micro-batches
    data/packing.py       BatchPlan: whole examples packed padding-free into rows of at most
                          train.micro_batch_tokens tokens, the same on every resume
    train/step.py         train_step: per micro-batch, under autocast (train/runtime.py) ...
    train/distributed.py    ... the runner (the model, or its DDP/FSDP wrapper) calls the Objective ...
    train/loss.py           ... token_loss_sum: the decoder's hidden states (engine/forward.py), each example
                            attending only to itself (models/attention.py), LoRA and the gated MLP fused
                            (models/fused_lora.py); then HeadCrossEntropy, the output head chunk by chunk
                            at the target positions only, gradients computed in forward
                          backward; the gradients sync on the last micro-batch; a penalty (train/strategies.py:
                          L2-SP, L1) adds its gradient; clipping; the optimizer and schedule (train/optim.py)
    train/session.py         back in train_loop: the step is counted, checked for a finite loss, logged to
                          metrics.jsonl (train/metrics.py), evaluated when due, and checkpointed
                          (train/checkpoint.py, in the run directory's layout: rundir.py)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from tunesmith.allocator import FREED_PAGES
from tunesmith.data.packing import Batch
from tunesmith.models.precision import autocast
from tunesmith.train.distributed import ONE_PROCESS, World, gradient_sync
from tunesmith.train.loss import token_loss_sum


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
        if self.__dict__.get("_muted"):
            return
        sums = self.__dict__.setdefault("_sums", {"units": 0.0})
        for name, values in figures.items():
            sums[name] = sums.get(name, 0.0) + float(values.detach().sum())
        sums["units"] += next(iter(figures.values())).shape[0]

    @contextlib.contextmanager
    def muted(self, on: bool) -> Iterator[None]:
        """Record nothing inside (a filler micro-batch's figures are not the data's)."""
        self._muted = on
        try:
            yield
        finally:
            self._muted = False

    def take_stats(self, world: World = ONE_PROCESS) -> dict[str, float]:
        """The means of the figures recorded since the last call (over every rank), for the metrics log; then
        starts afresh. Every rank must call it when one does."""
        sums = world.sum_figures(self.__dict__.pop("_sums", {}))
        units = sums.pop("units", 0.0)
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


def train_step(
    runner: torch.nn.Module,
    micro_batches: list[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler,
    max_grad_norm: float | None,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    objective: Objective = TOKEN_LOSS,
    penalty: Callable[[], torch.Tensor] | None = None,
    world: World = ONE_PROCESS,
) -> StepResult:
    """Accumulate over micro-batches (this rank's share of the step) so the update equals the one large batch
    would give.

    Each micro-batch's summed loss is divided by the objective's count over the whole step on every rank
    (target tokens, not micro-batches), so 1 x 8, 8 x 1 and 2 processes x 4 give the same gradient whatever
    the padding or packing; DDP and FSDP average gradients over the ranks, so each rank's share is scaled up
    by their number. `penalty` (a regulariser on the weights) is added once per step, after the data's gradients.
    """
    started = time.perf_counter()
    FREED_PAGES.step_started()
    runner.train()
    real = [batch for batch in micro_batches if not batch.filler]
    total_targets = world.sum([sum(objective.count(batch) for batch in real)], device)[0]
    scale = world.size / max(total_targets, 1)
    accumulated = 0.0
    for index, batch in enumerate(micro_batches):
        with gradient_sync(runner, enabled=index == len(micro_batches) - 1):
            with autocast(device, amp_dtype), objective.muted(batch.filler):
                summed = runner(objective, batch.to(device))
            (summed * (0.0 if batch.filler else scale)).backward()
        accumulated += 0.0 if batch.filler else summed.item()
    accumulated, tokens = world.sum([accumulated, sum(batch.num_tokens for batch in real)], device)
    loss = accumulated / max(total_targets, 1)
    parameters = [p for p in runner.parameters() if p.requires_grad]
    penalty_value = add_penalty(penalty, parameters) if penalty is not None else None
    grad_norm = None
    if math.isfinite(loss):
        limit = max_grad_norm if max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(parameters, limit)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a replicated DTensor
    skipped = not math.isfinite(loss) or grad_norm is None or not math.isfinite(grad_norm)
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()  # the schedule follows steps taken, skipped or not, so resume positions agree
    FREED_PAGES.step_finished()
    return StepResult(
        loss, int(tokens), int(total_targets), grad_norm, time.perf_counter() - started, skipped, penalty_value
    )


def add_penalty(penalty: Callable[[], torch.Tensor], parameters: list[torch.Tensor]) -> float:
    """Add the regulariser's gradient to the data's. Taken with autograd.grad, not backward(): it is the same
    on every rank, and a second backward would fire DDP's gradient hooks after the step's reduction."""
    term = penalty()
    if term.requires_grad:
        grads = torch.autograd.grad(term, parameters, allow_unused=True)
        for parameter, grad in zip(parameters, grads):
            if grad is not None:
                parameter.grad = grad if parameter.grad is None else parameter.grad.add_(grad)
    return float(term.detach())


@torch.no_grad()
def evaluate_loss(
    runner: torch.nn.Module,
    batches: list[Batch],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    objective: Objective = TOKEN_LOSS,
    world: World = ONE_PROCESS,
) -> float:
    """The objective's mean loss over all validation batches (per target token, for token losses); the ranks
    share the batches."""
    runner.eval()
    total, count = 0.0, 0
    for batch, real in world.share(batches):
        with autocast(device, amp_dtype), objective.muted(not real):
            value = runner(objective, batch.to(device)).item()
        if real:
            total, count = total + value, count + objective.count(batch)
    runner.train()
    total, count = world.sum([total, count], device)
    return total / max(count, 1)
