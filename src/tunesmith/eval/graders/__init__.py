"""Graders as OpenAI defines them (the `openai` SDK's types/graders/*): a grader is a JSON object whose `type` names a
registered grader type; it scores one model sample against one dataset item, from 0 to 1 for most types.

Every type is registered in `tunesmith.registry.graders` as a `GraderType`:
- `check(spec, where)`: the problems of a spec before any sample is graded (what POST .../graders/validate reports,
  and what a config or a job is refused for), each a `Problem` naming the key, the value and the fix;
- `grade(spec, sample, item, context)`: the sample's score; a failure of this one sample (a python grader that
  crashed, a judge's unreadable answer) raises `GraderFailure`, which `run_grader` turns into OpenAI's error flags
  and a reward of 0, never an exception that stops a job.

`run_grader` and `validate_grader` are what the CLI (`tunesmith grade`), the service and training call.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from tunesmith.errors import Problem, UserError, did_you_mean
from tunesmith.registry import graders

# OpenAI's metadata.errors flags of a grader run (types/fine_tuning/alpha/grader_run_response.py), all False at first
ERROR_FLAGS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)


# Where OpenAI's metadata.errors puts a failure's detail, for the flags that have one; the others get FLAG_details
DETAILS = {
    "python_grader_runtime_error": "python_grader_runtime_error_details",
    "python_grader_server_error": "python_grader_server_error_type",
    "model_grader_server_error": "model_grader_server_error_details",
}


@dataclass(frozen=True)
class Sample:
    """The `sample` namespace of a grader's templates: the model's reply, and that reply parsed as JSON where it is
    JSON (else None)."""

    output_text: str
    output_json: Any = None

    @classmethod
    def of(cls, text: str) -> "Sample":
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        return cls(text, parsed)


class GraderFailure(Exception):
    """One sample could not be graded. `flag` is one of ERROR_FLAGS; `detail` says why, for the log."""

    def __init__(self, flag: str, detail: str):
        assert flag in ERROR_FLAGS, flag
        super().__init__(detail)
        self.flag = flag
        self.detail = detail


@dataclass
class Context:
    """What graders share across samples: loaded judge models by name (score_model, label_model); and what a multi
    grader's graders scored for the sample being graded, by their names (run_grader clears it for each sample)."""

    judges: dict[str, Any] = field(default_factory=dict)
    sub_rewards: dict[str, float] = field(default_factory=dict)


class GraderType(Protocol):
    def check(self, spec: dict, where: str) -> list[Problem]: ...

    def grade(self, spec: dict, sample: Sample, item: dict, context: Context) -> float: ...


@dataclass
class Grade:
    """A grader run, in the shape of OpenAI's GraderRunResponse: the reward, each named sub-grader's reward (multi),
    and metadata (the errors' flags, a failure's detail, seconds taken)."""

    reward: float
    sub_rewards: dict[str, float]
    name: str
    type: str
    errors: dict[str, Any]
    execution_time: float

    def response(self) -> dict[str, Any]:
        """The JSON body POST /v1/fine_tuning/alpha/graders/run answers."""
        return {
            "reward": self.reward,
            "sub_rewards": self.sub_rewards,
            "metadata": {
                "name": self.name,
                "type": self.type,
                "errors": self.errors,
                "execution_time": self.execution_time,
                "scores": dict(self.sub_rewards) or {self.name: self.reward},
                "token_usage": None,
                "sampled_model_name": None,
            },
            "model_grader_token_usage_per_model": {},
        }


def grader_type(spec: Any, where: str = "grader") -> GraderType:
    """The registered type of `spec`; a spec that is not an object with a known `type` is the user's mistake."""
    if not isinstance(spec, dict):
        problem = Problem(where, f"{spec!r} is not an object; fix: give a JSON object with a 'type'")
        raise UserError("the grader does not parse", [problem])
    return graders.get(str(spec.get("type")), key=f"{where}.type")


def validate_grader(spec: Any, where: str = "grader") -> None:
    """Raise a UserError with every problem of `spec`, before any sample is graded."""
    problems = grader_type(spec, where).check(spec, where)
    if problems:
        raise UserError("the grader does not parse", problems)


def check_keys(spec: dict, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[Problem]:
    """The problems of `spec`'s keys, all at once: each missing required key, each unknown key (a misspelt optional
    key would otherwise be ignored without a word), and a `name` that is not text. `type` is always known."""
    known = ("type", *required, *optional)
    problems = [Problem(f"{where}.{key}", f"is missing; fix: give '{key}'") for key in required if key not in spec]
    if "name" in spec and not isinstance(spec["name"], str):
        problems.append(Problem(f"{where}.name", f"{spec['name']!r} is not a string; fix: name the grader"))
    for key in spec:
        if key not in known:
            message = f"is not a known key{did_you_mean(key, known)}; a {spec.get('type')} grader takes "
            problems.append(Problem(f"{where}.{key}", message + f"{', '.join(known)}; fix: rename or remove it"))
    return problems


def grader_templates(spec: dict, where: str) -> list[tuple[str, str]]:
    """(where, template) of each templated field of `spec`, listed by its type's optional `templates(spec, where)`; a
    type without one (python: its source is code) has none."""
    templates = getattr(grader_type(spec, where), "templates", None)
    return templates(spec, where) if templates is not None else []


def grade_sample(spec: dict, sample: Sample, item: dict, context: Context) -> float:
    """`spec`'s score of one sample: what a multi grader calls for each of its graders. Raises GraderFailure."""
    return grader_type(spec).grade(spec, sample, item, context)


def run_grader(spec: dict, output_text: str, item: dict | None = None, context: Context | None = None) -> Grade:
    """Grade one sample with a validated `spec`. A failure of this sample gives reward 0 with its flag set and its
    detail in `errors` (python_grader_runtime_error_details, model_grader_server_error_details, ...)."""
    started = time.perf_counter()
    context = context if context is not None else Context()
    errors: dict[str, Any] = {flag: False for flag in ERROR_FLAGS}
    context.sub_rewards = {}
    try:
        reward = float(grader_type(spec).grade(spec, Sample.of(output_text), item or {}, context))
    except GraderFailure as failure:
        reward = 0.0
        errors[failure.flag] = True
        errors[DETAILS.get(failure.flag, f"{failure.flag}_details")] = failure.detail
    name, kind = str(spec.get("name", "")), str(spec.get("type"))
    return Grade(reward, dict(context.sub_rewards), name, kind, errors, time.perf_counter() - started)


class GraderRater:
    """A grader as a rater of replies, as a reward model is one (`tunesmith eval --task reward --grader FILE`):
    each conversation's last reply graded with its data row as the item; a sample it fails on scores 0 (OpenAI's
    rule), and `failures` counts those."""

    def __init__(self, spec: dict[str, Any]):
        self.spec, self.context, self.failures = spec, Context(), 0

    def score(self, conversations: list[list[dict]], batch_size: int = 16, rows: list[dict] | None = None) -> list:
        grades = [
            run_grader(self.spec, conversation[-1]["content"], row, self.context)
            for conversation, row in zip(conversations, rows or [{}] * len(conversations))
        ]
        self.failures += sum(any(value is True for value in grade.errors.values()) for grade in grades)
        return [grade.reward for grade in grades]
