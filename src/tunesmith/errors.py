"""Errors a user can act on.

A `UserError` is a mistake in what the user gave us (config, data, command line). The CLI prints it
without a traceback and exits with code 2. Each problem names where it is (`FILE:LINE` when there is a
file), what is wrong, the value, and the fix. Bugs in tunesmith stay ordinary exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong, located: `where` is `FILE:LINE`, `FILE`, `command line` or a key path."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class UserError(Exception):
    """A user mistake: printed plainly, exit code 2. Carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.message = message
        self.problems = list(problems or [])

    def __str__(self) -> str:
        lines = [self.message] + [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


class TrainingStopped(Exception):
    """Training ended early for a reason the user should read (signal, diverging loss); exit code 1 or 128+sig."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def did_you_mean(value: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
