"""What does preparing a cardiac study cost, next to merely reading it?

Run it from the repository root::

    .venv/bin/python bench/prepare_bench.py              # the three styles, best of 3
    .venv/bin/python bench/prepare_bench.py --styles siemens --repeat 5
    .venv/bin/python bench/prepare_bench.py --workdir /tmp/bench   # keep (and reuse) the studies

For each phantom style — ``siemens`` (one classic file per image, Explicit VR Little
Endian), ``philips`` (one Enhanced MR multi-frame object per cine) and ``ge`` (classic
files, RLE Lossless) — it writes a study of about 380 images: a short-axis cine stack
of 12 slices × 25 phases and 2/3/4-chamber cines of 25 phases at 256 × 256, plus a
3-plane localizer. Then it times, best of ``--repeat`` runs, with the files in the
page cache (written just before):

(a) read headers     ``pydicom.dcmread`` of every file; the pixel data are read as
                     bytes but not decoded — the floor for touching the study at all;
(b) read + decode    (a) and ``ds.pixel_array`` of every file (every frame);
(c) prepare          what the node does: ``load_study`` (headers only) +
                     ``classify_study`` (geometry, plus one decoded frame per long-axis
                     cine for the content check) + ``prepare_images`` (decodes and
                     renders the dozen ED/ES frames it picks);

and prints images per second for each, the ratios ("prepare vs read headers: 1.8x the
time") and where the prepare time goes. A rich progress bar on stderr shows what runs (when
stderr is a terminal, or with ``--progress``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pydicom
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugin import phantom  # noqa: E402
from plugin import progress as _bars  # noqa: E402
from plugin.cardiac import classify_study, load_study, prepare_images  # noqa: E402

STUDY = dict(slices=12, phases=25, size=256, seed=5)


@dataclass
class Timing:
    best: float = float("inf")
    runs: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.runs.append(seconds)
        self.best = min(self.best, seconds)


def write_or_reuse(folder: Path, style: str) -> tuple[list[Path], int]:
    """The study's files and its number of images (frames); reuses a matching study in ``folder``."""
    marker = folder / "bench.json"
    wanted = {**STUDY, "style": style}
    if not (marker.exists() and json.loads(marker.read_text()) == wanted):
        shutil.rmtree(folder, ignore_errors=True)
        phantom.write_study(folder, style=style, **STUDY)
        marker.write_text(json.dumps(wanted))
    paths = sorted(folder.rglob("*.dcm"))
    frames = sum(int(pydicom.dcmread(p, stop_before_pixels=True).get("NumberOfFrames", 1) or 1) for p in paths)
    return paths, frames


def read_headers(paths: list[Path]) -> None:
    for p in paths:
        pydicom.dcmread(p)


def read_and_decode(paths: list[Path]) -> None:
    for p in paths:
        pydicom.dcmread(p).pixel_array  # noqa: B018 - decoding is the point


def prepare(paths: list[Path], split: dict[str, float]) -> None:
    t0 = time.perf_counter()
    study = load_study(paths)
    t1 = time.perf_counter()
    cls = classify_study(study)
    t2 = time.perf_counter()
    images, _ = prepare_images(study, cls)
    t3 = time.perf_counter()
    if len(images) != 12:
        raise RuntimeError(f"expected 12 analysis images, got {len(images)}")
    split.update(load=t1 - t0, classify=t2 - t1, render=t3 - t2)


def bench_style(style: str, folder: Path, repeat: int, progress: Progress) -> dict:
    task = progress.add_task(f"{style}: writing the study", total=1 + 3 * repeat)
    paths, n_images = write_or_reuse(folder, style)
    progress.advance(task)
    size_mb = sum(p.stat().st_size for p in paths) / 1e6
    ts = pydicom.dcmread(paths[-1], stop_before_pixels=True).file_meta.TransferSyntaxUID
    timings = {"read headers": Timing(), "read + decode": Timing(), "prepare": Timing()}
    best_split: dict[str, float] = {}
    jobs: list[tuple[str, Callable[[], None]]] = [
        ("read headers", lambda: read_headers(paths)),
        ("read + decode", lambda: read_and_decode(paths)),
    ]
    for _ in range(repeat):
        for name, fn in jobs:
            progress.update(task, description=f"{style}: {name}")
            t0 = time.perf_counter()
            fn()
            timings[name].add(time.perf_counter() - t0)
            progress.advance(task)
        progress.update(task, description=f"{style}: prepare")
        split: dict[str, float] = {}
        t0 = time.perf_counter()
        prepare(paths, split)
        elapsed = time.perf_counter() - t0
        if elapsed < timings["prepare"].best:
            best_split = split
        timings["prepare"].add(elapsed)
        progress.advance(task)
    progress.update(task, description=f"{style}: done")
    return dict(style=style, files=len(paths), images=n_images, size_mb=size_mb, ts=ts.name,
                timings=timings, split=best_split)


def report(res: dict, console: Console) -> None:
    t = res["timings"]
    n = res["images"]
    console.print(f"[bold]{res['style']}[/bold]: {n} images in {res['files']} files, {res['ts']}, "
                  f"{res['size_mb']:.1f} MB")
    for name, timing in t.items():
        console.print(f"  {name:<14} {timing.best:7.3f} s  {n / timing.best:8.0f} images/s")
    prep = t["prepare"].best
    console.print(f"  prepare vs read headers: {prep / t['read headers'].best:.1f}x the time")
    console.print(f"  prepare vs read + decode: {prep / t['read + decode'].best:.1f}x the time")
    console.print(f"  read + decode vs read headers: {t['read + decode'].best / t['read headers'].best:.1f}x the time")
    s = res["split"]
    console.print(f"  prepare: {prep:.2f} s for {n} images (load_study {s['load']:.2f} s, classify_study "
                  f"{s['classify']:.2f} s, prepare_images {s['render']:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--styles", nargs="+", choices=phantom.STYLES, default=["siemens", "philips", "ge"])
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the studies are written and kept (default: a temporary folder, removed)")
    _bars.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    console = Console(soft_wrap=True)
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cmr-bench-")
        workdir = Path(tmp.name)
    results = []
    try:
        # bars on stderr: the results alone on stdout; off unless stderr is a terminal or --progress
        with _bars.rich_progress(_bars.enabled(args.progress), TextColumn("{task.description:<28}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()) as progress:
            for style in args.styles:
                results.append(bench_style(style, workdir / style, args.repeat, progress))
    finally:
        if tmp is not None:
            tmp.cleanup()
    console.print(f"pydicom {pydicom.__version__}, best of {args.repeat}, files in the page cache")
    for res in results:
        report(res, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
