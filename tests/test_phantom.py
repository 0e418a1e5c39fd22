"""Tests for plugin.phantom: geometry, cine motion, EF truth, dciodvfy, determinism."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from plugin import phantom
from plugin.phantom import LV_APEX, LV_AXIS, PhantomTruth, write_brain_mr, write_ct, write_study

DCIODVFY = "/usr/bin/dciodvfy"
VIEWS = ("LOCALIZER", "SAX", "2CH", "3CH", "4CH")


@dataclass
class Frame:
    iop: np.ndarray  # (6,)
    ipp: np.ndarray  # (3,)
    trigger: float | None
    order: int  # InstanceNumber (classic) or frame index (enhanced)
    pixels: np.ndarray

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.iop[:3], self.iop[3:])


def read_study(folder: Path) -> tuple[dict[str, list[Frame]], list[pydicom.Dataset]]:
    """Frames per SeriesInstanceUID, reading classic and Enhanced MR alike."""
    frames: dict[str, list[Frame]] = defaultdict(list)
    datasets = []
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        datasets.append(ds)
        arr = ds.pixel_array
        if "PerFrameFunctionalGroupsSequence" in ds:
            for k, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
                frames[ds.SeriesInstanceUID].append(Frame(
                    np.array(fg.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                    np.array(fg.PlanePositionSequence[0].ImagePositionPatient, float),
                    float(fg.CardiacSynchronizationSequence[0].NominalCardiacTriggerDelayTime),
                    k, arr[k]))
        else:
            frames[ds.SeriesInstanceUID].append(Frame(
                np.array(ds.ImageOrientationPatient, float), np.array(ds.ImagePositionPatient, float),
                float(ds.TriggerTime) if "TriggerTime" in ds else None, int(ds.InstanceNumber), arr))
    for v in frames.values():
        v.sort(key=lambda f: f.order)
    return frames, datasets


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, tuple[Path, PhantomTruth]]:
    root = tmp_path_factory.mktemp("phantom")
    out = {}
    for style in phantom.STYLES:
        truth = write_study(root / style, style=style, seed=3)
        out[style] = (root / style, truth)
    return out


@pytest.mark.parametrize("style", phantom.STYLES)
def test_series_and_frame_counts(studies, style):
    folder, truth = studies[style]
    frames, datasets = read_study(folder)
    assert set(truth.series) == set(VIEWS)
    assert set(frames) == set(truth.series.values())
    n = {view: len(frames[uid]) for view, uid in truth.series.items()}
    assert n == {"LOCALIZER": 3, "SAX": 8 * 12, "2CH": 12, "3CH": 12, "4CH": 12}
    assert len(datasets) == (3 + 8 * 12 + 3 * 12 if style != "philips" else 3 + 4)
    assert {ds.StudyInstanceUID for ds in datasets} == {truth.study_instance_uid}
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    for ds in datasets:
        assert ds.Modality == "MR" and ds.BodyPartExamined == "HEART"
        assert ds.StudyDescription == "CMR cardiac function"
        assert ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
    json_truth = PhantomTruth.from_json((folder / "truth.json").read_text())
    assert json_truth == truth


def test_vendor_styles(studies):
    _, siemens = read_study(studies["siemens"][0])
    _, ge = read_study(studies["ge"][0])
    _, philips = read_study(studies["philips"][0])
    assert {ds.SeriesDescription for ds in siemens} == {
        "localizer", "CINE_segmented_SAX", "CINE_segmented_LAX_2Ch", "CINE_segmented_LAX_3Ch",
        "CINE_segmented_LAX_4Ch"}
    assert all(ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian for ds in siemens)
    assert all(ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless for ds in ge)
    assert all("SeriesDescription" in ds and ds.SeriesDescription == "" for ds in ge)
    enhanced = [ds for ds in philips if ds.SOPClassUID == pydicom.uid.EnhancedMRImageStorage]
    assert len(enhanced) == 4
    assert {ds.SeriesDescription for ds in enhanced} == {"sBTFE_SA", "sBTFE_2CH", "sBTFE_3CH", "sBTFE_4CH"}
    sa = next(ds for ds in enhanced if ds.SeriesDescription == "sBTFE_SA")
    assert int(sa.NumberOfFrames) == 96
    fc = sa.PerFrameFunctionalGroupsSequence[13].FrameContentSequence[0]
    assert (fc.InStackPositionNumber, fc.TemporalPositionIndex) == (2, 2)
    assert list(fc.DimensionIndexValues) == [1, 2, 2]
    loc = [ds for ds in philips + siemens + ge if ds.SOPClassUID == pydicom.uid.MRImageStorage
           and "LOCALIZER" in ds.ImageType]
    assert len(loc) == 9


@pytest.mark.parametrize("style", phantom.STYLES)
def test_geometry(studies, style):
    folder, truth = studies[style]
    frames, _ = read_study(folder)
    u = np.asarray(truth.lv_axis)
    np.testing.assert_allclose(u, LV_AXIS, atol=1e-5)
    assert u[0] > 0 and u[1] < 0 and u[2] < 0  # towards patient left, anterior, feet

    sax = frames[truth.series["SAX"]]
    for f in sax:
        assert abs(abs(np.dot(f.normal, u)) - 1.0) < 1e-4
        np.testing.assert_allclose(f.iop, sax[0].iop, atol=1e-6)
    positions = []
    for f in sax:
        if not positions or np.linalg.norm(f.ipp - positions[-1]) > 1e-6:
            positions.append(f.ipp)
    assert len(positions) == 8
    steps = np.diff(np.array(positions), axis=0)
    along = steps @ u
    assert np.all(along > 8.0) and np.all(along < 11.0)  # base -> apex, ~10 mm
    np.testing.assert_allclose(np.linalg.norm(steps, axis=1), along, atol=1e-3)  # pure axial shift
    triggers = [f.trigger for f in sax[:12]]
    assert triggers[0] == 0.0 and all(b > a for a, b in zip(triggers, triggers[1:]))

    normals = {}
    for view in ("2CH", "3CH", "4CH"):
        fr = frames[truth.series[view]]
        n = fr[0].normal
        assert abs(np.dot(n, u)) < 1e-4, view  # plane contains the axis direction ...
        assert abs(np.dot(LV_APEX - fr[0].ipp, n)) < 0.01, view  # ... and the axis line
        assert all(np.allclose(f.iop, fr[0].iop) and np.allclose(f.ipp, fr[0].ipp) for f in fr)
        normals[view] = n
    for a, b in (("2CH", "3CH"), ("3CH", "4CH"), ("2CH", "4CH")):
        angle = np.degrees(np.arccos(min(1.0, abs(float(np.dot(normals[a], normals[b]))))))
        assert abs(angle - 60.0) < 1.0, (a, b, angle)

    loc = frames[truth.series["LOCALIZER"]]
    got = sorted(int(np.argmax(np.abs(f.normal))) for f in loc)
    assert got == [0, 1, 2]  # sagittal, coronal, axial


def test_ed_blood_pool_larger_than_es(studies):
    folder, truth = studies["siemens"]
    frames, _ = read_study(folder)
    sax = frames[truth.series["SAX"]]
    mid = 4 * 12  # slice 5 of 8
    ed, es = sax[mid + truth.ed_phase].pixels, sax[mid + truth.es_phase].pixels
    bright_ed, bright_es = int((ed > 650).sum()), int((es > 650).sum())
    print(f"bright blood pixels, mid SAX: ED {bright_ed}  ES {bright_es}")
    assert bright_es < 0.8 * bright_ed


@pytest.mark.parametrize("ef", [0.35, 0.6])
def test_truth_ef(tmp_path, ef):
    truth = write_study(tmp_path, ef=ef, slices=2, phases=10, size=32)
    assert abs(truth.ef - ef) < 0.03
    assert truth.edv_ml > truth.esv_ml > 0
    assert abs((truth.edv_ml - truth.esv_ml) / truth.edv_ml - truth.ef) < 1e-3
    assert 100 < truth.edv_ml < 200
    assert truth.ed_phase == 0 and 3 <= truth.es_phase <= 4


def test_effusion_shell():
    plane = phantom.sax_planes(8, 64)[0][4]
    pts = plane.points()
    dry = phantom.CardiacAnatomy(ef=0.55, effusion_mm=0.0).labels(pts, 0)
    wet = phantom.CardiacAnatomy(ef=0.55, effusion_mm=10.0).labels(pts, 0)
    assert not (dry == phantom.Tissue.FLUID).any()
    assert (wet == phantom.Tissue.FLUID).sum() > 50
    np.testing.assert_array_equal(dry == phantom.Tissue.MYOCARDIUM, wet == phantom.Tissue.MYOCARDIUM)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="style"):
        write_study(tmp_path, style="toshiba")
    with pytest.raises(ValueError, match="ef"):
        write_study(tmp_path, ef=1.2)
    assert phantom.main([str(tmp_path / "x"), "--ef", "2"]) == 2


def _dciodvfy(paths: list[Path]) -> tuple[list[str], list[str]]:
    errors, warnings = [], []
    for p in paths:
        res = subprocess.run([DCIODVFY, str(p)], capture_output=True, text=True, timeout=60)
        for line in (res.stderr + res.stdout).splitlines():
            if "Error" in line:
                errors.append(f"{p.parent.name}/{p.name}: {line}")
            elif "Warning" in line:
                warnings.append(line)
    return errors, warnings


def _handful(folder: Path) -> list[Path]:
    picked = []
    for series in sorted(d for d in folder.iterdir() if d.is_dir()):
        files = sorted(series.glob("*.dcm"))
        picked += [files[i] for i in sorted({0, len(files) // 2, len(files) - 1})]
    return picked



@pytest.mark.parametrize("kind", ["siemens", "ge", "philips", "brain", "ct"])
def test_dciodvfy_clean(studies, tmp_path, kind):
    if kind in studies:
        folder = studies[kind][0]
    else:
        folder = tmp_path / kind
        paths = (write_brain_mr if kind == "brain" else write_ct)(folder, seed=1)
        assert paths and all(p.exists() for p in paths)
    errors, warnings = _dciodvfy(_handful(folder))
    for w in sorted(set(warnings)):
        print(f"tolerated dciodvfy warning ({kind}): {w}")
    assert not errors, "\n".join(errors[:30])


def test_negative_studies(tmp_path):
    brain = [pydicom.dcmread(p) for p in write_brain_mr(tmp_path / "brain", seed=2)]
    ct = [pydicom.dcmread(p) for p in write_ct(tmp_path / "ct", seed=2)]
    assert {(ds.Modality, ds.StudyDescription, ds.BodyPartExamined) for ds in brain} == {
        ("MR", "MRI BRAIN WO CONTRAST", "BRAIN")}
    assert {(ds.Modality, ds.StudyDescription, ds.SOPClassUID) for ds in ct} == {
        ("CT", "CT CHEST", pydicom.uid.CTImageStorage)}
    assert len({ds.SOPInstanceUID for ds in brain + ct}) == len(brain) + len(ct)
    hu = ct[0].pixel_array.astype(float) * float(ct[0].RescaleSlope) + float(ct[0].RescaleIntercept)
    assert hu.min() < -900 and hu.max() > 300  # air and bone


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("style", phantom.STYLES)
def test_deterministic(tmp_path, style):
    kw = dict(style=style, seed=7, slices=2, phases=4, size=32)
    t1 = write_study(tmp_path / "a", **kw)
    t2 = write_study(tmp_path / "b", **kw)
    t3 = write_study(tmp_path / "c", **{**kw, "seed": 8})
    assert t1 == t2
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert t3.study_instance_uid != t1.study_instance_uid
    assert not set(t3.series.values()) & set(t1.series.values())
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sorted((tmp_path / "a").rglob("*.dcm"))]
    assert len(set(uids)) == len(uids)


def test_cli(tmp_path, capsys):
    assert phantom.main([str(tmp_path / "s"), "--style", "ge", "--seed", "4", "--ef", "0.4",
                         "--effusion-mm", "5", "--slices", "3", "--phases", "6", "--size", "48"]) == 0
    truth = json.loads((tmp_path / "s" / "truth.json").read_text())
    assert truth["style"] == "ge" and truth["effusion_mm"] == 5.0 and abs(truth["ef"] - 0.4) < 0.03
    assert json.loads(capsys.readouterr().out) == truth
    assert phantom.main([str(tmp_path / "b"), "--kind", "brain"]) == 0
    assert phantom.main([str(tmp_path / "c"), "--kind", "ct"]) == 0
    assert list((tmp_path / "c").rglob("*.dcm"))
