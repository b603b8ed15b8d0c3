"""Token-level cross-entropy computed only where there is a target ("no wasted logits").

The decoder runs once; the output head (vocab x hidden, the largest matmul of a small model) is
applied only to the positions that carry a loss, in chunks so the (tokens, vocab) logits never exist
all at once. For training, `HeadCrossEntropy` goes further: it computes each chunk's gradient in the
forward pass and keeps only that (tokens x hidden), so no logits or log-softmax outputs are saved for
backward (two (tokens, vocab) fp32 matrices per chunk otherwise).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from tunesmith.data.packing import IGNORE, Batch
from tunesmith.models.adapters import soft_prompt

HEAD_CHUNK = 1024  # positions per output-head chunk: 1024 x 49152 fp32 logits = 192 MiB


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the output head of a causal LM, through a PEFT wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(1, T, H) final hidden states, attention causal within each example (models/attention.py).

    Soft prompts act per example, as PEFT applies them to a batch of one: prompt tuning puts its virtual
    tokens before each example (positions count them), prefix tuning gives every example's attention
    its learned keys and values (positions start after them).
    """
    decoder, _ = decoder_and_head(model)
    soft = soft_prompt(model)
    if soft is None:
        return decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                       segment_lengths=batch.segment_lengths).last_hidden_state
    kind, value = soft
    if kind == "prefix":
        virtual = value[0][0].shape[2]
        return decoder(input_ids=batch.input_ids, position_ids=batch.position_ids + virtual, use_cache=False,
                       segment_lengths=batch.segment_lengths, segment_prefix=value).last_hidden_state
    prompt = value.to(decoder.get_input_embeddings().weight.dtype)  # (N, H)
    virtual = prompt.shape[0]
    pieces, keep = [], []
    for offset, piece in zip([0, *torch.tensor(batch.segment_lengths).cumsum(0).tolist()],
                             decoder.get_input_embeddings()(batch.input_ids)[0].split(batch.segment_lengths)):
        pieces += [prompt, piece]
        keep.append(torch.arange(piece.shape[0]) + offset + virtual * (len(keep) + 1))
    lengths = tuple(length + virtual for length in batch.segment_lengths)
    positions = torch.cat([torch.arange(length) for length in lengths])[None].to(batch.input_ids.device)
    hidden = decoder(inputs_embeds=torch.cat(pieces)[None], position_ids=positions, use_cache=False,
                     segment_lengths=lengths).last_hidden_state
    return hidden[:, torch.cat(keep).to(hidden.device)]


def target_logits(model: torch.nn.Module, batch: Batch) -> Iterator[tuple[torch.Tensor, torch.Tensor, slice]]:
    """(logits, targets, positions) per chunk of the batch's target positions, in order.

    `positions` slices the target positions, so a caller can map a chunk back to its examples.
    """
    _, head = decoder_and_head(model)
    hidden = hidden_states(model, batch)
    keep = batch.targets != IGNORE
    selected, targets = hidden[keep], batch.targets[keep]  # (N, H), (N,)
    for start in range(0, targets.shape[0], HEAD_CHUNK):
        chunk = slice(start, start + HEAD_CHUNK)
        yield head(selected[chunk]).float(), targets[chunk], chunk


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i -log softmax(hidden_i @ weight.T)[targets_i], with its gradients computed chunk by chunk up front.

    The upstream gradient of a sum is one scalar, so backward only scales what forward already computed:
    d/dlogits = softmax - onehot, then d/dhidden = that @ weight and d/dweight = that.T @ hidden.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits are summed in fp32
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        head = weight.to(hidden.dtype)  # one cast for all chunks (a no-op when the dtypes agree)
        for start in range(0, targets.shape[0], HEAD_CHUNK):
            h, t = hidden[start: start + HEAD_CHUNK], targets[start: start + HEAD_CHUNK]
            logits = (h @ head.T).to(accumulate)
            picked = logits.gather(1, t[:, None]).squeeze(1)
            peak = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(peak).exp_()  # in place: one (chunk, vocab) buffer, where logsumexp would take two
            norm = exp.sum(dim=-1, keepdim=True)
            total += (peak + norm.log()).squeeze(1).sub_(picked).sum()
            if want_hidden or want_weight:
                d_logits = exp.div_(norm)  # softmax
                d_logits[torch.arange(t.shape[0], device=t.device), t] -= 1
                d_logits = d_logits.to(h.dtype)
                if want_hidden:
                    grad_hidden[start: start + HEAD_CHUNK] = d_logits @ head
                if want_weight:
                    grad_weight.addmm_(d_logits.T.to(weight.dtype), h.to(weight.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * upstream.to(grad_hidden.dtype) if grad_hidden is not None else None,
                grad_weight * upstream.to(grad_weight.dtype) if grad_weight is not None else None, None)


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's targets; the caller normalises."""
    _, head = decoder_and_head(model)
    if type(head) is torch.nn.Linear and head.bias is None:  # a plain head (not adapted): the fused path
        keep = batch.targets != IGNORE
        return HeadCrossEntropy.apply(hidden_states(model, batch)[keep], head.weight, batch.targets[keep])
    total = torch.zeros((), dtype=torch.float32, device=batch.targets.device)
    for logits, targets, _ in target_logits(model, batch):
        total = total + F.cross_entropy(logits, targets, reduction="sum")
    return total


def per_example_logprob(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the sum of its target-token log-probabilities and its target count (scoring, not training)."""
    keep = batch.targets[0] != IGNORE
    owner = batch.example_index()[keep]
    examples = len(batch.segment_lengths)
    sums = torch.zeros(examples, dtype=torch.float32, device=keep.device)
    for logits, targets, chunk in target_logits(model, batch):
        sums.index_add_(0, owner[chunk], -F.cross_entropy(logits, targets, reduction="none"))
    return sums, torch.bincount(owner, minlength=examples)
