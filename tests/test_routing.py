"""Routing rules: every condition and operator, the actions, the trace, and validation with lines.

Headers are tiny pydicom datasets (one per series, as the node sees a study);
series-view conditions run on synthetic studies from ``plugin.phantom``; node-side
behaviour (expected views, forward rows, reload, versions) runs ``Node.check_studies``
on a real SQLite database with the Celery launch recorded instead of sent.
"""
from __future__ import annotations

import json
import logging
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from sqlalchemy import select

from peers import Orthanc, free_port
from plugin import db, outbox
from plugin.config import ConfigError, load_settings
from plugin.node import Node
from plugin.phantom import write_brain_mr, write_study
from plugin.routing import EARLY_QUIET, StudyFacts, route, rule_matches

NOW = datetime(2024, 5, 1, 14, 0)  # a Wednesday


def hdr(**kw) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def settings_from(tmp_path: Path, text: str, name: str = "config.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return load_settings(p)


def one_rule(tmp_path, match_yaml: str, **extra):
    """Settings with one analyse rule 'r' whose match is ``match_yaml`` (a YAML flow mapping)."""
    more = "".join(f"\n    {k}: {v}" for k, v in extra.items())
    return settings_from(tmp_path, f"""\
rules:
  - name: r
    match: {match_yaml}
    template: cmr_standard
    model: demo{more}
""")


def matches(tmp_path, match_yaml: str, headers, **facts) -> bool:
    s = one_rule(tmp_path, match_yaml)
    now = facts.pop("now", NOW)
    return route(s.rules, StudyFacts(headers=list(headers), **facts), now=now).rule == "r"


def errors_of(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        settings_from(tmp_path, text)
    return ei.value.errors


# ---------------------------------------------------------------------------
# keyword conditions

MR_CARDIAC = [hdr(Modality="MR", StudyDescription="CMR function", SeriesDescription="cine_sax", SeriesNumber=3,
                  MagneticFieldStrength=1.5, ImageType=["ORIGINAL", "PRIMARY", "M"], PixelSpacing=[1.4, 1.4],
                  StationName="MRC1", PatientComments=""),
              hdr(Modality="SR", StudyDescription="CMR function", SeriesNumber=99)]


@pytest.mark.parametrize("match, expected", [
    # the documented shape: a string is a regex searched anywhere, a number equality, a list any-of
    ('{StudyDescription: "func"}', True),
    ('{StudyDescription: "^func"}', False),
    ('{StudyDescription: "(?i)cmr"}', True),
    ('{StudyDescription: "cmr"}', False),
    ("{SeriesNumber: 3}", True),
    ("{SeriesNumber: 4}", False),
    ('{Modality: [CT, "^SR$"]}', True),
    ("{Modality: [CT, PT]}", False),
    ("{Modality: SR, SeriesDescription: cine}", True),  # any series: SR one series, cine another
    # operator objects
    ("{Modality: {eq: MR}}", True),
    ("{StudyDescription: {eq: CMR}}", False),  # eq is exact, unlike a plain string
    ("{StudyDescription: {eq: CMR function}}", True),
    ("{Modality: {ne: MR}}", True),  # some series (the SR) is not MR
    ("{StationName: {ne: MRC1}}", False),
    ("{MagneticFieldStrength: {gt: 1}}", True),
    ("{MagneticFieldStrength: {gt: 1.5}}", False),
    ("{MagneticFieldStrength: {ge: 1.5}}", True),
    ("{MagneticFieldStrength: {lt: 3}}", True),
    ("{MagneticFieldStrength: {le: 1.4}}", False),
    ("{MagneticFieldStrength: {ge: 1, le: 2}}", True),
    ("{MagneticFieldStrength: {ge: 2, le: 3}}", False),
    ("{MagneticFieldStrength: {eq: 1.5}}", True),
    ("{SeriesNumber: {in: [3, 4]}}", True),
    ("{StationName: {in: [MRC1, MRC2]}}", True),
    ("{StationName: {in: [MRC]}}", False),
    ('{SeriesDescription: {regex: "(?i)SAX$"}}', True),
    ("{StationName: {present: true}}", True),
    ("{PatientComments: {present: true}}", False),  # empty counts as absent
    ("{PatientComments: {present: false}}", True),
    ("{AccessionNumber: {present: false}}", True),
    ("{StationName: {present: false}}", False),
    ('{StationName: {present: true, regex: "2$"}}', False),
    # multi-valued elements: joined text for regexes, any value for numbers
    ('{ImageType: "PRIMARY\\\\\\\\M"}', True),
    ("{PixelSpacing: {lt: 2}}", True),
    ("{PixelSpacing: {gt: 2}}", False),
    ("{StudyDescription: {gt: 1}}", False),  # not a number: never satisfies a comparison
    ("{AccessionNumber: .*}", False),  # absent: no value to search
    ("{}", True),
])
def test_keyword_conditions(tmp_path, match, expected):
    assert matches(tmp_path, match, MR_CARDIAC) is expected


def test_not_any_all_groups(tmp_path):
    h = MR_CARDIAC
    assert matches(tmp_path, "{not: {Modality: CT}}", h)
    assert not matches(tmp_path, "{not: {Modality: MR}}", h)
    assert not matches(tmp_path, "{not: {Modality: MR, StationName: MRC1}}", h)
    assert matches(tmp_path, "{not: {Modality: MR, StationName: MRC2}}", h)  # not (all of the mapping)
    assert matches(tmp_path, "{any: [{Modality: CT}, {StationName: MRC1}]}", h)
    assert not matches(tmp_path, "{any: [{Modality: CT}, {StationName: MRC2}]}", h)
    assert matches(tmp_path, "{all: [{Modality: MR}, {StationName: MRC1}]}", h)
    assert not matches(tmp_path, "{all: [{Modality: MR}, {StationName: MRC2}]}", h)
    assert matches(tmp_path, "{any: [{not: {Modality: MR}}, {all: [{SeriesNumber: 3}, {Modality: SR}]}]}", h)


def test_the_trace_names_the_deciding_condition_and_the_values_seen(tmp_path):
    s = settings_from(tmp_path, """\
rules:
  - name: cardiac
    match: {Modality: MR, StudyDescription: "(?i)card", any: [{StationName: X}, {StationName: Y}]}
    template: cmr_standard
    model: demo
  - {name: rest, action: ignore}
""")
    d = route(s.rules, [hdr(Modality="MR", StudyDescription="MRI BRAIN", StationName="MRC1")], now=NOW)
    t = d.trace[0]
    assert not t.matched and t.line == 2
    assert t.deciding.condition == "StudyDescription ~ /(?i)card/" and t.deciding.seen == "'MRI BRAIN'"
    assert [c.ok for c in t.checks] == [True, False]  # stops at the first condition that fails
    assert d.trace[1].matched and d.rule == "rest" and d.action == "ignore"
    assert "StudyDescription ~ /(?i)card/ (seen 'MRI BRAIN'): no" in d.explanation[0]
    d = route(s.rules, [hdr(Modality="MR", StudyDescription="cardiac", StationName="MRC1")], now=NOW)
    group = d.trace[0].deciding
    assert group.condition == "any of 2" and [c.seen for c in group.children] == ["'MRC1'", "'MRC1'"]
    assert rule_matches(s.rules[1], [hdr()]) == (True, "empty match: catches every study")
    data = json.loads(d.to_json())
    assert data["matched"] == ["rest"] and data["rules"][0]["checks"][-1]["children"][0]["ok"] is False


# ---------------------------------------------------------------------------
# series views (plugin.cardiac)

@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    write_study(root / "cardiac", style="siemens", seed=31, slices=8, phases=6, size=48)
    write_study(root / "cardiac-ge", style="ge", seed=32, slices=6, phases=6, size=48)
    write_brain_mr(root / "brain", seed=33, size=48)
    return root


def facts(folder, **kw) -> StudyFacts:
    return StudyFacts.from_folder(folder, **kw)


@pytest.mark.parametrize("series, cardiac, ge, brain", [
    ("{view: SAX}", True, True, False),
    ("{view: SAX, min_slices: 8}", True, False, False),
    ("{view: sax, min_slices: 9}", False, False, False),
    ("{view: SAX, min_phases: 6}", True, True, False),
    ("{view: SAX, min_phases: 7}", False, False, False),
    ("{view: [2CH, 3CH]}", True, True, False),
    ("{view: LGE}", False, False, False),
    ("[{view: SAX, min_slices: 6}, {view: 4CH}]", True, True, False),
    ("{min_slices: 5}", True, True, True),  # any view: the brain's 5 axial slices
])
def test_series_view_conditions(tmp_path, studies, series, cardiac, ge, brain):
    s = one_rule(tmp_path, f"{{series: {series}}}")
    got = [route(s.rules, facts(studies / name), now=NOW).rule == "r" for name in ("cardiac", "cardiac-ge", "brain")]
    assert got == [cardiac, ge, brain]


def test_series_views_are_read_only_when_a_reached_rule_needs_them(tmp_path, studies):
    s = settings_from(tmp_path, """\
rules:
  - name: cheap-first
    match: {Modality: CT, series: {view: SAX}}
    template: cmr_standard
    model: demo
  - {name: by-description, match: {StudyDescription: "(?i)card"}, template: cmr_standard, model: demo}
  - {name: needs-views, match: {series: {view: SAX}}, template: cmr_standard, model: demo}
""")
    calls = []

    def paths():
        calls.append(1)
        raise AssertionError("series views were read")

    f = facts(studies / "cardiac")
    lazy = StudyFacts(headers=f.headers, paths=paths)
    d = route(s.rules, lazy, now=NOW)
    assert d.rule == "by-description" and calls == []
    assert d.trace[2].evaluated is False
    # explain evaluates every rule, and then does read them
    d = route(s.rules, f, now=NOW, evaluate_all=True)
    assert d.trace[2].matched and not d.trace[2].reached
    assert "SAX 8x6" in d.trace[2].checks[0].seen


# ---------------------------------------------------------------------------
# calling AE, source IP, time, study age

def test_calling_ae_and_source_ip(tmp_path):
    h = [hdr(Modality="MR")]
    assert matches(tmp_path, '{calling_ae: "^MRC1$"}', h, calling_ae="MRC1")
    assert not matches(tmp_path, '{calling_ae: "^MRC1$"}', h, calling_ae="MRC10")
    assert not matches(tmp_path, '{calling_ae: "^MRC1$"}', h)  # not known: does not hold
    assert matches(tmp_path, "{calling_ae: {in: [A, MRC1]}}", h, calling_ae="MRC1")
    assert matches(tmp_path, "{not: {calling_ae: TEST}}", h, calling_ae="MRC1")
    assert matches(tmp_path, "{source_ip: 10.0.0.0/8}", h, source_ip="10.20.30.40")
    assert not matches(tmp_path, "{source_ip: 10.0.0.0/8}", h, source_ip="192.168.1.2")
    assert matches(tmp_path, "{source_ip: [192.168.1.0/24, 127.0.0.1]}", h, source_ip="127.0.0.1")
    assert not matches(tmp_path, "{source_ip: 127.0.0.1}", h, source_ip="127.0.0.2")
    assert matches(tmp_path, '{source_ip: "fd00::/8"}', h, source_ip="fd00::17")
    assert matches(tmp_path, "{source_ip: 10.0.0.0/8}", h, source_ip="::ffff:10.1.1.1")
    assert not matches(tmp_path, "{source_ip: 10.0.0.0/8}", h)


@pytest.mark.parametrize("window, at, expected", [
    ('{between: ["22:00", "06:00"]}', datetime(2024, 5, 1, 23, 30), True),
    ('{between: ["22:00", "06:00"]}', datetime(2024, 5, 1, 5, 59), True),
    ('{between: ["22:00", "06:00"]}', datetime(2024, 5, 1, 6, 0), False),
    ('{between: ["22:00", "06:00"]}', datetime(2024, 5, 1, 21, 59), False),
    ('{between: ["08:00", "17:30"]}', datetime(2024, 5, 1, 17, 29), True),
    ('{between: ["08:00", "17:30"]}', datetime(2024, 5, 1, 17, 30), False),
    ("{weekdays: [sat, sun]}", datetime(2024, 5, 4, 12, 0), True),  # Saturday
    ("{weekdays: [sat, sun]}", datetime(2024, 5, 3, 12, 0), False),  # Friday
    # the weekday of a window that wraps midnight is the day it started
    ('{between: ["22:00", "06:00"], weekdays: [fri]}', datetime(2024, 5, 4, 2, 0), True),  # Sat 02:00
    ('{between: ["22:00", "06:00"], weekdays: [fri]}', datetime(2024, 5, 3, 2, 0), False),  # Fri 02:00
    ('{between: ["22:00", "06:00"], weekdays: [fri]}', datetime(2024, 5, 3, 23, 0), True),  # Fri 23:00
])
def test_time_windows_with_an_injected_clock(tmp_path, window, at, expected):
    assert matches(tmp_path, f"{{time: {window}}}", [hdr()], now=at) is expected


def test_study_age(tmp_path):
    h = [hdr(StudyDate="20240430", StudyTime="100000.123")]  # 28 h before NOW
    assert matches(tmp_path, '{study_age: {max: "2d"}}', h)
    assert not matches(tmp_path, '{study_age: {max: "1d"}}', h)
    assert matches(tmp_path, '{study_age: {min: "27h", max: "29h"}}', h)
    assert not matches(tmp_path, '{study_age: {min: "1w"}}', h)
    assert matches(tmp_path, '{study_age: {max: "30m"}}', [hdr(StudyDate="20240501", StudyTime="1345")])
    assert not matches(tmp_path, '{study_age: {max: "2d"}}', [hdr(Modality="MR")])  # no StudyDate


# ---------------------------------------------------------------------------
# actions: first match, continue, forward, expected views

ACTIONS = """\
destinations:
  pacs: {folder: /tmp/pacs}
  archive: {folder: /tmp/archive}
rules:
  - name: archive-all
    forward_to: [archive]
    continue: true
    stable_after: 5
  - name: cardiac
    match: {StudyDescription: "(?i)card"}
    template: cmr_standard
    model: demo
    priority: 7
    send_to: [pacs]
    stable_after: 2
  - name: cardiac-too
    match: {StudyDescription: "(?i)card"}
    template: lv_function
    model: demo
  - {name: rest, action: ignore, stable_after: 1}
"""


def test_first_match_wins_and_continue_adds_the_next_match(tmp_path):
    s = settings_from(tmp_path, ACTIONS)
    assert s.rules[0].action == "forward" and s.rules[0].continue_
    d = route(s.rules, [hdr(StudyDescription="cardiac MR")], now=NOW)
    assert d.rules == ("archive-all", "cardiac") and d.rule == "archive-all"
    assert d.action == "analyse" and d.template == "cmr_standard" and d.priority == 7 and d.send_to == ("pacs",)
    assert [a.forward_to for a in d.forwards] == [("archive",)]
    assert d.stable_after == 5  # the longest of the matched rules
    assert d.trace[2].reached is False and d.trace[2].evaluated is False  # first match wins after 'cardiac'
    d = route(s.rules, [hdr(StudyDescription="brain")], now=NOW)
    assert d.rules == ("archive-all", "rest") and d.action == "forward" and not d.analyses
    s2 = settings_from(tmp_path, ACTIONS.replace("model: demo\n    priority: 7", "model: demo\n    continue: true\n"
                                                 "    priority: 7"), "c2.yaml")
    d = route(s2.rules, [hdr(StudyDescription="cardiac MR")], now=NOW)
    assert d.rules == ("archive-all", "cardiac", "cardiac-too")
    assert [a.template for a in d.analyses] == ["cmr_standard", "lv_function"]
    assert route(s2.rules, [hdr()], now=NOW).stable_after == 5  # only archive-all and rest match
    none = settings_from(tmp_path, "rules: [{name: only, match: {Modality: CT}, action: ignore, stable_after: 4}]",
                         "c3.yaml")
    d = route(none.rules, [hdr(Modality="MR")], now=NOW)
    assert d.rule is None and d.action == "ignore" and d.summary() == "no rule matched: ignored"


def test_expected_views_decide_early_only_when_present_for_every_matched_rule(tmp_path, studies):
    s = settings_from(tmp_path, """\
rules:
  - name: cardiac
    match: {Modality: MR}
    expected_views: [sax, CH4]
    stable_after: 60
    template: cmr_standard
    model: demo
""")
    assert s.rules[0].expected_views == ["SAX", "4CH"]
    d = route(s.rules, facts(studies / "cardiac"), now=NOW)
    assert d.early and {"SAX", "4CH"} <= set(d.views)
    assert not d.ready(EARLY_QUIET - 0.5) and d.ready(EARLY_QUIET) and d.ready(60)
    d = route(s.rules, facts(studies / "brain"), now=NOW)
    assert not d.early and not d.ready(30) and d.ready(60)
    both = settings_from(tmp_path, """\
destinations: {archive: {folder: /tmp/a}}
rules:
  - {name: archive, forward_to: [archive], continue: true, stable_after: 60}
  - {name: cardiac, expected_views: [SAX], stable_after: 60, template: cmr_standard, model: demo}
""", "both.yaml")
    assert not route(both.rules, facts(studies / "cardiac"), now=NOW).early


# ---------------------------------------------------------------------------
# the node: decisions recorded with versions, expected views, forward rows

def node_settings(tmp_path, rules_yaml: str, dest_port: int = 0):
    return settings_from(tmp_path, f"""\
storage: {{path: {tmp_path / 'var' / 'dicom'}}}
database: {{url: "sqlite:///{tmp_path / 'var' / 'db.sqlite'}"}}
destinations:
  pacs: {{dimse: {{ae_title: ORTHANC, host: 127.0.0.1, port: {dest_port or free_port()}, timeout: 5}},
         max_attempts: 4}}
rules:
{textwrap.indent(textwrap.dedent(rules_yaml), '  ')}
""")


def index_study(settings, folder: Path, *, only_series: int | None = None, calling_ae="MODALITY",
                source_ip="127.0.0.1") -> str:
    """Index a folder's files as if received (as the SCP does), received 10 minutes ago."""
    received = db.utcnow() - timedelta(minutes=10)
    study_uid = ""
    with db.session_scope(settings.database.url) as s:
        for p in sorted(folder.rglob("*.dcm")):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            if only_series is not None and int(ds.SeriesNumber) > only_series:
                continue
            study_uid = ds.StudyInstanceUID
            st = s.scalar(select(db.Study).where(db.Study.study_instance_uid == study_uid))
            if st is None:
                st = db.Study(study_instance_uid=study_uid, study_description=str(ds.get("StudyDescription", "")),
                              calling_ae=calling_ae, source_ip=source_ip, first_received=received)
                s.add(st)
                s.flush()
            se = s.scalar(select(db.Series).where(db.Series.series_instance_uid == ds.SeriesInstanceUID))
            if se is None:
                se = db.Series(study_id=st.id, series_instance_uid=ds.SeriesInstanceUID, modality=ds.Modality,
                               series_number=int(ds.SeriesNumber))
                s.add(se)
                s.flush()
            if s.scalar(select(db.Instance).where(db.Instance.sop_instance_uid == ds.SOPInstanceUID)):
                continue
            s.add(db.Instance(series_id=se.id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                              transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, path=str(p)))
            st.n_instances += 1
            st.last_received = received
            st.state = db.StudyState.RECEIVING
    return study_uid


@pytest.fixture()
def launched(monkeypatch):
    """Record the Celery chains the node would send (no broker, no worker)."""
    sent = []
    monkeypatch.setattr("plugin.jobs.launch", lambda settings, job_id, prio=5: sent.append(job_id) or "x")
    return sent


def test_node_records_decision_trace_and_rules_version_on_study_and_job(tmp_path, studies, launched):
    settings = node_settings(tmp_path, """\
- {name: from-test-ae, match: {calling_ae: "^TEST$"}, action: ignore}
- {name: cardiac, match: {Modality: MR, source_ip: 127.0.0.0/8}, template: cmr_standard, model: demo,
   send_to: [pacs], priority: 6}
""")
    uid = index_study(settings, studies / "cardiac")
    node = Node(settings, start_worker=False)
    ids = node.check_studies()
    assert ids == launched and len(ids) == 1
    with db.session_scope(settings.database.url) as s:
        st = s.scalar(select(db.Study).where(db.Study.study_instance_uid == uid))
        job = s.get(db.Job, ids[0])
        assert st.state == db.StudyState.COMPLETE and st.rule == "cardiac"
        assert st.rules_version == settings.rules_version == job.rules_version and len(job.rules_version) == 12
        assert job.kind == db.JobKind.ANALYSE and job.priority == 6 and job.destinations == "pacs"
        trace = json.loads(st.decision)
        assert trace["rules_version"] == settings.rules_version and trace["matched"] == ["cardiac"]
        assert trace["rules"][0]["reason"] == "calling_ae ~ /^TEST$/ (seen 'MODALITY'): no"


def test_node_acts_on_expected_views_before_stable_after(tmp_path, studies, launched):
    settings = node_settings(tmp_path, """\
- {name: cardiac, match: {Modality: MR}, expected_views: [SAX, 4CH], stable_after: 3600,
   template: cmr_standard, model: demo}
""")
    node = Node(settings, start_worker=False)
    # series 1-2 only (localizer, 2CH): SAX and 4CH have not arrived; 10 min of quiet < stable_after
    partial = write_study(tmp_path / "partial", style="siemens", seed=41, slices=6, phases=6, size=48)
    uid = index_study(settings, tmp_path / "partial", only_series=2)
    assert node.check_studies() == []
    with db.session_scope(settings.database.url) as s:
        assert s.scalar(select(db.Study)).state == db.StudyState.RECEIVING
    # the rest arrives; one second later the views are all there
    index_study(settings, tmp_path / "partial")
    with db.session_scope(settings.database.url) as s:
        last = s.scalar(select(db.Study)).last_received
    assert node.check_studies(now=last + timedelta(seconds=0.5)) == []  # never before 1 s of quiet
    ids = node.check_studies(now=last + timedelta(seconds=1.2))
    assert len(ids) == 1
    with db.session_scope(settings.database.url) as s:
        st = s.scalar(select(db.Study).where(db.Study.study_instance_uid == uid))
        assert st.state == db.StudyState.COMPLETE and json.loads(st.decision)["early"] is True
    assert partial.study_instance_uid == uid


def test_forward_rows_are_the_original_instances_and_are_not_queued_twice(tmp_path, studies, launched):
    settings = node_settings(tmp_path, """\
- {name: archive, forward_to: [pacs], continue: true}
- {name: rest, action: ignore}
""")
    uid = index_study(settings, studies / "brain")
    node = Node(settings, start_worker=False)
    assert node.check_studies() == [] and launched == []  # nothing for Celery: a forward has no chain
    with db.session_scope(settings.database.url) as s:
        st = s.scalar(select(db.Study))
        job = s.scalar(select(db.Job))
        assert st.state == db.StudyState.COMPLETE and st.rule == "archive, rest"
        assert job.kind == db.JobKind.FORWARD and job.state == db.JobState.EXPORTING and job.rule == "archive"
        rows = s.scalars(select(db.Export)).all()
        instances = s.scalars(select(db.Instance)).all()
        assert sorted((r.sop_instance_uid, r.path) for r in rows) == sorted((i.sop_instance_uid, i.path)
                                                                           for i in instances)
        assert {r.kind for r in rows} == {"original"} and {r.destination for r in rows} == {"pacs"}
        st.state = db.StudyState.RECEIVING  # re-opened (as by a late instance): routed again
    node.check_studies()
    with db.session_scope(settings.database.url) as s:
        assert len(s.scalars(select(db.Job)).all()) == 1  # every instance already queued: no second job
        assert s.scalar(select(db.Study)).study_instance_uid == uid


def test_forward_to_a_dead_port_stays_pending_and_is_retried_then_arrives(tmp_path, studies, launched):
    settings = node_settings(tmp_path, "- {name: archive, forward_to: [pacs]}\n")
    index_study(settings, studies / "cardiac-ge")  # RLE Lossless files
    Node(settings, start_worker=False).check_studies()
    for attempt in (1, 2):
        with db.session_scope(settings.database.url) as s:
            for e in s.scalars(select(db.Export)):
                e.next_attempt_at = db.utcnow() - timedelta(seconds=1)
        assert outbox.flush(settings) == 0
        with db.session_scope(settings.database.url) as s:
            rows = s.scalars(select(db.Export)).all()
            assert {r.state for r in rows} == {db.ExportState.PENDING} and {r.attempts for r in rows} == {attempt}
            assert all("association" in r.last_error for r in rows)
            assert s.scalar(select(db.Job)).state == db.JobState.EXPORTING
    with Orthanc(tmp_path / "orthanc") as pacs:
        cfg = Path(settings.source)  # the PACS is back, on its own port
        cfg.write_text(cfg.read_text().replace(f"port: {settings.destinations['pacs'].dimse.port}",
                                               f"port: {pacs.port}"))
        settings = load_settings(cfg)
        with db.session_scope(settings.database.url) as s:
            for e in s.scalars(select(db.Export)):
                e.next_attempt_at = db.utcnow() - timedelta(seconds=1)
            expected = {e.sop_instance_uid: e.path for e in s.scalars(select(db.Export))}
        assert outbox.flush(settings) == len(expected)
        got = {pacs.instance_tags(i)["SOPInstanceUID"]: i for i in pacs.instances()}
        assert set(got) == set(expected)
        for sop, oid in got.items():  # as received: still RLE Lossless
            assert pacs.instance_metadata(oid)["TransferSyntax"] == "1.2.840.10008.1.2.5"
            assert pydicom.dcmread(expected[sop], stop_before_pixels=True).file_meta.TransferSyntaxUID == \
                "1.2.840.10008.1.2.5"
        with db.session_scope(settings.database.url) as s:
            assert s.scalar(select(db.Job)).state == db.JobState.DONE


# ---------------------------------------------------------------------------
# hot reload (Node.reload_config; the real process is in test_rules_node.py)

def test_reload_swaps_rules_atomically_and_refuses_a_broken_or_restart_only_file(tmp_path, caplog, launched):
    settings = node_settings(tmp_path, "- {name: v1, action: ignore}\n")
    node = Node(settings, start_worker=False)
    cfg = Path(settings.source)
    v1 = settings.rules_version
    assert node.reload_config() is None  # unchanged
    good = cfg.read_text().replace("name: v1, action: ignore", "name: v2, template: cmr_standard, model: demo")
    cfg.write_text(good)
    caplog.set_level(logging.INFO, "cmr_ai.node")
    assert node.reload_config() is True
    v2 = node.settings.rules_version
    assert [r.name for r in node.settings.rules] == ["v2"] and v2 != v1
    assert f"rules version {v1} → {v2}" in caplog.text
    caplog.clear()
    cfg.write_text(good.replace("name: v2,", 'name: v3, match: {StudyDescription: "(?i)card("},')
                   .replace("model: demo}", "model: demo, send_to: [nowhere]}"))
    assert node.reload_config() is False
    assert [r.name for r in node.settings.rules] == ["v2"] and node.settings.rules_version == v2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refused" in m and f"rules version {v2} stays in force" in m for m in errors)
    assert any("bad regular expression" in m and f"{cfg}:" in m for m in errors)
    assert any("unknown destination 'nowhere'" in m for m in errors)
    caplog.clear()
    assert node.reload_config() is None  # the same broken file is not re-read until it changes
    cfg.write_text(good.replace("name: v2,", "name: v4,").replace("storage:", "node: {port: 11999}\nstorage:"))
    assert node.reload_config() is False
    assert "node" in caplog.text and "needs a restart" in caplog.text
    assert [r.name for r in node.settings.rules] == ["v2"]
    cfg.write_text(good)  # back to v2's text: the same version, nothing to do
    assert node.reload_config(force=True) is None and node.settings.rules_version == v2


# ---------------------------------------------------------------------------
# validation: file, line, key — every mistake at once

def test_three_planted_mistakes_are_all_reported_each_with_its_line(tmp_path):
    errs = errors_of(tmp_path, """\
destinations:
  pacs: {dimse: {ae_title: PACS, host: 127.0.0.1, port: 104}}
rules:
  - name: cardiac
    match:
      Modality: MR
      StudyDescription: "(?i)card(iac"
    template: cmr_standard
    model: demo
    send_to: [pcas]
    stable_aftr: 5
""")
    p = tmp_path / "config.yaml"
    assert len(errs) == 3, errs
    assert errs[0].startswith(f"{p}:7: rules[0].match.StudyDescription: bad regular expression '(?i)card(iac': "
                              "missing ), unterminated subpattern")
    assert errs[1] == f"{p}:10: rules[0].send_to[0]: unknown destination 'pcas'; did you mean 'pacs'?"
    assert errs[2] == f"{p}:11: rules[0].stable_aftr: unknown key 'stable_aftr'; did you mean 'stable_after'?"


MISTAKES = """\
destinations:
  pacs: {dimse: {ae_title: PACS, host: 127.0.0.1, port: 104}}
rules:
  - name: a
    match:
      Modalty: MR
      SliceThickness: {gte: 5}
      EchoTime: {gt: short}
      ProtocolName: {regex: "[cine"}
      SeriesNumber: true
      ImageType: []
      PatientComments: {present: false, eq: x}
      series: {view: SAXX, slices: 8}
      time: {between: ["22:00", "25:00"], weekdays: [mon, funday]}
      study_age: {max: 2 days}
      source_ip: [10.0.0.0/33]
      calling_ae: "("
      not: {}
      any: [{}]
    expected_views: [SAX, 5CH]
    template: no_such_template
    model: demoo
    forward_to: [arcive]
  - {name: a, match: {Modality: CT}, action: ignore, forward_to: [pacs]}
  - {name: f, match: {Modality: CT}, action: forward}
  - {name: catch-all, action: ignore}
  - {name: never, match: {Modality: MR}, action: ignore}
"""


@pytest.mark.parametrize("line, key, words", [
    (6, "rules[0].match.Modalty", "did you mean 'Modality'"),
    (7, "rules[0].match.SliceThickness.gte", "unknown operator 'gte'; did you mean 'ge'"),
    (8, "rules[0].match.EchoTime.gt", "gt needs a number, got 'short'"),
    (9, "rules[0].match.ProtocolName.regex", "bad regular expression '[cine': unterminated character set"),
    (10, "rules[0].match.SeriesNumber", "true (a yes/no value) is not a condition"),
    (11, "rules[0].match.ImageType", "an empty list never matches"),
    (12, "rules[0].match.PatientComments.present", "present: false cannot be combined"),
    (13, "rules[0].match.series.slices", "unknown series key 'slices'; did you mean 'min_slices'"),
    (14, "rules[0].match.time.between[1]", "'25:00' is not a time of day"),
    (14, "rules[0].match.time.weekdays[1]", "unknown weekday 'funday'"),
    (15, "rules[0].match.study_age.max", "expected a duration like"),
    (16, "rules[0].match.source_ip[0]", "'10.0.0.0/33' is not an IP address or network"),
    (17, "rules[0].match.calling_ae", "bad regular expression '('"),
    (18, "rules[0].match.not", "not needs a non-empty mapping"),
    (19, "rules[0].match.any[0]", "must be a non-empty mapping"),
    (20, "rules[0].expected_views[1]", "unknown view '5CH'"),
    (21, "rules[0].template", "no_such_template"),
    (22, "rules[0].model", "unknown model 'demoo'; did you mean 'demo'"),
    (23, "rules[0].forward_to[0]", "unknown destination 'arcive'"),
    (24, "rules[1].name", "duplicate rule name 'a' (first at rules[0], line 4)"),
    (24, "rules[1]", "action 'ignore' cannot have forward_to"),
    (25, "rules[2]", "action 'forward' needs forward_to"),
    (27, "rules[4].name", "rule 'never' can never match: rule 'catch-all' (rules[3], line 26) before it catches "
                          "every study and has no 'continue: true'"),
])
def test_every_kind_of_mistake_names_file_line_and_key(tmp_path, line, key, words):
    errs = errors_of(tmp_path, MISTAKES)
    p = tmp_path / "config.yaml"
    assert any(e.startswith(f"{p}:{line}: {key}:") and words in e for e in errs), "\n".join(errs)


def test_all_mistakes_come_at_once_in_line_order_without_duplicates(tmp_path):
    errs = errors_of(tmp_path, MISTAKES)
    lines = [int(e.split(":")[1]) for e in errs]
    assert lines == sorted(lines) and len(errs) == len(set(errs)) and len(errs) >= 23


def test_continue_and_an_earlier_catch_all_with_continue_keep_later_rules_reachable(tmp_path):
    s = settings_from(tmp_path, """\
destinations: {archive: {folder: /tmp/a}}
rules:
  - {name: all, forward_to: [archive], continue: true}
  - {name: also-all, match: {}, action: ignore}
""")
    assert [r.name for r in s.rules] == ["all", "also-all"]
    errs = errors_of(tmp_path, """\
rules:
  - {name: empty-group, match: {any: [{Modality: CT}, {all: []}]}, action: ignore}
  - {name: catch-all, match: , action: ignore}
  - {name: after, action: ignore}
""")
    assert any(":2: rules[0].match.any[1].all: all needs a non-empty list" in e for e in errs), errs
    assert any(":4: rules[2].name: rule 'after' can never match: rule 'catch-all' (rules[1], line 3)" in e
               for e in errs), errs


def test_a_rule_built_in_code_is_checked_by_the_same_grammar():
    from plugin.config import Rule

    with pytest.raises(ValueError, match="bad regular expression"):
        Rule(name="x", match={"StudyDescription": "("}, action="ignore")
    r = Rule(name="x", match={"Modality": {"in": ["MR"]}}, action="ignore", **{"continue": True})
    assert r.continue_ and route([r], [hdr(Modality="MR")]).rule == "x"


def test_an_export_to_a_destination_this_process_does_not_know_is_retried_not_dead(tmp_path, studies, launched):
    """A worker started before a reload may meet a destination only the node knows: keep the row."""
    settings = node_settings(tmp_path, "- {name: archive, forward_to: [pacs]}\n")
    index_study(settings, studies / "brain")
    Node(settings, start_worker=False).check_studies()
    stale = settings.model_copy(update={"destinations": {}})
    assert outbox.flush(stale) == 0
    with db.session_scope(settings.database.url) as s:
        rows = s.scalars(select(db.Export)).all()
        assert {r.state for r in rows} == {db.ExportState.PENDING} and {r.attempts for r in rows} == {1}
        assert all("'pacs' is not configured in this process" in r.last_error for r in rows)
        assert s.scalar(select(db.Job)).state == db.JobState.EXPORTING


def test_scan_dicom_follows_linked_folders_once_and_counts_non_dicom(tmp_path):
    """The folder walk of `rules test`, `eval` and `train`: linked folders are read, a link
    back up the tree does not loop, non-DICOM files are reported as skipped."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from plugin.routing import scan_dicom

    def write(path, study):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)

    root, outside = tmp_path / "root", tmp_path / "outside"
    write(root / "a" / "one.dcm", "1.2.3")
    write(outside / "two", "1.2.4")                       # no extension: still DICOM
    (root / "notes.txt").write_text("not DICOM")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    found, skipped = scan_dicom(root, ["StudyInstanceUID"])
    assert sorted(str(ds.StudyInstanceUID) for _, ds in found) == ["1.2.3", "1.2.4"]
    assert skipped == [str(root / "notes.txt")]
    with pytest.raises(NotADirectoryError):
        scan_dicom(root / "notes.txt", ["StudyInstanceUID"])
