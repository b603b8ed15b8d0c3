"""`tunesmith import tickets`: a helpdesk export → one conversation per ticket, in the messages format.

A ticket's thread becomes user turns (the customer) and assistant turns (the agents): internal notes are dropped,
consecutive messages of one side merged, and PII redacted (redact.py) unless asked not to. Which columns hold what
is a `Mapping`, built in for Zendesk- and Freshdesk-like exports (recognised from the columns present) or read from
the user's mapping file. Every problem in the export is reported at once as `FILE:LINE: ... fix: ...`, and nothing
is written unless there are none, so a half-converted file never sits next to a good one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunesmith.data.helpdesk_exports import Record, cell_text, columns_of, lookup, read_export
from tunesmith.data.helpdesk_mappings import FLAVOURS, Mapping, TicketOptions, check_columns, choose_mapping
from tunesmith.data.redact import redact
from tunesmith.errors import Problem, UserError

MAX_PROBLEMS_SHOWN = 50
TRAILING_CHOICES = ("trim", "skip")


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
    conversations = [
        conversation
        for ticket in tickets
        if (conversation := convert_ticket(ticket, mapping, options, report, problems)) is not None
    ]
    if problems:
        raise_problems(path, problems)
    write_jsonl(output, conversations)
    report.conversations_written = len(conversations)
    return report


def check_arguments(path: Path, output: Path, options: TicketOptions) -> None:
    """Before reading anything: a known --trailing, and no overwriting (an existing output is someone's data until
    --force says otherwise; the export itself never)."""
    if options.trailing not in TRAILING_CHOICES:
        raise UserError(
            f"--trailing {options.trailing}: not one of {', '.join(TRAILING_CHOICES)}; fix: --trailing trim"
        )
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
    lines = [
        f"{label:<{width}}  {value:>6}" if isinstance(value, int) else f"{label:<{width}}  {value}"
        for label, value in rows
    ]
    return "\n".join(lines + [f"wrote {report.output} (export read as {report.source})"])


# ---- tickets → conversations ----------------------------------------------------------------------------------


def group_tickets(records: list[Record], mapping: Mapping, path: Path, problems: list[Problem]) -> list[Ticket]:
    """Nested exports hold a ticket per record; flat ones a message per record, grouped by the ticket id in
    the order tickets first appear."""
    tickets: dict[str, Ticket] = {}
    for record in records:
        where = f"{path}:{record.line}"
        ticket_id = cell_text(lookup(record.fields, mapping.ticket_id))
        if not ticket_id:
            problems.append(
                Problem(where, f"no ticket id in column '{mapping.ticket_id}'; fix: fill it in, or remove the row")
            )
            continue
        if mapping.messages is None:
            ticket = tickets.setdefault(ticket_id, Ticket(ticket_id, where, record.fields, []))
            ticket.messages.append(Message(where, f"ticket {ticket_id}", record.fields))
            continue
        thread = lookup(record.fields, mapping.messages) or []
        if not isinstance(thread, list):
            problems.append(
                Problem(
                    where,
                    f"ticket {ticket_id}: '{mapping.messages}' must be a list of messages, got "
                    f"{type(thread).__name__}; fix: export the thread as a list",
                )
            )
            continue
        ticket = Ticket(ticket_id, where, record.fields, [])
        tickets[f"{ticket_id}\0{record.line}"] = ticket  # nested: each record is its own ticket
        for index, item in enumerate(thread):
            label = f"ticket {ticket_id}, {mapping.messages}[{index}]"
            if isinstance(item, dict):
                ticket.messages.append(Message(where, label, item))
            else:
                problems.append(
                    Problem(where, f"{label} must be an object, got {type(item).__name__}; fix: one object per message")
                )
    return list(tickets.values())


def convert_ticket(
    ticket: Ticket, mapping: Mapping, options: TicketOptions, report: ImportReport, problems: list[Problem]
) -> dict[str, Any] | None:
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


def thread_turns(
    ticket: Ticket, mapping: Mapping, report: ImportReport, problems: list[Problem]
) -> list[tuple[str, str]] | None:
    """The ticket's public messages as (side, text) in time order; internal notes dropped and counted. None when
    a message has a problem (recorded)."""
    if mapping.role is None and not cell_text(lookup(ticket.fields, mapping.requester)):
        problems.append(
            Problem(
                ticket.where,
                f"ticket {ticket.ticket_id} has no requester in '{mapping.requester}', "
                f"so its customer is unknown; fix: fill it in, or map a role column",
            )
        )
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
    return any(
        cell_text(lookup(message.fields, column)).lower() in {value.lower() for value in values}
        for column, values in mapping.skip.items()
    )


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
        fix = (
            f"pass --mapping MAP.yaml with role: {mapping.role} and this value among its customer: or agent: values "
            f"(see docs/tickets.md)"
        )
    else:
        fix = f"add it to 'customer:' or 'agent:' in {mapping.source} (or to 'skip:' to leave such messages out)"
    problems.append(
        Problem(
            message.where,
            f"{message.label}: {mapping.role} {value!r} is neither a customer value "
            f"({', '.join(mapping.customer)}) nor an agent value "
            f"({', '.join(mapping.agent)}); fix: {fix}",
        )
    )
    return None


def message_order(message: Message, mapping: Mapping, problems: list[Problem]) -> tuple[float, ...] | None:
    """The sort key: position, then timestamp, where mapped (file order breaks ties); None when unreadable."""
    key = []
    for column, parse, expected in (
        (mapping.position, parse_position, "a whole number"),
        (mapping.timestamp, parse_time, "an ISO 8601 time like 2024-03-01T09:30:00Z"),
    ):
        if column is None:
            continue
        raw = lookup(message.fields, column)
        value = parse(raw)
        if value is None:
            problems.append(
                Problem(
                    message.where,
                    f"{message.label}: {column} {cell_text(raw)!r} is not {expected}; fix: correct the value",
                )
            )
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
        problems.append(
            Problem(
                message.where,
                f"{message.label}: {mapping.body} must be text, got "
                f"{type(value).__name__}; fix: map the column holding the plain text",
            )
        )
        return None
    return cell_text(value).replace("\r\n", "\n")


def with_opening(
    turns: list[tuple[str, str]], ticket: Ticket, mapping: Mapping, include_subject: bool
) -> list[tuple[str, str]]:
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


def shape_conversation(
    turns: list[tuple[str, str]], trailing: str
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
        turns = turns[: last_agent + 1]
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
