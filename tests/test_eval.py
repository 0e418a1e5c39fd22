"""`cmr-ai eval` (plugin/evaluate.py): the metric functions on hand-made inputs, and the whole
command on a few labelled phantoms with the tiny random demo model (its answers are noise: this
checks the harness, not the model)."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plugin import evaluate as ev
from plugin.labels import LABEL_FINDINGS, read_labels, write_labels

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "plugin.cli"]


# --------------------------------------------------------------------------- metrics


def test_auroc_perfect_inverted_and_ties():
    pos = [False, False, True, True]
    assert ev.auroc(pos, [0.1, 0.2, 0.8, 0.9]) == (1.0, None)
    assert ev.auroc(pos, [0.9, 0.8, 0.2, 0.1]) == (0.0, None)
    assert ev.auroc(pos, [0.5, 0.5, 0.5, 0.5]) == (0.5, None)  # all tied: chance
    # one tie between a positive and a negative counts one half: (1 + 1 + 0.5 + 1) / 4
    assert ev.auroc(pos, [0.1, 0.6, 0.6, 0.9]) == (0.875, None)
    area, why = ev.auroc([True, True], [0.3, 0.4])
    assert area is None and "no normal" in why
    area, why = ev.auroc([False, False], [0.3, 0.4])
    assert area is None and "no abnormal" in why


def test_roc_curve_ends():
    fpr, tpr = ev.roc_curve([False, True, False, True], [0.1, 0.9, 0.4, 0.6])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert tpr[2] == 1.0 and fpr[2] == 0.0  # both positives above both negatives


def test_ece_perfectly_calibrated_and_overconfident():
    # 10 answers at confidence 0.8 with 8 right, 20 at 0.55 with 11 right: each bin's accuracy equals
    # its mean confidence → ECE 0
    conf = [0.8] * 10 + [0.55] * 20
    ok = [True] * 8 + [False] * 2 + [True] * 11 + [False] * 9
    e, rel = ev.ece(conf, ok)
    assert e == pytest.approx(0.0, abs=1e-12)
    assert len(rel) == 10 and sum(b["n"] for b in rel) == 30
    b8 = rel[7]  # (0.7, 0.8]
    assert b8["n"] == 10 and b8["accuracy"] == pytest.approx(0.8) and b8["confidence"] == pytest.approx(0.8)
    assert rel[0]["accuracy"] is None  # empty bin
    # always 0.9 sure, always wrong: ECE 0.9
    assert ev.ece([0.9] * 4, [False] * 4)[0] == pytest.approx(0.9)
    assert ev.ece([], [])[0] is None


def test_accuracy_f1_confusion():
    truth = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "b"]
    assert ev.accuracy(truth, pred) == 0.5
    # a: tp1 fp0 fn1 → 2/3; b: tp1 fp2 fn0 → 2/4; c: tp0 fp0 fn1 → 0
    assert ev.macro_f1(truth, pred) == pytest.approx((2 / 3 + 0.5 + 0) / 3)
    assert ev.macro_f1(["x", "x"], ["x", "x"]) == 1.0  # only the options present count
    assert ev.confusion_matrix(truth, pred, ["a", "b", "c", "d"]) == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0],
                                                                     [0, 0, 0, 0]]
    with pytest.raises(ValueError):
        ev.confusion_matrix(["a"], ["z"], ["a", "b"])
    assert ev.accuracy([], []) is None and ev.macro_f1([], []) is None


def test_blank_bundle_keeps_everything_but_pixels():
    from PIL import Image

    from worker.bundle import AnalysisBundle, BundleImage, SourceRef

    src = SourceRef(sop_class_uid="1.2", sop_instance_uid="1.2.3", series_instance_uid="1.2.4", rows=8, columns=8)
    imgs = [BundleImage(key=f"k{i}", view="SAX", phase="ED", label=f"L{i}", source=src,
                        png_b64=BundleImage.encode_png(Image.fromarray(np.full((10 + i, 12), 200, np.uint8))))
            for i in range(2)]
    b = AnalysisBundle(job_id=0, study_instance_uid="1.2.5", model="demo", template="t", questions=[], images=imgs)
    blank = ev.blank_bundle(b)
    assert [im.key for im in blank.images] == ["k0", "k1"] and [im.label for im in blank.images] == ["L0", "L1"]
    for orig, im in zip(b.images, blank.images):
        pix = Image.open(io.BytesIO(base64.b64decode(im.png_b64)))
        assert pix.size == orig.to_pil().size and pix.mode == "L"
        assert np.asarray(pix).max() == 0
        assert im.source == orig.source
    assert np.asarray(b.images[0].to_pil()).max() == 200  # the original is untouched


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory, demo_model_dir):
    """4 labelled phantoms; labels: study 3's rows dropped (unlabelled) and a row for a study that is
    not there (missing); a config with the demo model in fp32."""
    from plugin.labels import write_phantom_set

    root = tmp_path_factory.mktemp("evalset")
    labels_path = write_phantom_set(root / "studies", 4, seed=11, slices=6, phases=8)
    labels = read_labels(labels_path)
    uids = sorted({lab.study_instance_uid for lab in labels}, key=[lab.study_instance_uid for lab in labels].index)
    kept = [lab for lab in labels if lab.study_instance_uid != uids[3]]
    kept.append(type(labels[0])("1.2.826.0.1.999", "pericardial_effusion", "none"))
    write_labels(root / "labels.csv", kept)
    cfg = root / "config.yaml"
    cfg.write_text(f"models:\n  demo:\n    path: {json.dumps(str(demo_model_dir))}\n    quantization: none\n"
                   "    device: cpu\n")
    return {"root": root, "studies": root / "studies", "labels": root / "labels.csv", "config": cfg,
            "unlabelled": uids[3]}


@pytest.fixture(scope="module")
def eval_run(phantom_set):
    s = phantom_set
    report = s["root"] / "out" / "report.html"
    r = subprocess.run(CLI + ["eval", "--config", str(s["config"]), str(s["labels"]), str(s["studies"]), "--json",
                              "--report", str(report)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), report


def test_eval_json(eval_run, phantom_set):
    data, _ = eval_run
    assert set(data) == {"findings", "studies", "latency", "model"}
    assert set(data["findings"]) == set(LABEL_FINDINGS)
    for fid, f in data["findings"].items():
        for key in ("auroc", "accuracy", "ece", "f1", "n", "blank_changed", "blank_tv", "blank_accuracy",
                    "confusion"):
            assert key in f, (fid, key)
        assert f["n"] == 3
        assert f["options"] == list(LABEL_FINDINGS[fid])
        assert sum(map(sum, f["confusion"])) == 3
        assert 0 <= f["accuracy"] <= 1 and 0 <= f["ece"] <= 1
        assert f["auroc"] is None if f["auroc_note"] else 0 <= f["auroc"] <= 1
        # the random model still looks at the pixels: black images move its probabilities
        assert f["blank_tv"] > 0, f
    st = data["studies"]
    assert (st["found"], st["evaluated"], st["failed"]) == (4, 3, [])
    assert st["missing"] == ["1.2.826.0.1.999"] and st["unlabelled"] == [phantom_set["unlabelled"]]
    truth = {lab.study_instance_uid: lab for lab in read_labels(phantom_set["labels"])}
    for row in st["results"]:
        assert row["study_instance_uid"] in truth
        for fid, f in row["findings"].items():
            assert f["answer"] == max(f["probabilities"], key=f["probabilities"].get)
            assert sum(f["probabilities"].values()) == pytest.approx(1.0)
            assert set(f["blank_probabilities"]) == set(f["probabilities"])
    lat = data["latency"]
    assert lat["infer_s"]["n"] == 3 and lat["blank_s"]["n"] == 3 and lat["prepare_s"]["max"] > 0
    assert lat["device"] == "cpu" and lat["quantization"] == "none"
    m = data["model"]
    assert m["name"] == "demo" and m["template"] == "cmr_standard" and m["fingerprint"] and m["model_version"]
    assert m["command"].startswith("cmr-ai eval --config")


def test_eval_report_html(eval_run):
    data, report = eval_run
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    for fid in data["findings"]:
        section = text.split(f"<section id='finding-{fid}'>", 1)[1].split("</section>", 1)[0]
        assert section.count('<img src="data:image/png;base64,') == 4  # confusion, ROC, reliability, blank probe
    assert "latency histogram" in text and data["model"]["fingerprint"] in text
    png = base64.b64decode(text.split('data:image/png;base64,', 1)[1].split('"', 1)[0])
    assert png.startswith(b"\x89PNG")


def test_eval_bad_labels_row_exit_2(phantom_set, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("study_instance_uid,finding,answer\n1.2.3,pericardial_effusion,none\n1.2.4,,small\n")
    r = subprocess.run(CLI + ["eval", "--config", str(phantom_set["config"]), str(bad), str(phantom_set["studies"])],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"{bad}:3:" in r.stderr and r.stderr.count("\n") == 1 and r.stdout == ""


def test_eval_input_errors_exit_2(phantom_set, tmp_path, capsys):
    from plugin.cli import main

    s = phantom_set
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("study_instance_uid,finding,answer\n1.2.3,pericardial_effusion,huge\n")
    assert main(["eval", "--config", str(s["config"]), str(wrong), str(s["studies"])]) == 2
    assert f"{wrong}:2: answer 'huge' is not an option of pericardial_effusion" in capsys.readouterr().err
    wrong.write_text("study_instance_uid,finding,answer\n1.2.3,lv_mood,happy\n")
    assert main(["eval", "--config", str(s["config"]), str(wrong), str(s["studies"])]) == 2
    assert f"{wrong}:2: finding 'lv_mood' is not in the template" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    assert main(["eval", "--config", str(s["config"]), str(s["labels"]), str(empty)]) == 2
    assert "no DICOM study found" in capsys.readouterr().err
    assert main(["eval", "--config", str(s["config"]), "--model", "nope", str(s["labels"]), str(s["studies"])]) == 2
    assert "no model 'nope'" in capsys.readouterr().err
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models:\n  demo:\n    pth: x\n")
    assert main(["eval", "--config", str(cfg), str(s["labels"]), str(s["studies"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmr-ai eval: error: ") and f"{cfg}:3" in err


def test_find_studies_groups_by_study_and_skips_other_files(phantom_set):
    studies, skipped = ev.find_studies(phantom_set["studies"])
    assert len(studies) == 4 and all(studies.values())
    assert skipped >= 2  # labels.csv, index.json, truth.json …


def test_compare_with_baseline(eval_run, tmp_path):
    data, _ = eval_run
    same = ev.compare(data, data)
    assert same["baseline"]["quantization"] == "none"
    for fid, c in same["findings"].items():
        assert c["n"] == 3 and c["agreement"] == 1.0 and c["tv_mean"] == 0.0
        assert all(v in (0.0, None) for v in c["delta"].values())
    # another run with every answer moved to the other end of the options
    other = json.loads(json.dumps(data))
    for row in other["studies"]["results"]:
        for f in row["findings"].values():
            opts = list(f["probabilities"])
            f["probabilities"] = {o: (1.0 if o == opts[-1] else 0.0) for o in opts}
            f["answer"] = opts[-1]
    diff = ev.compare(data, other)
    for fid, c in diff["findings"].items():
        expect = np.mean([r["findings"][fid]["answer"] == LABEL_FINDINGS[fid][-1] for r in data["studies"]["results"]])
        assert c["agreement"] == pytest.approx(expect) and c["tv_mean"] > 0
    bad = tmp_path / "base.json"
    bad.write_text('{"findings": {}}')
    with pytest.raises(ev.EvalError, match="not the JSON of"):
        ev.read_baseline(bad)
