"""Issue 10, done when: a cardiac study placed in a real Orthanc (DICOMweb plugin) is pulled
with ``cmr-ai pull`` (``poll_every: 0``), analysed, and its SR lands back in Orthanc; a
running node's poller finds a new study by itself and its drafts go back over STOW-RS,
without pulling its own drafts in again.

Real parts only: Orthanc 1.10 + DICOMweb plugin as the archive and PACS, dcmtk storescu
putting the studies into it, ``cmr-ai pull`` / ``cmr-ai serve`` subprocesses with the
embedded Celery worker and the nf4 demo model.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pydicom
import requests
from sqlalchemy import select

from peers import dciodvfy_errors, dcmtk_storescu, free_port, stop_process
from plugin import db
from plugin.phantom import write_study
from test_e2e import (GSPS_CLASS, SC_CLASS_PREFIX, SR_CLASSES, _wait_port, orthanc_study_objects, start_serve,
                      write_serve_config)

TID1500 = "1.2.840.10008.5.1.4.1.1.88.33"

RULES = """\
  - name: cardiac-mr
    match: {Modality: MR, StudyDescription: "(?i)card|heart|cmr"}
    stable_after: 2
    template: cmr_standard
    model: demo
    send_to: [pacs-web]
  - {name: everything-else, match: {}, action: ignore}"""


def _destinations(orthanc) -> str:
    return f'  pacs-web: {{dicomweb: {{url: "{orthanc.dicomweb_url}"}}}}'


def _sources(orthanc, poll_every: float) -> str:
    return f"""
sources:
  archive:
    dicomweb: {{url: "{orthanc.dicomweb_url}", timeout: 30}}
    query: {{ModalitiesInStudy: MR}}
    poll_every: {poll_every}
    window_days: 0
"""


def _into_orthanc(orthanc, folder) -> None:
    files = sorted(p for p in folder.rglob("*.dcm"))
    r = dcmtk_storescu(orthanc.port, files, aet="SCANNER", aec=orthanc.aet, extra_args=["-xr"])  # GE style is RLE
    assert r.returncode == 0, r.stderr[-2000:]


def _drafts(orthanc, study_uid: str) -> list[dict]:
    return [o for o in orthanc_study_objects(orthanc, study_uid)
            if o["sop_class"] in SR_CLASSES or o["sop_class"].startswith(SC_CLASS_PREFIX)
            or o["sop_class"] == GSPS_CLASS]


def _check_sr(orthanc, objs: list[dict], study_uid: str, tmp_path) -> None:
    srs = [o for o in objs if o["sop_class"] == TID1500]
    assert len(srs) == 1, [o["sop_class"] for o in objs]
    path = tmp_path / "sr.dcm"
    path.write_bytes(requests.get(f"{orthanc.base}/instances/{srs[0]['id']}/file", timeout=30).content)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == study_uid and ds.VerificationFlag == "UNVERIFIED"


def test_cmr_ai_pull_analyses_a_study_from_the_archive_and_its_sr_lands_back(tmp_path, orthanc, demo_model_dir):
    study = write_study(tmp_path / "study", style="siemens", seed=41, study_description="CMR cardiac function")
    _into_orthanc(orthanc, tmp_path / "study")
    n_files = sum(1 for _ in (tmp_path / "study").rglob("*.dcm"))
    # the source of the issue (poll_every: 0); no node runs
    cfg = write_serve_config(tmp_path, free_port(), demo_model_dir, _destinations(orthanc), RULES,
                             _sources(orthanc, 0))

    r = subprocess.run([sys.executable, "-m", "plugin.cli", "pull", "--config", str(cfg), "--source",
                        "archive", study.study_instance_uid, "--progress"], capture_output=True, text=True,
                       timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, r.stderr[-3000:]

    url = f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"
    with db.session_scope(url) as s:
        st = s.scalar(select(db.Study).where(db.Study.study_instance_uid == study.study_instance_uid))
        assert st.n_instances == n_files and st.rule == "cardiac-mr"
        jobs = s.scalars(select(db.Job)).all()
        assert [j.state for j in jobs] == [db.JobState.DONE], [(j.state, j.error) for j in jobs]
        assert all(e.state == db.ExportState.SENT and e.destination == "pacs-web" for e in jobs[0].exports)
        row = s.scalar(select(db.SourceStudy))
        assert (row.source, row.state, row.study_instance_uid) == ("archive", db.PullState.DONE,
                                                                    study.study_instance_uid)
    objs = _drafts(orthanc, study.study_instance_uid)
    assert any(o["sop_class"] == TID1500 for o in objs), objs
    _check_sr(orthanc, objs, study.study_instance_uid, tmp_path)


def test_the_poller_of_a_running_node_finds_a_new_study_and_does_not_pull_its_own_drafts(
        tmp_path, orthanc, demo_model_dir):
    port = free_port()
    proc = start_serve(tmp_path, port, demo_model_dir, _destinations(orthanc), RULES, extra=_sources(orthanc, 1))
    try:
        _wait_port(port, proc)
        url = f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"
        time.sleep(2)  # the poller has looked at the empty archive at least once
        study = write_study(tmp_path / "study", style="ge", seed=42, study_description="Heart function")
        _into_orthanc(orthanc, tmp_path / "study")
        deadline = time.monotonic() + 420
        objs: list[dict] = []
        while time.monotonic() < deadline:
            objs = _drafts(orthanc, study.study_instance_uid)
            if any(o["sop_class"] == TID1500 for o in objs) and len(objs) >= 4:
                break
            with db.session_scope(url) as s:
                failed = s.scalars(select(db.Job).where(db.Job.state == db.JobState.FAILED)).all()
                assert not failed, [(j.id, j.error) for j in failed]
            assert proc.poll() is None, (tmp_path / "node.log").read_text()[-4000:]
            time.sleep(2)
        else:
            raise AssertionError(f"no draft in Orthanc; node log:\n{(tmp_path / 'node.log').read_text()[-6000:]}")
        _check_sr(orthanc, objs, study.study_instance_uid, tmp_path)
        # the drafts are in the archive's study now: the poller sees the study grow, and must neither
        # fetch our own objects nor re-open and re-analyse the study
        time.sleep(5)
        with db.session_scope(url) as s:
            jobs = s.scalars(select(db.Job)).all()
            assert [j.state for j in jobs] == [db.JobState.DONE]
            st = s.scalar(select(db.Study).where(db.Study.study_instance_uid == study.study_instance_uid))
            assert st.state == db.StudyState.COMPLETE
            n_original = sum(1 for _ in (tmp_path / "study").rglob("*.dcm"))
            assert st.n_instances == n_original
    finally:
        stop_process(proc)
        print((tmp_path / "node.log").read_text()[-6000:])


def test_cmr_ai_pull_hands_the_study_to_a_running_node_which_routes_it(tmp_path, orthanc):
    """With a node running on the same config, ``cmr-ai pull`` only stores and indexes: the node routes
    the study (here: forwards its originals to a folder destination through the outbox)."""
    study = write_study(tmp_path / "study", style="siemens", seed=43, study_description="CMR cardiac function")
    _into_orthanc(orthanc, tmp_path / "study")
    out = tmp_path / "forwarded"
    port = free_port()
    rules = """\
  - name: forward-cardiac
    match: {Modality: MR}
    stable_after: 1
    action: forward
    forward_to: [copy]"""
    proc = start_serve(tmp_path, port, None, f"  copy: {{folder: {out}}}", rules, "--no-worker",
                       extra=_sources(orthanc, 0))
    try:
        _wait_port(port, proc)
        r = subprocess.run([sys.executable, "-m", "plugin.cli", "pull", "--config", str(tmp_path / "config.yaml"),
                            "--source", "archive", study.study_instance_uid], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"the running node (pid {proc.pid}) will route the study" in r.stdout, r.stdout
        originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                     for p in (tmp_path / "study").rglob("*.dcm")}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out.exists() and len(list(out.rglob("*.dcm"))) == len(originals):
                break
            time.sleep(0.5)
        assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in out.rglob("*.dcm")} == originals
        log = (tmp_path / "node.log").read_text()
        assert f"study {study.study_instance_uid} complete ({len(originals)} instances)" in log, log[-3000:]
    finally:
        stop_process(proc)
