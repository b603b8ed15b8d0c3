"""Data validation: every bad line of a file is reported as `FILE:LINE: problem`, before any compute.

The same checks run in `tunesmith validate` and when training prepares its data, so both are tested here:
each error class with its line number, every format's conversion to messages, auto detection, the
truncation policies, and real public data files (skipped where /work/shared/data is absent).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import write_jsonl

from tunesmith.cli import main
from tunesmith.config.schema import DataConfig
from tunesmith.data.dataset import check_file, prepare_data
from tunesmith.data.formats import detect_format
from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.data.validate import load_file
from tunesmith.errors import UserError
from tunesmith.models import load_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def validate(capsys, *argv) -> tuple[int, str, str]:
    """Run `tunesmith validate ARGV` in-process: (exit code, stdout, stderr)."""
    code = main(["validate", *(str(arg) for arg in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def reported(text: str, path: Path) -> dict[int, str]:
    """{line number: message} for every `PATH:LINE: message` line of a report (one problem per line here)."""
    found: dict[int, str] = {}
    for line in text.splitlines():
        head, sep, message = line.partition(": ")
        file_part, _, number = head.rpartition(":")
        if sep and file_part == str(path) and number.isdigit():
            assert int(number) not in found, f"line {number} reported twice:\n{text}"
            found[int(number)] = message
    return found


# ---------------------------------------------------------------------------------------------
# One file, many mistakes: every one found, each on its own line, in one report.

BAD_LINES = {  # line -> (raw line, a fragment its problem must contain); None marks a valid or blank line
    1: (json.dumps(chat("hi", "hello")), None),
    2: ('{"messages": [', "invalid JSON"),
    3: (b'{"messages": "caf\xe9"}', "not valid UTF-8"),  # latin-1, not UTF-8
    4: ("[1, 2]", "must be a JSON object, got list"),
    5: ("42", "must be a JSON object, got int"),
    6: ("", None),
    7: (json.dumps({"foo": 1}), "missing field 'messages'"),
    8: (json.dumps({"messages": []}), "field 'messages' is an empty list"),
    9: (
        json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}),
        "messages[0].content must be a string, got int",
    ),
    10: (
        json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "x"}]}),
        "messages[0].role 'bot' is not one of system, user, assistant",
    ),
    11: (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
    12: (json.dumps(chat("x", "   ")), "messages[1] is an assistant turn with empty content"),
    13: ("   ", None),
    14: (json.dumps(chat("fine", "also fine")), None),
    15: ('"just a string"', "must be a JSON object, got str"),
    16: ("null", "must be a JSON object, got NoneType"),
    17: (json.dumps({"messages": ["hello"]}), "messages[0] must be an object with role and content"),
}


def write_bad_file(path: Path) -> Path:
    with path.open("wb") as handle:
        for number in sorted(BAD_LINES):
            raw = BAD_LINES[number][0]
            handle.write((raw if isinstance(raw, bytes) else raw.encode("utf-8")) + b"\n")
    return path


def test_every_bad_line_is_reported_with_its_line_number_in_one_report(tmp_path, capsys):
    path = write_bad_file(tmp_path / "bad.jsonl")
    code, out, err = validate(capsys, path)
    assert code == 2
    assert out == ""
    expected = {number: fragment for number, (_, fragment) in BAD_LINES.items() if fragment}
    found = reported(err, path)
    assert sorted(found) == sorted(expected), err  # blank and valid lines are not reported
    for number, fragment in expected.items():
        assert fragment in found[number], f"line {number}: {found[number]!r} lacks {fragment!r}"
    rows = sum(1 for raw, _ in BAD_LINES.values() if raw.strip())
    assert f"{path}: {len(expected)} problem(s) in {rows} rows (format messages)" in err
    assert "Traceback" not in err


def test_the_report_is_in_line_order(tmp_path, capsys):
    path = write_bad_file(tmp_path / "bad.jsonl")
    _, _, err = validate(capsys, path)
    numbers = [
        int(line.split(":")[1])
        for line in err.splitlines()
        if line.startswith(f"{path}:") and line.split(":")[1].isdigit()
    ]
    assert numbers == sorted(numbers) and len(numbers) == len(set(numbers))


def test_invalid_json_names_the_column_of_the_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b"), '{"messages": [}'])
    code, _, err = validate(capsys, path)
    assert code == 2
    assert reported(err, path) == {2: "invalid JSON at column 15: Expecting value"}


def test_invalid_utf8_is_reported_and_the_other_lines_still_checked(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "\xff\xfe", "label": "b"}\n{"text": "x", "label": []}\n')
    code, _, err = validate(capsys, path)
    assert code == 2
    found = reported(err, path)
    assert sorted(found) == [2, 3]
    assert "not valid UTF-8" in found[2] and "fix: save the file as UTF-8" in found[2]
    assert "field 'label' must be a string or an integer, got list" in found[3]


# Focused cases: a good first row fixes the format; the second row has one mistake.
FOCUSED = {
    "alpaca missing output": ({"instruction": "a", "output": "b"}, {"instruction": "a"}, "missing field 'output'"),
    "alpaca empty instruction": (
        {"instruction": "a", "output": "b"},
        {"instruction": " ", "output": "b"},
        "field 'instruction' is empty",
    ),
    "alpaca output is a number": (
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "output": 3},
        "field 'output' must be a string, got int",
    ),
    "alpaca input is null": (
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "input": None, "output": "b"},
        "field 'input' must be a string, got NoneType",
    ),
    "prompt_completion empty completion": (
        {"prompt": "p", "completion": "c"},
        {"prompt": "p", "completion": ""},
        "field 'completion' is empty",
    ),
    "classification label is a list": (
        {"text": "t", "label": "a"},
        {"text": "t", "label": ["a"]},
        "field 'label' must be a string or an integer, got list",
    ),
    "classification label is a bool": (
        {"text": "t", "label": "a"},
        {"text": "t", "label": True},
        "field 'label' must be a string or an integer, got bool",
    ),
    "classification empty label": ({"text": "t", "label": "a"}, {"text": "t", "label": ""}, "field 'label' is empty"),
    "classification missing text": ({"text": "t", "label": "a"}, {"label": "a"}, "missing field 'text'"),
    "sharegpt unknown from": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "robot", "value": "a"}, {"from": "gpt", "value": "b"}]},
        "conversations[0].from 'robot' is not one of",
    ),
    "sharegpt value is a number": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 7}]},
        "conversations[1].value must be a string, got int",
    ),
    "sharegpt no assistant turn": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}]},
        "field 'conversations' has no assistant turn",
    ),
    "sharegpt empty assistant turn": (
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
        "conversations[1] is an assistant turn with empty content",
    ),
    "messages without content": (
        chat("a", "b"),
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
        "messages[0].content must be a string, got NoneType",
    ),
    "messages is not a list": (chat("a", "b"), {"messages": "hello"}, "field 'messages' must be a list"),
}


@pytest.mark.parametrize("good, bad, fragment", FOCUSED.values(), ids=FOCUSED.keys())
def test_each_row_mistake_is_reported_on_its_line(tmp_path, capsys, good, bad, fragment):
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad, good])
    code, _, err = validate(capsys, path)
    assert code == 2
    found = reported(err, path)
    assert list(found) == [2], err
    assert fragment in found[2]


# Preference and score data no built-in method trains on yet: checked through load_file, with no method.
NON_CHAT = {
    "score is a string": (
        {"prompt": "p", "response": "r", "score": 1},
        {"prompt": "p", "response": "r", "score": "high"},
        "field 'score' must be a finite number, got str",
    ),
    "score is NaN": (
        {"prompt": "p", "response": "r", "score": 1},
        {"prompt": "p", "response": "r", "score": math.nan},
        "field 'score' must be a finite number, got float nan",
    ),
    "score is a bool": (
        {"prompt": "p", "response": "r", "score": 1},
        {"prompt": "p", "response": "r", "score": True},
        "field 'score' must be a finite number, got bool",
    ),
    "preference chosen equals rejected": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        "are identical",
    ),
    "preference empty rejected": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": " "},
        "field 'rejected' is empty",
    ),
    "preference prompt with an unknown role": (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "human", "content": "p"}], "chosen": "a", "rejected": "b"},
        "prompt[0].role 'human' is not one of",
    ),
}


@pytest.mark.parametrize("good, bad, fragment", NON_CHAT.values(), ids=NON_CHAT.keys())
def test_preference_and_score_row_mistakes(tmp_path, good, bad, fragment):
    path = write_jsonl(tmp_path / "data.jsonl", [good, bad])
    loaded = load_file(path)
    assert len(loaded.examples) == 1 and loaded.examples[0].line == 1
    assert [problem.where for problem in loaded.problems] == [f"{path}:2"]
    assert fragment in loaded.problems[0].message


def test_keys_that_match_no_format_are_reported_on_every_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"query": "q", "reply": "a"}, {"query": "q2", "reply": "a2"}])
    code, _, err = validate(capsys, path)
    assert code == 2
    found = reported(err, path)
    assert sorted(found) == [1, 2]
    assert "cannot tell the data format from the keys (query, reply)" in found[1]
    assert "fix:" in found[1]


def test_a_row_of_another_format_in_an_auto_detected_file_says_so(tmp_path, capsys):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"instruction": "a", "output": "b"}, chat("x", "y")])
    code, _, err = validate(capsys, path)
    assert code == 2
    found = reported(err, path)
    assert list(found) == [2]
    assert "missing field 'instruction' (format alpaca)" in found[2] and "looks like messages" in found[2]


def test_blank_lines_are_skipped_but_still_counted(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", ["", chat("a", "b"), "  ", "\t", chat("c", "d"), "", {"messages": []}])
    code, _, err = validate(capsys, path)
    assert code == 2
    assert list(reported(err, path)) == [7]
    good = write_jsonl(tmp_path / "good.jsonl", ["", chat("a", "b"), "", chat("c", "d"), ""])
    code, out, err = validate(capsys, good)
    assert (code, err) == (0, "")
    assert "2 examples OK" in out
    assert [example.line for example in load_file(good).examples] == [2, 4]


def test_a_utf8_byte_order_mark_on_line_one_is_accepted(tmp_path, capsys):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(chat("a", "b")) + "\n" + json.dumps(chat("c", "d")) + "\n").encode())
    code, out, err = validate(capsys, path)
    assert (code, err) == (0, "")
    assert "2 examples OK (format messages" in out


def test_windows_line_endings_are_accepted(tmp_path, capsys):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(
        b"".join((json.dumps(row) + "\r\n").encode() for row in [chat("a", "b"), chat("c", "d")]) + b"\r\n"
    )
    code, out, err = validate(capsys, path)
    assert (code, err) == (0, "")
    assert "2 examples OK" in out


@pytest.mark.parametrize("forced", [None, "alpaca"])
def test_an_empty_file_is_a_problem(tmp_path, capsys, forced):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    code, _, err = validate(capsys, path, *(["--format", forced] if forced else []))
    assert code == 2
    assert f"{path}: the file has no examples" in err


def test_a_missing_file_is_a_clear_error(tmp_path, capsys):
    code, _, err = validate(capsys, tmp_path / "nope.jsonl")
    assert code == 2
    assert f"{tmp_path / 'nope.jsonl'}: data file not found" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# The data's format against the method, and --format forced.


@pytest.mark.parametrize(
    "rows, method, fmt, fragment",
    [
        (
            [{"prompt": "p", "chosen": "a", "rejected": "b"}],
            "distill",
            "preference",
            "use one of these formats: alpaca, ",
        ),
        ([{"prompt": "p", "response": "r", "score": 0.5}], "sft", "score", "use one of these formats: alpaca, "),
        ([{"text": "raw text"}], "sft", "text", "use one of these formats: alpaca, "),
        ([chat("a", "b")], "pretrain", "messages", "use one of these formats: text,"),
        ([{"text": "t", "label": "l"}], "pretrain", "classification", "use one of these formats: text,"),
    ],
    ids=["preference-for-distill", "score-for-sft", "text-for-sft", "chat-for-pretrain", "classification-for-pretrain"],
)
def test_data_of_the_wrong_kind_for_the_method_is_refused(tmp_path, capsys, rows, method, fmt, fragment):
    path = write_jsonl(tmp_path / "data.jsonl", rows * 3)
    code, _, err = validate(capsys, path, "--method", method)
    assert code == 2
    found = reported(err, path)
    assert list(found) == [1]  # said once, not once per row
    assert f"format '{fmt}' holds" in found[1] and f"method '{method}' cannot train on" in found[1]
    assert fragment in found[1]
    assert f"1 problem(s) in 3 rows (format {fmt})" in err


def test_the_right_kind_for_each_method_passes(tmp_path, capsys):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "some raw text"}, {"text": "more"}])
    code, out, _ = validate(capsys, text, "--method", "pretrain")
    assert code == 0 and "2 examples OK (format text, method pretrain)" in out
    for rows in (
        [chat("a", "b")],
        [{"instruction": "i", "output": "o"}],
        [{"prompt": "p", "completion": "c"}],
        [{"text": "t", "label": 3}],
        [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}],
    ):
        code, out, err = validate(capsys, write_jsonl(tmp_path / "chat.jsonl", rows), "--method", "sft")
        assert (code, err) == (0, ""), rows


def test_a_forced_format_that_does_not_fit_reports_every_row(tmp_path, capsys):
    rows = [{"instruction": f"do {i}", "output": "done"} for i in range(4)]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    code, _, err = validate(capsys, path, "--format", "messages")
    assert code == 2
    found = reported(err, path)
    assert sorted(found) == [1, 2, 3, 4]
    for message in found.values():
        assert "missing field 'messages' (format messages)" in message
        assert "looks like alpaca data: fix: set the format to alpaca or auto" in message
    assert validate(capsys, path, "--format", "alpaca")[0] == 0


def test_a_forced_format_of_the_wrong_kind_is_reported_for_the_file(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 5)
    code, _, err = validate(capsys, path, "--format", "preference", "--method", "distill")
    assert code == 2
    assert f"{path}: format 'preference' holds preference examples, which method 'distill' cannot train on" in err
    assert "1 problem(s) in 5 rows" in err


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("--format", "alpacca", "'alpacca' is not a known data format (did you mean 'alpaca'?)"),
        ("--method", "dpoo", "'dpoo' is not a known method"),
    ],
)
def test_an_unknown_format_or_method_is_a_clear_error(tmp_path, capsys, option, value, fragment):
    path = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b")])
    code, _, err = validate(capsys, path, option, value)
    assert code == 2
    assert fragment in err and "choose one of:" in err


# ---------------------------------------------------------------------------------------------
# Token lengths, with a model's tokenizer.


def test_examples_longer_than_max_length_are_reported(tmp_path, capsys, tiny_model):
    path = write_jsonl(tmp_path / "data.jsonl", [chat("hi", "ok"), "not json", chat("the quick brown fox " * 5, "ok")])
    code, _, err = validate(capsys, path, "--model", tiny_model, "--max-length", 8)
    assert code == 2
    found = reported(err, path)
    assert sorted(found) == [1, 2, 3]  # length problems and row problems in one report, in line order
    assert "invalid JSON" in found[2]
    for number in (1, 3):
        assert "longer than data.max_length=8" in found[number] and "fix:" in found[number]
    lengths = [int(found[number].split()[2]) for number in (1, 3)]  # "example is N tokens, ..."
    assert 8 < lengths[0] < lengths[1]


def test_examples_within_max_length_pass(tmp_path, capsys, tiny_model):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            chat("hi", "ok"),
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ],
    )
    code, out, err = validate(capsys, path, "--model", tiny_model, "--max-length", 1000)
    assert (code, err) == (0, "")
    assert "all within 1000 tokens" in out


def test_an_unknown_model_for_length_checks_is_a_clear_error(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [chat("hi", "ok")])
    code, _, err = validate(capsys, path, "--model", tmp_path / "no-such-model", "--max-length", 8)
    assert code == 2
    assert "no-such-model" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Every format becomes messages, and auto detection finds it.

CONVERSIONS = {
    "messages": (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ciao"},
            ]
        },
        [("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao")],
    ),
    "alpaca": ({"instruction": "Add.", "output": "4"}, [("user", "Add."), ("assistant", "4")]),
    "alpaca-input": (
        {"instruction": "Add.", "input": "2 + 2", "output": "4"},
        [("user", "Add.\n\n2 + 2"), ("assistant", "4")],
    ),
    "alpaca-empty-input": ({"instruction": "Add.", "input": "", "output": "4"}, [("user", "Add."), ("assistant", "4")]),
    "sharegpt": (
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        [("system", "s"), ("user", "q"), ("assistant", "a")],
    ),
    "prompt_completion": ({"prompt": "2 + 2 =", "completion": "4"}, [("user", "2 + 2 ="), ("assistant", "4")]),
    "classification": ({"text": "my card is lost", "label": 7}, [("user", "my card is lost"), ("assistant", "7")]),
    "text": ({"text": "Once upon a time."}, [("text", "Once upon a time.")]),
    "preference": ({"prompt": "q", "chosen": "good", "rejected": "bad"}, [("user", "q"), ("assistant", "good")]),
    "score": ({"prompt": "q", "response": "r", "score": 2}, [("user", "q"), ("assistant", "r")]),
}


@pytest.mark.parametrize("case", CONVERSIONS, ids=CONVERSIONS.keys())
def test_every_format_converts_to_messages_and_is_detected(tmp_path, case):
    row, expected = CONVERSIONS[case]
    name = case.split("-")[0]
    assert detect_format(row) == name
    loaded = load_file(write_jsonl(tmp_path / "data.jsonl", [row]))
    assert loaded.problems == []
    assert loaded.format == name
    [example] = loaded.examples
    assert [(m["role"], m["content"]) for m in example.messages] == expected
    assert example.line == 1
    forced = load_file(tmp_path / "data.jsonl", name)  # the same with the format named
    assert forced.problems == [] and forced.examples[0].messages == example.messages


def test_format_specific_parts_of_an_example(tmp_path):
    def one(row):
        [example] = load_file(write_jsonl(tmp_path / "one.jsonl", [row])).examples
        return example

    assert one({"text": "t", "label": 7}).meta == {"label": "7"}
    assert one({"text": "t", "label": 7}).kind == "chat"
    text = one({"text": "Once upon a time."})
    assert text.kind == "text" and text.text == "Once upon a time."
    preference = one({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert preference.kind == "preference"
    assert preference.rejected == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]
    listed = one(
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
            "chosen": "good",
            "rejected": "bad",
        }
    )
    assert [m["role"] for m in listed.messages] == ["system", "user", "assistant"]
    assert [m["content"] for m in listed.rejected] == ["s", "q", "bad"]
    score = one({"prompt": "q", "response": "r", "score": 2})
    assert score.kind == "score" and score.score == 2.0 and isinstance(score.score, float)


@pytest.mark.parametrize(
    "row, name",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b", "completion": "c"}, "preference"),
        ({"prompt": "p", "response": "r", "score": 1, "completion": "c"}, "score"),
        ({"text": "t", "label": "l"}, "classification"),
        ({"instruction": "i", "input": "", "output": "o", "text": "t"}, "alpaca"),
        ({"messages": [], "text": "t"}, "messages"),
        ({"prompt": "p"}, "prompt"),
        ({}, None),
    ],
)
def test_detection_prefers_the_most_specific_format(row, name):
    assert detect_format(row) == name


# ---------------------------------------------------------------------------------------------
# Real public data files pass (and the preference file is refused for sft).

REAL_FILES = [
    ("banking77/train.jsonl", "classification"),
    ("alpaca_gpt4_demo/train.jsonl", "alpaca"),
    ("sgd_dialogues/dev.jsonl", "messages"),
    ("gsm8k/sft_train.jsonl", "alpaca"),
    ("self_instruct_human/seed_tasks.jsonl", "alpaca"),
]
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")


@needs_shared_data
@pytest.mark.parametrize("name, fmt", REAL_FILES, ids=[name for name, _ in REAL_FILES])
def test_real_files_pass(capsys, name, fmt):
    path = SHARED_DATA / name
    rows = sum(1 for line in path.read_bytes().splitlines() if line.strip())
    code, out, err = validate(capsys, path)
    assert (code, err) == (0, "")
    assert f"{path}: {rows} examples OK (format {fmt}, method sft)" in out


@needs_shared_data
def test_real_dialogues_keep_every_turn():
    loaded = load_file(SHARED_DATA / "sgd_dialogues" / "dev.jsonl")
    assert loaded.problems == []
    assert max(sum(m["role"] == "assistant" for m in e.messages) for e in loaded.examples) > 1


@needs_shared_data
def test_real_preference_file_is_learned_by_sft_and_refused_for_distill(capsys):
    path = SHARED_DATA / "hh_rlhf_harmless" / "test.jsonl"
    loaded = load_file(path)  # no method: every row is valid preference data
    assert loaded.format == "preference" and loaded.problems == []
    assert len(loaded.examples) == loaded.rows > 0
    code, out, _ = validate(capsys, path, "--method", "sft")  # refusal SFT: each pair's chosen reply
    assert code == 0 and f"{loaded.rows} examples OK (format preference, method sft)" in out
    code, _, err = validate(capsys, path, "--method", "distill")
    assert code == 2
    assert f"{path}:1: format 'preference' holds preference examples, which method 'distill' cannot train on" in err
    assert f"1 problem(s) in {loaded.rows} rows (format preference)" in err


# ---------------------------------------------------------------------------------------------
# Training refuses bad data with the same report, or skips and counts it; truncation policies.


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def test_training_refuses_bad_data_with_the_validate_report(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [chat("a", "b"), "{oops", {"messages": []}, chat("c", "d"), {"messages": [{"role": "bot", "content": "x"}]}],
    )
    with pytest.raises(UserError) as caught:
        prepare_data(DataConfig(train=path), tokenizer, ("chat",), "sft", seed=0)
    message = str(caught.value)
    assert "the data has 3 problem(s); nothing was trained" in message and "skip_bad_rows" in message
    problems = check_file(path).problems
    assert [problem.where for problem in problems] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    for problem in problems:
        assert str(problem) in message


def test_training_reports_problems_of_the_validation_file_too(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [chat("a", "b")] * 3)
    validation = write_jsonl(tmp_path / "val.jsonl", [chat("a", "b"), {"messages": "x"}])
    with pytest.raises(UserError, match=f"{validation}:2: field 'messages' must be a list"):
        prepare_data(DataConfig(train=train, validation=validation), tokenizer, ("chat",), "sft", seed=0)


def test_training_refuses_data_of_the_wrong_kind(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2)
    with pytest.raises(UserError, match="format 'preference' holds preference examples, which method 'sft'"):
        prepare_data(DataConfig(train=path), tokenizer, ("chat",), "sft", seed=0)


def test_skip_bad_rows_skips_and_counts_them(tmp_path, tokenizer):
    rows = [chat("a", "b"), "{oops", chat("c", "d"), [1], {"messages": []}, "", chat("e", "f")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    prepared = prepare_data(DataConfig(train=path, skip_bad_rows=True), tokenizer, ("chat",), "sft", seed=0)
    assert prepared.skipped_rows == 3
    assert [example.line for example in prepared.train] == [1, 3, 7]
    assert prepared.summary()["skipped_rows"] == 3 and prepared.format == "messages"


def test_skip_bad_rows_with_nothing_usable_left_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ["{oops", {"messages": []}])
    with pytest.raises(UserError, match="no usable training examples"):
        prepare_data(DataConfig(train=path, skip_bad_rows=True), tokenizer, ("chat",), "sft", seed=0)


@pytest.fixture
def short_and_long(tmp_path, tokenizer):
    """A chat file whose first example is `short` tokens and second `long` tokens, long > short."""
    rows = [chat("hi", "ok"), chat("hi", "the quick brown fox jumps over the lazy dog " * 2)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    encoder = ChatTokenizer(tokenizer)
    short, long = (encoder(example) for example in load_file(path).examples)
    assert len(long) > len(short)
    return path, short, long


def test_truncation_error_reports_the_long_example(short_and_long, tokenizer):
    path, short, long = short_and_long
    with pytest.raises(UserError) as caught:
        prepare_data(DataConfig(train=path, max_length=len(short)), tokenizer, ("chat",), "sft", seed=0)
    message = str(caught.value)
    assert f"{path}:2: example is {len(long)} tokens, longer than data.max_length={len(short)}" in message
    assert f"{path}:1:" not in message


def test_truncation_drop_skips_and_counts_long_examples(short_and_long, tokenizer):
    path, short, _ = short_and_long
    config = DataConfig(train=path, max_length=len(short), truncation="drop")
    prepared = prepare_data(config, tokenizer, ("chat",), "sft", seed=0)
    assert [example.line for example in prepared.train] == [1]
    assert (prepared.dropped_long, prepared.truncated) == (1, 0)


def test_truncation_truncate_keeps_the_first_max_length_tokens(short_and_long, tokenizer):
    path, short, long = short_and_long
    # Long enough to keep part of the long example's assistant turn (its prompt is the short one's).
    max_length = len(long) - 3
    config = DataConfig(train=path, max_length=max_length, truncation="truncate")
    prepared = prepare_data(config, tokenizer, ("chat",), "sft", seed=0)
    kept_short, kept_long = prepared.train
    assert kept_short.input_ids == short.input_ids
    assert kept_long.input_ids == long.input_ids[:max_length]
    assert kept_long.loss_mask == long.loss_mask[:max_length]
    assert (prepared.truncated, prepared.dropped_long) == (1, 0)


def test_truncation_never_keeps_an_example_with_nothing_to_train(tmp_path, tokenizer):
    # The second example's prompt alone is longer than max_length: truncation leaves none of its reply.
    path = write_jsonl(tmp_path / "train.jsonl", [chat("hi", "ok"), chat("the quick brown fox jumps " * 6, "ok")])
    max_length = len(ChatTokenizer(tokenizer)(load_file(path).examples[0]))
    config = DataConfig(train=path, max_length=max_length, truncation="truncate")
    with pytest.raises(UserError, match=f"{path}:2: after truncation to data.max_length={max_length} no trained token"):
        prepare_data(config, tokenizer, ("chat",), "sft", seed=0)


def test_skip_bad_rows_does_not_hide_a_file_of_the_wrong_kind(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="format 'preference' holds preference examples, which method 'sft' cannot"):
        prepare_data(DataConfig(train=path, skip_bad_rows=True), tokenizer, ("chat",), "sft", seed=0)


def test_truncation_split_is_for_text_only(short_and_long, tokenizer):
    path, short, _ = short_and_long
    with pytest.raises(UserError, match="split only applies to raw text"):
        prepare_data(DataConfig(train=path, max_length=len(short), truncation="split"), tokenizer, ("chat",), "sft", 0)


def test_truncation_split_cuts_text_into_max_length_pieces(tmp_path, tokenizer):
    document = "the quick brown fox jumps over the lazy dog. " * 4
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "hi"}, {"text": document}])
    whole = ChatTokenizer(tokenizer).tokenize_text(document)
    max_length = 7
    assert len(whole) > 2 * max_length
    config = DataConfig(train=path, max_length=max_length, truncation="split")
    prepared = prepare_data(config, tokenizer, ("text",), "pretrain", seed=0)
    first, *pieces = prepared.train
    assert first.line == 1
    assert all(0 < len(piece) <= max_length and piece.line == 2 for piece in pieces)
    assert len(pieces) == math.ceil(len(whole) / max_length)
    assert [token for piece in pieces for token in piece.input_ids] == whole.input_ids
    assert prepared.truncated == 1


def test_short_answer_qa_rows_are_detected_with_every_accepted_answer(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"question": "who?", "answer": "Ann", "answers": ["Ann", "Anne"]}, {"question": "what?", "answer": "x"}],
    )
    loaded = load_file(path)
    assert loaded.format == "qa" and not loaded.problems
    assert loaded.examples[0].messages[-1] == {"role": "assistant", "content": "Ann"}
    assert loaded.examples[0].meta["answers"] == ["Ann", "Anne"] and loaded.examples[1].meta["answers"] == ["x"]
