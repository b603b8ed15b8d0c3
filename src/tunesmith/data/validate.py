"""Read a JSONL file and check every row before any compute; every problem is `FILE:LINE: problem`."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tunesmith.data.formats import Example, RowError, chosen_side, detect_format
from tunesmith.errors import Problem, UserError
from tunesmith.registry import formats


@dataclass
class LoadedFile:
    """The usable examples of a file, the problems of the others, and the format that was used."""

    path: Path
    format: str
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows: int = 0  # non-blank lines read
    file_problems: list[Problem] = field(default_factory=list)  # about the whole file: skip_bad_rows cannot skip them


def read_jsonl(path: Path, lines: Iterable[bytes] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) or (line number, RowError) for each non-blank line.

    `lines`, when given, are the file's lines (e.g. decrypted in memory) and `path` only names them.
    """
    if lines is None and not path.is_file():
        raise UserError(f"{path}: data file not found; fix: check the path (relative to {Path.cwd()})")
    with (path.open("rb") if lines is None else contextlib.nullcontext(lines)) as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark is not part of the JSON
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, RowError(f"not valid UTF-8 (byte {error.start + 1} of the line); fix: save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                # Without its line break, so a column in the message is a column of this line.
                yield number, json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                yield number, RowError(f"invalid JSON at column {error.colno}: {error.msg}")


def read_objects(path: Path, problems: list[Problem]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each line of `path` that is a JSON object; every other line becomes a `FILE:LINE`
    problem appended to `problems`."""
    for number, row in read_jsonl(path):
        if isinstance(row, RowError):
            problems.append(Problem(f"{path}:{number}", str(row)))
        elif not isinstance(row, dict):
            problems.append(Problem(f"{path}:{number}", f"each line must be a JSON object, got {type(row).__name__}"))
        else:
            yield number, row


def load_file(path: Path, format_name: str = "auto", accepts: tuple[str, ...] | None = None, method: str = "",
              lines: Iterable[bytes] | None = None) -> LoadedFile:
    """Parse and convert every row of `path`; problems are collected, never raised one at a time.

    `accepts` lists the example kinds the method can train on (e.g. ("chat", "chosen") for sft); a file in a
    format of another kind is reported once, with the formats that would work.
    """
    chosen = None if format_name == "auto" else formats.get(format_name, key="format")
    loaded = LoadedFile(path, format_name)
    wrong_kind = None
    for number, row in read_jsonl(path, lines):
        loaded.rows += 1
        where = f"{path}:{number}"
        if isinstance(row, RowError):
            loaded.problems.append(Problem(where, str(row)))
            continue
        if not isinstance(row, dict):
            loaded.problems.append(Problem(where, f"each line must be a JSON object, got {type(row).__name__}"))
            continue
        if chosen is None:
            detected = detect_format(row, accepts)
            if detected is None:
                keys = ", ".join(sorted(row)) or "no keys"
                loaded.problems.append(Problem(where, f"cannot tell the data format from the keys ({keys}); fix: "
                                                      f"use one of the formats in DESIGN.md or set the format explicitly"))
                continue
            chosen = formats.get(detected)
            loaded.format = detected
            if accepts is not None and not takes(accepts, chosen.kind):
                wrong_kind = Problem(where, wrong_kind_message(chosen, accepts, method))
        try:
            example = chosen.convert(row)
        except RowError as error:
            hint = other_format_hint(row, chosen.name, auto=format_name == "auto")
            loaded.problems.append(Problem(where, f"{error} (format {chosen.name}){hint}"))
            continue
        example.line = number
        if example.kind == "preference" and accepts is not None and "preference" not in accepts and "chosen" in accepts:
            example = chosen_side(example)  # supervised tuning on pairs learns their chosen replies
        # Scalar fields the format does not use (ids, categories) stay available, e.g. to slice an evaluation.
        example.fields = {key: value for key, value in row.items() if isinstance(value, (str, int, float, bool))}
        loaded.examples.append(example)
    if wrong_kind is None and chosen is not None and accepts is not None and not takes(accepts, chosen.kind):
        wrong_kind = Problem(str(path), wrong_kind_message(chosen, accepts, method))
    if wrong_kind is not None:  # reported once, first; the rows were still checked in their own format
        loaded.file_problems.append(wrong_kind)
        loaded.examples.clear()
    if not loaded.examples and not loaded.problems and wrong_kind is None:
        loaded.file_problems.append(Problem(str(path), "the file has no examples"))
    loaded.problems[:0] = loaded.file_problems
    return loaded


def other_format_hint(row: dict[str, Any], used: str, auto: bool) -> str:
    """'; the row looks like FORMAT data ...' when a row that failed has the keys of another format."""
    detected = detect_format(row)
    if detected is None or formats.get(detected).keys == formats.get(used).keys:  # the same keys: no other format
        return ""
    if auto:
        return f"; the row looks like {detected} data, but the file's first row is {used}: fix: use one format per file"
    return f"; the row looks like {detected} data: fix: set the format to {detected} or auto"


def takes(accepts: tuple[str, ...], kind: str) -> bool:
    """Whether a method taking example kinds `accepts` trains on `kind`; "chosen" takes pairs' chosen replies."""
    return kind in accepts or (kind == "preference" and "chosen" in accepts)


def wrong_kind_message(chosen: Any, accepts: tuple[str, ...], method: str) -> str:
    usable = [name for name in formats.names() if takes(accepts, formats.get(name).kind)]
    return (f"format '{chosen.name}' holds {chosen.kind} examples, which method '{method}' cannot train on; "
            f"fix: use one of these formats: {', '.join(usable)}, or a method that takes {chosen.kind} data")


def report(problems: list[Problem], limit: int = 50) -> str:
    """The problems as lines, the first `limit` of them, with a count of the rest."""
    lines = [str(problem) for problem in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more problems")
    return "\n".join(lines)
