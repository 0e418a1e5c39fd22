"""Exporters: the transport side of the outbox (``plugin.outbox`` keeps the rows).

Destinations sit behind one Protocol, ``Exporter.send(datasets) -> [StoreOutcome]``,
with a DIMSE (C-STORE SCU, :mod:`plugin.dimse.scu`), a DICOMweb (STOW-RS,
:mod:`plugin.dicomweb.stow`) and a folder implementation, so the flow code never
cares which transport a destination uses (STYLE.md §5, after mercure's target types).

The contract every exporter keeps:

- ``send`` returns one :class:`StoreOutcome` per dataset, in order, with the SOP
  Instance UID the outbox row knows it by;
- a failure of one instance is an outcome (``ok=False``), never an exception;
- a warning (C-STORE 0x0001/0xBxxx, STOW-RS 202 or a WarningReason) is delivered
  (``ok=True``) *and* ``warning=True``: the outbox records and logs it;
- ``code`` is the peer's status in short (``0xB000``, ``HTTP 409 0x0110``), for the row;
- a failure of the whole send (peer unreachable, association rejected, HTTP 5xx) is
  an :class:`ExportError` whose ``retryable`` tells the outbox whether to back off
  and try again or to dead-letter the rows.

This module holds the shared vocabulary (``ExportError``, ``StoreOutcome``, DICOM
status wording); the transport modules import it from here, never the other way
round, so there is no import cycle.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, UID)

from plugin.config import DicomwebTarget, DimseTarget, Destination
from plugin.storage import check_uid, write_atomic

__all__ = ["DicomwebExporter", "DimseExporter", "ExportError", "Exporter", "FolderExporter",
           "StoreOutcome", "dataset_bytes", "describe_status", "exporter_for", "is_success", "is_warning",
           "part10", "retryable_status"]


class ExportError(Exception):
    """The whole send failed; ``retryable`` says whether trying again later may help.

    Parameters
    ----------
    message:
        What failed, naming the peer (``association with PACS@10.0.0.5:104 rejected …``).
    retryable:
        True for conditions that may clear on their own (peer down, timeout, HTTP
        5xx/429, out of resources); False when the same request will fail again
        (HTTP 4xx, malformed data).
    code:
        The peer's status in short, for the outbox row: ``HTTP 503``, ``no association``,
        ``association aborted``, ``0x0122`` (an N-ACTION status) …
    """

    def __init__(self, message: str, retryable: bool, code: str = ""):
        super().__init__(message)
        self.retryable = retryable
        self.code = code

    def __reduce__(self):  # keep ``retryable`` and ``code`` across pickling (Celery results)
        return (type(self), (str(self), self.retryable, self.code))


@dataclass(frozen=True)
class StoreOutcome:
    """What became of one instance.

    ``status`` is human-readable and starts with the DICOM status where there is
    one: ``"0x0000 Success"``, ``"0xA700 Failure: Refused: Out of Resources"``,
    ``"STOW-RS failure reason 0x0110 Failure: Processing Failure"``, ``"written /out/1.2/1.2.3.dcm"``.
    ``code`` is the same in short (``"0x0000"``, ``"0xB007"``, ``"HTTP 409 0x0110"``,
    ``"written"``); ``warning`` marks a delivered instance the peer warned about
    (C-STORE 0x0001 / 0xBxxx, STOW-RS 202 or a WarningReason).
    """

    sop_instance_uid: str
    ok: bool
    status: str
    retryable: bool = False
    code: str = ""
    warning: bool = False


@runtime_checkable
class Exporter(Protocol):
    """A destination's transport. ``name`` is the destination's name in the config."""

    name: str

    def send(self, datasets: list[Dataset]) -> list[StoreOutcome]:
        """Send the datasets; one outcome per dataset, in order.

        Raises
        ------
        ExportError
            When nothing could be sent (the peer is unreachable or refused the request).
        """
        ...


# ---------------------------------------------------------------------------
# DICOM status vocabulary (PS3.4 Annex B.2.3 C-STORE statuses, PS3.18 §10.5.3 STOW-RS)

# STOW-RS failure reasons whose PS3.18 wording differs from the C-STORE one.
_STOW_ONLY = {0xC122: "Referenced Transfer Syntax not supported"}


def describe_status(code: int) -> str:
    """``0xA700 Failure: Refused: Out of Resources`` — the code in hex with its meaning."""
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

    if code == 0:
        return "0x0000 Success"
    category = code_to_category(code)
    meaning = _STOW_ONLY.get(code) or (STORAGE_SERVICE_CLASS_STATUS.get(code)
                                       or GENERAL_STATUS.get(code) or ("", ""))[1]
    return f"0x{code:04X} {category}" + (f": {meaning}" if meaning else "")


def retryable_status(code: int) -> bool:
    """True for statuses a later attempt may clear: 0xA7xx Refused: Out of Resources.

    Everything else that fails (0xA9xx data set does not match SOP class, 0xCxxx
    cannot understand, 0x0110 processing failure, 0x0122 SOP class not supported,
    0x0124 not authorised) would fail the same way again.
    """
    return (code & 0xFF00) == 0xA700


def is_success(code: int) -> bool:
    """Success (0x0000) and the C-STORE warnings (0x0001, 0xB000-0xBFFF) mean "stored"."""
    from pynetdicom.status import code_to_category

    return code_to_category(code) in ("Success", "Warning")


def is_warning(code: int) -> bool:
    """The warnings (0x0001, 0x0107, 0x0116, 0xB000-0xBFFF): stored, but not quite as sent.

    C-STORE 0xB000 coercion of data elements, 0xB006 elements discarded, 0xB007 data
    set does not match SOP class (PS3.4 Table B.2-1): the PACS kept the instance, the
    outbox records the warning on the row and logs it.
    """
    from pynetdicom.status import code_to_category

    return code_to_category(code) == "Warning"


# ---------------------------------------------------------------------------
# encoding

def part10(ds: Dataset) -> Dataset:
    """A shallow copy of ``ds`` that can be written as a PS3.10 file.

    The copy shares the data elements with ``ds`` (nothing large is copied) but has
    its own preamble and complete File Meta Information: the transfer syntax of
    ``ds.file_meta`` when there is one (a file keeps its transfer syntax), else
    Explicit VR Little Endian for a dataset built in memory (Implicit VR Little
    Endian for one read from a raw implicit-VR stream). ``ds`` itself is not changed.

    Raises
    ------
    ValueError
        When (0008,0016) SOPClassUID or (0008,0018) SOPInstanceUID is missing.
    """
    missing = [f"{tag} {kw}" for tag, kw in (("(0008,0016)", "SOPClassUID"), ("(0008,0018)", "SOPInstanceUID"))
               if not str(ds.get(kw, "") or "").strip()]
    if missing:
        raise ValueError(f"{' and '.join(missing)} missing: cannot send an instance without it")
    meta = FileMetaDataset()
    old = getattr(ds, "file_meta", None)
    if old is not None:
        for elem in old:
            meta.add(elem)
    ts = meta.get("TransferSyntaxUID")
    if not ts:
        implicit, little = getattr(ds, "original_encoding", (None, None))
        ts = ImplicitVRLittleEndian if (implicit and little) else ExplicitVRLittleEndian
    meta.TransferSyntaxUID = UID(str(ts))
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "ImplementationClassUID" not in meta:
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out = Dataset(ds)  # a new Dataset over the same elements
    out.file_meta = meta
    out.preamble = b"\x00" * 128
    return out


def dataset_bytes(ds: Dataset) -> bytes:
    """``ds`` encoded as a PS3.10 file (preamble, "DICM", file meta, data set)."""
    buf = io.BytesIO()
    part10(ds).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# the three transports

class DimseExporter:
    """C-STORE SCU to a DIMSE peer (:func:`plugin.dimse.scu.store`), one association per send."""

    def __init__(self, name: str, target: DimseTarget, calling_ae: str):
        self.name, self.target = name, target
        self.calling_ae = target.calling_ae_title or calling_ae

    def send(self, datasets: list[Dataset]) -> list[StoreOutcome]:
        from plugin.dimse.scu import store

        return store(self.target, datasets, calling_ae=self.calling_ae)

    def __repr__(self) -> str:
        t = self.target
        return f"DimseExporter({self.name!r}, {self.calling_ae} -> {t.ae_title}@{t.host}:{t.port})"


class DicomwebExporter:
    """STOW-RS to a DICOMweb origin server (:func:`plugin.dicomweb.stow.store`), one request per send."""

    def __init__(self, name: str, target: DicomwebTarget):
        self.name, self.target = name, target

    def send(self, datasets: list[Dataset]) -> list[StoreOutcome]:
        from plugin.dicomweb.stow import store

        return store(self.target, datasets)

    def __repr__(self) -> str:
        return f"DicomwebExporter({self.name!r}, {self.target.url})"


class FolderExporter:
    """Writes ``<folder>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` atomically.

    Each file is written to a temp file in the same directory, fsynced and renamed
    (:func:`plugin.storage.write_atomic`), so a reader of the folder never sees a
    partial file. Both UIDs are checked against the PS3.5 §9.1 syntax before a path
    is built from them, so no UID can escape the folder.
    """

    def __init__(self, name: str, folder: str | Path):
        self.name, self.folder = name, Path(folder).expanduser()

    def path_for(self, ds: Dataset) -> Path:
        """Where ``ds`` goes. Raises :class:`plugin.storage.BadUID` (a ValueError) on a bad UID."""
        study = check_uid(ds.get("StudyInstanceUID"), "(0020,000D) StudyInstanceUID")
        sop = check_uid(ds.get("SOPInstanceUID"), "(0008,0018) SOPInstanceUID")
        return self.folder / study / f"{sop}.dcm"

    def send(self, datasets: list[Dataset]) -> list[StoreOutcome]:
        out = []
        for ds in datasets:
            uid = str(ds.get("SOPInstanceUID", "") or "")
            try:
                path = self.path_for(ds)
                write_atomic(path, dataset_bytes(ds))
                out.append(StoreOutcome(uid, True, f"written {path}", code="written"))
            except OSError as e:  # disk full, permissions, a vanished mount: may clear
                out.append(StoreOutcome(uid, False, f"cannot write to {self.folder}: {e}", retryable=True,
                                        code=f"OSError {e.errno}" if e.errno else "OSError"))
            except Exception as e:  # BadUID, encoding errors: the same data fails again
                out.append(StoreOutcome(uid, False, f"not written: {e}", retryable=False, code="not written"))
        return out

    def __repr__(self) -> str:
        return f"FolderExporter({self.name!r}, {str(self.folder)!r})"


def exporter_for(name: str, dest: Destination, *, calling_ae: str) -> Exporter:
    """The exporter for a configured destination.

    Parameters
    ----------
    name:
        The destination's key in ``destinations:`` (used in logs and outbox rows).
    dest:
        The destination; exactly one of ``dimse``, ``dicomweb``, ``folder`` is set.
    calling_ae:
        Our AE title for DIMSE, unless the destination sets ``calling_ae_title``.
    """
    if dest.dimse is not None:
        return DimseExporter(name, dest.dimse, calling_ae)
    if dest.dicomweb is not None:
        return DicomwebExporter(name, dest.dicomweb)
    if dest.folder is not None:
        return FolderExporter(name, dest.folder)
    raise ValueError(f"destination {name!r} has no transport (dimse, dicomweb or folder)")
