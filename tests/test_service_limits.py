"""Bounded requests (issue 21, B5): a JSON body, a prompt and an upload each have a limit that is checked
before the work it would cost is done, and refusals are OpenAI-shaped."""

from __future__ import annotations

import json

import anyio
import pytest
from service_fixtures import make_key, training_rows

ERROR_FIELDS = {"message", "type", "param", "code"}
CHUNK = 64 << 10  # bytes per ASGI body message, as a server would pass them on


@pytest.fixture
def service(tmp_path, tiny_model):
    from tunesmith.serve.service import Service, Settings

    return Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}, max_upload_bytes=64 << 10))


def headers(service, scope: str = "write") -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(service, 'acme', scope)}"}


def call_asgi(app, path: str, head: dict[str, str], body_size: int, piece: bytes = b" ") -> tuple[int, dict, int]:
    """POST `body_size` bytes (`piece` repeated) to `app` in CHUNK-sized messages, as a server streams them.
    Returns the status, the JSON reply and how many body bytes the app asked for."""
    asked, sent, replies = [0], [0], []

    async def receive() -> dict:
        if sent[0] >= body_size:
            return {"type": "http.disconnect"}
        size = min(CHUNK, body_size - sent[0])
        sent[0] += size
        asked[0] += size
        return {
            "type": "http.request",
            "body": (piece * (size // len(piece) + 1))[:size],
            "more_body": sent[0] < body_size,
        }

    async def send(message: dict) -> None:
        replies.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": f"/v1{path}",
        "raw_path": f"/v1{path}".encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "headers": [(name.lower().encode(), value.encode()) for name, value in head.items()],
    }
    anyio.run(app, scope, receive, send)
    status = next(message["status"] for message in replies if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in replies if message["type"] == "http.response.body")
    return status, json.loads(body), asked[0]


@pytest.mark.parametrize("path", ["/chat/completions", "/fine_tuning/jobs"])
def test_an_oversized_json_body_is_a_413_read_no_further_than_the_limit(service, path):
    from tunesmith.serve.api import create_app
    from tunesmith.serve.bodies import MAX_JSON_BYTES

    app = create_app(service)
    size = 4 * MAX_JSON_BYTES
    status, reply, asked = call_asgi(app, path, {**headers(service), "content-type": "application/json"}, size)
    assert status == 413
    assert set(reply["error"]) == ERROR_FIELDS and reply["error"]["type"] == "invalid_request_error"
    assert str(MAX_JSON_BYTES) in reply["error"]["message"]
    assert asked <= MAX_JSON_BYTES + CHUNK, "the app stopped reading one chunk past the limit"


def test_a_declared_oversized_json_body_is_refused_before_it_is_read(service):
    from tunesmith.serve.api import create_app
    from tunesmith.serve.bodies import MAX_JSON_BYTES

    app = create_app(service)
    head = {**headers(service), "content-type": "application/json", "content-length": str(MAX_JSON_BYTES + 1)}
    status, reply, asked = call_asgi(app, "/chat/completions", head, MAX_JSON_BYTES + 1)
    assert status == 413 and set(reply["error"]) == ERROR_FIELDS
    assert asked == 0


def test_a_json_body_just_under_the_limit_still_parses(service):
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app
    from tunesmith.serve.bodies import MAX_JSON_BYTES

    name = "x" * (MAX_JSON_BYTES - 100)
    with TestClient(create_app(service)) as client:
        reply = client.post("/v1/keys", json={"scope": "read", "name": name}, headers=headers(service, "admin"))
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("chat", [True, False])
def test_a_prompt_longer_than_the_context_could_hold_is_refused_before_tokenizing(service, monkeypatch, chat):
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app
    from tunesmith.serve.request import MAX_BYTES_PER_TOKEN

    app = create_app(service)
    engine = app.state.pool.engine(service.settings.base_models["tiny"])
    calls = []
    tokenize, prompt_ids = type(engine.tokenizer).__call__, engine.chat.prompt_ids
    monkeypatch.setattr(type(engine.tokenizer), "__call__", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    monkeypatch.setattr(engine.chat, "prompt_ids", lambda *a, **k: calls.append(1) or prompt_ids(*a, **k))
    context = engine.model.config.max_position_embeddings
    text = "é" * (context * MAX_BYTES_PER_TOKEN // 2 + 1)  # two UTF-8 bytes a character
    request = (
        {"model": "tiny", "messages": [{"role": "user", "content": text}]}
        if chat
        else {"model": "tiny", "prompt": text}
    )
    with TestClient(app) as client:
        reply = client.post(
            "/v1/chat/completions" if chat else "/v1/completions", json=request, headers=headers(service, "read")
        )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == ERROR_FIELDS and error["code"] == "context_length_exceeded"
    assert str(context) in error["message"]
    assert calls == [], "the prompt was refused before the tokenizer saw it"


def test_a_prompt_within_the_byte_bound_is_still_tokenized_and_checked(service):
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app

    with TestClient(create_app(service)) as client:
        reply = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "hello " * 2000}, headers=headers(service, "read")
        )
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded"
    assert "tokens" in reply.json()["error"]["message"]


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> tuple[str, bytes]:
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def training_file(size: int) -> bytes:
    rows = training_rows(1000)
    data = b""
    for row in rows:
        line = json.dumps(row).encode() + b"\n"
        if len(data) + len(line) > size:
            return data
        data += line
    return data


def stored_blobs(service) -> list:
    return [path for path in service.blobs.root.rglob("*") if path.is_file()]


def post_form(service, parts) -> tuple[int, dict]:
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app

    content_type, body = multipart(parts)
    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        reply = client.post("/v1/files", content=body, headers={**headers(service), "Content-Type": content_type})
    return reply.status_code, reply.json()


def test_an_upload_with_one_file_part_and_unknown_fields_is_accepted(service):
    status, reply = post_form(
        service,
        [
            ("purpose", None, b"fine-tune"),
            ("expires_after[anchor]", None, b"created_at"),
            ("file", "train.jsonl", training_file(8 << 10)),
        ],
    )
    assert status == 200, reply
    assert len(stored_blobs(service)) == 1


@pytest.mark.parametrize("second", ["file", "other"])
def test_an_upload_with_a_second_file_part_is_a_400_that_leaves_nothing_behind(service, second):
    status, reply = post_form(
        service,
        [
            ("file", "train.jsonl", training_file(8 << 10)),
            ("purpose", None, b"fine-tune"),
            (second, "more.jsonl", training_file(8 << 10)),
        ],
    )
    assert status == 400, reply
    assert set(reply["error"]) == ERROR_FIELDS and reply["error"]["param"] == "file"
    assert stored_blobs(service) == [] and service.store.files("acme", None) == []


def test_an_upload_whose_parts_together_pass_the_limit_is_a_413_that_leaves_nothing_behind(service):
    # each part is under its own limit (64 KiB for the file, 4 KiB for a field); together they are not
    fields = [(f"note{index}", None, b"n" * 4000) for index in range(30)]
    status, reply = post_form(
        service, [("file", "train.jsonl", training_file(60 << 10)), ("purpose", None, b"fine-tune"), *fields]
    )
    assert status == 413, reply
    assert set(reply["error"]) == ERROR_FIELDS and reply["error"]["code"] == "file_too_large"
    assert stored_blobs(service) == [] and service.store.files("acme", None) == []


def test_a_purpose_over_4_kb_is_a_400_about_the_purpose_not_a_file_too_large(service):
    status, reply = post_form(
        service, [("purpose", None, b"p" * 5000), ("file", "train.jsonl", training_file(8 << 10))]
    )
    assert status == 400, reply
    assert reply["error"]["param"] == "purpose" and "4096 bytes" in reply["error"]["message"]
    assert stored_blobs(service) == [] and service.store.files("acme", None) == []


def test_an_upload_declaring_more_than_the_limit_is_refused_before_it_is_read(service):
    from tunesmith.serve.api import create_app

    app = create_app(service)
    size = 8 * service.settings.max_upload_bytes
    head = {**headers(service), "content-type": "multipart/form-data; boundary=b0undary", "content-length": str(size)}
    status, reply, asked = call_asgi(app, "/files", head, size)
    assert status == 413 and reply["error"]["code"] == "file_too_large"
    assert asked == 0


def test_a_malformed_multipart_body_is_an_openai_shaped_400(service):
    from fastapi.testclient import TestClient

    from tunesmith.serve.api import create_app

    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        reply = client.post(
            "/v1/files",
            content=b"this is not a form",
            headers={**headers(service), "Content-Type": "multipart/form-data; boundary=b0undary"},
        )
    assert reply.status_code == 400, reply.text
    assert set(reply.json()["error"]) == ERROR_FIELDS and reply.json()["error"]["param"] == "file"
    assert stored_blobs(service) == []
