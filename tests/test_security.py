"""Security primitives: envelope encryption, API keys, the hash-chained audit log. CPU, no network, seconds."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tunesmith.errors import UserError
from tunesmith.security import apikeys, audit, encryption
from tunesmith.security.apikeys import InvalidKeyError, Scope
from tunesmith.security.audit import AuditEvent, AuditFile, seal
from tunesmith.security.encryption import DecryptionError, Keyring

CHUNK = 64  # bytes of plaintext per chunk: multi-chunk files stay tiny
OBJECT = "file-abc123"


@pytest.fixture
def keyring(tmp_path) -> Keyring:
    return Keyring.create(tmp_path / "master.json")


@pytest.fixture
def encrypted(tmp_path, keyring) -> tuple[Path, bytes]:
    """A five-and-a-bit-chunk file, encrypted: (encrypted path, plaintext)."""
    plaintext = b"CONFIDENTIAL support ticket " * 12  # 336 bytes -> 6 chunks of <= 64
    source = tmp_path / "plain.bin"
    source.write_bytes(plaintext)
    encryption.encrypt_file(source, tmp_path / "blob.enc", OBJECT, keyring, chunk_size=CHUNK)
    return tmp_path / "blob.enc", plaintext


def header_size(keyring: Keyring) -> int:
    return len(encryption.MAGIC) + 2 + len(keyring.current) + 4 + 8 + 12 + 48


# --- encryption: round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK + 7])
def test_bytes_round_trip_at_chunk_boundaries(keyring, size):
    plaintext = os.urandom(size)
    blob = encryption.encrypt_bytes(plaintext, OBJECT, keyring, chunk_size=CHUNK)
    assert encryption.decrypt_bytes(blob, OBJECT, keyring) == plaintext
    assert len(blob) == header_size(keyring) + size + 16 * max(1, -(-size // CHUNK))


def test_file_round_trip_streams_in_chunks(tmp_path, keyring, encrypted):
    path, plaintext = encrypted
    chunks = list(encryption.open_decrypted(path, OBJECT, keyring))
    assert [len(chunk) for chunk in chunks] == [CHUNK] * 5 + [len(plaintext) - 5 * CHUNK]
    encryption.decrypt_file(path, tmp_path / "out.bin", OBJECT, keyring)
    assert (tmp_path / "out.bin").read_bytes() == plaintext


def test_plaintext_never_appears_in_the_encrypted_file(encrypted):
    path, _ = encrypted
    assert b"CONFIDENTIAL" not in path.read_bytes()


def test_same_plaintext_encrypts_differently_each_time(keyring):
    first = encryption.encrypt_bytes(b"same", OBJECT, keyring)
    assert first != encryption.encrypt_bytes(b"same", OBJECT, keyring)


def test_decrypt_failure_leaves_no_destination_file(tmp_path, keyring, encrypted):
    path, _ = encrypted
    with pytest.raises(DecryptionError):
        encryption.decrypt_file(path, tmp_path / "out.bin", "file-other", keyring)
    assert not (tmp_path / "out.bin").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- encryption: tampering -------------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset", ["magic", "version", "key_id", "chunk_size", "prefix", "wrap", "last_header"])
def test_flipped_header_byte_is_detected(keyring, encrypted, offset):
    path, _ = encrypted
    key_id_end = len(encryption.MAGIC) + 2 + len(keyring.current)
    offsets = {
        "magic": 0,
        "version": len(encryption.MAGIC),
        "key_id": key_id_end - 1,
        "chunk_size": key_id_end + 3,
        "prefix": key_id_end + 4,
        "wrap": key_id_end + 12,
        "last_header": header_size(keyring) - 1,
    }
    flip(path, offsets[offset])
    with pytest.raises(DecryptionError):
        encryption.decrypt_bytes(path.read_bytes(), OBJECT, keyring)


@pytest.mark.parametrize("chunk", [0, 2, 5])
def test_flipped_chunk_byte_is_detected_and_names_the_chunk(keyring, encrypted, chunk):
    path, _ = encrypted
    flip(path, header_size(keyring) + chunk * (CHUNK + 16) + 3)
    with pytest.raises(DecryptionError, match=f"chunk {chunk} "):
        list(encryption.open_decrypted(path, OBJECT, keyring))


@pytest.mark.parametrize("cut", [1, 16, CHUNK + 16, 2 * (CHUNK + 16), "all_chunks", "inside_header"])
def test_truncated_file_is_detected(keyring, encrypted, cut):
    path, _ = encrypted
    data = path.read_bytes()
    keep = {"all_chunks": header_size(keyring), "inside_header": 10}.get(cut) or len(data) - cut
    path.write_bytes(data[:keep])
    with pytest.raises(DecryptionError):
        list(encryption.open_decrypted(path, OBJECT, keyring))


def test_appended_bytes_are_detected(keyring, encrypted):
    path, _ = encrypted
    path.write_bytes(path.read_bytes() + b"\x00" * 20)
    with pytest.raises(DecryptionError):
        encryption.decrypt_bytes(path.read_bytes(), OBJECT, keyring)


def test_swapped_chunks_are_detected(keyring, encrypted):
    path, _ = encrypted
    data, start, block = path.read_bytes(), header_size(keyring), CHUNK + 16
    first, second = data[start : start + block], data[start + block : start + 2 * block]
    path.write_bytes(data[:start] + second + first + data[start + 2 * block :])
    with pytest.raises(DecryptionError, match="chunk 0 "):
        encryption.decrypt_bytes(path.read_bytes(), OBJECT, keyring)


def test_blob_moved_to_another_object_fails(keyring):
    blob = encryption.encrypt_bytes(b"payload", OBJECT, keyring)
    with pytest.raises(DecryptionError, match="another object"):
        encryption.decrypt_bytes(blob, "file-xyz789", keyring)


def test_unknown_master_key_is_named(keyring, tmp_path):
    blob = encryption.encrypt_bytes(b"payload", OBJECT, keyring)
    stranger = Keyring.create(tmp_path / "other-master.json")
    with pytest.raises(DecryptionError, match=f"master key '{keyring.current}'"):
        encryption.decrypt_bytes(blob, OBJECT, stranger)


# --- encryption: rotation and rewrapping -------------------------------------------------------------


def test_rotate_keeps_old_objects_readable_and_persists(keyring, encrypted):
    path, plaintext = encrypted
    old_id = keyring.current
    new_id = keyring.rotate()
    assert new_id != old_id and set(keyring.keys) == {old_id, new_id}
    assert b"".join(encryption.open_decrypted(path, OBJECT, keyring)) == plaintext
    reloaded = Keyring.load(keyring.path)
    assert reloaded.current == new_id and b"".join(encryption.open_decrypted(path, OBJECT, reloaded)) == plaintext


def test_keyrings_in_other_processes_see_rotations_and_keep_all_keys(keyring):
    """Two holders of one key file (say two service workers): neither loses the key the other made."""
    first, second = Keyring.load(keyring.path), Keyring.load(keyring.path)
    second_id = second.rotate()
    blob = encryption.encrypt_bytes(b"payload", OBJECT, second)
    assert encryption.decrypt_bytes(blob, OBJECT, first) == b"payload"  # reloads the file for the new key
    first_id = first.rotate()
    assert set(Keyring.load(keyring.path).keys) == {keyring.current, second_id, first_id}


def test_create_makes_a_private_directory(tmp_path):
    keyring = Keyring.create(tmp_path / "home" / "keys" / "master.json")
    assert stat.S_IMODE(keyring.path.parent.stat().st_mode) == 0o700


def test_rewrap_moves_the_object_to_the_current_key_without_touching_chunks(keyring, encrypted):
    path, plaintext = encrypted
    old_id, chunks_before = keyring.current, path.read_bytes()[header_size(keyring) :]
    keyring.rotate()
    assert encryption.rewrap(path, keyring) is True
    assert path.read_bytes()[header_size(keyring) :] == chunks_before  # the data was not re-encrypted
    assert encryption.rewrap(path, keyring) is False  # already under the current key
    only_new = Keyring({keyring.current: keyring.keys[keyring.current]}, keyring.current)
    assert encryption.decrypt_bytes(path.read_bytes(), OBJECT, only_new) == plaintext
    only_old = Keyring({old_id: keyring.keys[old_id]}, old_id)
    with pytest.raises(DecryptionError, match="lacks"):
        encryption.decrypt_bytes(path.read_bytes(), OBJECT, only_old)


# --- keyring loading ------------------------------------------------------------------------------


def test_key_file_is_private_and_shaped_as_documented(keyring):
    assert stat.S_IMODE(keyring.path.stat().st_mode) == 0o600
    document = json.loads(keyring.path.read_text())
    assert set(document) == {"current", "keys"} and document["current"] in document["keys"]
    assert len(base64.b64decode(document["keys"][document["current"]])) == 32


def test_create_refuses_to_overwrite(keyring):
    with pytest.raises(UserError, match="already exists"):
        Keyring.create(keyring.path)


def test_key_from_environment(monkeypatch, keyring):
    key = os.urandom(32)
    monkeypatch.setenv("TUNESMITH_MASTER_KEY", base64.b64encode(key).decode())
    from_environment = Keyring.from_environment()
    assert from_environment.current == encryption.derive_key_id(key)
    blob = encryption.encrypt_bytes(b"payload", OBJECT, from_environment)
    assert encryption.decrypt_bytes(blob, OBJECT, Keyring.from_environment()) == b"payload"
    with pytest.raises(UserError, match="cannot be rotated"):
        from_environment.rotate()


@pytest.mark.parametrize(
    "value, problem",
    [(None, "not set"), ("not base64!", "not valid base64"), (base64.b64encode(b"short").decode(), "5 bytes")],
)
def test_bad_environment_key_names_the_variable_and_the_fix(monkeypatch, value, problem):
    if value is None:
        monkeypatch.delenv("TUNESMITH_MASTER_KEY", raising=False)
    else:
        monkeypatch.setenv("TUNESMITH_MASTER_KEY", value)
    with pytest.raises(UserError, match=problem) as caught:
        Keyring.from_environment()
    assert str(caught.value).startswith("TUNESMITH_MASTER_KEY: ") and "fix: " in str(caught.value)


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "not found"),
        ("{not json", "not JSON"),
        ('{"keys": {}}', "malformed"),
        ('{"current": "a", "keys": {"a": "AAAA"}}', "3 bytes"),
        ('{"current": "b", "keys": {"a": "' + base64.b64encode(bytes(32)).decode() + '"}}', "'current' is 'b'"),
    ],
)
def test_bad_key_file_names_the_file_and_the_fix(tmp_path, content, problem):
    path = tmp_path / "master.json"
    if content is not None:
        path.write_text(content)
        path.chmod(0o600)
    with pytest.raises(UserError, match=problem) as caught:
        Keyring.load(path)
    assert str(caught.value).startswith(str(path)) and "fix: " in str(caught.value)


def test_key_file_readable_by_others_is_refused(keyring):
    keyring.path.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        Keyring.load(keyring.path)


# --- API keys -------------------------------------------------------------------------------------


def test_api_key_round_trip():
    made = apikeys.new_key()
    assert made.secret.startswith("tsk_") and made.key_id in made.secret
    assert made.secret not in repr(made) and made.hash.startswith("sha256:")
    assert apikeys.parse_key(made.secret).key_id == made.key_id
    assert apikeys.verify(made.secret, made.hash)


def test_wrong_api_key_is_rejected():
    made, other = apikeys.new_key(), apikeys.new_key()
    assert not apikeys.verify(other.secret, made.hash)
    tampered = made.secret[:-1] + ("A" if made.secret[-1] != "A" else "B")
    assert not apikeys.verify(tampered, made.hash)
    assert not apikeys.verify("garbage", made.hash)


@pytest.mark.parametrize("text", ["", "tsk_", "sk-abcdef", "tsk_0123456789ab_tooshort", "tsk_XYZ_" + "a" * 43])
def test_malformed_api_key_gets_a_clear_error_without_echoing_it(text):
    with pytest.raises(InvalidKeyError, match="malformed API key") as caught:
        apikeys.parse_key(text)
    assert "expected 'tsk_'" in str(caught.value)
    assert len(text) <= len("tsk_") or text not in str(caught.value)


def test_scopes_are_ordered_read_write_admin():
    assert Scope.ADMIN.allows(Scope.WRITE) and Scope.ADMIN.allows("read") and Scope.WRITE.allows(Scope.READ)
    assert not Scope.READ.allows(Scope.WRITE) and not Scope.WRITE.allows("admin")
    assert all(scope.allows(scope) for scope in Scope)
    with pytest.raises(UserError, match="did you mean 'write'"):
        Scope.parse("wirte")


# --- audit log ------------------------------------------------------------------------------------


def build_chain(length: int = 8) -> list[audit.AuditRecord]:
    records, previous = [], None
    for number in range(length):
        previous = seal(
            previous,
            AuditEvent(
                "acme", "0123456789ab", "file.upload", (f"file-{number}",), {"bytes": number * 10, "tags": ("a", "b")}
            ),
        )
        records.append(previous)
    return records


def test_chain_verifies_and_survives_a_json_round_trip():
    records = build_chain()
    assert [record.sequence for record in records] == list(range(1, 9))
    assert records[0].previous_hash == audit.GENESIS_HASH and records[1].previous_hash == records[0].hash
    assert records[0].timestamp.endswith("Z")
    reloaded = [audit.AuditRecord.from_dict(json.loads(audit.canonical_json(r.to_dict()))) for r in records]
    result = audit.verify(reloaded, expected_head=records[-1].hash)
    assert result.ok and result.count == 8 and "8 records" in str(result)


def test_altered_record_is_detected_at_its_sequence():
    records = build_chain()
    records[3] = replace(records[3], details={"bytes": 999999})
    result = audit.verify(records)
    assert not result.ok and result.broken_at == 4 and "altered" in result.problem and result.count == 3


def test_altered_and_resealed_record_breaks_the_next_link():
    records = build_chain()
    forged = replace(records[3], action="file.delete")
    records[3] = replace(forged, hash=forged.computed_hash())
    result = audit.verify(records)
    assert result.broken_at == 5 and "does not chain from record 4" in result.problem


def test_deleted_record_is_detected_at_its_sequence():
    records = build_chain()
    del records[4]
    result = audit.verify(records)
    assert result.broken_at == 5 and "missing" in result.problem


def test_reordered_records_are_detected():
    records = build_chain()
    records[4], records[5] = records[5], records[4]
    result = audit.verify(records)
    assert result.broken_at == 5 and "out of order" in result.problem


def test_inserted_record_is_detected():
    records = build_chain()
    records.insert(4, seal(records[3], AuditEvent("acme", "0123456789ab", "key.create")))
    result = audit.verify(records)
    assert result.broken_at == 5 and "inserted" in result.problem


def test_removed_tail_is_detected_only_against_a_known_head():
    records = build_chain()
    assert audit.verify(records[:-2]).ok
    assert audit.verify(records[:-2], expected_head=records[-1].hash).broken_at == 7


def test_audit_file_appends_reads_and_reports_a_corrupt_line(tmp_path):
    log = AuditFile(tmp_path / "audit" / "log.jsonl")
    for number in range(3):
        log.append(AuditEvent("acme", "0123456789ab", "job.create", (f"job-{number}",)))
    assert [r.object_ids for r in log.records()] == [("job-0",), ("job-1",), ("job-2",)] and log.verify().ok
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join([lines[0], "{oops", lines[2]]) + "\n")
    result = log.verify()
    assert result.broken_at == 2 and "not an audit record" in result.problem


APPENDER = """
import os, sys, time
from tunesmith.security.audit import AuditEvent, AuditFile
log = AuditFile(sys.argv[1])
while not os.path.exists(sys.argv[1] + ".go"):  # start together, so appends interleave
    time.sleep(0.005)
for number in range(int(sys.argv[3])):
    log.append(AuditEvent("acme", sys.argv[2], "job.create", (f"job-{number}",)))
"""


def test_concurrent_appends_from_processes_form_one_chain(tmp_path):
    path, processes, appends = tmp_path / "log.jsonl", 4, 25
    workers = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(path), f"worker{index}", str(appends)])
        for index in range(processes)
    ]
    Path(f"{path}.go").touch()
    assert [worker.wait(timeout=120) for worker in workers] == [0] * processes
    result = AuditFile(path).verify()
    assert result.ok and result.count == processes * appends, str(result)
    actors = [record.key_id for record in AuditFile(path).records()]
    assert sorted(set(actors)) == [f"worker{index}" for index in range(processes)]
