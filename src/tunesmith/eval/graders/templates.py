"""OpenAI's grader templates: in a grader's `input` or `reference`, each `{{ namespace.variable }}` is replaced by
that variable's value for the sample being graded.

- Two namespaces: `item` (the dataset row) and `sample` (the model's reply: `output_text`, and `output_json` where
  the reply is JSON). OpenAI's samples also carry output_tools, choices and output_audio; tunesmith grades text
  replies, so a template naming those is refused at check time rather than failing on every sample.
- Nested values are reached with a JSON-path-like path: `item.answer.value`, `item.choices[0]` (also
  `item.choices.0`), `sample.output_json.steps[2].result`. Spaces inside the braces are allowed, not inside the path.
- A value that is not a string is written as JSON (`{"a": 1}`, `[1, 2]`, `3.5`, `true`, `null`): OpenAI's guide does
  not say how a non-string renders; the rows come from JSON, and writing the value back as JSON gives the text the
  user sees in their data file, not Python's spelling (`True`, `None`, single quotes).

`check_template` finds what can be known before grading (syntax, namespaces, sample fields); `missing_fields` and
`item_problems` compare a template or a whole grader with a data row, so a config is refused before training when
the data lacks a field; `render_template` fails one sample with OpenAI's flags: invalid_variable_error when the item
lacks the field, sample_parse_error when the template reads `sample.output_json` of a reply that is not JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import Problem, did_you_mean
from tunesmith.eval.graders import GraderFailure, Sample, grader_templates

NAMESPACES = ("item", "sample")
SAMPLE_FIELDS = ("output_text", "output_json")
SAMPLE_FIELDS_NOT_KEPT = ("output_tools", "choices", "output_audio")  # OpenAI's, for tool, chat and audio samples
PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
# a path: a namespace, then `.key` or `[index]` steps; a key is anything but spaces, dots, brackets and braces
PATH = re.compile(r"([A-Za-z_]\w*)((?:\.[^\s.\[\]{}]+|\[\d+\])+)")
STEP = re.compile(r"\.([^\s.\[\]{}]+)|\[(\d+)\]")


class TemplateError(ValueError):
    """A template that does not parse: its message names each bad placeholder and the fix."""


@dataclass(frozen=True)
class Variable:
    """One `{{ ... }}` of a template: `text` as written (spaces trimmed), its namespace, and its steps below the
    namespace: keys (str) and list indexes (int)."""

    text: str
    namespace: str
    path: tuple[str | int, ...]

    @property
    def field(self) -> str:
        """The top-level field it reads: `answer` for item.answer.value."""
        return str(self.path[0])


def parse_template(template: str) -> tuple[list[Variable], list[str]]:
    """The variables `template` names, in order, and a sentence for each placeholder that is not one."""
    variables, errors = [], []
    unclosed = PLACEHOLDER.sub("", template)
    if "{{" in unclosed:
        errors.append("a '{{' is never closed; fix: close it with '}}'")
    for match in PLACEHOLDER.finditer(template):
        text = match.group(1).strip()
        parsed = PATH.fullmatch(text)
        if parsed is None:
            errors.append(
                f"'{match.group(0)}' is not a variable; fix: write {{{{ namespace.variable }}}} with namespace item "
                "or sample, e.g. {{ item.answer }}, {{ item.answer.choices[0] }} or {{ sample.output_text }}"
            )
            continue
        namespace, steps = parsed.groups()
        if namespace not in NAMESPACES:
            errors.append(
                f"'{text}': '{namespace}' is not a namespace{did_you_mean(namespace, NAMESPACES)}; "
                "fix: begin with item (the data row) or sample (the model's reply)"
            )
            continue
        if steps.startswith("["):
            errors.append(f"'{text}': {namespace} is an object, not a list; fix: name a field, e.g. {namespace}.answer")
            continue
        path = tuple(key if key else int(index) for key, index in STEP.findall(steps))
        variables.append(Variable(text, namespace, path))
    return variables, errors


def template_variables(template: str) -> list[Variable]:
    """The variables `template` names, in order; a TemplateError when a placeholder is not one."""
    variables, errors = parse_template(template)
    if errors:
        raise TemplateError("; ".join(errors))
    return variables


def check_template(template: Any, where: str) -> list[Problem]:
    """The problems of one templated field, at `where`: not a string, a bad placeholder, a sample field tunesmith
    does not have."""
    if not isinstance(template, str):
        return [Problem(where, f"{template!r} is not a string; fix: give text, which may hold {{{{ item.field }}}}")]
    variables, errors = parse_template(template)
    problems = [Problem(where, error) for error in errors]
    for variable in variables:
        if variable.namespace == "item" or variable.field == "output_json" or variable.path == ("output_text",):
            continue
        if variable.field == "output_text":
            reason = "output_text is the reply's text, which has no fields"
        elif variable.field in SAMPLE_FIELDS_NOT_KEPT:
            reason = f"tunesmith's samples are text replies, without {variable.field}"
        else:
            reason = f"the sample has no field '{variable.field}'{did_you_mean(variable.field, SAMPLE_FIELDS)}"
        fix = "use sample.output_text, or sample.output_json... (the reply parsed as JSON)"
        problems.append(Problem(where, f"'{variable.text}': {reason}; fix: {fix}"))
    return problems


def lookup(value: Any, path: tuple[str | int, ...]) -> tuple[Any, str | None]:
    """(the value at `path` below `value`, None), or (None, the step that is not there)."""
    for step in path:
        if isinstance(value, dict) and str(step) in value:
            value = value[str(step)]
        elif isinstance(value, list) and str(step).isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            return None, f"[{step}]" if isinstance(step, int) else str(step)
    return value, None


def missing_fields(template: str, item: dict[str, Any], where: str) -> list[Problem]:
    """A problem, at `where`, for each item variable of `template` that `item` (one data row) lacks: what refuses a
    config whose data cannot fill its grader, before any sample is drawn."""
    problems = []
    for variable in parse_template(template)[0]:
        if variable.namespace != "item":
            continue
        _, missing = lookup(item, variable.path)
        if missing is not None:
            problems.append(
                Problem(
                    where,
                    f"{{{{ {variable.text} }}}} names '{missing}', which the data row lacks; fix: add "
                    f"'{variable.field}' to every row, or change the template to a field the rows have",
                )
            )
    return problems


def item_problems(spec: dict[str, Any], item: dict[str, Any], where: str = "grader") -> list[Problem]:
    """The problems of grading `item` with `spec` (a checked grader): each templated field of it, or of its
    sub-graders, that names an item field this row lacks."""
    return [problem for at, text in grader_templates(spec, where) for problem in missing_fields(text, item, at)]


def item_fields(spec: dict[str, Any], where: str = "grader") -> list[str]:
    """The top-level item fields `spec`'s templates read (`{{ item.answer.value }}`: answer), in order, once each."""
    variables = [variable for _, text in grader_templates(spec, where) for variable in parse_template(text)[0]]
    return list(dict.fromkeys(variable.field for variable in variables if variable.namespace == "item"))


def render_value(value: Any) -> str:
    """How a variable's value is written into the text: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def resolve(variable: Variable, sample: Sample, item: dict[str, Any]) -> Any:
    """The value of `variable` for this sample and item; GraderFailure when it has none."""
    if variable.namespace == "item":
        value, missing = lookup(item, variable.path)
        if missing is not None:
            raise GraderFailure("invalid_variable_error", f"{{{{ {variable.text} }}}}: the item has no '{missing}'")
        return value
    if variable.field == "output_json" and sample.output_json is None:
        raise GraderFailure(
            "sample_parse_error", f"{{{{ {variable.text} }}}}: the sample is not JSON: {sample.output_text[:200]!r}"
        )
    if variable.field not in SAMPLE_FIELDS:
        raise GraderFailure("invalid_variable_error", f"{{{{ {variable.text} }}}}: the sample has no such field")
    value, missing = lookup({"output_text": sample.output_text, "output_json": sample.output_json}, variable.path)
    if missing is not None:
        raise GraderFailure("invalid_variable_error", f"{{{{ {variable.text} }}}}: the sample has no '{missing}'")
    return value


def render_template(template: str, sample: Sample, item: dict[str, Any]) -> str:
    """`template` with each variable replaced by its value for this sample and item. Raises GraderFailure:
    invalid_variable_error for a field that is not there (or a template that does not parse), sample_parse_error
    for sample.output_json of a reply that is not JSON."""
    variables, errors = parse_template(template)
    if errors:
        raise GraderFailure("invalid_variable_error", "; ".join(errors))
    values = iter([render_value(resolve(variable, sample, item)) for variable in variables])
    return PLACEHOLDER.sub(lambda _: next(values), template)
