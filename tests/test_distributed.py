"""Distributed mode (issue 9): the node, node-queue workers and GPU workers as separate
processes on the real servers of this machine — Redis (127.0.0.1:6379, or a private
``redis-server`` where the test restarts it), RabbitMQ (127.0.0.1:5672, guest/guest) and
PostgreSQL (127.0.0.1:5432: a throw-away database per test, ``pg_url`` in conftest.py).

Nothing here skips: a server that is down fails the test and says which. Every test
name holds ``distributed``, ``redis`` or ``postgres`` (``pytest -k "distributed or redis
or postgres"``). Isolation: a Redis database number of its own per test (flushed), the
RabbitMQ queues ``node`` and ``gpu`` deleted at start and end, a new PostgreSQL database.

Every process is real: ``cmr-ai serve`` (no embedded worker with a non-embedded broker),
``cmr-ai worker --queues node`` and ``cmr-ai worker --queues gpu`` processes, dcmtk's
``storescu`` as the modality and, as the PACS, the counting Storage SCP of
tests/test_faults_jobs.py, which would see a second delivery of any object.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from sqlalchemy import select

from peers import dcmtk_storescu, free_port, stop_process
from plugin import db
from plugin.phantom import write_study
from test_e2e import _wait_port
from test_faults_jobs import OBJECTS_PER_JOB, CountingPACS, RedisServer, children, cmr_ai

REDIS_URL = os.environ.get("CMR_AI_TEST_REDIS", "redis://127.0.0.1:6379")
AMQP_URL = os.environ.get("CMR_AI_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
INFER_STARTED = re.compile(r"infer: job (\d+): started \(priority (\d+)(, delivered again)?\)")


# ---------------------------------------------------------------------------
# brokers: one Redis database per test, RabbitMQ queues emptied

@pytest.fixture()
def redis_url():
    """``redis://127.0.0.1:6379/N`` with N an empty database of its own (flushed at the end)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL + "/0", socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} (set CMR_AI_TEST_REDIS): {e}", pytrace=False)
    claimed = None
    for n in random.sample(range(1, 16), 15):
        c = redis.Redis.from_url(f"{REDIS_URL}/{n}")
        if c.dbsize() == 0 and c.set("cmr-ai-test-claim", str(os.getpid()), nx=True, ex=900):
            claimed = c
            break
    assert claimed is not None, f"no empty Redis database left on {REDIS_URL} (1–15 all hold keys)"
    claimed.delete("cmr-ai-test-claim")
    claimed.set("cmr-ai-test-claim", str(os.getpid()), ex=900)  # not a queue; keeps other tests out
    yield f"{REDIS_URL}/{claimed.connection_pool.connection_kwargs['db']}"
    claimed.flushdb()


def _amqp_reset() -> None:
    from kombu import Connection

    with Connection(AMQP_URL, connect_timeout=5) as conn:
        for name in ("node", "gpu"):
            conn.channel().queue_delete(name)  # also drops a queue declared without x-max-priority


@pytest.fixture()
def amqp_url():
    """RabbitMQ with the queues ``node`` and ``gpu`` deleted (and so emptied) before and after."""
    try:
        _amqp_reset()
    except Exception as e:  # noqa: BLE001 — any failure to reach it fails the test, saying so
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL} (set CMR_AI_TEST_AMQP): {e!r}", pytrace=False)
    yield AMQP_URL
    _amqp_reset()


@pytest.fixture()
def broker(request):
    """The broker a parametrized test names: ``redis`` or ``amqp``."""
    return request.getfixturevalue(f"{request.param}_url")


# ---------------------------------------------------------------------------
# the processes

def rule(name: str, priority: int = 5, **match: str) -> str:
    m = ", ".join(f"{k}: {v!r}" for k, v in (match or {"Modality": "MR"}).items())
    return (f"  - {{name: {name}, match: {{{m}}}, stable_after: 1, template: lv_function, model: demo, "
            f"priority: {priority}, send_to: [pacs]}}")


#: a STAT rule (priority 9) before the routine one (the default 5)
RULES = "\n".join([rule("stat", 9, StudyDescription="(?i)stat"), rule("routine")])


class Cluster:
    """``cmr-ai serve`` and ``cmr-ai worker`` processes sharing one config, each logging to its own file."""

    def __init__(self, tmp_path: Path, model_dir, broker: str, db_url: str, pacs: CountingPACS, *,
                 rules: str = RULES):
        self.tmp, self.db_url, self.port = tmp_path, db_url, free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.config = tmp_path / "config.yaml"
        self.config.write_text(f"""
node: {{ae_title: CMR_AI, host: 127.0.0.1, port: {self.port}}}
storage: {{path: {tmp_path / 'var' / 'dicom'}}}
database: {{url: "{db_url}"}}
queue: {{broker: "{broker}"}}
models: {{demo: {{path: "{model_dir}", quantization: nf4}}}}
safety: {{probe: false}}  # one scoring pass per job: these tests are about delivery, not the model
destinations:
{pacs.destination}
rules:
{rules}
""")

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"----- {n}.log\n{self.log(n)[-3000:]}" for n in self.procs)

    def serve(self) -> "Cluster":
        self.procs["node"] = cmr_ai(self.tmp / "node.log", "serve", "--config", str(self.config))
        return self

    def worker(self, name: str, queues: str, concurrency: int = 1) -> subprocess.Popen:
        self.procs[name] = cmr_ai(self.tmp / f"{name}.log", "worker", "--config", str(self.config),
                                  "--queues", queues, "--concurrency", str(concurrency))
        return self.procs[name]

    def ready(self, timeout: float = 120) -> None:
        """The node listens; every worker says ``ready.``."""
        _wait_port(self.port, self.procs["node"], timeout=timeout)
        for name in [n for n in self.procs if n != "node"]:
            self.wait(f"{name} ready", lambda n=name: " ready." in self.log(n), timeout=timeout)

    def wait(self, what: str, check: Callable[[], object], timeout: float = 180, poll: float = 0.2):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = check()
            if got:
                return got
            for name, p in self.procs.items():
                assert p.poll() is None, f"{name} exited ({p.returncode})\n{self.logs()}"
            time.sleep(poll)
        pytest.fail(f"{what}: not reached in {timeout} s; jobs {self.jobs()}\n{self.logs()}")

    def jobs(self) -> list[db.Job]:
        with db.session_scope(self.db_url) as s:
            rows = s.scalars(select(db.Job).order_by(db.Job.id)).all()
            s.expunge_all()
            return list(rows)

    def finished(self, n: int) -> list[db.Job]:
        """Wait for ``n`` jobs, all DONE or FAILED."""
        return self.wait(f"{n} jobs finished", lambda: (lambda js: len(js) == n and all(j.state.finished for j in js)
                                                        and js)(self.jobs()))

    def infers(self, name: str) -> list[tuple[int, int, bool]]:
        """(job id, message priority, delivered again) for each ``infer`` a worker started, in order."""
        return [(int(j), int(p), bool(again)) for j, p, again in INFER_STARTED.findall(self.log(name))]

    def stop(self) -> None:
        for p in self.procs.values():
            stop_process(p)


def assert_done_once(cluster: Cluster, pacs: CountingPACS, n_jobs: int) -> list[db.Job]:
    """Every job DONE, each object SENT once and received once by the PACS, one report per job."""
    jobs = cluster.jobs()
    assert len(jobs) == n_jobs, jobs
    assert all(j.state == db.JobState.DONE for j in jobs), [(j.id, j.state, j.error) for j in jobs]
    with db.session_scope(cluster.db_url) as s:
        ex = [(e.sop_instance_uid, e.state, e.duplicate_of) for e in s.scalars(select(db.Export)).all()]
    assert len(ex) == n_jobs * OBJECTS_PER_JOB, ex
    assert all(state == db.ExportState.SENT and dup is None for _, state, dup in ex), ex
    time.sleep(1)  # nothing arrives late: no second report, no second delivery
    got = pacs.snapshot()
    assert set(got) == {uid for uid, _, _ in ex}, (got, ex)
    assert all(n == 1 for n in got.values()), f"delivered more than once: {got}"
    logs = "".join(cluster.log(n) for n in cluster.procs)
    for j in jobs:
        assert logs.count(f"report: job {j.id}: ") == 1, f"job {j.id} reported more than once"
    return jobs


def write(cluster: Cluster, seed: int, description: str = "CMR cardiac function") -> list[Path]:
    """A small cardiac study (written while the processes start); :func:`send` C-STOREs it."""
    folder = cluster.tmp / f"study-{seed}"
    write_study(folder, style="siemens", seed=seed, slices=4, phases=6, size=96, study_description=description)
    return sorted(folder.rglob("*.dcm"))


def send(cluster: Cluster, files: list[Path]) -> None:
    r = dcmtk_storescu(cluster.port, files, extra_args=["-R"])
    assert r.returncode == 0, f"storescu: {r.stdout}\n{r.stderr}"


def assert_priority_queues(url: str) -> None:
    """RabbitMQ holds ``node`` and ``gpu`` as priority queues: declaring them without
    ``x-max-priority`` is refused (PRECONDITION_FAILED)."""
    from amqp.exceptions import PreconditionFailed
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        for name in ("node", "gpu"):
            with pytest.raises(PreconditionFailed, match="x-max-priority"):
                conn.channel().queue_declare(name, durable=True, auto_delete=False)


# ---------------------------------------------------------------------------
# configuration and priorities, no server needed

def test_distributed_worker_loads_a_config_whose_node_files_are_on_another_host(tmp_path):
    """``node.tls`` and ``node.http_token_file`` name files on the node's host: ``cmr-ai serve``
    checks them (FILE:LINE errors), ``cmr-ai worker`` on a GPU host loads the same file without them."""
    from plugin.config import ConfigError, load_settings

    cfg = tmp_path / "config.yaml"
    cfg.write_text("node:\n  http_token_file: /nonexistent/api-token\n"
                   "  tls: {cert: /nonexistent/node.pem, key: /nonexistent/node.key}\n"
                   "queue: {broker: 'redis://node-host:6379/0'}\n"
                   "database: {url: 'postgresql+psycopg://cmr@node-host/cmr'}\n")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert any(m.startswith(f"{cfg}:2: node.http_token_file: ") and "no such file" in m for m in e.value.errors), \
        e.value.errors
    assert any(m.startswith(f"{cfg}:3: node.tls.cert: ") for m in e.value.errors), e.value.errors
    s = load_settings(cfg, node_files=False)
    assert s.node.tls.cert == "/nonexistent/node.pem" and s.queue.broker.startswith("redis://")
    r = subprocess.run([sys.executable, "-m", "plugin.cli", "serve", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and f"{cfg}:3: node.tls.cert: " in r.stderr, r.stderr


def test_distributed_priorities_queues_retries_and_redis_visibility_timeout(tmp_path):
    """A rule's priority (higher = sooner) reaches each broker the way it sorts: RabbitMQ as it is
    (queues declared with x-max-priority), Redis inverted (its lowest number is served first);
    the node-side tasks retry database and broker errors; the Redis visibility timeout outlasts a
    task, and a shorter one is refused."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import OperationalError

    from plugin.config import ConfigError, Settings, load_settings
    from worker.app import QUEUES, app, configure, message_priority
    from worker.tasks import infer, prepare, report

    for task in (prepare, report):
        assert {OperationalError, BrokerError} <= set(task.autoretry_for) and task.retry_backoff, task.name
    assert not getattr(infer, "autoretry_for", ())  # the GPU task touches no database
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost and app.conf.worker_prefetch_multiplier == 1

    amqp = Settings.model_validate({"queue": {"broker": AMQP_URL}})
    redis_ = Settings.model_validate({"queue": {"broker": REDIS_URL + "/0", "task_soft_time_limit": 600}})
    assert [message_priority(amqp, p) for p in (0, 5, 9)] == [0, 5, 9]
    assert [message_priority(redis_, p) for p in (0, 5, 9)] == [9, 4, 0]
    assert {q.name: q.queue_arguments for q in QUEUES} == {"node": {"x-max-priority": 10},
                                                            "gpu": {"x-max-priority": 10}}
    keys = ("broker_url", "broker_transport_options", "task_soft_time_limit", "task_time_limit")
    before = {k: app.conf[k] for k in keys}
    try:
        configure(redis_)
        opts = app.conf.broker_transport_options
        assert opts["visibility_timeout"] == 1200 > redis_.queue.task_soft_time_limit + 60
        assert opts["priority_steps"] == list(range(10))
        assert app.conf.task_inherit_parent_priority  # infer and report keep the chain's priority
    finally:
        app.conf.update(before)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("queue:\n  broker: redis://127.0.0.1:6379/0\n  task_soft_time_limit: 600\n"
                   "  visibility_timeout: 300\n")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert "visibility_timeout 300 must exceed task_soft_time_limit + 60 s" in "\n".join(e.value.errors)


# ---------------------------------------------------------------------------
# (a) end to end: several worker processes

@pytest.mark.slow
def test_distributed_redis_postgres_end_to_end_with_several_workers(tmp_path, demo_model_dir, redis_url, pg_url):
    """Redis + PostgreSQL: the node, one ``--queues node`` worker and two ``--queues gpu`` workers.
    Two studies arrive by C-STORE; each job is done once and delivered once, and each GPU
    worker ran one of them."""
    pacs = CountingPACS().start()
    cluster = Cluster(tmp_path, demo_model_dir, redis_url, pg_url, pacs).serve()
    cluster.worker("worker-node", "node", concurrency=2)
    cluster.worker("gpu-1", "gpu")
    cluster.worker("gpu-2", "gpu")
    try:
        studies = [write(cluster, seed) for seed in (41, 42)]
        cluster.ready()
        assert "starting embedded worker" not in cluster.log("node")
        for files in studies:
            send(cluster, files)
        cluster.finished(2)
        jobs = assert_done_once(cluster, pacs, 2)
        ran = {name: cluster.infers(name) for name in ("gpu-1", "gpu-2")}
        assert all(ran.values()), f"one GPU worker took every job: {ran}"
        assert sorted(j for infers in ran.values() for j, _, _ in infers) == [j.id for j in jobs], ran
        assert all(j.attempts == 1 for j in jobs)
    finally:
        cluster.stop()
        pacs.stop()


# ---------------------------------------------------------------------------
# (b) a GPU worker killed mid-job

@pytest.mark.slow
def test_distributed_amqp_postgres_gpu_worker_killed_mid_job_is_redelivered(tmp_path, demo_model_dir, amqp_url,
                                                                              pg_url):
    """RabbitMQ + PostgreSQL, two GPU workers. The one running ``infer`` is SIGKILLed with its pool
    (its whole process group); RabbitMQ requeues the unacknowledged message at once (acks_late),
    the other worker runs it, and the job is done and delivered once, prepared once."""
    pacs = CountingPACS().start()
    cluster = Cluster(tmp_path, demo_model_dir, amqp_url, pg_url, pacs).serve()
    cluster.worker("worker-node", "node")
    cluster.worker("gpu-1", "gpu")
    cluster.worker("gpu-2", "gpu")
    try:
        files = write(cluster, 51)
        cluster.ready()
        assert_priority_queues(amqp_url)
        send(cluster, files)
        busy = cluster.wait("infer started", lambda: [n for n in ("gpu-1", "gpu-2") if cluster.infers(n)])
        assert len(busy) == 1, busy
        victim, other = busy[0], ({"gpu-1", "gpu-2"} - set(busy)).pop()
        proc = cluster.procs.pop(victim)
        assert children(proc.pid), f"{victim} has no pool process"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        (job,) = cluster.jobs()
        assert job.state == db.JobState.INFERRING, f"killed too late: the job was already {job.state}"

        cluster.finished(1)
        (job,) = assert_done_once(cluster, pacs, 1)
        assert cluster.infers(other) == [(job.id, 5, True)]  # the same message, delivered again
        assert job.attempts == 1  # prepare ran once: only infer was delivered again
    finally:
        cluster.stop()
        pacs.stop()


# ---------------------------------------------------------------------------
# (c) the broker restarted mid-flow

@pytest.mark.slow
def test_distributed_redis_restart_while_a_job_runs_it_finishes_once(tmp_path, demo_model_dir, pg_url):
    """A private redis-server (no persistence) is stopped while the GPU worker runs ``infer``, and
    started again only once the worker is retrying to send ``report`` (worker.app
    WORKER_PUBLISH_RETRY: it waits for the broker instead of dropping the chain). The workers
    reconnect; the job is done and delivered once."""
    redis = RedisServer(tmp_path / "redis", free_port()).start()
    pacs = CountingPACS().start()
    cluster = Cluster(tmp_path, demo_model_dir, f"redis://127.0.0.1:{redis.port}/0", pg_url, pacs).serve()
    cluster.worker("worker-node", "node")
    cluster.worker("gpu-1", "gpu")
    try:
        files = write(cluster, 61)
        cluster.ready()
        send(cluster, files)
        cluster.wait("infer started", lambda: cluster.infers("gpu-1"))
        redis.stop()
        cluster.wait("report waiting for the broker",
                     lambda: "Retrying refused callback publish for " in cluster.log("gpu-1"))
        (job,) = cluster.jobs()
        assert job.state == db.JobState.INFERRING
        redis.start()
        cluster.finished(1)
        (job,) = assert_done_once(cluster, pacs, 1)
        assert job.attempts == 1 and cluster.infers("gpu-1") == [(job.id, 4, False)]
        assert "/100, waiting" in cluster.log("gpu-1")  # the worker's long retry policy, not Celery's 3 tries
    finally:
        cluster.stop()
        redis.stop()
        pacs.stop()


# ---------------------------------------------------------------------------
# (d) a STAT study jumps the queue

@pytest.mark.slow
@pytest.mark.parametrize("broker", ["redis"], indirect=True)  # add "amqp": passes too, ~45 s more
def test_distributed_postgres_stat_study_jumps_the_gpu_queue(tmp_path, demo_model_dir, broker, pg_url):
    """One GPU worker is busy (its pool process stopped with SIGSTOP mid-``infer``); two routine
    studies and then one STAT study (rule priority 9) are prepared and wait on the ``gpu`` queue.
    When the worker goes on, the STAT job's ``infer`` runs first, then the routine ones in the
    order they came — the busy worker had not taken one of them ahead (prefetch 1)."""
    pacs = CountingPACS().start()
    cluster = Cluster(tmp_path, demo_model_dir, broker, pg_url, pacs).serve()
    cluster.worker("worker-node", "node")
    gpu = cluster.worker("gpu-1", "gpu")
    paused: list[int] = []
    try:
        busy = write(cluster, 71)
        routine_files = write(cluster, 72, "routine 1") + write(cluster, 73, "routine 2")
        stat_files = write(cluster, 75, "STAT chest pain")
        cluster.ready()
        send(cluster, busy)
        cluster.wait("infer started", lambda: cluster.infers("gpu-1"))
        paused = children(gpu.pid)
        assert len(paused) == 1, paused
        os.kill(paused[0], signal.SIGSTOP)

        def waiting_for_gpu(n: int) -> Callable[[], bool]:
            return lambda: (lambda js: len(js) == n and all(j.state == db.JobState.INFERRING for j in js))(
                cluster.jobs())

        send(cluster, routine_files)  # both routine studies on one association
        cluster.wait("two routine jobs waiting for the GPU", waiting_for_gpu(3))
        send(cluster, stat_files)
        cluster.wait("the STAT job waiting for the GPU too", waiting_for_gpu(4))
        assert len(cluster.infers("gpu-1")) == 1
        os.kill(paused.pop(), signal.SIGCONT)
        cluster.finished(4)
        jobs = assert_done_once(cluster, pacs, 4)
        first, *routine, stat = [j.id for j in jobs]
        assert [j.rule for j in jobs] == ["routine"] * 3 + ["stat"]
        order = [j for j, _, _ in cluster.infers("gpu-1")]
        assert order == [first, stat, *routine], f"infer order {order}: the STAT job {stat} did not go first"
        by_id = {j.id: j for j in jobs}
        assert all(by_id[r].prepared_at < by_id[stat].prepared_at for r in routine)  # queued before it
        assert all(by_id[stat].inferred_at < by_id[r].inferred_at for r in routine)  # done before them
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        cluster.stop()
        pacs.stop()
