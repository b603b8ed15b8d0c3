"""`tunesmith validate`: every problem in a data file, before any compute."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.validate import load_file, report
from tunesmith.errors import Problem
from tunesmith.registry import methods


@dataclass
class CheckReport:
    problems: list[Problem]
    text: str


def check_file(path: Path, format_name: str = "auto", method: str = "sft", tokenizer: Any = None,
               max_length: int = 1024, columns: dict[str, str] | None = None) -> CheckReport:
    """Parse and convert every row for `method` (`columns` mapping fields to the file's columns first); with a
    model's tokenizer, also check each example's token length."""
    accepts = methods.info(method)["accepts"] if method in methods else None
    if accepts is None:
        methods.get(method, key="--method")
    loaded = load_file(path, format_name, accepts, method, columns=columns)
    problems = list(loaded.problems)
    if tokenizer is not None and loaded.examples:
        from tunesmith.config.schema import DataConfig
        from tunesmith.data.dataset import PreparedData, tokenize_examples
        from tunesmith.data.tokenize import ChatTokenizer

        chat = ChatTokenizer(tokenizer)
        config = DataConfig(train=path, max_length=max_length, columns=columns or {})
        problems += tokenize_examples(loaded.examples, path, config, chat, PreparedData([], [], loaded.format))[1]
    problems.sort(key=lambda p: _line_of(p.where))
    if problems:
        summary = (f" in {loaded.rows} rows (format {loaded.format})" if loaded.read_whole
                   else "; the file was read no further")
        return CheckReport(problems, f"{report(problems, limit=200)}\n{path}: {len(problems)} problem(s){summary}")
    checked = "" if tokenizer is None else f", all within {max_length} tokens"
    return CheckReport([], f"{path}: {len(loaded.examples)} examples OK (format {loaded.format}, method {method}{checked})")


def _line_of(where: str) -> int:
    tail = where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0
