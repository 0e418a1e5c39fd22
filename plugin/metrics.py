"""What the node exposes on ``/metrics`` (Prometheus text format), read at scrape time.

Every figure comes from where the truth is kept — the database (instances, studies,
jobs and their stage timestamps, the outbox, the GPU memory each inference recorded)
and the broker (queue depths) — not from counters in this process, so the node's
``/metrics`` includes the work done by workers in other processes and on other hosts,
and survives a restart of the node. :class:`NodeCollector` is a
:mod:`prometheus_client` custom collector; :func:`queue_depths` is also what
``cmr-ai status`` shows.

=====================================================  =========  ==================================================
``cmr_ai_instances_received_total``                    counter    instances in the index (``db.Instance`` rows)
``cmr_ai_received_bytes_total``                        counter    their bytes as stored
``cmr_ai_studies{state}``                              gauge      studies by state
``cmr_ai_jobs{kind,state}``                            gauge      jobs by kind and state
``cmr_ai_exports{destination,state}``                  gauge      outbox rows by destination and state
``cmr_ai_source_studies{source,state}``                gauge      studies seen in each DICOMweb source: pulled
                                                                  (done), pulling, failed (:mod:`plugin.dicomweb.pull`)
``cmr_ai_stage_seconds{stage}``                        histogram  per-stage latency (below)
``cmr_ai_queue_depth{queue}``                          gauge      messages waiting in the Celery queue (node, gpu)
``cmr_ai_broker_up``                                   gauge      1 when the broker answered this scrape, else 0
``cmr_ai_gpu_memory_peak_bytes{host,device}``          gauge      peak GPU memory of the latest inference there
``cmr_ai_gpu_memory_peak_reserved_bytes{host,device}``  gauge      the same, reserved by PyTorch's allocator
``cmr_ai_gpu_memory_total_bytes{host,device}``         gauge      that device's memory
``cmr_ai_gpu_memory_sample_timestamp_seconds{…}``      gauge      when that inference ended (Unix time)
``cmr_ai_scrape_errors``                               gauge      parts of this scrape that failed (see the log)
=====================================================  =========  ==================================================

Stages, from the timestamps of the study and of each job's latest run
(:attr:`plugin.db.Job.STAGE_STAMPS`): ``receive`` first → last instance of a study;
``complete`` last instance → job created (the study was quiet for ``stable_after``
and routed); ``queue`` created → ``prepare`` started; ``prepare``, ``infer``,
``report`` each stage's start → the next one's; ``export`` results written → the
outbox delivered everything (DONE jobs only). A stage is counted once both its ends
are known, so a job that failed in ``infer`` counts ``queue`` and ``prepare`` only.
``queue`` is counted for a job's first run only: the start of a later one (a re-run,
a recovery) is not kept, and ``created_at`` would count the earlier runs as waiting.
A re-send of a finished job's exports keeps its ``reported_at``: its ``export`` stage
then lasts until the re-send was delivered.
The histograms are rebuilt from the rows at every scrape: a job re-run (its stamps
cleared) or a purged row leaves them, which Prometheus treats as a counter reset.

GPU memory is measured where the GPU is — the worker records the peak of each
inference in its result (``InferenceResult.gpu_memory``, kept in ``Job.result_json``)
— and the latest figure per worker host and device is shown. A node whose workers
have run nothing on a GPU exposes no GPU series at all rather than a made-up zero.
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Iterable, Iterator, Optional, Sequence

from sqlalchemy import func, select

from plugin import db
from plugin.config import Settings

log = logging.getLogger("cmr_ai.metrics")

#: The Celery queues the node and the workers use (worker.app.QUEUE_NODE, QUEUE_GPU).
QUEUES = ("node", "gpu")

#: The stages of ``cmr_ai_stage_seconds``, in pipeline order.
STAGES = ("receive", "complete", "queue", "prepare", "infer", "report", "export")

#: Histogram bucket upper bounds, seconds: tens of milliseconds (prepare on a small
#: study) to an hour (a study trickling in, a queue behind a busy GPU).
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

#: How many of the newest inferred jobs are searched for each host's latest GPU figure.
GPU_LOOKBACK = 200


def queue_depths(settings: Settings, queues: Sequence[str] = QUEUES, *, timeout: float = 5.0) -> dict[str, int]:
    """Messages waiting in each Celery queue on the configured broker: ``{"node": 0, "gpu": 3}``.

    Works for the embedded broker (kombu's SQLAlchemy transport: visible rows of the
    queue), Redis (the lengths of the queue's lists, summed over its priority steps)
    and RabbitMQ (``queue.declare`` passive: ``message-count``), through kombu's
    ``queue_declare(queue, passive=True).message_count``. Messages a worker holds
    unacknowledged (prefetched or running) are not counted. A queue the broker does
    not know yet (nothing was ever sent to it; Redis deletes an empty list) counts 0.

    Parameters
    ----------
    settings:
        The node's settings (``queue.broker``; the embedded broker lives under ``<var>``).
    queues:
        The queue names, default ``("node", "gpu")``.
    timeout:
        Seconds to wait for the broker connection.

    Returns
    -------
    dict[str, int]
        Queue name → waiting messages, in the order of ``queues``.

    Raises
    ------
    kombu.exceptions.OperationalError
        When the broker cannot be reached within ``timeout``.
    """
    from amqp.exceptions import NotFound
    from kombu.exceptions import ChannelError

    from worker.app import app, configure

    configure(settings)
    out: dict[str, int] = {}
    with app.connection_for_read() as conn:
        conn.connect_timeout = timeout
        conn.ensure_connection(max_retries=1, timeout=timeout)
        for q in queues:
            channel = conn.channel()  # a failed passive declare closes the channel (AMQP): one per queue
            try:
                out[q] = int(channel.queue_declare(queue=q, passive=True).message_count)
            except (ChannelError, NotFound):
                out[q] = 0
            finally:
                try:
                    channel.close()
                except Exception:  # noqa: BLE001 - already closed by the broker
                    pass
    return out


def _seconds(start: Optional[datetime], end: Optional[datetime]) -> Optional[float]:
    if start is None or end is None:
        return None
    d = (end - start).total_seconds()
    return d if d >= 0 else None  # clocks of two hosts, or a study re-opened after its job: not a latency


def stage_durations(session) -> dict[str, list[float]]:
    """Per stage, the latencies (seconds) of every study and job in the database (see the module doc)."""
    out: dict[str, list[float]] = {s: [] for s in STAGES}
    for first, last, state in session.execute(
            select(db.Study.first_received, db.Study.last_received, db.Study.state)):
        if state != db.StudyState.RECEIVING and (d := _seconds(first, last)) is not None:
            out["receive"].append(d)
    J = db.Job
    rows = session.execute(select(db.Study.last_received, J.created_at, J.started_at, J.prepared_at, J.inferred_at,
                                  J.reported_at, J.finished_at, J.state, J.attempts)
                           .join(db.Study, J.study_id == db.Study.id))
    for last, created, started, prepared, inferred, reported, finished, state, attempts in rows:
        queued = created if (attempts or 0) <= 1 else None  # a re-run's wait began when it was re-queued
        for stage, a, b in (("complete", last, created), ("queue", queued, started), ("prepare", started, prepared),
                            ("infer", prepared, inferred), ("report", inferred, reported)):
            if (d := _seconds(a, b)) is not None:
                out[stage].append(d)
        if state == db.JobState.DONE and (d := _seconds(reported, finished)) is not None:
            out["export"].append(d)
    return out


def latest_gpu_memory(session, lookback: int = GPU_LOOKBACK) -> list[dict]:
    """The newest ``gpu_memory`` record per (host, device) among the ``lookback`` newest inferred jobs.

    Each is ``{"host", "device", "peak_bytes", "peak_reserved_bytes", "total_bytes", "at"}`` (``at``: when the
    inference ended, a naive UTC datetime). Jobs run on the CPU recorded none.
    """
    seen: dict[tuple[str, str], dict] = {}
    rows = session.execute(select(db.Job.result_json, db.Job.inferred_at).where(db.Job.inferred_at.is_not(None),
                                                                                 db.Job.result_json.is_not(None))
                           .order_by(db.Job.inferred_at.desc(), db.Job.id.desc()).limit(lookback))
    for text, at in rows:
        try:
            mem = json.loads(text).get("gpu_memory")
        except (ValueError, AttributeError):
            continue
        if not isinstance(mem, dict) or not isinstance(mem.get("peak_bytes"), (int, float)):
            continue
        key = (str(mem.get("host") or ""), str(mem.get("device") or ""))
        if key not in seen:
            seen[key] = {"host": key[0], "device": key[1], "peak_bytes": mem["peak_bytes"],
                         "peak_reserved_bytes": mem.get("peak_reserved_bytes"),
                         "total_bytes": mem.get("total_bytes"), "at": at}
    return list(seen.values())


def _histogram(values: Iterable[float]) -> tuple[list[tuple[str, float]], float]:
    values = sorted(values)
    buckets, i = [], 0
    for le in BUCKETS:
        while i < len(values) and values[i] <= le:
            i += 1
        buckets.append((repr(le), i))
    buckets.append(("+Inf", len(values)))
    return buckets, sum(values)


def _state(v) -> str:
    return getattr(v, "value", None) or str(v)


class NodeCollector:
    """A :mod:`prometheus_client` collector that reads the database and the broker at each scrape.

    Parameters
    ----------
    settings:
        A callable returning the settings in force (the node swaps them on reload).
    broker:
        Whether to ask the broker for queue depths (a test without a broker passes False).
    """

    def __init__(self, settings, *, broker: bool = True):
        self.settings, self.broker = settings, broker

    def describe(self):  # no metadata pass at registration (it would scrape)
        return []

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.settings()
        errors = 0
        try:
            with db.session_scope(s.database.url) as session:
                n, size = session.execute(select(func.count(db.Instance.id),
                                                 func.coalesce(func.sum(db.Instance.size), 0))).one()
                yield CounterMetricFamily("cmr_ai_instances_received", "DICOM instances received and indexed",
                                          value=n)
                yield CounterMetricFamily("cmr_ai_received_bytes", "Bytes of the instances received, as stored",
                                          value=int(size or 0))
                g = GaugeMetricFamily("cmr_ai_studies", "Studies by state", labels=["state"])
                counts = dict(session.execute(select(db.Study.state, func.count()).group_by(db.Study.state)).all())
                for st in db.StudyState:
                    g.add_metric([st.value], counts.get(st, 0))
                yield g
                g = GaugeMetricFamily("cmr_ai_jobs", "Jobs by kind and state", labels=["kind", "state"])
                counts = {(k or db.JobKind.ANALYSE, st): c for k, st, c in session.execute(
                    select(db.Job.kind, db.Job.state, func.count()).group_by(db.Job.kind, db.Job.state))}
                for kind in db.JobKind:
                    for st in db.JobState:
                        g.add_metric([kind.value, st.value], counts.get((kind, st), 0))
                yield g
                g = GaugeMetricFamily("cmr_ai_exports", "Outbox rows by destination and state",
                                      labels=["destination", "state"])
                counts = {(d, st): c for d, st, c in session.execute(
                    select(db.Export.destination, db.Export.state, func.count())
                    .group_by(db.Export.destination, db.Export.state))}
                for dest in sorted(set(s.destinations) | {d for d, _ in counts}):
                    for st in db.ExportState:
                        g.add_metric([dest, st.value], counts.get((dest, st), 0))
                yield g
                g = GaugeMetricFamily("cmr_ai_source_studies", "Studies seen in each DICOMweb source, by pull state",
                                      labels=["source", "state"])
                counts = {(src, st): c for src, st, c in session.execute(
                    select(db.SourceStudy.source, db.SourceStudy.state, func.count())
                    .group_by(db.SourceStudy.source, db.SourceStudy.state))}
                for src in sorted(set(s.sources) | {x for x, _ in counts}):
                    for st in db.PullState:
                        g.add_metric([src, st.value], counts.get((src, st), 0))
                yield g
                h = HistogramMetricFamily("cmr_ai_stage_seconds",
                                          "Latency of each stage, from the study and job timestamps "
                                          "(receive, complete, queue, prepare, infer, report, export)",
                                          labels=["stage"])
                for stage, values in stage_durations(session).items():
                    buckets, total = _histogram(values)
                    h.add_metric([stage], buckets, total)
                yield h
                gpu = latest_gpu_memory(session)
                if gpu:
                    peak = GaugeMetricFamily("cmr_ai_gpu_memory_peak_bytes",
                                             "Peak GPU memory allocated by the latest inference on this device",
                                             labels=["host", "device"])
                    reserved = GaugeMetricFamily("cmr_ai_gpu_memory_peak_reserved_bytes",
                                                 "Peak GPU memory reserved by PyTorch's allocator in that inference",
                                                 labels=["host", "device"])
                    total = GaugeMetricFamily("cmr_ai_gpu_memory_total_bytes", "Memory of this GPU",
                                              labels=["host", "device"])
                    when = GaugeMetricFamily("cmr_ai_gpu_memory_sample_timestamp_seconds",
                                             "When the inference that measured it ended (Unix time)",
                                             labels=["host", "device"])
                    for m in gpu:
                        labels = [m["host"], m["device"]]
                        peak.add_metric(labels, m["peak_bytes"])
                        if isinstance(m["peak_reserved_bytes"], (int, float)):
                            reserved.add_metric(labels, m["peak_reserved_bytes"])
                        if isinstance(m["total_bytes"], (int, float)):
                            total.add_metric(labels, m["total_bytes"])
                        when.add_metric(labels, m["at"].replace(tzinfo=timezone.utc).timestamp())
                    yield peak
                    yield reserved
                    yield total
                    yield when
        except Exception as e:  # noqa: BLE001 - a scrape reports what it can
            errors += 1
            log.error("/metrics: reading the database failed: %s", e)
        if self.broker:
            up = GaugeMetricFamily("cmr_ai_broker_up", "1 when the broker answered this scrape")
            t0 = time.monotonic()
            try:
                depths = queue_depths(s)
            except Exception as e:  # noqa: BLE001
                errors += 1
                up.add_metric([], 0)
                log.warning("/metrics: broker unreachable (%.1f s): %s", time.monotonic() - t0, e)
            else:
                up.add_metric([], 1)
                g = GaugeMetricFamily("cmr_ai_queue_depth", "Messages waiting in the Celery queue",
                                      labels=["queue"])
                for q, n in depths.items():
                    g.add_metric([q], n)
                yield g
            yield up
        yield GaugeMetricFamily("cmr_ai_scrape_errors", "Parts of this scrape that failed (see the node's log)",
                                value=errors)


def render(settings, *, broker: bool = True) -> tuple[bytes, str]:
    """The Prometheus text exposition of :class:`NodeCollector`, and its content type."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(settings, broker=broker))
    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
