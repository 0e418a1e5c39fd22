"""Admin HTTP API of the node: health (open) and the index, jobs and outbox (bearer token).

Served by :class:`plugin.node.Node` in a thread when ``node.http_port`` is set (0:
any free port, logged), on ``node.host``. Standard library only
(:class:`http.server.ThreadingHTTPServer`); requests are dispatched through a route
table (:meth:`AdminAPI.route`): each endpoint — ``/metrics``, the dashboard, the STOW-RS
receiver (:meth:`AdminAPI.enable_stow`) — is one registration, open or behind the token.

=================================  ======  ==============================================================
``GET /health``                    open    ``{"ok", "version", "rules_version", "dicom_port", "counts"}``
``GET /metrics``                   token   Prometheus text format (:mod:`plugin.metrics`)
``GET /``                          open    the dashboard page (``plugin/dashboard/``: static, no data;
                                           its script asks for the token and calls the API)
``GET /api/studies``               token   studies, most recently received first (``?limit=N``, ≤ 1000)
``GET /api/jobs``                  token   jobs, newest first, with their stage timestamps
``GET /api/exports``               token   outbox rows, newest first
``POST /api/jobs/{id}/rerun``      token   run a done or failed analysis job again (202)
``POST /api/exports/{id}/retry``   token   queue an outbox row again (``cmr-ai exports retry ID``; 202)
``POST /dicom-web/studies``        token   STOW-RS into the node (:mod:`plugin.dicomweb.receiver`): a
                                           ``multipart/related; type="application/dicom"`` body, read as it
                                           arrives; the Store Instances Response (``application/dicom+json``)
``POST /dicom-web/studies/{uid}``  token   the same, every instance of that study (others: failed, 0xA900)
=================================  ======  ==============================================================

A route's ``{name}`` matches digits, ``{name:uid}`` digits and dots (:data:`PARAM_KINDS`).
Request bodies are read as they arrive (``Content-Length`` or ``Transfer-Encoding: chunked``,
:class:`BodyReader`); ``Request.body()`` reads a small one whole.

The token is ``Authorization: Bearer <token>``; it comes from ``node.http_token_file``
or, when that is not set, is generated once into ``<var>/run/api-token`` (mode 0600)
and its path logged. A missing or wrong token gets ``401`` with ``WWW-Authenticate:
Bearer`` (RFC 6750); tokens are compared in constant time. Like the logs, the API
carries UIDs but no PHI (no patient IDs, accession numbers or descriptions; error
texts scrubbed, :mod:`plugin.logsafe`). See docs/security.md.
"""
from __future__ import annotations

import hmac
import io
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import func, select, update

from plugin import db
from plugin.config import Settings
from plugin.logsafe import scrub

log = logging.getLogger("cmr_ai.api")

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000

#: The job columns stamped as it enters each stage (``/api/jobs`` shows them).
STAGE_COLUMNS = ("started_at", "prepared_at", "inferred_at", "reported_at", "finished_at")

#: The dashboard's files (``plugin/dashboard/``, package data) and their content types.
DASHBOARD_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                   "style.css": "text/css; charset=utf-8"}
_DASHBOARD = Path(__file__).with_name("dashboard")

#: What a ``{name:kind}`` part of a route's path matches (``{name}``: ``int``). ``uid``: digits and
#: dots, at most 64 (the handler still checks it is a valid UID: :func:`plugin.storage.check_uid`).
PARAM_KINDS = {"int": r"[0-9]{1,18}", "uid": r"[0-9.]{1,64}"}

#: Seconds a connection may stay silent (between requests, or mid-body) before it is closed
SOCKET_TIMEOUT = 300

#: Bytes of an unread request body (a refused request) read and dropped so that the client
#: gets the answer and the connection stays usable; beyond it, the connection is closed.
DRAIN_LIMIT = 4 << 20


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BadBody(HTTPError):
    """A request body that breaks HTTP/1.1 framing (a malformed chunk, an unsupported transfer coding)."""


class BodyReader:
    """The request body, read as it arrives: ``Content-Length`` bytes, or ``Transfer-Encoding:
    chunked`` (RFC 9112 §7.1: chunk extensions ignored, trailers read and dropped).

    :meth:`read` returns at most ``n`` bytes (fewer is not the end) and ``b""`` at the end
    of the body — also when the client closed the connection early (then :attr:`truncated`).

    Raises
    ------
    BadBody
        From :meth:`read`: a Content-Length that is not a number (400), a transfer coding
        other than ``chunked`` (501), a malformed chunk (400).
    """

    #: longest chunk-size or trailer line accepted
    MAX_LINE = 4096

    def __init__(self, rfile, headers):
        self._rfile = rfile
        self.bytes_read = 0
        self.truncated = False
        self._problem: Optional[BadBody] = None
        self._done = False
        self._left = 0  # of the body (Content-Length) or of the current chunk
        coding = (headers.get("Transfer-Encoding") or "").strip().lower()
        self.chunked = bool(coding)
        if coding and coding != "chunked":
            self._problem = BadBody(HTTPStatus.NOT_IMPLEMENTED, f"Transfer-Encoding {coding!r} is not supported "
                                    "(only chunked)")
        elif not coding:
            raw = (headers.get("Content-Length") or "0").strip()
            if not raw.isdigit():
                self._problem = BadBody(HTTPStatus.BAD_REQUEST, f"Content-Length {raw[:40]!r} is not a number")
            else:
                self._left = int(raw)
                self._done = self._left == 0

    @property
    def complete(self) -> bool:
        """The whole body was read (the connection can carry the next request)."""
        return self._done and not self.truncated and self._problem is None

    def _line(self) -> bytes:
        line = self._rfile.readline(self.MAX_LINE + 1)
        if not line.endswith(b"\n"):
            if len(line) > self.MAX_LINE:
                raise BadBody(HTTPStatus.BAD_REQUEST, "malformed chunked body: a chunk-size line is too long")
            self.truncated = self._done = True  # the connection closed
            return b""
        return line

    def _next_chunk(self) -> None:
        line = self._line()
        if self._done:
            return
        size = line.split(b";", 1)[0].strip()
        try:
            self._left = int(size, 16)
        except ValueError:
            raise BadBody(HTTPStatus.BAD_REQUEST, f"malformed chunked body: chunk size {size[:20]!r}") from None
        if self._left < 0 or b"-" in size or b"+" in size:
            raise BadBody(HTTPStatus.BAD_REQUEST, f"malformed chunked body: chunk size {size[:20]!r}")
        if self._left == 0:
            while self._line().strip():  # trailer fields, then the empty line
                pass
            self._done = True

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of the body (``n < 0``: all of the rest); ``b""`` at its end."""
        if self._problem is not None:
            raise self._problem
        if n < 0:
            out = bytearray()
            while chunk := self.read(1 << 20):
                out += chunk
            return bytes(out)
        if self._done or n == 0:
            return b""
        if self.chunked and self._left == 0:
            self._next_chunk()
            if self._done:
                return b""
        data = self._rfile.read(min(n, self._left))
        if not data:
            self.truncated = self._done = True
            return b""
        self._left -= len(data)
        self.bytes_read += len(data)
        if self._left == 0:
            if self.chunked:
                if self._rfile.read(2) != b"\r\n":
                    raise BadBody(HTTPStatus.BAD_REQUEST, "malformed chunked body: no CRLF after a chunk")
            else:
                self._done = True
        return data

    def drain(self, limit: int) -> bool:
        """Read and drop up to ``limit`` bytes of what is left; True when the body is then complete."""
        try:
            while limit > 0 and (chunk := self.read(min(limit, 1 << 20))):
                limit -= len(chunk)
        except (BadBody, OSError):  # OSError: a timeout, a reset connection
            return False
        return self.complete


@dataclass
class Request:
    """What a route handler gets."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # email.message.Message (case-insensitive)
    client: str
    _body: Optional[BodyReader] = None
    params: dict[str, str] = field(default_factory=dict)  # the ``{name}`` parts of the route's path

    def stream(self) -> BodyReader:
        """The request body as a stream (a whole study must not be held in memory); use it
        after authentication — the dispatcher calls the handler only then."""
        if self._body is None:
            self._body = BodyReader(io.BytesIO(b""), {})
        return self._body

    def body(self) -> bytes:
        """The whole request body, read into memory (small bodies only; see :meth:`stream`).

        Raises
        ------
        BadBody
            When the body breaks HTTP framing (an :class:`HTTPError`: the dispatcher answers it).
        """
        return self.stream().read()


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: Optional[dict[str, str]] = None

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Optional[dict[str, str]] = None) -> "Response":
        return cls(status, (json.dumps(data, default=_json_default, indent=1) + "\n").encode(), "application/json",
                   headers)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[[Request], Response]
    auth: bool  # needs the bearer token
    pattern: Optional[re.Pattern] = None  # for a path with ``{name}`` / ``{name:kind}`` parts (PARAM_KINDS)

    def match(self, path: str) -> Optional[dict[str, str]]:
        if self.pattern is None:
            return {} if path == self.path else None
        m = self.pattern.fullmatch(path)
        return m.groupdict() if m else None


def _json_default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat() + "Z"  # the database keeps naive UTC
    if hasattr(o, "value"):
        return o.value
    return str(o)


def load_or_create_token(settings: Settings) -> tuple[str, Path]:
    """The API token and the file it is in: ``node.http_token_file``, else ``<var>/run/api-token``,
    created once (``secrets.token_urlsafe``, mode 0600).

    Raises
    ------
    ValueError
        When the configured file is empty.
    """
    if settings.node.http_token_file:
        path = Path(settings.node.http_token_file).expanduser()
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"node.http_token_file {str(path)!r} is empty")
        return token, path
    from worker.app import var_dir

    path = var_dir(settings) / "run" / "api-token"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        token = path.read_text().strip()
        if token:
            if path.stat().st_mode & 0o077:
                log.warning("API token file %s is readable by others (mode %o): chmod 600 it", path,
                            path.stat().st_mode & 0o777)
            return token, path
        path.unlink()  # an empty file left by a crash mid-write: make a new token
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    log.info("generated the admin API token into %s (mode 0600)", path)
    return token, path


class AdminAPI:
    """The admin HTTP server.

    Parameters
    ----------
    settings:
        A callable returning the settings in force (the node swaps them on reload).
    token:
        The bearer token for the protected routes.
    host, port:
        Where to listen; port 0 picks a free one (:attr:`port` after :meth:`start`).
    status:
        Extra fields for ``/health`` (e.g. the DICOM ports), called per request.
    """

    def __init__(self, settings: Callable[[], Settings], token: str, *, host: str, port: int,
                 status: Optional[Callable[[], dict]] = None):
        self.settings, self.token = settings, token
        self.host, self.port = host, port
        self.status = status or (lambda: {})
        self.routes: dict[tuple[str, str], Route] = {}
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.route("GET", "/health", self.health, auth=False)
        self.route("GET", "/api/studies", self.studies)
        self.route("GET", "/api/jobs", self.jobs)
        self.route("GET", "/api/exports", self.exports)
        self.route("POST", "/api/jobs/{id}/rerun", self.rerun_job)
        self.route("POST", "/api/exports/{id}/retry", self.retry_export)
        self.route("GET", "/metrics", self.metrics)
        self.route("GET", "/", self.dashboard, auth=False)
        for name in DASHBOARD_FILES:
            self.route("GET", f"/dashboard/{name}", self.dashboard, auth=False)

    # -- routing -------------------------------------------------------------
    def route(self, method: str, path: str, handler: Callable[[Request], Response], *, auth: bool = True) -> None:
        """Register ``handler`` for ``method path``; ``auth``: needs the bearer token.

        A path is matched exactly, except its ``{name}`` parts, which match digits, and its
        ``{name:kind}`` parts, which match :data:`PARAM_KINDS` (``{study:uid}``); they reach the
        handler as ``req.params[name]`` (``/api/jobs/{id}/rerun``).
        """
        pattern = None
        if "{" in path:
            def part(m: re.Match) -> str:
                kind = m.group(2) or "int"
                if kind not in PARAM_KINDS:
                    raise ValueError(f"route {path}: unknown parameter kind {kind!r} (known: {sorted(PARAM_KINDS)})")
                return f"(?P<{m.group(1)}>{PARAM_KINDS[kind]})"

            pattern = re.compile(re.sub(r"\\\{(\w+)(?::(\w+))?\\\}", part, re.escape(path)))
        self.routes[(method.upper(), path)] = Route(method.upper(), path, handler, auth, pattern)

    def _matching(self, path: str) -> list[tuple[Route, dict[str, str]]]:
        return [(r, params) for r in self.routes.values() if (params := r.match(path)) is not None]

    def authorised(self, headers) -> Optional[str]:
        """None when the request carries the token, else the RFC 6750 error code to answer with."""
        value = headers.get("Authorization") or ""
        scheme, _, given = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return ""  # no credentials: no error code (RFC 6750 3.1)
        if hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return None
        return "invalid_token"

    def _resolve(self, method: str, path: str):
        matching = self._matching(path)
        by_method = {r.method: (r, params) for r, params in matching}
        route, params = by_method.get(method) or (by_method.get("GET") if method == "HEAD" else None) \
            or (None, {})
        needs_auth = route.auth if route is not None else not any(not r.auth for r, _ in matching)
        return route, params, by_method, bool(matching), needs_auth

    def refusal(self, method: str, path: str, headers, client: str) -> Optional[Response]:
        """The 401 answer for a request that needs the token and lacks it, else None (also asked
        before a body is invited with ``100 Continue``)."""
        if not self._resolve(method, path)[4]:
            return None
        error = self.authorised(headers)
        if error is None:
            return None
        log.warning("admin API: %s %s from %s refused: %s", method, path, client,
                    "wrong token" if error else "no bearer token")
        challenge = 'Bearer realm="cmr-ai"' + (f', error="{error}"' if error else "")
        return Response.json({"error": "unauthorised: send Authorization: Bearer <token>"},
                             HTTPStatus.UNAUTHORIZED, {"WWW-Authenticate": challenge})

    def dispatch(self, req: Request) -> Response:
        route, params, by_method, known_path, _needs_auth = self._resolve(req.method, req.path)
        refused = self.refusal(req.method, req.path, req.headers, req.client)
        if refused is not None:
            return refused
        if route is None:
            if known_path:
                allowed = sorted(by_method)
                return Response.json({"error": f"method {req.method} not allowed"}, HTTPStatus.METHOD_NOT_ALLOWED,
                                     {"Allow": ", ".join(allowed)})
            return Response.json({"error": f"no such endpoint: {req.path}"}, HTTPStatus.NOT_FOUND)
        req.params = params
        try:
            return route.handler(req)
        except HTTPError as e:
            return Response.json({"error": e.message}, e.status)
        except Exception:  # noqa: BLE001 - a broken endpoint answers 500 and logs, the server goes on
            log.exception("admin API: %s %s failed", req.method, req.path)
            return Response.json({"error": "internal error (see the node's log)"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    def enable_stow(self, store, indexer, *, on_stored=None) -> None:
        """Serve STOW-RS into the node (:mod:`plugin.dicomweb.receiver`): ``POST /dicom-web/studies``
        and ``POST /dicom-web/studies/{study}``, behind the token; each instance is accepted
        by :func:`plugin.receive.accept_part10` into ``store`` and ``indexer`` (those of the
        C-STORE SCP)."""
        from plugin.dicomweb.receiver import StowReceiver

        receiver = StowReceiver(store, indexer, on_stored=on_stored)
        self.route("POST", "/dicom-web/studies", receiver)
        self.route("POST", "/dicom-web/studies/{study:uid}", receiver)

    # -- endpoints -----------------------------------------------------------
    def health(self, req: Request) -> Response:
        s = self.settings()
        from importlib.metadata import PackageNotFoundError, version

        try:
            pkg = version("cmr-ai")
        except PackageNotFoundError:
            pkg = "unknown"
        out: dict[str, Any] = {"ok": True, "version": pkg, "rules_version": s.rules_version,
                               "rules": len(s.rules), **self.status()}
        try:
            with db.session_scope(s.database.url) as session:
                out["counts"] = {
                    "studies": _by_state(session, db.Study),
                    "jobs": _by_state(session, db.Job),
                    "exports": _by_state(session, db.Export),
                }
        except Exception as e:  # noqa: BLE001
            log.error("admin API: /health: database unreachable: %s", e)
            out.update(ok=False, error="database unreachable")
            return Response.json(out, HTTPStatus.SERVICE_UNAVAILABLE)
        return Response.json(out)

    def studies(self, req: Request) -> Response:
        limit = _limit(req)
        with db.session_scope(self.settings().database.url) as s:
            n_series = (select(db.Series.study_id, func.count().label("n")).group_by(db.Series.study_id).subquery())
            rows = s.execute(select(db.Study, n_series.c.n).outerjoin(n_series, n_series.c.study_id == db.Study.id)
                             .order_by(db.Study.last_received.desc(), db.Study.id.desc()).limit(limit)).all()
            items = [{"id": st.id, "study_instance_uid": st.study_instance_uid, "state": st.state,
                      "n_series": n or 0, "n_instances": st.n_instances, "calling_ae": st.calling_ae,
                      "source_ip": st.source_ip, "rule": st.rule, "rules_version": st.rules_version,
                      "first_received": st.first_received, "last_received": st.last_received,
                      "jobs": [j.id for j in st.jobs]} for st, n in rows]
        return Response.json({"items": items, "limit": limit})

    def jobs(self, req: Request) -> Response:
        limit = _limit(req)
        with db.session_scope(self.settings().database.url) as s:
            rows = s.execute(select(db.Job, db.Study.study_instance_uid).join(db.Study)
                             .order_by(db.Job.created_at.desc(), db.Job.id.desc()).limit(limit)).all()
            items = [{"id": j.id, "study_instance_uid": uid, "kind": j.kind, "state": j.state, "rule": j.rule,
                      "template": j.template, "model": j.model, "priority": j.priority,
                      "destinations": [d for d in (j.destinations or "").split(",") if d],
                      "attempts": j.attempts, "error": scrub(j.error) if j.error else None,
                      "model_fingerprint": j.model_fingerprint, "rules_version": j.rules_version,
                      "created_at": j.created_at, "updated_at": j.updated_at,
                      **{col: getattr(j, col) for col in STAGE_COLUMNS}} for j, uid in rows]
        return Response.json({"items": items, "limit": limit})

    def exports(self, req: Request) -> Response:
        limit = _limit(req)
        with db.session_scope(self.settings().database.url) as s:
            rows = s.scalars(select(db.Export).order_by(db.Export.id.desc()).limit(limit)).all()
            items = [{"id": e.id, "job_id": e.job_id, "destination": e.destination,
                      "sop_instance_uid": e.sop_instance_uid, "kind": e.kind, "state": e.state,
                      "attempts": e.attempts, "status": e.status,
                      "last_error": scrub(e.last_error) if e.last_error else None,
                      "warning": scrub(e.warning) if e.warning else None, "duplicate_of": e.duplicate_of,
                      "created_at": e.created_at, "next_attempt_at": e.next_attempt_at, "sent_at": e.sent_at,
                      "verify": e.verify, "confirmed_at": e.confirmed_at} for e in rows]
        return Response.json({"items": items, "limit": limit})

    def rerun_job(self, req: Request) -> Response:
        """Run a DONE or FAILED analysis job again: QUEUED (stage stamps and error cleared), then
        :func:`plugin.jobs.launch`. The outputs have deterministic UIDs, so a re-run replaces
        what the destinations hold. 409 for an unfinished job (its chain is running) or a
        forward job (nothing to compute: re-send its exports)."""
        from plugin import jobs

        jid = int(req.params["id"])
        s = self.settings()
        with db.session_scope(s.database.url) as session:
            job = session.get(db.Job, jid)
            if job is None:
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no job with id {jid}")
            if job.kind == db.JobKind.FORWARD:
                raise HTTPError(HTTPStatus.CONFLICT, f"job {jid} forwards the study as received: there is nothing "
                                                     "to run again; re-send its exports instead")
            if not job.state.finished:
                raise HTTPError(HTTPStatus.CONFLICT, f"job {jid} is {job.state.value}: only a done or failed job "
                                                     "can be re-run")
            # one statement, conditional on the state, so that two clicks launch one chain
            changed = session.execute(
                update(db.Job).where(db.Job.id == jid, db.Job.state.in_([db.JobState.DONE, db.JobState.FAILED]))
                .values(state=db.JobState.QUEUED, error=None, celery_id=None,
                        **{col: None for col in set(db.Job.STAGE_STAMPS.values())})).rowcount
            if changed != 1:
                raise HTTPError(HTTPStatus.CONFLICT, f"job {jid} changed meanwhile: not re-run")
            priority = job.priority
        log.info("admin API: job %s re-run, asked from %s", jid, req.client)
        try:
            chain_id = jobs.launch(s, jid, priority)
        except Exception as e:  # noqa: BLE001 - the job waits QUEUED; the node sends it when the broker is back
            log.error("admin API: job %s: the broker refused its chain (%s); the node will send it later", jid,
                      scrub(str(e)))
            return Response.json({"id": jid, "state": db.JobState.QUEUED, "launched": False,
                                  "note": "broker unreachable: the node sends the job when it is back"},
                                 HTTPStatus.ACCEPTED)
        return Response.json({"id": jid, "state": db.JobState.QUEUED, "launched": True, "chain": chain_id},
                             HTTPStatus.ACCEPTED)

    def retry_export(self, req: Request) -> Response:
        """Queue one outbox row again, due now (:func:`plugin.outbox.retry`, as ``cmr-ai exports
        retry ID``): a dead, sent or superseded row is reset and sent even if the destination
        already holds it; the node's outbox loop sends it within seconds."""
        from plugin import outbox

        eid = int(req.params["id"])
        res = outbox.retry(self.settings(), [eid])
        if res.missing:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no export with id {eid}")
        if res.busy:
            raise HTTPError(HTTPStatus.CONFLICT, f"export {eid} is being sent right now")
        log.info("admin API: export %s queued again, asked from %s", eid, req.client)
        return Response.json({"id": eid, "state": db.ExportState.PENDING, "queued": True}, HTTPStatus.ACCEPTED)

    def metrics(self, req: Request) -> Response:
        from plugin.metrics import render

        body, content_type = render(self.settings)
        return Response(HTTPStatus.OK, body, content_type)

    def dashboard(self, req: Request) -> Response:
        name = "index.html" if req.path == "/" else req.path.rsplit("/", 1)[-1]
        body = (_DASHBOARD / name).read_bytes()
        return Response(HTTPStatus.OK, body, DASHBOARD_FILES[name], {
            # the page loads nothing but its own script and style, and talks to this server only
            "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                       "form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "cmr-ai"
            protocol_version = "HTTP/1.1"
            timeout = SOCKET_TIMEOUT  # a client silent mid-body (or idle between requests) is let go

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                body = BodyReader(self.rfile, self.headers)
                req = Request(self.command, parts.path.rstrip("/") or "/", parse_qs(parts.query), self.headers,
                              self.client_address[0], body)
                resp = api.dispatch(req)
                # a body not read to its end (a refused request, a STOW-RS stopped early): read a little of it
                # so that the client reads the answer; beyond that, do not parse the rest as the next request
                if not body.complete and (body.truncated or not body.drain(DRAIN_LIMIT)):
                    self.close_connection = True
                self._answer(resp)

            def handle_expect_100(self) -> bool:
                """``Expect: 100-continue``: a request without the token hears 401 before it sends its body."""
                refused = api.refusal(self.command, urlsplit(self.path).path.rstrip("/") or "/", self.headers,
                                      self.client_address[0])
                if refused is None:
                    return super().handle_expect_100()
                self.close_connection = True  # the body it may still send is not a request
                self._answer(refused)
                return False

            def _answer(self, resp: Response) -> None:
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.content_type)
                self.send_header("Content-Length", str(len(resp.body)))
                self.send_header("Cache-Control", "no-store")
                for k, v in (resp.headers or {}).items():
                    self.send_header(k, v)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(resp.body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

            def log_message(self, fmt: str, *args) -> None:  # not to stderr; no query strings in the log
                log.debug("admin API: %s %s", self.client_address[0], fmt % args)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # not a traceback on stderr
                import sys

                exc = sys.exc_info()[1]
                if isinstance(exc, (ConnectionError, TimeoutError)):  # a browser dropping a keep-alive connection
                    log.debug("admin API: %s: %s", client_address[0], exc)
                else:
                    log.error("admin API: request from %s failed", client_address[0], exc_info=True)

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="admin-api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _limit(req: Request) -> int:
    raw = (req.query.get("limit") or [str(DEFAULT_LIMIT)])[-1]
    try:
        n = int(raw)
    except ValueError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"limit {raw!r} is not a whole number") from None
    if not 1 <= n <= MAX_LIMIT:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"limit {n} is out of range 1..{MAX_LIMIT}")
    return n


def _by_state(session, model) -> dict[str, int]:
    rows = session.execute(select(model.state, func.count()).group_by(model.state)).all()
    return {getattr(state, "value", str(state)): n for state, n in rows}
