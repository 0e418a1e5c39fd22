"""The export outbox: one row per (job, destination, object); sent, retried, or dead.

Objects are the results of an analysis job (SR, SC) or, for a forward job, the
study's original instances as received (``kind`` "original"): both go through the
same rows, exporters, back-off and dead letters.

Rows are written in the same transaction that records the results, so nothing is
forgotten by a crash. ``flush`` claims due rows (pushing their ``next_attempt_at``
forward, so two senders never send the same row at once), sends them grouped by
destination over one association / request, and records the outcome: sent, retry
with exponential back-off, or dead after ``max_attempts`` or a permanent failure.
Dead rows stay visible and can be re-sent (``resend``).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from datetime import timedelta
from typing import Optional

import pydicom
from sqlalchemy import select, update

from plugin import db
from plugin.config import Settings

log = logging.getLogger("cmr_ai.export")

CLAIM_SECONDS = 300
MAX_BACKOFF = 300
BATCH = 64  # instances per association / request (a forwarded study can hold thousands)
#: Attempts for rows whose destination this process does not know (see ``flush``).
UNKNOWN_DESTINATION_ATTEMPTS = 8


def backoff(attempts: int) -> float:
    return float(min(MAX_BACKOFF, 2 ** max(0, attempts)))


def _claim(s, row: db.Export, now) -> bool:
    res = s.execute(update(db.Export)
                    .where(db.Export.id == row.id, db.Export.state == db.ExportState.PENDING,
                           db.Export.next_attempt_at <= now)
                    .values(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS)))
    return res.rowcount == 1


def flush(settings: Settings, job_id: Optional[int] = None) -> int:
    """Send every due pending export (of one job, or all). Returns how many were sent."""
    now = db.utcnow()
    with db.session_scope(settings.database.url) as s:
        q = select(db.Export).where(db.Export.state == db.ExportState.PENDING, db.Export.next_attempt_at <= now)
        if job_id is not None:
            q = q.where(db.Export.job_id == job_id)
        claimed = [r for r in s.scalars(q.order_by(db.Export.id)).all() if _claim(s, r, now)]
        work = [(r.id, r.destination, r.path, r.sop_instance_uid, r.attempts, r.job_id) for r in claimed]
    if not work:
        return 0
    from plugin.export import ExportError, exporter_for

    by_dest: dict[str, list] = defaultdict(list)
    for w in work:
        by_dest[w[1]].append(w)
    sent = 0
    outcomes: dict[int, tuple[bool, bool, str]] = {}  # id -> (ok, retryable, message)
    for dest_name, rows in by_dest.items():
        dest = settings.destinations.get(dest_name)
        if dest is None:
            # Not (or no longer) in this process's config: a worker started before the node
            # reloaded its rules may meet a new destination. Retry, so that the node (or this
            # process after a restart) sends it; dead after UNKNOWN_DESTINATION_ATTEMPTS.
            for r in rows:
                outcomes[r[0]] = (False, True, f"destination {dest_name!r} is not configured in this process")
            continue
        for start in range(0, len(rows), BATCH):
            batch = rows[start:start + BATCH]
            try:
                datasets = [pydicom.dcmread(r[2]) for r in batch]
                exporter = exporter_for(dest_name, dest, calling_ae=settings.node.ae_title)
                results = {o.sop_instance_uid: o for o in exporter.send(datasets)}
                for r in batch:
                    o = results.get(r[3])
                    if o is None:
                        outcomes[r[0]] = (False, True, "no status returned for this instance")
                    else:
                        outcomes[r[0]] = (o.ok, o.retryable, o.status)
            except ExportError as e:  # the whole send failed: the later batches would fail alike
                for r in rows[start:]:
                    outcomes[r[0]] = (False, e.retryable, str(e))
                break
            except Exception as e:  # unexpected: keep the row, retry later
                log.exception("export to %s failed", dest_name)
                for r in batch:
                    outcomes[r[0]] = (False, True, f"{type(e).__name__}: {e}")
    jobs: set[int] = set()
    with db.session_scope(settings.database.url) as s:
        for rid, dest_name, _path, sop, attempts, jid in work:
            ok, retryable, msg = outcomes[rid]
            row = s.get(db.Export, rid)
            row.attempts = attempts + 1
            jobs.add(jid)
            if ok:
                row.state, row.sent_at, row.last_error = db.ExportState.SENT, db.utcnow(), None
                sent += 1
                log.info("export job %s: %s sent to %s", jid, sop, dest_name)
                continue
            max_attempts = (settings.destinations[dest_name].max_attempts if dest_name in settings.destinations
                            else UNKNOWN_DESTINATION_ATTEMPTS)
            row.last_error = msg[:2000]
            if retryable and row.attempts < max_attempts:
                delay = backoff(row.attempts)
                row.next_attempt_at = db.utcnow() + timedelta(seconds=delay)
                log.warning("export job %s: %s to %s failed (attempt %d/%d, retry in %.0f s): %s", jid, sop,
                            dest_name, row.attempts, max_attempts, delay, msg)
            else:
                row.state = db.ExportState.DEAD
                log.error("export job %s: %s to %s failed for good after %d attempt(s): %s", jid, sop, dest_name,
                          row.attempts, msg)
    for jid in jobs:
        settle_job(settings, jid)
    return sent


def settle_job(settings: Settings, job_id: int) -> None:
    """Move an EXPORTING job to DONE (all sent) or FAILED (some dead) once nothing is pending."""
    with db.session_scope(settings.database.url) as s:
        job = s.get(db.Job, job_id)
        if job is None or job.state not in (db.JobState.EXPORTING, db.JobState.DONE, db.JobState.FAILED):
            return
        rows = s.scalars(select(db.Export).where(db.Export.job_id == job_id)).all()
        if any(r.state == db.ExportState.PENDING for r in rows):
            job.state = db.JobState.EXPORTING
            return
        dead = [r for r in rows if r.state == db.ExportState.DEAD]
        if dead:
            job.state = db.JobState.FAILED
            job.error = "; ".join(sorted({f"export to {r.destination} failed: {r.last_error}" for r in dead}))[:4000]
        else:
            job.state, job.error = db.JobState.DONE, None


def resend(settings: Settings, export_ids: list[int]) -> int:
    """Put dead (or sent) exports back in the outbox. Returns how many were re-queued."""
    with db.session_scope(settings.database.url) as s:
        rows = s.scalars(select(db.Export).where(db.Export.id.in_(export_ids))).all()
        for r in rows:
            r.state, r.attempts, r.next_attempt_at, r.last_error = db.ExportState.PENDING, 0, db.utcnow(), None
            job = s.get(db.Job, r.job_id)
            job.state = db.JobState.EXPORTING
        return len(rows)
