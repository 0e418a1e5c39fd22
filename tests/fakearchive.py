"""A fake DICOMweb archive that fails in controlled ways (``tests/test_dicomweb_pull.py``).

Speaks just enough QIDO-RS (studies, instances of a study with limit/offset) and
WADO-RS (a whole study, one instance) over HTTP/1.0: every answer ends by closing the
connection, with no Content-Length on multipart bodies, so a cut-short answer looks
like a clean end of stream to the client (the hardest case to notice).

    with FakeArchive(files) as fake:                 # files: PS3.10 paths of one or more studies
        fake.errors["studies"] = [(503, "busy")] * 3  # the next 3 study queries fail
        fake.cut_after = 3                            # a whole-study answer stops after 3 parts
        fake.delay = 5                                # every answer waits 5 s first
        fake.plain = True                             # one-instance answers: bare application/dicom
        ... fake.url ...; fake.requests lists the paths asked for
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, urlparse

import pydicom


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):  # a client that gave up (timeout): expected
        pass


class FakeArchive:
    def __init__(self, files: list[Path]):
        self.instances: list[dict] = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            self.instances.append({"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID,
                                   "sop": ds.SOPInstanceUID, "class": ds.SOPClassUID,
                                   "date": str(ds.get("StudyDate", "")), "data": Path(f).read_bytes()})
        #: kind ("studies", "instances", "study", "instance") -> queue of (status, body) to answer first
        self.errors: dict[str, list[tuple[int, str]]] = {}
        self.cut_after: Optional[int] = None  # whole-study answers: close after this many parts
        self.delay: float = 0.0  # seconds to wait before answering
        self.plain = False  # one-instance answers as a bare application/dicom body (not multipart)
        self.requests: list[str] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake._handle(self)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def __enter__(self) -> "FakeArchive":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------

    def _json(self, h: BaseHTTPRequestHandler, doc) -> None:
        body = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/dicom+json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, status: int, text: str) -> None:
        body = text.encode()
        h.send_response(status)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _multipart(self, h: BaseHTTPRequestHandler, items: list[dict], cut: Optional[int]) -> None:
        boundary = uuid.uuid4().hex
        h.send_response(200)
        h.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        h.end_headers()
        for n, item in enumerate(items):
            part = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + item["data"] + b"\r\n")
            if cut is not None and n == cut:
                h.wfile.write(part[:len(part) // 2])  # half a part, then the connection closes
                h.wfile.flush()
                return
            h.wfile.write(part)
        h.wfile.write(f"--{boundary}--\r\n".encode())

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p][1:]  # after "dicom-web"
        with self._lock:
            self.requests.append(h.path)
        kind = {1: "studies", 2: "study", 3: "instances", 6: "instance"}.get(len(parts), "?")
        if self.delay:
            time.sleep(self.delay)
        queue = self.errors.get(kind)
        if queue:
            status, text = queue.pop(0)
            return self._error(h, status, text)
        if kind == "studies":
            studies: dict[str, dict] = {}
            for i in self.instances:
                st = studies.setdefault(i["study"], {"0020000D": {"vr": "UI", "Value": [i["study"]]},
                                                     "00080020": {"vr": "DA", "Value": [i["date"]]},
                                                     "00201208": {"vr": "IS", "Value": [0]}})
                st["00201208"]["Value"][0] += 1
            out = list(studies.values())
            lo = q.get("StudyDate", "")
            if lo.endswith("-"):
                out = [s for s in out if s["00080020"]["Value"][0] >= lo[:-1]]
            return self._json(h, out[:int(q.get("limit", 1000))])
        if kind == "instances":
            items = [i for i in self.instances if i["study"] == parts[1]]
            off, lim = int(q.get("offset", 0)), int(q.get("limit", 1000))
            return self._json(h, [{"0020000D": {"vr": "UI", "Value": [i["study"]]},
                                   "0020000E": {"vr": "UI", "Value": [i["series"]]},
                                   "00080018": {"vr": "UI", "Value": [i["sop"]]},
                                   "00080016": {"vr": "UI", "Value": [i["class"]]}} for i in items[off:off + lim]])
        if kind == "study":
            items = [i for i in self.instances if i["study"] == parts[1]]
            if not items:
                return self._error(h, 404, f"no study {parts[1]}")
            return self._multipart(h, items, self.cut_after)
        if kind == "instance":
            items = [i for i in self.instances if i["sop"] == parts[5]]
            if not items:
                return self._error(h, 404, f"no instance {parts[5]}")
            if self.plain:
                h.send_response(200)
                h.send_header("Content-Type", "application/dicom")
                h.send_header("Content-Length", str(len(items[0]["data"])))
                h.end_headers()
                h.wfile.write(items[0]["data"])
                return
            return self._multipart(h, items, None)
        return self._error(h, 400, f"not understood: {h.path}")
