"""Bad input on the DICOM port (issue 8): each kind gets a clear failure status or an abort, a log
line naming what was wrong, and the node keeps serving (C-ECHO and a valid C-STORE afterwards).

The sender is a raw socket speaking hand-built PDUs (PS3.8 9.3: A-ASSOCIATE-RQ, P-DATA-TF with
PDVs, A-RELEASE-RQ, built with struct below), so each test knows exactly which bytes went out.
Most tests run against a :class:`StoreSCP` in this process with a 2 s network timeout; one runs
against a real ``cmr-ai serve`` and restarts it. ``tests/test_fuzz.py`` reuses the builders.
"""
from __future__ import annotations

import logging
import re
import socket
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from sqlalchemy import select

from peers import free_port, stop_process
from plugin import db
from plugin.dimse import guard
from plugin.dimse.scp import (CANNOT_UNDERSTAND, DATASET_MISMATCH, SOP_CLASS_NOT_SUPPORTED, StoreSCP)
from plugin.storage import InstanceStore
from test_e2e import _wait_port, start_serve
from test_scp import MR, mr_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = range(1, 8)
NETWORK_TIMEOUT = 2.0  # the in-process node's (pynetdicom's default is 60 s)


# --------------------------------------------------------------------------- PDU builders (PS3.8 9.3, PS3.7 E)

def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(contexts=((1, MR, (ExplicitVRLittleEndian,)),), *, called: str = "CMR_AI",
                 calling: str = "RAW_SCU", max_pdu: int = 16384) -> bytes:
    """A-ASSOCIATE-RQ: ``contexts`` as (odd ID, abstract syntax, transfer syntaxes)."""
    pcs = b"".join(item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + item(0x30, sop.encode())
                        + b"".join(item(0x40, ts.encode()) for ts in tss)) for cid, sop, tss in contexts)
    user = item(0x50, item(0x51, struct.pack(">L", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.10.999"))
    return pdu(A_ASSOCIATE_RQ, struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
               + bytes(32) + item(0x10, APP_CONTEXT.encode()) + pcs + user)


RELEASE_RQ = pdu(A_RELEASE_RQ, bytes(4))


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """A Presentation Data Value item; ``control`` bit 0: command, bit 1: last fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def _element(tag: int, value: bytes) -> bytes:  # Implicit VR Little Endian, as every command set
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _ui(uid: str) -> bytes:
    b = uid.encode()
    return b + b"\0" if len(b) % 2 else b


def command(sop_class: str, field_: int, msg_id: int, sop_uid: Optional[str] = None, has_data: bool = True,
            omit: tuple[int, ...] = ()) -> bytes:
    """A DIMSE request command set (PS3.7 9.3): C-STORE-RQ (0x0001) or C-ECHO-RQ (0x0030); the
    elements tagged in ``omit`` left out."""
    els = [(0x00000002, _ui(sop_class)), (0x00000100, struct.pack("<H", field_)),
           (0x00000110, struct.pack("<H", msg_id))]
    if field_ == 0x0001:
        els.append((0x00000700, struct.pack("<H", 0)))
    els.append((0x00000800, struct.pack("<H", 0x0000 if has_data else 0x0101)))
    if sop_uid:
        els.append((0x00001000, _ui(sop_uid)))
    body = b"".join(_element(tag, value) for tag, value in els if tag not in omit)
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def store_pdus(context_id: int, sop_class: str, sop_uid: str, data: bytes, *, msg_id: int = 1,
               max_pdu: int = 16384) -> list[bytes]:
    """The P-DATA-TF PDUs of one C-STORE-RQ: the command, then ``data`` in fragments that fit ``max_pdu``."""
    out = [pdu(P_DATA_TF, pdv(context_id, 0x03, command(sop_class, 0x0001, msg_id, sop_uid)))]
    step = max_pdu - 6
    chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
    for i, chunk in enumerate(chunks):
        out.append(pdu(P_DATA_TF, pdv(context_id, 0x02 if i == len(chunks) - 1 else 0x00, chunk)))
    return out


def echo_pdu(context_id: int, msg_id: int = 1) -> bytes:
    return pdu(P_DATA_TF, pdv(context_id, 0x03, command(VERIFICATION, 0x0030, msg_id, has_data=False)))


def big_mr(rows: int) -> Dataset:
    """An MR image with ``rows`` x ``rows`` 16-bit pixels (``mr_dataset`` keeps 512 bytes of pixel data)."""
    ds = mr_dataset(rows=rows)
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256)
    return ds


def dataset_bytes(ds: Dataset, ts=ExplicitVRLittleEndian) -> bytes:
    """The data set as a C-STORE carries it: no File Meta, encoded in ``ts``."""
    ds = ds.copy()
    if hasattr(ds, "file_meta"):
        del ds.file_meta
    if ts == DeflatedExplicitVRLittleEndian:
        c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return c.compress(encode(ds, False, True)) + c.flush()
    return encode(ds, ts == ImplicitVRLittleEndian, True)


# --------------------------------------------------------------------------- a raw peer

@dataclass
class Reply:
    """What the node answered on one connection."""

    pdus: list[tuple[int, bytes]] = field(default_factory=list)
    closed: bool = False  # the node closed the connection (EOF or reset)
    timed_out: bool = False

    @property
    def types(self) -> list[int]:
        return [t for t, _ in self.pdus]

    def statuses(self) -> list[tuple[int, str]]:
        """(Status, AffectedSOPInstanceUID) of each DIMSE response command received."""
        out = []
        for t, body in self.pdus:
            if t != P_DATA_TF:
                continue
            pos = 0
            while pos + 6 <= len(body):
                n, _cid, control = struct.unpack_from(">LBB", body, pos)
                data = body[pos + 6:pos + 4 + n]
                pos += 4 + n
                if control & 0x01:
                    els = _parse_command(data)
                    if 0x00000900 in els:
                        out.append((struct.unpack("<H", els[0x00000900][:2])[0],
                                    els.get(0x00001000, b"").rstrip(b"\0 ").decode("ascii", "replace")))
        return out

    def max_pdu(self) -> Optional[int]:
        """The Maximum Length the node advertised in its A-ASSOCIATE-AC."""
        for t, body in self.pdus:
            if t == A_ASSOCIATE_AC:
                pos = 68
                while pos + 4 <= len(body):
                    it, _, n = struct.unpack_from(">BBH", body, pos)
                    if it == 0x50:
                        sub = pos + 4
                        while sub + 4 <= pos + 4 + n:
                            st, _, sn = struct.unpack_from(">BBH", body, sub)
                            if st == 0x51:
                                return struct.unpack_from(">L", body, sub + 4)[0]
                            sub += 4 + sn
                    pos += 4 + n
        return None

    def accepted(self) -> dict[int, int]:
        """Presentation context ID → result (0 = acceptance) from the A-ASSOCIATE-AC."""
        out = {}
        for t, body in self.pdus:
            if t == A_ASSOCIATE_AC:
                pos = 68
                while pos + 4 <= len(body):
                    it, _, n = struct.unpack_from(">BBH", body, pos)
                    if it == 0x21:
                        out[body[pos + 4]] = body[pos + 6]
                    pos += 4 + n
        return out


def _parse_command(data: bytes) -> dict[int, bytes]:
    els, pos = {}, 0
    while pos + 8 <= len(data):
        g, e, n = struct.unpack_from("<HHL", data, pos)
        els[g << 16 | e] = data[pos + 8:pos + 8 + n]
        pos += 8 + n
    return els


class RawPeer:
    """A TCP connection to the node that sends bytes and reads PDUs (context manager)."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reply = Reply()

    def __enter__(self) -> "RawPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, *chunks: bytes) -> bool:
        """Send; False when the node has already closed the connection."""
        try:
            for c in chunks:
                self.sock.sendall(c)
            return True
        except OSError:
            self.reply.closed = True
            return False

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return bytes(buf)

    def read(self, until=(A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP, A_ABORT), *, statuses: int = 0,
             timeout: Optional[float] = None) -> Reply:
        """Read PDUs until one of type ``until`` (or ``statuses`` DIMSE responses), EOF or the timeout."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while not self.reply.closed:
                hdr = self._recv(6)
                if len(hdr) < 6:
                    self.reply.closed = True
                    break
                t, _, n = struct.unpack(">BBL", hdr)
                self.reply.pdus.append((t, self._recv(n)))
                if t in until or (statuses and len(self.reply.statuses()) >= statuses):
                    break
        except TimeoutError:
            self.reply.timed_out = True
        except OSError:  # reset by the node
            self.reply.closed = True
        return self.reply

    def associate(self, contexts=((1, MR, (ExplicitVRLittleEndian,)),), **kw) -> Reply:
        self.send(associate_rq(contexts, **kw))
        r = self.read()
        assert r.types and r.types[-1] == A_ASSOCIATE_AC, r
        return r

    def store(self, context_id: int, sop_class: str, sop_uid: str, data: bytes, **kw) -> int:
        """Send one C-STORE-RQ and return the Status the node answered."""
        before = len(self.reply.statuses())
        self.send(*store_pdus(context_id, sop_class, sop_uid, data, **kw))
        r = self.read((A_ABORT, A_RELEASE_RP), statuses=before + 1)
        got = r.statuses()
        assert len(got) > before, f"no C-STORE response: {r}"
        return got[-1][0]


# --------------------------------------------------------------------------- the node under test

@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    """One StoreSCP in this process for the module's tests, with a 2 s network/ACSE timeout."""
    root = tmp_path_factory.mktemp("bad-input")
    url = f"sqlite:///{root / 'db.sqlite'}"
    scp = StoreSCP(ae_title="CMR_AI", host="127.0.0.1", port=0, store=InstanceStore(root / "store"), db_url=url)
    scp.ae.network_timeout = scp.ae.acse_timeout = scp.ae.dimse_timeout = NETWORK_TIMEOUT
    scp.start()
    yield scp, url, root / "store"
    scp.stop()


@dataclass
class Node:
    """The listener as one test sees it: what it stored and indexed since the test began."""

    scp: StoreSCP
    url: str
    store: Path
    files_before: set[Path]
    indexed_before: set[str]

    @property
    def port(self) -> int:
        return self.scp.port

    def new_files(self) -> list[str]:
        """Names of the files that appeared in the store (temp files included)."""
        return sorted(p.name for p in store_files(self.store) if p not in self.files_before)

    def new_indexed(self) -> set[str]:
        return indexed(self.url) - self.indexed_before


@pytest.fixture()
def node(listener) -> Node:
    scp, url, store = listener
    return Node(scp, url, store, set(store_files(store)), indexed(url))


def still_serving(port: int, store_root: Path) -> None:
    """The node answers C-ECHO and stores a valid instance (a fresh association, pynetdicom's SCU)."""
    ae = AE(ae_title="CHECKER")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(MR, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="CMR_AI")
    assert assoc.is_established, "the node no longer accepts an association"
    try:
        assert assoc.send_c_echo().Status == 0
        ds = mr_dataset()
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    path = store_root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID


def indexed(url: str) -> set[str]:
    with db.session_scope(url) as s:
        return set(s.scalars(select(db.Instance.sop_instance_uid)).all())


def store_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def aborted(r: Reply) -> bool:
    """The node ended the association itself: an A-ABORT, or it closed the connection."""
    return A_ABORT in r.types or r.closed


def guard_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "cmr_ai.guard")


# --------------------------------------------------------------------------- malformed PDUs

@pytest.mark.parametrize("when", ["before the association", "after the association"])
def test_unknown_pdu_type_is_aborted_and_logged(node, caplog, when):
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        if when == "after the association":
            peer.associate()
        peer.send(pdu(0x09, b"\0" * 10))
        r = peer.read()
    assert aborted(r) and A_ABORT in r.types, r
    assert "unknown PDU type 0x09" in guard_log(caplog), caplog.text
    still_serving(node.port, node.store)


@pytest.mark.parametrize("delta", [-20, +40])
def test_pdu_length_inconsistent_with_its_content(node, caplog, delta):
    """The A-ASSOCIATE-RQ's length field 20 bytes short (its tail is read as the next PDU) or 40 bytes
    long (the node waits for bytes that never come, then gives up within the network timeout)."""
    rq = bytearray(associate_rq())
    struct.pack_into(">L", rq, 2, len(rq) - 6 + delta)
    with caplog.at_level(logging.INFO), RawPeer(node.port, timeout=NETWORK_TIMEOUT * 5) as peer:
        peer.send(bytes(rq))
        r = peer.read()
    assert A_ASSOCIATE_AC not in r.types or aborted(r), r
    assert aborted(r) or A_ASSOCIATE_RJ in r.types, r
    text = guard_log(caplog)
    if delta < 0:
        assert re.search(r"A-ASSOCIATE-RQ PDU of \d+ bytes does not decode: user information item \(0x50\) at offset "
                         r"\d+: length 38 runs past the end of the PDU \(18 bytes left\): A-ABORT", text), caplog.text
    else:
        assert re.search(r"sent \d+ of \d+ bytes of an A-ASSOCIATE-RQ PDU, then nothing within the network "
                         r"timeout \(2 s\)", text), caplog.text
    still_serving(node.port, node.store)


def _rq_item_offsets(rq: bytes) -> dict[str, int]:
    """Offsets of the length fields of the first presentation context item, its abstract syntax
    sub-item and the user information item in an A-ASSOCIATE-RQ built by :func:`associate_rq`."""
    pos, out = 74, {}
    while pos + 4 <= len(rq):
        t, _, n = struct.unpack_from(">BBH", rq, pos)
        if t == 0x20 and "context" not in out:
            out["context"] = pos + 2
            out["abstract syntax"] = pos + 8 + 2
        elif t == 0x50:
            out["user information"] = pos + 2
            out["maximum length"] = pos + 4 + 2
        pos += 4 + n
    return out


BAD_ITEMS = {  # (item, length written) → what the log line says (offsets count from the PDU's first byte)
    ("context", 0xFFFF): "presentation context item (0x20) at offset 99: length 65535 runs past the end of the PDU",
    ("context", 3): "presentation context item (0x20) at offset 99: length 3, shorter than its 4 fixed bytes",
    ("abstract syntax", 0x0400): "abstract syntax item (0x30) at offset 107: length 1024 runs past the end of the "
                                 "presentation context item at offset 99",
    ("user information", 0xFFF0): "user information item (0x50) at offset 159: length 65520 runs past the end of "
                                  "the PDU",
    ("maximum length", 2): "maximum length item (0x51) at offset 163: length 2, not 4",
}


@pytest.mark.parametrize("where,value", list(BAD_ITEMS))
def test_bad_item_lengths_in_the_associate_rq(node, caplog, where, value):
    rq = bytearray(associate_rq())
    struct.pack_into(">H", rq, _rq_item_offsets(bytes(rq))[where], value)
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.send(bytes(rq))
        r = peer.read()
    assert A_ASSOCIATE_AC not in r.types, f"a broken {where} item was accepted: {r}"
    assert aborted(r) or A_ASSOCIATE_RJ in r.types, r
    assert f"A-ASSOCIATE-RQ PDU of 195 bytes does not decode: {BAD_ITEMS[where, value]}" in guard_log(caplog), \
        caplog.text
    still_serving(node.port, node.store)


@pytest.mark.parametrize("garbage,says", [(b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n", "unknown PDU type 0x47"),
                                         (bytes(range(256)) * 4, "unknown PDU type 0x00")],
                         ids=["http request", "binary"])
def test_garbage_after_a_valid_association_is_aborted(node, caplog, garbage, says):
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.associate()
        peer.send(garbage)
        r = peer.read()
    assert A_ABORT in r.types, r
    assert says in guard_log(caplog), caplog.text
    still_serving(node.port, node.store)


def _rq_with_context(cid: int, *subs: bytes) -> bytes:
    rq = associate_rq()
    fixed, user = rq[6:74], rq[rq.index(b"\x50\x00", 74):]  # the fixed fields; the user information item
    return pdu(A_ASSOCIATE_RQ, fixed + item(0x10, APP_CONTEXT.encode())
               + item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + b"".join(subs)) + user)


NOT_NEGOTIABLE = {  # A-ASSOCIATE-RQs that decode, but pynetdicom raises on → the log line
    "context without abstract syntax": (_rq_with_context(1, item(0x40, ExplicitVRLittleEndian.encode())),
                                        "the A-ASSOCIATE-RQ cannot be negotiated (TypeError: 'abstract_syntax' must "
                                        "be str, bytes or UID, not 'NoneType'): A-ABORT"),
    "even context ID": (_rq_with_context(2, item(0x30, MR.encode()), item(0x40, ExplicitVRLittleEndian.encode())),
                        "the DICOM upper layer failed on Evt6 in state Sta2 (ValueError: 'context_id' must be an "
                        "odd integer"),
}


@pytest.mark.parametrize("kind", list(NOT_NEGOTIABLE))
def test_associate_rq_pynetdicom_cannot_negotiate_is_ended_and_logged(node, caplog, monkeypatch, kind):
    """pynetdicom raised out of the association thread (no answer, the DUL thread left polling)
    or out of the DUL thread (no answer, the socket left open) for these."""
    import threading

    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args))
    rq, says = NOT_NEGOTIABLE[kind]
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.send(rq)
        r = peer.read()
    assert aborted(r) and A_ASSOCIATE_AC not in r.types, r
    assert says in guard_log(caplog), caplog.text
    assert not crashed, [(c.exc_type, c.exc_value) for c in crashed]
    still_serving(node.port, node.store)


def test_p_data_for_a_context_that_was_not_accepted_is_aborted_and_logged(node, caplog):
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.associate()
        peer.send(echo_pdu(99))
        r = peer.read()
    assert A_ABORT in r.types, r
    assert "presentation context ID 99, which was not accepted (accepted: 1)" in guard_log(caplog), caplog.text
    still_serving(node.port, node.store)


# --------------------------------------------------------------------------- truncated associations

def test_connection_closed_mid_associate_rq_is_logged(node, caplog):
    rq = associate_rq()
    with caplog.at_level(logging.INFO):
        with RawPeer(node.port) as peer:
            peer.send(rq[:len(rq) // 2])
        _wait_for(lambda: "A-ASSOCIATE-RQ" in guard_log(caplog))
    assert f"closed after sending {len(rq) // 2 - 6} of {len(rq) - 6} bytes of an A-ASSOCIATE-RQ PDU" \
        in guard_log(caplog), caplog.text
    still_serving(node.port, node.store)


@pytest.mark.parametrize("cut", ["between PDUs", "mid PDU"])
def test_connection_closed_mid_p_data_stores_and_indexes_nothing(node, caplog, cut):
    ds = big_mr(128)  # 32 KiB of pixels: the data set takes three PDUs of 16 KiB
    pdus = store_pdus(1, MR, ds.SOPInstanceUID, dataset_bytes(ds))
    assert len(pdus) == 4
    with caplog.at_level(logging.INFO):
        with RawPeer(node.port) as peer:
            peer.associate()
            half = pdus[:3] if cut == "between PDUs" else pdus[:2] + [pdus[2][:5000]]
            peer.send(*half)
            time.sleep(0.2)  # the node reads what was sent before the close
        _wait_for(lambda: "dropped, nothing stored" in guard_log(caplog))
    text = guard_log(caplog)
    if cut == "between PDUs":
        assert "closed without releasing the association (no A-RELEASE-RQ); the DIMSE message it was sending is " \
               "incomplete: dropped, nothing stored from it" in text, caplog.text
    else:
        assert "closed after sending 4994 of 16384 bytes of a P-DATA-TF PDU; the DIMSE message it was sending " \
               "is incomplete: dropped, nothing stored from it" in text, caplog.text
    assert node.new_files() == [] and node.new_indexed() == set()
    assert node.scp.store.cleanup_temp() == 0  # no partial file for the node's start-up cleanup either
    still_serving(node.port, node.store)


def test_tcp_probes_do_not_use_up_the_association_limit(node):
    """Connections closed before any A-ASSOCIATE-RQ (port probes, health checks): pynetdicom kept each
    one's association thread waiting acse_timeout, so 10 of them (maximum_associations) made it
    reject the next real caller ("local limit exceeded")."""
    assert node.scp.ae.maximum_associations == 10
    for _ in range(12):
        socket.create_connection(("127.0.0.1", node.port)).close()
    time.sleep(0.2)
    still_serving(node.port, node.store)


def test_release_rq_then_garbage_leaves_no_thread_behind(node, caplog, monkeypatch):
    """A-RELEASE-RQ and an unknown PDU at once: the garbage aborts (Sta13) while the association
    thread answers the release (A-RELEASE-RP, Evt14): pynetdicom raised InvalidEventError out of
    the DUL thread for that."""
    import threading

    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args))
    for _ in range(5):
        with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
            peer.associate()
            peer.send(RELEASE_RQ + pdu(0x0E, bytes(8)))
            r = peer.read()
        assert A_ABORT in r.types or A_RELEASE_RP in r.types or r.closed, r
        assert "unknown PDU type 0x0E" in guard_log(caplog)
    still_serving(node.port, node.store)
    assert not crashed, [(c.exc_type, c.exc_value) for c in crashed]


def test_connection_closed_before_release_keeps_what_was_acknowledged(node, caplog):
    ds = mr_dataset()
    with caplog.at_level(logging.INFO):
        with RawPeer(node.port) as peer:
            peer.associate()
            assert peer.store(1, MR, ds.SOPInstanceUID, dataset_bytes(ds)) == 0
        _wait_for(lambda: "closed without releasing" in guard_log(caplog))
    assert "closed without releasing the association (no A-RELEASE-RQ)" in guard_log(caplog)
    assert "dropped" not in guard_log(caplog)
    assert node.new_indexed() == {ds.SOPInstanceUID}
    assert node.new_files() == [f"{ds.SOPInstanceUID}.dcm"]
    still_serving(node.port, node.store)


def _wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.05)


# --------------------------------------------------------------------------- broken data sets

def _with_sequence() -> Dataset:
    ds = mr_dataset()
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "80891009", "SCT", "Heart"
    ds.AnatomicRegionSequence = Sequence([code])
    return ds


def _broken(kind: str) -> tuple[Dataset, bytes]:
    """A data set broken one way, as bytes in Explicit VR Little Endian."""
    ds = _with_sequence()
    raw = bytearray(dataset_bytes(ds))
    if kind == "element length past the end":
        i = raw.index(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
        struct.pack_into("<L", raw, i + 8, 0xFFFFFFF0)
    elif kind == "odd length":
        i = raw.index(struct.pack("<HH", 0x0008, 0x0060) + b"CS")
        struct.pack_into("<H", raw, i + 6, 1)
    elif kind == "sequence item length past the sequence":
        i = raw.index(struct.pack("<HHL", 0xFFFE, 0xE000, 0)[:4])
        struct.pack_into("<L", raw, i + 4, 0x7FFF)
    elif kind == "sequence item with a wrong tag":
        i = raw.index(struct.pack("<HH", 0xFFFE, 0xE000))
        struct.pack_into("<HH", raw, i, 0x0008, 0x0100)
    elif kind == "unknown VR":
        i = raw.index(struct.pack("<HH", 0x0028, 0x0102) + b"US")
        raw[i + 4:i + 6] = b"UW"
    elif kind == "data set sent half":
        raw = raw[:len(raw) // 2]
    elif kind == "non-DICOM bytes":
        raw = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n" * 8)
    return ds, bytes(raw)


BROKEN = {
    "element length past the end": r"\(7FE0,0010\) PixelData at offset 0x[0-9A-F]+: length 4294967280 runs past",
    "odd length": r"the element before it, \(0008,0060\) Modality, has an odd length \(1\)",
    "sequence item length past the sequence": r"\(0008,2218\) AnatomicRegionSequence: item 1 .* runs past the end",
    "sequence item with a wrong tag": r"\(0008,2218\) AnatomicRegionSequence: item 1 .* has tag \(0008,0100\)",
    "unknown VR": r"\(0028,0102\) HighBit at offset 0x[0-9A-F]+: b'UW' is not a VR \(PS3\.5 6\.2\)",
    "data set sent half": r"\([0-9A-F]{4},[0-9A-F]{4}\) \w+ at offset 0x[0-9A-F]+: length \d+ runs past the end "
                          r"of the data set",
    "non-DICOM bytes": r"not a DICOM data set in Explicit VR Little Endian: .*runs past the end|is not a VR",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_data_set_gets_c210_and_a_log_line_naming_the_element(node, caplog, kind):
    ds, raw = _broken(kind)
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.associate()
        status = peer.store(1, MR, ds.SOPInstanceUID, raw)
        ok = mr_dataset()  # the same association goes on
        assert peer.store(1, MR, ok.SOPInstanceUID, dataset_bytes(ok), msg_id=2) == 0
        peer.send(RELEASE_RQ)
        assert A_RELEASE_RP in peer.read().types
    assert status == CANNOT_UNDERSTAND, hex(status)
    line = next((r.getMessage() for r in caplog.records if r.name == "cmr_ai.scp" and "refused" in r.getMessage()), "")
    assert f"C-STORE {ds.SOPInstanceUID} from RAW_SCU@127.0.0.1 refused (0xC210)" in line, caplog.text
    assert re.search(BROKEN[kind], line), line
    assert node.new_indexed() == {ok.SOPInstanceUID}
    assert node.new_files() == [f"{ok.SOPInstanceUID}.dcm"]
    still_serving(node.port, node.store)


def test_explicit_vr_data_set_on_an_implicit_vr_context_gets_c210(node, caplog):
    """pydicom would read it (it guesses the VR encoding), but the file would say Implicit VR
    Little Endian over explicit VR bytes: refused, the log says why."""
    ds = mr_dataset()
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.associate(((1, MR, (ImplicitVRLittleEndian,)),))
        status = peer.store(1, MR, ds.SOPInstanceUID, dataset_bytes(ds, ExplicitVRLittleEndian))
        ok = mr_dataset()
        assert peer.store(1, MR, ok.SOPInstanceUID, dataset_bytes(ok, ImplicitVRLittleEndian), msg_id=2) == 0
    assert status == CANNOT_UNDERSTAND, hex(status)
    assert ("not a DICOM data set in Implicit VR Little Endian: the data set is encoded in explicit VR, not as the "
            "presentation context's transfer syntax says") in caplog.text
    assert node.new_indexed() == {ok.SOPInstanceUID}
    still_serving(node.port, node.store)


def _group_length_too_long() -> bytes:
    c = bytearray(command(MR, 0x0001, 1, generate_uid()))
    struct.pack_into("<L", c, 4, 0x10)  # (0000,0000) CommandGroupLength's UL claims 16 bytes: swallows the next one
    return bytes(c)


COMMAND_SETS = {  # a C-STORE-RQ command set broken one way → what the log line says
    "group length too long": (_group_length_too_long, "the DIMSE command set has no (0000,0100) CommandField"),
    "unknown command field": (lambda: command(MR, 0x7777, 1, generate_uid()),
                              "(0000,0100) CommandField 30583 in the DIMSE command set names no DIMSE message"),
    "no data set type": (lambda: command(MR, 0x0001, 1, generate_uid(), omit=(0x00000800,)),
                         "the DIMSE command set has no (0000,0800) CommandDataSetType"),
}


@pytest.mark.parametrize("kind", list(COMMAND_SETS))
def test_broken_command_set_is_aborted_and_logged(node, caplog, monkeypatch, kind):
    """pynetdicom decodes a complete command set inside a state-machine action: a missing
    CommandField or CommandDataSetType there raises out of the DUL thread (unhandled, no A-ABORT,
    the socket left open). The guard refuses such a command set first."""
    import threading

    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args))
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.associate()
        peer.send(pdu(P_DATA_TF, pdv(1, 0x03, COMMAND_SETS[kind][0]())))
        r = peer.read()
    assert A_ABORT in r.types, r
    assert f"{COMMAND_SETS[kind][1]}: A-ABORT" in guard_log(caplog), caplog.text
    assert not crashed, crashed
    assert not node.new_files()
    still_serving(node.port, node.store)


# --------------------------------------------------------------------------- huge declared lengths

def test_pdu_declaring_0xfffffff0_bytes_is_aborted_at_its_header(node, caplog):
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.send(struct.pack(">BBL", A_ASSOCIATE_RQ, 0, 0xFFFFFFF0) + b"\0" * 1000)
        r = peer.read()
    assert A_ABORT in r.types, r
    assert "A-ASSOCIATE-RQ PDU of 4294967280 bytes declared, more than 1048576 (the most we read)" \
        in guard_log(caplog), caplog.text
    still_serving(node.port, node.store)


@pytest.mark.parametrize("declared", ["max_pdu + 1", "0xFFFFFFF0"])
def test_p_data_longer_than_the_advertised_maximum_is_aborted(node, caplog, declared):
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        ac = peer.associate()
        limit = ac.max_pdu()
        assert limit == guard.DEFAULT_MAX_PDU == 262144  # node.max_pdu's default, advertised
        ds = big_mr(512)  # 512 KiB of pixels
        data = dataset_bytes(ds)
        n = limit + 1 if declared == "max_pdu + 1" else 0xFFFFFFF0
        body = pdv(1, 0x03, command(MR, 0x0001, 1, ds.SOPInstanceUID)) + pdv(1, 0x02, data)
        peer.send(pdu(P_DATA_TF, body)[:2] + struct.pack(">L", n) + body[:limit + 1])
        r = peer.read()
    assert A_ABORT in r.types, r
    assert f"P-DATA-TF PDU of {n} bytes declared, more than 262144 (node.max_pdu, the maximum we advertised)" \
        in guard_log(caplog), caplog.text
    assert not node.new_files()
    still_serving(node.port, node.store)


@pytest.mark.parametrize("sent", ["half a header", "part of a declared length"])
def test_a_peer_that_goes_quiet_mid_pdu_is_cut_off_within_the_network_timeout(node, caplog, sent):
    """pynetdicom alone would wait in recv() for good (the accepted socket has no timeout)."""
    with caplog.at_level(logging.INFO), RawPeer(node.port, timeout=NETWORK_TIMEOUT * 10) as peer:
        peer.send(b"\x01\x00\x00" if sent == "half a header" else struct.pack(">BBL", A_ASSOCIATE_RQ, 0, 1000) + b"x")
        r = peer.read()
    assert r.closed and not r.timed_out, r
    want = "3 of the 6 bytes of a PDU header" if sent == "half a header" else "1 of 1000 bytes of an A-ASSOCIATE-RQ PDU"
    assert f"sent {want}, then nothing within the network timeout (2 s): connection closed" in guard_log(caplog)
    still_serving(node.port, node.store)


def test_deflate_bomb_is_refused_without_inflating_it(node, caplog, monkeypatch):
    """pynetdicom's Event.dataset inflates a deflated data set with no bound; the handler inflates at
    most guard.MAX_INFLATED bytes (lowered to 1 MiB here: the bomb inflates to 4 MiB)."""
    monkeypatch.setattr(guard, "MAX_INFLATED", 1 << 20)
    ds = mr_dataset()
    head = encode(ds, False, True)
    i = head.index(struct.pack("<HH", 0x7FE0, 0x0010))
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = c.compress(head[:i] + struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<L", 4 << 20))
    bomb += c.compress(bytes(4 << 20)) + c.flush()
    assert len(bomb) < 8192
    ok = mr_dataset()
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.associate(((1, MR, (DeflatedExplicitVRLittleEndian,)),))
        status = peer.store(1, MR, ds.SOPInstanceUID, bomb)
        assert peer.store(1, MR, ok.SOPInstanceUID, dataset_bytes(ok, DeflatedExplicitVRLittleEndian), msg_id=2) == 0
    assert status == CANNOT_UNDERSTAND, hex(status)
    assert f"the deflated data set ({len(bomb)} bytes) inflates to more than 1048576 bytes" in caplog.text
    assert node.new_indexed() == {ok.SOPInstanceUID}
    still_serving(node.port, node.store)


# --------------------------------------------------------------------------- wrong SOP class

def test_affected_sop_class_not_the_contexts_gets_0122(node, caplog):
    """pynetdicom picks the service by the command's Affected SOP Class UID and calls the handler
    even when it is not the presentation context's; the handler refuses it."""
    ds = mr_dataset()
    ds.SOPClassUID = CT  # consistent with the command: only the context differs
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.associate()
        status = peer.store(1, CT, ds.SOPInstanceUID, dataset_bytes(ds))
    assert status == SOP_CLASS_NOT_SUPPORTED, hex(status)
    assert (f"refused (0x0122): (0000,0002) AffectedSOPClassUID {CT} is not the SOP class of presentation "
            f"context 1 ({MR})") in caplog.text
    assert not node.new_files() and not node.new_indexed()
    still_serving(node.port, node.store)


def test_data_set_sop_class_not_the_commands_gets_a900(node, caplog):
    ds = mr_dataset()
    ds.SOPClassUID = CT
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.associate()
        status = peer.store(1, MR, ds.SOPInstanceUID, dataset_bytes(ds))
    assert status == DATASET_MISMATCH, hex(status)
    assert f"(0008,0016) SOPClassUID {CT} in the dataset differs from (0000,0002) AffectedSOPClassUID {MR}" \
        in caplog.text
    assert not node.new_files()
    still_serving(node.port, node.store)


def test_c_store_of_a_non_storage_sop_class_is_aborted_by_pynetdicom(node, caplog):
    """An Affected SOP Class UID that names no service (here Verification's, in a C-STORE-RQ):
    pynetdicom has no SCP for it and aborts, logging the UID (ERROR, pynetdicom.association)."""
    with caplog.at_level(logging.INFO), RawPeer(node.port) as peer:
        peer.associate(((1, VERIFICATION, (ImplicitVRLittleEndian,)),))
        peer.send(*store_pdus(1, "1.2.3.4", generate_uid(), dataset_bytes(mr_dataset(), ImplicitVRLittleEndian)))
        r = peer.read()
    assert aborted(r), r
    assert "No supported service class available for the SOP Class UID '1.2.3.4'" in caplog.text
    still_serving(node.port, node.store)


# --------------------------------------------------------------------------- against a real `cmr-ai serve`

def start_node(tmp_path: Path, port: int) -> subprocess.Popen:
    """``cmr-ai serve --no-worker`` on ``port``, started in ``tmp_path`` (so anything it writes lands
    there): store and index under ``tmp_path/var``, every study ignored (no analysis), logging to
    ``tmp_path/node.log`` (appended)."""
    proc = start_serve(tmp_path, port, None, "  {}", "  - {name: nothing, match: {}, action: ignore}",
                       "--no-worker", cwd=tmp_path)
    _wait_port(port, proc)
    return proc


stop_node = stop_process


def test_serve_truncated_association_huge_pdu_and_broken_data_set_then_restart(tmp_path):
    """Against ``cmr-ai serve``: a C-STORE cut off mid P-DATA, a PDU declaring 0xFFFFFFF0 bytes and a
    broken data set, each logged; the node keeps serving; after a restart nothing of the half
    instance is on disk (no .dcm, no .incoming-*.tmp) or in the index."""
    port = free_port()
    proc = start_node(tmp_path, port)
    store, url = tmp_path / "var" / "dicom", f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"
    half = big_mr(128)
    try:
        with RawPeer(port) as peer:
            peer.associate()
            peer.send(*store_pdus(1, MR, half.SOPInstanceUID, dataset_bytes(half))[:2])
            time.sleep(0.3)
        with RawPeer(port) as peer:
            peer.send(struct.pack(">BBL", A_ASSOCIATE_RQ, 0, 0xFFFFFFF0) + b"\0" * 100)
            assert A_ABORT in peer.read().types
        broken, raw = _broken("element length past the end")
        with RawPeer(port) as peer:
            peer.associate()
            assert peer.store(1, MR, broken.SOPInstanceUID, raw) == CANNOT_UNDERSTAND
        still_serving(port, store)
        assert proc.poll() is None
    finally:
        stop_node(proc)
    proc = start_node(tmp_path, port)  # the start-up cleanup runs
    try:
        still_serving(port, store)
    finally:
        stop_node(proc)
    log = (tmp_path / "node.log").read_text()
    assert re.search(r"WARNING +cmr_ai\.guard: connection from 127\.0\.0\.1:\d+ \(RAW_SCU\) closed without "
                     r"releasing the association .*incomplete: dropped, nothing stored", log), log
    assert "A-ASSOCIATE-RQ PDU of 4294967280 bytes declared" in log, log
    assert re.search(r"ERROR +cmr_ai\.scp: C-STORE \S+ from RAW_SCU@127\.0\.0\.1 refused \(0xC210\): .*"
                     r"\(7FE0,0010\) PixelData", log), log
    assert "Traceback" not in log, log
    files = store_files(store)
    assert not [p for p in files if p.name.startswith(".incoming-")], files
    assert half.SOPInstanceUID not in {p.stem for p in files} and broken.SOPInstanceUID not in {p.stem for p in files}
    assert half.SOPInstanceUID not in indexed(url) and broken.SOPInstanceUID not in indexed(url)
    assert len(indexed(url)) == 2  # the two still_serving instances
