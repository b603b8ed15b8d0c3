"""Data files of every type: CSV, TSV and Parquet rows become the same Examples as their JSON Lines twins.

Each problem names `FILE:LINE` (CSV/TSV: the line a record starts on, the header being line 1; Parquet: the
1-based data row); a column mapping renames the file's columns to a format's fields; a CSV file named .jsonl
is one problem, not one per line; and the format list of `--help-config` comes from the format registry.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pyarrow
import pyarrow.parquet as parquet
import pytest
from conftest import write_jsonl

from tunesmith.cli import main
from tunesmith.config.loading import load_config, resolve_paths
from tunesmith.data.dataset import load_examples
from tunesmith.data.files import parse_columns, read_rows
from tunesmith.data.formats import detect_format, format_table
from tunesmith.data.validate import load_file
from tunesmith.errors import UserError
from tunesmith.registry import formats, methods


def write_delimited(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    """Rows as CSV/TSV written by the csv module (cells with commas, quotes or line breaks quoted)."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def validate(capsys, *argv) -> tuple[int, str, str]:
    code = main(["validate", *(str(arg) for arg in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def signature(example) -> tuple:
    """What an Example holds for training and evaluation, without the line it came from."""
    return example.kind, example.messages, example.rejected, example.score, example.meta, example.fields


# Rows of text cells only, so a CSV cell ("the text as written") equals the JSON value.
ROUND_TRIP = {
    "qa": [
        {"question": "What is the capital of France?", "answer": "Paris"},
        {"question": 'Who wrote "Hamlet", and when?', "answer": "Shakespeare,\nabout 1600"},
    ],
    "alpaca": [
        {"instruction": "Translate to French.", "input": "cheese", "output": "fromage"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ],  # an empty cell: alpaca's optional input
    "classification": [
        {"text": "my card has not arrived", "label": "card_arrival", "ticket": "T-007"},
        {"text": "I lost my phone", "label": "lost_or_stolen_phone", "ticket": "T-008"},
    ],
    "preference": [{"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Go away."}],
    "prompt_completion": [{"prompt": "2 + 2 =", "completion": "4"}],
}


@pytest.mark.parametrize("name", ROUND_TRIP)
@pytest.mark.parametrize("suffix", ["csv", "tsv", "parquet"])
def test_tabular_files_give_the_examples_of_their_jsonl_twin(tmp_path, name, suffix):
    rows = ROUND_TRIP[name]
    expected = load_file(write_jsonl(tmp_path / "data.jsonl", rows))
    path = tmp_path / f"data.{suffix}"
    if suffix == "parquet":
        write_parquet(path, rows)
    else:
        write_delimited(path, rows, "\t" if suffix == "tsv" else ",")
    loaded = load_file(path)
    assert (loaded.problems, loaded.format) == ([], name)
    assert [signature(e) for e in loaded.examples] == [signature(e) for e in expected.examples]


def test_parquet_keeps_nested_messages_and_numbers(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "id": 3},
        {"messages": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}], "id": 4},
    ]
    expected = load_file(write_jsonl(tmp_path / "chat.jsonl", rows))
    loaded = load_file(write_parquet(tmp_path / "chat.parquet", rows))
    assert loaded.format == "messages" and [e.line for e in loaded.examples] == [1, 2]  # data rows, 1-based
    assert [signature(e) for e in loaded.examples] == [signature(e) for e in expected.examples]
    scored = load_file(write_parquet(tmp_path / "score.parquet", [{"prompt": "p", "response": "r", "score": 0.25}]))
    assert scored.format == "score" and scored.examples[0].score == 0.25


def test_a_score_cell_is_read_as_its_number(tmp_path):
    path = write_delimited(
        tmp_path / "scores.csv",
        [{"prompt": "p", "response": "r", "score": "0.8"}, {"prompt": "p", "response": "s", "score": "high"}],
    )
    loaded = load_file(path)
    assert loaded.examples[0].score == 0.8
    assert [str(p) for p in loaded.problems] == [
        f"{path}:3: field 'score' must be a finite number, got str 'high' (format score)"
    ]


def test_csv_lines_count_physical_lines_from_the_header(tmp_path):
    path = tmp_path / "qa.csv"
    # line 1 header, 2-3 one record over two lines, 4 blank, 5 an all-empty record, 6 a record, 7 an empty answer
    path.write_bytes(b'\xef\xbb\xbfquestion,answer\r\n"two\nlines?",yes\r\n\r\n,\r\nthree?,"a, b"\r\nfour?,\r\n')
    loaded = load_file(path)
    assert [(e.line, e.messages[0]["content"], e.messages[1]["content"]) for e in loaded.examples] == [
        (2, "two\nlines?", "yes"),
        (6, "three?", "a, b"),
    ]
    assert [str(p) for p in loaded.problems] == [f"{path}:7: field 'answer' is empty (format qa)"]
    assert loaded.rows == 3


@pytest.mark.parametrize(
    "lines, line, fragment",
    [
        (
            "question,answer\nq1,a1\nq2,a2,extra\n",
            3,
            "the record has 3 cells but the header has 2 columns (question, "
            "answer); fix: quote a cell that contains a comma",
        ),
        ("question,answer\nq1,a1\nq2\n", 3, "the record has 1 cell but the header has 2 columns"),
        (
            'question,answer\nq1,a1\n"q2,a2\nq3,a3\n',
            3,
            "cannot read the record that starts on this line: unexpected end",
        ),
        ('question,answer\nq1,"a"b\nq2,a2\n', 2, "cannot read the record that starts on this line"),
    ],
    ids=["too-many-cells", "too-few-cells", "unclosed-quote", "stray-quote"],
)
def test_a_bad_csv_record_is_reported_at_the_line_it_starts(tmp_path, capsys, lines, line, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(lines, encoding="utf-8")
    code, _, err = validate(capsys, path)
    assert code == 2
    assert f"{path}:{line}: {fragment}" in err
    assert f"{path}:1:" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "header, fragment",
    [
        ("question,,answer", "column 2 of the header row has no name"),
        ("question,answer,question", "the header row names column 'question' twice (columns 1 and 3)"),
        ("question;answer", "the header 'question;answer' is one column: the file seems separated by semicolons"),
    ],
)
def test_a_bad_header_is_one_problem_for_the_file(tmp_path, capsys, header, fragment):
    path = tmp_path / "data.csv"
    path.write_text(f"{header}\nq,,a\nq2,,a2\n", encoding="utf-8")
    code, _, err = validate(capsys, path)
    assert code == 2
    assert f"{path}:1: {fragment}" in err and err.count(str(path)) == 2  # the problem, then the summary


def test_columns_that_fit_no_format_are_one_problem_at_the_header(tmp_path, capsys):
    path = write_delimited(tmp_path / "data.csv", [{"q": f"question {i}", "a": "answer"} for i in range(5)])
    code, _, err = validate(capsys, path)
    assert code == 2
    assert f"{path}:1: cannot tell the data format from the columns (q, a)" in err and "--columns" in err
    assert f"{path}:2" not in err


def test_a_bad_parquet_row_is_reported_at_its_row(tmp_path, capsys):
    rows = [
        {"question": "q1", "answer": "a1"},
        {"question": "q2", "answer": "a2"},
        {"question": "q3", "answer": None},
        {"question": "q4", "answer": ""},
    ]
    path = write_parquet(tmp_path / "qa.parquet", rows)
    code, _, err = validate(capsys, path)
    assert code == 2
    assert f"{path}:3: field 'answer' must be a string, got NoneType" in err
    assert f"{path}:4: field 'answer' is empty" in err
    assert "2 problem(s) in 4 rows (format qa)" in err


def test_a_file_named_parquet_that_is_not_one_is_one_problem(tmp_path, capsys):
    path = tmp_path / "data.parquet"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    code, _, err = validate(capsys, path)
    assert code == 2
    assert f"{path}: not a readable Parquet file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "content, hint",
    [
        ("question,answer\nq1,a1\nq2,a2\n", "rename it to data.csv"),
        ("question\tanswer\nq1\ta1\nq2\ta2\n", "rename it to data.tsv"),
    ],
)
def test_a_csv_file_named_jsonl_is_one_problem_with_the_fix(tmp_path, capsys, content, hint):
    path = tmp_path / "data.jsonl"
    path.write_text(content * 20, encoding="utf-8")  # 60 lines: still one problem
    code, _, err = validate(capsys, path)
    assert code == 2
    assert len(re.findall(rf"{re.escape(str(path))}:\d+:", err)) == 1 and f"{path}:1: the first line is not JSON" in err
    assert hint in err and "invalid JSON" not in err
    assert "the file was read no further" in err


def test_broken_json_lines_are_still_reported_one_by_one(tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        ['{"question": "q", "answer": "a",', '{"question": "q", "answer": "b"}', '{"question": "q" "answer": "c"}'],
    )
    code, _, err = validate(capsys, path)
    assert code == 2
    assert f"{path}:1: invalid JSON" in err and f"{path}:3: invalid JSON" in err and "rename" not in err


def test_a_json_array_file_keeps_the_line_of_each_element(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"question": "q1", "answer": "a1"},\n  {"question": "q2",\n   "answer": ""}\n]\n')
    loaded = load_file(path)
    assert [e.line for e in loaded.examples] == [2]
    assert [str(p) for p in loaded.problems] == [f"{path}:3: field 'answer' is empty (format qa)"]


def test_invalid_utf8_in_a_csv_file_names_its_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"question,answer\nq1,a1\nq2,caf\xe9\n")
    with pytest.raises(UserError, match=rf"{path}:3: not valid UTF-8 .* fix: save the file as UTF-8"):
        load_file(path)


# ---------------------------------------------------------------------------------------------
# The field the user is missing, in the format they evidently meant.


@pytest.mark.parametrize("forced", [None, "qa"])
def test_a_question_without_its_answer_is_told_about_answer(tmp_path, capsys, forced):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "d"}])
    code, _, err = validate(capsys, path, *(["--format", forced] if forced else []))
    assert code == 2
    assert "'answer'" in err and "answers" not in err
    if forced:
        assert f"{path}:1: missing field 'answer' (format qa)" in err
    else:
        assert "they look like format qa (missing 'answer')" in err


def test_a_bad_optional_answers_list_is_named_as_optional(tmp_path):
    loaded = load_file(write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "answers": "a"}]))
    assert "field 'answers' (optional) must be a list of strings" in loaded.problems[0].message


def test_the_closest_format_of_the_method_is_named(tmp_path, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "a", "rejected": "b"}])
    code, _, err = validate(capsys, path, "--method", "dpo")
    assert code == 2 and "format preference (missing 'prompt')" in err


# ---------------------------------------------------------------------------------------------
# Column mapping: data.columns and --columns.


def test_columns_map_a_file_onto_a_format_and_keep_the_others(tmp_path, capsys):
    path = write_delimited(tmp_path / "faq.csv", [{"q": "Hours?", "a": "9 to 5", "topic": "opening"}])
    code, out, _ = validate(capsys, path, "--columns", "question=q,answer=a")
    assert code == 0 and "1 examples OK (format qa" in out
    [example] = load_file(path, columns={"question": "q", "answer": "a"}).examples
    assert example.messages == [{"role": "user", "content": "Hours?"}, {"role": "assistant", "content": "9 to 5"}]
    assert example.fields == {"question": "Hours?", "answer": "9 to 5", "topic": "opening"}  # nothing dropped


def test_columns_apply_to_jsonl_and_parquet_too(tmp_path):
    rows = [{"body": "great", "sentiment": "positive"}, {"body": "awful", "sentiment": "negative"}]
    mapping = {"text": "body", "label": "sentiment"}
    for path in (write_jsonl(tmp_path / "d.jsonl", rows), write_parquet(tmp_path / "d.parquet", rows)):
        loaded = load_file(path, columns=mapping)
        assert loaded.format == "classification" and [e.meta["label"] for e in loaded.examples] == [
            "positive",
            "negative",
        ]


@pytest.mark.parametrize("suffix, where", [("csv", ":1"), ("parquet", ""), ("jsonl", ":1")])
def test_a_mapped_column_the_file_lacks_is_one_problem_listing_its_columns(tmp_path, capsys, suffix, where):
    rows = [{"Question": "q", "Answer": "a"}] * 3
    path = tmp_path / f"faq.{suffix}"
    {"csv": write_delimited, "parquet": write_parquet, "jsonl": write_jsonl}[suffix](path, rows)
    code, _, err = validate(capsys, path, "--columns", "question=Question,answer=answer")
    assert code == 2
    assert (
        f"{path}{where}: the column mapping (data.columns / --columns) maps answer=answer, but the file has no "
        f"column 'answer' (did you mean 'Answer'?); its columns: Question, Answer"
    ) in err
    assert err.count(f"{path}") == 2


def test_a_mapping_that_would_overwrite_a_column_is_refused(tmp_path):
    path = write_delimited(tmp_path / "d.csv", [{"text": "old", "body": "new", "label": "x"}])
    [problem] = load_file(path, columns={"text": "body"}).problems
    assert "the file already has a column 'text', which would be lost" in problem.message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("question", "'question' is not FIELD=COLUMN; fix: write e.g. --columns question=q,answer=a"),
        ("question=", "'question=' is not FIELD=COLUMN"),
        ("=q", "'=q' is not FIELD=COLUMN"),
        ("question=q,question=r", "the field 'question' is mapped twice"),
    ],
)
def test_a_malformed_columns_option_is_a_clear_error(tmp_path, capsys, text, fragment):
    path = write_delimited(tmp_path / "d.csv", [{"q": "x", "a": "y"}])
    code, _, err = validate(capsys, path, "--columns", text)
    assert code == 2 and f"--columns {text!r}: {fragment}" in err and "Traceback" not in err


def test_parse_columns():
    assert parse_columns(" question = q , answer=a ,") == {"question": "q", "answer": "a"}
    assert parse_columns(None) == {} and parse_columns("") == {}


def test_data_columns_in_a_config_and_on_the_command_line(tmp_path):
    path = write_delimited(tmp_path / "faq.csv", [{"q": "x", "a": "y"}])
    config = load_config(None, [f"data.train={path}", "data.columns.question=q", "data.columns.answer=a"])
    assert config.data.columns == {"question": "q", "answer": "a"}
    with pytest.raises(UserError, match="data.format.*not a known data format \\(did you mean 'qa'\\?\\)"):
        load_config(None, [f"data.train={path}", "data.format=qaa"])
    assert [e.fields["question"] for e in load_examples(path, columns=config.data.columns)] == ["x"]


# ---------------------------------------------------------------------------------------------
# The formats, documented from the registry.


def test_every_registered_format_is_listed_in_help_config(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help-config"])
    assert exited.value.code == 0
    listing = capsys.readouterr().out.split("data formats", 1)[1]
    for name in formats.names():
        entry = formats.get(name)
        assert f"  {name} " in listing and entry.example_line in listing and entry.summary in listing
    assert "question,answer" in listing  # the CSV header of qa


def test_every_format_example_is_a_valid_row_of_that_format():
    for name in formats.names():
        entry = formats.get(name)
        assert entry.summary and entry.example, name
        example = entry.convert(json.loads(entry.example_line))
        assert example.kind == entry.kind
        assert detect_format(entry.example, (entry.kind,)) == name


def test_the_readme_table_is_generated_from_the_registry():
    table = format_table()
    assert all(f"| `{name}` |" in table for name in formats.names())
    assert "`question,answer`" in table and "(nested: JSON Lines or Parquet)" in table
    # The README shows this very table: a format added, renamed or re-described must be pasted there again.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert table in readme, "README.md's data-format table is stale: paste format_table()'s output into it"


def test_read_rows_gives_locations_and_rows(tmp_path):
    path = write_delimited(tmp_path / "d.tsv", [{"a": "1", "b": "x y"}], "\t")
    assert list(read_rows(path)) == [(2, {"a": "1", "b": "x y"})]
    assert list(read_rows(path, columns={"text": "b"})) == [(2, {"a": "1", "text": "x y"})]


# ---------------------------------------------------------------------------------------------
# End to end: training from a CSV file with a column mapping.


def test_training_from_a_csv_file_with_mapped_columns(tmp_path, tiny_model):
    rows = [
        {"Q": f"my card has not arrived {i}", "A": "card_arrival" if i % 2 else "refund", "id": str(i)}
        for i in range(8)
    ]
    train = write_delimited(tmp_path / "train.csv", rows)
    config = resolve_paths(
        load_config(
            None,
            [
                f"model={tiny_model}",
                f"data.train={train}",
                "data.columns.question=Q",
                "data.columns.answer=A",
                f"output_dir={tmp_path / 'run'}",
                "data.max_length=64",
                "train.batch_size=4",
                "train.max_steps=2",
                "train.progress=false",
                "train.eval_every=100",
                "train.save_every=100",
                "train.threads=1",
            ],
        )
    )
    result = methods.get(config.method)(config)
    assert result.steps == 2 and result.final_loss is not None
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    summary = (tmp_path / "run" / "config.yaml").read_text()
    assert "question: Q" in summary  # the mapping is part of the resolved config


def test_evaluating_a_csv_file_with_columns(tmp_path, tiny_model, capsys):
    data = write_delimited(tmp_path / "test.csv", [{"Q": "2 + 2 =", "A": "4"}, {"Q": "3 + 3 =", "A": "6"}])
    assert (
        main(
            [
                "eval",
                str(tiny_model),
                "--data",
                str(data),
                "--columns",
                "question=Q,answer=A",
                "--task",
                "exact_match",
                "--resamples",
                "20",
                "--max-new-tokens",
                "4",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["metrics"]["exact_match"]["n"] == 2
    capsys.readouterr()
    assert main(["eval", str(tiny_model), "--data", str(data), "--task", "exact_match"]) == 2
    assert "cannot tell the data format from the columns (Q, A)" in capsys.readouterr().err
