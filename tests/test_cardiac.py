"""plugin.cardiac: reading, view classification, phase/slice selection and rendering.

Two sources of studies:

- a tiny geometric factory in this file (``_Study``): classic, Enhanced MR multi-frame
  and compressed objects with known planes and a contracting LV blood pool; it keeps
  these tests independent of the phantom;
- ``plugin.phantom.write_study`` (three vendor styles), when that module exists.
"""
from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComprehensiveSRStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from plugin.cardiac import PrepareError, View, analyse_paths, classify_study, load_study, prepare_images
from plugin.cardiac.classify import ring_angle, ring_basis, text_hints, tokens, unit
from plugin.cardiac.prepare import FrameReader, blood_pool, lv_roi

AXIS = unit([0.55, -0.45, -0.70])  # LV long axis, base → apex (LPS)
HEART = np.array([20.0, -30.0, 40.0])  # LV centre, mm
N = 64  # matrix
SP = 4.0  # mm per pixel
ES_FRACTION = 0.35


# ---------------------------------------------------------------------------- factory


def _lv_radius(phase_frac: float, level: float = 0.5) -> float:
    """LV blood-pool radius (pixels): largest at ED (0), smallest at 35 % of the cycle."""
    contraction = 0.5 - 0.5 * math.cos(2 * math.pi * min(phase_frac / (2 * ES_FRACTION), 1.0)) \
        if phase_frac <= 2 * ES_FRACTION else 0.0
    return (9.0 - 3.5 * contraction) * (1.15 - 0.5 * level)


def _paint_sax(phase_frac: float, level: float, rng) -> np.ndarray:
    yy, xx = np.mgrid[0:N, 0:N].astype(float)
    img = 150 + rng.normal(0, 15, (N, N))
    r = _lv_radius(phase_frac, level)
    d = np.hypot(yy - N / 2, xx - N / 2)
    img[d < r + 3] = 350  # myocardium
    img[d < r] = 1000  # LV blood
    rv = np.hypot(yy - N / 2, xx - (N / 2 - r - 9))
    img[(rv < 6) & (d > r + 3)] = 900  # RV blood, left of the septum
    return np.clip(img, 0, 4095).astype(np.uint16)


def _paint_lax(phase_frac: float, rng) -> np.ndarray:
    yy, xx = np.mgrid[0:N, 0:N].astype(float)
    img = 150 + rng.normal(0, 15, (N, N))
    r = _lv_radius(phase_frac)
    d = np.hypot((yy - N / 2) / 2.0, xx - N / 2)
    img[d < r + 3] = 350
    img[d < r] = 1000
    return np.clip(img, 0, 4095).astype(np.uint16)


def _plane(row, col, centre):
    row, col = unit(row), unit(col)
    pos = np.asarray(centre, float) - row * (N - 1) / 2 * SP - col * (N - 1) / 2 * SP
    return [float(x) for x in (*row, *col)], [float(x) for x in pos]


def lax_plane(theta_deg: float, axis=AXIS):
    """A long-axis plane at ``theta_deg`` on the AHA ring (rows across the heart, columns base → apex)."""
    w, s = ring_basis(axis)
    t = math.cos(math.radians(theta_deg)) * w + math.sin(math.radians(theta_deg)) * s
    return _plane(t, axis, HEART)


def sax_planes(n: int, step: float = 8.0, axis=AXIS):
    w, s = ring_basis(axis)
    return [_plane(w, s, HEART + (k - (n - 1) / 2) * step * axis) for k in range(n)]


class _Study:
    """Writes a small study: one call per series, every file into ``root``."""

    def __init__(self, root: Path, *, seed: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.study_uid = generate_uid()
        self.rng = np.random.default_rng(seed)
        self.number = 0
        self.paths: list[Path] = []

    def _base(self, sop_class, series_uid, desc, number) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "MR"
        ds.PatientName = "Factory^Test"
        ds.PatientID = "F1"
        ds.SeriesNumber = number
        if desc is not None:
            ds.SeriesDescription = desc
        return ds

    def _pixels(self, ds: Dataset, arr: np.ndarray) -> None:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = arr.shape[-2:]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = arr.astype(np.uint16).tobytes()

    def _save(self, ds: Dataset, compress=None) -> None:
        if compress is not None:
            ds.compress(compress)
        path = self.root / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.paths.append(path)

    def series(self, desc, planes, *, phases=12, kind="lax", image_type=("ORIGINAL", "PRIMARY", "M"),
               compress=None, trigger=True, window=True, rr=1000.0) -> str:
        """Classic MR, one file per (plane, phase); returns the SeriesInstanceUID."""
        self.number += 1
        uid = generate_uid()
        inst = 0
        for k, (iop, ipp) in enumerate(planes):
            level = k / max(1, len(planes) - 1)
            for p in range(phases):
                frac = p / phases
                inst += 1
                ds = self._base(MRImageStorage, uid, desc, self.number)
                ds.ImageType = list(image_type)
                ds.InstanceNumber = inst
                ds.ImageOrientationPatient = iop
                ds.ImagePositionPatient = ipp
                ds.PixelSpacing = [SP, SP]
                ds.SliceThickness = 8
                if trigger and phases > 1:
                    ds.TriggerTime = round(frac * rr, 1)
                if window:
                    ds.WindowCenter, ds.WindowWidth = 600, 1200
                arr = _paint_sax(frac, level, self.rng) if kind == "sax" else _paint_lax(frac, self.rng)
                self._pixels(ds, arr)
                self._save(ds, compress)
        return uid

    def enhanced(self, desc, planes, *, phases=12, kind="lax", compress=None, rr=1000.0) -> str:
        """One Enhanced MR Image object holding every (plane, phase) frame; returns the series UID."""
        self.number += 1
        uid = generate_uid()
        ds = self._base(EnhancedMRImageStorage, uid, desc, self.number)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.InstanceNumber = 1
        ds.NumberOfFrames = len(planes) * phases
        shared = Dataset()
        pm = Dataset()
        pm.PixelSpacing = [SP, SP]
        pm.SliceThickness = 8
        shared.PixelMeasuresSequence = Sequence([pm])
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, 0, "US"
        shared.PixelValueTransformationSequence = Sequence([pvt])
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = 600, 1200
        shared.FrameVOILUTSequence = Sequence([voi])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        per_frame, frames = [], []
        for k, (iop, ipp) in enumerate(planes):
            level = k / max(1, len(planes) - 1)
            for p in range(phases):
                frac = p / phases
                fg = Dataset()
                pp, po, cs, fc = Dataset(), Dataset(), Dataset(), Dataset()
                pp.ImagePositionPatient = ipp
                po.ImageOrientationPatient = iop
                cs.NominalCardiacTriggerDelayTime = round(frac * rr, 1)
                fc.StackID = "1"
                fc.InStackPositionNumber = k + 1
                fc.TemporalPositionIndex = p + 1
                fg.PlanePositionSequence = Sequence([pp])
                fg.PlaneOrientationSequence = Sequence([po])
                fg.CardiacSynchronizationSequence = Sequence([cs])
                fg.FrameContentSequence = Sequence([fc])
                per_frame.append(fg)
                frames.append(_paint_sax(frac, level, self.rng) if kind == "sax" else _paint_lax(frac, self.rng))
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        self._pixels(ds, np.stack(frames))
        self._save(ds, compress)
        return uid

    def localizer(self, desc="localizer", *, flag=True) -> str:
        planes = [_plane([1, 0, 0], [0, 1, 0], HEART), _plane([0, 1, 0], [0, 0, -1], HEART),
                  _plane([1, 0, 0], [0, 0, -1], HEART)]
        it = ("ORIGINAL", "PRIMARY", "LOCALIZER") if flag else ("ORIGINAL", "PRIMARY", "M")
        return self.series(desc, planes, phases=1, image_type=it)

    def sr(self) -> Path:
        self.number += 1
        ds = self._base(ComprehensiveSRStorage, generate_uid(), "AI report", self.number)
        ds.ValueType = "CONTAINER"
        self._save(ds)
        return self.paths[-1]

    def sc(self) -> Path:
        self.number += 1
        ds = self._base(SecondaryCaptureImageStorage, generate_uid(), "AI overlay", self.number)
        ds.Modality = "OT"
        self._pixels(ds, np.zeros((8, 8), np.uint16))
        self._save(ds)
        return self.paths[-1]


def factory_study(root: Path, style: str = "siemens", *, slices=8, phases=12, seed=0):
    """A full cardiac study in a vendor flavour; returns (paths, {view: series uid})."""
    st = _Study(root, seed=seed)
    truth = {}
    if style == "siemens":
        truth["LOCALIZER"] = st.localizer("localizer", flag=True)
        truth["SAX"] = st.series("cine_tf2d_sax", sax_planes(slices), phases=phases, kind="sax")
        truth["2CH"] = st.series("cine_tf2d_2ch", [lax_plane(3)], phases=phases)
        truth["3CH"] = st.series("cine_tf2d_3ch", [lax_plane(57)], phases=phases)
        truth["4CH"] = st.series("cine_tf2d_4ch", [lax_plane(125)], phases=phases)
        truth["LGE"] = st.series("de_psir_sax", sax_planes(slices), phases=1)
    elif style == "ge":  # blank descriptions, RLE, localizer only by geometry
        truth["LOCALIZER"] = st.localizer(None, flag=False)
        truth["SAX"] = st.series(None, sax_planes(slices), phases=phases, kind="sax", compress=RLELossless)
        truth["4CH"] = st.series(None, [lax_plane(118)], phases=phases, compress=RLELossless)
        truth["2CH"] = st.series(None, [lax_plane(-4)], phases=phases, compress=RLELossless)
        truth["3CH"] = st.series(None, [lax_plane(64)], phases=phases, compress=RLELossless)
    elif style == "philips":  # Enhanced MR multi-frame, JPEG 2000
        truth["LOCALIZER"] = st.localizer("Survey", flag=False)
        truth["SAX"] = st.enhanced("sBTFE_SA", sax_planes(slices), phases=phases, kind="sax",
                                   compress=JPEG2000Lossless)
        truth["2CH"] = st.enhanced("sBTFE_2CH", [lax_plane(0)], phases=phases)
        truth["3CH"] = st.enhanced("LAX_3Ch", [lax_plane(60)], phases=phases)
        truth["4CH"] = st.enhanced("sBTFE_4CH", [lax_plane(120)], phases=phases)
    else:
        raise ValueError(style)
    return st, truth


# ---------------------------------------------------------------------------- unit tests


def test_tokens_and_hints():
    assert tokens("sBTFE_SA") == ["s", "btfe", "sa"]
    assert tokens("LAX_3Ch") == ["lax", "3", "ch"]
    assert "SAX" in text_hints("sBTFE_SA") and "SAX" in text_hints("cine SAX stack")
    assert "3CH" in text_hints("LAX_3Ch") and "LAX" in text_hints("LAX_3Ch")
    assert "2CH" in text_hints("cine 2ch") and "4CH" in text_hints("4CH")
    assert "T1MAP" in text_hints("MOLLI 5(3)3") and "T1MAP" in text_hints("t1 map")
    assert "T2MAP" in text_hints("T2Map_FLASH") and "LGE" in text_hints("tfl_psir")
    assert "PERFUSION" in text_hints("first pass perfusion") and "LOCALIZER" in text_hints("3-pl loc")
    assert text_hints("t1_mprage_sag") == {} and text_hints("t2_tse_tra") == {}


def test_ring_matches_anatomy():
    """Anatomical landmarks, independent of the ring's own basis, land on the right views."""
    from plugin.cardiac.classify import nearest_standard

    def plane_through(direction):  # plane containing the axis and a patient direction
        return ring_angle(AXIS, np.cross(AXIS, unit(direction)))

    _w, s = ring_basis(AXIS)
    assert nearest_standard(ring_angle(AXIS, s))[0] == View.CH2  # 2CH is parallel to the septum
    assert nearest_standard(plane_through([-1, -1, 1]))[0] == View.CH3  # through the LV outflow tract
    assert nearest_standard(plane_through([-1, 0, 0]))[0] == View.CH4  # across to the patient's right (RV)
    t4 = unit(lax_plane(120)[0][:3])  # 4CH transverse: right/anterior ↔ left/posterior
    assert abs(t4[0]) > 0.6 and np.sign(t4[0]) == np.sign(t4[1])


@pytest.mark.parametrize("style", ["siemens", "ge", "philips"])
def test_factory_views(tmp_path, style):
    st, truth = factory_study(tmp_path, style)
    study = load_study(st.paths)
    cls = classify_study(study)
    for view, uid in truth.items():
        assert cls[uid].view == View(view), (view, cls[uid])
    assert cls[truth["LOCALIZER"]].view == View.LOCALIZER
    if style == "ge":
        for v in ("2CH", "3CH", "4CH"):
            assert any("geometry alone" in r for r in cls[truth[v]].reasons)
            assert cls[truth[v]].confidence >= 0.6
    else:
        assert cls[truth["4CH"]].confidence >= 0.9 and cls[truth["SAX"]].confidence >= 0.9


def test_misleading_description_geometry_wins(tmp_path):
    st = _Study(tmp_path)
    sax = st.series("cine sa", sax_planes(6), kind="sax")
    liar = st.series("cine 2CH", [lax_plane(120)])
    cls = classify_study(load_study(st.paths))
    assert cls[sax].view == View.SAX
    c = cls[liar]
    assert c.view == View.CH4 and c.confidence <= 0.6
    assert any("suggests 2CH" in r and "geometry wins" in r for r in c.reasons), c.reasons


def test_no_sax_axis_from_long_axis_planes(tmp_path):
    st = _Study(tmp_path)
    uids = {v: st.series(None, [lax_plane(a)]) for v, a in (("2CH", 5), ("3CH", 62), ("4CH", 115))}
    study = load_study(st.paths)
    cls = classify_study(study)
    for v, uid in uids.items():
        assert cls[uid].view == View(v)
        assert any("intersection" in r for r in cls[uid].reasons)
    images, limitations = prepare_images(study, cls)
    assert [im.key for im in images] == ["2CH_ED", "2CH_ES", "3CH_ED", "3CH_ES", "4CH_ED", "4CH_ES"]
    assert "no short-axis cine stack found" in limitations


def test_split_sax_stack_one_series_per_slice(tmp_path):
    st = _Study(tmp_path)
    sax = [st.series(None, [p], kind="sax") for p in sax_planes(5)]
    four = st.series(None, [lax_plane(120)])
    repeat = st.series(None, [sax_planes(5)[2]], kind="sax")  # the mid slice acquired again
    study = load_study(st.paths)
    cls = classify_study(study)
    assert all(cls[u].view == View.SAX for u in sax + [repeat])
    assert cls[four].view == View.CH4
    images, _ = prepare_images(study, cls)
    by = {im.key: im for im in images}
    assert len([k for k in by if k.startswith("SAX_")]) == 6
    assert by["SAX_mid_ED"].source.series_instance_uid == repeat  # the later repeat wins


def test_prepare_keys_ed_es_and_pixels(tmp_path):
    st, truth = factory_study(tmp_path, "siemens", slices=8, phases=20)
    study, cls, images, limitations = analyse_paths(st.paths)
    keys = [im.key for im in images]
    assert keys == ["SAX_basal_ED", "SAX_basal_ES", "SAX_mid_ED", "SAX_mid_ES", "SAX_apical_ED", "SAX_apical_ES",
                    "2CH_ED", "2CH_ES", "3CH_ED", "3CH_ES", "4CH_ED", "4CH_ES"]
    by = {im.key: im for im in images}
    ed, es = by["SAX_mid_ED"], by["SAX_mid_ES"]
    frames = {f.sop_instance_uid: f for f in study.series[truth["SAX"]].frames}
    f_ed, f_es = frames[ed.source.sop_instance_uid], frames[es.source.sop_instance_uid]
    assert f_ed.trigger_time == 0.0
    assert abs(f_es.trigger_time / 1000.0 - ES_FRACTION) <= 0.06, f_es.trigger_time
    reader = FrameReader()
    pool_ed = blood_pool(reader.modality(f_ed))
    assert blood_pool(reader.modality(f_es), pool_ed.centre).area < 0.8 * pool_ed.area
    # basal slices lie nearer the base: larger blood pool in this factory
    assert by["SAX_basal_ED"].source.sop_instance_uid != by["SAX_apical_ED"].source.sop_instance_uid
    img = ed.to_pil()
    assert img.size == (224, 224)
    assert ed.source.series_instance_uid == truth["SAX"] and ed.source.rows == N and ed.source.frame_number is None
    assert limitations == []  # LGE present, every view present, ES found


def test_enhanced_multiframe_jpeg2000(tmp_path):
    st, truth = factory_study(tmp_path, "philips")
    study = load_study(st.paths)
    sax = study.series[truth["SAX"]]
    assert len(sax.frames) == 8 * 12 and {f.frame_number for f in sax.frames} == set(range(1, 97))
    assert all(f.trigger_time is not None and f.stack_id == "1" for f in sax.frames)
    images, limitations = prepare_images(study, classify_study(study))
    by = {im.key: im for im in images}
    assert by["SAX_mid_ES"].source.frame_number not in (None, by["SAX_mid_ED"].source.frame_number)
    assert by["4CH_ED"].source.sop_class_uid == EnhancedMRImageStorage
    arr = np.asarray(by["SAX_mid_ED"].to_pil().convert("L"))
    # windowed by the Frame VOI LUT (600/1200): background 150 → ~32, not stretched to 0 by a percentile window
    assert arr.max() > 200 and 20 < arr[:20, :20].mean() < 45


def test_compressed_rle_and_jpegls_decode(tmp_path):
    st = _Study(tmp_path)
    rle = st.series(None, sax_planes(4), kind="sax", compress=RLELossless, window=False)
    jls = st.series("cine 4ch", [lax_plane(120)], compress=JPEGLSLossless)
    study = load_study(st.paths)
    assert pydicom.dcmread(study.series[rle].frames[0].path).file_meta.TransferSyntaxUID == RLELossless
    images, limitations = prepare_images(study, classify_study(study))
    keys = {im.key for im in images}
    assert {"SAX_mid_ED", "4CH_ES"} <= keys
    # no window in the RLE files: percentile window, still uses the full 8-bit range
    arr = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(
        next(im for im in images if im.key == "SAX_mid_ED").png_b64))))
    assert arr.max() >= 250


def test_untimed_cine_limitation(tmp_path):
    st = _Study(tmp_path)
    st.series("cine sa", sax_planes(5), kind="sax", trigger=False)
    study = load_study(st.paths)
    cls = classify_study(study)
    assert [c.view for c in cls.values()] == [View.SAX]
    images, limitations = prepare_images(study, cls)
    assert len(images) == 6
    assert any("no trigger times" in lim for lim in limitations)


def test_brain_mr_raises_prepare_error(tmp_path):
    st = _Study(tmp_path)
    st.localizer("localizer")
    axial = [_plane([1, 0, 0], [0, 1, 0], [0, 0, z]) for z in range(0, 100, 5)]
    t1 = st.series("t1_se_tra", axial, phases=1)
    st.series("t2_tse_tra", axial, phases=1)
    study = load_study(st.paths)
    cls = classify_study(study)
    assert cls[t1].view == View.OTHER
    with pytest.raises(PrepareError, match=r"no cine series.*t1_se_tra.*OTHER"):
        prepare_images(study, cls)


def test_non_image_objects_skipped_and_logged(tmp_path, caplog):
    st, truth = factory_study(tmp_path, "ge", slices=4, phases=8)
    sr, sc = st.sr(), st.sc()
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with caplog.at_level(logging.INFO, logger="plugin.cardiac.series"):
        study = load_study(st.paths + [tmp_path / "junk.dcm"])
    skipped = {Path(s.path).name: s.reason for s in study.skipped}
    assert "Comprehensive SR Storage" in skipped[sr.name] and "(0008,0016)" in skipped[sr.name]
    assert "Secondary Capture" in skipped[sc.name]
    assert "junk.dcm" in skipped
    assert any(str(sr) in r.getMessage() and "(0008,0016) SOP Class UID" in r.getMessage() for r in caplog.records)
    assert set(study.series) == set(truth.values())


# ---------------------------------------------------------------------------- the phantom


def _phantom():
    try:
        from plugin import phantom
    except ImportError:
        return None
    return phantom if hasattr(phantom, "write_study") else None


@pytest.mark.parametrize("style", ["siemens", "ge", "philips"])
def test_phantom_views_and_prepare(tmp_path, style):
    phantom = _phantom()
    truth = phantom.write_study(tmp_path, style=style, seed=1)
    paths = sorted(p for p in Path(tmp_path).rglob("*") if p.is_file())
    t0 = time.monotonic()
    study, cls, images, limitations = analyse_paths(paths)
    elapsed = time.monotonic() - t0
    for view, uid in truth.series.items():
        assert cls[uid].view == View(view), (style, view, cls[uid])
    for uid, c in cls.items():
        if c.view in (View.SAX, View.CH2, View.CH3, View.CH4):
            assert uid not in [truth.series.get("LOCALIZER")]
    keys = {im.key for im in images}
    assert {"SAX_basal_ED", "SAX_mid_ES", "SAX_apical_ES", "4CH_ED", "4CH_ES"} <= keys
    by = {im.key: im for im in images}
    frames = {(f.sop_instance_uid, f.frame_number): f for s in study.series.values() for f in s.frames}
    reader = FrameReader()
    ed = frames[(by["SAX_mid_ED"].source.sop_instance_uid, by["SAX_mid_ED"].source.frame_number)]
    es = frames[(by["SAX_mid_ES"].source.sop_instance_uid, by["SAX_mid_ES"].source.frame_number)]
    pool_ed = blood_pool(reader.modality(ed))
    assert blood_pool(reader.modality(es), pool_ed.centre).area < 0.75 * pool_ed.area
    same_place = sorted({f.trigger_time for f in study.series[truth.series["SAX"]].frames
                         if f.position == es.position})
    assert abs(same_place.index(es.trigger_time) - truth.es_phase) <= 1, (same_place, es.trigger_time, truth)
    assert ed.trigger_time == same_place[truth.ed_phase]
    axis = np.array(next(c.lv_axis for c in cls.values() if c.lv_axis is not None))
    if getattr(truth, "lv_axis", None) is not None:
        assert float(axis @ unit(truth.lv_axis)) > 0.95
    assert elapsed < 20, elapsed


def test_phantom_brain_mr_and_ct_raise_prepare_error(tmp_path):
    phantom = _phantom()
    phantom.write_brain_mr(tmp_path / "brain", seed=2)
    with pytest.raises(PrepareError, match="no cine series"):
        analyse_paths(sorted(p for p in (tmp_path / "brain").rglob("*") if p.is_file()))
    if hasattr(phantom, "write_ct"):
        phantom.write_ct(tmp_path / "ct", seed=3)
        with pytest.raises(PrepareError, match="no MR image series"):
            analyse_paths(sorted(p for p in (tmp_path / "ct").rglob("*") if p.is_file()))


def test_phantom_misleading_description_geometry_wins(tmp_path):
    truth = _phantom().write_study(tmp_path, style="siemens", seed=3)
    paths = sorted(p for p in Path(tmp_path).rglob("*.dcm"))
    for p in paths:
        ds = pydicom.dcmread(p)
        if ds.SeriesInstanceUID == truth.series["4CH"]:
            ds.SeriesDescription = "CINE_segmented_LAX_2Ch"
            ds.save_as(p)
    c = classify_study(load_study(paths))[truth.series["4CH"]]
    assert c.view == View.CH4 and c.confidence <= 0.6
    assert any("suggests 2CH" in r and "geometry wins" in r for r in c.reasons), c.reasons


def test_single_long_axis_plane_uses_prior_axis(tmp_path):
    st = _Study(tmp_path)
    four = st.series(None, [lax_plane(120)])
    study = load_study(st.paths)
    c = classify_study(study)[four]
    assert c.view == View.CH4 and c.confidence <= 0.6
    assert any("population prior" in r for r in c.reasons)
    images, limitations = prepare_images(study, {four: c})
    assert [im.key for im in images] == ["4CH_ED", "4CH_ES"]
    assert "no short-axis cine stack found" in limitations and "no 2CH cine found" in limitations


def test_axial_cine_stack_and_tissue_series_are_not_sax(tmp_path):
    st = _Study(tmp_path)
    axial = st.series(None, [_plane([1, 0, 0], [0, 1, 0], HEART + [0, 0, z]) for z in (-16, -8, 0, 8, 16)])
    molli = st.series("MOLLI 5(3)3 SAX", [sax_planes(3)[1]], phases=8, kind="sax")
    single = st.series(None, [sax_planes(3)[1]], phases=1)
    cls = classify_study(load_study(st.paths))
    assert cls[axial].view == View.OTHER and any("not a short-axis stack" in r for r in cls[axial].reasons)
    assert cls[molli].view == View.T1MAP
    assert cls[single].view == View.LOCALIZER  # a single image that is not part of a cine


def test_an_undecodable_sax_slice_is_replaced_by_its_neighbour(tmp_path):
    """One truncated file must not cost the whole short-axis view."""
    from pathlib import Path

    from plugin.cardiac import analyse_paths
    from plugin.phantom import write_study

    write_study(tmp_path / "s", style="siemens", seed=4, slices=8, phases=8, size=96)
    paths = sorted(str(p) for p in (tmp_path / "s").rglob("*.dcm"))
    _st, _cls, images, _lim = analyse_paths(paths)
    mid = next(im for im in images if im.key == "SAX_mid_ED")
    bad = next(p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
               == mid.source.sop_instance_uid)
    data = Path(bad).read_bytes()
    Path(bad).write_bytes(data[: len(data) - 4000])  # pixel data cut short
    _st, _cls, images2, lim2 = analyse_paths(paths)
    keys = [im.key for im in images2]
    assert "SAX_mid_ED" in keys and "SAX_mid_ES" in keys, keys
    mid2 = next(im for im in images2 if im.key == "SAX_mid_ED")
    assert mid2.source.sop_instance_uid != mid.source.sop_instance_uid
    assert any("SAX mid" in line and "could not be decoded" in line for line in lim2), lim2
    assert {im.key for im in images2} >= {"2CH_ED", "3CH_ED", "4CH_ED"}


def _restore(ds, how: str):
    """The same slice stored another way: rotated 90° or mirrored, with the geometry to match."""
    arr = ds.pixel_array
    r = np.array(ds.ImageOrientationPatient[:3], float)
    c = np.array(ds.ImageOrientationPatient[3:], float)
    ipp = np.array(ds.ImagePositionPatient, float)
    row_sp, col_sp = (float(x) for x in ds.PixelSpacing)
    w = arr.shape[1]
    if how == "rot90":  # new[i, j] = old[j, w-1-i]
        new, r2, c2 = np.rot90(arr), c, -r
        ipp2 = ipp + (w - 1) * col_sp * r
        ds.PixelSpacing = [col_sp, row_sp]
    else:  # mirrored: new[i, j] = old[i, w-1-j]
        new, r2, c2 = np.fliplr(arr), -r, c
        ipp2 = ipp + (w - 1) * col_sp * r
    ds.Rows, ds.Columns = new.shape
    ds.PixelData = np.ascontiguousarray(new).astype(arr.dtype).tobytes()
    ds.ImageOrientationPatient = [float(x) for x in (*r2, *c2)]
    ds.ImagePositionPatient = [float(x) for x in ipp2]
    return ds


@pytest.mark.parametrize("how", ["rot90", "mirror"])
def test_rendering_orientation_does_not_depend_on_how_the_scanner_stored_rows(tmp_path, how):
    """SAX anterior up / septum left, LAX apex up: the same picture however rows and columns were stored."""
    from pathlib import Path

    from plugin.cardiac import analyse_paths
    from plugin.phantom import write_study

    write_study(tmp_path / "a", style="siemens", seed=8, slices=6, phases=8, size=96)
    paths = sorted(str(p) for p in (tmp_path / "a").rglob("*.dcm"))
    _s, _c, ref, _l = analyse_paths(paths)
    for p in paths:  # store every cine image the other way
        ds = pydicom.dcmread(p)
        if "LOCALIZER" in ds.ImageType:
            continue
        _restore(ds, how).save_as(p)
    _s, cls, other, _l = analyse_paths(paths)
    assert [im.key for im in other] == [im.key for im in ref]
    for a, b in zip(ref, other):
        x = np.asarray(a.to_pil().convert("L"), float)
        y = np.asarray(b.to_pil().convert("L"), float)
        assert np.abs(x - y).mean() < 6.0, (a.key, np.abs(x - y).mean())


# ---------------------------------------------------------------------------- the LV region


@pytest.mark.parametrize("style", ["siemens", "ge", "philips"])
def test_sax_images_carry_the_lv_region_found_at_ed(tmp_path, style):
    """Each SAX ED/ES pair shares one square around the LV blood pool of its ED image; the
    ES cavity inside that square is smaller than the ED one (what `zoom: lv` shows)."""
    phantom = _phantom()
    phantom.write_study(tmp_path, style=style, seed=3, ef=0.30)
    paths = sorted(p for p in Path(tmp_path).rglob("*") if p.is_file())
    _study, _cls, images, _lim = analyse_paths(paths)
    by = {im.key: im for im in images}
    for level in ("basal", "mid", "apical"):
        ed, es = by[f"SAX_{level}_ED"], by[f"SAX_{level}_ES"]
        assert ed.roi is not None and ed.roi == es.roi, (level, ed.roi, es.roi)
        left, top, right, bottom = ed.roi
        w, h = ed.to_pil().size
        assert right - left == bottom - top                       # square
        assert 0 <= left < right <= w and 0 <= top < bottom <= h  # inside the image
        assert right - left <= 0.9 * min(w, h)                    # a real zoom
    for im in images:
        if im.view != "SAX":
            assert im.roi is None, im.key
    mid_ed, mid_es = by["SAX_mid_ED"], by["SAX_mid_ES"]
    crop_ed = np.asarray(mid_ed.to_pil().convert("L").crop(mid_ed.roi), dtype=float) / 255.0
    crop_es = np.asarray(mid_es.to_pil().convert("L").crop(mid_es.roi), dtype=float) / 255.0
    from plugin.cardiac.masks import otsu

    level = otsu(crop_ed.ravel())
    bright_ed, bright_es = (crop_ed > level).mean(), (crop_es > level).mean()
    # the cavity fills much of the square at ED (a zoom, not a dot in a wide field), is
    # centred in it, and shrinks at ES (EF 0.30) under the same box
    assert bright_ed > 0.3, bright_ed
    yy, xx = np.nonzero(crop_ed > level)
    side = crop_ed.shape[0]
    assert abs(yy.mean() - side / 2) < side / 6 and abs(xx.mean() - side / 2) < side / 6
    assert bright_es < 0.85 * bright_ed, (bright_ed, bright_es)


def test_lv_roi_none_without_a_blood_pool_and_kept_inside_the_image():
    assert lv_roi(Image.new("L", (224, 224), 0)) is None               # nothing bright
    img = np.zeros((224, 224), dtype=np.uint8)
    yy, xx = np.indices(img.shape)
    img[(yy - 100) ** 2 + (xx - 60) ** 2 < 15 ** 2] = 220             # a round pool left of centre
    roi = lv_roi(Image.fromarray(img))
    assert roi is not None
    left, top, right, bottom = roi
    assert left <= 60 <= right and top <= 100 <= bottom
    assert 0 <= left and right <= 224 and 0 <= top and bottom <= 224
    from plugin.cardiac.prepare import MAX_ROI_FRACTION, ROI_SCALE

    r = math.ceil(MAX_ROI_FRACTION * 224 / ROI_SCALE / math.sqrt(math.pi)) + 2
    big = np.zeros_like(img)
    big[(yy - 112) ** 2 + (xx - 112) ** 2 < r ** 2] = 220             # a pool this big: the square
    assert lv_roi(Image.fromarray(big)) is None                       # would be the whole image
