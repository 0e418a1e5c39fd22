"""Real DICOM peers for the tests: Orthanc (PACS, with DICOMweb), dcmtk, dciodvfy."""
from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """A real Orthanc on free ports, in a temp directory, with the DICOMweb plugin."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC"):
        for f in (ORTHANC, DICOMWEB_PLUGIN):
            if not Path(f).exists():
                raise RuntimeError(f"{f} is missing: install the Debian packages orthanc and orthanc-dicomweb "
                                   "(`make test` does it when run as root)")
        self.workdir, self.aet = Path(workdir), aet
        self.port, self.http_port = free_port(), free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "cmr-ai-test", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"), "DicomAet": aet, "DicomPort": self.port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "UnknownSopClassAccepted": True, "StableAge": 1,
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpTimeout": 60, "DicomScpTimeout": 30,
        }
        (self.workdir / "orthanc.json").write_text(json.dumps(cfg))
        self.log_path = self.workdir / "orthanc.log"
        self._log = open(self.log_path, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen([ORTHANC, str(self.workdir / "orthanc.json")], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.base}/system", timeout=1).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - t0 > 30:
                raise RuntimeError(f"Orthanc did not start in 30 s:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        self.start_seconds = time.monotonic() - t0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base}/dicom-web"

    def instances(self) -> list[str]:
        return requests.get(f"{self.base}/instances", timeout=10).json()

    def studies(self) -> list[str]:
        return requests.get(f"{self.base}/studies", timeout=10).json()

    def instance_tags(self, orthanc_id: str) -> dict:
        return requests.get(f"{self.base}/instances/{orthanc_id}/simplified-tags", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def dciodvfy_errors(path) -> list[str]:
    """dciodvfy's error lines for a file (it writes to stderr)."""
    r = subprocess.run(["/usr/bin/dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (r.stdout + r.stderr).splitlines() if "Error" in line]


def dcmtk_storescu(port: int, paths, aet: str = "MODALITY", aec: str = "CMR_AI", extra_args=()):
    cmd = ["/usr/bin/storescu", "-aet", aet, "-aec", aec, *extra_args, "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)
