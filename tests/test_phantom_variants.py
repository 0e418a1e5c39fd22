"""Phantom variants (transfer syntaxes, descriptions, legacy converted multi-frame, LGE) end to end.

For every variant of :func:`plugin.phantom.write_study`: the study classifies right
(``classify_study(load_study(paths))`` names every series as ``truth.series`` says,
LGE included), ``prepare_images`` decodes and renders the twelve analysis images, and
a sample of files per series passes dciodvfy.  Small studies (6 slices, 8 phases,
96 px) keep the whole module well under 90 s.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RLELossless,
)

from plugin import phantom
from plugin.cardiac import View, classify_study, load_study, prepare_images
from plugin.cardiac.classify import content_evidence
from plugin.phantom import PhantomTruth, write_study

DCIODVFY = "/usr/bin/dciodvfy"
SMALL = dict(slices=6, phases=8, size=96)
KEYS = {f"SAX_{level}_{phase}" for level in ("basal", "mid", "apical") for phase in ("ED", "ES")} | {
    f"{view}_{phase}" for view in ("2CH", "3CH", "4CH") for phase in ("ED", "ES")}
#: PS3.5 Table 8.2.1-1 wants Bits Allocated 8 for JPEG baseline; the classic MR Image
#: module (PS3.3 C.8.3.1) allows only 16: the one error a classic MR file in JPEG
#: baseline cannot avoid.
BASELINE_CLASSIC_ERROR = "Unrecognized enumerated value <0x8> for value 1 of attribute <Bits Allocated>"


# ---------------------------------------------------------------------------- helpers


class Studies:
    """Phantom studies written once per module, keyed by their options."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, tuple[Path, PhantomTruth]] = {}

    def get(self, **kw) -> tuple[Path, PhantomTruth]:
        key = "_".join(f"{k}-{v}" for k, v in sorted(kw.items())).replace("/", "")
        if key not in self._cache:
            folder = self.root / key
            truth = write_study(folder, seed=11, **{**SMALL, **kw})
            self._cache[key] = (folder, truth)
        return self._cache[key]


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Studies:
    return Studies(tmp_path_factory.mktemp("variants"))


def _paths(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def _check_study(folder: Path, truth: PhantomTruth) -> dict:
    """Classification equals the truth, and the twelve images render; returns the classifications."""
    study = load_study(_paths(folder))
    cls = classify_study(study)
    got = {view: cls[uid].view.value for view, uid in truth.series.items()}
    assert got == {view: view for view in truth.series}, {v: (cls[u].view.value, cls[u].reasons)
                                                          for v, u in truth.series.items()}
    images, limitations = prepare_images(study, cls)
    assert {im.key for im in images} == KEYS, limitations
    assert not [lim for lim in limitations if "could not be decoded" in lim], limitations
    if "LGE" in truth.series:
        assert "no LGE series" not in limitations
    for im in images:
        arr = np.asarray(im.to_pil().convert("L"))
        assert arr.max() > 150, im.key  # bright blood survives decoding and windowing
    return cls


def _dciodvfy_errors(folder: Path) -> dict[str, list[str]]:
    """dciodvfy Error lines for the first and last file of every series folder."""
    errors: dict[str, list[str]] = {}
    for series in sorted(d for d in folder.iterdir() if d.is_dir()):
        files = sorted(series.glob("*.dcm"))
        for f in {files[0], files[-1]}:
            res = subprocess.run([DCIODVFY, str(f)], capture_output=True, text=True, timeout=60)
            lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln]
            if lines:
                errors[f"{series.name}/{f.name}"] = lines
    return errors


needs_dciodvfy = pytest.mark.usefixtures()  # dciodvfy is required: make test installs dicom3tools


# ---------------------------------------------------------------------------- transfer syntaxes


@pytest.mark.parametrize("style", ["siemens", "philips"])
@pytest.mark.parametrize("ts", list(phantom.TRANSFER_SYNTAXES))
def test_transfer_syntax(studies, ts, style):
    folder, truth = studies.get(style=style, transfer_syntax=ts)
    uid = phantom.TRANSFER_SYNTAXES[ts]
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in _paths(folder)]
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in datasets} == {uid}
    assert all(ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID for ds in datasets)
    _check_study(folder, truth)
    if uid == JPEGBaseline8Bit:
        for ds in datasets:
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (8, 8, 7)
            assert ds.LossyImageCompression == "01" and float(ds.LossyImageCompressionRatio) > 1
        cines = [ds for ds in datasets if ds.SOPClassUID == MRImageStorage and "LOCALIZER" not in ds.ImageType]
        for ds in cines:  # 12-bit values and the window divided alike
            assert float(ds.WindowWidth) == pytest.approx(1000 / phantom.JPEG_BASELINE_DIVISOR)
    elif uid.is_compressed and ts != "jpeg-extended":
        assert all(ds.get("LossyImageCompression", "00") == "00" for ds in datasets)


def test_lossless_encodings_are_the_same_instances(studies):
    """Same SOP Instance UIDs and, after decoding, the same pixels as the uncompressed study."""
    ref_folder, ref = studies.get(style="siemens", transfer_syntax="explicit")
    ref_pixels = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).pixel_array for p in _paths(ref_folder)[:8]}
    for ts in ("rle", "jpeg-lossless", "jpeg-ls", "jpeg2000"):
        folder, truth = studies.get(style="siemens", transfer_syntax=ts)
        assert truth.series == ref.series and truth.study_instance_uid == ref.study_instance_uid
        for p in _paths(folder)[:8]:
            ds = pydicom.dcmread(p)
            np.testing.assert_array_equal(ds.pixel_array, ref_pixels[ds.SOPInstanceUID], err_msg=ts)
    lossy_folder, lossy = studies.get(style="siemens", transfer_syntax="jpeg-baseline")
    assert lossy.study_instance_uid != ref.study_instance_uid  # lossy: another study


@needs_dciodvfy
@pytest.mark.parametrize("style", ["siemens", "philips"])
@pytest.mark.parametrize("ts", list(phantom.TRANSFER_SYNTAXES))
def test_transfer_syntax_dciodvfy(studies, ts, style):
    folder, _ = studies.get(style=style, transfer_syntax=ts)
    errors = _dciodvfy_errors(folder)
    if ts == "jpeg-baseline":  # only the unavoidable one, only on classic MR objects
        for name, lines in errors.items():
            sop = pydicom.dcmread(folder / name, stop_before_pixels=True).SOPClassUID
            assert sop == MRImageStorage and all(BASELINE_CLASSIC_ERROR in ln for ln in lines), (name, lines)
    else:
        assert not errors, errors


# ---------------------------------------------------------------------------- descriptions


@pytest.mark.parametrize("style,mode", [("siemens", "blank"), ("siemens", "misleading"), ("ge", "vendor"),
                                        ("philips", "misleading")])
def test_description_modes(studies, style, mode):
    folder, truth = studies.get(style=style, descriptions=mode)
    by_series = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID:
                 pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription for p in _paths(folder)}
    desc = {view: by_series[uid] for view, uid in truth.series.items()}
    cls = _check_study(folder, truth)
    if mode == "blank":
        assert set(desc.values()) == {""}
    elif mode == "vendor":
        assert desc["4CH"] == "FIESTA CINE 4CH" and desc["LOCALIZER"] == "3-Plane Loc"
    else:  # the long-axis names are swapped; geometry wins, with a lower confidence and the reason
        assert "2" in desc["4CH"] and "4" in desc["2CH"] and "4" in desc["3CH"]
        for view in ("2CH", "3CH", "4CH"):
            c = cls[truth.series[view]]
            assert c.confidence <= 0.6, (view, c)
            assert any("geometry wins" in r for r in c.reasons), c.reasons
            assert any(r.startswith("content:") for r in c.reasons), c.reasons


@needs_dciodvfy
def test_description_modes_dciodvfy(studies):
    folder, _ = studies.get(style="siemens", descriptions="misleading")
    assert not _dciodvfy_errors(folder)


# ---------------------------------------------------------------------------- legacy converted enhanced


@pytest.mark.parametrize("style", phantom.STYLES)
def test_legacy_enhanced(studies, style):
    folder, truth = studies.get(style=style, legacy_enhanced=True, lge=True)
    cines = {view: [pydicom.dcmread(p, stop_before_pixels=True) for p in _paths(folder)
                    if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == uid]
             for view, uid in truth.series.items()}
    for view in ("SAX", "2CH", "3CH", "4CH", "LGE"):
        (ds,) = cines[view]
        assert ds.SOPClassUID == LegacyConvertedEnhancedMRImageStorage
        frames = int(ds.NumberOfFrames)
        assert frames == {"SAX": 6 * 8, "LGE": 6}.get(view, 8)
        per_frame = ds.PerFrameFunctionalGroupsSequence[0]
        assert "UnassignedPerFrameConvertedAttributesSequence" in per_frame
    expected_ts = RLELossless if style == "ge" else ExplicitVRLittleEndian
    assert cines["SAX"][0].file_meta.TransferSyntaxUID == expected_ts
    study = load_study(_paths(folder))
    sax = study.series[truth.series["SAX"]]
    assert len({f.trigger_time for f in sax.frames}) == 8  # TriggerTime read back from the unassigned attributes
    lge = study.series[truth.series["LGE"]]
    assert all(f.inversion_time for f in lge.frames)
    _check_study(folder, truth)


@needs_dciodvfy
@pytest.mark.parametrize("style", phantom.STYLES)
def test_legacy_enhanced_dciodvfy(studies, style):
    folder, _ = studies.get(style=style, legacy_enhanced=True, lge=True)
    assert not _dciodvfy_errors(folder)


# ---------------------------------------------------------------------------- LGE


@pytest.mark.parametrize("style", phantom.STYLES)
def test_lge(studies, style):
    folder, truth = studies.get(style=style, lge=True)
    assert set(truth.series) == {"LOCALIZER", "SAX", "2CH", "3CH", "4CH", "LGE"}
    cls = _check_study(folder, truth)
    c = cls[truth.series["LGE"]]
    if style == "ge":  # blank description: inversion time, one image per position, a stack
        assert c.confidence == 0.6 and any("LGE stack" in r for r in c.reasons), c.reasons
    else:
        assert c.confidence == 0.9 and any("InversionTime" in r for r in c.reasons), c.reasons
    lge = [pydicom.dcmread(p) for p in _paths(folder) if pydicom.dcmread(p, stop_before_pixels=True)
           .SeriesInstanceUID == truth.series["LGE"]]
    desc = {"siemens": "LGE_PSIR_SAX", "ge": "", "philips": "sDE_SA"}[style]
    assert {ds.SeriesDescription for ds in lge} == {desc}
    if style != "philips":
        assert len(lge) == 6 and all("IR" in ds.ScanningSequence for ds in lge)
        tis = [float(ds.InversionTime) for ds in sorted(lge, key=lambda d: int(d.InstanceNumber))]
        assert tis == sorted(tis) and tis[0] >= 250
    else:
        (ds,) = lge
        assert ds.PerFrameFunctionalGroupsSequence[0].MRModifierSequence[0].InversionRecovery == "YES"


def test_lge_contrast():
    """Nulled myocardium dark, blood grey, the inferolateral infarct bright (mid slice, phase 0)."""
    anatomy = phantom.CardiacAnatomy(ef=0.55, phases=8)
    plane = phantom.sax_planes(6, 128)[0][2]
    pts = plane.points()
    labels = anatomy.labels(pts, 0)
    scar = anatomy.enhancement(pts, 0) & (labels == phantom.Tissue.MYOCARDIUM)
    img = anatomy.render(plane, 0, np.random.default_rng(0), table=phantom.LGE_IR,
                         enhance=phantom.LGE_ENHANCED).ravel()
    blood = img[anatomy.lv_blood(pts, 0)].mean()
    myo = img[(labels == phantom.Tissue.MYOCARDIUM) & ~scar].mean()
    assert scar.sum() > 20
    assert myo < 0.25 * blood and img[scar].mean() > 1.5 * blood


@needs_dciodvfy
@pytest.mark.parametrize("style", phantom.STYLES)
def test_lge_dciodvfy(studies, style):
    folder, _ = studies.get(style=style, lge=True)
    assert not _dciodvfy_errors(folder)


# ---------------------------------------------------------------------------- image content


def test_content_agrees_on_standard_views(studies):
    folder, truth = studies.get(style="ge")  # blank descriptions: geometry and content only
    cls = classify_study(load_study(_paths(folder)))
    expected = {"2CH": "as in a 2-chamber view", "3CH": "towards the aorta, as in a 3-chamber view",
                "4CH": "RV blood pool beside the LV, as in a 4-chamber view"}
    for view, words in expected.items():
        c = cls[truth.series[view]]
        assert any(r.startswith("content:") and words in r for r in c.reasons), c.reasons
        assert c.confidence >= 0.9  # geometry 0.85 + agreeing content


def test_content_decodes_one_frame_per_long_axis_cine(studies, monkeypatch):
    """Cheap: one pixel_array call per long-axis cine, for one frame (index) of a multi-frame object."""
    from plugin.cardiac import classify as classify_module

    folder, truth = studies.get(style="philips", lge=True)
    study = load_study(_paths(folder))
    calls = []
    real = classify_module.pixel_array

    def counting(src, **kw):
        calls.append((Path(src).parent.name, kw.get("index")))
        return real(src, **kw)

    monkeypatch.setattr(classify_module, "pixel_array", counting)
    classify_study(study)
    assert len(calls) == 3 and all(index is not None for _, index in calls), calls


@pytest.mark.parametrize("theta,expected", [(0, None), (19, None), (21, {"2CH", "3CH"}), (60, None),
                                            (88, {"3CH", "4CH"}), (95, {"3CH", "4CH"}), (120, None),
                                            (145, {"2CH", "4CH"}), (150, {"2CH", "4CH"}), (179, None)])
def test_ambiguous_zones(theta, expected):
    """θ within 10° of the midpoint between two standard planes (30°, 90°, 150°) is ambiguous."""
    from plugin.cardiac.classify import _between

    got = _between(float(theta))
    assert (None if got is None else {got[0].value, got[1].value}) == expected


def test_ambiguous_geometry_content_decides(studies):
    """A 4CH acquired 32° off (θ = 88°, near the 3CH/4CH midpoint): geometry alone says OTHER."""
    folder, truth = studies.get(style="ge", view_angles={"4CH": 88})
    study = load_study(_paths(folder))
    c = classify_study(study)[truth.series["4CH"]]
    assert c.view == View.CH4 and c.angle_deg == pytest.approx(88, abs=1)
    assert any("the image content decides" in r for r in c.reasons), c.reasons
    assert 0.5 <= c.confidence <= 0.6


def test_undecodable_frame_gives_no_content_evidence(studies, tmp_path):
    folder, truth = studies.get(style="ge")
    copy = tmp_path / "study"
    shutil.copytree(folder, copy)
    study = load_study(_paths(copy))
    frame = min(study.series[truth.series["4CH"]].frames, key=lambda f: f.time_key)
    ds = pydicom.dcmread(frame.path)
    ds.PixelData = ds.PixelData[:64]  # a truncated RLE frame
    ds.save_as(frame.path)
    evidence = content_evidence(frame, phantom.LV_AXIS)
    assert evidence.view is None and "could not be decoded" in evidence.reason
    c = classify_study(load_study(_paths(copy)))[truth.series["4CH"]]
    assert c.view == View.CH4  # geometry still names it
    assert any("could not be decoded" in r for r in c.reasons), c.reasons


# ---------------------------------------------------------------------------- API and CLI


def test_deterministic_with_dcmtk(tmp_path):
    kw = dict(style="philips", seed=2, slices=2, phases=4, size=32, transfer_syntax="jpeg-lossless", lge=True)
    write_study(tmp_path / "a", **kw)
    write_study(tmp_path / "b", **kw)
    a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert a == b


def test_option_errors_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="transfer_syntax"):
        write_study(tmp_path, transfer_syntax="jpeg-xl")
    with pytest.raises(ValueError, match="descriptions"):
        write_study(tmp_path, descriptions="random")
    with pytest.raises(ValueError, match="view_angles"):
        write_study(tmp_path, view_angles={"5CH": 10})
    assert phantom.main([str(tmp_path / "s"), "--style", "ge", "--lge", "--legacy-enhanced", "--transfer-syntax",
                         "jpeg-ls", "--descriptions", "vendor", "--slices", "3", "--phases", "4", "--size", "32",
                         "--view-angle", "4CH=110"]) == 0
    truth = PhantomTruth.from_json((tmp_path / "s" / "truth.json").read_text())
    assert "LGE" in truth.series
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            for p in (tmp_path / "s").rglob("*.dcm")} == {phantom.TRANSFER_SYNTAXES["jpeg-ls"]}
    capsys.readouterr()
    assert phantom.main([str(tmp_path / "x"), "--view-angle", "4CH"]) == 2
    assert "--view-angle" in capsys.readouterr().err
