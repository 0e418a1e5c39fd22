"""``cmr-ai inspect``: the study report, bad files, the contact sheet, the CLI.

Studies come from ``plugin.phantom.write_study`` (known views and ED/ES); bad files are
made from its images: not DICOM, empty, pixel data cut in half, geometry deleted.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from plugin import phantom
from plugin.cardiac.inspect import contact_sheet_size, inspect_study, render_contact_sheet
from plugin.cli import main

STYLES = ("siemens", "ge", "philips")
CINE = ("SAX", "2CH", "3CH", "4CH")


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """One pristine phantom per vendor style: style -> (folder, truth). Copy before changing."""
    out = {}
    for style in STYLES:
        d = tmp_path_factory.mktemp(f"phantom-{style}")
        out[style] = (d, phantom.write_study(d, style=style, seed=1))
    return out


def _copy(studies, style, tmp_path) -> tuple[Path, phantom.PhantomTruth]:
    src, truth = studies[style]
    dst = tmp_path / style
    shutil.copytree(src, dst)
    return dst, truth


def _files_of(folder: Path, series_uid: str) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if ds.SeriesInstanceUID == series_uid:
            out.append(p)
    return out


def _views(report) -> dict[str, str]:
    return {s.series_instance_uid: s.view for s in report.series}


@pytest.mark.parametrize("style", STYLES)
def test_views_phases_slices_and_json(studies, style, capsys):
    folder, truth = studies[style]
    report = inspect_study(folder)
    assert report.error is None and report.study_instance_uid == truth.study_instance_uid
    by = {s.series_instance_uid: s for s in report.series}
    for view, uid in truth.series.items():
        assert by[uid].view == view, (style, view, by[uid].reasons)
    sax = by[truth.series["SAX"]]
    # prepare's ES (smallest blood pool in the mid slice) matches the phantom exactly.
    assert (sax.ed_phase, sax.es_phase) == (truth.ed_phase, truth.es_phase), sax
    assert sax.es_method.startswith("smallest LV blood pool")
    assert set(sax.chosen_slices) == {"basal", "mid", "apical"}
    assert 0 <= sax.chosen_slices["basal"] < sax.chosen_slices["mid"] < sax.chosen_slices["apical"] < sax.n_slices
    assert (sax.n_slices, sax.n_phases, sax.n_frames) == (8, 12, 96)
    for view in ("2CH", "3CH", "4CH"):
        lax = by[truth.series[view]]
        assert (lax.n_slices, lax.n_phases, lax.ed_phase, lax.es_phase) == (1, 12, 0, truth.es_phase)
        assert lax.chosen_slices == {} and lax.reasons and "AHA ring" in lax.reasons[0]
    assert all(by[truth.series[v]].used for v in CINE)
    loc = by[truth.series["LOCALIZER"]]
    assert not loc.used and loc.ed_phase is None and loc.reasons[0].startswith("not analysed: localizer")
    assert [s.path for s in report.skipped] == ["truth.json"]
    assert report.file_problems == []
    keys = [im.key for im in report.images]
    assert keys == ["SAX_basal_ED", "SAX_basal_ES", "SAX_mid_ED", "SAX_mid_ES", "SAX_apical_ED", "SAX_apical_ES",
                    "2CH_ED", "2CH_ES", "3CH_ED", "3CH_ES", "4CH_ED", "4CH_ES"]
    assert all(im.series_number == by[im.series_instance_uid].series_number for im in report.images)
    if style == "philips":  # one Enhanced MR object per series: frames are named
        assert all(im.frame_number for im in report.images)

    assert main(["inspect", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["study_dir", "study_instance_uid", "n_files", "series", "skipped", "file_problems",
                          "limitations", "images", "error"]
    assert list(data["series"][0]) == ["series_instance_uid", "series_number", "description", "view", "confidence",
                                       "n_slices", "n_phases", "n_frames", "ed_phase", "es_phase", "es_method",
                                       "chosen_slices", "used", "reasons"]
    assert list(data["images"][0]) == ["key", "view", "phase", "label", "series_instance_uid", "series_number",
                                       "sop_instance_uid", "frame_number", "roi"]
    js = {s["series_instance_uid"]: s for s in data["series"]}
    for view, uid in truth.series.items():
        assert js[uid]["view"] == view
    assert (js[truth.series["SAX"]]["ed_phase"], js[truth.series["SAX"]]["es_phase"]) == (0, truth.es_phase)
    assert js[truth.series["SAX"]]["chosen_slices"] == sax.chosen_slices
    assert data == json.loads(report.to_json())


@pytest.mark.parametrize("style", ["siemens", "philips"])
def test_bad_files_are_reported_never_fatal(studies, style, tmp_path, capsys):
    folder, truth = _copy(studies, style, tmp_path)
    sax_file = _files_of(folder, truth.series["SAX"])[0]
    (folder / "notes.txt").write_text("not DICOM, just notes\n")
    (folder / "empty.dcm").write_bytes(b"")
    data = sax_file.read_bytes()
    (folder / "truncated_copy.dcm").write_bytes(data[: len(data) // 2])  # sorts after S…/: the original is read
    ds = pydicom.dcmread(sax_file)
    for kw in ("ImageOrientationPatient", "ImagePositionPatient"):
        if kw in ds:
            delattr(ds, kw)
    if style == "philips":  # Enhanced MR: geometry lives in the functional groups
        for fg in ds.PerFrameFunctionalGroupsSequence:
            for kw in ("PlaneOrientationSequence", "PlanePositionSequence"):
                if kw in fg:
                    delattr(fg, kw)
        for kw in ("PlaneOrientationSequence", "PlanePositionSequence"):
            if kw in ds.SharedFunctionalGroupsSequence[0]:
                delattr(ds.SharedFunctionalGroupsSequence[0], kw)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "no_geometry.dcm")
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SOPInstanceUID = generate_uid(), 99, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(folder / "no_geometry_series.dcm")

    report = inspect_study(folder)
    assert report.error is None
    views = _views(report)
    for view, uid in truth.series.items():
        assert views[uid] == view
    skipped = {s.path: s.reason for s in report.skipped}
    assert "empty" in skipped["empty.dcm"] and "0 bytes" in skipped["empty.dcm"]
    assert "not DICOM" in skipped["notes.txt"]
    problems = {}
    for p in report.file_problems:
        problems.setdefault(p.path, []).append(p)
    trunc = problems["truncated_copy.dcm"]
    assert any("(7FE0,0010) Pixel Data" in p.reason and "truncated" in p.reason for p in trunc), trunc
    assert any("(0008,0018) SOP Instance UID" in p.reason and "also stored as" in p.reason for p in trunc)
    nogeo = problems["no_geometry.dcm"]
    assert nogeo[0].series_instance_uid == truth.series["SAX"]
    assert "(0020,0037) Image Orientation (Patient)" in nogeo[0].reason and "(0020,0032)" in nogeo[0].reason
    by = {s.series_instance_uid: s for s in report.series}
    sax = by[truth.series["SAX"]]
    assert sax.used and (sax.ed_phase, sax.es_phase) == (0, truth.es_phase)
    assert any("truncated_copy.dcm" in r and "(7FE0,0010)" in r for r in sax.reasons), sax.reasons
    assert any("no_geometry.dcm" in r and "(0020,0037)" in r for r in sax.reasons), sax.reasons
    lone = next(s for s in report.series if s.series_number == 99)
    assert lone.view == "OTHER" and not lone.used and lone.n_slices == 0
    assert any("(0020,0037) Image Orientation (Patient)" in r for r in lone.reasons), lone.reasons
    assert len(report.images) == 12

    assert main(["inspect", str(folder)]) == 0  # the table, with the same findings
    out = capsys.readouterr().out
    for name in ("empty.dcm", "notes.txt", "truncated_copy.dcm", "no_geometry.dcm", "(7FE0,0010)", "(0020,0037)"):
        assert name in out


@pytest.mark.parametrize("style,view", [("ge", "4CH"), ("philips", "SAX")])
def test_undecodable_frame_skips_its_view_only(studies, style, view, tmp_path, capsys):
    """A file of a used series cut in half: prepare drops that view with a limitation, renders the rest."""
    folder, truth = _copy(studies, style, tmp_path)
    victim = _files_of(folder, truth.series[view])[0]  # classic: the ED frame; enhanced: the whole cine
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by = {s["series_instance_uid"]: s for s in report["series"]}
    for v, uid in truth.series.items():
        assert by[uid]["view"] == v
    hit = by[truth.series[view]]
    assert not hit["used"]
    assert "(7FE0,0010) Pixel Data" in hit["reasons"][0]
    assert any(r.startswith("not used:") and "could not be decoded" in r for r in hit["reasons"])
    assert any("could not be decoded" in lim for lim in report["limitations"])
    keys = {im["key"] for im in report["images"]}
    assert not any(k.startswith(view) for k in keys)
    assert {f"{v}_{p}" for v in ("2CH", "3CH", "4CH") if v != view for p in ("ED", "ES")} <= keys


def test_contact_sheet(studies, tmp_path, capsys):
    folder, truth = studies["philips"]
    out = tmp_path / "sheet" / "contact.png"
    assert main(["inspect", str(folder), "--sheet", str(out)]) == 0
    assert "contact sheet" in capsys.readouterr().out
    report = inspect_study(folder)
    n = len(report.images)
    img = Image.open(out)
    assert img.format == "PNG" and img.size == contact_sheet_size(n) and n == 12
    one_row, two_rows = contact_sheet_size(6), contact_sheet_size(12)
    assert one_row[0] == two_rows[0] and two_rows[1] - one_row[1] > 160  # 6 per row: 12 tiles, 2 rows
    assert contact_sheet_size(12, columns=4)[1] > two_rows[1]
    # every tile holds an image (not the flat background)
    arr = np.asarray(img.convert("L"), dtype=float)
    from plugin.cardiac.inspect import SHEET_GAP, SHEET_HEADER, SHEET_LABEL, SHEET_MARGIN, SHEET_TILE
    for i in range(n):
        r, c = divmod(i, 6)
        x = SHEET_MARGIN + c * (SHEET_TILE + SHEET_GAP)
        y = SHEET_HEADER + r * (SHEET_TILE + SHEET_LABEL + SHEET_GAP)
        assert arr[y:y + SHEET_TILE, x:x + SHEET_TILE].std() > 10, i
    # the LV square a `zoom: lv` question crops to: on every SAX image, drawn on its tile
    assert all((i.roi is not None) == (i.view == "SAX") for i in report.images)
    first = report.images[0]
    assert first.view == "SAX"
    scale = SHEET_TILE / report.bundle_images[0].to_pil().width
    left, top, right, bottom = first.roi
    edge = arr[SHEET_HEADER + int(top * scale) + 2:SHEET_HEADER + int(bottom * scale) - 2,
               SHEET_MARGIN + int(round(left * scale))]
    assert len(edge) > 10 and (edge == 255).all(), edge
    small = render_contact_sheet(report.bundle_images[:5], tmp_path / "five.png", tile=64, study_uid="1.2.3")
    assert Image.open(small).size == contact_sheet_size(5, tile=64)
    with pytest.raises(ValueError, match="images"):
        render_contact_sheet([], tmp_path / "none.png")


def test_no_cine_prints_table_and_exits_1(tmp_path, capsys):
    phantom.write_brain_mr(tmp_path / "brain", seed=2)
    assert main(["inspect", str(tmp_path / "brain"), "--json"]) == 1
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert "no cine series to analyse" in data["error"] and "no cine series" in captured.err
    assert data["series"] and all(not s["used"] and s["reasons"] for s in data["series"])
    assert data["images"] == []
    assert main(["inspect", str(tmp_path / "brain"), "--sheet", str(tmp_path / "x.png")]) == 1
    captured = capsys.readouterr()
    assert "Not analysable" in captured.out and "AX T2" in captured.out
    assert not (tmp_path / "x.png").exists() and "not written" in captured.err


def test_missing_or_empty_folder(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(missing) in err
    with pytest.raises(FileNotFoundError):
        inspect_study(missing)
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty"), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["series"] == [] and data["n_files"] == 0 and "no MR image series" in data["error"]
