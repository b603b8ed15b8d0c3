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

from tunesmith.errors import UserError
from tunesmith.models import load_model
from tunesmith.models.fused_lora import fuse_lora_layers
from tunesmith.serve.engine import Engine, Sampling

AdapterFiles = Callable[[], dict[str, bytes]]  # {"adapter_config.json": ..., "adapter_model.safetensors": ...}
ROLES = ("system", "user", "assistant")
MAX_TOKENS = 4096  # cap on max_tokens per reply
MAX_CHOICES = 8  # cap on n
MAX_STOP_STRINGS = 4  # as OpenAI
DEFAULT_CHAT_MAX_TOKENS = 512
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint
# More UTF-8 bytes than any token of a real vocabulary spells (they run to a few dozen): text longer than
# context * this cannot fit, and is refused before the tokenizer spends time and memory on it.
MAX_BYTES_PER_TOKEN = 32


class RequestError(UserError):
    """A request OpenAI's API would refuse with HTTP 400; `body()` is its error object."""

    def __init__(self, message: str, param: str | None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


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


@dataclass
class Options:
    """The generation settings of one request, validated."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    include_usage: bool

    @classmethod
    def parse(cls, request: dict, model: str) -> Options:
        key = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
        stop = request.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
            raise RequestError(f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them; "
                               f"got {request.get('stop')!r}", "stop")
        return cls(model=str(request.get("model") or model), max_tokens=_number(request, key, None, 1, MAX_TOKENS, int),
                   temperature=_number(request, "temperature", 1.0, 0, 2), top_p=_number(request, "top_p", 1.0, 0, 1),
                   n=_number(request, "n", 1, 1, MAX_CHOICES, int), stop=stop,
                   seed=_number(request, "seed", None, -(1 << 63), (1 << 64) - 1, int),
                   include_usage=bool((request.get("stream_options") or {}).get("include_usage")))

    def sampling(self, engine: Engine, prompt: list[int], default_max_tokens: int, param: str) -> Sampling:
        """Sampling for a prompt of this length, within the model's context window."""
        context = context_length(engine)
        wanted = self.max_tokens or min(default_max_tokens, context - len(prompt))
        if not prompt or wanted < 1 or len(prompt) + wanted > context:
            raise RequestError(f"this model's context holds {context} tokens; the prompt has {len(prompt)} and the "
                               f"reply may take {wanted}; fix: shorten the {param} or lower max_tokens", param,
                               "context_length_exceeded")
        return Sampling(max_new_tokens=wanted, temperature=self.temperature, top_p=self.top_p)


def context_length(engine: Engine) -> int:
    return getattr(engine.model.config, "max_position_embeddings", None) or 1 << 30


def check_prompt_bytes(engine: Engine, text_or_messages: str | list[dict[str, str]], param: str) -> None:
    """Refuse a prompt whose text alone is too long for the context, before tokenizing: the tokenizer's time
    and memory grow with the text (24 MB took 21 s and 3 GB), and the count of tokens would only refuse it after."""
    texts = [text_or_messages] if isinstance(text_or_messages, str) else [m["content"] for m in text_or_messages]
    size, context = sum(len(text.encode("utf-8")) for text in texts), context_length(engine)
    if size > context * MAX_BYTES_PER_TOKEN:
        raise RequestError(f"this model's context holds {context} tokens; the {param} has {size} bytes of text, more "
                           f"than {context} tokens can spell ({MAX_BYTES_PER_TOKEN} bytes a token at most); fix: "
                           f"shorten the {param}", param, "context_length_exceeded")


def _number(request: dict, key: str, default: Any, low: float, high: float, kind: type = float) -> Any:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, kind)) or not low <= value <= high:
        raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'} from {low} to {high}; "
                           f"got {value!r}", key)
    return value


def _messages(request: dict) -> list[dict[str, str]]:
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RequestError(f"messages[{index}].role must be one of {', '.join(ROLES)}; got "
                               f"{message.get('role') if isinstance(message, dict) else message!r}", f"messages[{index}].role")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{index}].content must be a string", f"messages[{index}].content")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _prompt(request: dict) -> str:
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string (or a list of one)", "prompt")
    return prompt


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
    text_or_messages = _messages(request) if chat else _prompt(request)
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
