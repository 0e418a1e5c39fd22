"""How fast does ``cmr-ai serve`` take in a study over C-STORE, next to Orthanc and a bare SCP?

Run it from the repository root::

    .venv/bin/python bench/ingest_bench.py                   # 300 images, 1 and 4 senders
    .venv/bin/python bench/ingest_bench.py --repeat 3 --senders 8
    .venv/bin/python bench/ingest_bench.py --profile         # + one cmr-ai run under cProfile
    .venv/bin/python bench/ingest_bench.py --workdir /data/bench --keep   # other disk; keep (and reuse) it

It writes the reference study of issue 8 — one short-axis cine series of ``--instances``
single-frame MR images (256 × 256, 16-bit, Explicit VR Little Endian), cut from a
``siemens`` phantom (:func:`plugin.phantom.write_study`) — and sends it with dcmtk's
``/usr/bin/storescu -R +sd +r +sp '*.dcm'`` (with ``TCP_NODELAY=1``: Nagle's algorithm
off, so the sender is never what waits) to four receivers, each started afresh (own
empty storage, free port) for every send:

(a) orthanc     Orthanc (``/usr/sbin/Orthanc``, the Debian package) as ``tests/peers.py``
                starts it — SQLite index, files in its storage area, ``SyncStorageArea``
                (fsync) on — with ``TCP_NODELAY=1`` in its environment, so its DCMTK
                turns Nagle's algorithm off, as Orthanc's own static builds and Docker
                images are compiled to (see :class:`OrthancReceiver`);
(b) orthanc     the same without it: the Debian package's DCMTK leaves Nagle on, and
    Nagle on    with one association every C-STORE response then waits ~40 ms for the
                sender's delayed ACK;
(c) bare SCP    a pynetdicom SCP in its own process whose C-STORE handler writes
                ``event.encoded_dataset()`` to a temp file, fsyncs it, renames it and
                fsyncs the directory — the same durable write as
                :func:`plugin.storage.write_atomic`, and nothing else: the floor for a
                Python receiver;
(d) cmr-ai      ``cmr-ai serve`` with the embedded broker (its Celery worker runs, idle)
                and one rule, ``ignore`` with ``stable_after: 3600``, so nothing is routed
                or analysed during the run: only the store, fsync and SQLite index path.

first with one association (one storescu), then with ``--senders`` storescu processes at
once, each sending its own slice of the files. The time runs from the start of the
first storescu to the exit of the last; every instance must have arrived (Orthanc:
``/statistics`` CountInstances, bare SCP: files, cmr-ai: rows of its ``instances``
table), else the run is marked and the exit status is 1. Targets take turns within a
round, ``--repeat`` rounds, the best run is reported: instances/s, MB/s, the ratios
(``cmr-ai vs orthanc: 0.8x`` = cmr-ai's instances/s ÷ Orthanc's; above 1 cmr-ai is
faster) and each receiver's peak resident memory (``VmHWM``, "peak MB"; for cmr-ai the
node process only — its embedded worker is a separate process, reported on its own
line). Before each run ``os.sync()`` writes back the page cache, so no receiver's fsync
pays for files written before it started.

``--profile`` adds one more cmr-ai run (one sender) under cProfile. ``python -m
cProfile`` would only see the main thread, which merely waits for a signal: the
C-STORE work runs in pynetdicom's threads. So the node is started through this script
(``--profiled-serve``), which gives every thread its own ``cProfile.Profile``, stops the
node with SIGTERM (it shuts down cleanly) and merges the profiles; the top 25 entries
by cumulative time of the association and DUL threads (where the receiving happens)
are printed, and the top 15 by own time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # peers.py: the Orthanc the tests use

from plugin.progress import add_arguments as add_progress_arguments  # noqa: E402
from plugin.progress import enabled as progress_enabled  # noqa: E402
from plugin.progress import rich_progress  # noqa: E402

STORESCU = "/usr/bin/storescu"  # dcmtk's; the venv's pynetdicom `storescu` shadows it on PATH
PHASES = 25  # cine phases per slice of the generated short-axis stack
SIZE = 256
SEED = 8
TARGETS = ("orthanc", "orthanc nagle", "bare SCP", "cmr-ai")
LABELS = {"orthanc": "orthanc", "orthanc nagle": "orthanc with Nagle on", "bare SCP": "bare pynetdicom SCP",
          "cmr-ai": "cmr-ai serve"}
PEERS = ("orthanc", "orthanc nagle", "bare SCP")
RECEIVE_THREADS = ("Association", "DULServiceProvider")  # pynetdicom's threads that do the receiving


# --------------------------------------------------------------------------- /proc (Linux only, as dcmtk + Orthanc)


def proc_status_kb(pid: int, key: str) -> Optional[int]:
    """A ``kB`` value of /proc/PID/status (``VmHWM``: peak RSS, ``VmRSS``: now); None when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _stat(pid: int) -> Optional[list[str]]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # fields from (3) state on; the name may hold spaces


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, their children …), from /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st:
                parents.setdefault(int(st[1]), []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    ticks = 0
    for pid in pids:
        st = _stat(pid)
        if st:
            ticks += int(st[11]) + int(st[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def settle(pid: int, timeout: float = 120.0, window: float = 0.5, idle: float = 0.1) -> float:
    """Wait until ``pid`` and its descendants use < ``idle`` of a CPU over ``window`` s
    (a starting worker must not compete with the send); returns the seconds waited."""
    t0 = time.monotonic()
    last = cpu_seconds([pid, *descendants(pid)])
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = cpu_seconds([pid, *descendants(pid)])
        if now - last < idle * window:
            break
        last = now
    return time.monotonic() - t0


def fs_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (fsync costs depend on it)."""
    best, kind = "", "?"
    path = path.resolve()
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mnt = parts[1].replace("\\040", " ")
        if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, kind = mnt, parts[2]
    return kind


def wait_port(port: int, proc: subprocess.Popen, what: str, log: Optional[Path], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {port}:\n{tail}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g} s")


# --------------------------------------------------------------------------- the study


def make_study(folder: Path, n: int) -> list[Path]:
    """``n`` single-frame MR images (256 × 256, 16-bit) of one short-axis cine series, in ``folder``.

    Reused when ``folder`` already holds the same study (``bench.json``).
    """
    import pydicom

    from plugin import phantom

    marker = folder / "bench.json"
    wanted = {"instances": n, "phases": PHASES, "size": SIZE, "seed": SEED, "style": "siemens"}
    files = folder / "study"
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return sorted(files.glob("*.dcm"))
    shutil.rmtree(folder, ignore_errors=True)
    phases = min(PHASES, n)
    raw = folder / "phantom"
    truth = phantom.write_study(raw, style="siemens", seed=SEED, slices=math.ceil(n / phases), phases=phases,
                                size=SIZE)
    sax = None
    for series_dir in sorted(p for p in raw.iterdir() if p.is_dir()):
        first = next(iter(sorted(series_dir.glob("*.dcm"))), None)
        if first and pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID == truth.series["SAX"]:
            sax = series_dir
    if sax is None:
        raise RuntimeError(f"no short-axis series (SeriesInstanceUID {truth.series['SAX']}) in {raw}")
    files.mkdir(parents=True)
    for p in sorted(sax.glob("*.dcm"))[:n]:
        p.rename(files / p.name)
    shutil.rmtree(raw)
    paths = sorted(files.glob("*.dcm"))
    ds = pydicom.dcmread(paths[0])
    if len(paths) != n or (ds.Rows, ds.Columns, ds.BitsAllocated) != (SIZE, SIZE, 16) \
            or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise RuntimeError(f"unexpected study: {len(paths)} files, {ds.Rows}x{ds.Columns}, "
                           f"{ds.BitsAllocated} bits allocated")
    marker.write_text(json.dumps(wanted))
    return paths


def split(paths: list[Path], parts: int, folder: Path) -> list[Path]:
    """The files in ``parts`` contiguous slices, each in its own folder (hard links)."""
    shutil.rmtree(folder, ignore_errors=True)
    size = math.ceil(len(paths) / parts)
    out = []
    for k in range(parts):
        d = folder / f"sender{k + 1}"
        d.mkdir(parents=True)
        for p in paths[k * size:(k + 1) * size]:
            try:
                os.link(p, d / p.name)
            except OSError:
                shutil.copy2(p, d / p.name)
        out.append(d)
    return out


# --------------------------------------------------------------------------- receivers


class Receiver:
    """One receiver, started empty; ``count()`` what arrived, ``peak_rss_kb()``, ``stop()``."""

    name: str
    aet: str
    port: int
    pid: int
    version: str = ""
    data: list[Path]  # what it stored (removed after the run unless --keep)

    def count(self) -> int:
        raise NotImplementedError

    def peak_rss_kb(self) -> Optional[int]:
        return proc_status_kb(self.pid, "VmHWM")

    def stop(self) -> None:
        raise NotImplementedError


class OrthancReceiver(Receiver):
    """Orthanc as ``tests/peers.py`` starts it; ``nodelay``: with ``TCP_NODELAY=1`` in its environment.

    The Debian package links the system DCMTK, which since 3.6.2 leaves Nagle's
    algorithm on unless the environment says ``TCP_NODELAY=1``. Orthanc writes a
    C-STORE response in two ``write`` calls (PDU header, then the rest), so with Nagle
    on the second waits for the sender's delayed ACK (~40 ms on Linux) and one
    association is latency-bound: measured here, 300 images, one association, ~20
    instances/s with Nagle on, ~200 with it off. Orthanc's own static builds (and
    Docker images) are compiled with ``DISABLE_NAGLE_ALGORITHM`` (Orthanc changeset
    4b1017928fc4, 2019: "Fix performance issue in DICOM protocol by disabling Nagle's
    algorithm"); ``nodelay`` (the default) stands for those.
    """

    name, aet = "orthanc", "ORTHANC"

    def __init__(self, workdir: Path, nodelay: bool = True):
        from peers import Orthanc

        saved = os.environ.get("TCP_NODELAY")
        # peers.Orthanc starts Orthanc with this process's environment
        if nodelay:
            os.environ["TCP_NODELAY"] = "1"
        else:
            self.name = "orthanc nagle"
            os.environ.pop("TCP_NODELAY", None)
        try:
            self.orthanc = Orthanc(workdir, aet=self.aet)
        finally:
            if saved is None:
                os.environ.pop("TCP_NODELAY", None)
            else:
                os.environ["TCP_NODELAY"] = saved
        self.port, self.pid = self.orthanc.port, self.orthanc.proc.pid
        self.version = f"Orthanc {self.orthanc.get('/system').get('Version', '?')}"
        self.data = [workdir / "db"]

    def count(self) -> int:
        return int(self.orthanc.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        self.orthanc.stop(graceful=False)  # its directory is thrown away


class BareReceiver(Receiver):
    name, aet = "bare SCP", "BARE_SCP"

    def __init__(self, workdir: Path):
        from peers import free_port

        self.dir = workdir / "store"
        self.dir.mkdir(parents=True)
        self.data = [self.dir]
        self.log = workdir / "bare-scp.log"
        self.port = free_port()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--bare-scp",
                                          str(self.port), str(self.dir)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        wait_port(self.port, self.proc, "the bare pynetdicom SCP", self.log)

    def count(self) -> int:
        return sum(1 for _ in self.dir.glob("*.dcm"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class CmrAiReceiver(Receiver):
    name, aet = "cmr-ai", "CMR_AI"

    def __init__(self, workdir: Path, profile_out: Optional[Path] = None):
        from peers import free_port

        self.port = free_port()
        var = workdir / "var"
        self.db = var / "cmr-ai.db"
        self.data = [var]
        self.config = workdir / "config.yaml"
        self.config.write_text(f"""\
node: {{ae_title: {self.aet}, host: 127.0.0.1, port: {self.port}}}
storage: {{path: "{var / 'dicom'}"}}
database: {{url: "sqlite:///{self.db}"}}
queue: {{broker: embedded}}
rules:
  - {{name: all, match: {{}}, action: ignore, stable_after: 3600}}
""")
        self.log = workdir / "node.log"
        self.profile_out = profile_out
        if profile_out is None:
            cmd = [sys.executable, "-m", "plugin.cli", "serve", "--config", str(self.config)]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--profiled-serve", str(profile_out),
                   str(self.config)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"))
        self.pid = self.proc.pid
        try:
            wait_port(self.port, self.proc, "cmr-ai serve", self.log)
            self.settled_s = settle(self.pid)  # the embedded worker starts (imports) in the meantime
        except BaseException:
            self.stop()
            raise
        self.start_rss_kb = proc_status_kb(self.pid, "VmRSS")
        self.children_peak_kb: Optional[int] = None

    def count(self) -> int:
        import sqlite3

        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return int(con.execute("SELECT count(*) FROM instances").fetchone()[0])
        finally:
            con.close()

    def peak_rss_kb(self) -> Optional[int]:
        kids = [proc_status_kb(p, "VmHWM") for p in descendants(self.pid)]
        self.children_peak_kb = sum(k for k in kids if k) if kids else None
        return proc_status_kb(self.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the node stops its worker and exits (profile written)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of its process group
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()


def start(name: str, workdir: Path, profile_out: Optional[Path] = None) -> Receiver:
    workdir.mkdir(parents=True, exist_ok=True)
    if name in ("orthanc", "orthanc nagle"):
        return OrthancReceiver(workdir, nodelay=name == "orthanc")
    if name == "bare SCP":
        return BareReceiver(workdir)
    return CmrAiReceiver(workdir, profile_out)


# --------------------------------------------------------------------------- one send


@dataclass
class Run:
    target: str
    senders: int
    seconds: float
    expected: int
    received: int
    nbytes: int
    peak_rss_kb: Optional[int]
    storescu_failed: list[str] = field(default_factory=list)
    children_peak_kb: Optional[int] = None
    start_rss_kb: Optional[int] = None
    version: str = ""

    @property
    def lost(self) -> int:
        return self.expected - self.received

    @property
    def per_s(self) -> float:
        return self.received / self.seconds

    @property
    def mb_s(self) -> float:
        return self.nbytes / 1e6 / self.seconds


def send(receiver: Receiver, folders: list[Path], logdir: Path) -> tuple[float, list[str]]:
    """storescu per folder, all at once; seconds from the first start to the last exit, failures.

    storescu runs with ``TCP_NODELAY=1`` (its DCMTK then turns Nagle's algorithm off): with
    Nagle on, Orthanc waits for the sender's delayed ACKs too (~60 % slower here), while
    the pynetdicom receivers do not care.
    """
    procs = []
    logdir.mkdir(parents=True, exist_ok=True)
    logs = [open(logdir / f"storescu-{k + 1}.log", "w") for k in range(len(folders))]
    t0 = time.perf_counter()
    for k, d in enumerate(folders):
        procs.append(subprocess.Popen([STORESCU, "-aet", f"BENCH{k + 1}", "-aec", receiver.aet, "+sd", "+r",
                                       "+sp", "*.dcm", "-R", "127.0.0.1", str(receiver.port), str(d)],
                                      stdout=logs[k], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=dict(os.environ, TCP_NODELAY="1")))  # dcmtk: Nagle off
    for p in procs:
        try:
            p.wait(timeout=900)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    seconds = time.perf_counter() - t0
    failed = []
    for k, (p, f) in enumerate(zip(procs, logs)):
        f.close()
        if p.returncode != 0:
            failed.append(f"storescu {k + 1} exited {p.returncode}: "
                          f"{(logdir / f'storescu-{k + 1}.log').read_text(errors='replace')[-500:]}")
    return seconds, failed


def one_run(target: str, folders: list[Path], n: int, nbytes: int, workdir: Path, *, keep: bool = False,
            profile_out: Optional[Path] = None) -> Run:
    """Start ``target`` empty, send ``folders`` at once, count what arrived, stop it.

    The page cache is written back first (``os.sync``): on ext4 a receiver's first fsync
    would otherwise also flush what was written before it (the study, the last run).
    """
    os.sync()
    rx = start(target, workdir, profile_out)
    try:
        seconds, failed = send(rx, folders, workdir / "storescu")
        received = rx.count()
        peak = rx.peak_rss_kb()
        run = Run(target, len(folders), seconds, n, received, nbytes, peak, failed, version=rx.version)
        if isinstance(rx, CmrAiReceiver):
            run.children_peak_kb, run.start_rss_kb = rx.children_peak_kb, rx.start_rss_kb
    finally:
        rx.stop()
        if not keep:
            for d in rx.data:
                shutil.rmtree(d, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- the bare SCP (subprocess)


def bare_scp(port: int, folder: Path) -> int:
    """A pynetdicom C-STORE SCP that writes what it receives durably, and nothing else."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.presentation import StoragePresentationContexts
    from pynetdicom.sop_class import Verification

    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)

    def handle_store(event) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
            uid = str(event.request.AffectedSOPInstanceUID).strip("\x00 ")
            fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / f"{uid}.dcm")
            os.fsync(dir_fd)
            return 0x0000
        except Exception as e:  # a handler never raises
            print(f"C-STORE failed (0xA700): {type(e).__name__}: {e}", flush=True)
            return 0xA700

    ae = AE(ae_title="BARE_SCP")
    ae.maximum_pdu_size = 262144  # as cmr-ai's node.max_pdu default (plugin/dimse/guard.py DEFAULT_MAX_PDU)
    ae.require_called_aet = False
    ae.add_supported_context(Verification)
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    return 0


# --------------------------------------------------------------------------- cmr-ai serve under cProfile (subprocess)


def profiled_serve(out: Path, config: Path) -> int:
    """``cmr-ai serve --config CONFIG`` with a cProfile.Profile in every thread, merged into ``out``.

    Writes ``out`` (the association and DUL threads: the receiving) and ``out`` with
    ``-all`` before the suffix (every thread, the main one included). From Python 3.12
    cProfile runs on ``sys.monitoring``, which allows one profiler per process and sees
    every thread: there the one main-thread profiler is written to both files.
    """
    import cProfile
    import threading

    profiles: list[tuple[threading.Thread, cProfile.Profile]] = []
    boot = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def profiled_boot(self) -> None:
        prof = cProfile.Profile()
        profiles.append((self, prof))
        prof.enable()
        try:
            boot(self)
        finally:
            prof.disable()

    per_thread = sys.version_info < (3, 12)
    if per_thread:
        threading.Thread._bootstrap_inner = profiled_boot  # type: ignore[attr-defined]
    from plugin import cli

    main_prof = cProfile.Profile()
    main_prof.enable()
    try:
        rc = cli.main(["serve", "--config", str(config)])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    finally:
        main_prof.disable()
    everything = pstats.Stats(main_prof)
    receive: Optional[pstats.Stats] = None
    still_running = 0
    for thread, prof in profiles:
        if thread.is_alive():  # its profiler is still enabled there: leave it out
            still_running += 1
            continue
        everything.add(prof)
        if type(thread).__name__ in RECEIVE_THREADS:
            receive = pstats.Stats(prof) if receive is None else receive.add(prof)
    everything.dump_stats(str(out.with_name(out.stem + "-all" + out.suffix)))
    if not per_thread:
        receive = everything
    if receive is not None:
        receive.dump_stats(str(out))
    print(f"profiled-serve: {len(profiles)} threads profiled ({still_running} still running, left out)", flush=True)
    return int(rc or 0)


# --------------------------------------------------------------------------- report


def best_runs(runs: list[Run]) -> dict[tuple[str, int], Run]:
    best: dict[tuple[str, int], Run] = {}
    for r in runs:
        k = (r.target, r.senders)
        if r.lost == 0 and (k not in best or best[k].lost or r.seconds < best[k].seconds):
            best[k] = r
        elif k not in best:
            best[k] = r
    return best


def mb(kb: Optional[int]) -> str:
    return "?" if kb is None else f"{kb / 1024:.0f}"


def _func(func: tuple) -> str:
    """pstats' name of a function, with the site-packages, stdlib and repository prefixes cut."""
    import sysconfig

    text = pstats.func_std_string(func)
    for prefix in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"], str(ROOT)):
        text = text.replace(prefix.rstrip("/") + "/", "")
    return text


def print_profile(console, path: Path, wall: float) -> None:
    st = pstats.Stats(str(path))
    console.print(f"\n[bold]cProfile of cmr-ai serve, association + DUL threads[/bold] ({path.name}; "
                  f"the send took {wall:.2f} s under the profiler; times are wall-clock per thread, "
                  "summed over threads):")
    for key, n in (("cumulative", 25), ("tottime", 15)):
        st.sort_stats(key)
        console.print(f"top {n} by {key}:")
        console.print(f"  {'ncalls':>9} {'tottime':>8} {'cumtime':>8}  function", highlight=False)
        for func in st.fcn_list[:n]:  # type: ignore[attr-defined]
            cc, nc, tt, ct, _callers = st.stats[func]  # type: ignore[attr-defined]
            calls = f"{nc}/{cc}" if nc != cc else str(nc)
            console.print(f"  {calls:>9} {tt:8.3f} {ct:8.3f}  {_func(func)}",
                          highlight=False, markup=False)


def report(console, runs: list[Run], paths: list[Path], nbytes: int, modes: list[int], repeat: int,
           workdir: Path, storescu: str) -> int:
    """Print the table, the ratio lines and the memory line; 1 when a receiver lost instances."""
    from rich.table import Table

    import pynetdicom

    best = best_runs(runs)
    n = len(paths)
    orthanc = next((r.version for r in runs if r.version), "Orthanc ?")
    console.print(f"study: {n} single-frame MR images {SIZE}x{SIZE} 16-bit (one SAX cine series, Explicit VR "
                  f"Little Endian), {nbytes / 1e6:.1f} MB; sent by dcmtk storescu -R ({storescu}), "
                  + ", then ".join("1 association" if s == 1 else f"{s} at once" for s in modes))
    console.print(f"{orthanc}, pynetdicom {pynetdicom.__version__}, Python "
                  f"{platform.python_version()}; storage on {fs_type(workdir)} ({workdir}), {os.cpu_count()} CPUs; "
                  f"best of {repeat}, each run on a freshly started, empty receiver")
    table = Table(show_edge=False)
    for col in ("receiver", "senders", "seconds", "inst/s", "MB/s", "received", "peak MB"):
        table.add_column(col, justify="left" if col == "receiver" else "right", no_wrap=True)
    for s in modes:
        for t in TARGETS:
            r = best[(t, s)]
            got = f"{r.received}/{r.expected}" + (" LOST" if r.lost else "")
            table.add_row(LABELS[t], str(s), f"{r.seconds:.2f}", f"{r.per_s:.0f}", f"{r.mb_s:.1f}", got,
                          mb(r.peak_rss_kb))
    console.print(table)
    for s in modes:
        me = best[("cmr-ai", s)]
        what = "1 sender" if s == 1 else f"{s} senders"
        for t in PEERS:
            peer = best[(t, s)]
            console.print(f"cmr-ai vs {LABELS[t]}: {me.per_s / peer.per_s:.2f}x instances/s, {what} "
                          f"(cmr-ai {me.per_s:.0f}/s {me.mb_s:.1f} MB/s, {t} {peer.per_s:.0f}/s {peer.mb_s:.1f} MB/s)",
                          highlight=False)
    console.print("(orthanc: the Debian package started with TCP_NODELAY=1, Nagle's algorithm off as in "
                  "Orthanc's own builds; with Nagle on, as the package starts by default, each C-STORE response "
                  "waits ~40 ms for a delayed ACK. storescu runs with TCP_NODELAY=1 too)", highlight=False)
    mine = [r for r in runs if r.target == "cmr-ai"]
    kids = [r.children_peak_kb for r in mine if r.children_peak_kb]
    starts = [r.start_rss_kb for r in mine if r.start_rss_kb]
    peaks = [r.peak_rss_kb for r in mine if r.peak_rss_kb]
    console.print(f"cmr-ai serve memory: node process {mb(min(starts) if starts else None)} MB RSS when idle after "
                  f"start, peak {mb(max(peaks) if peaks else None)} MB (VmHWM, the node process only); its embedded "
                  f"Celery worker (child processes, not included) peaked at {mb(max(kids) if kids else None)} MB",
                  highlight=False)
    lost = [r for r in runs if r.lost or r.storescu_failed]
    for r in lost:
        console.print(f"[red]{LABELS[r.target]}, {r.senders} sender(s): {r.received} of {r.expected} instances "
                      f"arrived[/red] {' '.join(r.storescu_failed)}")
    return 1 if lost else 0


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=300, help="images in the study (default 300)")
    ap.add_argument("--senders", type=int, default=4, help="storescu processes at once in the concurrent run")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the best run of each receiver is reported")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (study, storage, logs, profile)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the study, the receivers' storage and the logs go (default: a temporary folder); "
                         "a study already there is reused")
    ap.add_argument("--profile", action="store_true", help="one more cmr-ai run (1 sender) under cProfile")
    add_progress_arguments(ap)
    ap.add_argument("--bare-scp", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--profiled-serve", nargs=2, metavar=("OUT", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare_scp:
        return bare_scp(int(args.bare_scp[0]), Path(args.bare_scp[1]))
    if args.profiled_serve:
        return profiled_serve(Path(args.profiled_serve[0]), Path(args.profiled_serve[1]))
    for name in ("instances", "senders", "repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.senders > args.instances:
        ap.error(f"--senders ({args.senders}) cannot exceed --instances ({args.instances})")
    if not Path(STORESCU).exists():
        ap.error(f"{STORESCU} missing: install the Debian package dcmtk")

    from rich.console import Console
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    if args.workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="cmr-ingest-bench-"))
    else:
        workdir = args.workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    storescu = "?"
    prun: Optional[Run] = None
    profile_path = workdir / "profile" / "cmr-ai.prof"
    rc = 1
    try:
        with rich_progress(progress_enabled(args.progress), TextColumn("{task.description:<40}"), BarColumn(),
                           TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()) as progress:
            task = progress.add_task(f"writing the {args.instances}-image study", total=None)
            paths = make_study(workdir / "study", args.instances)
            nbytes = sum(p.stat().st_size for p in paths)
            folders = {1: [paths[0].parent], args.senders: split(paths, args.senders, workdir / "split")}
            v = subprocess.run([STORESCU, "--version"], capture_output=True, text=True).stdout.split()
            storescu = " ".join(v[:3]).strip("$ ") if v else "?"
            progress.remove_task(task)
            modes = [1] if args.senders == 1 else [1, args.senders]
            total = args.repeat * len(modes) * len(TARGETS) + (1 if args.profile else 0)
            task = progress.add_task("runs", total=total)
            runs_dir = workdir / "runs"
            shutil.rmtree(runs_dir, ignore_errors=True)
            for rnd in range(1, args.repeat + 1):
                for s in modes:
                    for t in TARGETS:
                        progress.update(task, description=f"round {rnd}: {t}, {s} sender(s)")
                        where = runs_dir / f"{rnd}-{s}-{t.replace(' ', '-')}"
                        runs.append(one_run(t, folders[s], len(paths), nbytes, where, keep=args.keep))
                        progress.advance(task)
            if args.profile:
                progress.update(task, description="cmr-ai under cProfile, 1 sender")
                profile_path.parent.mkdir(parents=True, exist_ok=True)
                prun = one_run("cmr-ai", folders[1], len(paths), nbytes, runs_dir / "profiled-cmr-ai",
                               keep=args.keep, profile_out=profile_path)
                progress.advance(task)
        rc = report(console, runs, paths, nbytes, modes, args.repeat, workdir, storescu)
        if prun is not None:
            console.print(f"under the profiler: {prun.per_s:.0f} instances/s, {prun.received}/{prun.expected} "
                          "received (profiling slows pure-Python code far more than I/O)", highlight=False)
            if prun.lost or prun.storescu_failed:
                rc = 1
            if profile_path.exists():
                print_profile(console, profile_path, prun.seconds)
            else:
                console.print(f"[red]no profile written: see {runs_dir / 'profiled-cmr-ai' / 'node.log'}[/red]")
                rc = 1
    finally:
        if args.keep or args.workdir is not None:
            console.print(f"working folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
