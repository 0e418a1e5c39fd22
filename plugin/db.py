"""State: studies, series, instances, jobs, the export outbox and the inference audit (SQLAlchemy 2.x).

The database is the source of truth; the broker is transport. The schema is
versioned with Alembic (``plugin/migrations``): every process brings it to head
when it first opens the database (:func:`migrate`, under a lock). One engine per
process (``get_engine``), disposed after fork; one session per unit of work
(``session_scope``). SQLite runs in WAL mode with a busy timeout so the node and
the embedded worker can share it.
"""
from __future__ import annotations

import enum
import json
import os
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from sqlalchemy import (BigInteger, Boolean, DateTime, Enum, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker, validates


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class StudyState(str, enum.Enum):
    RECEIVING = "receiving"  # instances arriving; not yet quiet for stable_after
    COMPLETE = "complete"  # quiet; routed to a job
    IGNORED = "ignored"  # a rule (or no rule) said ignore


class JobState(str, enum.Enum):
    QUEUED = "queued"
    PREPARING = "preparing"
    INFERRING = "inferring"
    REPORTING = "reporting"
    EXPORTING = "exporting"  # results written, outbox not yet empty
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED)


class ExportState(str, enum.Enum):
    """Where an outbox row stands (the life of a row: ``plugin.outbox``).

    pending ──send──► sent ─(verify: confirmed)─► sent, ``confirmed_at`` set
       ▲  │              │ (verify: not confirmed in time / commitment failed)
       │  │              └──► pending again (re-sent, back-off), or dead
       │  ├─ retryable failure: pending, ``next_attempt_at`` backed off
       │  ├─ permanent failure, or ``max_attempts`` reached: dead
       │  ├─ the destination already has this content: sent, ``duplicate_of`` set
       │  └─ a newer row for the same object and destination was delivered: superseded
       └──── ``cmr-ai exports retry`` (dead, sent, superseded → pending)
    """

    PENDING = "pending"
    SENT = "sent"  # delivered (or already there: ``duplicate_of``); may still await confirmation
    DEAD = "dead"  # gave up after max attempts or a permanent failure; re-sendable
    SUPERSEDED = "superseded"  # never sent: a newer row for the same object and destination replaced it


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    study_description: Mapped[str] = mapped_column(String(256), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    source_ip: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[StudyState] = mapped_column(Enum(StudyState, native_enum=False, length=16),
                                              default=StudyState.RECEIVING, index=True)
    rule: Mapped[Optional[str]] = mapped_column(String(128), nullable=True)
    decision: Mapped[Optional[str]] = mapped_column(Text, nullable=True)  # why: routing trace (JSON)
    rules_version: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)  # config version that decided
    first_received: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_received: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    series: Mapped[list["Series"]] = relationship(back_populates="study", cascade="all, delete-orphan")
    jobs: Mapped[list["Job"]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(256), default="")
    series_number: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    series: Mapped[Series] = relationship(back_populates="instances")


class JobKind(str, enum.Enum):
    ANALYSE = "analyse"  # prepare → infer → report → outbox
    FORWARD = "forward"  # the study's original instances, straight to the outbox (no Celery chain)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[Optional[JobKind]] = mapped_column(Enum(JobKind, native_enum=False, length=16),
                                                    default=JobKind.ANALYSE, nullable=True)
    rules_version: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)  # config version that routed it
    rule: Mapped[str] = mapped_column(String(128))
    template: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(128))
    priority: Mapped[int] = mapped_column(Integer, default=5)
    destinations: Mapped[str] = mapped_column(Text, default="")  # comma-separated destination names
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16),
                                            default=JobState.QUEUED, index=True)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    celery_id: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    model_fingerprint: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    result_json: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)  # the study was complete
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    # when each stage of the latest run began (set by assigning ``state``: see _stamp_stage);
    # the per-stage latencies of /metrics are differences of these
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)  # PREPARING
    prepared_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)  # INFERRING
    inferred_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)  # REPORTING
    reported_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)  # EXPORTING
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)  # DONE or FAILED
    study: Mapped[Study] = relationship(back_populates="jobs")
    exports: Mapped[list["Export"]] = relationship(back_populates="job")

    #: the column stamped when a job enters a state (QUEUED clears them all: a new run)
    STAGE_STAMPS = {JobState.PREPARING: "started_at", JobState.INFERRING: "prepared_at",
                    JobState.REPORTING: "inferred_at", JobState.EXPORTING: "reported_at",
                    JobState.DONE: "finished_at", JobState.FAILED: "finished_at"}

    @validates("state")
    def _stamp_stage(self, _key: str, value: JobState) -> JobState:
        if value == JobState.QUEUED:
            for col in set(self.STAGE_STAMPS.values()):
                setattr(self, col, None)
        elif value in self.STAGE_STAMPS and value != self.state:
            if value == JobState.EXPORTING and self.state in (JobState.DONE, JobState.FAILED) and self.reported_at:
                return value  # exports queued again (a re-send): the report was written when it was
            setattr(self, self.STAGE_STAMPS[value], utcnow())
        return value

    @property
    def destination_list(self) -> list[str]:
        return [d for d in self.destinations.split(",") if d]


class Export(Base):
    """One outbox row: one object to one destination."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("job_id", "destination", "sop_instance_uid"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    kind: Mapped[str] = mapped_column(String(16), default="")  # sr, text-sr, sc; "original" for a forward
    state: Mapped[ExportState] = mapped_column(Enum(ExportState, native_enum=False, length=16),
                                               default=ExportState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)  # pending: next try; sent and
    # awaiting confirmation: next check
    last_error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)  # why the last attempt failed
    sent_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)  # left the outbox (sent,
    # found already delivered, or superseded)
    created_at: Mapped[Optional[datetime]] = mapped_column(DateTime, default=utcnow, nullable=True)
    # The peer's answer to the last attempt: "0x0000", "0xB000" (DIMSE status), "HTTP 202 0xB000",
    # "HTTP 409 0x0110" (STOW-RS status and Warning/FailureReason), "HTTP 503", "no association", "duplicate".
    status: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)
    warning: Mapped[Optional[str]] = mapped_column(Text, nullable=True)  # delivered with this warning
    digest: Mapped[Optional[str]] = mapped_column(String(64), nullable=True)  # SHA-256 of the content,
    # volatile attributes left out (plugin.outbox.content_digest)
    duplicate_of: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)  # already delivered by that row
    force: Mapped[bool] = mapped_column(Boolean, default=False)  # send even if already delivered (retry)
    claim: Mapped[Optional[str]] = mapped_column(String(32), nullable=True, index=True)  # the flush sending it
    verify: Mapped[Optional[str]] = mapped_column(String(16), nullable=True)  # commitment | qido, once sent
    commit_uid: Mapped[Optional[str]] = mapped_column(String(64), nullable=True, index=True)  # Transaction UID
    confirm_by: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)  # re-sent if not confirmed
    confirmed_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)
    job: Mapped[Job] = relationship(back_populates="exports")

    @property
    def awaiting_confirmation(self) -> bool:
        """Sent to a destination with ``verify``, and not confirmed yet."""
        return self.state == ExportState.SENT and bool(self.verify) and self.confirmed_at is None


class PullState(str, enum.Enum):
    PULLING = "pulling"  # a pull is fetching it now (heartbeat refreshed as instances arrive)
    DONE = "done"  # every instance the archive listed is stored here
    FAILED = "failed"  # the last pull failed (part of the study may be here); tried again after next_attempt


class SourceStudy(Base):
    """A study seen in a DICOMweb source (``sources:``): the poller's memory, and the hold on routing.

    A study with a pull in progress (fresh ``heartbeat``) or failed part-way is not routed
    (:meth:`plugin.node.Node.check_studies`), so a half-pulled study is never analysed.
    """

    __tablename__ = "source_studies"
    __table_args__ = (UniqueConstraint("source", "study_instance_uid", name="uq_source_study"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[PullState] = mapped_column(Enum(PullState, native_enum=False, length=16), index=True)
    archive_instances: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)  # as the archive last said
    pulled: Mapped[int] = mapped_column(Integer, default=0)  # instances stored by pulls (all attempts)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # failed attempts in a row
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)  # the last failure, as the archive said it
    first_seen: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)  # last progress of a pull
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)
    next_attempt: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)


class Audit(Base):
    """What one inference saw and said, for audit and drift review (one row per job).

    The JSON columns come from ``InferenceResult.audit`` (built on the GPU worker by
    ``worker.model.engine.run_bundle``) and are written by the node's ``report`` task in
    the same transaction as the job's result: prompts, SHA-256 of each PNG shown to the
    model, per finding and option the log-likelihood and probability, the outputs and
    timings. ``cmr-ai audit export`` writes them out.
    """

    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), unique=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    model: Mapped[str] = mapped_column(String(128))
    model_fingerprint: Mapped[str] = mapped_column(String(64))  # the model version of the result
    device: Mapped[str] = mapped_column(String(32), default="")
    quantization: Mapped[str] = mapped_column(String(16), default="")
    template: Mapped[str] = mapped_column(String(128), default="")
    prompts: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    image_hashes: Mapped[str] = mapped_column(Text, default="{}")  # JSON: image key -> sha256 of the PNG
    option_scores: Mapped[str] = mapped_column(Text, default="{}")  # JSON: finding -> option -> scores
    outputs: Mapped[str] = mapped_column(Text, default="{}")  # JSON: answers, impression
    timings: Mapped[str] = mapped_column(Text, default="{}")  # JSON: seconds per finding, impression, total

    #: The JSON columns, in export order.
    JSON_COLUMNS = ("prompts", "image_hashes", "option_scores", "outputs", "timings")

    def as_dict(self) -> dict[str, Any]:
        """The row with its JSON columns decoded (``created_at`` as ISO 8601, UTC)."""
        out: dict[str, Any] = {
            "id": self.id, "job_id": self.job_id, "created_at": self.created_at.isoformat(),
            "model": self.model, "model_fingerprint": self.model_fingerprint, "device": self.device,
            "quantization": self.quantization, "template": self.template,
        }
        for col in self.JSON_COLUMNS:
            out[col] = json.loads(getattr(self, col) or "{}")
        return out


def record_audit(session: Session, job_id: int, *, model: str, model_fingerprint: str, device: str,
                 quantization: str, audit: dict[str, Any]) -> Audit:
    """Add (or, for a retried report, replace) the audit row of ``job_id`` in ``session``.

    ``audit`` is ``InferenceResult.audit``; missing parts are stored as ``{}``. The caller
    commits, so the row lands in the same transaction as the job's result.
    """
    row = session.query(Audit).filter_by(job_id=job_id).one_or_none()
    if row is None:
        row = Audit(job_id=job_id)
        session.add(row)
    row.created_at = utcnow()
    row.model, row.model_fingerprint = model, model_fingerprint
    row.device, row.quantization = device, quantization
    row.template = str(audit.get("template", ""))
    for col in Audit.JSON_COLUMNS:
        setattr(row, col, json.dumps(audit.get(col, {}), sort_keys=True))
    return row


# ---------------------------------------------------------------------------
# engine / sessions

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
_makers: dict[tuple[int, str], sessionmaker] = {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def get_engine(url: str) -> Engine:
    """One engine per process and URL (a forked child gets a fresh one)."""
    key = (os.getpid(), url)
    with _lock:
        eng = _engines.get(key)
        if eng is None:
            if url.startswith("sqlite:///"):
                dbfile = url[len("sqlite:///"):]
                if dbfile and dbfile != ":memory:":
                    Path(dbfile).parent.mkdir(parents=True, exist_ok=True)
                eng = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
                event.listen(eng, "connect", _sqlite_pragmas)
            else:
                eng = create_engine(url, pool_pre_ping=True)
            migrate(eng)
            _engines[key] = eng
            _makers[key] = sessionmaker(eng, expire_on_commit=False)
        return eng


# ---------------------------------------------------------------------------
# schema migrations (Alembic: plugin/migrations)

def _alembic_config(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "plugin:migrations")
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


def current_revision(connection) -> Optional[str]:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One migrating process at a time (the node, its worker and ``cmr-ai`` commands may start
    together): a PostgreSQL advisory lock, or a lock file beside a SQLite database."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_advisory_lock(7263021)")  # any constant, the same everywhere
            try:
                yield
            finally:
                conn.exec_driver_sql("SELECT pg_advisory_unlock(7263021)")
                conn.commit()
        return
    dbfile = engine.url.database
    if engine.dialect.name != "sqlite" or not dbfile or dbfile == ":memory:":
        yield
        return
    import fcntl

    with open(f"{dbfile}.migrate-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _adopt(conn) -> list[str]:
    """A database made before Alembic (``create_all``): add what the models have and it lacks
    (the caller then stamps it as the newest revision).

    Only additions are made: missing tables, missing indexes, missing columns (with the
    ORM's scalar default for existing rows, else NULL). Nothing is dropped or altered.
    """
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect, literal

    Base.metadata.create_all(conn)  # missing tables only
    done = []
    ctx = MigrationContext.configure(conn)
    for diff in compare_metadata(ctx, Base.metadata):
        if isinstance(diff, tuple) and diff[0] == "add_column":
            _, _schema, table, column = diff
            ddl = f"ALTER TABLE {table} ADD COLUMN {column.name} {column.type.compile(conn.dialect)}"
            default = column.default.arg if column.default is not None and column.default.is_scalar else None
            if default is not None:  # existing rows get the ORM's default; a callable one leaves them NULL
                ddl += " DEFAULT " + str(literal(default).compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            conn.exec_driver_sql(ddl)
            done.append(f"{table}.{column.name}")
        elif isinstance(diff, tuple) and diff[0] == "add_index":
            diff[1].create(conn)
            done.append(f"index {diff[1].name}")
    assert inspect(conn).has_table("jobs")
    return done


def migrate(engine: Engine) -> Optional[str]:
    """Bring the schema to the newest revision (``alembic upgrade head``); returns the
    revision it was at before (None for a new database)."""
    import logging

    from alembic import command
    from sqlalchemy import inspect

    log = logging.getLogger("cmr_ai.db")
    with _migration_lock(engine):
        with engine.connect() as conn:
            before = current_revision(conn)
            head = head_revision()
            if before == head:
                return before
            if before is None and inspect(conn).has_table("studies"):
                added = _adopt(conn)  # the schema now has every table and column the models have
                command.stamp(_alembic_config(conn), "head")
                conn.commit()
                log.info("database %s predates schema migrations: adopted as revision %s%s",
                         engine.url.render_as_string(hide_password=True), head,
                         f" (added {', '.join(added)})" if added else "")
                return None
            command.upgrade(_alembic_config(conn), "head")
            conn.commit()
            log.info("database %s: schema %s → %s", engine.url.render_as_string(hide_password=True),
                     before or "new", head)
            return before


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One session per unit of work: commit on success, roll back on error."""
    get_engine(url)
    maker = _makers[(os.getpid(), url)]
    s = maker()
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()


def dispose_all() -> None:
    """Forget engines (call in a child after fork)."""
    with _lock:
        _engines.clear()
        _makers.clear()
