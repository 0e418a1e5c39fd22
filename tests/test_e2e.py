"""The spine, end to end, with real parts.

dcmtk's storescu sends synthetic cardiac studies of three vendor styles (and a brain
MR and a CT) to ``cmr-ai serve``; the node's embedded Celery worker (a real
subprocess on the SQLite broker) runs the nf4 demo model; the SR, narrative SR,
SC and GSPS arrive in a real Orthanc over C-STORE and over STOW-RS; dciodvfy finds no error
in what we wrote; the non-cardiac studies produce nothing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from sqlalchemy import select

from peers import dciodvfy_errors, free_port
from plugin import db
from plugin.phantom import write_brain_mr, write_ct, write_study

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.11"}
SC_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"


def _wait_port(port, proc, timeout=60):
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "node exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError("node did not listen")


def storescu(port: int, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["/usr/bin/storescu", "-aet", "MODALITY", "-aec", "CMR_AI", "+sd", "+r", "+sp", "*.dcm", "-R", *extra,
           "127.0.0.1", str(port), str(folder)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"storescu failed: {r.stdout}\n{r.stderr}"
    return r


def orthanc_study_objects(orthanc, study_uid: str) -> list[dict]:
    """Instances of a study in Orthanc with their SOP class (via the REST API)."""
    base = f"http://127.0.0.1:{orthanc.http_port}"
    ids = requests.post(f"{base}/tools/lookup", data=study_uid, timeout=10).json()
    study = [x for x in ids if x["Type"] == "Study"]
    if not study:
        return []
    out = []
    for inst in requests.get(f"{base}/studies/{study[0]['ID']}/instances", timeout=10).json():
        tags = requests.get(f"{base}/instances/{inst['ID']}/simplified-tags", timeout=10).json()
        out.append({"id": inst["ID"], "sop_class": tags.get("SOPClassUID", ""), "tags": tags})
    return out


@pytest.fixture()
def node(tmp_path, orthanc, demo_model_dir):
    yield from run_node(tmp_path, orthanc, demo_model_dir)


def write_serve_config(tmp_path, port: int, model_dir, destinations: str, rules: str, extra: str = ""):
    """Write ``tmp_path/config.yaml``: embedded defaults under ``tmp_path/var``, the demo model unless
    ``model_dir`` is None, the given ``destinations:`` and ``rules:`` YAML bodies, then ``extra``
    (more top-level sections). Returns its path."""
    cfg = tmp_path / "config.yaml"
    models = f'models: {{demo: {{path: "{model_dir}", quantization: nf4}}}}' if model_dir is not None else ""
    cfg.write_text(f"""
node: {{ae_title: CMR_AI, host: 127.0.0.1, port: {port}}}
storage: {{path: {tmp_path / 'var' / 'dicom'}}}
database: {{url: "sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"}}
queue: {{broker: embedded}}
{models}
destinations:
{destinations}
rules:
{rules}
{extra}
""")
    return cfg


def start_serve(tmp_path, port: int, model_dir, destinations: str, rules: str, *args: str,
                cwd=None, extra: str = "") -> subprocess.Popen:
    """Write ``tmp_path/config.yaml`` (:func:`write_serve_config`) and start ``cmr-ai serve [args]``
    on ``port`` in its own process group, logging to ``tmp_path/node.log`` (appended)."""
    cfg = write_serve_config(tmp_path, port, model_dir, destinations, rules, extra)
    log = open(tmp_path / "node.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "plugin.cli", "serve", "--config", str(cfg), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True, cwd=cwd)
    log.close()  # the child has its own copy of the descriptor
    return proc


def run_node(tmp_path, orthanc, model_dir):
    port = free_port()
    destinations = f"""\
  pacs: {{dimse: {{ae_title: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.port}}}}}
  pacs-web: {{dicomweb: {{url: "{orthanc.dicomweb_url}"}}}}"""
    rules = """\
  - name: cardiac-over-web
    match: {Modality: MR, StudyDescription: "(?i)cardiac.*web"}
    stable_after: 2
    template: cmr_standard
    model: demo
    send_to: [pacs-web]
  - name: cardiac-mr
    match: {Modality: MR, StudyDescription: "(?i)card|heart|cmr"}
    stable_after: 2
    template: cmr_standard
    model: demo
    send_to: [pacs]
  - {name: everything-else, match: {}, action: ignore}"""
    proc = start_serve(tmp_path, port, model_dir, destinations, rules)
    try:
        _wait_port(port, proc)
        yield {"port": port, "db": f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}", "log": tmp_path / "node.log",
               "proc": proc}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        print((tmp_path / "node.log").read_text()[-6000:])


def test_cardiac_studies_in_ai_draft_out_non_cardiac_ignored(node, orthanc, tmp_path):
    siemens = write_study(tmp_path / "siemens", style="siemens", seed=11, study_description="CMR cardiac function")
    ge = write_study(tmp_path / "ge", style="ge", seed=12, study_description="Cardiac via web")
    philips = write_study(tmp_path / "philips", style="philips", seed=13, study_description="Heart function")
    write_brain_mr(tmp_path / "brain", seed=14)
    write_ct(tmp_path / "ct", seed=15)
    t0 = time.monotonic()
    storescu(node["port"], tmp_path / "siemens")
    storescu(node["port"], tmp_path / "ge", "-xr")  # RLE files are sent as they are
    storescu(node["port"], tmp_path / "philips")
    storescu(node["port"], tmp_path / "brain")
    storescu(node["port"], tmp_path / "ct")
    sent_at = time.monotonic()

    cardiac = {siemens.study_instance_uid: "pacs", ge.study_instance_uid: "pacs-web",
               philips.study_instance_uid: "pacs"}
    found: dict[str, list[dict]] = {}
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline and len(found) < len(cardiac):
        for uid in cardiac:
            objs = [o for o in orthanc_study_objects(orthanc, uid)
                    if o["sop_class"] in SR_CLASSES or o["sop_class"].startswith(SC_CLASS_PREFIX)
                    or o["sop_class"] == GSPS_CLASS]
            if len(objs) >= 4:
                found[uid] = objs
        with db.session_scope(node["db"]) as s:
            failed = s.scalars(select(db.Job).where(db.Job.state == db.JobState.FAILED)).all()
            assert not failed, [(j.id, j.error) for j in failed]
        time.sleep(2)
    elapsed = time.monotonic() - sent_at
    print(f"send took {sent_at - t0:.1f} s; drafts for {len(found)} studies in Orthanc {elapsed:.1f} s after sending")
    assert len(found) == len(cardiac), f"drafts missing after {elapsed:.0f} s: {set(cardiac) - set(found)}"

    base = f"http://127.0.0.1:{orthanc.http_port}"
    for uid, objs in found.items():
        kinds = sorted(o["sop_class"] for o in objs)
        assert "1.2.840.10008.5.1.4.1.1.88.33" in kinds, kinds  # Comprehensive SR (TID 1500)
        assert any(k.startswith(SC_CLASS_PREFIX) for k in kinds), kinds
        assert GSPS_CLASS in kinds, kinds  # presentation state on the original images
        for o in objs:
            path = tmp_path / f"{o['id']}.dcm"
            path.write_bytes(requests.get(f"{base}/instances/{o['id']}/file", timeout=30).content)
            assert dciodvfy_errors(path) == [], (o["sop_class"], dciodvfy_errors(path))
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == uid
            if o["sop_class"] in SR_CLASSES:
                assert ds.VerificationFlag == "UNVERIFIED"
                if o["sop_class"] == "1.2.840.10008.5.1.4.1.1.88.33":
                    assert ds.PreliminaryFlag == "PRELIMINARY"

    with db.session_scope(node["db"]) as s:
        jobs = s.scalars(select(db.Job)).all()
        assert sorted(j.state for j in jobs) == [db.JobState.DONE] * 3
        for j in jobs:
            assert {e.destination for e in j.exports} == {cardiac[j.study.study_instance_uid]}
            assert all(e.state == db.ExportState.SENT for e in j.exports)
            assert j.model_fingerprint
            audit = s.scalars(select(db.Audit).where(db.Audit.job_id == j.id)).one()
            assert audit.model_fingerprint == j.model_fingerprint and audit.template == "cmr_standard"
            found = {f["id"] for f in json.loads(j.result_json)["findings"]}
            assert set(audit.as_dict()["option_scores"]) == found
            assert audit.as_dict()["image_hashes"] and audit.as_dict()["prompts"]
        states = {st.study_instance_uid: st.state for st in s.scalars(select(db.Study)).all()}
        ignored = [u for u, st in states.items() if u not in cardiac]
        assert len(ignored) == 2 and all(states[u] == db.StudyState.IGNORED for u in ignored)
    # nothing was produced for the brain MR and the CT
    all_sr = requests.post(f"{base}/tools/find", json={"Level": "Series", "Query": {"Modality": "SR"}},
                           timeout=10).json()
    assert len(all_sr) == 3 * 2  # per cardiac study: the TID 1500 SR and the narrative SR


def test_a_model_that_cannot_load_fails_the_job_with_the_reason(tmp_path, orthanc):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "README.txt").write_text("weights go here")
    gen = run_node(tmp_path, orthanc, not_a_model)
    node = next(gen)
    try:
        study = write_study(tmp_path / "study", style="siemens", seed=21, slices=4, phases=6, size=64)
        storescu(node["port"], tmp_path / "study")
        deadline = time.monotonic() + 180
        job = None
        while time.monotonic() < deadline:
            with db.session_scope(node["db"]) as s:
                job = s.scalar(select(db.Job))
                if job is not None and job.state.finished:
                    break
            time.sleep(1)
        assert job is not None and job.state == db.JobState.FAILED, job and (job.state, job.error)
        assert "infer" in job.error and "config.json" in job.error and str(not_a_model) in job.error
        assert orthanc_study_objects(orthanc, study.study_instance_uid) == []
    finally:
        gen.close()
