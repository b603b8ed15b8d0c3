"""Rewards for RL (method ppo | grpo): plain Python functions registered by name, a reward model, and their sum.

A reward function is `f(prompt_messages, response_text, fields, **args) -> float`: the conversation the reply
answers, the reply's text, and the row's other scalar fields (a reference answer, a category). Your own goes
in the config without editing tunesmith, as `my_rewards.py:polite` (a file) or `my_package.rewards:polite`
(an importable module); tunesmith imports the module you name and nothing else. A function with a `field`
argument reads that field of every row, so rows without it are refused before any compute.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tunesmith.errors import UserError
from tunesmith.registry import reward_functions

Messages = list[dict[str, str]]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding spaces or final full stop: how exact_match compares."""
    return " ".join(str(text).lower().split()).rstrip(".")


def reference(fields: dict[str, Any], field: str) -> str:
    return str(fields[field])


def as_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


@reward_functions.register("exact_match")
def exact_match(prompt: Messages, response: str, fields: dict[str, Any], *, field: str = "answer") -> float:
    """1.0 when the reply equals the row's `field` (case, spacing and a final full stop aside), else 0.0."""
    return float(normalize(response) == normalize(reference(fields, field)))


@reward_functions.register("number_match")
def number_match(prompt: Messages, response: str, fields: dict[str, Any], *, field: str = "answer") -> float:
    """gsm8k style: 1.0 when the reply's last number equals the reference's answer (the number after '####'
    when there is one, else its last number), else 0.0."""
    expected = reference(fields, field)
    expected = expected.split("####")[-1] if "####" in expected else expected
    wanted, given = as_number(expected), as_number(response.split("####")[-1] if "####" in response else response)
    return float(wanted is not None and given is not None and math.isclose(wanted, given, abs_tol=1e-9))


@reward_functions.register("contains")
def contains(
    prompt: Messages, response: str, fields: dict[str, Any], *, text: str, case_sensitive: bool = False
) -> float:
    """1.0 when the reply contains `text`, else 0.0."""
    return float(text in response if case_sensitive else text.lower() in response.lower())


@reward_functions.register("length_penalty")
def length_penalty(prompt: Messages, response: str, fields: dict[str, Any], *, max_words: int = 100) -> float:
    """-(words / max_words), down to -1.0: the longer the reply, the lower its reward."""
    return -min(1.0, len(response.split()) / max_words)


@reward_functions.register("matches_format")
def matches_format(prompt: Messages, response: str, fields: dict[str, Any], *, pattern: str = THINK_ANSWER) -> float:
    """1.0 when the whole reply matches the regular expression `pattern` (by default <think>...</think> then
    <answer>...</answer>), else 0.0."""
    return float(re.fullmatch(pattern, response.strip(), flags=re.DOTALL) is not None)


# ---------------------------------------------------------------------------------------------
# The reward of a batch of replies.

# (prompts, responses, fields) -> (one score per reply, {name: one figure per reply} logged beside them)
Scorer = Callable[[list[Messages], list[str], list[dict[str, Any]]], tuple[list[float], dict[str, list[float]]]]


@dataclass
class RewardSource:
    label: str  # logged as reward_<label>
    weight: float
    score: Scorer
    fields: tuple[str, ...] = ()  # the row fields it reads, checked on every row before training


class Reward:
    """The weighted sum of every source's score; each source's own scores are kept for the log."""

    def __init__(self, sources: list[RewardSource]):
        self.sources = sources

    def __call__(
        self, prompts: list[Messages], responses: list[str], fields: list[dict[str, Any]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(N,) total rewards and {label: (N,) that source's scores, and label_name: what it logs beside them}."""
        parts, logged = {}, {}
        for source in self.sources:
            scores, extra = source.score(prompts, responses, fields)
            logged.update({f"{source.label}_{name}": torch.tensor(v, dtype=torch.float32) for name, v in extra.items()})
            for value in scores:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise UserError(f"rl reward '{source.label}' returned {value!r}; fix: return a finite float")
            parts[source.label] = torch.tensor(scores, dtype=torch.float32)
        total = sum(source.weight * parts[source.label] for source in self.sources)
        return total, {**parts, **logged}

    def required_fields(self) -> list[tuple[str, str]]:
        """(label, row field) for each field of the row a source reads."""
        return [(source.label, field) for source in self.sources for field in source.fields]


def build_reward(settings: Any, grader: dict[str, Any] | None = None) -> Reward:
    """The reward of `rl:` (an RLConfig): its reward model and its functions, with their weights; and method rft's
    grader (rft.grader), weight 1, whose every top-level item field is read from each row."""
    sources: list[RewardSource] = []
    if grader is not None:
        from tunesmith.eval.graders.templates import item_fields

        sources.append(RewardSource("grader", 1.0, grader_scorer(grader), tuple(item_fields(grader, "rft.grader"))))
    if settings.reward_model:
        sources.append(RewardSource("model", settings.reward_model_weight, model_scorer(settings.reward_model)))
    labels = {"model"} if settings.reward_model else set()
    for index, spec in enumerate(settings.reward_functions):
        key = f"rl.reward_functions[{index}]"
        function = resolve_function(spec.name, key)
        field = bound_field(function, spec.args, key, spec.name)
        label = getattr(function, "__name__", spec.name)
        label = label if label not in labels else f"{label}_{index}"
        labels.add(label)
        fields = (field,) if field else ()
        sources.append(RewardSource(label, spec.weight, function_scorer(function, spec.args), fields))
    return Reward(sources)


def grader_scorer(grader: dict[str, Any]) -> Scorer:
    """Each reply graded with the row as the grader's item; a sample the grader fails on scores 0 (OpenAI's rule),
    and the failures are logged (grader_failed), as are a multi grader's sub-graders (grader_<name>)."""
    from tunesmith.eval.graders import Context, run_grader

    context = Context()  # one judge model loaded for the whole run

    def score(prompts: list[Messages], responses: list[str], fields: list[dict[str, Any]]) -> tuple[list, dict]:
        grades = [run_grader(grader, reply, row, context) for reply, row in zip(responses, fields)]
        names = sorted({name for grade in grades for name in grade.sub_rewards})
        extra = {name: [grade.sub_rewards.get(name, 0.0) for grade in grades] for name in names}
        extra["failed"] = [float(any(value is True for value in grade.errors.values())) for grade in grades]
        return [grade.reward for grade in grades], extra

    return score


def model_scorer(spec: str) -> Scorer:
    from tunesmith.engine.reward_model import RewardScorer

    scorer = RewardScorer.load(spec)

    def score(prompts: list[Messages], responses: list[str], fields: list[dict[str, Any]]) -> tuple[list, dict]:
        conversations = [
            prompt + [{"role": "assistant", "content": reply}] for prompt, reply in zip(prompts, responses)
        ]
        return scorer.score(conversations), {}

    return score


def function_scorer(function: Callable[..., float], args: dict[str, Any]) -> Scorer:
    def score(prompts: list[Messages], responses: list[str], fields: list[dict[str, Any]]) -> tuple[list, dict]:
        return [function(prompt, reply, row, **args) for prompt, reply, row in zip(prompts, responses, fields)], {}

    return score


def resolve_function(name: str, key: str) -> Callable[..., float]:
    """A registered reward function, or `module:function` / `path/to/file.py:function` imported for the user."""
    if ":" not in name:
        return reward_functions.get(name, key=key)
    module_name, _, attribute = name.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise UserError(
                    f"{key}: '{name}': the file {path} does not exist; fix: give the path of a .py file "
                    f"(relative to {Path.cwd()}) and a function in it, as path/to/rewards.py:my_reward"
                )
            spec = importlib.util.spec_from_file_location(f"tunesmith_rewards_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(
            f"{key}: '{name}': cannot import {module_name} ({error}); fix: install or name an importable "
            f"module, or give a file as path/to/rewards.py:{attribute}"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserError(
            f"{key}: '{name}': {module_name} has no function '{attribute}'; fix: name a function defined "
            f"there as f(prompt_messages, response_text, fields) -> float"
        )
    return function


def bound_field(function: Callable[..., float], args: dict[str, Any], key: str, name: str) -> str | None:
    """Check that `args` fit the function's signature; the row field it reads (its `field` argument), if any."""
    signature = inspect.signature(function)
    try:
        bound = signature.bind([], "", {}, **args)
    except TypeError as error:
        raise UserError(
            f"{key}: {name}{signature} cannot be called with args {args} ({error}); fix: pass the "
            f"arguments it takes in {key}.args"
        ) from None
    if "field" not in signature.parameters:
        return None
    bound.apply_defaults()
    return str(bound.arguments["field"])
