"""``cmr-ai eval``: measure a model on a site's own labelled studies (docs/evaluation.md).

``cmr-ai eval --config FILE LABELS.csv STUDIES_DIR [--json] [--report OUT.html]`` runs the
node's own pipeline on every labelled study, in process: prepare
(:func:`plugin.cardiac.analyse_paths`, :func:`plugin.cardiac.context.study_context`, the
template's questions → :class:`worker.bundle.AnalysisBundle`, as ``worker.tasks.prepare``
builds it) → infer (:func:`worker.model.engine.get_engine` with the configured model,
quantisation, adapter and calibration → :func:`worker.model.engine.run_bundle`, as
``worker.tasks.infer`` does). Nothing is re-implemented, so the numbers are those of the
node. Only the findings LABELS.csv names are asked (each question is scored on its own,
so the others do not change the answers) and the free-text impression is skipped unless
``--impression``.

Per finding: accuracy, macro-F1, the confusion matrix, AUROC of "abnormal vs normal"
(score 1 − P(first option), the template's first option being the normal one), the
expected calibration error with its reliability data, and the **blank-image probe**: the
same bundle once more with every image black (same keys, labels, sizes), to show how much
the answers depend on the pixels. Latency of prepare and infer per study.

The metric functions (:func:`accuracy`, :func:`macro_f1`, :func:`confusion_matrix`,
:func:`auroc`, :func:`roc_curve`, :func:`ece`) use numpy only.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger("cmr_ai.eval")

__all__ = ["accuracy", "auroc", "blank_bundle", "confusion_matrix", "ece", "EvalError", "find_studies",
           "macro_f1", "roc_curve", "run", "add_arguments", "write_report", "compare", "read_baseline"]

DEFAULT_TEMPLATE = "cmr_standard"
ECE_BINS = 10


class EvalError(Exception):
    """A problem with the command's inputs (config, labels, studies folder, model): exit 2, one line."""


# --------------------------------------------------------------------------- metrics (numpy only)


def accuracy(truth: Sequence[str], pred: Sequence[str]) -> Optional[float]:
    """Fraction of equal pairs; None for no pairs."""
    if not len(truth):
        return None
    return float(np.mean([t == p for t, p in zip(truth, pred)]))


def confusion_matrix(truth: Sequence[str], pred: Sequence[str], options: Sequence[str]) -> list[list[int]]:
    """Counts with rows = true option, columns = predicted option, both in ``options`` order.
    A value not in ``options`` raises ValueError."""
    index = {o: i for i, o in enumerate(options)}
    m = np.zeros((len(options), len(options)), dtype=int)
    for t, p in zip(truth, pred):
        if t not in index or p not in index:
            raise ValueError(f"{(t if t not in index else p)!r} is not one of the options {list(options)}")
        m[index[t], index[p]] += 1
    return m.tolist()


def macro_f1(truth: Sequence[str], pred: Sequence[str]) -> Optional[float]:
    """Mean of the per-option F1 over the options present in ``truth`` or ``pred``; None for no pairs."""
    if not len(truth):
        return None
    t, p = np.asarray(truth, dtype=object), np.asarray(pred, dtype=object)
    scores = []
    for o in sorted(set(truth) | set(pred)):
        tp = int(np.sum((t == o) & (p == o)))
        fp = int(np.sum((t != o) & (p == o)))
        fn = int(np.sum((t == o) & (p != o)))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=float)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def auroc(positive: Sequence[bool], score: Sequence[float]) -> tuple[Optional[float], Optional[str]]:
    """Area under the ROC curve (Mann–Whitney U / (n₊ n₋), ties counted one half).

    Returns (auroc, None), or (None, why) when one class is absent.
    """
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None, ("no abnormal study in the labels" if n_pos == 0 else "no normal study in the labels")
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg)), None


def roc_curve(positive: Sequence[bool], score: Sequence[float]) -> tuple[list[float], list[float]]:
    """(false-positive rates, true-positive rates) from (0, 0) to (1, 1), one point per distinct score."""
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    fpr, tpr = [0.0], [0.0]
    if n_pos == 0 or n_neg == 0:
        return fpr + [1.0], tpr + [1.0]
    for thr in np.unique(s)[::-1]:
        above = s >= thr
        fpr.append(float(np.sum(above & ~y) / n_neg))
        tpr.append(float(np.sum(above & y) / n_pos))
    return fpr, tpr


def ece(confidence: Sequence[float], correct: Sequence[bool],
        bins: int = ECE_BINS) -> tuple[Optional[float], list[dict]]:
    """Expected calibration error of the top-label confidence over ``bins`` equal-width bins.

    Bin k holds confidences in (k/bins, (k+1)/bins] (the first also 0). Returns (ECE, the
    reliability data: per bin ``lo``, ``hi``, ``n``, ``accuracy``, ``confidence``; the last two
    None for an empty bin); ECE None for no samples.
    """
    c = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=float)
    idx = np.clip(np.ceil(c * bins).astype(int) - 1, 0, bins - 1)
    rel, total = [], 0.0
    for k in range(bins):
        sel = idx == k
        n = int(sel.sum())
        acc = float(ok[sel].mean()) if n else None
        conf = float(c[sel].mean()) if n else None
        if n:
            total += n / len(c) * abs(acc - conf)
        rel.append({"lo": k / bins, "hi": (k + 1) / bins, "n": n, "accuracy": acc, "confidence": conf})
    return (float(total) if len(c) else None), rel


def summary(values: Sequence[float]) -> dict[str, Optional[float]]:
    """mean, p50, p95 and max of a list of seconds (None each for an empty list)."""
    if not len(values):
        return {"n": 0, "mean": None, "p50": None, "p95": None, "max": None}
    v = np.asarray(values, dtype=float)
    return {"n": len(v), "mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p95": float(np.percentile(v, 95)), "max": float(v.max())}


# --------------------------------------------------------------------------- studies and labels


def find_studies(folder: str | Path) -> tuple[dict[str, list[str]], int]:
    """Every DICOM file under ``folder`` (recursive, any name) grouped by StudyInstanceUID,
    in sorted path order; also the number of files skipped as not DICOM (or without a
    StudyInstanceUID)."""
    from plugin.routing import scan_dicom

    try:
        found, skipped = scan_dicom(folder, ["StudyInstanceUID"])
    except (FileNotFoundError, NotADirectoryError):
        raise EvalError(f"{folder}: not a folder") from None
    studies: dict[str, list[str]] = {}
    missing = 0
    for p, ds in found:
        uid = str(ds.get("StudyInstanceUID", "") or "")
        if uid:
            studies.setdefault(uid, []).append(p)
        else:
            missing += 1
    return studies, len(skipped) + missing


def check_labels(path: str | Path, questions) -> dict[str, dict[str, str]]:
    """LABELS.csv → study UID → finding → answer, checked against the template's questions
    (finding ids and option ids); EvalError naming file:line for a bad row."""
    from plugin.labels import read_labels

    try:
        labels = read_labels(path)
    except OSError as e:
        raise EvalError(f"{path}: cannot read labels: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise EvalError(str(e)) from None
    options = {q.id: list(q.options) for q in questions}
    out: dict[str, dict[str, str]] = {}
    for i, lab in enumerate(labels, start=2):
        if lab.finding not in options:
            raise EvalError(f"{path}:{i}: finding {lab.finding!r} is not in the template (its findings: "
                            f"{', '.join(options)})")
        if lab.answer not in options[lab.finding]:
            raise EvalError(f"{path}:{i}: answer {lab.answer!r} is not an option of {lab.finding} "
                            f"({', '.join(options[lab.finding])})")
        have = out.setdefault(lab.study_instance_uid, {})
        if have.get(lab.finding, lab.answer) != lab.answer:
            raise EvalError(f"{path}:{i}: {lab.finding} of study {lab.study_instance_uid} labelled twice, "
                            f"{have[lab.finding]!r} and {lab.answer!r}")
        have[lab.finding] = lab.answer
    if not out:
        raise EvalError(f"{path}: no labels")
    return out


# --------------------------------------------------------------------------- the pipeline


def blank_bundle(bundle):
    """The bundle with every image's pixels black (same size and mode; keys, labels, views,
    phases and source references kept)."""
    from PIL import Image

    from worker.bundle import BundleImage

    cache: dict[tuple, str] = {}
    images = []
    for im in bundle.images:
        with Image.open(io.BytesIO(base64.b64decode(im.png_b64))) as src:
            key = (src.mode, src.size)
        if key not in cache:
            cache[key] = BundleImage.encode_png(Image.new(key[0], key[1], 0))
        images.append(im.model_copy(update={"png_b64": cache[key]}))
    return bundle.model_copy(update={"images": images})


@dataclass
class StudyResult:
    study_instance_uid: str
    prepare_s: float = 0.0
    infer_s: float = 0.0
    blank_s: Optional[float] = None
    error: Optional[str] = None
    #: finding → {"truth", "answer", "probabilities", "blank_answer", "blank_probabilities"}
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Setup:
    model_name: str
    model_path: str
    quantization: str
    device: str
    adapter: Optional[str]
    calibration_file: Optional[str]
    compute_dtype: Optional[str]
    template_name: str
    templates_dir: Optional[str]


def _choose(settings, model: Optional[str], template: Optional[str]) -> tuple[str, str]:
    """(model name, template name): the options, else those of the first analysing rule (for the
    model when one is named), else ``demo`` / ``cmr_standard``."""
    analysing = [r for r in settings.rules if r.action == "analyse"]
    if model is None:
        model = analysing[0].model if analysing else ("demo" if "demo" in settings.models else None)
        if model is None:
            if not settings.models:
                raise EvalError(f"{settings.source}: no models: in the config")
            model = next(iter(settings.models))
    if model not in settings.models:
        raise EvalError(f"{settings.source}: no model {model!r} under models: "
                        f"(there: {', '.join(settings.models) or 'none'})")
    if template is None:
        template = next((r.template for r in analysing if r.model == model and r.template), DEFAULT_TEMPLATE)
    return model, template


def _finding_metrics(results: list[StudyResult], q, blank_probe: bool) -> dict[str, Any]:
    rows = [r.findings[q.id] for r in results if r.error is None and q.id in r.findings]
    options = list(q.options)
    truth = [f["truth"] for f in rows]
    pred = [f["answer"] for f in rows]
    probs = np.array([[f["probabilities"][o] for o in options] for f in rows], dtype=float).reshape(-1, len(options))
    positive = [t != options[0] for t in truth]
    score = (1.0 - probs[:, 0]).tolist()
    area, why = auroc(positive, score)
    fpr, tpr = roc_curve(positive, score)
    conf = probs.max(axis=1).tolist() if len(rows) else []
    e, rel = ece(conf, [t == p for t, p in zip(truth, pred)])
    out: dict[str, Any] = {
        "n": len(rows), "accuracy": accuracy(truth, pred), "f1": macro_f1(truth, pred), "auroc": area,
        "auroc_note": why, "ece": e, "options": options, "normal": options[0],
        "n_normal": int(len(rows) - sum(positive)), "n_abnormal": int(sum(positive)),
        "confusion": confusion_matrix(truth, pred, options) if rows else [[0] * len(options) for _ in options],
        "roc": {"fpr": fpr, "tpr": tpr}, "reliability": rel,
        "truth_counts": {o: truth.count(o) for o in options}, "pred_counts": {o: pred.count(o) for o in options},
    }
    if blank_probe:
        bl = [f for f in rows if f.get("blank_answer") is not None]
        tv = [0.5 * sum(abs(f["probabilities"][o] - f["blank_probabilities"][o]) for o in options) for f in bl]
        out.update({
            "blank_changed": float(np.mean([f["blank_answer"] != f["answer"] for f in bl])) if bl else None,
            "blank_tv": float(np.mean(tv)) if tv else None,
            "blank_tv_max": float(np.max(tv)) if tv else None,
            "blank_accuracy": accuracy([f["truth"] for f in bl], [f["blank_answer"] for f in bl]),
        })
    else:
        out.update({"blank_changed": None, "blank_tv": None, "blank_tv_max": None, "blank_accuracy": None})
    return out


def evaluate(args) -> dict[str, Any]:
    """Run the evaluation described by the parsed ``args``; returns the JSON-ready result."""
    from plugin.cardiac import PrepareError, analyse_paths
    from plugin.cardiac.context import study_context
    from plugin.config import ConfigError, load_settings
    from plugin.progress import Bars, enabled
    from plugin.reports.template import TemplateError, load_template
    from worker.bundle import AnalysisBundle
    from worker.tasks import template_hash

    try:
        settings = load_settings(args.config, node_files=False)
    except ConfigError as e:
        raise EvalError("; ".join(e.errors)) from None
    model_name, template_name = _choose(settings, args.model, args.template)
    mc = settings.models[model_name]
    try:
        template = load_template(template_name, settings.templates_dir)
    except (FileNotFoundError, TemplateError) as e:
        raise EvalError(f"template {template_name!r}: {e}") from None
    questions = template.questions()
    labels = check_labels(args.labels, questions)
    labelled_findings = {f for per in labels.values() for f in per}
    questions = [q for q in questions if q.id in labelled_findings]  # only what is scored

    studies, skipped = find_studies(args.studies_dir)
    if not studies:
        raise EvalError(f"{args.studies_dir}: no DICOM study found ({skipped} other files)")
    todo = [uid for uid in studies if uid in labels]
    missing = [uid for uid in labels if uid not in studies]
    unlabelled = [uid for uid in studies if uid not in labels]
    if not todo:
        raise EvalError(f"{args.studies_dir}: none of its {len(studies)} studies has a label in {args.labels}")
    if args.limit is not None:
        todo = todo[: max(0, args.limit)]

    quant = args.quantization or mc.quantization
    device = args.device or mc.device
    setup = Setup(model_name, mc.path, quant, device, mc.adapter, mc.calibration, args.compute_dtype,
                  template_name, settings.templates_dir)
    engine, calibration = _load_engine(setup)

    results: list[StudyResult] = []
    quiet = logging.getLogger("plugin.cardiac")
    level = quiet.level
    if not getattr(args, "verbose", False):
        quiet.setLevel(logging.CRITICAL)  # a study that fails is reported with its reason
    try:
        with Bars(enabled(args.progress)) as bars:
            task = bars.add("evaluating", total=len(todo))
            for uid in todo:
                results.append(_one_study(uid, studies[uid], labels[uid], questions, template, template_name,
                                          model_name, engine, calibration, args, analyse_paths, study_context,
                                          template_hash, AnalysisBundle, PrepareError))
                task.advance()
            task.done()
    finally:
        quiet.setLevel(level)

    ok = [r for r in results if r.error is None]
    fingerprint = engine.fingerprint
    from worker.model.engine import model_version

    return {
        "findings": {q.id: _finding_metrics(results, q, not args.no_blank_probe) for q in questions},
        "studies": {
            "found": len(studies), "labelled": len(labels), "evaluated": len(ok),
            "failed": [{"study_instance_uid": r.study_instance_uid, "reason": r.error} for r in results if r.error],
            "missing": missing, "unlabelled": unlabelled, "skipped_files": skipped,
            "results": [{"study_instance_uid": r.study_instance_uid, "prepare_s": r.prepare_s, "infer_s": r.infer_s,
                         "blank_s": r.blank_s, "findings": r.findings} for r in ok],
        },
        "latency": {
            "prepare_s": summary([r.prepare_s for r in results if r.prepare_s]),
            "infer_s": summary([r.infer_s for r in ok]),
            "blank_s": summary([r.blank_s for r in ok if r.blank_s is not None]),
            "model_load_s": engine.load_seconds, "device": engine.device,
            "quantization": engine.quantization.value,
        },
        "model": {
            "name": model_name, "path": str(engine.path), "adapter": str(engine.adapter) if engine.adapter else None,
            "calibration": mc.calibration, "quantization": engine.quantization.value, "device": engine.device,
            "compute_dtype": str(engine.compute_dtype).removeprefix("torch."), "fingerprint": fingerprint,
            "model_version": model_version(fingerprint, template_name, template_hash(template)),
            "template": template_name, "template_hash": template_hash(template),
            "impression": bool(args.impression), "blank_probe": not args.no_blank_probe,
            "command": "cmr-ai " + shlex.join(sys.argv[1:]),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def _load_engine(setup: Setup):
    from worker.demo_model import resolve_model_path
    from worker.model.engine import ModelLoadError, get_engine, load_calibration

    try:
        engine = get_engine(resolve_model_path(setup.model_path), quantization=setup.quantization,
                            device=setup.device, compute_dtype=setup.compute_dtype, adapter=setup.adapter)
        calibration = load_calibration(setup.calibration_file)
    except (ModelLoadError, ValueError) as e:
        raise EvalError(f"model {setup.model_name!r}: {e}") from None
    except (ImportError, RuntimeError) as e:  # e.g. nf4 without bitsandbytes / CUDA
        raise EvalError(f"model {setup.model_name!r} ({setup.quantization} on {setup.device}): "
                        f"{type(e).__name__}: {e}") from None
    return engine, calibration


def _one_study(uid, paths, truth, questions, template, template_name, model_name, engine, calibration, args,
               analyse_paths, study_context, template_hash, AnalysisBundle, PrepareError) -> StudyResult:
    from worker.model.engine import run_bundle

    res = StudyResult(uid)
    t0 = time.perf_counter()
    try:  # = worker.tasks.prepare, without the database
        _study, _cls, images, limitations = analyse_paths(paths)
        bundle = AnalysisBundle(job_id=0, study_instance_uid=uid, model=model_name, template=template_name,
                                template_hash=template_hash(template),
                                questions=[q for q in questions if q.id in truth], images=images,
                                impression=bool(args.impression), limitations=limitations,
                                clinical_context=study_context(paths))
    except PrepareError as e:
        res.prepare_s = time.perf_counter() - t0
        res.error = f"prepare: {e}"
        return res
    except Exception as e:  # noqa: BLE001 - the node fails the job with the reason; so does eval
        res.prepare_s = time.perf_counter() - t0
        res.error = f"prepare: {type(e).__name__}: {e}"
        return res
    res.prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = run_bundle(engine, bundle, model_name, calibration=calibration)  # = worker.tasks.infer
    res.infer_s = time.perf_counter() - t0
    blank = None
    if not args.no_blank_probe:
        t0 = time.perf_counter()
        blank = {f.id: f for f in run_bundle(engine, blank_bundle(bundle).model_copy(update={"impression": False}),
                                             model_name, calibration=calibration).findings}
        res.blank_s = time.perf_counter() - t0
    for f in result.findings:
        row = {"truth": truth[f.id], "answer": f.answer, "probabilities": dict(f.probabilities)}
        if blank is not None:
            row["blank_answer"] = blank[f.id].answer
            row["blank_probabilities"] = dict(blank[f.id].probabilities)
        res.findings[f.id] = row
    return res


def read_baseline(path: str | Path) -> dict[str, Any]:
    """The JSON of an earlier ``cmr-ai eval --json`` run (e.g. the same model in fp32)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise EvalError(f"{path}: cannot read baseline: {e.strerror or e}") from None
    except ValueError as e:
        raise EvalError(f"{path}: not the JSON of `cmr-ai eval --json`: {e}") from None
    if not isinstance(data, dict) or not {"findings", "studies", "model"} <= set(data) \
            or "results" not in data["studies"]:
        raise EvalError(f"{path}: not the JSON of `cmr-ai eval --json` (findings, studies.results, model)")
    return data


def compare(data: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """This run against a baseline run on the same studies (nf4 against fp32, say): per finding the
    fraction of studies with the same answer, the mean and largest total-variation distance between
    the two probability vectors, and the metric differences (this − baseline)."""
    ours = {r["study_instance_uid"]: r["findings"] for r in data["studies"]["results"]}
    theirs = {r["study_instance_uid"]: r["findings"] for r in base["studies"]["results"]}
    out: dict[str, Any] = {}
    for fid, f in data["findings"].items():
        pairs = [(ours[u][fid], theirs[u][fid]) for u in ours if u in theirs and fid in ours[u] and fid in theirs[u]]
        tv = [0.5 * sum(abs(a["probabilities"][o] - b["probabilities"].get(o, 0.0)) for o in a["probabilities"])
              for a, b in pairs]
        bf = base["findings"].get(fid, {})
        delta = {k: (f[k] - bf[k]) if f.get(k) is not None and bf.get(k) is not None else None
                 for k in ("accuracy", "f1", "auroc", "ece")}
        out[fid] = {"n": len(pairs), "agreement": float(np.mean([a["answer"] == b["answer"] for a, b in pairs]))
                    if pairs else None, "tv_mean": float(np.mean(tv)) if tv else None,
                    "tv_max": float(np.max(tv)) if tv else None, "delta": delta}
    bm = base["model"]
    keys = ("name", "path", "quantization", "device", "compute_dtype", "fingerprint", "model_version", "command", "date")
    return {"baseline": {k: bm.get(k) for k in keys},
            "findings": out}


# --------------------------------------------------------------------------- output


def _fmt(v: Optional[float], digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _sfmt(v: Optional[float], digits: int = 3) -> str:
    return "—" if v is None else f"{v:+.{digits}f}"


def print_table(data: dict[str, Any], file=None) -> None:
    """The readable summary (rich tables) of an evaluation result."""
    from rich.console import Console
    from rich.table import Table

    out = file or sys.stdout
    console = Console(file=out, width=None if getattr(out, "isatty", lambda: False)() else 150)
    m, st, lat = data["model"], data["studies"], data["latency"]
    console.print(f"[bold]cmr-ai eval[/bold]  model {m['name']} ({m['path']}), {m['quantization']} on {m['device']} "
                  f"({m['compute_dtype']}), "
                  f"template {m['template']}, version {m['model_version']}")
    t = Table(title="per finding")
    for col in ("finding", "n", "normal/abn.", "accuracy", "macro-F1", "AUROC", "ECE", "blank: changed",
                "blank: TV", "blank: accuracy"):
        t.add_column(col, justify="left" if col == "finding" else "right", no_wrap=col == "finding")
    for fid, f in data["findings"].items():
        t.add_row(fid, str(f["n"]), f"{f['n_normal']}/{f['n_abnormal']}", _fmt(f["accuracy"]), _fmt(f["f1"]),
                  _fmt(f["auroc"]) if f["auroc"] is not None else "— *", _fmt(f["ece"]),
                  _fmt(f["blank_changed"]), _fmt(f["blank_tv"]), _fmt(f["blank_accuracy"]))
    console.print(t)
    for fid, f in data["findings"].items():
        if f["auroc"] is None:
            console.print(f"* {fid}: AUROC undefined: {f['auroc_note']}")
    if data.get("comparison"):
        c = data["comparison"]
        b = c["baseline"]
        t = Table(title=f"against the baseline: {b['quantization']} on {b['device']} ({b['compute_dtype']}), "
                        f"version {b['model_version']}")
        for col in ("finding", "n", "same answer", "TV mean", "TV max", "Δ accuracy", "Δ F1", "Δ AUROC", "Δ ECE"):
            t.add_column(col, justify="left" if col == "finding" else "right", no_wrap=col == "finding")
        for fid, f in c["findings"].items():
            d = f["delta"]
            t.add_row(fid, str(f["n"]), _fmt(f["agreement"]), _fmt(f["tv_mean"]), _fmt(f["tv_max"]),
                      *(_sfmt(d[k]) for k in ("accuracy", "f1", "auroc", "ece")))
        console.print(t)
    console.print(f"studies: {st['evaluated']} evaluated, {len(st['failed'])} failed, {len(st['missing'])} labelled "
                  f"but not found, {len(st['unlabelled'])} found without labels")
    for fl in st["failed"]:
        console.print(f"  failed {fl['study_instance_uid']}: {fl['reason']}", markup=False)
    for name in ("prepare_s", "infer_s", "blank_s"):
        s = lat[name]
        if s["n"]:
            console.print(f"latency {name[:-2]:8s} mean {s['mean']:.2f} s  p50 {s['p50']:.2f}  p95 {s['p95']:.2f}  "
                          f"max {s['max']:.2f}  (n {s['n']})")
    console.print(f"model load {lat['model_load_s']:.1f} s")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(fid: str, f: dict[str, Any]) -> list[tuple[str, str]]:
    """(title, base64 PNG) of a finding's confusion matrix, ROC, reliability diagram and blank probe."""
    from matplotlib.figure import Figure

    out = []
    opts = f["options"]
    cm = np.asarray(f["confusion"])
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.add_subplot()
    im = ax.imshow(cm, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(opts)), opts, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(opts)), opts, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if top and cm[i, j] > top / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(f"{fid}: confusion (n {f['n']})", fontsize=9)
    out.append(("confusion matrix", _png(fig)))

    fig = Figure(figsize=(4.0, 4.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    if f["auroc"] is not None:
        ax.plot(f["roc"]["fpr"], f["roc"]["tpr"], "o-", ms=3, color="C0")  # ties: a diagonal segment
        ax.set_title(f"abnormal vs {opts[0]}: AUROC {f['auroc']:.3f}", fontsize=9)
    else:
        ax.text(0.5, 0.5, f"AUROC undefined:\n{f['auroc_note']}", ha="center", va="center", fontsize=9)
        ax.set_title(f"abnormal vs {opts[0]}", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    out.append(("ROC", _png(fig)))

    fig = Figure(figsize=(4.0, 4.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    rel = [b for b in f["reliability"] if b["n"]]
    width = 1 / len(f["reliability"]) if f["reliability"] else 0.1
    ax.bar([b["lo"] for b in rel], [b["accuracy"] for b in rel], width=width, align="edge", edgecolor="black",
           alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], "o", color="C3", ms=4,
            label="mean confidence")
    for b in rel:
        ax.text(b["lo"] + width / 2, min(b["accuracy"] + 0.02, 0.95), str(b["n"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top option)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"reliability: ECE {_fmt(f['ece'])}", fontsize=9)
    out.append(("reliability diagram", _png(fig)))

    if f.get("blank_changed") is not None:
        fig = Figure(figsize=(4.0, 3.2))
        ax = fig.add_subplot()
        names = ["accuracy\n(images)", "accuracy\n(blank)", "answers\nchanged", "mean TV\ndistance"]
        vals = [f["accuracy"] or 0.0, f["blank_accuracy"] or 0.0, f["blank_changed"], f["blank_tv"]]
        bars = ax.bar(names, vals, color=["C0", "C7", "C1", "C2"])
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.3f}", ha="center", fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title("blank-image probe", fontsize=9)
        out.append(("blank-image probe", _png(fig)))
    return out


def _latency_plot(data: dict[str, Any]) -> str:
    from matplotlib.figure import Figure

    rows = data["studies"]["results"]
    fig = Figure(figsize=(6.0, 3.2))
    ax = fig.add_subplot()
    series = [("prepare", [r["prepare_s"] for r in rows]), ("infer", [r["infer_s"] for r in rows]),
              ("blank probe", [r["blank_s"] for r in rows if r["blank_s"] is not None])]
    series = [(n, v) for n, v in series if v]
    if series:
        ax.hist([v for _, v in series], bins=min(20, max(5, len(rows))), label=[n for n, _ in series])
        ax.legend(fontsize=8)
    ax.set_xlabel("seconds per study")
    ax.set_ylabel("studies")
    ax.set_title(f"latency ({data['latency']['device']}, {data['latency']['quantization']})", fontsize=9)
    return _png(fig)


def write_report(data: dict[str, Any], out: str | Path) -> Path:
    """One self-contained HTML page (plots as embedded PNG). UIDs only, no PHI."""
    e = html.escape
    m, st, lat = data["model"], data["studies"], data["latency"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>cmr-ai eval</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
        "td:first-child{text-align:left}.plots img{margin:4px;vertical-align:top}code{background:#f4f4f4}"
        "</style></head><body>",
        "<h1>cmr-ai eval</h1><table>",
    ]
    header = [("model", f"{m['name']} — {m['path']}" + (f" + adapter {m['adapter']}" if m["adapter"] else "")),
              ("fingerprint", m["fingerprint"]), ("model version", m["model_version"]),
              ("quantization", m["quantization"]), ("device", f"{m['device']} ({m['compute_dtype']})"),
              ("calibration", m["calibration"] or "none"), ("template", f"{m['template']} ({m['template_hash'][:12]})"),
              ("studies", f"{st['evaluated']} evaluated, {len(st['failed'])} failed, {len(st['missing'])} labelled "
                          f"but missing, {len(st['unlabelled'])} without labels"),
              ("command", f"<code>{e(m['command'])}</code>"), ("date", m["date"])]
    for k, v in header:
        parts.append(f"<tr><th>{e(k)}</th><td style='text-align:left'>{v if k == 'command' else e(str(v))}</td></tr>")
    parts.append("</table><h2>Summary</h2><table><tr><th>finding</th><th>n</th><th>normal / abnormal</th>"
                 "<th>accuracy</th><th>macro-F1</th><th>AUROC</th><th>ECE</th><th>blank: answers changed</th>"
                 "<th>blank: mean TV</th><th>blank: accuracy</th></tr>")
    for fid, f in data["findings"].items():
        au = _fmt(f["auroc"]) if f["auroc"] is not None else f"— ({f['auroc_note']})"
        parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
            fid, f["n"], f"{f['n_normal']} / {f['n_abnormal']}", _fmt(f["accuracy"]), _fmt(f["f1"]), au,
            _fmt(f["ece"]), _fmt(f["blank_changed"]), _fmt(f["blank_tv"]), _fmt(f["blank_accuracy"]))) + "</tr>")
    parts.append("</table>")
    if data.get("comparison"):
        c = data["comparison"]
        b = c["baseline"]
        parts.append(f"<h2>Against the baseline</h2><p>{e(str(b['quantization']))} on {e(str(b['device']))}, "
                     f"version {e(str(b['model_version']))}: <code>{e(str(b['command']))}</code></p><table><tr>"
                     "<th>finding</th><th>n</th><th>same answer</th><th>TV mean</th><th>TV max</th><th>Δ accuracy</th>"
                     "<th>Δ F1</th><th>Δ AUROC</th><th>Δ ECE</th></tr>")
        for fid, f in c["findings"].items():
            d = f["delta"]
            parts.append("<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in (
                fid, f["n"], _fmt(f["agreement"]), _fmt(f["tv_mean"]), _fmt(f["tv_max"]),
                *(_sfmt(d[k]) for k in ("accuracy", "f1", "auroc", "ece")))) + "</tr>")
        parts.append("</table>")
    for fid, f in data["findings"].items():
        parts.append(f"<section id='finding-{e(fid)}'><h2>{e(fid)}</h2><div class='plots'>")
        for title, png in _plots(fid, f):
            parts.append(f"<img src=\"data:image/png;base64,{png}\" alt=\"{e(fid)}: {e(title)}\" title=\"{e(title)}\">")
        parts.append("</div></section>")
    parts.append("<section id='latency'><h2>Latency</h2><table><tr><th>stage</th><th>n</th><th>mean s</th>"
                 "<th>p50</th><th>p95</th><th>max</th></tr>")
    for name in ("prepare_s", "infer_s", "blank_s"):
        s = lat[name]
        parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in (
            name[:-2], s["n"], _fmt(s["mean"]), _fmt(s["p50"]), _fmt(s["p95"]), _fmt(s["max"]))) + "</tr>")
    parts.append(f"</table><p>model load {lat['model_load_s']:.1f} s</p>"
                 f"<img src=\"data:image/png;base64,{_latency_plot(data)}\" alt=\"latency histogram\"></section>")
    if st["failed"]:
        parts.append("<h2>Failed studies</h2><ul>" + "".join(
            f"<li>{e(x['study_instance_uid'])}: {e(x['reason'])}</li>" for x in st["failed"]) + "</ul>")
    parts.append("</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


# --------------------------------------------------------------------------- command line


def add_arguments(sp) -> None:
    """The ``cmr-ai eval`` arguments on an argparse sub-parser."""
    from plugin import progress

    sp.add_argument("--config", required=True, help="the node's config file (models:, rules:, templates_dir)")
    sp.add_argument("labels", metavar="LABELS.csv", help="columns study_instance_uid,finding,answer (option ids)")
    sp.add_argument("studies_dir", metavar="STUDIES_DIR", help="folder of DICOM studies (recursive, any file name)")
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    sp.add_argument("--report", metavar="OUT.html", help="also write a self-contained HTML report with plots")
    sp.add_argument("--model", help="a models: key (default: the model of the first analysing rule, else demo)")
    sp.add_argument("--template", help="report template (default: the rule's for that model, else cmr_standard)")
    sp.add_argument("--quantization", choices=("nf4", "int8", "none"), help="override the model's quantization")
    sp.add_argument("--device", help="override the model's device (auto, cpu, cuda, cuda:N)")
    sp.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"),
                    help="compute dtype (default as the node: bfloat16/float16 on a GPU, float32 on the CPU); "
                         "float32 with --quantization none is the full-precision baseline")
    sp.add_argument("--limit", type=int, help="evaluate only the first N labelled studies")
    sp.add_argument("--baseline", metavar="BASE.json", help="compare with an earlier `--json` run on the same "
                                                            "studies (nf4 against fp32: answer agreement, deltas)")
    sp.add_argument("--no-blank-probe", action="store_true", help="skip the blank-image probe (halves the time)")
    sp.add_argument("--impression", action="store_true", help="also generate the free-text impression (slow, "
                                                               "not scored; counts in the infer latency)")
    sp.add_argument("-v", "--verbose", action="store_true")
    progress.add_arguments(sp)


def _plain(v):
    """JSON-safe (NaN → None)."""
    if isinstance(v, float):
        return None if v != v or v in (float("inf"), float("-inf")) else v
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def run(args) -> int:
    """``cmr-ai eval``: 0 done, 2 for a bad config, labels file, studies folder or model (one line)."""
    import warnings

    try:
        base = read_baseline(args.baseline) if args.baseline else None
        with warnings.catch_warnings():
            if not args.verbose:
                warnings.simplefilter("ignore")
            data = evaluate(args)
        if base is not None:
            data["comparison"] = compare(data, base)
        data = _plain(data)
    except EvalError as e:
        print(f"cmr-ai eval: error: {e}", file=sys.stderr)
        return 2
    if args.report:
        out = write_report(data, args.report)
        if not args.json:
            print(f"report: {out}")
    if args.json:
        print(json.dumps(data, allow_nan=False))
    else:
        print_table(data)
    return 0
