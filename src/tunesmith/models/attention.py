"""Padding-free attention: causal attention within each example of a flat packed sequence, no mask tensor.

Training concatenates a micro-batch's examples into one row with no padding at all, and passes the
examples' lengths as `segment_lengths`. This attention runs causal attention on each example's slice of
the row, so no token ever sees another example, no (T, T) mask exists and no attention probabilities are
saved for backward. The work is the sum of the examples' squared lengths, not the row's squared length.

Examples of one length run together, as one batch. On CPU, in fp32 or bf16, a batch of them goes through
`causal_attention` below when that is faster than SDPA's fused kernel (`CHUNKED`, `CHUNKED_BF16[_AMX]`), else through
one SDPA call. In bf16, softmax and the key and value gradients' sums over chunks run in float32.

Without `segment_lengths` (generation, scoring with a cache, batched padded inputs) it is exactly
transformers' SDPA attention, so one loaded model serves training and inference.

A model's own variations hold on every path: a sliding-window layer (Mistral, Gemma 2/3, Phi-3; the model passes
`sliding_window`) sees only its last `sliding_window` positions, through a band mask when an example is longer than
the window; soft-capped attention logits (Gemma 2's `softcap`), which SDPA cannot compute, go through the model's
own eager attention.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunesmith import hardware
from tunesmith.models.precision import kernel_dtype

NAME = "tunesmith"
# When `causal_attention` beats SDPA's CPU kernel, measured on 2 AVX-512 cores (fp32, head_dim 64, 3 query heads
# per key head, forward and backward): a batch of at least 6 key heads (2 examples of a 3-key-head model) of
# 128 to 1024 tokens. At 4 x 512 tokens it takes 42 ms against SDPA's 64; one example alone, or 2,048 tokens,
# gains nothing (SDPA splits the work across threads better there).
CHUNKED = {"min_key_heads": 6, "min_length": 128, "max_length": 1024}
# In bf16 (python bench/attention.py, same cores): 35 ms against SDPA's 63 at 4 x 512 tokens, 18 against 35 at
# 8 x 256, with the largest gradient error within 1.25x of SDPA's own bf16 kernel; at 2 x 1024 no faster (67 against
# 71) and 4x SDPA's error (each chunk's key and value gradients round to bf16 before they are summed), so SDPA there.
CHUNKED_BF16 = {"min_key_heads": 6, "min_length": 128, "max_length": 512}
# With AMX (a Xeon, family 6 model 167, 2 cores), SDPA's bf16 kernel multiplies in AMX tiles and wins from 256
# tokens (ms, chunked against SDPA: 16 x 128: 15.3 / 32.6; 10 x 192: 19.6 / 21.8; 8 x 256: 23.2 / 21.5; 4 x 512:
# 41.3 / 30.4; 2 x 1024: 86.2 / 37.8), so the chunked kernel keeps only the short lengths there.
CHUNKED_BF16_AMX = {"min_key_heads": 6, "min_length": 128, "max_length": 192}
CHUNK_ROWS = 96  # query rows (positions x query heads per key head) per product: small enough to stay in cache


@torch.compiler.disable  # a loop over examples: compiled layers call it eagerly (train.compile)
def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    segment_lengths: tuple[int, ...] | None = None,
    segment_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """(B, T, heads, head_dim) attention output; query/key/value are (B, heads, T, head_dim).

    `segment_prefix` (prefix tuning): per layer, (1, kv_heads, N, head_dim) keys and values that every
    example attends to in full before its own causal context.
    """
    whole = (
        segment_lengths is None
        or len(segment_lengths) == 1
        and (attention_mask is not None or query.shape[2] != key.shape[2])
    )
    if segment_prefix is None and whole:
        if attention_mask is None and query.shape[2] == key.shape[2]:  # segment_mask left the causal pass to us
            attention_mask = sliding_window_mask(query.shape[2], kwargs.get("sliding_window"), query.device)
        return attend(module, query, key, value, attention_mask, **kwargs), None
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        raise ValueError("segment_lengths is for training on flat packed rows: no mask and no cache")
    lengths = tuple(segment_lengths or (query.shape[2],))
    kwargs.pop("is_causal", None)
    if segment_prefix is not None:
        slices = list(zip(*(t.split(lengths, dim=2) for t in (query, key, value))))
        prefix = segment_prefix[module.layer_idx]
        return torch.cat([prefixed_attention(module, *example, *prefix, **kwargs) for example in slices], dim=1), None
    starts = [0, *itertools.accumulate(lengths)][:-1]
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    pieces: dict[int, torch.Tensor] = {}
    for length, members in by_length.items():  # the examples of one length run as one batch
        q, k, v = (grouped(row, starts, length, members) for row in (query, key, value))
        if takes_chunked(query, k.shape[0] * k.shape[1], length, kwargs):
            # One dtype for the kernel: under autocast its dtype (rotary embeddings leave q and k in float32 while v
            # comes out of its projection in bf16), else the query's.
            dtype = kernel_dtype(query)
            scale = kwargs.get("scaling") or 1 / math.sqrt(q.shape[-1])
            chunk = max(8, CHUNK_ROWS * k.shape[1] // q.shape[1])
            out = causal_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale, chunk)
        else:  # one SDPA call for the group: 4 x 512 tokens in 27 ms against 38 for four calls (bf16, fwd + bwd)
            window = sliding_window_mask(length, kwargs.get("sliding_window"), query.device)
            out = attend(module, q, k, v, window, is_causal=window is None, **kwargs)
        for index, piece in zip(members, out.split(query.shape[0])):
            pieces[index] = piece
    return torch.cat([pieces[index] for index in range(len(lengths))], dim=1), None


def grouped(row: torch.Tensor, starts: list[int], length: int, members: list[int]) -> torch.Tensor:
    """The `members` examples (each `length` long, at `starts` in the packed (B, heads, T, dim) `row`) as one
    (examples x B, heads, length, dim) batch: a view of the row where they are adjacent in it (equal-length examples
    usually are), so nothing is copied and saved twice for backward; else a concatenation."""
    first = starts[members[0]]
    if row.shape[0] == 1 and members == list(range(members[0], members[-1] + 1)):
        run = row[:, :, first : first + length * len(members)]
        return run.unflatten(2, (len(members), length)).squeeze(0).transpose(0, 1)
    return torch.cat([row[:, :, starts[i] : starts[i] + length] for i in members])


def bf16_limits() -> dict:
    """Where the chunked kernel beats SDPA in bf16 on this CPU: CHUNKED_BF16_AMX with AMX tiles, else CHUNKED_BF16."""
    return CHUNKED_BF16_AMX if "amx_bf16" in hardware.cpu_flags() else CHUNKED_BF16


def takes_chunked(query: torch.Tensor, key_heads: int, length: int, kwargs: dict) -> bool:
    """Whether `key_heads` (examples x key heads) of causal attention over `length` positions run faster through
    `causal_attention` than through SDPA (see CHUNKED)."""
    limits = {torch.float32: CHUNKED, torch.bfloat16: bf16_limits()}.get(kernel_dtype(query))
    if (
        query.device.type != "cpu"
        or limits is None
        or kwargs.get("dropout")
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
        or (kwargs.get("sliding_window") or length) < length  # the kernel is causal only, with no window
    ):
        return False
    return key_heads >= limits["min_key_heads"] and limits["min_length"] <= length <= limits["max_length"]


def prefixed_attention(
    module: torch.nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_key: torch.Tensor,
    prefix_value: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """One example's causal attention after `prefix_key`/`prefix_value`, which it sees in full (prefix tuning)."""
    virtual, length = prefix_key.shape[2], q.shape[2]
    visible = torch.ones(length, virtual + length, dtype=torch.bool, device=q.device).tril(virtual)
    if kwargs.get("sliding_window"):  # the prefix's positions come just before the example's, as in PEFT's cache
        # (a sliding-window layer's cache keeps only the prefix's last window - 1 positions: `virtual` counts those)
        reach = (
            virtual + torch.arange(length, device=q.device)[:, None] - torch.arange(virtual + length, device=q.device)
        )
        visible &= reach < kwargs["sliding_window"]
    return attend(
        module,
        q,
        torch.cat([prefix_key.to(k.dtype), k], dim=2),
        torch.cat([prefix_value.to(v.dtype), v], dim=2),
        visible[None, None],
        is_causal=False,
        **kwargs,
    )


def attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor | None,
    **kwargs,
) -> torch.Tensor:
    """(B, T, heads, head_dim) attention of (B, heads, T, head_dim) inputs where the boolean mask `visible` allows
    (None: causal, aligned to the last key), through SDPA; with soft-capped logits (`softcap`: Gemma 2), through the
    eager attention of the model's own module, which SDPA cannot replace."""
    if kwargs.get("softcap") is None:
        return sdpa_attention_forward(module, query, key, value, visible, **kwargs)[0]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__} soft-caps its attention logits, and its module has no eager attention"
        )
    if visible is None:
        offset = key.shape[2] - query.shape[2]
        visible = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril(offset)
    kwargs.pop("is_causal", None)
    additive = visible
    if visible.dtype == torch.bool:  # eager attention adds its mask to the scores
        additive = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
        additive.masked_fill_(~visible, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, additive, **kwargs)[0]


@functools.lru_cache(maxsize=16)
def sliding_window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Where each of `length` positions may look in a sliding-window layer: itself and the `window` - 1 positions
    before it (transformers' sliding_window_overlay); None where the window covers every position (plain causal)."""
    if window is None or length <= window:
        return None
    positions = torch.arange(length, device=device)
    offset = positions[:, None] - positions[None, :]
    return (offset >= 0) & (offset < window)


@torch.library.custom_op("tunesmith::causal_attention", mutates_args=())
def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, chunk: int
) -> torch.Tensor:
    """Causal attention, (B, T, heads, head_dim) out of (B, heads, T, head_dim) query and (B, kv_heads, T, dim) keys
    and values, computed `chunk` query positions at a time.

    Each chunk of positions, with the query heads that share a key head, is one matrix product against the
    keys up to the chunk's end; masked entries exist only in the chunk's own diagonal block. Softmax runs
    row by row in cache. Nothing but the inputs is saved: backward recomputes each chunk's probabilities
    (one product more than SDPA's backward, which saves a log-sum-exp instead), then uses softmax's own
    backward, as the flash-attention algorithm does.
    """
    q, k, v = _grouped(query, key, value, scale)
    length, groups = q.shape[1:3]
    out = query.new_empty(key.shape[0], length, key.shape[1], groups, value.shape[-1])  # (B, T, kv_heads, groups, dim)
    for start, end, mask in _chunks(length, chunk, groups, query.device):
        probabilities = _probabilities(q, k, start, end, mask).to(v.dtype)
        out[:, start:end] = (
            torch.bmm(probabilities, v[:, :end])
            .view(key.shape[0], key.shape[1], end - start, groups, -1)
            .transpose(1, 2)
        )
    return out.view(key.shape[0], length, query.shape[1], value.shape[-1])


@causal_attention.register_fake
def _(query, key, value, scale, chunk):
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])


def _grouped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """The scaled query as (B x kv_heads, T, groups, dim), rows of one position's query heads together; keys and
    values as (B x kv_heads, T, dim)."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.new_empty(batch, kv_heads, length, heads // kv_heads, dim)
    torch.mul(query.view(batch, kv_heads, heads // kv_heads, length, dim).transpose(2, 3), scale, out=q)
    return (
        q.view(batch * kv_heads, length, heads // kv_heads, dim),
        key.reshape(batch * kv_heads, length, -1),
        value.reshape(batch * kv_heads, length, -1),
    )


@functools.lru_cache(maxsize=16)
def _chunks(length: int, chunk: int, groups: int, device: torch.device) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """(start, end, mask) per chunk of query positions; `mask` is True where a row of the chunk's diagonal block
    (position-major, query heads minor) must not see that key. Built once for every layer, forward and backward."""
    plan = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        positions = torch.arange(start, end, device=device)
        plan.append((start, end, positions[None, :] > positions.repeat_interleave(groups)[:, None]))
    return tuple(plan)


def _probabilities(q: torch.Tensor, k: torch.Tensor, start: int, end: int, mask: torch.Tensor) -> torch.Tensor:
    """(B x kv_heads, chunk x groups, end) attention probabilities of one chunk's query rows, in float32 (softmax
    normalises in float32 whatever the inputs' dtype)."""
    scores = torch.bmm(q[:, start:end].reshape(q.shape[0], -1, q.shape[-1]), k[:, :end].transpose(1, 2))
    scores[:, :, start:end].masked_fill_(mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


def _causal_attention_backward(ctx, grad: torch.Tensor):
    query, key, value = ctx.saved_tensors
    q, k, v = _grouped(query, key, value, ctx.scale)
    batch, length, groups, dim = q.shape
    grad = (
        grad.reshape(key.shape[0], length, key.shape[1], groups, -1).transpose(1, 2).reshape(batch, length * groups, -1)
    )
    grad_q = torch.empty_like(q)
    # Summed over chunks in float32 (each chunk's share is one product; a bf16 running sum would round each time)
    grad_k, grad_v = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    for start, end, mask in _chunks(length, ctx.chunk, groups, query.device):
        rows = slice(start * groups, end * groups)
        probabilities = _probabilities(q, k, start, end, mask)
        grad_v[:, :end] += torch.bmm(probabilities.to(v.dtype).transpose(1, 2), grad[:, rows])
        grad_probabilities = torch.bmm(grad[:, rows], v[:, :end].transpose(1, 2)).float()
        grad_scores = torch._softmax_backward_data(grad_probabilities, probabilities, -1, torch.float32).to(q.dtype)
        grad_q[:, start:end] = torch.bmm(grad_scores, k[:, :end]).view(batch, end - start, groups, dim)
        grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), q[:, start:end].reshape(batch, -1, dim))
    grad_query = torch.empty_like(query)
    torch.mul(
        grad_q.view(key.shape[0], key.shape[1], length, groups, dim).transpose(2, 3),
        ctx.scale,
        out=grad_query.view(key.shape[0], key.shape[1], groups, length, dim),
    )
    return grad_query, grad_k.to(key.dtype).view_as(key), grad_v.to(value.dtype).view_as(value), None, None


def _save_inputs(ctx, inputs, output):
    query, key, value, ctx.scale, ctx.chunk = inputs
    ctx.save_for_backward(query, key, value)


causal_attention.register_autograd(_causal_attention_backward, setup_context=_save_inputs)


def segment_mask(
    *,
    attention_mask: torch.Tensor | None,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    **kwargs,
) -> torch.Tensor | None:
    """No mask for an unpadded, uncached causal pass (segment_attention keeps it causal per example).

    transformers would otherwise read restarting position ids as packing and build a (T, T) mask that
    segment_attention never uses. Every other case (padding, a KV cache) gets SDPA's own mask.
    """
    if attention_mask is None and q_length == kv_length and q_offset == 0 and kv_offset == 0:
        return None
    return sdpa_mask(
        attention_mask=attention_mask,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        **kwargs,
    )


AttentionInterface.register(NAME, segment_attention)
AttentionMaskInterface.register(NAME, segment_mask)
