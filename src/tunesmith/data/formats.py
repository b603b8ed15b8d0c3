"""Source formats → the one internal unit, an `Example` holding a list of messages.

Each format is a small registered function that turns one row (a JSON object, or a CSV/TSV/Parquet record:
files.py reads them all) into an Example or raises `RowError` with a message a user can act on. Its
registration also holds its one-line description and example row, from which `--help-config` and the README's
table of formats are written. `detect_format` picks a format from a row's keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from tunesmith.registry import formats

ROLES = ("system", "user", "assistant")
# OpenAI's newer name for the system turn (its RFT and chat data use it): read as system, which is what a chat
# template renders; every other spelling is refused
MESSAGE_ROLES = {**{role: role for role in ROLES}, "developer": "system"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RowError(ValueError):
    """One row is unusable; the message says why and how to fix it."""


@dataclass
class Example:
    """One training example. `kind` is chat (messages with assistant turns), text (one raw document),
    preference (messages end in the chosen reply; `rejected` is the same prompt with the rejected one),
    chosen (a pair's prompt and chosen reply, only that reply trained: supervised tuning on pairs), score
    (messages end in a rated reply), or prompt (messages ending with the user's turn: what RL methods sample
    replies to)."""

    messages: list[dict[str, str]]
    kind: str
    line: int = 0
    rejected: list[dict[str, str]] | None = None
    score: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)  # the row's scalar fields (ids, categories), e.g. for slicing

    @property
    def text(self) -> str:
        assert self.kind == "text", "only text examples have raw text"
        return self.messages[0]["content"]


@dataclass(frozen=True)
class Format:
    name: str
    keys: tuple[str, ...]  # keys whose presence identifies the format (auto detection)
    kind: str  # chat | text | preference | score | prompt
    convert: Callable[[dict[str, Any]], Example]
    summary: str = ""  # what the format is for, one line
    example: dict[str, Any] = field(default_factory=dict)  # one valid row: the documentation's example, tested

    @property
    def example_line(self) -> str:
        return json.dumps(self.example, ensure_ascii=False)


def register_format(name: str, keys: tuple[str, ...], kind: str, summary: str, example: dict[str, Any]):
    def add(convert: Callable[[dict[str, Any]], Example]) -> Callable[[dict[str, Any]], Example]:
        formats.register(name)(Format(name, keys, kind, convert, summary, example))
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


REASONING_KEYS = ("reasoning", "reasoning_content")  # Together's field, and the one reasoning templates read


def reasoning_of(turn: dict[str, Any], where: str, role: str) -> dict[str, str]:
    """{"reasoning": text} for an assistant turn that carries its thoughts (`reasoning` or `reasoning_content`),
    else {}."""
    given = [key for key in REASONING_KEYS if turn.get(key) is not None]
    if not given:
        return {}
    if role != "assistant":
        raise RowError(f"{where}.{given[0]} is on a {role} turn; only assistant turns have reasoning")
    if len(given) > 1:
        raise RowError(f"{where} has both {' and '.join(given)}; fix: keep one of them")
    reasoning = turn[given[0]]
    if not isinstance(reasoning, str):
        raise RowError(f"{where}.{given[0]} must be a string, got {type(reasoning).__name__}")
    return {"reasoning": reasoning} if reasoning.strip() else {}


def check_messages(
    turns: Any,
    key: str = "messages",
    role_key: str = "role",
    content_key: str = "content",
    roles: dict[str, str] | None = None,
) -> list[dict[str, str]]:
    """Validate a list of turns and return it as {role, content} messages; every problem names the turn.

    The key names and the role spellings are parameters, so sharegpt's {from, value} with human/gpt is
    checked by the same code as OpenAI's {role, content}, with messages that use the user's own keys.
    """
    roles = roles or MESSAGE_ROLES
    if not isinstance(turns, list):
        raise RowError(
            f"field '{key}' must be a list of {{{role_key}, {content_key}}} objects, got {type(turns).__name__}"
        )
    if not turns:
        raise RowError(f"field '{key}' is an empty list")
    clean = []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            raise RowError(f"{where} must be an object with {role_key} and {content_key}, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role not in roles:
            raise RowError(f"{where}.{role_key} {_short(role)} is not one of {', '.join(roles)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise RowError(f"{where}.{content_key} must be a string, got {type(content).__name__}")
        if roles[role] == "assistant" and not content.strip():
            raise RowError(f"{where} is an assistant turn with empty content")
        clean.append({"role": roles[role], "content": content, **reasoning_of(turn, where, roles[role])})
    if not any(message["role"] == "assistant" for message in clean):
        raise RowError(f"field '{key}' has no assistant turn, so there is nothing to learn from")
    return clean


@register_format(
    "messages",
    keys=("messages",),
    kind="chat",
    summary="a chat (OpenAI's format); every assistant turn is trained",
    example={
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello!"},
        ]
    },
)
def convert_messages(row: dict[str, Any]) -> Example:
    if "messages" not in row:
        raise RowError("missing field 'messages'")
    return Example(check_messages(row["messages"]), "chat")


@register_format(
    "sharegpt",
    keys=("conversations",),
    kind="chat",
    summary="a chat in ShareGPT's spelling (from: system/human/gpt)",
    example={"conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello!"}]},
)
def convert_sharegpt(row: dict[str, Any]) -> Example:
    return Example(check_messages(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES), "chat")


@register_format(
    "alpaca",
    keys=("instruction", "output"),
    kind="chat",
    summary="an instruction, an optional input, the output",
    example={"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
)
def convert_alpaca(row: dict[str, Any]) -> Example:
    instruction = text_field(row, "instruction")
    extra = text_field(row, "input", allow_empty=True) if "input" in row else ""
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Example(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": text_field(row, "output")}], "chat"
    )


@register_format(
    "prompt_completion",
    keys=("prompt", "completion"),
    kind="chat",
    summary="a prompt and the completion to learn",
    example={"prompt": "2 + 2 =", "completion": "4"},
)
def convert_prompt_completion(row: dict[str, Any]) -> Example:
    return Example(
        [
            {"role": "user", "content": text_field(row, "prompt")},
            {"role": "assistant", "content": text_field(row, "completion")},
        ],
        "chat",
    )


@register_format(
    "classification",
    keys=("text", "label"),
    kind="chat",
    summary="a text and its label (trained as the reply; evaluated with accuracy, precision, recall, F1)",
    example={"text": "My card has not arrived.", "label": "card_arrival"},
)
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


@register_format(
    "qa",
    keys=("question", "answer"),
    kind="chat",
    summary="a question and its short answer; optional answers: every accepted answer, for exact-match scoring",
    example={"question": "What is the capital of France?", "answer": "Paris"},
)
def convert_qa(row: dict[str, Any]) -> Example:
    """Short-answer QA; `answers` (optional) lists every accepted answer, for exact-match scoring.

    The fields the user writes are checked first, so a row without its answer is told about `answer`."""
    question, answer = text_field(row, "question"), text_field(row, "answer")
    answers = row.get("answers", [answer])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise RowError(
            f"field 'answers' (optional) must be a list of strings, got {_short(answers)}; fix: "
            f"list every accepted answer, or leave the field out"
        )
    example = Example([{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "chat")
    example.meta["answers"] = answers
    return example


@register_format(
    "text",
    keys=("text",),
    kind="text",
    summary="raw text, every token trained (continued pre-training)",
    example={"text": "A document of the domain, as it is."},
)
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


def _reply(row: dict[str, Any], key: str) -> str:
    """A preference reply: a string, or a message list holding one assistant message (TRL, OpenAI)."""
    value = row.get(key)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role", "assistant") != "assistant":
            raise RowError(f"field '{key}' must be a string or a list of one assistant message, got {_short(value)}")
        value = value[0].get("content")
        if not isinstance(value, str) or not value.strip():
            raise RowError(f"field '{key}' has an empty or missing assistant content")
        return value
    return text_field(row, key)


def _pair(prompt: list[dict[str, str]], chosen: str, rejected: str) -> Example:
    if chosen == rejected:
        raise RowError("the chosen and rejected replies are identical, so the pair teaches nothing")
    return Example(
        prompt + [{"role": "assistant", "content": chosen}],
        "preference",
        rejected=prompt + [{"role": "assistant", "content": rejected}],
    )


@register_format(
    "preference",
    keys=("prompt", "chosen", "rejected"),
    kind="preference",
    summary="a prompt and two replies, the better one chosen (dpo, reward; sft learns the chosen one)",
    example={"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Go away."},
)
def convert_preference(row: dict[str, Any]) -> Example:
    return _pair(_prompt_messages(row), _reply(row, "chosen"), _reply(row, "rejected"))


def chosen_side(pair: Example) -> Example:
    """A pair as supervised data: its conversation up to and with the chosen reply, of which only that reply is
    trained (the earlier assistant turns of a pair's prompt were never rated, and may be the very harm it shows)."""
    return Example(pair.messages, "chosen", pair.line, meta=pair.meta, fields=pair.fields)


@register_format(
    "openai_preference",
    keys=("input", "preferred_output", "non_preferred_output"),
    kind="preference",
    summary="a preference pair in OpenAI's DPO fine-tuning format",
    example={
        "input": {"messages": [{"role": "user", "content": "Say hi."}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    },
)
def convert_openai_preference(row: dict[str, Any]) -> Example:
    """OpenAI's DPO fine-tuning rows: {"input": {"messages": [...]}, "preferred_output": [assistant message],
    "non_preferred_output": [assistant message]}."""
    source = row.get("input")
    if not isinstance(source, dict) or "messages" not in source:
        raise RowError(f"field 'input' must be an object with a 'messages' list, got {_short(source)}")
    prompt = check_messages(source["messages"] + [{"role": "assistant", "content": "-"}], "input.messages")[:-1]
    if prompt[-1]["role"] == "assistant":
        raise RowError(
            "input.messages ends with an assistant turn; the preferred and non-preferred outputs are the "
            "reply to it, so it should end with the user's message"
        )
    return _pair(prompt, _reply(row, "preferred_output"), _reply(row, "non_preferred_output"))


@register_format(
    "score",
    keys=("prompt", "response", "score"),
    kind="score",
    summary='a reply rated with a number (reward models; a numeric text such as "0.8" counts)',
    example={"prompt": "Say hi.", "response": "Hello!", "score": 0.8},
)
def convert_score(row: dict[str, Any]) -> Example:
    score = number_or_text(row.get("score"))
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise RowError(f"field 'score' must be a finite number, got {type(score).__name__} {_short(score)}")
    return Example(
        _prompt_messages(row) + [{"role": "assistant", "content": text_field(row, "response")}],
        "score",
        score=float(score),
    )


def number_or_text(value: Any) -> Any:
    """A numeric text ("0.8", as every CSV cell is text) as its number; anything else as it is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _prompt_turns(turns: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    if turns[-1]["role"] != "user":
        raise RowError(
            f"the last turn of field '{key}' is the {turns[-1]['role']}'s; a prompt ends with the user's "
            f"message, which the model replies to"
        )
    return turns


@register_format(
    "prompt",
    keys=("prompt",),
    kind="prompt",
    summary="a prompt for RL methods (grpo, ppo) to answer; "
    "other fields (a reference answer) go to the reward functions",
    example={"prompt": "What is 12 * 7?", "answer": "84"},
)
def convert_prompt(row: dict[str, Any]) -> Example:
    """A prompt for RL methods: a string, or a message list ending with the user's turn. Other fields of the
    row (a reference answer, a category) stay in `Example.fields` for reward functions."""
    return Example(_prompt_turns(_prompt_messages(row), "prompt"), "prompt")


@register_format(
    "prompt_messages",
    keys=("messages",),
    kind="prompt",
    summary="a chat for RL methods to continue from its last user turn (a final assistant reply becomes the reference)",
    example={"messages": [{"role": "user", "content": "What is 12 * 7?"}]},
)
def convert_prompt_messages(row: dict[str, Any]) -> Example:
    """A conversation for RL methods to continue: its turns up to the user's last message. A final assistant
    reply, if there is one, is not part of the prompt; it is kept as meta["reference"]."""
    turns = row.get("messages")
    if not isinstance(turns, list) or not turns:
        check_messages(turns)  # raises: not a list, or an empty one
    reply = None
    if len(turns) > 1 and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        reply, turns = turns[-1].get("content"), turns[:-1]  # a chat's final reply: the reference, not the prompt
    checked = check_messages(turns + [{"role": "assistant", "content": "-"}])
    example = Example(_prompt_turns(checked[:-1], "messages"), "prompt")
    if isinstance(reply, str):
        example.meta["reference"] = reply
    return example


# Most specific first: a row with prompt+chosen+rejected must not be taken for prompt_completion.
DETECTION_ORDER = (
    "messages",
    "prompt_messages",
    "sharegpt",
    "preference",
    "openai_preference",
    "score",
    "alpaca",
    "prompt_completion",
    "qa",
    "classification",
    "prompt",
    "text",
)


def detect_format(row: dict[str, Any], kinds: tuple[str, ...] | None = None) -> str | None:
    """The format whose identifying keys the row has, or None.

    Formats with the same keys (messages: a chat to learn from, or a prompt to continue) are told apart by
    `kinds`, the example kinds the method takes, in its order of preference."""
    found = [name for name in DETECTION_ORDER if all(key in row for key in formats.get(name).keys)]
    if not found:
        return None
    same_keys = [name for name in found if formats.get(name).keys == formats.get(found[0]).keys]
    for kind in kinds or ():
        for name in same_keys:
            if formats.get(name).kind == kind:
                return name
    if kinds is None and len(same_keys) > 1:  # any method: the first of them that reads the row (a chat ending
        for name in same_keys:  # with the user's turn is a prompt to continue, not a chat to learn from)
            try:
                formats.get(name).convert(row)
                return name
            except RowError:
                continue
    return found[0]


def closest_formats(row: dict[str, Any], kinds: tuple[str, ...] | None = None) -> list[tuple[str, list[str]]]:
    """The formats a row evidently meant when it fits none: those it has some identifying keys of, missing the
    fewest, as (name, the keys it lacks). Formats of `kinds` (what the method takes) come first when any fit."""
    partial = []
    for name in DETECTION_ORDER:
        keys = formats.get(name).keys
        missing = [key for key in keys if key not in row]
        if missing and len(missing) < len(keys):
            partial.append((name, missing))
    if kinds:
        partial = [item for item in partial if formats.get(item[0]).kind in kinds] or partial
    fewest = min((len(missing) for _, missing in partial), default=0)
    closest, seen_keys = [], set()
    for name, missing in partial:
        if len(missing) == fewest and formats.get(name).keys not in seen_keys:  # one of formats sharing keys
            closest.append((name, missing))
            seen_keys.add(formats.get(name).keys)
    return closest


def format_reference() -> list[Format]:
    """Every registered format, in detection order (the most specific first): the documentation's table."""
    return [formats.get(name) for name in DETECTION_ORDER] + [
        formats.get(name) for name in formats.names() if name not in DETECTION_ORDER
    ]


def csv_header(entry: Format) -> str | None:
    """The CSV/TSV header row a format's data can have (its example's fields), or None when a field holds a list
    or an object, which a cell cannot."""
    flat = all(not isinstance(value, (list, dict)) for value in entry.example.values())
    return ",".join(entry.example) if flat else None


def describe_formats() -> str:
    """Every format with what it holds, an example row and its CSV header: the end of `--help-config`."""
    lines = [
        "data formats (data.format; auto tells them apart by their fields, the most specific first; data "
        "files: .jsonl/.json, .csv/.tsv with a header row, .parquet):"
    ]
    width = max(len(entry.name) for entry in format_reference())
    for entry in format_reference():
        header = csv_header(entry)
        lines.append(f"  {entry.name:<{width}}  {entry.summary} ({entry.kind} examples)")
        lines.append(f"  {'':<{width}}  {entry.example_line}" + (f"   CSV header: {header}" if header else ""))
    return "\n".join(lines)


def format_table() -> str:
    """The formats as a Markdown table (name, what it holds, an example row): the README's, generated here."""
    lines = ["| format | holds | example row | CSV/TSV header |", "| --- | --- | --- | --- |"]
    lines += [
        f"| `{entry.name}` | {entry.summary} | `{entry.example_line}` | "
        f"{'`' + csv_header(entry) + '`' if csv_header(entry) else '(nested: JSON Lines or Parquet)'} |"
        for entry in format_reference()
    ]
    return "\n".join(lines)
