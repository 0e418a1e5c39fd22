"""Exporters against a real Orthanc: C-STORE, STOW-RS (with its silent partial failures), folder."""
from __future__ import annotations

import pydicom
import pytest
from pydicom import Dataset

from peers import free_port
from plugin.config import DicomwebTarget, DimseTarget
from plugin.dicomweb import stow
from plugin.dimse import scu
from plugin.export import ExportError, FolderExporter
from plugin.phantom import write_brain_mr


@pytest.fixture()
def instances(tmp_path):
    return [pydicom.dcmread(p) for p in sorted(write_brain_mr(tmp_path / "brain"))[:2]]


def test_dimse_and_stow_deliver_to_orthanc(orthanc, instances):
    out = scu.store(DimseTarget(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.port), instances[:1])
    assert [o.ok for o in out] == [True] and out[0].status.startswith("0x0000")
    out = stow.store(DicomwebTarget(url=orthanc.dicomweb_url), instances[1:])
    assert [o.ok for o in out] == [True]
    assert len(orthanc.instances()) == 2
    assert scu.echo(DimseTarget(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.port))


def test_stow_rejection_is_reported_per_instance(orthanc, instances):
    """Orthanc refuses (409) an instance whose study differs from the study in the STOW-RS URL."""
    out = stow.store(DicomwebTarget(url=orthanc.dicomweb_url), instances[:1], study_instance_uid="1.2.3.4.5.6")
    assert len(out) == 1 and not out[0].ok, out
    assert out[0].sop_instance_uid == instances[0].SOPInstanceUID
    assert "failure reason" in out[0].status
    assert orthanc.instances() == []


def test_parse_response_reads_failed_sop_sequence():
    resp = Dataset()
    failed = Dataset()
    failed.ReferencedSOPInstanceUID = "1.2.3"
    failed.FailureReason = 0xA700
    ok = Dataset()
    ok.ReferencedSOPInstanceUID = "1.2.4"
    resp.FailedSOPSequence = [failed]
    resp.ReferencedSOPSequence = [ok]
    out = {o.sop_instance_uid: o for o in stow.parse_response(resp, ["1.2.3", "1.2.4"])}
    assert not out["1.2.3"].ok and out["1.2.3"].retryable and "0xA700" in out["1.2.3"].status
    assert out["1.2.4"].ok


def test_unreachable_peers_raise_retryable_errors(instances):
    port = free_port()
    with pytest.raises(ExportError) as ei:
        scu.store(DimseTarget(ae_title="NOBODY", host="127.0.0.1", port=port, timeout=3), instances[:1])
    assert ei.value.retryable
    with pytest.raises(ExportError) as ei:
        stow.store(DicomwebTarget(url=f"http://127.0.0.1:{port}/dicom-web", timeout=3), instances[:1])
    assert ei.value.retryable


def test_folder_exporter_writes_atomically_and_refuses_bad_uids(tmp_path, instances):
    ex = FolderExporter("out", str(tmp_path / "out"))
    out = ex.send(instances[:1])
    assert out[0].ok
    ds = instances[0]
    written = tmp_path / "out" / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(written).SOPInstanceUID == ds.SOPInstanceUID
    assert not list((tmp_path / "out").rglob("*.tmp"))
    bad = pydicom.dcmread(written)
    bad.SOPInstanceUID = "../../evil"
    res = ex.send([bad])
    assert not res[0].ok and "SOPInstanceUID" in res[0].status
    assert not (tmp_path / "evil.dcm").exists()
