"""The export outbox: one row per (job, destination, object); sent, retried, confirmed, or dead.

Objects are the results of an analysis job (SR, SC) or, for a forward job, the
study's original instances as received (``kind`` "original"): both go through the
same rows, exporters, back-off and dead letters.

The life of a row (:class:`plugin.db.ExportState`)::

    enqueue ─► pending ──flush: delivered──► sent ──(verify: confirmed)──► sent + confirmed_at
     │           ▲  │                         │
     │           │  ├─ retryable failure ─► pending (next_attempt_at = now + 2^attempts s, ≤ 300 s)
     │           │  ├─ permanent failure, or attempts = max_attempts ─► dead
     │           │  ├─ the destination already holds this content ─► sent, duplicate_of = N, never sent
     │           │  └─ a newer row of the same object was delivered ─► superseded (or sent, duplicate)
     │           └──── not confirmed by verify_timeout / commitment failed: pending again (re-sent), or dead
     └─ the destination already holds this content (same SOP Instance UID, same digest) ─► sent, duplicate_of
    dead / sent / superseded ──``cmr-ai exports retry``──► pending (sent even if already delivered)

Rows are written in the same transaction that records the results
(:func:`enqueue`), so nothing is forgotten by a crash. :func:`flush` claims due
rows with one UPDATE that stamps them with its own token (pushing
``next_attempt_at`` forward), re-checks and extends the claim before each batch,
and records an outcome only on rows that still carry its token: two flushers
(the node's loop, a worker's ``report`` task, ``cmr-ai exports retry --now``)
never send the same row. Each destination gets one association / request per
batch; each row records the peer's status (``status``: ``0xB000``, ``HTTP 409
0x0110`` …), its failure (``last_error``) or warning (``warning``).

Nothing is sent twice: a row whose object the destination already holds — the
same SOP Instance UID with the same :func:`content_digest` (the content without
creation/content dates and times), delivered by an earlier row — is recorded as
sent without sending ("already delivered by export N"). Different content under
the same UID (a re-analysis that replaces) is sent; of two rows of the same
object waiting for one destination, only the newer one is sent.

With ``verify`` on a destination, a delivered row waits for the peer to confirm:
Storage Commitment (the N-EVENT-REPORT reaches :func:`commitment_report` through
the node's SCP) or QIDO-RS (checked by :func:`flush`). Not confirmed within
``verify_timeout`` → sent again with back-off, counting towards ``max_attempts``.
"""
from __future__ import annotations

import hashlib
import logging
import struct
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable, Optional

import pydicom
from pydicom import Dataset
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from plugin import db
from plugin.config import Destination, Settings

log = logging.getLogger("cmr_ai.export")

__all__ = ["BATCH", "VOLATILE", "backoff", "commitment_report", "content_digest", "enqueue", "flush",
           "list_exports", "purge", "resend", "retry", "settle_job"]

CLAIM_SECONDS = 300
MAX_BACKOFF = 300
BATCH = 64  # instances per association / request (a forwarded study can hold thousands)
#: Attempts for rows whose destination this process does not know (see ``flush``).
UNKNOWN_DESTINATION_ATTEMPTS = 8
#: Seconds between QIDO-RS checks of a row that was not found yet.
QIDO_RECHECK = 5

#: Attributes that change each time the same object is built again (PS3.3 SOP Common,
#: General Image, SC Equipment, Contributing Equipment, SR Document General, Presentation
#: State Identification): left out of
#: :func:`content_digest`, so a re-analysis with the same result has the same digest.
VOLATILE = frozenset({
    "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "ContributionDateTime",
    "DateOfSecondaryCapture", "TimeOfSecondaryCapture", "ObservationDateTime",
    "PresentationCreationDate", "PresentationCreationTime",  # GSPS (PS3.3 C.11.10 Presentation State Identification)
})


def backoff(attempts: int) -> float:
    """Seconds to wait after ``attempts`` failed attempts: 2, 4, 8 … at most ``MAX_BACKOFF``."""
    return float(min(MAX_BACKOFF, 2 ** max(0, attempts)))


# ---------------------------------------------------------------------------
# content digest

def content_digest(ds: Dataset) -> str:
    """SHA-256 of a dataset's content, :data:`VOLATILE` attributes (at any depth) left out.

    Every other data element counts — tag, VR and value, sequences item by item,
    pixel data as its bytes — so a changed finding, text or pixel changes the digest
    and a rebuilt object with the same content does not. File meta information is
    not part of it.
    """
    h = hashlib.sha256()
    _feed(h, ds)
    return h.hexdigest()


def _feed(h, ds: Dataset) -> None:
    for elem in ds:  # in tag order
        if elem.keyword in VOLATILE or elem.tag.element == 0:  # group lengths depend on the encoding
            continue
        h.update(struct.pack("<I", int(elem.tag)) + str(elem.VR).encode())
        if elem.VR == "SQ":
            h.update(struct.pack("<I", len(elem.value)))
            for item in elem.value:
                h.update(b"\xfe\xff\x00\xe0")
                _feed(h, item)
                h.update(b"\xfe\xff\x0d\xe0")
            continue
        v = elem.value
        if isinstance(v, (bytes, bytearray)):
            b = bytes(v)
        elif v is None:
            b = b""
        else:
            b = str(v).encode("utf-8", "surrogateescape")
        h.update(struct.pack("<Q", len(b)))
        h.update(b)


# ---------------------------------------------------------------------------
# rows

def _latest_delivered(s: Session, destination: str, sop_uid: str, not_id: Optional[int]) -> Optional[db.Export]:
    """The row that last put this object on the destination (not a duplicate), or None."""
    q = select(db.Export).where(db.Export.destination == destination, db.Export.sop_instance_uid == sop_uid,
                                db.Export.state == db.ExportState.SENT, db.Export.duplicate_of.is_(None))
    if not_id is not None:
        q = q.where(db.Export.id != not_id)
    return s.scalars(q.order_by(db.Export.sent_at.desc(), db.Export.id.desc()).limit(1)).first()


def _mark_duplicate(row: db.Export, origin_id: int, now: datetime) -> None:
    row.state, row.sent_at, row.duplicate_of = db.ExportState.SENT, now, origin_id
    row.status, row.last_error, row.warning, row.claim = "duplicate", None, None, None
    row.verify = row.commit_uid = row.confirm_by = row.confirmed_at = None
    log.info("export %s (job %s): %s is already on %s (delivered by export %s, same content): not sent again",
             row.id, row.job_id, row.sop_instance_uid, row.destination, origin_id)


def enqueue(s: Session, job: db.Job, destinations: Iterable[str],
            written: Iterable[tuple[str, str, str]]) -> list[db.Export]:
    """Outbox rows for a job's objects, one per (destination, object), in the caller's transaction.

    Parameters
    ----------
    s:
        The session that also records the job's results (the caller commits).
    job:
        The job the objects belong to (flushed: it has an id).
    destinations:
        Destination names, e.g. ``job.destination_list``.
    written:
        ``(kind, SOP Instance UID, path)`` of each object written to disk: kind ``sr``,
        ``text-sr``, ``sc`` … The file at ``path`` is what will be sent.

    Returns
    -------
    list[db.Export]
        The job's rows for these objects: new rows pending, or — when the destination
        already holds the same content under the same SOP Instance UID (delivered by
        an earlier row) — sent without sending, ``duplicate_of`` naming that row.
        A row this job already has (a retried ``report`` task) is kept; if its
        content changed after it left the outbox it is queued again.

    Raises
    ------
    OSError, pydicom.errors.InvalidDicomError
        When a written file cannot be read (nothing is added then: the caller's
        transaction rolls back).
    """
    written = list(written)
    destinations = list(dict.fromkeys(destinations))
    digests = {path: content_digest(pydicom.dcmread(path)) for _, _, path in written}
    now = db.utcnow()
    existing = {(e.destination, e.sop_instance_uid): e
                for e in s.scalars(select(db.Export).where(db.Export.job_id == job.id))}
    rows: list[db.Export] = []
    for dest in destinations:
        for kind, uid, path in written:
            digest = digests[path]
            row = existing.get((dest, uid))
            if row is not None:
                if row.digest != digest:
                    if row.state not in (db.ExportState.PENDING,):
                        log.info("export %s (job %s): %s changed since it left the outbox: queued again",
                                 row.id, job.id, uid)
                        _requeue(row, now, force=False)
                    row.digest, row.path, row.kind = digest, path, kind
                rows.append(row)
                continue
            row = db.Export(job_id=job.id, destination=dest, sop_instance_uid=uid, path=path, kind=kind,
                            digest=digest, state=db.ExportState.PENDING, attempts=0, next_attempt_at=now,
                            created_at=now, force=False)
            s.add(row)
            s.flush()
            latest = _latest_delivered(s, dest, uid, row.id)
            if latest is not None and latest.digest == digest:
                _mark_duplicate(row, latest.id, now)
            rows.append(row)
    return rows


def _requeue(row: db.Export, now: datetime, *, force: bool) -> None:
    row.state, row.attempts, row.next_attempt_at = db.ExportState.PENDING, 0, now
    row.last_error = row.warning = row.status = None
    row.duplicate_of = row.claim = None
    row.verify = row.commit_uid = row.confirm_by = row.confirmed_at = None
    row.force = force


# ---------------------------------------------------------------------------
# flush

@dataclass
class _Item:
    """What a flush needs of one claimed row (no ORM object crosses sessions)."""

    id: int
    destination: str
    path: str
    sop: str
    attempts: int
    job_id: int
    digest: Optional[str]
    force: bool


def _max_attempts(settings: Settings, dest_name: str) -> int:
    dest = settings.destinations.get(dest_name)
    return dest.max_attempts if dest is not None else UNKNOWN_DESTINATION_ATTEMPTS


def flush(settings: Settings, job_id: Optional[int] = None, export_ids: Optional[Iterable[int]] = None) -> int:
    """Send every due pending export (of one job, of some rows, or all); check confirmations.

    Parameters
    ----------
    settings:
        The destinations and the database.
    job_id, export_ids:
        Only this job's rows / only these rows (None: every due row).

    Returns
    -------
    int
        How many rows were delivered in this call (rows found already delivered
        are not counted).
    """
    url = settings.database.url
    ids = None if export_ids is None else sorted({int(i) for i in export_ids})
    jobs = _check_unconfirmed(settings, job_id, ids)
    token = uuid.uuid4().hex
    items = _claim_due(url, token, job_id, ids)
    sent = 0
    by_dest: dict[str, list[_Item]] = defaultdict(list)
    for it in items:  # newest first: a newer row of the same object is decided before an older one
        by_dest[it.destination].append(it)
    for dest_name, rows in by_dest.items():
        try:
            sent += _flush_destination(settings, token, dest_name, rows)
        except Exception:  # never leave the loop with rows claimed for CLAIM_SECONDS without a word
            log.exception("export to %s failed", dest_name)
    for jid in sorted(jobs | {it.job_id for it in items}):
        settle_job(settings, jid)
    return sent


def _claim_due(url: str, token: str, job_id: Optional[int], ids: Optional[list[int]]) -> list[_Item]:
    """Stamp every due pending row with ``token`` in one UPDATE; return them, newest first."""
    now = db.utcnow()
    cond = [db.Export.state == db.ExportState.PENDING, db.Export.next_attempt_at <= now]
    if job_id is not None:
        cond.append(db.Export.job_id == job_id)
    if ids is not None:
        cond.append(db.Export.id.in_(ids))
    with db.session_scope(url) as s:
        s.execute(update(db.Export).where(*cond)
                  .values(claim=token, next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
                  .execution_options(synchronize_session=False))
        rows = s.scalars(select(db.Export).where(db.Export.claim == token, db.Export.state == db.ExportState.PENDING)
                         .order_by(db.Export.id.desc())).all()
        return [_Item(r.id, r.destination, r.path, r.sop_instance_uid, r.attempts or 0, r.job_id, r.digest,
                      bool(r.force)) for r in rows]


def _keep_claim(url: str, token: str, items: list[_Item]) -> list[_Item]:
    """Extend the claim of the items still ours (a long flush outlives CLAIM_SECONDS); drop the others."""
    if not items:
        return []
    now = db.utcnow()
    with db.session_scope(url) as s:
        s.execute(update(db.Export)
                  .where(db.Export.id.in_([i.id for i in items]), db.Export.claim == token,
                         db.Export.state == db.ExportState.PENDING)
                  .values(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
                  .execution_options(synchronize_session=False))
        ours = set(s.scalars(select(db.Export.id).where(db.Export.id.in_([i.id for i in items]),
                                                        db.Export.claim == token,
                                                        db.Export.state == db.ExportState.PENDING)))
    lost = [i.id for i in items if i.id not in ours]
    if lost:
        log.warning("exports %s were taken over by another sender (claim expired): not sent here", lost)
    return [i for i in items if i.id in ours]


def _flush_destination(settings: Settings, token: str, dest_name: str, items: list[_Item]) -> int:
    from plugin.export import ExportError, StoreOutcome, exporter_for

    url = settings.database.url
    dest = settings.destinations.get(dest_name)
    if dest is None:
        # Not (or no longer) in this process's config: a worker started before the node
        # reloaded its rules may meet a new destination. Retry, so that the node (or this
        # process after a restart) sends it; dead after UNKNOWN_DESTINATION_ATTEMPTS.
        msg = f"destination {dest_name!r} is not configured in this process"
        _record(settings, token, dest_name, [(it, StoreOutcome(it.sop, False, msg, True, "not configured"))
                                             for it in items])
        return 0
    exporter = exporter_for(dest_name, dest, calling_ae=settings.node.ae_title)
    sent = 0
    failure: Optional[StoreOutcome] = None  # the whole send failed: later batches would fail alike
    todo = items
    for _round in (1, 2):  # round 2: rows that waited for a newer row of the same object in this flush
        deferred: list[_Item] = []
        for start in range(0, len(todo), BATCH):
            batch = _keep_claim(url, token, todo[start:start + BATCH])
            if failure is not None:
                _record(settings, token, dest_name, [(it, _for(failure, it)) for it in batch])
                continue
            loaded: list[tuple[_Item, Dataset]] = []
            unreadable = []
            for it in batch:
                try:
                    ds = pydicom.dcmread(it.path)
                    if it.digest is None:
                        it.digest = content_digest(ds)
                    loaded.append((it, ds))
                except Exception as e:  # a file that vanished or is broken will not mend itself
                    unreadable.append((it, StoreOutcome(it.sop, False, f"cannot read {it.path}: "
                                                        f"{type(e).__name__}: {e}", False, "unreadable")))
            _record(settings, token, dest_name, unreadable)
            decisions = _resolve(url, token, [it for it, _ in loaded])
            deferred += [it for it, _ in loaded if decisions.get(it.id) == "defer"]
            to_send = [(it, ds) for it, ds in loaded if decisions.get(it.id) == "send"]
            if not to_send:
                continue
            to_send.sort(key=lambda x: x[0].id)  # decided newest first; sent in the order they were written
            try:
                outcomes = exporter.send([ds for _, ds in to_send])
            except ExportError as e:
                failure = StoreOutcome("", False, str(e), e.retryable, e.code or "error")
                _record(settings, token, dest_name, [(it, _for(failure, it)) for it, _ in to_send])
                continue
            except Exception as e:  # unexpected: keep the rows, retry later
                log.exception("export to %s failed", dest_name)
                oops = StoreOutcome("", False, f"{type(e).__name__}: {e}", True, "error")
                _record(settings, token, dest_name, [(it, _for(oops, it)) for it, _ in to_send])
                continue
            if len(outcomes) == len(to_send) and all(o.sop_instance_uid == it.sop
                                                     for o, (it, _) in zip(outcomes, to_send)):
                pairs = [(it, o) for (it, _), o in zip(to_send, outcomes)]
            else:  # an exporter that broke the "one outcome per dataset, in order" contract
                by_uid = {o.sop_instance_uid: o for o in outcomes}
                pairs = [(it, by_uid.get(it.sop) or StoreOutcome(it.sop, False, "no status returned for this "
                                                                 "instance", True, "no status"))
                         for it, _ in to_send]
            delivered = _record(settings, token, dest_name, pairs)
            sent += len(delivered)
            if delivered and dest.verify != "none":
                _start_verification(settings, dest_name, dest, [(it, ds) for it, ds in to_send if it.id in delivered])
        todo = deferred
        if not todo:
            break
    if todo:  # cannot happen (the newer rows were decided in round 1); never keep a claim
        _release(url, token, todo)
    return sent


def _for(o, it: _Item):
    from plugin.export import StoreOutcome

    return StoreOutcome(it.sop, o.ok, o.status, o.retryable, o.code, o.warning)


def _release(url: str, token: str, items: list[_Item]) -> None:
    with db.session_scope(url) as s:
        s.execute(update(db.Export).where(db.Export.id.in_([i.id for i in items]), db.Export.claim == token)
                  .values(claim=None, next_attempt_at=db.utcnow())
                  .execution_options(synchronize_session=False))


def _resolve(url: str, token: str, items: list[_Item]) -> dict[int, str]:
    """Decide, per claimed row, "send", "defer" (a newer row of the same object is in this very
    batch) or "done" (recorded as already delivered, superseded, or waiting for a newer row)."""
    out: dict[int, str] = {}
    in_batch = {it.id for it in items}
    now = db.utcnow()
    with db.session_scope(url) as s:
        for it in items:
            row = s.get(db.Export, it.id)
            if row is None or row.claim != token or row.state != db.ExportState.PENDING:
                out[it.id] = "done"
                continue
            row.digest = it.digest
            if it.force:  # an explicit retry, or a re-send after a failed confirmation
                out[it.id] = "send"
                continue
            newer = s.scalars(select(db.Export)
                              .where(db.Export.destination == it.destination, db.Export.sop_instance_uid == it.sop,
                                     db.Export.id > it.id,
                                     db.Export.state.in_([db.ExportState.PENDING, db.ExportState.SENT]))
                              .order_by(db.Export.id.desc()).limit(1)).first()
            if newer is not None:
                if newer.state == db.ExportState.SENT:
                    if newer.digest is not None and newer.digest == it.digest:
                        _mark_duplicate(row, newer.duplicate_of or newer.id, now)
                    else:
                        row.state, row.sent_at, row.claim = db.ExportState.SUPERSEDED, now, None
                        row.status, row.last_error = "superseded", None
                        log.info("export %s (job %s): %s to %s superseded by the newer export %s: not sent",
                                 row.id, row.job_id, row.sop_instance_uid, row.destination, newer.id)
                    out[it.id] = "done"
                elif newer.id in in_batch:
                    out[it.id] = "defer"
                else:  # the newer row waits (backing off, or another sender has it): so does this one
                    row.claim = None
                    row.next_attempt_at = max(newer.next_attempt_at, now + timedelta(seconds=1))
                    row.status = "waiting"
                    out[it.id] = "done"
                continue
            latest = _latest_delivered(s, it.destination, it.sop, it.id)
            if latest is not None and latest.digest is not None and latest.digest == it.digest:
                _mark_duplicate(row, latest.id, now)
                out[it.id] = "done"
            else:
                out[it.id] = "send"
    return out


def _record(settings: Settings, token: str, dest_name: str, pairs: list) -> set[int]:
    """Write the outcome of one attempt on each row still claimed by ``token``; return the ids delivered."""
    if not pairs:
        return set()
    dest: Optional[Destination] = settings.destinations.get(dest_name)
    max_attempts = _max_attempts(settings, dest_name)
    delivered: set[int] = set()
    now = db.utcnow()
    with db.session_scope(settings.database.url) as s:
        for it, o in pairs:
            row = s.get(db.Export, it.id)
            if row is None or row.claim != token or row.state != db.ExportState.PENDING:
                log.warning("export %s: taken over by another sender while this one sent it: outcome %r not "
                            "recorded", it.id, o.status)
                continue
            row.attempts = (row.attempts or 0) + 1
            row.claim = None
            row.status = (o.code or None) and o.code[:64]
            if o.ok:
                row.state, row.sent_at, row.last_error, row.force = db.ExportState.SENT, now, None, False
                row.duplicate_of = None
                row.warning = o.status[:2000] if o.warning else None
                verify = dest.verify if dest is not None and dest.verify != "none" else None
                row.verify, row.commit_uid, row.confirmed_at = verify, None, None
                row.confirm_by = now + timedelta(seconds=dest.verify_timeout) if verify else None
                row.next_attempt_at = now
                delivered.add(row.id)
                if o.warning:
                    log.warning("export %s (job %s): %s delivered to %s with a warning: %s", row.id, row.job_id,
                                row.sop_instance_uid, dest_name, o.status)
                else:
                    log.info("export %s (job %s): %s sent to %s", row.id, row.job_id, row.sop_instance_uid,
                             dest_name)
                continue
            row.last_error, row.warning = o.status[:2000], None
            _fail(row, o.retryable, max_attempts, now, o.status)
    return delivered


def _fail(row: db.Export, retryable: bool, max_attempts: int, now: datetime, msg: str) -> None:
    """Back off (pending) or give up (dead) after a failed attempt that ``row.attempts`` counts."""
    if retryable and row.attempts < max_attempts:
        delay = backoff(row.attempts)
        row.state, row.next_attempt_at = db.ExportState.PENDING, now + timedelta(seconds=delay)
        log.warning("export %s (job %s): %s to %s failed (attempt %d/%d, retry in %.0f s): %s", row.id, row.job_id,
                    row.sop_instance_uid, row.destination, row.attempts, max_attempts, delay, msg)
    else:
        row.state = db.ExportState.DEAD
        log.error("export %s (job %s): %s to %s failed for good after %d attempt(s): %s", row.id, row.job_id,
                  row.sop_instance_uid, row.destination, row.attempts, msg)


# ---------------------------------------------------------------------------
# verification: Storage Commitment and QIDO-RS

def _start_verification(settings: Settings, dest_name: str, dest: Destination,
                        delivered: list[tuple[_Item, Dataset]]) -> None:
    url = settings.database.url
    if dest.verify == "qido":
        _qido_confirm(settings, dest_name, dest, [(it.id, str(ds.get("StudyInstanceUID", "")),
                                                   str(ds.get("SeriesInstanceUID", "")), it.sop)
                                                  for it, ds in delivered])
        return
    if dest.verify != "commitment" or dest.dimse is None:
        return
    from pydicom.uid import generate_uid

    from plugin.dimse.scu import request_commitment
    from plugin.export import ExportError

    txn = generate_uid()
    ids = [it.id for it, _ in delivered]
    with db.session_scope(url) as s:  # before the N-ACTION: the report may arrive before it returns
        s.execute(update(db.Export).where(db.Export.id.in_(ids), db.Export.state == db.ExportState.SENT)
                  .values(commit_uid=txn).execution_options(synchronize_session=False))
    refs = [(str(ds.SOPClassUID), it.sop) for it, ds in delivered]
    try:
        request_commitment(dest.dimse, refs, txn, calling_ae=settings.node.ae_title,
                           on_report=lambda event: (commitment_report(url, event.event_type, event.event_information,
                                                                      f"{dest_name} (same association)"), None))
    except ExportError as e:
        log.warning("export to %s: delivered, but the storage commitment request failed: %s", dest_name, e)
        now = db.utcnow()
        with db.session_scope(url) as s:
            for row in s.scalars(select(db.Export).where(db.Export.id.in_(ids), db.Export.commit_uid == txn,
                                                         db.Export.state == db.ExportState.SENT,
                                                         db.Export.confirmed_at.is_(None))):
                _not_confirmed(row, f"delivered, but the storage commitment request failed: {e}",
                               e.retryable, dest.max_attempts, now, e.code or "commitment failed")


def _qido_confirm(settings: Settings, dest_name: str, dest: Destination,
                  checks: list[tuple[int, str, str, str]]) -> None:
    """QIDO-RS each (row id, study, series, SOP): found → confirmed; else checked again later."""
    from plugin.dicomweb.stow import instance_exists
    from plugin.export import ExportError

    results: dict[int, tuple[bool, str]] = {}
    for rid, study, series, sop in checks:
        try:
            results[rid] = (instance_exists(dest.dicomweb, study, series, sop), "")
        except ExportError as e:
            results[rid] = (False, str(e))
    now = db.utcnow()
    with db.session_scope(settings.database.url) as s:
        for rid, (found, err) in results.items():
            row = s.get(db.Export, rid)
            if row is None or row.state != db.ExportState.SENT or row.confirmed_at is not None:
                continue
            if found:
                row.confirmed_at = now
                log.info("export %s: %s confirmed by QIDO-RS on %s", rid, row.sop_instance_uid, dest_name)
            else:
                row.next_attempt_at = now + timedelta(seconds=QIDO_RECHECK)
                if err:
                    log.warning("export %s: %s: QIDO-RS check on %s failed: %s", rid, row.sop_instance_uid,
                                dest_name, err)
                else:
                    log.info("export %s: %s not found by QIDO-RS on %s yet", rid, row.sop_instance_uid, dest_name)


def _not_confirmed(row: db.Export, reason: str, retryable: bool, max_attempts: int, now: datetime,
                   code: str) -> None:
    """A delivered row the peer did not confirm: send it again (with back-off) or give up."""
    row.last_error, row.status = reason[:2000], code[:64]
    row.commit_uid = row.confirm_by = row.confirmed_at = None
    row.force = True  # the peer may hold it, or not: do not take an earlier delivery for proof
    _fail(row, retryable, max_attempts, now, reason)


def _check_unconfirmed(settings: Settings, job_id: Optional[int], ids: Optional[list[int]]) -> set[int]:
    """QIDO-check the due rows awaiting confirmation; re-queue those past ``confirm_by``. Returns job ids touched."""
    url = settings.database.url
    now = db.utcnow()
    cond = [db.Export.state == db.ExportState.SENT, db.Export.verify.is_not(None), db.Export.confirmed_at.is_(None)]
    if job_id is not None:
        cond.append(db.Export.job_id == job_id)
    if ids is not None:
        cond.append(db.Export.id.in_(ids))
    with db.session_scope(url) as s:
        rows = [(r.id, r.destination, r.verify, r.path, r.sop_instance_uid, r.next_attempt_at, r.job_id)
                for r in s.scalars(select(db.Export).where(*cond))]
    if not rows:
        return set()
    qido: dict[str, list] = defaultdict(list)
    for rid, dest_name, verify, path, sop, next_at, _jid in rows:
        dest = settings.destinations.get(dest_name)
        if verify == "qido" and dest is not None and dest.dicomweb is not None and next_at <= now:
            try:
                hdr = pydicom.dcmread(path, stop_before_pixels=True,
                                      specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
                qido[dest_name].append((rid, str(hdr.StudyInstanceUID), str(hdr.SeriesInstanceUID), sop))
            except Exception as e:
                log.warning("export %s: cannot read %s for the QIDO-RS check: %s", rid, path, e)
    for dest_name, checks in qido.items():
        _qido_confirm(settings, dest_name, settings.destinations[dest_name], checks)
    now = db.utcnow()
    with db.session_scope(url) as s:
        for row in s.scalars(select(db.Export).where(db.Export.id.in_([r[0] for r in rows]),
                                                     db.Export.state == db.ExportState.SENT,
                                                     db.Export.confirmed_at.is_(None),
                                                     db.Export.confirm_by <= now)):
            dest = settings.destinations.get(row.destination)
            timeout = f"{dest.verify_timeout:g} s" if dest is not None else "the verify timeout"
            if row.last_error:  # the peer said it failed (Storage Commitment FailedSOPSequence)
                reason = row.last_error
            elif row.verify == "qido":
                reason = f"delivered, but QIDO-RS did not find it within {timeout}"
            else:
                reason = f"delivered, but no Storage Commitment result came within {timeout}"
            _not_confirmed(row, reason, True, _max_attempts(settings, row.destination), now,
                           row.status if row.last_error and row.status else "not confirmed")
    return {r[6] for r in rows}


def commitment_report(db_url: str, event_type: int, info: Dataset, peer: str = "") -> int:
    """Record a Storage Commitment result (N-EVENT-REPORT, PS3.4 J.3.3) on the outbox rows.

    Called by the node's SCP (:meth:`plugin.dimse.scp.StoreSCP.handle_event_report`)
    when a peer reports on a new association, and by the SCU when it reports on the
    requesting one. Instances in (0008,1199) Referenced SOP Sequence are confirmed;
    those in (0008,1198) Failed SOP Sequence get the peer's FailureReason as their
    error and are sent again by the next flush (or dead at ``max_attempts``).

    Returns
    -------
    int
        The N-EVENT-REPORT response status: 0x0000, or 0x0110 (processing failure)
        when the report could not be recorded. Never raises.
    """
    from plugin.export import describe_status

    try:
        txn = str(info.get("TransactionUID", "") or "")
        committed = {str(i.get("ReferencedSOPInstanceUID", "")) for i in (info.get("ReferencedSOPSequence") or [])}
        failed: dict[str, Optional[int]] = {}
        for item in info.get("FailedSOPSequence") or []:
            reason = item.get("FailureReason")
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = int(reason) if reason not in (None, "") else None
        now = db.utcnow()
        with db.session_scope(db_url) as s:
            rows = s.scalars(select(db.Export).where(db.Export.commit_uid == txn)).all() if txn else []
            if not rows:
                log.warning("Storage Commitment result (event type %s) from %s for transaction %r, which no export "
                            "waits for (purged, or re-sent since): ignored", event_type, peer or "a peer", txn)
                return 0x0000
            for row in rows:
                if row.state != db.ExportState.SENT or row.confirmed_at is not None:
                    continue
                uid = row.sop_instance_uid
                if uid in failed:
                    code = failed[uid]
                    why = describe_status(code) if code is not None else "no FailureReason"
                    row.last_error = f"Storage Commitment failed at {row.destination}: FailureReason {why}"
                    row.status = f"0x{code:04X}" if code is not None else "commitment failed"
                    row.confirm_by = now  # the next flush sends it again
                    log.warning("export %s (job %s): %s: %s", row.id, row.job_id, uid, row.last_error)
                elif uid in committed:
                    row.confirmed_at = now
                    log.info("export %s (job %s): %s committed by %s (Storage Commitment)", row.id, row.job_id, uid,
                             row.destination)
            for jid in {r.job_id for r in rows}:
                _settle(s, jid)
        return 0x0000
    except Exception:
        log.exception("Storage Commitment result from %s could not be recorded", peer or "a peer")
        return 0x0110


# ---------------------------------------------------------------------------
# jobs

def _settle(s: Session, job_id: int) -> None:
    job = s.get(db.Job, job_id)
    if job is None or job.state not in (db.JobState.EXPORTING, db.JobState.DONE, db.JobState.FAILED):
        return
    rows = s.scalars(select(db.Export).where(db.Export.job_id == job_id)).all()
    if any(r.state == db.ExportState.PENDING or r.awaiting_confirmation for r in rows):
        job.state = db.JobState.EXPORTING
        return
    dead = [r for r in rows if r.state == db.ExportState.DEAD]
    if dead:
        job.state = db.JobState.FAILED
        job.error = "; ".join(sorted({f"export to {r.destination} failed: {r.last_error}" for r in dead}))[:4000]
    else:
        job.state, job.error = db.JobState.DONE, None


def settle_job(settings: Settings, job_id: int) -> None:
    """Move an EXPORTING job to DONE (all delivered, and confirmed where asked) or FAILED (some dead)
    once nothing is pending; back to EXPORTING when a row of a finished job is queued again."""
    with db.session_scope(settings.database.url) as s:
        _settle(s, job_id)


# ---------------------------------------------------------------------------
# operator actions (``cmr-ai exports``)

def list_exports(settings: Settings, *, states: Iterable[db.ExportState] = (), job_id: Optional[int] = None,
                 destination: Optional[str] = None, limit: Optional[int] = None) -> list[db.Export]:
    """Outbox rows, newest first, detached from their session (read their columns freely)."""
    q = select(db.Export)
    states = list(states)
    if states:
        q = q.where(db.Export.state.in_(states))
    if job_id is not None:
        q = q.where(db.Export.job_id == job_id)
    if destination is not None:
        q = q.where(db.Export.destination == destination)
    q = q.order_by(db.Export.id.desc())
    if limit:
        q = q.limit(limit)
    with db.session_scope(settings.database.url) as s:
        rows = s.scalars(q).all()
        s.expunge_all()
        return list(rows)


@dataclass(frozen=True)
class RetryResult:
    """What :func:`retry` did: ``queued`` rows are due now; ``busy`` are being sent by a flush right now."""

    queued: list[int]
    busy: list[int]
    missing: list[int]


def retry(settings: Settings, export_ids: Iterable[int] = (), *, dead: bool = False,
          destination: Optional[str] = None) -> RetryResult:
    """Queue rows again, due now: the named ones and/or every dead one (of one destination).

    A dead, sent or superseded row is reset (attempts 0) and is *sent* by the next
    flush even if the destination already holds it: the operator asked. A pending
    row is only made due now (unless a flush is sending it: ``busy``). Unknown ids
    are returned in ``missing`` and nothing is changed then.
    """
    ids = sorted({int(i) for i in export_ids})
    now = db.utcnow()
    with db.session_scope(settings.database.url) as s:
        rows = {r.id: r for r in s.scalars(select(db.Export).where(db.Export.id.in_(ids)))} if ids else {}
        missing = [i for i in ids if i not in rows]
        if missing:
            return RetryResult([], [], missing)
        if dead:
            q = select(db.Export).where(db.Export.state == db.ExportState.DEAD)
            if destination is not None:
                q = q.where(db.Export.destination == destination)
            rows.update({r.id: r for r in s.scalars(q)})
        queued, busy = [], []
        for rid in sorted(rows):
            r = rows[rid]
            if r.state == db.ExportState.PENDING:
                if r.claim is not None and r.next_attempt_at > now:
                    busy.append(rid)
                    continue
                r.next_attempt_at = now
            else:
                _requeue(r, now, force=True)
            queued.append(rid)
            job = s.get(db.Job, r.job_id)
            if job is not None and job.state in (db.JobState.DONE, db.JobState.FAILED):
                job.state = db.JobState.EXPORTING
        if queued:
            log.info("exports %s queued again", queued)
        return RetryResult(queued, busy, [])


def resend(settings: Settings, export_ids: list[int]) -> int:
    """Put dead (or sent) exports back in the outbox. Returns how many were re-queued."""
    return len(retry(settings, export_ids).queued)


def purge(settings: Settings, *, sent_older_than: Optional[timedelta] = None, dead: bool = False,
          dry_run: bool = True) -> list[db.Export]:
    """Delete outbox rows: sent or superseded ones that left the outbox longer than ``sent_older_than``
    ago (not those still awaiting confirmation), and/or every dead one.

    Pending rows are never deleted, and no file is: the objects stay where the
    report task (or the instance store) wrote them. Deleting sent rows forgets
    what the destinations hold: a later identical object is sent again. Returns
    the rows deleted (or, with ``dry_run``, the rows that would be).
    """
    conds = []
    if sent_older_than is not None:
        cutoff = db.utcnow() - sent_older_than
        conds.append(((db.Export.state == db.ExportState.SENT)
                      & ((db.Export.verify.is_(None)) | (db.Export.confirmed_at.is_not(None)))
                      | (db.Export.state == db.ExportState.SUPERSEDED))
                     & (db.Export.sent_at <= cutoff))
    if dead:
        conds.append(db.Export.state == db.ExportState.DEAD)
    if not conds:
        return []
    from sqlalchemy import or_

    where = or_(*conds)
    with db.session_scope(settings.database.url) as s:
        rows = s.scalars(select(db.Export).where(where).order_by(db.Export.id)).all()
        s.expunge_all()
        if not dry_run and rows:
            s.execute(delete(db.Export).where(db.Export.id.in_([r.id for r in rows]))
                      .execution_options(synchronize_session=False))
            log.info("purged %d export rows", len(rows))
        return list(rows)
