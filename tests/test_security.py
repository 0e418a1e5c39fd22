"""Security of the node: who may associate, DICOM TLS, PHI out of the logs, the admin API's token.

Everything runs against a real ``cmr-ai serve`` (or a real StoreSCP) with real
clients: dcmtk's ``echoscu`` / ``storescu`` (with ``+tls`` for DICOM TLS),
pynetdicom as an SCU bound to other loopback addresses, ``requests`` for HTTP.
The TLS certificates (a CA, the node, a client, and a client of a CA the node does
not trust) are made by ``openssl`` at run time.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from sqlalchemy import select

from peers import free_port
from plugin import db
from plugin.config import ConfigError, load_settings
from plugin.phantom import write_study

ECHOSCU, STORESCU = "/usr/bin/echoscu", "/usr/bin/storescu"
MR = "1.2.840.10008.5.1.4.1.1.4"


# ---------------------------------------------------------------------------
# helpers

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A test CA with a server and a client certificate, and a client of another CA (openssl CLI)."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args) -> None:
        r = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"openssl {' '.join(map(str, args))}: {r.stderr}"

    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", d / f"{ca}.key", "-out", d / f"{ca}.pem",
                "-days", "2", "-subj", f"/CN=cmr-ai test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for n, (name, ca, usage) in enumerate((("server", "ca", "serverAuth"), ("client", "ca", "clientAuth"),
                                           ("rogue-client", "rogue-ca", "clientAuth"))):
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                       f"extendedKeyUsage={usage}\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
                "-subj", f"/CN=cmr-ai test {name}")
        openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / f"{ca}.pem", "-CAkey", d / f"{ca}.key",
                "-set_serial", str(1000 + n), "-out", d / f"{name}.pem", "-days", "2", "-extfile", d / f"{name}.ext")
    # "server" is the certificate, "server.key" its key; "ca" the CA certificate …
    return {p.stem: p for p in d.glob("*.pem")} | {p.name: p for p in d.glob("*.key")}


def serve(tmp_path: Path, node_extra: str = "", *args: str, rules: str = "[]", destinations: str = "{}",
          models: str = '{demo: {path: demo}}', port: int | None = None) -> dict:
    """Start ``cmr-ai serve`` on a free port with ``node_extra`` (YAML lines under ``node:``); log in
    ``tmp_path/node.log``. Returns {proc, port, config, log, db}."""
    port = port or free_port()
    var = tmp_path / "var"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""\
node:
  ae_title: CMR_AI
  host: 127.0.0.1
  port: {port}
{node_extra}
storage: {{path: "{var / 'dicom'}"}}
database: {{url: "sqlite:///{var / 'cmr-ai.db'}"}}
queue: {{broker: embedded}}
models: {models}
destinations: {destinations}
rules: {rules}
""")
    log = tmp_path / "node.log"
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "plugin.cli", "serve", "--config", str(cfg), *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"))
    node = {"proc": proc, "port": port, "config": cfg, "log": log, "db": f"sqlite:///{var / 'cmr-ai.db'}",
            "var": var}
    wait_log(node, "listening as CMR_AI")
    return node


def wait_log(node: dict, text: str, timeout: float = 60, count: int = 1) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        content = node["log"].read_text() if node["log"].exists() else ""
        if content.count(text) >= count:
            return content
        assert node["proc"].poll() is None, f"node exited ({node['proc'].returncode}):\n{content[-4000:]}"
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in the node's log after {timeout} s:\n{content[-4000:]}")


def stop(node: dict) -> str:
    proc = node["proc"]
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return node["log"].read_text()


@pytest.fixture()
def nodes():
    """Nodes started by a test, stopped (and their log printed) at teardown."""
    started: list[dict] = []
    yield started
    for n in started:
        print(f"--- {n['log']}\n{stop(n)[-5000:]}")


def dcmtk(prog: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([prog, *map(str, args)], capture_output=True, text=True, timeout=120)


def small_instance(path: Path, study_uid: str | None = None, **attrs) -> Dataset:
    """A tiny MR image written to ``path`` (Part 10)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MR, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.StudyDescription, ds.SeriesNumber = "MR", "P1", "test", 1
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(32)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = MR, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def stored_sops(url: str) -> set[str]:
    with db.session_scope(url) as s:
        return set(s.scalars(select(db.Instance.sop_instance_uid)).all())


def scu_associate(port: int, calling: str, source: str = "127.0.0.1", contexts=(Verification,)):
    ae = AE(ae_title=calling)
    for cx in contexts:
        ae.add_requested_context(cx)
    return ae.associate("127.0.0.1", port, ae_title="CMR_AI", bind_address=(source, 0))


# ---------------------------------------------------------------------------
# configuration

def test_security_settings_are_checked_at_load_with_file_and_line(tmp_path, pki):
    token = tmp_path / "empty-token"
    token.write_text("\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"""\
node:
  allow:
    - {{ae_title: SCANNER1}}
    - {{ip: 10.1.0.0/16}}
    - {{ae_title: PACS, ip: 192.168.2.7}}
    - {{ip: 10.1.0.5/16}}
    - {{ae_title: "SEVENTEEN_CHARS_X"}}
    - {{}}
    - {{ip: 999.1.1.1}}
  http_token_file: {token}
  tls:
    cert: {tmp_path / 'missing.pem'}
    key: {pki['server.key']}
logging: {{phi: maybe}}
""")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    errors = e.value.errors
    expect = {6: ("node.allow[3].ip", "'10.1.0.5/16' has host bits set; did you mean '10.1.0.0/16'?"),
              7: ("node.allow[4].ae_title", "not a valid AE title"),
              8: ("node.allow[5]", "needs ae_title, ip or both"),
              9: ("node.allow[6].ip", "'999.1.1.1' is not an IP address or network"),
              10: ("node.http_token_file", "is empty"),
              12: ("node.tls.cert", "no such file"),
              14: ("logging.phi", "")}
    for line, (key, words) in expect.items():
        assert any(m.startswith(f"{cfg}:{line}: {key}: ") and words in m for m in errors), (line, errors)
    assert len(errors) == len(expect), errors

    # TLS files that exist but do not fit: key of another certificate, no CA for required client certificates
    cfg.write_text(f"""\
node:
  port: 11112
  tls: {{cert: {pki['server']}, key: {pki['client.key']}}}
""")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert e.value.errors == [f"{cfg}:3: node.tls: key {str(pki['client.key'])!r} is not the private key of cert "
                              f"{str(pki['server'])!r}"]
    cfg.write_text(f"""\
node:
  tls:
    cert: {pki['server']}
    key: {pki['server.key']}
    require_client_cert: true
""")
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert e.value.errors == [f"{cfg}:2: node.tls: require_client_cert needs ca (the CA certificate that signs the "
                              "callers' certificates)"]

    cfg.write_text(f"""\
node:
  allow: [{{ae_title: SCANNER1}}, {{ip: "10.1.0.0/16"}}, {{ae_title: PACS, ip: 192.168.2.7}}, {{ip: "fd00::/8"}}]
  tls: {{cert: {pki['server']}, key: {pki['server.key']}, ca: {pki['ca']}, require_client_cert: true, port: 2762}}
logging: {{phi: false}}
""")
    s = load_settings(cfg)
    assert [str(a) for a in s.node.allow] == ["SCANNER1", "10.1.0.0/16", "PACS@192.168.2.7", "fd00::/8"]
    assert s.node.tls.port == 2762 and s.node.tls.require_client_cert and s.logging.phi is False


# ---------------------------------------------------------------------------
# allow-list

def test_callers_not_on_the_allow_list_get_an_association_reject(tmp_path, nodes):
    node = serve(tmp_path, """\
  allow:
    - {ae_title: SCANNER1}                  # from anywhere
    - {ip: 127.0.0.16/28}                   # any AE title from 127.0.0.16 … 127.0.0.31
    - {ae_title: PACS, ip: 127.0.0.1}       # this AE title from this address only
""", "--no-worker")
    nodes.append(node)
    port = node["port"]

    assert dcmtk(ECHOSCU, "-aet", "SCANNER1", "-aec", "CMR_AI", "127.0.0.1", port).returncode == 0
    assert dcmtk(ECHOSCU, "-aet", "PACS", "-aec", "CMR_AI", "127.0.0.1", port).returncode == 0
    r = dcmtk(ECHOSCU, "-aet", "INTRUDER", "-aec", "CMR_AI", "127.0.0.1", port)
    assert r.returncode != 0
    assert "Association Rejected" in r.stderr and "Rejected Permanent" in r.stderr
    assert "Calling AE Title Not Recognized" in r.stderr, r.stderr

    # C-STORE: the intruder's instance is not stored, SCANNER1's is
    bad, good = small_instance(tmp_path / "bad.dcm"), small_instance(tmp_path / "good.dcm")
    r = dcmtk(STORESCU, "-aet", "INTRUDER", "-aec", "CMR_AI", "127.0.0.1", port, tmp_path / "bad.dcm")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr, r.stderr
    r = dcmtk(STORESCU, "-aet", "SCANNER1", "-aec", "CMR_AI", "127.0.0.1", port, tmp_path / "good.dcm")
    assert r.returncode == 0, r.stderr
    sops = stored_sops(node["db"])
    assert good.SOPInstanceUID in sops and bad.SOPInstanceUID not in sops

    # by address (pynetdicom binds the caller to other loopback addresses)
    assoc = scu_associate(port, "ANYONE", source="127.0.0.20")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    for calling, source, diagnostic in (("ANYONE", "127.0.0.1", 0x03),  # no entry: calling AE not recognised
                                        ("PACS", "127.0.0.3", 0x01)):  # PACS, but not from its address
        assoc = scu_associate(port, calling, source=source)
        assert assoc.is_rejected and not assoc.is_established
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, diagnostic)
    # every service: a Storage Commitment result (N-EVENT-REPORT) comes over an association like any other
    assoc = scu_associate(port, "INTRUDER", contexts=(StorageCommitmentPushModel,))
    assert assoc.is_rejected

    log = wait_log(node, "refused", count=5)
    assert ("association from INTRUDER at 127.0.0.1 (called AE CMR_AI) refused: A-ASSOCIATE-RJ rejected-permanent, "
            "calling AE title not recognised: no node.allow entry matches this AE title and address") in log
    assert ("association from PACS at 127.0.0.3 (called AE CMR_AI) refused: A-ASSOCIATE-RJ rejected-permanent, "
            "no reason given: AE title PACS is allowed only as PACS@127.0.0.1") in log
    assert "callers allowed: SCANNER1, 127.0.0.16/28, PACS@127.0.0.1" in log
    assert node["proc"].poll() is None


# ---------------------------------------------------------------------------
# DICOM TLS

def test_dicom_tls_listener_beside_the_plain_one_with_client_certificates(tmp_path, nodes, pki):
    tls_port = free_port()
    node = serve(tmp_path, f"""\
  tls:
    cert: {pki['server']}
    key: {pki['server.key']}
    ca: {pki['ca']}
    require_client_cert: true
    port: {tls_port}
""", "--no-worker")
    nodes.append(node)
    wait_log(node, f"listening as CMR_AI on 127.0.0.1:{tls_port} (DICOM TLS, client certificate required)")
    tls = ("+tls", pki["client.key"], pki["client"], "+cf", pki["ca"])

    # a C-STORE over TLS with the client's certificate: stored
    ds = small_instance(tmp_path / "tls.dcm")
    r = dcmtk(STORESCU, *tls, "-aet", "MODALITY", "-aec", "CMR_AI", "127.0.0.1", tls_port, tmp_path / "tls.dcm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ds.SOPInstanceUID in stored_sops(node["db"])
    assert dcmtk(ECHOSCU, *tls, "-aec", "CMR_AI", "127.0.0.1", tls_port).returncode == 0

    # plain TCP against the TLS port: no association
    r = dcmtk(ECHOSCU, "-aec", "CMR_AI", "127.0.0.1", tls_port)
    assert r.returncode != 0 and "Association Request Failed" in r.stderr, r.stderr
    # TLS without a client certificate, and with a certificate of a CA the node does not trust: refused
    r = dcmtk(ECHOSCU, "+tla", "+cf", pki["ca"], "-aec", "CMR_AI", "127.0.0.1", tls_port)
    assert r.returncode != 0, r.stdout + r.stderr
    r = dcmtk(ECHOSCU, "+tls", pki["rogue-client.key"], pki["rogue-client"], "+cf", pki["ca"], "-aec", "CMR_AI",
              "127.0.0.1", tls_port)
    assert r.returncode != 0, r.stdout + r.stderr
    # a rogue C-STORE stores nothing
    rogue = small_instance(tmp_path / "rogue.dcm")
    dcmtk(STORESCU, "+tls", pki["rogue-client.key"], pki["rogue-client"], "+cf", pki["ca"], "-aec", "CMR_AI",
          "127.0.0.1", tls_port, tmp_path / "rogue.dcm")
    assert rogue.SOPInstanceUID not in stored_sops(node["db"])

    # the plain listener still speaks plain DICOM
    assert dcmtk(ECHOSCU, "-aec", "CMR_AI", "127.0.0.1", node["port"]).returncode == 0

    log = wait_log(node, "TLS connection from 127.0.0.1", count=4)
    assert "TLS handshake failed: wrong version number (a plain-TCP caller on the TLS port?)" in log
    assert "(node.tls.require_client_cert: the caller sent no certificate)" in log
    assert "(the caller's certificate is not signed by node.tls.ca)" in log
    assert node["proc"].poll() is None


def test_node_port_speaks_tls_without_a_tls_port(tmp_path, nodes, pki):
    """No ``tls.port``: node.port itself is the TLS listener; without ``ca`` no client certificate is asked."""
    node = serve(tmp_path, f"""\
  tls: {{cert: {pki['server']}, key: {pki['server.key']}}}
""", "--no-worker")
    nodes.append(node)
    port = node["port"]
    assert f"listening as CMR_AI on 127.0.0.1:{port} (DICOM TLS, no client certificate asked)" in node["log"].read_text()
    ds = small_instance(tmp_path / "a.dcm")
    r = dcmtk(STORESCU, "+tla", "+cf", pki["ca"], "-aec", "CMR_AI", "127.0.0.1", port, tmp_path / "a.dcm")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ds.SOPInstanceUID in stored_sops(node["db"])
    r = dcmtk(ECHOSCU, "-aec", "CMR_AI", "127.0.0.1", port)
    assert r.returncode != 0
    # the node's certificate is checked by the caller: one that trusts another CA does not talk to it
    r = dcmtk(ECHOSCU, "+tla", "+cf", pki["rogue-ca"], "-aec", "CMR_AI", "127.0.0.1", port)
    assert r.returncode != 0


# ---------------------------------------------------------------------------
# PHI out of the logs

PHI = {"PatientName": "Zyxwvut^Qwertzuio", "PatientID": "PHIID8675309", "AccessionNumber": "PHIACC42917",
       "StudyDescription": "Cardiac PHIDESC Xylophonist", "InstitutionName": "Quuxbridge Royal Infirmary",
       "ReferringPhysicianName": "Plimsollvard^Drvorak", "PatientBirthDate": "19310517", "PatientAge": "077Y",
       "PatientSex": "F", "RequestedProcedureDescription": "Query xanthochromic pericarditis",
       "InstitutionAddress": "12 Gribblewick Lane"}
#: what must not appear in any log line (the clinical context would say "77-year-old female")
PHI_STRINGS = ["Zyxwvut", "Qwertzuio", "PHIID8675309", "PHIACC42917", "PHIDESC", "Xylophonist", "Quuxbridge",
               "Plimsollvard", "Drvorak", "19310517", "77-year-old", "xanthochromic", "Gribblewick", "Zebrafinch"]


def _phi_study(tmp_path: Path) -> tuple[Path, Path, str]:
    """A small phantom study carrying distinctive PHI (and a localizer described 'localizer Zebrafinch'),
    and a bad instance of it: PatientID sent with VR IS (pydicom warns, quoting the value) and a
    Series Number that is no number (the node refuses it, 0xC210)."""
    study = write_study(tmp_path / "study", style="siemens", seed=5, slices=6, phases=8, size=96,
                        study_description=PHI["StudyDescription"])
    files = sorted((tmp_path / "study").rglob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in PHI.items():
            setattr(ds, k, v)
        if ds.SeriesDescription == "localizer":
            ds.SeriesDescription = "localizer Zebrafinch"
        ds.save_as(f)
    bad = pydicom.dcmread(files[-1])
    bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = generate_uid()

    def raw(tag: int, vr: str, value: str) -> None:
        b = value.encode() + (b" " if len(value) % 2 else b"")
        bad[tag] = RawDataElement(Tag(tag), vr, len(b), b, 0, False, True)

    raw(0x00100020, "IS", PHI["PatientID"])
    raw(0x00200011, "IS", "7b")
    (tmp_path / "bad").mkdir()
    bad.save_as(tmp_path / "bad" / "bad.dcm")
    return tmp_path / "study", tmp_path / "bad" / "bad.dcm", study.study_instance_uid


def test_scrub_redacts_quoted_values_but_keeps_uids_and_numbers(monkeypatch):
    from plugin import logsafe

    monkeypatch.delenv(logsafe.ENV, raising=False)
    monkeypatch.setattr(logsafe, "_enabled", False)
    assert logsafe.scrub("invalid literal for int() with base 10: 'PHIACC42917'") == \
        "invalid literal for int() with base 10: '<redacted>'"
    assert logsafe.scrub("can't read series 7 'cine Zebrafinch' of \"O'Brien\" (b'Zyx')") == \
        "can't read series 7 '<redacted>' of \"<redacted>\" (b'<redacted>')"
    assert logsafe.scrub("UID '1.2.840.10008.5.1.4.1.1.4', size '12', ['A', 'B']") == \
        "UID '1.2.840.10008.5.1.4.1.1.4', size '12', ['<redacted>', '<redacted>']"
    assert logsafe.phi("Doe^John") == "<redacted>" and logsafe.phi("") == ""
    assert logsafe.exc_text(KeyError("Doe^John")) == "KeyError: '<redacted>'"
    monkeypatch.setattr(logsafe, "_enabled", True)
    assert logsafe.scrub("'Doe^John'") == "'Doe^John'" and logsafe.phi("Doe^John") == "Doe^John"


def test_phi_stays_out_of_node_and_worker_logs_unless_debug_phi(tmp_path, nodes, demo_model_dir):
    study_dir, bad, study_uid = _phi_study(tmp_path)
    out, off = tmp_path / "out", tmp_path / "off"
    off.mkdir()
    node = serve(off, "",
                 models=f'{{demo: {{path: "{demo_model_dir}", quantization: nf4}}}}',
                 destinations=f'{{out: {{folder: "{out}"}}}}',
                 rules="""
  - name: cardiac-phi
    match: {Modality: MR, StudyDescription: "(?i)cardiac"}
    stable_after: 2
    template: cmr_standard
    model: demo
    send_to: [out]
  - {name: everything-else, match: {}, action: ignore}""")
    nodes.append(node)
    r = dcmtk(STORESCU, "-aet", "MODALITY", "-aec", "CMR_AI", "+sd", "+r", "+sp", "*.dcm", "-R", "127.0.0.1",
              node["port"], study_dir)
    assert r.returncode == 0, r.stderr
    dcmtk(STORESCU, "-aet", "MODALITY", "-aec", "CMR_AI", "127.0.0.1", node["port"], bad)
    deadline, job = time.monotonic() + 420, None
    while time.monotonic() < deadline:
        with db.session_scope(node["db"]) as s:
            job = s.scalar(select(db.Job))
            if job is not None and job.state.finished:
                state, error = job.state, job.error
                break
        assert node["proc"].poll() is None, node["log"].read_text()[-4000:]
        time.sleep(1)
    assert job is not None and job.state.finished, "no finished job: " + node["log"].read_text()[-4000:]
    assert state == db.JobState.DONE, error
    assert list(out.rglob("*.dcm")), "no draft written to the folder destination"
    log = stop(node)

    # the path really ran, and said so ...
    assert f"study {study_uid} complete" in log and "rule cardiac-phi → analyse job" in log
    assert "refused (0xC210)" in log  # the bad instance
    assert "succeeded in" in log  # the embedded worker's task log lines are in this output too
    assert "report: job" in log
    # ... without a single PHI value; what was redacted says so
    leaked = [p for p in PHI_STRINGS if p in log]
    assert not leaked, f"PHI in the log: {leaked}"
    assert "'<redacted>'" in log
    assert study_uid in log  # UIDs are kept

    # --debug-phi: the same bad instance, and its values are in the log
    on = tmp_path / "on"
    on.mkdir()
    node = serve(on, "", "--debug-phi", "--no-worker")
    nodes.append(node)
    dcmtk(STORESCU, "-aet", "MODALITY", "-aec", "CMR_AI", "127.0.0.1", node["port"], bad)
    log = wait_log(node, "refused (0xC210)")
    assert "PHI is written to this log (--debug-phi)" in log
    assert PHI["PatientID"] in log and "'<redacted>'" not in log


# ---------------------------------------------------------------------------
# admin HTTP API

def _get(port: int, path: str, token: str | None = None, scheme: str = "Bearer") -> requests.Response:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return requests.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)


def test_admin_api_health_is_open_and_the_rest_needs_the_token(tmp_path, nodes):
    http_port = free_port()
    rules = "[{name: all, match: {}, stable_after: 0.5, forward_to: [out]}]"
    dests = f'{{out: {{folder: "{tmp_path / "out"}"}}}}'
    node = serve(tmp_path, f"  http_port: {http_port}", "--no-worker", rules=rules, destinations=dests)
    nodes.append(node)
    log = wait_log(node, "admin API on http://")
    token_file = node["var"] / "run" / "api-token"
    assert f"admin API on http://127.0.0.1:{http_port}" in log and str(token_file) in log
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in log

    health = _get(http_port, "/health")
    assert health.status_code == 200, health.text
    h = health.json()
    assert h["ok"] is True and h["rules_version"] == load_settings(node["config"]).rules_version
    assert h["dicom_port"] == node["port"] and set(h["counts"]) == {"studies", "jobs", "exports"}

    for path in ("/api/studies", "/api/jobs", "/api/exports", "/api/no-such-thing"):
        r = _get(http_port, path)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Bearer realm="cmr-ai"', (path, r.text)
        r = _get(http_port, path, token + "x")
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="cmr-ai", error="invalid_token"'
        assert _get(http_port, path, token, scheme="Basic").status_code == 401
    assert _get(http_port, "/api/no-such-thing", token).status_code == 404

    # two studies, the second one last: recent first, limit
    first = small_instance(tmp_path / "1.dcm", PatientID="PHIAPI1", AccessionNumber="ACCAPI1")
    second = small_instance(tmp_path / "2.dcm", PatientID="PHIAPI2", StudyDescription="Secret words")
    for f in ("1.dcm", "2.dcm"):
        assert dcmtk(STORESCU, "-aet", "MODALITY", "-aec", "CMR_AI", "127.0.0.1", node["port"],
                     tmp_path / f).returncode == 0
    r = _get(http_port, "/api/studies", token)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    items = r.json()["items"]
    assert [i["study_instance_uid"] for i in items] == [second.StudyInstanceUID, first.StudyInstanceUID]
    assert items[0]["n_instances"] == 1 and items[0]["calling_ae"] == "MODALITY"
    assert not any(x in r.text for x in ("PHIAPI", "ACCAPI", "Secret words")), "PHI in /api/studies"
    r = _get(http_port, "/api/studies?limit=1", token)
    assert [i["study_instance_uid"] for i in r.json()["items"]] == [second.StudyInstanceUID]
    assert _get(http_port, "/api/studies?limit=abc", token).status_code == 400
    assert _get(http_port, "/api/studies?limit=0", token).status_code == 400

    # the rule forwards each study: two jobs (forward), and their outbox rows
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = _get(http_port, "/api/jobs", token).json()["items"]
        if len(jobs) == 2:
            break
        time.sleep(0.3)
    assert [j["study_instance_uid"] for j in jobs] == [second.StudyInstanceUID, first.StudyInstanceUID], jobs
    assert all(j["rule"] == "all" and j["kind"] == "forward" for j in jobs)
    exports = _get(http_port, "/api/exports?limit=10", token).json()["items"]
    assert isinstance(exports, list) and all(e["destination"] == "out" for e in exports)
    assert {e["sop_instance_uid"] for e in exports} <= {first.SOPInstanceUID, second.SOPInstanceUID}
    h = _get(http_port, "/health").json()
    assert sum(h["counts"]["studies"].values()) == 2 and sum(h["counts"]["jobs"].values()) == 2
    assert "admin API: GET /api/studies from 127.0.0.1 refused: wrong token" in node["log"].read_text()

    # the token is generated once: a restart keeps it
    stop(node)
    node = serve(tmp_path, f"  http_port: {http_port}", "--no-worker", rules=rules, destinations=dests,
                 port=node["port"])
    nodes.append(node)
    wait_log(node, "admin API on http://", count=2)
    assert token_file.read_text().strip() == token
    assert _get(http_port, "/api/jobs", token).status_code == 200


def test_admin_api_token_from_http_token_file(tmp_path, nodes):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-from-the-site\n")
    http_port = free_port()
    node = serve(tmp_path, f"  http_port: {http_port}\n  http_token_file: {token_file}", "--no-worker")
    nodes.append(node)
    wait_log(node, "admin API on http://")
    assert _get(http_port, "/api/studies", "s3cret-token-from-the-site").status_code == 200
    assert _get(http_port, "/api/studies", "s3cret-token-from-the-sit").status_code == 401
    assert not (node["var"] / "run" / "api-token").exists()
    assert json.loads(_get(http_port, "/health").text)["ok"] is True
