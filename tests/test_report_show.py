"""``cmr-ai report show``: our TID 1500 and narrative SRs read back into a readable report
(text, HTML, JSON), any vendor's SR through the generic content-tree reader, clear exit-2
errors for files that are not DICOM SRs, and SRs that went through a real PACS."""
from __future__ import annotations

import datetime
import html
import json
import re
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from test_reports import (STUDY_UID, bundle_image, fake_result, make_enhanced_mr,  # noqa: F401
                          make_mr, study)

from peers import dcmtk_storescu
from plugin.cli import main
from plugin.reports.show import (NotAStructuredReport, ReportError, TextKind, read_report,
                                 render_html, render_text)
from plugin.reports.sr import (DRAFT_NOTICE, answers, build_measurement_report,
                               build_narrative_report)
from plugin.reports.template import default_templates_dir, load_template
from worker.bundle import InferenceResult
from worker.safety import FlagKind, SafetyFlag, SafetyReport

# a label with HTML specials: every renderer must escape it, not interpret it
ODD_LABEL = 'LV size <2 SD & "wide">'
SAFETY_MESSAGE = "impression says normal LV size but the scored answer is mildly enlarged"
CMR_AI = Path(sys.executable).with_name("cmr-ai")  # the venv's console script


def distinct_result(template, images) -> InferenceResult:
    """``fake_result`` with a different probability per finding, so a value shown on the
    wrong line cannot pass."""
    base = fake_result(template, images)
    findings = []
    for i, fr in enumerate(base.findings):
        p = round(0.51 + 0.047 * i, 3)
        others = [k for k in fr.probabilities if k != fr.answer]
        probs = {k: (1 - p) / len(others) for k in others} | {fr.answer: p}
        findings.append(fr.model_copy(update={"probabilities": probs}))
    return base.model_copy(update={"findings": findings})


@pytest.fixture(scope="module")
def saved(study, tmp_path_factory):  # noqa: F811 — the fixture imported from test_reports
    """Our two SRs of a phantom study, written to disk (template with an odd label)."""
    images, sources = study
    out = tmp_path_factory.mktemp("show")
    text = (default_templates_dir() / "cmr_standard.yaml").read_text()
    assert "label: LV size\n" in text
    (out / "cmr_standard.yaml").write_text(text.replace("label: LV size\n", f"label: '{ODD_LABEL}'\n"))
    t = load_template(out / "cmr_standard.yaml")
    result = distinct_result(t, images)
    safety = SafetyReport(flags=[SafetyFlag(kind=FlagKind.CONTRADICTION, message=SAFETY_MESSAGE)])
    paths = {"sr": out / "sr.dcm", "text": out / "text.dcm", "mr": out / "mr.dcm"}
    build_measurement_report(t, result, images, sources, safety=safety).save_as(
        paths["sr"], enforce_file_format=True)
    build_narrative_report(t, result, images, sources, safety=safety).save_as(
        paths["text"], enforce_file_format=True)
    next(iter(sources.values())).save_as(paths["mr"], enforce_file_format=True)
    return t, result, images, paths


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["report", "show", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def finding_lines(out: str) -> dict[int, str]:
    """The numbered lines of the Findings section: ``{1: "  1.  image_quality …"}``."""
    section = out.split("\nFindings (", 1)[1].split("\n\n", 1)[0]
    return {int(m.group(1)): line for line in section.splitlines()[1:]
            if (m := re.match(r"\s+(\d+)\.\s", line))}


# ---------------------------------------------------------------------------
# TID 1500

def test_measurement_report_text(saved, capsys):
    t, result, images, paths = saved
    rc, out, err = run_cli(capsys, paths["sr"])
    print(out)
    assert rc == 0 and err == ""
    ans = answers(t, result)
    assert len(ans) == len(t.findings) == 9
    head = out.split("\nFindings (", 1)[0]
    assert "*** UNVERIFIED AI DRAFT" in head.splitlines()[1]  # right under the first rule
    assert "VerificationFlag UNVERIFIED" in head and "PreliminaryFlag PRELIMINARY" in head
    assert "completion PARTIAL" in head
    assert "Phantom, Cardiac" in head and "CMR-0001" in head and "2024-01-02" in head
    assert "Imaging Measurement Report (DCM 126000), Comprehensive SR Storage, TID 1500" in head
    assert "device 'cmr-ai', manufacturer cmr-ai, model tiny-llava" in head
    assert re.search(r"procedure:\s+Cardiac MRI", head)

    lines = finding_lines(out)
    assert sorted(lines) == list(range(1, 10))
    by_key = {im.key: im for im in images}
    for i, (a, fr) in enumerate(zip(ans, result.findings), 1):
        line = lines[i]
        for expected in (a.finding.id, a.finding.topic, a.option.text, a.option.code.code.meaning,
                         a.finding.concept.code.meaning, f"p {a.probability:.2f}", a.comment,
                         f"[on …{by_key[fr.image_keys[0]].source.sop_instance_uid[-12:]}]"):
            assert expected in line, f"{expected!r} not on the line of {a.finding.id}: {line}"
        if a.finding.site:
            assert f"@ {a.finding.site.code.meaning}" in line
    # report-level sections
    sections = out.split("\n\n")

    def section(name: str) -> str:
        return next(s for s in sections if s.startswith(name + "\n"))

    assert "AI DRAFT impression: Mildly reduced LV systolic function" in section("Impression")
    safety = section("Safety flags")
    assert f"AI SAFETY FLAG: {SAFETY_MESSAGE}" in safety
    assert "CRITICAL — urgent review: Pericardial effusion: large" in safety
    assert "Probabilities are the model's option scores" in section("Limitations")
    assert DRAFT_NOTICE in section("Notes")
    equipment = section("Contributing equipment")
    assert "Processing Equipment: cmr-ai cmr-ai" in equipment and "Acquisition Equipment: SIEMENS" in equipment
    assert "\nContent\n" not in out  # the outline only with --tree
    rc, tree, _ = run_cli(capsys, paths["sr"], "--tree")
    assert rc == 0 and "\nContent\n" in tree and "CONTAINS CONTAINER Measurement Group" in tree


def test_measurement_report_data(saved):
    """The structures tests and callers use: one FindingLine per group, values typed."""
    t, result, images, paths = saved
    r = read_report(paths["sr"])
    ans = answers(t, result)
    assert r.is_tid1500 and r.banner == "UNVERIFIED AI DRAFT"
    assert r.unverified and r.preliminary and r.by_device
    assert r.completion_flag == "PARTIAL" and r.warnings == ()
    assert r.procedures == ("Cardiac MRI",)
    assert [o.kind for o in r.observers] == ["Device"] and r.observers[0].model == "tiny-llava"
    assert r.image_library == 4 and r.evidence == "4 instances in 3 series"
    by_key = {im.key: im for im in images}
    assert len(r.findings) == len(ans)
    for f, a, fr in zip(r.findings, ans, result.findings):
        assert f.tracking_id == a.finding.id and f.tracking_uid
        assert f.finding_code.value == a.finding.concept.value
        assert f.probability == pytest.approx(a.probability, abs=1e-4)
        assert [e.code.value for e in f.evaluations] == [a.option.code.value]
        assert f.comments == (a.comment,)
        assert f.image.sop_instance_uid == by_key[fr.image_keys[0]].source.sop_instance_uid
        assert f.image.frames == () and f.region == "POLYLINE"
        assert f.extra == ()  # every item of our groups has its place on the line
    kinds = [x.kind for x in r.texts]
    assert kinds.count(TextKind.IMPRESSION) == 1 and kinds.count(TextKind.SAFETY) == 2
    assert [x.value for x in r.texts if x.kind == TextKind.LIMITATION] == list(t.limitations)
    assert r.other == ()  # nothing at the top level that the view leaves out
    assert any(e.purpose == "Processing Equipment" and e.manufacturer == "cmr-ai" for e in r.equipment)


def test_html_escapes_and_is_self_contained(saved, capsys, tmp_path):
    t, result, images, paths = saved
    out_html = tmp_path / "report.html"
    rc, out, err = run_cli(capsys, paths["sr"], paths["text"], "--html", out_html)
    assert rc == 0 and err == ""
    assert f"HTML: {out_html} (2 reports)" in out
    page = out_html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('<div class="banner">UNVERIFIED AI DRAFT') == 2
    # the odd label: escaped everywhere, never raw
    assert ODD_LABEL not in page and "<2 SD" not in page
    assert html.escape(ODD_LABEL) in page
    ans = answers(t, result)
    assert f"AI DRAFT — {html.escape(ODD_LABEL)}: normal" in page
    table = page.split('<table class="findings">', 1)[1].split("</table>", 1)[0]
    rows = table.split("<tbody>", 1)[1].split("<tr>")[1:]
    assert len(rows) == len(ans)
    for row, a in zip(rows, ans):
        assert html.escape(a.comment) in row and f">{a.probability:.2f}<" in row
        assert f"<code>{a.finding.id}</code>" in row
    assert "Diagnostic Imaging Report" in page  # the narrative SR's outline
    for external in ("<script", "<link", "src=", "http://", "https://", "@import", "url("):
        assert external not in page, external
    # render_html on its own, the same escaping
    assert html.escape(ODD_LABEL) in render_html(read_report(paths["sr"]))


def test_narrative_report_renders_as_outline(saved, capsys):
    t, result, images, paths = saved
    rc, out, err = run_cli(capsys, paths["text"])
    print(out)
    assert rc == 0 and err == ""
    assert "*** UNVERIFIED AI DRAFT" in out
    assert "Diagnostic Imaging Report (LN 18748-4), Enhanced SR Storage" in out
    assert "\nFindings (" not in out and "\nContent\n" in out
    assert re.search(r"\n\s+1\s+CONTAINER Diagnostic Imaging Report \[SEPARATE\]\n", out)
    m = re.search(r"\n\s+(1\.\d+)\s+CONTAINS CONTAINER Findings \[SEPARATE\]\n", out)
    assert m, "no Findings section in the outline"
    for i, a in enumerate(answers(t, result), 1):
        assert re.search(rf"\n\s+{re.escape(m.group(1))}\.{i}\s+CONTAINS TEXT Finding: {re.escape(a.line)}\n",
                         out), a.line
    assert f"AI SAFETY FLAG: {SAFETY_MESSAGE}" in out
    r = read_report(paths["text"])
    assert not r.is_tid1500 and r.findings == () and r.banner == "UNVERIFIED AI DRAFT"
    assert r.procedures == ("Cardiac MRI",) and r.observers[0].name == "cmr-ai"


def test_multiframe_reference_shows_frame(tmp_path):
    enh = make_enhanced_mr(frames=20)
    mf = bundle_image("SAX_mf_ES", "SAX", "ES", enh, frame=13)
    t = load_template("lv_function")
    sr = build_measurement_report(t, fake_result(t, [mf]), [mf], {enh.SOPInstanceUID: enh}, region="point")
    sr.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    r = read_report(tmp_path / "mf.dcm")
    assert [f.image.frames for f in r.findings] == [(13,)] * 3
    assert {f.region for f in r.findings} == {"POINT"}
    text = render_text(r)
    assert text.count(f"[on …{enh.SOPInstanceUID[-12:]} frame 13]") == 3


# ---------------------------------------------------------------------------
# errors

def test_not_an_sr_and_not_dicom_exit_2(saved, capsys, tmp_path):
    t, result, images, paths = saved
    junk = tmp_path / "notes.txt"
    junk.write_text("not <DICOM> at all\n" * 20)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    cases = {paths["mr"]: "not a DICOM Structured Report (SOP Class MR Image Storage",
             junk: "not a DICOM file", empty: "not a DICOM file",
             tmp_path / "missing.dcm": "cannot read: No such file or directory",
             tmp_path: "cannot read"}
    for path, words in cases.items():
        rc, out, err = run_cli(capsys, path)
        assert rc == 2, path
        assert out == ""
        assert err.count("\n") == 1 and err.startswith(f"cmr-ai report show: {path}: "), err
        assert words in err, err
    with pytest.raises(NotAStructuredReport, match="MR Image Storage"):
        read_report(paths["mr"])
    with pytest.raises(ReportError, match="not a DICOM file"):
        read_report(junk)
    # a bad file among good ones: the good one is still shown, the exit status says 2
    rc, out, err = run_cli(capsys, paths["sr"], junk, "--html", tmp_path / "mixed.html")
    assert rc == 2 and "UNVERIFIED AI DRAFT" in out and str(junk) in err
    assert (tmp_path / "mixed.html").exists()


def test_console_script_json(saved, tmp_path):
    """The installed ``cmr-ai`` console script, as an admin runs it."""
    t, result, images, paths = saved
    assert CMR_AI.exists(), f"{CMR_AI} missing: install the project (make venv)"
    proc = subprocess.run([str(CMR_AI), "report", "show", str(paths["sr"]), str(paths["text"]), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [d["is_tid1500"] for d in data] == [True, False]
    assert [d["banner"] for d in data] == ["UNVERIFIED AI DRAFT"] * 2
    ans = answers(t, result)
    assert [f["tracking_id"] for f in data[0]["findings"]] == [a.finding.id for a in ans]
    assert [f["probability"] for f in data[0]["findings"]] == pytest.approx([a.probability for a in ans], abs=1e-4)
    assert {x["kind"] for x in data[0]["texts"]} >= {"impression", "safety", "limitation", "comment"}
    proc = subprocess.run([str(CMR_AI), "report", "show", str(paths["mr"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"cmr-ai report show: {paths['mr']}: not a DICOM Structured Report "
                                   "(SOP Class MR Image Storage (1.2.840.10008.5.1.4.1.1.4), Modality MR)")


# ---------------------------------------------------------------------------
# SRs as a PACS gives them back

def test_sr_read_back_from_pacs(saved, orthanc, tmp_path, capsys):
    """C-STORE our SR into a real Orthanc, download it again, show it."""
    t, result, images, paths = saved
    sent = dcmtk_storescu(orthanc.port, [paths["sr"]], aec=orthanc.aet)
    assert sent.returncode == 0, sent.stderr
    uid = pydicom.dcmread(paths["sr"]).SOPInstanceUID
    oid = orthanc.find_instance(uid)
    assert oid, "Orthanc did not store the SR"
    with requests.Session() as http:
        http.trust_env = False
        r = http.get(f"{orthanc.base}/instances/{oid}/file", timeout=10)
    r.raise_for_status()
    from_pacs = tmp_path / "from_pacs.dcm"
    from_pacs.write_bytes(r.content)
    rc, out, err = run_cli(capsys, from_pacs)
    assert rc == 0 and err == ""
    assert "*** UNVERIFIED AI DRAFT" in out
    lines = finding_lines(out)
    for i, a in enumerate(answers(t, result), 1):
        assert a.comment in lines[i] and f"p {a.probability:.2f}" in lines[i]
    assert read_report(from_pacs).findings == read_report(paths["sr"]).findings


def test_sr_without_file_meta_implicit_vr(saved, tmp_path):
    """Some PACS exports write bare datasets: no preamble, no File Meta, implicit VR."""
    t, result, images, paths = saved
    ds = pydicom.dcmread(paths["sr"])
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    r = read_report(bare)
    assert r.findings == read_report(paths["sr"]).findings
    assert r.banner == "UNVERIFIED AI DRAFT"


# ---------------------------------------------------------------------------
# any vendor's SR: the generic content tree

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


def _foreign_sr(tmp_path: Path) -> tuple[Path, pydicom.Dataset, str]:
    """A verified, final Comprehensive 3D SR that no cmr-ai builder makes: every value type
    the reader knows, plus what vendors get wrong (a by-reference item, an unknown value
    type, a code without meaning, no Completion Flag)."""
    src = make_mr(11, 3)
    src.PatientName = "Doe^Jane^M^Dr"
    rel = hd.sr.RelationshipTypeValues
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, is_content_continuous=False)
    section = hd.sr.ContainerContentItem(name=codes.DCM.Findings, is_content_continuous=True,
                                         relationship_type=rel.CONTAINS)
    section.ContentSequence = [
        hd.sr.NumContentItem(name=codes.SCT.Diameter, value=12.5, unit=codes.UCUM.Millimeter,
                             relationship_type=rel.CONTAINS),
        hd.sr.CodeContentItem(name=codes.DCM.Finding, value=codes.SCT.PericardialEffusion,
                              relationship_type=rel.CONTAINS),
        hd.sr.TextContentItem(name=codes.DCM.Comment, value="first line\nsecond <line>",
                              relationship_type=rel.CONTAINS),
        hd.sr.ImageContentItem(name=codes.DCM.SourceImageForSegmentation, referenced_sop_class_uid=MR_IMAGE,
                               referenced_sop_instance_uid=src.SOPInstanceUID, referenced_frame_numbers=[3],
                               relationship_type=rel.CONTAINS),
        hd.sr.ScoordContentItem(name=codes.DCM.ImageRegion, graphic_type="POINT",
                                graphic_data=np.array([[10.0, 20.0]]), relationship_type=rel.CONTAINS),
        hd.sr.Scoord3DContentItem(name=codes.DCM.ImageRegion, graphic_type="POLYLINE",
                                  graphic_data=np.array([[0, 0, 0], [1, 2, 3.5]], dtype=float),
                                  frame_of_reference_uid=src.FrameOfReferenceUID,
                                  relationship_type=rel.CONTAINS),
    ]
    root.ContentSequence = [
        hd.sr.CodeContentItem(name=codes.DCM.ObserverType, value=codes.DCM.Person,
                              relationship_type=rel.HAS_OBS_CONTEXT),
        hd.sr.PnameContentItem(name=codes.DCM.PersonObserverName, value="Roe^Richard",
                               relationship_type=rel.HAS_OBS_CONTEXT),
        hd.sr.DateContentItem(name=codes.DCM.StudyDate, value=datetime.date(2024, 3, 5),
                              relationship_type=rel.HAS_OBS_CONTEXT),
        hd.sr.TimeContentItem(name=codes.DCM.StudyTime, value=datetime.time(14, 30, 5),
                              relationship_type=rel.HAS_OBS_CONTEXT),
        hd.sr.DateTimeContentItem(name=codes.DCM.DatetimeOfProcessing,
                                  value=datetime.datetime(2024, 3, 5, 14, 31, 0),
                                  relationship_type=rel.HAS_OBS_CONTEXT),
        hd.sr.UIDRefContentItem(name=codes.DCM.StudyInstanceUID, value=src.StudyInstanceUID,
                                relationship_type=rel.HAS_OBS_CONTEXT),
        section,
    ]
    sr = hd.sr.Comprehensive3DSR(
        evidence=[src], content=root, series_instance_uid=generate_uid(), series_number=77,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="OtherVendor",
        is_complete=True, is_final=True, is_verified=True, verifying_observer_name="Roe^Richard",
        verifying_organization="Elsewhere Hospital")
    path = tmp_path / "foreign.dcm"
    sr.save_as(path, enforce_file_format=True)
    sr = pydicom.dcmread(path)
    # what vendors get wrong, added by hand
    by_ref = pydicom.Dataset()
    by_ref.RelationshipType = "INFERRED FROM"
    by_ref.ReferencedContentItemIdentifier = [1, 7, 1]  # → the Diameter NUM
    odd = pydicom.Dataset()
    odd.RelationshipType = "CONTAINS"
    odd.ValueType = "FOO"
    odd.ConceptNameCodeSequence = [_code_ds("4711", "99VENDOR", "Vendor thing")]
    odd.add_new((0x0099, 0x0010), "LO", "VENDOR")
    no_meaning = pydicom.Dataset()
    no_meaning.RelationshipType = "CONTAINS"
    no_meaning.ValueType = "CODE"
    no_meaning.ConceptNameCodeSequence = [_code_ds("1234", "99VENDOR", None)]
    no_meaning.ConceptCodeSequence = [_code_ds("5678", "99VENDOR", None)]
    sr.ContentSequence[6].ContentSequence.append(by_ref)
    sr.ContentSequence.extend([odd, no_meaning])
    del sr.CompletionFlag
    sr.save_as(path, enforce_file_format=True)
    return path, src, str(sr.SOPInstanceUID)


def _code_ds(value: str, scheme: str, meaning) -> pydicom.Dataset:
    c = pydicom.Dataset()
    c.CodeValue, c.CodingSchemeDesignator = value, scheme
    if meaning is not None:
        c.CodeMeaning = meaning
    return c


def test_generic_sr_outline(tmp_path, capsys):
    path, src, sop_uid = _foreign_sr(tmp_path)
    rc, out, err = run_cli(capsys, path)
    print(out)
    assert rc == 0 and err == ""
    assert "DRAFT" not in out  # verified and final: no draft banner
    assert "verification VERIFIED · preliminary FINAL" in out and "completion" not in out
    assert "verified by:  Roe, Richard, Elsewhere Hospital" in out
    assert "Dr Doe, Jane M · ID CMR-0001" in out
    assert "observer:     person 'Roe, Richard'" in out
    assert re.search(rf"SOP instance:\s+{re.escape(sop_uid)}\n", out)
    expected = [
        r"1  CONTAINER Diagnostic Imaging Report \[SEPARATE\]",
        r"1\.1  HAS OBS CONTEXT CODE Observer Type: Person \(DCM 121006\)",
        r"1\.2  HAS OBS CONTEXT PNAME Person Observer Name: Roe, Richard",
        r"1\.3  HAS OBS CONTEXT DATE Study Date: 2024-03-05",
        r"1\.4  HAS OBS CONTEXT TIME Study Time: 14:30:05",
        r"1\.5  HAS OBS CONTEXT DATETIME DateTime of processing: 2024-03-05 14:31:00",
        rf"1\.6  HAS OBS CONTEXT UIDREF Study Instance UID: {re.escape(STUDY_UID)}",
        r"1\.7  CONTAINS CONTAINER Findings \[CONTINUOUS\]",
        r"1\.7\.1  CONTAINS NUM Diameter: 12\.5 mm",
        r"1\.7\.2  CONTAINS CODE Finding: Pericardial effusion \(SCT 373945007\)",
        r"1\.7\.3  CONTAINS TEXT Comment: first line\n\s+second <line>",
        rf"1\.7\.4  CONTAINS IMAGE Source image for segmentation: MR Image Storage …"
        rf"{re.escape(src.SOPInstanceUID[-12:])} frame 3",
        r"1\.7\.5  CONTAINS SCOORD Image Region: POINT, 1 point, x 10 y 20",
        rf"1\.7\.6  CONTAINS SCOORD3D Image Region: POLYLINE, 2 points, x 0–1 y 0–2 z 0–3\.5 "
        rf"\(frame of reference …{re.escape(src.FrameOfReferenceUID[-12:])}\)",
        r"1\.7\.7  INFERRED FROM → 1\.7\.1 NUM Diameter = 12\.5 mm",
        r"1\.8  CONTAINS FOO Vendor thing: \(value type FOO not shown; attributes: ",
        r"1\.9  CONTAINS CODE \(99VENDOR 1234\): \(99VENDOR 5678\)",
    ]
    for pattern in expected:
        assert re.search(r"\n\s+" + pattern, out), pattern
    r = read_report(path)
    assert not r.is_tid1500 and r.banner == "" and r.completion_flag == ""
    nodes = {n.id: n for n in r.content.walk()}
    assert nodes["1.7.1"].number == 12.5 and nodes["1.7.1"].unit == "mm"
    assert nodes["1.7.2"].code.value == "373945007"
    assert nodes["1.7.4"].image.frames == (3,) and nodes["1.7.4"].image.sop_instance_uid == src.SOPInstanceUID
    assert nodes["1.7.7"].reference == "1.7.1"
    assert nodes["1.7.6"].graphic_type == "POLYLINE"
    assert nodes["1.8"].value_type == "FOO"
    # HTML of a foreign SR: the outline, escaped
    page = render_html(r)
    assert "second &lt;line&gt;" in page and "<line>" not in page


def test_foreign_tid1500_measurements(tmp_path):
    """A vendor's TID 1500 with a real measurement, no probability and no comment."""
    src = make_mr(12, 1)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="lesion 1"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type="CIRCLE", graphic_data=np.array([[20.0, 20.0], [25.0, 20.0]]),
            source_image=hd.sr.SourceImageForRegion(MR_IMAGE, src.SOPInstanceUID)),
        finding_type=codes.SCT.Mass,
        measurements=[hd.sr.Measurement(name=codes.SCT.Area, value=78.5, unit=codes.UCUM.SquareMillimeter)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.LevelOfSignificance,
                                                             codes.SCT.NotSignificant)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=codes.SCT.CardiacMRI, imaging_measurements=[group])
    sr = hd.sr.ComprehensiveSR(evidence=[src], content=report[0], series_instance_uid=generate_uid(),
                               series_number=5, sop_instance_uid=generate_uid(), instance_number=1,
                               manufacturer="OtherVendor", is_complete=True, is_final=False,
                               is_verified=False)
    path = tmp_path / "vendor1500.dcm"
    sr.save_as(path, enforce_file_format=True)
    r = read_report(path)
    assert r.is_tid1500 and r.banner == "UNVERIFIED DRAFT"  # a person observer: no "AI"
    (f,) = r.findings
    assert f.tracking_id == "lesion 1" and f.finding == "Mass" and f.probability is None
    assert f.measurements == ("Area: 78.5 mm2",)
    assert f.evaluation_text == "Level of Significance: Not significant"
    assert f.region == "CIRCLE" and f.image.sop_instance_uid == src.SOPInstanceUID
    line = finding_lines(render_text(r))[1]
    assert "lesion 1" in line and "Area: 78.5 mm2" in line and "Level of Significance: Not significant" in line


def test_dataset_input_and_broken_item(saved):
    """read_report takes a dataset too; an item that cannot be read is shown, not fatal."""
    t, result, images, paths = saved
    ds = pydicom.dcmread(paths["sr"])
    groups = [it for it in ds.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "126010"][0]
    num = [it for it in groups.ContentSequence[0].ContentSequence if it.ValueType == "NUM"][0]
    num.MeasuredValueSequence = DicomSequence([])  # NUM without a value (allowed with a qualifier)
    r = read_report(ds)
    assert r.source.endswith("sr.dcm") and r.findings[0].probability is None
    assert len(r.findings) == len(t.findings)
