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
from datetime import timedelta
from pathlib import Path
from typing import Optional

import pydicom
from sqlalchemy import select

from plugin import db, jobs, outbox
from plugin.config import ConfigError, Settings, load_settings
from plugin.dimse.scp import StoreSCP
from plugin.routing import Decision, StudyFacts, min_quiet, read_series_headers, route, rules_version
from plugin.storage import InstanceStore

log = logging.getLogger("cmr_ai.node")


def study_headers(s, study: db.Study) -> list[pydicom.Dataset]:
    """One header (no pixels) per series of the study: what routing looks at.

    The header is read by :func:`plugin.routing.read_series_headers` (the first of the
    series' instances, in the order received, that reads), the same function
    ``cmr-ai rules explain`` uses on a folder, so both see a study alike.
    """
    groups = []
    for se in study.series:
        paths = s.scalars(select(db.Instance.path).where(db.Instance.series_id == se.id)
                          .order_by(db.Instance.id).limit(3)).all()
        groups.append((se, paths))
    out = []
    for (se, _paths), header in zip(groups, read_series_headers(p for _, p in groups)):
        if header is None:
            if not _paths:
                continue
            header = pydicom.Dataset()  # no file of the series reads: route on what the index knows
            header.Modality, header.SeriesDescription = se.modality, se.series_description
            header.StudyDescription = study.study_description
            header.SeriesInstanceUID = se.series_instance_uid
        out.append(header)
    return out


def study_facts(s, study: db.Study) -> StudyFacts:
    """What routing knows of a stored study: headers, files (read only if a rule asks), association."""

    def paths() -> list[str]:
        return list(s.scalars(select(db.Instance.path).join(db.Series).where(db.Series.study_id == study.id)
                              .order_by(db.Instance.id)).all())

    return StudyFacts(headers=study_headers(s, study), paths=paths,
                      calling_ae=(study.calling_ae or "").strip() or None,
                      source_ip=(study.source_ip or "").strip() or None, study_instance_uid=study.study_instance_uid)


#: Sections a running node can take from a changed config file; any other change needs a restart.
RELOADABLE = ("rules", "destinations")
CONFIG_POLL = 1.0  # seconds between looks at the config file


class Node:
    def __init__(self, settings: Settings, *, start_worker: Optional[bool] = None, poll: float = 0.5,
                 listen: bool = True):
        """``listen=False``: no DICOM listener, admin API, pollers or stability loop — the worker
        and the outbox only (:func:`process_study`, which routes one study itself)."""
        self.settings = settings
        self.listen = listen
        self.poll = poll
        self.start_worker = settings.queue.broker == "embedded" if start_worker is None else start_worker
        self.store = InstanceStore(settings.storage.path, fsync=settings.storage.fsync,
                                   duplicates=settings.storage.duplicates)
        self.scp = StoreSCP(ae_title=settings.node.ae_title, host=settings.node.host, port=settings.node.port,
                            store=self.store, db_url=settings.database.url, max_pdu=settings.node.max_pdu,
                            allow=settings.node.allow, tls=settings.node.tls)
        self.api = None  # plugin.api.AdminAPI, when node.http_port is set
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._worker: Optional[subprocess.Popen] = None
        self._worker_restarting = False
        self._routes: dict[tuple[int, int, Optional[str]], Decision] = {}
        self._reload = threading.Event()  # set by SIGHUP
        self._config_stamp: Optional[tuple[int, int]] = None  # (mtime_ns, size) last looked at
        self._refused: Optional[str] = None  # version of the last file refused (logged once)
        self._next_config_check = 0.0
        self._config_text: Optional[str] = None  # the text of the config in force (for the embedded worker)
        if settings.source:
            try:
                st = os.stat(settings.source)
                self._config_stamp = (st.st_mtime_ns, st.st_size)
                text = Path(settings.source).read_text()
                if rules_version(text) == settings.rules_version:
                    self._config_text = text
            except OSError:
                pass

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        db.get_engine(self.settings.database.url)
        n = self.store.cleanup_temp()
        if n:
            log.info("removed %d partial file(s) left by an earlier crash (never acknowledged)", n)
        from worker.app import configure

        configure(self.settings)
        if self.listen:
            if self.start_worker and self.settings.queue.broker == "embedded":
                self._purge_embedded_queues()
            recovered = jobs.recover(self.settings)
            if recovered:
                log.info("recovery: re-sent %d unfinished job(s): %s", len(recovered), recovered)
            self.scp.start()
            if self.settings.node.http_port is not None:
                self._start_api()
            self._write_marker()
        if self.start_worker:
            self._spawn_worker()
        loops = [(self._outbox_loop, "outbox")]
        if self.listen:
            loops.insert(0, (self._stability_loop, "stability"))
            loops += [(self._poller(name), f"poll-{name}") for name, src in self.settings.sources.items()
                      if src.poll_every > 0]
        for target, name in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _poller(self, name: str):
        """The QIDO-RS poller of source ``name`` (plugin/dicomweb/pull.py), as a thread target."""
        from plugin.dicomweb.pull import Poller

        poller = Poller(lambda: self.settings, name, self.store, self.scp.indexer)
        src = self.settings.sources[name]
        log.info("polling source %s (%s) every %g s", name, src.dicomweb.url, src.poll_every)
        return lambda: poller.run(self._stop)

    # -- the running-node marker (``cmr-ai pull`` asks whether a node will route what it pulls) --
    def _marker(self) -> Path:
        from worker.app import var_dir

        return var_dir(self.settings) / "run" / "node.json"

    def _write_marker(self) -> None:
        import json
        import socket

        from plugin.storage import write_atomic

        info = {"pid": os.getpid(), "host": socket.gethostname(), "dicom_port": self.scp.port,
                "http_port": self.api.port if self.api is not None else None,
                "config": str(Path(self.settings.source).resolve()) if self.settings.source else None}
        try:
            write_atomic(self._marker(), json.dumps(info).encode(), fsync=False)
        except OSError as e:
            log.warning("cannot write %s (cmr-ai pull will not know this node runs): %s", self._marker(), e)

    def _remove_marker(self) -> None:
        import json

        try:
            if json.loads(self._marker().read_text()).get("pid") == os.getpid():
                self._marker().unlink()
        except (OSError, ValueError):
            pass

    def _start_api(self) -> None:
        """The admin HTTP API (plugin/api.py) on node.host:node.http_port, behind its bearer token."""
        from plugin.api import AdminAPI, load_or_create_token

        token, token_path = load_or_create_token(self.settings)
        self.api = AdminAPI(lambda: self.settings, token, host=self.settings.node.host,
                            port=self.settings.node.http_port,
                            status=lambda: {"dicom_port": self.scp.port, "dicom_tls_port": self.scp.tls_port})
        # STOW-RS into the node (POST /dicom-web/studies): the same store, index and checks as C-STORE
        self.api.enable_stow(self.store, self.scp.indexer)
        self.api.start()
        log.info("admin API on http://%s:%s (/health open; /api/* need Authorization: Bearer <token in %s>)",
                 self.settings.node.host, self.api.port, token_path)

    def stop(self) -> None:
        self._stop.set()
        if self.api is not None:
            self.api.stop()
        if self.listen:
            self.scp.stop()
            self._remove_marker()
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

        def _hup(_signum, _frame):  # the stability thread re-reads the file (and logs) at its next pass
            self._reload.set()

        signal.signal(signal.SIGTERM, _term)
        signal.signal(signal.SIGINT, _term)
        signal.signal(signal.SIGHUP, _hup)
        self.start()
        try:
            while not self._stop.wait(1.0):
                if self.start_worker and self._worker is not None and self._worker.poll() is not None:
                    if self._worker_restarting:
                        log.info("embedded worker stopped for the new config: starting it again")
                    else:
                        log.error("embedded worker exited with %s: restarting it", self._worker.returncode)
                        self._resend_lost_jobs()
                    self._worker_restarting = False
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

    def _resend_lost_jobs(self) -> None:
        """The embedded worker died without a warm shutdown (SIGKILL, OOM): re-send what it held.

        It is the embedded broker's only consumer, and kombu's SQLAlchemy transport
        keeps a message it delivered hidden until it is acknowledged — a consumer
        killed before acknowledging loses it for good. So, with no worker running,
        the queues are purged and every job the database says is unfinished gets a
        new chain (:func:`plugin.jobs.recover`), as at start-up; a chain of the dead
        worker that still comes back is superseded and changes nothing.
        """
        if self.settings.queue.broker != "embedded":
            return  # other brokers redeliver unacknowledged messages themselves
        try:
            self._purge_embedded_queues()
            resent = jobs.recover(self.settings, flush_outbox=False)  # the outbox loop flushes
            if resent:
                log.info("embedded worker lost: re-sent %d unfinished job(s): %s", len(resent), resent)
        except Exception:
            log.exception("could not re-send the jobs of the lost embedded worker; they are sent at the next start")

    def _worker_config(self) -> Path:
        """The config file for the embedded worker: a copy of the one in force.

        A copy, not the admin's file: a worker (re)started after an edit the node
        refused must run with what the node runs with. Relative paths in the config
        are taken from the current directory, so the copy means the same.
        """
        assert self.settings.source
        if self._config_text is None:
            return Path(self.settings.source).resolve()
        from plugin.storage import write_atomic
        from worker.app import var_dir

        path = var_dir(self.settings) / "run" / f"config-{self.settings.rules_version}.yaml"
        if not path.exists():
            write_atomic(path, self._config_text.encode())
        return path.resolve()

    def _spawn_worker(self) -> None:
        if not self.settings.source:
            raise RuntimeError("the embedded worker needs the config file path (Settings.source)")
        env = dict(os.environ, CMR_AI_CONFIG=str(self._worker_config()), HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "plugin.cli", "worker", "--config", env["CMR_AI_CONFIG"],
               "--queues", "node,gpu", "--concurrency", str(self.settings.queue.worker_concurrency)]
        if self.listen:  # the node's own output is the log
            log.info("starting embedded worker: %s", " ".join(cmd))
            self._worker = subprocess.Popen(cmd, env=env)
            return
        # process_study (cmr-ai pull): keep the command's output for its own report
        from worker.app import var_dir

        path = var_dir(self.settings) / "run" / "pull-worker.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting a worker for this study (its log: %s)", path)
        with open(path, "ab") as out:
            self._worker = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    # -- loops -------------------------------------------------------------
    def _stability_loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                forced = self._reload.is_set()
                if forced or time.monotonic() >= self._next_config_check:
                    if forced:
                        log.info("SIGHUP: re-reading %s", self.settings.source)
                    self._reload.clear()
                    self._next_config_check = time.monotonic() + CONFIG_POLL
                    self.reload_config(force=forced)
            except Exception:
                log.exception("config reload failed")
            try:
                self.check_studies()
            except Exception:
                log.exception("stability check failed")

    # -- hot reload --------------------------------------------------------
    def reload_config(self, force: bool = False) -> Optional[bool]:
        """Take a changed config file: rules (and destinations) swap at once, or not at all.

        The file is validated in full (:func:`plugin.config.load_settings`). A file
        with any mistake is refused, every error is logged and the running rules stay
        in force; so is a file that changes a section other than ``rules`` and
        ``destinations`` (those need a restart), so that a change never takes effect
        half-way. Runs in the stability thread, between two routing passes.

        Parameters
        ----------
        force:
            Re-read even when the file looks unchanged (SIGHUP).

        Returns
        -------
        True when new rules were taken, False when the file was refused, None when
        it had not changed.
        """
        path = self.settings.source
        if not path:
            return None
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
            if not force and stamp == self._config_stamp:
                return None
            self._config_stamp = stamp
            text = Path(path).read_text()
        except OSError as e:
            if force:
                log.error("config %s cannot be read (%s): rules version %s stays in force", path, e,
                          self.settings.rules_version)
            return None
        current = self.settings.rules_version
        version = rules_version(text)
        if version == current:
            if force:
                log.info("config %s unchanged: rules version %s", path, current)
            return None
        if version == self._refused and not force:
            return False
        try:
            new = load_settings(path)
        except ConfigError as e:
            self._refused = version
            log.error("config %s changed (version %s) but has %d error(s): refused; rules version %s stays in "
                      "force", path, version, len(e.errors), current)
            for line in e.errors:
                log.error("  %s", line)
            return False
        old = self.settings
        fixed = [k for k in Settings.model_fields if k not in RELOADABLE and k not in ("source", "rules_version")
                 and getattr(new, k) != getattr(old, k)]
        if fixed:
            self._refused = new.rules_version
            log.error("config %s changed (version %s) in %s, which needs a restart: refused as a whole; rules "
                      "version %s stays in force", path, new.rules_version, ", ".join(fixed), current)
            return False
        self.settings = old.model_copy(update={"rules": new.rules, "destinations": new.destinations,
                                               "rules_version": new.rules_version})
        self._config_text = text if version == new.rules_version else None
        self._refused = None
        log.info("config %s reloaded: rules version %s → %s (%d rules: %s)", path, current, new.rules_version,
                 len(new.rules), ", ".join(r.name for r in new.rules) or "none")
        if new.destinations != old.destinations:
            log.info("destinations changed: %s", ", ".join(sorted(new.destinations)) or "none")
            if self._worker is not None and self._worker.poll() is None:
                log.info("restarting the embedded worker so that it sends with the new destinations")
                self._worker_restarting = True
                self._worker.send_signal(signal.SIGTERM)
        return True

    def _outbox_loop(self) -> None:
        while not self._stop.wait(2.0):
            try:
                outbox.flush(self.settings)
            except Exception:
                log.exception("outbox flush failed")

    def check_studies(self, now=None, local_now=None, complete: frozenset[str] = frozenset()) -> list[int]:
        """Route every study that has been quiet long enough; returns the ids of analysis jobs launched.

        A study is routed once it has been quiet for the shortest ``stable_after``
        (or 1 s when a rule has ``expected_views``); it is acted on once quiet for
        the matched rules' ``stable_after``, or at once when every matched rule's
        expected views are present. ``now`` (UTC) and ``local_now`` (the clock of
        ``time`` and ``study_age`` conditions) are for tests. A study in ``complete``
        (Study Instance UIDs; a pull that fetched all of it) is routed at once.

        A study being pulled from a DICOMweb source, or whose pull failed part-way, is
        held (not routed) until a pull completes it (:func:`held_studies`): a half
        study is never analysed.
        """
        settings = self.settings  # one consistent set of rules for this pass (hot reload swaps it)
        rules = settings.rules
        first_look = min_quiet(rules)
        now = now or db.utcnow()
        created: list[tuple[int, int]] = []
        receiving: set[int] = set()
        with db.session_scope(settings.database.url) as s:
            studies = s.scalars(select(db.Study).where(db.Study.state == db.StudyState.RECEIVING)).all()
            held = held_studies(s, now) if studies else set()
            for st in studies:
                receiving.add(st.id)
                if st.study_instance_uid in held:
                    continue
                quiet = (now - st.last_received).total_seconds()
                if st.study_instance_uid in complete:
                    quiet = float("inf")
                if quiet < first_look:
                    continue
                key = (st.id, st.n_instances, settings.rules_version)
                decision = self._routes.get(key)
                if decision is None:
                    decision = route(rules, study_facts(s, st), now=local_now, rules_version=settings.rules_version)
                    self._routes[key] = decision
                if not decision.ready(quiet):
                    continue
                st.rule = ", ".join(decision.rules)[:128] or None
                st.decision = decision.to_json()
                st.rules_version = decision.rules_version
                made = []
                for a in decision.analyses:
                    job = jobs.create_job(s, st, a, decision.rules_version)
                    created.append((job.id, a.priority))
                    made.append(f"analyse job {job.id} ({a.rule})")
                for a in decision.forwards:
                    job = jobs.create_forward_job(s, st, a, decision.rules_version)
                    if job is not None:
                        made.append(f"forward job {job.id} to {', '.join(a.forward_to)} ({a.rule})")
                early = (" (pulled whole)" if st.study_instance_uid in complete else
                         " (expected views present)" if decision.early and quiet < decision.stable_after else "")
                if decision.action == "ignore":
                    st.state = db.StudyState.IGNORED
                    log.info("study %s complete (%d instances)%s: %s [rules version %s]", st.study_instance_uid,
                             st.n_instances, early, f"ignored by rule {decision.rule}" if decision.rule else
                             "no rule matched: ignored", decision.rules_version)
                else:
                    st.state = db.StudyState.COMPLETE
                    log.info("study %s complete (%d instances)%s: rule %s → %s [rules version %s]",
                             st.study_instance_uid, st.n_instances, early, ", ".join(decision.rules),
                             "; ".join(made) or "nothing new to send", decision.rules_version)
        for key in [k for k in self._routes if k[0] not in receiving]:
            del self._routes[key]
        with db.session_scope(settings.database.url) as s:
            stale = now.timestamp() - 15
            for job in s.scalars(select(db.Job).where(db.Job.state == db.JobState.QUEUED,
                                                      db.Job.celery_id.is_(None))).all():
                if job.kind == db.JobKind.FORWARD:
                    continue
                if job.created_at.timestamp() < stale and job.id not in {j for j, _ in created}:
                    created.append((job.id, job.priority))  # its first send failed (broker down): again
        for job_id, prio in created:
            try:
                jobs.launch(settings, job_id, prio)
            except Exception as e:  # broker down: the job stays QUEUED; recovery or the next start sends it
                log.error("job %s: cannot reach the broker (%s); it stays queued", job_id, e)
        return [j for j, _ in created]


def held_studies(s, now) -> set[str]:
    """Study Instance UIDs a DICOMweb pull holds back from routing: being pulled (heartbeat
    fresher than ``PULL_STALE_SECONDS``) or failed part-way (the poller or ``cmr-ai pull``
    completes them)."""
    from plugin.dicomweb.pull import PULL_STALE_SECONDS

    fresh = now - timedelta(seconds=PULL_STALE_SECONDS)
    rows = s.execute(select(db.SourceStudy.study_instance_uid, db.SourceStudy.state, db.SourceStudy.heartbeat)
                     .where(db.SourceStudy.state != db.PullState.DONE)).all()
    return {uid for uid, state, beat in rows
            if state == db.PullState.FAILED or (beat is not None and beat >= fresh)}


def running_node(settings: Settings) -> Optional[dict]:
    """The ``cmr-ai serve`` running with this config's var dir on this host (its marker:
    pid, ports, config), or None."""
    import json
    import socket

    from worker.app import var_dir

    try:
        info = json.loads((var_dir(settings) / "run" / "node.json").read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return info


def process_study(settings: Settings, study_uid: str, *, timeout: float = 1800, progress=None) -> dict:
    """Route one stored study now and see its jobs through, with no node running (``cmr-ai pull``).

    Starts what a node would (the embedded worker when the broker is embedded; other
    brokers need their workers running) but no listener, routes the study at once (it was
    pulled whole), waits for its jobs to finish and the outbox to deliver, then stops.

    Returns
    -------
    dict
        ``{"state": <study state>, "rule": …, "jobs": [job_summary(...), …], "finished": bool}``;
        ``finished`` is False when ``timeout`` passed first (what is left stays queued / in the
        outbox for the next node or ``cmr-ai exports retry``).
    """
    node = Node(settings, listen=False)
    node.start()
    try:
        task = progress.add("routing and analysing", total=None) if progress is not None else None
        node.check_studies(complete=frozenset({study_uid}))
        end = time.monotonic() + timeout
        finished = False
        while True:
            with db.session_scope(settings.database.url) as s:
                st = s.scalar(select(db.Study).where(db.Study.study_instance_uid == study_uid))
                if st is None:
                    raise ValueError(f"study {study_uid} is not in the index")
                ids = [j.id for j in st.jobs]
                states = [j.state for j in st.jobs]
                study_state, rule = st.state.value, st.rule
            if task is not None:
                task.update(description="jobs: " + (", ".join(f"{i} {x.value}" for i, x in zip(ids, states))
                                                    or "none"))
            if all(x.finished for x in states):
                finished = True
                break
            if time.monotonic() > end or (node.start_worker and node._worker is not None
                                          and node._worker.poll() is not None):
                break
            time.sleep(0.5)
        if task is not None:
            task.done()
        return {"state": study_state, "rule": rule, "jobs": [job_summary(settings, i) for i in ids],
                "finished": finished}
    finally:
        node.stop()


def job_summary(settings: Settings, job_id: int) -> dict:
    """One job: id, kind, rule, state, error, result (JSON text) and its outbox rows
    (``exports``: kind, destination, SOP Instance UID, state, last peer status)."""
    with db.session_scope(settings.database.url) as s:
        job = s.get(db.Job, job_id)
        exports = [{"kind": e.kind, "destination": e.destination, "sop_instance_uid": e.sop_instance_uid,
                    "state": e.state.value, "status": e.status}
                   for e in s.scalars(select(db.Export).where(db.Export.job_id == job_id).order_by(db.Export.id))]
        return {"id": job.id, "kind": job.kind.value if job.kind else "analyse", "rule": job.rule,
                "state": job.state.value, "error": job.error, "exports": exports, "result": job.result_json}
