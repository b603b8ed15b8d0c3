"""Where state that outlives a run lives: `$TUNESMITH_HOME` (default `~/.tunesmith`)."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".tunesmith").expanduser()


def model_cache() -> Path:
    return home() / "models"
