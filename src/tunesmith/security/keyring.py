"""Master keys for encryption at rest: the `Keyring`, loaded from a key file or an environment variable.

Split from encryption.py (STYLE.md item 11), which keeps the envelope format and the streaming cipher and
imports what it needs from here. Key files are JSON {"current": ID, "keys": {ID: BASE64, ...}}, mode 0600,
rewritten atomically under a directory lock so concurrent rotations keep every key. `DecryptionError` lives
here because a keyring lacking an object's master key is the first way decryption fails.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import os
import re
import secrets
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from tunesmith.errors import UserError

ENVIRONMENT_VARIABLE = "TUNESMITH_MASTER_KEY"
KEY_BYTES = 32  # AES-256
_KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_GENERATE_HINT = 'python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"'


class DecryptionError(Exception):
    """An encrypted object failed authentication or cannot be opened: never trust any of its plaintext."""


def _key_error(where: str, problem: str, fix: str) -> UserError:
    return UserError(f"{where}: {problem}; fix: {fix}")


def derive_key_id(key: bytes) -> str:
    """A short public name for a master key: a domain-separated hash, so it reveals nothing usable."""
    return "k" + hashlib.sha256(b"tunesmith master key id\x00" + key).hexdigest()[:12]


def _decode_key(text: object, where: str, fix: str) -> bytes:
    """Base64 text -> 32 key bytes; the error never repeats the key material."""
    try:
        key = base64.b64decode(str(text).strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _key_error(where, "the master key is not valid base64", fix) from None
    if len(key) != KEY_BYTES:
        raise _key_error(where, f"the master key decodes to {len(key)} bytes; AES-256 needs {KEY_BYTES}", fix)
    return key


class Keyring:
    """Master keys by id; `current` wraps new data keys, every key stays available to unwrap old ones."""

    def __init__(self, keys: dict[str, bytes], current: str, path: Path | None = None):
        assert current in keys, "the current key must be in the keyring"
        self.keys, self.current, self.path = dict(keys), current, path

    @classmethod
    def create(cls, path: str | Path) -> Keyring:
        """Write a new key file with one fresh key; refuses to overwrite, since losing keys loses data."""
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _directory_lock(path.parent):
            if path.exists():
                raise _key_error(str(path), "a key file already exists", "load it with Keyring.load or pick a new path")
            key = secrets.token_bytes(KEY_BYTES)
            keyring = cls({derive_key_id(key): key}, derive_key_id(key), path)
            keyring.save()
        return keyring

    @classmethod
    def load(cls, path: str | Path) -> Keyring:
        path = Path(path)
        fix = f"create it with Keyring.create('{path}') or set {ENVIRONMENT_VARIABLE}"
        try:
            if os.name == "posix" and path.stat().st_mode & 0o077:
                raise _key_error(str(path), "the key file is readable by other users", f"chmod 600 {path}")
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _key_error(str(path), "master key file not found", fix) from None
        except OSError as error:
            raise _key_error(
                str(path),
                f"cannot read the master key file ({error.strerror})",
                "check that this user may read it (owner and permissions)",
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _key_error(
                str(path), f"the master key file is not JSON ({error})", "restore the file from a backup"
            ) from None
        shape = 'expected {"current": ID, "keys": {ID: BASE64, ...}}'
        if not (isinstance(document, dict) and isinstance(document.get("keys"), dict) and document["keys"]):
            raise _key_error(str(path), f"malformed key file: {shape}", f"restore the file from a backup ({shape})")
        keys = {}
        for key_id, text in document["keys"].items():
            if not _KEY_ID_PATTERN.fullmatch(key_id):
                raise _key_error(str(path), f"key id '{key_id}' is not 1-64 of [A-Za-z0-9_-]", "rename that key id")
            keys[key_id] = _decode_key(text, f"{path}: key '{key_id}'", "restore the file from a backup")
        if document.get("current") not in keys:
            raise _key_error(
                str(path),
                f"'current' is {document.get('current')!r}, not one of the keys ({', '.join(keys)})",
                "set 'current' to the id of the newest key",
            )
        return cls(keys, document["current"], path)

    @classmethod
    def from_environment(cls, variable: str = ENVIRONMENT_VARIABLE) -> Keyring:
        """One key from a base64 environment variable (for containers); rotation needs a key file."""
        if not os.environ.get(variable):
            raise _key_error(variable, "the environment variable is not set", f"export {variable}=$({_GENERATE_HINT})")
        key = _decode_key(os.environ[variable], variable, f"set it to 32 random bytes in base64: {_GENERATE_HINT}")
        return cls({derive_key_id(key): key}, derive_key_id(key))

    def rotate(self) -> str:
        """Add a fresh key and make it current; old keys stay so existing objects still decrypt."""
        if self.path is None:
            raise _key_error(
                ENVIRONMENT_VARIABLE,
                "a key from the environment cannot be rotated in place",
                "move to a key file (Keyring.create) to rotate keys",
            )
        with _directory_lock(self.path.parent):
            self.keys = {**Keyring.load(self.path).keys, **self.keys}  # keep keys another process added
            key = secrets.token_bytes(KEY_BYTES)
            self.keys[derive_key_id(key)] = key
            self.current = derive_key_id(key)
            self.save()
        return self.current

    def save(self) -> None:
        document = {
            "current": self.current,
            "keys": {key_id: base64.b64encode(key).decode() for key_id, key in self.keys.items()},
        }
        with atomic_write(self.path) as sink:  # a 0600 temporary file, renamed over the old one
            sink.write(json.dumps(document, indent=2).encode() + b"\n")

    def master_key(self, key_id: str) -> bytes:
        if key_id not in self.keys and self.path is not None and self.path.exists():
            self.keys = {**Keyring.load(self.path).keys, **self.keys}  # another process may have rotated
        if key_id not in self.keys:
            raise DecryptionError(
                f"encrypted under master key '{key_id}', which this keyring lacks (it holds "
                f"{', '.join(sorted(self.keys))}); load the key file that holds it"
            )
        return self.keys[key_id]


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Serialise key file rewrites across processes; the lock is on the directory, as the file gets replaced."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # released when the descriptor closes
        yield
    finally:
        os.close(descriptor)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """A temporary file beside `path`, fsynced and renamed over it on success, removed on failure."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
