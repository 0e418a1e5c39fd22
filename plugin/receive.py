"""Accept one received instance: check it, store it durably, index it — whatever carried it.

C-STORE (:mod:`plugin.dimse.scp`), STOW-RS into the node (:mod:`plugin.dicomweb.receiver`)
and WADO-RS pulls from an archive (:mod:`plugin.dicomweb.pull`) all end here, so an
instance is acknowledged on the same terms however it came: its data set structure
checked (:func:`plugin.dimse.guard.check_dataset`), its UIDs checked before they name
a path, written with fsync + rename + directory fsync, its index row committed (group
commit, :class:`plugin.ingest.Indexer`), and only then "stored". Every refusal is a
status (the DIMSE status, or the STOW-RS FailureReason, which uses the same codes), one
log line naming the element, and nothing written.

:func:`accept_part10` takes a DICOM file as DICOMweb carries it (PS3.10: preamble,
``DICM``, File Meta Information); the data set after the File Meta is stored exactly
as received, behind a File Meta header built by :func:`plugin.storage.part10_header`.
"""
from __future__ import annotations

import errno
import io
import logging
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from plugin.dimse.guard import BrokenDataSet, check_dataset, inflate
from plugin.ingest import Indexer, IndexRequest
from plugin.storage import BadUID, InstanceStore, check_uid, part10_header

log = logging.getLogger("cmr_ai.scp")

# Statuses (PS3.4 Table B.2-1, PS3.7 Annex C); STOW-RS FailureReason (0008,1197) uses the same codes
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class (or the UIDs it was announced with)
CANNOT_UNDERSTAND = 0xC210  # Error: Cannot understand (unparseable data sets, bad UIDs)
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122

#: Implementation Class UID / Version Name of the File Meta the node writes (the DIMSE stack's; also
#: for DICOMweb files whose File Meta names none that is valid)
DEFAULT_IMPLEMENTATION = (str(PYNETDICOM_IMPLEMENTATION_UID), PYNETDICOM_IMPLEMENTATION_VERSION)

#: attributes read from each instance for the index (and their length limits)
_INFO = (("PatientID", 64), ("StudyDescription", 256), ("AccessionNumber", 64), ("Modality", 16),
         ("SeriesDescription", 256))


@dataclass(frozen=True)
class Received:
    """What was stored and indexed (passed to ``on_stored`` listeners)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    path: str


@dataclass(frozen=True)
class Outcome:
    """The answer for one instance.

    ``status`` is SUCCESS or the failure code; ``reason`` the text of the log line
    (without its ``"<via> <uid> from <peer>"`` prefix); ``duplicate`` says what happened to
    a SOP Instance UID received before (``identical``, ``replaced``, ``kept``; None when new).
    """

    status: int
    reason: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    received: Optional[Received] = None
    duplicate: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


@dataclass(frozen=True)
class Origin:
    """Who sent it, for the log and for routing (``calling_ae``, ``source_ip`` conditions)."""

    via: str  # "C-STORE", "STOW-RS", "WADO-RS"
    peer: str  # for the log: "AE@address", "address", the source name …
    calling_ae: str = ""
    address: str = ""


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    v = ds.get(keyword, "")
    return ("" if v is None else str(v))[:limit]


def _refuse(origin: Origin, sop_uid: str, status: int, reason: str, sop_class: str = "") -> Outcome:
    who = f"{origin.via} {sop_uid} from {origin.peer}" if sop_uid else f"{origin.via} from {origin.peer}"
    log.error("%s refused (0x%04X): %s", who, status, reason)
    return Outcome(status, reason, sop_class, sop_uid)


class _ViewReader(io.RawIOBase):
    """A read-only file over a buffer without copying it (``io.BytesIO`` copies its initial value:
    a whole enhanced multi-frame object, to read a few header elements)."""

    def __init__(self, view: bytes | memoryview):
        super().__init__()
        self._view, self._pos = memoryview(view), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(len(self._view), self._pos + n)
        out = bytes(self._view[self._pos:end])
        self._pos = max(self._pos, end)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _header(body: bytes | memoryview, implicit: bool, little: bool) -> Dataset:
    """The attributes up to group 0020 of a data set (pixel data and the rest not parsed)."""
    return read_dataset(_ViewReader(body), implicit, little, stop_when=lambda tag, vr, length: tag > 0x0020FFFF)


def accept(store: InstanceStore, indexer: Indexer, origin: Origin, *, sop_class: str, sop_uid: str,
           transfer_syntax: str, body: bytes | memoryview, dataset: Optional[Callable[[], Dataset]] = None,
           implementation: tuple[str, str] = DEFAULT_IMPLEMENTATION,
           announced: tuple[str, str] = ("(0000,1000) AffectedSOPInstanceUID", "(0000,0002) AffectedSOPClassUID"),
           on_stored: Optional[Callable[[Received], None]] = None, study: Optional[str] = None) -> Outcome:
    """Check, store and index one data set; never raises.

    Parameters
    ----------
    sop_class, sop_uid:
        The SOP Class / Instance UIDs the instance was announced with (C-STORE command,
        File Meta), already checked with :func:`plugin.storage.check_uid`; ``announced``
        names them for the messages. The data set's own must be the same.
    transfer_syntax:
        The UID the bytes of ``body`` are encoded in.
    body:
        The data set as received (no File Meta).
    dataset:
        Returns the data set decoded from ``body`` (pynetdicom's ``event.dataset``), called
        after the structure check; None: read here.
    implementation:
        Implementation Class UID and Version Name for the stored file's File Meta.
    study:
        The Study Instance UID the instance was sent to (STOW-RS ``/studies/{study}``), if
        any: an instance of another study is refused (0xA900) and not stored.
    """
    ts = UID(transfer_syntax)
    try:
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    except ValueError:  # a private transfer syntax pydicom does not know: we cannot read it
        return _refuse(origin, sop_uid, CANNOT_UNDERSTAND, f"(0002,0010) TransferSyntaxUID {ts} is not a transfer "
                       "syntax this node can read", sop_class)
    try:  # pydicom reads a broken structure leniently (cut short, items lost): check it first
        plain = inflate(body) if ts.is_deflated else body
        check_dataset(plain, implicit, little)
    except BrokenDataSet as e:
        return _refuse(origin, sop_uid, CANNOT_UNDERSTAND, f"not a DICOM data set in {ts.name}: {e}", sop_class)
    except Exception as e:  # noqa: BLE001 - never raise
        return _refuse(origin, sop_uid, CANNOT_UNDERSTAND, f"cannot read the data set: {type(e).__name__}: {e}",
                       sop_class)
    keyword = "the data set"
    try:
        ds = dataset() if dataset is not None else _header(plain, implicit, little)
        keyword = "(0020,000D) StudyInstanceUID"
        study_uid = check_uid(ds.get("StudyInstanceUID"), keyword)
        keyword = "(0020,000E) SeriesInstanceUID"
        series_uid = check_uid(ds.get("SeriesInstanceUID"), keyword)
        keyword = "(0008,0018) SOPInstanceUID"
        ds_sop = check_uid(ds.get("SOPInstanceUID"), keyword)
        keyword = "(0008,0016) SOPClassUID"
        ds_class = check_uid(ds.get("SOPClassUID"), keyword)
        keyword = "study/series attributes"
        info = {k: _text(ds, k, n) for k, n in _INFO}
        sn = ds.get("SeriesNumber")
        series_number = int(sn) if sn not in (None, "") else None
    except BadUID as e:
        return _refuse(origin, sop_uid, CANNOT_UNDERSTAND, str(e), sop_class)
    except Exception as e:  # broken tags / lengths surface on access
        return _refuse(origin, sop_uid, CANNOT_UNDERSTAND, f"cannot decode {keyword}: {type(e).__name__}: {e}",
                       sop_class)
    if ds_sop != sop_uid:
        out = _refuse(origin, "", DATASET_MISMATCH, f"(0008,0018) SOPInstanceUID {ds_sop} in the dataset differs "
                      f"from {announced[0]} {sop_uid}", sop_class)
        return Outcome(out.status, out.reason, sop_class, sop_uid)
    if ds_class != sop_class:
        return _refuse(origin, sop_uid, DATASET_MISMATCH, f"(0008,0016) SOPClassUID {ds_class} in the dataset "
                       f"differs from {announced[1]} {sop_class}", sop_class)
    if study is not None and study_uid != study:
        return _refuse(origin, sop_uid, DATASET_MISMATCH, f"(0020,000D) StudyInstanceUID {study_uid} in the dataset "
                       f"differs from the study {study} it was sent to", sop_class)
    try:
        # the dataset exactly as received, behind a File Meta header built by hand
        data = part10_header(sop_class, sop_uid, str(ts), *implementation) + body
        path, outcome = store.store_instance(study_uid, series_uid, sop_uid, data)
    except OSError as e:
        return _refuse(origin, sop_uid, OUT_OF_RESOURCES, f"cannot write to the store: {e}"
                       + (" (disk full)" if e.errno == errno.ENOSPC else ""), sop_class)
    except Exception as e:  # encoding problems with the received bytes
        return _refuse(origin, sop_uid, CANNOT_UNDERSTAND, f"{type(e).__name__}: {e}", sop_class)
    if outcome != "new":
        log.warning("%s %s from %s: SOP Instance UID received again%s", origin.via, sop_uid, origin.peer, {
            "identical": " with identical content: nothing rewritten",
            "replaced": " with different content: the stored copy was replaced (storage.duplicates: replace)",
            "kept": " with different content: the first copy was kept (storage.duplicates: keep)"}[outcome])
    try:
        indexer.index(IndexRequest(study_uid, series_uid, sop_uid, sop_class, str(ts), str(path), len(data), info,
                                   series_number, origin.calling_ae, origin.address,
                                   file_changed=outcome in ("new", "replaced"), is_new=outcome == "new"))
    except Exception as e:  # noqa: BLE001 — SQLAlchemyError, a timeout …: nothing acknowledged
        log.error("%s %s from %s failed (0x%04X): cannot index in the database: %s", origin.via, sop_uid,
                  origin.peer, OUT_OF_RESOURCES, e)
        return Outcome(OUT_OF_RESOURCES, f"cannot index in the database: {e}", sop_class, sop_uid)
    received = Received(study_uid, series_uid, sop_uid, str(path))
    if on_stored:
        try:
            on_stored(received)
        except Exception:  # listeners must not break the store
            log.exception("on_stored listener failed")
    return Outcome(SUCCESS, "", sop_class, sop_uid, received, None if outcome == "new" else outcome)


# ---------------------------------------------------------------------------
# PS3.10 files (DICOMweb)

class NotPart10(ValueError):
    """Bytes that are not a DICOM file with File Meta Information; the message says why."""


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def read_file_meta(data: bytes | memoryview) -> tuple[dict[int, bytes], int]:
    """The File Meta elements (group 0002, Explicit VR Little Endian) and the data set's offset.

    Read element by element, without trusting (0002,0000) group length (some writers
    get it wrong). A File Meta without the preamble and ``DICM`` (what pydicom's ``dcmwrite``
    writes for a data set built in memory, and so what dicomweb-client sends for it) is read
    as well.

    Raises
    ------
    NotPart10
        No ``DICM`` at byte 128 nor a File Meta element at byte 0, or a File Meta element
        running past the end.
    """
    view = memoryview(data)
    if len(view) >= 132 and bytes(view[128:132]) == b"DICM":
        pos = 132
    elif len(view) >= 8 and bytes(view[:2]) == b"\x02\x00" and bytes(view[4:6]).isalpha() \
            and bytes(view[4:6]).isupper():
        pos = 0  # File Meta Information without the preamble and prefix
    else:
        raise NotPart10("not a DICOM file: no DICM prefix at byte 128 (PS3.10 File Meta Information)")
    elements = {}
    while pos + 8 <= len(view):
        group, elem = struct.unpack_from("<HH", view, pos)
        if group != 0x0002:
            break
        vr = bytes(view[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if pos + 12 > len(view):
                raise NotPart10(f"File Meta element (0002,{elem:04X}) is cut short at byte {pos}")
            length, head = struct.unpack_from("<I", view, pos + 8)[0], 12
        else:
            length, head = struct.unpack_from("<H", view, pos + 6)[0], 8
        end = pos + head + length
        if end > len(view):
            raise NotPart10(f"File Meta element (0002,{elem:04X}) runs past the end of the file ({length} bytes "
                            f"at byte {pos})")
        elements[(group << 16) | elem] = bytes(view[pos + head:end])
        pos = end
    return elements, pos


def _meta_text(elements: dict[int, bytes], tag: int) -> str:
    return elements.get(tag, b"").decode("ascii", "replace").strip(" \x00")


def accept_part10(store: InstanceStore, indexer: Indexer, origin: Origin, data: bytes | bytearray | memoryview,
                  on_stored: Optional[Callable[[Received], None]] = None, *, study: Optional[str] = None) -> Outcome:
    """:func:`accept` for a DICOM file (PS3.10) as DICOMweb carries it; never raises.

    The File Meta names the SOP Class and Instance (which the data set must repeat) and
    the transfer syntax; the data set after it is stored as received. ``study``: the
    Study Instance UID the instance must belong to (see :func:`accept`).
    """
    try:
        elements, offset = read_file_meta(data)
    except NotPart10 as e:
        return _refuse(origin, "", CANNOT_UNDERSTAND, str(e))
    try:
        keyword = "(0002,0003) MediaStorageSOPInstanceUID"
        sop_uid = check_uid(_meta_text(elements, 0x00020003), keyword)
        keyword = "(0002,0002) MediaStorageSOPClassUID"
        sop_class = check_uid(_meta_text(elements, 0x00020002), keyword)
        keyword = "(0002,0010) TransferSyntaxUID"
        ts = check_uid(_meta_text(elements, 0x00020010), keyword)
    except BadUID as e:
        return _refuse(origin, "", CANNOT_UNDERSTAND, str(e))
    impl_uid = _meta_text(elements, 0x00020012)
    impl_version = _meta_text(elements, 0x00020013)
    try:
        implementation = (check_uid(impl_uid, "implementation"), impl_version[:16])
    except BadUID:
        implementation = DEFAULT_IMPLEMENTATION
    return accept(store, indexer, origin, sop_class=sop_class, sop_uid=sop_uid, transfer_syntax=ts,
                  body=memoryview(data)[offset:], implementation=implementation,
                  announced=("(0002,0003) MediaStorageSOPInstanceUID", "(0002,0002) MediaStorageSOPClassUID"),
                  on_stored=on_stored, study=study)
