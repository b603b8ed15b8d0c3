"""One small registry for every plugin kind: data formats, methods, adapters, schedules, metrics, losses.

A plugin is a plain function (or small object) registered under a name with one decorator call:

    @formats.register("alpaca", ...)
    def convert_alpaca(row): ...

Looking up an unknown name raises a UserError listing the known names and the closest match.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from tunesmith.errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._info: dict[str, dict[str, Any]] = {}

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
        load_plugins()
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
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries


formats: Registry[Any] = Registry("data format")
methods: Registry[Callable[..., Any]] = Registry("method")
adapters: Registry[Callable[..., Any]] = Registry("adapter type")
schedules: Registry[Callable[..., Any]] = Registry("learning-rate schedule")
tasks: Registry[Any] = Registry("evaluation task")
distill_losses: Registry[Callable[..., Any]] = Registry("distillation loss")
preference_losses: Registry[Callable[..., Any]] = Registry("preference loss")
# (prompt messages, response text, row fields, **args) -> float: plain functions that score RL samples
reward_functions: Registry[Callable[..., float]] = Registry("reward function")


_plugins_loaded = False


def load_plugins() -> None:
    """Import the modules whose import registers plugins; every lookup calls this, so no caller has to."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import tunesmith.data.formats  # noqa: F401
    import tunesmith.eval.tasks  # noqa: F401
    import tunesmith.models.adapters  # noqa: F401
    import tunesmith.recipes  # noqa: F401
    import tunesmith.train.distill  # noqa: F401
    import tunesmith.train.optim  # noqa: F401
    import tunesmith.train.preference  # noqa: F401
    import tunesmith.train.rewards  # noqa: F401
