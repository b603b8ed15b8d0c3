"""Which columns of a helpdesk export hold what (`Mapping`): a built-in flavour (Zendesk, Freshdesk) recognised
from the columns present, or the user's mapping file, checked against the columns the export actually has; and
the import's options.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from tunesmith.data.helpdesk_exports import cell_text
from tunesmith.errors import Problem, UserError, did_you_mean


@dataclass(frozen=True)
class TicketOptions:
    mapping: Path | None = None
    flavour: str = "auto"
    system_prompt: str | None = None
    redact: bool = True
    include_subject: bool = False
    trailing: str = "trim"  # a customer message after the last agent reply: trim it, or skip the ticket
    force: bool = False


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
        names=present(
            ticket_columns | message_columns,
            "requester.name",
            "requester_name",
            "assignee.name",
            "assignee_name",
            "author.name",
            "author_name",
        ),
        skip={"public": ("false",)} if "public" in message_columns else {},
        source="zendesk",
    )


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
        role="incoming",
        customer=("true",),
        agent=("false",),
        timestamp=first_present(message_columns, "created_at"),
        subject=first_present(ticket_columns, "subject"),
        description=first_present(ticket_columns, "description_text"),
        names=present(
            ticket_columns | message_columns,
            "requester.name",
            "requester_name",
            "responder.name",
            "responder_name",
            "agent_name",
        ),
        skip={"private": ("true",)} if "private" in message_columns else {},
        source="freshdesk",
    )


# ---- choosing and checking the mapping ------------------------------------------------------------------------


def choose_mapping(path: Path, options: TicketOptions, ticket_columns: set[str], message_columns: set[str]) -> Mapping:
    """The user's mapping file, the named flavour, or the one flavour whose marker columns the export has."""
    if options.mapping is not None:
        return load_mapping_file(options.mapping)
    if options.flavour != "auto":
        if options.flavour not in FLAVOURS:
            raise UserError(
                f"--flavour {options.flavour}: not a known export flavour"
                f"{did_you_mean(options.flavour, list(FLAVOURS))}; choose auto, {', '.join(FLAVOURS)}"
            )
        return FLAVOURS[options.flavour].build(ticket_columns, message_columns)
    columns = ticket_columns | message_columns
    for flavour in FLAVOURS.values():
        if any(marker <= columns for marker in flavour.markers):
            return flavour.build(ticket_columns, message_columns)
    raise UserError(
        f"{path}: cannot tell which helpdesk exported this from its columns ({preview(columns)}); fix: "
        f"pass --mapping MAP.yaml naming the ticket id, body and role columns (see docs/tickets.md), or "
        f"--flavour {' or '.join(FLAVOURS)}"
    )


def preview(columns: set[str], limit: int = 30) -> str:
    names = sorted(columns)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_columns(mapping: Mapping, ticket_columns: set[str], message_columns: set[str], where: str) -> list[Problem]:
    """A problem for each mapped column the export lacks, naming the columns it has and the closest one."""
    wanted = [
        (key, getattr(mapping, key), ticket_columns)
        for key in ("ticket_id", "messages", "subject", "description", "requester")
    ]
    wanted += [
        (key, getattr(mapping, key), message_columns) for key in ("body", "role", "author", "timestamp", "position")
    ]
    wanted += [("skip", column, message_columns) for column in mapping.skip]
    wanted += [("names", column, ticket_columns | message_columns) for column in mapping.names]
    problems = []
    for key, column, columns in wanted:
        if column is not None and column not in columns:
            hint = did_you_mean(column, sorted(columns))
            problems.append(
                Problem(
                    where,
                    f"column '{column}' ({key}) is not in the export{hint}; its columns are: "
                    f"{preview(columns)}; fix: {mapping_fix(mapping, key)}",
                )
            )
    return problems


def mapping_fix(mapping: Mapping, key: str) -> str:
    """Where the user changes `key`: their mapping file, or (for a built-in flavour) a mapping file of their own."""
    if mapping.source in FLAVOURS:
        return (
            f"the export is not shaped like the built-in {mapping.source} flavour; pass --mapping MAP.yaml "
            f"with '{key}:' naming your column (see docs/tickets.md)"
        )
    return f"set '{key}:' in {mapping.source} to a column of the export"


MAPPING_TEXT_KEYS = (
    "ticket_id",
    "body",
    "role",
    "author",
    "requester",
    "messages",
    "timestamp",
    "position",
    "subject",
    "description",
)
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
        raise UserError(
            f"{path}: the mapping file cannot be parsed",
            [Problem(f"{path}:{line}" if line > 0 else str(path), f"{error}; fix: repair the syntax")],
        ) from None
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a mapping file is a set of key: value lines (ticket_id, body, role, ...); fix: see "
            f"the example in docs/tickets.md"
        )
    lines = key_lines(text)
    known = [field.name for field in fields(Mapping) if field.name != "source"]
    problems, values = [], {}
    for key, value in data.items():
        where = f"{path}:{lines[key]}" if key in lines else str(path)
        if key not in known:
            problems.append(
                Problem(where, f"unknown key '{key}'{did_you_mean(key, known)}; fix: use one of {', '.join(known)}")
            )
        elif key in MAPPING_TEXT_KEYS and not (isinstance(value, str) and value.strip()):
            problems.append(Problem(where, f"'{key}' must name a column, got {value!r}; fix: e.g. {key}: my_column"))
        elif key in MAPPING_LIST_KEYS:
            values[key] = as_texts(value)
        elif key == "skip":
            if not isinstance(value, dict):
                problems.append(
                    Problem(
                        where,
                        f"'skip' must map columns to the values that mark internal notes, got "
                        f"{value!r}; fix: e.g. skip: {{public: [false]}}",
                    )
                )
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
    problems = [
        Problem(str(path), f"missing key '{key}'; fix: add {key}: COLUMN")
        for key in ("ticket_id", "body")
        if key not in values
    ]
    if "role" in values:
        problems += [
            Problem(
                str(path),
                f"'role' needs '{side}': the values of {values['role']} that mean the "
                f"{side}; fix: add e.g. {side}: [{example}]",
            )
            for side, example in (("customer", "end-user"), ("agent", "agent"))
            if not values.get(side)
        ]
    elif not ("author" in values and "requester" in values):
        problems.append(
            Problem(
                str(path),
                "nothing tells the customer's messages from the agents'; fix: add role: "
                "COLUMN with customer: [...] and agent: [...] values, or author: COLUMN and "
                "requester: COLUMN (the customer wrote the messages whose author is the "
                "ticket's requester)",
            )
        )
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
