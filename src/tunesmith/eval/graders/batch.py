"""`tunesmith grade GRADER DATA`: a grader (a JSON or YAML file holding one grader object) run over a data file whose
rows are the items, each with the sample to grade in one of its fields. Every problem of the grader and of the rows
is reported, located as FILE:LINE, before any sample is graded; then the mean reward comes with a 95% bootstrap
interval, each multi grader's sub-rewards with theirs, and a count of each failure flag.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config.loading import Location, read_yaml
from tunesmith.data.files import read_rows, write_atomically
from tunesmith.errors import Problem, UserError
from tunesmith.eval.graders import Context, Grade, run_grader, validate_grader
from tunesmith.eval.graders.templates import item_problems
from tunesmith.eval.stats import bootstrap_indices, percentile_interval

ROOT = "grader"  # how problems name the file's grader object


def load_grader(path: Path) -> dict[str, Any]:
    """The grader in `path`, validated; each problem located at the line of the key it names."""
    spec, locations = read_yaml(path)
    try:
        validate_grader(spec, ROOT)
    except UserError as error:
        raise UserError(f"{path}: the grader does not parse", [located(p, path, locations) for p in error.problems])
    return spec


def grader_rater(path: Path, task: str, rated: bool) -> Any:
    """`eval --grader PATH`: the grader, read and checked, as the reward task's rater (GraderRater); refused for
    another task or beside a reward model (`rated`)."""
    if task != "reward" or rated:
        raise UserError(
            f"--grader rates the model's own replies (--task reward), in place of a reward model; fix: "
            f"--task reward{' and drop --reward-model' if rated else ''}"
        )
    from tunesmith.eval.graders import GraderRater

    return GraderRater(load_grader(path))


def located(problem: Problem, path: Path, locations: Location) -> Problem:
    """`problem` (its `where` a key path under ROOT) at the line of that key, or of its nearest written parent."""
    keys = tuple(problem.where.split(".")[1:]) if problem.where.startswith(ROOT) else ()
    while keys and keys not in locations:
        keys = keys[:-1]
    return Problem(locations.get(keys, str(path)), f"{problem.where}: {problem.message}")


@dataclass
class GradedFile:
    grades: list[tuple[int, Grade]]  # (line of the row, its grade)
    output: Path | None

    def rewards(self, name: str | None = None) -> np.ndarray:
        return np.array(
            [
                grade.sub_rewards[name] if name else grade.reward
                for _, grade in self.grades
                if name is None or name in grade.sub_rewards
            ]
        )

    def summary(self, resamples: int = 1000, seed: int = 0) -> str:
        lines = [f"graded {len(self.grades)} samples"]
        names = sorted({name for _, grade in self.grades for name in grade.sub_rewards})
        for label, values in [("reward", self.rewards())] + [(f"  {name}", self.rewards(name)) for name in names]:
            means = values[bootstrap_indices(len(values), resamples, seed)].mean(axis=1)
            low, high = percentile_interval(means)
            lines.append(f"{label}: {values.mean():.4f} (95% CI {low:.4f} to {high:.4f}, n={len(values)})")
        failures = Counter(flag for _, grade in self.grades for flag, value in grade.errors.items() if value is True)
        for flag, count in sorted(failures.items()):
            lines.append(f"failed: {count} with {flag} (reward 0; the output file has each one's details)")
        if self.output:
            lines.append(f"wrote {self.output}")
        return "\n".join(lines)


def read_items(path: Path, sample_field: str, spec: dict[str, Any]) -> list[tuple[int, dict[str, Any], str]]:
    """(line, item, sample text) of every row; every row that is not an object with a text `sample_field`, or lacks
    a field the grader's templates name, is a problem, all reported at once."""
    items, problems = [], []
    for line, row in read_rows(path):
        where = f"{path}:{line}"
        if not isinstance(row, dict):
            problems.append(Problem(where, f"{str(row)[:80]!r} is not a JSON object; fix: one object per line"))
        elif not isinstance(row.get(sample_field), str):
            value = row.get(sample_field)
            problems.append(
                Problem(
                    where,
                    f"'{sample_field}' is {'missing' if value is None else repr(value)[:80]}; fix: put the model's "
                    f"reply to grade in '{sample_field}' as text, or name its field with --sample-field",
                )
            )
        else:
            problems += [Problem(where, str(problem)) for problem in item_problems(spec, row, ROOT)]
            items.append((line, row, row[sample_field]))
    if problems:
        raise UserError(f"{path}: {len(problems)} rows cannot be graded", problems)
    if not items:
        raise UserError(f"{path}: no rows; fix: give at least one row to grade")
    return items


def grade_file(grader: Path, data: Path, sample_field: str = "sample", output: Path | None = None) -> GradedFile:
    spec = load_grader(grader)
    items = read_items(data, sample_field, spec)
    context = Context()
    grades = [(line, run_grader(spec, sample, item, context)) for line, item, sample in items]
    if output is not None:
        write_atomically(
            output, "".join(json.dumps({"line": line, **grade.response()}) + "\n" for line, grade in grades)
        )
    return GradedFile(grades, output)
