"""Load a LLaVA-style checkpoint from a local directory and answer template findings.

The GPU worker loads one model per process (:func:`get_engine`) and, for every
question of an :class:`~worker.bundle.AnalysisBundle`, *scores* the fixed answer
options rather than parsing free text (:meth:`Engine.score_options`); a short free-text
impression is generated last (:meth:`Engine.generate`). :func:`run_bundle` is the one
path that inference, ``cmr-ai eval`` and ``cmr-ai train`` share.

Nothing is ever downloaded: ``HF_HUB_OFFLINE=1`` is set before transformers is
imported and every ``from_pretrained`` gets a local directory and
``local_files_only=True``.

Quantisation (bitsandbytes)
---------------------------
``nf4`` (default) puts the *language model's* linear layers in 4-bit NF4 with double
quantisation; the CLIP vision tower, the multi-modal projector and ``lm_head`` stay in
the compute dtype (:data:`SKIP_MODULES`, the module names of transformers 5's
``LlavaForConditionalGeneration``): they are small, and quantising them costs accuracy
of the image features and of the option log-probabilities we read off ``lm_head``.
``int8`` is LLM.int8() with the same skips; ``none`` loads plain weights.

Compute dtype: on CUDA bfloat16 where the GPU supports it, else float16. On the CPU
float32: bitsandbytes' CPU 4-bit path dequantises to the compute dtype and runs a plain
matmul, and float32 is the dtype every CPU runs fast and exactly (bfloat16 matmuls are
emulated, hence slower, on CPUs without AVX512-BF16/AMX, and lose precision in the
option log-probabilities for no gain in memory: the 4-bit weights dominate that).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers (and huggingface_hub) are imported

import torch

from worker.bundle import AnalysisBundle, FindingResult, InferenceResult

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image

__all__ = [
    "SKIP_MODULES",
    "Engine",
    "ModelLoadError",
    "Quantization",
    "clear_engines",
    "fingerprint",
    "get_engine",
    "model_version",
    "option_logprob_sums",
    "option_probabilities",
    "question_mosaic",
    "question_text",
    "run_bundle",
    "tile",
]

log = logging.getLogger(__name__)

# bitsandbytes int8 warns on every matmul whose input is not fp16 (float32 on the CPU).
warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")

#: Modules bitsandbytes must leave alone, as transformers 5 names them in
#: ``LlavaForConditionalGeneration`` (``model.vision_tower.encoder.layers.0...``,
#: ``model.multi_modal_projector.linear_1``, ``lm_head``). Patterns match from the start
#: of a module name up to a dot, so the vision tower's children are all skipped.
SKIP_MODULES: tuple[str, ...] = ("model.vision_tower", "model.multi_modal_projector", "lm_head")

# Files that make up a model version, for the fingerprint (weights are *.safetensors /
# *.bin and their index files).
_CONFIG_FILES = ("config.json", "generation_config.json")
_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a peft adapter


CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


class ModelLoadError(RuntimeError):
    """A model directory cannot be loaded; the message names the directory and why.

    Attributes
    ----------
    path:
        The model directory as given.
    reason:
        What is wrong with it.
    """

    def __init__(self, path: Path | str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load model from {self.path!r}: {reason}")


class Quantization(str, Enum):
    """How the language model's weights are held in memory."""

    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat, double quantisation
    INT8 = "int8"  # bitsandbytes LLM.int8()
    NONE = "none"  # the compute dtype, unquantised

    @classmethod
    def parse(cls, value: "Quantization | str") -> "Quantization":
        """Convert a config string; raise ValueError naming the argument and the choices."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            choices = ", ".join(repr(q.value) for q in cls)
            raise ValueError(f"Argument 'quantization' must be one of {choices}, got {value!r}") from None


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def _resolve_device(device: str) -> str:
    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"Argument 'device' is {device!r} but CUDA is not available on this host")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"Argument 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def _resolve_dtype(compute_dtype: str | None, device: str) -> torch.dtype:
    if compute_dtype is None:
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # see the module docstring
    try:
        return _DTYPES[str(compute_dtype).strip().lower()]
    except KeyError:
        raise ValueError(
            f"Argument 'compute_dtype' must be one of {sorted(_DTYPES)} or None, got {compute_dtype!r}"
        ) from None


# --------------------------------------------------------------------------- fingerprint

_file_digests: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        cached = _file_digests.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _digest_lock:
        _file_digests[key] = digest
    return digest


def _model_files(path: Path) -> list[Path]:
    names = set(_CONFIG_FILES) | set(_PROCESSOR_FILES)
    files = [
        p
        for p in path.iterdir()
        if p.is_file() and (p.name in names or p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"))
    ]
    return sorted(files, key=lambda p: p.name)


def _adapter_files(adapter: Path) -> list[Path]:
    files = [
        p
        for p in adapter.iterdir()
        if p.is_file() and (p.name == _ADAPTER_CONFIG or p.name.endswith(_WEIGHT_SUFFIXES))
    ]
    return sorted(files, key=lambda p: p.name)


def fingerprint(
    path: Path | str, quantization: Quantization | str, adapter: Path | str | None = None
) -> str:
    """A short id of a model version as loaded: 16 hex digits of a SHA-256.

    Covers the weight files, ``config.json`` / ``generation_config.json``, the processor
    and tokenizer files (names and contents), the quantisation setting and, with
    ``adapter``, the LoRA adapter's ``adapter_config.json`` and weight files, so the same
    checkpoint loaded as nf4 and unquantised, or with another adapter, gives another
    fingerprint. Without an adapter the value is what it was before adapters existed.
    File digests are memoised per (path, size, mtime) so reloading a 14 GB checkpoint
    does not re-read it.
    """
    path = Path(path)
    h = hashlib.sha256()
    for f in _model_files(path):
        h.update(f.name.encode() + b"\0" + _file_sha256(f).encode() + b"\n")
    h.update(b"quantization=" + Quantization.parse(quantization).value.encode())
    if adapter is not None:
        h.update(b"\nadapter:\n")
        for f in _adapter_files(Path(adapter)):
            h.update(f.name.encode() + b"\0" + _file_sha256(f).encode() + b"\n")
    return h.hexdigest()[:16]


def model_version(model_fingerprint: str, template: str, template_hash: str) -> str:
    """The version reported for a result: 16 hex digits of SHA-256(model fingerprint, template).

    ``template`` is the template name and ``template_hash`` the SHA-256 of its YAML file
    (``AnalysisBundle.template_hash``, set by ``prepare``), so editing a question's
    wording gives the SR another algorithm version and device UID, like new weights do.
    """
    h = hashlib.sha256()
    h.update(f"model={model_fingerprint}\ntemplate={template}\ntemplate_sha256={template_hash}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- images


def tile(
    images: Sequence["Image"],
    labels: Optional[Sequence[str]] = None,
    cell: int = 336,
    background: tuple[int, int, int] = (0, 0, 0),
) -> "Image":
    """Put several images into ONE square mosaic, since LLaVA-1.5 reads one image a prompt.

    The grid has ``ceil(sqrt(n))`` columns; each image is fitted into a ``cell`` x
    ``cell`` square keeping its aspect ratio, and the grid is centred on a square black
    canvas (square, so the processor's centre crop cuts nothing off). A single image is
    only padded to a square, at its own resolution.

    Parameters
    ----------
    images:
        One or more PIL images (any mode; converted to RGB).
    labels:
        Optional text burnt into the top-left corner of each tile (e.g. ``"SAX mid ED"``),
        same length as ``images``.
    cell:
        Tile edge in pixels for two or more images.

    Raises
    ------
    ValueError
        When ``images`` is empty or ``labels`` has another length.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    imgs = [im.convert("RGB") for im in images]
    if not imgs:
        raise ValueError("Argument 'images' of tile() is empty: need at least one image")
    if labels is not None and len(labels) != len(imgs):
        raise ValueError(f"Argument 'labels' has {len(labels)} entries for {len(imgs)} images")

    if len(imgs) == 1:
        im = imgs[0]
        side = max(im.size)
        canvas = PILImage.new("RGB", (side, side), background)
        canvas.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        boxes = [((side - im.width) // 2, (side - im.height) // 2)]
    else:
        cols = math.ceil(math.sqrt(len(imgs)))
        rows = math.ceil(len(imgs) / cols)
        side = cell * max(cols, rows)
        canvas = PILImage.new("RGB", (side, side), background)
        x0 = (side - cols * cell) // 2
        y0 = (side - rows * cell) // 2
        boxes = []
        for i, im in enumerate(imgs):
            scale = min(cell / im.width, cell / im.height)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            fitted = im.resize(size, PILImage.BICUBIC)
            r, c = divmod(i, cols)
            left = x0 + c * cell + (cell - size[0]) // 2
            top = y0 + r * cell + (cell - size[1]) // 2
            canvas.paste(fitted, (left, top))
            boxes.append((x0 + c * cell, y0 + r * cell))

    if labels:
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        for (left, top), text in zip(boxes, labels):
            if not text:
                continue
            l, t, r, b = draw.textbbox((left + 2, top + 2), text, font=font)
            draw.rectangle((l - 2, t - 2, r + 2, b + 2), fill=(0, 0, 0))
            draw.text((left + 2, top + 2), text, fill=(255, 255, 255), font=font)
    return canvas


# --------------------------------------------------------------------------- engine


@dataclass
class Engine:
    """A loaded vision-language model plus its processor. Create with :meth:`load`."""

    path: Path
    model: Any
    processor: Any
    quantization: Quantization
    device: str  # "cpu" or "cuda:N"
    compute_dtype: torch.dtype
    fingerprint: str
    adapter: Optional[Path] = None  # the LoRA adapter directory, when one is loaded
    load_seconds: float = 0.0
    normalization: str = "mean"  # how score_options normalises, see there
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: Path | str,
        *,
        quantization: Quantization | str = "nf4",
        device: str = "auto",
        compute_dtype: str | None = None,
        adapter: Path | str | None = None,
    ) -> "Engine":
        """Load a Hugging Face image-text-to-text checkpoint from a local directory.

        Parameters
        ----------
        path:
            Directory with ``config.json``, weights (``*.safetensors`` / ``*.bin``) and the
            processor / tokenizer files, as written by ``save_pretrained``.
        quantization:
            ``"nf4"`` (default), ``"int8"`` or ``"none"``; see the module docstring.
        device:
            ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        compute_dtype:
            ``"bfloat16"``, ``"float16"`` or ``"float32"``; default bf16/fp16 on CUDA,
            float32 on the CPU.
        adapter:
            Optional local directory of a peft LoRA adapter (``adapter_config.json`` plus
            ``adapter_model.safetensors``, as ``save_pretrained`` writes it) trained on this
            base model; injected unmerged (``PreTrainedModel.load_adapter``), so it works
            on top of the nf4 / int8 layers too.

        Returns
        -------
        Engine
            In eval mode on ``device``.

        Raises
        ------
        ModelLoadError
            When the directory does not exist, holds no model (no ``config.json``, no
            weights), lacks processor or tokenizer files, or the processor and the model
            disagree on the number of image tokens; when ``adapter`` is not a directory
            holding ``adapter_config.json`` or does not fit the model.
        ValueError
            For a bad ``quantization``, ``device`` or ``compute_dtype`` argument.
        """
        os.environ["HF_HUB_OFFLINE"] = "1"
        t0 = time.perf_counter()
        quant = Quantization.parse(quantization)
        dev = _resolve_device(device)
        dtype = _resolve_dtype(compute_dtype, dev)
        path = _check_model_dir(path)
        adapter_dir = _check_adapter_dir(adapter) if adapter is not None else None

        processor = _load_processor(path)
        model = _load_model(path, quant, dev, dtype)
        if adapter_dir is not None:
            _load_adapter(model, adapter_dir)
        model.eval()
        _check_image_tokens(path, model, processor)

        engine = cls(
            path=path,
            model=model,
            processor=processor,
            quantization=quant,
            device=dev,
            compute_dtype=dtype,
            fingerprint=fingerprint(path, quant, adapter_dir),
            adapter=adapter_dir,
        )
        if quant is Quantization.NF4:
            engine._check_quantized_layout()
        engine.load_seconds = time.perf_counter() - t0
        log.info(
            "loaded model %s%s (%s, %s, compute %s) fingerprint %s in %.1f s",
            path, f" + adapter {adapter_dir}" if adapter_dir else "", quant.value, dev,
            str(dtype).removeprefix("torch."), engine.fingerprint, engine.load_seconds,
        )
        return engine

    def linear_layers(self) -> dict[str, str]:
        """Every linear layer's module name -> class name (``Linear``, ``Linear4bit``, ...)."""
        out = {}
        for name, module in self.model.named_modules():
            cls_name = type(module).__name__
            if isinstance(module, torch.nn.Linear) or cls_name.startswith("Linear"):
                out[name] = cls_name
        return out

    def _check_quantized_layout(self) -> None:
        layers = self.linear_layers()
        wrong = [n for n, c in layers.items() if c == "Linear4bit" and n.startswith(SKIP_MODULES)]
        lm = [c for n, c in layers.items() if ".language_model." in f".{n}"]
        if wrong:
            raise ModelLoadError(self.path, f"nf4 quantised modules that must stay in float: {wrong[:5]}")
        if lm and "Linear4bit" not in lm:
            log.warning("%s: nf4 requested but no language-model linear layer is Linear4bit", self.path)

    # ------------------------------------------------------------------ prompts

    def chat_prompt(self, text: str, n_images: int) -> str:
        """The model's chat template applied to one user turn, ending with the assistant cue."""
        content: list[dict] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": text})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    @staticmethod
    def option_instruction(question: str, option_texts: Sequence[str]) -> str:
        """The user text of a scored question: the question and the options to choose from."""
        opts = "; ".join(o.strip() for o in option_texts)
        return f"{question.strip()}\nAnswer with exactly one of these options: {opts}."

    def _encode(self, prompt: str, image: "Image | None") -> dict[str, torch.Tensor]:
        kwargs: dict[str, Any] = {"text": [prompt], "return_tensors": "pt"}
        if image is not None:
            kwargs["images"] = [image]
        enc = self.processor(**kwargs)
        out = {}
        for k, v in enc.items():
            if not isinstance(v, torch.Tensor):
                continue
            v = v.to(self.device)
            if k == "pixel_values":
                v = v.to(self._vision_dtype())
            out[k] = v
        return out

    def _vision_dtype(self) -> torch.dtype:
        inner = getattr(self.model, "model", self.model)
        tower = getattr(inner, "vision_tower", None)
        if tower is not None:
            for p in tower.parameters():
                if p.is_floating_point():
                    return p.dtype
        return self.compute_dtype

    @staticmethod
    def _one_image(images: Sequence["Image"] | None) -> "Image | None":
        if not images:
            return None
        return tile(images)  # one image: padded to a square, so the centre crop cuts nothing

    def _continuations(self, prompt: str, option_texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each option as the assistant's answer after ``prompt``.

        Tokenises ``prompt + " " + option`` as a whole and keeps what follows the
        prompt's own tokens, so the tokens are those the tokenizer would produce in
        context (SentencePiece and BPE treat a leading space differently).
        """
        tok = self.processor.tokenizer
        base = tok(prompt, add_special_tokens=False)["input_ids"]
        out = []
        for opt in option_texts:
            text = opt.strip()
            full = tok(prompt + " " + text, add_special_tokens=False)["input_ids"]
            n = 0
            while n < len(base) and n < len(full) and base[n] == full[n]:
                n += 1
            ids = full[n:] if n == len(base) else tok(" " + text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"option text {opt!r} encodes to no tokens")
            out.append(list(ids))
        return out

    # ------------------------------------------------------------------ scoring

    def option_inputs(
        self, images: Sequence["Image"], question: str, option_texts: Sequence[str]
    ) -> tuple[str, dict[str, torch.Tensor], list[list[int]]]:
        """What the model is fed for a scored question: (chat prompt, encoded prompt, option token ids).

        The one place that turns images + question + options into model inputs; scoring
        (:meth:`option_logprobs`) and training (:mod:`worker.model.train`) both use it.
        """
        prompt = self.chat_prompt(self.option_instruction(question, option_texts), 1 if images else 0)
        conts = self._continuations(prompt, option_texts)
        with torch.no_grad():
            inputs = self._encode(prompt, self._one_image(images))
        return prompt, inputs, conts

    def option_logprobs(
        self, images: Sequence["Image"], question: str, option_texts: Sequence[str]
    ) -> list[tuple[float, int]]:
        """Sum of the log-probabilities of each option's tokens as the answer, and its token count.

        The prompt (image + question + option list) runs through the model once; its KV
        cache is repeated for the options, which then go through in ONE right-padded
        batch. The first answer token is scored from the prompt's last logits.
        """
        if not option_texts:
            raise ValueError("Argument 'option_texts' is empty: need at least one option")
        prompt, inputs, conts = self.option_inputs(images, question, option_texts)
        with self._lock, torch.inference_mode():
            try:
                return self._logprobs_cached(inputs, conts)
            except (AttributeError, NotImplementedError, TypeError) as exc:  # exotic cache type
                log.debug("prompt cache reuse failed (%s); scoring full sequences", exc)
                return self._logprobs_full(inputs, conts)

    def _logprobs_cached(self, inputs: dict[str, torch.Tensor], conts: list[list[int]]) -> list[tuple[float, int]]:
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        sums = [float(first[ids[0]]) for ids in conts]
        longest = max(len(ids) for ids in conts)
        if longest > 1:
            n = len(conts)
            prompt_len = inputs["input_ids"].shape[1]
            cache = out.past_key_values
            cache.batch_repeat_interleave(n)
            pad = self._pad_id()
            width = longest - 1  # feed tokens 0..k-2, read predictions of tokens 1..k-1
            ids = torch.full((n, width), pad, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for i, c in enumerate(conts):
                ids[i, : len(c) - 1] = torch.tensor(c[:-1])
                mask[i, : len(c) - 1] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            prompt_mask = inputs["attention_mask"].expand(n, -1)
            positions = (torch.arange(width, device=self.device) + prompt_len).unsqueeze(0).expand(n, -1)
            step = self.model(
                input_ids=ids,
                attention_mask=torch.cat([prompt_mask, mask], dim=1),
                position_ids=positions,
                past_key_values=cache,
                use_cache=False,
            )
            logp = torch.log_softmax(step.logits.float(), dim=-1)
            for i, c in enumerate(conts):
                for j in range(1, len(c)):
                    sums[i] += float(logp[i, j - 1, c[j]])
        return [(s, len(c)) for s, c in zip(sums, conts)]

    def _logprobs_full(self, inputs: dict[str, torch.Tensor], conts: list[list[int]]) -> list[tuple[float, int]]:
        """Reference path: prompt + option as full sequences in one right-padded batch."""
        (sums,) = option_logprob_sums(self.model, [(inputs, conts)], self._pad_id())
        return [(float(v), len(c)) for v, c in zip(sums, conts)]

    def score_options(
        self,
        images: Sequence["Image"],
        question: str,
        option_texts: Sequence[str],
        *,
        normalization: str | None = None,
    ) -> list[float]:
        """Probability of each option as the answer to ``question`` about ``images``.

        Each option is scored by the log-likelihood of its tokens as the assistant's reply
        to a prompt holding the image(s), the question and the list of options. By
        default (``normalization="mean"``) the score is the *mean* log-probability per
        token, so "moderate" (2 tokens) is not penalised against "no" (1 token); ``"sum"``
        uses the plain sum. A softmax across the options turns the scores into
        probabilities (sum 1, same order as ``option_texts``). Deterministic: eval mode,
        no sampling, ``torch.inference_mode``.

        Parameters
        ----------
        images:
            Zero or more PIL images; several are tiled into one (:func:`tile`).
        question:
            The question text.
        option_texts:
            The answers to score, in the caller's order.
        normalization:
            ``"mean"`` (default: :attr:`normalization`) or ``"sum"``.

        Raises
        ------
        ValueError
            When ``option_texts`` is empty or ``normalization`` is unknown.
        """
        norm = normalization or self.normalization
        if norm not in ("mean", "sum"):
            raise ValueError(f"Argument 'normalization' must be 'mean' or 'sum', got {norm!r}")
        return option_probabilities(self.option_logprobs(images, question, option_texts), norm)

    # ------------------------------------------------------------------ generation

    def generate(self, images: Sequence["Image"], prompt: str, max_new_tokens: int = 40) -> str:
        """Greedy decoding of a short answer to ``prompt``; special tokens stripped."""
        chat = self.chat_prompt(prompt, 1 if images else 0)
        image = self._one_image(images)
        with self._lock, torch.inference_mode():
            inputs = self._encode(chat, image)
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self._pad_id(),
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        # A byte-level tokenizer cut off mid-character decodes to U+FFFD: drop it.
        # Control characters (tabs, stray escapes) are not valid in DICOM text VRs: one space each.
        return " ".join(CONTROL_CHARS.sub(" ", text.replace("\ufffd", "")).split())

    def _pad_id(self) -> int:
        tok = self.processor.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0  # pragma: no cover


def option_logprob_sums(
    model: Any, items: Sequence[tuple[dict[str, torch.Tensor], list[list[int]]]], pad_id: int
) -> list[torch.Tensor]:
    """Summed log-probability of each option's tokens after its prompt, for several prompts at once.

    ``items`` holds (encoded prompt as from :meth:`Engine._encode`, option token ids) pairs;
    every prompt + option becomes one sequence of a right-padded batch (the prompt's
    ``pixel_values`` repeated per option) that goes through ``model`` in ONE forward pass.
    Returns, per item, a float32 tensor of the options' sums. Differentiable: inference
    calls it under ``torch.inference_mode`` (:meth:`Engine._logprobs_full`), training
    (:mod:`worker.model.train`) takes the gradient of a loss on it.
    """
    device = items[0][0]["input_ids"].device
    rows = []  # (prompt ids, continuation, pixel values or None)
    for inputs, conts in items:
        for c in conts:
            rows.append((inputs["input_ids"][0], c, inputs.get("pixel_values")))
    width = max(p.shape[0] + len(c) for p, c, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, (p, c, _) in enumerate(rows):
        ids[i, : p.shape[0]] = p
        ids[i, p.shape[0] : p.shape[0] + len(c)] = torch.tensor(c, device=device)
        mask[i, : p.shape[0] + len(c)] = 1
    extra = {}
    pixels = [pv for _, _, pv in rows if pv is not None]
    if pixels:
        if len(pixels) != len(rows):
            raise ValueError("option_logprob_sums: mixing prompts with and without an image in one batch")
        extra["pixel_values"] = torch.cat(pixels, dim=0)
    # Only the positions that predict an option token need logits (lm_head over the whole
    # vocabulary at every prompt position is most of the work otherwise).
    keep = sorted({p.shape[0] - 1 + j for p, c, _ in rows for j in range(len(c))})
    col = {pos: k for k, pos in enumerate(keep)}
    out = model(input_ids=ids, attention_mask=mask, use_cache=False,
                logits_to_keep=torch.tensor(keep, device=device), **extra)
    r_idx, c_idx, t_idx, owner = [], [], [], []
    for i, (p, c, _) in enumerate(rows):
        for j, tok_id in enumerate(c):
            r_idx.append(i)
            c_idx.append(col[p.shape[0] - 1 + j])
            t_idx.append(tok_id)
            owner.append(i)
    picked = out.logits[torch.tensor(r_idx, device=device), torch.tensor(c_idx, device=device)].float()
    token_logp = torch.log_softmax(picked, dim=-1).gather(1, torch.tensor(t_idx, device=device)[:, None])[:, 0]
    per_row = torch.zeros(len(rows), dtype=token_logp.dtype, device=device)
    per_row = per_row.index_add(0, torch.tensor(owner, device=device), token_logp)
    sums = list(per_row.unbind(0))
    res, k = [], 0
    for _, conts in items:
        res.append(torch.stack(sums[k : k + len(conts)]))
        k += len(conts)
    return res


def question_text(bundle: AnalysisBundle, question: Any) -> str:
    """The question as the model reads it: the bundle's clinical context (if any), then the text."""
    return f"{bundle.clinical_context}\n{question.text}" if bundle.clinical_context else question.text


def question_mosaic(pil: dict, chosen: Sequence[Any], zoom: str = "") -> list["Image"]:
    """The image list of a scored question: ONE labelled mosaic of ``chosen`` (none when empty).

    With ``zoom="lv"`` each image that has a ``roi`` (the LV region ``prepare`` found, shared
    by the ED and ES images of a slice) is cropped to it first, so the ventricle fills its
    tile instead of a fraction of it; images without one are shown whole.
    """
    if not chosen:
        return []
    if zoom not in ("", "lv"):
        raise ValueError(f"unknown zoom {zoom!r}: expected 'lv' or ''")
    imgs = []
    for im in chosen:
        img = pil[im.key]
        if zoom == "lv" and im.roi is not None:
            img = img.crop(tuple(im.roi))
        imgs.append(img)
    return [tile(imgs, labels=[im.label for im in chosen])]


# --------------------------------------------------------------------------- loading helpers


def _check_model_dir(path: Path | str) -> Path:
    raw = path
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(raw, "directory does not exist (models load from a local directory only)")
    if not path.is_dir():
        raise ModelLoadError(raw, "not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(raw, "no config.json: not a Hugging Face model directory")
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise ModelLoadError(raw, "no weight files (*.safetensors or *.bin)")
    if not any((path / n).is_file() for n in _TOKENIZER_FILES):
        raise ModelLoadError(raw, f"no tokenizer files (one of {', '.join(_TOKENIZER_FILES)})")
    if not any((path / n).is_file() for n in _IMAGE_PROCESSOR_FILES):
        raise ModelLoadError(raw, f"no image processor config (one of {', '.join(_IMAGE_PROCESSOR_FILES)})")
    return path


def _load_processor(path: Path) -> Any:
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError ...
        raise ModelLoadError(path, f"processor/tokenizer failed to load: {exc}") from exc
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ModelLoadError(
            path, f"AutoProcessor gave {type(processor).__name__} without an image processor and a tokenizer"
        )
    if not getattr(processor, "chat_template", None):
        from worker.demo_model import CHAT_TEMPLATE

        log.warning("%s has no chat template; using the LLaVA-1.5 one", path)
        processor.chat_template = CHAT_TEMPLATE
    return processor


def _quantization_config(quant: Quantization, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quant is Quantization.NF4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=list(SKIP_MODULES),
        )
    if quant is Quantization.INT8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP_MODULES))
    return None


def _load_model(path: Path, quant: Quantization, device: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype, "device_map": {"": device}}
    qconfig = _quantization_config(quant, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        try:
            return AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" not in str(exc):
                raise
            log.info("%s: no AutoModelForImageTextToText mapping, trying LlavaForConditionalGeneration", path)
            return LlavaForConditionalGeneration.from_pretrained(str(path), **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:
        if _is_oom(exc):
            raise ModelLoadError(path, f"not enough memory on {device} for the weights ({quant.value}){_free(device)}; "
                                       "use quantization: nf4, a smaller model or a larger GPU") from exc
        raise ModelLoadError(path, f"weights failed to load ({quant.value} on {device}): {exc}") from exc


def _free(device: str) -> str:
    """", 3.1 of 8.0 GiB free" for a CUDA device (else "")."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return ""
    try:
        free, total = torch.cuda.mem_get_info(torch.device(device))
    except Exception:  # noqa: BLE001
        return ""
    return f", {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"


def _check_adapter_dir(adapter: Path | str) -> Path:
    raw = adapter
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise ModelLoadError(raw, "adapter directory does not exist (adapters load from a local directory only)")
    if not (path / _ADAPTER_CONFIG).is_file():
        raise ModelLoadError(raw, f"no {_ADAPTER_CONFIG}: not a peft adapter directory")
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise ModelLoadError(raw, "adapter has no weight files (adapter_model.safetensors or .bin)")
    return path.resolve()


def _load_adapter(model: Any, adapter: Path) -> None:
    """Inject the LoRA adapter into ``model`` in place (unmerged: it also works on 4-bit layers)."""
    # A local directory and HF_HUB_OFFLINE=1: nothing is downloaded. (transformers 5.23's
    # load_adapter passes local_files_only on to LoadStateDictConfig, which rejects it.)
    try:
        info = model.load_adapter(str(adapter))
    except Exception as exc:
        raise ModelLoadError(adapter, f"adapter failed to load: {type(exc).__name__}: {exc}") from exc
    missing = [k for k in getattr(info, "missing_keys", None) or () if "lora_" in k]
    bad = list(getattr(info, "unexpected_keys", None) or ()) + list(getattr(info, "mismatched_keys", None) or ())
    if missing or bad:
        raise ModelLoadError(
            adapter, f"adapter does not fit the model: missing {missing[:3]}, unexpected/mismatched {bad[:3]}"
        )
    if not any("lora_" in name for name, _ in model.named_modules()):
        raise ModelLoadError(adapter, "adapter loaded but injected no LoRA layer: target_modules match nothing")


def _check_image_tokens(path: Path, model: Any, processor: Any) -> None:
    """Fail at load, not at the first study, when ``<image>`` expands to the wrong length."""
    cfg = model.config
    vc = getattr(cfg, "vision_config", None)
    if getattr(cfg, "model_type", "") != "llava" or vc is None:
        return
    from PIL import Image as PILImage

    features = (vc.image_size // vc.patch_size) ** 2
    if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
        features += 1
    image_token = getattr(processor, "image_token", "<image>")
    enc = processor(
        text=[image_token], images=[PILImage.new("RGB", (vc.image_size, vc.image_size))], return_tensors="pt"
    )
    token_id = getattr(cfg, "image_token_id", None)
    if token_id is None:
        token_id = getattr(cfg, "image_token_index", None)
    n_tokens = int((enc["input_ids"] == token_id).sum())
    if n_tokens != features:
        raise ModelLoadError(
            path,
            f"processor expands {image_token} to {n_tokens} tokens (id {token_id}) but the vision tower "
            f"gives {features} features: check patch_size, vision_feature_select_strategy and "
            "num_additional_image_tokens in processor_config.json",
        )


# --------------------------------------------------------------------------- per-process cache

_engines: dict[tuple, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(
    path: Path | str,
    quantization: Quantization | str = "nf4",
    *,
    device: str = "auto",
    compute_dtype: str | None = None,
    adapter: Path | str | None = None,
) -> Engine:
    """The process-wide engine for a model, loaded on first use.

    ``path`` is a model directory or ``"demo"`` (see
    :func:`worker.demo_model.resolve_model_path`); ``adapter`` an optional LoRA adapter
    directory. One engine per (model, quantisation, adapter, device, dtype).
    """
    from worker.demo_model import resolve_model_path

    resolved = resolve_model_path(str(path)).resolve()
    adapter_key = str(Path(adapter).expanduser().resolve()) if adapter else None
    key = (str(resolved), Quantization.parse(quantization), adapter_key, device, compute_dtype)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = Engine.load(
                resolved, quantization=key[1], device=device, compute_dtype=compute_dtype, adapter=adapter_key
            )
            _engines[key] = engine
        return engine


def clear_engines() -> None:
    """Forget every cached engine (tests; freeing GPU memory before loading another model)."""
    with _engines_lock:
        _engines.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the bundle


def option_probabilities(scored: Sequence[tuple[float, int]], normalization: str = "mean",
                         temperature: float = 1.0) -> list[float]:
    """Softmax over the options of :meth:`Engine.option_logprobs` output ((sum, token count) each).

    ``"mean"`` divides each sum by its token count first; ``"sum"`` uses the sums.
    ``temperature`` (from a calibration file, per finding) divides the scores first:
    > 1 softens over-confident answers, < 1 sharpens them.
    """
    if normalization not in ("mean", "sum"):
        raise ValueError(f"Argument 'normalization' must be 'mean' or 'sum', got {normalization!r}")
    if not temperature > 0:
        raise ValueError(f"Argument 'temperature' must be > 0, got {temperature!r}")
    scores = torch.tensor([s / n if normalization == "mean" else s for s, n in scored], dtype=torch.float64)
    return [float(p) for p in torch.softmax(scores / temperature, dim=0)]


def load_calibration(path: str | Path | None) -> dict[str, float]:
    """Per-finding temperatures from a YAML/JSON mapping ``finding_id: temperature``."""
    if not path:
        return {}
    from ruamel.yaml import YAML

    p = Path(path)
    try:
        data = YAML(typ="safe").load(p.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(p, f"calibration file unreadable: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in data.values()):
        raise ModelLoadError(p, "calibration file must map finding ids to positive temperatures")
    return {str(k): float(v) for k, v in data.items()}


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def score_with_backoff(engine: "Engine", chosen: list, pil: dict, question: str, option_texts: list[str],
                       zoom: str = ""):
    """Score on a mosaic of ``chosen`` (:func:`question_mosaic`, with ``zoom``); on
    out-of-memory, retry with half the images, then give up.

    Returns (scored, images actually used). Raises RuntimeError naming the question when
    even one image does not fit.
    """
    while True:
        images = question_mosaic(pil, chosen, zoom)
        try:
            return engine.option_logprobs(images, question, option_texts), chosen
        except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
            if not _is_oom(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(chosen) <= 1:
                raise RuntimeError(f"out of memory scoring {question!r} even with one image: {e}") from e
            log.warning("out of memory with %d images for %r: retrying with %d", len(chosen), question,
                        (len(chosen) + 1) // 2)
            chosen = chosen[: (len(chosen) + 1) // 2]


def impression_prompt(bundle: AnalysisBundle, answers: dict[str, str]) -> str:
    """The instruction for the free-text impression: the scored answers, then the task."""
    lines = ["Draft findings of this cardiac MRI:"]
    for q in bundle.questions:
        lines.append(f"- {q.text.strip()} {answers[q.id]}")
    if bundle.limitations:
        lines.append("Limitations: " + "; ".join(bundle.limitations))
    lines.append("Write a short impression in one or two sentences.")
    return "\n".join(lines)


def run_bundle(engine: Engine, bundle: AnalysisBundle, model_name: str | None = None,
               calibration: Optional[dict[str, float]] = None) -> InferenceResult:
    """Answer every question of ``bundle`` by option scoring, then write the impression.

    For each question the images of its views (:meth:`AnalysisBundle.question_images`:
    its views, narrowed to its SAX slices) are — cropped to the LV with ``zoom: lv`` —
    tiled into one labelled mosaic and the option texts scored; the answer is the option
    with the highest probability. With ``bundle.impression`` a short impression is then
    generated from all images and a summary of the answers.

    ``model_fingerprint`` of the result is :func:`model_version` (the engine's
    fingerprint combined with the template name and file hash). ``audit`` holds, for
    the node's audit table: the chat prompts (per finding id, and ``"impression"``), the
    SHA-256 of every bundle PNG shown to the model, per finding and option the option
    text, the summed log-likelihood, its token count and the probability, the outputs
    (answer option ids, impression) and timings in seconds.

    Parameters
    ----------
    engine:
        A loaded :class:`Engine`.
    bundle:
        The analysis bundle from the ``prepare`` task.
    model_name:
        The ``models:`` key to report; default ``bundle.model``.

    Raises
    ------
    ValueError
        When a question's ``options`` and ``option_texts`` differ in length or are empty.
    """
    t0 = time.perf_counter()
    cuda = engine.device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats(torch.device(engine.device))
    pil = {im.key: im.to_pil() for im in bundle.images}
    findings: list[FindingResult] = []
    answers: dict[str, str] = {}
    prompts: dict[str, str] = {}
    option_scores: dict[str, dict[str, dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    used: set[str] = set()
    for q in bundle.questions:
        if not q.options or len(q.options) != len(q.option_texts):
            raise ValueError(
                f"Question {q.id!r}: {len(q.options)} options but {len(q.option_texts)} option_texts"
            )
        tq = time.perf_counter()
        question = question_text(bundle, q)
        scored, chosen = score_with_backoff(engine, bundle.question_images(q), pil, question, q.option_texts,
                                            q.zoom)
        used.update(im.key for im in chosen)
        probs = option_probabilities(scored, engine.normalization, (calibration or {}).get(q.id, 1.0))
        best = max(range(len(probs)), key=probs.__getitem__)
        answers[q.id] = q.option_texts[best]
        prompts[q.id] = engine.chat_prompt(engine.option_instruction(question, q.option_texts), 1 if chosen else 0)
        option_scores[q.id] = {
            opt: {"text": text, "logprob": lp, "tokens": n, "probability": p}
            for opt, text, (lp, n), p in zip(q.options, q.option_texts, scored, probs)
        }
        timings[q.id] = time.perf_counter() - tq
        findings.append(
            FindingResult(
                id=q.id,
                answer=q.options[best],
                probabilities=dict(zip(q.options, probs)),
                image_keys=[im.key for im in chosen],
            )
        )
    impression = ""
    if bundle.impression:
        ti = time.perf_counter()
        images = []
        if bundle.images:
            used.update(im.key for im in bundle.images)
            images = [tile([pil[im.key] for im in bundle.images], labels=[im.label for im in bundle.images])]
        text = impression_prompt(bundle, answers)
        if bundle.clinical_context:
            text = f"{bundle.clinical_context}\n{text}"
        prompts["impression"] = engine.chat_prompt(text, len(images))
        impression = engine.generate(images, text)
        timings["impression"] = time.perf_counter() - ti
    seconds = time.perf_counter() - t0
    timings["total"] = seconds
    version = model_version(engine.fingerprint, bundle.template, bundle.template_hash)
    audit = {
        "model_version": version,
        "engine_fingerprint": engine.fingerprint,
        "adapter": str(engine.adapter) if engine.adapter else None,
        "template": bundle.template,
        "template_hash": bundle.template_hash,
        "normalization": engine.normalization,
        "prompts": prompts,
        "image_hashes": {im.key: _png_sha256(im.png_b64) for im in bundle.images if im.key in used},
        "option_scores": option_scores,
        "outputs": {"answers": {f.id: f.answer for f in findings}, "impression": impression},
        "timings": timings,
    }
    return InferenceResult(
        job_id=bundle.job_id,
        model=model_name or bundle.model,
        model_fingerprint=version,
        device=engine.device,
        quantization=engine.quantization.value,
        findings=findings,
        impression=impression,
        seconds=seconds,
        audit=audit,
        gpu_memory=_gpu_memory(engine.device) if cuda else None,
    )


def _gpu_memory(device: str) -> dict[str, Any]:
    """Peak memory PyTorch allocated (and reserved) on ``device`` since the last reset, and its size."""
    import socket

    dev = torch.device(device)
    return {"host": socket.gethostname(), "device": device,
            "peak_bytes": int(torch.cuda.max_memory_allocated(dev)),
            "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(dev)),
            "total_bytes": int(torch.cuda.get_device_properties(dev).total_memory)}


def _png_sha256(png_b64: str) -> str:
    """SHA-256 of the PNG bytes the model was shown (not of their base64 text)."""
    import base64

    return hashlib.sha256(base64.b64decode(png_b64)).hexdigest()
