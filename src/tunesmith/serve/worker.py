"""`tunesmith worker`: leases queued jobs from the store and runs each recipe in its own process.

A job runs as `python -m tunesmith train config.yaml` (with `--nproc N` for several processes) in the job's
private work directory. While it runs, the worker renews its lease every few seconds, copies the run's
metrics and checkpoints into the store as events (each once, however often it is read), and stops the run
when the job is cancelled. Each new checkpoint seals the run directory (as of that checkpoint) into the
encrypted blobs. A worker that dies stops renewing: once its lease runs out, any worker takes the job
again and `train` resumes it from its newest checkpoint, found in the scratch directory when the worker
left it there, else unsealed from the blobs (a restarted machine, another machine). When the run ends,
its adapter is encrypted into the blob store, the model registered, and the scratch directory (the only
plaintext) and the sealed run erased.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import yaml

from tunesmith.rundir import read_metrics
from tunesmith.serve import jobs as job_spec
from tunesmith.serve.service import Service, private_directory
from tunesmith.serve.store import Lease

LEASE_SECONDS = 30.0
POLL_SECONDS = 1.0
CANCEL_GRACE_SECONDS = 5.0
USER_ERROR_EXIT = 2
EVAL_HEADLINE = {"perplexity": "perplexity", "preference": "preference_accuracy"}  # the evaluation's task -> metric
EVAL_MAX_EXAMPLES = 500  # validation examples the closing evaluation scores (each on the tuned and the base model)


class Worker:
    def __init__(self, service: Service, concurrency: int = 1, lease_seconds: float = LEASE_SECONDS,
                 poll_seconds: float = POLL_SECONDS, name: str | None = None):
        self.service, self.store = service, service.store
        self.concurrency, self.lease_seconds, self.poll_seconds = concurrency, lease_seconds, poll_seconds
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()
        self.running: dict[str, threading.Thread] = {}

    def serve_forever(self) -> None:
        """Keep up to `concurrency` jobs running until `stop()`."""
        while not self.stopping.is_set():
            self.running = {job: thread for job, thread in self.running.items() if thread.is_alive()}
            while len(self.running) < self.concurrency and not self.stopping.is_set():
                lease = self.store.lease(self.name, self.lease_seconds)
                if lease is None:
                    break
                thread = threading.Thread(target=self.run_job, args=(lease,), name=f"job {lease.job['id']}", daemon=True)
                self.running[lease.job["id"]] = thread
                thread.start()
            self.stopping.wait(self.poll_seconds)
        for thread in self.running.values():
            thread.join()

    def stop(self) -> None:
        self.stopping.set()

    def run_job(self, lease: Lease) -> str:
        """Run one leased job to its end; returns the final status (or "lost" when the lease was lost)."""
        job = lease.job
        try:
            run = JobRun(self, lease)
            return run.execute()
        except Exception as error:  # a bug of ours: the job fails with the reason, the worker goes on
            self.store.add_event(job["id"], f"Worker error: {type(error).__name__}: {error}", level="error")
            self.store.finish(lease, "failed", error={"code": "server_error", "message": str(error), "param": None})
            self.service.erase_run(job["id"])
            return "failed"


class JobRun:
    def __init__(self, worker: Worker, lease: Lease):
        self.worker, self.lease, self.job = worker, lease, lease.job
        self.service, self.store = worker.service, worker.store
        self.directory = self.service.work_dir(self.job["id"])
        self.metrics_read = 0  # bytes of metrics.jsonl already turned into events
        self.last_line = b""  # the last of them
        self.sealed_step = 0  # the checkpoint the sealed run holds
        self.sealing: threading.Thread | None = None
        self.result_file: str | None = None  # the evaluation report's file id

    def execute(self) -> str:
        job = self.job
        resumed = self.prepare()
        where = f" (resumed, attempt {job['attempts']})" if resumed else ""
        self.store.add_event(job["id"], f"Fine-tuning job started on worker {self.worker.name}{where}",
                             key=f"start-{job['attempts']}")
        self.service.audit(job["project_id"], "worker", "job.start", [job["id"]], worker=self.worker.name,
                           attempt=job["attempts"])
        command = ["train", "config.yaml"] + (["--nproc", str(job["processes"])] if job["processes"] > 1 else [])
        process = self.launch(command, "train.log")
        try:
            outcome = self.supervise(process)
            if outcome == "exited" and process.returncode == 0 and job["validation_file"]:
                outcome = self.evaluate()
        finally:
            if self.sealing is not None:
                self.sealing.join()
        if outcome == "lost":
            return outcome
        self.sync_run(seal=False)
        return self.conclude(outcome, process.returncode)

    def prepare(self) -> bool:
        """The scratch directory: decrypted data, config.yaml, and the run so far when there is one (left by
        the last worker on this machine, else unsealed). True when it holds a run to resume."""
        directory = self.directory
        private_directory(self.service.scratch)
        directory.mkdir(mode=0o700, exist_ok=True)
        (directory / "data").mkdir(mode=0o700, exist_ok=True)
        sealed = self.service.sealed_run(self.job["id"])
        if not checkpoints(directory / "run") and self.service.blobs.exists(sealed):
            shutil.rmtree(directory / "run", ignore_errors=True)
            self.service.blobs.extract_tree(sealed, directory / "run")
            self.sealed_step = max(checkpoints(directory / "run"), default=0)
            self.store.add_event(self.job["id"], f"Restored the run from its sealed checkpoint at step "
                                 f"{self.sealed_step}", key=f"restore-{self.job['attempts']}")
        resumed = bool(checkpoints(directory / "run"))
        paths = {}
        for param in ("training_file", "validation_file"):
            if self.job[param] is None:
                continue
            target = directory / "data" / f"{param}.jsonl"
            if not target.exists():
                with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as sink:
                    for chunk in self.service.blobs.chunks(f"files/{self.job[param]}"):
                        sink.write(chunk)
            paths[param] = f"data/{target.name}"
        config_path = directory / "config.yaml"
        if not config_path.exists():  # a resume keeps the config it started with (train refuses a changed one)
            base_spec = self.service.base_models[self.job["model"]]
            config = job_spec.build_config(self.job, base_spec, paths["training_file"], paths.get("validation_file"),
                                           self.job["resolved"])
            config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return resumed

    def launch(self, arguments: list[str], log_name: str) -> subprocess.Popen:
        """`tunesmith ARGUMENTS` in the scratch directory, in its own process group, output to `log_name`."""
        log = open(self.directory / log_name, "ab")
        return subprocess.Popen([sys.executable, "-m", "tunesmith", *arguments], cwd=self.directory, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def evaluate(self) -> str:
        """The fine-tuned model against its base on the validation file (`tunesmith eval`, with 95% intervals).
        Its report becomes the job's result file; a failed evaluation is reported and leaves the job's success
        alone. Returns the outcome, as `supervise`."""
        job = self.job
        task = "preference" if job["method"] == "dpo" else "perplexity"
        self.store.add_event(job["id"], f"Evaluating the fine-tuned model against its base on the validation file "
                             f"({task}, up to {EVAL_MAX_EXAMPLES} examples)", key="eval-start")
        process = self.launch(["eval", "run", "--data", "data/validation_file.jsonl", "--task", task, "--baseline",
                               "base", "--output", "eval", "--max-examples", str(EVAL_MAX_EXAMPLES)], "eval.log")
        outcome = self.supervise(process)
        report = self.directory / "eval" / "eval.json"
        if outcome != "exited":
            return outcome
        if process.returncode != 0 or not report.is_file():
            self.store.add_event(job["id"], f"Evaluation failed (exit {process.returncode}): "
                                 f"{self.log_tail('eval.log')}", level="warning", key="eval-failed")
            return outcome
        result = json.loads(report.read_text(encoding="utf-8"))
        model_id = job_spec.fine_tuned_name(job)
        # The report names the scratch paths it read; the client knows these as the model and the file.
        result.update(target=model_id, data=job["validation_file"])
        result.pop("run", None)
        self.result_file = self.service.add_result_file(job["project_id"], f"{job['id']}-eval.json",
                                                        json.dumps(result, indent=1, ensure_ascii=False).encode())
        self.store.add_event(job["id"], f"Evaluation on {result['n']} validation examples: {headline(result)}",
                             data={"file": self.result_file, "task": task, "n": result["n"]}, key="eval-done")
        return outcome

    def supervise(self, process: subprocess.Popen) -> str:
        """Wait for the run, renewing the lease and copying progress; "exited", "cancelled" or "lost"."""
        while True:
            try:
                process.wait(timeout=self.worker.poll_seconds)
                return "exited"
            except subprocess.TimeoutExpired:
                pass
            self.sync_run()
            current = self.store.renew(self.lease, self.worker.lease_seconds)
            if current is None:
                _stop(process)  # another worker owns the job now (or it was finished elsewhere)
                return "lost"
            if current["cancel_requested"]:
                _stop(process)
                return "cancelled"

    def sync_run(self, seal: bool = True) -> None:
        """New metrics lines -> events; new checkpoints -> checkpoint records (each stored once), and the run
        sealed in the background when it has a checkpoint newer than the sealed one."""
        metrics = self.directory / "run" / "metrics.jsonl"
        if metrics.exists():
            with metrics.open("rb") as handle:
                # A resumed run rewrites its log (the lines past its checkpoint go): if the last line read is no
                # longer where it was, read from the start again; events already stored are not stored twice.
                if self.metrics_read and _bytes_at(handle, self.metrics_read - len(self.last_line), len(self.last_line)) != self.last_line:
                    self.metrics_read = 0
                handle.seek(self.metrics_read)
                data = handle.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.metrics_read += len(complete)
            lines = complete.splitlines(keepends=True)
            self.last_line = lines[-1] if lines else self.last_line
            for line in lines:
                try:
                    self.record_metrics(json.loads(line))
                except ValueError:
                    continue
        steps = checkpoints(self.directory / "run")
        for step in steps:
            self.store.add_checkpoint(self.job["id"], step, self.checkpoint_metrics(step))
        newest = max(steps, default=0)
        if seal and newest > self.sealed_step and (self.sealing is None or not self.sealing.is_alive()):
            self.sealing = threading.Thread(target=self.seal, args=(newest,), name=f"seal {self.job['id']}",
                                            daemon=True)
            self.sealing.start()

    def seal(self, step: int) -> None:
        """Encrypt the run as of checkpoint `step` (that checkpoint, not older ones) into the blobs. Training
        goes on meanwhile: a checkpoint it prunes under us fails this round, and a newer one is sealed next."""
        run = self.directory / "run"
        try:
            self.service.blobs.put_tree(self.service.sealed_run(self.job["id"]), run, run_members(run, step))
        except (OSError, tarfile.TarError, ValueError):
            return
        self.sealed_step = step

    def record_metrics(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        if step is None:
            return
        if row.get("event") == "data":  # the run's opening line: what it trains on, how long, on how many processes
            data = {key: row.get(key) for key in ("total_steps", "processes", "examples", "rows")}
            self.store.add_event(self.job["id"], f"Training {data['total_steps']} steps on {data['processes']} "
                                 f"process(es)", data=data, key="data")
            return
        self.last_metrics = {**getattr(self, "last_metrics", {}), "step": step}
        if "loss" in row:
            self.last_metrics["train_loss"] = row["loss"]
            data = {"step": step, "train_loss": row["loss"], "total_steps": row.get("total_steps"),
                    "tokens_per_s": row.get("tokens_per_s"), "lr": row.get("lr")}
            self.store.add_event(self.job["id"], f"Step {step}: training loss={row['loss']:.4f}", type="metrics",
                                 data=data, key=f"train-{step}")
        if "val_loss" in row:
            self.last_metrics["valid_loss"] = row["val_loss"]
            self.store.add_event(self.job["id"], f"Step {step}: validation loss={row['val_loss']:.4f}", type="metrics",
                                 data={"step": step, "valid_loss": row["val_loss"]}, key=f"val-{step}")

    def checkpoint_metrics(self, step: int) -> dict[str, Any]:
        known = getattr(self, "last_metrics", {})
        return {"step": step, **{key: known[key] for key in ("train_loss", "valid_loss") if key in known}}

    def conclude(self, outcome: str, returncode: int) -> str:
        job, store = self.job, self.store
        if outcome == "cancelled":
            status, values = "cancelled", {}
            store.add_event(job["id"], "Fine-tuning job cancelled")
        elif returncode == 0:
            model_id = job_spec.fine_tuned_name(job)
            adapter = self.directory / "run" / "adapter"
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                with open(adapter / name, "rb") as source:
                    self.service.blobs.put_stream(f"models/{job['id']}/{name}", source)
            if store.model(job["project_id"], model_id) is None:
                store.add_model(job["project_id"], model_id, job["id"], job["model"])
            status, values = "succeeded", {"fine_tuned_model": model_id, "trained_tokens": self.trained_tokens()}
            if self.result_file is not None:
                values["result_files"] = [self.result_file]
            store.add_event(job["id"], f"The job has successfully completed: {model_id}", key="succeeded")
        else:
            message = self.log_tail()
            code = "invalid_training_file" if returncode == USER_ERROR_EXIT else "training_failed"
            status, values = "failed", {"error": {"code": code, "message": message, "param": None}}
            store.add_event(job["id"], f"Training failed (exit {returncode}): {message}", level="error")
        if not store.finish(self.lease, status, **values):
            return "lost"
        made = [values["fine_tuned_model"], *values.get("result_files", [])] if status == "succeeded" else []
        self.service.audit(job["project_id"], "worker", f"job.{status}", [job["id"], *made])
        self.service.erase_run(job["id"])
        return status

    def trained_tokens(self) -> int | None:
        tokens = None
        for record in read_metrics(self.directory / "run"):
            tokens = record.get("tokens", tokens)
        return tokens

    def log_tail(self, name: str = "train.log", lines: int = 8) -> str:
        path = self.directory / name
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        return "\n".join(text.strip().splitlines()[-lines:]) or "training stopped without a message"


def headline(result: dict[str, Any]) -> str:
    """The report's first metric for the tuned model and the base, and their difference, with 95% intervals."""
    from tunesmith.eval.stats import cell, difference

    name = EVAL_HEADLINE.get(result.get("task"), "")
    tuned = result.get("metrics", {}).get(name)
    if tuned is None:
        return "no metric"
    parts = [f"{name} {cell(tuned, rate=False)} fine-tuned"]
    base = result.get("baselines", {}).get("base", {}).get("metrics", {}).get(name)
    if base is not None:
        parts.append(f"{cell(base, rate=False)} base")
    diff = result.get("comparisons", {}).get("base", {}).get(name)
    if diff and diff.get("diff") is not None:
        parts.append(f"difference {difference(diff, '+.4g')}")
    return "; ".join(parts)


def run_members(run: Path, step: int) -> list[str]:
    """The files of a run directory as of checkpoint `step`: everything but the other checkpoints, which are
    not even listed (training may be deleting them)."""
    members = []
    for folder, subfolders, files in os.walk(run):
        relative = Path(folder).relative_to(run)
        if relative == Path("checkpoints"):
            subfolders[:] = [name for name in subfolders if name == f"step-{step}"]
        members += [str(relative / name) for name in files if not (Path(folder) / name).is_symlink()]
    return sorted(members)


def checkpoints(run: Path) -> list[int]:
    """The steps of the complete checkpoints in a run directory (a checkpoint is renamed into place whole)."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(path.name.removeprefix("step-")) for path in folder.glob("step-*")
                  if path.name.removeprefix("step-").isdigit() and (path / "state.json").is_file())


def _bytes_at(handle, offset: int, size: int) -> bytes:
    if offset < 0:
        return b""
    handle.seek(offset)
    return handle.read(size)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (train checkpoints and exits), SIGKILL after a grace period."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=CANCEL_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """In the child: SIGKILL when the worker dies, so a dead worker leaves no run behind to race a new one."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def run(service: Service, concurrency: int = 1, lease_seconds: float = LEASE_SECONDS) -> int:
    worker = Worker(service, concurrency, lease_seconds=lease_seconds)
    from sqlalchemy.engine import make_url

    store = make_url(service.store.url).render_as_string(hide_password=True)
    print(f"tunesmith worker {worker.name}: running up to {concurrency} job(s) from {store}", flush=True)
    print(service.describe_scratch(), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        worker.stop()
    return 0
