"""`tunesmith import tickets`: a helpdesk export → one conversation per ticket, in the messages format.

A ticket's thread becomes user turns (the customer) and assistant turns (the agents): internal notes are dropped,
consecutive messages of one side merged, and PII redacted (redact.py) unless asked not to. Which columns hold what
is a `Mapping`, built in for Zendesk- and Freshdesk-like exports (recognised from the columns present) or read from
the user's mapping file. Every problem in the export is reported at once as `FILE:LINE: ... fix: ...`, and nothing
is written unless there are none, so a half-converted file never sits next to a good one.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tunesmith.data.redact import redact
from tunesmith.errors import Problem, UserError, did_you_mean

MAX_PROBLEMS_SHOWN = 50
TRAILING_CHOICES = ("trim", "skip")


@dataclass(frozen=True)
class Mapping:
    """Which columns of an export hold what; the keys of a mapping file are these field names.

    Column names may be dotted paths into nested JSON objects (`requester.name`). Values of the role and skip
    columns are compared case-insensitively, JSON booleans as true/false. The customer's side is told either by
    `role` (its values listed in `customer` and `agent`) or by `author` equal to the ticket's `requester`."""

    ticket_id: str
    body: str
    role: str | None = None
    customer: tuple[str, ...] = ()
    agent: tuple[str, ...] = ()
    author: str | None = None
    requester: str | None = None
    messages: str | None = None  # the list of messages inside a ticket (nested JSON); None: one row per message
    timestamp: str | None = None
    position: str | None = None
    subject: str | None = None
    description: str | None = None  # the ticket's opening message, used when the thread does not repeat it
    names: tuple[str, ...] = ()  # columns holding people's names, redacted wherever they appear in the ticket
    skip: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column → values that mark internal notes
    source: str = ""  # a built-in flavour's name or the mapping file: where a fix goes


@dataclass(frozen=True)
class TicketOptions:
    mapping: Path | None = None
    flavour: str = "auto"
    system_prompt: str | None = None
    redact: bool = True
    include_subject: bool = False
    trailing: str = "trim"  # a customer message after the last agent reply: trim it, or skip the ticket
    force: bool = False


@dataclass
class ImportReport:
    output: Path
    source: str
    tickets_read: int = 0
    conversations_written: int = 0
    skipped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    redactions: Counter = field(default_factory=Counter)
    redacted: bool = True


@dataclass
class Record:
    """One object of the export (a ticket, or in a flat file one message) and the line it starts on."""

    line: int
    fields: dict[str, Any]


@dataclass
class Message:
    where: str  # FILE:LINE
    label: str  # which ticket (and which list entry), for problems
    fields: dict[str, Any]


@dataclass
class Ticket:
    ticket_id: str
    where: str
    fields: dict[str, Any]
    messages: list[Message]


# ---- built-in export flavours --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flavour:
    """A built-in export shape: recognised when all columns of any one `markers` set are present; `build`
    makes its Mapping from the ticket-level and message-level columns actually present."""

    name: str
    markers: tuple[frozenset[str], ...]
    build: Callable[[set[str], set[str]], Mapping]


# A plain dict rather than tunesmith.registry: that registry's lookups import every plugin (torch among them),
# seconds of start-up for what is a file conversion.
FLAVOURS: dict[str, Flavour] = {}


def register_flavour(name: str, *markers: set[str]):
    def add(build: Callable[[set[str], set[str]], Mapping]) -> Callable[[set[str], set[str]], Mapping]:
        FLAVOURS[name] = Flavour(name, tuple(frozenset(marker) for marker in markers), build)
        return build

    return add


def present(columns: set[str], *candidates: str) -> tuple[str, ...]:
    return tuple(column for column in candidates if column in columns)


def first_present(columns: set[str], *candidates: str) -> str | None:
    return next(iter(present(columns, *candidates)), None)


@register_flavour("zendesk", {"comments"}, {"public", "body"}, {"author_role", "body"})
def zendesk_mapping(ticket_columns: set[str], message_columns: set[str]) -> Mapping:
    """Zendesk-like: tickets {id, subject, description, requester_id, requester{name}, comments: [{author_id or
    author_role, public, body, created_at}]}, or one CSV row per comment with ticket_id. public=false is an
    internal note; the description repeats the first comment. Without author_role, the requester is the customer."""
    nested = "comments" in ticket_columns
    by_role = "author_role" in message_columns or "author_id" not in message_columns
    return Mapping(
        ticket_id="id" if nested else first_present(ticket_columns, "ticket_id", "id") or "ticket_id",
        messages="comments" if nested else None,
        body=first_present(message_columns, "plain_body", "body") or "body",
        role="author_role" if by_role else None,
        customer=("end-user", "end_user", "customer", "requester") if by_role else (),
        agent=("agent", "admin") if by_role else (),
        author=None if by_role else "author_id",
        requester=None if by_role else "requester_id",
        timestamp=first_present(message_columns, "created_at"),
        subject=first_present(ticket_columns, "subject"),
        description=first_present(ticket_columns, "description"),
        names=present(ticket_columns | message_columns, "requester.name", "requester_name", "assignee.name",
                      "assignee_name", "author.name", "author_name"),
        skip={"public": ("false",)} if "public" in message_columns else {},
        source="zendesk")


@register_flavour("freshdesk", {"conversations"}, {"body_text"}, {"description_text"})
def freshdesk_mapping(ticket_columns: set[str], message_columns: set[str]) -> Mapping:
    """Freshdesk-like: tickets {id, subject, description_text, requester{name}, conversations: [{incoming, private,
    body_text, created_at}]}, or one CSV row per conversation with ticket_id. incoming=true is the customer,
    private=true a note; the description is the customer's opening message, which conversations do not repeat."""
    nested = "conversations" in ticket_columns
    return Mapping(
        ticket_id="id" if nested else first_present(ticket_columns, "ticket_id", "id") or "ticket_id",
        messages="conversations" if nested else None,
        body="body_text",
        role="incoming", customer=("true",), agent=("false",),
        timestamp=first_present(message_columns, "created_at"),
        subject=first_present(ticket_columns, "subject"),
        description=first_present(ticket_columns, "description_text"),
        names=present(ticket_columns | message_columns, "requester.name", "requester_name", "responder.name",
                      "responder_name", "agent_name"),
        skip={"private": ("true",)} if "private" in message_columns else {},
        source="freshdesk")


# ---- the command ----------------------------------------------------------------------------------------------


def import_tickets(path: Path, output: Path, options: TicketOptions) -> ImportReport:
    """Read the export, convert every ticket, and write the conversations; raises a UserError listing every
    problem (nothing written) when there are any."""
    check_arguments(path, output, options)
    problems: list[Problem] = []
    records = read_export(path, problems)
    if not records:
        raise_problems(path, problems or [Problem(str(path), "the export has no tickets; fix: export some tickets")])
    ticket_columns, message_columns = columns_of(records)
    mapping = choose_mapping(path, options, ticket_columns, message_columns)
    first_line = 1 if path.suffix.lower() == ".csv" else records[0].line
    column_problems = check_columns(mapping, ticket_columns, message_columns, f"{path}:{first_line}")
    if column_problems:  # every row would fail on the same column: say it once
        raise_problems(path, problems + column_problems)
    tickets = group_tickets(records, mapping, path, problems)
    report = ImportReport(output, mapping.source, tickets_read=len(tickets), redacted=options.redact)
    conversations = [conversation for ticket in tickets
                     if (conversation := convert_ticket(ticket, mapping, options, report, problems)) is not None]
    if problems:
        raise_problems(path, problems)
    write_jsonl(output, conversations)
    report.conversations_written = len(conversations)
    return report


def check_arguments(path: Path, output: Path, options: TicketOptions) -> None:
    """Before reading anything: a known --trailing, and no overwriting (an existing output is someone's data until
    --force says otherwise; the export itself never)."""
    if options.trailing not in TRAILING_CHOICES:
        raise UserError(f"--trailing {options.trailing}: not one of {', '.join(TRAILING_CHOICES)}; "
                        f"fix: --trailing trim")
    if output.resolve() == path.resolve():
        raise UserError(f"{output}: the output is the export itself; fix: choose another --output")
    if output.exists() and not options.force:
        raise UserError(f"{output}: already exists; fix: pass --force to replace it, or choose another --output")


def raise_problems(path: Path, problems: list[Problem]) -> None:
    problems = sorted(problems, key=lambda problem: line_of(problem.where))
    shown = problems[:MAX_PROBLEMS_SHOWN]
    if len(problems) > len(shown):
        shown.append(Problem("", f"... and {len(problems) - len(shown)} more problems"))
    raise UserError(f"{path}: {len(problems)} problem(s); nothing was written", shown)


def line_of(where: str) -> int:
    tail = where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def write_jsonl(output: Path, conversations: list[dict[str, Any]]) -> None:
    """Write through a temporary file, so an interrupted run leaves no partial output under the real name."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for conversation in conversations:
            handle.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    os.replace(partial, output)


def format_report(report: ImportReport) -> str:
    """The counts as a small two-column table, then where the conversations went."""
    rows = [("tickets read", report.tickets_read), ("conversations written", report.conversations_written)]
    rows += [(f"skipped: {reason}", count) for reason, count in sorted(report.skipped.items())]
    rows += [(f"messages dropped: {reason}", count) for reason, count in sorted(report.dropped.items())]
    if report.redacted:
        rows += [(f"redacted {kind}", report.redactions.get(kind, 0)) for kind in ("EMAIL", "PHONE", "CARD", "NAME")]
    else:
        rows.append(("redaction", "off (--no-redact)"))
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value:>6}" if isinstance(value, int) else f"{label:<{width}}  {value}"
             for label, value in rows]
    return "\n".join(lines + [f"wrote {report.output} (export read as {report.source})"])


# ---- reading the export ---------------------------------------------------------------------------------------


def read_export(path: Path, problems: list[Problem]) -> list[Record]:
    if not path.is_file():
        raise UserError(f"{path}: ticket export not found; fix: check the path (relative to {Path.cwd()})")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"{path}: cannot tell the file type from '{path.suffix}'; fix: export as .csv, .json or .jsonl "
                        f"(or rename the file to the extension its content has)")
    return reader(path, read_text(path), problems)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise UserError(f"{path}: the file cannot be read", [Problem(
            f"{path}:{line}", "not valid UTF-8; fix: export or save the file as UTF-8")]) from None


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
            problems.append(Problem(f"{path}:1", f"the header repeats column(s) {', '.join(repeated)}; fix: give "
                                                 f"each column its own name"))
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                problems.append(Problem(f"{path}:{line}", f"the row has {len(row)} fields but the header has "
                                                          f"{len(header)}; fix: quote fields that hold commas or line "
                                                          f"breaks, and give every row one field per column"))
                continue
            records.append(Record(line, dict(zip(header, row))))
    except csv.Error as error:
        problems.append(Problem(f"{path}:{reader.line_num}", f"unreadable CSV: {error}; fix: check the quoting on "
                                                             f"this line (a field's quotes must be doubled inside it)"))
    return records


def read_jsonl(path: Path, text: str, problems: list[Problem]) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(Problem(f"{path}:{number}", f"invalid JSON at column {error.colno}: {error.msg}; fix: "
                                                        f"one complete JSON object per line"))
            continue
        if isinstance(value, dict):
            records.append(Record(number, value))
        else:
            problems.append(Problem(f"{path}:{number}", f"each line must be a JSON object (a ticket), got "
                                                        f"{type(value).__name__}; fix: one ticket object per line"))
    return records


def read_json(path: Path, text: str, problems: list[Problem]) -> list[Record]:
    """A JSON array of tickets, or an object holding one ({"tickets": [...]}, as API exports are); each ticket
    keeps the line it starts on. A .json file that is really JSON Lines is read as such."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            return read_jsonl(path, text, problems)
        raise UserError(f"{path}: the file is not valid JSON", [Problem(
            f"{path}:{error.lineno}", f"invalid JSON at column {error.colno}: {error.msg}; fix: repair the file or "
                                      f"export it again")]) from None
    if isinstance(data, dict):
        key = "tickets" if isinstance(data.get("tickets"), list) else None
        if key is None:
            raise UserError(f"{path}: expected a JSON array of tickets or {{\"tickets\": [...]}}, got an object with "
                            f"keys {', '.join(list(data)[:20])}; fix: export the tickets as a list")
        tickets, start = data[key], member_value_start(text, key)
    elif isinstance(data, list):
        tickets, start = data, len(text) - len(text.lstrip())
    else:
        raise UserError(f"{path}: expected a JSON array of tickets, got {type(data).__name__}; fix: export the "
                        f"tickets as a list")
    records = []
    for index, (ticket, line) in enumerate(zip(tickets, element_lines(text, start))):
        if isinstance(ticket, dict):
            records.append(Record(line, ticket))
        else:
            problems.append(Problem(f"{path}:{line}", f"ticket [{index}] must be a JSON object, got "
                                                      f"{type(ticket).__name__}; fix: one object per ticket"))
    return records


READERS: dict[str, Callable[[Path, str, list[Problem]], list[Record]]] = {
    ".csv": read_csv, ".json": read_json, ".jsonl": read_jsonl, ".ndjson": read_jsonl}
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


# ---- choosing and checking the mapping ------------------------------------------------------------------------


def choose_mapping(path: Path, options: TicketOptions, ticket_columns: set[str], message_columns: set[str]) -> Mapping:
    """The user's mapping file, the named flavour, or the one flavour whose marker columns the export has."""
    if options.mapping is not None:
        return load_mapping_file(options.mapping)
    if options.flavour != "auto":
        if options.flavour not in FLAVOURS:
            raise UserError(f"--flavour {options.flavour}: not a known export flavour"
                            f"{did_you_mean(options.flavour, list(FLAVOURS))}; choose auto, {', '.join(FLAVOURS)}")
        return FLAVOURS[options.flavour].build(ticket_columns, message_columns)
    columns = ticket_columns | message_columns
    for flavour in FLAVOURS.values():
        if any(marker <= columns for marker in flavour.markers):
            return flavour.build(ticket_columns, message_columns)
    raise UserError(f"{path}: cannot tell which helpdesk exported this from its columns ({preview(columns)}); fix: "
                    f"pass --mapping MAP.yaml naming the ticket id, body and role columns (see README), or "
                    f"--flavour {' or '.join(FLAVOURS)}")


def preview(columns: set[str], limit: int = 30) -> str:
    names = sorted(columns)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_columns(mapping: Mapping, ticket_columns: set[str], message_columns: set[str], where: str) -> list[Problem]:
    """A problem for each mapped column the export lacks, naming the columns it has and the closest one."""
    wanted = [(key, getattr(mapping, key), ticket_columns) for key in ("ticket_id", "messages", "subject",
                                                                       "description", "requester")]
    wanted += [(key, getattr(mapping, key), message_columns) for key in ("body", "role", "author", "timestamp",
                                                                         "position")]
    wanted += [("skip", column, message_columns) for column in mapping.skip]
    wanted += [("names", column, ticket_columns | message_columns) for column in mapping.names]
    problems = []
    for key, column, columns in wanted:
        if column is not None and column not in columns:
            hint = did_you_mean(column, sorted(columns))
            problems.append(Problem(where, f"column '{column}' ({key}) is not in the export{hint}; its columns are: "
                                           f"{preview(columns)}; fix: {mapping_fix(mapping, key)}"))
    return problems


def mapping_fix(mapping: Mapping, key: str) -> str:
    """Where the user changes `key`: their mapping file, or (for a built-in flavour) a mapping file of their own."""
    if mapping.source in FLAVOURS:
        return (f"the export is not shaped like the built-in {mapping.source} flavour; pass --mapping MAP.yaml "
                f"with '{key}:' naming your column (see README)")
    return f"set '{key}:' in {mapping.source} to a column of the export"


MAPPING_TEXT_KEYS = ("ticket_id", "body", "role", "author", "requester", "messages", "timestamp", "position",
                     "subject", "description")
MAPPING_LIST_KEYS = ("customer", "agent", "names")


def load_mapping_file(path: Path) -> Mapping:
    """A YAML or JSON mapping file → Mapping; every unknown, missing or mistyped key reported at once."""
    import yaml

    if not path.is_file():
        raise UserError(f"{path}: mapping file not found; fix: check the path (relative to {Path.cwd()})")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        line = getattr(error, "lineno", None) or getattr(getattr(error, "problem_mark", None), "line", -1) + 1
        raise UserError(f"{path}: the mapping file cannot be parsed", [Problem(
            f"{path}:{line}" if line > 0 else str(path), f"{error}; fix: repair the syntax")]) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a mapping file is a set of key: value lines (ticket_id, body, role, ...); fix: see "
                        f"the README's example")
    lines = key_lines(text)
    known = [field.name for field in fields(Mapping) if field.name != "source"]
    problems, values = [], {}
    for key, value in data.items():
        where = f"{path}:{lines[key]}" if key in lines else str(path)
        if key not in known:
            problems.append(Problem(where, f"unknown key '{key}'{did_you_mean(key, known)}; fix: use one of "
                                           f"{', '.join(known)}"))
        elif key in MAPPING_TEXT_KEYS and not (isinstance(value, str) and value.strip()):
            problems.append(Problem(where, f"'{key}' must name a column, got {value!r}; fix: e.g. {key}: my_column"))
        elif key in MAPPING_LIST_KEYS:
            values[key] = as_texts(value)
        elif key == "skip":
            if not isinstance(value, dict):
                problems.append(Problem(where, f"'skip' must map columns to the values that mark internal notes, got "
                                               f"{value!r}; fix: e.g. skip: {{public: [false]}}"))
            else:
                values[key] = {column: as_texts(marks) for column, marks in value.items()}
        else:
            values[key] = value.strip()
    problems += missing_mapping_keys(path, values)
    if problems:
        raise UserError(f"{path}: {len(problems)} problem(s) in the mapping file", problems)
    return Mapping(**values, source=str(path))


def as_texts(value: Any) -> tuple[str, ...]:
    """A mapping file's value or list of values as texts compared like cells (false as 'false')."""
    return tuple(cell_text(item) for item in (value if isinstance(value, list) else [value]))


def missing_mapping_keys(path: Path, values: dict[str, Any]) -> list[Problem]:
    problems = [Problem(str(path), f"missing key '{key}'; fix: add {key}: COLUMN") for key in ("ticket_id", "body")
                if key not in values]
    if "role" in values:
        problems += [Problem(str(path), f"'role' needs '{side}': the values of {values['role']} that mean the "
                                        f"{side}; fix: add e.g. {side}: [{example}]")
                     for side, example in (("customer", "end-user"), ("agent", "agent")) if not values.get(side)]
    elif not ("author" in values and "requester" in values):
        problems.append(Problem(str(path), "nothing tells the customer's messages from the agents'; fix: add role: "
                                           "COLUMN with customer: [...] and agent: [...] values, or author: COLUMN and "
                                           "requester: COLUMN (the customer wrote the messages whose author is the "
                                           "ticket's requester)"))
    return problems


def key_lines(text: str) -> dict[str, int]:
    """The line of each top-level key of a YAML (or JSON) document, so a problem can point at it."""
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


# ---- tickets → conversations ----------------------------------------------------------------------------------


def group_tickets(records: list[Record], mapping: Mapping, path: Path, problems: list[Problem]) -> list[Ticket]:
    """Nested exports hold a ticket per record; flat ones a message per record, grouped by the ticket id in
    the order tickets first appear."""
    tickets: dict[str, Ticket] = {}
    for record in records:
        where = f"{path}:{record.line}"
        ticket_id = cell_text(lookup(record.fields, mapping.ticket_id))
        if not ticket_id:
            problems.append(Problem(where, f"no ticket id in column '{mapping.ticket_id}'; fix: fill it in, or remove "
                                           f"the row"))
            continue
        if mapping.messages is None:
            ticket = tickets.setdefault(ticket_id, Ticket(ticket_id, where, record.fields, []))
            ticket.messages.append(Message(where, f"ticket {ticket_id}", record.fields))
            continue
        thread = lookup(record.fields, mapping.messages) or []
        if not isinstance(thread, list):
            problems.append(Problem(where, f"ticket {ticket_id}: '{mapping.messages}' must be a list of messages, got "
                                           f"{type(thread).__name__}; fix: export the thread as a list"))
            continue
        ticket = Ticket(ticket_id, where, record.fields, [])
        tickets[f"{ticket_id}\0{record.line}"] = ticket  # nested: each record is its own ticket
        for index, item in enumerate(thread):
            label = f"ticket {ticket_id}, {mapping.messages}[{index}]"
            if isinstance(item, dict):
                ticket.messages.append(Message(where, label, item))
            else:
                problems.append(Problem(where, f"{label} must be an object, got {type(item).__name__}; fix: one "
                                               f"object per message"))
    return list(tickets.values())


def convert_ticket(ticket: Ticket, mapping: Mapping, options: TicketOptions, report: ImportReport,
                   problems: list[Problem]) -> dict[str, Any] | None:
    """One ticket → {"messages": [...]}, or None when it is skipped (counted by reason) or has problems."""
    turns = thread_turns(ticket, mapping, report, problems)
    if turns is None:
        return None
    turns = with_opening(turns, ticket, mapping, options.include_subject)
    empty = sum(1 for _, text in turns if not text)
    turns = [(side, text) for side, text in turns if text]
    turns, reason, dropped = shape_conversation(turns, options.trailing)
    if reason is not None:
        report.skipped[reason] += 1
        return None
    report.dropped.update(dropped + Counter({"empty": empty}))
    if options.redact:
        names = ticket_names(ticket, mapping)
        redacted = []
        for side, text in turns:
            text, counts = redact(text, names)
            report.redactions.update(counts)
            redacted.append((side, text))
        turns = redacted
    system = [{"role": "system", "content": options.system_prompt}] if options.system_prompt else []
    return {"messages": system + [{"role": side, "content": text} for side, text in turns]}


def thread_turns(ticket: Ticket, mapping: Mapping, report: ImportReport,
                 problems: list[Problem]) -> list[tuple[str, str]] | None:
    """The ticket's public messages as (side, text) in time order; internal notes dropped and counted. None when
    a message has a problem (recorded)."""
    if mapping.role is None and not cell_text(lookup(ticket.fields, mapping.requester)):
        problems.append(Problem(ticket.where, f"ticket {ticket.ticket_id} has no requester in '{mapping.requester}', "
                                              f"so its customer is unknown; fix: fill it in, or map a role column"))
        return None
    keyed, failed = [], False
    for index, message in enumerate(ticket.messages):
        if is_internal(message, mapping):
            report.dropped["internal note"] += 1
            continue
        side = message_side(message, ticket, mapping, problems)
        order = message_order(message, mapping, problems)
        text = message_text(message, mapping, problems)
        if side is None or order is None or text is None:
            failed = True
            continue
        keyed.append((order, index, side, text))
    keyed.sort(key=lambda item: (item[0], item[1]))
    return None if failed else [(side, text) for _, _, side, text in keyed]


def is_internal(message: Message, mapping: Mapping) -> bool:
    return any(cell_text(lookup(message.fields, column)).lower() in {value.lower() for value in values}
               for column, values in mapping.skip.items())


def message_side(message: Message, ticket: Ticket, mapping: Mapping, problems: list[Problem]) -> str | None:
    """'user' for the customer, 'assistant' for an agent, None (a problem recorded) when the role is unknown."""
    if mapping.role is None:
        author = cell_text(lookup(message.fields, mapping.author))
        return "user" if author == cell_text(lookup(ticket.fields, mapping.requester)) else "assistant"
    value = cell_text(lookup(message.fields, mapping.role)).lower()
    if value in {item.lower() for item in mapping.customer}:
        return "user"
    if value in {item.lower() for item in mapping.agent}:
        return "assistant"
    if mapping.source in FLAVOURS:
        fix = (f"pass --mapping MAP.yaml with role: {mapping.role} and this value among its customer: or agent: values "
               f"(see README)")
    else:
        fix = f"add it to 'customer:' or 'agent:' in {mapping.source} (or to 'skip:' to leave such messages out)"
    problems.append(Problem(message.where, f"{message.label}: {mapping.role} {value!r} is neither a customer value "
                                           f"({', '.join(mapping.customer)}) nor an agent value "
                                           f"({', '.join(mapping.agent)}); fix: {fix}"))
    return None


def message_order(message: Message, mapping: Mapping, problems: list[Problem]) -> tuple[float, ...] | None:
    """The sort key: position, then timestamp, where mapped (file order breaks ties); None when unreadable."""
    key = []
    for column, parse, expected in ((mapping.position, parse_position, "a whole number"),
                                    (mapping.timestamp, parse_time, "an ISO 8601 time like 2024-03-01T09:30:00Z")):
        if column is None:
            continue
        raw = lookup(message.fields, column)
        value = parse(raw)
        if value is None:
            problems.append(Problem(message.where, f"{message.label}: {column} {cell_text(raw)!r} is not {expected}; "
                                                   f"fix: correct the value"))
            return None
        key.append(value)
    return tuple(key)


def parse_position(value: Any) -> float | None:
    try:
        return float(int(cell_text(value)))
    except ValueError:
        return None


def parse_time(value: Any) -> float | None:
    """Seconds since 1970 from an ISO 8601 time (a time without a zone taken as UTC) or a Unix timestamp."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = cell_text(value)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def message_text(message: Message, mapping: Mapping, problems: list[Problem]) -> str | None:
    value = lookup(message.fields, mapping.body)
    if isinstance(value, (dict, list)):
        problems.append(Problem(message.where, f"{message.label}: {mapping.body} must be text, got "
                                               f"{type(value).__name__}; fix: map the column holding the plain text"))
        return None
    return cell_text(value).replace("\r\n", "\n")


def with_opening(turns: list[tuple[str, str]], ticket: Ticket, mapping: Mapping,
                 include_subject: bool) -> list[tuple[str, str]]:
    """The description as the customer's opening message when the thread does not start with it (Freshdesk keeps
    it apart; Zendesk repeats it as the first comment), and the subject on the first customer message if asked."""
    description = cell_text(lookup(ticket.fields, mapping.description)).replace("\r\n", "\n")
    if description and not (turns and squash(turns[0][1]) == squash(description)):
        turns = [("user", description)] + turns
    subject = cell_text(lookup(ticket.fields, mapping.subject))
    first_user = next((index for index, (side, _) in enumerate(turns) if side == "user"), None)
    if include_subject and subject and first_user is not None:
        turns = list(turns)
        turns[first_user] = ("user", f"{subject}\n\n{turns[first_user][1]}".strip())
    return turns


def squash(text: str) -> str:
    return " ".join(text.split())


def shape_conversation(turns: list[tuple[str, str]], trailing: str
                       ) -> tuple[list[tuple[str, str]], str | None, Counter]:
    """The turns to train on, or the reason to skip the ticket; and the messages dropped on the way.

    A conversation opens with the customer (chat templates expect a user turn first; an agent's unprompted
    opener teaches nothing to answer) and ends with an agent reply (the turn that is trained); a customer's
    closing 'thanks' is trimmed, or with trailing='skip' the ticket is skipped."""
    dropped: Counter = Counter()
    first_user = next((index for index, (side, _) in enumerate(turns) if side == "user"), None)
    if first_user is None:
        return [], "no customer message", dropped
    dropped["agent before the customer"] = first_user
    turns = turns[first_user:]
    last_agent = max((index for index, (side, _) in enumerate(turns) if side == "assistant"), default=None)
    if last_agent is None:
        return [], "no agent reply", dropped
    if last_agent < len(turns) - 1:
        if trailing == "skip":
            return [], "ends with a customer message", dropped
        dropped["customer after the last reply"] = len(turns) - 1 - last_agent
        turns = turns[:last_agent + 1]
    return merge_turns(turns), None, +dropped


def merge_turns(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive messages of one side become one turn, paragraphs apart, so roles alternate."""
    merged: list[tuple[str, str]] = []
    for side, text in turns:
        if merged and merged[-1][0] == side:
            merged[-1] = (side, f"{merged[-1][1]}\n\n{text}")
        else:
            merged.append((side, text))
    return merged


def ticket_names(ticket: Ticket, mapping: Mapping) -> list[str]:
    """The people this ticket names in its name columns, from the ticket and each of its messages."""
    names = []
    for row in [ticket.fields] + [message.fields for message in ticket.messages]:
        names += [cell_text(lookup(row, column)) for column in mapping.names]
    return sorted({name for name in names if name})
