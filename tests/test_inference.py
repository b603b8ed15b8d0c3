"""The service's inference: adapters hot-swapped on one resident base, loaded from memory, OpenAI-shaped replies."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from service_fixtures import record_generations

from tunesmith.engine.generation import Engine
from tunesmith.serve.inference import (
    AdapterPool,
    RequestError,
    chat_completion,
    chat_completion_chunks,
    completion,
    completion_chunks,
)

try:  # the official SDK's response types check the shapes; the SDK is the service's client, not a dependency
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
except ImportError:
    ChatCompletion = ChatCompletionChunk = Completion = None

MESSAGES = [{"role": "user", "content": "my card has not arrived"}]
TEXT = "the quick brown fox"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
KEYS = {"a": "ft:tiny:a:0001", "b": "ft:tiny:b:0002", "c": "ft:tiny:c:0003"}


def conforms(sdk_type, response: dict) -> None:
    if sdk_type is not None:
        sdk_type.model_validate(response)


def greedy(request: dict, **extra) -> dict:
    return {"model": "tiny", "temperature": 0, "max_tokens": 8, **request, **extra}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA adapters with random (not zero) B matrices, so each changes what the model writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = {}
    for seed, name in enumerate(KEYS, start=1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        config = LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        dirs[name] = tmp_path_factory.mktemp(f"adapter-{name}")
        get_peft_model(model, config).save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def adapter_files(adapter_dirs) -> dict[str, dict[str, bytes]]:
    return {
        name: {file: (directory / file).read_bytes() for file in ADAPTER_FILES}
        for name, directory in adapter_dirs.items()
    }


@pytest.fixture(scope="module")
def expected(tiny_model, adapter_dirs) -> dict[tuple[str, str], list[int]]:
    """Greedy token ids (8 at most) of plain transformers + PEFT models, per (model, chat|text)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    chat = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompts = {"chat": tokenizer(chat, add_special_tokens=False)["input_ids"], "text": tokenizer(TEXT)["input_ids"]}
    ids = {}
    for name in ["base", *adapter_dirs]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        model = model if name == "base" else PeftModel.from_pretrained(model, adapter_dirs[name])
        for kind, prompt in prompts.items():
            output = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            ids[name, kind] = output[0, len(prompt) :].tolist()
    ids["prompt", "chat"], ids["prompt", "text"] = prompts["chat"], prompts["text"]
    return ids


@pytest.fixture(scope="module")
def decode(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def loaders(adapter_files, calls: Counter | None = None):
    """key -> a loader of that adapter's files, counting its calls in `calls`."""
    calls = Counter() if calls is None else calls

    def loader(name: str):
        def load() -> dict[str, bytes]:
            calls[name] += 1
            return dict(adapter_files[name])

        return load

    return {name: loader(name) for name in adapter_files}


def ask(pool, base, name, load, request=None, **extra) -> dict:
    key = KEYS.get(name)
    return chat_completion(pool, base, key, load.get(name), greedy(request or {"messages": MESSAGES}, **extra))


def test_replies_through_each_adapter_match_plain_peft_models(tiny_model, adapter_files, expected, decode):
    pool, load, base = AdapterPool(capacity=4), loaders(adapter_files), str(tiny_model)
    eos, contents = pool.engine(base).tokenizer.eos_token_id, {}
    for name in ["a", "base", "b", "a"]:  # A again after B: switching back restores A
        reply = ask(pool, base, name, load)
        conforms(ChatCompletion, reply)
        ids = expected[name, "chat"]
        assert reply["choices"][0]["message"] == {"role": "assistant", "content": decode(ids)}
        assert reply["choices"][0]["finish_reason"] == ("stop" if ids[-1] == eos else "length")
        assert reply["usage"] == {
            "prompt_tokens": len(expected["prompt", "chat"]),
            "completion_tokens": len(ids),
            "total_tokens": len(expected["prompt", "chat"]) + len(ids),
        }
        assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-") and reply["model"] == "tiny"
        contents[name] = reply["choices"][0]["message"]["content"]
    assert len(set(contents.values())) == 3, "the adapters must change the output for this test to mean anything"

    text = completion(pool, base, KEYS["b"], load["b"], greedy({"prompt": [TEXT]}))
    conforms(Completion, text)
    assert text["choices"][0]["text"] == decode(expected["b", "text"])
    assert text["usage"]["prompt_tokens"] == len(expected["prompt", "text"])
    assert text["usage"]["completion_tokens"] == len(expected["b", "text"])
    assert text["object"] == "text_completion" and text["choices"][0]["logprobs"] is None


def test_least_recently_used_adapter_is_evicted_and_reloads(tiny_model, adapter_files, expected, decode):
    calls = Counter()
    pool, load, base = AdapterPool(capacity=2), loaders(adapter_files, calls), str(tiny_model)
    for name in ["a", "b", "a", "a"]:
        ask(pool, base, name, load)
    assert pool.resident(base) == [KEYS["b"], KEYS["a"]]
    assert calls == {"a": 1, "b": 1}, "a resident adapter is not loaded again"

    ask(pool, base, "c", load)  # full: B, the least recently used, goes
    assert pool.resident(base) == [KEYS["a"], KEYS["c"]]
    assert len(pool.engine(base).model.peft_config) == 2, "the evicted adapter is deleted from the model"

    reply = ask(pool, base, "b", load)  # B comes back through its loader, A goes
    assert calls == {"a": 1, "b": 2, "c": 1}
    assert pool.resident(base) == [KEYS["c"], KEYS["b"]]
    assert reply["choices"][0]["message"]["content"] == decode(expected["b", "chat"])
    assert ask(pool, base, "base", load)["choices"][0]["message"]["content"] == decode(expected["base", "chat"])


def test_an_adapter_that_does_not_fit_raises_and_leaves_the_model_as_it_was(
    tiny_model, adapter_files, expected, decode
):
    pool, load, base = AdapterPool(), loaders(adapter_files), str(tiny_model)
    config = json.loads(adapter_files["a"]["adapter_config.json"])
    misfit = {
        **adapter_files["a"],
        "adapter_config.json": json.dumps({**config, "target_modules": ["o_proj"]}).encode(),
    }
    for _ in range(2):  # as the model's first adapter, then beside another
        with pytest.raises(ValueError, match="does not fit"):
            chat_completion(pool, base, "ft:tiny:misfit:9", lambda: misfit, greedy({"messages": MESSAGES}))
        for name in ["base", "a"]:
            assert ask(pool, base, name, load)["choices"][0]["message"]["content"] == decode(expected[name, "chat"])
    assert pool.resident(base) == [KEYS["a"]]
    assert len(pool.engine(base).model.peft_config) == 1, "the misfit's half-added adapter is gone"


def test_stream_chunks_add_up_to_the_whole_reply(tiny_model, adapter_files):
    pool, load, base = AdapterPool(), loaders(adapter_files), str(tiny_model)
    request = greedy({"messages": MESSAGES, "stream_options": {"include_usage": True}}, max_tokens=24)
    whole = chat_completion(pool, base, KEYS["a"], load["a"], request)
    chunks = list(chat_completion_chunks(pool, base, KEYS["a"], load["a"], request))
    for chunk in chunks:
        conforms(ChatCompletionChunk, chunk)
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    pieces = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-2]]
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    text_request = greedy({"prompt": TEXT}, max_tokens=24)
    text_whole = completion(pool, base, None, None, text_request)
    text_chunks = list(completion_chunks(pool, base, None, None, text_request))
    conforms(Completion, text_chunks[-1])  # the SDK's type wants a finish reason, which only the last has
    assert all(set(chunk["choices"][0]) == {"text", "index", "logprobs", "finish_reason"} for chunk in text_chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in text_chunks) == text_whole["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == text_whole["choices"][0]["finish_reason"]


def test_finish_reasons_and_stop_strings(tiny_model, adapter_files, expected, decode, monkeypatch):
    pool, load, base = AdapterPool(), loaders(adapter_files), str(tiny_model)
    assert not set(expected["a", "chat"][:3]) & set(pool.engine(base).stop_ids())
    short = ask(pool, base, "a", load, max_tokens=3)
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    assert short["choices"][0]["message"]["content"] == decode(expected["a", "chat"][:3])

    whole = ask(pool, base, "a", load, max_tokens=24)["choices"][0]["message"]["content"]
    pieces = [
        chunk["choices"][0]["delta"].get("content")
        for chunk in chat_completion_chunks(
            pool, base, KEYS["a"], load["a"], greedy({"messages": MESSAGES}, max_tokens=24)
        )
    ]
    pieces = [piece for piece in pieces if piece]
    # a stop string across two streamed pieces: the first piece's end must be held back, not sent
    boundaries = [len("".join(pieces[:k])) for k in range(1, len(pieces))]
    boundary = next(
        b for b in boundaries if whole.find(whole[b - 1 : b + 1]) == b - 1 and "\ufffd" not in whole[b - 1 : b + 1]
    )
    stop = whole[boundary - 1 : boundary + 1]
    for request in ({"messages": MESSAGES, "stop": [stop, "never appears"]}, {"messages": MESSAGES, "stop": stop}):
        cut = ask(pool, base, "a", load, request, max_tokens=24)
        assert cut["choices"][0]["message"]["content"] == whole[: boundary - 1]
        assert cut["choices"][0]["finish_reason"] == "stop"
        chunks = list(chat_completion_chunks(pool, base, KEYS["a"], load["a"], greedy(request, max_tokens=24)))
        assert "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks) == whole[: boundary - 1]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

    first = expected["a", "chat"][0]  # make the first token the end-of-turn token: the reply ends right there
    monkeypatch.setattr(Engine, "stop_ids", lambda self: [first])
    ended = ask(pool, base, "a", load)
    assert ended["choices"][0]["finish_reason"] == "stop" and ended["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize(
    "request_, param",
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "max_completion_tokens": 10**6}, "max_completion_tokens"),
        ({"messages": MESSAGES, "temperature": 2.5}, "temperature"),
        ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": MESSAGES, "max_tokens": 2000}, "messages"),  # past the tiny model's 1024-token context
    ],
)
def test_bad_chat_requests_raise_request_errors(tiny_model, request_, param):
    with pytest.raises(RequestError) as error:
        chat_completion(AdapterPool(), str(tiny_model), None, None, {"model": "tiny", **request_})
    body = error.value.body()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error" and body["message"]
    assert body["code"] == ("context_length_exceeded" if request_.get("max_tokens") == 2000 else None)


@pytest.mark.parametrize("prompt", [None, "", ["one", "two"], [[]]])
def test_bad_prompts_raise_request_errors(tiny_model, prompt):
    with pytest.raises(RequestError) as error:
        completion(AdapterPool(), str(tiny_model), None, None, {"model": "tiny", "prompt": prompt})
    assert error.value.param == "prompt"


def test_concurrent_requests_for_different_adapters_each_get_their_own(tiny_model, adapter_files, expected, decode):
    pool, load, base = AdapterPool(capacity=1), loaders(adapter_files), str(tiny_model)  # every switch evicts
    start, replies = threading.Barrier(2), {"a": [], "b": []}

    def serve(name: str) -> None:
        start.wait()
        for _ in range(4):
            replies[name].append(ask(pool, base, name, load)["choices"][0]["message"]["content"])

    workers = [threading.Thread(target=serve, args=(name,)) for name in replies]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert replies == {name: [decode(expected[name, "chat"])] * 4 for name in replies}


def test_an_open_stream_does_not_hold_the_model(tiny_model, adapter_files, expected, decode):
    # issue 21: generation is batched; a stream nobody reads no longer keeps other adapters waiting until closed
    pool, load, base = AdapterPool(), loaders(adapter_files), str(tiny_model)
    request = {"model": "tiny", "messages": MESSAGES, "max_tokens": 900, "temperature": 1.0, "seed": 0}
    stream = chat_completion_chunks(pool, base, KEYS["a"], load["a"], request)
    assert next(stream)["choices"][0]["delta"]["role"] == "assistant"

    other = {}
    waiting = threading.Thread(target=lambda: other.update(ask(pool, base, "b", load)))
    waiting.start()
    waiting.join(timeout=30)
    assert not waiting.is_alive(), "a request for another adapter is answered while the stream is open"
    stream.close()
    assert other["choices"][0]["message"]["content"] == decode(expected["b", "chat"])


def test_closing_a_stream_stops_its_generation(tiny_model, adapter_files, monkeypatch):
    pool, load, base = AdapterPool(), loaders(adapter_files), str(tiny_model)
    generated = record_generations(monkeypatch)  # no end-of-turn: only max_tokens would end a reply
    request = {"model": "tiny", "messages": MESSAGES, "max_tokens": 900, "temperature": 1.0, "seed": 0}
    before = set(threading.enumerate())
    stream = chat_completion_chunks(pool, base, KEYS["a"], load["a"], request)
    next(stream)
    assert "content" in next(stream)["choices"][0]["delta"]  # generation is under way
    stream.close()  # returns once the generation thread has ended
    assert 0 < len(generated[0]) < 900
    assert set(threading.enumerate()) == before, "the generation thread has ended"


def test_adapters_load_from_memory_without_writing_files(
    tiny_model, adapter_files, expected, decode, tmp_path, monkeypatch
):
    pool, load, base = AdapterPool(), loaders(adapter_files), str(tiny_model)
    pool.engine(base)  # the base model loads (and may read and cache what it likes) before we watch
    scratch, workdir = tmp_path / "tmp", tmp_path / "cwd"
    scratch.mkdir(), workdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.chdir(workdir)
    written = watch_writes()
    try:
        for name in ["a", "b"]:
            reply = ask(pool, base, name, load)
            assert reply["choices"][0]["message"]["content"] == decode(expected[name, "chat"])
    finally:
        WATCHING.clear()
    assert written == [] and os.listdir(scratch) == [] and os.listdir(workdir) == []


WATCHING: list[list] = []  # the list that records file opens for writing while a test watches


def watch_writes() -> list:
    """Record every file opened for writing (audit event "open") until WATCHING is cleared."""
    if not getattr(watch_writes, "installed", False):  # audit hooks cannot be removed: install one, once

        def hook(event: str, args: tuple) -> None:
            if event == "open" and WATCHING:
                path, mode, flags = args
                writing = (mode and any(c in mode for c in "wax+")) or (flags or 0) & (
                    os.O_WRONLY | os.O_RDWR | os.O_CREAT
                )
                if writing:
                    WATCHING[0].append(path)

        sys.addaudithook(hook)
        watch_writes.installed = True
    written: list = []
    WATCHING[:] = [written]
    return written
