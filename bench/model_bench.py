"""What does the engine's batched option scoring save, next to scoring each option on its own?

Run it from the repository root::

    .venv/bin/python bench/model_bench.py                      # CPU, demo model, nf4, best of 3
    .venv/bin/python bench/model_bench.py --quantization none --repeat 5
    .venv/bin/python bench/model_bench.py --synthetic-7b       # on a CUDA machine only

CPU mode (default) builds the tiny demo LLaVA (:func:`worker.demo_model.build_demo_model`,
cached in ``<CMR_AI_MODEL_CACHE or var/models>/demo``), writes a phantom study
(:func:`plugin.phantom.write_study`) and prepares it as the node does
(:func:`plugin.cardiac.analyse_paths`), then answers the ``cmr_standard`` template
questions three ways, best of ``--repeat`` runs each:

(a) batched      ``Engine.score_options`` as ``run_bundle`` calls it: the prompt (image +
                 question + option list) runs once, its KV cache is repeated for the
                 options, which go through in ONE right-padded batch;
(b) naive        per option, one full forward pass of prompt + option (the processor
                 encodes the image again, no shared prefix, batch of one) — the textbook
                 way to score a multiple-choice answer; its probabilities are checked
                 against (a);
(c) generation   per question, greedy generation of the answer text
                 (``Engine.generate``, as many new tokens as the longest option has, + 2)
                 and a string match to an option: what "ask the model and parse the
                 answer" costs;

Each way is called once to warm up, then the ways take turns, ``--repeat`` rounds (so a
burst of load elsewhere on the machine does not skew one ratio), and prints
``batched vs naive per-option: N.Nx`` (time of (b) / time of (a)), the same
for (c), and the per-study latency of the whole ``run_bundle`` (scoring + impression).

``--synthetic-7b`` (needs a CUDA GPU; prints "needs a CUDA GPU" and exits 2 otherwise)
builds a randomly initialised LLaVA-1.5-7B-shaped model directly on the GPU, without any
weights file: Llama text model (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab
32000) and a CLIP ViT-L/14-336 vision tower (hidden 1024, 24 layers). It runs the real
``run_bundle`` on the phantom bundle in fp16, then quantises the language model's linear
layers in place to bitsandbytes NF4 (vision tower, projector and ``lm_head`` stay fp16,
as :data:`worker.model.engine.SKIP_MODULES`) and runs it again; for both it prints the
per-study latency, greedy decoding tokens/s and ``torch.cuda.max_memory_allocated``. The
tokenizer is the demo model's (its ids fit in the 32000 vocabulary); answers are random.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from plugin import progress as _bars  # noqa: E402

from plugin import phantom  # noqa: E402
from plugin.cardiac import analyse_paths  # noqa: E402
from plugin.reports.template import load_template  # noqa: E402
from worker.bundle import AnalysisBundle  # noqa: E402
from worker.model.engine import Engine, Quantization, question_mosaic, run_bundle  # noqa: E402

console = Console(soft_wrap=True)
STUDY = dict(slices=8, phases=12, size=128, seed=11, ef=0.35, effusion_mm=12.0)
#: LLaVA-1.5-7B shapes for --synthetic-7b (a smaller copy checks the code path on the CPU).
SYNTH = dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
             hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000)


@dataclass
class Timing:
    best: float = float("inf")
    runs: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.runs.append(seconds)
        self.best = min(self.best, seconds)


def make_bundle(workdir: Path, template_name: str = "cmr_standard") -> AnalysisBundle:
    """A phantom study, prepared as the node prepares it, as an analysis bundle."""
    truth = phantom.write_study(workdir / "study", **STUDY)
    paths = sorted((workdir / "study").rglob("*.dcm"))
    _study, _cls, images, limitations = analyse_paths(paths)
    template = load_template(template_name)
    return AnalysisBundle(job_id=1, study_instance_uid=truth.study_instance_uid, model="bench",
                          template=template.name, questions=template.questions(), images=images,
                          impression=template.impression, limitations=limitations)


def question_images(bundle: AnalysisBundle) -> dict[str, list]:
    """Per question the one labelled mosaic ``run_bundle`` shows the model."""
    pil = {im.key: im.to_pil() for im in bundle.images}
    out = {}
    for q in bundle.questions:
        out[q.id] = question_mosaic(pil, bundle.question_images(q), q.zoom)
    return out


# --------------------------------------------------------------------------- the three ways


def batched(engine: Engine, bundle: AnalysisBundle, images: dict[str, list]) -> dict[str, list[float]]:
    return {q.id: engine.score_options(images[q.id], q.text, q.option_texts) for q in bundle.questions}


def naive_scores(engine: Engine, images: list, question: str, options: list[str]) -> list[float]:
    """One full forward pass of prompt + option per option; mean log-prob, softmax (as the engine)."""
    prompt = engine.chat_prompt(engine.option_instruction(question, options), 1 if images else 0)
    image = engine._one_image(images)
    conts = engine._continuations(prompt, options)
    scores = []
    with torch.inference_mode():
        for c in conts:
            inputs = engine._encode(prompt, image)
            p = inputs["input_ids"].shape[1]
            ids = torch.cat([inputs["input_ids"], torch.tensor([c], device=engine.device)], dim=1)
            mask = torch.ones_like(ids)
            extra = {"pixel_values": inputs["pixel_values"]} if "pixel_values" in inputs else {}
            out = engine.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
            logp = torch.log_softmax(out.logits[0].float(), dim=-1)
            s = sum(float(logp[p + j - 1, c[j]]) for j in range(len(c)))
            scores.append(s / len(c) if engine.normalization == "mean" else s)
    return [float(x) for x in torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)]


def naive(engine: Engine, bundle: AnalysisBundle, images: dict[str, list]) -> dict[str, list[float]]:
    return {q.id: naive_scores(engine, images[q.id], q.text, q.option_texts) for q in bundle.questions}


def generation(engine: Engine, bundle: AnalysisBundle, images: dict[str, list]) -> dict[str, str | None]:
    tok = engine.processor.tokenizer
    out = {}
    for q in bundle.questions:
        longest = max(len(tok(" " + o, add_special_tokens=False)["input_ids"]) for o in q.option_texts)
        text = engine.generate(images[q.id], engine.option_instruction(q.text, q.option_texts),
                               max_new_tokens=longest + 2).lower()
        out[q.id] = next((o for o in q.option_texts if o.lower() in text), None)
    return out


def best_of(repeat: int, fn: Callable[[], object], progress: Progress, label: str) -> tuple[Timing, object]:
    timing, value = Timing(), None
    task = progress.add_task(label, total=repeat)
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        timing.add(time.perf_counter() - t0)
        progress.advance(task)
    return timing, value


def interleaved(repeat: int, ways: dict[str, tuple[str, Callable[[], object]]],
                progress: Progress) -> tuple[dict[str, Timing], dict[str, object]]:
    """One warm-up call of each way, then ``repeat`` rounds that call every way once in turn.

    Round-robin rather than all runs of one way back to back, so a burst of load from
    elsewhere on the machine spreads over the ways instead of skewing one ratio.
    """
    timings = {k: Timing() for k in ways}
    values: dict[str, object] = {}
    task = progress.add_task("warm-up", total=(repeat + 1) * len(ways))
    for rnd in range(repeat + 1):
        for k, (label, fn) in ways.items():
            progress.update(task, description=f"{label} ({'warm-up' if rnd == 0 else f'run {rnd}'})")
            t0 = time.perf_counter()
            values[k] = fn()
            if rnd:
                timings[k].add(time.perf_counter() - t0)
            progress.advance(task)
    return timings, values


#: --progress / --no-progress (None: bars on stderr when it is a terminal)
SHOW_PROGRESS: bool | None = None


def _progress() -> Progress:
    """Bars on stderr (results stay alone on stdout), off unless stderr is a terminal or --progress."""
    return _bars.rich_progress(_bars.enabled(SHOW_PROGRESS), TextColumn("{task.description:<34}"), BarColumn(),
                               TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())


# --------------------------------------------------------------------------- CPU mode


def cpu_mode(args: argparse.Namespace) -> int:
    from worker.demo_model import build_demo_model, demo_model_dir

    quant = Quantization.parse(args.quantization)
    with tempfile.TemporaryDirectory(prefix="model-bench-") as tmp, _progress() as progress:
        t = progress.add_task("demo model + phantom bundle", total=None)
        model_dir = build_demo_model(Path(args.model_dir) if args.model_dir else demo_model_dir())
        engine = Engine.load(model_dir, quantization=quant, device="cpu")
        bundle = make_bundle(Path(tmp))
        images = question_images(bundle)
        progress.remove_task(t)
        n_q = len(bundle.questions)
        n_opt = sum(len(q.options) for q in bundle.questions)

        ways = {
            "a": ("(a) batched score_options", lambda: batched(engine, bundle, images)),
            "b": ("(b) naive per-option", lambda: naive(engine, bundle, images)),
            "c": ("(c) naive generation", lambda: generation(engine, bundle, images)),
            "r": ("run_bundle (whole study)", lambda: run_bundle(engine, bundle)),
        }
        timings, values = interleaved(args.repeat, ways, progress)
        (ta, pa), (tb, pb), (tc, pc), (tr, _res) = ((timings[k], values[k]) for k in "abcr")

    worst = max(abs(x - y) for q in pa for x, y in zip(pa[q], pb[q]))
    matched = sum(1 for v in pc.values() if v is not None)
    console.print(f"model demo ({quant.value}, cpu, {torch.get_num_threads()} threads), template cmr_standard: "
                  f"{n_q} questions, {n_opt} options, {len(bundle.images)} images; best of {args.repeat}")
    console.print(f"(a) batched score_options:        {ta.best * 1000:8.1f} ms per study "
                  f"({ta.best * 1000 / n_q:.1f} ms per question)")
    console.print(f"(b) naive per-option forward:     {tb.best * 1000:8.1f} ms per study "
                  f"(max |p(a) - p(b)| {worst:.1e})")
    console.print(f"(c) naive generation + matching:  {tc.best * 1000:8.1f} ms per study "
                  f"({matched}/{n_q} answers matched an option)")
    console.print(f"batched vs naive per-option: {tb.best / ta.best:.1f}x")
    console.print(f"batched vs naive generation: {tc.best / ta.best:.1f}x")
    console.print(f"per-study latency, run_bundle (scoring + impression): {tr.best * 1000:.1f} ms "
                  f"(runs {', '.join(f'{x * 1000:.0f}' for x in tr.runs)} ms)")
    if worst > 1e-3:
        console.print(f"[red]batched and naive scores disagree by {worst:.3g}[/red]")
        return 1
    return 0


# --------------------------------------------------------------------------- synthetic 7B on a GPU


def _synthetic_engine(device: str) -> Engine:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from worker.demo_model import CHAT_TEMPLATE, IMAGE_TOKEN, _build_tokenizer

    tokenizer = _build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    d = SYNTH
    vision = CLIPVisionConfig(image_size=d["image_size"], patch_size=d["patch_size"], hidden_size=d["vision_hidden"],
                              intermediate_size=4 * d["vision_hidden"], num_hidden_layers=d["vision_layers"],
                              num_attention_heads=d["vision_heads"], projection_dim=768)
    text = LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                       num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                       num_key_value_heads=d["heads"], max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=(d["image_size"] // d["patch_size"]) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-2, projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.float16).eval()
    side = d["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tokenizer, patch_size=d["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    return Engine(path=Path("synthetic-7b"), model=model, processor=processor, quantization=Quantization.NONE,
                  device=device, compute_dtype=torch.float16, fingerprint="synthetic-7b")


def _quantize_nf4(engine: Engine) -> None:
    """Language-model linears -> bitsandbytes Linear4bit NF4 (double quant), in place on the GPU."""
    import bitsandbytes as bnb

    from worker.model.engine import SKIP_MODULES

    targets = [(n, m) for n, m in engine.model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.startswith(SKIP_MODULES)]
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = engine.model.get_submodule(parent_name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float16, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data.to("cpu"), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        setattr(parent, child, q.to(engine.device))
        del lin
    engine.quantization = Quantization.NF4
    torch.cuda.empty_cache()


def _tokens_per_s(engine: Engine, bundle: AnalysisBundle, n: int = 64) -> float:
    images = question_images(bundle)[bundle.questions[0].id]
    prompt = engine.chat_prompt("Describe these images.", 1)
    with torch.inference_mode():
        inputs = engine._encode(prompt, engine._one_image(images))
        engine.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = engine.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=engine._pad_id())
        torch.cuda.synchronize()
    return (out.shape[1] - inputs["input_ids"].shape[1]) / (time.perf_counter() - t0)


def synthetic_7b_mode(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        console.print("--synthetic-7b needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
        return 2
    device = "cuda:0"
    rows = []
    with tempfile.TemporaryDirectory(prefix="model-bench-") as tmp, _progress() as progress:
        t = progress.add_task("phantom bundle + 7B model (fp16)", total=None)
        bundle = make_bundle(Path(tmp))
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        engine = _synthetic_engine(device)
        build_s = time.perf_counter() - t0
        progress.remove_task(t)
        for quant in ("fp16", "nf4"):
            if quant == "nf4":
                t = progress.add_task("quantise to nf4", total=None)
                _quantize_nf4(engine)
                progress.remove_task(t)
            torch.cuda.reset_peak_memory_stats()
            run_bundle(engine, bundle)  # warm-up (kernels, allocator)

            def study() -> None:
                run_bundle(engine, bundle)
                torch.cuda.synchronize()

            timing, _ = best_of(args.repeat, study, progress, f"run_bundle {quant}")
            tps = _tokens_per_s(engine, bundle)
            rows.append((quant, timing.best, tps, torch.cuda.max_memory_allocated() / 2**30))
    console.print(f"synthetic LLaVA-7B shape on {torch.cuda.get_device_name(0)} (built in {build_s:.1f} s), "
                  f"template cmr_standard: {len(bundle.questions)} questions, best of {args.repeat}")
    for quant, best, tps, mem in rows:
        console.print(f"{quant:>5}: per-study latency {best:6.2f} s, decoding {tps:6.1f} tokens/s, "
                      f"max memory allocated {mem:5.1f} GiB")
    (_, f16, f16_tps, f16_mem), (_, n4, n4_tps, n4_mem) = rows
    console.print(f"nf4 vs fp16: latency {n4 / f16:.2f}x, tokens/s {n4_tps / f16_tps:.2f}x, "
                  f"memory {n4_mem / f16_mem:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", choices=["nf4", "none"], default="nf4",
                    help="CPU mode: how the demo model is loaded (default nf4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement, the best is reported")
    ap.add_argument("--model-dir", help="CPU mode: where the demo model is built/reused "
                                        "(default <CMR_AI_MODEL_CACHE or var/models>/demo)")
    ap.add_argument("--synthetic-7b", action="store_true",
                    help="GPU mode: random LLaVA-7B-shaped model, nf4 vs fp16 (needs CUDA)")
    _bars.add_arguments(ap)
    args = ap.parse_args(argv)
    global SHOW_PROGRESS
    SHOW_PROGRESS = args.progress
    if args.repeat < 1 or not math.isfinite(args.repeat):
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    return synthetic_7b_mode(args) if args.synthetic_7b else cpu_mode(args)


if __name__ == "__main__":
    sys.exit(main())
