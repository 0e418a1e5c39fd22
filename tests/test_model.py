"""worker.demo_model and worker.model.engine against the tiny random demo LLaVA.

The model is built once per session into a temporary directory (a few seconds on a
laptop CPU) and loaded unquantised and as bitsandbytes nf4, which works on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from worker.bundle import AnalysisBundle, BundleImage, InferenceResult, Question, SourceRef
from worker.demo_model import build_demo_model, demo_model_dir, resolve_model_path
from worker.model.engine import (
    SKIP_MODULES,
    Engine,
    ModelLoadError,
    Quantization,
    clear_engines,
    fingerprint,
    get_engine,
    model_version,
    question_mosaic,
    run_bundle,
    tile,
)

QUESTION = "Is there a pericardial effusion?"
OPTIONS = ["none", "small", "moderate", "large pericardial effusion"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo", seed=0)


@pytest.fixture(scope="session")
def engine_none(demo_dir) -> Engine:
    return Engine.load(demo_dir, quantization="none", device="cpu")


@pytest.fixture(scope="session")
def engine_nf4(demo_dir) -> Engine:
    return Engine.load(demo_dir, quantization="nf4", device="cpu")


@pytest.fixture(params=["none", "nf4"])
def engine(request, engine_none, engine_nf4) -> Engine:
    return engine_none if request.param == "none" else engine_nf4


def black_image(size=(160, 120)) -> Image.Image:
    return Image.new("L", size, 0).convert("RGB")


def noise_image(size=(160, 120), seed=1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def ring_image(radius: int, size=96) -> Image.Image:
    """A bright ring on black: a cartoon short-axis slice."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    c = size // 2
    draw.ellipse((c - radius, c - radius, c + radius, c + radius), outline=220, width=6)
    return img


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- demo model


def test_demo_model_files_and_sizes(demo_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (demo_dir / name).is_file(), name
    proc = json.loads((demo_dir / "processor_config.json").read_text())
    assert proc["patch_size"] == 16
    assert proc["vision_feature_select_strategy"] == "default"
    assert proc["num_additional_image_tokens"] == 1
    cfg = json.loads((demo_dir / "config.json").read_text())
    text = cfg["text_config"]
    for size in (text["hidden_size"], text["intermediate_size"], text["num_key_value_heads"] * text["head_dim"]):
        assert size % 64 == 0, size  # bitsandbytes 4-bit needs multiples of 64


def test_demo_model_is_reused(demo_dir):
    before = (demo_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_demo_model(demo_dir, seed=0) == demo_dir
    assert time.perf_counter() - t0 < 1.0
    assert (demo_dir / "model.safetensors").stat().st_mtime_ns == before


def test_demo_model_build_is_reproducible(demo_dir, tmp_path):
    t0 = time.perf_counter()
    other = build_demo_model(tmp_path / "again", seed=0)
    assert time.perf_counter() - t0 < 30
    assert fingerprint(other, "none") == fingerprint(demo_dir, "none")
    assert not list(tmp_path.glob(".again.build-*"))  # temporary build dir cleaned up


def test_demo_tokenizer_and_chat_template(engine_none):
    tok = engine_none.processor.tokenizer
    ids = tok("USER: <image>\nIs there a pericardial effusion? ASSISTANT:")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<image>") in ids
    prompt = engine_none.chat_prompt("Hello", n_images=1)
    assert prompt == "USER: <image>\nHello ASSISTANT:"


def test_resolve_model_path(demo_dir, tmp_path, monkeypatch):
    cache = demo_dir.parent
    # "demo-random" is the untrained random model, built in <cache>/demo-random in seconds;
    # "demo" is the trained one (minutes on first use: not built here, tests/test_train.py
    # trains a tiny model instead)
    random_dir = resolve_model_path("demo-random", cache_dir=cache)
    assert random_dir == cache / "demo-random"
    assert fingerprint(random_dir, "none") == fingerprint(demo_dir, "none")
    monkeypatch.setenv("CMR_AI_MODEL_CACHE", str(cache))
    assert demo_model_dir() == demo_dir
    assert resolve_model_path("demo-random") == random_dir
    assert resolve_model_path(str(demo_dir)) == demo_dir
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError):
        resolve_model_path("some-org/some-model")  # a hub-style id is not a local dir


# --------------------------------------------------------------------------- loading


def test_offline_env():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_nf4_quantises_language_model_only(engine_nf4):
    import bitsandbytes as bnb
    import torch

    lm_linears = 0
    for name, module in engine_nf4.model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.startswith("model.language_model."):
            lm_linears += 1
            assert isinstance(module, bnb.nn.Linear4bit), name
            assert isinstance(module.weight, bnb.nn.Params4bit), name
            assert module.weight.quant_type == "nf4"
        else:
            assert name.startswith(SKIP_MODULES), name
            assert not isinstance(module, bnb.nn.Linear4bit), name
            assert module.weight.dtype == torch.float32, name
    assert lm_linears == 7 * 2  # q k v o gate up down x 2 layers
    layers = engine_nf4.linear_layers()
    assert any(n.startswith("model.vision_tower.") for n in layers)
    assert layers["model.multi_modal_projector.linear_1"] == "Linear"
    assert layers["lm_head"] == "Linear"


def test_unquantised_has_no_4bit(engine_none):
    assert set(engine_none.linear_layers().values()) == {"Linear"}
    assert engine_none.quantization is Quantization.NONE
    assert engine_none.device == "cpu"


def test_missing_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        Engine.load(tmp_path / "missing", quantization="none")
    assert str(tmp_path / "missing") in str(err.value)


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json") as err:
        Engine.load(tmp_path, quantization="none")
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize(
    "delete",
    [
        ["processor_config.json"],
        ["tokenizer.json", "tokenizer_config.json"],
        ["processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"],
    ],
)
def test_missing_processor_files(demo_dir, tmp_path, delete):
    model = copy_model(demo_dir, tmp_path / "broken")
    for name in delete:
        (model / name).unlink()
    with pytest.raises(ModelLoadError) as err:
        Engine.load(model, quantization="none")
    assert str(model) in str(err.value)


def test_image_token_mismatch_is_caught_at_load(demo_dir, tmp_path):
    model = copy_model(demo_dir, tmp_path / "mismatch")
    cfg_path = model / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_additional_image_tokens"] = 0  # the classic LlavaProcessor gotcha
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="num_additional_image_tokens"):
        Engine.load(model, quantization="none")


def test_bad_arguments(demo_dir):
    with pytest.raises(ValueError, match="quantization"):
        Engine.load(demo_dir, quantization="fp3")
    with pytest.raises(ValueError, match="compute_dtype"):
        Engine.load(demo_dir, quantization="none", compute_dtype="float8")


def test_fingerprint(demo_dir, engine_none, engine_nf4, tmp_path):
    assert len(engine_nf4.fingerprint) == 16
    int(engine_nf4.fingerprint, 16)
    again = Engine.load(demo_dir, quantization="nf4", device="cpu")
    assert again.fingerprint == engine_nf4.fingerprint
    assert engine_none.fingerprint != engine_nf4.fingerprint
    assert fingerprint(demo_dir, "none") == engine_none.fingerprint
    changed = copy_model(demo_dir, tmp_path / "changed")
    cfg = json.loads((changed / "generation_config.json").read_text())
    cfg["max_new_tokens"] = 7
    (changed / "generation_config.json").write_text(json.dumps(cfg))
    assert fingerprint(changed, "nf4") != engine_nf4.fingerprint


def test_get_engine_caches(demo_dir):
    try:
        a = get_engine(demo_dir, "none", device="cpu")
        assert get_engine(str(demo_dir), Quantization.NONE, device="cpu") is a
    finally:
        clear_engines()


# --------------------------------------------------------------------------- scoring


def test_score_options_probabilities(engine):
    probs = engine.score_options([black_image()], QUESTION, OPTIONS)
    assert len(probs) == len(OPTIONS)
    assert all(0.0 < p < 1.0 for p in probs)
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-9)


def test_score_options_deterministic(engine):
    img = noise_image()
    assert engine.score_options([img], QUESTION, OPTIONS) == engine.score_options([img], QUESTION, OPTIONS)


def test_score_options_looks_at_the_image(engine):
    black = engine.score_options([black_image()], QUESTION, OPTIONS)
    noise = engine.score_options([noise_image()], QUESTION, OPTIONS)
    assert max(abs(a - b) for a, b in zip(black, noise)) > 1e-3


def test_cached_prompt_matches_full_sequences(engine_none):
    import torch

    e = engine_none
    prompt = e.chat_prompt(e.option_instruction(QUESTION, OPTIONS), 1)
    conts = e._continuations(prompt, OPTIONS)
    assert any(len(c) > 1 for c in conts)  # the batched continuation path really runs
    with torch.inference_mode():
        cached = e._logprobs_cached(e._encode(prompt, tile([noise_image()])), conts)
        full = e._logprobs_full(e._encode(prompt, tile([noise_image()])), conts)
    for (a, n), (b, m) in zip(cached, full):
        assert n == m
        assert a == pytest.approx(b, abs=1e-4)


def test_score_options_normalisation(engine_none):
    img = black_image()
    raw = engine_none.option_logprobs([img], QUESTION, OPTIONS)
    mean = engine_none.score_options([img], QUESTION, OPTIONS)
    summed = engine_none.score_options([img], QUESTION, OPTIONS, normalization="sum")
    scores = np.array([s / n for s, n in raw])
    expected = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    assert mean == pytest.approx(expected.tolist(), abs=1e-6)
    assert mean != summed
    assert engine_none.score_options([img], QUESTION, ["yes"]) == [1.0]
    with pytest.raises(ValueError, match="option_texts"):
        engine_none.score_options([img], QUESTION, [])
    with pytest.raises(ValueError, match="normalization"):
        engine_none.score_options([img], QUESTION, OPTIONS, normalization="max")


def test_score_several_images_and_none(engine_nf4):
    probs = engine_nf4.score_options([ring_image(20), ring_image(35), noise_image()], QUESTION, OPTIONS)
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-9)
    text_only = engine_nf4.score_options([], QUESTION, OPTIONS)
    assert math.isclose(sum(text_only), 1.0, abs_tol=1e-9)


def test_generate(engine):
    text = engine.generate([black_image()], "Write a short impression.", max_new_tokens=12)
    assert isinstance(text, str)
    for special in ("<image>", "</s>", "<s>", "<pad>", "ASSISTANT:", "USER:", "\ufffd"):
        assert special not in text
    assert text == engine.generate([black_image()], "Write a short impression.", max_new_tokens=12)


def test_tile():
    one = tile([Image.new("RGB", (100, 60), (255, 255, 255))])
    assert one.size == (100, 100)
    assert one.getpixel((50, 5)) == (0, 0, 0) and one.getpixel((50, 50)) == (255, 255, 255)
    three = tile([ring_image(20), ring_image(30), noise_image()], labels=["SAX base", "SAX mid", ""], cell=64)
    assert three.size == (128, 128) and three.mode == "RGB"
    five = tile([ring_image(20)] * 5, cell=32)
    assert five.size == (96, 96)
    with pytest.raises(ValueError, match="images"):
        tile([])
    with pytest.raises(ValueError, match="labels"):
        tile([ring_image(20)], labels=["a", "b"])


def test_question_images_slices_and_lv_zoom():
    """A question's images: its views narrowed to its SAX slices (with fallbacks); with
    zoom "lv" each image with a roi is cropped to it before tiling, the same box for ED and ES."""
    def image(key, view, phase, img, roi=None):
        src = SourceRef(sop_class_uid="1.2.840.10008.5.1.4.1.1.4", sop_instance_uid=f"1.2.3.{zlib.crc32(key.encode())}",
                        series_instance_uid="1.2.3", rows=img.height, columns=img.width)
        return BundleImage(key=key, view=view, phase=phase, label=key.replace("_", " "),
                           png_b64=BundleImage.encode_png(img), source=src, roi=roi)

    dot = Image.new("RGB", (200, 200), (0, 0, 0))
    ImageDraw.Draw(dot).ellipse((90, 90, 110, 110), fill=(255, 255, 255))  # a small bright "LV"
    roi = (70, 70, 130, 130)
    imgs = [image(f"SAX_{lvl}_{ph}", "SAX", ph, dot, roi) for lvl in ("basal", "mid") for ph in ("ED", "ES")]
    imgs.append(image("4CH_ED", "4CH", "ED", dot))
    q = Question(id="lv", text="?", options=["a", "b"], option_texts=["a", "b"], views=["SAX"], slices=["mid"],
                 zoom="lv")
    b = AnalysisBundle(job_id=1, study_instance_uid="1.2.3", model="m", template="t", questions=[q], images=imgs)
    assert [im.key for im in b.question_images(q)] == ["SAX_mid_ED", "SAX_mid_ES"]
    assert [im.level for im in b.question_images(q)] == ["mid", "mid"] and imgs[-1].level == ""
    # no mid slice: the view's images; no such view: every image
    assert [im.key for im in b.images_for(["SAX"], ["apical"])] == [im.key for im in imgs[:4]]
    assert len(b.images_for(["3CH"], ["mid"])) == len(imgs)

    chosen = b.question_images(q)
    pil = {im.key: im.to_pil() for im in imgs}
    whole = question_mosaic(pil, chosen)[0]
    zoomed = question_mosaic(pil, chosen, "lv")[0]
    assert whole.size == zoomed.size  # same tiling, other content
    bright = lambda m: (np.asarray(m.convert("L")) > 128).mean()  # noqa: E731
    assert bright(zoomed) > 5 * bright(whole)  # the LV fills far more of each tile
    # an image without a roi is shown whole, also with zoom
    assert np.array_equal(np.asarray(question_mosaic(pil, imgs[-1:], "lv")[0]), np.asarray(question_mosaic(pil, imgs[-1:])[0]))
    with pytest.raises(ValueError, match="zoom"):
        question_mosaic(pil, chosen, "heart")


# --------------------------------------------------------------------------- run_bundle


def make_bundle(impression: bool = True) -> AnalysisBundle:
    def image(key, view, phase, img):
        src = SourceRef(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{zlib.crc32(key.encode())}",
            series_instance_uid="1.2.826.0.1.3680043.8.498.1",
            rows=img.height,
            columns=img.width,
        )
        return BundleImage(
            key=key, view=view, phase=phase, label=key.replace("_", " "),
            png_b64=BundleImage.encode_png(img), source=src,
        )

    images = [
        image("SAX_mid_ED", "SAX", "ED", ring_image(35)),
        image("SAX_mid_ES", "SAX", "ES", ring_image(22)),
        image("4CH_ED", "4CH", "ED", noise_image((96, 80))),
    ]
    questions = [
        Question(
            id="pericardial_effusion", text=QUESTION,
            options=["none", "small", "moderate", "large"],
            option_texts=["none", "small", "moderate", "large"], views=["SAX", "4CH"],
        ),
        Question(
            id="lv_dilated", text="Is the left ventricle dilated?",
            options=["no", "yes"], option_texts=["no", "yes, dilated"], views=["SAX"],
        ),
        Question(
            id="lge", text="Is there late gadolinium enhancement?",
            options=["absent", "present"], option_texts=["absent", "present"], views=["LGE_SAX"],
        ),
    ]
    return AnalysisBundle(
        job_id=7, study_instance_uid="1.2.826.0.1.3680043.8.498.99", model="demo",
        template="cmr_basic", questions=questions, images=images, impression=impression,
    )


def test_run_bundle(engine_nf4):
    bundle = make_bundle()
    result = run_bundle(engine_nf4, bundle, "demo-model")
    assert isinstance(result, InferenceResult)
    assert result.job_id == 7 and result.model == "demo-model"
    assert result.model_fingerprint == model_version(engine_nf4.fingerprint, "cmr_basic", "")
    assert result.quantization == "nf4" and result.device == "cpu"
    assert result.seconds > 0
    assert [f.id for f in result.findings] == [q.id for q in bundle.questions]
    for f, q in zip(result.findings, bundle.questions):
        assert f.answer in q.options
        assert list(f.probabilities) == q.options
        assert math.isclose(sum(f.probabilities.values()), 1.0, abs_tol=1e-9)
        assert f.answer == max(f.probabilities, key=f.probabilities.get)
    by_id = {f.id: f for f in result.findings}
    assert by_id["lv_dilated"].image_keys == ["SAX_mid_ED", "SAX_mid_ES"]
    assert by_id["lge"].image_keys == ["SAX_mid_ED", "SAX_mid_ES", "4CH_ED"]  # no LGE: all images
    assert isinstance(result.impression, str)
    # Crosses the Celery boundary as JSON.
    assert InferenceResult.model_validate_json(result.model_dump_json()) == result
    # Deterministic: the same bundle gives the same answers.
    again = run_bundle(engine_nf4, bundle, "demo-model")
    assert [f.probabilities for f in again.findings] == [f.probabilities for f in result.findings]
    assert again.impression == result.impression


def test_run_bundle_without_impression_and_bad_question(engine_none):
    bundle = make_bundle(impression=False)
    result = run_bundle(engine_none, bundle, None)
    assert result.impression == "" and result.model == "demo"
    bad = bundle.model_copy(
        update={"questions": [Question(id="x", text="?", options=["a", "b"], option_texts=["a"], views=[])]}
    )
    with pytest.raises(ValueError, match="'x'"):
        run_bundle(engine_none, bad, "demo")


def test_the_trained_demo_model_is_never_trained_inside_the_test_suite(tmp_path):
    """conftest sets CMR_AI_NO_DEMO_TRAINING=1: `path: demo` without a built model fails at once, naming why."""
    from worker.demo_model import resolve_model_path
    from worker.model.engine import ModelLoadError

    with pytest.raises(ModelLoadError, match="CMR_AI_NO_DEMO_TRAINING=1 forbids training"):
        resolve_model_path("demo", cache_dir=tmp_path)
    assert not (tmp_path / "demo").exists()
