"""docs/templates.md cannot rot: every template example loads, the site template with a
private coding scheme becomes an SR that declares the scheme and passes dciodvfy, and an
undeclared scheme is refused with file, line and key."""
from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest

from plugin.reports.sr import build_measurement_report, build_narrative_report
from plugin.reports.template import TemplateError, load_template
from test_reports import dciodvfy, fake_result, study  # noqa: F401 — fixture

DOC = Path(__file__).resolve().parents[1] / "docs" / "templates.md"
FENCE = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)


def examples() -> list[str]:
    return [m.group(1) for m in FENCE.finditer(DOC.read_text())]


def write(tmp_path: Path, text: str) -> Path:
    name = re.search(r"^name: (\S+)", text, re.M).group(1)
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return p


def test_every_example_loads(tmp_path):
    texts = examples()
    assert len(texts) >= 2
    names = [load_template(write(tmp_path, t)).name for t in texts]
    assert names == ["site_cmr", "effusion_screen"]
    assert load_template(write(tmp_path, texts[1])).impression is False


def test_shipped_templates_are_the_ones_the_doc_lists():
    doc = DOC.read_text()
    for p in (Path(__file__).resolve().parents[1] / "dicom_sr_templates").glob("*.yaml"):
        assert f"`{p.stem}`" in doc, f"{p.name} is not described in docs/templates.md"


def test_private_scheme_is_declared_in_the_sr(tmp_path, study):  # noqa: F811
    images, sources = study
    t = load_template(write(tmp_path, examples()[0]))
    result = fake_result(t, images)
    for build in (build_measurement_report, build_narrative_report):
        ds = build(t, result, images, sources)
        path = tmp_path / f"{build.__name__}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        declared = {it.CodingSchemeDesignator: it for it in back.CodingSchemeIdentificationSequence}
        assert set(declared) == {"99CMR"}
        assert declared["99CMR"].CodingSchemeName == "Example Hospital CMR codes"
        assert declared["99CMR"].CodingSchemeResponsibleOrganization == "Example Hospital"
        dciodvfy(path)
    # the private codes really are in the measurement report
    sr = build_measurement_report(t, result, images, sources)
    used = {(c.CodingSchemeDesignator, c.CodeValue)
            for c in _codes(sr)}
    assert ("99CMR", "SEPT-MOT") in used


def _codes(ds):
    for it in ds.get("ContentSequence", []):
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for c in it.get(key, []):
                yield c
        yield from _codes(it)


def test_templates_with_only_standard_codes_declare_nothing(study):  # noqa: F811
    images, sources = study
    t = load_template("cmr_standard")
    ds = build_measurement_report(t, fake_result(t, images), images, sources)
    assert "CodingSchemeIdentificationSequence" not in ds


def test_undeclared_or_wrongly_declared_scheme_names_file_line_key(tmp_path):
    text = examples()[0]
    lines = text.splitlines()
    # drop the declaration: every use of 99CMR is now an error, each with its own line
    no_decl = "\n".join(ln for ln in lines if not ln.lstrip().startswith(("coding_schemes:", "- {designator"))) + "\n"
    p = write(tmp_path, no_decl)
    with pytest.raises(TemplateError) as ei:
        load_template(p)
    errs = ei.value.errors
    assert len(errs) == 3, errs
    concept_line = next(i for i, ln in enumerate(no_decl.splitlines(), 1) if "SEPT-MOT" in ln)
    assert errs[0].startswith(f"{p}:{concept_line}: findings[1].concept.scheme: coding scheme '99CMR'")
    assert "declare it under coding_schemes" in errs[0]
    assert any("findings[1].options[1].code.scheme" in e for e in errs)
    # declaring a standard scheme is refused too
    bad = text.replace("{designator: 99CMR,", "{designator: SCT,")
    with pytest.raises(TemplateError) as ei:
        load_template(write(tmp_path, bad))
    assert any("coding_schemes[0].designator: 'SCT' is a DICOM standard coding scheme" in e
               for e in ei.value.errors), ei.value.errors
