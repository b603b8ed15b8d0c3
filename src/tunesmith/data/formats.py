"""Source formats → the one internal unit, an `Example` holding a list of messages.

Each format is a small registered function that turns one JSON object into an Example or raises
`RowError` with a message a user can act on. `detect_format` picks one from a row's keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith.registry import formats

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RowError(ValueError):
    """One row is unusable; the message says why and how to fix it."""


@dataclass
class Example:
    """One training example. `kind` is chat (messages with assistant turns), text (one raw document),
    or preference (messages end in the chosen reply; `rejected` is the same prompt with the rejected one)."""

    messages: list[dict[str, str]]
    kind: str
    line: int = 0
    rejected: list[dict[str, str]] | None = None
    score: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        assert self.kind == "text", "only text examples have raw text"
        return self.messages[0]["content"]


@dataclass(frozen=True)
class Format:
    name: str
    keys: tuple[str, ...]  # keys whose presence identifies the format (auto detection)
    kind: str  # chat | text | preference | score
    convert: Callable[[dict[str, Any]], Example]


def register_format(name: str, keys: tuple[str, ...], kind: str):
    def add(convert: Callable[[dict[str, Any]], Example]) -> Callable[[dict[str, Any]], Example]:
        formats.register(name)(Format(name, keys, kind, convert))
        return convert

    return add


def text_field(row: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    """Row[key] as a string: a missing, mistyped or (unless allowed) empty field is a RowError."""
    if key not in row:
        raise RowError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {type(value).__name__} {_short(value)}")
    if not allow_empty and not value.strip():
        raise RowError(f"field '{key}' is empty")
    return value


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_messages(messages: Any, key: str = "messages") -> list[dict[str, str]]:
    """Validate an OpenAI-style message list; every problem names the turn."""
    if not isinstance(messages, list):
        raise RowError(f"field '{key}' must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise RowError(f"field '{key}' is an empty list")
    clean = []
    for index, message in enumerate(messages):
        where = f"{key}[{index}]"
        if not isinstance(message, dict):
            raise RowError(f"{where} must be an object with role and content, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RowError(f"{where}.role {_short(role)} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise RowError(f"{where}.content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise RowError(f"{where} is an assistant turn with empty content")
        clean.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in clean):
        raise RowError(f"field '{key}' has no assistant turn, so there is nothing to learn from")
    return clean


@register_format("messages", keys=("messages",), kind="chat")
def convert_messages(row: dict[str, Any]) -> Example:
    if "messages" not in row:
        raise RowError("missing field 'messages'")
    return Example(check_messages(row["messages"]), "chat")


@register_format("sharegpt", keys=("conversations",), kind="chat")
def convert_sharegpt(row: dict[str, Any]) -> Example:
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise RowError("field 'conversations' must be a list of {from, value} objects")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"conversations[{index}] must be an object with from and value")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"conversations[{index}].from {_short(speaker)} is not one of {', '.join(SHAREGPT_ROLES)}")
        value = turn.get("value")
        if not isinstance(value, str):  # checked here so the message names sharegpt's key, not "content"
            raise RowError(f"conversations[{index}].value must be a string, got {type(value).__name__}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return Example(check_messages(messages, "conversations"), "chat")


@register_format("alpaca", keys=("instruction", "output"), kind="chat")
def convert_alpaca(row: dict[str, Any]) -> Example:
    instruction = text_field(row, "instruction")
    extra = text_field(row, "input", allow_empty=True) if "input" in row else ""
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": text_field(row, "output")}], "chat")


@register_format("prompt_completion", keys=("prompt", "completion"), kind="chat")
def convert_prompt_completion(row: dict[str, Any]) -> Example:
    return Example(
        [{"role": "user", "content": text_field(row, "prompt")}, {"role": "assistant", "content": text_field(row, "completion")}],
        "chat",
    )


@register_format("classification", keys=("text", "label"), kind="chat")
def convert_classification(row: dict[str, Any]) -> Example:
    label = row.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RowError(f"field 'label' must be a string or an integer, got {type(label).__name__} {_short(label)}")
    if not str(label).strip():
        raise RowError("field 'label' is empty")
    return Example(
        [{"role": "user", "content": text_field(row, "text")}, {"role": "assistant", "content": str(label)}],
        "chat",
        meta={"label": str(label)},
    )


@register_format("text", keys=("text",), kind="text")
def convert_text(row: dict[str, Any]) -> Example:
    return Example([{"role": "text", "content": text_field(row, "text")}], "text")


def _prompt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """A preference/score prompt: a string, or a message list ending before the reply."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in prompt]
        checked = check_messages(messages + [{"role": "assistant", "content": "-"}], "prompt")
        return checked[:-1]
    return [{"role": "user", "content": text_field(row, "prompt")}]


@register_format("preference", keys=("prompt", "chosen", "rejected"), kind="preference")
def convert_preference(row: dict[str, Any]) -> Example:
    prompt = _prompt_messages(row)
    chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    if chosen == rejected:
        raise RowError("fields 'chosen' and 'rejected' are identical, so the pair teaches nothing")
    return Example(
        prompt + [{"role": "assistant", "content": chosen}],
        "preference",
        rejected=prompt + [{"role": "assistant", "content": rejected}],
    )


@register_format("score", keys=("prompt", "response", "score"), kind="score")
def convert_score(row: dict[str, Any]) -> Example:
    score = row.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise RowError(f"field 'score' must be a finite number, got {type(score).__name__} {_short(score)}")
    return Example(_prompt_messages(row) + [{"role": "assistant", "content": text_field(row, "response")}], "score", score=float(score))


# Most specific first: a row with prompt+chosen+rejected must not be taken for prompt_completion.
DETECTION_ORDER = ("messages", "sharegpt", "preference", "score", "alpaca", "prompt_completion", "classification", "text")


def detect_format(row: dict[str, Any]) -> str | None:
    """The format whose identifying keys the row has, or None."""
    for name in DETECTION_ORDER:
        if all(key in row for key in formats.get(name).keys):
            return name
    return None
