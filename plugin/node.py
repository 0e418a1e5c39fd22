"""The running node: listener, study-complete detection, routing, outbox, embedded worker.

One process (``cmr-ai serve``) runs the C-STORE SCP, a *stability* loop that finds
studies quiet for their rule's ``stable_after`` and routes them, and an *outbox*
loop that retries failed exports. With ``queue.broker: embedded`` it also starts a
real Celery worker as a subprocess (and restarts it if it dies).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pydicom
from sqlalchemy import func, select

from plugin import db, jobs, outbox
from plugin.config import Settings
from plugin.dimse.scp import StoreSCP
from plugin.routing import Decision, route
from plugin.storage import InstanceStore

log = logging.getLogger("cmr_ai.node")


def study_headers(s, study: db.Study) -> list[pydicom.Dataset]:
    """One header (no pixels) per series of the study: what routing looks at."""
    out = []
    for se in study.series:
        inst = s.scalar(select(db.Instance).where(db.Instance.series_id == se.id).order_by(db.Instance.id).limit(1))
        if inst is None:
            continue
        try:
            out.append(pydicom.dcmread(inst.path, stop_before_pixels=True))
        except Exception as e:  # a stored file that no longer reads: route on what the index knows
            log.warning("cannot read %s for routing: %s", inst.path, e)
            ds = pydicom.Dataset()
            ds.Modality, ds.SeriesDescription = se.modality, se.series_description
            ds.StudyDescription = study.study_description
            out.append(ds)
    return out


class Node:
    def __init__(self, settings: Settings, *, start_worker: Optional[bool] = None, poll: float = 0.5):
        self.settings = settings
        self.poll = poll
        self.start_worker = settings.queue.broker == "embedded" if start_worker is None else start_worker
        self.store = InstanceStore(settings.storage.path, fsync=settings.storage.fsync)
        self.scp = StoreSCP(ae_title=settings.node.ae_title, host=settings.node.host, port=settings.node.port,
                            store=self.store, db_url=settings.database.url, max_pdu=settings.node.max_pdu)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._worker: Optional[subprocess.Popen] = None
        self._routes: dict[tuple[int, int], Decision] = {}

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        db.get_engine(self.settings.database.url)
        n = self.store.cleanup_temp()
        if n:
            log.info("removed %d partial file(s) left by an earlier crash (never acknowledged)", n)
        from worker.app import configure

        configure(self.settings)
        if self.start_worker and self.settings.queue.broker == "embedded":
            self._purge_embedded_queues()
        recovered = jobs.recover(self.settings)
        if recovered:
            log.info("recovery: re-sent %d unfinished job(s): %s", len(recovered), recovered)
        self.scp.start()
        if self.start_worker:
            self._spawn_worker()
        for target, name in ((self._stability_loop, "stability"), (self._outbox_loop, "outbox")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        for t in self._threads:
            t.join(timeout=5)
        if self._worker is not None and self._worker.poll() is None:
            self._worker.send_signal(signal.SIGTERM)
            try:
                self._worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._worker.kill()
        self._worker = None

    def run_forever(self) -> None:
        def _term(signum, _frame):
            log.info("signal %s: stopping", signum)
            self._stop.set()

        signal.signal(signal.SIGTERM, _term)
        signal.signal(signal.SIGINT, _term)
        self.start()
        try:
            while not self._stop.wait(1.0):
                if self.start_worker and self._worker is not None and self._worker.poll() is not None:
                    log.error("embedded worker exited with %s: restarting it", self._worker.returncode)
                    self._spawn_worker()
        finally:
            self.stop()

    # -- embedded worker -------------------------------------------------
    def _purge_embedded_queues(self) -> None:
        """Embedded broker only: the DB is the truth, so drop stale messages before recovery re-sends."""
        from worker.app import app

        try:
            with app.connection_for_write() as conn:
                for q in ("node", "gpu"):
                    try:
                        conn.default_channel.queue_purge(q)
                    except Exception:
                        pass
        except Exception as e:
            log.warning("could not purge the embedded broker: %s", e)

    def _spawn_worker(self) -> None:
        if not self.settings.source:
            raise RuntimeError("the embedded worker needs the config file path (Settings.source)")
        env = dict(os.environ, CMR_AI_CONFIG=str(Path(self.settings.source).resolve()), HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "plugin.cli", "worker", "--config", env["CMR_AI_CONFIG"],
               "--queues", "node,gpu", "--concurrency", str(self.settings.queue.worker_concurrency)]
        log.info("starting embedded worker: %s", " ".join(cmd))
        self._worker = subprocess.Popen(cmd, env=env)

    # -- loops -------------------------------------------------------------
    def _stability_loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.check_studies()
            except Exception:
                log.exception("stability check failed")

    def _outbox_loop(self) -> None:
        while not self._stop.wait(2.0):
            try:
                outbox.flush(self.settings)
            except Exception:
                log.exception("outbox flush failed")

    def check_studies(self, now=None) -> list[int]:
        """Route every study that has been quiet long enough; returns the ids of jobs created."""
        rules = self.settings.rules
        min_stable = min((r.stable_after for r in rules), default=3.0)
        now = now or db.utcnow()
        created: list[tuple[int, int]] = []
        with db.session_scope(self.settings.database.url) as s:
            studies = s.scalars(select(db.Study).where(db.Study.state == db.StudyState.RECEIVING)).all()
            for st in studies:
                quiet = (now - st.last_received).total_seconds()
                if quiet < min_stable:
                    continue
                key = (st.id, st.n_instances)
                decision = self._routes.get(key)
                if decision is None:
                    decision = route(rules, study_headers(s, st))
                    self._routes[key] = decision
                if quiet < decision.stable_after:
                    continue
                st.rule = decision.rule
                st.decision = "\n".join(decision.explanation)
                if decision.action == "analyse":
                    st.state = db.StudyState.COMPLETE
                    job = jobs.create_job(s, st, decision)
                    created.append((job.id, decision.priority))
                    log.info("study %s complete (%d instances): rule %s → job %s", st.study_instance_uid,
                             st.n_instances, decision.rule, job.id)
                else:
                    st.state = db.StudyState.IGNORED
                    log.info("study %s complete (%d instances): %s", st.study_instance_uid, st.n_instances,
                             f"ignored by rule {decision.rule}" if decision.rule else "no rule matched: ignored")
        with db.session_scope(self.settings.database.url) as s:
            stale = now.timestamp() - 15
            for job in s.scalars(select(db.Job).where(db.Job.state == db.JobState.QUEUED,
                                                      db.Job.celery_id.is_(None))).all():
                if job.created_at.timestamp() < stale and job.id not in {j for j, _ in created}:
                    created.append((job.id, job.priority))  # its first send failed (broker down): again
        for job_id, prio in created:
            try:
                jobs.launch(self.settings, job_id, prio)
            except Exception as e:  # broker down: the job stays QUEUED; recovery or the next start sends it
                log.error("job %s: cannot reach the broker (%s); it stays queued", job_id, e)
        return [j for j, _ in created]


def job_summary(settings: Settings, job_id: int) -> dict:
    with db.session_scope(settings.database.url) as s:
        job = s.get(db.Job, job_id)
        n_exports = s.scalar(select(func.count()).select_from(db.Export).where(db.Export.job_id == job_id))
        return {"id": job.id, "state": job.state.value, "error": job.error, "exports": n_exports,
                "result": job.result_json}
