"""Exporters against real peers: Orthanc over C-STORE and STOW-RS, a strict pynetdicom SCP, a folder.

What is checked here is what the outbox relies on: one outcome per instance with
the DICOM status in hex and its meaning; ``retryable`` only where trying again can
help (out of resources, peer down); the rejections Orthanc really produces over
STOW-RS (409 with FailedSOPSequence, and a silent 200 that stores nothing) are
failures, not successes.
"""
from __future__ import annotations

import warnings

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage

from peers import dciodvfy_errors, dcmtk_storescu, free_port
from plugin import storage
from plugin.config import Destination, DicomwebTarget, DimseTarget
from plugin.dicomweb import stow
from plugin.dimse import scu
from plugin.export import (DicomwebExporter, DimseExporter, ExportError, Exporter, FolderExporter,
                           StoreOutcome, exporter_for)


def sc_image(patient_id: str = "CMR-EXPORT-1", study_uid: str | None = None, pixel: int = 0) -> hd.sc.SCImage:
    """A tiny 8x8 Secondary Capture with every required attribute (dciodvfy-clean)."""
    pixels = np.full((8, 8), pixel, dtype=np.uint8)
    pixels[2:6, 2:6] = 200
    ds = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "P"),
        study_instance_uid=study_uid or hd.UID(), series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(),
        series_number=900, instance_number=1, manufacturer="cmr-ai tests",
        patient_id=patient_id, patient_name="Export^Test", patient_birth_date=None, patient_sex="O",
        accession_number="ACC1", study_id="1", study_date="20260101", study_time="120000",
        referring_physician_name="",
    )
    ds.Laterality = None  # Type 2C in General Series: dciodvfy wants it present (STYLE.md)
    return ds


def bare(ds: Dataset) -> Dataset:
    """The same data elements without file meta: a dataset built in memory."""
    out = Dataset(ds)
    assert not hasattr(out, "file_meta")
    return out


def dimse_target(orthanc, **kw) -> DimseTarget:
    return DimseTarget(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.port, timeout=10, **kw)


# ---------------------------------------------------------------------------
# DIMSE

def test_dimse_export_arrives_in_orthanc(orthanc):
    image, in_memory = sc_image(), bare(sc_image(pixel=7))
    exporter = exporter_for("pacs", Destination(dimse=dimse_target(orthanc)), calling_ae="CMR_AI")
    assert isinstance(exporter, DimseExporter) and isinstance(exporter, Exporter)

    out = exporter.send([image, in_memory])

    assert out == [StoreOutcome(str(image.SOPInstanceUID), True, "0x0000 Success", code="0x0000"),
                   StoreOutcome(str(in_memory.SOPInstanceUID), True, "0x0000 Success", code="0x0000")]
    for ds in (image, in_memory):
        oid = orthanc.find_instance(ds.SOPInstanceUID)
        assert oid, f"{ds.SOPInstanceUID} not in Orthanc"
        tags = orthanc.instance_tags(oid)
        assert tags["PatientID"] == "CMR-EXPORT-1" and tags["SOPClassUID"] == SecondaryCaptureImageStorage
        meta = orthanc.instance_metadata(oid)
        assert meta["RemoteAET"] == "CMR_AI" and meta["TransferSyntax"] == ExplicitVRLittleEndian
    assert not hasattr(in_memory, "file_meta"), "the caller's dataset must not be changed"
    assert scu.echo(dimse_target(orthanc))


def test_dimse_sends_a_file_in_its_own_transfer_syntax(orthanc, tmp_path):
    ds = sc_image()
    ds.compress(RLELossless)
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)

    out = scu.store(dimse_target(orthanc, calling_ae_title="CMR_AI_RLE"), [path], calling_ae="IGNORED")

    assert [o.ok for o in out] == [True] and out[0].sop_instance_uid == ds.SOPInstanceUID
    meta = orthanc.instance_metadata(orthanc.find_instance(ds.SOPInstanceUID))
    assert meta["TransferSyntax"] == RLELossless  # not decompressed on the way
    assert meta["RemoteAET"] == "CMR_AI_RLE"  # the destination's calling_ae_title wins


def test_dimse_out_of_resources_is_a_retryable_per_instance_failure(make_orthanc):
    """Orthanc with room for one patient, protected from recycling: a second patient gets 0xA700."""
    full = make_orthanc(config={"MaximumPatientCount": 1})
    first = sc_image("P1")
    assert scu.store(dimse_target(full), [first])[0].ok
    full.protect_patients()
    same_patient, other_patient = sc_image("P1", study_uid=first.StudyInstanceUID), sc_image("P2")

    out = scu.store(dimse_target(full), [same_patient, other_patient])  # one association, two statuses

    assert out[0].ok, out[0]
    assert not out[1].ok and out[1].retryable
    assert out[1].status.startswith("0xA700 Failure: Refused: Out of Resources"), out[1].status
    assert len(full.instances()) == 2

    # the same full Orthanc over STOW-RS answers 200 with empty sequences: not stored, say so
    third = sc_image("P3")
    [o] = stow.store(DicomwebTarget(url=full.dicomweb_url, timeout=10), [third])
    assert not o.ok and o.retryable and "HTTP 200" in o.status and "not stored" in o.status, o
    assert full.find_instance(third.SOPInstanceUID) is None


@pytest.fixture()
def strict_scp():
    """A pynetdicom SCP "STRICT" that checks the called AE title, takes Secondary Capture only,
    and answers C-STORE with the status named by the PatientID ("C210" -> 0xC210; "ABORT" aborts)."""
    ae = AE("STRICT")
    ae.require_called_aet = True
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    received = []

    def handle_store(event):
        received.append(event.dataset.PatientID)
        if event.dataset.PatientID == "ABORT":
            event.assoc.abort()
            return 0xA700
        try:
            return int(event.dataset.PatientID, 16)
        except ValueError:
            return 0x0000

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        yield DimseTarget(ae_title="STRICT", host="127.0.0.1", port=port, timeout=5), received
    finally:
        server.shutdown()


def test_dimse_failure_statuses_and_refused_contexts(strict_scp):
    target, received = strict_scp
    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID, sr.PatientID = ComprehensiveSRStorage, "1.2.3.4", "0000"
    no_uid = sc_image("0000")
    del no_uid.SOPInstanceUID
    batch = [sc_image("C210"), sc_image("A900"), sr, no_uid, sc_image("A702"), sc_image("B000"), sc_image("0000")]

    out = scu.store(target, batch)

    assert len(out) == len(batch)
    assert [o.sop_instance_uid for o in out] == [str(ds.get("SOPInstanceUID", "")) for ds in batch]
    c210, a900, sr_out, no_uid_out, a702, b000, ok = out
    assert (c210.ok, c210.retryable, c210.status) == (False, False, "0xC210 Failure: Cannot Understand")
    assert (a900.ok, a900.retryable) == (False, False) and a900.status.startswith("0xA900 ")
    assert (a702.ok, a702.retryable) == (False, True) and a702.status.startswith("0xA702 ")
    assert b000.ok and b000.status.startswith("0xB000 Warning")  # warnings are stored
    assert ok.ok and ok.status == "0x0000 Success"
    assert not sr_out.ok and not sr_out.retryable and "not sent" in sr_out.status  # SCP refused the context
    assert not no_uid_out.ok and "(0008,0018) SOPInstanceUID missing" in no_uid_out.status
    assert received == ["C210", "A900", "A702", "B000", "0000"]


def test_dimse_rejected_association_is_a_retryable_export_error(strict_scp):
    target, received = strict_scp
    wrong = target.model_copy(update={"ae_title": "NOT_STRICT"})
    with pytest.raises(ExportError) as ei:
        scu.store(wrong, [sc_image()])
    assert ei.value.retryable
    assert "rejected" in str(ei.value) and "Called AE title not recognised" in str(ei.value), ei.value
    assert not scu.echo(wrong) and received == []


def test_dimse_association_aborted_mid_batch_is_a_retryable_export_error(strict_scp):
    target, received = strict_scp
    with pytest.raises(ExportError) as ei:
        scu.store(target, [sc_image("0000"), sc_image("ABORT"), sc_image("0000")])
    assert ei.value.retryable and "aborted" in str(ei.value) and "1 of 3" in str(ei.value), ei.value
    assert received == ["0000", "ABORT"]


# ---------------------------------------------------------------------------
# STOW-RS

def test_stow_export_arrives_in_orthanc(orthanc):
    image, in_memory = sc_image(), bare(sc_image(pixel=9))
    exporter = exporter_for("web", Destination(dicomweb=DicomwebTarget(url=orthanc.dicomweb_url)),
                            calling_ae="CMR_AI")
    assert isinstance(exporter, DicomwebExporter)

    out = exporter.send([image, in_memory])

    assert [(o.sop_instance_uid, o.ok) for o in out] == [(image.SOPInstanceUID, True), (in_memory.SOPInstanceUID, True)]
    assert all(o.status.startswith("stored (STOW-RS HTTP 200") for o in out), out
    for ds in (image, in_memory):
        oid = orthanc.find_instance(ds.SOPInstanceUID)
        assert oid and orthanc.instance_tags(oid)["PatientID"] == "CMR-EXPORT-1"
    assert not hasattr(in_memory, "file_meta")


def test_stow_instances_orthanc_refuses_are_reported_per_instance(orthanc):
    """POST to /studies/{A}: Orthanc answers 409 and lists the instance of study B in FailedSOPSequence."""
    a = sc_image()
    b = sc_image()  # another study

    out = stow.store(DicomwebTarget(url=orthanc.dicomweb_url), [a, b], study_instance_uid=a.StudyInstanceUID)

    assert out[0].ok and out[0].sop_instance_uid == a.SOPInstanceUID, out[0]
    assert out[1].sop_instance_uid == b.SOPInstanceUID and not out[1].ok and not out[1].retryable
    assert out[1].status == "STOW-RS failure reason 0x0110 Failure: Processing Failure", out[1].status
    assert orthanc.find_instance(a.SOPInstanceUID) and not orthanc.find_instance(b.SOPInstanceUID)


# What Orthanc 1.10 answered (409, no Content-Type) to an instance of another study than the URL's.
RECORDED_409 = {
    "00080005": {"Value": ["ISO_IR 100"], "vr": "CS"},
    "00081198": {"Value": [{"00081150": {"Value": ["1.2.840.10008.5.1.4.1.1.7"], "vr": "UI"},
                            "00081155": {"Value": ["1.2.9.1"], "vr": "UI"},
                            "00081197": {"Value": [272], "vr": "US"}}], "vr": "SQ"},
    "00081199": {"vr": "SQ"},
}


def test_stow_response_parsing():
    failed_only = stow.parse_response(Dataset.from_json(RECORDED_409), ["1.2.9.1"], http_status=409)
    assert failed_only == [StoreOutcome("1.2.9.1", False, "STOW-RS failure reason 0x0110 Failure: Processing Failure",
                                        code="HTTP 409 0x0110")]

    resp = Dataset()
    resp.FailedSOPSequence = [Dataset(), Dataset()]
    resp.FailedSOPSequence[0].ReferencedSOPInstanceUID, resp.FailedSOPSequence[0].FailureReason = "1.1", 0xA700
    resp.FailedSOPSequence[1].ReferencedSOPInstanceUID, resp.FailedSOPSequence[1].FailureReason = "1.2", 0xC122
    resp.ReferencedSOPSequence = [Dataset(), Dataset()]
    resp.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.3"
    resp.ReferencedSOPSequence[1].ReferencedSOPInstanceUID, resp.ReferencedSOPSequence[1].WarningReason = "1.4", 0xB000
    sent = ["1.1", "1.2", "1.3", "1.4", "1.5"]
    out = {o.sop_instance_uid: o for o in stow.parse_response(resp, sent, http_status=202)}
    assert not out["1.1"].ok and out["1.1"].retryable and "0xA700" in out["1.1"].status
    assert not out["1.2"].ok and not out["1.2"].retryable
    assert "0xC122 Failure: Referenced Transfer Syntax not supported" in out["1.2"].status
    assert out["1.3"].ok and out["1.4"].ok and "warning 0xB000 Warning: Coercion of Data Elements" in out["1.4"].status
    assert not out["1.5"].ok and out["1.5"].retryable  # not mentioned after a 2xx: dropped by the server

    # an empty response after a 400 (Orthanc, for an instance without SOPInstanceUID): refused, not retryable
    [o] = stow.parse_response(Dataset.from_json({"00081198": {"vr": "SQ"}, "00081199": {"vr": "SQ"}}), ["1.6"],
                              http_status=400)
    assert not o.ok and not o.retryable
    # no body at all after a 2xx: nothing to check, taken as stored
    assert stow.parse_response(None, ["1.7"])[0].ok


def test_stow_basic_auth_and_bearer_token(make_orthanc, tmp_path):
    secured = make_orthanc(config={"AuthenticationEnabled": True, "RegisteredUsers": {"cmr": "s3cret"}})
    ds = sc_image()
    good = DicomwebTarget(url=secured.dicomweb_url, username="cmr", password="s3cret")
    assert stow.store(good, [ds])[0].ok and secured.find_instance(ds.SOPInstanceUID)

    with pytest.raises(ExportError) as ei:
        stow.store(good.model_copy(update={"password": "wrong"}), [sc_image()])
    assert not ei.value.retryable and "HTTP 401" in str(ei.value)

    token = tmp_path / "token"
    token.write_text("abc.def\n")
    client = stow.client(DicomwebTarget(url=secured.dicomweb_url, token_file=str(token), timeout=7))
    assert client._session.headers["Authorization"] == "Bearer abc.def"
    with pytest.raises(ExportError) as ei:
        stow.store(DicomwebTarget(url=secured.dicomweb_url, token_file=str(tmp_path / "missing")), [ds])
    assert not ei.value.retryable and "token_file" in str(ei.value)


def test_stow_http_errors(orthanc):
    with pytest.raises(ExportError) as ei:  # 404: wrong URL, the same request fails again
        stow.store(DicomwebTarget(url=f"{orthanc.base}/no-such-root"), [sc_image()])
    assert not ei.value.retryable and "HTTP 404" in str(ei.value)


def test_unreachable_peers_raise_retryable_export_errors():
    port = free_port()  # nobody listens there
    with pytest.raises(ExportError) as ei:
        scu.store(DimseTarget(ae_title="PACS", host="127.0.0.1", port=port, timeout=3), [sc_image()])
    assert ei.value.retryable and "association" in str(ei.value) and f"127.0.0.1:{port}" in str(ei.value)
    assert not scu.echo(DimseTarget(ae_title="PACS", host="127.0.0.1", port=port, timeout=3))
    with pytest.raises(ExportError) as ei:
        stow.store(DicomwebTarget(url=f"http://127.0.0.1:{port}/dicom-web", timeout=3), [sc_image()])
    assert ei.value.retryable and "cannot reach" in str(ei.value)


# ---------------------------------------------------------------------------
# folder

def test_folder_exporter_writes_valid_files_atomically(orthanc, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    exporter = exporter_for("folder", Destination(folder=str(out_dir)), calling_ae="CMR_AI")
    assert isinstance(exporter, FolderExporter)
    image, in_memory = sc_image(), bare(sc_image(pixel=3))

    out = exporter.send([image, in_memory])

    assert all(o.ok for o in out), out
    paths = [out_dir / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm" for ds in (image, in_memory)]
    for ds, path in zip((image, in_memory), paths):
        back = pydicom.dcmread(path)  # a PS3.10 file: preamble, DICM, file meta
        assert back.SOPInstanceUID == ds.SOPInstanceUID and back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert back.PixelData == ds.PixelData and back.pixel_array[3, 3] == 200
        assert dciodvfy_errors(path) == []
    assert not [p for p in out_dir.rglob("*") if p.is_file() and p.suffix != ".dcm"], "temp files left"
    r = dcmtk_storescu(orthanc.port, paths, aet="CMR_AI", aec=orthanc.aet)  # what dcmtk reads, a PACS reads
    assert r.returncode == 0, r.stderr
    assert all(orthanc.find_instance(ds.SOPInstanceUID) for ds in (image, in_memory))

    # a crash before the rename leaves neither a partial file nor the temp file
    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", crash)
    late = sc_image()
    [o] = exporter.send([late])
    assert not o.ok and o.retryable and "No space left" in o.status
    assert not (out_dir / late.StudyInstanceUID / f"{late.SOPInstanceUID}.dcm").exists()
    assert not list((out_dir / late.StudyInstanceUID).iterdir())


@pytest.mark.parametrize("keyword,value", [("SOPInstanceUID", "../../evil"), ("StudyInstanceUID", "1.2/../.."),
                                           ("SOPInstanceUID", "1.02.3"), ("StudyInstanceUID", "")])
def test_folder_exporter_refuses_malformed_uids(tmp_path, keyword, value):
    ds = sc_image()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI value: that is the point
        setattr(ds, keyword, value)
    exporter = FolderExporter("folder", tmp_path / "out")
    [o] = exporter.send([ds])
    assert not o.ok and not o.retryable and keyword in o.status, o
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "nothing may be written"



# ---------------------------------------------------------------------------
# warnings, peer status codes, QIDO-RS, Storage Commitment request

def test_stow_202_warnings_are_delivered_and_marked():
    def response(failed=(), stored=()):
        resp = Dataset()
        resp.FailedSOPSequence, resp.ReferencedSOPSequence = [], []
        for uid, code in failed:
            item = Dataset()
            item.ReferencedSOPInstanceUID, item.FailureReason = uid, code
            resp.FailedSOPSequence.append(item)
        for uid, code in stored:
            item = Dataset()
            item.ReferencedSOPInstanceUID = uid
            if code:
                item.WarningReason = code
            resp.ReferencedSOPSequence.append(item)
        return resp

    # 202 with nothing said: every stored instance is taken as warned about
    [o] = stow.parse_response(response(stored=[("1.1", None)]), ["1.1"], http_status=202)
    assert o.ok and o.warning and o.code == "HTTP 202" and "Accepted: stored with warnings" in o.status
    # 202 explained by another instance's failure: the stored one is plainly stored
    a, b = stow.parse_response(response(failed=[("1.2", 0xA700)], stored=[("1.1", None)]), ["1.1", "1.2"],
                               http_status=202)
    assert (a.ok, a.warning, a.code) == (True, False, "HTTP 202")
    assert (b.ok, b.retryable, b.code) == (False, True, "HTTP 202 0xA700")
    # a WarningReason, whatever the HTTP status
    [o] = stow.parse_response(response(stored=[("1.1", 0xB006)]), ["1.1"], http_status=200)
    assert o.ok and o.warning and o.code == "HTTP 200 0xB006" and "Element Discarded" in o.status
    [o] = stow.parse_response(response(stored=[("1.1", None)]), ["1.1"], http_status=200)
    assert o.ok and not o.warning and o.code == "HTTP 200"


def test_export_error_keeps_its_code_across_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(ExportError("peer down", True, "no association")))
    assert (str(e), e.retryable, e.code) == ("peer down", True, "no association")


def test_status_codes_of_whole_send_failures(orthanc):
    port = free_port()
    with pytest.raises(ExportError) as ei:
        scu.store(DimseTarget(ae_title="PACS", host="127.0.0.1", port=port, timeout=3), [sc_image()])
    assert ei.value.code == "no association" and "could not be made" in str(ei.value)
    with pytest.raises(ExportError) as ei:
        stow.store(DicomwebTarget(url=f"http://127.0.0.1:{port}/dicom-web", timeout=3), [sc_image()])
    assert ei.value.code == "no connection"
    with pytest.raises(ExportError) as ei:
        stow.store(DicomwebTarget(url=f"{orthanc.base}/no-such-root"), [sc_image()])
    assert ei.value.code == "HTTP 404"


def test_dimse_peer_accepting_no_context_is_a_permanent_error(strict_scp):
    target, received = strict_scp  # takes Secondary Capture only
    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID, sr.PatientID = ComprehensiveSRStorage, "1.2.3.4", "0000"
    with pytest.raises(ExportError) as ei:
        scu.store(target, [sr])
    assert not ei.value.retryable and ei.value.code == "no presentation context"
    assert "accepted none of the proposed presentation contexts (Comprehensive SR Storage)" in str(ei.value)
    with pytest.raises(ExportError) as ei:
        scu.request_commitment(target, [(SecondaryCaptureImageStorage, "1.2.3")], "1.2.3.4.5")
    assert not ei.value.retryable and ei.value.code == "commitment not supported"
    assert received == []


def test_qido_finds_what_orthanc_holds(orthanc):
    target = DicomwebTarget(url=orthanc.dicomweb_url)
    a = sc_image()
    b = sc_image(study_uid=a.StudyInstanceUID)
    assert stow.store(target, [a])[0].ok
    assert stow.instance_exists(target, a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID)
    assert not stow.instance_exists(target, b.StudyInstanceUID, a.SeriesInstanceUID, b.SOPInstanceUID)
    assert not stow.instance_exists(target, b.StudyInstanceUID, b.SeriesInstanceUID, b.SOPInstanceUID)
    with pytest.raises(ExportError) as ei:
        stow.instance_exists(DicomwebTarget(url=f"{orthanc.base}/no-such-root"), a.StudyInstanceUID,
                             a.SeriesInstanceUID, a.SOPInstanceUID)
    assert not ei.value.retryable and ei.value.code == "HTTP 404"
    with pytest.raises(ExportError) as ei:
        stow.instance_exists(DicomwebTarget(url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout=3),
                             a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID)
    assert ei.value.retryable
    with pytest.raises(ExportError) as ei:
        stow.instance_exists(target, "../x", a.SeriesInstanceUID, a.SOPInstanceUID)
    assert not ei.value.retryable and "StudyInstanceUID" in str(ei.value)


def test_storage_commitment_request_to_orthanc(make_orthanc):
    """Orthanc takes a commitment request only from a modality it knows (the result goes back to it)."""
    image = sc_image()
    knows_us = make_orthanc(modalities={"cmr": ["CMR_AI", "127.0.0.1", free_port()]})
    target = dimse_target(knows_us)
    assert scu.store(target, [image])[0].ok
    scu.request_commitment(target, [(SecondaryCaptureImageStorage, str(image.SOPInstanceUID))],
                           "1.2.826.0.1.3680043.8.498.42", calling_ae="CMR_AI")  # accepted: no exception
    stranger = make_orthanc()
    with pytest.raises(ExportError) as ei:
        scu.request_commitment(dimse_target(stranger), [(SecondaryCaptureImageStorage, "1.2.3")], "1.2.3.4",
                               calling_ae="CMR_AI")
    assert ei.value.retryable and ei.value.code == "no response"
    assert "our AE title CMR_AI is not in its DicomModalities" in str(ei.value)
    with pytest.raises(ExportError) as ei:
        scu.request_commitment(DimseTarget(ae_title="X", host="127.0.0.1", port=free_port(), timeout=3),
                               [(SecondaryCaptureImageStorage, "1.2.3")], "1.2.3.4")
    assert ei.value.retryable and ei.value.code == "no association"
