"""The outbox against real peers: retries and back-off, dead letters, nothing sent twice, verification.

Orthanc is the PACS. A Lua ``ReceivedInstanceFilter`` makes it log every instance it
receives — duplicates included, over DIMSE and STOW-RS alike — so "sent exactly
once" is checked on the PACS side, not only in our rows. Peers that must answer
what Orthanc never says (C-STORE warnings, a STOW-RS 202 with warnings and
failures) are a pynetdicom SCP and a small local HTTP server.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from sqlalchemy import select

import test_reports as tr
from peers import Orthanc, free_port
from plugin import db, outbox
from plugin.config import ConfigError, load_settings
from plugin.export import dataset_bytes
from plugin.storage import write_atomic
from test_export import sc_image


def sc_file(tmp_path) -> tuple[str, str]:
    """Any valid instance will do: one slice of the brain phantom."""
    from plugin.phantom import write_brain_mr

    path = sorted(write_brain_mr(tmp_path / "brain"))[0]
    return str(path), str(pydicom.dcmread(path).SOPInstanceUID)


def settings_for(tmp_path, port):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
database: {{url: "sqlite:///{tmp_path / 'db.sqlite'}"}}
destinations:
  pacs: {{dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {port}, timeout: 5}}, max_attempts: 3}}
""")
    return load_settings(cfg)


def config(tmp_path, destinations: str, name: str = "c.yaml"):
    """Settings with these destinations (YAML lines under ``destinations:``)."""
    cfg = tmp_path / name
    cfg.write_text(f'database: {{url: "sqlite:///{tmp_path / "db.sqlite"}"}}\n'
                   f"node: {{ae_title: CMR_AI}}\ndestinations:\n{destinations}")
    return load_settings(cfg)


def make_job(settings, path, uid) -> int:
    with db.session_scope(settings.database.url) as s:
        st = db.Study(study_instance_uid=pydicom.dcmread(path).StudyInstanceUID)
        s.add(st)
        s.flush()
        job = db.Job(study_id=st.id, rule="r", template="t", model="m", destinations="pacs",
                     state=db.JobState.EXPORTING)
        s.add(job)
        s.flush()
        s.add(db.Export(job_id=job.id, destination="pacs", sop_instance_uid=uid, path=path, kind="sc"))
        return job.id


def report_job(settings, written, destinations=("pacs",)) -> tuple[int, list[int]]:
    """What the ``report`` task does: a job in EXPORTING and its rows by ``outbox.enqueue``."""
    study_uid = str(pydicom.dcmread(written[0][2], stop_before_pixels=True).StudyInstanceUID)
    with db.session_scope(settings.database.url) as s:
        st = s.scalar(select(db.Study).where(db.Study.study_instance_uid == study_uid))
        if st is None:
            st = db.Study(study_instance_uid=study_uid)
            s.add(st)
            s.flush()
        job = db.Job(study_id=st.id, rule="r", template="t", model="m", destinations=",".join(destinations),
                     state=db.JobState.EXPORTING)
        s.add(job)
        s.flush()
        rows = outbox.enqueue(s, job, job.destination_list, written)
        return job.id, [r.id for r in rows]


def write(ds, folder, kind="sc") -> tuple[str, str, str]:
    path = folder / f"{kind}-{ds.SOPInstanceUID}.dcm"
    write_atomic(path, dataset_bytes(ds))
    return kind, str(ds.SOPInstanceUID), str(path)


def rows_of(settings, **where) -> list[db.Export]:
    with db.session_scope(settings.database.url) as s:
        q = select(db.Export).order_by(db.Export.id)
        for k, v in where.items():
            q = q.where(getattr(db.Export, k) == v)
        out = s.scalars(q).all()
        s.expunge_all()
        return out


def row(settings, export_id) -> db.Export:
    with db.session_scope(settings.database.url) as s:
        r = s.get(db.Export, export_id)
        s.expunge(r)
        return r


def job_state(settings, job_id):
    with db.session_scope(settings.database.url) as s:
        return s.get(db.Job, job_id).state


def _due_now(settings):
    with db.session_scope(settings.database.url) as s:
        for e in s.scalars(select(db.Export)):
            e.next_attempt_at = db.utcnow() - timedelta(seconds=1)


COUNT_LUA = """function ReceivedInstanceFilter(dicom, origin, info)
  print('RECEIVED ' .. dicom.SOPInstanceUID)
  return true
end
"""


def counting_orthanc(make_orthanc, tmp_path, **kwargs) -> Orthanc:
    """An Orthanc that logs every instance it receives (see :func:`received`)."""
    lua = tmp_path / "count.lua"
    lua.write_text(COUNT_LUA)
    config = {"LuaScripts": [str(lua)], **kwargs.pop("config", {})}
    return make_orthanc(config=config, **kwargs)


def received(orthanc: Orthanc) -> Counter:
    """SOP Instance UID → how many times Orthanc received it (since it last started)."""
    return Counter(line.split("RECEIVED ", 1)[1].strip() for line in orthanc.log_path.read_text().splitlines()
                   if "Lua says: RECEIVED " in line)


def restart(orthanc: Orthanc, **config) -> None:
    """Start a stopped Orthanc again on the same ports with the same storage (its log starts afresh)."""
    orthanc.restart(**config)


def wait_for(predicate, what: str, timeout: float = 30.0):
    """Poll until ``predicate()`` is true (for answers that come back on their own association)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s")


@pytest.fixture(scope="module")
def draft():
    """Build the AI draft SR of a small study as the report task does: same inputs, same SOP Instance UID."""
    from plugin.reports.sr import build_measurement_report
    from plugin.reports.template import load_template

    sax_ed, sax_es = tr.make_mr(5, 1), tr.make_mr(5, 13)
    images = [tr.bundle_image("SAX_mid_ED", "SAX", "ED", sax_ed), tr.bundle_image("SAX_mid_ES", "SAX", "ES", sax_es)]
    sources = {ds.SOPInstanceUID: ds for ds in (sax_ed, sax_es)}
    template = load_template("cmr_standard")
    result = tr.fake_result(template, images)

    def build(impression: str | None = None, at: str = "120000"):
        r = result if impression is None else result.model_copy(update={"impression": impression})
        ds = build_measurement_report(template, r, images, sources, rules_version="0123456789ab")
        ds.ContentTime = ds.InstanceCreationTime = at  # a re-analysis runs at another time
        return ds

    return build


# ---------------------------------------------------------------------------
# retries, back-off, dead letters

def test_failed_export_stays_in_the_outbox_and_is_retried_until_the_pacs_answers(tmp_path):
    port = free_port()
    settings = settings_for(tmp_path, port)
    path, uid = sc_file(tmp_path)
    job_id = make_job(settings, path, uid)
    assert outbox.flush(settings) == 0  # nobody listens on the port
    with db.session_scope(settings.database.url) as s:
        e = s.scalar(select(db.Export))
        assert e.state == db.ExportState.PENDING and e.attempts == 1
        assert "association" in e.last_error and e.status == "no association"
        assert e.next_attempt_at > db.utcnow()  # backed off
        assert e.claim is None
        assert s.get(db.Job, job_id).state == db.JobState.EXPORTING
    assert outbox.flush(settings) == 0  # not due yet: nothing is tried
    assert rows_of(settings)[0].attempts == 1

    orthanc = Orthanc(tmp_path / "orthanc")
    try:
        settings = settings_for(tmp_path, orthanc.port)
        _due_now(settings)
        assert outbox.flush(settings) == 1
        assert len(orthanc.instances()) == 1
        with db.session_scope(settings.database.url) as s:
            e = s.scalar(select(db.Export))
            assert e.state == db.ExportState.SENT and e.status == "0x0000" and e.last_error is None
            assert e.digest and len(e.digest) == 64  # computed when it was sent
            assert s.get(db.Job, job_id).state == db.JobState.DONE
        _due_now(settings)
        assert outbox.flush(settings) == 0  # sent rows are never sent again
    finally:
        orthanc.stop()


def test_export_becomes_a_dead_letter_after_max_attempts_and_can_be_resent(tmp_path):
    settings = settings_for(tmp_path, free_port())
    path, uid = sc_file(tmp_path)
    job_id = make_job(settings, path, uid)
    for _ in range(3):
        _due_now(settings)
        outbox.flush(settings)
    with db.session_scope(settings.database.url) as s:
        e = s.scalar(select(db.Export))
        assert e.state == db.ExportState.DEAD and e.attempts == 3
        job = s.get(db.Job, job_id)
        assert job.state == db.JobState.FAILED and "export to pacs failed" in job.error
        export_id = e.id
    assert outbox.resend(settings, [export_id]) == 1
    with db.session_scope(settings.database.url) as s:
        e = s.scalar(select(db.Export))
        assert e.state == db.ExportState.PENDING and e.attempts == 0 and e.force
        assert s.get(db.Job, job_id).state == db.JobState.EXPORTING


# ---------------------------------------------------------------------------
# the peer's status on the row: warnings are delivered, recorded and logged

@pytest.fixture()
def status_scp():
    """A pynetdicom SCP answering each C-STORE with the status named by the PatientID ("B000" → 0xB000)."""
    ae = AE("STATUS")
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    received_ids: list[str] = []

    def handle_store(event):
        pid = event.dataset.PatientID
        received_ids.append(pid)
        status = Dataset()
        status.Status = int(pid, 16)
        status.ErrorComment = f"peer says {pid}"
        return status

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield port, received_ids
    finally:
        server.shutdown()


def test_dimse_warning_and_failure_statuses_are_kept_on_the_rows(tmp_path, status_scp, caplog):
    port, got = status_scp
    settings = config(tmp_path, f"  pacs: {{dimse: {{ae_title: STATUS, host: 127.0.0.1, port: {port}, timeout: 5}},"
                                " max_attempts: 3}\n")
    codes = ["0000", "B000", "B007", "B006", "C210", "A700"]
    written = [write(sc_image(code), tmp_path) for code in codes]
    job_id, ids = report_job(settings, written)

    with caplog.at_level("INFO", logger="cmr_ai"):
        assert outbox.flush(settings) == 4

    by_code = dict(zip(codes, (row(settings, i) for i in ids)))
    assert sorted(got) == sorted(codes)
    ok = by_code["0000"]
    assert (ok.state, ok.status, ok.warning, ok.last_error) == (db.ExportState.SENT, "0x0000", None, None)
    for code, meaning in (("B000", "Coercion of Data Elements"), ("B007", "Data Set Does Not Match SOP Class"),
                          ("B006", "Element Discarded")):
        r = by_code[code]
        assert r.state == db.ExportState.SENT and r.status == f"0x{code}" and r.last_error is None, r
        assert r.warning.startswith(f"0x{code} Warning") and meaning in r.warning, r.warning
        assert f"peer says {code}" in r.warning  # the peer's ErrorComment
        assert any(rec.levelname == "WARNING" and r.sop_instance_uid in rec.getMessage() and "warning" in
                   rec.getMessage() for rec in caplog.records), f"no warning logged for 0x{code}"
    dead = by_code["C210"]
    assert dead.state == db.ExportState.DEAD and dead.status == "0xC210" and dead.attempts == 1
    assert dead.last_error.startswith("0xC210 Failure: Cannot Understand") and "peer says C210" in dead.last_error
    busy = by_code["A700"]
    assert busy.state == db.ExportState.PENDING and busy.status == "0xA700" and "Out of Resources" in busy.last_error
    assert job_state(settings, job_id) == db.JobState.EXPORTING  # one row still pending


class StowPeer:
    """A local STOW-RS origin server: answers each POST from a script of per-instance outcomes and
    records which SOP Instance UIDs every request carried."""

    def __init__(self):
        self.script: dict[str, tuple[str, int]] = {}  # uid -> ("fail"|"warn", code); others stored
        self.requests: list[set[str]] = []
        self.known: set[str] = set()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                uids = {u for u in peer.known if u.encode() in body}
                peer.requests.append(uids)
                failed, stored = [], []
                for uid in sorted(uids):
                    what, code = peer.script.get(uid, ("ok", 0))
                    item = {"00081150": {"vr": "UI", "Value": [SecondaryCaptureImageStorage]},
                            "00081155": {"vr": "UI", "Value": [uid]}}
                    if what == "fail":
                        item["00081197"] = {"vr": "US", "Value": [code]}
                        failed.append(item)
                    else:
                        if what == "warn":
                            item["00081196"] = {"vr": "US", "Value": [code]}
                        stored.append(item)
                doc = json.dumps({"00081198": {"vr": "SQ", "Value": failed},
                                  "00081199": {"vr": "SQ", "Value": stored}}).encode()
                self.send_response(202 if failed or any("00081196" in i for i in stored) else 200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(doc)))
                self.end_headers()
                self.wfile.write(doc)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stow_peer():
    p = StowPeer()
    try:
        yield p
    finally:
        p.close()


def test_stow_partial_failure_retries_only_the_failed_instances(tmp_path, stow_peer):
    settings = config(tmp_path, f"  web: {{dicomweb: {{url: '{stow_peer.url}', timeout: 5}}, max_attempts: 3}}\n")
    stored, warned, busy, refused = (sc_image(p) for p in ("OK", "WARN", "BUSY", "REFUSED"))
    stow_peer.known = {str(ds.SOPInstanceUID) for ds in (stored, warned, busy, refused)}
    stow_peer.script = {str(warned.SOPInstanceUID): ("warn", 0xB000), str(busy.SOPInstanceUID): ("fail", 0xA700),
                        str(refused.SOPInstanceUID): ("fail", 0xC122)}
    written = [write(ds, tmp_path) for ds in (stored, warned, busy, refused)]
    job_id, (i_ok, i_warn, i_busy, i_refused) = report_job(settings, written, destinations=("web",))

    assert outbox.flush(settings) == 2
    assert stow_peer.requests == [stow_peer.known]  # one request for the batch
    r = row(settings, i_ok)
    assert (r.state, r.status, r.warning) == (db.ExportState.SENT, "HTTP 202", None)
    r = row(settings, i_warn)
    assert r.state == db.ExportState.SENT and r.status == "HTTP 202 0xB000"
    assert "warning 0xB000 Warning: Coercion of Data Elements" in r.warning
    r = row(settings, i_busy)
    assert (r.state, r.status, r.attempts) == (db.ExportState.PENDING, "HTTP 202 0xA700", 1)
    assert "0xA700" in r.last_error
    r = row(settings, i_refused)
    assert (r.state, r.status) == (db.ExportState.DEAD, "HTTP 202 0xC122")
    assert "Referenced Transfer Syntax not supported" in r.last_error

    stow_peer.script.pop(str(busy.SOPInstanceUID))  # room again
    _due_now(settings)
    assert outbox.flush(settings) == 1
    assert stow_peer.requests[1] == {str(busy.SOPInstanceUID)}  # only the one that failed, nothing else
    assert row(settings, i_busy).state == db.ExportState.SENT and row(settings, i_ok).attempts == 1
    assert job_state(settings, job_id) == db.JobState.FAILED  # one dead row


def test_stow_partial_failure_with_a_full_orthanc(make_orthanc, tmp_path):
    """Orthanc with room for one patient answers 200 but stores only that patient's instance; the
    other row is retried and, once Orthanc has room, sent — and the stored one is never sent again."""
    pacs = counting_orthanc(make_orthanc, tmp_path, config={"MaximumPatientCount": 1})
    first = sc_image("P1")
    settings = config(tmp_path, f"  pacs: {{dicomweb: {{url: '{pacs.dicomweb_url}', timeout: 10}}}}\n")
    same_patient, other_patient = sc_image("P1", study_uid=first.StudyInstanceUID), sc_image("P2")
    job0, _ = report_job(settings, [write(first, tmp_path)])
    assert outbox.flush(settings) == 1
    pacs.protect_patients()  # P1 may not be recycled: P2 does not fit
    job_id, (i_same, i_other) = report_job(settings, [write(same_patient, tmp_path), write(other_patient, tmp_path)])

    assert outbox.flush(settings) == 1
    r = row(settings, i_same)
    assert r.state == db.ExportState.SENT and r.status == "HTTP 200"
    r = row(settings, i_other)
    assert r.state == db.ExportState.PENDING and r.status == "HTTP 200" and "not stored" in r.last_error
    assert pacs.find_instance(same_patient.SOPInstanceUID) and not pacs.find_instance(other_patient.SOPInstanceUID)
    before = received(pacs)

    pacs.stop(graceful=False)
    restart(pacs, MaximumPatientCount=0)  # room for everyone now
    _due_now(settings)
    assert outbox.flush(settings) == 1
    assert pacs.find_instance(other_patient.SOPInstanceUID)
    after = received(pacs)  # counted since the restart
    assert before[str(same_patient.SOPInstanceUID)] == 1 and after[str(same_patient.SOPInstanceUID)] == 0
    assert after == Counter({str(other_patient.SOPInstanceUID): 1})
    assert job_state(settings, job_id) == db.JobState.DONE


# ---------------------------------------------------------------------------
# nothing sent twice

def test_content_digest_ignores_creation_times_only(draft):
    a, b = draft(at="120000"), draft(at="130501")
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.ContentTime != b.ContentTime
    assert outbox.content_digest(a) == outbox.content_digest(b)
    changed = draft(impression="Normal study.")
    assert changed.SOPInstanceUID == a.SOPInstanceUID
    assert outbox.content_digest(changed) != outbox.content_digest(a)
    # nested volatile attributes (Contributing Equipment) do not count either, nested content does
    c = draft()
    c.ContributingEquipmentSequence[-1].ContributionDateTime = "20300101000000"
    assert outbox.content_digest(c) == outbox.content_digest(a)
    c.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning = "something else"
    assert outbox.content_digest(c) != outbox.content_digest(a)


def test_a_reanalysis_with_the_same_content_is_recorded_not_sent_and_a_changed_one_replaces(
        make_orthanc, tmp_path, draft):
    pacs = counting_orthanc(make_orthanc, tmp_path, config={"OverwriteInstances": True})
    settings = config(tmp_path, f"  pacs: {{dimse: {{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.port}}}}}\n")
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir(), (tmp_path / "3").mkdir()
    sr = draft(at="120000")
    uid = str(sr.SOPInstanceUID)

    job1, [e1] = report_job(settings, [write(sr, tmp_path / "1", "sr")])
    assert outbox.flush(settings) == 1

    job2, [e2] = report_job(settings, [write(draft(at="180000"), tmp_path / "2", "sr")])  # the study sent again
    r = row(settings, e2)
    assert r.state == db.ExportState.SENT and r.duplicate_of == e1 and r.attempts == 0 and r.status == "duplicate"
    assert r.digest == row(settings, e1).digest
    assert outbox.flush(settings, job2) == 0
    outbox.settle_job(settings, job2)  # as the report task does after its flush
    assert job_state(settings, job2) == db.JobState.DONE
    assert received(pacs) == Counter({uid: 1})
    assert len(pacs.instances()) == 1

    job3, [e3] = report_job(settings, [write(draft(impression="Normal study.", at="190000"), tmp_path / "3", "sr")])
    assert row(settings, e3).state == db.ExportState.PENDING  # other content under the same UID: send it
    assert outbox.flush(settings) == 1
    assert received(pacs) == Counter({uid: 2})
    assert len(pacs.instances()) == 1  # replaced: still exactly one SR
    back = pacs._http.get(f"{pacs.base}/instances/{pacs.instances()[0]}/file", timeout=10).content
    assert b"Normal study." in back

    # the first content again: the PACS now holds the third, so it is sent
    job4, [e4] = report_job(settings, [write(draft(at="200000"), tmp_path / "1", "sr")])
    assert row(settings, e4).state == db.ExportState.PENDING
    assert outbox.flush(settings) == 1 and received(pacs) == Counter({uid: 3})


def test_a_destination_down_gets_everything_once_it_is_back_and_nothing_twice(make_orthanc, tmp_path, draft):
    pacs = counting_orthanc(make_orthanc, tmp_path)
    settings = config(tmp_path, f"  pacs: {{dimse: {{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.port}, "
                                "timeout: 5}, max_attempts: 5}\n")
    pacs.stop(graceful=False)  # the PACS is down while the results are ready
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir()
    sc = sc_image("DOWN")
    job1, ids1 = report_job(settings, [write(draft(at="120000"), tmp_path / "1", "sr"), write(sc, tmp_path / "1")])
    assert outbox.flush(settings) == 0
    assert {(r.state, r.attempts, r.status) for r in rows_of(settings)} == {(db.ExportState.PENDING, 1,
                                                                             "no association")}
    # the study arrives again and is analysed again with the same result, still while the PACS is down
    job2, ids2 = report_job(settings, [write(draft(at="150000"), tmp_path / "2", "sr"), write(sc, tmp_path / "2")])
    assert [row(settings, i).state for i in ids2] == [db.ExportState.PENDING] * 2
    _due_now(settings)
    assert outbox.flush(settings) == 0

    restart(pacs)
    _due_now(settings)
    assert outbox.flush(settings) == 2  # the newer rows are sent ...
    for old, new in zip(ids1, ids2):  # ... and the older ones are recorded as delivered by them
        assert row(settings, new).state == db.ExportState.SENT and row(settings, new).duplicate_of is None
        o = row(settings, old)
        assert o.state == db.ExportState.SENT and o.duplicate_of == new, o
    assert received(pacs) == Counter({str(draft().SOPInstanceUID): 1, str(sc.SOPInstanceUID): 1})
    assert job_state(settings, job1) == job_state(settings, job2) == db.JobState.DONE
    _due_now(settings)
    assert outbox.flush(settings) == 0 and sum(received(pacs).values()) == 2


def test_an_older_row_waits_for_a_newer_row_of_the_same_object(tmp_path, draft):
    """Two rows of one object for one destination: only the newer one goes; the older one waits for it."""
    settings = config(tmp_path, f"  pacs: {{dimse: {{ae_title: PACS, host: 127.0.0.1, port: {free_port()}, "
                                "timeout: 3}}\n")
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir()
    _, [old] = report_job(settings, [write(draft(), tmp_path / "1", "sr")])
    _, [new] = report_job(settings, [write(draft(impression="Changed."), tmp_path / "2", "sr")])
    with db.session_scope(settings.database.url) as s:  # the newer row is backing off; the older one is due
        s.get(db.Export, new).next_attempt_at = db.utcnow() + timedelta(seconds=60)
    assert outbox.flush(settings) == 0
    o = row(settings, old)
    assert o.state == db.ExportState.PENDING and o.attempts == 0 and o.status == "waiting"  # nothing tried
    assert o.next_attempt_at >= row(settings, new).next_attempt_at and o.claim is None


def test_two_flushers_never_send_the_same_row(tmp_path):
    """Two processes flush the same outbox at once against a slow PACS: each instance arrives once."""
    ae = AE("SLOW")
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    got: list[str] = []

    def handle_store(event):
        got.append(str(event.dataset.SOPInstanceUID))
        time.sleep(0.1)
        return 0x0000

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        settings = config(tmp_path, f"  pacs: {{dimse: {{ae_title: SLOW, host: 127.0.0.1, port: {port}}}}}\n")
        written = [write(sc_image(f"P{i}"), tmp_path) for i in range(8)]
        report_job(settings, written)
        counts: list[int] = []
        start = threading.Barrier(3)

        def flusher():
            start.wait()
            counts.append(outbox.flush(settings))

        threads = [threading.Thread(target=flusher) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sum(counts) == 8
        assert Counter(got) == Counter({uid: 1 for _, uid, _ in written})
        assert {(r.state, r.attempts, r.claim) for r in rows_of(settings)} == {(db.ExportState.SENT, 1, None)}
    finally:
        server.shutdown()


def test_a_flush_whose_claim_was_taken_over_records_nothing(tmp_path):
    settings = config(tmp_path, f"  pacs: {{dimse: {{ae_title: PACS, host: 127.0.0.1, port: {free_port()}, "
                                "timeout: 3}}\n")
    _, [eid] = report_job(settings, [write(sc_image(), tmp_path)])
    url = settings.database.url
    [mine] = outbox._claim_due(url, "A" * 32, None, None)
    assert outbox.flush(settings) == 0 and row(settings, eid).attempts == 0  # claimed by A: left alone
    with db.session_scope(url) as s:  # A's claim runs out; B takes the row
        s.get(db.Export, eid).next_attempt_at = db.utcnow() - timedelta(seconds=1)
    assert [i.id for i in outbox._claim_due(url, "B" * 32, None, None)] == [eid]
    assert outbox._keep_claim(url, "A" * 32, [mine]) == []  # A sees it lost the row before sending
    from plugin.export import StoreOutcome
    assert outbox._record(settings, "A" * 32, "pacs", [(mine, StoreOutcome(mine.sop, True, "ok", code="0x0000"))]) \
        == set()
    r = row(settings, eid)
    assert r.state == db.ExportState.PENDING and r.attempts == 0 and r.claim == "B" * 32


def test_enqueue_keeps_the_rows_of_a_retried_report_task(tmp_path, draft):
    settings = config(tmp_path, "  a: {folder: out-a}\n  b: {folder: out-b}\n")
    written = [write(draft(), tmp_path, "sr")]
    job, ids = report_job(settings, written, destinations=("a", "b", "a"))
    assert len(ids) == 2
    with db.session_scope(settings.database.url) as s:
        again = outbox.enqueue(s, s.get(db.Job, job), ["a", "b"], written)
        assert sorted(r.id for r in again) == sorted(ids)
    assert len(rows_of(settings)) == 2


# ---------------------------------------------------------------------------
# verification: QIDO-RS and Storage Commitment with a real Orthanc

def test_verify_config_is_checked_with_file_line_key(tmp_path):
    with pytest.raises(ConfigError) as ei:
        config(tmp_path, "  pacs:\n    dimse: {ae_title: PACS, host: h, port: 104}\n    verify: qido\n"
                         "  web: {dicomweb: {url: 'http://h/dicom-web'}, verify: commitment}\n"
                         "  out: {folder: /tmp/x, verify: sometimes}\n")
    cfg = tmp_path / "c.yaml"
    assert ei.value.errors == [
        f"{cfg}:6: destinations.pacs.verify: verify 'qido' needs a dicomweb destination (this one is dimse); "
        "use verify: commitment for dimse",
        f"{cfg}:7: destinations.web.verify: verify 'commitment' needs a dimse destination (this one is dicomweb); "
        "use verify: qido for dicomweb",
        f"{cfg}:8: destinations.out.verify: Input should be 'none', 'commitment' or 'qido'",
    ]
    s = config(tmp_path, "  web: {dicomweb: {url: 'http://h/dicom-web'}, verify: qido, verify_timeout: 30}\n",
               name="ok.yaml")
    assert s.destinations["web"].verify == "qido" and s.destinations["web"].verify_timeout == 30


def test_qido_confirms_what_orthanc_kept_and_resends_what_it_lost(make_orthanc, tmp_path):
    pacs = counting_orthanc(make_orthanc, tmp_path)
    settings = config(tmp_path, f"  web: {{dicomweb: {{url: '{pacs.dicomweb_url}'}}, verify: qido, "
                                "verify_timeout: 60}\n")
    ds = sc_image("QIDO")
    job, [eid] = report_job(settings, [write(ds, tmp_path)], destinations=("web",))
    assert outbox.flush(settings) == 1
    r = row(settings, eid)
    assert r.state == db.ExportState.SENT and r.verify == "qido" and r.confirmed_at is not None
    assert job_state(settings, job) == db.JobState.DONE

    # Orthanc loses it; the row is taken back to "awaiting confirmation" and its time runs out
    oid = pacs.find_instance(ds.SOPInstanceUID)
    pacs._http.delete(f"{pacs.base}/instances/{oid}").raise_for_status()
    with db.session_scope(settings.database.url) as s:
        e = s.get(db.Export, eid)
        e.confirmed_at, e.next_attempt_at = None, db.utcnow() - timedelta(seconds=1)
        e.confirm_by = db.utcnow() + timedelta(seconds=60)
    assert outbox.flush(settings) == 0  # not found, but there is time: checked again later
    r = row(settings, eid)
    assert r.state == db.ExportState.SENT and r.confirmed_at is None and r.next_attempt_at > db.utcnow()
    assert job_state(settings, job) == db.JobState.EXPORTING  # awaiting confirmation
    with db.session_scope(settings.database.url) as s:
        s.get(db.Export, eid).confirm_by = db.utcnow() - timedelta(seconds=1)
        s.get(db.Export, eid).next_attempt_at = db.utcnow() - timedelta(seconds=1)
    assert outbox.flush(settings) == 0
    r = row(settings, eid)
    assert r.state == db.ExportState.PENDING and r.force and r.attempts == 1 and r.next_attempt_at > db.utcnow()
    assert "QIDO-RS did not find it within 60 s" in r.last_error and r.status == "not confirmed"
    _due_now(settings)
    assert outbox.flush(settings) == 1
    r = row(settings, eid)
    assert r.state == db.ExportState.SENT and r.confirmed_at is not None and r.attempts == 2
    assert pacs.find_instance(ds.SOPInstanceUID) and received(pacs)[str(ds.SOPInstanceUID)] == 2
    assert job_state(settings, job) == db.JobState.DONE


@pytest.fixture()
def node_scp(tmp_path):
    """The node's own DICOM listener (plugin.dimse.scp), where Storage Commitment results arrive."""
    from plugin.dimse.scp import StoreSCP
    from plugin.storage import InstanceStore

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    node = StoreSCP(ae_title="CMR_AI", host="127.0.0.1", port=0, store=InstanceStore(tmp_path / "store"), db_url=url)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def test_storage_commitment_with_orthanc_confirms_and_failures_are_sent_again(make_orthanc, tmp_path, node_scp):
    pacs = counting_orthanc(make_orthanc, tmp_path, modalities={"cmr": ["CMR_AI", "127.0.0.1", node_scp.port]})
    settings = config(tmp_path, f"  pacs: {{dimse: {{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.port}}}, "
                                "verify: commitment, max_attempts: 4}\n")
    a, b = sc_image("SC-A"), sc_image("SC-B")
    job, ids = report_job(settings, [write(a, tmp_path), write(b, tmp_path)])
    assert outbox.flush(settings) == 2
    for i in ids:
        r = row(settings, i)
        assert r.state == db.ExportState.SENT and r.verify == "commitment" and r.commit_uid
    # Orthanc answers with an N-EVENT-REPORT on a new association to our node's AE
    wait_for(lambda: all(row(settings, i).confirmed_at for i in ids), "Storage Commitment result from Orthanc")
    assert job_state(settings, job) == db.JobState.DONE

    # Orthanc loses B; a commitment request for it gets B in the FailedSOPSequence
    pacs._http.delete(f"{pacs.base}/instances/{pacs.find_instance(b.SOPInstanceUID)}").raise_for_status()
    from plugin.dimse.scu import request_commitment

    txn = "1.2.826.0.1.3680043.8.498.1234567890"
    with db.session_scope(settings.database.url) as s:
        e = s.get(db.Export, ids[1])
        e.confirmed_at, e.commit_uid, e.confirm_by = None, txn, db.utcnow() + timedelta(seconds=300)
    request_commitment(settings.destinations["pacs"].dimse, [(SecondaryCaptureImageStorage, str(b.SOPInstanceUID))],
                       txn, calling_ae="CMR_AI")
    wait_for(lambda: row(settings, ids[1]).last_error, "Storage Commitment failure from Orthanc")
    r = row(settings, ids[1])
    assert r.status == "0x0112" and "FailureReason 0x0112 Failure: No Such SOP Instance" in r.last_error
    assert outbox.flush(settings) == 0  # the failure makes it pending again, with back-off
    r = row(settings, ids[1])
    assert r.state == db.ExportState.PENDING and r.force and r.attempts == 1 and r.next_attempt_at > db.utcnow()
    _due_now(settings)
    assert outbox.flush(settings) == 1
    wait_for(lambda: row(settings, ids[1]).confirmed_at, "Storage Commitment of the re-sent instance")
    assert row(settings, ids[1]).attempts == 2 and row(settings, ids[1]).last_error is None
    assert pacs.find_instance(b.SOPInstanceUID)
    assert received(pacs) == Counter({str(a.SOPInstanceUID): 1, str(b.SOPInstanceUID): 2})
    assert job_state(settings, job) == db.JobState.DONE


def test_storage_commitment_without_a_result_is_sent_again_after_the_timeout(make_orthanc, tmp_path):
    """Orthanc cannot reach our node (nobody listens there): no result comes; after verify_timeout: re-send."""
    pacs = make_orthanc(modalities={"cmr": ["CMR_AI", "127.0.0.1", free_port()]})
    settings = config(tmp_path, f"  pacs: {{dimse: {{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.port}}}, "
                                "verify: commitment, verify_timeout: 120, max_attempts: 2}\n")
    job, [eid] = report_job(settings, [write(sc_image(), tmp_path)])
    assert outbox.flush(settings) == 1
    assert row(settings, eid).confirmed_at is None and job_state(settings, job) == db.JobState.EXPORTING
    assert outbox.flush(settings) == 0 and row(settings, eid).state == db.ExportState.SENT  # still in time
    with db.session_scope(settings.database.url) as s:
        s.get(db.Export, eid).confirm_by = db.utcnow() - timedelta(seconds=1)
    outbox.flush(settings)
    r = row(settings, eid)
    assert r.state == db.ExportState.PENDING and "no Storage Commitment result came within 120 s" in r.last_error
    _due_now(settings)
    assert outbox.flush(settings) == 1
    with db.session_scope(settings.database.url) as s:
        s.get(db.Export, eid).confirm_by = db.utcnow() - timedelta(seconds=1)
    outbox.flush(settings)
    r = row(settings, eid)
    assert r.state == db.ExportState.DEAD and r.attempts == 2  # max_attempts
    assert job_state(settings, job) == db.JobState.FAILED


def test_a_peer_without_storage_commitment_is_a_clear_error(tmp_path, status_scp):
    port, _ = status_scp  # takes Secondary Capture only
    settings = config(tmp_path, f"  pacs: {{dimse: {{ae_title: STATUS, host: 127.0.0.1, port: {port}}}, "
                                "verify: commitment}\n")
    _, [eid] = report_job(settings, [write(sc_image("0000"), tmp_path)])
    assert outbox.flush(settings) == 1
    r = row(settings, eid)
    assert r.state == db.ExportState.DEAD and r.status == "commitment not supported"
    assert "does not accept the Storage Commitment Push Model" in r.last_error and "verify: none" in r.last_error
