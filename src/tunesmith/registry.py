"""One small registry for every plugin kind: data formats, methods, adapters, schedules, metrics, losses.

A plugin is a plain function (or small object) registered under a name with one decorator call:

    @formats.register("alpaca", ...)
    def convert_alpaca(row): ...

Each registry names, as strings, the modules whose import registers its plugins, and imports them on its first
lookup: this module imports nothing of the layers above it, and a lookup loads only what that kind needs.
Looking up an unknown name raises a UserError listing the known names and the closest match.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

from tunesmith.errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self.modules = modules  # the modules that register this kind's plugins, imported on the first lookup
        self._loaded = not modules
        self._entries: dict[str, T] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # first: a plugin module that looks this kind up while it is imported sees what is there
        try:
            for module in self.modules:
                importlib.import_module(module)
        except BaseException:
            self._loaded = False
            raise

    def register(self, name: str, **info: Any) -> Callable[[T], T]:
        """Decorator: register `obj` under `name`, with free-form `info` (e.g. accepted data kinds)."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            self._info[name] = info
            return obj

        return add

    def get(self, name: str, key: str | None = None) -> T:
        self._load()
        if name not in self._entries:
            where = f"{key} = " if key else ""
            raise UserError(
                f"{where}'{name}' is not a known {self.kind}{did_you_mean(name, self.names())}; "
                f"choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def info(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._info[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


RECIPES = tuple(
    f"tunesmith.recipes.{name}"
    for name in ("sft", "pretrain", "distill", "dpo", "reward", "classify", "ppo", "grpo", "auto")
)
METRICS = (
    "tunesmith.eval.metrics",
    "tunesmith.eval.text_metrics",
    "tunesmith.eval.preference_metrics",
    "tunesmith.eval.calibration",
)

formats: Registry[Any] = Registry("data format", ("tunesmith.data.formats",))
methods: Registry[Callable[..., Any]] = Registry("method", RECIPES)
adapters: Registry[Callable[..., Any]] = Registry("adapter type", ("tunesmith.models.adapters",))
schedules: Registry[Callable[..., Any]] = Registry("learning-rate schedule", ("tunesmith.train.optim",))
tasks: Registry[Any] = Registry("evaluation task", ("tunesmith.eval.tasks",))
distill_losses: Registry[Callable[..., Any]] = Registry("distillation loss", ("tunesmith.train.distill",))
preference_losses: Registry[Callable[..., Any]] = Registry("preference loss", ("tunesmith.train.preference",))
# GRPO's loss variants (train/grpo_losses.py: GRPOLoss): grpo, dapo, dr_grpo, gspo
grpo_losses: Registry[Any] = Registry("GRPO loss", ("tunesmith.train.grpo_losses",))
# (prompt messages, response text, row fields, **args) -> float: plain functions that score RL samples
reward_functions: Registry[Callable[..., float]] = Registry("reward function", ("tunesmith.train.reward_functions",))
# OpenAI's grader types (eval/graders/__init__.py: GraderType): string_check, text_similarity, python, multi, ...
GRADERS = tuple(f"tunesmith.eval.graders.{name}" for name in ("text", "multi", "python", "model"))
graders: Registry[Any] = Registry("grader type", GRADERS)
# how a task's raw outputs become resampled totals (eval/metrics.py's MetricTask), and the metrics read from them
metric_tasks: Registry[Any] = Registry("metric task", METRICS)
metrics: Registry[Callable[..., Any]] = Registry("metric", METRICS)


def metric_names(task: str) -> list[str]:
    """The metrics registered for metric task `task`, sorted by name."""
    metric_tasks.get(task, key="task")
    return [name for name in metrics.names() if task in metric_tasks_of(name)]


def metric_tasks_of(name: str) -> tuple[str, ...]:
    """The metric tasks that metric `name` is registered for."""
    owner = metrics.info(name)["task"]
    return (owner,) if isinstance(owner, str) else tuple(owner)
