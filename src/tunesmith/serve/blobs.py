"""Encrypted object storage: every uploaded file and trained adapter, sealed with AES-GCM at rest.

Objects live under `$TUNESMITH_HOME/blobs/` as `NAME.enc`; each is bound to its name (the chunks'
associated data), so swapping two objects' files is detected. Nothing here ever writes plaintext to disk:
uploads are encrypted as they stream in, readers get authenticated plaintext chunks in memory, and a folder
(a running job's run directory) is sealed as one object, a tar stream encrypted as it is produced.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from tunesmith.security import encryption
from tunesmith.security.keyring import ENVIRONMENT_VARIABLE, Keyring, atomic_write

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class TooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass
class Written:
    bytes: int
    sha256: str


def load_keyring(home: Path) -> Keyring:
    """The master keyring: $TUNESMITH_MASTER_KEY when set, else `HOME/master.key` (made on first use, 0600)."""
    if os.environ.get(ENVIRONMENT_VARIABLE):
        return Keyring.from_environment()
    path = home / "master.key"
    return Keyring.load(path) if path.exists() else Keyring.create(path)


class Blobs:
    def __init__(self, root: Path, keyring: Keyring):
        self.root, self.keyring = Path(root), keyring
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        if not NAME.match(name) or ".." in name.split("/"):
            raise ValueError(f"bad object name {name!r}")
        return self.root / f"{name}.enc"

    def put_stream(self, name: str, source: BinaryIO, limit: int | None = None) -> Written:
        """Encrypt `source` into object `name` as it is read; over `limit` bytes nothing is kept."""
        counter = _Counting(source, limit)
        target = self.path(name)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with atomic_write(target) as sink:
            encryption.encrypt_stream(counter, sink, name, self.keyring)
        return Written(counter.count, counter.digest.hexdigest())

    def put_bytes(self, name: str, data: bytes) -> Written:
        import io

        return self.put_stream(name, io.BytesIO(data))

    def chunks(self, name: str) -> Iterator[bytes]:
        return encryption.open_decrypted(self.path(name), name, self.keyring)

    def read_bytes(self, name: str) -> bytes:
        return b"".join(self.chunks(name))

    def lines(self, name: str) -> Iterator[bytes]:
        """The object's lines (with their line breaks), decrypted chunk by chunk."""
        return split_lines(self.chunks(name))

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def erase(self, name: str) -> bool:
        """Remove an object (a directory of objects, for a trailing '/'); its data key goes with it."""
        target = self.path(name)
        if target.is_file():
            target.unlink()
            return True
        folder = self.root / name
        if folder.is_dir():
            import shutil

            shutil.rmtree(folder)
            return True
        return False

    def put_tree(self, name: str, directory: Path, members: Iterable[str]) -> Written:
        """Seal files of `directory` (`members`: paths relative to it) as one object, a tar stream encrypted as
        it is written: no archive ever touches the disk in plaintext. A member that vanishes or shrinks while
        it is read fails the call and leaves the object as it was."""
        read_end, write_end = os.pipe()
        failures: list[BaseException] = []

        def produce() -> None:
            pipe = os.fdopen(write_end, "wb")
            try:
                with tarfile.open(fileobj=pipe, mode="w|") as archive:
                    for member in members:
                        archive.add(directory / member, arcname=member, recursive=False)
            except BaseException as error:  # recorded before the pipe closes: the reader must not see a clean end
                failures.append(error)
            finally:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass

        producer = threading.Thread(target=produce, name=f"seal {name}", daemon=True)
        producer.start()
        try:
            with os.fdopen(read_end, "rb") as pipe:
                return self.put_stream(name, _Checked(pipe, failures))
        finally:
            producer.join()

    def extract_tree(self, name: str, directory: Path) -> list[str]:
        """Unseal an object written by `put_tree` into `directory`; returns the member names. Only regular files
        and folders inside `directory` come out (tarfile's "data" filter)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tarfile.open(fileobj=_ChunkReader(self.chunks(name)), mode="r|") as archive:
            names = []
            for member in archive:
                archive.extract(member, directory, filter="data")
                names.append(member.name)
        return names

    def rewrap_all(self) -> int:
        """After a key rotation: re-wrap every object's data key under the current master key."""
        return sum(encryption.rewrap(path, self.keyring) for path in self.root.rglob("*.enc"))


def split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line + b"\n"
    if pending:
        yield pending


class _Counting:
    """A reader that hashes and counts what passes, and stops past a size limit."""

    def __init__(self, source: BinaryIO, limit: int | None):
        self.source, self.limit = source, limit
        self.count, self.digest = 0, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.count += len(data)
        if self.limit is not None and self.count > self.limit:
            raise TooLarge(self.limit)
        self.digest.update(data)
        return data


class _Checked:
    """The reading end of a producer's pipe: its end counts only when the producer finished cleanly."""

    def __init__(self, pipe: BinaryIO, failures: list[BaseException]):
        self.pipe, self.failures = pipe, failures

    def read(self, size: int = -1) -> bytes:
        data = self.pipe.read(size)
        if not data and self.failures:
            raise self.failures[0]
        return data


class _ChunkReader:
    """A file-like reader over decrypted chunks, for tarfile's streaming mode."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks, self.current, self.offset = chunks, b"", 0

    def read(self, size: int = -1) -> bytes:
        parts = []
        while size != 0:
            if self.offset == len(self.current):
                self.current, self.offset = next(self.chunks, b""), 0
                if not self.current:
                    break
            end = len(self.current) if size < 0 else min(len(self.current), self.offset + size)
            parts.append(self.current[self.offset : end])
            size = size if size < 0 else size - (end - self.offset)
            self.offset = end
        return b"".join(parts)
