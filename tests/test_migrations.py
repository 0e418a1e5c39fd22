"""Schema migrations (Alembic, plugin/migrations): a new database is created at head, a
database made before migrations existed is adopted without losing rows, the models and
the migrations agree, and several processes may start on one database at once — on
SQLite and on the PostgreSQL server of this machine (127.0.0.1:5432)."""
from __future__ import annotations

import multiprocessing

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from plugin import db

#: columns the exports table gained in issue 7 (an older database lacks them)
ISSUE7_COLUMNS = ("status", "warning", "digest", "duplicate_of", "force", "claim", "verify", "commit_uid",
                  "confirm_by", "confirmed_at")


def _drift(url: str) -> list:
    with create_engine(url).connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), db.Base.metadata)


def _fresh_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'cmr-ai.db'}"


def test_a_new_sqlite_database_is_created_at_head_and_matches_the_models(tmp_path):
    url = _fresh_url(tmp_path)
    eng = db.get_engine(url)
    with eng.connect() as conn:
        assert db.current_revision(conn) == db.head_revision()
    assert _drift(url) == []  # a model change without a migration fails here


def test_postgres_new_database_at_head_matches_the_models(pg_url):
    eng = db.get_engine(pg_url)
    with eng.connect() as conn:
        assert db.current_revision(conn) == db.head_revision()
    assert _drift(pg_url) == []
    with db.session_scope(pg_url) as s:  # and it works: a study row round trip
        s.add(db.Study(study_instance_uid="1.2.3", patient_id="", study_description="", accession_number="",
                       calling_ae="X", source_ip="", first_received=db.utcnow(), last_received=db.utcnow(),
                       state=db.StudyState.RECEIVING, n_instances=0))
    with db.session_scope(pg_url) as s:
        assert s.scalar(select(db.Study.study_instance_uid)) == "1.2.3"


def _old_schema(url: str) -> None:
    """The schema as issue 6 left it: ``create_all`` without Alembic, exports without the issue-7 columns."""
    eng = create_engine(url)
    db.Base.metadata.create_all(eng)
    with eng.begin() as c:
        for col in ISSUE7_COLUMNS:
            if col in ("claim", "commit_uid"):
                c.execute(text(f"DROP INDEX ix_exports_{col}"))
            c.execute(text(f"ALTER TABLE exports DROP COLUMN {col}"))
    with eng.begin() as c:
        c.execute(text("INSERT INTO studies (id, study_instance_uid, patient_id, study_description, accession_number,"
                       " calling_ae, source_ip, state, first_received, last_received, n_instances) VALUES (1, '1.2.3',"
                       " '', '', '', 'X', '', 'COMPLETE', '2026-01-01', '2026-01-01', 3)"))
        c.execute(text("INSERT INTO jobs (id, study_id, rule, template, model, priority, destinations, state,"
                       " attempts, created_at, updated_at) VALUES (7, 1, 'r', 't', 'demo', 5, 'pacs', 'DONE', 1,"
                       " '2026-01-01', '2026-01-01')"))
        c.execute(text("INSERT INTO exports (id, job_id, destination, sop_instance_uid, path, kind, state, attempts,"
                       " next_attempt_at) VALUES (1, 7, 'pacs', '1.2.3.4', '/x.dcm', 'sr', 'SENT', 1, '2026-01-01')"))
    eng.dispose()


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_a_database_made_before_migrations_is_adopted_without_losing_rows(tmp_path, request, engine):
    url = _fresh_url(tmp_path) if engine == "sqlite" else request.getfixturevalue("pg_url")
    _old_schema(url)
    assert not {c["name"] for c in inspect(create_engine(url)).get_columns("exports")} & set(ISSUE7_COLUMNS)
    db.get_engine(url)
    with db.get_engine(url).connect() as conn:
        assert db.current_revision(conn) == db.head_revision()
    assert [d for d in _drift(url) if d[0] in ("add_column", "add_table", "add_index")] == []
    with db.session_scope(url) as s:
        row = s.get(db.Export, 1)
        assert (row.sop_instance_uid, row.state, row.force, row.digest) == ("1.2.3.4", db.ExportState.SENT, False,
                                                                            None)
        assert s.get(db.Study, 1).n_instances == 3


def _start(url: str, q) -> None:
    try:
        db.get_engine(url)
        q.put("ok")
    except Exception as e:  # noqa: BLE001 — reported to the parent
        q.put(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_processes_starting_together_migrate_once(tmp_path, request, engine):
    """The node, its workers and CLI commands may start at the same moment on a new database."""
    url = _fresh_url(tmp_path) if engine == "sqlite" else request.getfixturevalue("pg_url")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_start, args=(url, q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert results == ["ok"] * 4
    with create_engine(url).connect() as conn:
        assert db.current_revision(conn) == db.head_revision()
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
