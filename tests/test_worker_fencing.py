"""Leases are fenced (issue 21, B2): a worker that stalls past its lease and wakes up after another took the job
writes nothing (no event, checkpoint, sealed run or model) and stops its run; a second worker never starts
`train` in a scratch directory that the first one's process still holds; a cancel that lands while the job
concludes leaves no model; an unwritable audit log leaves the job unfinished; and each checkpoint's adapter is
stored, to be served as the checkpoint model. Stalls are simulated in the store: the lease is expired and taken."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import threading

import pytest
import torch
from service_fixtures import training_rows, wait_for, write_rows

from tunesmith.security.audit import AuditFile
from tunesmith.serve.shapes import ApiError

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]  # stands in for `tunesmith train`: runs till stopped


@pytest.fixture
def service(tmp_path, tiny_model):
    from tunesmith.serve.service import Service, Settings

    service = Service(
        Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}, scratch=tmp_path / "scratch")
    )
    service.store.ensure_project("acme")
    yield service
    service.store.close()


def queued_job(service, tmp_path) -> dict:
    with write_rows(tmp_path / "train.jsonl", training_rows(12)).open("rb") as source:
        upload = service.upload("acme", "train.jsonl", "fine-tune", source)
    job = service.create_job("acme", {"model": "tiny", "training_file": upload["id"]})
    service.validate_job(job)
    return job


def started_run(service, owner: str = "first"):
    """A JobRun that holds the next job's lease and scratch lock, its directory prepared."""
    from tunesmith.serve.worker import JobRun, Worker

    run = JobRun(Worker(service, lease_seconds=30, poll_seconds=0.05, name=owner), service.store.lease(owner, 30))
    run.lock_scratch()
    run.prepare()
    return run


def take_over(service, job_id: str, owner: str = "second"):
    """The first worker stalled past its lease: it runs out, and another worker leases the job."""
    service.store.update_job(job_id, lease_expires=0.0)
    lease = service.store.lease(owner, 30)
    assert lease.job["id"] == job_id and lease.epoch == 2
    return lease


def write_progress(run) -> None:
    """What a run leaves in its directory: metrics lines, a complete checkpoint, the final adapter."""
    folder = run.directory / "run"
    (folder / "checkpoints" / "step-10").mkdir(parents=True)
    (folder / "checkpoints" / "step-10" / "state.json").write_text("{}")
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 13))
    )
    (folder / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / "adapter" / name).write_bytes(b"adapter bytes")


def lock_is_free(run) -> bool:
    """Whether anyone (a worker, or a run's process) holds the job's scratch lock."""
    from tunesmith.serve.scratch import SCRATCH_LOCK

    with open(run.directory / SCRATCH_LOCK, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def model_blobs(service, job_id: str) -> list[str]:
    return [
        name
        for name in ("adapter_config.json", "adapter_model.safetensors")
        if service.blobs.exists(service.adapter_blob(job_id, name))
    ]


def actions(service) -> list[str]:
    return [record.action for record in service.audit_log.records()]


def test_a_lease_is_fenced_by_its_epoch_even_for_the_same_worker(store_url):
    """A worker's whole process stalled; on waking, its own loop re-leased the job before the old attempt's thread
    ran again: same owner, next epoch. The old attempt's writes are all refused (SQLite, and PostgreSQL when
    $TUNESMITH_TEST_POSTGRES names one)."""
    from tunesmith.serve.store import LeaseLost, Store

    store = Store(store_url)
    store.ensure_project("acme")
    job = store.add_job(
        "acme", model="tiny", training_file="file-x", method="supervised", hyperparameters={}, seed=0, status="queued"
    )
    old = store.lease("worker", 30)
    store.update_job(job["id"], lease_expires=0.0)
    new = store.lease("worker", 30)
    assert (old.epoch, new.epoch) == (1, 2)
    assert store.renew(old, 30) is None and store.holds(old) is None
    with pytest.raises(LeaseLost):
        store.add_event(job["id"], "Step 1: training loss=1.0", key="train-1", lease=old)
    with pytest.raises(LeaseLost):
        store.add_checkpoint(job["id"], 10, {"step": 10}, lease=old)
    assert not store.finish(old, "succeeded", model={"id": "ft:tiny:x", "base": "tiny"})
    assert store.checkpoints(job["id"]) == [] and store.models("acme") == [] and store.events(job["id"]) == []
    assert store.add_event(job["id"], "Step 1: training loss=1.0", data={"step": 1}, key="train-1", lease=new)
    assert not store.add_event(job["id"], "Step 1: training loss=1.0", key="train-1", lease=new)  # stored once
    assert store.add_event(job["id"], "Created elsewhere")  # unfenced: the API's events need no lease
    store.add_checkpoint(job["id"], 10, {"step": 10}, lease=new)
    store.add_checkpoint(job["id"], 10, {"step": 10}, lease=new)  # seen again: still one record
    assert [event["key"] for event in store.events(job["id"])] == [None, "train-1"]
    assert [row["step"] for row in store.checkpoints(job["id"])] == [10]
    assert store.renew(new, 30) is not None
    assert store.finish(new, "succeeded", model={"id": "ft:tiny:x", "base": "tiny"}, fine_tuned_model="ft:tiny:x")
    assert [(m["id"], m["job_id"]) for m in store.models("acme")] == [("ft:tiny:x", job["id"])]
    store.close()


def test_a_worker_that_wakes_after_losing_its_lease_writes_nothing_and_stops_its_run(service, tmp_path, monkeypatch):
    from tunesmith.serve import worker
    from tunesmith.serve.store import LeaseLost

    monkeypatch.setattr(worker, "TUNESMITH", SLEEPER)
    job = queued_job(service, tmp_path)
    first = started_run(service)
    process = first.launch(["train", "config.yaml"], "train.log")
    write_progress(first)
    first.release_scratch()  # the worker's own descriptor goes: the run's process still holds the lock
    assert not lock_is_free(first)

    take_over(service, job["id"])
    events = service.store.events(job["id"], limit=1000)
    assert first.supervise(process) == "lost"  # its first round after waking up
    assert process.poll() is not None  # the run was stopped
    assert first.conclude("exited", 0) == "lost"
    if first.sealing is not None:
        first.sealing.join()
    with pytest.raises(LeaseLost):  # a seal already under way when the worker stalled is not committed
        first.seal(10)

    assert service.store.events(job["id"], limit=1000) == events
    assert service.store.checkpoints(job["id"]) == []
    assert not service.blobs.exists(service.sealed_run(job["id"]))
    assert service.store.models("acme") == [] and not model_blobs(service, job["id"])
    row = service.store.job("acme", job["id"])
    assert (row["status"], row["lease_owner"], row["attempts"]) == ("running", "second", 2)
    assert "job.succeeded" not in actions(service)
    assert lock_is_free(first)  # the run is gone: the next attempt may use the directory


def test_a_second_worker_waits_for_the_scratch_lock_before_it_starts_train(service, tmp_path, monkeypatch):
    from tunesmith.serve.worker import JobRun, Worker

    job = queued_job(service, tmp_path)
    first = started_run(service)
    second = JobRun(Worker(service, lease_seconds=30, poll_seconds=0.05, name="second"), take_over(service, job["id"]))
    launched = []

    def launch(self, arguments, log_name):  # a run that fails at once: the job ends as soon as it starts
        launched.append(arguments)
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], cwd=self.directory)

    monkeypatch.setattr(JobRun, "launch", launch)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(second.worker.run_job(second.lease)))
    thread.start()
    try:
        waiting = "Waiting for the previous attempt's process to leave the scratch directory"
        wait_for(
            lambda: any(e["message"] == waiting for e in service.store.events(job["id"], limit=100)),
            10,
            what="the waiting event",
        )
        renewed = service.store.job("acme", job["id"])["lease_expires"]
        wait_for(
            lambda: service.store.job("acme", job["id"])["lease_expires"] > renewed,
            5,
            interval=0.05,
            what="the waiting worker to renew its lease",
        )
        assert launched == [] and thread.is_alive()
    finally:
        first.release_scratch()  # the stalled worker woke up, found its lease lost and left
    thread.join(timeout=20)
    assert launched == [["train", "config.yaml"]] and outcome == ["failed"]
    messages = [event["message"] for event in service.store.events(job["id"], limit=100)]
    assert messages.count(waiting) == 1
    assert service.store.job("acme", job["id"])["error"]["code"] == "training_failed"


def test_a_cancel_that_lands_while_the_job_concludes_leaves_it_cancelled_without_a_model(
    service, tmp_path, monkeypatch
):
    job = queued_job(service, tmp_path)
    run = started_run(service)
    write_progress(run)
    audit = service.audit

    def cancel_meanwhile(project, key_id, action, objects, **details):  # the user cancels right after the record
        audit(project, key_id, action, objects, **details)
        if action == "job.succeeded":
            service.store.request_cancel("acme", job["id"])

    monkeypatch.setattr(service, "audit", cancel_meanwhile)
    assert run.conclude("exited", 0) == "cancelled"
    row = service.store.job("acme", job["id"])
    assert row["status"] == "cancelled" and row["fine_tuned_model"] is None
    assert service.store.models("acme") == [] and not model_blobs(service, job["id"])
    assert actions(service)[-3:] == ["job.succeeded", "job.succeeded.failed", "job.cancelled"]
    messages = [event["message"] for event in service.store.events(job["id"], limit=100)]
    assert "Fine-tuning job cancelled" in messages and not any("successfully" in m for m in messages)


def test_each_checkpoints_adapter_is_stored_and_served_as_the_checkpoint_model(service, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    from tunesmith.config.schema import AdapterConfig
    from tunesmith.models.adapters import apply_lora, load_adapter
    from tunesmith.serve.jobs import ADAPTER
    from tunesmith.train.checkpoint import TrainState, save_checkpoint

    job = queued_job(service, tmp_path)
    run = started_run(service)
    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model), AdapterConfig(**ADAPTER))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zero at first: the trained adapter must change the model
                parameter.normal_(0, 0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(run.directory / "run" / "checkpoints", "step-10", model, optimizer, scheduler, TrainState(step=10))

    run.sync_run()
    run.sealing.join()
    assert [row["step"] for row in service.store.checkpoints(job["id"])] == [10]
    assert service.blobs.exists(service.sealed_run(job["id"]))
    files = service.adapter_files(job["id"], step=10)
    folder = tmp_path / "served"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    served = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model), folder).eval()
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        expected, got = model.eval()(ids).logits, served(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter matters ...
    assert torch.allclose(got, expected, atol=1e-5)  # ... and the served checkpoint is that adapter

    service.erase_run(job["id"])  # the training file erased: the checkpoint's adapter goes with the run
    with pytest.raises(ApiError) as missing:
        service.adapter_files(job["id"], step=10)
    assert missing.value.status == 404


def test_with_an_unwritable_audit_log_the_worker_neither_starts_nor_finishes_the_job(service, tmp_path, monkeypatch):
    from tunesmith.serve.worker import JobRun, Worker

    def fail(self, event):
        raise OSError(28, "No space left on device")

    job = queued_job(service, tmp_path)
    run = started_run(service)
    write_progress(run)
    monkeypatch.setattr(AuditFile, "append", fail)
    assert run.conclude("exited", 0) == "unfinished"
    run.release_scratch()
    row = service.store.job("acme", job["id"])
    assert row["status"] == "running" and row["fine_tuned_model"] is None and service.store.models("acme") == []
    assert not model_blobs(service, job["id"])

    launched = []
    monkeypatch.setattr(JobRun, "launch", lambda self, arguments, log_name: launched.append(arguments))
    lease = take_over(service, job["id"])
    assert Worker(service, name="second").run_job(lease) == "unfinished"
    assert launched == []  # no run without its job.start record
    assert service.store.job("acme", job["id"])["status"] == "running"
    assert any(
        "audit log could not be written" in event["message"] for event in service.store.events(job["id"], limit=100)
    )
