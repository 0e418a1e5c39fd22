"""Pull studies from a DICOMweb archive (``sources:``): QIDO-RS to find them, WADO-RS to fetch them.

:func:`pull_study` fetches one study: a QIDO-RS instance listing (paged with
``offset``), then the instances this node lacks — the whole study in one WADO-RS
request when none of it is here yet, else one request per missing instance (so a
pull cut short resumes with what is missing). Each part of the multipart answer goes
to :func:`plugin.receive.accept_part10` as it arrives (one instance in memory at a
time; the data set bytes reach the disk as the archive sent them) — the same checks,
store and index as C-STORE, so routing and jobs follow the same path.

:class:`Poller` asks a source for new studies every ``poll_every`` seconds (the
source's ``query`` plus a ``StudyDate`` window of ``window_days``) and pulls what is
new, grew, or failed and is due again; an archive that fails or times out is asked
again after a back-off doubling from ``poll_every`` up to ``max_backoff``.

The :class:`plugin.db.SourceStudy` row of a study is the poller's memory and the
hold on routing: PULLING with a heartbeat fresher than :data:`PULL_STALE_SECONDS`
(refreshed as bytes arrive) or FAILED keeps the node from routing a half-pulled
study (:func:`plugin.node.held_studies`); DONE lets it go.

Found with Orthanc 1.10 and its DICOMweb plugin 1.7:

- ``Accept: multipart/related; type="application/dicom"; transfer-syntax=*`` returns
  each instance in its stored transfer syntax (JPEG Lossless stays JPEG Lossless);
  without ``transfer-syntax=*`` Orthanc transcodes to Explicit VR Little Endian.
  A server that refuses ``*`` (406) is asked again without it.
- QIDO-RS on an unknown study answers 200 with ``[]``; WADO-RS answers 404 with a JSON
  body whose ``Details`` say why: an empty listing is followed by the study request
  so the user sees the archive's own message.
- QIDO-RS honours ``limit``/``offset`` at instance level (an offset past the end: ``[]``).

dicomweb-client's ``retrieve_*`` methods decode every instance with pydicom (and
re-encode on write): the raw parts are read with its (private, version-pinned)
``_http_get(stream=True)`` and ``_decode_multipart_message`` instead. That decoder
yields a truncated last part when the connection ends cleanly before the closing
boundary; the stream is watched for the closing delimiter, and such a part is
dropped (a mid-transfer failure), never stored.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

import requests
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from plugin import db
from plugin.config import Settings, Source
from plugin.ingest import Indexer
from plugin.receive import OUT_OF_RESOURCES, Origin, accept_part10
from plugin.storage import InstanceStore

__all__ = ["PULL_STALE_SECONDS", "PollResult", "Poller", "PullError", "PullResult", "pull_study"]

log = logging.getLogger("cmr_ai.pull")

#: A PULLING row whose heartbeat is older than this no longer holds the study back from
#: routing (the puller died), and the poller takes it up again.
PULL_STALE_SECONDS = 120
#: Seconds between heartbeat writes while bytes arrive (well under PULL_STALE_SECONDS).
HEARTBEAT_EVERY = 5.0
#: Instances asked for per QIDO-RS page.
PAGE = 1000
#: Back-off base for a failed study when the source is on-demand only (poll_every 0).
ON_DEMAND_BACKOFF = 60.0

ACCEPT_STORED_TS = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ACCEPT_DEFAULT_TS = 'multipart/related; type="application/dicom"'
_BODY_CHARS = 300


class PullError(Exception):
    """A pull or query failed; the message is what the archive said (or why it could not).

    ``kind``: ``http`` (an error status), ``connection`` (cannot reach), ``timeout``,
    ``transfer`` (cut short / malformed answer), ``node`` (this node could not store).
    """

    def __init__(self, message: str, kind: str = "http", status: Optional[int] = None):
        super().__init__(message)
        self.kind, self.status = kind, status

    @property
    def unreachable(self) -> bool:
        """The archive itself is down or silent (worth backing off the whole source for)."""
        return self.kind in ("connection", "timeout")


@dataclass(frozen=True)
class Listed:
    """One instance of the archive's QIDO-RS listing."""

    series_instance_uid: str
    sop_instance_uid: str


@dataclass
class PullResult:
    """What one pull did. ``listed``: instances the archive listed; ``stored``: fetched and
    stored now; ``already``: listed and already here; ``ours``: listed but our own output
    sent back (never pulled); ``failed``: (SOP Instance UID, reason) the node refused;
    ``requests``: WADO-RS requests made."""

    source: str
    study_instance_uid: str
    listed: int = 0
    stored: int = 0
    already: int = 0
    ours: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        text = (f"{self.listed} listed, {self.stored} stored, {self.already} already here"
                + (f", {self.ours} of our own output skipped" if self.ours else ""))
        if self.failed:
            text += f", {len(self.failed)} refused"
        return text


@dataclass
class PollResult:
    """One poll: ``found`` studies in the answer, the pulls made, studies skipped (done,
    being pulled elsewhere, failed and not due), and failed pulls (study UID, message)."""

    found: int = 0
    pulled: list[PullResult] = field(default_factory=list)
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------
# archive errors

def _body_text(response: Optional[requests.Response]) -> str:
    if response is None:
        return ""
    try:
        raw = b""
        for chunk in response.iter_content(4096):
            raw += chunk
            if len(raw) >= 4096:
                break
        text = raw.decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - the status says enough
        return ""
    return " ".join(text.split())[:_BODY_CHARS]


def _cause(e: BaseException) -> str:
    """The innermost useful reason of a requests/urllib3 error ("[Errno 111] Connection refused")."""
    text = str(e)
    m = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if m:
        return m.group(0).strip()
    m = re.search(r"Caused by \w+\(['\"]?(?:<[^>]*>: )?([^'\"]+)", text)
    if m:
        return m.group(1).strip().rstrip(",")
    return text[:_BODY_CHARS]


def _is_read_timeout(e: BaseException) -> bool:
    from urllib3.exceptions import ReadTimeoutError

    seen = set()
    stack: list[Any] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, (ReadTimeoutError, requests.Timeout, TimeoutError)):
            return True
        if isinstance(x, BaseException):
            stack += [x.__cause__, x.__context__, getattr(x, "reason", None), *x.args]
    return "timed out" in str(e).lower()


def _archive_error(e: Exception, url: str, timeout: float) -> PullError:
    """A request that failed before its answer started to arrive."""
    if isinstance(e, PullError):
        return e
    if isinstance(e, requests.HTTPError) and e.response is not None:
        r = e.response
        body = _body_text(r)
        return PullError(f"HTTP {r.status_code} {r.reason or ''} from {url}".replace("  ", " ")
                         + (f": {body}" if body else ""), "http", r.status_code)
    if isinstance(e, requests.ConnectTimeout):
        return PullError(f"cannot reach {url}: timed out after {timeout:g} s connecting", "timeout")
    if isinstance(e, requests.Timeout) or (isinstance(e, requests.ConnectionError) and _is_read_timeout(e)):
        return PullError(f"timed out after {timeout:g} s waiting for {url}", "timeout")
    if isinstance(e, requests.ConnectionError):
        return PullError(f"cannot reach {url}: {_cause(e)}", "connection")
    if isinstance(e, ValueError):  # a QIDO answer that is not JSON …
        return PullError(f"unreadable answer from {url}: {e}", "transfer")
    return PullError(f"{url}: {type(e).__name__}: {e}", "connection")


def _transfer_error(e: Exception, url: str, timeout: float, got: int, wanted: int) -> PullError:
    """A request that failed while its answer arrived."""
    if isinstance(e, PullError):
        return e
    if _is_read_timeout(e):
        return PullError(f"timed out after {timeout:g} s mid-transfer after {got} of {wanted} instances from {url}",
                         "timeout")
    if isinstance(e, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return PullError(f"connection closed mid-transfer after {got} of {wanted} instances from {url}: "
                         f"{_cause(e)}", "transfer")
    if isinstance(e, ValueError):
        return PullError(f"malformed multipart answer from {url} after {got} of {wanted} instances: {e}",
                         "transfer")
    return PullError(f"{url} after {got} of {wanted} instances: {type(e).__name__}: {e}", "transfer")


# ---------------------------------------------------------------------------
# the SourceStudy row

def _backoff(src: Source, attempts: int) -> float:
    base = src.poll_every if src.poll_every > 0 else ON_DEMAND_BACKOFF
    return min(src.max_backoff, base * 2 ** max(0, attempts - 1))


def _row(s, source: str, study_uid: str) -> Optional[db.SourceStudy]:
    return s.scalar(select(db.SourceStudy).where(db.SourceStudy.source == source,
                                                 db.SourceStudy.study_instance_uid == study_uid))


def _set_row(url: str, source: str, study_uid: str, fn: Callable[[db.SourceStudy], None]) -> None:
    """Create the row if needed and apply ``fn`` to it, in one transaction (a concurrent
    insert of the same row is retried as an update)."""
    for attempt in range(2):
        try:
            with db.session_scope(url) as s:
                row = _row(s, source, study_uid)
                if row is None:
                    row = db.SourceStudy(source=source, study_instance_uid=study_uid, state=db.PullState.PULLING,
                                         pulled=0, attempts=0, first_seen=db.utcnow())
                    s.add(row)
                fn(row)
            return
        except IntegrityError:
            if attempt:
                raise


class _Heartbeat:
    """Refreshes the row's heartbeat (and pulled count) at most every HEARTBEAT_EVERY seconds."""

    def __init__(self, url: str, source: str, study_uid: str):
        self.url, self.source, self.study_uid = url, source, study_uid
        self.stored = 0
        self._last = time.monotonic()

    def beat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < HEARTBEAT_EVERY:
            return
        self._last = now
        try:
            with db.session_scope(self.url) as s:
                row = _row(s, self.source, self.study_uid)
                if row is not None:
                    row.heartbeat = db.utcnow()
        except Exception as e:  # noqa: BLE001 - a missed heartbeat must not stop the transfer
            log.warning("source %s: study %s: cannot refresh the pull heartbeat: %s", self.source,
                        self.study_uid, e)


# ---------------------------------------------------------------------------
# QIDO-RS and WADO-RS

def _uid(item: dict, tag: str) -> str:
    v = (item.get(tag) or {}).get("Value") or [""]
    return str(v[0] or "")


def list_instances(client, study_uid: str, timeout: float) -> list[Listed]:
    """The archive's instances of a study (QIDO-RS, paged with limit/offset until an empty
    page or a page with nothing new — a server that ignores ``offset`` ends the loop)."""
    url = client._get_instances_url(_qido(), study_uid)
    out: dict[str, Listed] = {}
    offset = 0
    while True:
        try:
            page = client.search_for_instances(study_instance_uid=study_uid, limit=PAGE, offset=offset)
        except Exception as e:  # noqa: BLE001 - mapped to the archive's message
            raise _archive_error(e, url, timeout) from None
        new = 0
        for item in page:
            sop = _uid(item, "00080018")
            if sop and sop not in out:
                out[sop] = Listed(_uid(item, "0020000E"), sop)
                new += 1
        if not page or not new:
            return list(out.values())
        offset += len(page)


def _qido():
    from dicomweb_client.web import _Transaction

    return _Transaction.SEARCH


def _wado():
    from dicomweb_client.web import _Transaction

    return _Transaction.RETRIEVE


class _Watched:
    """Wraps ``response.iter_content``: counts bytes (heartbeat) and notes whether the
    closing multipart delimiter arrived before the stream ended."""

    def __init__(self, response: requests.Response, boundary: Optional[bytes], heartbeat: _Heartbeat):
        self.closing = b"\r\n--" + boundary + b"--" if boundary else None
        self.closed = False
        self.ended = False
        self._orig = response.iter_content
        self._heartbeat = heartbeat
        response.iter_content = self.iter_content  # type: ignore[method-assign]

    def iter_content(self, chunk_size: int = 1 << 20, decode_unicode: bool = False) -> Iterator[bytes]:
        tail = b"\r\n"  # a body that is only the closing delimiter has no CRLF before it
        for chunk in self._orig(chunk_size=chunk_size):
            if self.closing and not self.closed:
                look = tail + chunk
                if self.closing in look:
                    self.closed = True
                tail = look[-len(self.closing):]
            self._heartbeat.beat()
            yield chunk
        self.ended = True


def _boundary(content_type: str) -> Optional[bytes]:
    for item in content_type.split(";")[1:]:
        attr, _, value = item.strip().partition("=")
        if attr.lower() == "boundary":
            return value.strip().strip('"').encode()
    return None


def _retrieve(client, url: str, timeout: float, heartbeat: _Heartbeat) -> Iterator[bytes]:
    """The PS3.10 files of one WADO-RS answer, one at a time, as sent."""
    response = None
    for accept in (ACCEPT_STORED_TS, ACCEPT_DEFAULT_TS):
        try:
            response = client._http_get(url, headers={"Accept": accept}, stream=True)
            break
        except requests.HTTPError as e:
            if e.response is not None and e.response.status_code == 406 and accept == ACCEPT_STORED_TS:
                log.info("%s refuses transfer-syntax=* (406): asking for its default transfer syntax", url)
                e.response.close()
                continue
            raise _archive_error(e, url, timeout) from None
        except Exception as e:  # noqa: BLE001
            raise _archive_error(e, url, timeout) from None
    assert response is not None
    content_type = response.headers.get("Content-Type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == "application/dicom":  # one instance, not wrapped in multipart
        watched = _Watched(response, None, heartbeat)
        with response:
            yield b"".join(watched.iter_content())
        return
    if media != "multipart/related":
        response.close()
        raise PullError(f"unexpected Content-Type {content_type or '(none)'!r} from {url} (expected "
                        "multipart/related; type=\"application/dicom\")", "transfer")
    watched = _Watched(response, _boundary(content_type), heartbeat)
    try:
        for part in client._decode_multipart_message(response, stream=True):
            if watched.ended and watched.closing and not watched.closed:
                # the connection ended without the closing boundary: this last part is cut short
                raise requests.exceptions.ChunkedEncodingError("the answer ended before its closing boundary")
            if watched.ended and watched.closed:
                continue  # an epilogue after the closing boundary
            yield bytes(part)
        if watched.closing and not watched.closed:  # ended right after a part's delimiter
            raise requests.exceptions.ChunkedEncodingError("the answer ended before its closing boundary")
    finally:
        response.close()


# ---------------------------------------------------------------------------
# one study

def _known(settings: Settings, uids: list[str]) -> tuple[set[str], set[str]]:
    """(SOP Instance UIDs already in the index, those that are our own exports) among ``uids``."""
    here: set[str] = set()
    ours: set[str] = set()
    with db.session_scope(settings.database.url) as s:
        for i in range(0, len(uids), 500):
            chunk = uids[i:i + 500]
            here.update(s.scalars(select(db.Instance.sop_instance_uid)
                                  .where(db.Instance.sop_instance_uid.in_(chunk))))
            ours.update(s.scalars(select(db.Export.sop_instance_uid)
                                  .where(db.Export.sop_instance_uid.in_(chunk), db.Export.kind != "original")))
    return here - ours, ours


def _origin(name: str, src: Source) -> Origin:
    return Origin("WADO-RS", f"source {name}", "", urlparse(src.dicomweb.url).hostname or "")


def _client(src: Source):
    from plugin.dicomweb.stow import client

    try:
        return client(src.dicomweb)
    except OSError as e:
        raise PullError(f"cannot read the token_file of {src.dicomweb.url}: {e}", "connection") from None


def pull_study(settings: Settings, source: str, study_uid: str, *, store: InstanceStore, indexer: Indexer,
               progress=None, archive_instances: Optional[int] = None) -> PullResult:
    """Fetch the instances of one study that this node lacks from source ``source``.

    Parameters
    ----------
    progress:
        A :class:`plugin.progress.Bars`: one bar over the listed instances.
    archive_instances:
        The study's NumberOfStudyRelatedInstances from the poller's query (recorded on the
        row; default: the length of the listing).

    Returns
    -------
    PullResult
        The row is DONE when every listed instance is here, refused instances included
        (they are listed in ``failed``; bad data does not get better by asking again).

    Raises
    ------
    PullError
        With the archive's message, after the row was set FAILED (attempts + 1,
        next_attempt after the back-off). Also when the node could not store an instance
        (disk full, database down: 0xA700), so that it is tried again.
    ValueError
        ``source`` is not in ``settings.sources``.
    """
    try:
        src = settings.sources[source]
    except KeyError:
        raise ValueError(f"no source {source!r} in the config (defined: {', '.join(settings.sources) or 'none'})") \
            from None
    t0 = time.monotonic()
    url_db = settings.database.url
    timeout = src.dicomweb.timeout
    result = PullResult(source, study_uid)
    heartbeat = _Heartbeat(url_db, source, study_uid)
    task = None

    def fail(e: PullError) -> PullError:
        def apply(row: db.SourceStudy) -> None:
            row.state = db.PullState.FAILED
            row.attempts = (row.attempts or 0) + 1
            row.error = str(e)
            row.pulled = (row.pulled or 0) + result.stored
            row.heartbeat = db.utcnow()
            row.next_attempt = db.utcnow() + timedelta(seconds=_backoff(src, row.attempts))
            if archive_instances is not None:
                row.archive_instances = archive_instances

        _set_row(url_db, source, study_uid, apply)
        result.seconds = time.monotonic() - t0
        if task is not None:
            task.done()
        return e

    try:
        client = _client(src)
        listing = list_instances(client, study_uid, timeout)
    except PullError as e:
        raise fail(e) from None
    result.listed = len(listing)
    here, ours = _known(settings, [x.sop_instance_uid for x in listing])
    result.already, result.ours = len(here), len(ours)
    missing = {x.sop_instance_uid: x for x in listing if x.sop_instance_uid not in here and x.sop_instance_uid not in ours}
    if progress is not None:
        task = progress.add(f"pulling {study_uid} from {source}", total=len(listing) or None)
        task.advance(len(here) + len(ours))
    if listing and not missing:
        _finish(url_db, source, study_uid, result, archive_instances)
        result.seconds = time.monotonic() - t0
        if task is not None:
            task.done()
        return result

    def start(row: db.SourceStudy) -> None:
        row.state = db.PullState.PULLING
        row.heartbeat = db.utcnow()
        row.archive_instances = archive_instances if archive_instances is not None else len(listing)

    _set_row(url_db, source, study_uid, start)
    store_failures: list[str] = []
    origin = _origin(source, src)

    def fetch(url: str, wanted: int) -> None:
        got = 0
        try:
            for data in _retrieve(client, url, timeout, heartbeat):
                got += 1
                outcome = accept_part10(store, indexer, origin, data)
                del data
                sop = outcome.sop_instance_uid
                missing.pop(sop, None)
                if outcome.ok:
                    result.stored += 1
                else:
                    result.failed.append((sop or "(unknown)", outcome.reason))
                    if outcome.status == OUT_OF_RESOURCES:
                        store_failures.append(outcome.reason)
                if task is not None:
                    task.advance()
                heartbeat.beat()
        except PullError:
            raise
        except Exception as e:  # noqa: BLE001 - requests/urllib3/decoder errors
            raise _transfer_error(e, url, timeout, got, wanted) from None

    try:
        if not here and not ours:  # nothing here yet: the whole study in one request
            result.requests += 1
            fetch(client._get_studies_url(_wado(), study_uid), len(missing) or len(listing))
        for item in list(missing.values()):  # what is still missing, one request each
            if item.sop_instance_uid not in missing:
                continue  # came with an earlier answer
            result.requests += 1
            fetch(client._get_instances_url(_wado(), study_uid, item.series_instance_uid, item.sop_instance_uid), 1)
        if store_failures:
            raise PullError(f"this node could not store {len(store_failures)} instance(s): {store_failures[0]}",
                            "node")
    except PullError as e:
        raise fail(e) from None
    if not listing and not result.stored and not result.failed:
        raise fail(PullError(f"the archive lists no instance of study {study_uid} and sent none", "http"))
    if missing:  # the archive answered without them (nothing raised): not complete
        raise fail(PullError(f"the archive did not send {len(missing)} listed instance(s), e.g. "
                             f"{next(iter(missing))}", "transfer"))
    _finish(url_db, source, study_uid, result, archive_instances)
    result.seconds = time.monotonic() - t0
    if task is not None:
        task.done()
    return result


def _finish(url_db: str, source: str, study_uid: str, result: PullResult, archive_instances: Optional[int]) -> None:
    def done(row: db.SourceStudy) -> None:
        row.state = db.PullState.DONE
        row.attempts = 0
        row.pulled = (row.pulled or 0) + result.stored
        row.error = (f"{len(result.failed)} instance(s) refused by this node: {result.failed[0][0]}: "
                     f"{result.failed[0][1]}" if result.failed else None)
        row.heartbeat = db.utcnow()
        row.finished_at = db.utcnow()
        row.next_attempt = None
        row.archive_instances = archive_instances if archive_instances is not None else result.listed

    _set_row(url_db, source, study_uid, done)


# ---------------------------------------------------------------------------
# the poller

def _query_value(v: Any) -> str:
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


class Poller:
    """Polls source ``source`` for new studies and pulls them.

    ``get_settings`` is called at every poll, so a reloaded config (query, window,
    intervals) applies from the next poll; a source removed from the config, or set to
    ``poll_every: 0``, is not polled until it is back.
    """

    def __init__(self, get_settings: Callable[[], Settings], source: str, store: InstanceStore, indexer: Indexer):
        self.get_settings, self.source, self.store, self.indexer = get_settings, source, store, indexer
        self._warned_limit = False

    def _filters(self, src: Source, today: Optional[date] = None) -> dict[str, str]:
        filters = {k: _query_value(v) for k, v in src.query.items()}
        if src.window_days > 0:
            first = (today or date.today()) - timedelta(days=src.window_days)
            filters["StudyDate"] = first.strftime("%Y%m%d") + "-"
        return filters

    def poll_once(self) -> PollResult:
        """One QIDO-RS study query, then a pull of every study that is new, grew in the
        archive, was left PULLING by a puller that died, or FAILED and is due again.

        Raises
        ------
        PullError
            When the query fails, or a pull finds the archive unreachable (the rest of
            this round would fail the same way); other failed pulls are recorded on their
            rows, logged, and listed in ``PollResult.failed``.
        """
        settings = self.get_settings()
        src = settings.sources[self.source]
        client = _client(src)
        url = client._get_studies_url(_qido())
        try:
            studies = client.search_for_studies(search_filters=self._filters(src),
                                                fields=["NumberOfStudyRelatedInstances"], limit=src.limit)
        except Exception as e:  # noqa: BLE001
            raise _archive_error(e, url, src.dicomweb.timeout) from None
        result = PollResult(found=len(studies))
        if len(studies) >= src.limit and not self._warned_limit:
            self._warned_limit = True
            log.warning("source %s: the archive answered %d studies, the query's limit: later ones are missed "
                        "until these leave the window (raise limit or lower window_days)", self.source, len(studies))
        now = db.utcnow()
        stale = now - timedelta(seconds=PULL_STALE_SECONDS)
        for item in studies:
            uid = _uid(item, "0020000D")
            if not uid:
                continue
            count_v = (item.get("00201208") or {}).get("Value") or [None]
            try:
                count = int(count_v[0]) if count_v[0] is not None else None
            except (TypeError, ValueError):
                count = None
            with db.session_scope(settings.database.url) as s:
                row = _row(s, self.source, uid)
                state = row.state if row else None
                due = (row is None or
                       (state == db.PullState.DONE and count is not None and count > (row.archive_instances or 0)) or
                       (state == db.PullState.FAILED and (row.next_attempt is None or row.next_attempt <= now)) or
                       (state == db.PullState.PULLING and (row.heartbeat is None or row.heartbeat < stale)))
            if not due:
                result.skipped += 1
                continue
            try:
                pulled = pull_study(settings, self.source, uid, store=self.store, indexer=self.indexer,
                                    archive_instances=count)
            except PullError as e:
                result.failed.append((uid, str(e)))
                log.warning("source %s: pulling study %s failed: %s", self.source, uid, e)
                if e.unreachable:
                    raise
                continue
            result.pulled.append(pulled)
            log.info("source %s: pulled study %s: %s in %.1f s", self.source, uid, pulled.summary(), pulled.seconds)
        return result

    def run(self, stop: threading.Event) -> None:
        """Poll every ``poll_every`` seconds until ``stop`` is set; never raises.

        A failed query (or an unreachable archive) logs one WARNING with the archive's
        message and the delay before the next try: ``poll_every``, doubling up to
        ``max_backoff``, back to ``poll_every`` after a poll that worked.
        """
        delay_failed = 0.0
        while not stop.is_set():
            try:
                settings = self.get_settings()
                src = settings.sources.get(self.source)
            except Exception:  # noqa: BLE001
                log.exception("source %s: cannot read the settings", self.source)
                src = None
            if src is None or src.poll_every <= 0:
                stop.wait(1.0)  # removed or on-demand only (a reload may bring it back)
                continue
            try:
                self.poll_once()
            except PullError as e:
                delay_failed = min(src.max_backoff, delay_failed * 2 if delay_failed else src.poll_every)
                log.warning("source %s: %s; next try in %g s", self.source, e, delay_failed)
                stop.wait(delay_failed)
                continue
            except Exception as e:  # noqa: BLE001 - a bug or a database problem: keep polling
                delay_failed = min(src.max_backoff, delay_failed * 2 if delay_failed else src.poll_every)
                log.exception("source %s: poll failed (%s); next try in %g s", self.source, e, delay_failed)
                stop.wait(delay_failed)
                continue
            delay_failed = 0.0
            stop.wait(src.poll_every)
