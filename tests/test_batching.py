"""Batched generation (issue 21): rows of many requests decoded together, each through its own adapter, in
arrival order; per-token log-probabilities; cancelled, timed-out and abandoned rows stop at once."""

from __future__ import annotations

import time

import pytest
import torch
from openai.types import Completion  # the official SDK's response types check the shapes
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tunesmith.engine.generation import Engine, Sampling
from tunesmith.serve.batching import End, Row, Scheduler, Token
from tunesmith.serve.inference import AdapterPool, chat_completion, chat_completion_chunks, completion

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MESSAGES = [{"role": "user", "content": "my card has not arrived"}]
PROMPTS = ["the quick brown fox", "my card has not arrived yet, when will it come?", "refund", "hello world how"]


def conforms(sdk_type, response: dict) -> None:
    sdk_type.model_validate(response)


@pytest.fixture(scope="module")
def adapter_files(tiny_model, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Two LoRA adapters with random B matrices (each changes what the model writes), as the pool gets them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    files = {}
    for seed, name in enumerate(["a", "b"], start=1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        config = LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        directory = tmp_path_factory.mktemp(f"adapter-{name}")
        get_peft_model(model, config).save_pretrained(directory)
        files[f"ft:tiny:{name}"] = {file: (directory / file).read_bytes() for file in ADAPTER_FILES}
    return files


def ids_of(pool: AdapterPool, base: str, text: str) -> list[int]:
    return pool.engine(base).tokenizer(text)["input_ids"]


def run(scheduler: Scheduler, rows: list[Row]) -> dict[int, tuple[list[Token], End]]:
    """Submit `rows` as one request and collect, per row, its tokens and its end."""
    tokens, ends = {row.index: [] for row in rows}, {}
    ticket = scheduler.submit(rows)
    try:
        for index, event in ticket:
            (tokens[index].append(event) if isinstance(event, Token) else ends.__setitem__(index, event))
    finally:
        ticket.close()
    return {index: (tokens[index], ends[index]) for index in tokens}


def batch_sizes(monkeypatch) -> list[list[int]]:
    """The rows of each batch the scheduler runs (their indices), in order."""
    batches, run_batch = [], Scheduler._run_batch

    def recording(self, rows):
        batches.append([row.index for row in rows])
        return run_batch(self, rows)

    monkeypatch.setattr(Scheduler, "_run_batch", recording)
    return batches


def test_one_batch_of_base_and_two_adapters_matches_each_row_generated_alone(tiny_model, adapter_files, monkeypatch):
    pool, base = AdapterPool(capacity=4), str(tiny_model)
    keys = [None, "ft:tiny:a", "ft:tiny:b", None, "ft:tiny:a", "ft:tiny:b"]
    prompts = [ids_of(pool, base, PROMPTS[i % len(PROMPTS)]) for i in range(len(keys))]  # lengths differ: padding
    expected = []
    for key, prompt in zip(keys, prompts):  # each alone, through Engine.generate_ids with the adapter active
        with pool.using(base, key, (lambda key=key: adapter_files[key]) if key else None) as engine:
            expected.append(engine.generate_ids(prompt, Sampling(max_new_tokens=10)))
    assert len({tuple(ids) for ids in expected[:3]}) == 3, "the adapters must change the output"

    batches = batch_sizes(monkeypatch)
    rows = [
        Row(prompt, Sampling(max_new_tokens=10), key, index=index)
        for index, (key, prompt) in enumerate(zip(keys, prompts))
    ]
    results = run(pool.scheduler(base), rows)
    assert batches == [list(range(len(keys)))], "every row was decoded in one batch"
    for index, ids in enumerate(expected):
        tokens, end = results[index]
        assert [token.id for token in tokens] == ids
        assert end.reason == ("stop" if ids[-1] in pool.engine(base).stop_ids() else "length")


def test_fused_lora_layers_take_peft_mixed_batch_path_when_adapter_names_are_given(tiny_model, adapter_files):
    from peft import PeftModel

    from tunesmith.models import fused_lora

    pool, base = AdapterPool(), str(tiny_model)
    for key in adapter_files:
        with pool.using(base, key, lambda key=key: adapter_files[key]):
            pass
    model, names = pool.engine(base).model, [pool._bases[base].adapters[key] for key in adapter_files]
    assert isinstance(model, PeftModel) and fused_lora.fuse_lora_layers(model) == 0, "the pool's layers are fused"
    input_ids = torch.tensor([ids_of(pool, base, PROMPTS[0])] * 3)
    calls, apply = [], fused_lora.LoraLinear.apply
    fused_lora.LoraLinear.apply = lambda *args: calls.append(1) or apply(*args)
    alone = []
    try:
        with torch.no_grad():
            for name in names:
                model.set_adapter(name)
                alone.append(model(input_ids=input_ids[:1]).logits[0])
            with model.disable_adapter():
                alone.append(model(input_ids=input_ids[:1]).logits[0])
            assert calls, "one active adapter and no adapter_names: the fused path"
            calls.clear()
            mixed = model(input_ids=input_ids, adapter_names=[names[0], names[1], "__base__"]).logits
    finally:
        fused_lora.LoraLinear.apply = apply
    assert calls == [], "with adapter_names, every layer goes through PEFT's forward"
    for row, reference in enumerate(alone):
        assert torch.allclose(mixed[row], reference, atol=1e-5)


def test_rows_start_in_arrival_order(tiny_model, adapter_files, monkeypatch):
    pool, base = AdapterPool(capacity=1, max_batch=2), str(tiny_model)
    scheduler, prompt = pool.scheduler(base), ids_of(pool, base, PROMPTS[0])
    monkeypatch.setattr(Engine, "stop_ids", lambda self: [10**6])  # only max_tokens ends a row
    batches = batch_sizes(monkeypatch)
    tickets = [scheduler.submit([Row(prompt, Sampling(max_new_tokens=30), index=index)]) for index in range(5)]
    for ticket in tickets:  # queued while the first batch runs
        assert [type(event) for _, event in ticket][-1] is End
        ticket.close()
    assert [index for batch in batches for index in batch] == list(range(5)) and max(map(len, batches)) == 2

    # one adapter resident at a time: a later row of a's does not join a's batch ahead of b's row
    batches.clear()
    keys = ["ft:tiny:a", "ft:tiny:b", "ft:tiny:a"]
    rows = [
        Row(prompt, Sampling(max_new_tokens=5), key, lambda key=key: adapter_files[key], index=index)
        for index, key in enumerate(keys)
    ]
    run(scheduler, rows)
    assert batches == [[0], [1], [2]]


def test_a_cancelled_row_stops_within_a_step_and_leaves_the_batch(tiny_model, monkeypatch):
    import tunesmith.serve.batching as batching

    pool, base = AdapterPool(), str(tiny_model)
    prompt = ids_of(pool, base, PROMPTS[1])
    monkeypatch.setattr(Engine, "stop_ids", lambda self: [10**6])
    rows = [Row(prompt, Sampling(max_new_tokens=40), index=index) for index in range(2)]
    sample = batching._sample

    def sampling(logits, settings, generator):  # the consumer of row 0 leaves while its 5th token is chosen
        if len(rows[0].tokens) == 4:
            rows[0].cancel.set()
        return sample(logits, settings, generator)

    monkeypatch.setattr(batching, "_sample", sampling)
    widths = []
    layer = pool.engine(base).model.get_input_embeddings()
    hook = layer.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[0]))
    try:
        results = run(pool.scheduler(base), rows)
    finally:
        hook.remove()
    assert results[0][1].reason == "cancelled" and len(results[0][0]) == 5
    assert results[1][1].reason == "length" and len(results[1][0]) == 40
    assert widths[:5] == [2] * 5 and set(widths[5:]) == {1}, "the cancelled row's slot is freed at once"
    alone = pool.engine(base).generate_ids(prompt, Sampling(max_new_tokens=40))
    assert [token.id for token in results[1][0]] == alone, "the row left behind decodes as it would alone"


def test_closing_a_queued_request_does_not_wait_for_the_running_batch(tiny_model, monkeypatch):
    pool, base = AdapterPool(max_batch=1), str(tiny_model)
    scheduler, prompt = pool.scheduler(base), ids_of(pool, base, PROMPTS[0])
    monkeypatch.setattr(Engine, "stop_ids", lambda self: [10**6])
    running = scheduler.submit([Row(prompt, Sampling(max_new_tokens=1000))])
    next(iter(running))
    waiting_row = Row(prompt, Sampling(max_new_tokens=5))
    waiting = scheduler.submit([waiting_row])
    started = time.monotonic()
    waiting.close()
    assert time.monotonic() - started < 0.5 and waiting_row.tokens == []
    running.close()


def test_the_deadline_ends_a_row_as_length(tiny_model, adapter_files, monkeypatch):
    pool, base = AdapterPool(), str(tiny_model)
    prompt = ids_of(pool, base, PROMPTS[0])
    monkeypatch.setattr(Engine, "stop_ids", lambda self: [10**6])
    pool.engine(base).generate_ids(prompt, Sampling(max_new_tokens=2))  # loaded and warm
    row = Row(prompt, Sampling(max_new_tokens=1000), deadline=time.monotonic() + 0.3)
    tokens, end = run(pool.scheduler(base), [row])[0]
    assert end.reason == "length" and 0 < len(tokens) < 1000

    timed = AdapterPool(request_timeout=0.3)  # through the service's request path, streamed or not
    request = {"model": "tiny", "messages": MESSAGES, "max_tokens": 900}
    reply = chat_completion(timed, base, "ft:tiny:a", lambda: adapter_files["ft:tiny:a"], request)
    assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] < 900
    chunks = list(chat_completion_chunks(timed, base, None, None, {**request, "stream": True}))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def direct_logprobs(engine: Engine, ids: list[int], start: int) -> torch.Tensor:
    """(len(ids) - start, vocab) log-probabilities of the tokens from `start` on, from one plain forward."""
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([ids])).logits[0, start - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


def test_chat_logprobs_equal_a_direct_forward_and_conform(tiny_model, adapter_files):
    pool, base, key = AdapterPool(), str(tiny_model), "ft:tiny:a"
    request = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    reply = chat_completion(pool, base, key, lambda: adapter_files[key], request)
    conforms(ChatCompletion, reply)
    content = reply["choices"][0]["logprobs"]["content"]
    engine = pool.engine(base)
    prompt = engine.chat.prompt_ids(MESSAGES)
    with pool.using(base, key) as engine:
        alone = engine.generate_ids(prompt, Sampling(max_new_tokens=8))
        generated = [token for token in alone if token not in engine.stop_ids()]
        scores = direct_logprobs(engine, prompt + alone, len(prompt))
    assert (
        len(content) == len(generated)
        and "".join(entry["token"] for entry in content) == reply["choices"][0]["message"]["content"]
    )
    for position, (entry, token) in enumerate(zip(content, generated)):
        assert entry["logprob"] == pytest.approx(float(scores[position, token]), abs=1e-4)
        tops = [top["logprob"] for top in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry["token"] in [top["token"] for top in entry["top_logprobs"]], "greedy: the likeliest token"
        assert entry["bytes"] == list(entry["token"].encode())

    chunks = list(chat_completion_chunks(pool, base, key, lambda: adapter_files[key], {**request, "stream": True}))
    for chunk in chunks:
        conforms(ChatCompletionChunk, chunk)
    streamed = [
        entry
        for chunk in chunks
        if chunk["choices"][0]["logprobs"]
        for entry in chunk["choices"][0]["logprobs"]["content"]
    ]
    assert streamed == content
    plain = chat_completion(pool, base, key, None, {**request, "logprobs": None, "top_logprobs": None})
    assert plain["choices"][0]["logprobs"] is None


def test_legacy_completion_logprobs_conform(tiny_model):
    pool, base = AdapterPool(), str(tiny_model)
    reply = completion(
        pool,
        base,
        None,
        None,
        {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "logprobs": 2},
    )
    conforms(Completion, reply)
    logprobs, text = reply["choices"][0]["logprobs"], reply["choices"][0]["text"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
    assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(logprobs["tokens"]))]
    assert "".join(logprobs["tokens"]) == text
    assert all(
        len(top) <= 2 and max(top.values()) == pytest.approx(lp, abs=1e-6)
        for top, lp in zip(logprobs["top_logprobs"], logprobs["token_logprobs"])
    )


def test_a_seed_samples_the_same_tokens_batched_or_alone(tiny_model, adapter_files):
    pool, base = AdapterPool(), str(tiny_model)
    scheduler, prompt = pool.scheduler(base), ids_of(pool, base, PROMPTS[1])
    sampling = Sampling(max_new_tokens=20, temperature=1.0, top_p=0.9)
    alone = run(scheduler, [Row(prompt, sampling, seed=7)])[0][0]
    others = [
        Row(ids_of(pool, base, PROMPTS[i]), sampling, "ft:tiny:b", lambda: adapter_files["ft:tiny:b"], index=i)
        for i in (1, 2)
    ]
    batched = run(scheduler, [Row(prompt, sampling, seed=7), *others])[0][0]
    assert [token.id for token in batched] == [token.id for token in alone]
    other_seed = run(scheduler, [Row(prompt, sampling, seed=8)])[0][0]
    assert [token.id for token in other_seed] != [token.id for token in alone]

    request = {"model": "tiny", "messages": MESSAGES, "max_tokens": 20, "temperature": 1.0, "seed": 3, "n": 2}
    first, second = (chat_completion(pool, base, None, None, request) for _ in range(2))
    assert [c["message"] for c in first["choices"]] == [c["message"] for c in second["choices"]]
    assert first["choices"][0]["message"] != first["choices"][1]["message"], "n replies: n different samples"


def test_an_adapter_in_use_by_a_running_batch_is_not_evicted(tiny_model, adapter_files, monkeypatch):
    pool, base = AdapterPool(capacity=1), str(tiny_model)
    monkeypatch.setattr(Engine, "stop_ids", lambda self: [10**6])
    prompt = ids_of(pool, base, PROMPTS[0])
    row = Row(prompt, Sampling(max_new_tokens=200), "ft:tiny:a", lambda: adapter_files["ft:tiny:a"])
    ticket = pool.scheduler(base).submit([row])
    events = iter(ticket)
    next(events)  # the batch runs with adapter a pinned
    with pool.using(base, "ft:tiny:b", lambda: adapter_files["ft:tiny:b"]):  # scoring under b, between two steps
        assert set(pool.resident(base)) == {"ft:tiny:a", "ft:tiny:b"}
    assert [type(event) for _, event in events][-1] is End
    ticket.close()
    alone = run(
        pool.scheduler(base),
        [Row(prompt, Sampling(max_new_tokens=200), "ft:tiny:a", lambda: adapter_files["ft:tiny:a"])],
    )[0][0]
    assert [t.id for t in alone] == row.tokens, "adapter a decoded the whole row"


def test_a_client_that_leaves_a_whole_reply_stops_its_generation(tiny_model, tmp_path, monkeypatch):
    httpx = pytest.importorskip("httpx2")
    from service_fixtures import live_app, make_key, record_generations

    from tunesmith.serve.service import Service, Settings

    service = Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}))
    import tunesmith.serve.batching as batching

    generated = record_generations(monkeypatch)  # only max_tokens would end a reply
    sample = batching._sample
    monkeypatch.setattr(batching, "_sample", lambda *args: time.sleep(0.005) or sample(*args))  # 900 tokens: 4.5 s
    auth = {"Authorization": f"Bearer {make_key(service, 'acme', 'read')}"}
    with live_app(service, worker=False) as base_url:
        with httpx.Client(base_url=base_url, headers=auth, timeout=30) as warm:
            assert (
                warm.post(
                    "/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2}
                ).status_code
                == 200
            )
        with httpx.Client(base_url=base_url, headers=auth, timeout=0.5) as leaving:
            with pytest.raises(httpx.TimeoutException):  # the client gives up and closes its connection
                leaving.post(
                    "/chat/completions",
                    json={"model": "tiny", "messages": MESSAGES, "max_tokens": 900, "temperature": 1.0, "seed": 0},
                )
        deadline = time.time() + 10
        while len(generated) < 2 and time.time() < deadline:
            time.sleep(0.05)
    assert len(generated) == 2 and len(generated[1]) < 900, "the abandoned reply's generation stopped early"
