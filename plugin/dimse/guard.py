"""What a broken or hostile peer can send the listener, and what pynetdicom does about it.

pynetdicom 3.0.4 and pydicom 3.0 do the DICOM work; this module covers the gaps that
``tests/test_bad_input.py`` and ``tests/test_fuzz.py`` found (issue 8). StoreSCP wires it in
with one ``EVT_CONN_OPEN`` handler, :func:`guard_connection`, which swaps each acceptor's DUL
and state machine for the subclasses below before the connection's threads start, and the
C-STORE handler calls :func:`check_dataset` / :func:`inflate`.

**Reading PDUs** (:class:`GuardedDUL`). pynetdicom's ``DULServiceProvider._read_pdu_data``
reads the 6-byte header, then ``recv`` until the declared length has arrived. It does not
allocate the declared length up front, but it keeps whatever arrives for one PDU however
long the PDU says it is (a P-DATA-TF "of 4 GiB" is buffered as long as the peer sends), and
the accepted socket has no timeout (``socket.accept()`` returns a blocking socket; the
listening socket's timeout is not inherited): a peer that declares a length, or sends half
a header, and goes quiet holds the DUL thread in ``recv`` for good, and the association
thread with it (its network-timeout abort waits for the DUL). A connection closed mid-PDU
is logged with a traceback or not at all; one closed without A-RELEASE only at INFO. Here:

* a PDU longer than allowed is refused as soon as its header is read: a P-DATA-TF longer
  than the maximum we advertise (``node.max_pdu``; PS3.8 D.1: the Maximum Length sub-item
  bounds the P-DATA-TF variable field), any other PDU longer than
  :data:`MAX_ASSOCIATION_PDU`, an unknown PDU type; so is a PDU that does not decode
  (the log names the broken item: :func:`explain_pdu`), a P-DATA-TF for a presentation
  context that was not accepted (pynetdicom aborts too, but says so at INFO only) and a
  command set pynetdicom would fail on (:meth:`GuardedDUL._check_pdvs`). Refusing is
  Evt19: the state machine sends A-ABORT (PS3.8 9.2); what the peer still sends is read
  and dropped, never parsed;
* every ``recv`` has the association's network timeout, and a whole PDU must arrive within
  it: a quiet or trickling peer is cut off;
* each of these is one WARNING line on ``cmr_ai.guard`` naming the peer, the PDU and what
  was wrong.

**The state machine** (:class:`GuardedStateMachine`): an event pynetdicom finds invalid in
the current state, or an action that raises, ends the DUL thread with an unhandled
exception; an acceptor whose connection ends before an A-ASSOCIATE-RQ got through (a TCP
probe, a refused request) keeps its association thread waiting ``acse_timeout`` (30 s) in
one of ``maximum_associations`` (10) slots, so a dozen port probes made the node reject real
callers for 30 s. See the class.

**Tracebacks** (:class:`OneLineExceptions`): pynetdicom logs what bad input makes fail inside
it with ``LOGGER.exception``; its records keep the line and lose the traceback.

**Data sets** (:func:`check_dataset`). pydicom reads leniently: an element whose length runs
past the end of the data set is silently cut short, a broken sequence item ends the
sequence early, a data set sent half is read as the half, a data set in explicit VR on an
implicit VR context is read as explicit. The handler would store and acknowledge such an
instance, and the file would say a transfer syntax its bytes are not in. The check walks
the element headers (values skipped, ~0.1 ms for an MR image) and names the element when
the structure is not DICOM (PS3.5 7.1, 7.5); it keeps pydicom's leniency where real files
need it (an item in implicit VR inside explicit VR, odd lengths that leave a consistent
structure). :func:`inflate` bounds a deflated data set: pynetdicom's ``Event.dataset``
inflates with no limit (a few MB of deflate become gigabytes).
"""
from __future__ import annotations

import logging
import queue
import socket
import struct
import time
import zlib
from io import BytesIO
from typing import Optional

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.filereader import read_dataset
from pynetdicom.acse import ACSE
from pynetdicom.dimse_messages import _MESSAGE_TYPES
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE, StateMachine

log = logging.getLogger("cmr_ai.guard")

#: The longest PDU other than P-DATA-TF we read (an A-ASSOCIATE-RQ proposing every storage SOP
#: class in a dozen transfer syntaxes, with user identity, is well under 100 KiB).
MAX_ASSOCIATION_PDU = 1 << 20
#: The default ``node.max_pdu`` (see plugin/config.py): bytes in one P-DATA-TF we accept.
DEFAULT_MAX_PDU = 262144
#: The most a deflated data set may inflate to (Deflated Explicit VR Little Endian, PS3.5 A.5).
MAX_INFLATED = 1 << 28

PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
             5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}
_CHUNK = 1 << 16


class OneLineExceptions(logging.Filter):
    """Keep a pynetdicom log record that carries an exception, drop its traceback.

    pynetdicom logs what a peer's bad input makes fail inside it with ``LOGGER.exception`` (an
    undecodable DIMSE message, a state-machine action that raised …): a traceback for each bad
    PDU, of no use to a site. The record becomes ``ExceptionType: message``, one line; the line
    pynetdicom logs just before it says where. With pynetdicom's DEBUG logging on, tracebacks stay.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            exc = record.exc_info[1]
            msg = record.getMessage()
            if exc is not None:
                msg = f"{type(exc).__name__}: {msg}" if msg == str(exc) else f"{msg} ({type(exc).__name__}: {exc})"
            record.msg, record.args, record.exc_info, record.exc_text = msg, None, None, None
        return True


_ONE_LINE = OneLineExceptions()


def quiet_pynetdicom_tracebacks() -> None:
    """Put :class:`OneLineExceptions` on every pynetdicom logger (a logger's filters see only its own records)."""
    for name in list(logging.Logger.manager.loggerDict):
        if name == "pynetdicom" or name.startswith("pynetdicom."):
            logger = logging.getLogger(name)
            if _ONE_LINE not in logger.filters:
                logger.addFilter(_ONE_LINE)


quiet_pynetdicom_tracebacks()  # pynetdicom's modules, and so their loggers, are all imported by now


def guard_connection(event) -> None:
    """``EVT_CONN_OPEN`` handler: guard the new acceptor's PDU reading (see the module docstring).

    Runs in the connection's thread before the association's threads start. Never raises.
    """
    try:
        dul = event.assoc.dul
        if type(dul) is DULServiceProvider:
            dul.__class__ = GuardedDUL
        if type(dul.state_machine) is StateMachine:
            dul.state_machine.__class__ = GuardedStateMachine
        if type(event.assoc.acse) is ACSE:
            event.assoc.acse.__class__ = GuardedACSE
        timeout = event.assoc.network_timeout
        if timeout is not None and dul.socket is not None and dul.socket.socket is not None:
            dul.socket.socket.settimeout(timeout)
    except Exception as e:  # noqa: BLE001 - a handler never raises; pynetdicom's reading still works
        log.warning("cannot guard the connection from %s: %s: %s", event.address, type(e).__name__, e)


class GuardedACSE(ACSE):
    """pynetdicom's ACSE, made to abort when negotiating a request raises.

    pynetdicom negotiates an A-ASSOCIATE-RQ in the association thread; a request that decodes but
    does not make sense (a presentation context item without an abstract syntax sub-item …)
    raises there, out of the thread: no answer to the peer, and the DUL thread, which only the
    association thread stops, polling in Sta3 for good. Here it is logged and aborted.
    """

    def negotiate_association(self) -> None:
        try:
            super().negotiate_association()
        except Exception as e:  # noqa: BLE001
            log.warning("connection from %s: the A-ASSOCIATE-RQ cannot be negotiated (%s: %s): A-ABORT, connection "
                        "closed", self.assoc.dul._peer(), type(e).__name__, e)
            try:
                self.assoc.abort()
            except Exception:  # noqa: BLE001 - then at least the connection goes
                try:
                    self.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
                except (OSError, AttributeError):
                    pass


#: Events that are the local service user's requests (PS3.8 Table 9-10): they race with what the peer does
_LOCAL_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


class GuardedStateMachine(StateMachine):
    """pynetdicom's DUL state machine, made to survive what a peer can make happen.

    * An event not valid in the current state raises ``InvalidEventError`` in pynetdicom, out of
      the DUL thread (a traceback on stderr, no A-ABORT, the socket left to the garbage
      collector). It happens when our side answers (a C-STORE response, an A-RELEASE-RP: local
      events) just after the peer's bad PDU made the state machine abort (Sta13). Here such an
      event is dropped (logged at DEBUG; WARNING for a network event).
    * An action that raises (pynetdicom logs it, stops the DUL and re-raises, again out of the
      thread) closes the connection instead.
    * An acceptor whose connection ends before an A-ASSOCIATE-RQ got through (a TCP probe, a
      refused or cut-off request) is back in Sta1 while its association thread still waits
      ``acse_timeout`` (30 s) for the request, holding one of ``maximum_associations`` (10):
      a few port probes made the node reject real callers ("local limit exceeded"). Reaching
      Sta1 that way wakes the association thread, which then ends.
    """

    _saw_request = False

    def do_action(self, event: str) -> None:
        if (event, self.current_state) not in TRANSITION_TABLE:
            local = event in _LOCAL_EVENTS
            (log.debug if local else log.warning)(
                "connection from %s: %s in state %s dropped (the association is already ending)",
                self.dul._peer(), event, self.current_state)
            if local:  # the primitive that raised it is still queued: the action would have taken it
                try:
                    self.dul.to_provider_queue.get(False)
                except queue.Empty:
                    pass
            return
        try:
            super().do_action(event)
        except Exception as e:  # noqa: BLE001 - pynetdicom logged it and stopped the DUL
            log.warning("connection from %s: the DICOM upper layer failed on %s in state %s (%s: %s): connection "
                        "closed", self.dul._peer(), event, self.current_state, type(e).__name__, e)
            try:
                self.dul.socket.socket.shutdown(socket.SHUT_RDWR)
                self.dul.socket.socket.close()
            except (OSError, AttributeError):
                pass
            self.dul.kill_dul()
            self._wake()

    def transition(self, state: str) -> None:
        super().transition(state)
        if state == "Sta3":  # the A-ASSOCIATE indication went to the association thread
            self._saw_request = True
        elif state == "Sta1":
            self._wake()

    def _wake(self) -> None:
        if self.dul.assoc.is_acceptor and not self._saw_request:
            self._saw_request = True
            self.dul.to_user_queue.put(None)  # receive_pdu() returns None: "no A-ASSOCIATE-RQ", the thread ends


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL with a bounded, timed, logged PDU reader (installed by :func:`guard_connection`)."""

    _discard = False  # a PDU was refused: drop what the peer still sends until the connection closes

    def _peer(self) -> str:
        req = self.assoc.requestor
        ae = str(req.ae_title or "").strip()
        return f"{req.address}:{req.port}" + (f" ({ae})" if ae else "")

    def _limit(self, pdu_type: int) -> int:
        if pdu_type == 0x04:
            return int(self.assoc.acceptor.maximum_length or 0)  # 0: unlimited (node.max_pdu: 0)
        return MAX_ASSOCIATION_PDU

    def _recv(self, n: int, deadline: Optional[float], buf: bytearray) -> str:
        """Read until ``buf`` holds ``n`` bytes: '' when it does, else 'closed' or 'timeout'."""
        sock = self.socket.socket
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                sock.settimeout(left)
            try:
                chunk = sock.recv(min(n - len(buf), _CHUNK))
            except TimeoutError:
                return "timeout"
            except (OSError, ValueError):  # reset, closed under us, TLS errors
                return "closed"
            if not chunk:
                return "closed"
            buf += chunk
        return ""

    def _read_pdu_data(self) -> None:  # overrides pynetdicom's reader (same events, see the module docstring)
        if self.socket is None or self.socket.socket is None:
            self.event_queue.put("Evt17")
            return
        timeout = self.assoc.network_timeout
        deadline = time.monotonic() + timeout if timeout is not None else None
        try:
            if self._discard:
                self._drop()
                return
            header = bytearray()
            why = self._recv(6, deadline, header)
            if why:
                self._lost(why, header, None, None, timeout)
                return
            pdu_type, _, length = struct.unpack(">BBL", header)
            name = PDU_NAMES.get(pdu_type)
            if name is None:
                self._refuse(f"unknown PDU type 0x{pdu_type:02X} (declared length {length})")
                return
            limit = self._limit(pdu_type)
            if limit and length > limit:
                what = "node.max_pdu, the maximum we advertised" if pdu_type == 0x04 else "the most we read"
                self._refuse(f"{name} PDU of {length} bytes declared, more than {limit} ({what})")
                return
            body = bytearray()
            why = self._recv(length, deadline, body)
            if why:
                self._lost(why, body, name, length, timeout)
                return
            try:
                pdu, event = self._decode_pdu(header + body)
            except Exception as e:  # noqa: BLE001 - a PDU that does not decode: abort, one line
                why = explain_pdu(bytes(header + body)) or f"{type(e).__name__}{': ' if str(e) else ''}{e}"
                self._refuse(f"{name} PDU of {length} bytes does not decode: {why}")
                return
            if pdu_type == 0x04:  # pynetdicom aborts on an unknown context too, but logs it at INFO only
                accepted = {cx.context_id for cx in self.assoc.accepted_contexts}
                unknown = sorted({item.presentation_context_id for item in pdu.presentation_data_value_items}
                                 - accepted)
                if unknown:
                    self._refuse(f"P-DATA-TF for presentation context ID {', '.join(map(str, unknown))}, which "
                                 + (f"was not accepted (accepted: {', '.join(map(str, sorted(accepted)))})"
                                    if accepted else "comes before any association was accepted"))
                    return
                why = self._check_pdvs(pdu)
                if why:
                    self._refuse(why)
                    return
            self.event_queue.put(event)
            self._recv_pdu.put(pdu)
        finally:
            if timeout is not None and self.socket is not None and self.socket.socket is not None:
                try:
                    self.socket.socket.settimeout(timeout)
                except OSError:
                    pass

    _command: Optional[bytearray] = None  # command set fragments of the message being received
    _expect_data = False  # its command set is complete and announced a data set

    def _check_pdvs(self, pdu) -> Optional[str]:
        """Follow pynetdicom's DIMSE message assembly (``DIMSEMessage.decode_msg``) far enough to refuse
        what it would fail on: it decodes each complete command set inside the state machine's
        action, where a missing (0000,0100) CommandField or (0000,0800) CommandDataSetType raises
        out of the DUL thread; a data set fragment with no command set before it fails later, with
        a traceback (PS3.7 6.3.1: a message is a command set, then the data set it announces)."""
        if self._command is None:
            self._command = bytearray()
        for item in pdu.presentation_data_value_items:
            data = item.presentation_data_value or b""
            if not data:
                return "P-DATA-TF with an empty presentation data value (no message control header)"
            control = data[0]
            if control & 1:  # a command fragment
                if self._expect_data:
                    return "a command fragment where the data set announced by the previous command set was due"
                self._command += data[1:]
                if control & 2:  # the last one: pynetdicom decodes the command set now
                    why, has_data = check_command(bytes(self._command))
                    if why:
                        return why
                    self._command.clear()
                    if not has_data:  # the message is complete: pynetdicom ignores the rest of this PDU
                        return None
                    self._expect_data = True
            else:  # a data set fragment
                if not self._expect_data:
                    return "a data set fragment with no command set before it"
                if control & 2:  # the last one completes the message
                    self._expect_data = False
                    return None
        return None

    def _refuse(self, why: str) -> None:
        log.warning("connection from %s: %s: A-ABORT, connection closed", self._peer(), why)
        self._discard = True
        self.event_queue.put("Evt19")  # invalid PDU: the state machine sends A-ABORT (PS3.8 AA-1 / AA-8)

    def _drop(self) -> None:
        try:
            chunk = self.socket.socket.recv(_CHUNK)
        except (OSError, ValueError):
            chunk = b""
        if not chunk:
            self.event_queue.put("Evt17")

    def _lost(self, why: str, got: bytearray, name: Optional[str], length: Optional[int],
              timeout: Optional[float]) -> None:
        """The peer closed, or went quiet, before the whole PDU arrived (or between PDUs)."""
        state = self.state_machine.current_state
        partial = getattr(self.assoc.dimse, "message", None) is not None or name == "P-DATA-TF"
        dropped = "; the DIMSE message it was sending is incomplete: dropped, nothing stored from it" if partial else ""
        if name is None and not got and why == "closed":
            if state == "Sta6":  # association established, no A-RELEASE
                log.warning("connection from %s closed without releasing the association (no A-RELEASE-RQ)%s",
                            self._peer(), dropped)
            else:
                log.debug("connection from %s closed (state %s)", self._peer(), state)
        else:
            what = (f"{len(got)} of {length} bytes of {'an' if name[0] == 'A' else 'a'} {name} PDU" if name
                    else f"{len(got)} of the 6 bytes of a PDU header")
            if why == "timeout":
                log.warning("connection from %s sent %s, then nothing within the network timeout%s: connection "
                            "closed%s", self._peer(), what, f" ({timeout:g} s)" if timeout is not None else "", dropped)
            else:
                log.warning("connection from %s closed after sending %s%s", self._peer(), what, dropped)
        if why == "timeout":  # we end it: the state machine then closes the socket (AA-4 / AA-5)
            try:
                self.socket.socket.shutdown(socket.SHUT_RDWR)
            except (OSError, AttributeError):
                pass
        self.event_queue.put("Evt17")


def check_command(data: bytes) -> tuple[Optional[str], bool]:
    """(what is wrong or None, whether a data set follows) for a complete DIMSE command set (PS3.7 E)."""
    try:
        cs = read_dataset(BytesIO(data), True, True)  # as pynetdicom decodes it: Implicit VR Little Endian
        field = cs.get("CommandField")
        dstype = cs.get("CommandDataSetType")
    except Exception as e:  # noqa: BLE001
        return f"the DIMSE command set does not decode: {type(e).__name__}: {e}", False
    if field is None:
        return "the DIMSE command set has no (0000,0100) CommandField", False
    if not isinstance(field, int) or field not in _MESSAGE_TYPES:
        return f"(0000,0100) CommandField {field!r} in the DIMSE command set names no DIMSE message", False
    if dstype is None:
        return "the DIMSE command set has no (0000,0800) CommandDataSetType", False
    return None, dstype != 0x0101


_ITEMS = {0x10: "application context", 0x20: "presentation context", 0x21: "presentation context",
          0x50: "user information"}
_CONTEXT_ITEMS = {0x30: "abstract syntax", 0x40: "transfer syntax"}
_USER_ITEMS = {0x51: "maximum length", 0x52: "implementation class UID", 0x53: "asynchronous operations window",
               0x54: "SCP/SCU role selection", 0x55: "implementation version name",
               0x56: "SOP class extended negotiation", 0x57: "SOP class common extended negotiation",
               0x58: "user identity", 0x59: "user identity"}
_FIXED = {0x51: 4, 0x53: 4}


def explain_pdu(data: bytes) -> Optional[str]:
    """What breaks the item structure of an A-ASSOCIATE-RQ/-AC or P-DATA-TF PDU (PS3.8 9.3), or None.

    Used to name the item when pynetdicom cannot decode a PDU (its own messages are often an empty
    ``AssertionError``). Offsets count from the first byte of the PDU.
    """
    if data[0] in (0x01, 0x02):
        if len(data) < 74:
            return f"{len(data) - 6} bytes, fewer than the 68 fixed bytes before the items"
        return _walk_items(data, 74, len(data), _ITEMS, "the PDU")
    if data[0] == 0x04:
        pos = 6
        while pos < len(data):
            if len(data) - pos < 6:
                return f"{len(data) - pos} stray byte(s) at offset {pos}, too few for a PDV item"
            n = struct.unpack_from(">L", data, pos)[0]
            if n < 2:
                return f"PDV item at offset {pos}: length {n}, shorter than its 2 fixed bytes"
            if pos + 4 + n > len(data):
                return f"PDV item at offset {pos}: length {n} runs past the end of the PDU ({len(data) - pos - 4} " \
                       "bytes left)"
            pos += 4 + n
    return None


def _walk_items(data: bytes, pos: int, end: int, names: dict[int, str], where: str) -> Optional[str]:
    while pos < end:
        if end - pos < 4:
            return f"{end - pos} stray byte(s) at offset {pos} in {where}"
        t, _, n = struct.unpack_from(">BBH", data, pos)
        label = names.get(t)
        if label is None:
            return f"item type 0x{t:02X} at offset {pos} is not allowed in {where}"
        if pos + 4 + n > end:
            return f"{label} item (0x{t:02X}) at offset {pos}: length {n} runs past the end of {where} " \
                   f"({end - pos - 4} bytes left)"
        why = None
        if t in (0x20, 0x21):
            if n < 4:
                return f"{label} item (0x{t:02X}) at offset {pos}: length {n}, shorter than its 4 fixed bytes"
            why = _walk_items(data, pos + 8, pos + 4 + n, _CONTEXT_ITEMS, f"the {label} item at offset {pos}")
        elif t == 0x50:
            why = _walk_items(data, pos + 4, pos + 4 + n, _USER_ITEMS, f"the {label} item at offset {pos}")
        elif t in _FIXED and n != _FIXED[t]:
            return f"{label} item (0x{t:02X}) at offset {pos}: length {n}, not {_FIXED[t]}"
        if why:
            return why
        pos += 4 + n
    return None


# --------------------------------------------------------------------------- data set structure

class BrokenDataSet(ValueError):
    """The received data set is not a DICOM data set; the message names the element and the offset."""


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
#: PS3.5 6.2. Readers disagree on an unknown VR's length field (pydicom: 2 bytes, dcmtk: 4), so it is refused.
_VRS = _LONG_VRS | frozenset(vr.encode() for vr in
                             "AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 64  # sequences nested deeper than this are not something a modality sends


def tag_name(tag: int) -> str:
    kw = keyword_for_tag(tag) if tag >> 16 != 0xFFFE else ""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" + (f" {kw}" if kw else "")


def _dictionary_vr(tag: int) -> Optional[str]:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _looks_explicit(buf: memoryview, pos: int, end: int) -> bool:
    return end - pos >= 6 and 0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B


class _Walker:
    def __init__(self, buf: memoryview, little_endian: bool):
        self.buf = buf
        e = "<" if little_endian else ">"
        self.tag_len = struct.Struct(e + "HHL").unpack_from
        self.tag_vr_len = struct.Struct(e + "HH2sH").unpack_from
        self.ul = struct.Struct(e + "L").unpack_from

    def dataset(self, pos: int, end: int, implicit: bool, undefined: bool, depth: int, where: str) -> int:
        """Walk the elements of one data set (or item) from ``pos``; return where it ends."""
        buf = self.buf
        if depth > MAX_DEPTH:
            raise BrokenDataSet(f"sequences nested deeper than {MAX_DEPTH} levels at offset 0x{pos:X}")
        if depth and pos < end and not implicit and not _looks_explicit(buf, pos, end):
            implicit = True  # as pydicom: an item in implicit VR inside explicit VR (PS3.5 6.2.2, real files)
        seen: set[int] = set()
        prev: Optional[tuple[int, int]] = None
        while True:
            if pos >= end:
                if undefined:
                    raise BrokenDataSet(f"{where}: no item delimitation item (FFFE,E00D) before the end")
                return pos
            try:
                if end - pos < 8:
                    raise BrokenDataSet(f"{end - pos} stray byte(s) at offset 0x{pos:X}, at the end of {where}")
                if implicit:
                    group, elem, length = self.tag_len(buf, pos)
                    vr = None
                    hdr = 8
                else:
                    group, elem, vr, length = self.tag_vr_len(buf, pos)
                    hdr = 8
                tag = group << 16 | elem
                if tag == _ITEM_END:
                    if undefined:
                        return pos + 8
                    raise BrokenDataSet(f"an item delimitation item (FFFE,E00D) at offset 0x{pos:X} in {where}, "
                                        "which has a defined length")
                if group == 0xFFFE:
                    raise BrokenDataSet(f"{tag_name(tag)} at offset 0x{pos:X} in {where}, where a data element "
                                        "was expected")
                if vr is not None:
                    if vr not in _VRS:
                        raise BrokenDataSet(f"{tag_name(tag)} at offset 0x{pos:X}: {bytes(vr)!r} is not a VR "
                                            "(PS3.5 6.2)")
                    if vr in _LONG_VRS:
                        if end - pos < 12:
                            raise BrokenDataSet(f"{tag_name(tag)} at offset 0x{pos:X}: header cut off at the end "
                                                f"of {where}")
                        length = self.ul(buf, pos + 8)[0]
                        hdr = 12
                if tag in seen:
                    raise BrokenDataSet(f"{tag_name(tag)} at offset 0x{pos:X} occurs twice in {where}")
                seen.add(tag)
                start = pos + hdr
                if vr is not None:
                    sq = vr == b"SQ"
                else:
                    dvr = _dictionary_vr(tag)
                    sq = dvr == "SQ"
                if length == _UNDEFINED:
                    if vr is None and dvr is None:  # implicit VR, unknown tag: a sequence shows itself by its item
                        sq = end - start >= 8 and self.tag_len(buf, start)[:2] == (0xFFFE, 0xE000)
                    if sq or vr == b"UN":  # UN of undefined length is an implicit VR sequence (PS3.5 6.2.2)
                        pos = self.sequence(start, end, implicit or vr == b"UN", True, depth + 1, tag)
                    elif vr in (None, b"OB", b"OW"):  # encapsulated pixel data: fragments (PS3.5 A.4)
                        pos = self.sequence(start, end, implicit, True, depth + 1, tag, fragments=True)
                    else:
                        raise BrokenDataSet(f"{tag_name(tag)} at offset 0x{pos:X}: undefined length on a "
                                            f"{vr.decode('latin-1')} element")
                else:
                    if start + length > end:
                        raise BrokenDataSet(f"{tag_name(tag)} at offset 0x{pos:X}: length {length} runs past the "
                                            f"end of {where} ({end - start} bytes left)")
                    if sq:
                        self.sequence(start, start + length, implicit, False, depth + 1, tag)
                    pos = start + length
            except BrokenDataSet as e:
                if prev is not None and prev[1] % 2:
                    raise BrokenDataSet(f"{e}; the element before it, {tag_name(prev[0])}, has an odd length "
                                        f"({prev[1]})") from None
                raise
            prev = (tag, length)

    def sequence(self, pos: int, end: int, implicit: bool, undefined: bool, depth: int, tag: int,
                 fragments: bool = False) -> int:
        """Walk the items of a sequence (or the fragments of encapsulated pixel data)."""
        buf, name = self.buf, tag_name(tag)
        n = 0
        while True:
            if pos >= end:
                if undefined:
                    raise BrokenDataSet(f"{name}: no sequence delimitation item (FFFE,E0DD) before the end")
                return pos
            if end - pos < 8:
                raise BrokenDataSet(f"{name}: {end - pos} stray byte(s) at offset 0x{pos:X} where item {n + 1} "
                                    "should start")
            group, elem, length = self.tag_len(buf, pos)
            item = group << 16 | elem
            if item == _SEQ_END:
                if undefined:
                    return pos + 8
                raise BrokenDataSet(f"{name}: a sequence delimitation item at offset 0x{pos:X} in a sequence of "
                                    "defined length")
            n += 1
            if item != _ITEM:
                raise BrokenDataSet(f"{name}: item {n} at offset 0x{pos:X} has tag {tag_name(item)}, not "
                                    "(FFFE,E000)")
            where = f"item {n} of {name}"
            if length == _UNDEFINED:
                if fragments:
                    raise BrokenDataSet(f"{name}: fragment {n} at offset 0x{pos:X} has an undefined length")
                pos = self.dataset(pos + 8, end, implicit, True, depth, where)
            else:
                if pos + 8 + length > end:
                    raise BrokenDataSet(f"{name}: item {n} at offset 0x{pos:X}: length {length} runs past the end "
                                        f"of the sequence ({end - pos - 8} bytes left)")
                if not fragments:
                    self.dataset(pos + 8, pos + 8 + length, implicit, False, depth, where)
                pos += 8 + length


def check_dataset(data: bytes | bytearray | memoryview, implicit_vr: bool, little_endian: bool) -> None:
    """Check that ``data`` is a DICOM data set structurally (PS3.5 7.1 and 7.5): every element's
    length within its data set, item or sequence, every item an item, every undefined length
    closed by its delimiter, no element twice.

    Raises
    ------
    BrokenDataSet
        Naming the element (tag and keyword), its offset and what is wrong.
    """
    buf = memoryview(data)
    if not len(buf):
        raise BrokenDataSet("the data set is empty")
    walker = _Walker(buf, little_endian)
    try:
        walker.dataset(0, len(buf), implicit_vr, False, 0, "the data set")
    except BrokenDataSet as first:
        # pydicom would read it in the other VR encoding; we store it under the negotiated transfer syntax,
        # where it would be misread: name the mismatch when that is what it is
        try:
            walker.dataset(0, len(buf), not implicit_vr, False, 0, "the data set")
        except BrokenDataSet:
            raise first from None
        else:
            raise BrokenDataSet(f"the data set is encoded in {'explicit' if implicit_vr else 'implicit'} VR, not as "
                                "the presentation context's transfer syntax says") from None


def inflate(data: bytes | bytearray | memoryview, limit: Optional[int] = None) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian data set (PS3.5 A.5), at most ``limit`` bytes
    (default :data:`MAX_INFLATED`).

    Raises
    ------
    BrokenDataSet
        When the deflate stream is broken or truncated, or inflates to more than ``limit`` bytes.
    """
    limit = MAX_INFLATED if limit is None else limit
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(bytes(data), limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise BrokenDataSet(f"the deflated data set ({len(data)} bytes) inflates to more than {limit} bytes")
        out += d.flush()
    except zlib.error as e:
        raise BrokenDataSet(f"the deflated data set does not inflate: {e}") from None
    if not d.eof:
        raise BrokenDataSet("the deflated data set is cut short (no end of the deflate stream)")
    return out
