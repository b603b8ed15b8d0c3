"""`tunesmith import tickets`: helpdesk exports become messages-format conversations, PII redacted.

The fixtures are small invented exports shaped like Zendesk's ticket JSON (comments nested per ticket) and a
Freshdesk-like CSV (one row per conversation entry), written by the tests themselves.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.data.redact import passes_luhn, redact
from tunesmith.data.tickets import TicketOptions, format_report, import_tickets
from tunesmith.errors import UserError

ZENDESK_TICKETS = [
    {
        "id": 101,
        "subject": "Order not arrived",
        "created_at": "2024-03-01T09:00:00Z",
        "requester_id": 7,
        "requester": {"name": "Maria Lopez", "email": "maria.lopez@example.com"},
        "assignee": {"name": "Tom Baker"},
        "description": "Hi, my order #48213 has not arrived. Reach me at maria.lopez@example.com or +44 20 7946 0958.",
        "comments": [
            {
                "id": 1,
                "author_role": "end-user",
                "public": True,
                "created_at": "2024-03-01T09:00:00Z",
                "body": "Hi, my order #48213 has not arrived. Reach me at maria.lopez@example.com or +44 20 7946 0958.",
            },
            {
                "id": 2,
                "author_role": "agent",
                "public": False,
                "created_at": "2024-03-01T09:05:00Z",
                "body": "Internal: VIP customer, ask the warehouse.",
            },
            {
                "id": 3,
                "author_role": "agent",
                "public": True,
                "created_at": "2024-03-01T10:00:00Z",
                "body": "Hi Maria, sorry! Order #48213 ships on 2024-03-04.",
            },
            # Listed out of time order: the timestamps decide the order.
            {
                "id": 6,
                "author_role": "admin",
                "public": True,
                "created_at": "2024-03-02T08:00:00Z",
                "body": "Yes, back to that card. Best, Tom Baker",
            },
            {
                "id": 4,
                "author_role": "agent",
                "public": True,
                "created_at": "2024-03-01T10:01:00Z",
                "body": "Tom from billing: a refund is queued as well.",
            },
            {
                "id": 5,
                "author_role": "end-user",
                "public": True,
                "created_at": "2024-03-01T12:00:00Z",
                "body": "Great. I paid with 4111 1111 1111 1111, will the refund go there?",
            },
        ],
    },
    {
        "id": 102,
        "subject": "Login",
        "requester": {"name": "Ann Wu"},
        "description": "I cannot log in.",
        "comments": [
            {
                "id": 7,
                "author_role": "end-user",
                "public": True,
                "created_at": "2024-03-03T09:00:00Z",
                "body": "I cannot log in.",
            }
        ],
    },
    {
        "id": 103,
        "subject": "Maintenance notice",
        "requester": {"name": "Raj Patel"},
        "description": "",
        "comments": [
            {
                "id": 8,
                "author_role": "agent",
                "public": True,
                "created_at": "2024-03-03T09:00:00Z",
                "body": "Planned maintenance tonight.",
            }
        ],
    },
    {
        "id": 104,
        "subject": "Invoice copy",
        "requester": {"name": "Lena Novak"},
        "description": "Need an invoice copy.",
        "comments": [
            {
                "id": 9,
                "author_role": "end-user",
                "public": True,
                "created_at": "2024-03-04T09:00:00Z",
                "body": "Need an invoice copy.",
            },
            {
                "id": 10,
                "author_role": "agent",
                "public": True,
                "created_at": "2024-03-04T09:30:00Z",
                "body": "Sent to your inbox.",
            },
            {
                "id": 11,
                "author_role": "end-user",
                "public": True,
                "created_at": "2024-03-04T09:45:00Z",
                "body": "Got it, thanks!",
            },
        ],
    },
]

FRESHDESK_COLUMNS = [
    "ticket_id",
    "subject",
    "description_text",
    "requester_name",
    "agent_name",
    "incoming",
    "private",
    "body_text",
    "created_at",
]
FRESHDESK_ROWS = [
    # ticket 9001: the description is the customer's opening; conversations follow, listed out of order.
    [
        "9001",
        "Update phone",
        "My number changed to (555) 123-4567, please update it. Priya Shah",
        "Priya Shah",
        "Sam Cole",
        "false",
        "false",
        "Hello Priya, done. Anything else?",
        "2024-05-02T10:00:00Z",
    ],
    [
        "9001",
        "Update phone",
        "My number changed to (555) 123-4567, please update it. Priya Shah",
        "Priya Shah",
        "Sam Cole",
        "false",
        "true",
        "note: verified by callback",
        "2024-05-02T09:30:00Z",
    ],
    [
        "9001",
        "Update phone",
        "My number changed to (555) 123-4567, please update it. Priya Shah",
        "Priya Shah",
        "Sam Cole",
        "true",
        "false",
        "Yes: my e-mail is now priya.shah@example.org\nand the old one is gone.",
        "2024-05-02T11:00:00Z",
    ],
    [
        "9001",
        "Update phone",
        "My number changed to (555) 123-4567, please update it. Priya Shah",
        "Priya Shah",
        "Sam Cole",
        "true",
        "false",
        "Also, keep order 12345678 on hold.",
        "2024-05-02T11:01:00Z",
    ],
    [
        "9001",
        "Update phone",
        "My number changed to (555) 123-4567, please update it. Priya Shah",
        "Priya Shah",
        "Sam Cole",
        "false",
        "false",
        "Updated, and the order is on hold. Sam",
        "2024-05-02T12:00:00Z",
    ],
    [
        "9002",
        "Refund",
        "Where is my refund?",
        "Omar Haddad",
        "Sam Cole",
        "false",
        "false",
        "It was sent on 2024-05-01.",
        "2024-05-03T09:00:00Z",
    ],
]

ZENDESK_EXPECTED = [
    {
        "messages": [
            {"role": "user", "content": "Hi, my order #48213 has not arrived. Reach me at [EMAIL] or [PHONE]."},
            {
                "role": "assistant",
                "content": "Hi [NAME], sorry! Order #48213 ships on 2024-03-04.\n\n"
                "[NAME] from billing: a refund is queued as well.",
            },
            {"role": "user", "content": "Great. I paid with [CARD], will the refund go there?"},
            {"role": "assistant", "content": "Yes, back to that card. Best, [NAME]"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Need an invoice copy."},
            {"role": "assistant", "content": "Sent to your inbox."},
        ]
    },
]

FRESHDESK_EXPECTED = [
    {
        "messages": [
            {"role": "user", "content": "My number changed to [PHONE], please update it. [NAME]"},
            {"role": "assistant", "content": "Hello [NAME], done. Anything else?"},
            {
                "role": "user",
                "content": "Yes: my e-mail is now [EMAIL]\nand the old one is gone.\n\n"
                "Also, keep order 12345678 on hold.",
            },
            {"role": "assistant", "content": "Updated, and the order is on hold. [NAME]"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Where is my refund?"},
            {"role": "assistant", "content": "It was sent on 2024-05-01."},
        ]
    },
]


def write_zendesk(tmp_path: Path, tickets: list | None = None) -> Path:
    path = tmp_path / "zendesk.json"
    path.write_text(json.dumps({"tickets": tickets or ZENDESK_TICKETS}, indent=2), encoding="utf-8")
    return path


def write_csv(path: Path, columns: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def convert(source: Path, tmp_path: Path, **options) -> tuple[list[dict], object]:
    output = tmp_path / "out.jsonl"
    report = import_tickets(source, output, TicketOptions(force=True, **options))
    return read_output(output), report


def test_zendesk_json_becomes_conversations(tmp_path):
    conversations, report = convert(write_zendesk(tmp_path), tmp_path)
    assert conversations == ZENDESK_EXPECTED
    assert report.source == "zendesk" and report.tickets_read == 4 and report.conversations_written == 2
    assert report.skipped == {"no agent reply": 1, "no customer message": 1}
    assert report.dropped == {"internal note": 1, "customer after the last reply": 1}
    assert report.redactions == {"EMAIL": 1, "PHONE": 1, "CARD": 1, "NAME": 3}


def test_freshdesk_csv_becomes_conversations(tmp_path):
    source = write_csv(tmp_path / "freshdesk.csv", FRESHDESK_COLUMNS, FRESHDESK_ROWS)
    conversations, report = convert(source, tmp_path, system_prompt="You are Acme's support agent.")
    assert [conversation["messages"][0] for conversation in conversations] == [
        {"role": "system", "content": "You are Acme's support agent."}
    ] * 2
    assert [{"messages": conversation["messages"][1:]} for conversation in conversations] == FRESHDESK_EXPECTED
    assert report.source == "freshdesk" and report.dropped == {"internal note": 1}
    assert report.redactions == {"EMAIL": 1, "PHONE": 1, "NAME": 3}


def test_zendesk_without_author_role_takes_the_requester_as_the_customer(tmp_path):
    ticket = {
        "id": 5,
        "requester_id": 70,
        "comments": [
            {"author_id": 12, "public": True, "body": "Our monitoring saw a fault on your printer."},
            {"author_id": 70, "public": True, "body": "Printer jams."},
            {"author_id": 70, "public": True, "body": "Every page."},
            {"author_id": 12, "public": True, "body": "Try the rear tray."},
        ],
    }
    conversations, report = convert(write_zendesk(tmp_path, [ticket]), tmp_path)
    assert conversations == [
        {
            "messages": [
                {"role": "user", "content": "Printer jams.\n\nEvery page."},
                {"role": "assistant", "content": "Try the rear tray."},
            ]
        }
    ]
    assert report.dropped == {"agent before the customer": 1}  # chat templates expect the user to speak first


def test_trailing_skip_and_subject_and_no_redact(tmp_path):
    conversations, report = convert(
        write_zendesk(tmp_path), tmp_path, trailing="skip", include_subject=True, redact=False
    )
    assert len(conversations) == 1 and report.skipped["ends with a customer message"] == 1
    first = conversations[0]["messages"][0]["content"]
    assert first.startswith("Order not arrived\n\nHi, my order") and "maria.lopez@example.com" in first
    assert not report.redactions and "redaction" in format_report(report)


MAPPING_YAML = """\
ticket_id: Case
body: Text
role: Author Type
customer: [Customer]
agent: [Support, Bot]
position: Seq
skip:
  Visibility: internal
names: [Contact]
"""


def test_a_mapping_file_names_the_columns(tmp_path):
    source = write_csv(
        tmp_path / "crm.csv",
        ["Case", "Seq", "Author Type", "Visibility", "Contact", "Text"],
        [
            ["A-1", "2", "Support", "public", "Jo Brandt", "Hi Jo, we reset it."],
            ["A-1", "1", "customer", "public", "Jo Brandt", "Reset my password please."],
            ["A-1", "3", "Support", "internal", "Jo Brandt", "closed via macro"],
        ],
    )
    mapping = tmp_path / "map.yaml"
    mapping.write_text(MAPPING_YAML, encoding="utf-8")
    conversations, report = convert(source, tmp_path, mapping=mapping)
    assert conversations == [
        {
            "messages": [
                {"role": "user", "content": "Reset my password please."},
                {"role": "assistant", "content": "Hi [NAME], we reset it."},
            ]
        }
    ]
    assert report.dropped == {"internal note": 1}


def test_output_passes_the_projects_validator(tmp_path):
    from tunesmith.data.validate import load_file

    convert(write_zendesk(tmp_path), tmp_path, system_prompt="Be kind.")
    loaded = load_file(tmp_path / "out.jsonl", "messages", accepts=("chat",), method="sft")
    assert loaded.problems == [] and len(loaded.examples) == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("write to jo.b+tickets@mail.example.co.uk today", "write to [EMAIL] today"),
        ("call +1 (555) 123-4567 or 555-123-4567", "call [PHONE] or [PHONE]"),
        ("UK 020 7946 0958, mobile 07700 900123, FR 01 23 45 67 89", "UK [PHONE], mobile [PHONE], FR [PHONE]"),
        ("card 4111-1111-1111-1111, amex 3782 822463 10005", "card [CARD], amex [CARD]"),
        ("visa 4012888888881881 on file", "visa [CARD] on file"),
    ],
)
def test_each_kind_of_pii_is_redacted(text, expected):
    assert redact(text)[0] == expected


@pytest.mark.parametrize(
    "text",
    [
        "ref 4111 1111 1111 1112 fails the Luhn check",
        "tracking 1234567890123456 and 9876543210986",
        "due 2024-03-15, or 15.03.2024, at 2024-03-15T10:00:00Z",
        "order #123456789, order 12345678, total 1 234 567",
    ],
)
def test_numbers_that_are_not_pii_are_left_alone(text):
    assert not passes_luhn("4111111111111112")
    assert redact(text) == (text, {})


def test_names_from_the_tickets_name_columns_are_redacted():
    text, counts = redact("Dear Maria Lopez, MARIA LOPEZ, Maria: we will call. Ms Lopez agreed.", ["Maria Lopez"])
    assert text == "Dear [NAME], [NAME], [NAME]: we will call. Ms [NAME] agreed." and counts == {"NAME": 4}
    assert redact("Will it work? We will see, Will.", ["Will Smith"])[0] == "[NAME] it work? We will see, [NAME]."


def test_every_problem_in_a_malformed_csv_is_reported_and_nothing_written(tmp_path):
    rows = [list(row) for row in FRESHDESK_ROWS]
    rows[4][8] = "yesterday"  # line 7: an unreadable time
    rows[3][5] = "maybe"  # line 6 (the row before spans lines 4-5): neither customer nor agent
    source = write_csv(tmp_path / "freshdesk.csv", FRESHDESK_COLUMNS, rows)
    with source.open("a", encoding="utf-8") as handle:
        handle.write("9003,too,few\n")  # line 9: a short row
    with pytest.raises(UserError) as caught:
        import_tickets(source, tmp_path / "out.jsonl", TicketOptions())
    text = str(caught.value)
    assert "3 problem(s); nothing was written" in text
    assert f"{source}:7: ticket 9001: created_at 'yesterday' is not an ISO 8601 time" in text
    assert f"{source}:6: ticket 9001: incoming 'maybe' is neither a customer value (true) nor an agent value" in text
    assert f"{source}:9: the row has 3 fields but the header has 9" in text
    assert text.count("fix:") == 3 and not (tmp_path / "out.jsonl").exists()


def test_a_missing_mapped_column_names_the_columns_that_exist(tmp_path):
    source = write_csv(
        tmp_path / "crm.csv",
        ["Case", "Seq", "Author Type", "Visibility", "Contact", "Txt"],
        [["A-1", "1", "Customer", "public", "Jo", "Hi"]],
    )
    mapping = tmp_path / "map.yaml"
    mapping.write_text(MAPPING_YAML, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        import_tickets(source, tmp_path / "out.jsonl", TicketOptions(mapping=mapping))
    assert (
        f"{source}:1: column 'Text' (body) is not in the export (did you mean 'Txt'?); its columns are: "
        f"Author Type, Case, Contact, Seq, Txt, Visibility; fix: set 'body:' in {mapping}"
    ) in str(caught.value)


def test_mapping_file_mistakes_are_reported_together(tmp_path):
    mapping = tmp_path / "map.yaml"
    mapping.write_text("ticket_id: Case\nbdy: Text\nrole: Author\ncustomer: [c]\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        import_tickets(write_zendesk(tmp_path), tmp_path / "out.jsonl", TicketOptions(mapping=mapping))
    text = str(caught.value)
    assert f"{mapping}:2: unknown key 'bdy' (did you mean 'body'?)" in text
    assert "missing key 'body'" in text and "'role' needs 'agent'" in text


def test_invalid_json_and_an_existing_output(tmp_path):
    source = tmp_path / "broken.json"
    source.write_text('[\n  {"id": 1,\n   "comments": [}\n]\n', encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{source}:3: invalid JSON at column 17")):
        import_tickets(source, tmp_path / "out.jsonl", TicketOptions())
    existing = tmp_path / "keep.jsonl"
    existing.write_text("precious\n", encoding="utf-8")
    with pytest.raises(UserError, match="already exists; fix: pass --force"):
        import_tickets(write_zendesk(tmp_path), existing, TicketOptions())
    assert existing.read_text(encoding="utf-8") == "precious\n"


def run_tunesmith(*argv: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunesmith", *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_end_to_end(tmp_path):
    source = write_zendesk(tmp_path)
    done = run_tunesmith(
        "import", "tickets", source, "--output", "out.jsonl", "--system-prompt", "Be kind.", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    table = dict(line.rsplit(None, 1) for line in done.stdout.splitlines()[:-1])
    assert table["tickets read"] == "4" and table["conversations written"] == "2"
    assert table["skipped: no agent reply"] == "1" and table["messages dropped: internal note"] == "1"
    assert table["redacted CARD"] == "1" and "wrote out.jsonl" in done.stdout
    assert [row["messages"][1:] for row in read_output(tmp_path / "out.jsonl")] == [
        row["messages"] for row in ZENDESK_EXPECTED
    ]

    broken = write_csv(tmp_path / "freshdesk.csv", FRESHDESK_COLUMNS, [FRESHDESK_ROWS[0], ["9001", "only two"]])
    failed = run_tunesmith("import", "tickets", broken, "--output", "bad.jsonl", cwd=tmp_path)
    assert failed.returncode == 2
    assert f"{broken}:3: the row has 2 fields but the header has 9" in failed.stderr and "fix:" in failed.stderr
    assert "Traceback" not in failed.stderr and not (tmp_path / "bad.jsonl").exists()
