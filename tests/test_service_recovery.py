"""Jobs survive: the API server and the worker (real `tunesmith serve` / `tunesmith worker` processes) are killed
with SIGKILL mid-job, the job's scratch directory is lost with them (as a machine's memory is on a restart), and
both are started again; the job resumes from its sealed checkpoint and completes, with every training step
reported exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from service_fixtures import (
    MARKER,
    files_containing,
    free_port,
    make_key,
    start_command,
    training_rows,
    wait_for,
    wait_for_port,
    write_rows,
)

openai = pytest.importorskip("openai")


def training_processes(work_dir: Path) -> list[int]:
    """Processes whose working directory is the job's (its `tunesmith train`)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == work_dir:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def assert_the_last_checkpoint_serves_the_final_adapter(service, job_id: str) -> None:
    """Every checkpoint recorded has its adapter stored, and the run's last one (no validation: the weights it
    ships) is the fine-tuned model's adapter exactly."""
    import torch
    from safetensors.torch import load

    steps = [row["step"] for row in service.store.checkpoints(job_id, None, 1000)]
    adapters = {step: service.adapter_files(job_id, step=step) for step in steps}
    final = service.adapter_files(job_id)
    last, shipped = load(adapters[max(steps)]["adapter_model.safetensors"]), load(final["adapter_model.safetensors"])
    assert last.keys() == shipped.keys() and all(torch.equal(last[name], shipped[name]) for name in last)
    settings = [json.loads(files["adapter_config.json"]) for files in (adapters[max(steps)], final)]
    assert [(s["peft_type"], s["r"], s["lora_alpha"]) for s in settings] == [("LORA", 16, 32)] * 2


def kill(process) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_killed_api_and_worker_resume_the_job_without_loss_or_duplicates(tmp_path, tiny_model):
    from tunesmith.serve.service import Service, Settings

    home, scratch = tmp_path / "home", tmp_path / "scratch"
    service = Service(Settings(home=home, base_models={"tiny": str(tiny_model)}, scratch=scratch))
    key = make_key(service, "acme", "write")
    port = free_port()
    common = ["--model", f"tiny={tiny_model}", "--scratch", str(scratch)]
    serve_args = ["serve", *common, "--workers", "0", "--port", str(port)]
    worker_args = ["worker", *common, "--lease-seconds", "3"]
    log = tmp_path / "service.log"
    api_process, worker_process = start_command(serve_args, home, log), start_command(worker_args, home, log)
    try:
        wait_for_port(port)
        api = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=30)
        file = api.files.create(
            file=write_rows(tmp_path / "train.jsonl", training_rows(300)).open("rb"), purpose="fine-tune"
        )
        job = api.fine_tuning.jobs.create(
            model="tiny", training_file=file.id, hyperparameters={"n_epochs": 4, "batch_size": 1}
        )
        wait_for(lambda: service.blobs.exists(service.sealed_run(job.id)), 120, what="the first sealed checkpoint")
        # Mid-job, the plaintext is in the scratch directory alone: the home holds only ciphertext.
        assert files_containing(scratch, MARKER.encode()) != []
        assert files_containing(home, MARKER.encode()) == []

        kill(api_process)
        kill(worker_process)
        work_dir = service.work_dir(job.id)
        wait_for(lambda: not training_processes(work_dir), 10, what="the orphaned training run to die with its worker")
        assert (work_dir / "run" / "checkpoints").is_dir()
        shutil.rmtree(scratch)  # a restart empties the memory filesystem: the sealed run is all that is left

        api_process, worker_process = start_command(serve_args, home, log), start_command(worker_args, home, log)
        wait_for_port(port)
        job = wait_for(
            lambda: (j := api.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
            180,
            interval=0.5,
            what="the resumed job to finish",
        )
        assert job.status == "succeeded", (job.error, log.read_text()[-3000:])
    finally:
        for process in (api_process, worker_process):
            if process.poll() is None:
                kill(process)

    events = service.store.events(job.id, limit=10_000, newest_first=False)
    messages = [event["message"] for event in events]
    assert sum("started on worker" in message for message in messages) == 2
    assert any("(resumed, attempt 2)" in message for message in messages)
    restored = [message for message in messages if message.startswith("Restored the run from its sealed checkpoint")]
    assert len(restored) == 1 and int(restored[0].rsplit(" ", 1)[1]) >= 10  # save_every is 10 steps
    steps = [event["data"]["step"] for event in events if event["type"] == "metrics" and "train_loss" in event["data"]]
    assert sorted(steps) == list(range(1, max(steps) + 1))  # every step once: none lost, none twice
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert [model["id"] for model in service.store.models("acme")] == [job.fine_tuned_model]
    assert service.store.job("acme", job.id)["attempts"] == 2
    assert_the_last_checkpoint_serves_the_final_adapter(service, job.id)
    assert not service.work_dir(job.id).exists() and not service.blobs.exists(service.sealed_run(job.id))
    assert files_containing(home, MARKER.encode()) == []
    assert service.audit_log.verify()


def test_a_rewritten_metrics_log_is_read_again_without_losing_or_repeating_steps(tmp_path, tiny_model):
    """A resumed run truncates its log to its checkpoint and logs the later steps again; the worker's tail must
    notice, or it would resume mid-line at its old offset and drop steps."""
    from tunesmith.serve.service import Service, Settings
    from tunesmith.serve.worker import JobRun, Worker

    service = Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}))
    service.store.ensure_project("acme")
    service.store.add_job(
        "acme", model="tiny", training_file="file-x", method="supervised", hyperparameters={}, seed=0, status="queued"
    )
    run = JobRun(Worker(service), service.store.lease("me", 30))  # the worker's writes are fenced by its lease
    job = run.job
    log = run.directory / "run" / "metrics.jsonl"
    log.parent.mkdir(parents=True)

    def lines(steps, tokens_per_s: float = 1234.5) -> str:  # a re-logged step differs in its timing figures
        return "".join(
            json.dumps({"step": step, "loss": 10.0 / step, "tokens_per_s": tokens_per_s}) + "\n" for step in steps
        )

    log.write_text(lines(range(1, 38)))
    run.sync_run()
    log.write_text(lines(range(1, 31)))  # the resumed run keeps the lines up to its checkpoint...
    run.sync_run()
    with log.open("a") as handle:  # ...and logs steps 31.. again, past the old read offset
        handle.write(lines(range(31, 46), tokens_per_s=7.5))
    run.sync_run()
    events = service.store.events(job["id"], limit=1000, newest_first=False)
    assert [event["data"]["step"] for event in events] == list(range(1, 46))


def test_the_worker_runs_a_job_on_several_processes(tmp_path, tiny_model):
    """`serve --nproc 2` / `worker --nproc 2`: each job trains with torch.distributed on 2 processes (gloo on CPU)."""
    from tunesmith.serve.service import Service, Settings
    from tunesmith.serve.worker import Worker

    service = Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}, processes=2))
    service.store.ensure_project("acme")
    data = write_rows(tmp_path / "train.jsonl", training_rows(40))
    with data.open("rb") as source:
        file = service.upload("acme", "train.jsonl", "fine-tune", source)
    job = service.create_job(
        "acme", {"model": "tiny", "training_file": file["id"], "hyperparameters": {"n_epochs": 2, "batch_size": 2}}
    )
    service.validate_job(job)
    worker = Worker(service, lease_seconds=10, poll_seconds=0.2)
    lease = service.store.lease(worker.name, 10)
    assert lease.job["id"] == job["id"] and lease.job["processes"] == 2
    assert worker.run_job(lease) == "succeeded"
    opening = [
        event for event in service.store.events(job["id"], limit=100) if event["message"].startswith("Training ")
    ]
    assert opening and opening[0]["data"]["processes"] == 2
    assert service.store.model("acme", service.store.job("acme", job["id"])["fine_tuned_model"]) is not None
    assert_the_last_checkpoint_serves_the_final_adapter(service, job["id"])


def test_serve_speaks_tls_when_given_a_certificate(tmp_path, tiny_model):
    import datetime
    import ipaddress
    import ssl

    import httpx2
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tunesmith.serve.service import Service, Settings

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    home = tmp_path / "home"
    api_key = make_key(Service(Settings(home=home, base_models={"tiny": str(tiny_model)})), "acme", "read")
    port = free_port()
    process = start_command(
        [
            "serve",
            "--model",
            f"tiny={tiny_model}",
            "--workers",
            "0",
            "--port",
            str(port),
            "--tls-cert",
            str(cert_path),
            "--tls-key",
            str(key_path),
        ],
        home,
        tmp_path / "serve.log",
    )
    try:
        wait_for_port(port)
        trusted = httpx2.Client(verify=ssl.create_default_context(cafile=str(cert_path)))
        api = openai.OpenAI(
            api_key=api_key, base_url=f"https://127.0.0.1:{port}/v1", http_client=trusted, max_retries=0
        )
        assert "tiny" in [model.id for model in api.models.list()]
        plain = openai.OpenAI(api_key=api_key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=5)
        with pytest.raises(openai.APIConnectionError):
            plain.models.list()
    finally:
        kill(process)
