"""OpenAI's python grader: {"type": "python", "name": ..., "source": ...}, where `source` defines
`grade(sample, item) -> float`. `sample` is the model's reply as OpenAI's guide names it (output_text, and
output_json where the reply is JSON); `item` is the dataset row. The code runs in the sandbox (graders/sandbox.py),
never in tunesmith's process, within the limits OpenAI documents: source under 256 kB, 2 minutes, 2 GB of memory, and
no network.

Failures of one sample, as OpenAI flags them:
- the code raised, died, or returned something other than a finite number: python_grader_runtime_error, with the
  exception's last line (and the line of the source it came from) in the details;
- it was still running at the time limit: unresponsive_reward_error. OpenAI does not document which flag a timeout
  sets; of its flags this is the one that names a reward that never came;
- the sandbox could not start: python_grader_server_error.

`image_tag` is refused. The SDK marks it optional, but it names the image OpenAI runs the code in (its Python and
its packages); nothing documents it as harmless to ignore, and tunesmith can only run this machine's interpreter,
so a grader pinned to an image would silently run elsewhere. `pass_threshold` (the evals form) is checked and
accepted; it does not change the score.
"""

from __future__ import annotations

import ast
import math
import sys
from dataclasses import asdict
from typing import Any

from tunesmith.errors import Problem
from tunesmith.eval.graders import Context, GraderFailure, Sample, check_keys, sandbox
from tunesmith.registry import graders

SOURCE_BYTES = 256 * 1024  # OpenAI's graders guide: the code must be less than 256 kB
# the guide again: grading is limited to 2 minutes, with 2 GB of memory and 1 GB of disk
LIMITS = sandbox.Limits(seconds=120.0, memory_bytes=2 * sandbox.GIB, file_bytes=sandbox.GIB)
FIX = "fix: define def grade(sample, item) -> float at the top level of the source"


@graders.register("python")
class Python:
    """`grade(sample, item)` of the spec's source, run in the sandbox."""

    @staticmethod
    def check(spec: dict[str, Any], where: str) -> list[Problem]:
        problems = check_keys(spec, where, ("name", "source"), ("image_tag", "pass_threshold"))
        if spec.get("image_tag") is not None:
            problems.append(Problem(f"{where}.image_tag", image_tag_refusal(spec["image_tag"])))
        threshold = spec.get("pass_threshold", 0.0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            problems.append(Problem(f"{where}.pass_threshold", f"{threshold!r} is not a number; fix: give e.g. 0.5"))
        if "source" in spec:
            problems += source_problems(spec["source"], f"{where}.source")
        return problems

    @staticmethod
    def grade(spec: dict[str, Any], sample: Sample, item: dict[str, Any], context: Context) -> float:
        return run_grade(spec["source"], sample, item)


def image_tag_refusal(tag: Any) -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    return (
        f"{tag!r}: tunesmith runs python graders with this machine's Python {version} and its installed packages, "
        "not OpenAI's images; fix: remove image_tag (and install here any package the grader imports)"
    )


def source_problems(source: Any, where: str) -> list[Problem]:
    """Why `source` cannot be a python grader: not text, too large, not Python, or no grade(sample, item)."""
    if not isinstance(source, str) or not source.strip():
        return [Problem(where, f"{str(source)[:80]!r} is not Python source; fix: give the code as text. {FIX}")]
    size = len(source.encode("utf-8"))
    if size >= SOURCE_BYTES:
        return [Problem(where, f"is {size:,} bytes; OpenAI takes less than {SOURCE_BYTES:,}; fix: shorten it")]
    try:
        tree = ast.parse(source, filename=where)
        compile(tree, where, "exec")  # what parsing lets through: 'return' outside a function, and the like
    except SyntaxError as error:
        text = f' ("{error.text.strip()}")' if error.text and error.text.strip() else ""
        message = f"line {error.lineno}, column {error.offset}: {error.msg}{text}; fix: correct the Python syntax"
        return [Problem(where, message)]
    except ValueError as error:  # a null byte in the source
        return [Problem(where, f"does not compile: {error}; fix: remove it")]
    return grade_problems(tree, where)


def grade_problems(tree: ast.Module, where: str) -> list[Problem]:
    """Whether the module defines grade at the top level, callable as grade(sample, item)."""
    defined = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    grade = next((node for node in reversed(defined) if node.name == "grade"), None)  # the last one is what runs
    if grade is None:
        return [Problem(where, f"defines no top-level function grade; {FIX}")]
    if isinstance(grade, ast.AsyncFunctionDef):
        return [Problem(where, f"line {grade.lineno}: grade is async, and its result would not be a number; {FIX}")]
    arguments = grade.args
    positional = [*arguments.posonlyargs, *arguments.args]
    required = len(positional) - len(arguments.defaults)
    keyword_only = [arg.arg for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults) if default is None]
    if required > 2 or (len(positional) < 2 and arguments.vararg is None) or keyword_only:
        names = ", ".join(arg.arg for arg in positional) or "no parameters"
        message = f"line {grade.lineno}: grade takes ({names}), but it is called as grade(sample, item); {FIX}"
        return [Problem(where, message)]
    return []


def run_grade(source: str, sample: Sample, item: dict[str, Any], limits: sandbox.Limits = LIMITS) -> float:
    """grade(sample, item) of `source`, in the sandbox. Raises GraderFailure with OpenAI's flag for this sample."""
    try:
        score = sandbox.run_function(source, "grade", [asdict(sample), item], limits, filename="grader source")
    except sandbox.SandboxTimeout as error:
        raise GraderFailure("unresponsive_reward_error", f"grade did not return: {error}") from None
    except sandbox.SandboxFailed as error:
        raise GraderFailure("python_grader_runtime_error", str(error)) from None
    except sandbox.SandboxUnavailable as error:
        raise GraderFailure("python_grader_server_error", str(error)) from None
    if isinstance(score, (int, float)) and math.isfinite(score):  # True and False count, as float() takes them
        return float(score)
    shown = repr(score) if len(repr(score)) <= 80 else repr(score)[:77] + "..."
    message = f"grade returned {shown}, not a finite number; fix: return a float from 0 to 1"
    raise GraderFailure("python_grader_runtime_error", message)
