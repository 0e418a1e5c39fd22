"""``cmr-ai rules check | explain | test`` through ``plugin.cli.main``."""
from __future__ import annotations

import textwrap

import pytest

from plugin.cli import main
from plugin.phantom import write_brain_mr, write_study

CONFIG = """\
destinations:
  pacs: {folder: /tmp/cmr-ai-test-pacs}
  archive: {folder: /tmp/cmr-ai-test-archive}
rules:
  - name: test-scanner
    match: {calling_ae: "^TEST"}
    action: ignore
  - name: archive-all
    forward_to: [archive]
    continue: true
  - name: cardiac-mr
    match:
      Modality: MR
      StudyDescription: "(?i)card|heart|cmr"
      series: {view: SAX, min_slices: 6}
    template: cmr_standard
    model: demo
    send_to: [pacs]
  - name: brain-at-night
    match:
      BodyPartExamined: BRAIN
      time: {between: ["22:00", "06:00"]}
    template: cmr_standard
    model: demo
  - {name: everything-else, action: ignore}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    (root / "config.yaml").write_text(CONFIG)
    write_study(root / "studies" / "cardiac", style="philips", seed=51, slices=6, phases=6, size=48)
    write_brain_mr(root / "studies" / "brain", seed=52, size=48)
    (root / "studies" / "brain" / "README.txt").write_text("not DICOM")
    return root


def test_check_prints_every_error_as_file_line_message_and_exits_1(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(textwrap.dedent("""\
        destinations: {pacs: {folder: /tmp/x}}
        rules:
          - name: r
            match: {StudyDescription: "(?i)card(", Modalty: MR}
            template: cmr_standard
            model: demo
            send_to: [pacs, pcas]
        """))
    assert main(["rules", "check", str(cfg)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3
    assert out[0].startswith(f"{cfg}:4: rules[0].match.StudyDescription: bad regular expression")
    assert out[1].startswith(f"{cfg}:4: rules[0].match.Modalty: ") and "did you mean 'Modality'" in out[1]
    assert out[2] == f"{cfg}:7: rules[0].send_to[1]: unknown destination 'pcas'; did you mean 'pacs'?"


def test_check_ok_names_the_rules_version(site, capsys):
    assert main(["rules", "check", str(site / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "OK (5 rules" in out and "rules version " in out


def test_explain_on_a_brain_mr_names_every_rule_and_the_one_that_matched(site, capsys):
    assert main(["rules", "explain", str(site / "config.yaml"), str(site / "studies" / "brain"),
                 "--calling-ae", "MODALITY", "--at", "2024-05-01 14:00"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    heads = [line for line in lines if line[:3].strip().rstrip(".").isdigit()]
    assert [h.split(". ", 1)[1].split(" (line")[0] for h in heads] == [
        "test-scanner", "archive-all", "cardiac-mr", "brain-at-night", "everything-else"]
    assert heads[0].endswith(": no") and heads[1].endswith("MATCH -> forward; continue")
    assert heads[2].endswith(": no") and heads[3].endswith(": no") and heads[4].endswith("MATCH -> ignore")
    assert "(line 5)" in heads[0] and "(line 8)" in heads[1]
    # the deciding condition of each rule that did not match, with the values seen
    assert any("calling_ae ~ /^TEST/" in x and "'MODALITY'" in x and "<- decides" in x for x in lines)
    assert any("StudyDescription ~ /(?i)card|heart|cmr/" in x and "'MRI BRAIN WO CONTRAST'" in x
               and "<- decides" in x for x in lines)
    assert any("time between 22:00 and 06:00" in x and "Wed 2024-05-01 14:00" in x and "<- decides" in x
               for x in lines)
    assert lines[-1] == "decision: rule archive-all: forward originals to archive; rule everything-else: ignore"
    assert "5 DICOM files, 1 other file skipped" in out


def test_explain_at_night_and_from_the_test_scanner(site, capsys):
    cfg, brain = str(site / "config.yaml"), str(site / "studies" / "brain")
    assert main(["rules", "explain", cfg, brain, "--at", "2024-05-01 23:00"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("rule brain-at-night: analyse with cmr_standard / "
                                                             "demo (priority 5), results kept on the node")
    assert main(["rules", "explain", cfg, brain, "--calling-ae", "TEST_MR", "--at", "2024-05-01 23:00"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "decision: rule test-scanner: ignore"
    assert any("brain-at-night" in x and "MATCH (not reached: an earlier rule decided)" in x for x in out)


def test_explain_on_a_cardiac_study_shows_the_series_views(site, capsys):
    assert main(["rules", "explain", str(site / "config.yaml"), str(site / "studies" / "cardiac")]) == 0
    out = capsys.readouterr().out
    assert "series SAX with >= 6 slices" in out and "SAX 6x6" in out
    assert out.splitlines()[-1].startswith("decision: rule archive-all: forward originals to archive; "
                                           "rule cardiac-mr: analyse")


def test_explain_errors(site, tmp_path, capsys):
    assert main(["rules", "explain", str(site / "config.yaml"), str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{name: x, match: {Modality: '('}, action: ignore}]\n")
    assert main(["rules", "explain", str(bad), str(site / "studies" / "brain")]) == 2
    assert f"{bad}:1: rules[0].match.Modality: bad regular expression" in capsys.readouterr().out


def test_rules_test_passes_and_fails_per_case(site, capsys):
    cases = site / "cases.yaml"
    cases.write_text(textwrap.dedent("""\
        - {study: studies/cardiac, expect: [archive-all, cardiac-mr]}
        - {study: studies/brain, expect: ignore}
        - {study: studies/brain, expect: [archive-all, brain-at-night], at: "2024-05-01 23:30"}
        - {study: studies/brain, expect: test-scanner, calling_ae: TEST1}
        """))
    assert main(["rules", "test", str(site / "config.yaml"), str(cases)]) == 1  # case 2: archive-all forwards
    out = capsys.readouterr().out.splitlines()
    assert [x.split()[0] for x in out[:4]] == ["PASS", "FAIL", "PASS", "PASS"]
    assert out[1].startswith(f"FAIL  {cases}:2: studies/brain: expected ignore, got archive-all, everything-else")
    assert out[-1].startswith("3 passed, 1 failed")
    cases.write_text(textwrap.dedent("""\
        cases:
          - {study: studies/cardiac, expect: [archive-all, cardiac-mr]}
          - {study: studies/brain, expect: [archive-all, everything-else], at: "2024-05-01 12:00"}
          - {study: studies/brain, expect: null, calling_ae: TEST1}
        """))
    assert main(["rules", "test", str(site / "config.yaml"), str(cases)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("3 passed, 0 failed")


def test_rules_test_explains_why_an_expected_rule_did_not_match(site, capsys):
    cases = site / "why.yaml"
    cases.write_text("- {study: studies/brain, expect: [archive-all, cardiac-mr]}\n"
                     "- {study: studies/brain, expect: cardiac-mri}\n")
    assert main(["rules", "test", str(site / "config.yaml"), str(cases)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL") and "expected archive-all, cardiac-mr, got archive-all, everything-else" in out[0]
    assert out[1].strip().startswith("cardiac-mr: StudyDescription ~ /(?i)card|heart|cmr/ "
                                     "(seen 'MRI BRAIN WO CONTRAST'): no")
    assert out[2].startswith("FAIL") and "expect names no rule" in out[2] and "cardiac-mri" in out[2]


def test_rules_test_reports_mistakes_in_the_cases_file_with_lines(site, capsys):
    cases = site / "broken.yaml"
    cases.write_text("- {study: studies/brain, expect: ignore, calling_aet: X}\n- {expect: 3}\n")
    assert main(["rules", "test", str(site / "config.yaml"), str(cases)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert f"{cases}:1: [0].calling_aet: unknown key 'calling_aet'; did you mean 'calling_ae'?" in out
    assert any(x.startswith(f"{cases}:2: [1].study:") for x in out)
    assert any(x.startswith(f"{cases}:2: [1].expect:") for x in out)
