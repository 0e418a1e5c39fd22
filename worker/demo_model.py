"""A tiny random LLaVA-1.5-style model, built locally in seconds, for the demo and tests.

Nothing here touches the network: the tokenizer is trained on a built-in corpus with the
``tokenizers`` library, the weights come from a seeded random initialisation, and the
result is written with ``save_pretrained`` so that :mod:`worker.model.engine` loads it
exactly like a real checkpoint (``config.json``, ``model.safetensors``, tokenizer,
processor, chat template).

The model answers nonsense, but it has every moving part of a real one: a CLIP vision
tower, a two-layer projector, a Llama text model, ``<image>`` token expansion with
``vision_feature_select_strategy="default"``, a LLaVA-1.5 chat template, and linear
layers whose sizes are multiples of 64 so bitsandbytes 4-bit quantisation works on them.

Model directories
-----------------
``CMR_AI_MODEL_CACHE`` names the models cache root (default ``./var/models``).
``resolve_model_path("demo")`` is the TRAINED demo model (:func:`build_trained_demo_model`:
this random model trained by :mod:`worker.model.train` on labelled phantoms with a fixed
recipe, a few minutes on a CPU the first time), kept in ``<cache>/demo`` and reused
afterwards; ``"demo-random"`` is the untrained random model in ``<cache>/demo-random``
(seconds; what the tests use); any other spec must be an existing local directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never download

__all__ = [
    "DEMO_MODEL_DIR",
    "DEMO_MODEL_NAME",
    "DEMO_RANDOM_NAME",
    "DEMO_TRAIN_RECIPE",
    "build_demo_adapter",
    "build_demo_model",
    "build_trained_demo_model",
    "demo_model_dir",
    "is_complete_model_dir",
    "models_cache_dir",
    "resolve_model_path",
]

DEMO_MODEL_NAME = "demo"  # the trained demo model
DEMO_RANDOM_NAME = "demo-random"  # the untrained random one
_DEFAULT_CACHE = Path("var") / "models"
_MARKER = "cmr_ai_demo.json"  # written last: its presence means the build finished
# Bump when the architecture, corpus or tokenizer recipe changes: older builds are rebuilt.
_DEMO_VERSION = 1
# Bump when the trained demo's recipe (data, training) changes; a cache without
# ``"trained": true`` in its marker (an older random build) is rebuilt too.
_TRAINED_VERSION = 6  # 6: lv_systolic_function judged on the mid SAX slice cropped tight to the LV (zoom: lv, ROI_SCALE 1.6)

#: How the default demo model is trained (see build_trained_demo_model).
#: 160 default-size phantoms (what `cmr-ai demo` sends; written in 2 processes), their
#: preparation and 30 epochs: about 9 min on 2 idle CPU cores (README "The demo model").
#: The vision tower reads 256 px in 32 px patches: the same 64 image tokens as the random
#: model, at twice the resolution.
DEMO_TRAIN_RECIPE: dict = {
    "phantoms": 160, "phantom_seed": 10000, "slices": 8, "phases": 12, "size": 128,
    "epochs": 30, "lr": 2e-3, "batch_size": 8, "warmup_steps": 20, "seed": 0, "image_size": 256,
    "patch_size": 32,
}

# Sizes. Text linears: 128x128 (q, o), 128x64 (k, v with 2 KV heads), 128x256 (MLP);
# all multiples of 64, as bitsandbytes 4-bit needs.
IMAGE_SIZE = 128
PATCH_SIZE = 16
VISION_HIDDEN = 64
TEXT_HIDDEN = 128
TEXT_LAYERS = 2
TOKENIZER_VOCAB = 1024

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
IMAGE_TOKEN = "<image>"
ROLE_TOKENS = ("USER:", "ASSISTANT:", "SYSTEM:")

# LLaVA-1.5 ("llava-hf/llava-1.5-*-hf") chat template: images first, then text, roles in
# upper case; the tokenizer adds <s> itself.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'SYSTEM: ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ item['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# What the tokenizer learns from: the words of cardiac MR findings, their answer options,
# report phrases, digits and punctuation.
_CORPUS = """
USER: ASSISTANT: Answer with one of the options. Answer with exactly one option.
Options: yes; no; none; small; moderate; large; normal; abnormal; present; absent;
mild; mildly; moderately; severely; reduced; preserved; increased; decreased; dilated;
not dilated; uncertain; indeterminate; cannot be assessed; non-diagnostic.
Is there a pericardial effusion? How large is the pericardial effusion?
Is the left ventricle dilated? Is the right ventricle dilated? Is the left atrium enlarged?
What is the left ventricular systolic function? What is the right ventricular function?
Estimate the left ventricular ejection fraction. Is there regional wall motion abnormality?
Is there late gadolinium enhancement? What is the pattern of late gadolinium enhancement?
subendocardial; transmural; mid-wall; midwall; epicardial; subepicardial; patchy; diffuse.
Is there left ventricular hypertrophy? Is the wall thickness increased?
Is there a left ventricular thrombus? Is there a pleural effusion? Is there myocardial oedema?
Is there valvular regurgitation? mitral regurgitation; aortic regurgitation;
tricuspid regurgitation; aortic stenosis; bicuspid aortic valve.
Findings are consistent with myocardial infarction, myocarditis, amyloidosis, sarcoidosis,
hypertrophic cardiomyopathy, dilated cardiomyopathy, non-compaction, pericarditis.
hypokinesia; hypokinetic; akinesia; akinetic; dyskinesia; dyskinetic; aneurysm.
The left ventricle is normal in size with normal systolic function.
The right ventricle is normal in size and function. No pericardial effusion.
There is no late gadolinium enhancement. No regional wall motion abnormality.
Impression: normal cardiac MRI. Impression: findings suggest myocardial infarction.
Summarise the findings in one short impression. Write a short impression.
short axis; short-axis; SAX; long axis; two-chamber; three-chamber; four-chamber;
2CH; 3CH; 4CH; LVOT; cine; LGE; T1; T2; mapping; localizer; basal; mid; apical; apex;
septal; septum; anterior; anteroseptal; inferoseptal; inferior; inferolateral;
anterolateral; lateral; wall; segment; segments; myocardium; myocardial; ventricle;
ventricular; atrium; atrial; left; right; LV; RV; LA; RA; end-diastolic; end-systolic;
end-diastole; end-systole; ED; ES; diastole; systole; phase; slice; image; images;
volume; mass; ejection; fraction; EF; percent; %; mL; g; mm; cm; ms; bpm.
the a an of in on at with and or is are was be no not there this that these which what
how where when for to from by as it its image shows shown seen visible likely possibly
probably suggest suggests suggestive consistent compatible further evaluation recommended
AI draft; preliminary; unverified; please verify; critical finding.
0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 35 40 45 50 55 60 65 70 75 80 90 100
. , ; : ? ! ( ) [ ] - / + = < > ' " * _
"""


@contextlib.contextmanager
def quiet_hf_bars():
    """transformers' own tqdm bars ("Loading weights", "Writing model shards") off while our
    Bars show the progress; the previous setting comes back afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def models_cache_dir() -> Path:
    """The models cache root: ``$CMR_AI_MODEL_CACHE`` or ``./var/models`` (read now)."""
    env = os.environ.get("CMR_AI_MODEL_CACHE", "").strip()
    return Path(env).expanduser() if env else _DEFAULT_CACHE


def demo_model_dir(cache_dir: Path | str | None = None) -> Path:
    """Where the demo model lives: ``<cache_dir or models_cache_dir()>/demo``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else models_cache_dir()
    return root / DEMO_MODEL_NAME


#: The default demo model directory, as the environment said at import time. Prefer
#: :func:`demo_model_dir`, which reads ``CMR_AI_MODEL_CACHE`` when called.
DEMO_MODEL_DIR: Path = demo_model_dir()


def is_complete_model_dir(path: Path | str, seed: int | None = None, trained: bool = False,
                          sizes: dict | None = None, recipe: dict | None = None) -> bool:
    """True when ``path`` holds a finished demo build of the current version (and seed);
    with ``trained``, a finished trained demo model of the current recipe."""
    path = Path(path)
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    if bool(marker.get("trained")) != trained:
        return False
    if trained and marker.get("recipe") != (recipe or DEMO_TRAIN_RECIPE):
        return False
    if marker.get("version") != (_TRAINED_VERSION if trained else _DEMO_VERSION):
        return False
    if seed is not None and marker.get("seed") != seed:
        return False
    defaults = {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "vision_hidden": VISION_HIDDEN,
                "vision_layers": 2}
    if sizes and any(marker.get(k, defaults.get(k)) != v for k, v in sizes.items()):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")
    return all((path / name).is_file() for name in needed)


def _build_tokenizer():
    """A byte-level BPE tokenizer trained on :data:`_CORPUS`, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the lines a little so frequent words get merged into whole tokens.
    lines = [ln for ln in _CORPUS.splitlines() if ln.strip()]
    tok.train_from_iterator(lines * 3, trainer=trainer)
    # Role markers are single tokens, and special, so decoding with
    # skip_special_tokens=True never shows them.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ROLE_TOKENS])
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Like the Llama tokenizer of LLaVA-1.5: <s> in front, no </s> at the end.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=1024,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build(out_dir: Path, seed: int, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE,
           vision_hidden: int = VISION_HIDDEN, vision_layers: int = 2) -> None:
    """Write a complete demo model into ``out_dir`` (which exists and is empty)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _build_tokenizer()
    vocab = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        # Wider than the default 0.02 so a random model gives visibly different answers.
        initializer_range=0.08,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    n_patches = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=n_patches,  # "default" drops CLS: one token per patch
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=40,
    )

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        # CLIP prepends a CLS token; "default" then drops it again.
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )

    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / _MARKER).write_text(
        json.dumps({"version": _DEMO_VERSION, "seed": seed, "vocab_size": vocab,
                    "image_size": image_size, "patch_size": patch_size, "vision_hidden": vision_hidden,
                    "vision_layers": vision_layers}, indent=2)
    )


def build_demo_model(out_dir: Path | str | None = None, seed: int = 0, image_size: int = IMAGE_SIZE,
                     patch_size: int = PATCH_SIZE, vision_hidden: int = VISION_HIDDEN,
                     vision_layers: int = 2) -> Path:
    """Build the tiny random demo LLaVA into ``out_dir``, or reuse a finished build there.

    The build goes to a temporary sibling directory that is renamed into place when it
    is complete, so a crash never leaves a half-written model behind and two processes
    building at once both end up with one good directory.

    Parameters
    ----------
    out_dir:
        Target directory; default :func:`demo_model_dir`.
    seed:
        Seed of the random weights. A finished build with another seed (or an older
        recipe version, or other image and patch sizes) is replaced.
    image_size, patch_size:
        The vision tower's input edge and patch edge in pixels (``(image_size //
        patch_size) ** 2`` image tokens); the trained demo model uses a larger image.

    Returns
    -------
    Path
        ``out_dir``, holding ``config.json``, ``model.safetensors``, tokenizer and
        processor files.

    Raises
    ------
    OSError
        When ``out_dir`` cannot be written.
    """
    out_dir = Path(out_dir).expanduser() if out_dir is not None else demo_model_dir()
    sizes = {"image_size": image_size, "patch_size": patch_size, "vision_hidden": vision_hidden,
             "vision_layers": vision_layers}
    if is_complete_model_dir(out_dir, seed, sizes=sizes):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        with quiet_hf_bars():
            _build(tmp, seed, image_size, patch_size, vision_hidden, vision_layers)
        # mkdtemp makes the directory 0700: open it up like any other cache entry.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out_dir.exists():
            if is_complete_model_dir(out_dir, seed, sizes=sizes):  # another process won the race
                return out_dir
            stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stale-", dir=out_dir.parent))
            os.replace(out_dir, stale / out_dir.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not is_complete_model_dir(out_dir, seed, sizes=sizes):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_trained_demo_model(out_dir: Path | str | None = None, bars=None, recipe: dict | None = None) -> Path:
    """The default demo model: the random demo model trained on labelled phantoms; built once.

    Writes :data:`DEMO_TRAIN_RECIPE` ``["phantoms"]`` labelled phantoms (fixed seeds from
    ``phantom_seed``, EF and effusion spread over every option, see
    :func:`plugin.labels.write_phantom_set`) into a temporary folder, trains the random
    demo model on them with :func:`worker.model.train.train` (the recipe's epochs, lr,
    batch size, seed), and renames the result into ``out_dir`` (default
    :func:`demo_model_dir`) with the marker written last. A finished build of the current
    recipe version is reused. ``bars`` (a :class:`plugin.progress.Bars`) shows the
    phantoms, the preparation and the training; without one, progress lines go to stderr.
    """
    from plugin.labels import write_phantom_set
    from plugin.progress import Bars
    from worker.model.train import TrainConfig, train

    out_dir = Path(out_dir).expanduser() if out_dir is not None else demo_model_dir()
    r = dict(DEMO_TRAIN_RECIPE, **(recipe or {}))
    if is_complete_model_dir(out_dir, trained=True, recipe=r):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.train-", dir=out_dir.parent))
    own_bars = Bars(True) if bars is None else None
    try:
        b = bars if bars is not None else own_bars.__enter__()
        task = b.add("demo model: writing training phantoms (once; cached)", total=r["phantoms"])
        write_phantom_set(tmp / "data", r["phantoms"], seed=r["phantom_seed"], slices=r["slices"],
                          phases=r["phases"], size=r["size"], on_study=lambda k, n: task.advance(),
                          workers=min(2, os.cpu_count() or 1))
        task.done()
        model_dir = tmp / "model"
        cfg = TrainConfig(epochs=r["epochs"], lr=r["lr"], batch_size=r["batch_size"], seed=r["seed"],
                          warmup_steps=r["warmup_steps"], image_size=r["image_size"], patch_size=r["patch_size"])
        train(tmp / "data", model_dir, config=cfg, bars=b)
        shutil.rmtree(model_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(model_dir / "prepared", ignore_errors=True)
        (model_dir / _MARKER).write_text(json.dumps({"version": _TRAINED_VERSION, "trained": True,
                                                     "recipe": r}, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(model_dir, 0o777 & ~umask)
        for f in model_dir.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out_dir.exists():
            if is_complete_model_dir(out_dir, trained=True, recipe=r):  # another process won the race
                return out_dir
            stale = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.stale-", dir=out_dir.parent))
            os.replace(out_dir, stale / out_dir.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(model_dir, out_dir)
        except OSError:
            if not is_complete_model_dir(out_dir, trained=True, recipe=r):
                raise
    finally:
        if own_bars is not None:
            own_bars.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_demo_adapter(model_dir: Path | str, out_dir: Path | str, seed: int = 0, rank: int = 4) -> Path:
    """Write a tiny random LoRA adapter for the demo model (tests, the adapter code path).

    A peft ``LoraConfig`` on the *language model's* ``q_proj`` / ``v_proj`` (the CLIP
    vision tower has layers of the same names, left alone), with random A **and** B
    matrices (``init_lora_weights=False``) so the adapter really changes the scores,
    saved with ``save_pretrained`` (``adapter_config.json``, ``adapter_model.safetensors``).

    Parameters
    ----------
    model_dir:
        The base model, e.g. from :func:`build_demo_model`.
    out_dir:
        Where the adapter goes (created).
    seed:
        Seed of the random LoRA weights: another seed gives another adapter.
    rank:
        LoRA rank ``r``.

    Returns
    -------
    Path
        ``out_dir``.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    out_dir = Path(out_dir).expanduser()
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|v_proj)",
        init_lora_weights=False,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def resolve_model_path(path_spec: str, cache_dir: Path | str | None = None) -> Path:
    """Turn a ``models:`` entry of the config into a local model directory.

    Parameters
    ----------
    path_spec:
        ``"demo"`` for the built-in tiny trained model (trained on first use, minutes),
        ``"demo-random"`` for the untrained random one (seconds), else the path
        of a local directory holding a Hugging Face checkpoint. Hub ids are not accepted:
        nothing is ever downloaded.
    cache_dir:
        Models cache root for the demo model; default :func:`models_cache_dir`.

    Returns
    -------
    Path
        An existing directory.

    Raises
    ------
    worker.model.engine.ModelLoadError
        When ``path_spec`` is empty or not an existing directory.
    """
    from worker.model.engine import ModelLoadError

    spec = (path_spec or "").strip()
    if not spec:
        raise ModelLoadError("", "model path is empty: give a local directory or 'demo'")
    if spec == DEMO_MODEL_NAME:
        out = demo_model_dir(cache_dir)
        if os.environ.get("CMR_AI_NO_DEMO_TRAINING") == "1" and not is_complete_model_dir(out, trained=True):
            # the test suite sets it: a test must name its model directory, never train for minutes
            raise ModelLoadError(str(out), "the trained demo model is not built and CMR_AI_NO_DEMO_TRAINING=1 "
                                           "forbids training it here (use 'demo-random' or a model directory)")
        return build_trained_demo_model(out)
    if spec == DEMO_RANDOM_NAME:
        root = Path(cache_dir).expanduser() if cache_dir is not None else models_cache_dir()
        return build_demo_model(root / DEMO_RANDOM_NAME)
    path = Path(spec).expanduser()
    if not path.is_dir():
        why = "is not a directory" if path.exists() else "does not exist"
        raise ModelLoadError(
            path,
            f"model directory {why}; models load from a local directory only "
            "(no hub downloads), or use 'demo' for the built-in test model",
        )
    return path
