"""Faults a site will throw at the node (issue 8): ``kill -9`` of ``cmr-ai serve`` in the
middle of a study loses no acknowledged instance, and the study completes after a restart.

The sender is a pynetdicom SCU, so the test knows exactly which C-STOREs were answered
Success before the kill; a SIGKILL arrives from another thread while the association is
busy. After the restart every acknowledged instance must be in the index and on disk
byte for byte as sent; the modality sends the whole study again (what it does after a
failed association) and the complete study is analysed once (``stable_after`` is longer
than the restart), the draft written to a folder.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from peers import free_port, stop_process
from plugin import db
from plugin.phantom import write_study
from test_e2e import _wait_port, start_serve


def start_node(tmp_path: Path, port: int, model_dir) -> subprocess.Popen:
    proc = start_serve(tmp_path, port, model_dir, f"  out: {{folder: {tmp_path / 'out'}}}",
                       "  - {name: cardiac, match: {Modality: MR}, stable_after: 20, template: lv_function, "
                       "model: demo, send_to: [out]}")
    _wait_port(port, proc)
    return proc


def send(port: int, files: list[Path], acked: list[str], on_ack=None) -> None:
    """C-STORE each file on one association; record the SOP Instance UIDs answered Success."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="CMR_AI")
    assert assoc.is_established
    try:
        for f in files:
            ds = pydicom.dcmread(f)
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                acked.append(str(ds.SOPInstanceUID))
                if on_ack:
                    on_ack(len(acked))
            elif not assoc.is_established:
                return
    finally:
        if assoc.is_established:
            assoc.release()


def stored(tmp_path: Path) -> dict[str, str]:
    with db.session_scope(f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}") as s:
        return {i.sop_instance_uid: i.path for i in s.scalars(select(db.Instance)).all()}


@pytest.mark.slow
def test_kill_9_mid_study_loses_no_acknowledged_instance(tmp_path, demo_model_dir):
    write_study(tmp_path / "study", style="siemens", seed=5, slices=6, phases=8)
    files = sorted(p for p in (tmp_path / "study").rglob("*.dcm"))
    mr = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"]
    assert len(mr) == len(files) > 60
    port = free_port()
    node = start_node(tmp_path, port, demo_model_dir)
    acked: list[str] = []
    killed = threading.Event()

    def kill_at(n: int) -> None:
        if n == 40 and not killed.is_set():
            killed.set()
            threading.Thread(target=os.killpg, args=(node.pid, signal.SIGKILL)).start()

    try:
        try:
            send(port, mr, acked, kill_at)
        except Exception:  # noqa: BLE001 — the association dies with the node: expected
            pass
        node.wait(30)
        assert killed.is_set() and node.returncode == -signal.SIGKILL
        assert 40 <= len(acked) < len(mr), len(acked)  # killed mid-study

        node = start_node(tmp_path, port, demo_model_dir)  # restart: nothing acknowledged is lost
        index = stored(tmp_path)
        by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in mr}
        missing = [u for u in acked if u not in index]
        assert not missing, f"{len(missing)} acknowledged instance(s) lost: {missing[:3]}"
        for u in acked:
            got = pydicom.dcmread(index[u])
            sent = pydicom.dcmread(by_uid[u])
            assert got.PixelData == sent.PixelData and got.SOPInstanceUID == u

        again: list[str] = []
        send(port, mr, again)  # the modality sends the study again
        assert len(again) == len(mr)
        assert set(stored(tmp_path)) == set(by_uid)
        deadline = time.monotonic() + 240
        url = f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"
        while time.monotonic() < deadline:
            with db.session_scope(url) as s:
                jobs = s.scalars(select(db.Job)).all()
                states = [j.state for j in jobs]
                st = s.scalar(select(db.Study))
                n = st.n_instances
            if states and all(x == db.JobState.DONE for x in states):
                break
            assert db.JobState.FAILED not in states, (tmp_path / "node.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail(f"study not analysed after restart: jobs {states}\n"
                        + (tmp_path / "node.log").read_text()[-3000:])
        assert n == len(mr)
        assert len(states) == 1, states  # analysed once
        assert list((tmp_path / "out").rglob("*.dcm")), "the draft is in the folder"
    finally:
        stop_process(node)


@pytest.fixture()
def small_disk(tmp_path):
    """A 1 MiB tmpfs for the store (needs root, as `make test` runs in CI)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill the disk needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_gets_a700_no_partial_file_and_the_node_keeps_serving(tmp_path, small_disk, caplog):
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from plugin.dimse.scp import OUT_OF_RESOURCES, StoreSCP
    from plugin.storage import InstanceStore
    from test_scp import mr_dataset

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"  # the database is on another disk
    scp = StoreSCP(ae_title="CMR_AI", host="127.0.0.1", port=0, store=InstanceStore(small_disk / "store"), db_url=url)
    scp.start()
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 300 * 1024))  # ~300 KiB left: two 128 KiB instances fit
    study = generate_uid()
    datasets = [mr_dataset(study_uid=study, rows=256) for _ in range(5)]
    for ds in datasets:  # 128 KiB of pixels each
        ds.PixelData = os.urandom(256 * 256 * 2)
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    try:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="CMR_AI")
        assert assoc.is_established
        statuses = [assoc.send_c_store(ds).Status for ds in datasets]
        assert statuses[:2] == [0, 0] and OUT_OF_RESOURCES in statuses[2:], [hex(s) for s in statuses]
        assert "cannot write to the store" in caplog.text and "(disk full)" in caplog.text
        # nothing partial: only the acknowledged instances are in the store, whole, and in the index
        files = sorted(p for p in (small_disk / "store").rglob("*") if p.is_file())
        acked = {str(ds.SOPInstanceUID) for ds, st in zip(datasets, statuses) if st == 0}
        assert {p.stem for p in files} == acked, files  # no .incoming-*.tmp left behind
        for p in files:
            assert pydicom.dcmread(p).PixelData == next(d for d in datasets if d.SOPInstanceUID == p.stem).PixelData
        assert set(stored_in(url)) == acked
        # the node keeps serving: room again → the refused ones go in on the same association
        filler.unlink()
        refused = [ds for ds, st in zip(datasets, statuses) if st != 0]
        assert [assoc.send_c_store(ds).Status for ds in refused] == [0] * len(refused)
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert set(stored_in(url)) == {str(d.SOPInstanceUID) for d in datasets}
    finally:
        scp.stop()


def stored_in(url: str) -> list[str]:
    with db.session_scope(url) as s:
        return list(s.scalars(select(db.Instance.sop_instance_uid)).all())
