"""C-ECHO / C-STORE SCP (PS3.4 Annex B) built on pynetdicom.

The C-STORE handler stores and indexes, nothing else: it writes the dataset *as
received* (``event.encoded_dataset()``: no decoding and re-encoding of pixel
data, compressed transfer syntaxes kept), fsyncs and renames it into the store,
indexes it in the database (group commit, :mod:`plugin.ingest`), and only then
answers Success. Every failure becomes a named DIMSE status and a log line naming
the tag; the handler never raises.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from plugin.dimse.guard import DEFAULT_MAX_PDU, guard_connection
from plugin.dimse.security import AllowList, server_ssl_context, start_tls_server
from plugin.ingest import Indexer
from plugin.receive import (CANNOT_UNDERSTAND, DATASET_MISMATCH, OUT_OF_RESOURCES,
                            PROCESSING_FAILURE, SOP_CLASS_NOT_SUPPORTED, SUCCESS, Origin, Received, accept)
from plugin.storage import BadUID, InstanceStore, check_uid

if TYPE_CHECKING:
    from plugin.config import AllowEntry, TlsConfig

log = logging.getLogger("cmr_ai.scp")

__all__ = ["CANNOT_UNDERSTAND", "DATASET_MISMATCH", "OUT_OF_RESOURCES", "PROCESSING_FAILURE", "SOP_CLASS_NOT_SUPPORTED",
           "SUCCESS", "Received", "StoreSCP"]


class StoreSCP:
    """The node's DICOM listener."""

    def __init__(self, *, ae_title: str, host: str, port: int, store: InstanceStore, db_url: str,
                 max_pdu: int = DEFAULT_MAX_PDU, on_stored: Optional[Callable[[Received], None]] = None,
                 allow: Sequence["AllowEntry"] = (), tls: Optional["TlsConfig"] = None):
        """``allow``: the callers accepted (``node.allow``; empty: any). ``tls``: ``node.tls``;
        without ``tls.port`` the listener on ``port`` speaks TLS, with it a TLS listener is added
        on ``tls.port`` (see :mod:`plugin.dimse.security`)."""
        self.ae_title, self.host, self.port = ae_title, host, port
        self.allow = AllowList(allow)
        self.tls = tls
        self.ssl_context = server_ssl_context(tls) if tls is not None else None
        self.tls_port: Optional[int] = None  # the port that speaks TLS, once started
        self.store, self.db_url = store, db_url
        self.on_stored = on_stored
        self.indexer = Indexer(db_url)  # group commit of the index (plugin/ingest.py)
        ae = AE(ae_title=ae_title)
        ae.maximum_pdu_size = max_pdu
        ae.require_called_aet = False
        ae.add_supported_context(Verification)
        # Storage Commitment results (N-EVENT-REPORT) for the outbox: the peer comes back as the SCP
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        for cx in StoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        self.server = None
        self.tls_server = None  # the extra TLS listener (tls.port)

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        handlers = [(evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, self.handle_echo),
                    (evt.EVT_N_EVENT_REPORT, self.handle_event_report),
                    (evt.EVT_CONN_OPEN, guard_connection)]  # bounded, timed, logged PDU reading (guard.py)
        if self.allow:
            handlers.append((evt.EVT_REQUESTED, self.allow.handle_requested))
        callers = (f"; callers allowed: {', '.join(str(e) for e in self.allow.entries)}" if self.allow
                   else "; any caller")
        if self.ssl_context is not None and self.tls.port is None:
            self.server = start_tls_server(self.ae, (self.host, self.port), self.ssl_context, handlers)
            self.port = self.tls_port = self.server.server_address[1]
            log.info("listening as %s on %s:%s (DICOM TLS%s)%s", self.ae_title, self.host, self.port,
                     self._tls_note(), callers)
            return
        self.server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]
        log.info("listening as %s on %s:%s%s", self.ae_title, self.host, self.port, callers)
        if self.ssl_context is not None:
            self.tls_server = start_tls_server(self.ae, (self.host, self.tls.port), self.ssl_context, handlers)
            self.tls_port = self.tls_server.server_address[1]
            log.info("listening as %s on %s:%s (DICOM TLS%s)", self.ae_title, self.host, self.tls_port,
                     self._tls_note())

    def _tls_note(self) -> str:
        if self.tls.require_client_cert:
            return ", client certificate required"
        return ", client certificate verified when sent" if self.tls.ca else ", no client certificate asked"

    def stop(self) -> None:
        for server in (self.tls_server, self.server):
            if server is not None:
                server.shutdown()
        self.server = self.tls_server = None

    # -- handlers ----------------------------------------------------------
    def handle_echo(self, event) -> int:
        return SUCCESS

    def handle_event_report(self, event):
        """EVT_N_EVENT_REPORT: a Storage Commitment result (PS3.4 J.3.3) for the outbox. Never raises."""
        from plugin.outbox import commitment_report

        peer = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        try:
            info = event.event_information
        except Exception as e:
            log.error("N-EVENT-REPORT from %s refused (0x%04X): cannot decode: %s", peer, PROCESSING_FAILURE, e)
            return PROCESSING_FAILURE, None
        return commitment_report(self.db_url, event.event_type, info, peer), None

    def handle_store(self, event) -> int:
        """EVT_C_STORE: store durably, index, then answer. Never raises."""
        assoc = event.assoc
        peer = f"{assoc.requestor.ae_title}@{assoc.requestor.address}"
        req = event.request
        try:
            sop_uid = check_uid(req.AffectedSOPInstanceUID, "(0000,1000) AffectedSOPInstanceUID")
            sop_class = check_uid(req.AffectedSOPClassUID, "(0000,0002) AffectedSOPClassUID")
        except BadUID as e:
            log.error("C-STORE from %s refused (0x%04X): %s", peer, CANNOT_UNDERSTAND, e)
            return CANNOT_UNDERSTAND
        context = event.context
        if str(context.abstract_syntax) != sop_class:  # pynetdicom picks the service by the command's UID
            log.error("C-STORE %s from %s refused (0x%04X): (0000,0002) AffectedSOPClassUID %s is not the SOP class "
                      "of presentation context %s (%s)", sop_uid, peer, SOP_CLASS_NOT_SUPPORTED, sop_class,
                      context.context_id, context.abstract_syntax)
            return SOP_CLASS_NOT_SUPPORTED
        try:
            raw = req.DataSet.getvalue()
        except Exception as e:  # noqa: BLE001 - never raise from the handler
            log.error("C-STORE %s from %s refused (0x%04X): cannot read the data set: %s: %s", sop_uid, peer,
                      CANNOT_UNDERSTAND, type(e).__name__, e)
            return CANNOT_UNDERSTAND
        # the same checks, store and index as STOW-RS and WADO-RS pulls (plugin/receive.py)
        return accept(self.store, self.indexer, Origin("C-STORE", peer, assoc.requestor.ae_title,
                                                       assoc.requestor.address),
                      sop_class=sop_class, sop_uid=sop_uid, transfer_syntax=str(context.transfer_syntax), body=raw,
                      dataset=lambda: event.dataset, on_stored=self.on_stored).status
