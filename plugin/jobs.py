"""Jobs: the state machine in the database and the Celery chain that drives it.

``prepare`` [queue node] → ``infer`` [queue gpu] → ``report`` [queue node]. The
job row is created in the same transaction that marks the study complete; the
chain is sent after the commit, and its id recorded. A job the database says is
unfinished is sent again by ``recover`` at start-up: the tasks are idempotent
(deterministic output UIDs, unique outbox rows), so a second run replaces rather
than duplicates.
"""
from __future__ import annotations

import logging
from typing import Optional

from celery import chain
from sqlalchemy import select

from plugin import db
from plugin.config import Settings
from plugin.routing import Decision

log = logging.getLogger("cmr_ai.jobs")


def create_job(s, study: db.Study, decision: Decision) -> db.Job:
    job = db.Job(study_id=study.id, rule=decision.rule or "", template=decision.template or "",
                 model=decision.model or "", priority=decision.priority, destinations=",".join(decision.send_to),
                 state=db.JobState.QUEUED)
    s.add(job)
    s.flush()
    return job


def launch(settings: Settings, job_id: int, priority: int = 5) -> str:
    """Send the job's chain to the broker and record its id."""
    from worker.app import configure
    from worker.tasks import infer, prepare, report

    configure(settings)
    sig = chain(prepare.si(job_id).set(queue="node", priority=priority),
                infer.s().set(queue="gpu", priority=priority),
                report.s().set(queue="node", priority=priority))
    res = sig.apply_async()
    with db.session_scope(settings.database.url) as s:
        job = s.get(db.Job, job_id)
        job.celery_id = res.id
    log.info("job %s: chain sent (%s)", job_id, res.id)
    return res.id


def fail(settings: Settings, job_id: int, reason: str) -> None:
    with db.session_scope(settings.database.url) as s:
        job = s.get(db.Job, job_id)
        if job is not None:
            job.state, job.error = db.JobState.FAILED, reason[:4000]
    log.error("job %s failed: %s", job_id, reason)


def set_state(settings: Settings, job_id: int, state: db.JobState, *, only_if_unfinished: bool = True) -> Optional[db.Job]:
    """Move a job to ``state``; returns None (and changes nothing) when it is already finished."""
    with db.session_scope(settings.database.url) as s:
        job = s.get(db.Job, job_id)
        if job is None or (only_if_unfinished and job.state.finished):
            return None
        job.state = state
        if state == db.JobState.PREPARING:
            job.attempts = (job.attempts or 0) + 1
        s.flush()
        s.expunge(job)
        return job


def recover(settings: Settings) -> list[int]:
    """Re-send every job the database says is unfinished (start-up recovery). Returns their ids."""
    from plugin import outbox

    relaunch: list[tuple[int, int]] = []
    with db.session_scope(settings.database.url) as s:
        for job in s.scalars(select(db.Job).where(db.Job.state.notin_([db.JobState.DONE, db.JobState.FAILED]))):
            if job.state == db.JobState.EXPORTING:
                continue  # results are written; the outbox finishes it
            job.state = db.JobState.QUEUED
            relaunch.append((job.id, job.priority))
    for jid, prio in relaunch:
        log.info("recovery: job %s was unfinished; sending it again", jid)
        launch(settings, jid, prio)
    outbox.flush(settings)
    return [j for j, _ in relaunch]
