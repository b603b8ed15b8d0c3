"""The API's semantics where they must match OpenAI's: list cursors, error codes, cancel, the first event,
and the schema behind a key. In-process (FastAPI's TestClient); the store's rows are written directly."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_fixtures import make_key

from tunesmith.serve.api import create_app
from tunesmith.serve.service import Service, Settings

PROJECT = "acme"
JOB = dict(model="tiny", training_file="file-x", method="supervised", hyperparameters={}, seed=0)


@pytest.fixture
def site(tmp_path: Path):
    service = Service(Settings(home=tmp_path / "home", base_models={"tiny": "tiny"}))
    client = TestClient(create_app(service))
    keys = {scope: {"Authorization": f"Bearer {make_key(service, PROJECT, scope)}"} for scope in ("read", "write")}
    yield service, client, keys
    service.store.close()


def add_file(service: Service, created_at: int) -> dict:
    return service.store.add_file(
        PROJECT,
        filename="a.jsonl",
        purpose="fine-tune",
        bytes=1,
        sha256="0" * 64,
        format="messages",
        examples=1,
        created_at=created_at,
    )


def test_an_unknown_after_cursor_is_a_400_on_every_list(site):
    service, client, keys = site
    store = service.store
    file = add_file(service, 1)
    job = store.add_job(PROJECT, **JOB)
    other = store.add_job(PROJECT, **JOB)
    store.add_event(other["id"], "another job's event")
    store.add_checkpoint(other["id"], 10, {})
    foreign_event = store.events(other["id"])[0]["id"]
    foreign_checkpoint = store.checkpoints(other["id"])[0]["id"]
    lists = {
        "/v1/files": file["id"],
        "/v1/fine_tuning/jobs": job["id"],
        f"/v1/fine_tuning/jobs/{job['id']}/events": foreign_event,  # a cursor from another job's list
        f"/v1/fine_tuning/jobs/{job['id']}/checkpoints": foreign_checkpoint,
    }
    for path, known in lists.items():
        for after in ("nope-123", known if "/jobs/" in path else None):
            if after is None:
                continue
            response = client.get(path, params={"after": after}, headers=keys["read"])
            assert response.status_code == 400, (path, response.text)
            error = response.json()["error"]
            assert error["param"] == "after" and error["code"] == "invalid_cursor" and after in error["message"]
            assert error["type"] == "invalid_request_error"
        if "/jobs/" not in path:  # a known cursor still pages
            assert client.get(path, params={"after": known}, headers=keys["read"]).status_code == 200


def test_files_page_by_cursor_newest_first(site):
    service, client, keys = site
    made = [add_file(service, created_at)["id"] for created_at in (1, 2, 2, 3, 4)]  # a tie in created_at
    seen, after = [], None
    while True:
        body = client.get(
            "/v1/files", params={"limit": 2, **({"after": after} if after else {})}, headers=keys["read"]
        ).json()
        seen += [file["id"] for file in body["data"]]
        if not body["has_more"]:
            break
        after = body["last_id"]
    assert sorted(seen) == sorted(made) and len(seen) == len(made)
    assert seen[0] == made[-1] and seen[-1] == made[0]


def test_a_missing_job_is_fine_tuning_job_not_found(site):
    _, client, keys = site
    response = client.get("/v1/fine_tuning/jobs/ftjob-missing", headers=keys["read"])
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "fine_tuning_job_not_found"


def test_cancel_answers_cancelled_for_a_running_job(site):
    service, client, keys = site
    running = service.store.add_job(PROJECT, **JOB, status="running")
    response = client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel", headers=keys["write"])
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert client.get(f"/v1/fine_tuning/jobs/{running['id']}", headers=keys["read"]).json()["status"] == "cancelled"
    stored = service.store.job(PROJECT, running["id"])
    assert stored["status"] == "running" and stored["cancel_requested"]  # the worker still stops and finishes it
    again = client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel", headers=keys["write"])
    assert again.status_code == 400 and again.json()["error"]["code"] == "job_not_cancellable"


def test_creating_a_job_writes_a_created_event(site, monkeypatch):
    service, client, keys = site
    monkeypatch.setattr(service, "validate_job", lambda job: None)  # only the creation is under test
    file = add_file(service, 1)
    response = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file["id"]}, headers=keys["write"]
    )
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=keys["read"]).json()["data"]
    assert [event["message"] for event in events] == [f"Created fine-tuning job: {job_id}"]
    assert events[0]["object"] == "fine_tuning.job.event" and events[0]["level"] == "info"


def test_the_schema_and_docs_need_a_key(site):
    _, client, keys = site
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert client.get(path).status_code in (401, 404), path
    assert client.get("/openapi.json").json()["error"]["code"] == "missing_api_key"
    schema = client.get("/openapi.json", headers=keys["read"])
    assert schema.status_code == 200 and "/v1/fine_tuning/jobs" in schema.json()["paths"]


def test_the_dashboard_learns_its_keys_scope(site):
    _, client, keys = site
    assert client.get("/dashboard/key", headers=keys["read"]).json()["scope"] == "read"
    assert client.get("/dashboard/key", headers=keys["write"]).json()["scope"] == "write"
    assert client.get("/dashboard/key").status_code == 401
