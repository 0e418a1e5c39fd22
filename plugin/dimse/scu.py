"""C-STORE / C-ECHO SCU (pynetdicom): one association per batch, a status per instance."""
from __future__ import annotations

import logging
from typing import Iterable

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from pynetdicom.status import code_to_category

from plugin.export import ExportError, StoreOutcome

log = logging.getLogger("cmr_ai.scu")

# Failures worth retrying: out of resources (A7xx) and the "processing failure" 0x0110.
_RETRYABLE_PREFIX = (0xA7,)


def _status_text(code: int) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", ""))
    return f"0x{code:04X} {meaning[0]} {meaning[1]}".strip()


def _ae(calling_ae: str, datasets: list[Dataset]) -> AE:
    ae = AE(ae_title=calling_ae)
    pairs = set()
    for ds in datasets:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) or ExplicitVRLittleEndian
        pairs.add((str(ds.SOPClassUID), str(ts)))
    for sop, ts in sorted(pairs):
        tss = [ts] + [t for t in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if t != ts]
        ae.add_requested_context(sop, tss)
    return ae


def store(target, datasets: Iterable[Dataset], *, calling_ae: str = "CMR_AI") -> list[StoreOutcome]:
    """C-STORE every dataset over one association.

    Raises
    ------
    ExportError
        When the association cannot be made (retryable) or breaks off mid-way.
    """
    datasets = list(datasets)
    if not datasets:
        return []
    ae = _ae(calling_ae, datasets)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = target.timeout
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "could not be made"
        raise ExportError(f"association with {target.ae_title}@{target.host}:{target.port} {why}", retryable=True)
    out: list[StoreOutcome] = []
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            try:
                status = assoc.send_c_store(ds)
            except ValueError as e:  # no accepted presentation context
                out.append(StoreOutcome(uid, False, f"not sent: {e}", retryable=False))
                continue
            if not status or "Status" not in status:
                raise ExportError(f"no C-STORE response from {target.ae_title} for {uid} (association lost)",
                                  retryable=True)
            code = int(status.Status)
            cat = code_to_category(code)
            ok = cat in ("Success", "Warning")
            out.append(StoreOutcome(uid, ok, _status_text(code),
                                    retryable=(not ok) and (code >> 8) in _RETRYABLE_PREFIX))
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def echo(target, calling_ae: str = "CMR_AI") -> bool:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = target.timeout
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        return False
    try:
        st = assoc.send_c_echo()
        return bool(st) and st.Status == 0
    finally:
        assoc.release()
