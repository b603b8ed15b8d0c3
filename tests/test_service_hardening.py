"""The service under fire (issue 21): dropped streams, hostile JSON bodies, uploads that fail half-way."""

from __future__ import annotations

import gc
import json

import pytest
from service_fixtures import live_app, make_key, record_generations, training_rows

httpx = pytest.importorskip("httpx2")  # what openai 3.x and starlette 1.x speak

QUESTION = [{"role": "user", "content": "Tell me a long story."}]
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture
def service(tmp_path, tiny_model):
    from tunesmith.serve.service import Service, Settings

    return Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}, max_upload_bytes=64 << 10))


def headers(service, scope: str = "write") -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(service, 'acme', scope)}"}


def test_a_dropped_stream_frees_the_model_and_stops_its_generation(service, monkeypatch):
    generated = record_generations(monkeypatch)  # no end-of-turn: only max_tokens would end a reply
    gc.disable()  # the lock must be freed by the server, not by a garbage collection that happens to run
    try:
        with live_app(service, worker=False) as base_url:
            auth = headers(service, "read")
            with httpx.Client(base_url=base_url, headers=auth, timeout=30) as dropping:
                with dropping.stream(
                    "POST",
                    "/chat/completions",
                    json={"model": "tiny", "messages": QUESTION, "max_tokens": 900, "stream": True},
                ) as response:
                    assert response.status_code == 200
                    first = next(line for line in response.iter_lines() if line.startswith("data: "))
                    assert json.loads(first.removeprefix("data: "))["object"] == "chat.completion.chunk"
            # the client has closed its connection after one chunk; the next request must not wait on that stream
            with httpx.Client(base_url=base_url, headers=auth, timeout=10) as after:
                reply = after.post("/chat/completions", json={"model": "tiny", "messages": QUESTION, "max_tokens": 4})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 4
    finally:
        gc.enable()
    assert len(generated) == 2 and len(generated[0]) < 900, "the dropped stream's generation stopped early"


def nested(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("path", ["/chat/completions", "/completions", "/fine_tuning/jobs", "/keys"])
def test_a_deeply_nested_body_is_an_openai_shaped_400(service, path):
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app

    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        for depth in (100_000, 1_000):
            reply = client.post(
                f"/v1{path}",
                content=nested(depth),
                headers={**headers(service, "admin"), "Content-Type": "application/json"},
            )
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert set(error) == ERROR_FIELDS and error["type"] == "invalid_request_error"
            assert "nested" in error["message"]


def test_json_bodies_within_the_depth_limit_and_strings_of_brackets_still_parse(service):
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app

    with TestClient(create_app(service)) as client:
        name = "[[[{{{" * 1000  # brackets inside a string are not nesting
        reply = client.post("/v1/keys", json={"scope": "read", "name": name}, headers=headers(service, "admin"))
        assert reply.status_code == 200, reply.text
        assert reply.json()["name"] == name[:200]


def test_an_unexpected_error_is_an_openai_shaped_500(service, monkeypatch):
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(service.store, "files", broken)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        reply = client.get("/v1/files", headers=headers(service, "read"))
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert set(error) == ERROR_FIELDS and error["type"] == "server_error"
    assert "secret internal detail" not in error["message"]


def test_an_upload_that_fails_after_its_blob_was_written_leaves_nothing_behind(service, monkeypatch):
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app

    def broken(*args, **kwargs):
        raise RuntimeError("the database went away")

    monkeypatch.setattr(service.store, "add_file", broken)
    data = "".join(json.dumps(row) + "\n" for row in training_rows(4)).encode()
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        reply = client.post(
            "/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"}, headers=headers(service)
        )
    assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
    assert [path for path in service.blobs.root.rglob("*") if path.is_file()] == []


def test_an_upload_with_a_deeply_nested_line_leaves_nothing_behind(service):
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app

    data = json.dumps(training_rows(1)[0]).encode() + b"\n" + b"[" * 30_000 + b"]" * 30_000 + b"\n"
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        reply = client.post(
            "/v1/files", files={"file": ("train.jsonl", data)}, data={"purpose": "fine-tune"}, headers=headers(service)
        )
    assert reply.status_code >= 400 and set(reply.json()["error"]) == ERROR_FIELDS
    assert [path for path in service.blobs.root.rglob("*") if path.is_file()] == []
    assert service.store.files("acme", None) == []


def test_closing_the_event_stream_closes_the_chunks_it_reads():
    from tunesmith.serve.api import sse

    closed = []

    def chunks():
        try:
            yield {"n": 1}
            yield {"n": 2}
        finally:
            closed.append(True)

    source = chunks()  # still referenced here, so only an explicit close can end it
    events = sse(source)
    assert next(events) == b'data: {"n": 1}\n\n'
    events.close()
    assert closed == [True]
