"""worker.safety: impression filters, contradiction flags, criticals, the image-dependence
probe (demo model on the CPU), the critical-finding hook, and the flags in the SRs."""
from __future__ import annotations

import json

import pytest

from plugin.reports.sr import build_measurement_report, build_narrative_report
from plugin.reports.template import load_template
from test_reports import dciodvfy, fake_result, study, texts_of  # noqa: F401 — fixture
from worker.bundle import AnalysisBundle, FindingResult, InferenceResult
from worker.demo_model import build_demo_model
from worker.model.engine import Engine, run_bundle
from worker.safety import (PROBE_THRESHOLD, REMOVED_CERTAINTY, REMOVED_TREATMENT, FlagKind,
                           SafetyReport, apply_safety, check_impression, critical_findings,
                           image_dependence_probe, notify_critical)


@pytest.fixture(scope="module")
def template():
    return load_template("cmr_standard")


def answers(**over: str) -> dict[str, str]:
    base = {"image_quality": "good", "lv_size": "normal", "lv_systolic_function": "normal",
            "lv_wall_thickness": "normal", "lv_regional_wall_motion": "normal", "rv_size": "normal",
            "rv_systolic_function": "normal", "pericardial_effusion": "none",
            "overall_assessment": "normal"}
    return {**base, **over}


def result_of(template, ans: dict[str, str], impression: str = "") -> InferenceResult:
    findings = []
    for f in template.findings:
        ids = [o.id for o in f.options]
        probs = {o: (0.9 if o == ans[f.id] else 0.1 / (len(ids) - 1)) for o in ids}
        findings.append(FindingResult(id=f.id, answer=ans[f.id], probabilities=probs, image_keys=[]))
    return InferenceResult(job_id=3, model="demo", model_fingerprint="f" * 16, device="cpu",
                           quantization="none", findings=findings, impression=impression)


def kinds(flags) -> list[FlagKind]:
    return [f.kind for f in flags]


# --------------------------------------------------------------------------- contradictions


@pytest.mark.parametrize("impression, ans, finding", [
    ("Normal study. No pericardial effusion.", answers(pericardial_effusion="large"), "pericardial_effusion"),
    ("Unremarkable cardiac MRI.", answers(pericardial_effusion="moderate"), "pericardial_effusion"),
    ("Reduced left ventricular systolic function.", answers(), "lv_systolic_function"),
    ("LV systolic dysfunction with normal LV size.", answers(), "lv_systolic_function"),
    ("Preserved LV ejection fraction.", answers(lv_systolic_function="severely_reduced"), "lv_systolic_function"),
    ("Large pericardial effusion.", answers(), "pericardial_effusion"),
    ("The left ventricle is dilated.", answers(), "lv_size"),
    ("Normal cardiac MRI.", answers(overall_assessment="abnormal"), "overall_assessment"),
])
def test_contradictions_are_flagged(template, impression, ans, finding):
    cleaned, flags = check_impression(impression, ans, template)
    assert cleaned == impression  # flagged, never removed
    hits = [f for f in flags if f.kind is FlagKind.CONTRADICTION]
    assert finding in {f.finding_id for f in hits}, flags
    f = next(f for f in hits if f.finding_id == finding)
    assert f.option_id == ans[finding] and f.message.startswith("impression contradicts finding ") and f.text


@pytest.mark.parametrize("impression, ans", [
    ("Normal study. No pericardial effusion.", answers()),
    ("Large pericardial effusion; severely reduced LV function.",
     answers(pericardial_effusion="large", lv_systolic_function="severely_reduced", overall_assessment="abnormal")),
    ("No large pericardial effusion. No reduced LV function.", answers()),  # negated: not affirmed
    ("Mildly reduced right ventricular function.", answers(rv_systolic_function="mildly_reduced")),
    ("", answers(pericardial_effusion="large")),
])
def test_consistent_impressions_are_not_flagged(template, impression, ans):
    _, flags = check_impression(impression, ans, template)
    assert flags == []


def test_rules_about_findings_the_template_lacks_are_skipped():
    lv = load_template("lv_function")  # no pericardial_effusion finding
    _, flags = check_impression("No pericardial effusion.", {"pericardial_effusion": "large"}, lv)
    assert flags == []


# --------------------------------------------------------------------------- filters


def test_treatment_and_certainty_sentences_are_removed(template):
    text = ("Severely reduced LV function. Recommend starting beta-blocker therapy. "
            "This is definitely dilated cardiomyopathy. Consider pericardiocentesis; "
            "prescribe furosemide 40 mg! Findings are 100% certain? Small pericardial effusion.")
    cleaned, flags = check_impression(text, answers(lv_systolic_function="severely_reduced",
                                                    pericardial_effusion="small"), template)
    assert cleaned == ("Severely reduced LV function. [removed: treatment advice] "
                       "[removed: certainty language] [removed: treatment advice] "
                       "[removed: treatment advice] [removed: certainty language] Small pericardial effusion.")
    assert kinds(flags).count(FlagKind.TREATMENT_ADVICE) == 3
    assert kinds(flags).count(FlagKind.CERTAINTY) == 2
    assert {f.text for f in flags} >= {"Recommend starting beta-blocker therapy.", "Findings are 100% certain?"}
    for word in ("aspirin", "apixaban", "ACE inhibitor", "surgery", "an ICD"):
        cleaned, flags = check_impression(f"Patient may benefit from {word}.", answers(), template)
        assert cleaned == REMOVED_TREATMENT, word
    # descriptive words that look like treatment or certainty words stay
    for ok in ("Increased wall thickness of the septum.", "Definite LV thrombus cannot be excluded.",
               "Normal LV size."):
        cleaned, flags = check_impression(ok, answers(), template)
        assert cleaned == ok and not flags, ok
    cleaned, _ = check_impression("Without a doubt normal.", answers(), template)
    assert cleaned == REMOVED_CERTAINTY


def test_a_looping_impression_is_removed_and_flagged(template):
    """A generation stuck on one word (the trained demo model's impression did this) is not a draft."""
    loop = "none " * 40
    cleaned, flags = check_impression(loop, answers(), template)
    assert cleaned == "[removed: repetitive text]"
    assert kinds(flags) == [FlagKind.DEGENERATE] and "repeated" in flags[0].message
    # ordinary sentences repeat short words without being loops
    ok = "Normal LV size and function. The pericardium is normal and there is no effusion."
    assert check_impression(ok, answers(), template) == (ok, [])
    assert check_impression("normal normal", answers(), template)[1] == []  # too short to judge


# --------------------------------------------------------------------------- criticals


def test_critical_findings_follow_the_template(template):
    res = result_of(template, answers(pericardial_effusion="large", lv_systolic_function="severely_reduced",
                                      image_quality="limited"))
    assert critical_findings(res, template) == [("lv_systolic_function", "severely_reduced"),
                                                ("pericardial_effusion", "large")]
    assert critical_findings(result_of(template, answers()), template) == []


def test_notify_critical_runs_the_shell_hook(tmp_path):
    out = tmp_path / "hook.json"
    env_out = tmp_path / "hook.env"
    hook = f'cat > {out} && printf "%s|%s" "$CMR_AI_JOB_ID" "$CMR_AI_CRITICALS" > {env_out}'
    crit = [("pericardial_effusion", "large"), ("lv_systolic_function", "severely_reduced")]
    assert notify_critical(crit, 42, hook) is True
    assert json.loads(out.read_text()) == {"job_id": 42, "criticals": [
        {"finding": "pericardial_effusion", "option": "large"},
        {"finding": "lv_systolic_function", "option": "severely_reduced"}]}
    assert env_out.read_text() == "42|pericardial_effusion=large;lv_systolic_function=severely_reduced"
    # nothing to notify, no hook, an HTTP hook (not implemented), a failing or slow command: False, no raise
    assert notify_critical([], 42, hook) is False
    assert notify_critical(crit, 42, None) is False
    assert notify_critical(crit, 42, "https://example.invalid/hook") is False
    assert notify_critical(crit, 42, "exit 3") is False
    assert notify_critical(crit, 42, "sleep 5", timeout=0.5) is False


# --------------------------------------------------------------------------- probe


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory) -> Engine:
    path = build_demo_model(tmp_path_factory.mktemp("models") / "demo", seed=0)
    return Engine.load(path, quantization="none", device="cpu")


@pytest.fixture(scope="module")
def bundle(template, study) -> AnalysisBundle:
    images, _sources = study
    return AnalysisBundle(job_id=3, study_instance_uid="1.2.3", model="demo", template=template.name,
                          questions=template.questions(), images=images, impression=True)


def test_probe_flags_an_image_blind_model(demo_engine, bundle, template, monkeypatch):
    def blind(images, question, option_texts, **_):
        return [1.0 / len(option_texts)] * len(option_texts)

    monkeypatch.setattr(demo_engine, "score_options", blind)
    probe = image_dependence_probe(demo_engine, bundle)
    assert probe.flagged and probe.max_abs_diff == 0.0 and probe.threshold == PROBE_THRESHOLD
    assert set(probe.per_finding) == {f.id for f in template.findings}
    res = result_of(template, answers(pericardial_effusion="large"),
                    "Normal study. Start aspirin. No pericardial effusion.")
    # apply_safety takes the result as the probe's reference: uniform, as the blind engine scores
    new, report = apply_safety(demo_engine, bundle, res.model_copy(update={"findings": [
        f.model_copy(update={"probabilities": {o: 1.0 / len(f.probabilities) for o in f.probabilities}})
        for f in res.findings]}), template)
    assert res.impression == "Normal study. Start aspirin. No pericardial effusion."  # not changed
    assert new.impression == f"Normal study. {REMOVED_TREATMENT} No pericardial effusion."
    assert report.criticals == [("pericardial_effusion", "large")]
    assert FlagKind.IMAGE_INDEPENDENT in kinds(report.flags)
    assert any("did not depend on the images" in m for m in report.messages())
    assert report.probe is not None and report.probe.flagged


def test_probe_on_the_demo_model(demo_engine, bundle, template):
    res = run_bundle(demo_engine, bundle)
    probe = image_dependence_probe(demo_engine, bundle, reference=res)
    full = image_dependence_probe(demo_engine, bundle)  # real images scored again: same numbers
    assert full.per_finding == pytest.approx(probe.per_finding, abs=1e-6)
    print(f"demo model: max |p(real) - p(black)| = {probe.max_abs_diff:.4f} "
          f"({probe.seconds:.2f} s); per finding {probe.per_finding}")
    assert probe.flagged == (probe.max_abs_diff < PROBE_THRESHOLD)
    new, report = apply_safety(demo_engine, bundle, res, template, threshold=2.0)  # all diffs < 2
    assert report.probe.flagged and FlagKind.IMAGE_INDEPENDENT in kinds(report.flags)
    _, report = apply_safety(demo_engine, bundle, res, template, threshold=0.0)
    assert not report.probe.flagged and FlagKind.IMAGE_INDEPENDENT not in kinds(report.flags)
    _, report = apply_safety(demo_engine, bundle, res, template, probe=False)
    assert report.probe is None


# --------------------------------------------------------------------------- SR


def test_sr_shows_safety_flags_and_stays_valid(template, study, tmp_path):
    images, sources = study
    res = fake_result(template, images)  # pericardial effusion large (critical), LV mildly reduced
    res = res.model_copy(update={"impression": "Normal study.\tNo pericardial effusion. Start colchicine."})
    new, report = apply_safety(None, None, res, template, probe=False)
    assert {f.kind for f in report.flags} == {FlagKind.CONTRADICTION, FlagKind.TREATMENT_ADVICE}
    probe_flag = SafetyReport.model_validate({"flags": [{"kind": "image_independent",
                                                         "message": "answers did not depend on the images"}]})
    report = report.model_copy(update={"flags": report.flags + probe_flag.flags})
    for name, build in (("sr", build_measurement_report), ("text", build_narrative_report)):
        ds = build(template, new, images, sources, safety=report)
        texts = texts_of(ds.ContentSequence)
        flags = [t for t in texts if t.startswith("AI SAFETY FLAG: ")]
        assert len(flags) == len(report.flags), texts
        assert any(t.startswith("AI SAFETY FLAG: impression contradicts finding Pericardial effusion: large")
                   for t in flags), flags
        assert "AI SAFETY FLAG: answers did not depend on the images" in flags
        assert any(t.startswith("CRITICAL — urgent review: ") and "Pericardial effusion" in t for t in texts), texts
        assert any(REMOVED_TREATMENT in t for t in texts)
        assert not any(c in t for t in texts for c in "\t\x1b\n")
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        dciodvfy(path)
    # without a safety report nothing changes but the critical line's wording
    texts = texts_of(build_narrative_report(template, res, images, sources).ContentSequence)
    assert not any(t.startswith("AI SAFETY FLAG") for t in texts)
