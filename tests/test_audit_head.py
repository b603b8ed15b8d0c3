"""The audit log's head kept in the store: `tunesmith audit verify` detects a log cut short, emptied, deleted or
re-sealed after an edit; and the service's state is private (0700/0600) even in a HOME made 0755 first.
CPU, no model, seconds."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from tunesmith import cli
from tunesmith.errors import UserError
from tunesmith.paths import make_private
from tunesmith.security import audit
from tunesmith.security.audit import AuditEvent, AuditFile, AuditHead
from tunesmith.serve.service import Service, Settings
from tunesmith.serve.store import Store

ACTIONS = ("key.create", "file.upload", "job.create", "file.delete")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A service home whose audit log holds one record per action of ACTIONS, each recorded in the store."""
    monkeypatch.delenv("TUNESMITH_DATABASE_URL", raising=False)
    home = tmp_path / "home"
    service = Service(Settings(home=home, base_models={"tiny": "tiny"}))
    for number, action in enumerate(ACTIONS):
        service.audit("acme", "k1", action, [f"obj-{number}"])
    service.store.close()
    return home


def run_verify(home: Path, capsys) -> tuple[int, str]:
    code = cli.main(["audit", "verify", "--home", str(home)])
    return code, capsys.readouterr().out


def log_lines(home: Path) -> list[str]:
    return (home / "audit.log").read_text().splitlines(keepends=True)


def test_an_intact_log_reaching_the_stored_head_passes(home, capsys):
    code, out = run_verify(home, capsys)
    assert code == 0 and "OK, 4 records" in out and "head the store recorded" in out, out


def test_dropping_the_last_record_is_detected(home, capsys):
    (home / "audit.log").write_text("".join(log_lines(home)[:-1]))
    code, out = run_verify(home, capsys)
    assert code == 1 and "TAMPERED" in out and "truncated" in out and "ends at record 3" in out, out
    assert "head is record 4" in out


def test_an_emptied_log_is_detected(home, capsys):
    (home / "audit.log").write_text("")
    code, out = run_verify(home, capsys)
    assert code == 1 and "truncated" in out and "no records" in out, out


def test_a_deleted_log_is_detected(home, capsys):
    (home / "audit.log").unlink()
    code, out = run_verify(home, capsys)
    assert code == 1 and "missing (deleted)" in out and "record 4" in out, out


def test_an_edited_and_fully_resealed_log_is_detected(home, capsys):
    """The forger edits record 2 and recomputes every hash after it: the chain is sound, the head is not."""
    records = [audit.AuditRecord.from_dict(json.loads(line)) for line in log_lines(home)]
    forged, previous = [], None
    for record in records:
        if record.sequence == 2:
            record = replace(record, action="file.download")
        record = replace(record, previous_hash=previous.hash if previous else audit.GENESIS_HASH)
        previous = replace(record, hash=record.computed_hash())
        forged.append(previous)
    assert audit.verify(forged).ok  # without the head, the forgery is invisible
    (home / "audit.log").write_text("".join(audit.canonical_json(r.to_dict()) + "\n" for r in forged))
    code, out = run_verify(home, capsys)
    assert code == 1 and "re-sealed" in out and "record 4" in out, out


def test_a_cut_log_stays_detected_after_the_service_appends_again(home, capsys):
    (home / "audit.log").write_text("".join(log_lines(home)[:2]))
    service = Service(Settings(home=home, base_models={"tiny": "tiny"}))
    service.audit("acme", "k1", "job.create", ["obj-9"])  # record 3 again, chained onto the cut log
    service.store.close()
    code, out = run_verify(home, capsys)
    assert code == 1 and "truncated" in out and "ends at record 3" in out, out


def test_a_log_without_a_stored_head_is_refused(home, capsys):
    store = Store(f"sqlite:///{home / 'service.db'}")
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM audit_head")
    store.close()
    code, out = run_verify(home, capsys)
    assert code == 1 and "no audit head" in out and "4 records" in out, out


def test_records_past_the_head_pass_since_a_crash_may_leave_one():
    """The head is recorded after the record is durable: a crash in between leaves the log one ahead."""
    records, previous = [], None
    for number in range(3):
        previous = audit.seal(previous, AuditEvent("acme", "k1", "job.create", (f"job-{number}",)))
        records.append(previous)
    assert audit.verify(records, expected_head=AuditHead(2, records[1].hash)).ok
    wrong = audit.verify(records, expected_head=AuditHead(2, records[2].hash))
    assert not wrong.ok and wrong.broken_at == 2 and "re-sealed" in wrong.problem


def test_the_head_is_recorded_in_chain_order_under_the_log_lock(tmp_path):
    seen = []
    log = AuditFile(tmp_path / "audit.log", on_append=lambda record: seen.append((record.sequence, record.hash)))
    appended = [log.append(AuditEvent("acme", "k1", "job.create", (f"job-{n}",))) for n in range(3)]
    assert seen == [(record.sequence, record.hash) for record in appended]


def test_the_store_head_only_moves_forward(store_url):
    store = Store(store_url)
    assert store.audit_head() is None
    store.set_audit_head(1, "a" * 64)
    store.set_audit_head(3, "c" * 64)
    store.set_audit_head(2, "b" * 64)  # a late or replayed append never moves the head back
    assert store.audit_head() == {"sequence": 3, "hash": "c" * 64}
    store.close()


# --- private files -------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def usual_umask():
    previous = os.umask(0o022)  # what `models pull` runs under on most machines: 0755 folders, 0644 files
    yield
    os.umask(previous)


def test_service_state_is_private_in_a_home_made_0755_first(tmp_path, usual_umask, monkeypatch):
    monkeypatch.delenv("TUNESMITH_DATABASE_URL", raising=False)
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)  # as `models pull` leaves it
    (home / "audit.log").touch()  # as an older version left it
    assert mode(home) == 0o755 and mode(home / "audit.log") == 0o644
    service = Service(Settings(home=home, base_models={"tiny": "tiny"}))
    service.audit("acme", "k1", "key.create", ["k1"])
    service.store.add_key("k1", "acme", "read", "0" * 64)  # SQLite writes, so its -wal file exists
    service.blobs.put_bytes("files/file-1", b"secret")
    assert mode(home) == 0o700
    assert mode(home / "service.db") == mode(home / "audit.log") == mode(home / "master.key") == 0o600
    assert mode(home / "blobs") == 0o700 and mode(service.blobs.path("files/file-1")) == 0o600
    for extra in ("service.db-wal", "service.db-shm"):
        if (home / extra).exists():
            assert mode(home / extra) == 0o600, extra
    service.store.close()


def test_a_new_audit_log_is_private(tmp_path, usual_umask):
    log = AuditFile(tmp_path / "logs" / "audit.log")
    log.append(AuditEvent("acme", "k1", "key.create"))
    assert mode(log.path) == 0o600 and mode(log.path.parent) == 0o700


def test_a_linked_file_is_refused(tmp_path):
    (tmp_path / "elsewhere").touch()
    (tmp_path / "audit.log").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="audit.log"):
        make_private(tmp_path / "audit.log", directory=False)
