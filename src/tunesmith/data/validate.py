"""Read a data file and check every row before any compute; every problem is `FILE:LINE: problem`.

The file may be JSON Lines, CSV, TSV or Parquet (files.py reads them all into rows); the checks are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from tunesmith.data.files import FileProblem, file_type, is_tabular, read_jsonl, read_rows
from tunesmith.data.formats import Example, RowError, chosen_side, closest_formats, detect_format
from tunesmith.errors import Problem
from tunesmith.registry import formats

__all__ = [
    "LoadedFile",
    "load_file",
    "read_jsonl",
    "read_objects",
    "report",
]  # read_jsonl: datagen.scoring reads it here


@dataclass
class LoadedFile:
    """The usable examples of a file, the problems of the others, and the format that was used."""

    path: Path
    format: str
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rows: int = 0  # non-blank rows read
    file_problems: list[Problem] = field(default_factory=list)  # about the whole file: skip_bad_rows cannot skip them
    read_whole: bool = True  # False: a problem of the whole file (a bad header, a wrong type) stopped the reading


def located(path: Path, number: int) -> str:
    """`FILE:LINE` (or `FILE:ROW` for Parquet); location 0 is the file as a whole."""
    return f"{path}:{number}" if number else str(path)


def read_objects(
    path: Path, problems: list[Problem], columns: dict[str, str] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(location, row) for each row of `path` (any data file type) that is an object; every other row becomes a
    `FILE:LINE` problem appended to `problems`."""
    for number, row in read_rows(path, columns=columns):
        if isinstance(row, RowError):
            problems.append(Problem(located(path, number), str(row)))
        elif not isinstance(row, dict):
            problems.append(
                Problem(located(path, number), f"each line must be a JSON object, got {type(row).__name__}")
            )
        else:
            yield number, row


def load_file(
    path: Path,
    format_name: str = "auto",
    accepts: tuple[str, ...] | None = None,
    method: str = "",
    lines: Iterable[bytes] | None = None,
    columns: dict[str, str] | None = None,
) -> LoadedFile:
    """Parse and convert every row of `path`; problems are collected, never raised one at a time.

    `accepts` lists the example kinds the method can train on (e.g. ("chat", "chosen") for sft); a file in a
    format of another kind is reported once, with the formats that would work. `columns` maps format fields to
    the file's columns (data.columns, --columns).
    """
    chosen = None if format_name == "auto" else formats.get(format_name, key="format")
    loaded = LoadedFile(path, format_name)
    wrong_kind = None
    for number, row in read_rows(path, lines, columns):
        loaded.rows += 1
        where = located(path, number)
        if isinstance(row, FileProblem):
            loaded.file_problems.append(Problem(where, str(row)))
            loaded.read_whole = False
            break
        if isinstance(row, RowError):
            loaded.problems.append(Problem(where, str(row)))
            continue
        if not isinstance(row, dict):
            loaded.problems.append(Problem(where, f"each line must be a JSON object, got {type(row).__name__}"))
            continue
        if chosen is None:
            detected = detect_format(row, accepts)
            if detected is None:
                if is_tabular(path) and lines is None:  # every row has these columns: say it once, for the header
                    header = str(path) if file_type(path) == "parquet" else f"{path}:1"
                    loaded.file_problems.append(Problem(header, undetected_message(row, accepts, "columns")))
                    loaded.read_whole = False
                    break
                loaded.problems.append(Problem(where, undetected_message(row, accepts, "keys")))
                continue
            chosen = formats.get(detected)
            loaded.format = detected
            if accepts is not None and not takes(accepts, chosen.kind):
                wrong_kind = Problem(where, wrong_kind_message(chosen, accepts, method))
        example = convert_row(row, chosen, format_name, accepts, where, loaded)
        if example is not None:
            example.line = number
            loaded.examples.append(example)
    if wrong_kind is None and chosen is not None and accepts is not None and not takes(accepts, chosen.kind):
        wrong_kind = Problem(str(path), wrong_kind_message(chosen, accepts, method))
    if wrong_kind is not None:  # reported once, first; the rows were still checked in their own format
        loaded.file_problems.insert(0, wrong_kind)
        loaded.examples.clear()
    if not loaded.examples and not loaded.problems and not loaded.file_problems:
        loaded.file_problems.append(Problem(str(path), "the file has no examples"))
    loaded.problems[:0] = loaded.file_problems
    return loaded


def convert_row(
    row: dict[str, Any], chosen: Any, format_name: str, accepts: tuple[str, ...] | None, where: str, loaded: LoadedFile
) -> Example | None:
    """One row as an Example of the chosen format, or None with its problem added to `loaded`."""
    try:
        example = chosen.convert(row)
    except RowError as error:
        hint = other_format_hint(row, chosen.name, auto=format_name == "auto")
        loaded.problems.append(Problem(where, f"{error} (format {chosen.name}){hint}"))
        return None
    if example.kind == "preference" and accepts is not None and "preference" not in accepts and "chosen" in accepts:
        example = chosen_side(example)  # supervised tuning on pairs learns their chosen replies
    # Scalar fields the format does not use (ids, categories) stay available, e.g. to slice an evaluation.
    example.fields = {key: value for key, value in row.items() if isinstance(value, (str, int, float, bool))}
    return example


def undetected_message(row: dict[str, Any], accepts: tuple[str, ...] | None, noun: str) -> str:
    """Why no format fits the row: the format it evidently meant and the fields it lacks, in the format's own
    names; or, when it has no field of any format, how to name or map its columns."""
    names = ", ".join(row if noun == "columns" else sorted(row)) or f"no {noun}"  # a header's own order
    closest = closest_formats(row, accepts)
    if closest:
        meant = " or ".join(
            f"format {name} (missing {', '.join(repr(key) for key in missing)})" for name, missing in closest
        )
        name, missing = closest[0]
        return (
            f"cannot tell the data format from the {noun} ({names}): they look like {meant}; fix: add "
            f"{', '.join(missing)}, or map a {'column' if noun == 'columns' else 'field'} to it (data.columns / "
            f"--columns {missing[0]}=YOUR_NAME), or set the format explicitly"
        )
    return (
        f"cannot tell the data format from the {noun} ({names}); fix: name them after a format's fields, or map "
        f"them (data.columns / --columns, e.g. question=q,answer=a); `tunesmith train --help-config` lists the "
        f"formats and their fields"
    )


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
    return (
        f"format '{chosen.name}' holds {chosen.kind} examples, which method '{method}' cannot train on; "
        f"fix: use one of these formats: {', '.join(usable)}, or a method that takes {chosen.kind} data"
    )


def report(problems: list[Problem], limit: int = 50) -> str:
    """The problems as lines, the first `limit` of them, with a count of the rest."""
    lines = [str(problem) for problem in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more problems")
    return "\n".join(lines)
