"""Prompts: what a row asks a model to reply to. For RL (method ppo | grpo), the rows of a prompt, chat or
preference file up to the reply the policy is to write, each with its fields for the reward functions, and the
plan of which prompts each step takes; for generating data (`tunesmith label`, `tunesmith redteam`), `prompt_of`
any row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunesmith.config.schema import Config
from tunesmith.data.dataset import PreparedData, split_validation
from tunesmith.data.formats import Example, RowError, check_messages, detect_format, text_field
from tunesmith.data.packing import epoch_rows
from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.data.validate import load_file, report
from tunesmith.errors import Problem, UserError
from tunesmith.registry import formats

ACCEPTS = ("prompt", "chat", "preference")  # prompts; chat and preference rows give theirs up to the (chosen) reply
Messages = list[dict[str, str]]


@dataclass
class Prompt:
    messages: Messages  # the conversation to reply to, ending with the user's turn (system prompt included)
    input_ids: list[int]  # rendered with the generation prompt
    fields: dict[str, Any]  # the row's scalar fields, for reward functions
    line: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


def as_prompt(example: Example, chat: ChatTokenizer) -> Prompt:
    """A prompt example as it is; a chat example (or a pair's chosen side) up to its final reply, which becomes the
    field `reference`: the file a reward model trained on serves as the RL prompts too."""
    messages, fields = example.messages, dict(example.fields)
    reply = example.meta.get("reference")
    if example.kind in ("chat", "preference") and messages[-1]["role"] == "assistant":
        reply, messages = messages[-1]["content"], messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise RowError(
            "the conversation before its final reply does not end with a user turn, so there is nothing "
            "to reply to; fix: end each prompt with the user's message"
        )
    if reply is not None:
        fields.setdefault("reference", reply)
    messages = chat.with_system(messages)
    return Prompt(messages, chat.prompt_ids(messages), fields, example.line)


def load_prompts(config: Config, chat: ChatTokenizer, required_fields: list[tuple[str, str]]) -> PreparedData:
    """The training and validation prompts; every problem (bad rows, prompts too long to leave room for a
    reply, rows without a field a reward reads) reported at once, before any compute."""
    data, budget = config.data, config.data.max_length - config.rl.max_new_tokens
    prepared = PreparedData([], [], data.format)
    problems: list[Problem] = []
    sets: list[list[Prompt]] = []
    for path in [data.train] + ([data.validation] if data.validation is not None else []):
        loaded = load_file(path, data.format, ACCEPTS, config.method, columns=data.columns)
        prepared.format = loaded.format
        skip = bool(loaded.problems) and data.skip_bad_rows and not loaded.file_problems
        prepared.skipped_rows += len(loaded.problems) if skip else 0
        problems += [] if skip else loaded.problems
        prompts = []
        for example in loaded.examples:
            where = f"{path}:{example.line}"
            try:
                prompt = as_prompt(example, chat)
                invalid = [
                    f"reward '{label}' reads the field '{name}', which this row does not have; fix: add it to "
                    f"every row, or name another field in that reward's args"
                    for label, name in required_fields
                    if name not in prompt.fields
                ]
            except RowError as error:
                invalid = [str(error)]
            if invalid:  # bad rows: skipped and counted with data.skip_bad_rows, like unreadable ones
                prepared.skipped_rows += data.skip_bad_rows
                problems += [] if data.skip_bad_rows else [Problem(where, message) for message in invalid]
            elif len(prompt) > budget and data.truncation == "drop":
                prepared.dropped_long += 1
            elif len(prompt) > budget:
                problems.append(
                    Problem(
                        where,
                        f"the prompt is {len(prompt)} tokens, and with rl.max_new_tokens="
                        f"{config.rl.max_new_tokens} for the reply it passes data.max_length="
                        f"{data.max_length}; fix: raise data.max_length, lower rl.max_new_tokens, "
                        f"or set data.truncation=drop",
                    )
                )
            else:
                prompts.append(prompt)
        sets.append(prompts)
    if problems:
        raise UserError(
            f"the data has {len(problems)} problem(s); nothing was trained (fix them, or set "
            f"data.skip_bad_rows=true to skip invalid rows)\n{report(problems)}"
        )
    prepared.train, prepared.validation = sets[0], sets[1] if len(sets) > 1 else []
    if data.val_fraction is not None:
        prepared.train, prepared.validation = split_validation(prepared.train, data.val_fraction, config.train.seed)
    if not prepared.train:
        raise UserError(f"{data.train}: no usable training prompts remain")
    return prepared


class PromptPlan:
    """Which prompts each step takes: a seeded shuffle per epoch, `batch_size` at a time (an epoch's last step may
    take fewer). A function of (epoch, step in epoch) alone, so a resumed run takes the same prompts."""

    def __init__(self, count: int, batch_size: int, seed: int):
        self.count, self.batch_size, self.seed = count, batch_size, seed

    def steps_in_epoch(self, epoch: int) -> int:
        return -(-self.count // self.batch_size)

    def step(self, epoch: int, step_in_epoch: int) -> list[int]:
        order = [row[0] for row in epoch_rows([1] * self.count, 1, False, self.seed, epoch)]
        return order[step_in_epoch * self.batch_size : (step_in_epoch + 1) * self.batch_size]


PLACEHOLDER_REPLY = {"role": "assistant", "content": "-"}  # lets check_messages validate a prompt with no reply yet


def prompt_of(row: dict[str, Any]) -> Messages:
    """The conversation a reply is wanted for.

    A `prompt` field (text, or messages ending with the user's turn) as in prompt-only, prompt_completion,
    preference and score rows; a `messages` list that ends with the user's turn, as it is; any other
    conversation format, up to its last assistant turn (the reply it holds is replaced by the policy's).
    """
    if "prompt" in row:
        if not isinstance(row["prompt"], list):
            return [{"role": "user", "content": text_field(row, "prompt")}]
        return ending_with_user(check_messages(row["prompt"] + [PLACEHOLDER_REPLY], "prompt")[:-1], "prompt")
    turns = row.get("messages")
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "user":
        return check_messages(turns + [PLACEHOLDER_REPLY], "messages")[:-1]
    name = detect_format(row)
    if name is None or formats.get(name).kind == "text":
        keys = ", ".join(sorted(row)) or "no keys"
        raise RowError(
            f"no prompt in this row (keys: {keys}); fix: give it a 'prompt' (text or a message list), or "
            f"'messages' ending with the user's turn"
        )
    messages = formats.get(name).convert(row).messages
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return ending_with_user(messages[:last], name)


def ending_with_user(messages: Messages, key: str) -> Messages:
    if not messages or messages[-1]["role"] != "user":
        raise RowError(f"the {key} conversation must end with the user's turn, which the policy then answers")
    return messages
