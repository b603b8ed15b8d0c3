"""A job's scratch directory and the process that runs in it: the flock that keeps one attempt at a time in the
directory (inherited by the run's process), the files a sealed run holds, a blob source that checks the lease
before it commits, and stopping the run's process group (which dies with its worker).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from tunesmith.serve.service import private_directory

SCRATCH_LOCK = ".lock"  # in the scratch directory: flocked by the worker that prepares it and by its run's process


def run_members(run: Path, step: int) -> list[str]:
    """The files of a run directory as of checkpoint `step`: everything but the other checkpoints, which are
    not even listed (training may be deleting them)."""
    members = []
    for folder, subfolders, files in os.walk(run):
        relative = Path(folder).relative_to(run)
        if relative == Path("checkpoints"):
            subfolders[:] = [name for name in subfolders if name == f"step-{step}"]
        members += [str(relative / name) for name in files if not (Path(folder) / name).is_symlink()]
    return sorted(members)


def bytes_at(handle, offset: int, size: int) -> bytes:
    if offset < 0:
        return b""
    handle.seek(offset)
    return handle.read(size)


def try_lock(scratch: Path, directory: Path) -> int | None:
    """A descriptor holding the exclusive flock on `directory`'s lock file (made, with the directory, if need
    be), or None while another holds it."""
    private_directory(scratch)
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / SCRATCH_LOCK
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(descriptor).st_ino == os.stat(path).st_ino:  # not a lock file erased while we waited
            return descriptor
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(descriptor)
    return None


class Fenced:
    """A blob's source whose end first checks the lease: the blob store renames an object into place only after
    its source ends, so a worker that lost its job commits nothing."""

    def __init__(self, source: Any, check) -> None:
        self.source, self.check = source, check

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        if not data:
            self.check()
        return data


def stop(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the run's process group (train checkpoints and exits), SIGKILL after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def die_with_parent() -> None:
    """In the child: SIGKILL when the worker dies, so a dead worker leaves no run behind to race a new one."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def first_lines(source: Path, target: Path, count: int) -> None:
    """The first `count` non-blank lines of `source` into `target` (private)."""
    with open(source, "rb") as lines, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        kept = 0
        for line in lines:
            if kept == count:
                break
            if line.strip():
                out.write(line if line.endswith(b"\n") else line + b"\n")
                kept += 1
