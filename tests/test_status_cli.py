"""``cmr-ai status`` on a real SQLite database with jobs in several states and the embedded
broker holding real (unconsumed) messages; progress options never garble stdout."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from plugin import db
from plugin.cli import main

ROOT = Path(__file__).resolve().parents[1]
UID = "1.2.826.0.1.3680043.8.498.{}"


@pytest.fixture()
def node_state(tmp_path):
    """A config (embedded broker, SQLite), 4 studies, 5 jobs (done, failed, inferring, queued,
    exporting), an outbox with pending, dead and sent rows, and 3 messages waiting on ``node``."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""node: {{ae_title: CMR_AI, port: 11112, http_port: 18080}}
storage: {{path: {tmp_path / 'var' / 'dicom'}}}
database: {{url: "sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"}}
queue: {{broker: embedded}}
destinations:
  pacs: {{folder: {tmp_path / 'out'}}}
rules:
  - {{name: cardiac-mr, match: {{Modality: MR}}, template: cmr_standard, model: demo, send_to: [pacs]}}
""")
    from plugin.config import load_settings

    settings = load_settings(cfg)
    url = settings.database.url
    now = db.utcnow()
    ago = lambda s: now - timedelta(seconds=s)  # noqa: E731
    with db.session_scope(url) as s:
        studies = [db.Study(study_instance_uid=UID.format(i), state=st, rule="cardiac-mr")
                   for i, st in enumerate([db.StudyState.COMPLETE] * 3 + [db.StudyState.RECEIVING])]
        studies.append(db.Study(study_instance_uid=UID.format(9), state=db.StudyState.IGNORED))
        s.add_all(studies)
        s.flush()

        def job(study, state, **kw):
            j = db.Job(study_id=study.id, rule="cardiac-mr", template="cmr_standard", model="demo",
                       destinations="pacs", **kw)
            j.state = state  # stamps the stage columns; overwritten below where a test wants fixed times
            s.add(j)
            return j

        done = job(studies[0], db.JobState.DONE, created_at=ago(300))
        done.started_at, done.prepared_at, done.inferred_at = ago(298), ago(290), ago(250)
        done.reported_at, done.finished_at = ago(248), ago(245)
        failed = job(studies[1], db.JobState.FAILED, created_at=ago(200),
                     error="PrepareError: no short-axis cine series (0020,0037) missing\ntraceback …")
        inferring = job(studies[2], db.JobState.INFERRING, created_at=ago(60))
        inferring.started_at, inferring.prepared_at = ago(59), ago(50)
        job(studies[2], db.JobState.QUEUED, created_at=ago(5))
        exporting = job(studies[0], db.JobState.EXPORTING, created_at=ago(30))
        s.flush()
        for i, st in enumerate([db.ExportState.PENDING, db.ExportState.DEAD, db.ExportState.SENT,
                                db.ExportState.SENT]):
            s.add(db.Export(job_id=(exporting if st == db.ExportState.PENDING else done).id, destination="pacs",
                            sop_instance_uid=UID.format(100 + i), path="/x.dcm", kind="sr", state=st))
        ids = {"done": done.id, "failed": failed.id, "inferring": inferring.id, "exporting": exporting.id}
    from worker.app import app, configure

    configure(settings)
    with app.connection_for_write() as conn:  # its own connection: the app's producer pool may hold an
        for _ in range(3):  # earlier test's broker. Real messages on the embedded broker; nobody consumes them
            app.send_task("cmr_ai.status_test_probe", queue="node", connection=conn)
    return cfg, ids


def test_status_prints_queue_depths_jobs_studies_and_outbox(node_state, capsys):
    cfg, ids = node_state
    assert main(["status", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert "queues (embedded): gpu 0, node 3" in out, out
    assert "studies: receiving 1, complete 3, ignored 1" in out, out
    assert "jobs: queued 1, preparing 0, inferring 1, reporting 0, exporting 1, done 1, failed 1" in out, out
    assert "outbox: pending 1, dead 1, sent 2, superseded 0" in out, out
    assert "recent jobs (5)" in out
    for state in ("done", "failed", "inferring", "queued", "exporting"):
        assert f" {state} " in out, out
    assert "PrepareError: no short-axis cine series" in out and "traceback" not in out  # first line only
    assert UID.format(1) in out
    assert err == ""


def test_status_json_parses_and_has_stage_times(node_state, capsys):
    cfg, ids = node_state
    assert main(["status", "--config", str(cfg), "--json", "--limit", "4"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["queues"] == {"node": 3, "gpu": 0} and info["queues_error"] is None
    assert info["studies"] == {"receiving": 1, "complete": 3, "ignored": 1}
    assert info["jobs_by_state"]["failed"] == 1 and sum(info["jobs_by_state"].values()) == 5
    assert info["outbox"]["pending"] == 1 and info["outbox"]["dead"] == 1
    assert len(info["jobs"]) == 4 and [j["id"] for j in info["jobs"]] == sorted((j["id"] for j in info["jobs"]),
                                                                                reverse=True)
    by_id = {j["id"]: j for j in info["jobs"]}
    assert ids["done"] not in by_id  # the oldest fell off the --limit
    inferring = by_id[ids["inferring"]]
    assert inferring["state"] == "inferring" and inferring["stages_s"]["prepare"] == pytest.approx(9, abs=0.5)
    assert inferring["stages_s"]["infer"] >= 49  # running: so far
    assert inferring["stages_s"]["report"] is None and inferring["age_s"] >= 59
    failed = by_id[ids["failed"]]
    assert failed["error"].startswith("PrepareError") and failed["study_instance_uid"] == UID.format(1)
    assert main(["status", "--config", str(cfg), "--json", "--limit", "0"]) == 0
    done = {j["id"]: j for j in json.loads(capsys.readouterr().out)["jobs"]}[ids["done"]]
    assert done["stages_s"] == {"wait": 2.0, "prepare": 8.0, "infer": 40.0, "report": 2.0, "export": 3.0}
    assert done["total_s"] == 55.0


def test_status_bad_config_is_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {port: 99999}\nqueue: {broker: nats://x}\n")
    assert main(["status", "--config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("cmr-ai status: error: ") and f"{bad}:1: node.port" in err and "1 more" in err
    assert main(["status", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no config file" in err


def test_status_unreachable_broker_is_reported_not_fatal(tmp_path, capsys):
    from peers import free_port

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""storage: {{path: {tmp_path / 'dicom'}}}
database: {{url: "sqlite:///{tmp_path / 'cmr-ai.db'}"}}
queue: {{broker: "redis://:secret@127.0.0.1:{free_port()}/0"}}
""")
    from worker import app as worker_app

    before = worker_app.app.conf.broker_url
    try:
        assert main(["status", "--config", str(cfg), "--json"]) == 0
    finally:  # status pointed this process's Celery app at the dead broker: point it back
        worker_app.app.conf.broker_url = before
    info = json.loads(capsys.readouterr().out)
    assert info["queues"] is None and "redis://:***@127.0.0.1" in info["queues_error"], info
    assert "secret" not in json.dumps(info)
    assert info["jobs"] == [] and info["outbox"]["dead"] == 0


def test_progress_off_the_terminal_never_touches_stdout(tmp_path):
    """``phantom`` / ``inspect --json`` with output captured: stdout is exactly the result; with
    ``--progress`` forced, stderr gets plain lines, no terminal control sequences."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cli = [sys.executable, "-m", "plugin.cli"]
    r = subprocess.run(cli + ["phantom", str(tmp_path / "s"), "--slices", "3", "--phases", "4", "--size", "32",
                              "--progress"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["study_instance_uid"]
    assert "\x1b[" not in r.stderr and "\r" not in r.stderr
    assert "phantom: writing siemens series: 0/5 …" in r.stderr and "5/5 done in" in r.stderr, r.stderr
    r = subprocess.run(cli + ["inspect", str(tmp_path / "s"), "--json"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=300)
    assert json.loads(r.stdout)["study_instance_uid"] and r.stderr == "", r.stderr  # not a TTY: no progress
    r = subprocess.run(cli + ["inspect", str(tmp_path / "s"), "--json", "--progress"], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(r.stdout)["study_instance_uid"]
    assert "\x1b[" not in r.stderr and f"inspected {tmp_path / 's'}: 5/5 done in" in r.stderr, r.stderr


def test_status_shows_each_dicomweb_source_with_its_failures(tmp_path, capsys):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""storage: {{path: {tmp_path / 'var' / 'dicom'}}}
database: {{url: "sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"}}
sources:
  archive: {{dicomweb: {{url: "http://127.0.0.1:1/dicom-web"}}, poll_every: 30}}
  manual: {{dicomweb: {{url: "http://127.0.0.1:2/dicom-web"}}, poll_every: 0}}
""")
    url = f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"
    now = db.utcnow()
    with db.session_scope(url) as s:
        s.add_all([db.SourceStudy(source="archive", study_instance_uid=UID.format(1), state=db.PullState.DONE),
                   db.SourceStudy(source="archive", study_instance_uid=UID.format(2), state=db.PullState.DONE),
                   db.SourceStudy(source="archive", study_instance_uid=UID.format(3), state=db.PullState.FAILED,
                                  attempts=2, next_attempt=now + timedelta(seconds=120),
                                  error="HTTP 503 Service Unavailable from http://127.0.0.1:1/dicom-web: busy\nmore"),
                   db.SourceStudy(source="gone", study_instance_uid=UID.format(4), state=db.PullState.PULLING,
                                  heartbeat=now)])
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "source archive (polled every 30 s): pulled 2, pulling 0, failed 1" in out, out
    assert "source manual (on demand): pulled 0, pulling 0, failed 0" in out, out
    assert "source gone (no longer configured): pulled 0, pulling 1, failed 0" in out, out
    assert f"failed {UID.format(3)} (2 attempt(s)" in out and "HTTP 503 Service Unavailable" in out and "more" not in out
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sources"]["archive"]["failed"] == 1 and info["sources"]["archive"]["failures"][0]["attempts"] == 2
    assert info["sources"]["manual"]["url"] == "http://127.0.0.1:2/dicom-web"


def test_metrics_count_source_studies_by_state(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from plugin.config import load_settings
    from plugin.metrics import NodeCollector

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""storage: {{path: {tmp_path / 'var' / 'dicom'}}}
database: {{url: "sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"}}
sources:
  archive: {{dicomweb: {{url: "http://127.0.0.1:1/dicom-web"}}}}
""")
    settings = load_settings(cfg)
    with db.session_scope(settings.database.url) as s:
        s.add_all([db.SourceStudy(source="archive", study_instance_uid=UID.format(i), state=st)
                   for i, st in enumerate([db.PullState.DONE, db.PullState.DONE, db.PullState.FAILED])])
    registry = CollectorRegistry()
    registry.register(NodeCollector(lambda: settings, broker=False))
    text = generate_latest(registry).decode()
    assert 'cmr_ai_source_studies{source="archive",state="done"} 2.0' in text
    assert 'cmr_ai_source_studies{source="archive",state="failed"} 1.0' in text
    assert 'cmr_ai_source_studies{source="archive",state="pulling"} 0.0' in text
