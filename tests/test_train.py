"""``cmr-ai train`` (worker/model/train.py) on a tiny labelled phantom set.

End to end through the CLI as a subprocess: the model directory loads with
``Engine.load``, training.json is written and the loss goes down; the same seed gives
the same weights; a run stopped after epoch 1 and resumed gives the same weights as an
uninterrupted one. In process: a training example is exactly what ``run_bundle`` feeds
the model for that study and question (prompt string, tiled image bytes, token ids,
pixel values).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

EPOCHS = 3


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from plugin.labels import write_phantom_set

    d = tmp_path_factory.mktemp("train-data")
    write_phantom_set(d, 6, seed=31000, slices=6, phases=8, size=96)
    return d


def _train(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "plugin.cli", "train", "--data", str(data), "--out", str(out),
           "--epochs", str(EPOCHS), "--seed", "5", "--batch-size", "4", "--lr", "3e-3", "--progress", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"cmr-ai train failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("model-a")
    proc = _train(phantoms, out)
    return out, proc


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_cli_writes_a_loadable_model(trained):
    from worker.model.engine import Engine

    out, proc = trained
    assert "training" in proc.stderr  # the progress lines
    record = json.loads((out / "training.json").read_text())
    assert record["epochs"] == EPOCHS and record["seed"] == 5 and record["examples"] == 12
    assert len(record["losses"]) == EPOCHS
    assert record["losses"][-1] < record["losses"][0], record["losses"]
    assert (out / "checkpoints").is_dir() and list((out / "checkpoints").glob("epoch-*.pt"))
    assert len(list((out / "prepared").glob("*.json"))) == 6  # each study prepared once, cached
    engine = Engine.load(out, quantization="none", device="cpu")
    probs = engine.score_options([], "Is there a pericardial effusion?", ["none", "small", "moderate", "large"])
    assert abs(sum(probs) - 1) < 1e-6


def test_train_is_deterministic(phantoms, trained, tmp_path):
    out_a, _ = trained
    _train(phantoms, tmp_path / "b")
    assert _same(_weights(out_a), _weights(tmp_path / "b"))


def test_resume_gives_the_same_weights(phantoms, trained, tmp_path):
    out_a, _ = trained
    out = tmp_path / "c"
    _train(phantoms, out, "--stop-after", "1")
    assert not (out / "model.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").glob("epoch-*.pt")] == ["epoch-0001.pt"]
    _train(phantoms, out, "--resume")
    assert _same(_weights(out_a), _weights(out))
    a = json.loads((out_a / "training.json").read_text())
    c = json.loads((out / "training.json").read_text())
    assert a["losses"] == c["losses"]


def test_training_example_is_what_inference_feeds(phantoms, demo_model_dir, tmp_path, monkeypatch):
    """Build the bundle as the node's prepare task does, run run_bundle, and compare every
    model input with the training example of the same study and finding."""
    from plugin.cardiac import analyse_paths
    from plugin.cardiac.context import study_context
    from plugin.labels import read_labels
    from plugin.reports.template import load_template
    from worker.bundle import AnalysisBundle
    from worker.model.engine import Engine, run_bundle
    from worker.model.train import build_examples, find_studies, prepare_studies

    engine = Engine.load(demo_model_dir, quantization="none", device="cpu")
    seen: list[tuple[str, bytes, str]] = []
    real = Engine.option_inputs

    def spy(self, images, question, option_texts):
        prompt, inputs, conts = real(self, images, question, option_texts)
        seen.append((prompt, images[0].tobytes() if images else b"", inputs, conts))
        return prompt, inputs, conts

    monkeypatch.setattr(Engine, "option_inputs", spy)
    labels = read_labels(phantoms / "labels.csv")
    uid = labels[0].study_instance_uid
    mine = [lab for lab in labels if lab.study_instance_uid == uid]

    bundles = prepare_studies(phantoms, [uid], tmp_path / "prepared")
    examples = build_examples(engine, bundles, mine)
    train_seen = list(seen)
    assert len(examples) == len(mine) == 2

    # inference: the bundle as worker/tasks.py prepare builds it, scored by run_bundle
    paths = find_studies(phantoms)[uid]
    template = load_template("cmr_standard", None)
    _s, _c, images, limitations = analyse_paths(paths)
    bundle = AnalysisBundle(job_id=1, study_instance_uid=uid, model="demo", template="cmr_standard",
                            questions=template.questions(), images=images, limitations=limitations,
                            impression=False, clinical_context=study_context(paths))
    assert bundle.clinical_context  # the context is part of the prompt
    seen.clear()
    result = run_bundle(engine, bundle)
    by_question = {q.id: s for q, s in zip(bundle.questions, seen)}
    for ex, (prompt, image_bytes, inputs, conts) in zip(examples, train_seen):
        inf_prompt, inf_bytes, inf_inputs, inf_conts = by_question[ex.finding]
        assert prompt == inf_prompt == ex.prompt == result.audit["prompts"][ex.finding]
        assert bundle.clinical_context in prompt
        assert image_bytes and image_bytes == inf_bytes
        assert conts == inf_conts == ex.conts
        assert torch.equal(inputs["input_ids"], inf_inputs["input_ids"])
        assert torch.equal(inputs["pixel_values"], inf_inputs["pixel_values"])
        assert torch.equal(ex.inputs["pixel_values"], inf_inputs["pixel_values"])
