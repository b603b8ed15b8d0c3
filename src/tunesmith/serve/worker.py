"""`tunesmith worker`: leases queued jobs from the store and runs each recipe in its own process.

A job runs as `python -m tunesmith train config.yaml` (with `--nproc N` for several processes) in the job's
private work directory. While it runs, the worker renews its lease every few seconds, copies the run's
metrics and checkpoints into the store as events (each once, however often it is read), and stops the run
when the job is cancelled. Each new checkpoint seals the run directory (as of that checkpoint) into the
encrypted blobs, and its LoRA adapter is stored too (the checkpoint model `...:ckpt-step-N`). A worker that
dies stops renewing: once its lease runs out, any worker takes the job again and `train` resumes it from its
newest checkpoint, found in the scratch directory when the worker left it there, else unsealed from the blobs
(a restarted machine, another machine). A pause is the same path on purpose: the run is signalled, checkpoints its
step and exits, the worker seals it, erases the scratch directory and leaves the job `paused`; a resume queues it
and the next worker unseals it, so the run goes on bit for bit. When the run ends, its adapter is encrypted into
the blob store, the model registered, and the scratch directory (the only plaintext) and the sealed run erased.

A worker that stalls (a paused process, a frozen machine) past its lease must not run the job beside the worker
that took it over. So every store write of the worker is fenced by its lease's epoch (see store.py), a blob is
committed only after a check that the lease still holds, and a worker that wakes renews before it writes
anything: once it learns it lost the job, it stops its run and leaves. On one machine the scratch directory is
locked too: the worker takes an exclusive flock on its lock file, which the run's process inherits, and the
next attempt waits until neither is left before it prepares the directory or starts `train` there.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from typing import Any

import yaml

from tunesmith.config.schema import Config
from tunesmith.models.adapters import checkpoint_adapter
from tunesmith.rundir import checkpoint_steps, read_metrics, read_run_config
from tunesmith.serve import jobs as job_spec
from tunesmith.serve import progress
from tunesmith.serve.scratch import Fenced, bytes_at, die_with_parent, first_lines, run_members, stop, try_lock
from tunesmith.serve.service import Service
from tunesmith.serve.shapes import ApiError
from tunesmith.serve.store import Lease, LeaseLost

LEASE_SECONDS = 30.0
POLL_SECONDS = 1.0
CANCEL_GRACE_SECONDS = 5.0
USER_ERROR_EXIT = 2
EVAL_MAX_EXAMPLES = 500  # validation examples the closing evaluation scores (each on the tuned and the base model)
TUNESMITH = [sys.executable, "-m", "tunesmith"]  # how a run's process is started (`tunesmith train ...`)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PAUSE_GRACE_SECONDS = 900.0  # a paused run finishes its step and checkpoints; killed (unpaused) past this
GRADER_FILE = "grader.json"  # a reinforcement job's grader, for the closing evaluation
EVAL_TASKS = {"dpo": "preference", "reinforcement": "reward"}  # the closing evaluation's task; else perplexity


class CancelRequested(Exception):
    """The user's cancel landed while the job concluded: it ends cancelled, not with a model."""


class Worker:
    def __init__(
        self,
        service: Service,
        concurrency: int = 1,
        lease_seconds: float = LEASE_SECONDS,
        poll_seconds: float = POLL_SECONDS,
        name: str | None = None,
    ):
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
                thread = threading.Thread(
                    target=self.run_job, args=(lease,), name=f"job {lease.job['id']}", daemon=True
                )
                # by epoch: a stalled thread of this worker may still be leaving an attempt of the same job
                self.running[f"{lease.job['id']}#{lease.epoch}"] = thread
                thread.start()
            self.stopping.wait(self.poll_seconds)
        for thread in self.running.values():
            thread.join()

    def stop(self) -> None:
        self.stopping.set()

    def run_job(self, lease: Lease) -> str:
        """Run one leased job to its end; returns the final status, "lost" when another worker took the job,
        or "unfinished" when the audit log could not be written (the job is taken up again once the lease
        runs out)."""
        run = JobRun(self, lease)
        try:
            return run.execute()
        except Exception as error:  # a bug of ours: the job fails with the reason, the worker goes on
            return run.end(
                "failed",
                {"error": {"code": "server_error", "message": str(error), "param": None}},
                f"Worker error: {type(error).__name__}: {error}",
                level="error",
            )
        finally:
            run.release_scratch()


class JobRun:
    def __init__(self, worker: Worker, lease: Lease):
        self.worker, self.lease, self.job = worker, lease, lease.job
        self.service, self.store = worker.service, worker.store
        self.directory = self.service.work_dir(self.job["id"])
        self.lock: int | None = None  # the descriptor holding the scratch directory's flock
        self.metrics_read = 0  # bytes of metrics.jsonl already turned into events
        self.last_line = b""  # the last of them
        self.sealed_step = 0  # the checkpoint the sealed run holds
        self.recorded = {row["step"] for row in self.store.checkpoints(self.job["id"], None, 1 << 20)}
        self.sealing: threading.Thread | None = None  # records new checkpoints and seals the run meanwhile
        self.result_file: str | None = None  # the evaluation report's file id
        self.progress = progress.Progress()  # the newest figures read, for the checkpoints' records

    def execute(self) -> str:
        job = self.job
        try:
            if self.lock_scratch()["cancel_requested"]:  # cancelled before this attempt could start
                return self.end("cancelled", {}, "Fine-tuning job cancelled")
            resumed = self.prepare()
            self.service.audit(
                job["project_id"], "worker", "job.start", [job["id"]], worker=self.worker.name, attempt=job["attempts"]
            )
            where = f" (resumed, attempt {job['attempts']})" if resumed else ""
            self.add_event(
                f"Fine-tuning job started on worker {self.worker.name}{where}", key=f"start-{job['attempts']}"
            )
            command = ["train", "config.yaml"] + (["--nproc", str(job["processes"])] if job["processes"] > 1 else [])
            process = self.launch(command, "train.log")
            try:
                outcome = self.supervise(process, pausable=True)
                if outcome == "exited" and process.returncode == 0 and job["validation_file"]:
                    outcome = self.evaluate()
            finally:
                if self.sealing is not None:
                    self.sealing.join()
            if outcome == "lost":
                return outcome
            if outcome == "paused":
                return self.pause()
            self.sync_run(seal=False)
            return self.conclude(outcome, process.returncode)
        except LeaseLost:
            return "lost"
        except ApiError as error:
            if error.code != "audit_unavailable":
                raise
            return self.unaudited(error)

    def add_event(self, message: str, **fields: Any) -> bool:
        """An event of this attempt: stored only while the lease holds (else LeaseLost)."""
        return self.store.add_event(self.job["id"], message, lease=self.lease, **fields)

    def check_lease(self) -> None:
        """LeaseLost unless this attempt still holds the job: asked right before a blob is committed."""
        if self.store.holds(self.lease) is None:
            raise LeaseLost(self.lease)

    def put_blob(self, name: str, source: Any) -> None:
        """Encrypt `source` into blob `name`, committed only if the lease still holds when the source ends."""
        self.service.blobs.put_stream(name, Fenced(source, self.check_lease))

    def lock_scratch(self) -> dict[str, Any]:
        """Take the scratch directory's lock. While another attempt's process holds it (a stalled worker, or
        the `train` it started), wait, renewing the lease: the directory is theirs until they are gone.
        Returns the job's row as last seen."""
        current, waited = self.job, False
        while True:
            self.lock = try_lock(self.service.scratch, self.directory)
            if self.lock is not None:
                return current
            if not waited:
                self.add_event(
                    "Waiting for the previous attempt's process to leave the scratch directory",
                    key=f"scratch-wait-{self.lease.epoch}",
                )
                waited = True
            time.sleep(self.worker.poll_seconds)
            current = self.store.renew(self.lease, self.worker.lease_seconds)
            if current is None:
                raise LeaseLost(self.lease)

    def release_scratch(self) -> None:
        """Let go of the scratch lock (the run's process, if one is left, holds its own copy)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def prepare(self) -> bool:
        """The scratch directory: decrypted data, config.yaml, and the run so far when there is one (left by
        the last worker on this machine, else unsealed). True when it holds a run to resume."""
        directory = self.directory
        (directory / "data").mkdir(mode=0o700, exist_ok=True)
        sealed = self.service.sealed_run(self.job["id"])
        if not checkpoint_steps(directory / "run") and self.service.blobs.exists(sealed):
            shutil.rmtree(directory / "run", ignore_errors=True)
            self.service.blobs.extract_tree(sealed, directory / "run")
            self.sealed_step = max(checkpoint_steps(directory / "run"), default=0)
            self.add_event(
                f"Restored the run from its sealed checkpoint at step {self.sealed_step}",
                key=f"restore-{self.job['attempts']}",
            )
        resumed = bool(checkpoint_steps(directory / "run"))
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
        validation = paths.get("validation_file")
        if validation and self.job["method"] == "reinforcement":  # the evaluations score the first eval_samples
            validation = "data/eval_samples.jsonl"
            first_lines(
                directory / paths["validation_file"], directory / validation, self.job["resolved"]["eval_samples"]
            )
            (directory / GRADER_FILE).write_text(json.dumps(self.job["grader"]), encoding="utf-8")
        config_path = directory / "config.yaml"
        if not config_path.exists():  # a resume keeps the config it started with (train refuses a changed one)
            base_spec = self.service.base_models[self.job["model"]]
            config = job_spec.build_config(
                self.job,
                base_spec,
                paths["training_file"],
                validation,
                self.job["resolved"],
                self.service.settings.reply_tokens,
            )
            config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return resumed

    def launch(self, arguments: list[str], log_name: str) -> subprocess.Popen:
        """`tunesmith ARGUMENTS` in the scratch directory, in its own process group, output to `log_name`. It
        inherits the scratch lock: the directory stays locked while it lives, even past this worker."""
        with open(self.directory / log_name, "ab") as log:
            return subprocess.Popen(
                [*TUNESMITH, *arguments],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
                pass_fds=(self.lock,),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def evaluate(self) -> str:
        """The fine-tuned model against its base on the validation file (`tunesmith eval`, with 95% intervals).
        Its report becomes the job's result file; a failed evaluation is reported and leaves the job's success
        alone. Returns the outcome, as `supervise`."""
        job = self.job
        task = EVAL_TASKS.get(job["method"], "perplexity")
        graded = (
            ["--grader", GRADER_FILE, "--max-new-tokens", str(self.config.rl.max_new_tokens)]
            if task == "reward"
            else []
        )
        self.add_event(
            f"Evaluating the fine-tuned model against its base on the validation file ({task}, up to "
            f"{EVAL_MAX_EXAMPLES} examples)",
            key="eval-start",
        )
        process = self.launch(
            [
                "eval",
                "run",
                "--data",
                "data/validation_file.jsonl",
                "--task",
                task,
                "--baseline",
                "base",
                "--output",
                "eval",
                "--max-examples",
                str(EVAL_MAX_EXAMPLES),
                *graded,
            ],
            "eval.log",
        )
        outcome = self.supervise(process)
        report = self.directory / "eval" / "eval.json"
        if outcome != "exited":
            return outcome
        if process.returncode != 0 or not report.is_file():
            self.add_event(
                f"Evaluation failed (exit {process.returncode}): {self.log_tail('eval.log')}",
                level="warning",
                key="eval-failed",
            )
            return outcome
        result = json.loads(report.read_text(encoding="utf-8"))
        model_id = job_spec.fine_tuned_name(job)
        # The report names the scratch paths it read; the client knows these as the model and the file.
        result.update(target=model_id, data=job["validation_file"])
        result.pop("run", None)
        self.check_lease()
        self.result_file = self.service.add_result_file(
            job["project_id"], f"{job['id']}-eval.json", json.dumps(result, indent=1, ensure_ascii=False).encode()
        )
        self.add_event(
            f"Evaluation on {result['n']} validation examples: {progress.headline(result)}",
            data={"file": self.result_file, "task": task, "n": result["n"]},
            key="eval-done",
        )
        return outcome

    def supervise(self, process: subprocess.Popen, pausable: bool = False) -> str:
        """Wait for the run, renewing the lease and copying progress; "exited", "cancelled", "lost", or (training,
        `pausable`) "paused": the run was signalled, checkpointed its step and exited."""
        pausing = None  # when the run was asked to checkpoint and exit
        try:
            while True:
                try:
                    process.wait(timeout=self.worker.poll_seconds)
                    return "paused" if pausing is not None and process.returncode != 0 else "exited"
                except subprocess.TimeoutExpired:
                    pass
                # Renew first: a worker waking from a stall learns that it lost the job before it writes anything.
                current = self.store.renew(self.lease, self.worker.lease_seconds)
                if current is None:
                    raise LeaseLost(self.lease)
                self.sync_run()
                if current["cancel_requested"]:
                    stop(process, CANCEL_GRACE_SECONDS)
                    return "cancelled"
                if pausable and current["pause_requested"] and pausing is None:
                    os.killpg(process.pid, signal.SIGTERM)  # train finishes its step, checkpoints and exits
                    pausing = time.monotonic()
                    self.add_event("Pausing: the run checkpoints its current step", key=f"pausing-{self.lease.epoch}")
                if pausing is not None and time.monotonic() - pausing > PAUSE_GRACE_SECONDS:
                    stop(process, 0)  # it did not checkpoint in time: the job resumes from its last checkpoint
                    return "paused"
        except BaseException as error:
            stop(
                process, CANCEL_GRACE_SECONDS
            )  # the job is another worker's now (or a bug of ours): the run must not go on unwatched
            if isinstance(error, LeaseLost):
                return "lost"
            raise

    def sync_run(self, seal: bool = True) -> None:
        """New metrics lines -> events; new checkpoints -> checkpoint records with their adapters (each stored
        once), and the run sealed when it has a checkpoint newer than the sealed one. While the run goes on
        (`seal`), the checkpoints are read and sealed in the background; at its end, at once."""
        metrics = self.directory / "run" / "metrics.jsonl"
        if metrics.exists():
            with metrics.open("rb") as handle:
                # A resumed run rewrites its log (the lines past its checkpoint go): if the last line read is no
                # longer where it was, read from the start again; events already stored are not stored twice.
                if (
                    self.metrics_read
                    and bytes_at(handle, self.metrics_read - len(self.last_line), len(self.last_line)) != self.last_line
                ):
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
        steps = checkpoint_steps(self.directory / "run")
        new = [step for step in steps if step not in self.recorded]
        newest = max(steps, default=0)
        if not seal:
            self.record_checkpoints(new)
        elif (new or newest > self.sealed_step) and (self.sealing is None or not self.sealing.is_alive()):
            self.sealing = threading.Thread(target=self.keep, args=(new,), name=f"seal {self.job['id']}", daemon=True)
            self.sealing.start()

    def keep(self, steps: list[int]) -> None:
        """In the background: record the new checkpoints, then seal the run as of its newest one by then."""
        try:
            self.record_checkpoints(steps)
            newest = max(checkpoint_steps(self.directory / "run"), default=0)
            if newest > self.sealed_step:
                self.seal(newest)
        except LeaseLost:
            return  # the supervising loop learns it at its next renewal, and stops the run

    @functools.cached_property
    def config(self) -> Config:
        """The job's config as prepare() wrote it (read once: every checkpoint's adapter needs its LoRA settings)."""
        return read_run_config(self.directory)

    def record_checkpoints(self, steps: list[int]) -> None:
        """Store each checkpoint's adapter (what serves it as a model), then its record. One that training pruned
        meanwhile is skipped: the checkpoints kept are the run's newest."""
        run = self.directory / "run"
        for step in steps:
            folder = run / "checkpoints" / f"step-{step}"
            try:
                files = checkpoint_adapter(folder, self.config)
            except Exception as error:  # pruned while read (a newer one exists), or an adapter we cannot rebuild
                if not (folder / "state.json").is_file() or max(checkpoint_steps(run), default=step) > step:
                    continue
                files = {}
                self.add_event(
                    f"Checkpoint step {step} cannot be served: its adapter was not stored "
                    f"({type(error).__name__}: {error})",
                    level="warning",
                    key=f"checkpoint-adapter-{step}",
                )
            for name, data in files.items():
                self.put_blob(self.service.adapter_blob(self.job["id"], name, step), io.BytesIO(data))
            self.store.add_checkpoint(self.job["id"], step, self.progress.checkpoint_metrics(step), lease=self.lease)
            self.recorded.add(step)

    def seal(self, step: int) -> None:
        """Encrypt the run as of checkpoint `step` (that checkpoint, not older ones) into the blobs. Training
        goes on meanwhile: a checkpoint it prunes under us fails this round, and a newer one is sealed next."""
        run = self.directory / "run"

        members = run_members(run, step)
        if f"checkpoints/step-{step}/state.json" not in members:  # pruned meanwhile: a newer one is sealed next
            return

        def members_then_check():  # the lease is checked after the last member: put_tree then keeps nothing
            yield from members
            self.check_lease()

        try:
            self.service.blobs.put_tree(self.service.sealed_run(self.job["id"]), run, members_then_check())
        except (OSError, tarfile.TarError, ValueError):
            return
        self.sealed_step = step

    def record_metrics(self, row: dict[str, Any]) -> None:
        for event in progress.events_of(row, self.progress):
            self.add_event(event.message, level=event.level, type=event.type, data=event.data, key=event.key)

    def pause(self) -> str:
        """The run stopped at a checkpoint: seal it, leave the job `paused` (a resume queues it again and a worker
        unseals the run), and erase the scratch directory, the only plaintext. Part of `execute`, which tells a lost
        lease and an unwritable audit log."""
        job = self.job
        self.sync_run(seal=False)
        newest = max(checkpoint_steps(self.directory / "run"), default=0)
        if newest > self.sealed_step:
            self.seal(newest)
        with self.service.audited(job["project_id"], "worker", "job.paused", [job["id"]], step=self.sealed_step):
            if not self.store.pause(self.lease):
                raise LeaseLost(self.lease)
        where = f"at step {self.sealed_step}" if self.sealed_step else "before its first checkpoint"
        self.store.add_event(job["id"], f"Fine-tuning job paused {where}", key=f"paused-{self.lease.epoch}")
        if newest == self.sealed_step:  # the sealed run holds everything: the scratch copy goes
            shutil.rmtree(self.directory, ignore_errors=True)
        return "paused"

    def conclude(self, outcome: str, returncode: int) -> str:
        """The run's end: the job succeeds (its adapter stored, its model registered), fails or is cancelled."""
        job = self.job
        try:
            current = self.store.holds(self.lease)
            if current is None:
                raise LeaseLost(self.lease)
            if outcome == "cancelled" or current["cancel_requested"]:
                return self.end("cancelled", {}, "Fine-tuning job cancelled")
            if returncode != 0:
                message = self.log_tail()
                code = "invalid_training_file" if returncode == USER_ERROR_EXIT else "training_failed"
                return self.end(
                    "failed",
                    {"error": {"code": code, "message": message, "param": None}},
                    f"Training failed (exit {returncode}): {message}",
                    level="error",
                )
            model_id = job_spec.fine_tuned_name(job)
            for name in ADAPTER_FILES:
                with open(self.directory / "run" / "adapter" / name, "rb") as source:
                    self.put_blob(self.service.adapter_blob(job["id"], name), source)
        except LeaseLost:
            return "lost"
        values = {"fine_tuned_model": model_id, "trained_tokens": self.trained_tokens()}
        if self.result_file is not None:
            values["result_files"] = [self.result_file]
        return self.end(
            "succeeded",
            values,
            f"The job has successfully completed: {model_id}",
            key="succeeded",
            model={"id": model_id, "base": job["model"]},
        )

    def end(
        self,
        status: str,
        values: dict[str, Any],
        message: str,
        level: str = "info",
        key: str | None = None,
        model: dict[str, Any] | None = None,
    ) -> str:
        """Conclude the job: its audit record first, then the fenced finish (for a success, with the model's row
        in the same transaction), then the closing event and the run's erasure. Returns the status; "lost" when
        another worker holds the job now (the trail then says `job.STATUS.failed`); "unfinished" when the audit
        log cannot be written (nothing is finished; the job is taken up again once the lease runs out)."""
        job, made = self.job, [model["id"], *values.get("result_files", [])] if model else []
        try:
            with self.service.audited(job["project_id"], "worker", f"job.{status}", [job["id"], *made]):
                if not self.store.finish(self.lease, status, model=model, **values):
                    if self.store.holds(self.lease) is None:
                        raise LeaseLost(self.lease)
                    raise CancelRequested(f"job {job['id']}: cancelled while it concluded")
        except LeaseLost:
            return "lost"
        except CancelRequested:
            self.service.blobs.erase(f"models/{job['id']}")  # no model for a job that ended cancelled
            return self.end("cancelled", {}, "Fine-tuning job cancelled")
        except ApiError as error:
            if error.code != "audit_unavailable":
                raise
            self.service.blobs.erase(f"models/{job['id']}")  # written again when the job is taken up again
            return self.unaudited(error)
        self.store.add_event(job["id"], message, level=level, key=key)  # unfenced: this attempt just ended the job
        self.service.erase_run(job["id"], checkpoints=False)  # the checkpoints stay servable
        return status

    def unaudited(self, error: ApiError) -> str:
        """The audit log cannot be written: leave the job unfinished, to be taken up again when the lease runs out."""
        try:
            self.add_event(
                f"{error.message} (the job waits, and is taken up again once this attempt's lease runs out)",
                level="error",
                key=f"unaudited-{self.lease.epoch}",
            )
        except LeaseLost:
            return "lost"
        return "unfinished"

    def trained_tokens(self) -> int | None:
        tokens = None
        for record in read_metrics(self.directory / "run"):
            tokens = record.get("tokens", tokens)
        return tokens

    def log_tail(self, name: str = "train.log", lines: int = 8) -> str:
        path = self.directory / name
        text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        return "\n".join(text.strip().splitlines()[-lines:]) or "training stopped without a message"


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
