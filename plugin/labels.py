"""Labelled studies: ground truth → template option ids, LABELS.csv, and labelled phantom sets.

The option ids are those of ``cmr_standard`` (fixed: training, evaluation and the phantom
truth use them):

``lv_systolic_function`` from the LV ejection fraction the images show
    ``normal`` ≥ 0.55, ``mildly_reduced`` 0.45–0.55, ``moderately_reduced`` 0.35–0.45,
    ``severely_reduced`` < 0.35
``pericardial_effusion`` from the fluid thickness
    ``none`` 0 mm, ``small`` < 10 mm, ``moderate`` 10–20 mm, ``large`` > 20 mm

LABELS.csv has the columns ``study_instance_uid,finding,answer`` (one row per study and
finding; a study may lack a finding). :func:`write_phantom_set` writes N phantoms (one
folder each, with ``truth.json``), their ``labels.csv``, spreading EF and effusion over
every option and cycling through the vendor styles.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

__all__ = ["LABEL_FINDINGS", "Label", "ef_option", "effusion_option", "read_labels", "truth_labels",
           "write_labels", "write_phantom_set"]

#: the findings a phantom's truth answers, with their options in template order (the first is "normal")
LABEL_FINDINGS: dict[str, tuple[str, ...]] = {
    "lv_systolic_function": ("normal", "mildly_reduced", "moderately_reduced", "severely_reduced"),
    "pericardial_effusion": ("none", "small", "moderate", "large"),
}

#: EF and effusion ranges the phantom sets draw from, per option (inside the phantom's limits)
_EF_RANGES = {"normal": (0.55, 0.72), "mildly_reduced": (0.45, 0.55), "moderately_reduced": (0.35, 0.45),
              "severely_reduced": (0.18, 0.35)}
_EFFUSION_RANGES = {"none": (0.0, 0.0), "small": (3.0, 10.0), "moderate": (10.0, 20.0), "large": (20.0, 30.0)}


def ef_option(ef: float) -> str:
    """``lv_systolic_function`` option id for an ejection fraction (0–1)."""
    if ef >= 0.55:
        return "normal"
    if ef >= 0.45:
        return "mildly_reduced"
    if ef >= 0.35:
        return "moderately_reduced"
    return "severely_reduced"


def effusion_option(mm: float) -> str:
    """``pericardial_effusion`` option id for a fluid thickness in mm."""
    if mm <= 0:
        return "none"
    if mm < 10:
        return "small"
    if mm <= 20:
        return "moderate"
    return "large"


def truth_labels(truth) -> dict[str, str]:
    """finding id → option id for a :class:`plugin.phantom.PhantomTruth` (EF as measured on the
    sampled anatomy, i.e. what the images show)."""
    return {"lv_systolic_function": ef_option(truth.ef), "pericardial_effusion": effusion_option(truth.effusion_mm)}


@dataclass(frozen=True)
class Label:
    study_instance_uid: str
    finding: str
    answer: str


def write_labels(path: str | Path, labels: Iterable[Label]) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_instance_uid", "finding", "answer"])
        for lab in labels:
            w.writerow([lab.study_instance_uid, lab.finding, lab.answer])
    return path


def read_labels(path: str | Path) -> list[Label]:
    """Read LABELS.csv; raises ValueError naming the file and line of a bad row."""
    path = Path(path)
    out: list[Label] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"study_instance_uid", "finding", "answer"}
        if reader.fieldnames is None or not need <= {h.strip() for h in reader.fieldnames}:
            raise ValueError(f"{path}:1: expected the columns study_instance_uid,finding,answer, got "
                             f"{','.join(reader.fieldnames or [])!r}")
        for i, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not all(row.get(k) for k in need):
                raise ValueError(f"{path}:{i}: empty study_instance_uid, finding or answer")
            out.append(Label(row["study_instance_uid"], row["finding"], row["answer"]))
    return out


def _write_one(args: tuple) -> dict:
    from plugin.phantom import write_study

    folder, style, seed, ef, effusion, slices, phases, size = args
    truth = write_study(folder, style=style, seed=seed, ef=ef, effusion_mm=effusion, slices=slices, phases=phases,
                        size=size)
    return {"study_instance_uid": truth.study_instance_uid, "style": style, "ef": truth.ef,
            "effusion_mm": truth.effusion_mm, **truth_labels(truth)}


def write_phantom_set(out_dir: str | Path, n: int, *, seed: int, styles: tuple[str, ...] = ("siemens", "ge", "philips"),
                      slices: int = 8, phases: int = 12, size: int = 128,
                      on_study: Optional[Callable[[int, int], None]] = None, workers: int = 1) -> Path:
    """Write ``n`` labelled phantoms under ``out_dir`` (``<out_dir>/<k>/…`` + ``truth.json``) and
    ``out_dir/labels.csv``; returns the labels path.

    Study k uses phantom seed ``seed + k``; its EF option and effusion option are drawn
    independently, each uniformly over the four options (so every option is present in a
    set of a few dozen), then a value uniformly inside that option's range. Deterministic:
    same arguments → same studies (``workers`` > 1 writes them in that many processes; the
    bytes do not change).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 4711])
    ef_opts, eff_opts = list(_EF_RANGES), list(_EFFUSION_RANGES)
    jobs = []
    for k in range(n):
        ef_lo, ef_hi = _EF_RANGES[ef_opts[int(rng.integers(4))]]
        ef = float(rng.uniform(ef_lo, ef_hi))
        e_lo, e_hi = _EFFUSION_RANGES[eff_opts[int(rng.integers(4))]]
        effusion = float(rng.uniform(e_lo, e_hi)) if e_hi > 0 else 0.0
        jobs.append((out / f"{k:04d}", styles[k % len(styles)], seed + k, ef, effusion, slices, phases, size))
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = []
            for k, r in enumerate(pool.map(_write_one, jobs)):
                results.append(r)
                if on_study:
                    on_study(k + 1, n)
    else:
        results = []
        for k, job in enumerate(jobs):
            results.append(_write_one(job))
            if on_study:
                on_study(k + 1, n)
    labels = [Label(r["study_instance_uid"], f, r[f]) for r in results for f in LABEL_FINDINGS]
    index = [{"folder": f"{k:04d}", **r} for k, r in enumerate(results)]
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return write_labels(out / "labels.csv", labels)
