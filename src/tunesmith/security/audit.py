"""An append-only audit trail whose records are hash-chained, so edits, deletions and reorderings show.

Each record's hash is SHA-256 over the canonical JSON of all its other fields, including the previous
record's hash; the first record chains from `GENESIS_HASH`. `seal` and `verify` are pure, so the
service can keep the chain in its database; `AuditFile` is a JSONL store that needs no database.

A chain alone cannot show that its newest records were removed or re-sealed by someone able to
rewrite the tail: keep the head (sequence and hash) somewhere else too, as the service does in its store
(`AuditFile(on_append=...)`), and pass it to `verify(expected_head=AuditHead(...))`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

GENESIS_HASH = "0" * 64  # the "previous hash" of record 1
_FIELD_TYPES = {
    "sequence": int,
    "timestamp": str,
    "project": str,
    "key_id": str,
    "action": str,
    "object_ids": list,
    "details": dict,
    "previous_hash": str,
    "hash": str,
}


class AuditError(Exception):
    """The audit log cannot be read or extended as a valid chain; `line` is the 1-based line, when known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, no spaces, no NaN; the hash input and the stored line alike."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True)
class AuditEvent:
    """What happened, as the caller says it: the actor (project + API key id), the action and its objects."""

    project: str
    key_id: str
    action: str  # a dotted verb, e.g. "file.upload", "job.create", "key.revoke"
    object_ids: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    sequence: int  # 1, 2, 3, ... with no gaps
    timestamp: str  # ISO-8601 UTC, e.g. 2025-01-31T12:00:00.000000Z
    project: str
    key_id: str
    action: str
    object_ids: tuple[str, ...]
    details: dict[str, Any]
    previous_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "object_ids": list(self.object_ids)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditRecord:
        if not isinstance(data, dict) or set(data) != set(_FIELD_TYPES):
            raise ValueError(f"expected the fields {', '.join(_FIELD_TYPES)}")
        wrong = [name for name, kind in _FIELD_TYPES.items() if type(data[name]) is not kind]
        if wrong:
            raise ValueError(f"wrong type for {', '.join(wrong)}")
        return cls(**{**data, "object_ids": tuple(data["object_ids"])})

    def computed_hash(self) -> str:
        content = {name: value for name, value in self.to_dict().items() if name != "hash"}
        return hashlib.sha256(canonical_json(content).encode()).hexdigest()


def seal(previous: AuditRecord | None, event: AuditEvent, now: datetime | None = None) -> AuditRecord:
    """The record that follows `previous` (None for the first), with its hash computed."""
    moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    # A JSON round trip makes `details` exactly what a reader will load (tuples -> lists, int keys -> str),
    # so the hash computed now is the hash recomputed later.
    details = json.loads(canonical_json(dict(event.details)))
    unsealed = AuditRecord(
        sequence=previous.sequence + 1 if previous else 1,
        timestamp=moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        project=event.project,
        key_id=event.key_id,
        action=event.action,
        object_ids=tuple(str(object_id) for object_id in event.object_ids),
        details=details,
        previous_hash=previous.hash if previous else GENESIS_HASH,
        hash="",
    )
    return replace(unsealed, hash=unsealed.computed_hash())


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int  # records checked and found sound, in order
    broken_at: int | None = None  # the sequence number where the chain first breaks
    problem: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"audit chain OK: {self.count} records"
        return f"audit chain broken at record {self.broken_at}: {self.problem}"


@dataclass(frozen=True)
class AuditHead:
    """The newest record as recorded outside the log: a log shorter than it, or whose record at its sequence
    has another hash, lost records or was rewritten."""

    sequence: int
    hash: str


def _check_head(head: AuditHead, count: int, hash_at_head: str | None) -> VerifyResult:
    """Whether the sound chain of `count` records reaches `head`, with `head.hash` at its sequence."""
    if count < head.sequence:
        what = "it has no records" if count == 0 else f"it ends at record {count}"
        return VerifyResult(
            False, count, count + 1, f"the log was truncated: {what}, but the recorded head is record {head.sequence}"
        )
    if hash_at_head != head.hash:
        return VerifyResult(
            False,
            count,
            head.sequence,
            f"record {head.sequence} is not the recorded head (its hash differs): the log was rewritten and re-sealed",
        )
    return VerifyResult(True, count)


def _find_sequence(records: Iterator[AuditRecord], sequence: int) -> bool:
    return any(record.sequence == sequence for record in records)


def verify(records: Iterable[AuditRecord], expected_head: str | AuditHead | None = None) -> VerifyResult:
    """Walk the chain in order; report the first break, naming its sequence number and what is wrong.

    `expected_head`: the hash the last record must have, or an `AuditHead`, which the log must reach; records
    after the head are allowed (a crash between appending and recording the head leaves one).
    Streams: only after a break does it read further, to tell a deleted record from a moved one.
    """
    iterator, previous_hash, count, hash_at_head = iter(records), GENESIS_HASH, 0, None
    for record in iterator:
        expected = count + 1
        if record.computed_hash() != record.hash:
            return VerifyResult(
                False, count, expected, f"record {expected} was altered: its contents do not match its hash"
            )
        if record.sequence > expected:
            moved = _find_sequence(iterator, expected)
            what = "is out of order (it appears later)" if moved else "is missing (deleted)"
            return VerifyResult(
                False,
                count,
                expected,
                f"record {expected} {what}: record {record.sequence} follows record {expected - 1}",
            )
        if record.sequence < expected:  # every number below `expected` has been seen once already
            what = "appears twice: a record was inserted" if record.sequence >= 1 else "has an invalid number"
            return VerifyResult(
                False, count, record.sequence, f"record {record.sequence} {what} (found after record {expected - 1})"
            )
        if record.previous_hash != previous_hash:
            return VerifyResult(
                False,
                count,
                record.sequence,
                f"record {record.sequence} does not chain from "
                f"record {expected - 1}: one of them was replaced or re-sealed",
            )
        previous_hash, count = record.hash, expected
        if isinstance(expected_head, AuditHead) and count == expected_head.sequence:
            hash_at_head = record.hash
    if isinstance(expected_head, AuditHead):
        return _check_head(expected_head, count, hash_at_head)
    if expected_head is not None and previous_hash != expected_head:
        return VerifyResult(
            False,
            count,
            count + 1,
            "the chain ends before the expected head: its newest records were removed or rewritten",
        )
    return VerifyResult(True, count)


class AuditFile:
    """A JSONL audit log (mode 0600); appends from many processes serialise on an exclusive flock of the file.

    `on_append(record)` runs under that lock once the record is durable: the service records the new head in
    its store there, so heads are recorded in chain order.
    """

    def __init__(self, path: str | Path, on_append: Callable[[AuditRecord], None] | None = None):
        self.path = Path(path)
        self.on_append = on_append

    def append(self, event: AuditEvent) -> AuditRecord:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # O_APPEND: every write lands at the end; 0600: the log names projects, keys and objects.
        descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            last_line = _last_line(handle)
            previous = _parse_line(last_line, f"{self.path}: the last line") if last_line else None
            record = seal(previous, event)
            handle.write(canonical_json(record.to_dict()).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())  # durable before the caller reports the action done
            if self.on_append is not None:
                self.on_append(record)
        return record

    def records(self) -> Iterator[AuditRecord]:
        """Records in file order; a snapshot of what was complete when reading began."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)  # wait out an append in progress, then read up to its end:
            size = os.fstat(handle.fileno()).st_size  # later appends only add bytes past `size`
            fcntl.flock(handle, fcntl.LOCK_UN)
            consumed, number = 0, 0
            while consumed < size:
                line = handle.readline(size - consumed)
                consumed, number = consumed + len(line), number + 1
                if not line.endswith(b"\n"):
                    raise AuditError(
                        f"{self.path}:{number}: the last line is incomplete (a crash during a write?)", number
                    )
                yield _parse_line(line, f"{self.path}:{number}", number)

    def verify(self, expected_head: str | AuditHead | None = None) -> VerifyResult:
        """Verify the file's chain; an unreadable line counts as a break at that line's position."""
        try:
            return verify(self.records(), expected_head)
        except AuditError as error:
            line = error.line or 1
            return VerifyResult(False, line - 1, line, str(error))


def _parse_line(line: bytes, where: str, number: int | None = None) -> AuditRecord:
    try:
        return AuditRecord.from_dict(json.loads(line))
    except (ValueError, TypeError) as error:
        raise AuditError(f"{where}: not an audit record ({error})", number) from None


def _ends_with_newline(handle: BinaryIO, size: int) -> bool:
    handle.seek(size - 1)
    return handle.read(1) == b"\n"


def _last_line(handle: BinaryIO, block_size: int = 4096) -> bytes:
    """The last complete line, read backwards from the end so appends stay O(1) in the log's length."""
    end = handle.seek(0, os.SEEK_END)
    if end == 0:
        return b""
    if not _ends_with_newline(handle, end):
        raise AuditError(
            f"{handle.name}: the audit log ends with an incomplete line (a crash during a write?); "
            "fix: inspect it, remove the partial line, then run verify"
        )
    tail, position = b"", end - 1  # skip the final newline
    while position > 0 and b"\n" not in tail:
        start = max(0, position - block_size)
        handle.seek(start)
        tail = handle.read(position - start) + tail
        position = start
    return tail.rsplit(b"\n", 1)[-1]
