"""Faults in the job path (issue 8): a worker killed mid-job, the broker down, a restart
with unfinished jobs. Each ends with every job DONE once and its draft delivered once.

Everything is real: ``cmr-ai serve`` (and, for Redis, ``cmr-ai worker``) as
subprocesses, dcmtk's ``storescu`` as the modality, a private ``redis-server``, and as
the PACS a pynetdicom Storage SCP that counts every C-STORE it receives per SOP
Instance UID — a folder or Orthanc would hide a second delivery of the same object.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import func, select

from peers import dcmtk_storescu, free_port, stop_process
from plugin import db
from plugin.phantom import write_study
from test_e2e import _wait_port, start_serve

REDIS = "/usr/bin/redis-server"
INFER_DONE = re.compile(r"Task cmr_ai\.infer\[[^\]]+\] succeeded")
INFER_RECEIVED = re.compile(r"Task cmr_ai\.infer\[([^\]]+)\] received")
#: sr, text-sr, sc, pr: what one analysis job delivers per destination
OBJECTS_PER_JOB = 4


class CountingPACS:
    """A real Storage SCP on a free port that answers Success and counts C-STOREs per SOP Instance UID."""

    def __init__(self, port: Optional[int] = None):
        self.port = port or free_port()
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = None

    def _store(self, event) -> int:
        with self._lock:
            self.counts[str(event.request.AffectedSOPInstanceUID)] += 1
        return 0x0000

    def start(self) -> "CountingPACS":
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    @property
    def destination(self) -> str:
        return f"  pacs: {{dimse: {{ae_title: PACS, host: 127.0.0.1, port: {self.port}}}}}"


def rule(name: str, stable_after: float = 1, **match: str) -> str:
    m = ", ".join(f"{k}: {v!r}" for k, v in (match or {"Modality": "MR"}).items())
    return (f"  - {{name: {name}, match: {{{m}}}, stable_after: {stable_after}, template: lv_function, "
            f"model: demo, send_to: [pacs]}}")


def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"


def log_text(tmp_path: Path) -> str:
    return (tmp_path / "node.log").read_text(errors="replace")


def job_rows(url: str) -> list[dict]:
    with db.session_scope(url) as s:
        return [{"id": j.id, "state": j.state, "study": j.study_id, "attempts": j.attempts, "error": j.error,
                 "celery_id": j.celery_id} for j in s.scalars(select(db.Job).order_by(db.Job.id)).all()]


def exports(url: str) -> list[dict]:
    with db.session_scope(url) as s:
        return [{"job": e.job_id, "sop": e.sop_instance_uid, "state": e.state, "status": e.status,
                 "dup": e.duplicate_of} for e in s.scalars(select(db.Export)).all()]


def wait_for(what: str, check: Callable[[], object], tmp_path: Path, timeout: float = 180, poll: float = 0.1):
    """Poll ``check`` until it returns something truthy (returned); fail with the node log otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(poll)
    pytest.fail(f"{what}: not reached in {timeout} s; jobs {job_rows(db_url(tmp_path))}\n"
                + log_text(tmp_path)[-5000:])


def jobs_in(url: str, *states: db.JobState) -> list[dict]:
    return [j for j in job_rows(url) if j["state"] in states]


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(d.name))
    return out


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def embedded_worker(node: subprocess.Popen) -> tuple[int, list[int]]:
    """The node's embedded Celery worker: (main process, its pool processes)."""
    main = [p for p in children(node.pid) if "plugin.cli worker" in cmdline(p)]
    assert len(main) == 1, f"expected one embedded worker under {node.pid}: {main}"
    return main[0], children(main[0])


stop = stop_process


def send_study(tmp_path: Path, port: int, seed: int, **kw) -> int:
    """Write a small cardiac study and C-STORE it with dcmtk; every instance must be acknowledged."""
    folder = tmp_path / f"study-{seed}"
    write_study(folder, style="siemens", seed=seed, slices=4, phases=6, size=96, **kw)
    files = sorted(folder.rglob("*.dcm"))
    r = dcmtk_storescu(port, files, extra_args=["-R"])
    assert r.returncode == 0, f"storescu: {r.stdout}\n{r.stderr}"
    return len(files)


def assert_delivered_once(tmp_path: Path, pacs: CountingPACS, n_jobs: int) -> None:
    """Every job DONE, each of its objects SENT once and received once by the PACS, one report per job."""
    url = db_url(tmp_path)
    rows = job_rows(url)
    assert len(rows) == n_jobs, rows  # no duplicate job
    assert all(j["state"] == db.JobState.DONE for j in rows), rows
    ex = exports(url)
    assert len(ex) == n_jobs * OBJECTS_PER_JOB, ex
    assert all(e["state"] == db.ExportState.SENT and e["dup"] is None for e in ex), ex
    got = pacs.snapshot()
    assert set(got) == {e["sop"] for e in ex}, (got, ex)
    assert all(n == 1 for n in got.values()), f"delivered more than once: {got}"
    log = log_text(tmp_path)
    for j in rows:
        n = log.count(f"report: job {j['id']}: ")
        assert n == 1, f"job {j['id']} reported {n} times"


def settle(tmp_path: Path, pacs: CountingPACS, seconds: float = 3.0) -> None:
    """Nothing changes after DONE: no second report, no second delivery (watched for a few seconds)."""
    before, jobs_before = pacs.snapshot(), job_rows(db_url(tmp_path))
    time.sleep(seconds)
    assert pacs.snapshot() == before
    assert job_rows(db_url(tmp_path)) == jobs_before


# ---------------------------------------------------------------------------
# 1. a worker killed mid-job

def wait_log(tmp_path: Path, text: str, count: int = 1, timeout: float = 180) -> None:
    wait_for(f"{count} x {text!r} in the log", lambda: log_text(tmp_path).count(text) >= count, tmp_path, timeout)


def kill_during_inference(tmp_path: Path, node: subprocess.Popen, whole_worker: bool) -> int:
    """Wait until the embedded worker runs ``infer``, SIGKILL its pool process (or the worker with its
    pool); returns the worker's main pid."""
    wait_log(tmp_path, "Task cmr_ai.infer[")  # received: the idle pool process starts it at once
    time.sleep(1.0)  # well inside the model load and scoring
    main, pool = embedded_worker(node)
    assert pool, "the embedded worker has no pool process"
    assert not INFER_DONE.search(log_text(tmp_path)), "infer finished before the kill"
    for pid in ([main] if whole_worker else []) + pool:
        os.kill(pid, signal.SIGKILL)
    (job,) = job_rows(db_url(tmp_path))
    assert job["state"] == db.JobState.INFERRING, f"killed too late: the job was already {job['state']}"
    return main


@pytest.mark.slow
def test_pool_process_killed_idle_and_mid_inference_job_is_redelivered_and_finishes_once(tmp_path, demo_model_dir):
    """The worker's pool process is SIGKILLed twice: idle before the study comes (the replacement
    must still take tasks: billiard's shared queue lock, worker.app.PreforkPool), then while it
    runs ``infer`` (acks_late + reject_on_worker_lost: Celery redelivers the task to a new pool
    process). The job is prepared once and delivered once."""
    pacs = CountingPACS().start()
    port = free_port()
    node = start_serve(tmp_path, port, demo_model_dir, pacs.destination, rule("cardiac"))
    url = db_url(tmp_path)
    try:
        _wait_port(port, node)
        wait_log(tmp_path, " ready.")
        main, idle = embedded_worker(node)
        for pid in idle:
            os.kill(pid, signal.SIGKILL)
        wait_log(tmp_path, "exited with 'signal 9 (SIGKILL)'")
        send_study(tmp_path, port, seed=11)
        kill_during_inference(tmp_path, node, whole_worker=False)

        (job,) = wait_for("job finished", lambda: jobs_in(url, db.JobState.DONE, db.JobState.FAILED), tmp_path)
        assert job["state"] == db.JobState.DONE, job
        log = log_text(tmp_path)
        assert log.count("exited with 'signal 9 (SIGKILL)'") == 2, log[-4000:]
        assert "WorkerLostError" in log, log[-4000:]  # infer was running, and was redelivered
        first, again = INFER_RECEIVED.findall(log)  # the same task, redelivered
        assert first == again
        assert embedded_worker(node)[0] == main  # the worker itself lived on
        assert job["attempts"] == 1  # prepare ran once: only infer was redelivered
        assert_delivered_once(tmp_path, pacs, n_jobs=1)
        settle(tmp_path, pacs)
    finally:
        stop(node)
        pacs.stop()


@pytest.mark.slow
def test_embedded_worker_killed_mid_inference_job_is_sent_again_and_finishes_once(tmp_path, demo_model_dir):
    """The embedded worker and its pool are SIGKILLed while ``infer`` runs. The SQLite broker never
    redelivers a message its killed consumer held; the node restarts the worker and sends the
    job again (plugin.node.Node._resend_lost_jobs). The job is done once, delivered once."""
    pacs = CountingPACS().start()
    port = free_port()
    node = start_serve(tmp_path, port, demo_model_dir, pacs.destination, rule("cardiac"))
    url = db_url(tmp_path)
    try:
        _wait_port(port, node)
        send_study(tmp_path, port, seed=12)
        main = kill_during_inference(tmp_path, node, whole_worker=True)

        (job,) = wait_for("job finished", lambda: jobs_in(url, db.JobState.DONE, db.JobState.FAILED), tmp_path)
        assert job["state"] == db.JobState.DONE, job
        log = log_text(tmp_path)
        assert "embedded worker exited with -9: restarting it" in log, log[-4000:]
        assert "embedded worker lost: re-sent 1 unfinished job(s)" in log, log[-4000:]
        assert embedded_worker(node)[0] != main
        first, again = INFER_RECEIVED.findall(log)  # the lost task, then the new chain's
        assert first != again
        assert job["attempts"] == 2  # the new chain prepared it again
        assert_delivered_once(tmp_path, pacs, n_jobs=1)
        settle(tmp_path, pacs)
    finally:
        stop(node)
        pacs.stop()


# ---------------------------------------------------------------------------
# 2. the broker down

class RedisServer:
    """A private redis-server on ``port``, no persistence, in ``workdir`` (log: ``redis.log``)."""

    def __init__(self, workdir: Path, port: int):
        self.workdir, self.port = workdir, port
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "RedisServer":
        with open(self.workdir / "redis.log", "a") as log:
            self.proc = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.workdir)],
                                         stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            assert self.proc.poll() is None, (self.workdir / "redis.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"redis-server did not answer on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None


def write_config(tmp_path: Path, port: int, model_dir, broker: str, destinations: str, rules: str) -> Path:
    """The config of ``start_serve`` (tests/test_e2e.py) with another ``queue.broker``."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""
node: {{ae_title: CMR_AI, host: 127.0.0.1, port: {port}}}
storage: {{path: {tmp_path / 'var' / 'dicom'}}}
database: {{url: "{db_url(tmp_path)}"}}
queue: {{broker: "{broker}"}}
models: {{demo: {{path: "{model_dir}", quantization: nf4}}}}
destinations:
{destinations}
rules:
{rules}
""")
    return cfg


def cmr_ai(log: Path, *args: str) -> subprocess.Popen:
    """``cmr-ai ARGS`` in its own process group, stdout and stderr appended to ``log``."""
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", "plugin.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"),
                                start_new_session=True)


@pytest.mark.slow
def test_redis_down_instances_accepted_job_queued_then_sent_when_redis_returns(tmp_path, demo_model_dir):
    """With Redis stopped, a study still goes in (every C-STORE acknowledged) and its job waits
    QUEUED with the broker error logged; Redis back on the same port → the node sends the job
    (stale-QUEUED pass of Node.check_studies), the separate worker has reconnected, and the job
    is done and delivered once."""
    redis = RedisServer(tmp_path / "redis", free_port()).start()
    pacs = CountingPACS().start()
    port = free_port()
    cfg = write_config(tmp_path, port, demo_model_dir, f"redis://127.0.0.1:{redis.port}/0", pacs.destination,
                       rule("cardiac"))
    url = db_url(tmp_path)
    node = cmr_ai(tmp_path / "node.log", "serve", "--config", str(cfg))
    worker = cmr_ai(tmp_path / "node.log", "worker", "--config", str(cfg), "--queues", "node,gpu")
    try:
        _wait_port(port, node)
        wait_log(tmp_path, " ready.")
        redis.stop()

        n = send_study(tmp_path, port, seed=21)
        with db.session_scope(url) as s:  # every instance acknowledged and indexed
            assert s.scalar(select(func.count()).select_from(db.Instance)) == n
        wait_log(tmp_path, "cannot reach the broker", timeout=60)
        (job,) = job_rows(url)
        assert job["state"] == db.JobState.QUEUED and job["celery_id"] is None, job
        assert "chain sent" not in log_text(tmp_path)

        redis.start()
        (job,) = wait_for("job finished", lambda: jobs_in(url, db.JobState.DONE, db.JobState.FAILED), tmp_path)
        assert job["state"] == db.JobState.DONE, job
        assert job["attempts"] == 1
        assert log_text(tmp_path).count(f"job {job['id']}: chain sent") == 1
        assert_delivered_once(tmp_path, pacs, n_jobs=1)
        settle(tmp_path, pacs)
        assert worker.poll() is None and node.poll() is None
    finally:
        stop(node)
        stop(worker)
        redis.stop()
        pacs.stop()


# ---------------------------------------------------------------------------
# 3. a restart with unfinished jobs

#: what a job's row says when the node dies, for the jobs written into its database
HELD = {"queued": db.JobState.QUEUED, "preparing": db.JobState.PREPARING, "inferring": db.JobState.INFERRING,
        "reporting": db.JobState.REPORTING}


@pytest.mark.slow
def test_restart_recovers_every_unfinished_job_once(tmp_path, demo_model_dir):
    """``cmr-ai serve`` is SIGKILLed with one job EXPORTING (results written, deliveries failing:
    the PACS is down) and, written into its database while it is down, four jobs as a crash
    leaves them: QUEUED never sent, PREPARING, INFERRING and REPORTING (their chains lost with the
    embedded broker's queues). After a restart, with the PACS up, each of the five is DONE once,
    and each object is delivered once."""
    pacs = CountingPACS()  # not started yet: deliveries fail and are retried
    port = free_port()
    rules = "\n".join([rule("now", StudyDescription="^job-exporting$"),
                       rule("later", stable_after=3600, StudyDescription="^job-held")])
    node = start_serve(tmp_path, port, demo_model_dir, pacs.destination, rules)
    url = db_url(tmp_path)
    try:
        _wait_port(port, node)
        send_study(tmp_path, port, seed=31, study_description="job-exporting")
        for i, name in enumerate(HELD):
            send_study(tmp_path, port, seed=32 + i, study_description=f"job-held-{name}")

        def exporting_and_failed():
            with db.session_scope(url) as s:
                rows = s.scalars(select(db.Export)).all()
                return (len(rows) == OBJECTS_PER_JOB and all(r.state == db.ExportState.PENDING and r.attempts >= 1
                                                               and r.claim is None for r in rows)
                        and jobs_in(url, db.JobState.EXPORTING))

        wait_for("job EXPORTING, deliveries failed", exporting_and_failed, tmp_path)
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(30)
        assert "sent to pacs" not in log_text(tmp_path)

        with db.session_scope(url) as s:  # the crash left these: routed studies with unfinished jobs
            for name, state in HELD.items():
                study = s.scalar(select(db.Study).where(db.Study.study_description == f"job-held-{name}"))
                assert study.state == db.StudyState.RECEIVING  # never routed before the kill
                study.state, study.rule = db.StudyState.COMPLETE, "later"
                s.add(db.Job(study_id=study.id, kind=db.JobKind.ANALYSE, rule="later", template="lv_function",
                             model="demo", priority=5, destinations="pacs", state=state,
                             celery_id=None if state == db.JobState.QUEUED else f"lost-{name}",
                             attempts=0 if state == db.JobState.QUEUED else 1))
        assert sorted(j["state"].value for j in job_rows(url)) == sorted(
            ["exporting", "queued", "preparing", "inferring", "reporting"])

        pacs.start()
        node = start_serve(tmp_path, port, demo_model_dir, pacs.destination, rules)
        _wait_port(port, node)
        wait_for("every job finished", lambda: len(jobs_in(url, db.JobState.DONE, db.JobState.FAILED)) == 5,
                 tmp_path, timeout=300)
        log = log_text(tmp_path)
        assert "recovery: re-sent 4 unfinished job(s)" in log, log[-4000:]
        # the EXPORTING job was finished by the outbox, not prepared again; each other one prepared once more
        assert [j["attempts"] for j in job_rows(url)] == [1, 1, 2, 2, 2]
        assert_delivered_once(tmp_path, pacs, n_jobs=5)
        settle(tmp_path, pacs)
    finally:
        stop(node)
        pacs.stop()
