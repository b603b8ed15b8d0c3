"""Padding-free attention: causal attention within each example of a flat packed sequence, no mask tensor.

Training concatenates a micro-batch's examples into one row with no padding at all, and passes the
examples' lengths as `segment_lengths`. This attention runs SDPA's fused causal kernel on each example's
slice of the row, so no token ever sees another example, no (T, T) mask exists and no attention
probabilities are saved for backward (the fused kernel keeps only its log-sum-exp). The work is
the sum of the examples' squared lengths, not the row's squared length.

Without `segment_lengths` (generation, scoring with a cache, batched padded inputs) it is exactly
transformers' SDPA attention, so one loaded model serves training and inference.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "tunesmith"


@torch.compiler.disable  # a loop over examples: compiled layers call it eagerly (train.compile)
def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, segment_lengths: tuple[int, ...] | None = None,
                      segment_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """(B, T, heads, head_dim) attention output; query/key/value are (B, heads, T, head_dim).

    `segment_prefix` (prefix tuning): per layer, (1, kv_heads, N, head_dim) keys and values that every
    example attends to in full before its own causal context.
    """
    if segment_prefix is None and (segment_lengths is None or len(segment_lengths) == 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError("segment_lengths is for training on flat packed rows: no mask and no cache")
    lengths = segment_lengths or (query.shape[2],)
    kwargs.pop("is_causal", None)
    pieces = []
    for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)):
        if segment_prefix is None:
            pieces.append(sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0])
            continue
        prefix_key, prefix_value = segment_prefix[module.layer_idx]
        virtual, length = prefix_key.shape[2], q.shape[2]
        visible = torch.ones(length, virtual + length, dtype=torch.bool, device=q.device).tril(virtual)
        pieces.append(sdpa_attention_forward(module, q, torch.cat([prefix_key.to(k.dtype), k], dim=2),
                                             torch.cat([prefix_value.to(v.dtype), v], dim=2), visible[None, None],
                                             is_causal=False, **kwargs)[0])
    return torch.cat(pieces, dim=1), None


def segment_mask(*, attention_mask: torch.Tensor | None, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, **kwargs) -> torch.Tensor | None:
    """No mask for an unpadded, uncached causal pass (segment_attention keeps it causal per example).

    transformers would otherwise read restarting position ids as packing and build a (T, T) mask that
    segment_attention never uses. Every other case (padding, a KV cache) gets SDPA's own mask.
    """
    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, **kwargs)


AttentionInterface.register(NAME, segment_attention)
AttentionMaskInterface.register(NAME, segment_mask)
