"""State: studies, series, instances, jobs and the export outbox (SQLAlchemy 2.x).

The database is the source of truth; the broker is transport. One engine per
process (``get_engine``), disposed after fork; one session per unit of work
(``session_scope``). SQLite runs in WAL mode with a busy timeout so the node and
the embedded worker can share it.
"""
from __future__ import annotations

import enum
import os
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from sqlalchemy import (BigInteger, DateTime, Enum, ForeignKey, Integer, String, Text, UniqueConstraint,
                        create_engine, event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker


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
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"  # gave up after max attempts or a permanent failure; re-sendable


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
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    study: Mapped[Study] = relationship(back_populates="jobs")
    exports: Mapped[list["Export"]] = relationship(back_populates="job")

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
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    sent_at: Mapped[Optional[datetime]] = mapped_column(DateTime, nullable=True)
    job: Mapped[Job] = relationship(back_populates="exports")


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
            Base.metadata.create_all(eng)
            _engines[key] = eng
            _makers[key] = sessionmaker(eng, expire_on_commit=False)
        return eng


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
