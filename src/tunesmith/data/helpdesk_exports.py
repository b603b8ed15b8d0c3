"""Reading a helpdesk export: the CSV, JSON and JSON Lines readers. A file becomes `Record`s, each with the line it
starts on (problems collected as `FILE:LINE: ... fix: ...`); data/helpdesk_mappings.py says which columns hold
what, and tickets.py turns the records into conversations.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import Problem, UserError


@dataclass
class Record:
    """One object of the export (a ticket, or in a flat file one message) and the line it starts on."""

    line: int
    fields: dict[str, Any]


# ---- reading the export ---------------------------------------------------------------------------------------


def read_export(path: Path, problems: list[Problem]) -> list[Record]:
    if not path.is_file():
        raise UserError(f"{path}: ticket export not found; fix: check the path (relative to {Path.cwd()})")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(
            f"{path}: cannot tell the file type from '{path.suffix}'; fix: export as .csv, .json or .jsonl "
            f"(or rename the file to the extension its content has)"
        )
    return reader(path, read_text(path), problems)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserError(
            f"{path}: the file cannot be read",
            [Problem(f"{path}:{line}", "not valid UTF-8; fix: export or save the file as UTF-8")],
        ) from None


def read_csv(path: Path, text: str, problems: list[Problem]) -> list[Record]:
    """One record per row, each with the line its row starts on (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[Record] = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            problems.append(
                Problem(
                    f"{path}:1",
                    f"the header repeats column(s) {', '.join(repeated)}; fix: give each column its own name",
                )
            )
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                problems.append(
                    Problem(
                        f"{path}:{line}",
                        f"the row has {len(row)} fields but the header has "
                        f"{len(header)}; fix: quote fields that hold commas or line "
                        f"breaks, and give every row one field per column",
                    )
                )
                continue
            records.append(Record(line, dict(zip(header, row))))
    except csv.Error as error:
        problems.append(
            Problem(
                f"{path}:{reader.line_num}",
                f"unreadable CSV: {error}; fix: check the quoting on "
                f"this line (a field's quotes must be doubled inside it)",
            )
        )
    return records


def read_jsonl(path: Path, text: str, problems: list[Problem]) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(
                Problem(
                    f"{path}:{number}",
                    f"invalid JSON at column {error.colno}: {error.msg}; fix: one complete JSON object per line",
                )
            )
            continue
        if isinstance(value, dict):
            records.append(Record(number, value))
        else:
            problems.append(
                Problem(
                    f"{path}:{number}",
                    f"each line must be a JSON object (a ticket), got "
                    f"{type(value).__name__}; fix: one ticket object per line",
                )
            )
    return records


def read_json(path: Path, text: str, problems: list[Problem]) -> list[Record]:
    """A JSON array of tickets, or an object holding one ({"tickets": [...]}, as API exports are); each ticket
    keeps the line it starts on. A .json file that is really JSON Lines is read as such."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            return read_jsonl(path, text, problems)
        raise UserError(
            f"{path}: the file is not valid JSON",
            [
                Problem(
                    f"{path}:{error.lineno}",
                    f"invalid JSON at column {error.colno}: {error.msg}; fix: repair the file or export it again",
                )
            ],
        ) from None
    if isinstance(data, dict):
        key = "tickets" if isinstance(data.get("tickets"), list) else None
        if key is None:
            raise UserError(
                f'{path}: expected a JSON array of tickets or {{"tickets": [...]}}, got an object with '
                f"keys {', '.join(list(data)[:20])}; fix: export the tickets as a list"
            )
        tickets, start = data[key], member_value_start(text, key)
    elif isinstance(data, list):
        tickets, start = data, len(text) - len(text.lstrip())
    else:
        raise UserError(
            f"{path}: expected a JSON array of tickets, got {type(data).__name__}; fix: export the tickets as a list"
        )
    records = []
    for index, (ticket, line) in enumerate(zip(tickets, element_lines(text, start))):
        if isinstance(ticket, dict):
            records.append(Record(line, ticket))
        else:
            problems.append(
                Problem(
                    f"{path}:{line}",
                    f"ticket [{index}] must be a JSON object, got {type(ticket).__name__}; fix: one object per ticket",
                )
            )
    return records


READERS: dict[str, Callable[[Path, str, list[Problem]], list[Record]]] = {
    ".csv": read_csv,
    ".json": read_json,
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
}
JSON_SPACE = " \t\r\n"


def skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in JSON_SPACE:
        index += 1
    return index


def element_lines(text: str, start: int) -> list[int]:
    """The line each element of the (already validated) JSON array at `start` begins on: json.loads keeps no
    positions, so the array is walked once more with raw_decode."""
    decoder, lines = json.JSONDecoder(), []
    index, line, counted = skip_space(text, start + 1), 1, 0
    while index < len(text) and text[index] != "]":
        line, counted = line + text.count("\n", counted, index), index
        lines.append(line)
        _, index = decoder.raw_decode(text, index)
        index = skip_space(text, index)
        if index < len(text) and text[index] == ",":
            index = skip_space(text, index + 1)
    return lines


def member_value_start(text: str, key: str) -> int:
    """Where the value of top-level `key` begins in the (already validated) JSON object `text`."""
    decoder = json.JSONDecoder()
    index = skip_space(text, skip_space(text, 0) + 1)
    while True:
        name, index = decoder.raw_decode(text, index)
        index = skip_space(text, skip_space(text, index) + 1)  # past the colon
        if name == key:
            return index
        _, index = decoder.raw_decode(text, index)
        index = skip_space(text, skip_space(text, index) + 1)  # past the comma


def lookup(row: dict[str, Any], column: str | None) -> Any:
    """row[column], where a dotted column walks into nested objects (requester.name); None when absent."""
    if column is None:
        return None
    if column in row:
        return row[column]
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def cell_text(value: Any) -> str:
    """A cell as text: JSON true/false as CSV writes them, 12.0 as 12, nothing as ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def column_paths(row: dict[str, Any], prefix: str = "", depth: int = 2) -> set[str]:
    paths = set()
    for key, value in row.items():
        paths.add(prefix + key)
        if isinstance(value, dict) and depth > 1:
            paths |= column_paths(value, f"{prefix}{key}.", depth - 1)
    return paths


def columns_of(records: list[Record]) -> tuple[set[str], set[str]]:
    """The columns present in at least one record, and those of the objects in its lists (the nested messages of
    a JSON export; for a flat file, the same columns)."""
    ticket_columns: set[str] = set().union(*(column_paths(record.fields) for record in records))
    message_columns: set[str] = set()
    for record in records:
        for value in record.fields.values():
            if isinstance(value, list):
                message_columns |= set().union(*(column_paths(item) for item in value if isinstance(item, dict)))
    return ticket_columns, message_columns or ticket_columns
