"""Audit before act (issue 21, B3): every state-changing request writes its audit record first. With the audit log
unwritable, the request gets an OpenAI-shaped 503 and nothing happens (no row, no blob, no key), so a client's
retry cannot duplicate anything; an action that fails after its record leaves a second `.failed` record."""

from __future__ import annotations

import json

import pytest
from service_fixtures import live_app, make_key, training_rows, write_rows

from tunesmith.security.audit import AuditFile

openai = pytest.importorskip("openai")


@pytest.fixture()
def site(tmp_path, tiny_model):
    from tunesmith.serve.service import Service, Settings

    service = Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}))
    keys = {scope: make_key(service, "acme", scope) for scope in ("write", "admin")}
    with live_app(service, worker=False) as base_url:
        yield service, base_url, keys
    service.store.close()


def client(site, scope: str = "write") -> openai.OpenAI:
    _, base_url, keys = site
    return openai.OpenAI(base_url=base_url, api_key=keys[scope], max_retries=0)


@pytest.fixture()
def broken_log(monkeypatch):
    """The audit log's disk fails from now on (as a full or read-only filesystem does)."""

    def fail(self, event):
        raise OSError(28, "No space left on device")

    def arm():
        monkeypatch.setattr(AuditFile, "append", fail)

    return arm


def actions(service) -> list[str]:
    return [record.action for record in service.audit_log.records()]


def assert_unavailable(error: openai.APIStatusError) -> None:
    body = error.response.json()["error"]
    assert error.status_code == 503 and body["code"] == "audit_unavailable" and body["type"] == "server_error"
    assert "nothing was changed" in body["message"]


def test_an_upload_with_an_unwritable_log_is_refused_and_stores_nothing(site, broken_log, tmp_path):
    service, _, _ = site
    data = write_rows(tmp_path / "train.jsonl", training_rows())
    broken_log()
    with pytest.raises(openai.APIStatusError) as caught:
        client(site).files.create(file=data.open("rb"), purpose="fine-tune")
    assert_unavailable(caught.value)
    assert service.store.files("acme", None, None, 100) == []
    assert [path for path in service.blobs.root.rglob("*") if path.is_file()] == []  # no orphan ciphertext


def test_job_creation_cancel_and_deletes_with_an_unwritable_log_change_nothing(site, broken_log, tmp_path):
    service, _, _ = site
    api = client(site)
    upload = api.files.create(
        file=write_rows(tmp_path / "train.jsonl", training_rows()).open("rb"), purpose="fine-tune"
    )
    job = api.fine_tuning.jobs.create(model="tiny", training_file=upload.id)
    before = actions(service)
    assert before == ["file.upload", "job.create"]
    broken_log()
    for attempt in (
        lambda: api.fine_tuning.jobs.create(model="tiny", training_file=upload.id),
        lambda: api.fine_tuning.jobs.cancel(job.id),
        lambda: api.files.delete(upload.id),
    ):
        with pytest.raises(openai.APIStatusError) as caught:
            attempt()
        assert_unavailable(caught.value)
    assert [row["id"] for row in service.store.jobs("acme", None, 100)] == [job.id]  # no second job
    assert not service.store.job("acme", job.id)["cancel_requested"]
    assert service.store.file("acme", upload.id) is not None and service.blobs.exists(f"files/{upload.id}")
    assert actions(service) == before


def test_a_key_is_not_created_or_revoked_without_its_record(site, broken_log):
    service, base_url, keys = site
    admin = client(site, "admin")
    made = admin.post("/keys", body={"scope": "read"}, cast_to=object)
    count = len(service.store.keys("acme"))
    broken_log()
    for method, path, body in (("post", "/keys", {"scope": "write"}), ("delete", f"/keys/{made['id']}", None)):
        with pytest.raises(openai.APIStatusError) as caught:
            getattr(admin, method)(path, cast_to=object, **({"body": body} if body else {}))
        assert_unavailable(caught.value)
    assert len(service.store.keys("acme")) == count
    assert service.store.key(made["id"])["revoked_at"] is None


def test_an_action_that_fails_after_its_record_leaves_a_failed_record(site, monkeypatch, tmp_path):
    service, _, _ = site

    def database_down(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(service.store, "add_file", database_down)
    with pytest.raises(openai.InternalServerError):
        client(site).files.create(
            file=write_rows(tmp_path / "train.jsonl", training_rows()).open("rb"), purpose="fine-tune"
        )
    records = list(service.audit_log.records())
    assert [record.action for record in records] == ["file.upload", "file.upload.failed"]
    assert records[0].object_ids == records[1].object_ids and "database went away" in json.dumps(records[1].details)
    assert [path for path in service.blobs.root.rglob("*") if path.is_file()] == []
