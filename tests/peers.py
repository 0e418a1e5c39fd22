"""Real DICOM peers for the tests: Orthanc (PACS, with DICOMweb), dcmtk, dciodvfy.

Plain helpers, no pytest: fixtures live in ``conftest.py``. Everything talks to
127.0.0.1 only (the HTTP session ignores proxy settings from the environment).

    with Orthanc(tmp_path / "pacs") as pacs:           # ~0.1 s to start
        ...send to pacs.aet @ 127.0.0.1:pacs.port, or STOW to pacs.dicomweb_url...
        assert pacs.find_instance(sop_uid)
"""
from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
DCMTK_STORESCU = "/usr/bin/storescu"  # not the venv's pynetdicom `storescu`, which shadows it on PATH
DCIODVFY = "/usr/bin/dciodvfy"


class PeerMissing(RuntimeError):
    """A peer program the tests need is not installed (the fixtures turn this into a failure, never a skip)."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require(*paths: str, hint: str) -> None:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise PeerMissing(f"{', '.join(missing)} missing: {hint}")


class Orthanc:
    """A real Orthanc on free ports, in its own directory, with the DICOMweb plugin.

    Parameters
    ----------
    workdir:
        Holds the generated ``orthanc.json``, the storage/index (``db/``) and
        ``orthanc.log`` (Orthanc's stdout and stderr).
    aet:
        Orthanc's AE title; it does not check the called AE title anyway.
    modalities:
        ``DicomModalities`` entries, e.g. ``{"cmr": ["CMR_AI", "127.0.0.1", 11112]}``, so
        Orthanc can C-STORE/C-MOVE to our node.
    config:
        Extra Orthanc settings, merged over the defaults (e.g. ``{"MaximumPatientCount": 1}``,
        ``{"AuthenticationEnabled": True, "RegisteredUsers": {"u": "p"}}``).
    start_timeout:
        Seconds to wait for ``GET /system`` to answer.

    Raises
    ------
    PeerMissing
        When /usr/sbin/Orthanc or the DICOMweb plugin is not installed.
    RuntimeError
        When Orthanc exits or does not answer in time (with the tail of its log).
    """

    def __init__(self, workdir: Path | str, aet: str = "ORTHANC", *, modalities: Optional[dict] = None,
                 config: Optional[dict[str, Any]] = None, start_timeout: float = 30.0):
        _require(ORTHANC, DICOMWEB_PLUGIN,
                 hint="install the Debian packages orthanc and orthanc-dicomweb (`make test` does it as root)")
        self.workdir, self.aet = Path(workdir), aet
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self._modalities, self._extra = dict(modalities or {}), dict(config or {})
        self._http = requests.Session()
        self._http.trust_env = False  # never through a proxy: 127.0.0.1 only
        self._auth: Optional[tuple[str, str]] = None
        users = self._extra.get("RegisteredUsers") or {}
        if self._extra.get("AuthenticationEnabled") and users:
            self._auth = next(iter(users.items()))
        self._http.auth = self._auth
        self.proc: Optional[subprocess.Popen] = None
        self._log = None
        t0 = time.monotonic()
        for attempt in range(3):  # a free port can be taken between free_port() and Orthanc's bind
            self.port, self.http_port = free_port(), free_port()
            if self._start(start_timeout, last=attempt == 2):
                break
        self.start_seconds = time.monotonic() - t0

    def config(self) -> dict[str, Any]:
        cfg = {
            "Name": "cmr-ai-test",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "StableAge": 1,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": self._modalities,
            "HttpTimeout": 60,
            "DicomScpTimeout": 30,
            "SaveJobs": False,
        }
        cfg.update(self._extra)
        return cfg

    def _start(self, timeout: float, last: bool) -> bool:
        self.config_path.write_text(json.dumps(self.config(), indent=1))
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                if not last:
                    return False  # most likely a port taken meanwhile: try other ports
                raise RuntimeError(f"Orthanc exited with status {self.proc.returncode}; its log "
                                   f"({self.log_path}):\n{self.log_tail()}")
            try:
                if self._http.get(f"{self.base}/system", timeout=1).ok:
                    return True
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop(graceful=False)
                raise RuntimeError(f"Orthanc did not answer GET /system within {timeout:g} s; its log "
                                   f"({self.log_path}):\n{self.log_tail()}")
            time.sleep(0.05)

    # -- addresses -----------------------------------------------------------

    @property
    def base(self) -> str:
        """The REST API root, http://127.0.0.1:<http_port>."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root to give a DICOMweb client (no trailing slash)."""
        return f"{self.base}/dicom-web"

    # -- REST API ------------------------------------------------------------

    def get(self, path: str, **kwargs) -> Any:
        """GET a REST path (``/instances``) and return the decoded JSON; raises on HTTP errors."""
        r = self._http.get(f"{self.base}{path}", timeout=10, **kwargs)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("Content-Type", "") else r.text

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return self.get("/instances")

    def studies(self) -> list[str]:
        """Orthanc ids of every stored study."""
        return self.get("/studies")

    def patients(self) -> list[str]:
        return self.get("/patients")

    def instance_tags(self, orthanc_id: str) -> dict:
        """``simplified-tags`` of an instance: {"PatientID": "…", "SOPInstanceUID": "…", …}."""
        return self.get(f"/instances/{orthanc_id}/simplified-tags")

    def instance_metadata(self, orthanc_id: str) -> dict:
        """Orthanc's metadata of an instance: TransferSyntax, RemoteAET, CalledAET, Origin, …"""
        return self.get(f"/instances/{orthanc_id}/metadata", params={"expand": ""})

    def find_instance(self, sop_instance_uid: str) -> Optional[str]:
        """The Orthanc id of the instance with this SOP Instance UID, or None."""
        r = self._http.post(f"{self.base}/tools/lookup", data=sop_instance_uid, timeout=10)
        r.raise_for_status()
        return next((x["ID"] for x in r.json() if x.get("Type") == "Instance"), None)

    def protect_patients(self) -> None:
        """Protect every stored patient from recycling (with MaximumPatientCount: storage becomes full)."""
        for pid in self.patients():
            self._http.put(f"{self.base}/patients/{pid}/protected", data="1", timeout=10).raise_for_status()

    # -- lifecycle -----------------------------------------------------------

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, graceful: bool = True) -> None:
        """Stop Orthanc. Graceful (SIGTERM) takes ~3 s; ``graceful=False`` kills at once
        (fine for a directory that is thrown away)."""
        if self.proc is not None and self.proc.poll() is None:
            if graceful:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            else:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        self._http.close()

    def restart(self, timeout: float = 30.0, **config: Any) -> None:
        """Start a stopped Orthanc again on the same ports with the same storage and
        ``config`` merged over its settings (its log starts afresh)."""
        self._extra.update(config)
        self._start(timeout, last=True)

    def __enter__(self) -> "Orthanc":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(graceful=False)

    def __repr__(self) -> str:
        return f"Orthanc({self.aet}@127.0.0.1:{self.port}, http {self.http_port}, {self.workdir})"


def dciodvfy_errors(path) -> list[str]:
    """dciodvfy's lines containing "Error" for a file (it writes to stderr); [] when it is valid."""
    _require(DCIODVFY, hint="install the Debian package dicom3tools")
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (r.stdout + r.stderr).splitlines() if "Error" in line]


def dcmtk_storescu(port: int, paths: Iterable, aet: str = "MODALITY", aec: str = "CMR_AI",
                   extra_args: Iterable[str] = (), host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    """Run dcmtk's storescu (``/usr/bin/storescu``): ``-aet aet -aec aec [extra_args] host port paths…``.

    ``aet`` is the calling AE title (the modality), ``aec`` the called one (our node by
    default; pass ``aec=orthanc.aet`` to send to Orthanc). Returns the CompletedProcess
    (text stdout/stderr); check ``returncode`` yourself.
    """
    _require(DCMTK_STORESCU, hint="install the Debian package dcmtk")
    cmd = [DCMTK_STORESCU, "-aet", aet, "-aec", aec, *extra_args, host, str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def stop_process(proc) -> None:
    """SIGTERM a process started with ``start_new_session=True`` (its whole group), wait, SIGKILL
    after 30 s; nothing if it is None or already gone."""
    import os
    import signal

    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
