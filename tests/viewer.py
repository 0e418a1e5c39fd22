"""The real OHIF viewer for the tests: its build served beside a proxy to Orthanc, opened in
headless Chromium.

Plain helpers, no pytest (like ``peers.py``). Facts and the recipe: /work/shared/VIEWERS.md.

* :class:`OhifServer` — a threaded same-origin HTTP server on a free 127.0.0.1 port: the
  built viewer (``var/ohif/dist``, the ``dist/`` of the npm package ``@ohif/app``, fetched
  by ``make viewer``) with ``index.html`` for app routes (``/viewer?…``), our own
  ``/app-config.js`` (one DICOMweb data source at ``/dicom-web``, no confirmation prompts,
  no investigational-use banner, no onboarding tour), and ``/dicom-web`` + ``/wado`` streamed to and from
  Orthanc (status, content type and multipart bodies as they are). One origin, so no CORS.
* :func:`open_study` — Debian's headless Chromium driven by Playwright through
  ``executable_path`` (no browser download, no outside network): opens a study and the
  measurement panel, waits for a text and for the network to settle, returns the page
  text, the page/console errors and a screenshot.

    with OhifServer(orthanc.base) as ohif:
        page = open_study(ohif.url, study_uid, sr_series_uid, tmp_path / "ohif.png",
                          wait_for_text="AI DRAFT")
    assert not page.error_texts and not page.page_errors and "AI DRAFT" in page.text
"""
from __future__ import annotations

import json
import mimetypes
import shutil
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import requests

from peers import PeerMissing

REPO = Path(__file__).resolve().parents[1]
OHIF_DIST = REPO / "var" / "ohif" / "dist"
# The real binaries, not the /usr/bin shell wrappers (Playwright talks to the browser
# over inherited pipes and kills it by pid). Headless shell first: smaller and faster.
CHROMIUM_CANDIDATES = (
    "/usr/lib/chromium/chromium-headless-shell",
    "/usr/bin/chromium-headless-shell",
    "/usr/lib/chromium/chromium",
    "/usr/bin/chromium",
)
# No outside network on the test machines: keep Chromium from trying.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
PROXIED = ("/dicom-web", "/wado")
# Text OHIF shows when a part of it failed (the ErrorBoundary's toast and dialog,
# the viewport's load failure).
ERROR_TEXTS = ("Something went wrong", "Sorry, something went wrong", "Error Boundary",
               "Failed to load", "Unable to load", "An error occurred")
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
          ".css": "text/css", ".json": "application/json", ".svg": "image/svg+xml",
          ".woff2": "font/woff2", ".html": "text/html; charset=utf-8", ".map": "application/json"}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate", "content-encoding", "content-length"}


def app_config(name: str = "orthanc") -> str:
    """``/app-config.js`` for OHIF 3.x: one DICOMweb data source on this origin.

    Options as in the shipped ``dist/app-config.js`` (OHIF 3.13) plus
    ``disableConfirmationPrompts`` (an SR opened in a viewport is loaded into the
    measurement panel without asking), ``investigationalUseDialog: never`` and no
    ``ohif.tours`` (the onboarding tour would cover the viewport).
    """
    source = {
        "friendlyName": "test Orthanc",
        "name": name,
        "qidoSupportsIncludeField": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "supportsReject": False,
        "dicomUploadEnabled": False,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True},
        "omitQuotationForMultipartRequest": True,
    }
    return f"""/** cmr-ai test configuration (tests/viewer.py), replaces the shipped app-config.js */
const origin = window.location.origin;
window.config = {{
  routerBasename: null,
  extensions: [],
  modes: [],
  // no onboarding tour over the viewport
  customizationService: {{ 'ohif.tours': {{ $set: [] }} }},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  disableConfirmationPrompts: true,
  investigationalUseDialog: {{ option: 'never' }},
  showErrorDetails: 'always',
  defaultDataSourceName: '{name}',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: '{name}',
      configuration: Object.assign({json.dumps(source)}, {{
        qidoRoot: origin + '/dicom-web',
        wadoRoot: origin + '/dicom-web',
        wadoUriRoot: origin + '/wado',
      }}),
    }},
  ],
}};
"""


def _handler(dist: Path, upstream: str, config_js: bytes):
    local = threading.local()  # one HTTP session per server thread

    def http() -> requests.Session:
        if not hasattr(local, "session"):
            local.session = requests.Session()
            local.session.trust_env = False  # 127.0.0.1 only, never through a proxy from the environment
        return local.session

    dist = dist.resolve()
    index = dist / "index.html"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "cmr-ai-ohif-test"

        def log_message(self, fmt, *args):  # noqa: D401 — quiet; failures surface as page errors
            pass

        # -- dispatch ----------------------------------------------------------

        def do_GET(self):
            self._dispatch()

        def do_HEAD(self):
            self._dispatch()

        def do_POST(self):
            self._dispatch()

        def _dispatch(self):
            path = urlsplit(self.path).path
            try:
                if any(path == p or path.startswith(p + "/") for p in PROXIED):
                    self._proxy()
                elif path == "/app-config.js":
                    self._send(200, "text/javascript", config_js)
                else:
                    self._static(path)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser went away (navigation, page closed)

        # -- answers -------------------------------------------------------------

        def _send(self, status: int, ctype: str, body: bytes, extra: Optional[dict] = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _static(self, path: str):
            target = (dist / path.lstrip("/")).resolve()
            if not target.is_relative_to(dist):
                return self._send(404, "text/plain", b"outside the viewer build")
            if not target.is_file():
                if "." in target.name:  # a missing asset: say so instead of handing out index.html
                    return self._send(404, "text/plain", f"{path} not in {dist}".encode())
                target = index  # an app route: /viewer, /, /segmentation …
            ctype = _TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            self._send(200, ctype, target.read_bytes(), {"Cache-Control": "no-cache"})

        def _proxy(self):
            body = None
            if self.command == "POST":
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            # Orthanc's DICOMweb builds BulkDataURIs from Host / Forwarded: keep them
            # pointing at this origin. No Accept-Encoding: bodies pass through unchanged.
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() in ("accept", "range", "content-type", "if-none-match")}
            headers["Host"] = self.headers.get("Host", "")
            headers["Forwarded"] = f"host={self.headers.get('Host', '')};proto=http"
            headers["Accept-Encoding"] = "identity"
            try:
                r = http().request(self.command, upstream + self.path, headers=headers, data=body,
                                 stream=True, timeout=120, allow_redirects=False)
            except requests.RequestException as e:
                return self._send(502, "text/plain", f"proxy to {upstream}: {e}".encode())
            with r:
                has_body = self.command != "HEAD" and r.status_code not in (204, 304)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in _HOP_BY_HOP:
                        self.send_header(k, v)
                if has_body:
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if has_body:
                    for chunk in r.raw.stream(64 * 1024, decode_content=False):
                        if chunk:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")

    return Handler


class OhifServer:
    """OHIF's build and a proxy to Orthanc on one free 127.0.0.1 port (a daemon thread).

    Parameters
    ----------
    upstream:
        Orthanc's HTTP root (``orthanc.base``, ``http://127.0.0.1:<port>``); ``/dicom-web/…``
        and ``/wado…`` are forwarded there unchanged.
    dist:
        The viewer build; default ``var/ohif/dist``.

    Raises
    ------
    PeerMissing
        When the build is not there (``make viewer`` fetches it).
    """

    def __init__(self, upstream: str, dist: Path = OHIF_DIST):
        if not (dist / "index.html").is_file():
            raise PeerMissing(f"the OHIF viewer build {dist}/index.html is missing: run `make viewer` "
                              "(or `make test`), which fetches the npm package @ohif/app")
        self.upstream = upstream.rstrip("/")
        self._server = ThreadingHTTPServer(("127.0.0.1", 0),
                                           _handler(dist, self.upstream, app_config().encode()))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "OhifServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# the browser

def chromium_path() -> str:
    """Debian's Chromium (headless shell preferred).

    Raises
    ------
    PeerMissing
        When neither ``chromium-headless-shell`` nor ``chromium`` is installed.
    """
    for p in CHROMIUM_CANDIDATES:
        if Path(p).is_file():
            return p
    found = shutil.which("chromium-headless-shell") or shutil.which("chromium")
    if found:
        return found
    raise PeerMissing("Chromium missing (looked for " + ", ".join(CHROMIUM_CANDIDATES) + "): install the "
                      "Debian package chromium-headless-shell (or chromium); `make viewer` does it as root")


@dataclass
class ViewerPage:
    """What the viewer showed: the page's visible text, its errors and the screenshot."""

    url: str
    text: str
    screenshot: Path
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def error_texts(self) -> list[str]:
        """The :data:`ERROR_TEXTS` the page shows."""
        low = self.text.lower()
        return [t for t in ERROR_TEXTS if t.lower() in low]


def open_study(base_url: str, study_uid: str, series_uid: Optional[str], screenshot: Path, *,
               panel: Optional[str] = "trackedMeasurements", wait_for_text: Optional[str] = None,
               timeout: float = 90.0, viewport: tuple[int, int] = (1440, 900)) -> ViewerPage:
    """Open ``/viewer?StudyInstanceUIDs=…&initialSeriesInstanceUID=…`` in headless Chromium.

    Opens the right-hand ``panel`` (its ``data-cy="<panel>-btn"`` tab; OHIF's measurement
    panel by default), waits for ``wait_for_text`` when given (OHIF loads an SR into the
    panel after its images) and for the network to settle, keeps a screenshot and returns
    what the page showed with every page error, console error and failed request on the
    way. A wait that runs out is recorded in ``console_errors``; the caller's assertions
    on the text say what is missing.

    Raises
    ------
    PeerMissing
        When Chromium or Python Playwright is not installed.
    """
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise PeerMissing("Python Playwright missing: it is in the dev extra (`make venv` / `make test` "
                          "install it); the browser is Debian's, never downloaded") from None
    executable = chromium_path()
    url = f"{base_url}/viewer?StudyInstanceUIDs={study_uid}"
    if series_uid:
        url += f"&initialSeriesInstanceUID={series_uid}"
    t0 = time.monotonic()
    deadline = t0 + timeout

    def left_ms() -> float:
        return max(deadline - time.monotonic(), 1.0) * 1000

    page_errors: list[str] = []
    console_errors: list[str] = []
    failed: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS),
                                     headless=True, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.on("pageerror", lambda e: page_errors.append(f"{e.name}: {e.message}\n{e.stack or ''}"))
            page.on("console", lambda m: m.type == "error" and console_errors.append(
                f"{m.text} ({m.location.get('url', '')}:{m.location.get('lineNumber', '')})"))
            page.on("requestfailed", lambda r: failed.append(f"{r.method} {r.url}: {r.failure}"))
            page.on("response", lambda r: r.status >= 400 and failed.append(
                f"{r.request.method} {r.url}: HTTP {r.status}"))
            page.goto(url, wait_until="load", timeout=left_ms())
            step = "the panel tab"
            try:
                if panel:
                    page.locator(f'[data-cy="{panel}-btn"]').click(timeout=left_ms())
                if wait_for_text:
                    step = repr(wait_for_text)
                    page.get_by_text(wait_for_text, exact=False).first.wait_for(state="visible",
                                                                               timeout=left_ms())
                step = "the network to settle"
                page.wait_for_load_state("networkidle", timeout=left_ms())
            except PlaywrightError as e:
                console_errors.append(f"(test) waited in vain for {step}: {e.message.splitlines()[0]}")
            page.wait_for_timeout(1000)  # the last render
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            # rendering is on the CPU (SwiftShader): a frame can take long on a busy machine
            page.screenshot(path=str(screenshot), timeout=max(left_ms(), 60_000), animations="disabled")
            text = page.evaluate("() => document.body.innerText")
        finally:
            browser.close()
    return ViewerPage(url=url, text=text, screenshot=screenshot, page_errors=page_errors,
                      console_errors=console_errors, failed_requests=failed,
                      seconds=time.monotonic() - t0)
