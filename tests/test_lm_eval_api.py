"""lm-evaluation-harness's `local-completions` model scores loglikelihood requests over /v1/completions (token-id
prompts, `echo`, `logprobs`, `max_tokens: 0`) exactly as loading the model directly does.
Needs the `interop` extra: pip install -e '.[interop]'; run with pytest -m lm_eval."""

from __future__ import annotations

import pytest
import torch
from service_fixtures import live_app, make_key

pytestmark = pytest.mark.lm_eval

PAIRS = [
    ("What is the capital of France?", " Paris is the capital."),
    ("the quick brown", " fox jumps"),
    ("my card has not", " arrived yet"),
    ("I want to cancel", " a transfer"),
]


def local_completions(base_url: str, tokenizer: str):
    """lm-eval's `local-completions` model on our /v1/completions, sending token ids (the key comes from
    OPENAI_API_KEY, as lm-eval reads it)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=f"{base_url}/completions",
        model="tiny",
        tokenizer=tokenizer,
        tokenized_requests=True,
        batch_size=1,
        max_retries=1,
        num_concurrent=1,
    )


def test_lm_eval_loglikelihood_over_the_api_equals_direct_scoring(tmp_path, tiny_model, monkeypatch):
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM

    from tunesmith.serve.service import Service, Settings

    service = Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}))
    with live_app(service, worker=False) as base_url:
        monkeypatch.setenv("OPENAI_API_KEY", make_key(service, "acme", "read"))
        model = local_completions(base_url, str(tiny_model))
        requests = [Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(PAIRS)]
        scored = [score for score, _ in model.loglikelihood(requests)]
    direct = AutoModelForCausalLM.from_pretrained(tiny_model)
    for (context, continuation), score in zip(PAIRS, scored):
        context_ids, continuation_ids = model.tok_encode(context), model.tok_encode(continuation)
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(direct(input_ids=ids).logits[0, :-1].float(), -1)
        expected = logprobs[len(context_ids) - 1 :].gather(1, ids[0, len(context_ids) :, None]).sum().item()
        assert abs(score - expected) < 1e-4, (context, score, expected)
