"""The Celery app shared by the node (which sends) and the workers (which run tasks).

The config file is found through ``CMR_AI_CONFIG`` (set by ``cmr-ai serve`` for the
embedded worker and by ``cmr-ai worker --config``). ``queue.broker: embedded`` means
kombu's SQLAlchemy transport on a SQLite file under the var directory: a real
broker that needs no server.

Delivery settings (STYLE.md §8): ``acks_late`` + ``reject_on_worker_lost`` so a
task whose worker dies is redelivered, ``prefetch_multiplier=1`` so a busy GPU
worker does not hoard jobs. No result backend: the chain passes results in its
messages and the database records job state.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from celery import Celery

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
    worker_send_task_events=False,
)

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
