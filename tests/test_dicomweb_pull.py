"""Pulling studies from a DICOMweb archive (plugin/dicomweb/pull.py, `cmr-ai pull`): real Orthanc with
its DICOMweb plugin, and a fake archive (tests/fakearchive.py) that fails in controlled ways."""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from plugin import db
from plugin.config import Settings
from plugin.dicomweb.pull import Poller, PullError, pull_study
from plugin.ingest import Indexer
from plugin.phantom import write_study
from plugin.receive import Origin, accept_part10, read_file_meta
from plugin.storage import InstanceStore

STORESCU = "/usr/bin/storescu"
SMALL = dict(slices=2, phases=3, size=32)


# ---------------------------------------------------------------------------
# helpers

class Node:
    """Settings, store and indexer of a node under ``root`` with one source ``pacs``."""

    def __init__(self, root: Path, url: str, **source):
        self.root = root
        src = {"dicomweb": {"url": url, "timeout": source.pop("timeout", 10)}, "poll_every": 0, **source}
        self.settings = Settings.model_validate({
            "storage": {"path": str(root / "dicom"), "fsync": False},
            "database": {"url": f"sqlite:///{root / 'cmr-ai.db'}"},
            "sources": {"pacs": src}})
        self.store = InstanceStore(self.settings.storage.path, fsync=False)
        self.indexer = Indexer(self.settings.database.url)

    def pull(self, study_uid: str, **kw):
        return pull_study(self.settings, "pacs", study_uid, store=self.store, indexer=self.indexer, **kw)

    def row(self, study_uid: str) -> db.SourceStudy:
        with db.session_scope(self.settings.database.url) as s:
            row = s.scalar(select(db.SourceStudy).where(db.SourceStudy.study_instance_uid == study_uid))
            s.expunge_all()
            return row

    def instances(self) -> dict[str, db.Instance]:
        with db.session_scope(self.settings.database.url) as s:
            rows = s.scalars(select(db.Instance)).all()
            s.expunge_all()
            return {r.sop_instance_uid: r for r in rows}


def study(out: Path, **kw) -> tuple[str, dict[str, Path]]:
    """Write a small phantom study: (Study Instance UID, {SOP Instance UID: file})."""
    write_study(out, **{**SMALL, **kw})
    files = {}
    uid = None
    for f in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        files[ds.SOPInstanceUID] = f
        uid = ds.StudyInstanceUID
    assert files
    return uid, files


def send(orthanc, folder: Path, *extra: str) -> None:
    assert Path(STORESCU).exists(), f"{STORESCU} missing: install dcmtk"
    r = subprocess.run([STORESCU, "-aec", orthanc.aet, "+sd", "+r", "+sp", "*.dcm", *extra, "127.0.0.1",
                        str(orthanc.port), str(folder)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"storescu failed: {r.stdout}\n{r.stderr}"


def dated(files, day: str) -> None:
    """Set StudyDate of every file (the phantom's are fixed in 2024)."""
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyDate = day
        ds.save_as(f)


def body(data: bytes) -> bytes:
    """The data set after the File Meta."""
    return data[read_file_meta(data)[1]:]


def assert_identical(node: Node, files: dict[str, Path]) -> None:
    got = node.instances()
    assert set(files) <= set(got)
    for sop, f in files.items():
        assert body(Path(got[sop].path).read_bytes()) == body(f.read_bytes()), f"{sop} differs from {f}"


def today(delta_days: int = 0) -> str:
    return (dt.date.today() - dt.timedelta(days=delta_days)).strftime("%Y%m%d")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plugin.cli", "pull", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def write_config(path: Path, root: Path, url: str, timeout: float = 10) -> Path:
    path.write_text(f"""
storage: {{path: {root / 'dicom'}, fsync: false}}
database: {{url: "sqlite:///{root / 'cmr-ai.db'}"}}
sources:
  pacs: {{dicomweb: {{url: "{url}", timeout: {timeout}}}, poll_every: 0}}
  other: {{dicomweb: {{url: "{url}"}}, poll_every: 0}}
""")
    return path


# ---------------------------------------------------------------------------
# real Orthanc

def test_pull_from_orthanc_keeps_bytes_and_transfer_syntax_and_resumes(tmp_path, orthanc):
    siemens, siemens_files = study(tmp_path / "siemens", style="siemens", seed=1)
    philips, philips_files = study(tmp_path / "philips", style="philips", seed=2)
    jpeg, jpeg_files = study(tmp_path / "jpeg", style="siemens", seed=3, transfer_syntax="jpeg-lossless")
    send(orthanc, tmp_path / "siemens")
    send(orthanc, tmp_path / "philips")
    send(orthanc, tmp_path / "jpeg", "-xs")  # propose JPEG Lossless SV1: Orthanc stores it as such

    node = Node(tmp_path / "node", orthanc.dicomweb_url)
    for uid, files in ((siemens, siemens_files), (philips, philips_files), (jpeg, jpeg_files)):
        r = node.pull(uid)
        assert (r.listed, r.stored, r.already, r.failed, r.requests) == (len(files), len(files), 0, [], 1)
        assert_identical(node, files)
        row = node.row(uid)
        assert row.state == db.PullState.DONE and row.archive_instances == len(files) and row.pulled == len(files)
        assert row.finished_at is not None and row.attempts == 0
    # transfer-syntax=*: the archive's stored syntax, not a transcoded copy
    assert {i.transfer_syntax_uid for s, i in node.instances().items() if s in jpeg_files} == {"1.2.840.10008.1.2.4.70"}

    again = node.pull(siemens)
    assert (again.stored, again.already, again.requests) == (0, len(siemens_files), 0)

    # a node that has some of the study: one request per missing instance only
    other = Node(tmp_path / "other", orthanc.dicomweb_url)
    have = list(siemens_files)[:3]
    for sop in have:
        assert accept_part10(other.store, other.indexer, Origin("C-STORE", "test"),
                             siemens_files[sop].read_bytes()).ok
    r = other.pull(siemens)
    missing = len(siemens_files) - 3
    assert (r.listed, r.already, r.stored, r.requests) == (len(siemens_files), 3, missing, missing)
    assert_identical(other, siemens_files)
    assert other.row(siemens).state == db.PullState.DONE


def test_cli_pull_no_process_and_errors(tmp_path, orthanc):
    uid, files = study(tmp_path / "s", style="siemens", seed=4)
    send(orthanc, tmp_path / "s")
    cfg = write_config(tmp_path / "config.yaml", tmp_path / "var", orthanc.dicomweb_url)

    r = cli("--config", str(cfg), "--source", "pacs", uid, "--no-process", "--progress")
    assert r.returncode == 0, r.stderr
    assert f"{len(files)} listed, {len(files)} stored, 0 already here" in r.stdout
    assert "not processed (--no-process)" in r.stdout
    assert f"pulling {uid} from pacs: {len(files)}/{len(files)} done" in r.stderr  # the bar, as lines

    r = cli("--config", str(cfg), "--source", "pacs", "1.2.3.4.5", "--no-process")
    assert r.returncode == 1
    assert "cmr-ai pull: source pacs: HTTP 404" in r.stderr
    assert "Accessing an inexistent study with WADO-RS: 1.2.3.4.5" in r.stderr  # Orthanc's own words

    r = cli("--config", str(cfg), "--source", "nope", uid)
    assert r.returncode == 2 and "no source 'nope'" in r.stderr and "defined: other, pacs" in r.stderr

    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  pacs: {dicomweb: {url: ftp://x}}\n")
    r = cli("--config", str(bad), "--source", "pacs", uid)
    assert r.returncode == 2 and "bad.yaml:2" in r.stderr and "not an http(s) URL" in r.stderr

    from peers import free_port

    down = write_config(tmp_path / "down.yaml", tmp_path / "var2", f"http://127.0.0.1:{free_port()}/dicom-web")
    r = cli("--config", str(down), "--source", "pacs", uid, "--no-process")
    assert r.returncode == 1
    assert re.search(r"source pacs: cannot reach http://127\.0\.0\.1:\d+/dicom-web/.*Connection refused", r.stderr)


def test_poller_finds_new_studies_in_its_window(tmp_path, orthanc):
    old, old_files = study(tmp_path / "old", seed=5)
    dated(old_files.values(), today(3650))
    send(orthanc, tmp_path / "old")
    first, first_files = study(tmp_path / "first", seed=6)
    dated(first_files.values(), today())
    send(orthanc, tmp_path / "first")

    node = Node(tmp_path / "node", orthanc.dicomweb_url, poll_every=60, window_days=7)
    poller = Poller(lambda: node.settings, "pacs", node.store, node.indexer)
    r = poller.poll_once()
    assert [p.study_instance_uid for p in r.pulled] == [first] and r.found == 1
    assert node.row(first).state == db.PullState.DONE and node.row(old) is None
    assert set(first_files) == set(node.instances())

    r = poller.poll_once()
    assert (r.pulled, r.skipped) == ([], 1)

    second, second_files = study(tmp_path / "second", seed=7)
    dated(second_files.values(), today(1))
    send(orthanc, tmp_path / "second")
    r = poller.poll_once()
    assert [p.study_instance_uid for p in r.pulled] == [second]
    assert set(node.instances()) == set(first_files) | set(second_files)
    assert node.row(old) is None


# ---------------------------------------------------------------------------
# fake archive: errors, cut-short answers, timeouts, back-off

@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """Six instances of one phantom study, StudyDate today."""
    out = tmp_path_factory.mktemp("six")
    uid, files = study(out, seed=8)
    chosen = dict(list(files.items())[:6])
    dated(chosen.values(), today())
    return uid, chosen


def test_archive_error_is_recorded_with_its_body(tmp_path, six):
    from fakearchive import FakeArchive

    uid, files = six
    with FakeArchive(list(files.values())) as fake:
        fake.errors["instances"] = [(500, "database is locked (SQLITE_BUSY) " + "x" * 400)]
        node = Node(tmp_path, fake.url)
        with pytest.raises(PullError) as e:
            node.pull(uid)
        assert str(e.value).startswith(f"HTTP 500 Internal Server Error from {fake.url}/studies/{uid}/instances: "
                                       "database is locked (SQLITE_BUSY) xxx")
        row = node.row(uid)
        assert row.state == db.PullState.FAILED and row.attempts == 1 and row.error == str(e.value)
        assert row.next_attempt is not None and row.next_attempt > db.utcnow()


def test_connection_closed_mid_transfer_then_resume(tmp_path, six, monkeypatch):
    from fakearchive import FakeArchive

    from plugin.dicomweb import pull

    monkeypatch.setattr(pull, "PAGE", 4)  # the listing comes in pages: 4, 2, then an empty one
    uid, files = six
    with FakeArchive(list(files.values())) as fake:
        fake.cut_after = 3
        node = Node(tmp_path, fake.url)
        with pytest.raises(PullError) as e:
            node.pull(uid)
        assert "connection closed mid-transfer after 3 of 6 instances" in str(e.value)
        assert [p.split("?")[1] for p in fake.requests if p.split("?")[0].endswith("/instances")] == [
            "limit=4&offset=0", "limit=4&offset=4", "limit=4&offset=6"]
        row = node.row(uid)
        assert row.state == db.PullState.FAILED and row.attempts == 1 and row.pulled == 3
        got = node.instances()
        assert len(got) == 3
        for sop in got:  # the three complete parts: stored whole; the half one: never
            assert body(Path(got[sop].path).read_bytes()) == body(files[sop].read_bytes())

        fake.cut_after = None
        fake.requests.clear()
        r = node.pull(uid)
        assert (r.already, r.stored, r.requests) == (3, 3, 3)
        assert sum("/instances/" in p for p in fake.requests) == 3  # per instance, nothing twice
        assert_identical(node, files)
        row = node.row(uid)
        assert row.state == db.PullState.DONE and row.attempts == 0 and row.pulled == 6


def test_poller_pulls_a_study_that_grew_and_skips_failed_until_due(tmp_path, six):
    from fakearchive import FakeArchive

    uid, files = six
    paths = list(files.values())
    with FakeArchive(paths[:4]) as fake:
        node = Node(tmp_path, fake.url, poll_every=60, window_days=1)
        poller = Poller(lambda: node.settings, "pacs", node.store, node.indexer)
        r = poller.poll_once()
        assert [p.stored for p in r.pulled] == [4] and node.row(uid).archive_instances == 4
        assert poller.poll_once().skipped == 1

        grown = FakeArchive(paths)  # the archive received two more instances of the study
        fake.instances = grown.instances
        grown.server.server_close()
        fake.plain = True  # and answers one instance as a bare application/dicom body
        r = poller.poll_once()
        assert [(p.already, p.stored, p.requests) for p in r.pulled] == [(4, 2, 2)]
        assert_identical(node, files)
        assert node.row(uid).archive_instances == 6

        # a failed study is asked for again only once its back-off (60 s here) has passed
        fake.instances.append({**fake.instances[0], "study": "1.2.3.999", "sop": "1.2.3.999.1"})
        fake.errors["instances"] = [(502, "Bad Gateway")]
        r = poller.poll_once()
        assert r.failed and r.failed[0][0] == "1.2.3.999" and "HTTP 502" in r.failed[0][1]
        assert node.row("1.2.3.999").state == db.PullState.FAILED
        r = poller.poll_once()
        assert (r.pulled, r.failed, r.skipped) == ([], [], 2)


def test_slow_archive_times_out(tmp_path, six):
    from fakearchive import FakeArchive

    uid, files = six
    with FakeArchive(list(files.values())) as fake:
        fake.delay = 3
        node = Node(tmp_path, fake.url, timeout=0.5)
        with pytest.raises(PullError) as e:
            node.pull(uid)
        assert str(e.value).startswith("timed out after 0.5 s")
        assert e.value.unreachable
        assert node.row(uid).state == db.PullState.FAILED


def test_poller_backs_off_then_pulls(tmp_path, six, caplog):
    from fakearchive import FakeArchive

    uid, files = six
    with FakeArchive(list(files.values())) as fake:
        fake.errors["studies"] = [(503, "Service Unavailable: busy")] * 3
        node = Node(tmp_path, fake.url, poll_every=0.2, max_backoff=1, window_days=1)
        poller = Poller(lambda: node.settings, "pacs", node.store, node.indexer)
        stop = threading.Event()
        caplog.set_level(logging.INFO, logger="cmr_ai.pull")
        t = threading.Thread(target=poller.run, args=(stop,), daemon=True)
        t.start()
        try:
            deadline = dt.datetime.now() + dt.timedelta(seconds=30)
            while dt.datetime.now() < deadline:
                row = node.row(uid)
                if row is not None and row.state == db.PullState.DONE:
                    break
                stop.wait(0.1)
        finally:
            stop.set()
            t.join(10)
        assert not t.is_alive()
    assert node.row(uid).state == db.PullState.DONE
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    assert all("HTTP 503" in w and "busy" in w for w in warnings)
    delays = [float(re.search(r"next try in ([\d.]+) s", w).group(1)) for w in warnings]
    assert delays == sorted(delays) and delays[0] < delays[-1] <= 1
    pulled = [r.getMessage() for r in caplog.records if "pulled study" in r.getMessage()]
    assert len(pulled) == 1 and uid in pulled[0] and "6 stored" in pulled[0]
