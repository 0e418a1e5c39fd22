"""Rules on a real running node (``cmr-ai serve --no-worker``), studies sent with dcmtk's storescu.

- hot reload: a broken edit is refused with every error logged and the old rules
  stay in force; a valid edit takes effect and later decisions record its version;
- forward_to: the original instances arrive in a real Orthanc as they were sent
  (same SOP Instance UIDs, RLE Lossless still RLE Lossless).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pydicom
from sqlalchemy import select

from peers import dcmtk_storescu, free_port
from plugin import db
from plugin.phantom import write_brain_mr, write_study
from plugin.routing import rules_version


def wait_for(what: str, cond: Callable[[], object], timeout: float = 60, log: Path | None = None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


class ServedNode:
    """``cmr-ai serve --no-worker`` on a free port with a config written by the test."""

    def __init__(self, tmp_path: Path, rules_yaml: str, destinations_yaml: str = "{}"):
        self.port = free_port()
        self.tmp = tmp_path
        self.config = tmp_path / "config.yaml"
        self.db = f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"
        self.log = tmp_path / "node.log"
        self.destinations = destinations_yaml
        self.write(rules_yaml)
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "plugin.cli", "serve", "--no-worker", "--config",
                                      str(self.config)], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        wait_for("the node to listen", self._listening, log=self.log)

    def text(self, rules_yaml: str) -> str:
        return (f"node: {{ae_title: CMR_AI, host: 127.0.0.1, port: {self.port}}}\n"
                f"storage: {{path: {self.tmp / 'var' / 'dicom'}}}\n"
                f"database: {{url: \"{self.db}\"}}\n"
                f"destinations: {self.destinations}\n"
                f"rules:\n{rules_yaml}")

    def write(self, rules_yaml: str) -> str:
        text = self.text(rules_yaml)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)  # as editors save: the node never reads half a file
        return rules_version(text)

    def _listening(self) -> bool:
        assert self.proc.poll() is None, "node exited early:\n" + self.log.read_text()[-4000:]
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def send(self, folder: Path, *extra: str) -> None:
        r = dcmtk_storescu(self.port, [folder], extra_args=["+sd", "+r", "+sp", "*.dcm", "-R", *extra])
        assert r.returncode == 0, r.stdout + r.stderr

    def study(self, uid: str):
        with db.session_scope(self.db) as s:
            st = s.scalar(select(db.Study).where(db.Study.study_instance_uid == uid))
            if st is None or st.state == db.StudyState.RECEIVING:
                return None
            jobs = [(j.kind, j.state, j.rules_version) for j in st.jobs]
            return st.state, st.rule, st.rules_version, jobs

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        print(self.log.read_text()[-6000:])


IGNORE_ALL = """\
  - {name: ignore-everything, action: ignore, stable_after: 1}
"""
BROKEN = """\
  - name: brain
    match: {BodyPartExamined: "(?i)brain(", Modalty: MR}
    template: cmr_standard
    model: demo
    send_to: [nowhere]
    stable_after: 1
  - {name: ignore-everything, action: ignore, stable_after: 1}
"""
ANALYSE_BRAIN = """\
  - name: brain
    match: {BodyPartExamined: "(?i)brain", Modality: MR}
    template: cmr_standard
    model: demo
    stable_after: 1
  - {name: ignore-everything, action: ignore, stable_after: 1}
"""


def test_a_broken_edit_is_refused_and_logged_a_valid_one_takes_effect(tmp_path):
    for seed in (1, 2, 3):
        write_brain_mr(tmp_path / f"brain{seed}", seed=70 + seed, size=32)
    uids = [pydicom.dcmread(next((tmp_path / f"brain{seed}").rglob("*.dcm"))).StudyInstanceUID for seed in (1, 2, 3)]
    node = ServedNode(tmp_path, IGNORE_ALL)
    try:
        v1 = rules_version(node.text(IGNORE_ALL))
        node.send(tmp_path / "brain1")
        assert wait_for("brain1 routed", lambda: node.study(uids[0]), log=node.log) == (
            db.StudyState.IGNORED, "ignore-everything", v1, [])

        v2 = node.write(BROKEN)
        wait_for("the broken file to be refused", lambda: "error(s): refused" in node.log.read_text(), log=node.log)
        log = node.log.read_text()
        assert f"config {node.config} changed (version {v2}) but has 3 error(s): refused; rules version {v1} " \
               "stays in force" in log
        assert f"{node.config}:7: rules[0].match.BodyPartExamined: bad regular expression" in log
        assert f"{node.config}:7: rules[0].match.Modalty: 'Modalty' is not a DICOM keyword" in log
        assert f"{node.config}:10: rules[0].send_to[0]: unknown destination 'nowhere'" in log
        node.send(tmp_path / "brain2")  # the old rules are still in force
        assert wait_for("brain2 routed", lambda: node.study(uids[1]), log=node.log) == (
            db.StudyState.IGNORED, "ignore-everything", v1, [])

        v3 = node.write(ANALYSE_BRAIN)
        wait_for("the new rules", lambda: f"rules version {v1} → {v3}" in node.log.read_text(), log=node.log)
        node.send(tmp_path / "brain3")
        state, rule, version, jobs = wait_for("brain3 routed", lambda: node.study(uids[2]), log=node.log)
        assert (state, rule, version) == (db.StudyState.COMPLETE, "brain", v3)
        assert [(k, v) for k, _state, v in jobs] == [(db.JobKind.ANALYSE, v3)]
        with db.session_scope(node.db) as s:  # the earlier decisions keep the version that made them
            assert {st.study_instance_uid: st.rules_version for st in s.scalars(select(db.Study))} == {
                uids[0]: v1, uids[1]: v1, uids[2]: v3}

        os.killpg(node.proc.pid, signal.SIGHUP)  # SIGHUP re-reads at once; the file is the one in force
        wait_for("SIGHUP handled", lambda: f"unchanged: rules version {v3}" in node.log.read_text(), log=node.log)
        assert node.proc.poll() is None
    finally:
        node.stop()


def test_forward_to_sends_the_original_instances_as_received(tmp_path, orthanc):
    study = write_study(tmp_path / "ge", style="ge", seed=81, slices=4, phases=4, size=32)  # RLE Lossless
    sent = {}
    for p in (tmp_path / "ge").rglob("*.dcm"):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        sent[ds.SOPInstanceUID] = str(ds.file_meta.TransferSyntaxUID)
    assert set(sent.values()) == {"1.2.840.10008.1.2.5"}
    dest = f"{{pacs: {{dimse: {{ae_title: {orthanc.aet}, host: 127.0.0.1, port: {orthanc.port}}}}}}}"
    node = ServedNode(tmp_path, "  - {name: archive, forward_to: [pacs], stable_after: 1}\n", dest)
    try:
        node.send(tmp_path / "ge", "-xr")  # the RLE files go as they are
        wait_for("every instance in Orthanc", lambda: len(orthanc.instances()) == len(sent), timeout=120,
                 log=node.log)
        got = {}
        for oid in orthanc.instances():
            got[orthanc.instance_tags(oid)["SOPInstanceUID"]] = orthanc.instance_metadata(oid)["TransferSyntax"]
        assert got == sent
        assert wait_for("the forward job done", lambda: (node.study(study.study_instance_uid) or (0, 0, 0, [(0, 0, 0)]))
                        [3][0][1] == db.JobState.DONE, log=node.log)
        state, rule, _v, jobs = node.study(study.study_instance_uid)
        assert state == db.StudyState.COMPLETE and rule == "archive" and jobs[0][0] == db.JobKind.FORWARD
    finally:
        node.stop()
