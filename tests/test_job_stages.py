"""Each job stage is time-stamped when the job enters it (what /metrics' latencies are made of)."""
from __future__ import annotations

from plugin import db


def test_entering_a_state_stamps_its_stage_and_requeue_clears_them(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with db.session_scope(url) as s:
        st = db.Study(study_instance_uid="1.2.3", patient_id="", study_description="", accession_number="",
                      calling_ae="X", source_ip="", first_received=db.utcnow(), last_received=db.utcnow(),
                      state=db.StudyState.COMPLETE, n_instances=1)
        s.add(st)
        s.flush()
        job = db.Job(study_id=st.id, rule="r", template="t", model="m", state=db.JobState.QUEUED)
        s.add(job)
        s.flush()
        stamps = []
        for state, col in [(db.JobState.PREPARING, "started_at"), (db.JobState.INFERRING, "prepared_at"),
                           (db.JobState.REPORTING, "inferred_at"), (db.JobState.EXPORTING, "reported_at"),
                           (db.JobState.DONE, "finished_at")]:
            assert getattr(job, col) is None
            job.state = state
            stamps.append(getattr(job, col))
            assert stamps[-1] is not None
        assert stamps == sorted(stamps)
        job.state = db.JobState.DONE  # the same state again: the stamp stays
        assert job.finished_at == stamps[-1]
        job.state = db.JobState.QUEUED  # a new run
        assert (job.started_at, job.prepared_at, job.finished_at) == (None, None, None)
