"""Inference for the OpenAI-compatible service: base models with hot-swapped LoRA adapters, encrypted at rest.

`AdapterPool` keeps one model per base spec and up to `capacity` adapters resident on it as named PEFT
adapters, evicting the least recently used that no running batch needs. Adapters arrive as bytes (the caller
decrypts them) and are loaded from memory: no plaintext adapter file is ever written. Generation goes through
each base's `batching.Scheduler`: concurrent requests, whatever their adapters, are decoded together, in
arrival order. `using` gives the model to one caller between two decoding steps (prompt scoring).

`chat_completion`, `completion` and their `_chunks` variants turn an OpenAI request dict into the
response dicts of the official `openai` SDK's types; a bad request raises `RequestError` (HTTP 400).
Every request has a deadline (`request_timeout` seconds from its arrival): a reply still being generated
then ends as if it had reached max_tokens (finish_reason "length"), streamed or not.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

from tunesmith.engine.generation import Engine, Sampling
from tunesmith.models import load_model
from tunesmith.models.fused_lora import fuse_lora_layers
from tunesmith.models.precision import for_inference
from tunesmith.serve.batching import DEFAULT_MAX_BATCH, Row, Scheduler, Token
from tunesmith.serve.request import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    Options,
    RequestError,
    check_prompt_bytes,
    parse_messages,
    parse_prompt,
    prompt_ids,
)
from tunesmith.serve.scoring import completion_logprobs, score_prompt

AdapterFiles = Callable[[], dict[str, bytes]]  # {"adapter_config.json": ..., "adapter_model.safetensors": ...}
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds a request may take, queueing included


@dataclass
class _Base:
    engine: Engine
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: OrderedDict[str, str] = field(default_factory=OrderedDict)  # key -> PEFT name, least recent first
    pinned: Counter[str] = field(default_factory=Counter)  # adapters a running batch decodes with: never evicted
    scheduler: Scheduler | None = None


class AdapterPool:
    def __init__(
        self, capacity: int = 4, max_batch: int = DEFAULT_MAX_BATCH, request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    ):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: at least one adapter must fit")
        if request_timeout <= 0:
            raise ValueError(f"request_timeout={request_timeout}: a request needs some time")
        self.capacity, self.max_batch, self.request_timeout = capacity, max_batch, request_timeout
        self._bases: dict[str, _Base] = {}
        self._lock = threading.Lock()  # guards _bases; held while a base loads (rare: once per spec)

    def close(self, grace: float) -> None:
        """The server is stopping: every reply being generated or queued ends within `grace` seconds, as if it had
        reached max_tokens (finish_reason "length"), so in-flight requests get their answer and the server exits."""
        with self._lock:
            for entry in self._bases.values():
                entry.scheduler.close(grace)

    def engine(self, base: str) -> Engine:
        """The engine of `base`, loaded on first use. Outside `using` only its tokenizer and config may be read."""
        return self._entry(base).engine

    def resident(self, base: str) -> list[str]:
        """Keys of the adapters resident on `base`, least recently used first."""
        entry = self._bases.get(base)
        return list(entry.adapters) if entry else []  # list() of a dict holds the GIL: no need to wait on the lock

    def scheduler(self, base: str) -> Scheduler:
        """The generation loop of `base` (its model loaded on first use)."""
        return self._entry(base).scheduler

    @contextmanager
    def using(self, base: str, adapter_key: str | None = None, load: AdapterFiles | None = None) -> Iterator[Engine]:
        """`base`'s engine with `adapter_key`'s adapter active (None: the base model), held exclusively."""
        entry = self._entry(base)
        with entry.lock:
            if adapter_key is None:
                with entry.engine.base_model():
                    yield entry.engine
                return
            name = self._resident(entry, adapter_key, load)  # the first adapter wraps the model: name it first
            entry.engine.model.set_adapter(name, inference_mode=True)
            yield entry.engine

    def _resident(self, entry: _Base, key: str, load: AdapterFiles | None) -> str:
        """`key`'s adapter on the model (loaded now if absent), most recently used; under entry.lock. Adapters
        beyond capacity go, least recently used first, unless pinned by a running batch."""
        if key not in entry.adapters:
            if load is None:
                raise ValueError(f"adapter {key} is not resident and no loader was given")
            entry.adapters[key] = self._load(entry.engine, key, load())
        entry.adapters.move_to_end(key)
        spare = [other for other in entry.adapters if other != key and not entry.pinned[other]]
        while len(entry.adapters) > self.capacity and spare:
            entry.engine.model.delete_adapter(entry.adapters.pop(spare.pop(0)))
        return entry.adapters[key]

    def _entry(self, base: str) -> _Base:
        with self._lock:
            if base not in self._bases:
                model, tokenizer = load_model(base)
                entry = _Base(Engine(for_inference(model), tokenizer))

                def pin(key: str, load: AdapterFiles | None) -> str:
                    name = self._resident(entry, key, load)
                    entry.pinned[key] += 1
                    return name

                def unpin(key: str) -> None:
                    entry.pinned[key] -= 1

                entry.scheduler = Scheduler(entry.engine, entry.lock, pin, unpin, self.capacity, self.max_batch)
                self._bases[base] = entry
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
                raise ValueError(
                    f"adapter {key} does not fit this base model: unexpected weights "
                    f"{result.unexpected_keys[:3]}, missing {absent[:3]}"
                )
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


@dataclass
class _Event:
    """Of reply `index`: ready (nothing else set), a piece of text with the tokens it came from, or its end."""

    index: int
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    outcome: _Outcome | None = None


class _ReplyText:
    """One reply's text, decoded incrementally as its tokens arrive and cut before the first stop string. A piece
    goes out once it is whole UTF-8 and cannot be the start of a stop string; each carries the tokens it came
    from (end-of-turn tokens are counted, not shown)."""

    def __init__(self, tokenizer: Any, stops: list[str], stop_ids: list[int]):
        self.tokenizer, self.stops, self.stop_ids = tokenizer, stops, set(stop_ids)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded last time: context for the next decode
        self.text, self.sent, self.pending = "", 0, []
        self.stopped = False

    def add(self, token: Token) -> tuple[str, list[Token]] | None:
        self.ids.append(token.id)
        if token.id not in self.stop_ids:
            self.pending.append(token)
        self._decode(final=False)
        if self._stop():
            return None
        end = _sendable(self.text, self.stops)
        return self._take(end) if end > self.sent else None

    def _decode(self, final: bool) -> None:
        """Add the text of the tokens not yet decoded; a character split across tokens waits for its last token,
        unless the reply is over (then its bytes show as U+FFFD, as a plain decode of the reply shows them)."""
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before, after = decode(self.ids[self.prefix : self.read]), decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)

    def _stop(self) -> bool:
        """Whether the text holds a stop string; if so it ends before it."""
        cut = _first_stop(self.text, self.stops)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
        return self.stopped

    def rest(self) -> tuple[str, list[Token]]:
        """What is left to send once the reply has ended: the held-back tail and the tokens not yet sent."""
        if not self.stopped:
            self._decode(final=True)
            self._stop()
        return self._take(len(self.text))

    def _take(self, end: int) -> tuple[str, list[Token]]:
        piece, tokens = self.text[self.sent : end], self.pending
        self.sent, self.pending = end, []
        return piece, tokens


def _events(
    pool: AdapterPool,
    base: str,
    adapter_key: str | None,
    load: AdapterFiles | None,
    prompt: list[int],
    options: Options,
    sampling: Sampling,
    cancel: threading.Event | None,
) -> Iterator[_Event]:
    """The n replies, generated together: per reply (index) a ready event, its pieces, then its outcome; the
    replies' events interleave. Closing this iterator cancels the replies still being generated."""
    deadline = time.monotonic() + pool.request_timeout
    if sampling.max_new_tokens == 0:  # `echo` with max_tokens 0: the prompt alone, nothing generated
        for index in range(options.n):
            yield _Event(index)
            yield _Event(index, outcome=_Outcome("length", 0))
        return
    engine = pool.engine(base)
    rows = [
        Row(
            prompt,
            sampling,
            adapter_key,
            load,
            options.seed,
            _top_logprobs(options),
            deadline,
            index=index,
            abandoned=cancel,
        )
        for index in range(options.n)
    ]
    replies = [_ReplyText(engine.tokenizer, options.stop, engine.stop_ids()) for _ in rows]
    ticket = pool.scheduler(base).submit(rows)
    try:
        started = set()
        for index, event in ticket:
            reply = replies[index]
            if index not in started:
                started.add(index)
                yield _Event(index)
            if isinstance(event, Token):
                if reply.stopped:  # tokens generated after the stop string, before the row heard: not the reply's
                    continue
                piece = reply.add(event)
                if reply.stopped:
                    rows[index].cancel.set()
                if piece:
                    yield _Event(index, *piece)
                continue
            if event.error is not None:
                raise event.error
            if any(piece := reply.rest()):
                yield _Event(index, *piece)
            yield _Event(index, outcome=_Outcome("stop" if reply.stopped else event.reason, len(reply.ids)))
    finally:  # done, or closed by the client: the rows still running stop at their next step
        ticket.close()


def _top_logprobs(options: Options) -> int:
    """How many alternatives each generated token reports: chat's top_logprobs, the legacy endpoint's logprobs."""
    if isinstance(options.logprobs, bool):
        return int(options.top_logprobs or 0) if options.logprobs else 0
    return int(options.logprobs or 0)


def _start(
    pool: AdapterPool,
    base: str,
    adapter_key: str | None,
    loader: AdapterFiles | None,
    request: dict,
    chat: bool,
    cancel: threading.Event | None = None,
) -> tuple[list[int], Options, Iterator[_Event]]:
    """The prompt's tokens, the checked options and the (not yet started) events: RequestError comes now,
    before any token is generated."""
    text_or_messages = parse_messages(request) if chat else parse_prompt(request)
    options = Options.parse(request, base, chat=chat)
    engine = pool.engine(base)
    if chat and engine.tokenizer.chat_template is None:
        raise RequestError(f"model {options.model} has no chat template; fix: use the completions endpoint", "model")
    check_prompt_bytes(engine, text_or_messages, "messages" if chat else "prompt")
    if chat:
        prompt = engine.chat.prompt_ids(text_or_messages)
        sampling = options.sampling(engine, prompt, DEFAULT_CHAT_MAX_TOKENS, "messages")
    else:  # raw text, with the BOS a base model expects (or token ids as they were sent)
        prompt = prompt_ids(engine, text_or_messages)
        sampling = options.sampling(engine, prompt, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
    return prompt, options, _events(pool, base, adapter_key, loader, prompt, options, sampling, cancel)


def _head(prefix: str, kind: str, model: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def _usage(prompt: list[int], outcomes: list[_Outcome]) -> dict:
    completion = sum(outcome.completion_tokens for outcome in outcomes)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


Choice = Callable[[_Event, int], dict | None]  # (event, characters of its reply sent before it) -> a choice, or nothing


def _whole(events: Iterator[_Event], head: dict, prompt: list[int], choice: Choice) -> dict:
    replies: dict[int, _Event] = {}
    with closing(events):
        for event in events:
            reply = replies.setdefault(event.index, _Event(event.index))
            reply.text += event.text
            reply.tokens += event.tokens
            reply.outcome = event.outcome or reply.outcome
    return {
        **head,
        "choices": [choice(replies[index], 0) for index in sorted(replies)],
        "usage": _usage(prompt, [reply.outcome for reply in replies.values()]),
    }


def _chunks(
    events: Iterator[_Event], head: dict, prompt: list[int], choice: Choice, include_usage: bool
) -> Iterator[dict]:
    outcomes, sent = [], Counter()
    with closing(events):  # a client that leaves early closes this, which ends its rows' generation
        for event in events:
            outcomes += [event.outcome] if event.outcome is not None else []
            if (shaped := choice(event, sent[event.index])) is not None:
                yield {**head, "choices": [shaped]}
            sent[event.index] += len(event.text)
    if include_usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
        yield {**head, "choices": [], "usage": _usage(prompt, outcomes)}


def _token_logprob(tokenizer: Any, token: int, logprob: float, top: dict[int, float] | None = None) -> dict:
    """A chat `logprobs.content` entry (with `top` given) or one of its `top_logprobs`."""
    text = tokenizer.decode([token])
    entry = {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    if top is not None:
        entry["top_logprobs"] = [_token_logprob(tokenizer, other, value) for other, value in top.items()]
    return entry


def _chat_choices(tokenizer: Any, options: Options) -> tuple[Choice, Choice]:
    """The whole reply's choice and a stream chunk's, with `logprobs` when the request asked for them."""
    wanted = bool(options.logprobs)

    def logprobs(tokens: list[Token]) -> dict | None:
        if not wanted:
            return None
        return {"content": [_token_logprob(tokenizer, t.id, t.logprob, t.top) for t in tokens], "refusal": None}

    def message(event: _Event, sent: int) -> dict:
        return {
            "index": event.index,
            "message": {"role": "assistant", "content": event.text},
            "logprobs": logprobs(event.tokens),
            "finish_reason": event.outcome.finish_reason,
        }

    def delta(event: _Event, sent: int) -> dict:
        outcome, text = event.outcome, event.text
        shown = {} if outcome else {"content": text} if text else {"role": "assistant", "content": ""}
        return {
            "index": event.index,
            "delta": shown,
            "logprobs": logprobs(event.tokens) if event.tokens else None,
            "finish_reason": outcome and outcome.finish_reason,
        }

    return message, delta


def _text_choice(tokenizer: Any, options: Options) -> Choice:
    """A legacy completion choice (whole or streamed); `logprobs: k` gives OpenAI's legacy logprobs object."""
    wanted = None if isinstance(options.logprobs, bool) else options.logprobs

    def choice(event: _Event, sent: int) -> dict | None:
        if not event.text and not event.tokens and event.outcome is None:
            return None
        logprobs = None
        if wanted is not None:
            tokens = event.tokens
            logprobs = completion_logprobs(
                tokenizer, [t.id for t in tokens], [t.logprob for t in tokens], [t.top for t in tokens], sent
            )
        return {
            "text": event.text,
            "index": event.index,
            "logprobs": logprobs,
            "finish_reason": event.outcome and event.outcome.finish_reason,
        }

    return choice


def _echoed(
    events: Iterator[_Event],
    pool: AdapterPool,
    base: str,
    adapter_key: str | None,
    loader: AdapterFiles | None,
    prompt: list[int],
    options: Options,
) -> Iterator[_Event]:
    """The legacy endpoint's `echo`: each reply starts with the prompt (its tokens scored when logprobs are asked)."""
    with closing(events):
        if not options.echo:
            yield from events
            return
        scores = [(None, {})] * len(prompt)
        if options.logprobs is not None:
            scores = score_prompt(pool, base, adapter_key, loader, prompt, int(options.logprobs))
        echo = [Token(token, logprob, top) for token, (logprob, top) in zip(prompt, scores)]
        text = pool.engine(base).tokenizer.decode(prompt)
        for event in events:
            yield event
            if not event.text and not event.tokens and event.outcome is None:  # the reply is ready: the prompt first
                yield _Event(event.index, text, list(echo))


def chat_completion(
    pool: AdapterPool,
    base: str,
    adapter_key: str | None,
    loader: AdapterFiles | None,
    request: dict,
    cancel: threading.Event | None = None,
) -> dict:
    """A `chat.completion` for `request`, through `adapter_key`'s adapter on `base` (None: the base model).
    Setting `cancel` (its client has left) stops the generation at the next token."""
    prompt, options, events = _start(pool, base, adapter_key, loader, request, chat=True, cancel=cancel)
    message, _ = _chat_choices(pool.engine(base).tokenizer, options)
    return _whole(events, _head("chatcmpl", "chat.completion", options.model), prompt, message)


def chat_completion_chunks(
    pool: AdapterPool, base: str, adapter_key: str | None, loader: AdapterFiles | None, request: dict
) -> Iterator[dict]:
    """`chat.completion.chunk`s as the reply is generated: the role, content pieces, then the finish reason.
    The request is checked now; its generation starts with the first chunk and stops when the iterator is closed."""
    prompt, options, events = _start(pool, base, adapter_key, loader, request, chat=True)
    head = _head("chatcmpl", "chat.completion.chunk", options.model)
    _, delta = _chat_choices(pool.engine(base).tokenizer, options)
    return _chunks(events, head, prompt, delta, options.include_usage)


def completion(
    pool: AdapterPool,
    base: str,
    adapter_key: str | None,
    loader: AdapterFiles | None,
    request: dict,
    cancel: threading.Event | None = None,
) -> dict:
    """A legacy `text_completion`: the prompt continued as raw text, no chat template."""
    prompt, options, events = _start(pool, base, adapter_key, loader, request, chat=False, cancel=cancel)
    events = _echoed(events, pool, base, adapter_key, loader, prompt, options)
    choice = _text_choice(pool.engine(base).tokenizer, options)
    return _whole(events, _head("cmpl", "text_completion", options.model), prompt, choice)


def completion_chunks(
    pool: AdapterPool, base: str, adapter_key: str | None, loader: AdapterFiles | None, request: dict
) -> Iterator[dict]:
    """Streamed `text_completion`s (each shaped as the whole one), checked and started as `chat_completion_chunks`."""
    prompt, options, events = _start(pool, base, adapter_key, loader, request, chat=False)
    events = _echoed(events, pool, base, adapter_key, loader, prompt, options)
    choice = _text_choice(pool.engine(base).tokenizer, options)
    return _chunks(events, _head("cmpl", "text_completion", options.model), prompt, choice, options.include_usage)
