"""Inference for the OpenAI-compatible service: base models with hot-swapped LoRA adapters, encrypted at rest.

`AdapterPool` keeps one model per base spec and up to `capacity` adapters resident on it as named PEFT
adapters, evicting the least recently used. Adapters arrive as bytes (the caller decrypts them) and are
loaded from memory: no plaintext adapter file is ever written. The active adapter is state of the shared
model, so a lock per base is held from the switch to the end of generation, streams included.

`chat_completion`, `completion` and their `_chunks` variants turn an OpenAI request dict into the
response dicts of the official `openai` SDK's types; a bad request raises `RequestError` (HTTP 400).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.models import load_model
from tunesmith.models.fused_lora import fuse_lora_layers
from tunesmith.serve.engine import Engine, Sampling
from tunesmith.serve.request import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    Options,
    RequestError,
    check_prompt_bytes,
    parse_messages,
    parse_prompt,
)

AdapterFiles = Callable[[], dict[str, bytes]]  # {"adapter_config.json": ..., "adapter_model.safetensors": ...}


@dataclass
class _Base:
    engine: Engine
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)  # key -> PEFT name, least recent first


class AdapterPool:
    def __init__(self, capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: at least one adapter must fit")
        self.capacity = capacity
        self._bases: dict[str, _Base] = {}
        self._lock = threading.Lock()  # guards _bases; held while a base loads (rare: once per spec)

    def engine(self, base: str) -> Engine:
        """The engine of `base`, loaded on first use. Outside `using` only its tokenizer and config may be read."""
        return self._entry(base).engine

    def resident(self, base: str) -> list[str]:
        """Keys of the adapters resident on `base`, least recently used first."""
        entry = self._bases.get(base)
        return list(entry.adapters) if entry else []  # list() of a dict holds the GIL: no need to wait on the lock

    @contextmanager
    def using(self, base: str, adapter_key: str | None = None, load: AdapterFiles | None = None) -> Iterator[Engine]:
        """`base`'s engine with `adapter_key`'s adapter active (None: the base model), held exclusively."""
        entry = self._entry(base)
        with entry.lock:
            if adapter_key is None:
                with entry.engine.base_model():
                    yield entry.engine
                return
            if adapter_key not in entry.adapters:
                if load is None:
                    raise ValueError(f"adapter {adapter_key} is not resident and no loader was given")
                entry.adapters[adapter_key] = self._load(entry.engine, adapter_key, load())
            entry.adapters.move_to_end(adapter_key)
            entry.engine.model.set_adapter(entry.adapters[adapter_key], inference_mode=True)
            while len(entry.adapters) > self.capacity:  # the adapter just used is last: never evicted
                _, name = entry.adapters.popitem(last=False)
                entry.engine.model.delete_adapter(name)
            yield entry.engine

    def _entry(self, base: str) -> _Base:
        with self._lock:
            if base not in self._bases:
                self._bases[base] = _Base(Engine(*load_model(base)))
            return self._bases[base]

    @staticmethod
    def _load(engine: Engine, key: str, files: dict[str, bytes]) -> str:
        """Add the adapter in `files` to the engine's model from memory; returns its PEFT adapter name."""
        from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
        from safetensors.torch import load as load_safetensors

        missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if name not in files]
        if missing:
            raise ValueError(f"adapter {key}: files {missing} are missing")
        settings = json.loads(files["adapter_config.json"])
        settings.pop("runtime_config", None)
        if settings.get("peft_type") != "LORA":
            raise ValueError(f"adapter {key} is {settings.get('peft_type')}; the pool serves LoRA adapters only")
        config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**settings))
        config.inference_mode = True
        weights = load_safetensors(files["adapter_model.safetensors"])  # safetensors from bytes: no pickle, no file
        # ':' and '/' of a model id cannot name a module; the hash keeps sanitised names apart
        name = f"{re.sub(r'[^0-9A-Za-z_]', '_', key)[:48]}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        first = not isinstance(engine.model, PeftModel)
        model = get_peft_model(engine.model, config, adapter_name=name) if first else engine.model
        if not first:
            model.add_adapter(name, config)
        try:
            result = set_peft_model_state_dict(model, weights, adapter_name=name)
            absent = [k for k in result.missing_keys if f".{name}." in k]
            if result.unexpected_keys or absent:
                raise ValueError(f"adapter {key} does not fit this base model: unexpected weights "
                                 f"{result.unexpected_keys[:3]}, missing {absent[:3]}")
        except Exception:  # leave the model as it was
            if first:
                model.unload()
            else:
                model.delete_adapter(name)
            raise
        fuse_lora_layers(model)
        engine.model, engine.has_adapter = model.eval(), True
        return name


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(stop) for stop in stops if stop in text]
    return min(found) if found else None


def _sendable(text: str, stops: list[str]) -> int:
    """How much of `text` may be sent: all but a tail that could be the start of a stop string."""
    for start in range(max(0, len(text) - max(map(len, stops), default=0) + 1), len(text)):
        if any(stop.startswith(text[start:]) for stop in stops):
            return start
    return len(text)


@dataclass
class _Outcome:
    finish_reason: str | None = None
    completion_tokens: int = 0


def _reply(engine: Engine, prompt: list[int], sampling: Sampling, stops: list[str], outcome: _Outcome) -> Iterator[str]:
    """One reply's text as it is generated, cut before the first stop string; `outcome` is filled at the end.

    Generation runs in a thread feeding a streamer; closing this iterator early stops it at the next token.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled, generated, failed = threading.Event(), [], []

    def finished(input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        reply = engine.tokenizer.decode(input_ids[0, len(prompt):], skip_special_tokens=True) if stops else ""
        done = cancelled.is_set() or _first_stop(reply, stops) is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def work() -> None:
        try:
            generated.append(engine.generate_ids(prompt, sampling, streamer=streamer,
                                                 stopping_criteria=StoppingCriteriaList([finished])))
        except Exception as error:  # noqa: BLE001 - re-raised by the consumer; end() unblocks it
            failed.append(error)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    text, sent = "", 0
    try:
        for piece in streamer:
            text += piece
            cut = _first_stop(text, stops)
            if cut is not None:
                text, outcome.finish_reason = text[:cut], "stop"
                break
            end = _sendable(text, stops)
            if end > sent:
                yield text[sent:end]
                sent = end
    finally:  # done, cut at a stop string, or closed by the client: end the generation before the lock goes
        cancelled.set()
        worker.join()
    if failed:
        raise failed[0]
    if text[sent:]:
        yield text[sent:]
    outcome.completion_tokens = len(generated[0])
    if outcome.finish_reason is None:
        outcome.finish_reason = "stop" if generated[0] and generated[0][-1] in engine.stop_ids() else "length"


def _events(pool: AdapterPool, base: str, adapter_key: str | None, load: AdapterFiles | None, prompt: list[int],
            options: Options, sampling: Sampling) -> Iterator[tuple[int, str, _Outcome | None]]:
    """For each of the n replies in turn: (index, "", None) once the model is ready, (index, text, None) pieces,
    then (index, "", outcome). The pool's lock on `base` is held until this iterator ends or is closed."""
    with pool.using(base, adapter_key, load) as engine:
        if options.seed is not None:
            torch.manual_seed(options.seed)
        for index in range(options.n):
            yield index, "", None
            outcome = _Outcome()
            with closing(_reply(engine, prompt, sampling, options.stop, outcome)) as pieces:
                for piece in pieces:
                    yield index, piece, None
            yield index, "", outcome


def _start(pool: AdapterPool, base: str, adapter_key: str | None, loader: AdapterFiles | None, request: dict,
           chat: bool) -> tuple[list[int], Options, Iterator[tuple[int, str, _Outcome | None]]]:
    """The prompt's tokens, the checked options and the (not yet started) events: RequestError comes now,
    before any lock is taken or token generated."""
    text_or_messages = parse_messages(request) if chat else parse_prompt(request)
    options = Options.parse(request, base)
    engine = pool.engine(base)
    if chat and engine.tokenizer.chat_template is None:
        raise RequestError(f"model {options.model} has no chat template; fix: use the completions endpoint", "model")
    check_prompt_bytes(engine, text_or_messages, "messages" if chat else "prompt")
    if chat:
        prompt = engine.chat.prompt_ids(text_or_messages)
        sampling = options.sampling(engine, prompt, DEFAULT_CHAT_MAX_TOKENS, "messages")
    else:  # raw text, with the BOS a base model expects
        prompt = engine.tokenizer(text_or_messages)["input_ids"]
        sampling = options.sampling(engine, prompt, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
    return prompt, options, _events(pool, base, adapter_key, loader, prompt, options, sampling)


def _head(prefix: str, kind: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def _usage(prompt: list[int], outcomes: list[_Outcome]) -> dict:
    completion = sum(outcome.completion_tokens for outcome in outcomes)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


Choice = Callable[[int, str, _Outcome | None], dict | None]  # (index, text, outcome) -> a choice, or nothing


def _whole(events: Iterator[tuple[int, str, _Outcome | None]], head: dict, prompt: list[int], choice: Choice) -> dict:
    texts: dict[int, str] = {}
    outcomes: dict[int, _Outcome] = {}
    for index, text, outcome in events:
        texts[index] = texts.get(index, "") + text
        if outcome is not None:
            outcomes[index] = outcome
    return {**head, "choices": [choice(index, texts[index], outcomes[index]) for index in sorted(outcomes)],
            "usage": _usage(prompt, list(outcomes.values()))}


def _chunks(events: Iterator[tuple[int, str, _Outcome | None]], head: dict, prompt: list[int], choice: Choice,
            include_usage: bool) -> Iterator[dict]:
    outcomes = []
    with closing(events):  # a client that leaves early closes this, which ends the generation and frees the lock
        for index, text, outcome in events:
            outcomes += [outcome] if outcome is not None else []
            if (shaped := choice(index, text, outcome)) is not None:
                yield {**head, "choices": [shaped]}
    if include_usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
        yield {**head, "choices": [], "usage": _usage(prompt, outcomes)}


def _chat_message(index: int, text: str, outcome: _Outcome) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": outcome.finish_reason}


def _chat_delta(index: int, text: str, outcome: _Outcome | None) -> dict:
    delta = {} if outcome else {"content": text} if text else {"role": "assistant", "content": ""}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": outcome and outcome.finish_reason}


def _text(index: int, text: str, outcome: _Outcome | None) -> dict | None:
    if not text and outcome is None:
        return None
    return {"text": text, "index": index, "logprobs": None, "finish_reason": outcome and outcome.finish_reason}


def chat_completion(pool: AdapterPool, base: str, adapter_key: str | None, loader: AdapterFiles | None,
                    request: dict) -> dict:
    """A `chat.completion` for `request`, through `adapter_key`'s adapter on `base` (None: the base model)."""
    prompt, options, events = _start(pool, base, adapter_key, loader, request, chat=True)
    return _whole(events, _head("chatcmpl", "chat.completion", options.model), prompt, _chat_message)


def chat_completion_chunks(pool: AdapterPool, base: str, adapter_key: str | None, loader: AdapterFiles | None,
                           request: dict) -> Iterator[dict]:
    """`chat.completion.chunk`s as the reply is generated: the role, content pieces, then the finish reason.
    The request is checked now; the model is locked from the first chunk until the iterator ends or is closed."""
    prompt, options, events = _start(pool, base, adapter_key, loader, request, chat=True)
    head = _head("chatcmpl", "chat.completion.chunk", options.model)
    return _chunks(events, head, prompt, _chat_delta, options.include_usage)


def completion(pool: AdapterPool, base: str, adapter_key: str | None, loader: AdapterFiles | None,
               request: dict) -> dict:
    """A legacy `text_completion`: the prompt continued as raw text, no chat template."""
    prompt, options, events = _start(pool, base, adapter_key, loader, request, chat=False)
    return _whole(events, _head("cmpl", "text_completion", options.model), prompt, _text)


def completion_chunks(pool: AdapterPool, base: str, adapter_key: str | None, loader: AdapterFiles | None,
                      request: dict) -> Iterator[dict]:
    """Streamed `text_completion`s (each shaped as the whole one), checked and locked as `chat_completion_chunks`."""
    prompt, options, events = _start(pool, base, adapter_key, loader, request, chat=False)
    return _chunks(events, _head("cmpl", "text_completion", options.model), prompt, _text, options.include_usage)
