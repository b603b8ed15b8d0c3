"""Small pieces that keep the model cache consistent: hashing, locking, atomic directory commits.

A cached model directory either exists complete or not at all. Writers build it in a temporary
sibling and rename it into place; several processes (e.g. every rank of a `torchrun` job) that want
the same model take a file lock, so only the first does the work and the rest reuse its result.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# 1 MiB reads keep hashing a multi-GB file at disk speed without holding it in memory.
_HASH_CHUNK_BYTES = 1 << 20


def sha256_of_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `lock_path` (created if needed) for the `with` block.

    Without `fcntl` (Windows) this does nothing: the atomic rename still keeps the cache consistent,
    concurrent processes just repeat the work.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_directory(final_dir: Path) -> Iterator[Path]:
    """A fresh temporary directory beside `final_dir` (same filesystem, so a rename is atomic).

    It is removed on exit unless `commit_directory` has already moved it into place.
    """
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.partial-", dir=final_dir.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit_directory(staging: Path, final_dir: Path) -> Path:
    """Move a completed `staging` directory to `final_dir`, replacing an older one if present."""
    _apply_umask_permissions(staging)
    if final_dir.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside first,
        # so readers see either the old complete copy or the new one, never a half-deleted mix.
        retired = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.old-", dir=final_dir.parent))
        os.replace(final_dir, retired / final_dir.name)
        os.replace(staging, final_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final_dir)
    return final_dir


def _apply_umask_permissions(directory: Path) -> None:
    """Give the tree ordinary permissions (0755/0644 under the usual umask).

    `mkdtemp` and atomic file writers create private 0700/0600 entries; a cache shared by a team
    (a common `$TUNESMITH_HOME`) needs the same permissions any other file would get.
    """
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
