"""docs/rules.md cannot rot: every YAML example loads, and the site set-ups do what the text says."""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pytest

from plugin.cli import _load_cases
from plugin.config import load_settings
from plugin.phantom import write_brain_mr, write_study
from plugin.routing import StudyFacts, route

DOC = Path(__file__).resolve().parents[1] / "docs" / "rules.md"
FENCE = re.compile(r"^```(yaml[^\n]*)\n(.*?)^```", re.S | re.M)


def blocks() -> list[tuple[str, str, int]]:
    """(info string, text, line) of every yaml block."""
    text = DOC.read_text()
    return [(m.group(1).strip(), m.group(2), text[:m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def setup(heading: str) -> str:
    """The first yaml block after a heading."""
    text = DOC.read_text()
    at = text.index(f"### {heading}\n")
    m = FENCE.search(text, at)
    assert m and m.group(1) == "yaml", heading
    return m.group(2)


CONFIGS = [(line, text) for info, text, line in blocks() if info == "yaml"]


def test_the_doc_has_examples_for_every_setup():
    assert len(CONFIGS) >= 9
    for heading in ("Cardiac only", "Cardiac from one scanner", "Forward everything to the archive, analyse cardiac",
                    "Nights only"):
        assert setup(heading)


@pytest.mark.parametrize("line, text", CONFIGS, ids=[f"docs/rules.md:{line}" for line, _ in CONFIGS])
def test_every_yaml_example_loads(tmp_path, line, text):
    p = tmp_path / "config.yaml"
    p.write_text(text)
    s = load_settings(p)
    assert s.rules


def test_the_cases_example_is_a_valid_cases_file(tmp_path):
    cases = [text for info, text, _ in blocks() if info == "yaml cases"]
    assert len(cases) == 1
    p = tmp_path / "cases.yaml"
    p.write_text(cases[0])
    loaded, errors = _load_cases(str(p))
    assert errors == [] and len(loaded) == 4


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs-studies")
    write_study(root / "cardiac", style="ge", seed=61, slices=6, phases=6, size=48)
    write_brain_mr(root / "brain", seed=62, size=48)
    return {name: StudyFacts.from_folder(root / name, calling_ae="MRC1", source_ip="10.20.30.40")
            for name in ("cardiac", "brain")}


def decide(tmp_path, heading, facts, at=datetime(2024, 5, 1, 12, 0), **over):
    p = tmp_path / "config.yaml"
    p.write_text(setup(heading))
    s = load_settings(p)
    for k, v in over.items():
        setattr(facts, k, v)
    return route(s.rules, facts, now=at)


def test_cardiac_only(tmp_path, studies):
    assert decide(tmp_path, "Cardiac only", studies["cardiac"]).rules == ("cardiac-mr",)
    assert decide(tmp_path, "Cardiac only", studies["brain"]).action == "ignore"


def test_cardiac_from_one_scanner(tmp_path, studies):
    import copy

    assert decide(tmp_path, "Cardiac from one scanner", studies["cardiac"]).rules == ("cardiac-scanner",)
    other = copy.copy(studies["cardiac"])
    assert decide(tmp_path, "Cardiac from one scanner", other, calling_ae="MRC2").action == "ignore"
    other = copy.copy(studies["cardiac"])
    assert decide(tmp_path, "Cardiac from one scanner", other, source_ip="10.20.30.41").action == "ignore"


def test_forward_everything_and_analyse_cardiac(tmp_path, studies):
    h = "Forward everything to the archive, analyse cardiac"
    d = decide(tmp_path, h, studies["cardiac"])
    assert d.rules == ("archive-everything", "cardiac-mr") and d.action == "analyse"
    assert [a.forward_to for a in d.forwards] == [("archive",)]
    d = decide(tmp_path, h, studies["brain"])
    assert d.rules == ("archive-everything",) and d.action == "forward"


def test_nights_only(tmp_path, studies):
    assert decide(tmp_path, "Nights only", studies["cardiac"], at=datetime(2024, 5, 1, 23, 0)).rules == (
        "cardiac-at-night",)
    assert decide(tmp_path, "Nights only", studies["cardiac"], at=datetime(2024, 5, 2, 6, 59)).rules == (
        "cardiac-at-night",)
    assert decide(tmp_path, "Nights only", studies["cardiac"], at=datetime(2024, 5, 1, 12, 0)).action == "ignore"
    assert decide(tmp_path, "Nights only", studies["brain"], at=datetime(2024, 5, 1, 23, 0)).action == "ignore"
