"""C-STORE, C-ECHO and Storage Commitment SCU (PS3.4 Annexes B, A and J; pynetdicom).

One association per batch, one status per instance. Presentation contexts are
proposed for exactly what is sent: each SOP class with the transfer syntax the
instance already has (a file keeps its transfer syntax; a dataset built in memory
goes as Explicit VR Little Endian), plus the uncompressed syntaxes for
uncompressed data so pynetdicom may re-encode if the peer prefers another one.

Whole-send failures (cannot connect, association rejected or aborted, association
lost mid-way) raise :class:`plugin.export.ExportError`; a refused instance is a
:class:`plugin.export.StoreOutcome` carrying the hex status and its meaning; a
warning status (0xB000 coercion, 0xB006 elements discarded, 0xB007 data set does
not match SOP class) is a delivered instance with ``warning=True``, and is logged.
The association is always released (or aborted) before returning.

:func:`request_commitment` asks the peer, by N-ACTION (Storage Commitment Push
Model, PS3.4 J.3.2), to commit to having kept instances. The result comes back
later as an N-EVENT-REPORT, usually on a new association to our node (Orthanc
does it that way; PS3.4 J.3.3 allows both): the node's SCP passes it to
:func:`plugin.outbox.commitment_report`.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from plugin.config import DimseTarget
from plugin.export import (ExportError, StoreOutcome, describe_status, is_success, is_warning, part10,
                           retryable_status)

__all__ = ["STORAGE_COMMITMENT_INSTANCE", "echo", "request_commitment", "store"]

#: The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5).
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"

log = logging.getLogger("cmr_ai.scu")

DatasetOrPath = Union[Dataset, str, os.PathLike]
_MAX_CONTEXTS = 128  # PS3.8 §9.3.2.2: odd context IDs 1..255
_UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
                 DeflatedExplicitVRLittleEndian)


@dataclass
class _Item:
    uid: str
    sop_class: str = ""
    transfer_syntax: str = ""
    payload: Optional[DatasetOrPath] = None  # what send_c_store gets
    error: Optional[str] = None  # why it is not sent


def _item(obj: DatasetOrPath) -> _Item:
    if isinstance(obj, Dataset):
        uid = str(obj.get("SOPInstanceUID", "") or "")
        try:
            ds = part10(obj)
        except ValueError as e:
            return _Item(uid, error=f"not sent: {e}")
        return _Item(uid, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), ds)
    path = Path(obj)
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError) as e:
        return _Item("", error=f"not sent: cannot read {path}: {e}")
    missing = [k for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
               if not meta.get(k)]
    if missing:
        return _Item(str(meta.get("MediaStorageSOPInstanceUID", "") or ""),
                     error=f"not sent: {path} has no {', '.join(missing)} in its file meta information")
    return _Item(str(meta.MediaStorageSOPInstanceUID), str(meta.MediaStorageSOPClassUID),
                 str(meta.TransferSyntaxUID), str(path))


def _add_contexts(ae: AE, items: list[_Item]) -> None:
    """One context per SOP class for uncompressed data, one per (SOP class, compressed syntax)."""
    uncompressed: dict[str, list[str]] = {}
    compressed: set[tuple[str, str]] = set()
    for it in items:
        if it.transfer_syntax not in _UNCOMPRESSED:  # compressed, or a private syntax: as it is
            compressed.add((it.sop_class, it.transfer_syntax))
        else:
            syntaxes = uncompressed.setdefault(it.sop_class, [])
            for t in (it.transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if t not in syntaxes:
                    syntaxes.append(t)
    n = len(uncompressed) + len(compressed)
    if n > _MAX_CONTEXTS:
        raise ExportError(f"{n} SOP class / transfer syntax combinations in one batch: more than the "
                          f"{_MAX_CONTEXTS} presentation contexts one association can carry; send smaller batches",
                          retryable=False)
    for sop, syntaxes in sorted(uncompressed.items()):
        ae.add_requested_context(sop, syntaxes)
    for sop, ts in sorted(compressed):
        ae.add_requested_context(sop, [ts])


def _peer(target: DimseTarget) -> str:
    return f"{target.ae_title}@{target.host}:{target.port}"


def _associate(ae: AE, target: DimseTarget, handlers: Iterable = ()):
    """Request an association; raise a retryable ExportError with the reason if none is made."""
    answers: list = []

    connected: list = []

    def on_acse(event):  # keep the A-ASSOCIATE-AC/RJ so the error can say why
        if getattr(event.primitive, "result", None) in (0x00, 0x01, 0x02):
            answers.append(event.primitive)

    def on_open(event):  # pynetdicom reports a refused connection as an abort: tell them apart
        connected.append(True)

    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = target.timeout
    ae.connection_timeout = target.timeout
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title,
                         evt_handlers=[(evt.EVT_ACSE_RECV, on_acse), (evt.EVT_CONN_OPEN, on_open), *handlers])
    if assoc.is_established:
        return assoc
    accepted = any(a.result == 0x00 for a in answers)
    if assoc.is_rejected:
        rj = next((a for a in reversed(answers) if a.result in (0x01, 0x02)), None)
        why = (f"rejected ({rj.result_str}, by the {rj.source_str}: {rj.reason_str})" if rj is not None
               else "rejected")
        code = "association rejected"
    elif assoc.is_aborted and accepted:  # pynetdicom aborts when no presentation context was accepted
        proposed = sorted({str(cx.abstract_syntax.name) for cx in ae.requested_contexts})
        raise ExportError(f"association {ae.ae_title} -> {_peer(target)}: the peer accepted none of the proposed "
                          f"presentation contexts ({', '.join(proposed)})", retryable=False,
                          code="no presentation context")
    elif assoc.is_aborted and connected:
        why, code = "aborted by the peer during negotiation", "association aborted"
    else:
        why = f"could not be made (connection refused, or no answer within {target.timeout:g} s)"
        code = "no association"
    raise ExportError(f"association {ae.ae_title} -> {_peer(target)} {why}", retryable=True, code=code)


def _outcome(uid: str, status: Dataset) -> StoreOutcome:
    code = int(status.Status)
    text = describe_status(code)
    comment = str(status.get("ErrorComment", "") or "").strip()
    if comment:
        text += f" ({comment})"
    ok = is_success(code)
    return StoreOutcome(uid, ok, text, retryable=(not ok) and retryable_status(code), code=f"0x{code:04X}",
                        warning=ok and is_warning(code))


def store(target: DimseTarget, datasets_or_paths: Iterable[DatasetOrPath], *,
          calling_ae: str = "CMR_AI") -> list[StoreOutcome]:
    """C-STORE every dataset or file over one association.

    Parameters
    ----------
    target:
        The peer; its ``calling_ae_title``, when set, wins over ``calling_ae``.
    datasets_or_paths:
        ``pydicom.Dataset`` objects and/or paths of DICOM files. A file is sent in
        its own transfer syntax; a dataset in ``ds.file_meta.TransferSyntaxUID``,
        or Explicit VR Little Endian when it has none. Datasets are not modified.
    calling_ae:
        Our AE title.

    Returns
    -------
    list[StoreOutcome]
        One per input, in order: ``ok`` for success and warning statuses;
        ``retryable`` for 0xA7xx (out of resources). Inputs without SOP Class/Instance
        UID, unreadable files and instances whose presentation context the peer
        refused are failures that are not retryable.

    Raises
    ------
    ExportError
        Retryable, when the association cannot be made, is rejected or aborted, or
        is lost before every instance got a response.
    """
    items = [_item(x) for x in datasets_or_paths]
    sendable = [it for it in items if it.error is None]
    if not sendable:
        return [StoreOutcome(it.uid, False, it.error or "not sent", code="not sent") for it in items]
    ae = AE(ae_title=target.calling_ae_title or calling_ae)
    _add_contexts(ae, sendable)
    assoc = _associate(ae, target)
    out: list[StoreOutcome] = []
    clean = False
    try:
        for n, it in enumerate(items):
            if it.error is not None:
                out.append(StoreOutcome(it.uid, False, it.error, code="not sent"))
                continue
            if not assoc.is_established:
                raise ExportError(f"association {ae.ae_title} -> {_peer(target)} "
                                  f"{'aborted by the peer' if assoc.is_aborted else 'lost'} after {n} of "
                                  f"{len(items)} instance(s)", retryable=True,
                                  code="association aborted" if assoc.is_aborted else "association lost")
            t0 = time.monotonic()
            try:
                status = assoc.send_c_store(it.payload)
            except (ValueError, AttributeError) as e:  # no accepted presentation context, cannot encode
                out.append(StoreOutcome(it.uid, False, f"not sent: {e}", retryable=False, code="not sent"))
                continue
            if not status or "Status" not in status:
                # pynetdicom returns an empty status both when the peer aborts and when the
                # DIMSE timeout expires (it then aborts the association itself)
                waited = time.monotonic() - t0
                why = (f"no response within the {target.timeout:g} s timeout" if waited >= 0.9 * target.timeout
                       else "the peer aborted the association or the connection was lost")
                raise ExportError(f"C-STORE of {it.uid} to {_peer(target)} got no status: {why}; "
                                  f"{n} of {len(items)} instance(s) had been answered", retryable=True,
                                  code="no response")
            o = _outcome(it.uid, status)
            if not o.ok:
                log.warning("C-STORE %s to %s: %s", it.uid, _peer(target), o.status)
            elif o.warning:
                log.warning("C-STORE %s to %s: stored with a warning: %s", it.uid, _peer(target), o.status)
            out.append(o)
        clean = True
    finally:
        if assoc.is_established:
            if clean:
                assoc.release()
            else:
                assoc.abort()
    return out


def echo(target: DimseTarget, calling_ae: str = "CMR_AI") -> bool:
    """C-ECHO the peer (PS3.4 Annex A); True when it answers with Success."""
    ae = AE(ae_title=target.calling_ae_title or calling_ae)
    ae.add_requested_context(Verification)
    try:
        assoc = _associate(ae, target)
    except ExportError as e:
        log.info("C-ECHO: %s", e)
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.get("Status", -1)) == 0
    finally:
        if assoc.is_established:
            assoc.release()


def request_commitment(target: DimseTarget, references: Iterable[tuple[str, str]], transaction_uid: str, *,
                       calling_ae: str = "CMR_AI", on_report=None) -> None:
    """Storage Commitment Request: N-ACTION (Action Type 1) on the Push Model instance (PS3.4 J.3.2).

    Parameters
    ----------
    target:
        The peer (its ``calling_ae_title``, when set, wins over ``calling_ae``).
    references:
        ``(SOP Class UID, SOP Instance UID)`` of each instance to commit, the
        (0008,1199) Referenced SOP Sequence of the request.
    transaction_uid:
        (0008,1195) Transaction UID; the peer's N-EVENT-REPORT carries it back.
    on_report:
        An ``EVT_N_EVENT_REPORT`` handler for a peer that reports on this
        association before it is released; most report on a new association to
        our node (:meth:`plugin.dimse.scp.StoreSCP.handle_event_report`).

    Raises
    ------
    ExportError
        Retryable when no association can be made or the peer does not answer;
        not retryable when the peer refuses the Storage Commitment Push Model or
        answers the N-ACTION with a failure status (other than 0xA7xx).
    """
    refs = list(references)
    ae = AE(ae_title=target.calling_ae_title or calling_ae)
    ae.add_requested_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    handlers = [(evt.EVT_N_EVENT_REPORT, on_report)] if on_report is not None else []
    where = f"Storage Commitment request {ae.ae_title} -> {_peer(target)}"
    refused = ExportError(f"{where}: the peer does not accept the Storage Commitment Push Model SOP Class "
                          f"({StorageCommitmentPushModel}): set verify: none for this destination",
                          retryable=False, code="commitment not supported")
    try:
        assoc = _associate(ae, target, handlers)
    except ExportError as e:
        if e.code == "no presentation context":
            raise refused from None
        raise
    try:
        if not any(cx.abstract_syntax == StorageCommitmentPushModel for cx in assoc.accepted_contexts):
            raise refused
        req = Dataset()
        req.TransactionUID = transaction_uid
        req.ReferencedSOPSequence = []
        for sop_class, sop_uid in refs:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
            req.ReferencedSOPSequence.append(item)
        t0 = time.monotonic()
        status, _reply = assoc.send_n_action(req, 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE)
        if not status or "Status" not in status:
            why = (f"no answer within {target.timeout:g} s" if time.monotonic() - t0 >= 0.9 * target.timeout else
                   f"the peer aborted the association (Orthanc does so when our AE title {ae.ae_title} is not in "
                   "its DicomModalities: the result of a commitment goes back to a modality it knows)")
            raise ExportError(f"{where}: no N-ACTION response: {why}", retryable=True, code="no response")
        code = int(status.Status)
        if not is_success(code):
            comment = str(status.get("ErrorComment", "") or "").strip()
            raise ExportError(f"{where}: N-ACTION answered {describe_status(code)}" + (f" ({comment})" if comment
                                                                                       else ""),
                              retryable=retryable_status(code), code=f"0x{code:04X}")
        log.info("%s: %d instance(s), transaction %s", where, len(refs), transaction_uid)
    finally:
        if assoc.is_established:
            assoc.release()
