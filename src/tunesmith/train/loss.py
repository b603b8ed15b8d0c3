"""Token-level cross-entropy computed only where there is a target ("no wasted logits").

The decoder runs once; the output head (vocab x hidden, the largest matmul of a small model) is
applied only to the positions that carry a loss, in chunks so the (tokens, vocab) logits never exist
all at once.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from tunesmith.data.packing import IGNORE, Batch

HEAD_CHUNK = 1024  # positions per output-head chunk: 1024 x 49152 fp32 logits = 192 MiB


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the output head of a causal LM, through a PEFT wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def hidden_states(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """(B, T, H) final hidden states under the batch's block-diagonal causal mask."""
    decoder, _ = decoder_and_head(model)
    output = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False)
    return output.last_hidden_state


def target_logits(model: torch.nn.Module, batch: Batch) -> Iterator[tuple[torch.Tensor, torch.Tensor, slice]]:
    """(logits, targets, positions) per chunk of the batch's target positions, in (B, T) row-major order.

    `positions` slices the flattened target positions, so a caller can map a chunk back to its rows.
    """
    _, head = decoder_and_head(model)
    hidden = hidden_states(model, batch)
    keep = batch.targets != IGNORE
    selected, targets = hidden[keep], batch.targets[keep]  # (N, H), (N,)
    for start in range(0, targets.shape[0], HEAD_CHUNK):
        chunk = slice(start, start + HEAD_CHUNK)
        yield head(selected[chunk]).float(), targets[chunk], chunk


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's targets; the caller normalises."""
    total = torch.zeros((), dtype=torch.float32, device=batch.targets.device)
    for logits, targets, _ in target_logits(model, batch):
        total = total + F.cross_entropy(logits, targets, reduction="sum")
    return total


def per_row_logprob(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) sums of target-token log-probabilities and (B,) target counts: scoring, not training."""
    keep = batch.targets != IGNORE
    rows = torch.arange(batch.targets.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    sums = torch.zeros(batch.targets.shape[0], dtype=torch.float32, device=keep.device)
    for logits, targets, chunk in target_logits(model, batch):
        sums.index_add_(0, rows[chunk], -F.cross_entropy(logits, targets, reduction="none"))
    return sums, keep.sum(dim=1)
