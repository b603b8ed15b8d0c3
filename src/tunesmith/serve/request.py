"""What a completions request asks for, checked the way OpenAI's API checks it: the messages or prompt and the
generation options. A request OpenAI would refuse raises `RequestError` (HTTP 400, OpenAI's error object)
before any model is locked or token generated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.errors import UserError
from tunesmith.serve.engine import Engine, Sampling

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


def parse_messages(request: dict) -> list[dict[str, str]]:
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


def parse_prompt(request: dict) -> str:
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("'prompt' must be a non-empty string (or a list of one)", "prompt")
    return prompt
