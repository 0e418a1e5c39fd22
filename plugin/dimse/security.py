"""Who may talk to the node, and how: the callers' allow-list and DICOM TLS.

Both act on the association, before any DIMSE service (C-ECHO, C-STORE,
N-EVENT-REPORT) is reached; the node offers no query/retrieve SCP, so every way in
passes here. See docs/security.md.

* :class:`AllowList` answers an A-ASSOCIATE-RQ from a caller that matches no
  ``node.allow`` entry with an A-ASSOCIATE-RJ (rejected-permanent, service user,
  "calling AE title not recognised" when no entry names that AE title, else "no
  reason given"; PS3.8 9.3.4) and logs who was refused and why.
* :func:`server_ssl_context` builds the listener's TLS context from ``node.tls``
  (TLS 1.2 or later, the BCP 195 profile of PS3.15 B.9 that dcmtk proposes by default).
* :class:`TLSAssociationServer` runs the TLS handshake in the connection's own thread
  with a time limit, so a caller that connects and stays silent cannot hold up the
  listener (pynetdicom's server does the handshake in its accept loop).
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Iterable, Optional

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

if TYPE_CHECKING:
    from plugin.config import AllowEntry, TlsConfig

log = logging.getLogger("cmr_ai.security")

# A-ASSOCIATE-RJ (PS3.8 Table 9-21): result, source, diagnostic
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
NO_REASON_GIVEN = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03


class AllowList:
    """The ``node.allow`` entries and the EVT_REQUESTED handler that enforces them.

    Parameters
    ----------
    entries:
        :class:`plugin.config.AllowEntry` items; empty means every caller is accepted.
    """

    def __init__(self, entries: Iterable["AllowEntry"] = ()):
        self.entries = list(entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def check(self, ae_title: str, address: str) -> Optional[tuple[int, str]]:
        """None when the caller may associate, else (A-ASSOCIATE-RJ diagnostic, why)."""
        if not self.entries or any(e.matches(ae_title, address) for e in self.entries):
            return None
        known_ae = any(e.ae_title == ae_title.strip() for e in self.entries)
        if known_ae:
            allowed = ", ".join(str(e) for e in self.entries if e.ae_title == ae_title.strip())
            return NO_REASON_GIVEN, f"AE title {ae_title.strip()} is allowed only as {allowed}"
        return CALLING_AE_NOT_RECOGNISED, "no node.allow entry matches this AE title and address"

    def handle_requested(self, event) -> None:
        """EVT_REQUESTED: reject a caller that matches no entry, before negotiation.

        pynetdicom skips negotiation when the handler has rejected the association
        (``Association.run_reactor``). Fails closed: an error here rejects.
        """
        if not self.entries:
            return
        assoc = event.assoc
        address = str(assoc.requestor.address)
        try:
            rq = assoc.requestor.primitive
            calling = str(rq.calling_ae_title).strip()
            called = str(rq.called_ae_title).strip()
            refused = self.check(calling, address)
        except Exception as e:  # noqa: BLE001 - never let a caller in because the check broke
            calling, called, refused = "?", "?", (NO_REASON_GIVEN, f"allow-list check failed: {type(e).__name__}")
        if refused is None:
            return
        diagnostic, why = refused
        log.warning("association from %s at %s (called AE %s) refused: A-ASSOCIATE-RJ rejected-permanent, %s: %s",
                    calling or "(empty AE title)", address, called,
                    "calling AE title not recognised" if diagnostic == CALLING_AE_NOT_RECOGNISED else
                    "no reason given", why)
        try:
            assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, diagnostic)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
        finally:
            assoc.kill()  # as pynetdicom does after its own rejections: waits until the RJ is out


class TLSConfigError(Exception):
    """``node.tls`` names files that do not make a TLS context (bad PEM, key not the certificate's …)."""


def server_ssl_context(cfg: "TlsConfig") -> ssl.SSLContext:
    """The listener's TLS context from ``node.tls``.

    TLS 1.2 or later; the node's certificate and key; with ``ca`` the callers'
    certificates are verified against it (``require_client_cert``: a caller without
    one is refused, else one is verified when presented).

    Raises
    ------
    TLSConfigError
        Naming the file and what is wrong with it.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise TLSConfigError(f"key {cfg.key!r} is not the private key of cert {cfg.cert!r}") from None
        raise TLSConfigError(f"cert {cfg.cert!r} / key {cfg.key!r}: not a PEM certificate and its unencrypted "
                             f"private key ({e.reason or e})") from None
    except OSError as e:
        raise TLSConfigError(f"cert {cfg.cert!r} / key {cfg.key!r}: {e.strerror or e}") from None
    if cfg.ca:
        try:
            ctx.load_verify_locations(cafile=cfg.ca)
        except (ssl.SSLError, OSError) as e:
            raise TLSConfigError(f"ca {cfg.ca!r}: not a PEM CA certificate ({getattr(e, 'reason', None) or e})") \
                from None
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TLSAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the TLS handshake in the connection thread.

    A handshake that fails (a plain-TCP caller, no or an untrusted client
    certificate) or takes longer than ``handshake_timeout`` is logged with the
    caller's address and the connection closed; the listener goes on accepting.
    """

    handshake_timeout: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = self.socket.accept()
        assert self.ssl_context is not None
        return self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    def process_request_thread(self, request, client_address) -> None:
        try:
            request.settimeout(self.handshake_timeout)
            request.do_handshake()
            request.settimeout(None)
        except (OSError, ValueError) as e:  # ssl.SSLError, timeouts, resets
            log.warning("TLS connection from %s:%s on port %s refused: %s", client_address[0], client_address[1],
                        self.server_address[1], _tls_reason(e))
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def _tls_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        reason = (e.reason or str(e)).replace("_", " ").lower()
        hints = {"wrong version number": " (a plain-TCP caller on the TLS port?)",
                 "http request": " (an HTTP client on the TLS port?)",
                 "peer did not return a certificate": " (node.tls.require_client_cert: the caller sent no "
                                                      "certificate)",
                 "certificate verify failed": " (the caller's certificate is not signed by node.tls.ca)",
                 "tlsv1 alert unknown ca": " (the caller does not trust the node's certificate)"}
        return f"TLS handshake failed: {reason}{next((h for k, h in hints.items() if k in reason), '')}"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "TLS handshake timed out"
    return f"TLS handshake failed: {type(e).__name__}: {e}"


def start_tls_server(ae, address: tuple[str, int], ssl_context: ssl.SSLContext, handlers: list,
                     handshake_timeout: Optional[float] = None) -> TLSAssociationServer:
    """Start a non-blocking TLS listener on ``ae`` (what ``AE.start_server(block=False)`` does, with
    :class:`TLSAssociationServer`)."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=handlers,
                            server_class=TLSAssociationServer)
    if handshake_timeout is not None:
        server.handshake_timeout = handshake_timeout
    elif ae.acse_timeout:
        server.handshake_timeout = float(ae.acse_timeout)
    t = threading.Thread(target=server.serve_forever, name=f"TLSAcceptor@{server.server_address[1]}", daemon=True)
    t.start()
    ae._servers.append(server)  # AssociationServer.shutdown() removes it
    return server
