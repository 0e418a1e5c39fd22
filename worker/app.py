"""The Celery app shared by the node (which sends) and the workers (which run tasks).

The config file is found through ``CMR_AI_CONFIG`` (set by ``cmr-ai serve`` for the
embedded worker and by ``cmr-ai worker --config``). ``queue.broker: embedded`` means
kombu's SQLAlchemy transport on a SQLite file under the var directory: a real
broker that needs no server.

Delivery settings (STYLE.md §8): ``acks_late`` + ``reject_on_worker_lost`` so a
task whose worker dies is redelivered, ``prefetch_multiplier=1`` so a busy GPU
worker does not hoard jobs. No result backend: the chain passes results in its
messages and the database records job state. The pool is Celery's prefork pool
with one fix (:class:`PreforkPool`): a pool process SIGKILLed while idle no longer
hangs the worker. A worker whose broker went away reconnects for as long as it
takes (``tests/test_faults_jobs.py`` kills pool processes, workers and Redis).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional

import billiard.pool
from celery import Celery
from celery.concurrency import prefork

from plugin.config import Settings, load_settings

QUEUE_NODE = "node"
QUEUE_GPU = "gpu"

app = Celery("cmr_ai", include=["worker.tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE_NODE,
    task_routes={
        "cmr_ai.prepare": {"queue": QUEUE_NODE},
        "cmr_ai.infer": {"queue": QUEUE_GPU},
        "cmr_ai.report": {"queue": QUEUE_NODE},
        "cmr_ai.flush_exports": {"queue": QUEUE_NODE},
    },
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # a worker whose broker went away reconnects until it is back (Celery's default gives up
    # after 100 tries, ~45 min, and the worker exits); the node's sends fail fast instead
    # (task_publish_retry_policy) and the job waits QUEUED in the database
    broker_connection_max_retries=None,
    worker_send_task_events=False,
    worker_pool="worker.app:PreforkPool",
)


class _PoolProcess(billiard.pool.Worker):
    """A pool process that holds the shared task queue's read lock only while it reads a task.

    billiard's own waits for the next task *inside* the lock (a blocking read). A pool
    process SIGKILLed while idle — the OOM killer's first pick, as it holds the model —
    takes the lock with it, and its replacement waits for it forever: the worker hangs
    with tasks received and none run (celery/celery#2011). This one polls the pipe
    outside the lock (the 1 s timeout billiard already asks for) and takes the lock
    only to read a task that is there.
    """

    def _make_recv_method(self, conn):
        lock, reader = getattr(conn, "_rlock", None), getattr(conn, "_reader", None)
        if lock is None or reader is None:
            return super()._make_recv_method(conn)

        def _recv(timeout, loads=pickle.loads):
            if not reader.poll(timeout):
                return False, None
            with lock:
                if not reader.poll(0):  # another pool process took it
                    return False, None
                return True, loads(reader.recv_bytes())

        return _recv


class _BlockingPool(billiard.pool.Pool):
    Worker = _PoolProcess


class PreforkPool(prefork.TaskPool):
    """Celery's prefork pool whose processes survive a SIGKILLed sibling (:class:`_PoolProcess`).

    The blocking pool (one task queue shared by the pool processes) is what Celery
    uses with brokers that have no event loop, such as the embedded SQLite broker;
    its asynchronous pool (Redis, RabbitMQ) gives each process its own queue and is
    left as it is.
    """

    BlockingPool = _BlockingPool


_settings: Optional[Settings] = None


def var_dir(settings: Settings) -> Path:
    """Where embedded state lives: the parent of the storage folder (``./var`` by default)."""
    return Path(settings.storage.path).expanduser().resolve().parent


def broker_url(settings: Settings) -> str:
    b = settings.queue.broker
    if b == "embedded":
        path = var_dir(settings) / "celery-broker.sqlite"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqla+sqlite:///{path}"
    return b


def configure(settings: Settings) -> Celery:
    """Point the app at the config's broker (idempotent)."""
    global _settings
    _settings = settings
    url = broker_url(settings)
    opts: dict = {}
    if url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands its transport options to create_engine, so the
        # poll interval (default 1 s per queue) is set on the transport class instead.
        from kombu.transport import sqlalchemy as kombu_sqla

        kombu_sqla.Transport.polling_interval = 0.2
    elif url.startswith(("redis", "rediss")):
        # long enough for a slow inference before an unacked task is redelivered
        opts = {"visibility_timeout": settings.queue.task_soft_time_limit * 2, "queue_order_strategy": "priority"}
    app.conf.update(broker_url=url, broker_transport_options=opts,
                    task_soft_time_limit=settings.queue.task_soft_time_limit,
                    task_time_limit=settings.queue.task_soft_time_limit + 60)
    return app


def get_settings() -> Settings:
    """The settings of this process (loaded once from ``CMR_AI_CONFIG``)."""
    global _settings
    if _settings is None:
        path = os.environ.get("CMR_AI_CONFIG")
        if not path:
            raise RuntimeError("CMR_AI_CONFIG is not set: start workers with `cmr-ai worker --config FILE`")
        configure(load_settings(path))
    assert _settings is not None
    return _settings


if os.environ.get("CMR_AI_CONFIG"):
    get_settings()
