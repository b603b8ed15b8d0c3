"""A classifier run (method classify) in use (issue 23): served at POST /v1/classifications, and `tunesmith classify`
over a data file. Both answer as `Classifier.classify` does on the same texts; the endpoint is authorised and audited
as chat is; a model that is not a classifier, a bad input and a bad row are refused by name."""

from __future__ import annotations

import argparse
import json

import pytest
from conftest import build_model_dir, write_jsonl
from service_fixtures import make_key
from test_training import make_config, run

from tunesmith.cli import main
from tunesmith.engine.classifier import Classifier

pytest.importorskip("httpx2")  # starlette's TestClient

WORDS = {"card_lost": "I lost my card", "refund": "please refund the payment", "fee": "why was I charged a fee"}
ROWS = [{"text": f"{text} {i}", "label": label} for i in range(4) for label, text in WORDS.items()]
TEXTS = ["I lost my card yesterday", "refund the payment please", "a fee again?", "hello there"]


@pytest.fixture(scope="module")
def classifier_run(tiny_model, tmp_path_factory):
    config = make_config(
        tmp_path_factory.mktemp("classify"),
        tiny_model,
        ROWS,
        "method=classify",
        "train.epochs=4",
        "train.lr=1e-2",
        "train.batch_size=4",
    )
    run(config)
    return config.output_dir


@pytest.fixture(scope="module")
def chat_run(tiny_model, tmp_path_factory):
    """A finished run that generates text (full fine-tuning: model/), its method written on line 2 of its config."""
    directory = tmp_path_factory.mktemp("chat-run")
    build_model_dir(directory / "model", seed=5)
    (directory / "config.yaml").write_text(f"model: {tiny_model}\nmethod: sft\ndata:\n  train: t.jsonl\n")
    return directory


@pytest.fixture(scope="module")
def expected(classifier_run):
    """The classifier loaded directly: each text's answer, as the service must give it."""
    classifier = Classifier.load(classifier_run)
    return classifier, classifier.classify([[{"role": "user", "content": text}] for text in TEXTS])


@pytest.fixture
def site(tmp_path, tiny_model, classifier_run, chat_run):
    """The app with the tiny base, the classifier as `intent`, the generating run as `chatty`; keys by scope."""
    from starlette.testclient import TestClient

    from tunesmith.serve.api import create_app
    from tunesmith.serve.service import Service, Settings

    models = {"tiny": str(tiny_model), "intent": str(classifier_run), "chatty": str(chat_run)}
    service = Service(Settings(home=tmp_path / "home", base_models=models))
    keys = {scope: make_key(service, "acme", scope) for scope in ("read", "admin")}
    keys["other project"] = make_key(service, "globex", "read")
    yield TestClient(create_app(service)), keys
    service.store.close()


def post(client, key: str | None, body: dict, path: str = "/v1/classifications"):
    return client.post(path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {})


def assert_answers_equal(data: list[dict], answers) -> None:
    assert [item["label"] for item in data] == [answer.label for answer in answers]
    assert [item["abstained"] for item in data] == [answer.abstained for answer in answers]
    for item, answer in zip(data, answers):
        assert item["probability"] == pytest.approx(answer.confidence, abs=1e-6)
        assert item["probabilities"] == pytest.approx(answer.probabilities, abs=1e-6)


def test_classifications_equal_the_classifier_loaded_directly(site, expected):
    client, keys = site
    classifier, answers = expected
    reply = post(client, keys["read"], {"model": "intent", "input": TEXTS})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "list" and body["model"] == "intent"
    assert [item["object"] for item in body["data"]] == ["classification"] * len(TEXTS)
    assert [item["index"] for item in body["data"]] == list(range(len(TEXTS)))
    assert all(set(item["probabilities"]) == set(classifier.labels) for item in body["data"])
    assert_answers_equal(body["data"], answers)
    assert {item["label"] for item in body["data"]} <= set(WORDS)


def test_a_single_string_input_is_one_classification(site, expected):
    client, keys = site
    reply = post(client, keys["read"], {"model": "intent", "input": TEXTS[1]})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert len(data) == 1 and data[0]["index"] == 0
    assert_answers_equal(data, expected[1][1:2])


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "intent"}, "input"),
        ({"model": "intent", "input": ""}, "input"),
        ({"model": "intent", "input": []}, "input"),
        ({"model": "intent", "input": {"text": "hi"}}, "input"),
        ({"model": "intent", "input": ["fine", 3]}, "input[1]"),
        ({"model": "intent", "input": ["fine", "  "]}, "input[1]"),
        ({"model": "intent", "input": "hi", "stream": True}, "stream"),
        ({"input": "hi"}, "model"),
    ],
    ids=["missing", "empty text", "empty list", "object", "number item", "blank item", "unknown key", "no model"],
)
def test_a_bad_request_is_a_400_naming_the_field(site, body, param):
    client, keys = site
    reply = post(client, keys["read"], body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize("model", ["tiny", "chatty"])
def test_a_model_that_is_not_a_classifier_is_a_400_naming_it_and_the_fix(site, model):
    client, keys = site
    reply = post(client, keys["read"], {"model": model, "input": "hi"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "model" and f"'{model}'" in error["message"] and "method: classify" in error["message"]
    missing = post(client, keys["read"], {"model": "ft:tiny:x:ftjob-nope", "input": "hi"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ],
)
def test_a_classifier_writes_no_text_its_chat_is_a_400_pointing_to_classifications(site, path, body):
    client, keys = site
    reply = post(client, keys["read"], {"model": "intent", **body}, path)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "model" and "fix: use /v1/classifications" in error["message"]


def test_keys_are_checked_as_for_chat(site):
    """Chat takes the lowest scope, read, so no valid key lacks the scope (no 403 exists); every key that is not
    valid is a 401, and a served run, like a base model, answers any project's key."""
    from tunesmith.security import apikeys

    client, keys = site
    body = {"model": "intent", "input": "hi"}
    for key, code in ((None, "missing_api_key"), ("sk-not-ours", "invalid_api_key")):
        for path in ("/v1/classifications", "/v1/chat/completions"):
            reply = post(client, key, body, path)
            assert reply.status_code == 401 and reply.json()["error"]["code"] == code, (path, reply.text)
    assert post(client, apikeys.new_key().secret, body).status_code == 401
    assert post(client, keys["read"], body).status_code == 200
    assert post(client, keys["other project"], body).status_code == 200


def test_a_classification_leaves_the_audit_log_as_a_chat_completion_does(site):
    """Chat completions are not state-changing calls, so they write no audit record; classifications neither."""
    client, keys = site
    admin = {"Authorization": f"Bearer {keys['admin']}"}

    def records() -> list[dict]:
        audit = client.get("/v1/audit", headers=admin).json()
        assert audit["verified"] is True
        return audit["data"]

    before = records()
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(client, keys["read"], chat, "/v1/chat/completions").status_code == 200
    after_chat = records()
    assert post(client, keys["read"], {"model": "intent", "input": TEXTS}).status_code == 200
    after_classification = records()
    assert len(after_classification) - len(after_chat) == len(after_chat) - len(before)


def test_serve_loads_a_classifier_run_and_refuses_one_without_label_names(tmp_path, classifier_run):
    import shutil

    from tunesmith.cli_service import settings
    from tunesmith.errors import UserError
    from tunesmith.serve.service import Service

    args = argparse.Namespace(model=[f"intent={classifier_run}"], database_url=None, home=str(tmp_path / "home"))
    assert settings(args).base_models["intent"] == str(classifier_run)
    assert Service.run_model(str(classifier_run))["classifier"] == str(classifier_run.resolve())
    unnamed = shutil.copytree(classifier_run, tmp_path / "unnamed")
    (unnamed / "adapter" / "labels.json").unlink()
    args.model = [f"intent={unnamed}"]
    with pytest.raises(UserError, match="labels.json"):
        settings(args)


def classify_command(capsys, *argv) -> tuple[int, str, str]:
    code = main(["classify", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_writes_each_row_with_the_classifiers_answer(tmp_path, capsys, classifier_run, expected):
    _, answers = expected
    labelled = write_jsonl(
        tmp_path / "labelled.jsonl", [{"text": text, "label": "fee", "id": i} for i, text in enumerate(TEXTS)]
    )
    code, out, err = classify_command(capsys, classifier_run, "--data", labelled)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["id"] for row in rows] == list(range(len(TEXTS))) and [row["text"] for row in rows] == TEXTS
    assert all(row["expected"] == "fee" for row in rows)  # the row's own label, kept beside the classifier's
    assert_answers_equal(rows, answers)

    chats = [
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "fee"}]} for text in TEXTS
    ]
    chats[1]["messages"].pop()  # no label: the whole conversation is read
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    code, out, err = classify_command(
        capsys, classifier_run, "--data", data, "--output", tmp_path / "out.jsonl", "--batch-size", 3
    )
    assert code == 0 and out.startswith(f"classified {len(TEXTS)} rows"), err
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["messages"] for row in rows] == [chat["messages"] for chat in chats]
    assert_answers_equal(rows, answers)


def test_the_command_refuses_a_bad_row_by_line_and_writes_nothing(tmp_path, capsys, classifier_run):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "fine"}, {"text": 3}, {"text": "fine too"}])
    code, out, err = classify_command(capsys, classifier_run, "--data", data, "--output", tmp_path / "out.jsonl")
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith(f"error: {data}:2: field 'text' must be a string") and "fix:" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()


def test_the_command_refuses_a_run_that_is_not_a_classifier_and_a_missing_file(
    tmp_path, capsys, classifier_run, chat_run
):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "fine"}])
    code, out, err = classify_command(capsys, chat_run, "--data", data)
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"{chat_run / 'config.yaml'}:2: the run trained method sft, not classify" in err and "fix:" in err
    code, out, err = classify_command(capsys, classifier_run, "--data", tmp_path / "missing.jsonl")
    assert code == 2 and out == "" and "missing.jsonl: data file not found; fix:" in err
