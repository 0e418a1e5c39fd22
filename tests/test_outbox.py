"""The outbox: a failed export stays, is retried with back-off, and lands once the PACS is back."""
from __future__ import annotations

from datetime import timedelta

import pydicom
from sqlalchemy import select

from peers import Orthanc, free_port
from plugin import db, outbox
from plugin.config import load_settings


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


def _due_now(settings):
    with db.session_scope(settings.database.url) as s:
        for e in s.scalars(select(db.Export)):
            e.next_attempt_at = db.utcnow() - timedelta(seconds=1)


def test_failed_export_stays_in_the_outbox_and_is_retried_until_the_pacs_answers(tmp_path):
    port = free_port()
    settings = settings_for(tmp_path, port)
    path, uid = sc_file(tmp_path)
    job_id = make_job(settings, path, uid)
    assert outbox.flush(settings) == 0  # nobody listens on the port
    with db.session_scope(settings.database.url) as s:
        e = s.scalar(select(db.Export))
        assert e.state == db.ExportState.PENDING and e.attempts == 1
        assert "association" in e.last_error
        assert e.next_attempt_at > db.utcnow()  # backed off
        assert s.get(db.Job, job_id).state == db.JobState.EXPORTING
    assert outbox.flush(settings) == 0  # not due yet: nothing is tried

    orthanc = Orthanc(tmp_path / "orthanc")
    try:
        settings = settings_for(tmp_path, orthanc.port)
        _due_now(settings)
        assert outbox.flush(settings) == 1
        assert len(orthanc.instances()) == 1
        with db.session_scope(settings.database.url) as s:
            assert s.scalar(select(db.Export)).state == db.ExportState.SENT
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
        assert s.scalar(select(db.Export)).state == db.ExportState.PENDING
        assert s.get(db.Job, job_id).state == db.JobState.EXPORTING
