"""The service's state: projects, API keys, files, jobs, their events and checkpoints, fine-tuned models.

SQLAlchemy Core over a SQLite file by default (`$TUNESMITH_HOME/service.db`, zero setup) or PostgreSQL by URL
(`postgresql+psycopg://...`). Every row that a user can see belongs to a project; every query that reads one
takes the project, so another project's objects are simply not there (the API answers 404).

Jobs are leased: a worker takes a queued job (or one whose lease ran out: its worker died) with a
compare-and-set update, so two workers never run one job, on SQLite and PostgreSQL alike. Each lease is an
epoch (the job's `attempts` when it was taken), and what a worker writes for its job (renewals, events,
checkpoints, the conclusion) is fenced: one conditional statement that takes effect only while the job row
still carries that owner and that epoch. A worker that stalled past its lease finds its writes refused.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterator

import sqlalchemy as sa

from tunesmith.paths import home
from tunesmith.serve.tables import (
    JSON_COLUMNS,
    add_new_columns,
    api_keys,
    audit_head,
    checkpoints,
    files,
    job_events,
    jobs,
    metadata,
    models,
    projects,
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def default_url() -> str:
    return f"sqlite:///{home() / 'service.db'}"


def _row(row: Any) -> dict[str, Any] | None:
    if row is None:
        return None
    data = dict(row._mapping)
    for key in JSON_COLUMNS & data.keys():
        data[key] = json.loads(data[key]) if data[key] is not None else None
    return data


def _encode(values: dict[str, Any]) -> dict[str, Any]:
    return {
        key: json.dumps(value) if key in JSON_COLUMNS and value is not None else value for key, value in values.items()
    }


class UnknownCursor(LookupError):
    """A list's `after` names no object of that list (another job's event, another project's file, a typo)."""

    def __init__(self, after: str, kind: str):
        super().__init__(f"after={after!r}: no such {kind} in this list")
        self.after, self.kind = after, kind


@dataclass
class Lease:
    job: dict[str, Any]  # the job's row as leased
    owner: str

    @property
    def epoch(self) -> int:
        """The job's `attempts` when this lease was taken: every lease adds one, so no two leases share it."""
        return self.job["attempts"]


class LeaseLost(Exception):
    """A fenced write found the job no longer held by its lease (taken by another worker, or no longer running)."""

    def __init__(self, lease: Lease):
        super().__init__(f"job {lease.job['id']}: lease {lease.epoch} of {lease.owner} is no longer held")


def held(lease: Lease) -> Any:
    """The condition of every fenced write: the job is running under this owner and epoch."""
    return sa.and_(
        jobs.c.id == lease.job["id"],
        jobs.c.lease_owner == lease.owner,
        jobs.c.attempts == lease.epoch,
        jobs.c.status == "running",
    )


def older_than(table: sa.Table, last: dict[str, Any]) -> Any:
    """The rows after `last` in newest-first order: created before it, or in the same second with a lower id."""
    return sa.or_(
        table.c.created_at < last["created_at"],
        sa.and_(table.c.created_at == last["created_at"], table.c.id < last["id"]),
    )


class Store:
    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        if self.url.startswith("sqlite:///"):
            from pathlib import Path

            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # Several processes (API, workers) share the file: wait for each other's writes.
            self.engine = sa.create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True)
        metadata.create_all(self.engine)
        add_new_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _one(self, query) -> dict[str, Any] | None:
        with self.engine.connect() as connection:
            return _row(connection.execute(query).first())

    def _all(self, query) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            return [_row(row) for row in connection.execute(query)]

    @staticmethod
    def _cursor(after: str, kind: str, row: dict[str, Any] | None) -> dict[str, Any]:
        if row is None:
            raise UnknownCursor(after, kind)
        return row

    def _write(self, statement) -> int:
        with self.engine.begin() as connection:
            return connection.execute(statement).rowcount

    # projects and keys
    def ensure_project(self, project: str) -> None:
        if self._one(sa.select(projects).where(projects.c.id == project)) is None:
            try:
                self._write(projects.insert().values(id=project, created_at=now()))
            except sa.exc.IntegrityError:  # created by another process meanwhile
                pass

    def add_key(self, key_id: str, project: str, scope: str, key_hash: str, name: str = "") -> None:
        self.ensure_project(project)
        self._write(
            api_keys.insert().values(
                id=key_id, project_id=project, scope=scope, hash=key_hash, name=name, created_at=now()
            )
        )

    def key(self, key_id: str) -> dict[str, Any] | None:
        return self._one(sa.select(api_keys).where(api_keys.c.id == key_id))

    def keys(self, project: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        return self._all(query if project is None else query.where(api_keys.c.project_id == project))

    def revoke_key(self, key_id: str) -> bool:
        return (
            self._write(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now())
            )
            == 1
        )

    # files
    def add_file(self, project: str, **values: Any) -> dict[str, Any]:
        values = {"id": new_id("file"), "project_id": project, "created_at": now(), **values}
        self._write(files.insert().values(**values))
        return self.file(project, values["id"])

    def file(self, project: str, file_id: str) -> dict[str, Any] | None:
        return self._one(sa.select(files).where(files.c.id == file_id, files.c.project_id == project))

    def files(
        self, project: str, purpose: str | None = None, after: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; `after` is the id of the last file of the previous page (UnknownCursor if none is)."""
        query = (
            sa.select(files)
            .where(files.c.project_id == project)
            .order_by(files.c.created_at.desc(), files.c.id.desc())
            .limit(limit)
        )
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        if after is not None:
            query = query.where(older_than(files, self._cursor(after, "file", self.file(project, after))))
        return self._all(query)

    def delete_file(self, project: str, file_id: str) -> bool:
        return self._write(files.delete().where(files.c.id == file_id, files.c.project_id == project)) == 1

    def jobs_using_file(self, project: str, file_id: str) -> list[dict[str, Any]]:
        return self._all(
            sa.select(jobs)
            .where(
                jobs.c.project_id == project, sa.or_(jobs.c.training_file == file_id, jobs.c.validation_file == file_id)
            )
            .order_by(jobs.c.created_at)
        )

    # jobs
    def add_job(self, project: str, **values: Any) -> dict[str, Any]:
        values = _encode(
            {"id": new_id("ftjob"), "project_id": project, "created_at": now(), "status": "validating_files", **values}
        )
        self._write(jobs.insert().values(**values))
        return self.job(project, values["id"])

    def job(self, project: str | None, job_id: str) -> dict[str, Any] | None:
        query = sa.select(jobs).where(jobs.c.id == job_id)
        return self._one(query if project is None else query.where(jobs.c.project_id == project))

    def jobs(self, project: str | None, after: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first; `after` is the id of the last job of the previous page."""
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if project is not None:
            query = query.where(jobs.c.project_id == project)
        if after is not None:
            query = query.where(older_than(jobs, self._cursor(after, "fine-tuning job", self.job(project, after))))
        return self._all(query)

    def update_job(self, job_id: str, only_if_status: tuple[str, ...] | None = None, **values: Any) -> bool:
        statement = jobs.update().where(jobs.c.id == job_id)
        if only_if_status is not None:
            statement = statement.where(jobs.c.status.in_(only_if_status))
        return self._write(statement.values(**_encode(values))) == 1

    def request_cancel(self, project: str, job_id: str) -> dict[str, Any] | None:
        """Queued and paused jobs are cancelled at once; running ones are flagged and their worker stops them."""
        self._write(
            jobs.update()
            .where(
                jobs.c.id == job_id,
                jobs.c.project_id == project,
                jobs.c.status.in_(("validating_files", "queued", "paused")),
            )
            .values(status="cancelled", cancel_requested=True, finished_at=now())
        )
        self._write(
            jobs.update()
            .where(jobs.c.id == job_id, jobs.c.project_id == project, jobs.c.status == "running")
            .values(cancel_requested=True)
        )
        return self.job(project, job_id)

    def request_pause(self, project: str, job_id: str) -> dict[str, Any] | None:
        """A queued job is paused at once; a running one is flagged, and its worker checkpoints it and pauses it."""
        self._write(
            jobs.update()
            .where(jobs.c.id == job_id, jobs.c.project_id == project, jobs.c.status == "queued")
            .values(status="paused")
        )
        self._write(
            jobs.update()
            .where(jobs.c.id == job_id, jobs.c.project_id == project, jobs.c.status == "running")
            .values(pause_requested=True)
        )
        return self.job(project, job_id)

    def resume(self, project: str, job_id: str) -> bool:
        """A paused job is queued again (a worker takes it up from its sealed checkpoint); False if it was not
        paused."""
        return (
            self._write(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.project_id == project, jobs.c.status == "paused")
                .values(status="queued", pause_requested=None)
            )
            == 1
        )

    def pause(self, lease: Lease) -> bool:
        """The worker's side of a pause: `running` -> `paused`, only while `lease` holds the job."""
        return (
            self._write(
                jobs.update()
                .where(held(lease))
                .values(status="paused", pause_requested=None, lease_owner=None, lease_expires=0.0)
            )
            == 1
        )

    def lease(self, owner: str, seconds: float) -> Lease | None:
        """Take the oldest queued job, or a running one whose worker stopped renewing its lease."""
        moment = time.time()
        candidates = self._all(
            sa.select(jobs.c.id, jobs.c.status, jobs.c.lease_expires)
            .where(
                sa.or_(jobs.c.status == "queued", sa.and_(jobs.c.status == "running", jobs.c.lease_expires < moment))
            )
            .order_by(jobs.c.created_at, jobs.c.id)
            .limit(8)
        )
        for candidate in candidates:
            taken = self._write(
                jobs.update()
                .where(
                    jobs.c.id == candidate["id"],
                    jobs.c.status == candidate["status"],
                    jobs.c.lease_expires == candidate["lease_expires"],
                )
                .values(
                    status="running", lease_owner=owner, lease_expires=moment + seconds, attempts=jobs.c.attempts + 1
                )
            )
            if taken:
                return Lease(self.job(None, candidate["id"]), owner)
        return None

    def renew(self, lease: Lease, seconds: float) -> dict[str, Any] | None:
        """Extend the lease; None when it was lost (another worker took the job) or the job left `running`."""
        kept = self._write(jobs.update().where(held(lease)).values(lease_expires=time.time() + seconds))
        return self.job(None, lease.job["id"]) if kept else None

    def holds(self, lease: Lease) -> dict[str, Any] | None:
        """The job's row while `lease` still holds it, else None."""
        return self._one(sa.select(jobs).where(held(lease)))

    def finish(self, lease: Lease, status: str, model: dict[str, Any] | None = None, **values: Any) -> bool:
        """Leave `running` for a final status, only while `lease` holds the job. With `model` (the fine-tuned
        model's row: id, base), the job succeeds only if no cancel was requested, and the model is registered in
        the same transaction: a job that ends cancelled never leaves a model behind. False when nothing changed
        (`holds` then tells a lost lease from a cancel)."""
        statement = jobs.update().where(held(lease))
        if model is not None:
            statement = statement.where(sa.not_(jobs.c.cancel_requested))
        with self.engine.begin() as connection:
            if (
                connection.execute(
                    statement.values(status=status, finished_at=now(), lease_expires=0.0, **_encode(values))
                ).rowcount
                != 1
            ):
                return False
            if model is not None:
                connection.execute(
                    models.insert().values(
                        project_id=lease.job["project_id"], job_id=lease.job["id"], created_at=now(), **model
                    )
                )
        return True

    # events and checkpoints
    def add_event(
        self,
        job_id: str,
        message: str,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
        key: str | None = None,
        lease: Lease | None = None,
    ) -> bool:
        """Append an event; one with a `key` already stored for this job is not stored twice (a resumed
        job's worker re-reads its run's metrics). False when nothing was stored. With `lease` (a worker's
        event) it is stored only while the lease holds, else LeaseLost."""
        for _ in range(5):  # two writers may pick the same next seq: the unique constraint sends one round again
            try:
                with self.engine.begin() as connection:
                    if (
                        key is not None
                        and connection.execute(
                            sa.select(job_events.c.id).where(job_events.c.job_id == job_id, job_events.c.key == key)
                        ).first()
                        is not None
                    ):
                        return False
                    last = connection.execute(
                        sa.select(sa.func.max(job_events.c.seq)).where(job_events.c.job_id == job_id)
                    ).scalar()
                    row = _encode(
                        dict(
                            id=new_id("ftevent"),
                            job_id=job_id,
                            seq=(last or 0) + 1,
                            created_at=now(),
                            level=level,
                            type=type,
                            message=message,
                            data=data,
                            key=key,
                        )
                    )
                    if connection.execute(_insert(job_events, row, lease)).rowcount != 1:
                        raise LeaseLost(lease)
                return True
            except sa.exc.IntegrityError:
                continue
        return False

    def events(
        self, job_id: str, after: str | None = None, limit: int = 20, newest_first: bool = True
    ) -> list[dict[str, Any]]:
        order = job_events.c.seq.desc() if newest_first else job_events.c.seq
        query = sa.select(job_events).where(job_events.c.job_id == job_id).order_by(order).limit(limit)
        if after is not None:
            last = self._cursor(
                after,
                "event",
                self._one(sa.select(job_events).where(job_events.c.id == after, job_events.c.job_id == job_id)),
            )
            query = query.where(job_events.c.seq < last["seq"] if newest_first else job_events.c.seq > last["seq"])
        return self._all(query)

    def add_checkpoint(self, job_id: str, step: int, metrics: dict[str, Any], lease: Lease | None = None) -> None:
        """Record a checkpoint once (a resumed job re-reads its run); with `lease`, only while it holds (else
        LeaseLost)."""
        row = _encode(dict(id=new_id("ftckpt"), job_id=job_id, step=step, metrics=metrics, created_at=now()))
        try:
            with self.engine.begin() as connection:
                if connection.execute(_insert(checkpoints, row, lease)).rowcount != 1:
                    raise LeaseLost(lease)
        except sa.exc.IntegrityError:  # already recorded
            pass

    def checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> list[dict[str, Any]]:
        query = (
            sa.select(checkpoints)
            .where(checkpoints.c.job_id == job_id)
            .order_by(checkpoints.c.step.desc())
            .limit(limit)
        )
        if after is not None:
            last = self._cursor(
                after,
                "checkpoint",
                self._one(sa.select(checkpoints).where(checkpoints.c.id == after, checkpoints.c.job_id == job_id)),
            )
            query = query.where(checkpoints.c.step < last["step"])
        return self._all(query)

    # fine-tuned models
    def add_model(self, project: str, model_id: str, job_id: str, base: str) -> None:
        self._write(models.insert().values(id=model_id, project_id=project, job_id=job_id, base=base, created_at=now()))

    def model(self, project: str, model_id: str) -> dict[str, Any] | None:
        return self._one(sa.select(models).where(models.c.id == model_id, models.c.project_id == project))

    def models(self, project: str) -> list[dict[str, Any]]:
        return self._all(
            sa.select(models).where(models.c.project_id == project).order_by(models.c.created_at, models.c.id)
        )

    def delete_model(self, project: str, model_id: str) -> bool:
        return self._write(models.delete().where(models.c.id == model_id, models.c.project_id == project)) == 1

    def models_of_jobs(self, job_ids: list[str]) -> list[dict[str, Any]]:
        return self._all(sa.select(models).where(models.c.job_id.in_(job_ids))) if job_ids else []

    # the audit log's head
    def audit_head(self) -> dict[str, Any] | None:
        """{"sequence", "hash"} of the newest audit record appended, or None before the first."""
        return self._one(sa.select(audit_head.c.sequence, audit_head.c.hash).where(audit_head.c.id == 1))

    def set_audit_head(self, sequence: int, record_hash: str) -> None:
        """Move the head forward to `sequence`; a head already at or past it stays (never moves back)."""
        values = dict(sequence=sequence, hash=record_hash, updated_at=now())
        for _ in range(2):  # the first head: two writers may both insert; the loser updates instead
            if (
                self._write(
                    audit_head.update().where(audit_head.c.id == 1, audit_head.c.sequence < sequence).values(**values)
                )
                or self.audit_head() is not None
            ):
                return
            try:
                self._write(audit_head.insert().values(id=1, **values))
                return
            except sa.exc.IntegrityError:
                continue

    def iter_all(self, table: sa.Table) -> Iterator[dict[str, Any]]:
        yield from self._all(sa.select(table))


def _insert(table: sa.Table, row: dict[str, Any], lease: Lease | None) -> Any:
    """INSERT of `row`; with a lease, INSERT ... SELECT from the job's row under the fence: one statement that
    inserts nothing once the lease is lost, on SQLite and PostgreSQL alike."""
    if lease is None:
        return table.insert().values(**row).execution_options(preserve_rowcount=True)
    columns = list(row)
    values = [sa.literal(row[name], table.c[name].type) for name in columns]
    return (
        table.insert()
        .from_select(columns, sa.select(*values).select_from(jobs).where(held(lease)))
        .execution_options(preserve_rowcount=True)
    )  # an INSERT's rowcount is kept only when asked for


def _sqlite_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
