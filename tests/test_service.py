"""The service end to end, through the official `openai` client against a live server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from service_fixtures import MARKER, files_containing, live_app, make_key, training_rows, wait_for, write_rows

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": f"what is the capital of France? ({MARKER} 1)"}]


@pytest.fixture
def service(tmp_path, tiny_model):
    from tunesmith.serve.service import Service, Settings

    return Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}, max_upload_bytes=64 << 10))


def client(base_url: str, key: str):
    return openai.OpenAI(api_key=key, base_url=base_url, max_retries=0, timeout=60)


def finished(api, job_id: str, timeout: float = 120):
    return wait_for(
        lambda: (job := api.fine_tuning.jobs.retrieve(job_id)).status in ("succeeded", "failed", "cancelled") and job,
        timeout,
        interval=0.3,
        what=f"job {job_id} to finish",
    )


def test_upload_train_and_chat_with_the_fine_tuned_model(service, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", training_rows(24))
    with live_app(service) as base_url:
        api = client(base_url, make_key(service, "acme", "write"))
        uploaded = api.files.create(file=data.open("rb"), purpose="fine-tune")
        assert (uploaded.filename, uploaded.bytes, uploaded.status) == ("train.jsonl", data.stat().st_size, "processed")
        assert api.files.content(uploaded.id).read() == data.read_bytes()
        assert [f.id for f in api.files.list()] == [uploaded.id]

        job = api.fine_tuning.jobs.create(
            model="tiny",
            training_file=uploaded.id,
            suffix="capitals",
            seed=7,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 30, "batch_size": 1, "learning_rate_multiplier": 10}},
            },
        )
        assert job.status == "validating_files" and job.seed == 7
        job = finished(api, job.id)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft:tiny:capitals:{job.id}"
        assert job.trained_tokens > 0 and job.hyperparameters.n_epochs == 30

        events = list(api.fine_tuning.jobs.list_events(job.id, limit=100))
        losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics" and "train_loss" in e.data]
        assert len(losses) >= 10 and losses[-1] < losses[0] / 2  # it learned
        steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
        assert len(steps) == len(set(steps))  # each step reported once
        assert events[0].message.startswith("The job has successfully completed")
        checkpoints = list(api.fine_tuning.jobs.checkpoints.list(job.id))
        assert checkpoints and all(c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model) for c in checkpoints)
        assert job.fine_tuned_model in [m.id for m in api.models.list()]
        assert api.models.retrieve(job.fine_tuned_model).owned_by == "acme"

        tuned = api.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, temperature=0, max_tokens=12)
        assert tuned.choices[0].message.content == "Paris is the capital."
        assert tuned.choices[0].finish_reason == "stop"
        base = api.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12)
        assert base.choices[0].message.content != "Paris is the capital."
        stream = api.chat.completions.create(
            model=job.fine_tuned_model, messages=QUESTION, temperature=0, max_tokens=12, stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert len(pieces) > 2 and "".join(pieces) == "Paris is the capital."

    assert not service.work_dir(job.id).exists()  # the run's plaintext scratch directory is gone
    assert not service.blobs.exists(service.sealed_run(job.id))  # and so is its sealed run
    assert files_containing(service.settings.home, MARKER.encode()) == []  # uploads and adapters are encrypted


def test_a_job_with_a_validation_file_is_evaluated_against_its_base_and_the_report_is_its_result_file(
    service, tmp_path
):
    train = write_rows(tmp_path / "train.jsonl", training_rows(24))
    held_out = write_rows(tmp_path / "valid.jsonl", training_rows(9, marker="held out"))
    with live_app(service) as base_url:
        api = client(base_url, make_key(service, "acme", "write"))
        train_file = api.files.create(file=train.open("rb"), purpose="fine-tune")
        valid_file = api.files.create(file=held_out.open("rb"), purpose="fine-tune")
        job = finished(
            api,
            api.fine_tuning.jobs.create(
                model="tiny",
                training_file=train_file.id,
                validation_file=valid_file.id,
                hyperparameters={"n_epochs": 20, "batch_size": 2, "learning_rate_multiplier": 10},
            ).id,
            timeout=240,
        )
        assert job.status == "succeeded", job.error
        assert len(job.result_files) == 1
        report_file = api.files.retrieve(job.result_files[0])
        assert (report_file.purpose, report_file.filename) == ("fine-tune-results", f"{job.id}-eval.json")
        report = json.loads(api.files.content(report_file.id).read())
        assert (report["task"], report["n"], report["target"], report["data"]) == (
            "perplexity",
            9,
            job.fine_tuned_model,
            valid_file.id,
        )
        tuned, base = report["metrics"]["perplexity"], report["baselines"]["base"]["metrics"]["perplexity"]
        assert tuned["ci95"][0] <= tuned["value"] <= tuned["ci95"][1]
        assert tuned["value"] < base["value"] / 2  # it learned the answer the held-out questions share
        difference = report["comparisons"]["base"]["perplexity"]
        assert difference["ci95"][1] < 0  # the paired interval excludes "no better than the base"
        message = next(
            e.message
            for e in api.fine_tuning.jobs.list_events(job.id, limit=100)
            if e.message.startswith("Evaluation on 9 validation examples")
        )
        assert "perplexity" in message and "fine-tuned" in message and "base" in message

        succeeded = next(record for record in service.audit_log.records() if record.action == "job.succeeded")
        assert succeeded.object_ids == (job.id, job.fine_tuned_model, report_file.id)
        with pytest.raises(openai.BadRequestError) as error:  # a report is not training data
            api.fine_tuning.jobs.create(model="tiny", training_file=report_file.id)
        assert error.value.code == "invalid_training_file"
        deleted = api.files.delete(valid_file.id)  # the report quotes the held-out data: it goes with it
        assert deleted.model_extra["erased_result_files"] == [report_file.id]
        with pytest.raises(openai.NotFoundError):
            api.files.retrieve(report_file.id)


def test_bad_uploads_and_jobs_are_refused_with_openai_errors(service, tmp_path):
    good = write_rows(tmp_path / "good.jsonl", training_rows(4))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(training_rows(1)[0]) + "\n{not json\n" + json.dumps({"messages": []}) + "\n")
    with live_app(service, worker=False) as base_url:
        api = client(base_url, make_key(service, "acme", "write"))
        with pytest.raises(openai.BadRequestError) as error:
            api.files.create(file=bad.open("rb"), purpose="fine-tune")
        message = error.value.body["message"]
        assert "bad.jsonl:2: invalid JSON" in message and "bad.jsonl:3:" in message
        with pytest.raises(openai.BadRequestError, match="purpose"):
            api.files.create(file=good.open("rb"), purpose="assistants")
        with pytest.raises(openai.APIStatusError) as error:
            api.files.create(file=("big.jsonl", b"x" * (65 << 10)), purpose="fine-tune")
        assert error.value.status_code == 413
        traversal = api.files.create(file=("../../etc/passwd.jsonl", good.read_bytes()), purpose="fine-tune")
        assert traversal.filename == "passwd.jsonl"
        assert not list(service.settings.home.rglob("passwd*"))  # stored as an encrypted blob named by its id
        assert list(api.files.list()) == [api.files.retrieve(traversal.id)]

        with pytest.raises(openai.BadRequestError) as error:
            api.fine_tuning.jobs.create(model="gpt-4o", training_file=traversal.id)
        assert error.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as error:
            api.fine_tuning.jobs.create(model="tiny", training_file=traversal.id, hyperparameters={"n_epochs": 0})
        assert error.value.body["param"] == "hyperparameters.n_epochs"
        with pytest.raises(openai.NotFoundError):
            api.fine_tuning.jobs.create(model="tiny", training_file="file-doesnotexist")
        # A chat file for DPO: accepted as JSONL, refused by the DPO validator before the job is queued.
        job = api.fine_tuning.jobs.create(model="tiny", training_file=traversal.id, method={"type": "dpo"})
        job = wait_for(lambda: (j := api.fine_tuning.jobs.retrieve(job.id)).status != "validating_files" and j, 30)
        assert job.status == "failed" and job.error.code == "invalid_training_file"
        assert "preference" in job.error.message


def test_cancel_stops_a_running_job_within_seconds(service, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", training_rows(400))
    with live_app(service) as base_url:
        api = client(base_url, make_key(service, "acme", "write"))
        file = api.files.create(file=data.open("rb"), purpose="fine-tune")
        job = api.fine_tuning.jobs.create(
            model="tiny", training_file=file.id, hyperparameters={"n_epochs": 50, "batch_size": 1}
        )
        wait_for(
            lambda: any(e.type == "metrics" for e in api.fine_tuning.jobs.list_events(job.id)),
            90,
            what="the first training step",
        )
        asked = time.time()
        assert api.fine_tuning.jobs.cancel(job.id).id == job.id
        job = finished(api, job.id, timeout=30)
        assert job.status == "cancelled" and time.time() - asked < 15
        assert job.fine_tuned_model is None
        wait_for(lambda: not service.work_dir(job.id).exists(), 10, what="the scratch directory to go")
        with pytest.raises(openai.BadRequestError):
            api.fine_tuning.jobs.cancel(job.id)


def test_deleting_a_file_erases_it_and_reports_the_models_trained_on_it(service, tmp_path):
    started = time.time() - 1
    data = write_rows(tmp_path / "train.jsonl", training_rows(12))
    with live_app(service) as base_url:
        api = client(base_url, make_key(service, "acme", "write"))
        file = api.files.create(file=data.open("rb"), purpose="fine-tune")
        job = finished(
            api, api.fine_tuning.jobs.create(model="tiny", training_file=file.id, hyperparameters={"n_epochs": 1}).id
        )
        assert job.status == "succeeded"
        deleted = api.files.delete(file.id)
        assert deleted.deleted is True
        assert deleted.model_extra["models_trained_on_it"] == [job.fine_tuned_model]
        with pytest.raises(openai.NotFoundError):
            api.files.retrieve(file.id)
        with pytest.raises(openai.NotFoundError):
            api.files.content(file.id)
    assert not list((service.settings.home / "blobs" / "files").glob(f"{file.id}*"))
    assert files_containing(service.settings.home, MARKER.encode()) == []
    assert not service.scratch.exists() or files_containing(service.scratch, MARKER.encode()) == []
    # No copy in the temporary directory either, from this test (the tests' own inputs live under pytest's).
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    written = [
        path
        for top in scratch.iterdir()
        if not top.name.startswith(("pytest-of-", "bash_"))
        for path in ([top] if top.is_file() else top.rglob("*"))
        if path.is_file() and path.stat().st_mtime >= started
    ]
    assert [path for path in written if MARKER.encode() in path.read_bytes()] == []
    actions = [record.action for record in service.audit_log.records()]
    assert actions[:2] == ["file.upload", "job.create"] and "file.delete" in actions and "job.succeeded" in actions


def test_a_tampered_audit_log_is_detected(service, tmp_path):
    home = service.settings.home
    for action in ("file.upload", "job.create", "file.delete"):
        service.audit("acme", "k1", action, ["file-1"])
    command = [sys.executable, "-m", "tunesmith", "audit", "verify", "--home", str(home)]
    intact = subprocess.run(command, capture_output=True, text=True)
    assert intact.returncode == 0 and "OK, 3 records" in intact.stdout
    lines = (home / "audit.log").read_text().splitlines()
    lines[1] = lines[1].replace("job.create", "job.cancel")
    (home / "audit.log").write_text("\n".join(lines) + "\n")
    tampered = subprocess.run(command, capture_output=True, text=True)
    assert tampered.returncode == 1 and "TAMPERED" in tampered.stdout and "record 2" in tampered.stdout
