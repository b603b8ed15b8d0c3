"""`tunesmith classify`: label the rows of a data file with a classifier run (method classify); every row comes back
with its answer.

A row is any input a classifier reads: {text}, a classification row {text, label}, or a conversation ({messages},
or another chat format) whose final assistant turn, if it has one, is its label and is not read. The output holds
the input's rows in order, each with `label` (null when the classifier abstains without an out-of-scope label),
`probability` (the top label's calibrated probability), `abstained` and `probabilities` (every label's) added; a
row's own `label` is kept as `expected`. Every bad row is reported before the model is loaded, and the input file
is never written.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config.loading import read_yaml
from tunesmith.data.files import read_rows, write_atomically
from tunesmith.data.formats import Example
from tunesmith.data.validate import load_file
from tunesmith.engine.classifier import Answer, Classifier
from tunesmith.errors import Problem, UserError
from tunesmith.rundir import CONFIG_FILE, is_run_dir, read_run_config

Messages = list[dict[str, str]]
# The example kinds a classifier reads, in order of preference: a {messages} row is then read as a prompt (format
# prompt_messages), its final assistant turn, if any, set aside as the label.
INPUT_KINDS = ("prompt", "chat", "text")
ROW_SHAPES = (
    'write each row as {"text": "..."}, {"text": "...", "label": "..."} or {"messages": [...]} '
    "(a final assistant turn is the label, and is not read)"
)


@dataclass
class ClassifiedFile:
    rows: int
    abstained: int
    output: Path | None  # None: standard output


def classify_file(target: str, data: Path, output: Path | None = None, batch_size: int = 16) -> ClassifiedFile:
    """Label every row of `data` with the classifier run `target`; the rows go to `output` (JSONL, written whole
    or not at all), or to standard output."""
    run_dir = classifier_run(target)
    if output is not None and output.resolve() == data.resolve():
        raise UserError(
            f"--output {output} is the input file, which tunesmith never overwrites; fix: choose another path"
        )
    rows, conversations = read_inputs(data)
    answers = Classifier.load(run_dir).classify(conversations, batch_size)
    lines = "".join(json.dumps(labelled(row, answer), ensure_ascii=False) + "\n" for row, answer in zip(rows, answers))
    if output is None:
        sys.stdout.write(lines)
    else:
        write_atomically(output, lines)
    return ClassifiedFile(len(rows), sum(answer.abstained for answer in answers), output)


def classifier_run(target: str) -> Path:
    """`target` as a finished classifier run; anything else is a UserError saying what it is, and the fix."""
    path = Path(target).expanduser()
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise UserError(
            f"{target}: not a run directory (it has no {CONFIG_FILE}); fix: give the directory of a run trained "
            f"with method: classify"
        )
    if not is_run_dir(path):
        raise UserError(
            f"{path}: the run has not finished (no adapter/ or model/); fix: resume it with "
            f"`tunesmith train {config_file}`"
        )
    method = read_run_config(path).method
    if method != "classify":
        where = read_yaml(config_file)[1].get(("method",), str(config_file))
        raise UserError(
            f"{where}: the run trained method {method}, not classify, so it has no labels to name; fix: give a "
            f"run trained with method: classify (`tunesmith generate` answers with a generating run)"
        )
    return path


def read_inputs(path: Path) -> tuple[list[dict[str, Any]], list[Messages]]:
    """Every row of `path` and the conversation the classifier reads of it; all problems at once, each
    `FILE:LINE: problem; fix` (one problem is one line)."""
    loaded = load_file(path, "auto", INPUT_KINDS, "classify")
    problems = [
        problem if "fix:" in problem.message else Problem(problem.where, f"{problem.message}; fix: {ROW_SHAPES}")
        for problem in loaded.problems
    ]
    conversations = [conversation_of(example) for example in loaded.examples]
    problems += [
        Problem(
            f"{path}:{example.line}",
            f"the row's only turn is its label: there is nothing to classify; fix: {ROW_SHAPES}",
        )
        for example, conversation in zip(loaded.examples, conversations)
        if not conversation
    ]
    if len(problems) == 1:
        raise UserError(str(problems[0]))
    if problems:
        raise UserError(f"{path}: {len(problems)} rows cannot be classified; nothing was written", problems)
    rows = dict(read_rows(path))  # the rows as written: the output keeps their fields
    return [rows[example.line] for example in loaded.examples], conversations


def conversation_of(example: Example) -> Messages:
    """The turns a classifier reads: a text as the user's message; a conversation up to its final assistant turn,
    which is its label."""
    if example.kind == "text":
        return [{"role": "user", "content": example.text}]
    messages = example.messages
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def labelled(row: dict[str, Any], answer: Answer) -> dict[str, Any]:
    """The row with the classifier's answer; a label the row already had is kept as `expected`."""
    own = {"expected": row["label"]} if "label" in row else {}
    return {
        **row,
        **own,
        "label": answer.label,
        "probability": answer.confidence,
        "abstained": answer.abstained,
        "probabilities": answer.probabilities,
    }
