"""Causal attention forward + backward on a CPU: SDPA's fused kernel against tunesmith's chunked kernel
(models/attention.py), in float32 and bfloat16, at the built-in model's shapes (9 query heads over 3 key heads of
64 dimensions). Prints milliseconds per call (best of --repeats) and each path's largest error against a float64
reference, so the choice of kernel per dtype (attention.takes_chunked) rests on numbers.

    python bench/attention.py [--examples 4] [--length 512]

Run it alone on the machine. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from tunesmith.models.attention import CHUNK_ROWS, causal_attention

HEADS, KV_HEADS, DIM = 9, 3, 64


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)


def chunked(q, k, v):
    return causal_attention(q, k, v, 1 / math.sqrt(DIM), max(8, CHUNK_ROWS * KV_HEADS // HEADS))


def chunked_in_float32(q, k, v):
    """bf16 inputs, the chunked kernel in float32 (its inputs cast up, its output cast back down)."""
    return chunked(q.float(), k.float(), v.float()).to(q.dtype)


def timed(path, inputs, repeats: int) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    best, out = math.inf, None
    for _ in range(repeats + 1):  # the first call warms the kernels
        tensors = [t.detach().requires_grad_() for t in inputs]
        start = time.perf_counter()
        out = path(*tensors)
        out.float().square().sum().backward()
        best = min(best, time.perf_counter() - start)
    return best * 1000, out.detach(), [t.grad for t in tensors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    shapes = [(args.examples, HEADS, args.length, DIM)] + [(args.examples, KV_HEADS, args.length, DIM)] * 2
    inputs = [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]
    _, reference, reference_grads = timed(sdpa, inputs, 0)
    print(f"{args.examples} x {args.length} tokens, {torch.get_num_threads()} threads; error vs float64 reference")
    for dtype in (torch.float32, torch.bfloat16):
        paths = [("sdpa", sdpa), ("chunked", chunked)]
        paths += [("chunked in fp32", chunked_in_float32)] if dtype == torch.bfloat16 else []
        for name, path in paths:
            ms, out, grads = timed(path, [t.to(dtype) for t in inputs], args.repeats)
            error = (out.double() - reference).abs().max().item()
            grad_error = max((g.double() - r).abs().max().item() for g, r in zip(grads, reference_grads))
            label = f"{name} {str(dtype).removeprefix('torch.')}"
            print(f"{label:<26} {ms:8.1f} ms   output {error:.2e}   gradients {grad_error:.2e}")


if __name__ == "__main__":
    main()
