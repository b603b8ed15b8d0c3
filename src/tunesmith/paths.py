"""Where state that outlives a run lives: `$TUNESMITH_HOME` (default `~/.tunesmith`)."""

from __future__ import annotations

import os
from pathlib import Path

from tunesmith.errors import UserError


def home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".tunesmith").expanduser()


def model_cache() -> Path:
    return home() / "models"


def make_private(path: Path, directory: bool) -> Path:
    """`path` as a directory (0700) or file (0600) only this user can read, made so if missing and narrowed if
    someone made it wider first (`models pull` makes HOME with the umask's 0755). A linked directory is
    followed (HOME may be a link to a bigger disk); a linked file is refused."""
    mode = 0o700 if directory else 0o600
    try:
        if directory:
            path.mkdir(mode=mode, parents=True, exist_ok=True)
        else:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, mode))  # 0600 when new; never truncates
        info = path.stat()
    except OSError as error:
        raise UserError(
            f"{path}: cannot make it private ({error.strerror}); fix: it must be a "
            f"{'folder' if directory else 'file (not a link)'} of this user"
        ) from None
    if info.st_uid != os.getuid():
        raise UserError(f"{path}: belongs to another user; fix: remove it, or set TUNESMITH_HOME to a folder of yours")
    if info.st_mode & 0o777 != mode:
        path.chmod(mode)
    return path
