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
from plugin.routing import Decision, RuleAction

log = logging.getLogger("cmr_ai.jobs")

#: Export.kind of a forwarded original instance.
ORIGINAL = "original"


def create_job(s, study: db.Study, decision: Decision | RuleAction, rules_version: Optional[str] = None) -> db.Job:
    """An analysis job (QUEUED) for one matched ``analyse`` rule; :func:`launch` sends its chain."""
    job = db.Job(study_id=study.id, kind=db.JobKind.ANALYSE, rule=decision.rule or "",
                 template=decision.template or "", model=decision.model or "", priority=decision.priority,
                 destinations=",".join(decision.send_to), state=db.JobState.QUEUED,
                 rules_version=rules_version or getattr(decision, "rules_version", None))
    s.add(job)
    s.flush()
    return job


def create_forward_job(s, study: db.Study, action: RuleAction, rules_version: Optional[str] = None
                       ) -> Optional[db.Job]:
    """A forward job: the study's original instances as outbox rows, one per instance × destination.

    The job starts in EXPORTING: there is nothing to compute, and the outbox sends
    the files as they were received (same SOP Instance UIDs, same transfer syntax),
    with the same retries, back-off and dead letters as results. Instances already
    forwarded to a destination (sent or still pending, e.g. before the study was
    re-opened by late instances) are not queued again. Returns None when there is
    nothing new to send.
    """
    instances = s.scalars(select(db.Instance).join(db.Series).where(db.Series.study_id == study.id)
                          .order_by(db.Series.series_number, db.Series.id, db.Instance.id)).all()
    uids = [i.sop_instance_uid for i in instances]
    done = set()
    if uids:
        done = {(d, u) for d, u in s.execute(
            select(db.Export.destination, db.Export.sop_instance_uid)
            .where(db.Export.kind == ORIGINAL, db.Export.sop_instance_uid.in_(uids),
                   db.Export.state.in_([db.ExportState.PENDING, db.ExportState.SENT])))}
    rows = [(dest, inst) for dest in action.forward_to for inst in instances
            if (dest, inst.sop_instance_uid) not in done]
    if not rows:
        log.info("study %s: rule %s: every instance was already forwarded to %s", study.study_instance_uid,
                 action.rule, ", ".join(action.forward_to))
        return None
    job = db.Job(study_id=study.id, kind=db.JobKind.FORWARD, rule=action.rule, template="", model="",
                 priority=action.priority, destinations=",".join(action.forward_to), state=db.JobState.EXPORTING,
                 rules_version=rules_version)
    s.add(job)
    s.flush()
    for dest, inst in rows:
        s.add(db.Export(job_id=job.id, destination=dest, sop_instance_uid=inst.sop_instance_uid, path=inst.path,
                        kind=ORIGINAL))
    s.flush()
    return job


def launch(settings: Settings, job_id: int, priority: int = 5) -> str:
    """Send the job's chain to the broker; returns the chain id, recorded in ``Job.celery_id``.

    The chain id (the task id of its ``prepare``, which Celery passes on as
    ``root_id`` to ``infer`` and ``report``) is recorded *before* the chain is sent,
    so that a worker never sees a chain the database does not know yet. Only the
    chain whose id the job row holds may move the job (:func:`set_state`): a chain
    sent again — by recovery, or after the embedded worker was lost — supersedes the
    earlier one, and a message of the earlier chain that comes back (a redelivery,
    a send that timed out but got through) changes nothing.

    ``priority`` is the rule's (0–9, higher = sooner: a STAT rule has 9); every task
    of the chain carries it, as the broker understands it
    (:func:`worker.app.message_priority`), so a STAT job overtakes routine ones
    queued before it, on the ``node`` queue and on the ``gpu`` queue.

    Raises
    ------
    Exception
        Whatever the broker client raises when the chain cannot be sent (broker
        down): the job's ``celery_id`` is cleared again, so the node's stale-QUEUED
        pass sends it later.
    """
    from celery.utils import uuid

    from worker.app import QUEUE_GPU, QUEUE_NODE, configure, message_priority
    from worker.tasks import infer, prepare, report

    configure(settings)
    chain_id = uuid()
    prio = message_priority(settings, priority)
    sig = chain(prepare.si(job_id).set(queue=QUEUE_NODE, priority=prio, task_id=chain_id),
                infer.s().set(queue=QUEUE_GPU, priority=prio),
                report.s().set(queue=QUEUE_NODE, priority=prio))
    with db.session_scope(settings.database.url) as s:
        job = s.get(db.Job, job_id)
        job.celery_id = chain_id
    try:
        sig.apply_async()
    except Exception:
        with db.session_scope(settings.database.url) as s:
            job = s.get(db.Job, job_id)
            if job is not None and job.celery_id == chain_id:
                job.celery_id = None
        raise
    log.info("job %s: chain sent (%s, priority %s)", job_id, chain_id, priority)
    return chain_id


def superseded(job: db.Job, chain_id: Optional[str]) -> bool:
    """True when a task of chain ``chain_id`` may no longer move ``job``: a newer chain was sent."""
    return bool(chain_id) and job.celery_id is not None and job.celery_id != chain_id


def fail(settings: Settings, job_id: int, reason: str, *, chain_id: Optional[str] = None) -> None:
    """Mark the job FAILED with ``reason`` (unless ``chain_id`` was superseded by a newer chain)."""
    with db.session_scope(settings.database.url) as s:
        job = s.get(db.Job, job_id)
        if job is None:
            return
        if superseded(job, chain_id):
            log.info("job %s: chain %s was superseded by %s: its failure (%s) is ignored", job_id, chain_id,
                     job.celery_id, reason[:200])
            return
        job.state, job.error = db.JobState.FAILED, reason[:4000]
    log.error("job %s failed: %s", job_id, reason)


def set_state(settings: Settings, job_id: int, state: db.JobState, *, only_if_unfinished: bool = True,
              chain_id: Optional[str] = None) -> Optional[db.Job]:
    """Move a job to ``state``; returns the job (detached), or None (changing nothing) when it is
    already finished or gone, or when ``chain_id`` (the calling task's ``root_id``) is not the
    job's current chain (:func:`launch`)."""
    with db.session_scope(settings.database.url) as s:
        job = s.get(db.Job, job_id)
        if job is None or (only_if_unfinished and job.state.finished):
            return None
        if superseded(job, chain_id):
            log.info("job %s: chain %s was superseded by %s: not moving it to %s", job_id, chain_id,
                     job.celery_id, state.value)
            return None
        job.state = state
        if state == db.JobState.PREPARING:
            job.attempts = (job.attempts or 0) + 1
        s.flush()
        s.expunge(job)
        return job


def recover(settings: Settings, *, flush_outbox: bool = True) -> list[int]:
    """Re-send every job the database says is unfinished; returns their ids.

    Run at start-up, and by the node when its embedded worker — the only consumer
    of the embedded broker — was lost (a SIGKILL leaves the message it held
    unacknowledged, and kombu's SQLAlchemy transport never delivers it again).
    QUEUED, PREPARING, INFERRING and REPORTING jobs get a new chain (which
    supersedes any earlier one, :func:`launch`); EXPORTING jobs and forward jobs
    are finished by the outbox, flushed here once (unless ``flush_outbox`` is False:
    the node's outbox loop does it anyway).
    """
    from plugin import outbox

    relaunch: list[tuple[int, int]] = []
    with db.session_scope(settings.database.url) as s:
        for job in s.scalars(select(db.Job).where(db.Job.state.notin_([db.JobState.DONE, db.JobState.FAILED]))):
            if job.state == db.JobState.EXPORTING or job.kind == db.JobKind.FORWARD:
                continue  # results are written (or it only forwards): the outbox finishes it
            job.state = db.JobState.QUEUED
            relaunch.append((job.id, job.priority))
    for jid, prio in relaunch:
        log.info("recovery: job %s was unfinished; sending it again", jid)
        launch(settings, jid, prio)
    if flush_outbox:
        outbox.flush(settings)
    return [j for j, _ in relaunch]
