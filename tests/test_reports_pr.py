"""Grayscale Softcopy Presentation State of the AI draft (plugin.reports.pr), and the
SC's critical/safety strip.

The PR is built from phantom studies of the three vendor styles (Siemens-like classic
MR, GE-like RLE classic MR, Philips-like Enhanced MR multi-frame) as the node's
``prepare`` step sees them, checked against the source study (every reference
resolves, frames included), with dciodvfy, read back with pydicom and re-expressed
with highdicom's constructors, and stored in a real Orthanc (C-STORE and STOW-RS
through our exporters) and read back from it.
"""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.uid import RLELossless

from plugin.cardiac import analyse_paths
from plugin.config import DicomwebTarget, DimseTarget
from plugin.export import DicomwebExporter, DimseExporter
from plugin.phantom import write_study
from plugin.reports import sc as sc_module
from plugin.reports.pr import (CONTENT_LABEL, LAYER_BANNER, LAYER_CRITICAL, LAYER_FINDINGS,
                               PR_BANNER, PR_SERIES_DESCRIPTION, build_presentation_state,
                               display_text)
from plugin.reports.sc import build_secondary_capture, flag_lines
from plugin.reports.sr import answers, build_measurement_report
from plugin.reports.template import load_template
from test_reports import (bundle_image, concept, dciodvfy, fake_result, make_enhanced_mr, make_mr,
                          measurement_groups)
from worker.safety import FlagKind, SafetyReport, apply_safety

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
DCMPSCHK = Path("/usr/bin/dcmpschk")  # dcmtk's presentation state checker
STYLES = ("siemens", "ge", "philips")


# ---------------------------------------------------------------------------
# phantom studies as `prepare` sees them

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """style -> dict(truth, files {sop uid: path}, study {sop uid: header}, images, sources)."""
    root = tmp_path_factory.mktemp("phantoms")
    out = {}
    for seed, style in enumerate(STYLES, start=41):
        folder = root / style
        truth = write_study(folder, style=style, seed=seed, slices=6, phases=8, size=64)
        paths = sorted(folder.rglob("*.dcm"))
        _st, _cls, images, _lim = analyse_paths(paths)
        files, study = {}, {}
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            files[ds.SOPInstanceUID], study[ds.SOPInstanceUID] = p, ds
        # what the report task hands the builders: the used instances, without pixels
        sources = {im.source.sop_instance_uid: study[im.source.sop_instance_uid] for im in images}
        out[style] = dict(truth=truth, files=files, study=study, images=images, sources=sources)
    return out


@pytest.fixture(scope="module")
def template():
    return load_template("cmr_standard")


def dcmpschk(path: Path) -> None:
    """dcmtk's own presentation state check (IOD, VRs, the graphic/VOI/displayed area
    rules it applies when it renders one) must pass."""
    assert DCMPSCHK.exists(), "dcmpschk not installed: apt-get install dcmtk (make test does it as root)"
    proc = subprocess.run([str(DCMPSCHK), str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Test passed" in out, out[-3000:]


def _ref_key(im):
    return im.source.sop_instance_uid, im.source.frame_number


def _annotations(ds):
    """[(sop uid, frame or None, layer, annotation item)] of a GSPS."""
    out = []
    for ann in ds.GraphicAnnotationSequence:
        assert len(ann.ReferencedImageSequence) == 1
        ref = ann.ReferencedImageSequence[0]
        frame = int(ref.ReferencedFrameNumber) if "ReferencedFrameNumber" in ref else None
        out.append((ref.ReferencedSOPInstanceUID, frame, ann.GraphicLayer, ann))
    return out


def _expected_window(src: pydicom.Dataset, frame):
    """The window the source shows the image (frame) with (PS3.3 C.11.2 / C.7.6.16.2.10)."""
    item = src
    if frame is not None:
        per = src.PerFrameFunctionalGroupsSequence[frame - 1]
        shared = src.SharedFunctionalGroupsSequence[0]
        item = (per if "FrameVOILUTSequence" in per else shared).FrameVOILUTSequence[0]
    c, w = item.WindowCenter, item.WindowWidth
    first = (lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v))
    return first(c), first(w)


def _applied_window(pr: pydicom.Dataset, uid: str, frame):
    """The Softcopy VOI LUT item of the PR that applies to (uid, frame); exactly one."""
    hits = []
    for item in pr.SoftcopyVOILUTSequence:
        if "ReferencedImageSequence" not in item:
            hits.append(item)
            continue
        for ref in item.ReferencedImageSequence:
            if ref.ReferencedSOPInstanceUID != uid:
                continue
            frames = ref.get("ReferencedFrameNumber")
            if frames is None or frame in ([int(f) for f in frames]
                                           if isinstance(frames, pydicom.multival.MultiValue)
                                           else [int(frames)]):
                hits.append(item)
    assert len(hits) == 1, (uid, frame, hits)
    return float(hits[0].WindowCenter), float(hits[0].WindowWidth)


@pytest.fixture(scope="module")
def built(phantoms, template, tmp_path_factory):
    """style -> (result, pr dataset as built, path written)."""
    out_dir = tmp_path_factory.mktemp("pr")
    out = {}
    for style, ph in phantoms.items():
        result = fake_result(template, ph["images"])
        pr = build_presentation_state(template, result, ph["images"], ph["sources"])
        path = out_dir / f"{style}.dcm"
        pr.save_as(path, enforce_file_format=True)
        out[style] = (result, pr, path)
    return out


# ---------------------------------------------------------------------------
# structure

@pytest.mark.parametrize("style", STYLES)
def test_pr_references_the_images_the_findings_were_judged_on(style, phantoms, built, template):
    ph = phantoms[style]
    result, _pr, path = built[style]
    images, study, truth = ph["images"], ph["study"], ph["truth"]
    ds = pydicom.dcmread(path)
    src0 = study[images[0].source.sop_instance_uid]

    assert ds.SOPClassUID == GSPS and ds.Modality == "PR"
    assert ds.StudyInstanceUID == truth.study_instance_uid
    assert ds.PatientID == src0.PatientID and ds.PatientName == src0.PatientName
    assert ds.SeriesNumber == 9904 and ds.SeriesDescription == PR_SERIES_DESCRIPTION
    assert ds.ContentLabel == CONTENT_LABEL
    assert "cmr-ai" in ds.ContentDescription and "UNVERIFIED" in ds.ContentDescription
    assert ds.SeriesInstanceUID not in truth.series.values()
    assert {ly.GraphicLayer for ly in ds.GraphicLayerSequence} == {LAYER_BANNER, LAYER_FINDINGS,
                                                                   LAYER_CRITICAL}

    # Presentation State Relationship: every reference resolves in the source study,
    # series and SOP class agree, multi-frame objects name exactly the frames used
    used = {_ref_key(im) for im in images}
    frames_used: dict[str, set] = {}
    for uid, frame in used:
        frames_used.setdefault(uid, set()).add(frame)
    seen = set()
    for series in ds.ReferencedSeriesSequence:
        assert series.SeriesInstanceUID in truth.series.values()
        for ref in series.ReferencedImageSequence:
            src = study[ref.ReferencedSOPInstanceUID]  # KeyError: not in the study
            assert src.SeriesInstanceUID == series.SeriesInstanceUID
            assert ref.ReferencedSOPClassUID == src.SOPClassUID
            frames = ref.get("ReferencedFrameNumber")
            if style == "philips":
                assert src.SOPClassUID == pydicom.uid.EnhancedMRImageStorage
                frames = {int(f) for f in (frames if isinstance(frames, pydicom.multival.MultiValue)
                                           else [frames])}
                assert frames == frames_used[src.SOPInstanceUID]
                assert max(frames) <= int(src.NumberOfFrames)
            else:
                assert frames is None and "NumberOfFrames" not in src
            seen.add(src.SOPInstanceUID)
    assert seen == set(frames_used)
    if style == "philips":
        assert all(f is not None for _, f in used)  # frames, not whole cine objects
    if style == "ge":
        assert {study[u].file_meta.TransferSyntaxUID for u in seen} == {RLELossless}

    # Graphic annotations: every referenced image (frame) has the banner; each finding's
    # answer line is on the image it was judged on, once, in the right layer, with its
    # rectangle and the SR measurement group's tracking UID
    anns = _annotations(ds)
    assert {(u, f) for u, f, _, _ in anns} == used
    for key in used:
        banners = [t.UnformattedTextValue for u, f, layer, a in anns if (u, f) == key
                   and layer == LAYER_BANNER for t in a.TextObjectSequence]
        assert banners[0] == PR_BANNER() == "AI DRAFT - UNVERIFIED, not for diagnosis - cmr-ai"
    by_key = {im.key: im for im in images}
    sr = build_measurement_report(template, result, images, ph["sources"])
    sr_tracking = {}
    for group in measurement_groups(sr):
        items = {concept(c): c for c in group.ContentSequence}
        sr_tracking[items[("DCM", "112039")].TextValue] = items[("DCM", "112040")].UID
    assert len(sr_tracking) == len(template.findings)
    texts = [(u, f, layer, t, a) for u, f, layer, a in anns if layer != LAYER_BANNER
             for t in a.TextObjectSequence]
    ans = answers(template, result)
    assert len(texts) == len(ans) == len(template.findings)
    for a in ans:
        fr = next(r for r in result.findings if r.id == a.finding.id)
        where = _ref_key(by_key[fr.image_keys[0]])
        hits = [(u, f, layer, t, ann) for u, f, layer, t, ann in texts
                if t.UnformattedTextValue == display_text(a.comment)]
        assert len(hits) == 1, a.comment
        u, f, layer, t, ann = hits[0]
        assert (u, f) == where
        assert layer == (LAYER_CRITICAL if a.critical else LAYER_FINDINGS)
        assert ("CRITICAL" in t.UnformattedTextValue) == a.critical
        assert t.UnformattedTextValue.startswith(f"AI DRAFT - {a.finding.topic}: {a.option.text} (p ")
        rects = [g for g in ann.GraphicObjectSequence if g.GraphicGroupID == t.GraphicGroupID]
        assert len(rects) == 1 and rects[0].GraphicType == "POLYLINE"
        pts = np.asarray(rects[0].GraphicData, dtype=float).reshape(-1, 2)
        src = study[u]
        assert len(pts) == 5 and (pts[0] == pts[-1]).all()
        assert (pts >= 0).all() and (pts[:, 0] <= src.Columns).all() and (pts[:, 1] <= src.Rows).all()
        assert t.TrackingID == rects[0].TrackingID == a.finding.id
        assert t.TrackingUID == rects[0].TrackingUID == sr_tracking[a.finding.id]
    assert any(a.critical for a in ans)  # the fake result has a critical answer: the test sees it

    # windowing: what the source shows, per image and frame (shared/per-frame groups)
    for uid, frame in used:
        assert _applied_window(ds, uid, frame) == pytest.approx(_expected_window(study[uid], frame))


@pytest.mark.parametrize("style", STYLES)
def test_pr_dciodvfy_and_dcmpschk_clean(style, built):
    warnings = dciodvfy(built[style][2])
    # the one known warning: Laterality present but empty (Type 2C, dciodvfy errs without it)
    assert all("Laterality" in w for w in warnings), warnings
    dcmpschk(built[style][2])


@pytest.mark.parametrize("style", STYLES)
def test_pr_round_trip_pydicom_and_highdicom(style, phantoms, built):
    """Read back with pydicom: what was built. highdicom 0.28.2 has no GSPS reader
    (``from_dataset``), so the read-back annotations, layers, groups and VOI items are
    rebuilt with highdicom's own constructors (which check units, coordinates against
    the referenced image, frame numbers, code strings) and must come out identical."""
    ph = phantoms[style]
    _result, pr, path = built[style]
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == pr.SOPInstanceUID and ds.SeriesInstanceUID == pr.SeriesInstanceUID
    def texts(d):
        return [(a.ReferencedImageSequence[0].ReferencedSOPInstanceUID, a.GraphicLayer,
                 t.UnformattedTextValue) for a in d.GraphicAnnotationSequence for t in a.TextObjectSequence]

    assert texts(ds) == texts(pr) and len(texts(ds)) > len(ph["images"])
    assert ds.ReferencedSeriesSequence == pr.ReferencedSeriesSequence
    assert ds.SoftcopyVOILUTSequence == pr.SoftcopyVOILUTSequence
    if hasattr(hd.pr.GrayscaleSoftcopyPresentationState, "from_dataset"):  # later highdicom
        hd.pr.GrayscaleSoftcopyPresentationState.from_dataset(ds)

    layers = {ly.GraphicLayer: hd.pr.GraphicLayer(
        ly.GraphicLayer, order=int(ly.GraphicLayerOrder), description=ly.GraphicLayerDescription,
        display_color=hd.color.CIELabColor.from_dicom_value(ly.GraphicLayerRecommendedDisplayCIELabValue))
        for ly in ds.GraphicLayerSequence}
    for ly in ds.GraphicLayerSequence:
        rebuilt = layers[ly.GraphicLayer]
        rebuilt.GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF  # not a highdicom argument
        assert rebuilt == ly
    groups = {g.GraphicGroupID: hd.pr.GraphicGroup(int(g.GraphicGroupID), g.GraphicGroupLabel,
                                                   g.GraphicGroupDescription)
              for g in ds.GraphicGroupSequence}
    for item in ds.GraphicAnnotationSequence:
        ref = item.ReferencedImageSequence[0]
        src = ph["sources"][ref.ReferencedSOPInstanceUID]
        texts = [hd.pr.TextObject(
            t.UnformattedTextValue, units=t.BoundingBoxAnnotationUnits,
            bounding_box=tuple(t.BoundingBoxTopLeftHandCorner) + tuple(t.BoundingBoxBottomRightHandCorner),
            text_justification=t.BoundingBoxTextHorizontalJustification,
            tracking_id=t.get("TrackingID"), tracking_uid=t.get("TrackingUID"),
            graphic_group=groups.get(t.get("GraphicGroupID")))
            for t in item.TextObjectSequence]
        graphics = [hd.pr.GraphicObject(
            g.GraphicType, np.asarray(g.GraphicData, dtype=np.float32).reshape(-1, 2),
            units=g.GraphicAnnotationUnits, tracking_id=g.get("TrackingID"),
            tracking_uid=g.get("TrackingUID"), graphic_group=groups.get(g.get("GraphicGroupID")))
            for g in item.get("GraphicObjectSequence", [])]
        frame = ref.get("ReferencedFrameNumber")
        rebuilt = hd.pr.GraphicAnnotation(
            referenced_images=[src], graphic_layer=layers[item.GraphicLayer],
            referenced_frame_number=int(frame) if frame is not None else None,
            text_objects=texts, graphic_objects=graphics or None)
        assert rebuilt == item
    for item in ds.SoftcopyVOILUTSequence:
        kw = dict(window_center=float(item.WindowCenter), window_width=float(item.WindowWidth))
        rebuilt = hd.pr.SoftcopyVOILUTTransformation(**kw)
        assert rebuilt.WindowCenter == item.WindowCenter and rebuilt.WindowWidth == item.WindowWidth


@pytest.mark.parametrize("style", STYLES)
def test_pr_renders_with_the_source_window_in_dcmtk(style, phantoms, built, tmp_path):
    """dcmtk's presentation-state renderer (dcmp2pgm) shows every referenced image
    (frame) through the PR with the window the source defines for it: the same pixels,
    within one grey level, as PS3.3 C.11.2.1.2.1 LINEAR applied to the stored values.
    (dcmtk reads no Frame VOI LUT of an Enhanced MR itself: there the PR is what makes
    the frame readable.) GE-style RLE files are decompressed first: dcmp2pgm has no
    RLE decoder."""
    assert Path("/usr/bin/dcmp2pgm").exists(), "dcmp2pgm not installed: apt-get install dcmtk"
    ph = phantoms[style]
    _result, _pr, pr_path = built[style]
    for n, im in enumerate(ph["images"]):
        uid, frame = _ref_key(im)
        image_path = ph["files"][uid]
        full = pydicom.dcmread(image_path)
        if full.file_meta.TransferSyntaxUID.is_compressed:
            full.decompress()
            image_path = tmp_path / f"{n}-decompressed.dcm"
            full.save_as(image_path, enforce_file_format=True)
        out = tmp_path / f"{n}.pgm"
        proc = subprocess.run(["/usr/bin/dcmp2pgm", "-p", str(pr_path), "-f", str(frame or 1),
                               str(image_path), str(out)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        shown = np.asarray(Image.open(out)).astype(float)
        stored = full.pixel_array[frame - 1] if frame else full.pixel_array
        c, w = _expected_window(ph["study"][uid], frame)
        x = stored.astype(float)
        want = np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0, 0, 255)
        assert shown.shape == want.shape and np.abs(shown - want).max() <= 1.0 + 1e-6, (im.key, np.abs(shown - want).max())
        assert shown.std() > 10  # an image, not a flat field


# ---------------------------------------------------------------------------
# deterministic UIDs

def test_pr_uids_are_deterministic(phantoms, built, template):
    ph = phantoms["philips"]
    result, pr, _ = built["philips"]
    images, sources = ph["images"], ph["sources"]
    again = build_presentation_state(template, result, images, sources)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (pr.SOPInstanceUID, pr.SeriesInstanceUID)
    other_model = build_presentation_state(
        template, result.model_copy(update={"model_fingerprint": "another-model"}), images, sources)
    assert other_model.SeriesInstanceUID != pr.SeriesInstanceUID
    assert other_model.SOPInstanceUID != pr.SOPInstanceUID
    a = build_presentation_state(template, result, images, sources, rules_version="0123456789ab")
    b = build_presentation_state(template, result, images, sources, rules_version="0123456789ab")
    c = build_presentation_state(template, result, images, sources, rules_version="ba9876543210")
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID != pr.SOPInstanceUID
    assert a.SeriesInstanceUID == c.SeriesInstanceUID == pr.SeriesInstanceUID
    sc = build_secondary_capture(template, result, images, sources)
    sr = build_measurement_report(template, result, images, sources)
    assert len({pr.SOPInstanceUID, pr.SeriesInstanceUID, sc.SOPInstanceUID, sc.SeriesInstanceUID,
                sr.SOPInstanceUID, sr.SeriesInstanceUID}) == 6


# ---------------------------------------------------------------------------
# sources as scanners send them

def test_pr_per_frame_window_wins_over_shared(phantoms, template, tmp_path):
    """A Frame VOI LUT in a frame's own functional group is that frame's window."""
    ph = phantoms["philips"]
    images, sources = ph["images"], dict(ph["sources"])
    mid_ed = next(im for im in images if im.key == "SAX_mid_ED")
    uid, frame = _ref_key(mid_ed)
    src = copy.deepcopy(sources[uid])
    src.PerFrameFunctionalGroupsSequence[frame - 1].FrameVOILUTSequence = [pydicom.Dataset()]
    voi = src.PerFrameFunctionalGroupsSequence[frame - 1].FrameVOILUTSequence[0]
    voi.WindowCenter, voi.WindowWidth = 300, 700
    sources[uid] = src
    result = fake_result(template, images)
    pr = build_presentation_state(template, result, images, sources)
    assert _applied_window(pr, uid, frame) == (300.0, 700.0)
    other = next(im for im in images if im.source.sop_instance_uid == uid and im.key != "SAX_mid_ED")
    assert _applied_window(pr, uid, other.source.frame_number) == (450.0, 1000.0)
    pr.save_as(tmp_path / "per-frame.dcm", enforce_file_format=True)
    dciodvfy(tmp_path / "per-frame.dcm")
    dcmpschk(tmp_path / "per-frame.dcm")


def test_pr_mixed_matrices_rescale_and_missing_windows(template, tmp_path):
    """Long-axis 48x64 beside short-axis 64x48, one with anisotropic pixels and its own
    rescale and a multi-valued window, the others without any window."""
    sax_ed, sax_es = make_mr(5, 1), make_mr(5, 13)                          # 64 x 48, no window
    ch4, ch2 = make_mr(7, 1, rows=48, cols=64), make_mr(8, 1, rows=48, cols=64)
    ch4.PixelSpacing = [1.2, 1.5]
    ch4.RescaleSlope, ch4.RescaleIntercept, ch4.RescaleType = 2, -10, "US"
    ch4.WindowCenter, ch4.WindowWidth = [300, 500], [600, 800]
    images = [bundle_image("SAX_mid_ED", "SAX", "ED", sax_ed), bundle_image("SAX_mid_ES", "SAX", "ES", sax_es),
              bundle_image("4CH_ED", "4CH", "ED", ch4), bundle_image("2CH_ED", "2CH", "ED", ch2)]
    sources = {ds.SOPInstanceUID: ds for ds in (sax_ed, sax_es, ch4, ch2)}
    pr = build_presentation_state(template, fake_result(template, images), images, sources)
    path = tmp_path / "mixed.dcm"
    pr.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    dcmpschk(path)
    ds = pydicom.dcmread(path)
    # rescales differ: identity Modality LUT, the 4CH window in stored values (v = (m - b) / s)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    assert _applied_window(ds, ch4.SOPInstanceUID, None) == (155.0, 300.0)
    # no window in the source: the stored 12-bit range
    assert _applied_window(ds, sax_ed.SOPInstanceUID, None) == (2047.5, 4095.0)
    areas = {}
    for area in ds.DisplayedAreaSelectionSequence:
        for ref in area.ReferencedImageSequence:
            areas[ref.ReferencedSOPInstanceUID] = (list(area.DisplayedAreaBottomRightHandCorner),
                                                  list(area.PresentationPixelAspectRatio))
    assert areas == {sax_ed.SOPInstanceUID: ([48, 64], [1, 1]), sax_es.SOPInstanceUID: ([48, 64], [1, 1]),
                     ch4.SOPInstanceUID: ([64, 48], [4, 5]), ch2.SOPInstanceUID: ([64, 48], [1, 1])}
    # the callers' datasets are left alone
    assert ch4.Rows == 48 and sax_ed.Rows == 64 and "WindowCenter" not in sax_ed


def test_pr_refuses_what_it_cannot_reference(template):
    enh = make_enhanced_mr(frames=20)
    t = load_template("lv_function")
    no_frame = bundle_image("SAX_mf_ES", "SAX", "ES", enh)
    with pytest.raises(ValueError, match="frame_number"):
        build_presentation_state(t, fake_result(t, [no_frame]), [no_frame], {enh.SOPInstanceUID: enh})
    beyond = bundle_image("SAX_mf_ES", "SAX", "ES", enh, frame=21)
    with pytest.raises(ValueError, match="Number of Frames 20"):
        build_presentation_state(t, fake_result(t, [beyond]), [beyond], {enh.SOPInstanceUID: enh})
    with pytest.raises(ValueError, match="source dataset missing"):
        build_presentation_state(t, fake_result(t, [beyond]), [beyond], {})


# ---------------------------------------------------------------------------
# safety flags: PR and SC

@pytest.fixture(scope="module")
def flagged(phantoms, template):
    """A result whose impression contradicts its answers and advises treatment, plus an
    image-independence flag: (result after the safety pass, SafetyReport)."""
    images = phantoms["siemens"]["images"]
    res = fake_result(template, images)  # pericardial effusion large (critical)
    res = res.model_copy(update={"impression": "Normal study. No pericardial effusion. Start colchicine."})
    new, report = apply_safety(None, None, res, template, probe=False)
    extra = SafetyReport.model_validate({"flags": [{"kind": "image_independent",
                                                    "message": "answers did not depend on the images"}]})
    report = report.model_copy(update={"flags": report.flags + extra.flags})
    assert {f.kind for f in report.flags} == {FlagKind.CONTRADICTION, FlagKind.TREATMENT_ADVICE,
                                              FlagKind.IMAGE_INDEPENDENT}
    return new, report


def test_pr_shows_safety_flags_on_every_image(phantoms, template, flagged, tmp_path):
    ph = phantoms["siemens"]
    result, report = flagged
    pr = build_presentation_state(template, result, ph["images"], ph["sources"], safety=report)
    expected = [display_text(x) for x in [PR_BANNER()] + flag_lines(template, answers(template, result), report)]
    assert any(x.startswith("CRITICAL - urgent review: ") for x in expected)
    assert sum(x.startswith("AI SAFETY FLAG: ") for x in expected) == len(report.flags) >= 3
    banners = [[t.UnformattedTextValue for t in a.TextObjectSequence]
               for _, _, layer, a in _annotations(pr) if layer == LAYER_BANNER]
    assert len(banners) == len({_ref_key(im) for im in ph["images"]})
    assert all(b == expected for b in banners)
    # the text boxes stay on the display and do not overlap
    for _, _, _, a in _annotations(pr):
        for t in a.TextObjectSequence:
            (x0, y0), (x1, y1) = t.BoundingBoxTopLeftHandCorner, t.BoundingBoxBottomRightHandCorner
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    pr.save_as(tmp_path / "flags.dcm", enforce_file_format=True)
    dciodvfy(tmp_path / "flags.dcm")
    dcmpschk(tmp_path / "flags.dcm")


def _line_band(text: str, colour, width: int) -> np.ndarray:
    """The pixels render_mosaic draws for one line of the strip under the banner."""
    font = sc_module._font(15)
    b = font.getbbox("Ag")
    img = Image.new("RGB", (width, b[3] - b[1] + 6), sc_module._FLAG_BG)
    ImageDraw.Draw(img).text((sc_module.PAD, 0), text, fill=colour, font=font)
    return np.asarray(img)


def _has_band(px: np.ndarray, band: np.ndarray) -> bool:
    h = band.shape[0]
    return any(np.array_equal(px[y:y + h], band) for y in range(px.shape[0] - h + 1))


def test_sc_burns_in_critical_and_safety_flags(phantoms, template, flagged, tmp_path):
    """The flags are in the pixels: each line, rendered alone with the SC's font and
    colours, is found pixel for pixel in the SC with the safety report, and the
    ``AI SAFETY FLAG`` lines are not found in the SC without it."""
    ph = phantoms["siemens"]
    result, report = flagged
    with_flags = build_secondary_capture(template, result, ph["images"], ph["sources"], safety=report)
    without = build_secondary_capture(template, result, ph["images"], ph["sources"])
    path = tmp_path / "sc-flags.dcm"
    with_flags.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    ds = pydicom.dcmread(path)
    assert ds.BurnedInAnnotation == "YES" and ds.SeriesDescription.startswith("AI DRAFT")
    assert "UNVERIFIED AI DRAFT" in ds.ImageComments and "UNVERIFIED AI DRAFT" in sc_module.BANNER()
    assert "AI draft" in ds.DerivationDescription
    px, px_without = ds.pixel_array, without.pixel_array
    Image.fromarray(px).save(tmp_path / "sc-flags.png")  # for eyeballing
    width = px.shape[1]
    assert px_without.shape[1] == width
    lines = flag_lines(template, answers(template, result), report)
    safety_lines = [x for x in lines if x.startswith("AI SAFETY FLAG: ")]
    assert len(safety_lines) == len(report.flags) >= 3
    assert lines[0].startswith("CRITICAL — urgent review: Pericardial")
    font = sc_module._font(15)
    text_w = width - 2 * sc_module.PAD
    for line in lines:
        colour = sc_module._ORANGE if line.startswith("CRITICAL") else sc_module._YELLOW
        first = sc_module._wrap(sc_module._text(line, font), font, text_w)[0]
        band = _line_band(first, colour, width)
        assert _has_band(px, band), f"not burnt in: {first!r}"
        assert line in ds.ImageComments or line.rstrip(".") in ds.ImageComments
        # critical answers are flagged with or without a safety report; the safety pass's
        # lines only with it
        assert _has_band(px_without, band) == line.startswith("CRITICAL"), first
    assert "AI SAFETY FLAG" not in without.ImageComments


# ---------------------------------------------------------------------------
# a real PACS

@pytest.mark.parametrize("style,transport", [("siemens", "dimse"), ("ge", "stow"), ("philips", "dimse")])
def test_pr_stored_in_orthanc_and_read_back(style, transport, phantoms, built, orthanc, tmp_path):
    """The referenced images and the PR go to Orthanc through our exporters (C-STORE, or
    STOW-RS for the GE-style study); Orthanc files the PR in the source study and gives
    back what we sent; every image the PR references is there."""
    ph = phantoms[style]
    _result, pr, path = built[style]
    if transport == "dimse":
        exporter = DimseExporter("pacs", DimseTarget(ae_title=orthanc.aet, host="127.0.0.1",
                                                     port=orthanc.port), calling_ae="CMR_AI")
    else:
        exporter = DicomwebExporter("pacs-web", DicomwebTarget(url=orthanc.dicomweb_url))
    originals = [pydicom.dcmread(ph["files"][uid]) for uid in ph["sources"]]
    written = pydicom.dcmread(path)
    outcomes = exporter.send(originals + [written])
    assert all(o.ok and not o.warning for o in outcomes), [(o.sop_instance_uid, o.status) for o in outcomes]

    oid = orthanc.find_instance(pr.SOPInstanceUID)
    assert oid, "PR not in Orthanc"
    back = tmp_path / "back.dcm"
    r = orthanc._http.get(f"{orthanc.base}/instances/{oid}/file", timeout=30)
    r.raise_for_status()
    back.write_bytes(r.content)
    got = pydicom.dcmread(back)
    assert got.SOPClassUID == GSPS and got.SOPInstanceUID == pr.SOPInstanceUID
    assert got.GraphicAnnotationSequence == written.GraphicAnnotationSequence
    assert got.ReferencedSeriesSequence == written.ReferencedSeriesSequence
    assert got.SoftcopyVOILUTSequence == written.SoftcopyVOILUTSequence
    assert dciodvfy(back) is not None
    tags = orthanc.instance_tags(oid)
    assert tags["Modality"] == "PR" and tags["ContentLabel"] == CONTENT_LABEL
    study_of = {orthanc.get(f"/instances/{orthanc.find_instance(uid)}/study")["ID"]
                for uid in [pr.SOPInstanceUID, *ph["sources"]]}
    assert len(study_of) == 1  # the PR sits in the source study
    for series in got.ReferencedSeriesSequence:
        for ref in series.ReferencedImageSequence:
            assert orthanc.find_instance(ref.ReferencedSOPInstanceUID)
