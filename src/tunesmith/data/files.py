"""Data files → rows: JSON Lines, CSV, TSV and Parquet, the reader chosen by the file's extension.

Every reader yields (location, row). The location is what a problem names after `FILE:`: the line a row is on
(JSON Lines; CSV and TSV: the physical line where the record starts, the header being line 1) or the 1-based
data row (Parquet); 0 means the file as a whole. A row is a dict of the file's columns, or a `RowError` saying
why that row cannot be read, or (JSON Lines) any other JSON value, which validation refuses. Formats and
validation take it from there, the same for every file type. A column mapping (data.columns, --columns)
renames the file's columns to a format's field names before anything else looks at them.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from tunesmith.data.formats import RowError
from tunesmith.errors import UserError, did_you_mean

Rows = Iterator[tuple[int, Any]]
FILE_TYPES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}
DELIMITERS = {"csv": ",", "tsv": "\t"}
BYTE_ORDER_MARK = b"\xef\xbb\xbf"


class FileProblem(RowError):
    """The file as a whole cannot be read (a bad header, a CSV file named .jsonl, a mapped column it lacks):
    reported once, and data.skip_bad_rows cannot skip it."""


def file_type(path: Path) -> str:
    """jsonl, csv, tsv or parquet, from the extension; any other name is read as JSON Lines, as before."""
    return FILE_TYPES.get(path.suffix.lower(), "jsonl")


def is_tabular(path: Path) -> bool:
    """Whether every row of the file has the same columns (a header or a schema names them)."""
    return file_type(path) != "jsonl"


def read_rows(path: Path, lines: Iterable[bytes] | None = None, columns: dict[str, str] | None = None) -> Rows:
    """(location, row) for every row of `path`, its columns renamed by `columns` (field name -> column name).

    `lines`, when given, are a JSON Lines file's lines (e.g. decrypted in memory) and `path` only names them.
    """
    if lines is None and not path.is_file():
        raise UserError(f"{path}: data file not found; fix: check the path (relative to {Path.cwd()})")
    kind = "jsonl" if lines is not None else file_type(path)
    if kind == "parquet":
        rows = read_parquet(path)
    elif kind in DELIMITERS:
        rows = read_delimited(path, DELIMITERS[kind])
    else:
        rows = read_jsonl(path, lines)
    if not columns:
        return rows
    return map_columns(rows, columns, header_line={"csv": 1, "tsv": 1, "parquet": 0}.get(kind))


# ---- JSON Lines ------------------------------------------------------------------------------------------------


def read_jsonl(path: Path, lines: Iterable[bytes] | None = None) -> Rows:
    """(line number, parsed value) or (line number, RowError) for each non-blank line; a .json file holding one
    JSON array gives its elements, each at the line it starts on.

    A first line that is not JSON but holds commas or tabs is a CSV/TSV file under a JSON name: one problem
    saying so, not one "invalid JSON" per line.
    """
    if lines is None and path.suffix.lower() == ".json":
        text = path.read_bytes()
        if text.removeprefix(BYTE_ORDER_MARK).lstrip().startswith(b"["):
            yield from read_json_array(path, text)
            return
        lines = text.splitlines(keepends=True)
    with path.open("rb") if lines is None else contextlib.nullcontext(lines) as handle:
        first = True
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(BYTE_ORDER_MARK)  # a UTF-8 byte-order mark is not part of the JSON
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield (
                    number,
                    RowError(f"not valid UTF-8 (byte {error.start + 1} of the line); fix: save the file as UTF-8"),
                )
                continue
            if not text.strip():
                continue
            try:
                # Without its line break, so a column in the message is a column of this line.
                yield number, json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                if first and looks_delimited(text):
                    yield number, FileProblem(delimited_hint(path, text))
                    return
                yield number, RowError(f"invalid JSON at column {error.colno}: {error.msg}")
            except RecursionError:  # json's parser recurses once per level of nesting
                yield number, RowError("the JSON is nested too deeply to read; fix: flatten this line's value")
            first = False


def looks_delimited(text: str) -> bool:
    """A line that is not JSON and reads like a CSV/TSV header: commas or tabs, and no JSON object or array."""
    return not text.lstrip().startswith(("{", "[")) and ("," in text or "\t" in text)


def delimited_hint(path: Path, text: str) -> str:
    kind = "tsv" if text.count("\t") > text.count(",") else "csv"
    shown = text.strip()[:60]
    if file_type(path) != "jsonl":  # lines handed over in memory (the service's uploads), which are JSON Lines
        return (
            f"the first line is not JSON but looks like a {kind.upper()} header ({shown!r}), and these lines are "
            f"read as JSON Lines; fix: convert the file to JSON Lines, one JSON object per line"
        )
    return (
        f"the first line is not JSON but looks like a {kind.upper()} header ({shown!r}), and a file named "
        f"'{path.name}' is read as JSON Lines; fix: rename it to {path.stem}.{kind} so it is read as "
        f"{'tab' if kind == 'tsv' else 'comma'}-separated values with a header row"
    )


def read_json_array(path: Path, data: bytes) -> Rows:
    """The elements of a .json file holding one JSON array, each at the line it starts on."""
    from tunesmith.data.helpdesk_exports import element_lines  # the tickets importer's array walker, shared

    try:
        text = data.decode("utf-8-sig")
        values = json.loads(text)
    except UnicodeDecodeError as error:
        yield data.count(b"\n", 0, error.start) + 1, FileProblem("not valid UTF-8; fix: save the file as UTF-8")
        return
    except json.JSONDecodeError as error:
        yield (
            error.lineno,
            FileProblem(
                f"invalid JSON at column {error.colno}: {error.msg}; fix: repair the array, "
                f"or write one JSON object per line in a .jsonl file"
            ),
        )
        return
    start = len(text) - len(text.lstrip())
    yield from zip(element_lines(text, start), values)


# ---- CSV and TSV -----------------------------------------------------------------------------------------------


def read_delimited(path: Path, delimiter: str) -> Rows:
    """(line where the record starts, {column: cell}) for every record after the header row.

    Cells are the text as written (empty cells are ""): nothing is guessed into numbers, so "007" stays "007".
    Header names are stripped of surrounding spaces ("question, answer" names `answer`); an all-empty record
    (a trailing ",," row) holds nothing and is skipped like a blank line.
    """
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents in one cell are normal data
    with path.open("rb") as handle:
        lines = decoded_lines(path, handle)
        reader = csv.reader(lines, delimiter=delimiter, strict=True)  # strict: a broken quote is an error, not a merge
        header: list[str] | None = None
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield (
                    start,
                    RowError(
                        f"cannot read the record that starts on this line: {error}; fix: a cell with "
                        f"a quote, a {name_of(delimiter)} or a line break must be quoted as a whole, "
                        f'its own quotes doubled ("")'
                    ),
                )
                continue
            if not any(cell.strip() for cell in cells):
                continue
            if header is None:
                header = [cell.strip() for cell in cells]
                problem = header_problem(header, delimiter)
                if problem:
                    yield start, FileProblem(problem)
                    return
                continue
            if len(cells) != len(header):
                yield start, RowError(cell_count_message(len(cells), header, delimiter))
                continue
            yield start, dict(zip(header, cells))


def decoded_lines(path: Path, handle: Iterable[bytes]) -> Iterator[str]:
    """The file's physical lines as text (so the csv reader's line count is the line number); a line that is
    not UTF-8 stops the file with its line number."""
    for number, raw in enumerate(handle, start=1):
        if number == 1:
            raw = raw.removeprefix(BYTE_ORDER_MARK)  # Excel's "CSV UTF-8" starts with one
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise UserError(
                f"{path}:{number}: not valid UTF-8 (byte {error.start + 1} of the line); fix: save the "
                f"file as UTF-8 (in Excel: 'CSV UTF-8')"
            ) from None


def name_of(delimiter: str) -> str:
    return "tab" if delimiter == "\t" else "comma"


def header_problem(header: list[str], delimiter: str) -> str | None:
    """Why the first record cannot be a header row, or None."""
    if len(header) == 1 and delimiter == "," and (";" in header[0] or "\t" in header[0]):
        other = "semicolons" if ";" in header[0] else "tabs"
        return (
            f"the header {header[0]!r} is one column: the file seems separated by {other}, not commas; fix: save "
            f"it comma-separated{' (or name it .tsv)' if other == 'tabs' else ''}"
        )
    for index, name in enumerate(header, start=1):
        if not name:
            return (
                f"column {index} of the header row has no name; fix: the first line must name every column "
                f"(e.g. question,answer)"
            )
        if name in header[: index - 1]:
            return (
                f"the header row names column '{name}' twice (columns {header.index(name) + 1} and {index}); "
                f"fix: rename one"
            )
    return None


def cell_count_message(count: int, header: list[str], delimiter: str) -> str:
    names = ", ".join(header)
    if count > len(header):
        return (
            f"the record has {count} cells but the header has {len(header)} columns ({names}); fix: quote a "
            f"cell that contains a {name_of(delimiter)}"
        )
    return (
        f"the record has {count} cell{'s' if count != 1 else ''} but the header has {len(header)} columns "
        f"({names}); fix: give every column a cell (an empty one is fine)"
    )


# ---- Parquet ---------------------------------------------------------------------------------------------------


def read_parquet(path: Path, batch_rows: int = 1024) -> Rows:
    """(1-based data row, {column: value}) for every row; nested columns (a messages list) come as lists and
    dicts, nulls as None. Read in batches, so a large file is never held whole."""
    import pyarrow
    import pyarrow.parquet as parquet

    try:
        table = parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:
        yield (
            0,
            FileProblem(
                f"not a readable Parquet file ({error}); fix: write it with pyarrow or pandas "
                f"(DataFrame.to_parquet), or give the data as .jsonl or .csv"
            ),
        )
        return
    number = 0
    for batch in table.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            number += 1
            yield number, row


# ---- column mapping --------------------------------------------------------------------------------------------


def map_columns(rows: Rows, columns: dict[str, str], header_line: int | None = None) -> Rows:
    """Rename each row's columns to field names (`columns`: field -> column); the other columns stay, so
    reward functions and slicing still read them. The first row stands for the file: a mapped column it
    lacks, or a field name it already has as another column, is one problem for the file, located at
    `header_line` (a tabular file's header; 0: the file) or else at that row."""
    checked = False
    for number, row in rows:
        if not isinstance(row, dict):
            yield number, row
            continue
        if not checked:
            checked = True
            problem = mapping_problem(row, columns)
            if problem:
                yield (number if header_line is None else header_line), FileProblem(problem)
                return
        missing = [column for column in columns.values() if column not in row]
        if missing:
            yield (
                number,
                RowError(
                    f"the row has no '{missing[0]}', which the column mapping reads; fix: add it "
                    f"(every row needs the mapped columns)"
                ),
            )
            continue
        mapped = {key: value for key, value in row.items() if key not in columns.values()}
        mapped.update({field: row[column] for field, column in columns.items()})
        yield number, mapped


def mapping_problem(row: dict[str, Any], columns: dict[str, str]) -> str | None:
    """Why the mapping does not fit a file whose columns are those of `row`, or None."""
    present = list(row)
    for field, column in columns.items():
        if column not in row:
            return (
                f"the column mapping (data.columns / --columns) maps {field}={column}, but the file has no column "
                f"'{column}'{closest_column(column, present)}; its columns: {', '.join(present) or 'none'}; fix: "
                f"name one of them"
            )
        if field in row and field not in columns.values() and field != column:
            return (
                f"the column mapping maps {field}={column}, but the file already has a column '{field}', which "
                f"would be lost; fix: map or rename that column too"
            )
    return None


def closest_column(column: str, present: list[str]) -> str:
    """' (did you mean ...?)' for the file's column nearest `column`; a spelling differing only in case first."""
    same = [name for name in present if name.lower() == column.lower()]
    return f" (did you mean '{same[0]}'?)" if same else did_you_mean(column, present)


def parse_columns(text: str | None, option: str = "--columns") -> dict[str, str]:
    """`question=q,answer=a` -> {"question": "q", "answer": "a"}; a malformed pair is a UserError."""
    mapping: dict[str, str] = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        field, sep, column = (part.strip() for part in pair.partition("="))
        if not sep or not field or not column:
            raise UserError(
                f"{option} {text!r}: '{pair}' is not FIELD=COLUMN; fix: write e.g. "
                f"{option} question=q,answer=a (the format's field = your file's column)"
            )
        if field in mapping:
            raise UserError(f"{option} {text!r}: the field '{field}' is mapped twice; fix: map it to one column")
        mapping[field] = column
    return mapping


def write_atomically(path: Path, text: str) -> None:
    """Write `text` beside `path` and rename it into place: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
