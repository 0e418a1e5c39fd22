"""Configuration: the documented shape loads; every mistake is named with file, line and key."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydicom import Dataset

from plugin.config import ConfigError, load_settings
from plugin.routing import route

ROOT = Path(__file__).resolve().parents[1]

ISSUE_SHAPE = """\
node: {ae_title: CMR_AI, host: 127.0.0.1, port: 11112}
storage: {path: ./var/dicom}
database: {url: "sqlite:///./var/cmr-ai.db"}
queue: {broker: embedded}            # or redis://… / amqp://…
models: {demo: {path: demo}}         # "demo" = the tiny local model; else a directory
destinations:
  pacs: {dimse: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}}
  pacs-web: {dicomweb: {url: "http://127.0.0.1:8042/dicom-web"}}
rules:
  - name: cardiac-mr
    match: {Modality: MR, StudyDescription: "(?i)card|heart|cmr"}
    stable_after: 3                  # seconds without a new instance = study complete
    template: cmr_standard           # dicom_sr_templates/cmr_standard.yaml
    model: demo
    send_to: [pacs]
  - {name: everything-else, match: {}, action: ignore}
"""


def write(tmp_path, text) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_the_documented_shape_is_accepted_as_written(tmp_path):
    s = load_settings(write(tmp_path, ISSUE_SHAPE))
    assert s.node.port == 11112 and s.queue.broker == "embedded"
    assert s.models["demo"].quantization == "nf4"
    assert s.destinations["pacs"].kind == "dimse" and s.destinations["pacs-web"].kind == "dicomweb"
    assert [r.name for r in s.rules] == ["cardiac-mr", "everything-else"]
    assert s.rules[1].action == "ignore"


def test_config_example_is_valid():
    s = load_settings(ROOT / "config.example.yaml")
    assert s.rules and s.destinations


def test_folder_destination(tmp_path):
    s = load_settings(write(tmp_path, "destinations: {out: {folder: /tmp/x}}\n"))
    assert s.destinations["out"].kind == "folder"


def test_every_error_is_reported_with_file_line_and_key(tmp_path):
    p = write(tmp_path, """\
        node: {ae_title: CMR_AI, prot: 11112}
        models: {demo: {path: demo, quantization: fp3}}
        destinations:
          pacs: {dimse: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}}
          both: {dimse: {ae_title: X, host: h, port: 1}, folder: /tmp}
        rules:
          - name: cardiac-mr
            match: {Modality: MR, StudyDescripton: "(?i)card("}
            template: no_such_template
            model: demoo
            send_to: [pacs2]
          - {name: cardiac-mr, match: {}, action: ignore}
        """)
    with pytest.raises(ConfigError) as ei:
        load_settings(p)
    errs = ei.value.errors
    text = "\n".join(errs)
    expect = [
        (1, "node.prot", "did you mean 'port'"),
        (2, "models.demo.quantization", "nf4"),
        (5, "destinations.both", "exactly one of"),
        (8, "rules[0].match.StudyDescripton", "bad regular expression"),
        (8, "rules[0].match.StudyDescripton", "did you mean 'StudyDescription'"),
        (9, "rules[0].template", "no_such_template"),
        (10, "rules[0].model", "did you mean 'demo'"),
        (11, "rules[0].send_to[0]", "did you mean 'pacs'"),
        (12, "rules[1].name", "duplicate rule name"),
    ]
    for line, key, words in expect:
        assert any(e.startswith(f"{p}:{line}: {key}:") and words in e for e in errs), (line, key, text)


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = write(tmp_path, "node:\n  port: [1, 2\nstorage: {}\n")
    with pytest.raises(ConfigError) as ei:
        load_settings(p)
    assert ei.value.errors[0].startswith(f"{p}:")
    assert "YAML syntax" in ei.value.errors[0]


def _series(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def test_routing_first_match_wins_regex_search_and_any_series(tmp_path):
    s = load_settings(write(tmp_path, ISSUE_SHAPE))
    cardiac = [_series(Modality="MR", StudyDescription="CMR function", SeriesDescription="cine"),
               _series(Modality="SR", StudyDescription="CMR function")]
    d = route(s.rules, cardiac)
    assert d.rule == "cardiac-mr" and d.action == "analyse" and d.send_to == ("pacs",)
    assert d.template == "cmr_standard" and d.stable_after == 3
    brain = [_series(Modality="MR", StudyDescription="MRI BRAIN WO")]
    d = route(s.rules, brain)
    assert d.rule == "everything-else" and d.action == "ignore"
    assert any("StudyDescription" in line for line in d.explanation)
    ct = [_series(Modality="CT", StudyDescription="cardiac CT")]
    assert route(s.rules, ct).action == "ignore"


def test_sources_of_the_issue_shape_and_their_mistakes_with_lines(tmp_path):
    token = tmp_path / "archive-token"
    token.write_text("s3cret\n")
    s = load_settings(write(tmp_path, f"""\
        sources:
          archive:
            dicomweb: {{url: "http://127.0.0.1:8042/dicom-web", auth: {{token_file: {token}}}}}
            query: {{ModalitiesInStudy: MR}}
            poll_every: 0
        """))
    src = s.sources["archive"]
    assert src.poll_every == 0 and src.query == {"ModalitiesInStudy": "MR"}
    assert src.dicomweb.credentials == (None, None, str(token))

    p = write(tmp_path, """\
        sources:
          a:
            dicomweb: {url: "ftp://x", auth: {token_file: /no/such/token}}
            query: {ModalitesInStudy: MR, StudyDate: "20240101-"}
            poll_every: -1
          b:
            dicomweb: {url: "http://x/dicom-web", username: u, auth: {username: v, password: w}}
            pol_every: 5
        """)
    with pytest.raises(ConfigError) as ei:
        load_settings(p)
    errs = ei.value.errors
    text = "\n".join(errs)
    expect = [
        (3, "sources.a.dicomweb.url", "not an http(s) URL"),
        (3, "sources.a.dicomweb.auth.token_file", "no such file"),
        (4, "sources.a.query", "did you mean 'ModalitiesInStudy'"),
        (5, "sources.a.poll_every", "greater than or equal to 0"),
        (7, "sources.b.dicomweb", "credentials given twice"),
        (8, "sources.b.pol_every", "did you mean 'poll_every'"),
    ]
    for line, key, words in expect:
        assert any(e.startswith(f"{p}:{line}: {key}:") and words in e for e in errs), (line, key, text)
    # the date window is the poller's: a StudyDate in query is refused with the reason
    p = write(tmp_path, """\
        sources:
          a:
            dicomweb: {url: "http://x/dicom-web"}
            query: {StudyDate: "20240101-"}
        """)
    with pytest.raises(ConfigError) as ei:
        load_settings(p)
    assert f"{p}:4: sources.a.query: 'StudyDate' is set by the poller" in ei.value.errors[0]
