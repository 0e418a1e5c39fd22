"""A bounded, seeded, counted fuzz run against a real ``cmr-ai serve`` (issue 8).

Each case starts from a valid conversation — A-ASSOCIATE-RQ, maybe a C-ECHO, a C-STORE of a small
MR image, A-RELEASE-RQ, in PDUs of a random size — and mutates it with ``random.Random`` seeded
from ``CMR_AI_FUZZ_SEED`` (default 8004) and the case number: bit flips, bytes inserted or
deleted, the stream cut short, a length field (PDU, item, PDV or data element) set to an edge
value, PDUs swapped, repeated or dropped, an A-ASSOCIATE-RQ with an item left out or repeated;
at the PDU layer, in the command set or in the data set (so the mutation reaches the C-STORE
handler). Every case has its own connection; the peer waits like a real SCU after the
A-ASSOCIATE-RQ, each message and the A-RELEASE-RQ (0.4 s at most, then it sends the rest,
closes its side and waits for the node to close). ``CMR_AI_FUZZ_CASES`` cases (default 250,
~30 s on 2 cores) run four at a time. Outcomes are counted and printed (``pytest -s``, or the
captured stdout of a failure); a failure names the seed and the case.

Asserted: the node process is alive every 50 cases and at the end and answers C-ECHO; no
connection is left hanging (the node answers or closes once the peer has closed its side);
every instance answered Success is on disk, in the index and reads with pydicom and with
dcmtk's ``dcmdump`` (the stricter reader: pydicom reads a data set cut short); the store and the
index agree file for file; nothing was written outside the store; after a restart no
``.incoming-*.tmp`` is left; the node's log has no Python traceback. pynetdicom logs the
exceptions bad input causes inside it with tracebacks; ``plugin.dimse.guard.OneLineExceptions``
makes those records one line, so the whole log is checked: a traceback left is an unhandled
exception (ours, or a pynetdicom thread dying), not pynetdicom reporting garbage.
"""
from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from peers import free_port
from plugin import db
from test_bad_input import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP, APP_CONTEXT, MR, P_DATA_TF,
                            RELEASE_RQ, VERIFICATION, Reply, associate_rq, dataset_bytes, echo_pdu, item, pdu,
                            start_node, still_serving, stop_node, store_pdus)
from test_scp import mr_dataset

DCMDUMP = "/usr/bin/dcmdump"  # dcmtk (a peer the suite requires: `make test` installs it)
SEED = int(os.environ.get("CMR_AI_FUZZ_SEED", "8004"))
CASES = int(os.environ.get("CMR_AI_FUZZ_CASES", "250"))
PARALLEL = 4
WAIT = 0.4  # seconds the peer waits for an answer before it sends on regardless
UID_ROOT = "1.2.826.0.1.3680043.10.543"
EDGE = (0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF,
        0x10000, 0x40000, 0x40001, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF)


# --------------------------------------------------------------------------- cases

@dataclass
class Slot:
    """Bytes the peer sends, and whether it then waits for an answer (as an SCU would)."""

    data: bytes
    wait: bool


def _element_lengths(raw: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the length field of each top-level element of an Explicit VR LE data set."""
    out, pos = [], 0
    while pos + 8 <= len(raw):
        vr = raw[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV", b"SV", b"UV"):
            n = struct.unpack_from("<L", raw, pos + 8)[0]
            out.append((pos + 8, 4))
            pos += 12 + (0 if n == 0xFFFFFFFF else n)
        else:
            out.append((pos + 6, 2))
            pos += 8 + struct.unpack_from("<H", raw, pos + 6)[0]
    return out


def _bytes_mutation(rng: random.Random, b: bytearray, length_fields: list[tuple[int, int]],
                    endian: str = "<") -> str:
    """Mutate ``b`` in place one way; returns the name of the mutation. ``length_fields``:
    (offset, size) of the length fields in ``b`` (``endian``: their byte order)."""
    length_fields = [(o, n) for o, n in length_fields if o + n <= len(b)]
    if not b:
        b += bytes([rng.randrange(256)])
        return "insert"
    op = rng.choice(["bitflip", "bitflip", "insert", "delete", "truncate", "length", "length", "byte"])
    if op == "length" and not length_fields:
        op = "bitflip"
    if op == "bitflip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == "byte":
        b[rng.randrange(len(b))] = rng.choice((0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    elif op == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif op == "delete":
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 16)]
    elif op == "truncate":
        del b[rng.randrange(len(b)):]
    else:
        off, size = rng.choice(length_fields)
        fmt = endian + ("H" if size == 2 else "L")
        old = struct.unpack_from(fmt, b, off)[0]
        new = rng.choice((rng.choice(EDGE), old + 1, max(old - 1, 0), old + 2, old * 2))
        struct.pack_into(fmt, b, off, new % (1 << (8 * size)))
    return op


def _pdu_length_fields(pdu: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the PDU length and of the item / PDV length fields inside it."""
    out = [(2, 4)] if len(pdu) >= 6 else []
    if pdu[:1] in (b"\x01", b"\x02") and len(pdu) >= 74:
        pos = 74
        while pos + 4 <= len(pdu):
            out.append((pos + 2, 2))
            t, n = pdu[pos], struct.unpack_from(">H", pdu, pos + 2)[0]
            if t in (0x20, 0x50):  # sub-items
                sub = pos + (8 if t == 0x20 else 4)
                while sub + 4 <= min(pos + 4 + n, len(pdu)):
                    out.append((sub + 2, 2))
                    sub += 4 + struct.unpack_from(">H", pdu, sub + 2)[0]
            pos += 4 + n
    elif pdu[:1] == b"\x04":
        pos = 6
        while pos + 6 <= len(pdu):
            out.append((pos, 4))
            pos += 4 + struct.unpack_from(">L", pdu, pos)[0]
    return out


def _associate_rq_variant(rng: random.Random, max_pdu: int) -> tuple[bytes, str]:
    """An A-ASSOCIATE-RQ whose items are well formed (lengths right) but whose content is not: an item
    left out or repeated, an odd or even context ID, an empty or odd UID, an unknown sub-item."""
    def uid(u: str) -> str:  # mostly the right one
        return rng.choice([u] * 6 + ["", "1.2.", "x" * 70, "1.2.840.10008.1.2.1\0\0", "\xff\xfe"])

    what = rng.choice(["no abstract syntax", "no transfer syntax", "two abstract syntaxes", "context ID",
                       "no user information", "no maximum length", "no implementation class", "no application context",
                       "odd UIDs", "unknown user item", "no contexts", "duplicate context"])
    ts = [item(0x40, uid(ExplicitVRLittleEndian).encode("latin-1"))]
    ab = [item(0x30, uid(MR).encode("latin-1"))]
    if what == "no abstract syntax":
        ab = []
    elif what == "no transfer syntax":
        ts = []
    elif what == "two abstract syntaxes":
        ab = ab * 2
    cid = rng.choice((0, 2, 255, 254)) if what == "context ID" else 3
    pcs = [item(0x20, struct.pack(">BBBB", 1, 0, 0, 0) + item(0x30, VERIFICATION.encode())
                + item(0x40, ImplicitVRLittleEndian.encode())),
           item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + b"".join(ab + ts))]
    if what == "no contexts":
        pcs = []
    elif what == "duplicate context":
        pcs.append(pcs[-1])
    subs = [item(0x51, struct.pack(">L", max_pdu)), item(0x52, uid("1.2.826.0.1.3680043.10.999").encode("latin-1"))]
    if what == "no maximum length":
        subs = subs[1:]
    elif what == "no implementation class":
        subs = subs[:1]
    elif what == "unknown user item":
        subs.insert(rng.randrange(3), item(rng.choice((0x5A, 0x60, 0x54, 0x56, 0x58)), rng.randbytes(rng.randrange(8))))
    user = [] if what == "no user information" else [item(0x50, b"".join(subs))]
    app = [] if what == "no application context" else [item(0x10, uid(APP_CONTEXT).encode("latin-1"))]
    body = struct.pack(">HH", 1, 0) + b"CMR_AI".ljust(16) + b"FUZZER".ljust(16) + bytes(32)
    return pdu(0x01, body + b"".join(app + pcs + user)), f"association {what}"


def make_case(i: int) -> tuple[list[Slot], str, str]:
    """Case ``i``: the slots to send, a description of the mutations, and the SOP Instance UID."""
    rng = random.Random(f"{SEED}:{i}")
    max_pdu = rng.choice((256, 1024, 4096, 16384))
    ds = mr_dataset()
    ds.StudyInstanceUID = f"{UID_ROOT}.{SEED}.{i}.1"
    ds.SeriesInstanceUID = f"{UID_ROOT}.{SEED}.{i}.2"
    ds.SOPInstanceUID = sop_uid = f"{UID_ROOT}.{SEED}.{i}.3"
    raw = bytearray(dataset_bytes(ds))
    layer = rng.choices(["pdu", "data set", "command", "order", "association"], weights=(5, 3, 1, 1, 1))[0]
    done = []
    if layer == "data set":
        for _ in range(rng.choice((1, 1, 2))):
            done.append("data set " + _bytes_mutation(rng, raw, _element_lengths(bytes(raw))))
    slots = [Slot(associate_rq(((1, VERIFICATION, (ImplicitVRLittleEndian,)),
                                (3, MR, (ExplicitVRLittleEndian,))),
                               calling="FUZZER", max_pdu=max_pdu), True)]
    if layer == "association":
        rq, what = _associate_rq_variant(rng, max_pdu)
        slots[0] = Slot(rq, True)
        done.append(what)
    if rng.random() < 0.3:
        slots.append(Slot(echo_pdu(1, msg_id=1), True))
    store = store_pdus(3, MR, sop_uid, bytes(raw), msg_id=2, max_pdu=max_pdu)
    if layer == "command":
        cmd = bytearray(store[0])  # PDU header, PDV header, then the command set (Implicit VR Little Endian)
        fields, pos = [], 12
        while pos + 8 <= len(cmd):
            fields.append((pos + 4, 4))
            pos += 8 + struct.unpack_from("<L", cmd, pos + 4)[0]
        done.append("command " + _bytes_mutation(rng, cmd, fields))
        store[0] = bytes(cmd)
    slots += [Slot(p, k == len(store) - 1) for k, p in enumerate(store)]
    slots.append(Slot(RELEASE_RQ, True))
    if layer == "pdu":
        for _ in range(rng.choice((1, 1, 2, 3))):
            k = rng.randrange(len(slots))
            b = bytearray(slots[k].data)
            done.append(f"pdu {k} " + _bytes_mutation(rng, b, _pdu_length_fields(slots[k].data), ">"))
            slots[k] = Slot(bytes(b), slots[k].wait)
    elif layer == "order":
        op = rng.choice(["swap", "repeat", "drop", "cut"])
        k = rng.randrange(len(slots))
        if op == "swap":
            j = rng.randrange(len(slots))
            slots[k].data, slots[j].data = slots[j].data, slots[k].data
        elif op == "repeat":
            slots.insert(k, Slot(slots[k].data, slots[k].wait))
        elif op == "drop":
            del slots[k]
        else:  # the connection ends here (mid-PDU or between PDUs)
            slots[k] = Slot(slots[k].data[:rng.randrange(len(slots[k].data) + 1)], False)
            del slots[k + 1:]
        done.append(f"order {op} {k}")
    return slots, ", ".join(done), sop_uid


# --------------------------------------------------------------------------- running a case

@dataclass
class Outcome:
    kind: str  # success | failure status | rejected | aborted | released | timeout
    acked: list[str]  # SOP Instance UIDs answered Success
    statuses: list[int]


_ENDS = (A_ASSOCIATE_RJ, A_ABORT, A_RELEASE_RP)  # after these the node says nothing more on the connection


class _Peer:
    """One fuzz connection: sends slots, reads the node's PDUs into a :class:`Reply`."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reply = Reply()
        self.buf = b""

    def ended(self) -> bool:
        return self.reply.closed or any(t in _ENDS for t in self.reply.types)

    def read(self, until: tuple[int, ...], timeout: float) -> bool:
        """Read until a PDU of a type in ``until`` or EOF/reset (True), or ``timeout`` s of silence (False)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                while len(self.buf) >= 6:
                    t, _, n = struct.unpack_from(">BBL", self.buf)
                    if len(self.buf) < 6 + n:
                        break
                    self.reply.pdus.append((t, self.buf[6:6 + n]))
                    self.buf = self.buf[6 + n:]
                    if t in until:
                        return True
                chunk = self.sock.recv(65536)
                if not chunk or len(self.buf) > 1 << 20:  # closed, or more than the node ever sends
                    self.reply.closed = True
                    return True
                self.buf += chunk
        except TimeoutError:
            return False
        except OSError:
            self.reply.closed = True
            return True


def run_case(port: int, slots: list[Slot]) -> Outcome:
    """Send the slots as an SCU would (waiting for an answer where it would, ``WAIT`` s at most,
    once), then close our side and wait for the node to close its."""
    peer = _Peer(port)
    timed_out = False
    try:
        waiting = True
        for slot in slots:
            try:
                peer.sock.sendall(slot.data)
            except OSError:
                peer.reply.closed = True
                break
            if slot.wait and waiting:
                if not peer.read((A_ASSOCIATE_AC, P_DATA_TF) + _ENDS, WAIT):
                    waiting = False  # the node waits for bytes we will not send: send on, then close our side
                elif peer.ended():
                    break
        if not peer.ended():
            try:
                peer.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            while not peer.ended():
                if not peer.read(_ENDS, 10.0):
                    timed_out = True  # the node neither answered nor closed 10 s after our side closed
                    break
    finally:
        peer.sock.close()
    reply = peer.reply
    statuses = reply.statuses()
    acked = [uid for st, uid in statuses if st == 0x0000 and uid]
    if acked:
        kind = "success"
    elif any(st != 0 for st, _ in statuses):
        kind = "failure status"
    elif A_ASSOCIATE_RJ in reply.types:
        kind = "rejected"
    elif timed_out:
        kind = "timeout"
    elif A_ABORT in reply.types or reply.closed:
        kind = "aborted"
    elif A_RELEASE_RP in reply.types:
        kind = "released"
    else:
        kind = "timeout"
    return Outcome(kind, acked, [st for st, _ in statuses])


def echo(port: int) -> int:
    ae = AE(ae_title="FUZZ_CHECK")
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="CMR_AI")
    assert assoc.is_established, "the node no longer accepts an association"
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the run

def test_fuzz_the_dicom_port_of_cmr_ai_serve(tmp_path):
    if not Path(DCMDUMP).exists():
        pytest.fail(f"{DCMDUMP} missing: install the Debian package dcmtk", pytrace=False)
    port = free_port()
    proc = start_node(tmp_path, port)
    store = tmp_path / "var" / "dicom"
    url = f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"
    counts: Counter = Counter()
    acked: dict[str, str] = {}  # SOP Instance UID → case
    started = time.monotonic()
    try:
        still_serving(port, store)  # warm up: the store, the database files exist now
        before = _all_files(tmp_path)
        with ThreadPoolExecutor(PARALLEL) as pool:
            for first in range(0, CASES, 50):
                batch = range(first, min(first + 50, CASES))
                cases = {i: make_case(i) for i in batch}
                for i, out in zip(batch, pool.map(lambda i: run_case(port, cases[i][0]), batch)):
                    counts[out.kind] += 1
                    for uid in out.acked:
                        acked[uid] = f"case {i} ({cases[i][1] or 'unmutated'})"
                assert proc.poll() is None, f"the node died during cases {first}..{batch[-1]} (seed {SEED})"
                assert echo(port) == 0, f"no C-ECHO after cases {first}..{batch[-1]} (seed {SEED})"
        print(f"\nfuzz: seed {SEED}, {CASES} cases in {time.monotonic() - started:.1f} s: "
              + ", ".join(f"{k} {counts[k]}" for k in ("success", "failure status", "rejected", "aborted",
                                                       "released", "timeout")))
        assert counts["timeout"] == 0, f"the node neither answered nor closed the connection: {counts}"
        still_serving(port, store)
        assert proc.poll() is None
        # every acknowledged instance is stored, indexed and reads back
        with db.session_scope(url) as s:
            index = {i.sop_instance_uid: i.path for i in s.scalars(select(db.Instance)).all()}
        missing = [f"{uid} ({case})" for uid, case in acked.items() if uid not in index]
        assert not missing, f"acknowledged but not indexed: {missing[:5]}"
        for uid in acked:
            assert pydicom.dcmread(index[uid]).SOPInstanceUID == uid, acked[uid]
        # pydicom reads nearly anything; dcmtk, a peer these files go to, is the stricter reader
        for uid in acked:
            r = subprocess.run([DCMDUMP, index[uid]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            assert r.returncode == 0, f"dcmdump cannot read {uid} ({acked[uid]}): {r.stderr[-1000:]}"
        files = {p for p in _all_files(store) if not p.name.startswith(".incoming-")}
        assert files == {Path(p) for p in index.values()}, "the store and the index disagree"
        new = {p for p in _all_files(tmp_path) - before if store not in p.parents}
        allowed = {tmp_path / "node.log"} | {Path(f"{tmp_path / 'var' / 'cmr-ai.db'}{x}") for x in
                                              ("-wal", "-shm", "-journal")}
        assert not new - allowed, f"written outside the store: {sorted(new - allowed)}"
        assert counts["success"] >= CASES // 20, counts  # some cases stay valid: the node was not refusing everything
    finally:
        stop_node(proc)
    proc = start_node(tmp_path, port)  # the start-up cleanup runs
    try:
        assert echo(port) == 0
    finally:
        stop_node(proc)
    leftovers = [p for p in _all_files(store) if p.name.startswith(".incoming-")]
    assert not leftovers, leftovers
    log = (tmp_path / "node.log").read_text()
    assert "Traceback (most recent call last)" not in log, log[max(0, log.index("Traceback") - 2000):][:6000]
    assert "Exception in thread" not in log, log
