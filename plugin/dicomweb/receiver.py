"""STOW-RS into the node: ``POST /dicom-web/studies[/{study}]`` on the admin HTTP port (PS3.18 §10.5).

A PACS or a script pushes instances over HTTP; each goes through the same acceptance
path as a C-STORE (:func:`plugin.receive.accept_part10`: structure and UID checks,
fsync + rename, index row committed), and the response is sent only after every part
was accepted or refused — an instance referenced in the response is on disk and in the
database, exactly as a C-STORE success status means.

Request (behind the admin API's bearer token):

- ``Content-Type: multipart/related; type="application/dicom"; boundary=…`` (the
  boundary quoted or not). Each part is one DICOM file (PS3.10) with its own
  ``Content-Type: application/dicom`` (a ``transfer-syntax`` parameter is ignored: the
  File Meta says); a part without a Content-Type is taken as the request's ``type``
  (RFC 2387). The metadata + bulk data form (``type="application/dicom+json"`` or
  ``+xml``) is not supported: 415, with a JSON error naming what is accepted.
- The body is read as it arrives (``Content-Length`` or ``Transfer-Encoding: chunked``),
  one part in memory at a time, never the whole request (:class:`MultipartReader`).
- ``/dicom-web/studies/{study}``: every instance must belong to that study; one of
  another study is not stored (FailureReason 0xA900, the log names both UIDs).

Response: a Store Instances Response (PS3.18 §10.5.3) as ``application/dicom+json``:
(0008,1199) ReferencedSOPSequence for the stored instances, (0008,1198)
FailedSOPSequence, with (0008,1197) FailureReason, for the others (ReferencedSOPClassUID
and ReferencedSOPInstanceUID empty when the part could not be read that far). The
FailureReason is the status a C-STORE would have got (:mod:`plugin.receive`: 0xA700 out
of resources, 0xA900 data set does not match / other study, 0xC210 cannot understand —
also for a part that is not ``application/dicom``). No (0008,1190) RetrieveURL: the node
serves no WADO-RS. No WarningReason: an instance received again is a success whatever
``storage.duplicates`` did with it (``identical``: nothing rewritten, ``replaced``,
``kept``: the first copy stays) — as for C-STORE, whose success status says the same.
The reason for each failure (what the log says, scrubbed) also goes into a ``Warning:
299 cmr-ai "…"`` header (RFC 7234 §5.5, as PS3.18 §8.3.5 uses it), at most
:data:`MAX_WARNINGS` of them.

HTTP status (PS3.18 Table 10.5.3-1):

- 200: every instance stored; 202: some stored, some failed; 409: none stored (the body
  still the response data set).
- 400: a malformed multipart body (no boundary parameter, no boundary in the body, no
  part, a body cut short). The parts complete before the fault *were* handled (stored,
  durably: a client that sends again gets plain successes, the duplicates being
  identical) and the response data set lists them; the message is in the ``Warning``
  header and the log. When not even one part was complete the body is the API's JSON
  error, ``{"error": "…"}``.
- 413: a part larger than :data:`MAX_PART` (read until the cap, then the request stops;
  earlier parts handled as for 400).
- 415: a request that is not ``multipart/related; type="application/dicom"``.
- 401 without the token (the admin API's check).

One INFO line per request: client address, stored, failed, parts, bytes, seconds.
UIDs only; no PHI.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import collapse_rfc2231_value
from http import HTTPStatus
from typing import Callable, Iterator, Optional

from pydicom import Dataset

from plugin.api import HTTPError, Request, Response
from plugin.ingest import Indexer
from plugin.logsafe import scrub
from plugin.receive import CANNOT_UNDERSTAND, Origin, Outcome, Received, accept_part10
from plugin.storage import BadUID, InstanceStore, check_uid

__all__ = ["MAX_PART", "MultipartError", "MultipartReader", "Part", "PartTooLarge", "StowReceiver",
           "TruncatedBody", "iter_parts", "response_dataset"]

log = logging.getLogger("cmr_ai.stow_in")

#: Largest part (one DICOM file) accepted: 2 GiB
MAX_PART = 2 << 30
#: Bytes asked of the body per read
READ_CHUNK = 1 << 20
#: Longest header block of one part
MAX_PART_HEADERS = 16 << 10
#: Longest preamble (bytes before the first boundary) and boundary line padding
MAX_PREAMBLE = 1 << 20
#: Most ``Warning`` header entries in one response (one per failed part)
MAX_WARNINGS = 20

ACCEPTED_TYPE = "application/dicom"
#: Longest boundary accepted. RFC 2046 says 70, but Orthanc's DICOMweb plugin (1.7) sends 73
#: (two UUIDs joined by a dash), so the limit is relaxed; the characters are RFC 2046's bchars.
MAX_BOUNDARY = 200
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,%d}[0-9A-Za-z'()+_,\-./:=?]" % (MAX_BOUNDARY - 1))


class MultipartError(ValueError):
    """A malformed ``multipart/related`` body; the message says what and where."""

    status = HTTPStatus.BAD_REQUEST


class TruncatedBody(MultipartError):
    """The body ended (or the connection closed) before the close delimiter."""


class PartTooLarge(MultipartError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


@dataclass
class Part:
    """One body part: its number (from 1), its header fields and its bytes."""

    index: int
    headers: Message
    data: bytearray

    @property
    def content_type(self) -> Optional[str]:
        """The part's media type, lower case, without parameters; None when it has no Content-Type."""
        return self.headers.get_content_type() if self.headers.get("Content-Type") is not None else None


class MultipartReader:
    """Reads a ``multipart/*`` body (RFC 2046 §5.1.1) from ``read(n)``, yielding one :class:`Part` at a time.

    Only the part being read is held in memory (plus at most one read chunk). The
    delimiter is CRLF ``--boundary``; the first one may open the body without the CRLF.
    A preamble (before it) and an epilogue (after the close delimiter ``--boundary--``)
    are dropped; transport padding (spaces, tabs) after a boundary is allowed.

    Parameters
    ----------
    read:
        Returns up to ``n`` bytes, ``b""`` at the end of the body.
    boundary:
        The boundary parameter (unquoted).
    max_part:
        A part with more bytes raises :class:`PartTooLarge`, read no further.

    Raises
    ------
    MultipartError
        An invalid boundary, none in the body, bytes after a boundary other than padding
        and CRLF, a header block too long; :class:`TruncatedBody` when the body ends before
        the close delimiter.
    """

    def __init__(self, read: Callable[[int], bytes], boundary: str, *, max_part: int = MAX_PART,
                 chunk: int = READ_CHUNK):
        if not _BOUNDARY.fullmatch(boundary or ""):
            raise MultipartError(f"boundary {boundary[:80]!r} is not a valid multipart boundary (RFC 2046 "
                                 f"characters, 1 to {MAX_BOUNDARY} of them, no trailing space)")
        self._read, self.max_part, self.chunk = read, max_part, chunk
        self.delimiter = b"\r\n--" + boundary.encode("ascii")
        self._buf = bytearray(b"\r\n")  # so that a boundary opening the body is a delimiter like the others
        self._eof = False
        self.parts = 0  # parts read completely

    def _fill(self) -> bool:
        """Append one read to the buffer; False at the end of the body."""
        if self._eof:
            return False
        data = self._read(self.chunk)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def __iter__(self) -> Iterator[Part]:
        delim, n = self.delimiter, len(self.delimiter)
        # preamble: drop everything up to the first delimiter
        skipped = 0
        while (i := self._buf.find(delim)) < 0:
            drop = max(0, len(self._buf) - (n - 1))
            skipped += drop
            del self._buf[:drop]
            if skipped > MAX_PREAMBLE:
                raise MultipartError(f"no boundary in the first {MAX_PREAMBLE} bytes of the body")
            if not self._fill():
                raise MultipartError("the body holds no boundary line: not a multipart body with the boundary "
                                     "of its Content-Type" if skipped or len(self._buf) > 2 else "the body is empty")
        del self._buf[:i + n]
        while True:
            # after a delimiter: "--" (the close delimiter) or transport padding and CRLF
            while len(self._buf) < 2 and self._fill():
                pass
            if self._buf[:2] == b"--":
                if self.parts == 0:
                    raise MultipartError("the multipart body holds no part")
                return  # the epilogue, if any, is dropped
            while (eol := self._buf.find(b"\r\n")) < 0:
                if len(self._buf) > 1024:
                    break
                if not self._fill():
                    raise TruncatedBody(f"the body ends after the boundary that opens part {self.parts + 1} (no "
                                        "close delimiter)" if self.parts else "the body ends after its first boundary")
            if eol < 0 or self._buf[:eol].strip(b" \t"):
                raise MultipartError(f"unexpected bytes after the boundary that opens part {self.parts + 1} (a "
                                     "boundary line ends with CRLF)")
            del self._buf[:eol + 2]
            index = self.parts + 1
            # the part's header fields, up to the empty line (none: the part opens with CRLF)
            while not self._buf.startswith(b"\r\n") and (end := self._buf.find(b"\r\n\r\n")) < 0:
                if len(self._buf) > MAX_PART_HEADERS:
                    raise MultipartError(f"part {index}: no end of its header fields in {MAX_PART_HEADERS} bytes")
                if not self._fill():
                    raise TruncatedBody(f"the body ends in the header fields of part {index}")
            if self._buf.startswith(b"\r\n"):
                headers, start = Message(), 2
            else:
                headers = BytesHeaderParser().parsebytes(bytes(self._buf[:end + 4]))
                start = end + 4
            del self._buf[:start]
            # the part's bytes, up to the next delimiter
            search = 0
            while (i := self._buf.find(delim, search)) < 0:
                search = max(0, len(self._buf) - (n - 1))
                if search > self.max_part:
                    raise PartTooLarge(f"part {index} is larger than {self.max_part} bytes: not read further")
                if not self._fill():
                    raise TruncatedBody(f"the body ends inside part {index} ({len(self._buf)} bytes of it received, "
                                        "no boundary after them)")
            if i > self.max_part:
                raise PartTooLarge(f"part {index} is larger than {self.max_part} bytes")
            rest = bytearray(self._buf[i + n:])
            data = self._buf
            del data[i:]  # in place: the part's bytes are not copied
            self._buf = rest
            self.parts = index
            yield Part(index, headers, data)
            del data  # not held while the next part is read


def iter_parts(read: Callable[[int], bytes], boundary: str, **kw) -> Iterator[Part]:
    """``iter(MultipartReader(read, boundary, **kw))``."""
    return iter(MultipartReader(read, boundary, **kw))


def response_dataset(outcomes: list[Outcome]) -> Dataset:
    """The Store Instances Response (PS3.18 §10.5.3) for the outcomes, in order."""
    ds = Dataset()
    referenced, failed = [], []
    for o in outcomes:
        item = Dataset()
        item.ReferencedSOPClassUID = o.sop_class_uid or ""
        item.ReferencedSOPInstanceUID = o.sop_instance_uid or ""
        if o.ok:
            referenced.append(item)
        else:
            item.FailureReason = o.status
            failed.append(item)
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if failed:
        ds.FailedSOPSequence = failed
    return ds


def _warning(texts: list[str]) -> str:
    """A ``Warning`` header value: ``299 cmr-ai "text"`` entries (quoted-string, ASCII)."""
    out = []
    for t in texts[:MAX_WARNINGS]:
        t = " ".join(scrub(t).split()).encode("ascii", "replace").decode()[:300]
        out.append('299 cmr-ai "' + t.replace("\\", "\\\\").replace('"', '\\"') + '"')
    if len(texts) > MAX_WARNINGS:
        out.append(f'299 cmr-ai "and {len(texts) - MAX_WARNINGS} more (see the node\'s log)"')
    return ", ".join(out)


def _param(headers: Message, name: str) -> Optional[str]:
    value = headers.get_param(name)
    return None if value is None else collapse_rfc2231_value(value)


class StowReceiver:
    """The handler of ``POST /dicom-web/studies[/{study}]`` (registered by
    :meth:`plugin.api.AdminAPI.enable_stow`)."""

    def __init__(self, store: InstanceStore, indexer: Indexer, *,
                 on_stored: Optional[Callable[[Received], None]] = None, max_part: int = MAX_PART):
        self.store, self.indexer, self.on_stored, self.max_part = store, indexer, on_stored, max_part

    def __call__(self, req: Request) -> Response:
        t0 = time.monotonic()
        headers = req.headers
        media = headers.get_content_type() if headers.get("Content-Type") is not None else None
        part_type = (_param(headers, "type") or ACCEPTED_TYPE).split(";")[0].strip().lower()
        if media != "multipart/related" or part_type != ACCEPTED_TYPE:
            given = " ".join((headers.get("Content-Type") or "none").split())[:200]
            raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            f'Content-Type {given} is not supported: this STOW-RS service accepts multipart/related; '
                            f'type="{ACCEPTED_TYPE}" (each part one DICOM PS3.10 file), not the metadata and bulk data '
                            'form (application/dicom+json, application/dicom+xml)')
        boundary = _param(headers, "boundary")
        if not boundary:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the Content-Type multipart/related has no boundary parameter")
        study = req.params.get("study")
        if study is not None:
            try:
                study = check_uid(study, "the study in the URL")
            except BadUID as e:
                raise HTTPError(HTTPStatus.BAD_REQUEST, str(e)) from None
        origin = Origin("STOW-RS", req.client, "", req.client)
        stream = req.stream()
        outcomes: list[Outcome] = []
        reasons: list[str] = []
        error: Optional[tuple[int, str]] = None
        try:
            for part in MultipartReader(stream.read, boundary, max_part=self.max_part):
                ctype = part.content_type or part_type
                if ctype != ACCEPTED_TYPE:
                    reason = f"Content-Type {ctype}, not {ACCEPTED_TYPE}"
                    log.error("STOW-RS part %d from %s refused (0x%04X): %s", part.index, req.client,
                              CANNOT_UNDERSTAND, reason)
                    outcome = Outcome(CANNOT_UNDERSTAND, reason)
                else:
                    outcome = accept_part10(self.store, self.indexer, origin, part.data, self.on_stored, study=study)
                del part  # the next part is read into fresh memory
                outcomes.append(outcome)
                if not outcome.ok:
                    uid = f" ({outcome.sop_instance_uid})" if outcome.sop_instance_uid else ""
                    reasons.append(f"part {len(outcomes)}{uid}: 0x{outcome.status:04X} {outcome.reason}")
        except MultipartError as e:
            error = (e.status, str(e))
        except HTTPError as e:  # the body breaks HTTP framing (chunks)
            error = (e.status, e.message)
        except OSError as e:  # the connection timed out or was reset mid-body
            error = (HTTPStatus.BAD_REQUEST, f"the body was cut short: {type(e).__name__}")
        if error is None and stream.truncated:
            error = (HTTPStatus.BAD_REQUEST, "the connection closed before the end of the body")
        stored = sum(o.ok for o in outcomes)
        failed = len(outcomes) - stored
        seconds = time.monotonic() - t0
        log.info("STOW-RS from %s%s: %d stored, %d failed (%d parts, %d bytes, %.2f s)%s", req.client,
                 f" into study {study}" if study else "", stored, failed, len(outcomes), stream.bytes_read, seconds,
                 f"; request refused ({error[0]}): {error[1]}" if error else "")
        if error is not None:
            if not outcomes:
                return Response.json({"error": error[1]}, error[0])
            status, extra = error[0], [error[1]]
        else:
            status = HTTPStatus.OK if not failed else HTTPStatus.ACCEPTED if stored else HTTPStatus.CONFLICT
            extra = []
        body = response_dataset(outcomes).to_json().encode()
        warnings = extra + reasons
        return Response(status, body, "application/dicom+json",
                        {"Warning": _warning(warnings)} if warnings else None)
