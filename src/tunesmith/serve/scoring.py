"""Scoring a prompt for the completions endpoint: OpenAI's `echo` with `logprobs`, which lm-evaluation-harness
uses for its loglikelihood tasks (the prompt's tokens, each with its log-probability given those before it).

`score_prompt` is the one place that runs the model for it, under the request's adapter, through the pool;
`completion_logprobs` shapes scores (the prompt's or the generated tokens') as the legacy endpoint's `logprobs`.
"""

from __future__ import annotations

from typing import Any

Scores = list[
    tuple[float | None, dict[int, float]]
]  # per token: (its logprob, or None for the first; top-k alternatives)


def score_prompt(pool: Any, base: str, adapter_key: str | None, loader: Any, ids: list[int], top_k: int) -> Scores:
    """Per token of `ids`: its log-probability given the tokens before it (None for the first) and the `top_k`
    likeliest tokens at its position; one forward pass under `adapter_key`'s adapter (None: the base model)."""
    with pool.using(base, adapter_key, loader) as engine:
        return engine.prompt_logprobs(ids, top_k)


def completion_logprobs(
    tokenizer: Any,
    ids: list[int],
    token_logprobs: list[float | None],
    top: list[dict[int, float]] | None,
    text_offset_start: int = 0,
) -> dict[str, Any]:
    """OpenAI's legacy `logprobs` object for tokens `ids`: each token's text, its logprob (None: unscored, as the
    first token of an echoed prompt), the top alternatives as {token text: logprob} (None where unscored, or
    when `top` is None) and each token's character offset in the text, counted from `text_offset_start`."""
    tokens = [tokenizer.decode([token]) for token in ids]
    offsets, offset = [], text_offset_start
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top_logprobs = None
    if top is not None:
        top_logprobs = []
        for logprob, alternatives in zip(token_logprobs, top):
            if logprob is None:
                top_logprobs.append(None)
                continue
            shown: dict[str, float] = {}
            for token, value in alternatives.items():  # two ids may spell the same text: keep the likelier
                text = tokenizer.decode([token])
                shown[text] = max(value, shown.get(text, float("-inf")))
            top_logprobs.append(shown)
    return {
        "tokens": tokens,
        "token_logprobs": list(token_logprobs),
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }
