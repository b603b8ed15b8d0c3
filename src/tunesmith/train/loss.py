"""Token-level cross-entropy computed only where there is a target ("no wasted logits").

The decoder runs once; the output head (vocab x hidden, the largest matmul of a small model) is
applied only to the positions that carry a loss, in chunks so the (tokens, vocab) logits never exist
all at once. For training, `HeadCrossEntropy` goes further: it computes each chunk's gradient in the
forward pass and keeps only that (tokens x hidden), so no logits or log-softmax outputs are saved for
backward (two (tokens, vocab) fp32 matrices per chunk otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from tunesmith.data.packing import IGNORE, Batch
from tunesmith.engine.forward import HEAD_CHUNK, balanced_hidden_states, decoder_and_head, fused_head, head_chunks
from tunesmith.models.precision import kernel_dtype


@dataclass
class SoftmaxChunk:
    """One chunk of `head_softmax_chunks`: its rows, their hidden states and targets, log softmax at the targets,
    and the softmax's unnormalised exponentials (one (chunk, vocab) buffer, which the caller may overwrite)."""

    rows: slice
    hidden: torch.Tensor
    targets: torch.Tensor
    logprobs: torch.Tensor
    exp: torch.Tensor
    norm: torch.Tensor

    def softmax_minus_onehot(self) -> torch.Tensor:
        """d(-log softmax[target]) / d logits, in the exponentials' buffer."""
        grad = self.exp.div_(self.norm)
        grad[torch.arange(self.targets.shape[0], device=self.targets.device), self.targets] -= 1
        return grad


def head_softmax_chunks(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> Iterator[SoftmaxChunk]:
    """log softmax(hidden @ head.T)[targets], HEAD_CHUNK rows at a time, accumulated in at least fp32: the one
    chunked log-softmax kernel of the fused head losses (HeadCrossEntropy, preference's HeadTokenLogProbs).
    `head` is already in hidden's dtype."""
    accumulate = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits are summed in fp32
    for start in range(0, targets.shape[0], HEAD_CHUNK):
        rows = slice(start, start + HEAD_CHUNK)
        h, t = hidden[rows], targets[rows]
        logits = (h @ head.T).to(accumulate)
        picked = logits.gather(1, t[:, None]).squeeze(1)
        peak = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(peak).exp_()  # in place: one (chunk, vocab) buffer, where logsumexp would take two
        norm = exp.sum(dim=-1, keepdim=True)
        yield SoftmaxChunk(rows, h, t, picked - (peak + norm.log()).squeeze(1), exp, norm)


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(hidden_i @ weight.T)[targets_i], with its gradients computed chunk by chunk up front.

    The upstream gradient of a sum is one scalar, so backward only scales what forward already computed:
    d/dlogits = softmax - onehot, then d/dhidden = that @ weight and d/dweight = that.T @ hidden.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.hidden_dtype = hidden.dtype
        h, head = head_operands(hidden, weight)  # before autocast goes off: its dtype is the kernel's
        with torch.autocast(hidden.device.type, enabled=False):
            total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
            grad_hidden = torch.empty_like(h) if want_hidden else None
            grad_weight = torch.zeros_like(weight) if want_weight else None
            for chunk in head_softmax_chunks(h, head, targets):
                total -= chunk.logprobs.sum()
                if want_hidden or want_weight:
                    d_logits = chunk.softmax_minus_onehot().to(h.dtype)
                    if want_hidden:
                        grad_hidden[chunk.rows] = d_logits @ head
                    if want_weight:  # a trained head's gradient accumulates in its own (master) dtype
                        if h.dtype == weight.dtype:
                            grad_weight.addmm_(d_logits.T, chunk.hidden)
                        else:  # the product at the kernel's speed, the running sum at the master's precision
                            grad_weight.add_(d_logits.T @ chunk.hidden)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            (grad_hidden * upstream.to(grad_hidden.dtype)).to(ctx.hidden_dtype) if grad_hidden is not None else None,
            grad_weight * upstream.to(grad_weight.dtype) if grad_weight is not None else None,
            None,
        )


def head_operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden and the head's weight in the fused head kernels' compute dtype: autocast's where it is on (so under
    bf16 training the (tokens x vocab) products run in bf16, and a head stored in bf16 is not copied), else
    hidden's. Call it before switching autocast off for the kernel (inside, autocast reads as off and the products
    would fall back to float32, with a bf16-stored head cast to float32 at every call): its dtypes are chosen here,
    once."""
    dtype = kernel_dtype(hidden)
    return hidden.to(dtype), weight.to(dtype)


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's targets; the caller normalises. A mixture of
    experts adds its routers' load-balancing loss, weighted and counted once per target (so the caller's mean is
    the model's own loss: mean cross-entropy + weight x balance loss)."""
    _, head = decoder_and_head(model)
    keep = batch.targets != IGNORE
    hidden, balance = balanced_hidden_states(model, batch)
    hidden, targets = hidden[keep], batch.targets[keep]
    if fused_head(model, head):  # a plain head (not adapted): the fused path
        total = HeadCrossEntropy.apply(hidden, head.weight, targets)
    else:
        total = torch.zeros((), dtype=torch.float32, device=targets.device)
        for logits, chunk_targets, _ in head_chunks(head, hidden, targets):
            total = total + F.cross_entropy(logits, chunk_targets, reduction="sum")
    if balance is not None:
        total = total + balance * targets.shape[0]
    return total
