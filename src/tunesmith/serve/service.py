"""The service's operations, shared by the HTTP API, the worker and the CLI: one object that owns the store,
the encrypted blobs, the audit log and the settings. The API only maps HTTP to these calls.

Everything lives under `$TUNESMITH_HOME`: `service.db` (or a PostgreSQL URL), `blobs/` (encrypted),
`master.key` and `audit.log`. The one plaintext is a running job's scratch directory (0700): the decrypted
data and the run that training reads and writes. It lives on a memory filesystem when the machine has one
with room (`/dev/shm`), else under `HOME/work/`, or where `--scratch` says; at every checkpoint the run is
sealed into the encrypted blobs (what a worker elsewhere, or after a restart, resumes from), and the
scratch is erased when the job ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tunesmith.errors import UserError
from tunesmith.paths import home, make_private
from tunesmith.security.audit import AuditError, AuditEvent, AuditFile, AuditHead, AuditRecord, VerifyResult
from tunesmith.serve import jobs as job_spec
from tunesmith.serve.blobs import Blobs, TooLarge, load_keyring
from tunesmith.serve.shapes import ApiError, not_found
from tunesmith.serve.store import Store, new_id

PURPOSES = ("fine-tune",)  # what clients upload; a job's evaluation report is a "fine-tune-results" file
RESULTS_PURPOSE = "fine-tune-results"
MAX_FILENAME = 255


@dataclass
class Settings:
    home: Path = field(default_factory=home)
    database_url: str | None = None
    base_models: dict[str, str] = field(default_factory=dict)  # name a client uses -> model spec (registry name or dir)
    max_upload_bytes: int = 512 << 20
    processes: int = 1  # torch.distributed processes per training job
    reply_tokens: int = job_spec.REPLY_TOKENS  # reinforcement jobs' longest sampled reply (rl.max_new_tokens)
    scratch: Path | None = None  # where running jobs keep their plaintext; None: default_scratch(home)


MEMORY_FILESYSTEM = Path("/dev/shm")
MEMORY_SCRATCH_MIN_FREE = 2 << 30
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


def default_scratch(home: Path) -> Path:
    """A memory filesystem with at least 2 GiB free (plaintext that never reaches a disk), else `home/work`."""
    try:
        roomy = shutil.disk_usage(MEMORY_FILESYSTEM).free >= MEMORY_SCRATCH_MIN_FREE
        if roomy and os.access(MEMORY_FILESYSTEM, os.W_OK):
            tag = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]  # one per service home
            return MEMORY_FILESYSTEM / f"tunesmith-{os.getuid()}-{tag}"
    except OSError:
        pass
    return home / "work"


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` ("tmpfs", "ext4", ...), from /proc/self/mounts; "" if unknown."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def private_directory(path: Path) -> Path:
    """`path` as a directory only this user can enter: made 0700, or refused if someone else made it first
    (a shared /dev/shm is world-writable) or it is a link."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UserError(
            f"{path}: the job scratch directory must be a folder of this user with mode 0700; fix: "
            f"remove it, or give another with --scratch"
        )
    return path


def default_base_models() -> dict[str, str]:
    from tunesmith.models import catalog

    return {entry["name"]: entry["name"] for entry in catalog.list_models()}


class Service:
    def __init__(self, settings: Settings):
        self.settings = settings
        make_private(settings.home, directory=True)  # 0700 even if `models pull` made it first (0755)
        if not settings.database_url:
            make_private(settings.home / "service.db", directory=False)  # SQLite gives -wal/-shm the db's mode
        for name in ("service.db-wal", "service.db-shm", "audit.log"):  # narrow what older versions made 0644
            if (settings.home / name).exists():
                make_private(settings.home / name, directory=False)
        self.store = Store(settings.database_url or f"sqlite:///{settings.home / 'service.db'}")
        self.blobs = Blobs(settings.home / "blobs", load_keyring(settings.home))
        self.audit_log = AuditFile(settings.home / "audit.log", on_append=self.record_audit_head)
        self.base_models = settings.base_models or default_base_models()
        self.scratch = settings.scratch or default_scratch(settings.home)

    def describe_scratch(self) -> str:
        """A line for the operator: where plaintext lives while a job runs."""
        kind = filesystem_type(self.scratch if self.scratch.exists() else self.scratch.parent)
        if kind in MEMORY_FILESYSTEMS:
            return f"job scratch in memory ({kind}): {self.scratch}"
        return (
            f"WARNING: job scratch on disk ({kind or 'unknown filesystem'}): {self.scratch} holds a running job's "
            f"decrypted data and checkpoints until it ends; --scratch DIR on a memory or encrypted filesystem avoids it"
        )

    def audit(self, project: str, key_id: str, action: str, objects: list[str], **details: Any) -> None:
        """Append an audit record, durable when this returns. A log that cannot be written is an ApiError 503:
        the callers audit before they act, so nothing was done and a retry is safe."""
        try:
            self.audit_log.append(AuditEvent(project, key_id, action, tuple(objects), details))
        except (OSError, AuditError) as error:
            raise ApiError(
                503,
                f"The audit log could not be written ({type(error).__name__}: {error}); nothing was "
                f"changed. Retry once the operator has fixed {self.audit_log.path}",
                None,
                "audit_unavailable",
                type="server_error",
            ) from None

    @contextmanager
    def audited(self, project: str, key_id: str, action: str, objects: list[str], **details: Any) -> Iterator[None]:
        """Audit before act: the record is written first, so an action never happens without its record (an
        unwritable log refuses it, see `audit`). If the action then fails, a second record `ACTION.failed` says
        so; the trail then holds the attempt and its failure, never a success that did not happen."""
        self.audit(project, key_id, action, objects, **details)
        try:
            yield
        except BaseException as error:
            try:
                self.audit(project, key_id, f"{action}.failed", objects, error=f"{type(error).__name__}: {error}"[:500])
            except ApiError:
                pass  # the log broke between the two writes: the action's own error is what the caller sees
            raise

    def record_audit_head(self, record: AuditRecord) -> None:
        """Keep the log's newest record in the store too: `audit verify` then sees a log cut short or re-sealed."""
        self.store.set_audit_head(record.sequence, record.hash)

    def verify_audit(self) -> VerifyResult:
        """The log's hash chain, and that it reaches the head the store recorded: a log cut short, emptied,
        deleted, or edited and re-sealed throughout fails too."""
        stored = self.store.audit_head()
        if stored is None:
            result = self.audit_log.verify()
            if result and result.count:
                return VerifyResult(
                    False,
                    0,
                    1,
                    f"the store records no audit head, yet the log has {result.count} "
                    "records: the head was removed, the store replaced, or the log predates head "
                    "tracking (then the next audited action records one)",
                )
            return result
        head = AuditHead(stored["sequence"], stored["hash"])
        if not self.audit_log.path.exists():
            return VerifyResult(
                False, 0, 1, f"the log is missing (deleted), but the store's head is record {head.sequence}"
            )
        return self.audit_log.verify(head)

    def work_dir(self, job_id: str) -> Path:
        return self.scratch / job_id

    @staticmethod
    def sealed_run(job_id: str) -> str:
        """The blob holding a job's run as of its newest checkpoint."""
        return f"runs/{job_id}"

    # files
    def upload(self, project: str, filename: str, purpose: str, source: BinaryIO, actor: str = "cli") -> dict[str, Any]:
        """Store an upload (encrypted) once it validates; `actor` (the key id) is audited before the row exists."""
        if purpose not in PURPOSES:
            raise ApiError(400, f"Invalid purpose '{purpose}': this service takes {', '.join(PURPOSES)}", "purpose")
        name = Path(filename or "").name  # a client's path never becomes ours: keep the last part only
        if not name or name in (".", "..") or len(name) > MAX_FILENAME or any(ord(c) < 32 for c in name):
            raise ApiError(400, f"Invalid filename {filename!r}", "file")
        file_id = new_id("file")
        try:
            written = self.blobs.put_stream(f"files/{file_id}", source, self.settings.max_upload_bytes)
        except TooLarge as error:
            raise ApiError(413, f"File too large: the limit is {error.limit} bytes", "file", "file_too_large") from None
        try:
            loaded = self.check_file(file_id, name, method=None)
            with self.audited(
                project, actor, "file.upload", [file_id], filename=name, bytes=written.bytes, sha256=written.sha256
            ):
                return self.store.add_file(
                    project,
                    id=file_id,
                    filename=name,
                    purpose=purpose,
                    bytes=written.bytes,
                    sha256=written.sha256,
                    format=loaded.format,
                    examples=len(loaded.examples),
                )
        except (
            BaseException
        ):  # refused, unaudited, or failed on our side (validator, database): no blob without its row
            self.blobs.erase(f"files/{file_id}")
            raise

    def check_file(self, file_id: str, filename: str, method: str | None, param: str = "file"):
        """The CLI's validator over the decrypted lines (in memory); problems -> ApiError with FILE:LINE."""
        from tunesmith.data.validate import load_file, report
        from tunesmith.registry import methods

        accepts = methods.info(method)["accepts"] if method else None
        loaded = load_file(Path(filename), "auto", accepts, method or "", lines=self.blobs.lines(f"files/{file_id}"))
        if loaded.problems:
            code = {
                "file": "invalid_file",
                "training_file": "invalid_training_file",
                "validation_file": "invalid_validation_file",
            }[param]
            raise ApiError(
                400,
                f"{report(loaded.problems, limit=20)}\n{filename}: {len(loaded.problems)} problem(s) "
                f"in {loaded.rows} rows",
                param,
                code,
            )
        return loaded

    def file(self, project: str, file_id: str, param: str | None = None) -> dict[str, Any]:
        row = self.store.file(project, file_id)
        if row is None:
            raise not_found("file", file_id, param)
        return row

    def erase_file(self, project: str, file_id: str, actor: str = "cli") -> dict[str, Any]:
        """Delete a file and everything derived from it: running jobs on it stop, their scratch directories
        (decrypted copies, tokenised caches, checkpoints), sealed runs and evaluation reports go. Models
        trained on it are reported, not deleted."""
        self.file(project, file_id)
        using = self.store.jobs_using_file(project, file_id)
        trained = [model["id"] for model in self.store.models_of_jobs([job["id"] for job in using])]
        with self.audited(
            project, actor, "file.delete", [file_id], jobs=[job["id"] for job in using], models_trained_on_it=trained
        ):
            return self._erase_file(project, file_id, using, trained)

    def _erase_file(
        self, project: str, file_id: str, using: list[dict[str, Any]], trained: list[str]
    ) -> dict[str, Any]:
        for job in using:
            if job["status"] not in ("succeeded", "failed", "cancelled"):
                self.store.request_cancel(project, job["id"])
        self.blobs.erase(f"files/{file_id}")
        erased = [job["id"] for job in using if self.erase_run(job["id"])]
        results = [result for job in using for result in job["result_files"] or []]  # reports quote the data
        for result in results:
            self.blobs.erase(f"files/{result}")
            self.store.delete_file(project, result)
        self.store.delete_file(project, file_id)
        return {
            "id": file_id,
            "object": "file",
            "deleted": True,
            "jobs": [job["id"] for job in using],
            "erased_runs": erased,
            "erased_result_files": results,
            "models_trained_on_it": trained,
        }

    def add_result_file(self, project: str, filename: str, data: bytes) -> str:
        """A file the service made for a job (its evaluation report), encrypted like an upload; its id."""
        file_id = new_id("file")
        written = self.blobs.put_bytes(f"files/{file_id}", data)
        self.store.add_file(
            project,
            id=file_id,
            filename=filename,
            purpose=RESULTS_PURPOSE,
            bytes=written.bytes,
            sha256=written.sha256,
            format="json",
            examples=None,
        )
        return file_id

    def erase_run(self, job_id: str, checkpoints: bool = True) -> bool:
        """Erase what a job's run left: its scratch directory, its sealed run and (with `checkpoints`) its
        checkpoints' adapters; a worker ending the job keeps those, which serve as checkpoint models. True if
        there was any."""
        directory = self.work_dir(job_id)
        existed = directory.exists()
        shutil.rmtree(directory, ignore_errors=True)
        erased = checkpoints and self.blobs.erase(f"checkpoints/{job_id}")
        return self.blobs.erase(self.sealed_run(job_id)) or erased or existed

    # jobs
    def create_job(self, project: str, body: dict[str, Any], actor: str = "cli") -> dict[str, Any]:
        values = job_spec.parse_request(body, self.base_models)
        for param in ("training_file", "validation_file"):
            if values[param] is not None and self.file(project, values[param], param)["purpose"] not in PURPOSES:
                raise ApiError(
                    400,
                    f"File {values[param]} is a job's result, not training data; fix: upload the "
                    f"data with purpose 'fine-tune'",
                    param,
                    f"invalid_{param}",
                )
        job_id = new_id("ftjob")
        files = [values["training_file"]] + ([values["validation_file"]] if values["validation_file"] else [])
        with self.audited(
            project, actor, "job.create", [job_id, *files], model=values["model"], method=values["method"]
        ):
            job = self.store.add_job(project, id=job_id, **values, processes=self.settings.processes)
        self.store.add_event(job["id"], f"Created fine-tuning job: {job['id']}", key="created")  # OpenAI's first event
        return job

    def validate_job(self, job: dict[str, Any]) -> None:
        """validating_files -> queued (with "auto" resolved), or failed with OpenAI's file error codes."""
        from tunesmith.serve.jobs import METHODS

        try:
            counts = {}
            for param in ("training_file", "validation_file"):
                if job[param] is None:
                    continue
                row = self.store.file(job["project_id"], job[param])
                if row is None:
                    raise ApiError(400, f"file {job[param]} was deleted", param, f"invalid_{param}")
                loaded = self.check_file(row["id"], row["filename"], METHODS[job["method"]], param)
                counts[param] = len(loaded.examples)
                if job["grader"] is not None:
                    job_spec.check_grader_fields(job["grader"], loaded.examples, row["filename"], param)
            if job["method"] == "reinforcement":
                job_spec.check_reinforcement(job, counts.get("validation_file", 0), self.base_models[job["model"]])
        except ApiError as error:
            self.store.update_job(
                job["id"],
                ("validating_files",),
                status="failed",
                finished_at=_now(),
                error={"code": error.code, "message": error.message, "param": error.param},
            )
            self.store.add_event(job["id"], f"Validation failed: {error.message}", level="error")
            return
        resolved = job_spec.resolve(
            job["hyperparameters"], counts["training_file"], job["method"], counts.get("validation_file", 0)
        )
        if self.store.update_job(job["id"], ("validating_files",), status="queued", resolved=resolved):
            self.store.add_event(
                job["id"],
                f"Validated {counts['training_file']} training examples; job queued",
                data={"resolved": resolved},
            )

    def job(self, project: str, job_id: str) -> dict[str, Any]:
        row = self.store.job(project, job_id)
        if row is None:
            raise not_found("fine-tuning job", job_id)
        return row

    # models
    @staticmethod
    def adapter_blob(job_id: str, name: str, step: int | None = None) -> str:
        """The blob of adapter file `name`: the fine-tuned model's, or (with `step`) that checkpoint's."""
        return f"models/{job_id}/{name}" if step is None else f"checkpoints/{job_id}/step-{step}/{name}"

    def adapter_files(self, job_id: str, step: int | None = None) -> dict[str, bytes]:
        """A fine-tuned model's adapter (a checkpoint's, with `step`), decrypted in memory; a 404 when its files
        are gone (the model was deleted, or the data it was trained on)."""
        names = ("adapter_config.json", "adapter_model.safetensors")
        if not all(self.blobs.exists(self.adapter_blob(job_id, name, step)) for name in names):
            model = "the fine-tuned model" if step is None else f"checkpoint step {step}"
            raise ApiError(
                404,
                f"The adapter of {model} of job {job_id} is not stored (it goes when the model or its "
                f"training file is deleted).",
                "model",
                "model_not_found",
            )
        return {name: self.blobs.read_bytes(self.adapter_blob(job_id, name, step)) for name in names}

    @staticmethod
    def run_model(spec: str) -> dict[str, Any] | None:
        """What serving the run directory `spec` takes (None: `spec` is no run directory): `base`, the model spec
        the pool loads (the run's base model, or its full model/); `adapter`, its adapter/ as the pool's key and
        `files` (a loader of its bytes), or None; `system_prompt`, which chat applies as `tunesmith chat` does;
        `classifier`, the run's directory when it trained a classifier (method classify), which answers
        /v1/classifications and not chat (then `base` is None). A run that cannot be served (unfinished, a reward
        model, a classifier whose outputs have no names, a non-LoRA adapter) is a UserError."""
        from tunesmith.engine.classifier import read_labels
        from tunesmith.rundir import ADAPTER_DIR, CONFIG_FILE, MODEL_DIR, is_run_dir, read_run_config

        path = Path(spec).expanduser()
        if not (path / CONFIG_FILE).is_file():
            return None
        if not is_run_dir(path):
            raise UserError(
                f"{path} is a run directory without adapter/ or model/: the run has not finished; "
                f"fix: resume it with `tunesmith train {path / CONFIG_FILE}`"
            )
        config = read_run_config(path)
        if config.method == "reward":
            raise UserError(
                f"{path} is a reward model: it rates replies and does not write them; fix: serve a "
                f"run that trained a generating model"
            )
        system_prompt = config.data.system_prompt
        if config.method == "classify":
            read_labels(path / (ADAPTER_DIR if (path / ADAPTER_DIR).is_dir() else MODEL_DIR))  # refused now if unnamed
            return {
                "base": None,
                "adapter": None,
                "files": None,
                "system_prompt": system_prompt,
                "classifier": str(path.resolve()),
            }
        if not (path / "adapter").is_dir():
            return {
                "base": str((path / "model").resolve()),
                "adapter": None,
                "files": None,
                "system_prompt": system_prompt,
                "classifier": None,
            }
        adapter = path.resolve() / "adapter"
        names = ("adapter_config.json", "adapter_model.safetensors")
        settings = (
            json.loads((adapter / names[0]).read_text(encoding="utf-8")) if (adapter / names[0]).is_file() else {}
        )
        if settings.get("peft_type") != "LORA" or not (adapter / names[1]).is_file():
            raise UserError(
                f"{adapter} holds a {settings.get('peft_type') or 'unreadable'} adapter; the service serves "
                f"LoRA adapters (adapter_config.json + adapter_model.safetensors); fix: serve a LoRA run, "
                f"or export this one merged (`tunesmith export`) and serve that model directory"
            )
        return {
            "base": config.model,
            "adapter": f"run:{adapter}",
            "system_prompt": system_prompt,
            "files": lambda: {name: (adapter / name).read_bytes() for name in names},
            "classifier": None,
        }

    def delete_model(self, project: str, model_id: str, actor: str = "cli") -> dict[str, Any]:
        row = self.store.model(project, model_id)
        if row is None:
            raise not_found("model", model_id, "model")
        with self.audited(project, actor, "model.delete", [model_id]):
            self.store.delete_model(project, model_id)
            self.blobs.erase(f"models/{row['job_id']}")
            self.blobs.erase(f"checkpoints/{row['job_id']}")
        return {"id": model_id, "object": "model", "deleted": True}


def _now() -> int:
    import time

    return int(time.time())
