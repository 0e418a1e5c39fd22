"""The C-STORE SCP: stores as received, indexes, and turns bad input into named statuses."""
from __future__ import annotations

import logging
import re
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from plugin import db
from plugin.dimse.scp import CANNOT_UNDERSTAND, StoreSCP
from plugin.storage import BadUID, InstanceStore, check_uid

MR = "1.2.840.10008.5.1.4.1.1.4"


def mr_dataset(study_uid=None, sop_uid=None, rows=8) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MR
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.PatientID = "P1"
    ds.StudyDescription = "cardiac"
    ds.SeriesNumber = 3
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(256))[: rows * rows * 2 // 2] * 2
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def file_bytes(ds: Dataset, ts=ExplicitVRLittleEndian) -> bytes:
    import io

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture()
def scp(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    node = StoreSCP(ae_title="CMR_AI", host="127.0.0.1", port=0, store=InstanceStore(tmp_path / "store"), db_url=url)
    node.start()
    yield node, url, tmp_path
    node.stop()


def _assoc(port, contexts=((MR, ExplicitVRLittleEndian),)):
    ae = AE(ae_title="TEST_SCU")
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="CMR_AI")
    assert assoc.is_established
    return assoc


def test_store_writes_bytes_as_received_and_indexes(scp):
    node, url, tmp = scp
    ds = mr_dataset()
    assoc = _assoc(node.port)
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0
    path = tmp / "store" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.PixelData == ds.PixelData
    assert not list((tmp / "store").rglob("*.tmp"))
    with db.session_scope(url) as s:
        inst = s.scalar(select(db.Instance).where(db.Instance.sop_instance_uid == ds.SOPInstanceUID))
        assert inst.path == str(path)
        study = s.scalar(select(db.Study))
        assert study.state == db.StudyState.RECEIVING and study.n_instances == 1
        assert study.calling_ae == "TEST_SCU"


def test_compressed_pixel_data_is_stored_without_recoding(scp):
    node, url, tmp = scp
    ds = mr_dataset()
    import numpy as np

    ds.compress(RLELossless, np.arange(64, dtype=np.uint16).reshape(8, 8))
    encoded = ds.PixelData
    assoc = _assoc(node.port, ((MR, RLELossless),))
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    back = pydicom.dcmread(next((tmp / "store").rglob("*.dcm")))
    assert back.file_meta.TransferSyntaxUID == RLELossless
    assert back.PixelData == encoded


def test_bad_uid_gets_failure_status_and_a_log_line_naming_the_tag(scp, caplog):
    node, url, tmp = scp
    ds = mr_dataset()
    ds.StudyInstanceUID = "1.2.abc.4"
    assoc = _assoc(node.port)
    with caplog.at_level(logging.ERROR, logger="cmr_ai.scp"):
        try:
            status = assoc.send_c_store(ds)
            assert status.Status == CANNOT_UNDERSTAND
            # the node keeps serving on the same association
            good = mr_dataset()
            assert assoc.send_c_store(good).Status == 0
        finally:
            assoc.release()
    assert "(0020,000D) StudyInstanceUID" in caplog.text
    assert len(list((tmp / "store").rglob("*.dcm"))) == 1


def test_broken_element_length_is_refused_and_node_keeps_serving(scp, caplog):
    node, url, tmp = scp
    ds = mr_dataset()
    raw = bytearray(file_bytes(ds))
    # Corrupt the length of (0008,0060) Modality: explicit VR 'CS' has a 2-byte length.
    tag = struct.pack("<HH", 0x0008, 0x0060) + b"CS"
    i = raw.index(tag)
    raw[i + 6:i + 8] = struct.pack("<H", 0xFFF0)
    path = tmp / "broken.dcm"
    path.write_bytes(bytes(raw))
    assoc = _assoc(node.port)
    with caplog.at_level(logging.ERROR, logger="cmr_ai.scp"):
        try:
            status = assoc.send_c_store(path)
        finally:
            assoc.release()
    assert status.Status == CANNOT_UNDERSTAND, hex(status.Status)
    # the over-long value swallows the rest of the dataset: the log names the tag found missing
    assert re.search(r"refused \(0xC210\): .*\([0-9A-F]{4},[0-9A-F]{4}\)", caplog.text), caplog.text
    assoc = _assoc(node.port)
    try:
        assert assoc.send_c_store(mr_dataset()).Status == 0
    finally:
        assoc.release()


@pytest.mark.parametrize("policy", ["replace", "keep"])
def test_duplicate_sop_instance_follows_the_policy_and_keeps_one_row(tmp_path, policy, caplog):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    node = StoreSCP(ae_title="CMR_AI", host="127.0.0.1", port=0, db_url=url,
                    store=InstanceStore(tmp_path / "store", duplicates=policy))
    node.start()
    ds = mr_dataset()
    assoc = _assoc(node.port)
    try:
        assert assoc.send_c_store(ds).Status == 0
        path = next((tmp_path / "store").rglob("*.dcm"))
        first = path.stat()
        assert assoc.send_c_store(ds).Status == 0  # identical: nothing rewritten
        assert path.stat().st_ino == first.st_ino and path.stat().st_mtime_ns == first.st_mtime_ns
        assert "identical content: nothing rewritten" in caplog.text
        ds.PatientID = "CHANGED"
        assert assoc.send_c_store(ds).Status == 0  # different content: the policy decides
    finally:
        assoc.release()
        node.stop()
    with db.session_scope(url) as s:
        rows = s.scalars(select(db.Instance)).all()
        assert len(rows) == 1 and rows[0].size == path.stat().st_size
    stored = pydicom.dcmread(path).PatientID
    if policy == "replace":
        assert stored == "CHANGED" and "the stored copy was replaced" in caplog.text
    else:
        assert stored == "P1" and "the first copy was kept" in caplog.text


def test_duplicates_policy_is_validated(tmp_path):
    from plugin.config import ConfigError, load_settings

    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage:\n  path: ./x\n  duplicates: overwrite\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(cfg)
    assert any(e.startswith(f"{cfg}:3: storage.duplicates:") for e in ei.value.errors), ei.value.errors


@pytest.mark.parametrize("uid", ["", "1.2.", "01.2", "1.2.3a", "1." + "2" * 70, "../../etc"])
def test_uid_syntax_is_checked_before_building_paths(uid, tmp_path):
    with pytest.raises(BadUID):
        check_uid(uid, "(0020,000D) StudyInstanceUID")
    with pytest.raises(BadUID):
        InstanceStore(tmp_path).path_for(uid or "..", "1.2", "1.3")
    assert check_uid("1.2.840.10008.0", "x") == "1.2.840.10008.0"


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "db.sqlite" not in p.name}


@pytest.mark.parametrize("attr", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_path_traversal_uid_gets_a_failure_status_and_writes_nothing(scp, caplog, attr):
    """A UID such as ``../../x`` never becomes a path: the C-STORE is refused naming the
    attribute, nothing is written (inside or outside the store) and nothing is indexed."""
    node, url, tmp = scp
    before = _tree(tmp.parent)
    ds = mr_dataset()
    setattr(ds, attr, "../../" + ("x" if attr != "SOPInstanceUID" else "escaped"))
    assoc = _assoc(node.port)
    with caplog.at_level(logging.ERROR, logger="cmr_ai.scp"):
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
    assert status.Status == CANNOT_UNDERSTAND
    tag = {"StudyInstanceUID": "(0020,000D)", "SeriesInstanceUID": "(0020,000E)",
           "SOPInstanceUID": "(0000,1000) AffectedSOPInstanceUID"}[attr]
    assert tag in caplog.text and "is not a valid UID" in caplog.text
    assert _tree(tmp.parent) == before  # nothing new anywhere under the test's parent folder
    with db.session_scope(url) as s:
        assert s.scalars(select(db.Instance)).all() == []


def test_path_traversal_uid_from_dcmtk_storescu_is_refused(scp, tmp_path):
    """The same with a real modality tool: dcmtk's storescu sends a file whose SOP Instance
    UID is ``../../../evil``; the node answers a failure status and writes nothing."""
    import subprocess

    node, url, tmp = scp
    ds = mr_dataset()
    ds.SOPInstanceUID = "../../../evil"
    src = tmp_path / "send" / "evil.dcm"
    src.parent.mkdir()
    src.write_bytes(file_bytes(ds))
    before = _tree(tmp.parent)
    r = subprocess.run(["/usr/bin/storescu", "-v", "-aec", "CMR_AI", "127.0.0.1", str(node.port), str(src)],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert "Received Store Response (Error: CannotUnderstand)" in out, out
    assert _tree(tmp.parent) == before
    assert [p for p in tmp.parent.rglob("evil*") if p != src] == []
