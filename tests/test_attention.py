"""Padding-free attention (models/attention.py): the chunked causal kernel and the grouping of equal-length examples
compute what per-example SDPA computes, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch

from tunesmith.models import attention


def layout(batch: int, length: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    """(batch, heads, length, dim) in the strides transformers hands attention: a transposed (batch, length, ...)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, heads, dim, generator=generator).transpose(1, 2).requires_grad_()


def sdpa(query, key, value):
    """Causal SDPA with the key heads repeated for grouped queries; (B, T, heads, dim) like the attention interface."""
    groups = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), is_causal=True
    ).transpose(1, 2)


def outputs_and_grads(function, tensors, grad):
    inputs = [t.detach().clone().requires_grad_() for t in tensors]
    out = function(*inputs)
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize(
    "batch,heads,kv_heads,length,dim,value_dim,chunk",
    [
        (2, 6, 2, 100, 16, 16, 8),  # grouped queries, a last chunk shorter than the others
        (3, 4, 4, 37, 8, 12, 5),  # one query head per key head, values wider than keys
        (1, 9, 3, 64, 32, 32, 64),  # one chunk: the whole sequence is the diagonal block
    ],
)
def test_chunked_causal_attention_equals_sdpa_forward_and_backward(
    batch, heads, kv_heads, length, dim, value_dim, chunk
):
    tensors = [
        layout(batch, length, heads, dim, 0),
        layout(batch, length, kv_heads, dim, 1),
        layout(batch, length, kv_heads, value_dim, 2),
    ]
    grad = torch.randn(batch, length, heads, value_dim, generator=torch.Generator().manual_seed(3))
    ours, our_grads = outputs_and_grads(
        lambda q, k, v: attention.causal_attention(q, k, v, 1 / math.sqrt(dim), chunk), tensors, grad
    )
    expected, expected_grads = outputs_and_grads(sdpa, tensors, grad)
    assert ours.shape == (batch, length, heads, value_dim)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(our_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_attention_in_bf16_is_as_close_to_exact_as_sdpa_in_bf16():
    """bf16 inputs: softmax normalises in float32 and key/value gradients sum over chunks in float32, so the kernel's
    error against a float64 reference stays within 1.5x of SDPA's own bf16 kernel, and under 2% of the largest
    value (bf16 keeps 8 significant bits: 0.4% per rounding)."""
    batch, heads, kv_heads, length, dim, chunk = 2, 6, 2, 96, 32, 8
    exact = [
        layout(batch, length, heads, dim, 0).double(),
        layout(batch, length, kv_heads, dim, 1).double(),
        layout(batch, length, kv_heads, dim, 2).double(),
    ]
    grad = torch.randn(batch, length, heads, dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference, reference_grads = outputs_and_grads(sdpa, exact, grad)
    halves = [t.detach().bfloat16() for t in exact]
    ours, our_grads = outputs_and_grads(
        lambda q, k, v: attention.causal_attention(q, k, v, 1 / math.sqrt(dim), chunk), halves, grad.bfloat16()
    )
    theirs, their_grads = outputs_and_grads(sdpa, halves, grad.bfloat16())
    assert ours.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in our_grads)
    for got, want, expected in zip([ours, *our_grads], [theirs, *their_grads], [reference, *reference_grads]):
        error, sdpa_error = ((x.double() - expected).abs().max().item() for x in (got, want))
        assert error <= 1.5 * sdpa_error + 1e-3 and error < 0.02 * expected.abs().max().item()


class Layer(torch.nn.Module):
    num_key_value_groups, is_causal, layer_idx = 2, True, 0


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("lengths", [(20, 33, 20, 7, 20), (33, 20, 20, 20, 7)])  # apart in the row, and adjacent
def test_examples_of_one_length_run_as_one_batch_and_the_row_equals_per_example_attention(
    monkeypatch, chunked, lengths
):
    tensors = [layout(1, sum(lengths), 4, 8, 0), layout(1, sum(lengths), 2, 8, 1), layout(1, sum(lengths), 2, 8, 2)]
    grad = torch.randn(1, sum(lengths), 4, 8, generator=torch.Generator().manual_seed(3))
    # Only a batch of at least 3 examples x 2 key heads takes the chunked kernel here: the three of length 20.
    monkeypatch.setitem(attention.CHUNKED, "min_key_heads", 6 if chunked else 1000)
    monkeypatch.setitem(attention.CHUNKED, "min_length", 1)
    batches, sdpa_batches = [], []
    kernel, fused = attention.causal_attention, attention.sdpa_attention_forward
    monkeypatch.setattr(attention, "causal_attention", lambda q, *rest: batches.append(q.shape) or kernel(q, *rest))
    monkeypatch.setattr(
        attention,
        "sdpa_attention_forward",
        lambda m, q, *rest, **kw: sdpa_batches.append(q.shape) or fused(m, q, *rest, **kw),
    )

    def packed(q, k, v):
        return attention.segment_attention(Layer(), q, k, v, None, segment_lengths=lengths, scaling=1 / math.sqrt(8))[0]

    def one_by_one(q, k, v):
        return torch.cat([sdpa(*parts) for parts in zip(*(t.split(lengths, dim=2) for t in (q, k, v)))], dim=1)

    ours, our_grads = outputs_and_grads(packed, tensors, grad)
    assert batches == ([(3, 4, 20, 8)] if chunked else [])
    assert sorted(sdpa_batches) == sorted(([] if chunked else [(3, 4, 20, 8)]) + [(1, 4, 33, 8), (1, 4, 7, 8)])
    expected, expected_grads = outputs_and_grads(one_by_one, tensors, grad)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(our_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags, longest", [({"avx512_bf16"}, 512), ({"avx512_bf16", "amx_bf16"}, 192)])
def test_in_bf16_the_chunked_kernel_is_taken_up_to_where_sdpa_wins_on_this_cpu(monkeypatch, flags, longest):
    monkeypatch.setattr(attention.hardware, "cpu_flags", lambda: flags)
    query = torch.zeros(1, 9, 4, 2, dtype=torch.bfloat16)
    assert attention.takes_chunked(query, 12, 128, {}) and attention.takes_chunked(query, 12, longest, {})
    assert not attention.takes_chunked(query, 12, longest + 1, {}) and not attention.takes_chunked(query, 12, 1024, {})
    assert attention.takes_chunked(query.float(), 12, 1024, {})  # float32's limits are the same on both


@pytest.mark.parametrize("change", [dict(dtype=torch.float64), dict(dropout=0.1), dict(length=2048)])
def test_the_chunked_kernel_is_taken_only_where_it_was_measured_faster(change):
    query = torch.zeros(1, 9, 4, 2, dtype=change.get("dtype", torch.float32))
    kwargs = {"dropout": change.get("dropout", 0.0), "scaling": 0.125}
    assert attention.takes_chunked(torch.zeros(1, 9, 4, 2), 12, 512, kwargs | {"dropout": 0.0})
    assert not attention.takes_chunked(query, 12, change.get("length", 512), kwargs)
    assert not attention.takes_chunked(torch.zeros(1, 9, 4, 2), 3, 512, {})  # one example of a 3-key-head model
