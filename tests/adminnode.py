"""One real node with its admin HTTP API, shared by tests/test_metrics.py and tests/test_dashboard.py.

A pytest plugin module (the tests name it in ``pytest_plugins``), so that its
session-scoped fixture is one instance whichever of the two files run: a real
``cmr-ai serve`` (embedded SQLite broker, its embedded Celery worker, the nf4 demo
model) with ``node.http_port`` set and a real Orthanc as the PACS; dcmtk's ``storescu``
sends one small phantom CMR study, and the fixture returns once its job is DONE.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from peers import Orthanc, PeerMissing, dcmtk_storescu, free_port, stop_process
from plugin.phantom import write_study


@dataclass
class AdminNode:
    base: str  # http://127.0.0.1:PORT of the admin API
    token: str
    dicom_port: int
    db: str  # the node's database URL
    var: Path
    log: Path
    study_uid: str
    sent: list[Path]  # the files storescu sent
    job_id: int
    orthanc: Orthanc

    def get(self, path: str, token: str | None = "default", **kw) -> requests.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {self.token if token == 'default' else token}"}
        return requests.get(self.base + path, headers=headers, timeout=30, **kw)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text()[-chars:]


def _wait(what: str, check, proc, log: Path, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"node exited ({proc.returncode}) waiting for {what}:\n{log.read_text()[-6000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout} s:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="session")
def admin_node(tmp_path_factory, demo_model_dir):
    """The node, after one phantom study went through it (its analysis job DONE, results in Orthanc)."""
    tmp = tmp_path_factory.mktemp("admin-node")
    try:
        orthanc = Orthanc(tmp / "orthanc")
    except PeerMissing as e:
        pytest.fail(str(e), pytrace=False)
    port = free_port()
    var = tmp / "var"
    cfg = tmp / "config.yaml"
    cfg.write_text(f"""\
node: {{ae_title: CMR_AI, host: 127.0.0.1, port: {port}, http_port: 0}}
storage: {{path: "{var / 'dicom'}"}}
database: {{url: "sqlite:///{var / 'cmr-ai.db'}"}}
queue: {{broker: embedded}}
models: {{demo: {{path: "{demo_model_dir}", quantization: nf4}}}}
destinations:
  pacs: {{dimse: {{ae_title: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.port}}}}}
rules:
  - name: cardiac-mr
    match: {{Modality: MR, StudyDescription: "(?i)card|heart|cmr"}}
    stable_after: 1
    template: lv_function
    model: demo
    send_to: [pacs]
""")
    log = tmp / "node.log"
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "plugin.cli", "serve", "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"))
    try:
        http_port = int(_wait("the admin API", lambda: (m := re.search(r"admin API on http://127\.0\.0\.1:(\d+)",
                                                                        log.read_text())) and m.group(1),
                              proc, log, 60))
        _wait("the DICOM port", lambda: "listening as CMR_AI" in log.read_text(), proc, log, 60)
        token = (var / "run" / "api-token").read_text().strip()
        truth = write_study(tmp / "study", style="siemens", seed=31, slices=4, phases=6, size=64,
                            study_description="CMR cardiac function")
        sent = sorted((tmp / "study").rglob("*.dcm"))
        r = dcmtk_storescu(port, sent, extra_args=["-R"])
        assert r.returncode == 0, f"storescu failed: {r.stdout}\n{r.stderr}"
        node = AdminNode(f"http://127.0.0.1:{http_port}", token, port, f"sqlite:///{var / 'cmr-ai.db'}", var, log,
                         truth.study_instance_uid, sent, 0, orthanc)

        def done():
            items = node.get("/api/jobs").json()["items"]
            mine = [j for j in items if j["study_instance_uid"] == truth.study_instance_uid]
            if mine and mine[0]["state"] == "failed":
                raise AssertionError(f"job failed: {mine[0]['error']}\n{node.log_tail()}")
            return mine[0]["id"] if mine and mine[0]["state"] == "done" else None

        node.job_id = _wait("the study's job DONE", done, proc, log, 180)
        yield node
    finally:
        stop_process(proc)
        orthanc.stop(graceful=False)
        print(f"--- {log}\n{log.read_text()[-4000:]}")
