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

import io
import secrets
import struct
from pathlib import Path
from typing import BinaryIO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# ENVIRONMENT_VARIABLE and derive_key_id are re-exported: they were importable from here before keyring.py
from tunesmith.security.keyring import ENVIRONMENT_VARIABLE as ENVIRONMENT_VARIABLE
from tunesmith.security.keyring import KEY_BYTES, DecryptionError, Keyring, atomic_write
from tunesmith.security.keyring import derive_key_id as derive_key_id

NONCE_BYTES = 12  # 96-bit GCM nonce
TAG_BYTES = 16  # GCM tag
NONCE_PREFIX_BYTES = 8  # + a 4-byte chunk counter = one 12-byte nonce per chunk
DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB of plaintext per chunk
MAX_CHUNK_SIZE = 64 << 20  # bytes; bounds what a header may ask us to buffer
MAGIC, VERSION = b"TSENC", 1
_FIXED_AFTER_KEY_ID = struct.Struct(f">I{NONCE_PREFIX_BYTES}s")  # chunk size, nonce prefix


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
            raise DecryptionError(
                f"chunk {index} of object '{object_id}' failed authentication: the data was "
                "modified, truncated or reordered, or it belongs to another object"
            ) from None
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


def encrypt_stream(
    source: BinaryIO, sink: BinaryIO, object_id: str, keyring: Keyring, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> None:
    """Encrypt everything `source.read` gives into `sink`, one chunk in memory at a time."""
    _write_stream(source, sink, object_id, keyring, chunk_size)


def encrypt_file(
    source: str | Path, destination: str | Path, object_id: str, keyring: Keyring, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> None:
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
