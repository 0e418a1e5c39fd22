"""Report templates, TID 1500 / text SR and Secondary Capture: built from a tiny synthetic
MR study, written, checked with dciodvfy and read back with pydicom and highdicom."""
from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from plugin.reports.sc import build_secondary_capture
from plugin.reports.sr import DRAFT_NOTICE, build_measurement_report, build_narrative_report
from plugin.reports.template import (Template, TemplateError, default_templates_dir,
                                     list_templates, load_template)
from worker.bundle import BundleImage, FindingResult, InferenceResult, SourceRef

DCIODVFY = Path("/usr/bin/dciodvfy")
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
STUDY_UID = generate_uid(entropy_srcs=["test_reports", "study"])
FINGERPRINT = "tiny-llava@sha256:0123456789abcdef"


# ---------------------------------------------------------------------------
# tiny synthetic sources

def _patient_study(ds: pydicom.Dataset) -> None:
    ds.PatientName = "Phantom^Cardiac"
    ds.PatientID = "CMR-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "Phantom"
    ds.Modality = "MR"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[STUDY_UID, "for"])
    ds.PositionReferenceIndicator = ""
    ds.BodyPartExamined = "HEART"


def make_mr(series: int, instance: int, *, rows: int = 64, cols: int = 48) -> pydicom.Dataset:
    """One single-frame MR Image Storage instance (just what the builders read)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MR_IMAGE
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[STUDY_UID, str(series), str(instance)])
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    _patient_study(ds)
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[STUDY_UID, str(series)])
    ds.SeriesNumber = series
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [1.5, 1.5]
    ds.SliceThickness = 8.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, float(instance * 8)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((rows, cols), np.uint16).tobytes()
    return ds


def make_enhanced_mr(frames: int = 20, rows: int = 64, cols: int = 64) -> pydicom.Dataset:
    """A multi-frame Enhanced MR header (enough for references; not a valid image)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_MR_IMAGE
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[STUDY_UID, "enhanced"])
    _patient_study(ds)
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[STUDY_UID, "enhanced", "series"])
    ds.SeriesNumber = 20
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = frames
    return ds


def png_b64(rows: int, cols: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    disk = ((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (min(rows, cols) / 4) ** 2
    arr = (rng.integers(0, 60, (rows, cols)) + disk * 150).astype(np.uint8)
    return BundleImage.encode_png(Image.fromarray(arr, mode="L"))


def bundle_image(key: str, view: str, phase: str, ds: pydicom.Dataset,
                 frame: int | None = None) -> BundleImage:
    return BundleImage(
        key=key, view=view, phase=phase, label=key.replace("_", " "),
        png_b64=png_b64(int(ds.Rows), int(ds.Columns), hash(key) % 1000),
        source=SourceRef(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                         series_instance_uid=ds.SeriesInstanceUID, frame_number=frame,
                         rows=int(ds.Rows), columns=int(ds.Columns)))


@pytest.fixture(scope="module")
def study():
    sax_ed, sax_es = make_mr(5, 1), make_mr(5, 13)
    ch4, ch2 = make_mr(7, 1, rows=48, cols=64), make_mr(8, 1, rows=48, cols=64)
    images = [bundle_image("SAX_mid_ED", "SAX", "ED", sax_ed),
              bundle_image("SAX_mid_ES", "SAX", "ES", sax_es),
              bundle_image("4CH_ED", "4CH", "ED", ch4),
              bundle_image("2CH_ED", "2CH", "ED", ch2)]
    sources = {ds.SOPInstanceUID: ds for ds in (sax_ed, sax_es, ch4, ch2)}
    return images, sources


def fake_result(template: Template, images: list[BundleImage]) -> InferenceResult:
    findings = []
    for i, f in enumerate(template.findings):
        ids = [o.id for o in f.options]
        probs = np.full(len(ids), 0.1 / max(len(ids) - 1, 1))
        answer = 1 if f.id == "lv_systolic_function" else 0
        if f.id == "pericardial_effusion":
            answer = ids.index("large")  # a critical answer
        probs[answer] = 0.9
        keys = [im.key for im in images if im.view in f.views] or [images[0].key]
        findings.append(FindingResult(id=f.id, answer=ids[answer],
                                      probabilities=dict(zip(ids, probs.tolist())),
                                      image_keys=keys[i % len(keys):] + keys[:i % len(keys)]))
    return InferenceResult(job_id=7, model="tiny-llava", model_fingerprint=FINGERPRINT,
                           device="cpu", quantization="nf4", findings=findings,
                           # model text may hold control characters (a tab, a stray escape):
                           # they are not valid in UT/ST and must be cleaned before the SR
                           impression="Mildly reduced LV systolic function;\tlarge pericardial\x1b "
                                      "effusion.\n", seconds=1.5)


# ---------------------------------------------------------------------------
# helpers

def dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy; fail on any Error line, return (and print) the warnings."""
    assert DCIODVFY.exists(), "dciodvfy not installed: apt-get install dicom3tools (make test does it as root)"
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if "Error" in ln]
    warnings = [ln for ln in lines if "Warning" in ln]
    print(f"dciodvfy {path.name}: {len(warnings)} warning(s)")
    for w in warnings:
        print("  ", w)
    assert not errors, f"dciodvfy errors in {path.name}:\n" + "\n".join(lines)
    return warnings


def walk(items):
    for it in items:
        yield it
        yield from walk(it.get("ContentSequence", []))


def concept(item) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return c.CodingSchemeDesignator, c.CodeValue


def measurement_groups(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    imaging = [it for it in ds.ContentSequence if concept(it) == ("DCM", "126010")]
    assert len(imaging) == 1
    return [g for g in imaging[0].ContentSequence if concept(g) == ("DCM", "125007")]


def texts_of(items) -> list[str]:
    return [it.TextValue for it in walk(items) if it.ValueType == "TEXT"]


# ---------------------------------------------------------------------------
# templates

def test_shipped_templates_load():
    names = list_templates()
    assert {"cmr_standard", "lv_function"} <= set(names)
    t = load_template("cmr_standard")
    ids = [f.id for f in t.findings]
    for required in ("image_quality", "lv_size", "lv_systolic_function", "lv_wall_thickness",
                     "lv_regional_wall_motion", "rv_size", "rv_systolic_function",
                     "pericardial_effusion", "overall_assessment"):
        assert required in ids
    assert 8 <= len(ids) <= 10
    assert [o.id for o in t.finding("lv_systolic_function").options] == \
        ["normal", "mildly_reduced", "moderately_reduced", "severely_reduced"]
    assert [o.id for o in t.finding("pericardial_effusion").options] == \
        ["none", "small", "moderate", "large"]
    assert t.finding("pericardial_effusion").critical == ["large"]
    assert t.procedure.code == codes.SCT.CardiacMRI
    qs = t.questions()
    assert [q.id for q in qs] == ids
    assert qs[2].options == [o.id for o in t.findings[2].options]
    assert len(qs[2].option_texts) == len(qs[2].options)
    lv = load_template("lv_function")
    assert [f.id for f in lv.findings] == ["lv_size", "lv_systolic_function",
                                          "lv_regional_wall_motion"]
    assert load_template(default_templates_dir() / "lv_function.yaml") == lv
    with pytest.raises(KeyError, match="did you mean 'lv_size'"):
        t.finding("lv_sise")
    with pytest.raises(FileNotFoundError, match="did you mean 'cmr_standard'"):
        load_template("cmr_standrd")


def test_shipped_template_codes_agree_with_codedict():
    """Keyword codes resolve to the codedict; explicit SCT/DCM codes whose value the
    codedict has must carry one of its meanings (catches typed-in typos)."""
    from pydicom.sr import _concepts_dict

    by_value: dict[tuple[str, str], set[str]] = {}
    for scheme, kws in _concepts_dict.concepts.items():
        for _kw, vals in kws.items():
            for value, (meaning, _cids) in vals.items():
                by_value.setdefault((scheme, value), set()).add(meaning)
    checked = 0
    for name in list_templates():
        t = load_template(name)
        for key, spec in t.all_codes():
            if spec.keyword:
                scheme, kw = spec.keyword.split(".")
                assert getattr(getattr(codes, scheme), kw) == spec.code, (name, key)
            elif (spec.scheme, spec.value) in by_value:
                assert spec.meaning in by_value[(spec.scheme, spec.value)], \
                    f"{name}: {key} {spec} — codedict meanings: {by_value[(spec.scheme, spec.value)]}"
            checked += 1
    assert checked > 50


def test_explicit_code_under_another_meaning_is_accepted(tmp_path):
    text = (default_templates_dir() / "lv_function.yaml").read_text().replace(
        "procedure: SCT.CardiacMRI",
        'procedure: {scheme: SCT, value: "241620005", meaning: "MRI of heart"}')
    p = tmp_path / "lv_function.yaml"
    p.write_text(text)
    t = load_template(p)
    assert t.procedure.value == "241620005" and t.procedure.keyword is None


BAD = """\
name: bad
title: Broken on purpose
procedure: SCT.CardiacMRI
findings:
  - id: lv_size
    question: "What is the size of the left ventricle?"
    concept: SCT.LeftVentricularCavitySize
    views: [SAX]
    critical: [huge]
    options:
      - {id: normal, text: "normal", code: SCT.NormalSizeCardiacChamber}
      - {id: big, text: "enlarged"}
  - id: lv_size
    qestion: "again?"
    concept: SCT.LeftVentricularCavitySise
    views: [SAX, 5CH]
    options:
      - {id: normal, text: "normal", code: SCT.Normal}
      - {id: large, text: "large", code: SCT.Large}
"""


def test_template_errors_have_file_line_key_all_at_once(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(BAD)
    with pytest.raises(TemplateError) as ei:
        load_template("bad", tmp_path)
    errors = ei.value.errors
    print("\n".join(errors))
    f = str(p)

    def has(line: int, key: str, *words: str) -> bool:
        return any(e.startswith(f"{f}:{line}: {key}: ") and all(w in e for w in words)
                   for e in errors)

    assert has(12, "findings[0].options[1].code", "missing")                # option code missing
    assert has(9, "findings[0].critical[0]", "huge", "not an option id")
    assert has(13, "findings[1].id", "duplicate finding id 'lv_size'")       # duplicate id
    assert has(14, "findings[1].qestion", "unknown key", "did you mean 'question'")
    assert has(15, "findings[1].concept", "SCT.LeftVentricularCavitySise",   # bad keyword
               "did you mean 'SCT.LeftVentricularCavitySize'")
    assert has(16, "findings[1].views[1]", "5CH")
    assert len(errors) >= 6
    lines = [int(e[len(f) + 1:].split(":")[0]) for e in errors]
    assert lines == sorted(lines)


SLICES = """\
name: slices
title: Slices and zoom
procedure: SCT.CardiacMRI
findings:
  - id: lv_systolic_function
    question: "How is the left ventricular systolic function?"
    concept: SCT.CardiacEjectionFraction
    views: [4CH]
    slices: [mid]
    zoom: heart
    options:
      - {id: normal, text: "normal", code: SCT.Normal}
      - {id: reduced, text: "reduced", code: SCT.Severe}
  - id: lv_size
    question: "What is the size of the left ventricle?"
    concept: SCT.LeftVentricularCavitySize
    views: [SAX]
    slices: [mid, middle]
    options:
      - {id: normal, text: "normal", code: SCT.NormalSizeCardiacChamber}
      - {id: big, text: "enlarged", code: SCT.MarkedlyEnlargedCardiacChamber}
"""


def test_template_slices_and_zoom_are_checked(tmp_path):
    p = tmp_path / "slices.yaml"
    p.write_text(SLICES)
    with pytest.raises(TemplateError) as ei:
        load_template(p)
    errors = ei.value.errors
    print("\n".join(errors))
    assert any(e.startswith(f"{p}:9: findings[0].slices: ") and "add SAX to views" in e for e in errors)
    assert any(e.startswith(f"{p}:10: findings[0].zoom: ") and "lv" in e for e in errors)
    assert any(e.startswith(f"{p}:18: findings[1].slices[1]: ") and "middle" in e for e in errors)
    fixed = SLICES.replace("views: [4CH]", "views: [SAX, 4CH]").replace("zoom: heart", "zoom: lv").replace(
        "[mid, middle]", "[apical, mid, apical]")
    p.write_text(fixed)
    qs = {q.id: q for q in load_template(p).questions()}
    assert (qs["lv_systolic_function"].slices, qs["lv_systolic_function"].zoom) == (["mid"], "lv")
    assert (qs["lv_size"].slices, qs["lv_size"].zoom) == (["apical", "mid"], "")


def test_cmr_standard_judges_lv_function_on_the_zoomed_mid_sax_slice():
    for name in ("cmr_standard", "lv_function"):
        q = next(q for q in load_template(name).questions() if q.id == "lv_systolic_function")
        assert (q.views, q.slices, q.zoom) == (["SAX"], ["mid"], "lv"), name


def test_template_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: broken\ntitle: x\nfindings:\n  - id: a\n   question: [\n")
    with pytest.raises(TemplateError) as ei:
        load_template(p)
    assert ei.value.errors[0].startswith(f"{p}:")
    assert "YAML syntax" in ei.value.errors[0]


# ---------------------------------------------------------------------------
# SR, narrative SR, SC

@pytest.fixture(scope="module")
def built(study, tmp_path_factory):
    images, sources = study
    t = load_template("cmr_standard")
    result = fake_result(t, images)
    out = tmp_path_factory.mktemp("reports")
    objs = {
        "sr": build_measurement_report(t, result, images, sources),
        "text": build_narrative_report(t, result, images, sources),
        "sc": build_secondary_capture(t, result, images, sources),
    }
    paths = {}
    for k, ds in objs.items():
        paths[k] = out / f"{k}.dcm"
        ds.save_as(paths[k], enforce_file_format=True)
    return t, result, objs, paths


@pytest.mark.parametrize("kind", ["sr", "text", "sc"])
def test_dciodvfy_no_errors(built, kind):
    dciodvfy(built[3][kind])


def test_measurement_report_content(built, study):
    t, result, objs, paths = built
    images, sources = study
    ds = pydicom.dcmread(paths["sr"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.PreliminaryFlag == "PRELIMINARY"
    assert ds.CompletionFlag == "PARTIAL"
    assert ds.SeriesDescription == "AI DRAFT cmr-ai SR"
    assert ds.SeriesNumber == 9901 and ds.StudyInstanceUID == STUDY_UID
    assert concept(ds) == ("DCM", "126000")
    assert any(ce.Manufacturer == "cmr-ai" and
               ce.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
               for ce in ds.ContributingEquipmentSequence)
    # evidence lists every image used
    evidence = {r.ReferencedSOPInstanceUID
                for s in ds.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert evidence == set(sources)

    groups = measurement_groups(ds)
    assert len(groups) == len(t.findings)
    by_key = {im.key: im for im in images}
    for g, f, fr in zip(groups, t.findings, result.findings):
        items = list(g.ContentSequence)
        tid = [it for it in items if concept(it) == ("DCM", "112039")]
        tuid = [it for it in items if concept(it) == ("DCM", "112040")]
        assert len(tid) == 1 and tid[0].TextValue == f.id
        assert len(tuid) == 1 and tuid[0].UID
        regions = [it for it in items if it.ValueType == "SCOORD"]
        assert len(regions) == 1, f"group {f.id} has no image region"
        assert regions[0].GraphicType in ("POLYLINE", "POINT")
        if regions[0].GraphicType == "POLYLINE":
            pts = np.asarray(regions[0].GraphicData).reshape(-1, 2)
            assert len(pts) == 5 and (pts[0] == pts[-1]).all()
        ref = regions[0].ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == by_key[fr.image_keys[0]].source.sop_instance_uid
        finding = [it for it in items if concept(it) == ("DCM", "121071")]
        assert finding[0].ConceptCodeSequence[0].CodeValue == f.concept.value
        qual = [it for it in items if it.ValueType == "CODE" and concept(it) == (f.concept.scheme,
                                                                                 f.concept.value)]
        assert qual[0].ConceptCodeSequence[0].CodeValue == f.option(fr.answer).code.value
        num = [it for it in items if it.ValueType == "NUM"]
        assert concept(num[0]) == ("DCM", "122157")
        assert float(num[0].MeasuredValueSequence[0].NumericValue) == \
            pytest.approx(fr.probabilities[fr.answer], abs=1e-3)
        comments = [it.TextValue for it in items if concept(it) == ("DCM", "121106")]
        assert comments and comments[0].startswith(f"AI DRAFT — {f.topic}: ")
        assert f"(p {fr.probabilities[fr.answer]:.2f})" in comments[0]
    texts = texts_of(ds.ContentSequence)
    assert "AI DRAFT — LV systolic function: mildly reduced (p 0.90)" in texts
    assert any("Pericardial effusion: large (p 0.90) — CRITICAL" in x for x in texts)
    assert DRAFT_NOTICE in texts
    assert any(x.startswith("AI DRAFT impression: Mildly reduced") for x in texts)
    assert any(x.startswith("Limitation: ") for x in texts)
    # report-level texts are outside the measurement groups
    top_level = [it for it in ds.ContentSequence if concept(it) == ("UMLS", "C0034375")]
    assert DRAFT_NOTICE in [it.TextValue for it in top_level[0].ContentSequence]


def test_measurement_report_roundtrip_highdicom(built):
    t, result, objs, paths = built
    sr = hd.sr.srread(paths["sr"])
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    sr2 = hd.sr.ComprehensiveSR.from_dataset(pydicom.dcmread(paths["sr"]))
    for doc in (sr, sr2):
        groups = doc.content.get_planar_roi_measurement_groups()
        assert len(groups) == len(t.findings)
        for g, f in zip(groups, t.findings):
            assert g.tracking_identifier == f.id
            assert g.tracking_uid
            assert g.roi is not None
            assert g.finding_type.value == f.concept.value
            assert g.get_qualitative_evaluations()[0].value.value == \
                f.option(next(r for r in result.findings if r.id == f.id).answer).code.value
            assert g.get_measurements(name=codes.DCM.Probability)


def test_narrative_report(built):
    t, result, objs, paths = built
    ds = pydicom.dcmread(paths["text"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    assert ds.ContinuityOfContent == "SEPARATE"
    assert ds.VerificationFlag == "UNVERIFIED" and ds.PreliminaryFlag == "PRELIMINARY"
    texts = texts_of(ds.ContentSequence)
    comments = [it.TextValue for it in ds.ContentSequence if concept(it) == ("DCM", "121106")]
    assert comments[0] == f"AI DRAFT. {DRAFT_NOTICE}."
    assert any("template cmr_standard (CMR function — AI draft)" in c for c in comments)
    assert "LV systolic function: mildly reduced (p 0.90)" in texts
    assert any(x.startswith("AI DRAFT: Mildly reduced") for x in texts)
    assert any(x.startswith("Limitation:") for x in texts)
    assert all(c.ContinuityOfContent == "SEPARATE" for c in walk(ds.ContentSequence)
               if c.ValueType == "CONTAINER")
    assert isinstance(hd.sr.srread(paths["text"]), hd.sr.EnhancedSR)


def test_secondary_capture(built, study):
    t, result, objs, paths = built
    images, sources = study
    ds = pydicom.dcmread(paths["sc"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.BurnedInAnnotation == "YES"
    assert ds.PhotometricInterpretation == "RGB"
    assert ds.PatientID == "CMR-0001" and ds.StudyInstanceUID == STUDY_UID
    assert ds.SeriesNumber == 9902 and ds.SeriesDescription == "AI DRAFT cmr-ai SC"
    assert "Laterality" in ds and not ds.Laterality
    assert {it.ReferencedSOPInstanceUID for it in ds.SourceImageSequence} == set(sources)
    px = ds.pixel_array
    assert px.shape[2] == 3 and px.shape[0] > 256 and px.shape[1] >= 768
    assert tuple(px[2, 2]) == (190, 20, 20)  # the red banner
    Image.fromarray(px).save(paths["sc"].with_suffix(".png"))  # for eyeballing


def test_uids_are_deterministic(study, built):
    images, sources = study
    t, result, objs, _ = built
    again = {
        "sr": build_measurement_report(t, result, images, sources),
        "text": build_narrative_report(t, result, images, sources),
        "sc": build_secondary_capture(t, result, images, sources),
    }
    for k in objs:
        assert again[k].SOPInstanceUID == objs[k].SOPInstanceUID
        assert again[k].SeriesInstanceUID == objs[k].SeriesInstanceUID
    uids = {objs[k].SOPInstanceUID for k in objs} | {objs[k].SeriesInstanceUID for k in objs}
    assert len(uids) == 6
    other = result.model_copy(update={"model_fingerprint": "another-model"})
    changed = build_measurement_report(t, other, images, sources)
    assert changed.SOPInstanceUID != objs["sr"].SOPInstanceUID
    assert changed.SeriesInstanceUID != objs["sr"].SeriesInstanceUID  # a changed model: a new series
    # the rules version that decided the analysis is part of the instance UID, not the series
    for k, build in (("sr", build_measurement_report), ("text", build_narrative_report),
                     ("sc", build_secondary_capture)):
        a = build(t, result, images, sources, rules_version="0123456789ab")
        b = build(t, result, images, sources, rules_version="0123456789ab")
        c = build(t, result, images, sources, rules_version="ba9876543210")
        assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID != objs[k].SOPInstanceUID
        assert a.SeriesInstanceUID == c.SeriesInstanceUID == objs[k].SeriesInstanceUID


def test_multiframe_source_gets_frame_number(study, tmp_path):
    images, sources = study
    enh = make_enhanced_mr(frames=20)
    mf = bundle_image("SAX_mf_ES", "SAX", "ES", enh, frame=13)
    t = load_template("lv_function")
    result = fake_result(t, [mf])
    sr = build_measurement_report(t, result, [mf], {enh.SOPInstanceUID: enh}, region="point")
    for g in measurement_groups(sr):
        region = [it for it in g.ContentSequence if it.ValueType == "SCOORD"][0]
        assert region.GraphicType == "POINT"
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == enh.SOPInstanceUID
        assert int(ref.ReferencedFrameNumber) == 13
    path = tmp_path / "mf.dcm"
    sr.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    sr2 = hd.sr.srread(path)
    g = sr2.content.get_planar_roi_measurement_groups()[0]
    assert g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 13
    sc = build_secondary_capture(t, result, [mf], {enh.SOPInstanceUID: enh})
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 13
    sc.save_as(tmp_path / "mf_sc.dcm", enforce_file_format=True)
    dciodvfy(tmp_path / "mf_sc.dcm")
    # a multi-frame source without a frame number is refused, not guessed
    no_frame = bundle_image("SAX_mf_ES", "SAX", "ES", enh)
    with pytest.raises(ValueError, match="frame"):
        build_measurement_report(t, result, [no_frame], {enh.SOPInstanceUID: enh})


def test_bad_inputs_are_refused(study):
    images, sources = study
    t = load_template("lv_function")
    result = fake_result(t, images)
    with pytest.raises(ValueError, match="source dataset missing"):
        build_measurement_report(t, result, images, {})
    wrong = result.model_copy(update={"findings": [
        result.findings[0].model_copy(update={"answer": "huge"})]})
    with pytest.raises(ValueError, match="no option 'huge'"):
        build_measurement_report(t, wrong, images, sources)
    # an image key the bundle lacks falls back to an image of the finding's views
    stray = result.model_copy(update={"findings": [
        f.model_copy(update={"image_keys": ["nope"]}) for f in result.findings]})
    sr = build_measurement_report(t, stray, images, sources)
    assert all(any(it.ValueType == "SCOORD" for it in g.ContentSequence)
               for g in measurement_groups(sr))


def test_sources_missing_type2_attributes_still_build(study, tmp_path):
    """Read leniently: a source without PatientBirthDate, AccessionNumber … still gives
    valid objects, and the caller's dataset is left alone."""
    images, sources = study
    lean = {}
    for uid, ds in sources.items():
        ds = pydicom.dcmread(_roundtrip(ds, tmp_path / f"{uid}.dcm"))
        for kw in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                   "ReferringPhysicianName"):
            delattr(ds, kw)
        lean[uid] = ds
    t = load_template("lv_function")
    result = fake_result(t, images)
    for build in (build_measurement_report, build_narrative_report, build_secondary_capture):
        out = tmp_path / f"{build.__name__}.dcm"
        build(t, result, images, lean).save_as(out, enforce_file_format=True)
        dciodvfy(out)
    assert all("AccessionNumber" not in ds for ds in lean.values())


def _roundtrip(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
