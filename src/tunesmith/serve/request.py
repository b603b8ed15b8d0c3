"""What a completions request asks for, checked the way OpenAI's API checks it: the messages or prompt and the
generation options. A request OpenAI would refuse raises `RequestError` (HTTP 400, OpenAI's error object)
before any model is locked or token generated.

Every parameter of the official SDK's `chat.completions.create` and `completions.create` is in
`CHAT_PARAMETERS` / `COMPLETION_PARAMETERS`: parsed and honoured (`SUPPORTED`, read by `Options.parse`), a
faithful no-op, or refused with a 400 that names it and the fix. A key in neither table is refused as
OpenAI refuses it ("Unrecognized request argument supplied"): nothing a client asks for is silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunesmith.engine.generation import Engine, Sampling
from tunesmith.errors import UserError

ROLES = ("system", "developer", "user", "assistant")
TEMPLATE_ROLE = {"developer": "system"}  # OpenAI's newer name for the system message; templates know "system"
MESSAGE_KEYS = ("role", "content", "name")  # `name` is accepted and not shown: chat templates have no place for it
MAX_TOKENS = 4096  # cap on max_tokens per reply
MAX_CHOICES = 8  # cap on n
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_CHAT_TOP_LOGPROBS = 20  # as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # as OpenAI's legacy endpoint
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
        return {
            "error": {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}
        }


# What each SDK parameter is to this service. A check gets the (non-null) value and raises RequestError to refuse it.
Check = Callable[[str, Any], None]


def SUPPORTED(key: str, value: Any) -> None:
    """Parsed and honoured by `Options.parse`, `parse_messages` or `parse_prompt`."""


def NO_OP(key: str, value: Any) -> None:
    """Accepted and without effect, faithfully: OpenAI's own meaning changes no reply (`user`, `metadata`)."""


def refused(fix: str) -> Check:
    def check(key: str, value: Any) -> None:
        raise RequestError(f"'{key}' is not supported by this service; fix: {fix}", key, "unsupported_parameter")

    return check


def only(allowed: tuple, fix: str) -> Check:
    """Accepted when the value is one of `allowed` (what needs no feature the service lacks), else refused."""

    def check(key: str, value: Any) -> None:
        if value not in allowed and not (isinstance(value, (list, dict)) and not value and () in allowed):
            raise RequestError(
                f"'{key}'={value!r} is not supported by this service; fix: {fix}", key, "unsupported_parameter"
            )

    return check


def _response_format(key: str, value: Any) -> None:
    if not (isinstance(value, dict) and value.get("type") == "text"):
        kind = value.get("type") if isinstance(value, dict) else value
        raise RequestError(
            f"'response_format' of type {kind!r} is not supported: replies are free text; fix: leave "
            f'response_format out (or {{"type": "text"}}) and ask for JSON in the prompt',
            key,
            "unsupported_parameter",
        )


NO_TOOLS = "this service does not call tools or functions; fix: leave it out and describe the task in the messages"
NO_PENALTY = (
    "frequency and presence penalties are not applied by this service; fix: leave it out or send 0 "
    "(a higher temperature also varies the reply)"
)
COMMON_PARAMETERS: dict[str, Check] = {
    "model": SUPPORTED,
    "max_tokens": SUPPORTED,
    "temperature": SUPPORTED,
    "top_p": SUPPORTED,
    "n": SUPPORTED,
    "stop": SUPPORTED,
    "seed": SUPPORTED,
    "stream": SUPPORTED,
    "stream_options": SUPPORTED,
    "logprobs": SUPPORTED,
    "user": NO_OP,
    "frequency_penalty": only((0, 0.0), NO_PENALTY),
    "presence_penalty": only((0, 0.0), NO_PENALTY),
    "logit_bias": only(((),), "token biases are not applied by this service; fix: leave logit_bias out"),
}
CHAT_PARAMETERS: dict[str, Check] = {
    **COMMON_PARAMETERS,
    "messages": SUPPORTED,
    "max_completion_tokens": SUPPORTED,
    "top_logprobs": SUPPORTED,
    "metadata": NO_OP,
    "safety_identifier": NO_OP,
    "prompt_cache_key": NO_OP,
    "prompt_cache_retention": NO_OP,
    "prompt_cache_options": NO_OP,  # cache hints: this service keeps no prompt cache between requests
    "store": only((False,), "this service does not store completions; fix: leave store out or send false"),
    "service_tier": only(("auto", "default"), "this service has one tier; fix: leave service_tier out or send 'auto'"),
    "response_format": _response_format,
    "tools": only(((),), NO_TOOLS),
    "functions": only(((),), NO_TOOLS),
    "tool_choice": only(("none",), NO_TOOLS),
    "function_call": only(("none",), NO_TOOLS),
    "parallel_tool_calls": refused(NO_TOOLS),
    "audio": refused("replies are text only; leave audio out"),
    "modalities": only((["text"],), 'replies are text only; leave modalities out or send ["text"]'),
    "prediction": refused("predicted outputs are not used by this service; leave prediction out"),
    "web_search_options": refused("this service does not search the web; leave web_search_options out"),
    "reasoning_effort": refused("the served models are not reasoning models; leave reasoning_effort out"),
    "verbosity": refused("the served models have no verbosity setting; leave verbosity out and ask in the prompt"),
    "moderation": refused("this service does not moderate replies; leave moderation out"),
}
COMPLETION_PARAMETERS: dict[str, Check] = {
    **COMMON_PARAMETERS,
    "prompt": SUPPORTED,
    "echo": SUPPORTED,
    "best_of": SUPPORTED,  # best_of: see Options.parse
    "suffix": only(("",), "text insertion is not supported by this service; leave suffix out"),
}


def check_parameters(request: dict, table: dict[str, Check]) -> None:
    """Each key of the request is supported, a faithful no-op, or refused by name; unknown keys are refused."""
    for key, value in request.items():
        if key not in table:
            raise RequestError(
                f"Unrecognized request argument supplied: {key}; fix: remove it (docs/service.md, "
                f'"OpenAI SDK compatibility", lists the parameters)',
                key,
                "unknown_parameter",
            )
        if value is not None:
            table[key](key, value)


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
    logprobs: bool | int | None = None  # chat: bool (False when absent); completions: 0..5, or None for none
    top_logprobs: int | None = None  # chat only: 0..20 alternatives per token, with logprobs true
    echo: bool = False  # completions only: the prompt's tokens (and, with logprobs, their scores) lead the text

    @classmethod
    def parse(cls, request: dict, model: str, chat: bool | None = None) -> Options:
        """`chat`: the endpoint (None: chat when the request has messages)."""
        chat = "messages" in request if chat is None else chat
        echo = _flag(request, "echo") if not chat else False
        key = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
        stop = request.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)
        ):
            raise RequestError(
                f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them; "
                f"got {request.get('stop')!r}",
                "stop",
            )
        n = _number(request, "n", 1, 1, MAX_CHOICES, int)
        if not chat and request.get("best_of") not in (None, 1, n):  # best_of == n returns all n: the same as n
            raise RequestError(
                f"'best_of'={request['best_of']!r} is not supported: this service returns every "
                f"choice it generates; fix: leave best_of out, or set it equal to n",
                "best_of",
                "unsupported_parameter",
            )
        if chat:
            logprobs = _flag(request, "logprobs")
            top = _number(request, "top_logprobs", None, 0, MAX_CHAT_TOP_LOGPROBS, int)
            if top is not None and not logprobs:
                raise RequestError("'top_logprobs' needs 'logprobs': true; fix: send both", "top_logprobs")
        else:
            logprobs, top = _number(request, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS, int), None
        return cls(
            model=str(request.get("model") or model),
            max_tokens=_number(request, key, None, 0 if echo else 1, MAX_TOKENS, int),
            temperature=_number(request, "temperature", 1.0, 0, 2),
            top_p=_number(request, "top_p", 1.0, 0, 1),
            n=n,
            stop=stop,
            seed=_number(request, "seed", None, -(1 << 63), (1 << 64) - 1, int),
            include_usage=_include_usage(request),
            logprobs=logprobs,
            top_logprobs=top,
            echo=echo,
        )

    def sampling(self, engine: Engine, prompt: list[int], default_max_tokens: int, param: str) -> Sampling:
        """Sampling for a prompt of this length, within the model's context window. With `echo`, max_tokens 0
        is allowed: the reply is the prompt alone (scored, with logprobs), and nothing is generated."""
        context = context_length(engine)
        wanted = self.max_tokens if self.max_tokens is not None else min(default_max_tokens, context - len(prompt))
        if not prompt or wanted < (0 if self.echo else 1) or len(prompt) + wanted > context:
            raise RequestError(
                f"this model's context holds {context} tokens; the prompt has {len(prompt)} and the "
                f"reply may take {wanted}; fix: shorten the {param} or lower max_tokens",
                param,
                "context_length_exceeded",
            )
        return Sampling(max_new_tokens=wanted, temperature=self.temperature, top_p=self.top_p)


def context_length(engine: Engine) -> int:
    return getattr(engine.model.config, "max_position_embeddings", None) or 1 << 30


def check_prompt_bytes(engine: Engine, prompt: str | list[int] | list[dict[str, str]], param: str) -> None:
    """Refuse a prompt whose text alone is too long for the context, before tokenizing: the tokenizer's time
    and memory grow with the text (24 MB took 21 s and 3 GB), and the count of tokens would only refuse it after.
    A prompt of token ids is already counted: `Options.sampling` checks its length."""
    if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
        return
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    size, context = sum(len(text.encode("utf-8")) for text in texts), context_length(engine)
    if size > context * MAX_BYTES_PER_TOKEN:
        raise RequestError(
            f"this model's context holds {context} tokens; the {param} has {size} bytes of text, more "
            f"than {context} tokens can spell ({MAX_BYTES_PER_TOKEN} bytes a token at most); fix: "
            f"shorten the {param}",
            param,
            "context_length_exceeded",
        )


def _number(request: dict, key: str, default: Any, low: float, high: float, kind: type = float) -> Any:
    value = request.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, kind)) or not low <= value <= high:
        raise RequestError(
            f"'{key}' must be {'an integer' if kind is int else 'a number'} from {low} to {high}; got {value!r}", key
        )
    return value


def _flag(request: dict, key: str) -> bool:
    value = request.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"'{key}' must be true or false; got {value!r}", key)
    return bool(value)


def _include_usage(request: dict) -> bool:
    options = request.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise RequestError(
            f"'stream_options' takes include_usage (and include_obfuscation, which a local service "
            f"does not need); got {options!r}",
            "stream_options",
        )
    return bool(options.get("include_usage"))


def parse_messages(request: dict) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: {role, content} with content a string; `developer` is
    `system`, a list of text parts is their texts joined by newlines. The request's other keys are checked too."""
    check_parameters(request, CHAT_PARAMETERS)
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    return [_message(index, message) for index, message in enumerate(messages)]


def _message(index: int, message: Any) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        role = message.get("role") if isinstance(message, dict) else message
        fix = f"; {NO_TOOLS}" if role in ("tool", "function") else ""
        raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}{fix}", f"{where}.role")
    for key in message:
        if key not in MESSAGE_KEYS:
            fix = (
                NO_TOOLS if key in ("tool_calls", "function_call", "tool_call_id") else f"remove {key} from the message"
            )
            raise RequestError(
                f"{where}.{key} is not supported by this service; fix: {fix}", f"{where}.{key}", "unsupported_parameter"
            )
    if message.get("name") is not None and not isinstance(message["name"], str):
        raise RequestError(f"{where}.name must be a string", f"{where}.name")
    return {
        "role": TEMPLATE_ROLE.get(message["role"], message["role"]),
        "content": _content(where, message.get("content")),
    }


def _content(where: str, content: Any) -> str:
    """A string, or a list of {"type": "text", "text"} parts (joined by newlines, as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise RequestError(f"{where}.content must be a string or a non-empty list of text parts", f"{where}.content")
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(
                f"{where}.content[{number}] is a part of type {kind!r}: this service reads text parts "
                f'only ({{"type": "text", "text": ...}}); fix: send the text alone',
                f"{where}.content[{number}]",
                "unsupported_content_part",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def parse_prompt(request: dict) -> str | list[int]:
    """One prompt: a string, or token ids (a list of ints, as lm-evaluation-harness sends), each possibly wrapped
    in a list of one. Several prompts (a batch) are refused: one request per prompt. The request's other keys
    are checked too."""
    check_parameters(request, COMPLETION_PARAMETERS)
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(item, (str, list)) for item in prompt):
        raise RequestError(
            f"'prompt' holds {len(prompt)} prompts; this service answers one prompt per request; fix: "
            f"send one request per prompt",
            "prompt",
            "unsupported_parameter",
        )
    if isinstance(prompt, list) and prompt and all(type(token) is int for token in prompt):
        return prompt
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(
            "'prompt' must be a non-empty string or a non-empty list of token ids (or a list of one of them)", "prompt"
        )
    return prompt


def prompt_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
    """The prompt's tokens: text is tokenised with the BOS a base model expects; token ids are checked against
    the vocabulary."""
    if isinstance(prompt, str):
        return engine.tokenizer(prompt)["input_ids"]
    vocabulary = max(len(engine.tokenizer), getattr(engine.model.config, "vocab_size", 0) or 0)
    wrong = [token for token in prompt if not 0 <= token < vocabulary]
    if wrong:
        raise RequestError(
            f"'prompt' holds token ids outside this model's vocabulary of {vocabulary}: {wrong[:5]}; "
            f"fix: tokenize with this model's tokenizer",
            "prompt",
            "invalid_token_id",
        )
    return list(prompt)
