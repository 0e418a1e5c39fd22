"""Model runtime: LoRA adapters, the model version (fingerprint + template) and the audit trail.

Against the tiny random demo LLaVA and a tiny random LoRA adapter built into temporary
directories (a few seconds); the audit table on a real SQLite file.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import shutil
from datetime import date, datetime
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from plugin import db
from plugin.audit import AuditExportError, export_audit
from plugin.cli import main as cli_main
from test_model import make_bundle
from worker.bundle import AnalysisBundle, InferenceResult
from worker.demo_model import build_demo_adapter, build_demo_model
from worker.model.engine import (
    Engine,
    ModelLoadError,
    clear_engines,
    fingerprint,
    get_engine,
    model_version,
    run_bundle,
)

QUESTION = "Is there a pericardial effusion?"
OPTIONS = ["none", "small", "moderate", "large pericardial effusion"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo", seed=0)


@pytest.fixture(scope="module")
def adapter_dir(demo_dir, tmp_path_factory) -> Path:
    return build_demo_adapter(demo_dir, tmp_path_factory.mktemp("adapters") / "lora1", seed=1)


@pytest.fixture(scope="module")
def engine_base(demo_dir) -> Engine:
    return Engine.load(demo_dir, quantization="none", device="cpu")


@pytest.fixture(scope="module")
def engine_lora(demo_dir, adapter_dir) -> Engine:
    return Engine.load(demo_dir, quantization="none", device="cpu", adapter=adapter_dir)


# --------------------------------------------------------------------------- adapter


def test_demo_adapter_files(adapter_dir):
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "language_model" in str(cfg["target_modules"])


def test_adapter_is_injected_and_changes_scores(engine_base, engine_lora, adapter_dir):
    layers = engine_lora.linear_layers()
    lora = [n for n in layers if ".lora_A." in n]
    assert lora and all(".language_model." in n for n in lora)  # the vision tower's q_proj is left alone
    assert not any(".lora_" in n for n in engine_base.linear_layers())
    assert engine_lora.adapter == adapter_dir.resolve()
    img = Image.new("RGB", (64, 64))
    base = engine_base.score_options([img], QUESTION, OPTIONS)
    tuned = engine_lora.score_options([img], QUESTION, OPTIONS)
    assert math.isclose(sum(tuned), 1.0, abs_tol=1e-9)
    assert max(abs(a - b) for a, b in zip(base, tuned)) > 1e-4
    assert isinstance(engine_lora.generate([img], "Describe.", max_new_tokens=4), str)


def test_adapter_on_nf4(demo_dir, adapter_dir):
    e = Engine.load(demo_dir, quantization="nf4", device="cpu", adapter=adapter_dir)
    layers = e.linear_layers()
    assert layers["model.language_model.layers.0.self_attn.q_proj.base_layer"] == "Linear4bit"
    assert any(".lora_B." in n for n in layers)
    assert e.fingerprint == fingerprint(demo_dir, "nf4", adapter_dir)
    probs = e.score_options([Image.new("RGB", (64, 64))], QUESTION, OPTIONS)
    assert math.isclose(sum(probs), 1.0, abs_tol=1e-9)


def test_not_an_adapter(demo_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="adapter directory does not exist"):
        Engine.load(demo_dir, quantization="none", device="cpu", adapter=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no adapter_config.json: not a peft adapter"):
        Engine.load(demo_dir, quantization="none", device="cpu", adapter=tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        Engine.load(demo_dir, quantization="none", device="cpu", adapter=demo_dir)  # a model, not an adapter


def test_get_engine_caches_per_adapter(demo_dir, adapter_dir):
    try:
        plain = get_engine(demo_dir, "none", device="cpu")
        tuned = get_engine(demo_dir, "none", device="cpu", adapter=adapter_dir)
        assert tuned is not plain and tuned.adapter is not None and plain.adapter is None
        assert get_engine(str(demo_dir), "none", device="cpu", adapter=str(adapter_dir)) is tuned
    finally:
        clear_engines()


# --------------------------------------------------------------------------- fingerprint / version


def test_fingerprint_covers_weights_adapter_quantization(demo_dir, adapter_dir, tmp_path):
    base = fingerprint(demo_dir, "nf4")
    assert fingerprint(demo_dir, "nf4") == base  # stable
    assert fingerprint(shutil.copytree(demo_dir, tmp_path / "copy"), "nf4") == base  # content, not location
    assert fingerprint(demo_dir, "none") != base
    assert fingerprint(demo_dir, "int8") not in (base, fingerprint(demo_dir, "none"))

    changed = shutil.copytree(demo_dir, tmp_path / "changed")
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint(changed, "nf4") != base

    with_adapter = fingerprint(demo_dir, "nf4", adapter_dir)
    assert with_adapter != base
    assert fingerprint(demo_dir, "nf4", shutil.copytree(adapter_dir, tmp_path / "lora-copy")) == with_adapter
    other = build_demo_adapter(demo_dir, tmp_path / "lora2", seed=2)
    assert fingerprint(demo_dir, "nf4", other) != with_adapter
    cfg = json.loads((tmp_path / "lora-copy" / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * 2
    (tmp_path / "lora-copy" / "adapter_config.json").write_text(json.dumps(cfg))
    assert fingerprint(demo_dir, "nf4", tmp_path / "lora-copy") != with_adapter


def test_model_version_covers_template():
    v = model_version("0123456789abcdef", "cmr_standard", "a" * 64)
    assert len(v) == 16 and int(v, 16) >= 0
    assert model_version("0123456789abcdef", "cmr_standard", "a" * 64) == v
    assert model_version("0123456789abcdef", "cmr_standard", "b" * 64) != v  # template file edited
    assert model_version("0123456789abcdef", "cmr_basic", "a" * 64) != v  # another template
    assert model_version("fedcba9876543210", "cmr_standard", "a" * 64) != v  # another model


def test_prepare_template_hash_follows_the_file(tmp_path):
    from plugin.reports.template import default_templates_dir, load_template
    from worker.tasks import template_hash

    src = default_templates_dir() / "cmr_standard.yaml"
    copy = tmp_path / "cmr_standard.yaml"
    copy.write_bytes(src.read_bytes())
    h = template_hash(load_template("cmr_standard", tmp_path))
    assert h == hashlib.sha256(src.read_bytes()).hexdigest()
    copy.write_text(copy.read_text() + "\n# reworded\n")
    assert template_hash(load_template("cmr_standard", tmp_path)) != h


def test_old_bundle_without_template_hash_still_validates():
    data = make_bundle().model_dump(mode="json")
    del data["template_hash"]
    assert AnalysisBundle.model_validate(data).template_hash == ""
    res = InferenceResult(job_id=1, model="m", model_fingerprint="f", device="cpu", quantization="nf4", findings=[])
    assert res.audit == {}


# --------------------------------------------------------------------------- audit payload


def test_run_bundle_audit(engine_lora, adapter_dir):
    bundle = make_bundle().model_copy(update={"template_hash": "c" * 64})
    result = run_bundle(engine_lora, bundle, "demo")
    assert result.model_fingerprint == model_version(engine_lora.fingerprint, "cmr_basic", "c" * 64)
    audit = result.audit
    assert audit["model_version"] == result.model_fingerprint
    assert audit["engine_fingerprint"] == engine_lora.fingerprint
    assert audit["adapter"] == str(adapter_dir.resolve())
    assert audit["template"] == "cmr_basic" and audit["template_hash"] == "c" * 64

    qids = [q.id for q in bundle.questions]
    assert list(audit["prompts"]) == qids + ["impression"]
    for q in bundle.questions:
        assert q.text in audit["prompts"][q.id] and "ASSISTANT:" in audit["prompts"][q.id]
    assert audit["image_hashes"] == {
        im.key: hashlib.sha256(base64.b64decode(im.png_b64)).hexdigest() for im in bundle.images
    }
    for f, q in zip(result.findings, bundle.questions):
        scores = audit["option_scores"][q.id]
        assert list(scores) == q.options
        assert [s["text"] for s in scores.values()] == q.option_texts
        assert {o: s["probability"] for o, s in scores.items()} == f.probabilities
        assert all(s["logprob"] < 0 and s["tokens"] >= 1 for s in scores.values())
    assert audit["outputs"] == {"answers": {f.id: f.answer for f in result.findings},
                                "impression": result.impression}
    assert set(audit["timings"]) == set(qids) | {"impression", "total"}
    assert audit["timings"]["total"] == result.seconds
    # Crosses the Celery boundary as JSON, audit included.
    assert InferenceResult.model_validate_json(result.model_dump_json()) == result


def test_audit_hashes_only_images_used(engine_base):
    bundle = make_bundle(impression=False)
    only_sax = [q.model_copy(update={"views": ["SAX"]}) for q in bundle.questions]
    result = run_bundle(engine_base, bundle.model_copy(update={"questions": only_sax}))
    assert set(result.audit["image_hashes"]) == {"SAX_mid_ED", "SAX_mid_ES"}
    assert "impression" not in result.audit["prompts"]


# --------------------------------------------------------------------------- audit table


def _job(url: str, uid: str) -> int:
    with db.session_scope(url) as s:
        study = db.Study(study_instance_uid=uid)
        s.add(study)
        s.flush()
        job = db.Job(study_id=study.id, rule="r", template="cmr_basic", model="demo")
        s.add(job)
        s.flush()
        return job.id


def _result(job_id: int, fp: str = "0123456789abcdef") -> InferenceResult:
    audit = {
        "template": "cmr_basic",
        "prompts": {"lge": "USER: <image>\nIs there LGE? ASSISTANT:"},
        "image_hashes": {"SAX_mid_ED": "e" * 64},
        "option_scores": {"lge": {"absent": {"text": "absent", "logprob": -0.2, "tokens": 1, "probability": 0.8},
                                  "present": {"text": "present", "logprob": -1.6, "tokens": 1,
                                              "probability": 0.2}}},
        "outputs": {"answers": {"lge": "absent"}, "impression": "Normal."},
        "timings": {"lge": 0.1, "total": 0.2},
    }
    return InferenceResult(job_id=job_id, model="demo", model_fingerprint=fp, device="cpu", quantization="nf4",
                           findings=[], impression="Normal.", audit=audit)


def test_report_records_result_and_audit_in_one_transaction(tmp_path):
    from worker.tasks import record_result

    url = f"sqlite:///{tmp_path / 'cmr-ai.db'}"
    job_id = _job(url, "1.2.3")
    result = _result(job_id)
    with db.session_scope(url) as s:
        record_result(s, s.get(db.Job, job_id), result)
    with db.session_scope(url) as s:
        job = s.get(db.Job, job_id)
        assert job.model_fingerprint == result.model_fingerprint
        assert "audit" not in json.loads(job.result_json)  # kept once, in the audit table
        row = s.scalars(select(db.Audit)).one()
        d = row.as_dict()
    assert d["job_id"] == job_id and d["model"] == "demo" and d["model_fingerprint"] == "0123456789abcdef"
    assert d["device"] == "cpu" and d["quantization"] == "nf4" and d["template"] == "cmr_basic"
    for col in db.Audit.JSON_COLUMNS:
        assert d[col] == result.audit[col]

    # A retried report replaces the row rather than adding a second one.
    with db.session_scope(url) as s:
        record_result(s, s.get(db.Job, job_id), _result(job_id, fp="fedcba9876543210"))
    with db.session_scope(url) as s:
        rows = s.scalars(select(db.Audit)).all()
        assert [r.model_fingerprint for r in rows] == ["fedcba9876543210"]

    # A failure after the audit row rolls the row back with the result.
    other = _job(url, "1.2.4")
    with pytest.raises(RuntimeError):
        with db.session_scope(url) as s:
            record_result(s, s.get(db.Job, other), _result(other))
            raise RuntimeError("SR build failed")
    with db.session_scope(url) as s:
        assert s.scalars(select(db.Audit).where(db.Audit.job_id == other)).first() is None
        assert s.get(db.Job, other).result_json is None


def _audit_db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'var' / 'cmr-ai.db'}"
    for uid, created in (("1.1", datetime(2026, 3, 31, 23, 59)), ("1.2", datetime(2026, 4, 1, 0, 0)),
                         ("1.3", datetime(2026, 4, 2, 12, 0))):
        job_id = _job(url, uid)
        with db.session_scope(url) as s:
            db.record_audit(s, job_id, model="demo", model_fingerprint="f" * 16, device="cpu",
                            quantization="nf4", audit=_result(job_id).audit).created_at = created
    return url


def test_export_jsonl_since(tmp_path):
    url = _audit_db(tmp_path)
    out = tmp_path / "out" / "audit.jsonl"
    assert export_audit(url, date(2026, 4, 1), out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["created_at"] for r in rows] == ["2026-04-01T00:00:00", "2026-04-02T12:00:00"]
    assert rows[0]["option_scores"]["lge"]["absent"]["probability"] == 0.8
    assert rows[0]["image_hashes"] == {"SAX_mid_ED": "e" * 64}
    assert export_audit(url, date(2026, 5, 1), out) == 0 and out.read_text() == ""
    with pytest.raises(AuditExportError, match="must end in .jsonl or .parquet"):
        export_audit(url, date(2026, 4, 1), tmp_path / "audit.csv")


def test_export_parquet(tmp_path):
    import pyarrow.parquet as pq  # a dependency (setup.cfg): the issue asks for OUT.parquet

    url = _audit_db(tmp_path)
    out = tmp_path / "audit.parquet"
    assert export_audit(url, date(2026, 4, 1), out) == 2
    table = pq.read_table(out)
    assert table.num_rows == 2
    assert json.loads(table.column("outputs")[0].as_py())["answers"] == {"lge": "absent"}


def test_cli_audit_export(tmp_path, capsys):
    url = _audit_db(tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f'database: {{url: "{url}"}}\n')
    out = tmp_path / "audit.jsonl"
    assert cli_main(["audit", "export", "--config", str(cfg), "--since", "2026-04-02", str(out)]) == 0
    assert "1 audit rows since 2026-04-02" in capsys.readouterr().out
    assert [json.loads(x)["created_at"] for x in out.read_text().splitlines()] == ["2026-04-02T12:00:00"]
    assert cli_main(["audit", "export", "--config", str(cfg), "--since", "April", str(out)]) == 2
    assert "'--since' must be a date YYYY-MM-DD, got 'April'" in capsys.readouterr().err
