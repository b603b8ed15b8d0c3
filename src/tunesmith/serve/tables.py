"""The service's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL; serve/store.py reads and writes them.
A column added since a database was made is added to it at start-up (`add_new_columns`).

JSON columns are text (`TEXT_JSON`), encoded and decoded by the store, so both databases hold the same bytes.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()


class TEXT_JSON(sa.Text):  # noqa: N801 (a column type, spelled as the others are used here)
    """JSON as text: the same on SQLite and PostgreSQL. The store encodes and decodes these columns."""


projects = sa.Table(
    "projects",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the key's public id (its prefix), shown by `keys list`
    sa.Column("project_id", sa.String(64), sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("hash", sa.String(128), nullable=False),
    sa.Column("name", sa.String(200), nullable=False, default=""),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("revoked_at", sa.BigInteger),
)
files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("project_id", sa.String(64), sa.ForeignKey("projects.id"), nullable=False, index=True),
    sa.Column("filename", sa.String(255), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("format", sa.String(32)),
    sa.Column("examples", sa.Integer),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("project_id", sa.String(64), sa.ForeignKey("projects.id"), nullable=False, index=True),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("training_file", sa.String(64), nullable=False),
    sa.Column("validation_file", sa.String(64)),
    sa.Column("method", sa.String(32), nullable=False),  # supervised | dpo | reinforcement
    sa.Column("hyperparameters", TEXT_JSON, nullable=False),  # as the user gave them ("auto" kept)
    sa.Column("grader", TEXT_JSON),  # reinforcement: the grader whose score is the reward
    sa.Column("resolved", TEXT_JSON),  # the numbers "auto" became
    sa.Column("suffix", sa.String(64)),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("metadata", TEXT_JSON),
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("error", TEXT_JSON),
    sa.Column("fine_tuned_model", sa.String(255)),
    sa.Column("trained_tokens", sa.BigInteger),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("finished_at", sa.BigInteger),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("pause_requested", sa.Boolean),  # a running job's worker checkpoints it and leaves it `paused`
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_expires", sa.Float, nullable=False, default=0.0),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("processes", sa.Integer, nullable=False, default=1),  # torch.distributed processes for the run
    sa.Column("result_files", TEXT_JSON),  # file ids the job made: its evaluation report
)
job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),  # message | metrics
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", TEXT_JSON),
    sa.Column("key", sa.String(64)),  # what the event reports (e.g. "train-12"): stored once, however often seen
    sa.UniqueConstraint("job_id", "seq"),
    sa.UniqueConstraint("job_id", "key"),
)
checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("metrics", TEXT_JSON, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("job_id", "step"),
)
models = sa.Table(
    "models",
    metadata,
    sa.Column("id", sa.String(255), primary_key=True),  # ft:BASE:SUFFIX:JOBID
    sa.Column("project_id", sa.String(64), sa.ForeignKey("projects.id"), nullable=False, index=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("base", sa.String(255), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)
audit_head = sa.Table(  # one row (id 1): the audit log's newest record, so `audit verify` sees a cut or re-sealed log
    "audit_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)


def add_new_columns(engine: sa.Engine) -> None:
    """Add the columns a table gained since the database was made (each is nullable: old rows read None), so a
    service's database keeps working across an upgrade. Tables it lacks entirely, create_all made already."""
    inspector = sa.inspect(engine)
    with engine.begin() as connection:
        for table in metadata.sorted_tables:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                assert column.nullable, f"{table.name}.{column.name}: a column added later must be nullable"
                kind = column.type.compile(dialect=engine.dialect)
                connection.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))


FINISHED = ("succeeded", "failed", "cancelled")
JSON_COLUMNS = {
    column.name for table in metadata.tables.values() for column in table.columns if isinstance(column.type, TEXT_JSON)
}
