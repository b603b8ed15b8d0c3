"""OpenAI's model graders, with a local model as the judge: `label_model` and `score_model`.

`model` names any model tunesmith loads: a built-in name, a model directory, a run directory or a library adapter.
An OpenAI model name is refused at check time, with that fix. Each judge is loaded once per Context (a job or a
`tunesmith grade` run keeps one for all its samples). `input` holds OpenAI's messages: role (system, developer, user,
assistant) and content. The content is a string or a list of text parts (input_text, output_text), templated like any
grader's. Images and audio are refused: tunesmith's judges read text.

- label_model: the judge's reply is constrained to the labels, each a whole reply ended by the end-of-turn token, and
  decoded greedily (engine.generate's `allowed`): it always answers with a label and never fails to parse. The reward
  is 1.0 when that label is in `passing_labels`, else 0.0.
- score_model: the judge writes a reply with `sampling_params` (greedy when temperature is unset), and the reply's
  score is read as OpenAI's graders answer it: a JSON object's "result" (or "score"), else the reply's first number.
  A reply with no number, or one outside `range` (default [0, 1]), fails that sample (model_grader_parse_error).
  `reasoning_effort` is refused: a local judge has no such setting.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from tunesmith.errors import Problem
from tunesmith.eval.graders import Context, GraderFailure, Sample, check_keys
from tunesmith.eval.graders.templates import check_template, render_template
from tunesmith.registry import graders

ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("input_text", "output_text")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
SCORE_KEYS = ("result", "score")
DEFAULT_SCORE_TOKENS = 64  # a score needs few tokens; max_completions_tokens raises it
SAMPLING_KEYS = ("temperature", "top_p", "seed", "max_completions_tokens", "reasoning_effort")


def model_problems(model: Any, where: str) -> list[Problem]:
    """A judge tunesmith cannot load here, refused before any sample."""
    from tunesmith.models import catalog, library

    if isinstance(model, str) and model.strip():
        if model in catalog.CATALOG or Path(model).expanduser().exists() or model in library.names():
            return []
    return [
        Problem(
            where,
            f"{model!r} is not a model tunesmith can load here; fix: name a local judge: a built-in model "
            f"({', '.join(catalog.model_names())}), a model directory, a run directory or a library adapter",
        )
    ]


def message_templates(spec: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """(where, template) of every text in `input`'s messages."""
    found = []
    for index, message in enumerate(spec.get("input") or []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            found.append((f"{where}.input[{index}].content", content))
        elif isinstance(content, list):
            for part_index, part in enumerate(content):
                text = part.get("text") if isinstance(part, dict) else part
                found.append((f"{where}.input[{index}].content[{part_index}]", text))
    return found


def check_messages(spec: dict[str, Any], where: str) -> list[Problem]:
    messages = spec.get("input")
    if not isinstance(messages, list) or not messages:
        return [Problem(f"{where}.input", "must be a list of messages; fix: give [{role: user, content: ...}]")]
    problems = []
    for index, message in enumerate(messages):
        at = f"{where}.input[{index}]"
        if not isinstance(message, dict):
            problems.append(Problem(at, f"{message!r} is not a message; fix: give {{role, content}}"))
            continue
        if message.get("role") not in ROLES:
            problems.append(Problem(f"{at}.role", f"{message.get('role')!r} is not one of {', '.join(ROLES)}"))
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        for part_index, part in enumerate(parts):
            kind = part.get("type", "input_text") if isinstance(part, dict) else "input_text"
            if isinstance(part, dict) and kind not in TEXT_PARTS:
                problems.append(
                    Problem(
                        f"{at}.content[{part_index}].type",
                        f"{kind!r}: tunesmith's judges read text only; fix: use {' or '.join(TEXT_PARTS)} parts",
                    )
                )
    return problems + [problem for at, text in message_templates(spec, where) for problem in check_template(text, at)]


def rendered_messages(spec: dict[str, Any], sample: Sample, item: dict[str, Any]) -> list[dict[str, str]]:
    """The judge's conversation for this sample: texts rendered, parts joined, `developer` as `system`."""
    conversation = []
    for message in spec["input"]:
        content = message["content"]
        parts = content if isinstance(content, list) else [content]
        texts = [part["text"] if isinstance(part, dict) else part for part in parts]
        role = "system" if message["role"] == "developer" else message["role"]
        conversation.append({"role": role, "content": "".join(render_template(text, sample, item) for text in texts)})
    return conversation


def judge(model: str, context: Context):
    """The loaded judge for `model`, loaded on first use and kept in `context`."""
    if model not in context.judges:
        from tunesmith.engine.generation import Engine

        try:
            context.judges[model] = Engine.load(model)
        except Exception as error:  # a model that checked out but will not load: every sample fails alike
            raise GraderFailure("model_grader_server_error", f"could not load the judge {model!r}: {error}") from None
    return context.judges[model]


@graders.register("label_model")
class LabelModel:
    """1.0 when the judge's label (constrained to `labels`) is one of `passing_labels`, else 0.0."""

    @staticmethod
    def check(spec: dict[str, Any], where: str) -> list[Problem]:
        problems = check_keys(spec, where, ("name", "model", "input", "labels", "passing_labels"))
        problems += check_messages(spec, where) + model_problems(spec.get("model"), f"{where}.model")
        labels, passing = spec.get("labels"), spec.get("passing_labels")
        if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)):
            problems.append(Problem(f"{where}.labels", f"{labels!r}: fix: give a list of label texts"))
        elif len(set(labels)) != len(labels):
            problems.append(Problem(f"{where}.labels", f"{labels!r} repeats a label; fix: list each once"))
        elif not (isinstance(passing, list) and passing and set(passing) <= set(labels)):
            problems.append(
                Problem(f"{where}.passing_labels", f"{passing!r} must be a non-empty subset of labels {labels}")
            )
        return problems

    templates = staticmethod(message_templates)

    @staticmethod
    def grade(spec: dict[str, Any], sample: Sample, item: dict[str, Any], context: Context) -> float:
        engine = judge(spec["model"], context)
        labels = spec["labels"]
        allowed = [engine.reply_ids(label) for label in labels]
        if len({tuple(ids) for ids in allowed}) != len(labels):
            raise GraderFailure("model_grader_parse_error", f"the judge's tokenizer writes two of {labels} alike")
        [reply] = engine.generate([rendered_messages(spec, sample, item)], allowed=allowed)
        label = next((label for label in labels if label.strip() == reply), None)
        if label is None:
            raise GraderFailure("model_grader_parse_error", f"the judge answered {reply!r}, not one of {labels}")
        return float(label in spec["passing_labels"])


def score_range(spec: dict[str, Any]) -> tuple[float, float]:
    low, high = spec.get("range") or (0.0, 1.0)
    return float(low), float(high)


def read_score(reply: str, low: float, high: float) -> float:
    """The score in a judge's reply: a JSON object's result/score, else its first number; within [low, high]."""
    value: Any = None
    try:
        parsed = json.loads(reply)
        value = next((parsed[key] for key in SCORE_KEYS if isinstance(parsed, dict) and key in parsed), parsed)
    except ValueError:
        found = NUMBER.search(reply)
        value = float(found.group()) if found else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GraderFailure("model_grader_parse_error", f"the judge's reply holds no score: {reply[:200]!r}")
    if not low <= value <= high:
        raise GraderFailure(
            "model_grader_parse_error", f"the judge's score {value} is outside the range [{low}, {high}]"
        )
    return float(value)


@graders.register("score_model")
class ScoreModel:
    """The judge's score of the sample, read from its reply, within `range`."""

    @staticmethod
    def check(spec: dict[str, Any], where: str) -> list[Problem]:
        problems = check_keys(spec, where, ("name", "model", "input"), ("range", "sampling_params", "pass_threshold"))
        problems += check_messages(spec, where) + model_problems(spec.get("model"), f"{where}.model")
        bounds = spec.get("range", [0, 1])
        if not (
            isinstance(bounds, list)
            and len(bounds) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in bounds)
            and bounds[0] < bounds[1]
        ):
            problems.append(Problem(f"{where}.range", f"{bounds!r}: fix: give two numbers, low then high, e.g. [0, 1]"))
        sampling = spec.get("sampling_params") or {}
        if not isinstance(sampling, dict):
            return problems + [Problem(f"{where}.sampling_params", f"{sampling!r} is not an object")]
        for key in sampling:
            if key not in SAMPLING_KEYS:
                problems.append(Problem(f"{where}.sampling_params.{key}", f"is not one of {', '.join(SAMPLING_KEYS)}"))
        if sampling.get("reasoning_effort") is not None:
            problems.append(
                Problem(
                    f"{where}.sampling_params.reasoning_effort",
                    "a local judge has no reasoning effort; fix: remove it",
                )
            )
        return problems

    templates = staticmethod(message_templates)

    @staticmethod
    def grade(spec: dict[str, Any], sample: Sample, item: dict[str, Any], context: Context) -> float:
        import torch

        from tunesmith.engine.generation import Sampling

        engine = judge(spec["model"], context)
        options = spec.get("sampling_params") or {}
        sampling = Sampling(
            max_new_tokens=options.get("max_completions_tokens") or DEFAULT_SCORE_TOKENS,
            temperature=options.get("temperature") or 0.0,
            top_p=options.get("top_p") if options.get("top_p") is not None else 1.0,
        )
        if options.get("seed") is not None:
            torch.manual_seed(int(options["seed"]))
        [reply] = engine.generate([rendered_messages(spec, sample, item)], sampling)
        return read_score(reply, *score_range(spec))
