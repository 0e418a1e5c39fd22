"""Shared fixtures. Keep them generic; add yours below.

Real peers come from ``peers.py``. A missing peer program is a test *failure* with a
clear message, never a skip: a suite that silently skips its integration tests
proves nothing. When a test fails, the log of every peer it started (Orthanc's
stdout/stderr) is attached to the failure report.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# no test trains the demo model (minutes): one that asks for `path: demo` fails at once, saying so
os.environ["CMR_AI_NO_DEMO_TRAINING"] = "1"
# Test traffic is for 127.0.0.1 only: never let a proxy from the environment carry it.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = ",".join(
    x for x in ("127.0.0.1", "localhost", os.environ.get("NO_PROXY", ""), os.environ.get("no_proxy", "")) if x)


# ---------------------------------------------------------------------------
# peer logs on failure

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for peer in getattr(item, "_cmr_peers", ()):
            rep.sections.append((f"log of {peer!r}", peer.log_tail()))


def _track(request, peer) -> None:
    node = request.node
    if not hasattr(node, "_cmr_peers"):
        node._cmr_peers = []
    node._cmr_peers.append(peer)


# ---------------------------------------------------------------------------
# Orthanc

@pytest.fixture()
def make_orthanc(tmp_path, request):
    """Start real Orthancs: ``make_orthanc(config={...}, modalities={...}, aet="ORTHANC")``.

    Each gets its own directory and free DICOM/HTTP ports (~0.1 s to start) and is
    killed at teardown (its directory is thrown away, so no graceful 3 s stop).
    Fails, never skips, when Orthanc is not installed.
    """
    from peers import Orthanc, PeerMissing

    started = []

    def make(**kwargs) -> Orthanc:
        try:
            o = Orthanc(tmp_path / f"orthanc{len(started) or ''}", **kwargs)
        except PeerMissing as e:
            missing = str(e)
        else:
            missing = None
        if missing:
            pytest.fail(missing, pytrace=False)
        started.append(o)
        _track(request, o)
        return o

    try:
        yield make
    finally:
        for o in started:
            o.stop(graceful=False)


@pytest.fixture()
def orthanc(make_orthanc):
    """A real Orthanc (PACS) with DICOMweb on free ports: ``.aet``, ``.port``, ``.dicomweb_url``,
    ``.instances()``, ``.find_instance(uid)`` …; fails (never skips) when not installed."""
    return make_orthanc()


# ---------------------------------------------------------------------------
# PostgreSQL

PG_ADMIN = os.environ.get("CMR_AI_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture()
def pg_url():
    """A throw-away database on the local PostgreSQL (``CMR_AI_TEST_PG``, default
    127.0.0.1:5432, user postgres), dropped at teardown with every connection to it.
    Never skipped (CI has the server): a server that is down fails the test, saying so."""
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from plugin import db

    name = f"cmr_ai_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError as e:
        admin.dispose()
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN} (set CMR_AI_TEST_PG): {e}", pytrace=False)
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    yield url
    db.dispose_all()
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


# ---------------------------------------------------------------------------
# models

@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The tiny demo LLaVA, built once per test session (no download)."""
    from worker.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")
