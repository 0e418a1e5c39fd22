"""``cmr-ai train``: fit a LLaVA-style model to labelled studies, on exactly what inference feeds it.

Data
    A folder with ``labels.csv`` (``study_instance_uid,finding,answer``, see
    :mod:`plugin.labels`) and the studies' DICOM files anywhere below it. Each study is
    prepared ONCE like the node's ``prepare`` task (:func:`plugin.cardiac.analyse_paths`,
    the template's questions, the clinical context) and the bundle is cached under
    ``OUT/prepared/`` (a resume or a second run does not prepare again).

Examples
    One per (study, labelled finding): the question's views tiled into one labelled mosaic
    (:func:`~worker.model.engine.question_mosaic`), the question with the clinical context
    (:func:`~worker.model.engine.question_text`) and the option texts, turned into model
    inputs by :meth:`Engine.option_inputs` — the code :func:`run_bundle` scores with.

Objective
    Cross-entropy of the labelled option under the probabilities inference computes: the
    softmax over the options' MEAN per-token log-probability (``normalization: mean``),
    with the log-probabilities from :func:`~worker.model.engine.option_logprob_sums`, the
    forward pass inference's reference path uses.

Training
    Full training of the small model (default: a fresh random demo model), or ``lora``
    adapters on a base the site provides. AdamW, linear warm-up then cosine decay, fixed
    seed (python, numpy, torch; deterministic algorithms; the data order of epoch e is a
    permutation drawn from ``(seed, e)``), a checkpoint per epoch in ``OUT/checkpoints/``
    (weights, optimiser, epoch, losses, RNG state) from which ``resume`` continues to the
    same final weights as an uninterrupted run. The result is a ``save_pretrained``
    model directory (or adapter directory, with ``lora``) plus ``OUT/training.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import torch

from worker.bundle import AnalysisBundle
from worker.model.engine import (Engine, Quantization, option_logprob_sums, question_mosaic,
                                 question_text)

__all__ = ["Example", "TrainConfig", "auroc", "build_examples", "find_studies", "prepare_studies", "train"]

log = logging.getLogger("cmr_ai.train")

_PREPARED_VERSION = 2  # 2: images carry the LV roi, questions slices/zoom


@dataclass
class TrainConfig:
    """The recipe. Everything that changes the result is here (and in training.json)."""

    epochs: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 8
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    lora: bool = False
    lora_rank: int = 8
    template: str = "cmr_standard"
    val_fraction: float = 0.1  # of the studies, when no val folder is given
    image_size: Optional[int] = None  # of the default random base (None: the demo model's)
    patch_size: Optional[int] = None
    vision_hidden: Optional[int] = None
    vision_layers: Optional[int] = None
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default)

    def recipe(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("epochs", "lr", "weight_decay", "batch_size", "warmup_steps",
                                              "grad_clip", "seed", "lora", "lora_rank", "template",
                                              "val_fraction", "image_size", "patch_size", "vision_hidden",
                                              "vision_layers")}


@dataclass
class Example:
    """One (study, finding) with its label, as inference would see it."""

    study_instance_uid: str
    finding: str
    answer: int  # index of the labelled option
    options: list[str]
    prompt: str
    inputs: dict[str, torch.Tensor] = field(repr=False)
    conts: list[list[int]] = field(repr=False)


# --------------------------------------------------------------------------- data


def find_studies(data_dir: Path | str) -> dict[str, list[str]]:
    """StudyInstanceUID → the DICOM files of that study, for every DICOM file below ``data_dir``
    (the walk ``cmr-ai eval`` uses: :func:`plugin.evaluate.find_studies`)."""
    from plugin.evaluate import find_studies as _find

    return _find(data_dir)[0]


def _template(name: str, templates_dir=None):
    from plugin.reports.template import load_template

    return load_template(name, templates_dir)


def _prepared_path(cache_dir: Path, uid: str) -> Path:
    return cache_dir / (hashlib.sha256(uid.encode()).hexdigest()[:24] + ".json")


def prepare_studies(data_dir: Path | str, uids: Sequence[str], cache_dir: Path | str, template: str = "cmr_standard",
                    bars=None, templates_dir=None) -> dict[str, AnalysisBundle]:
    """Prepare each study like the node does, once: the bundles, cached as JSON in ``cache_dir``.

    A cached bundle is reused when its study files (names and sizes) and the template file
    are unchanged.
    """
    from plugin.cardiac import analyse_paths
    from plugin.cardiac.context import study_context
    from worker.tasks import template_hash

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tpl = _template(template, templates_dir)
    thash = template_hash(tpl)
    files = find_studies(data_dir)
    missing = [u for u in uids if u not in files]
    if missing:
        raise ValueError(f"{data_dir}: labels.csv names {len(missing)} studies with no DICOM files below it, "
                         f"e.g. {missing[0]}")
    out: dict[str, AnalysisBundle] = {}
    task = bars.add("preparing studies", total=len(uids)) if bars is not None else None
    for uid in uids:
        paths = files[uid]
        key = hashlib.sha256(json.dumps([_PREPARED_VERSION, thash, template,
                                         [(os.path.relpath(p, data_dir), os.path.getsize(p)) for p in paths]]
                                        ).encode()).hexdigest()
        cached = _prepared_path(cache_dir, uid)
        bundle = None
        if cached.is_file():
            try:
                data = json.loads(cached.read_text())
                if data.get("key") == key:
                    bundle = AnalysisBundle.model_validate(data["bundle"])
            except (OSError, ValueError):
                bundle = None
        if bundle is None:
            _study, _cls, images, limitations = analyse_paths(paths)
            bundle = AnalysisBundle(job_id=0, study_instance_uid=uid, model="train", template=template,
                                    template_hash=thash, questions=tpl.questions(), images=images,
                                    impression=tpl.impression, limitations=limitations,
                                    clinical_context=study_context(paths))
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "bundle": bundle.model_dump(mode="json")}))
            os.replace(tmp, cached)
        out[uid] = bundle
        if task is not None:
            task.advance()
    if task is not None:
        task.done()
    return out


def question_example(engine: Engine, bundle: AnalysisBundle, question) -> tuple[str, dict, list[list[int]]]:
    """(prompt, encoded inputs, option token ids) of one question of a bundle, exactly as
    :func:`~worker.model.engine.run_bundle` builds them (full set of the question's views)."""
    pil = {im.key: im.to_pil() for im in bundle.images}
    images = question_mosaic(pil, bundle.question_images(question), question.zoom)
    return engine.option_inputs(images, question_text(bundle, question), question.option_texts)


def build_examples(engine: Engine, bundles: dict[str, AnalysisBundle], labels, bars=None,
                   description: str = "building examples") -> list[Example]:
    """One :class:`Example` per label whose study, finding and answer the template knows."""
    examples = []
    task = bars.add(description, total=len(labels)) if bars is not None else None
    pil_cache: dict[str, dict] = {}
    for lab in labels:
        if task is not None:
            task.advance()
        bundle = bundles.get(lab.study_instance_uid)
        if bundle is None:
            continue
        q = next((q for q in bundle.questions if q.id == lab.finding), None)
        if q is None:
            log.warning("label for unknown finding %r ignored", lab.finding)
            continue
        if lab.answer not in q.options:
            raise ValueError(f"label {lab.study_instance_uid} {lab.finding}={lab.answer!r}: not an option "
                             f"({', '.join(q.options)})")
        pil = pil_cache.setdefault(lab.study_instance_uid, {im.key: im.to_pil() for im in bundle.images})
        images = question_mosaic(pil, bundle.question_images(q), q.zoom)
        prompt, inputs, conts = engine.option_inputs(images, question_text(bundle, q), q.option_texts)
        examples.append(Example(lab.study_instance_uid, q.id, q.options.index(lab.answer), list(q.options),
                                prompt, inputs, conts))
    if task is not None:
        task.done()
    return examples


# --------------------------------------------------------------------------- metrics


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes."""
    pos = [s for s, y in zip(scores, positive) if y]
    neg = [s for s, y in zip(scores, positive) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _probs(model, examples: Sequence[Example], pad_id: int) -> torch.Tensor:
    sums = option_logprob_sums(model, [(e.inputs, e.conts) for e in examples], pad_id)
    rows = []
    for s, e in zip(sums, examples):
        counts = torch.tensor([len(c) for c in e.conts], dtype=s.dtype)
        rows.append(s / counts)
    return rows


def evaluate(model, examples: Sequence[Example], pad_id: int, batch_size: int = 16) -> dict[str, dict]:
    """Per finding: n, accuracy, AUROC of abnormal vs normal with score 1 − P(first option), loss."""
    was_training = model.training
    model.eval()
    per: dict[str, dict[str, list]] = {}
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            for e, scores in zip(chunk, _probs(model, chunk, pad_id)):
                p = torch.softmax(scores.double(), dim=0)
                d = per.setdefault(e.finding, {"p0": [], "y": [], "ok": [], "loss": []})
                d["p0"].append(float(p[0]))
                d["y"].append(e.answer != 0)
                d["ok"].append(int(torch.argmax(p)) == e.answer)
                d["loss"].append(-float(torch.log(p[e.answer])))
    if was_training:
        model.train()
    out = {}
    for f, d in sorted(per.items()):
        a = auroc([1 - x for x in d["p0"]], d["y"])
        out[f] = {"n": len(d["y"]), "accuracy": sum(d["ok"]) / len(d["ok"]),
                  "auroc": None if a is None else round(a, 4), "loss": sum(d["loss"]) / len(d["loss"])}
    return out


# --------------------------------------------------------------------------- training


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _load_base(base: Path, lora: bool, rank: int, seed: int):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(base), local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(str(base), local_files_only=True, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)")
        model = get_peft_model(model, config)
    return model, processor


def _checkpoints(out: Path) -> list[Path]:
    d = out / "checkpoints"
    return sorted(d.glob("epoch-*.pt")) if d.is_dir() else []


def _data_digest(labels, val_labels) -> str:
    h = hashlib.sha256()
    for lab in list(labels) + [None] + list(val_labels or []):
        h.update(repr(lab and (lab.study_instance_uid, lab.finding, lab.answer)).encode())
    return h.hexdigest()[:16]


def train(data_dir: Path | str, out_dir: Path | str, *, base: Path | str | None = None,
          config: TrainConfig | None = None, val_dir: Path | str | None = None, resume: bool = False,
          stop_after: Optional[int] = None, bars=None, templates_dir=None) -> dict:
    """Train; return the training.json record. See the module docstring.

    Parameters
    ----------
    data_dir:
        Folder with ``labels.csv`` and the studies' DICOM files.
    out_dir:
        The model directory to write (``save_pretrained`` files, ``training.json``,
        ``checkpoints/``, ``prepared/``).
    base:
        Model to start from; default a fresh random demo model (:func:`build_demo_model`
        with ``config.seed``). With ``config.lora`` the base a site provides.
    val_dir:
        A labelled folder for validation; default ``config.val_fraction`` of the studies.
    resume:
        Continue from the last checkpoint in ``out_dir/checkpoints``.
    stop_after:
        Stop after this many epochs (tests of ``resume``); the final model is not written.
    bars:
        A :class:`plugin.progress.Bars` (or None).
    """
    from worker.demo_model import quiet_hf_bars

    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with quiet_hf_bars():
            return _train(data_dir, out_dir, base=base, config=config, val_dir=val_dir, resume=resume,
                          stop_after=stop_after, bars=bars, templates_dir=templates_dir)
    finally:  # the caller's process (e.g. ``cmr-ai demo`` building its model) gets its setting back
        torch.use_deterministic_algorithms(deterministic)


def _train(data_dir, out_dir, *, base, config, val_dir, resume, stop_after, bars, templates_dir) -> dict:
    from plugin.labels import read_labels

    cfg = config or TrainConfig()
    t_start = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _seed_everything(cfg.seed)
    timings: dict[str, float] = {}

    # base model
    t0 = time.perf_counter()
    if base is None:
        if cfg.lora:
            raise ValueError("lora needs a base model (--base DIR): adapters on a random model learn nothing useful")
        from worker.demo_model import IMAGE_SIZE, PATCH_SIZE, VISION_HIDDEN, build_demo_model

        base_dir = build_demo_model(out / "base", seed=cfg.seed, image_size=cfg.image_size or IMAGE_SIZE,
                                    patch_size=cfg.patch_size or PATCH_SIZE,
                                    vision_hidden=cfg.vision_hidden or VISION_HIDDEN,
                                    vision_layers=cfg.vision_layers or 2)
        base_desc = f"random demo model (seed {cfg.seed})"
    else:
        base_dir = Path(base)
        base_desc = str(base_dir)
    model, processor = _load_base(base_dir, cfg.lora, cfg.lora_rank, cfg.seed)
    engine = Engine(path=base_dir, model=model, processor=processor, quantization=Quantization.NONE, device="cpu",
                    compute_dtype=torch.float32, fingerprint="")
    pad_id = engine._pad_id()
    timings["load"] = time.perf_counter() - t0

    # data
    t0 = time.perf_counter()
    labels = read_labels(data_dir / "labels.csv")
    val_labels = read_labels(Path(val_dir) / "labels.csv") if val_dir else None
    uids = list(dict.fromkeys(lab.study_instance_uid for lab in labels))
    bundles = prepare_studies(data_dir, uids, out / "prepared", cfg.template, bars, templates_dir)
    if val_labels is not None:
        vuids = list(dict.fromkeys(lab.study_instance_uid for lab in val_labels))
        bundles.update(prepare_studies(val_dir, vuids, out / "prepared", cfg.template, bars, templates_dir))
    else:
        order = np.random.default_rng([cfg.seed, 17]).permutation(len(uids))
        n_val = int(round(cfg.val_fraction * len(uids))) if len(uids) >= 10 else 0
        held = {uids[i] for i in order[:n_val]}
        val_labels = [lab for lab in labels if lab.study_instance_uid in held]
        labels = [lab for lab in labels if lab.study_instance_uid not in held]
    timings["prepare"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    examples = build_examples(engine, bundles, labels, bars, "building training examples")
    val_examples = build_examples(engine, bundles, val_labels, bars, "building validation examples")
    timings["examples"] = time.perf_counter() - t0
    if not examples:
        raise ValueError(f"{data_dir}: no usable labelled examples (labels.csv findings vs template {cfg.template})")

    # optimiser and state
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    digest = _data_digest(labels, val_labels)
    state = {"epoch": 0, "losses": [], "val": [], "recipe": cfg.recipe(), "data": digest}
    ckpt_dir = out / "checkpoints"
    if resume:
        ckpts = _checkpoints(out)
        if ckpts:
            ck = torch.load(ckpts[-1], weights_only=False)
            if ck["recipe"] != cfg.recipe() or ck["data"] != digest:
                raise ValueError(f"{ckpts[-1]}: the checkpoint was made with another recipe or other data; "
                                 "train again without --resume (or into another --out)")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            _set_rng_state(ck["rng"])
            state.update({k: ck[k] for k in ("epoch", "losses", "val", "train_metrics") if k in ck})
            log.info("resuming from %s (epoch %d)", ckpts[-1], state["epoch"])

    # the loop
    t0 = time.perf_counter()
    model.train()
    task = bars.add("training", total=total_steps) if bars is not None else None
    if task is not None:
        task.update(completed=state["epoch"] * steps_per_epoch)
    for epoch in range(state["epoch"], cfg.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(examples))
        epoch_loss, n_seen = 0.0, 0
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            batch = [examples[i] for i in order[s * cfg.batch_size : (s + 1) * cfg.batch_size]]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total_steps, cfg)
            scores = _probs(model, batch, pad_id)
            logits = torch.stack(scores) if len({len(x) for x in scores}) == 1 else None
            if logits is not None:
                target = torch.tensor([e.answer for e in batch])
                loss = torch.nn.functional.cross_entropy(logits, target)
            else:  # questions with different option counts in one batch
                loss = torch.stack([torch.nn.functional.cross_entropy(x.unsqueeze(0), torch.tensor([e.answer]))
                                    for x, e in zip(scores, batch)]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            epoch_loss += float(loss.detach()) * len(batch)
            n_seen += len(batch)
            if task is not None:
                task.advance()
        state["losses"].append(epoch_loss / max(1, n_seen))
        val = evaluate(model, val_examples, pad_id) if val_examples else {}
        state["val"].append(val)
        # fit on (a fixed sample of) the training examples: tells under- from over-fitting
        sample = [examples[i] for i in np.random.default_rng([cfg.seed, 23]).permutation(len(examples))[:64]]
        state.setdefault("train_metrics", []).append(evaluate(model, sample, pad_id))
        state["epoch"] = epoch + 1
        log.info("epoch %d/%d: loss %.4f; val %s; train sample %s", epoch + 1, cfg.epochs, state["losses"][-1],
                 " ".join(f"{f}: acc {m['accuracy']:.2f} auroc {m['auroc']}" for f, m in val.items()),
                 " ".join(f"{f}: acc {m['accuracy']:.2f} auroc {m['auroc']}"
                          for f, m in state["train_metrics"][-1].items()))
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / f".epoch-{epoch + 1:04d}.pt.tmp"
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(), **state}, tmp)
        os.replace(tmp, ckpt_dir / f"epoch-{epoch + 1:04d}.pt")
        for old in _checkpoints(out)[:-2]:  # keep the last two
            old.unlink(missing_ok=True)
    if task is not None:
        task.done()
    timings["train"] = time.perf_counter() - t0
    record = {
        "data": str(data_dir), "val": str(val_dir) if val_dir else f"{cfg.val_fraction:g} of the studies",
        "base": base_desc, "recipe": cfg.recipe(), "seed": cfg.seed, "epochs": state["epoch"],
        "examples": len(examples), "val_examples": len(val_examples), "data_digest": digest,
        "losses": state["losses"], "val_metrics": state["val"], "train_metrics": state.get("train_metrics", []),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "seconds": round(time.perf_counter() - t_start, 2), "torch_threads": torch.get_num_threads(),
    }
    if stop_after is not None and state["epoch"] < cfg.epochs:
        return record

    # the result: a model directory Engine.load reads (or an adapter directory with lora)
    model.eval()
    model.save_pretrained(str(out))
    if not cfg.lora:
        processor.save_pretrained(str(out))
    if base is None:
        shutil.rmtree(out / "base", ignore_errors=True)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return record
