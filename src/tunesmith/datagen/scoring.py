"""`tunesmith score`: rate the replies of a JSONL file with a reward model; every row comes back with its reward.

A row is a reply in context, {prompt, response} (a prompt string or a message list; other keys, such as a
score, are kept), or a pair {prompt, chosen, rejected} whose sides are both rated, or {messages} ending in
the assistant reply to rate. The output holds the input's rows in order, each with `reward` added (pairs:
`reward_chosen` and `reward_rejected`); the input file is never written. Every bad row is reported before
the model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.formats import RowError, _prompt_messages, _reply, check_messages
from tunesmith.data.validate import read_jsonl
from tunesmith.errors import Problem, UserError

Messages = list[dict[str, str]]
ROW_SHAPES = (
    'write each row as {"prompt": "...", "response": "..."}, a pair {"prompt": "...", "chosen": "...", '
    '"rejected": "..."}, or {"messages": [...]} ending in the assistant reply'
)


@dataclass
class ScoredFile:
    output: Path
    rows: int
    replies: int
    mean_reward: float
    chosen_wins: float | None  # pairs: the share whose chosen reply was rated above the rejected one


def score_file(model: str, data: Path, output: Path | None = None, batch_size: int = 16) -> ScoredFile:
    """Rate every reply of `data` with the reward model `model` (a reward run or a classifier directory)."""
    from tunesmith.engine.reward_model import RewardScorer

    output = output or data.with_name(f"{data.stem}.scored.jsonl")
    if output.resolve() == data.resolve():
        raise UserError(
            f"--output {output} is the input file, which tunesmith never overwrites; fix: choose another "
            f"path (the default is {data.stem}.scored.jsonl beside the input)"
        )
    rows, conversations = read_rows(data)
    scorer = RewardScorer.load(model)
    rewards = scorer.score([conversation for rated in conversations for conversation in rated], batch_size)
    remaining, wins = iter(rewards), []
    for row, rated in zip(rows, conversations):
        if len(rated) == 2:
            row["reward_chosen"], row["reward_rejected"] = next(remaining), next(remaining)
            wins.append(row["reward_chosen"] > row["reward_rejected"])
        else:
            row["reward"] = next(remaining)
    write_rows(output, rows)
    return ScoredFile(
        output, len(rows), len(rewards), sum(rewards) / len(rewards), sum(wins) / len(wins) if wins else None
    )


def read_rows(path: Path) -> tuple[list[dict[str, Any]], list[list[Messages]]]:
    """Every row and the conversations it asks to rate; all problems at once, each `FILE:LINE: problem; fix`."""
    rows, conversations, problems = [], [], []
    for number, row in read_jsonl(path):
        try:
            if isinstance(row, RowError):
                raise row
            if not isinstance(row, dict):
                raise RowError(f"each line must be a JSON object, got {type(row).__name__}")
            conversations.append(conversations_of(row))
            rows.append(row)
        except RowError as error:
            problems.append(Problem(f"{path}:{number}", f"{error}; fix: {ROW_SHAPES}"))
    if problems:
        raise UserError(f"{path}: {len(problems)} row(s) cannot be rated; nothing was written", problems)
    if not rows:
        raise UserError(f"{path}: the file has no rows to rate; fix: {ROW_SHAPES}")
    return rows, conversations


def conversations_of(row: dict[str, Any]) -> list[Messages]:
    """The conversations a row asks to rate: its reply in context, or both sides of a pair (chosen first)."""
    if "chosen" in row or "rejected" in row:
        prompt = _prompt_messages(row)
        return [prompt + [{"role": "assistant", "content": _reply(row, side)}] for side in ("chosen", "rejected")]
    if "response" in row or "prompt" in row:
        return [_prompt_messages(row) + [{"role": "assistant", "content": _reply(row, "response")}]]
    if "messages" in row:
        messages = check_messages(row["messages"])
        if messages[-1]["role"] != "assistant":
            raise RowError(
                f"field 'messages' ends with a {messages[-1]['role']} turn, and the reply to rate is its "
                f"last message, from the assistant"
            )
        return [messages]
    raise RowError(f"no reply to rate among the keys ({', '.join(sorted(row)) or 'none'})")


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the rows as JSONL through a temporary file, so a failed write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(temporary, path)
