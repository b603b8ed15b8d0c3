"""Encryption at rest: AES-256-GCM envelopes, streamed in chunks, under a rotatable master keyring.

Each object gets its own random data key; only that 32-byte key is encrypted ("wrapped") by a master key.
Rotating the master key therefore rewrites a small header, never the data. The data is split into
chunks, each sealed on its own (the STREAM construction): the chunk's index and a final-chunk flag are
authenticated with it, so reordered, swapped, dropped or appended chunks fail, and a file of any size
streams through a bounded buffer (two chunks).

File layout (big-endian):
    magic "TSENC" | version (1 B) | key id length (1 B) | master key id | chunk size (4 B, plaintext bytes)
    | nonce prefix (8 B) | wrap nonce (12 B) | wrapped data key (48 B = 32 + 16 tag)
    then chunks: ciphertext + 16 B tag; every chunk but the last holds exactly `chunk size` plaintext bytes.
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tunesmith.errors import UserError

ENVIRONMENT_VARIABLE = "TUNESMITH_MASTER_KEY"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # 96-bit GCM nonce
TAG_BYTES = 16  # GCM tag
NONCE_PREFIX_BYTES = 8  # + a 4-byte chunk counter = one 12-byte nonce per chunk
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB of plaintext per chunk
MAX_CHUNK_SIZE = 64 << 20  # bytes; bounds what a header may ask us to buffer
MAGIC, VERSION = b"TSENC", 1
_FIXED_AFTER_KEY_ID = struct.Struct(f">I{NONCE_PREFIX_BYTES}s")  # chunk size, nonce prefix
_KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_GENERATE_HINT = "python -c \"import base64, os; print(base64.b64encode(os.urandom(32)).decode())\""


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
            raise _key_error(str(path), f"cannot read the master key file ({error.strerror})",
                             "check that this user may read it (owner and permissions)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _key_error(str(path), f"the master key file is not JSON ({error})",
                             "restore the file from a backup") from None
        shape = 'expected {"current": ID, "keys": {ID: BASE64, ...}}'
        if not (isinstance(document, dict) and isinstance(document.get("keys"), dict) and document["keys"]):
            raise _key_error(str(path), f"malformed key file: {shape}", f"restore the file from a backup ({shape})")
        keys = {}
        for key_id, text in document["keys"].items():
            if not _KEY_ID_PATTERN.fullmatch(key_id):
                raise _key_error(str(path), f"key id '{key_id}' is not 1-64 of [A-Za-z0-9_-]", "rename that key id")
            keys[key_id] = _decode_key(text, f"{path}: key '{key_id}'", "restore the file from a backup")
        if document.get("current") not in keys:
            raise _key_error(str(path), f"'current' is {document.get('current')!r}, not one of the keys "
                             f"({', '.join(keys)})", "set 'current' to the id of the newest key")
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
            raise _key_error(ENVIRONMENT_VARIABLE, "a key from the environment cannot be rotated in place",
                             "move to a key file (Keyring.create) to rotate keys")
        with _directory_lock(self.path.parent):
            self.keys = {**Keyring.load(self.path).keys, **self.keys}  # keep keys another process added
            key = secrets.token_bytes(KEY_BYTES)
            self.keys[derive_key_id(key)] = key
            self.current = derive_key_id(key)
            self.save()
        return self.current

    def save(self) -> None:
        document = {"current": self.current,
                    "keys": {key_id: base64.b64encode(key).decode() for key_id, key in self.keys.items()}}
        with atomic_write(self.path) as sink:  # a 0600 temporary file, renamed over the old one
            sink.write(json.dumps(document, indent=2).encode() + b"\n")

    def master_key(self, key_id: str) -> bytes:
        if key_id not in self.keys and self.path is not None and self.path.exists():
            self.keys = {**Keyring.load(self.path).keys, **self.keys}  # another process may have rotated
        if key_id not in self.keys:
            raise DecryptionError(f"encrypted under master key '{key_id}', which this keyring lacks (it holds "
                                  f"{', '.join(sorted(self.keys))}); load the key file that holds it")
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


def _chunk_context(index: int, final: bool, object_id: str) -> tuple[bytes, bytes]:
    """(nonce suffix, associated data) of one chunk: binds its position, finality and owning object."""
    if index >= 1 << 32:
        raise ValueError("more than 2**32 chunks: use a larger chunk size")
    aad = b"tunesmith chunk\x00" + struct.pack(">QB", index, final) + object_id.encode()
    return struct.pack(">I", index), aad


def _read_exactly(source: BinaryIO, size: int) -> bytes:
    parts, remaining = [], size
    while remaining and (part := source.read(remaining)):
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _sealed_header(keyring: Keyring, data_key: bytes, chunk_size: int, prefix: bytes) -> bytes:
    """The header with the data key wrapped under the current master key; it authenticates all before it."""
    key_id = keyring.current.encode()
    header = MAGIC + bytes([VERSION, len(key_id)]) + key_id + _FIXED_AFTER_KEY_ID.pack(chunk_size, prefix)
    wrap_nonce = secrets.token_bytes(NONCE_BYTES)
    return header + wrap_nonce + AESGCM(keyring.master_key(keyring.current)).encrypt(wrap_nonce, data_key, header)


def _write_stream(source: BinaryIO, sink: BinaryIO, object_id: str, keyring: Keyring, chunk_size: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size={chunk_size} bytes; it must be 1..{MAX_CHUNK_SIZE}")
    data_key, prefix = AESGCM.generate_key(bit_length=256), secrets.token_bytes(NONCE_PREFIX_BYTES)
    sink.write(_sealed_header(keyring, data_key, chunk_size, prefix))
    cipher, index, current = AESGCM(data_key), 0, _read_exactly(source, chunk_size)
    while True:  # read one chunk ahead: only then do we know whether this chunk is the last
        following = _read_exactly(source, chunk_size)
        suffix, aad = _chunk_context(index, not following, object_id)
        sink.write(cipher.encrypt(prefix + suffix, current, aad))
        if not following:
            return
        index, current = index + 1, following


def _read_header_field(source: BinaryIO, size: int) -> bytes:
    field = _read_exactly(source, size)
    if len(field) < size:
        raise DecryptionError("the encrypted object is truncated inside its header")
    return field


def _read_header(source: BinaryIO, keyring: Keyring) -> tuple[str, bytes, int, bytes]:
    """Parse and authenticate the header; returns (master key id, data key, chunk size, nonce prefix)."""
    start = _read_exactly(source, len(MAGIC) + 2)
    if len(start) < len(MAGIC) + 2 or start[: len(MAGIC)] != MAGIC:
        raise DecryptionError("not a tunesmith encrypted object (bad magic bytes)")
    if start[len(MAGIC)] != VERSION:
        raise DecryptionError(f"unsupported encryption format version {start[len(MAGIC)]} (this build reads {VERSION})")
    raw_key_id = _read_header_field(source, start[-1])
    fixed = _read_header_field(source, _FIXED_AFTER_KEY_ID.size)
    wrap = _read_header_field(source, NONCE_BYTES + KEY_BYTES + TAG_BYTES)
    key_id = raw_key_id.decode("ascii", errors="replace")
    master_key = keyring.master_key(key_id)
    try:  # the whole header before the wrap nonce is the wrap's associated data: any flipped bit fails here
        data_key = AESGCM(master_key).decrypt(wrap[:NONCE_BYTES], wrap[NONCE_BYTES:], start + raw_key_id + fixed)
    except InvalidTag:
        raise DecryptionError("the encryption header failed authentication (modified header)") from None
    chunk_size, prefix = _FIXED_AFTER_KEY_ID.unpack(fixed)
    return key_id, data_key, chunk_size, prefix


def _read_chunks(source: BinaryIO, object_id: str, data_key: bytes, chunk_size: int, prefix: bytes) -> Iterator[bytes]:
    cipher, block = AESGCM(data_key), chunk_size + TAG_BYTES
    index, current = 0, _read_exactly(source, block)
    while True:
        following = _read_exactly(source, block)
        suffix, aad = _chunk_context(index, not following, object_id)
        try:
            yield cipher.decrypt(prefix + suffix, current, aad)
        except InvalidTag:
            raise DecryptionError(f"chunk {index} of object '{object_id}' failed authentication: the data was "
                                  "modified, truncated or reordered, or it belongs to another object") from None
        if not following:
            return
        index, current = index + 1, following


def open_decrypted(path: str | Path, object_id: str, keyring: Keyring) -> Iterator[bytes]:
    """Plaintext chunks of an encrypted file, each authenticated before it is yielded.

    The header is checked now; a truncated or extended stream raises DecryptionError at the end, so a
    consumer must discard what it received unless iteration finishes without an error.
    """
    source = open(path, "rb")
    try:
        _, data_key, chunk_size, prefix = _read_header(source, keyring)
    except BaseException:
        source.close()
        raise

    def chunks() -> Iterator[bytes]:
        with source:
            yield from _read_chunks(source, object_id, data_key, chunk_size, prefix)

    return chunks()


def encrypt_file(source: str | Path, destination: str | Path, object_id: str, keyring: Keyring,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
    with open(source, "rb") as plain, atomic_write(destination) as sink:
        _write_stream(plain, sink, object_id, keyring, chunk_size)


def decrypt_file(source: str | Path, destination: str | Path, object_id: str, keyring: Keyring) -> None:
    """Decrypt to `destination` atomically: on any failure the destination is left untouched."""
    with atomic_write(destination) as sink:
        for chunk in open_decrypted(source, object_id, keyring):
            sink.write(chunk)


def encrypt_bytes(plaintext: bytes, object_id: str, keyring: Keyring, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    sink = io.BytesIO()
    _write_stream(io.BytesIO(plaintext), sink, object_id, keyring, chunk_size)
    return sink.getvalue()


def decrypt_bytes(blob: bytes, object_id: str, keyring: Keyring) -> bytes:
    source = io.BytesIO(blob)
    _, data_key, chunk_size, prefix = _read_header(source, keyring)
    return b"".join(_read_chunks(source, object_id, data_key, chunk_size, prefix))


def rewrap(path: str | Path, keyring: Keyring) -> bool:
    """Re-wrap an object's data key under the current master key; the chunks are copied, not re-encrypted.

    Returns False when the object already uses the current key. The rewrite is atomic.
    """
    with open(path, "rb") as source:
        key_id, data_key, chunk_size, prefix = _read_header(source, keyring)
        if key_id == keyring.current:
            return False
        with atomic_write(path) as sink:
            sink.write(_sealed_header(keyring, data_key, chunk_size, prefix))
            while block := source.read(DEFAULT_CHUNK_SIZE):
                sink.write(block)
    return True
