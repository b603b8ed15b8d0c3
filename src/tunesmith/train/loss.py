"""Token-level cross-entropy computed only where there is a target ("no wasted logits").

The decoder runs once; the output head (vocab x hidden, the largest matmul of a small model) is
applied only to the positions that carry a loss, in chunks so the (tokens, vocab) logits never exist
all at once.
"""
from __future__ import annotations

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


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the batch's targets; the caller normalises."""
    _, head = decoder_and_head(model)
    hidden = hidden_states(model, batch)
    keep = batch.targets != IGNORE
    selected, targets = hidden[keep], batch.targets[keep]  # (N, H), (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for hidden_chunk, target_chunk in zip(selected.split(HEAD_CHUNK), targets.split(HEAD_CHUNK)):
        logits = head(hidden_chunk).float()
        total = total + F.cross_entropy(logits, target_chunk, reduction="sum")
    return total
