"""Clinical context in the prompt, calibration temperatures, and out-of-memory back-off."""
from __future__ import annotations

import pydicom
import pytest
import torch

from test_model import make_bundle
from worker.model import engine as eng
from worker.model.engine import Engine, ModelLoadError, load_calibration, option_probabilities, run_bundle
from plugin.cardiac.context import clinical_context


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    return Engine.load(demo_model_dir, quantization="none")


def test_clinical_context_from_the_study_header():
    ds = pydicom.Dataset()
    ds.PatientAge, ds.PatientSex = "054Y", "M"
    ds.ReasonForTheRequestedProcedure = "dyspnoea\tafter myocarditis"
    ds.AdmittingDiagnosesDescription = "heart failure"
    text = clinical_context(ds)
    assert text == ("Clinical context: 54-year-old male; reason for the examination: dyspnoea after myocarditis; "
                    "admitting diagnoses: heart failure.")
    assert clinical_context(pydicom.Dataset()) == ""


def test_context_enters_every_prompt(engine):
    bundle = make_bundle().model_copy(update={"clinical_context": "Clinical context: 70-year-old female."})
    result = run_bundle(engine, bundle)
    prompts = result.audit["prompts"]
    assert prompts and all("70-year-old female" in p for p in prompts.values())
    plain = run_bundle(engine, make_bundle())
    assert all("Clinical context" not in p for p in plain.audit["prompts"].values())


def test_calibration_temperature_softens_probabilities(engine, tmp_path):
    bundle = make_bundle(impression=False)
    q = bundle.questions[0]
    sharp = run_bundle(engine, bundle).findings[0].probabilities
    soft = run_bundle(engine, bundle, calibration={q.id: 50.0}).findings[0].probabilities
    assert max(soft.values()) < max(sharp.values())
    assert abs(sum(soft.values()) - 1) < 1e-9
    f = tmp_path / "cal.yaml"
    f.write_text(f"{q.id}: 2.5\n")
    assert load_calibration(f) == {q.id: 2.5}
    f.write_text(f"{q.id}: -1\n")
    with pytest.raises(ModelLoadError):
        load_calibration(f)
    with pytest.raises(ValueError):
        option_probabilities([(1.0, 1), (2.0, 1)], temperature=0)


def test_out_of_memory_retries_with_fewer_images_then_fails_with_a_reason(engine, monkeypatch):
    bundle = make_bundle(impression=False)
    tiles: list[int] = []
    real_tile, real_score = eng.tile, engine.option_logprobs

    def counting_tile(images, labels=None, **kw):
        tiles.append(len(images))
        return real_tile(images, labels=labels, **kw)

    def oom_when_many(images, question, options):
        if tiles[-1] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_score(images, question, options)

    monkeypatch.setattr(eng, "tile", counting_tile)
    monkeypatch.setattr(engine, "option_logprobs", oom_when_many)
    q = next(q for q in bundle.questions if len(bundle.images_for(q.views)) > 1)
    result = run_bundle(engine, bundle.model_copy(update={"questions": [q]}))
    assert len(result.findings[0].image_keys) == 1  # it shrank until it fitted
    assert tiles[0] > 1 and tiles[-1] == 1

    def always_oom(images, question, options):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(engine, "option_logprobs", always_oom)
    with pytest.raises(RuntimeError, match="out of memory scoring .* even with one image"):
        run_bundle(engine, bundle.model_copy(update={"questions": [q]}))


def test_a_model_too_large_for_the_device_is_a_clear_load_error(demo_model_dir, monkeypatch):
    from transformers import AutoModelForImageTextToText

    def oom(*a, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", oom)
    with pytest.raises(ModelLoadError, match="not enough memory on cpu for the weights"):
        Engine.load(demo_model_dir, quantization="none")
