"""The draft in the real OHIF viewer, end to end.

A modality sends an enhanced multi-frame (Philips-style) cardiac study to the PACS (a real
Orthanc) and to ``cmr-ai serve``; the node's Celery worker runs the nf4 demo model and the
draft goes to Orthanc over STOW-RS. Then the built OHIF viewer (npm ``@ohif/app``, served by
``tests/viewer.py`` beside a proxy to that Orthanc) opens the study with the TID 1500 SR in
headless Chromium: no error may show, and every finding of the template must be listed by
its label. The screenshot is kept in ``var/test-artifacts/``.

Nothing here skips: a missing Chromium, OHIF build or Playwright fails with what to run.
"""
from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import pydicom
import pytest
import requests
from sqlalchemy import select

from peers import PeerMissing, dcmtk_storescu
from plugin import db
from plugin.phantom import write_study
from plugin.reports.template import load_template
from test_e2e import orthanc_study_objects, run_node, storescu
from viewer import OHIF_DIST, REPO, OhifServer, chromium_path, open_study

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
SC_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
ARTIFACTS = REPO / "var" / "test-artifacts"
TEMPLATE = "cmr_standard"  # the template of the node's rules (tests/test_e2e.py run_node)


def _require_viewer() -> None:
    """Fail (never skip) before any work when the viewer's parts are not installed."""
    try:
        chromium_path()
        if not (OHIF_DIST / "index.html").is_file():
            raise PeerMissing(f"the OHIF viewer build {OHIF_DIST} is missing: run `make viewer` (or `make test`)")
        import playwright.sync_api  # noqa: F401
    except PeerMissing as e:
        pytest.fail(str(e), pytrace=False)
    except ImportError:
        pytest.fail("Python Playwright missing: run `make venv` (it is in the dev extra) or `make test`",
                    pytrace=False)


def _group_comments(sr: pydicom.Dataset) -> list[str]:
    """The Comment (DCM 121106) TEXT of every measurement group (DCM 125007) under Imaging
    Measurements (DCM 126010): what OHIF shows as the measurements' labels."""
    def code(item) -> str:
        seq = item.get("ConceptNameCodeSequence")
        return seq[0].CodeValue if seq else ""

    out = []
    for container in sr.ContentSequence:
        if code(container) != "126010":
            continue
        for group in container.get("ContentSequence", []):
            if code(group) != "125007":
                continue
            out += [it.TextValue for it in group.get("ContentSequence", [])
                    if it.ValueType == "TEXT" and code(it) == "121106"]
    return out


def _wait_for_draft(node: dict, orthanc, study_uid: str, timeout: float = 300) -> list[dict]:
    """The study's SR and SC objects in Orthanc once the job is done and its exports are sent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with db.session_scope(node["db"]) as s:
            job = s.scalar(select(db.Job))
            if job is not None and job.state == db.JobState.FAILED:
                pytest.fail(f"job {job.id} failed: {job.error}")
            done = (job is not None and job.state == db.JobState.DONE and job.exports
                    and all(e.state == db.ExportState.SENT for e in job.exports))
            destinations = {e.destination for e in job.exports} if done else set()
        if done:
            assert destinations == {"pacs-web"}, destinations  # the STOW-RS destination
            objs = orthanc_study_objects(orthanc, study_uid)
            kinds = {o["sop_class"] for o in objs}
            assert COMPREHENSIVE_SR in kinds and any(k.startswith(SC_CLASS_PREFIX) for k in kinds), kinds
            return objs
        time.sleep(1)
    pytest.fail(f"no draft in Orthanc {timeout:.0f} s after sending; node log:\n"
                f"{node['log'].read_text()[-4000:]}")


@pytest.mark.slow
def test_ohif_opens_the_draft_and_lists_every_finding(tmp_path, orthanc, demo_model_dir):
    _require_viewer()
    template = load_template(TEMPLATE)
    study = write_study(tmp_path / "study", style="philips", seed=41, slices=6, phases=8,
                        study_description="Cardiac function via web")  # rule cardiac-over-web → STOW-RS
    # the modality sends the study to the PACS too: the viewer needs the images the SR points at
    r = dcmtk_storescu(orthanc.port, [tmp_path / "study"], aec=orthanc.aet,
                       extra_args=["+sd", "+r", "+sp", "*.dcm", "-R"])
    assert r.returncode == 0, f"storescu to Orthanc failed: {r.stdout}\n{r.stderr}"
    enhanced = [o for o in orthanc_study_objects(orthanc, study.study_instance_uid)
                if o["sop_class"] == ENHANCED_MR]
    assert enhanced and all(int(o["tags"].get("NumberOfFrames", 1)) > 1 for o in enhanced), \
        "the Philips-style study should be Enhanced MR multi-frame"

    gen = run_node(tmp_path, orthanc, demo_model_dir)
    node = next(gen)
    try:
        storescu(node["port"], tmp_path / "study")
        objs = _wait_for_draft(node, orthanc, study.study_instance_uid)
    finally:
        gen.close()  # stop the node and its worker: the browser gets the CPU

    sr_obj = next(o for o in objs if o["sop_class"] == COMPREHENSIVE_SR)
    sr = pydicom.dcmread(io.BytesIO(requests.get(
        f"{orthanc.base}/instances/{sr_obj['id']}/file", timeout=30).content))
    comments = _group_comments(sr)
    # the SR names every finding of the template, each in its own measurement group
    for finding in template.findings:
        assert sum(c.startswith(f"AI DRAFT — {finding.topic}: ") for c in comments) == 1, (finding.id, comments)
    assert len(comments) == len(template.findings), comments

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ohif-draft.png"
    shot.unlink(missing_ok=True)
    with OhifServer(orthanc.base) as ohif:
        page = open_study(ohif.url, study.study_instance_uid, sr.SeriesInstanceUID, tmp_path / "ohif.png",
                          wait_for_text=comments[-1])
    shutil.copyfile(page.screenshot, shot)
    print(f"OHIF: {page.url} in {page.seconds:.1f} s; screenshot {shot}")
    for line in page.console_errors:
        print(f"OHIF console error: {line[:300]}")
    (ARTIFACTS / "ohif-draft.txt").write_text(page.text, encoding="utf-8")

    shown = page.text
    assert page.error_texts == [], f"OHIF shows an error: {page.error_texts}; screenshot {shot}\n{shown[:3000]}"
    assert page.page_errors == [], f"page errors (screenshot {shot}):\n" + "\n".join(page.page_errors)
    missing = [c for c in comments if c not in shown]
    assert not missing, (f"OHIF does not list {len(missing)} of {len(comments)} findings: {missing}; "
                         f"screenshot {shot}; console errors: {page.console_errors}; page text:\n{shown[:3000]}")
    # OHIF's measurement panel lists exactly the draft's findings
    assert f"Measurements ({len(comments)})" in shown, f"screenshot {shot}; page text:\n{shown[:3000]}"
    dicomweb_failures = [f for f in page.failed_requests if "/dicom-web" in f or "/wado" in f]
    assert not dicomweb_failures, dicomweb_failures
    assert page.console_errors == [], f"console errors (screenshot {shot}):\n" + "\n".join(page.console_errors)
