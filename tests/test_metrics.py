"""``/metrics`` of a real node, and :func:`plugin.metrics.queue_depths` on the real brokers.

The node (tests/adminnode.py) is a real ``cmr-ai serve`` whose embedded Celery worker
ran the demo model on one phantom study sent by dcmtk; the scrape is parsed with
prometheus_client's own parser and checked against what was sent and against the
job's stage timestamps. The queue depths are read from the embedded SQLite broker, the
Redis on 6379 and the RabbitMQ on 5672 that run on this machine (and in CI).
"""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from plugin import db
from plugin.config import load_settings
from plugin.metrics import BUCKETS, STAGES, queue_depths, render

pytest_plugins = ["adminnode"]


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: dict, family: str, sample: str | None = None, **labels) -> float:
    found = [s.value for s in fams[family].samples
             if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{sample or family}{labels}: {found} in {fams[family].samples}"
    return found[0]


def _t(iso: str) -> datetime:
    return datetime.fromisoformat(iso.rstrip("Z"))


def _wait_settled(node, timeout: float = 150) -> dict:
    """The job, once DONE with no export pending (test_dashboard may have re-sent one, re-run it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = next(j for j in node.get("/api/jobs").json()["items"] if j["id"] == node.job_id)
        exports = [e for e in node.get("/api/exports").json()["items"] if e["job_id"] == node.job_id]
        if job["state"] == "done" and exports and all(e["state"] != "pending" for e in exports):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {node.job_id} not settled: {job}\n{node.log_tail()}")


def test_metrics_count_the_study_and_time_each_stage_of_its_job(admin_node):
    node = admin_node
    for token in (None, node.token + "x"):
        r = node.get("/metrics", token=token)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), r.text
    job = _wait_settled(node)
    t0 = time.monotonic()
    r = node.get("/metrics")
    scrape_s = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4"), r.headers
    fams = _families(r.text)
    print(f"/metrics: {len(r.content)} bytes, {len(fams)} families, scraped in {scrape_s:.2f} s")

    # instances and bytes: what storescu sent, as the node stored it
    assert _value(fams, "cmr_ai_instances_received", "cmr_ai_instances_received_total") == len(node.sent)
    with db.session_scope(node.db) as s:
        stored = s.scalars(select(db.Instance.path)).all()
    on_disk = sum(Path(p).stat().st_size for p in stored)
    received = _value(fams, "cmr_ai_received_bytes", "cmr_ai_received_bytes_total")
    assert received == on_disk > 0
    sent = sum(p.stat().st_size for p in node.sent)
    assert abs(received - sent) < 0.05 * sent, (received, sent)

    # states
    assert _value(fams, "cmr_ai_studies", state="complete") == 1
    assert _value(fams, "cmr_ai_studies", state="receiving") == 0
    assert _value(fams, "cmr_ai_jobs", kind="analyse", state="done") == 1
    assert sum(s.value for s in fams["cmr_ai_jobs"].samples) == 1
    exports = [e for e in node.get("/api/exports").json()["items"]]
    assert _value(fams, "cmr_ai_exports", destination="pacs", state="sent") == len(exports) > 0
    assert _value(fams, "cmr_ai_exports", destination="pacs", state="dead") == 0

    # the stage histograms: one study, one job, every stage counted once, with the
    # latency its timestamps give
    studies = node.get("/api/studies").json()["items"]
    st = next(x for x in studies if x["study_instance_uid"] == node.study_uid)
    expect = {
        "receive": (st["first_received"], st["last_received"]),
        "complete": (st["last_received"], job["created_at"]),
        "queue": (job["created_at"], job["started_at"]),
        "prepare": (job["started_at"], job["prepared_at"]),
        "infer": (job["prepared_at"], job["inferred_at"]),
        "report": (job["inferred_at"], job["reported_at"]),
        "export": (job["reported_at"], job["finished_at"]),
    }
    h = "cmr_ai_stage_seconds"
    for stage in STAGES:
        if stage == "queue" and job["attempts"] > 1:  # test_dashboard re-ran it: a re-run's wait is not known
            assert _value(fams, h, f"{h}_count", stage=stage) == 0
            continue
        assert _value(fams, h, f"{h}_count", stage=stage) == 1, stage
        seconds = (_t(expect[stage][1]) - _t(expect[stage][0])).total_seconds()
        assert _value(fams, h, f"{h}_sum", stage=stage) == pytest.approx(seconds, abs=1e-3), stage
        buckets = [(float(s.labels["le"]), s.value) for s in fams[h].samples
                   if s.name == f"{h}_bucket" and s.labels["stage"] == stage]
        assert [le for le, _ in buckets] == [*BUCKETS, float("inf")]
        assert all(v == (1 if le >= seconds else 0) for le, v in buckets), (stage, seconds, buckets)
    print(f"stage seconds (attempt {job['attempts']}): "
          + ", ".join(f"{s} {_value(fams, h, f'{h}_sum', stage=s):.2f}" for s in STAGES))
    # the one that matters for an operator: the model did run in the infer stage
    assert _value(fams, h, f"{h}_sum", stage="infer") > 0

    # the broker (the embedded SQLite one): both queues, nothing waiting once the job is done
    assert _value(fams, "cmr_ai_broker_up") == 1
    assert {s.labels["queue"] for s in fams["cmr_ai_queue_depth"].samples} == {"node", "gpu"}
    assert _value(fams, "cmr_ai_queue_depth", queue="gpu") == 0
    assert _value(fams, "cmr_ai_scrape_errors") == 0
    # the demo model ran on the CPU: no GPU figure at all, rather than a made-up 0
    assert not [f for f in fams if f.startswith("cmr_ai_gpu_")], sorted(fams)


def test_gpu_memory_is_the_latest_figure_each_worker_recorded(tmp_path):
    """What a GPU worker records in its result (``InferenceResult.gpu_memory``) is exposed per host and
    device, the newest inference winning; jobs run on the CPU add nothing."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f'storage: {{path: "{tmp_path / "var" / "dicom"}"}}\n'
                   f'database: {{url: "sqlite:///{tmp_path / "var" / "cmr-ai.db"}"}}\n')
    settings = load_settings(cfg, check_templates=False)
    now = db.utcnow()
    results = [  # (seconds ago, gpu_memory)
        (30, {"host": "gpu-a", "device": "cuda:0", "peak_bytes": 1000, "peak_reserved_bytes": 2000,
              "total_bytes": 80_000}),
        (20, {"host": "gpu-a", "device": "cuda:0", "peak_bytes": 1500, "peak_reserved_bytes": 2500,
              "total_bytes": 80_000}),
        (10, {"host": "gpu-b", "device": "cuda:1", "peak_bytes": 700, "total_bytes": 40_000}),
        (5, None),  # a CPU run
    ]
    with db.session_scope(settings.database.url) as s:
        study = db.Study(study_instance_uid="1.2.3", state=db.StudyState.COMPLETE)
        s.add(study)
        s.flush()
        for ago, mem in results:
            s.add(db.Job(study_id=study.id, rule="r", template="t", model="m", state=db.JobState.FAILED,
                         inferred_at=now - timedelta(seconds=ago), result_json=json.dumps({"gpu_memory": mem})))
    fams = _families(render(lambda: settings, broker=False)[0].decode())
    assert _value(fams, "cmr_ai_gpu_memory_peak_bytes", host="gpu-a", device="cuda:0") == 1500
    assert _value(fams, "cmr_ai_gpu_memory_peak_reserved_bytes", host="gpu-a", device="cuda:0") == 2500
    assert _value(fams, "cmr_ai_gpu_memory_total_bytes", host="gpu-a", device="cuda:0") == 80_000
    assert _value(fams, "cmr_ai_gpu_memory_peak_bytes", host="gpu-b", device="cuda:1") == 700
    assert len(fams["cmr_ai_gpu_memory_peak_bytes"].samples) == 2
    assert _value(fams, "cmr_ai_gpu_memory_sample_timestamp_seconds", host="gpu-b", device="cuda:1") == \
        pytest.approx((now - timedelta(seconds=10) - datetime(1970, 1, 1)).total_seconds())
    assert "cmr_ai_broker_up" not in fams and _value(fams, "cmr_ai_scrape_errors") == 0


def test_a_re_send_keeps_the_report_stage_of_a_finished_job(tmp_path):
    """Exports queued again move a DONE job back to EXPORTING: the report was written when it was, so
    ``reported_at`` (the end of ``report``) stays, and ``finished_at`` moves to the new delivery."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with db.session_scope(url) as s:
        study = db.Study(study_instance_uid="1.2.3", state=db.StudyState.COMPLETE)
        s.add(study)
        s.flush()
        job = db.Job(study_id=study.id, rule="r", template="t", model="m", state=db.JobState.QUEUED)
        for state in (db.JobState.PREPARING, db.JobState.INFERRING, db.JobState.REPORTING, db.JobState.EXPORTING,
                      db.JobState.DONE):
            job.state = state
        reported, finished = job.reported_at, job.finished_at
        time.sleep(0.01)
        job.state = db.JobState.EXPORTING
        job.state = db.JobState.DONE
        assert job.reported_at == reported and job.finished_at > finished


@pytest.mark.parametrize("broker", ["embedded", "redis://127.0.0.1:6379/0", "amqp://guest:guest@127.0.0.1:5672//"],
                         ids=["embedded", "redis", "rabbitmq"])
def test_queue_depths_on_the_embedded_broker_redis_and_rabbitmq(tmp_path, broker):
    """``queue_depths`` counts what waits in a queue, 0 for a queue the broker does not know. A queue
    of its own (a unique name, deleted after) so that other tests on the same servers are not disturbed."""
    from kombu import Queue

    from worker.app import app

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f'storage: {{path: "{tmp_path / "var" / "dicom"}"}}\n'
                   f'database: {{url: "sqlite:///{tmp_path / "var" / "cmr-ai.db"}"}}\n'
                   f'queue: {{broker: "{broker}"}}\n')
    settings = load_settings(cfg, check_templates=False)
    name = f"cmr-ai-test-depth-{uuid.uuid4().hex[:12]}"
    assert queue_depths(settings, (name,)) == {name: 0}
    with app.connection_for_write() as conn:  # queue_depths configured the app for this broker
        queue = Queue(name, routing_key=name)
        try:
            producer = conn.Producer()
            for i in range(3):
                producer.publish({"i": i}, routing_key=name, declare=[queue], retry=True)
            end, unused = time.monotonic() + 10, f"{name}-never-used"
            while (depths := queue_depths(settings, (name, unused))) != {name: 3, unused: 0}:
                assert time.monotonic() < end, depths  # RabbitMQ counts a published message a moment later
                time.sleep(0.1)
        finally:
            queue(conn.default_channel).delete()
