"""Issue 7's "done when", end to end through ``cmr-ai serve``.

An enhanced multi-frame (Philips-style) study is sent with dcmtk's storescu to the node
while its STOW-RS destination (a real Orthanc) is down. The draft waits in the outbox;
when Orthanc comes back it gets the TID 1500 SR, the narrative SR, the Secondary Capture
and the presentation state, each exactly once (Orthanc logs every instance it receives,
duplicates included), all dciodvfy-clean and readable by pydicom and highdicom. The same
study is then sent again: it is analysed again, with the same UIDs and content, and the
new rows are recorded as already delivered — Orthanc receives nothing new and holds one
SR. The OHIF side of the same draft is tests/test_viewer.py.
"""
from __future__ import annotations

import io
import time
from collections import Counter

import highdicom as hd
import pydicom
import pytest
import requests
from sqlalchemy import select

from peers import dciodvfy_errors
from plugin import db
from plugin.phantom import write_study
from test_e2e import orthanc_study_objects, run_node, storescu
from plugin.reports.template import load_template
from test_outbox import counting_orthanc, received
from test_reports import measurement_groups

CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.33": "sr",        # Comprehensive SR, TID 1500
    "1.2.840.10008.5.1.4.1.1.88.22": "text-sr",   # Enhanced SR, narrative
    "1.2.840.10008.5.1.4.1.1.7": "sc",            # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.11.1": "pr",         # Grayscale Softcopy Presentation State
}


def jobs_of(node) -> list[tuple[int, db.JobState, list[tuple]]]:
    with db.session_scope(node["db"]) as s:
        return [(j.id, j.state, sorted((e.kind, e.sop_instance_uid, e.state, e.attempts, e.duplicate_of, e.status)
                                       for e in j.exports))
                for j in s.scalars(select(db.Job).order_by(db.Job.id)).all()]


def wait(predicate, what: str, node, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        failed = [j for j in jobs_of(node) if j[1] == db.JobState.FAILED]
        if failed:
            with db.session_scope(node["db"]) as s:
                pytest.fail(f"job failed: {s.get(db.Job, failed[0][0]).error}")
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f} s; jobs {jobs_of(node)}\nnode log:\n"
                f"{node['log'].read_text()[-4000:]}")


@pytest.mark.slow
def test_enhanced_study_draft_reaches_a_pacs_that_was_down_once_and_a_resend_adds_nothing(
        tmp_path, make_orthanc, demo_model_dir):
    pacs = counting_orthanc(make_orthanc, tmp_path)
    study = write_study(tmp_path / "study", style="philips", seed=23, slices=6, phases=8,
                        study_description="Cardiac function via web")  # rule cardiac-over-web → STOW-RS
    gen = run_node(tmp_path, pacs, demo_model_dir)
    node = next(gen)
    try:
        pacs.stop(graceful=False)  # the PACS is down when the results are ready
        storescu(node["port"], tmp_path / "study")

        def tried_while_down():
            jobs = jobs_of(node)
            return (len(jobs) == 1 and jobs[0][1] == db.JobState.EXPORTING and len(jobs[0][2]) == 4
                    and all(e[2] == db.ExportState.PENDING and e[3] >= 1 for e in jobs[0][2]))

        wait(tried_while_down, "every result tried once against the stopped PACS and kept", node)
        assert all(e[5] for e in jobs_of(node)[0][2]), jobs_of(node)  # the peer's failure is on the row

        pacs.restart()
        wait(lambda: jobs_of(node)[0][1] == db.JobState.DONE, "draft delivered after the PACS came back", node)
        (job_id, _, rows), = jobs_of(node)
        assert sorted(r[0] for r in rows) == ["pr", "sc", "sr", "text-sr"]
        uids = {r[1] for r in rows}
        assert received(pacs) == Counter({u: 1 for u in uids}), "each object exactly once"

        objs = [o for o in orthanc_study_objects(pacs, study.study_instance_uid) if o["sop_class"] in CLASSES]
        assert sorted(CLASSES[o["sop_class"]] for o in objs) == ["pr", "sc", "sr", "text-sr"]
        for o in objs:
            kind = CLASSES[o["sop_class"]]
            data = requests.get(f"{pacs.base}/instances/{o['id']}/file", timeout=30).content
            path = tmp_path / f"{kind}.dcm"
            path.write_bytes(data)
            assert dciodvfy_errors(path) == [], (kind, dciodvfy_errors(path))
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.StudyInstanceUID == study.study_instance_uid and ds.SOPInstanceUID in uids
            if kind == "sr":
                sr = hd.sr.ComprehensiveSR.from_dataset(ds)
                assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"
                assert len(measurement_groups(sr)) == len(load_template("cmr_standard").findings)
            elif kind == "text-sr":
                hd.sr.EnhancedSR.from_dataset(ds)
            elif kind == "sc":
                assert ds.BurnedInAnnotation == "YES"
                assert hd.imread(io.BytesIO(data)).pixel_array.ndim == 3
            else:  # the presentation state references frames of the enhanced source
                refs = [im for s in ds.ReferencedSeriesSequence for im in s.ReferencedImageSequence]
                assert refs and all("ReferencedFrameNumber" in im for im in refs)

        # the modality sends the same study again: analysed again, nothing new in the PACS
        storescu(node["port"], tmp_path / "study")
        wait(lambda: len(jobs_of(node)) == 2 and jobs_of(node)[1][1] == db.JobState.DONE,
             "the second analysis finished", node)
        second = jobs_of(node)[1][2]
        assert {r[1] for r in second} == uids, "same inputs, same UIDs"
        assert all(r[2] == db.ExportState.SENT and r[4] is not None for r in second), second
        assert received(pacs) == Counter({u: 1 for u in uids}), "nothing sent twice"
        srs = [o for o in orthanc_study_objects(pacs, study.study_instance_uid)
               if CLASSES.get(o["sop_class"]) == "sr"]
        assert len(srs) == 1
    finally:
        gen.close()
