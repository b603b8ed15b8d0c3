"""Who may call what: every endpoint against no key, a malformed, unknown or revoked key, each scope, and a key
of another project (whose objects must look like they do not exist)."""

from __future__ import annotations

import json

import pytest
from service_fixtures import make_key, training_rows

pytest.importorskip("httpx2")

# (method, path, scope needed, whether the path names an object of the project)
ENDPOINTS = [
    ("GET", "/v1/files", "read", False),
    ("POST", "/v1/files", "write", False),
    ("GET", "/v1/files/{file}", "read", True),
    ("GET", "/v1/files/{file}/content", "write", True),
    ("DELETE", "/v1/files/{file}", "write", True),
    ("GET", "/v1/fine_tuning/jobs", "read", False),
    ("POST", "/v1/fine_tuning/jobs", "write", True),  # names the project's training file
    ("GET", "/v1/fine_tuning/jobs/{job}", "read", True),
    ("POST", "/v1/fine_tuning/jobs/{job}/cancel", "write", True),
    ("GET", "/v1/fine_tuning/jobs/{job}/events", "read", True),
    ("GET", "/v1/fine_tuning/jobs/{job}/checkpoints", "read", True),
    ("GET", "/v1/models", "read", False),
    ("GET", "/v1/models/{model}", "read", True),
    ("DELETE", "/v1/models/{model}", "write", True),
    ("POST", "/v1/chat/completions", "read", True),  # names the project's fine-tuned model
    ("POST", "/v1/completions", "read", True),
    ("POST", "/v1/classifications", "read", False),  # a served classifier run: any project's, as a base model
    ("GET", "/v1/keys", "admin", False),
    ("POST", "/v1/keys", "admin", False),
    ("DELETE", "/v1/keys/{key}", "admin", True),
    ("GET", "/v1/audit", "admin", False),
]
RANK = {"read": 0, "write": 1, "admin": 2}


@pytest.fixture(scope="module")
def adapter_files(tiny_model, tmp_path_factory) -> dict[str, bytes]:
    """A LoRA adapter of the tiny model, as the worker stores a trained one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2, target_modules="all-linear")
    )
    model.save_pretrained(directory)
    return {name: (directory / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def classifier_run(tiny_model, tmp_path_factory):
    """A finished classifier run (method classify, full fine-tuning) as training leaves one, untrained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.engine.classifier import label_arguments, save_labels

    directory = tmp_path_factory.mktemp("classifier")
    labels = ["no", "yes"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, **label_arguments(labels))
    model.save_pretrained(directory / "model")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(directory / "model")
    save_labels(directory / "model", labels)
    (directory / "config.yaml").write_text(
        json.dumps({"model": str(tiny_model), "method": "classify", "data": {"train": "t.jsonl"}})
    )
    return directory


@pytest.fixture
def world(tmp_path, tiny_model, adapter_files, classifier_run):
    """Project acme with a file, a running job, a fine-tuned model and a spare key; keys of every kind."""
    from starlette.testclient import TestClient

    from tunesmith.security import apikeys
    from tunesmith.serve.api import create_app
    from tunesmith.serve.service import Service, Settings

    models = {"tiny": str(tiny_model), "intent": str(classifier_run)}
    service = Service(Settings(home=tmp_path / "home", base_models=models))
    keys = {scope: make_key(service, "acme", scope) for scope in RANK}
    keys["other project"] = make_key(service, "globex", "admin")
    revoked = make_key(service, "acme", "admin")
    service.store.revoke_key(apikeys.parse_key(revoked).key_id)
    keys["revoked"] = revoked
    keys["unknown"] = apikeys.new_key().secret
    keys["malformed"] = "sk-not-a-tunesmith-key"
    spare = apikeys.parse_key(make_key(service, "acme", "read")).key_id
    data = "".join(json.dumps(row) + "\n" for row in training_rows(3)).encode()
    file = service.store.add_file("acme", filename="t.jsonl", purpose="fine-tune", bytes=len(data), sha256="0" * 64)
    service.blobs.put_bytes(f"files/{file['id']}", data)
    job = service.store.add_job(
        "acme", model="tiny", training_file=file["id"], method="supervised", hyperparameters={}, seed=0
    )
    service.store.update_job(job["id"], status="running")
    model_id = f"ft:tiny:x:{job['id']}"
    service.store.add_model("acme", model_id, job["id"], "tiny")
    for name, content in adapter_files.items():
        service.blobs.put_bytes(f"models/{job['id']}/{name}", content)
    ids = {"file": file["id"], "job": job["id"], "model": model_id, "key": spare}
    return TestClient(create_app(service)), keys, ids, data


def request(client, method: str, path: str, key: str | None, ids: dict, data: bytes):
    url = path.format(**ids)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if method == "POST" and url == "/v1/files":
        return client.post(url, headers=headers, files={"file": ("a.jsonl", data)}, data={"purpose": "fine-tune"})
    body = {
        "/v1/fine_tuning/jobs": {"model": "tiny", "training_file": ids["file"]},
        "/v1/chat/completions": {
            "model": ids["model"],
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
        },
        "/v1/completions": {"model": ids["model"], "prompt": "hi", "max_tokens": 2},
        "/v1/classifications": {"model": "intent", "input": "hi"},
        "/v1/keys": {"scope": "read"},
    }.get(url)
    return (
        client.request(method, url, headers=headers, json=body)
        if method == "POST"
        else client.request(method, url, headers=headers)
    )


@pytest.mark.parametrize("method,path,needed,names_object", ENDPOINTS, ids=[f"{m} {p}" for m, p, _, _ in ENDPOINTS])
def test_authorisation_matrix(world, method, path, needed, names_object):
    client, keys, ids, data = world
    for who in ("none", "malformed", "unknown", "revoked"):
        response = request(client, method, path, None if who == "none" else keys[who], ids, data)
        assert response.status_code == 401, (who, response.text)
        assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    for scope, rank in RANK.items():
        if rank < RANK[needed]:
            response = request(client, method, path, keys[scope], ids, data)
            assert response.status_code == 403, (scope, response.text)
            assert response.json()["error"]["code"] == "insufficient_scope"
    stranger = request(client, method, path, keys["other project"], ids, data)
    if names_object:  # another project's object: not there at all
        assert stranger.status_code == 404, stranger.text
    else:  # its own (empty) view
        assert stranger.status_code == 200, stranger.text
        assert (
            ids["file"] not in stranger.text and ids["job"] not in stranger.text and ids["model"] not in stranger.text
        )
    allowed = request(client, method, path, keys[needed], ids, data)
    assert allowed.status_code == 200, allowed.text
    if method != "GET":  # every state-changing call that was allowed is in the audit trail, with its key
        from tunesmith.security import apikeys

        audit = client.get("/v1/audit", headers={"Authorization": f"Bearer {keys['admin']}"}).json()
        assert audit["verified"] is True
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/classifications"):  # inference changes nothing
            assert audit["data"][-1]["key_id"] == apikeys.parse_key(keys[needed]).key_id


def test_error_shapes_match_openai(world):
    client, keys, ids, _ = world
    auth = {"Authorization": f"Bearer {keys['admin']}"}
    missing = client.get("/v1/files/file-nope", headers=auth).json()["error"]
    assert set(missing) == {"message", "type", "param", "code"} and missing["type"] == "invalid_request_error"
    assert client.get("/v1/not-an-endpoint", headers=auth).status_code == 404
    garbled = client.post("/v1/fine_tuning/jobs", headers=auth, content=b"{oops")
    assert garbled.status_code == 400 and "JSON" in garbled.json()["error"]["message"]
    page = client.get("/v1/fine_tuning/jobs?limit=1000", headers=auth)
    assert page.status_code == 400 and page.json()["error"]["param"] == "limit"
