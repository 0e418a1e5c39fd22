"""``cmr-ai demo``: the whole path once, on the embedded defaults.

Generates a synthetic cardiac study, starts ``cmr-ai serve`` on a free port (with its
embedded Celery worker), sends the study over real C-STORE (dcmtk's storescu when
installed, else pynetdicom), waits for the job and prints the findings with their
probabilities, the impression and where the SR and SC were written.

Results go to stdout; progress (each step, the files sent, the job's stages) goes to
stderr as rich bars when stderr is a terminal or ``--progress`` is given
(:mod:`plugin.progress`), as plain lines when forced on elsewhere.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

console = Console(width=max(Console().width, 120))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(workdir: Path, port: int, out_dir: Path) -> Path:
    cfg = workdir / "config.yaml"
    cfg.write_text(f"""# written by `cmr-ai demo`
node: {{ae_title: CMR_AI, host: 127.0.0.1, port: {port}}}
storage: {{path: {workdir / 'dicom'}}}
database: {{url: "sqlite:///{workdir / 'cmr-ai.db'}"}}
queue: {{broker: embedded}}
models: {{demo: {{path: demo}}}}
destinations:
  results: {{folder: {out_dir}}}
rules:
  - name: cardiac-mr
    match: {{Modality: MR, StudyDescription: "(?i)card|heart|cmr"}}
    stable_after: 2
    template: cmr_standard
    model: demo
    send_to: [results]
  - {{name: everything-else, match: {{}}, action: ignore}}
""")
    return cfg


def send_study(port: int, study_dir: Path, aet: str = "DEMO_SCANNER",
               sent: Optional[Callable[[int], None]] = None) -> str:
    """C-STORE every file of ``study_dir`` to the node; returns which sender was used.

    ``sent(n)`` is called as instances go out (dcmtk's storescu: once, with all of them).
    """
    sent = sent or (lambda _n: None)
    if Path("/usr/bin/storescu").exists():
        cmd = ["/usr/bin/storescu", "-aet", aet, "-aec", "CMR_AI", "+sd", "+r", "+sp", "*.dcm", "-R", "-xr",
               "127.0.0.1", str(port), str(study_dir)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"storescu failed ({r.returncode}): {r.stderr[-2000:]}")
        sent(sum(1 for _ in study_dir.rglob("*.dcm")))
        return "dcmtk storescu"
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.presentation import StoragePresentationContexts

    ae = AE(ae_title=aet)
    ae.requested_contexts = StoragePresentationContexts[:120]
    assoc = ae.associate("127.0.0.1", port, ae_title="CMR_AI")
    if not assoc.is_established:
        raise RuntimeError("association with the node was not established")
    try:
        for p in sorted(study_dir.rglob("*.dcm")):
            st = assoc.send_c_store(dcmread(p))
            if not st or st.Status != 0:
                raise RuntimeError(f"C-STORE of {p} failed: {st}")
            sent(1)
    finally:
        assoc.release()
    return "pynetdicom"


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the node exited with {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the node did not listen on port {port} within {timeout:.0f} s")


#: the job states the demo's last bar walks through, in order
_JOB_STEPS = ("queued", "preparing", "inferring", "reporting", "exporting", "done")


def run_demo(workdir: str | Path = "./var/demo", *, keep_running: bool = False, verbose: bool = False,
             timeout: float = 900, progress: Optional[bool] = None) -> int:
    """Run the demo; ``progress``: show bars on stderr (None: when stderr is a terminal)."""
    from plugin.progress import Bars, enabled

    with Bars(enabled(progress)) as bars:
        return _run_demo(bars, workdir, keep_running=keep_running, timeout=timeout)


def _run_demo(bars, workdir: str | Path, *, keep_running: bool, timeout: float) -> int:
    from plugin import db
    from plugin.config import load_settings
    from plugin.phantom import write_study
    from worker.demo_model import build_trained_demo_model, demo_model_dir, is_complete_model_dir, resolve_model_path

    t_start = time.monotonic()
    workdir = Path(workdir).resolve()
    for sub in ("dicom", "out", "study", "results", "bundles"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
    for f in ("cmr-ai.db", "cmr-ai.db-wal", "cmr-ai.db-shm", "celery-broker.sqlite", "node.log"):
        (workdir / f).unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = workdir / "out"
    port = free_port()
    cfg = write_config(workdir, port, out_dir)
    settings = load_settings(cfg)

    steps = bars.add("demo", total=5)
    if is_complete_model_dir(demo_model_dir(), trained=True):
        model_dir = resolve_model_path("demo")
    else:  # first run: phantoms, preparation and training show their own bars
        model_dir = build_trained_demo_model(demo_model_dir(), bars=bars)
    steps.advance()
    console.print(f"[green]✓[/] demo model: {model_dir}")
    task = bars.add("writing a synthetic cardiac MR study")
    # a reduced LV function and a moderate effusion: the trained demo model should say so (README)
    truth = write_study(workdir / "study", style="siemens", seed=7, ef=0.38, effusion_mm=14)
    task.done()
    steps.advance()
    n_files = sum(1 for _ in (workdir / "study").rglob("*.dcm"))
    console.print(f"[green]✓[/] phantom study: {n_files} instances, EF {truth.ef:.2f}, pericardial effusion "
                  f"{truth.effusion_mm:.0f} mm (study {truth.study_instance_uid})")

    log = open(workdir / "node.log", "w")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    node = subprocess.Popen([sys.executable, "-m", "plugin.cli", "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        task = bars.add(f"starting the node on port {port}")
        _wait_port(port, node)
        task.done()
        steps.advance()
        console.print(f"[green]✓[/] node listening on 127.0.0.1:{port} (log: {workdir / 'node.log'})")
        t_send = time.monotonic()
        task = bars.add("sending the study over C-STORE", total=n_files)
        sender = send_study(port, workdir / "study", sent=task.advance)
        task.done()
        steps.advance()
        console.print(f"[green]✓[/] sent with {sender} in {time.monotonic() - t_send:.1f} s")
        job = None
        task = bars.add("waiting for the study to complete (stable_after 2 s)", total=len(_JOB_STEPS) - 1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if node.poll() is not None:
                raise RuntimeError(f"the node exited with {node.returncode}; see {workdir / 'node.log'}")
            with db.session_scope(settings.database.url) as s:
                from sqlalchemy import select

                job = s.scalar(select(db.Job).order_by(db.Job.id.desc()).limit(1))
                if job is not None:
                    state = job.state.value
                    task.update(description=f"job {job.id}: {state}",
                                completed=_JOB_STEPS.index(state) if state in _JOB_STEPS else len(_JOB_STEPS) - 1)
                    if job.state.finished:
                        exports = [(e.kind, e.destination, e.sop_instance_uid, e.state.value)
                                   for e in job.exports]
                        break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"no finished job after {timeout:.0f} s; see {workdir / 'node.log'}")
        task.done()
        steps.advance()
        steps.done()
        elapsed = time.monotonic() - t_send
        if job.state != db.JobState.DONE:
            console.print(f"[red]✗ job {job.id} {job.state.value}: {job.error}[/]")
            return 1
        result = json.loads(job.result_json)
        table = Table(min_width=60, title=f"AI DRAFT — unverified (model {result['model']} {result['model_fingerprint']}, "
                            f"{result['device']}, {result['quantization']})")
        from plugin.labels import truth_labels

        truth_of = truth_labels(truth)  # what the phantom really shows, for the findings it knows
        table.add_column("finding")
        table.add_column("answer")
        table.add_column("p", justify="right")
        table.add_column("phantom truth")
        table.add_column("all options")
        for f in result["findings"]:
            probs = " ".join(f"{k}={v:.2f}" for k, v in f["probabilities"].items())
            known = truth_of.get(f["id"])
            mark = "" if known is None else (f"[green]{known} ✓[/]" if known == f["answer"] else f"[red]{known} ✗[/]")
            table.add_row(f["id"], f["answer"], f"{f['probabilities'][f['answer']]:.2f}", mark, probs)
        console.print(table)
        from rich.markup import escape

        console.print(f"[bold]Impression (AI draft):[/] {escape(result.get('impression') or '(none)')}")
        if model_dir.name == "demo":
            console.print("[dim](the demo model is a tiny LLaVA trained here on synthetic phantoms for the two "
                          "findings with a phantom truth (README, \"The demo model\"); its other answers and the "
                          "impression prove the plumbing, not medicine)[/]")
        names = {"sr": "SR, TID 1500 measurement report", "text-sr": "SR, narrative text",
                 "sc": "Secondary Capture", "pr": "Grayscale Softcopy Presentation State"}
        for kind, dest, uid, state in sorted(exports):
            path = out_dir / truth.study_instance_uid / f"{uid}.dcm"
            console.print(f"  {names.get(kind, kind)} → {dest} ({state}):\n    {path}")
        console.print(f"[green]✓[/] study sent → draft delivered in {elapsed:.1f} s "
                      f"(whole demo {time.monotonic() - t_start:.1f} s)")
        return 0
    finally:
        if not keep_running:
            node.terminate()
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        log.close()
