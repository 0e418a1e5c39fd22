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

Distributed mode (``queue.broker: redis://…`` or ``amqp://…``; ``tests/test_distributed.py``):

- **Priorities.** A rule's ``priority`` (0–9, higher = sooner; STAT = 9) becomes the
  message priority through :func:`message_priority`. RabbitMQ: the queues ``node`` and
  ``gpu`` are declared with ``x-max-priority: 10`` (:data:`QUEUES`). RabbitMQ refuses
  to declare an existing queue with other arguments (``PRECONDITION_FAILED -
  inequivalent arg 'x-max-priority'``): a queue of that name made without it (by an
  older release, or by hand) must be deleted once (``rabbitmqctl delete_queue gpu``).
  The names stay ``node`` and ``gpu``. Redis emulates priorities with one list per
  level (``priority_steps`` 0–9) and serves the *lowest* number first, so the
  priority is inverted there.
- **Redelivery.** ``acks_late``: a message is acknowledged when its task ends. On
  RabbitMQ the message of a worker that died is requeued at once (its connection
  closed). Keep RabbitMQ's ``consumer_timeout`` (30 min by default) above
  ``task_soft_time_limit`` + 60 s, or it closes the channel of a long inference. On
  Redis it is delivered again after ``visibility_timeout`` (``queue.visibility_timeout``,
  default 2 × ``task_soft_time_limit``); a worker that only lost its connection goes on.
- **Transient errors.** Node-side tasks retry database errors with back-off
  (``worker.tasks``); a worker sending the next step of a chain waits for the broker
  (:data:`WORKER_PUBLISH_RETRY`) rather than drop the job while the broker restarts.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional

import billiard.pool
from celery import Celery, signals
from celery.concurrency import prefork
from kombu import Exchange, Queue

from plugin.config import Settings, load_settings

QUEUE_NODE = "node"
QUEUE_GPU = "gpu"
#: the highest message priority (RabbitMQ ``x-max-priority``; rules use 0–9)
MAX_PRIORITY = 9
#: the two queues, declared with priorities on RabbitMQ (the other transports ignore the argument)
QUEUES = tuple(Queue(name, Exchange(name, type="direct"), routing_key=name,
                     queue_arguments={"x-max-priority": MAX_PRIORITY + 1}) for name in (QUEUE_NODE, QUEUE_GPU))
#: how long a worker retries sending the next task of a chain while the broker is away (~5 min);
#: the node's sends fail fast instead (Celery's default policy) and the job waits QUEUED
WORKER_PUBLISH_RETRY = {"max_retries": 100, "interval_start": 0, "interval_step": 1, "interval_max": 3}

app = Celery("cmr_ai", include=["worker.tasks"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE_NODE,
    task_queues=QUEUES,
    # the next task of a chain keeps the priority of the message that ran (Celery sends it
    # with priority=None otherwise, which drops the priority the chain was built with)
    task_inherit_parent_priority=True,
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
        # visibility_timeout: long enough for a slow inference before an unacked task is redelivered;
        # one list per priority level, and the worker's queues read in the order given (-Q node,gpu)
        opts = {"visibility_timeout": visibility_timeout(settings), "priority_steps": list(range(MAX_PRIORITY + 1)),
                "queue_order_strategy": "priority"}
    app.conf.update(broker_url=url, broker_transport_options=opts,
                    task_soft_time_limit=settings.queue.task_soft_time_limit,
                    task_time_limit=settings.queue.task_soft_time_limit + 60)
    return app


def visibility_timeout(settings: Settings) -> int:
    """Redis: seconds before a task that was taken and not acknowledged is delivered again."""
    return settings.queue.visibility_timeout or settings.queue.task_soft_time_limit * 2


def message_priority(settings: Settings, priority: int) -> int:
    """The broker's message priority for a rule's ``priority`` (0–9, higher = sooner).

    RabbitMQ and the embedded broker take it as it is; Redis serves its lowest number
    first (kombu's ``priority_steps``), so it gets ``9 - priority``.
    """
    priority = max(0, min(MAX_PRIORITY, int(priority)))
    return MAX_PRIORITY - priority if settings.queue.broker.startswith(("redis", "rediss")) else priority


@signals.worker_init.connect
def _worker_publish_retry(**_kw) -> None:
    """A worker waits for the broker to send a chain's next task (its pool processes inherit this)."""
    app.conf.task_publish_retry_policy = WORKER_PUBLISH_RETRY


def get_settings() -> Settings:
    """The settings of this process (loaded once from ``CMR_AI_CONFIG``)."""
    global _settings
    if _settings is None:
        path = os.environ.get("CMR_AI_CONFIG")
        if not path:
            raise RuntimeError("CMR_AI_CONFIG is not set: start workers with `cmr-ai worker --config FILE`")
        configure(load_settings(path, node_files=False))  # node.tls etc. are the node's, not on this host
    assert _settings is not None
    return _settings


if os.environ.get("CMR_AI_CONFIG"):
    get_settings()
