"""``cmr-ai exports list|retry|purge`` on a real database with rows made by real sends to Orthanc."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from peers import free_port
from plugin import db, outbox
from plugin.cli import main
from test_export import sc_image
from test_outbox import config, counting_orthanc, received, report_job, row, rows_of, write


@pytest.fixture()
def outbox_db(make_orthanc, tmp_path):
    """An outbox with a sent row, a duplicate, a dead row and a pending one, made by real flushes.

    ``pacs`` is a real Orthanc; ``down`` a port nobody listens on (one attempt, then dead);
    ``later`` the same, with room for retries (the row stays pending).
    """
    pacs = counting_orthanc(make_orthanc, tmp_path)
    settings = config(tmp_path, f"""  pacs: {{dimse: {{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.port}}}}}
  down: {{dimse: {{ae_title: NOBODY, host: 127.0.0.1, port: {free_port()}, timeout: 3}}, max_attempts: 1}}
  later: {{dimse: {{ae_title: NOBODY, host: 127.0.0.1, port: {free_port()}, timeout: 3}}, max_attempts: 5}}
""")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    image = sc_image("CLI")
    job1, [sent, dead, pending] = report_job(settings, [write(image, tmp_path / "a")],
                                             destinations=("pacs", "down", "later"))
    outbox.flush(settings)
    job2, [dup] = report_job(settings, [write(image, tmp_path / "b")])  # the same object again: not sent
    ids = {"sent": sent, "dead": dead, "pending": pending, "dup": dup, "job1": job1, "job2": job2}
    assert [row(settings, ids[k]).state.value for k in ("sent", "dead", "pending", "dup")] == \
        ["sent", "dead", "pending", "sent"]
    return settings, pacs, image, ids


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["exports", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def lines_of(out: str, export_id: int) -> str:
    """The table line of one export (the id is the first cell)."""
    found = [line for line in out.splitlines()
             if line.startswith("│") and line.strip("│ ").split("│")[0].strip() == str(export_id)]
    assert len(found) == 1, f"export {export_id} not once in:\n{out}"
    return found[0]


def ids_in(out: str) -> set[int]:
    """The export ids a table shows."""
    cells = [line.strip("│ ").split("│")[0].strip() for line in out.splitlines() if line.startswith("│")]
    return {int(c) for c in cells if c}


def test_list_shows_every_row_with_its_state_status_and_error(capsys, outbox_db):
    settings, _pacs, image, ids = outbox_db
    code, out, err = run(capsys, "list", "--config", settings.source)
    assert code == 0 and err == ""
    for h in ("id", "job", "destination", "kind", "state", "attempts", "next attempt", "status",
              "last error / warning"):
        assert h in out
    line = lines_of(out, ids["sent"])
    assert " pacs " in line and " sc " in line and " sent " in line and "0x0000" in line
    line = lines_of(out, ids["dead"])
    assert " down " in line and " dead " in line and "no association" in line and "could not be made" in line
    line = lines_of(out, ids["pending"])
    assert " later " in line and " pending " in line and " in " in line and "no association" in line
    line = lines_of(out, ids["dup"])
    assert f"duplicate of {ids['sent']}" in line and f"already delivered by export {ids['sent']}" in line
    assert "4 exports (dead 1, pending 1, sent 2)" in out

    code, out, _ = run(capsys, "list", "--config", settings.source, "--state", "dead,pending")
    assert code == 0 and ids_in(out) == {ids["dead"], ids["pending"]}
    assert "2 exports (dead 1, pending 1)" in out
    code, out, _ = run(capsys, "list", "--config", settings.source, "--job", str(ids["job2"]))
    assert "1 export (sent 1)" in out and ids_in(out) == {ids["dup"]}
    code, out, _ = run(capsys, "list", "--config", settings.source, "--destination", "down")
    assert "1 export (dead 1)" in out and ids_in(out) == {ids["dead"]}
    code, out, _ = run(capsys, "list", "--config", settings.source, "--destination", "nowhere")
    assert code == 0 and out.strip() == "no exports match"


def test_list_errors_are_clear_and_exit_2(capsys, outbox_db, tmp_path):
    settings, *_ = outbox_db
    code, out, err = run(capsys, "list", "--config", settings.source, "--state", "lost")
    assert code == 2 and out == ""
    assert err.strip() == ("cmr-ai exports list: error: --state lost: expected one of pending, sent, dead, "
                           "superseded, unconfirmed")
    code, _, err = run(capsys, "list", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and f"no config file {str(tmp_path / 'missing.yaml')!r}" in err
    other = tmp_path / "other"
    other.mkdir()
    fresh = config(other, "  x: {folder: out}\n")
    code, _, err = run(capsys, "list", "--config", fresh.source)
    assert code == 2 and f"no database at {other / 'db.sqlite'}" in err
    assert not (other / "db.sqlite").exists()  # not created by looking
    bad = tmp_path / "bad.yaml"
    bad.write_text("destinations:\n  x: {folder: out, verify: qido}\n")
    code, _, err = run(capsys, "list", "--config", str(bad))
    assert code == 2 and f"{bad}:2: destinations.x.verify: verify 'qido' needs a dicomweb destination" in err


def test_retry_requeues_dead_rows_and_the_next_flush_sends_them(capsys, outbox_db):
    settings, _pacs, _image, ids = outbox_db
    code, out, _ = run(capsys, "retry", "--config", settings.source, "--dead", "--destination", "down")
    assert code == 0 and f"queued again: 1 export ({ids['dead']})" in out
    r = row(settings, ids["dead"])
    assert r.state == db.ExportState.PENDING and r.attempts == 0 and r.force and r.last_error is None
    with db.session_scope(settings.database.url) as s:
        assert s.get(db.Job, ids["job1"]).state == db.JobState.EXPORTING
    outbox.flush(settings)  # the node's loop (or any flush) picks it up: the peer is still down
    r = row(settings, ids["dead"])
    assert r.state == db.ExportState.DEAD and r.attempts == 1 and "could not be made" in r.last_error

    code, out, _ = run(capsys, "retry", "--config", settings.source, "--dead", "--destination", "pacs")
    assert code == 0 and out.strip() == "no dead exports for pacs"


def test_retry_unknown_ids_change_nothing_and_usage_errors_exit_2(capsys, outbox_db):
    settings, _pacs, _image, ids = outbox_db
    before = [(r.id, r.state, r.attempts, r.next_attempt_at) for r in rows_of(settings)]
    code, out, err = run(capsys, "retry", "--config", settings.source, str(ids["dead"]), "999")
    assert code == 1 and "no export with id 999: nothing queued" in err
    assert [(r.id, r.state, r.attempts, r.next_attempt_at) for r in rows_of(settings)] == before
    code, _, err = run(capsys, "retry", "--config", settings.source)
    assert code == 2 and "name export ids, or --dead" in err
    code, _, err = run(capsys, "retry", "--config", settings.source, "1", "--destination", "pacs")
    assert code == 2 and "--destination goes with --dead" in err
    with pytest.raises(SystemExit) as ei:  # argparse: not a number
        main(["exports", "retry", "--config", settings.source, "one"])
    assert ei.value.code == 2


def test_retry_now_sends_at_once_even_what_the_destination_already_has(capsys, outbox_db):
    settings, pacs, image, ids = outbox_db
    uid = str(image.SOPInstanceUID)
    assert received(pacs) == Counter({uid: 1})
    code, out, _ = run(capsys, "retry", "--config", settings.source, "--now", str(ids["dup"]))
    assert code == 0, out
    assert "sent now: 1" in out and " sent " in lines_of(out, ids["dup"])
    r = row(settings, ids["dup"])
    assert r.state == db.ExportState.SENT and r.duplicate_of is None and r.attempts == 1 and not r.force
    assert received(pacs) == Counter({uid: 2})  # the operator asked: it was really sent

    code, out, _ = run(capsys, "retry", "--config", settings.source, "--now", str(ids["pending"]))
    assert code == 1  # the peer is still down
    assert f"1 not delivered: {ids['pending']} pending" in out
    assert row(settings, ids["pending"]).attempts == 2


def test_retry_leaves_a_row_alone_while_another_process_sends_it(capsys, outbox_db):
    settings, _pacs, _image, ids = outbox_db
    claimed = outbox._claim_due(settings.database.url, "X" * 32, None, [ids["pending"]])
    assert claimed == []  # not due yet (backing off): make it due and claim it, as a running flush would
    with db.session_scope(settings.database.url) as s:
        s.get(db.Export, ids["pending"]).next_attempt_at = db.utcnow()
    assert [i.id for i in outbox._claim_due(settings.database.url, "X" * 32, None, [ids["pending"]])] == \
        [ids["pending"]]
    code, out, _ = run(capsys, "retry", "--config", settings.source, "--now", str(ids["pending"]))
    assert code == 1 and f"being sent right now by another process, left alone: {ids['pending']}" in out
    r = row(settings, ids["pending"])
    assert r.claim == "X" * 32 and r.attempts == 1


def test_purge_is_a_dry_run_without_yes_and_never_touches_pending_rows_or_files(capsys, outbox_db):
    settings, _pacs, _image, ids = outbox_db
    files = sorted(p for p in Path(settings.source).parent.rglob("*.dcm"))
    code, out, _ = run(capsys, "purge", "--config", settings.source, "--sent-older-than", "0", "--dead")
    assert code == 0 and "dry run: 3 exports (dead 1, sent 2) would be deleted; add --yes" in out
    assert len(rows_of(settings)) == 4
    code, out, _ = run(capsys, "purge", "--config", settings.source, "--sent-older-than", "1")
    assert code == 0 and out.strip() == "nothing to purge"  # sent today: younger than a day

    code, out, _ = run(capsys, "purge", "--config", settings.source, "--dead", "--yes")
    assert code == 0 and "deleted 1 export (dead 1); no file was deleted" in out
    assert sorted(r.id for r in rows_of(settings)) == sorted([ids["sent"], ids["pending"], ids["dup"]])
    with db.session_scope(settings.database.url) as s:  # sent an hour ago
        for r in s.scalars(select(db.Export).where(db.Export.state == db.ExportState.SENT)):
            r.sent_at = db.utcnow() - timedelta(hours=1)
    code, out, _ = run(capsys, "purge", "--config", settings.source, "--sent-older-than", "0.01", "--yes")
    assert code == 0 and "deleted 2 exports (sent 2)" in out
    assert [r.id for r in rows_of(settings)] == [ids["pending"]]  # pending rows stay
    assert sorted(p for p in Path(settings.source).parent.rglob("*.dcm")) == files  # and every file

    code, _, err = run(capsys, "purge", "--config", settings.source)
    assert code == 2 and "--sent-older-than DAYS and/or --dead" in err
    code, _, err = run(capsys, "purge", "--config", settings.source, "--sent-older-than", "-1")
    assert code == 2 and "expected a number of days" in err


def test_purge_keeps_rows_awaiting_confirmation(capsys, outbox_db):
    settings, _pacs, _image, ids = outbox_db
    with db.session_scope(settings.database.url) as s:
        r = s.get(db.Export, ids["sent"])
        r.verify, r.confirm_by, r.sent_at = "commitment", db.utcnow() + timedelta(minutes=5), db.utcnow() - \
            timedelta(days=3)
    code, out, _ = run(capsys, "list", "--config", settings.source, "--state", "unconfirmed")
    assert "1 export (sent 1)" in out and "sent, awaiting commitment" in lines_of(out, ids["sent"])
    assert "confirm by in" in lines_of(out, ids["sent"])
    code, out, _ = run(capsys, "purge", "--config", settings.source, "--sent-older-than", "1", "--yes")
    assert code == 0 and out.strip() == "nothing to purge"
    assert row(settings, ids["sent"]).state == db.ExportState.SENT


def test_the_console_script_runs_exports_list(outbox_db):
    settings, _pacs, _image, ids = outbox_db
    exe = Path(sys.executable).with_name("cmr-ai")
    env = {**os.environ, "CMR_AI_CONFIG": settings.source}
    r = subprocess.run([str(exe), "exports", "list", "--state", "dead"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 export (dead 1)" in r.stdout and lines_of(r.stdout, ids["dead"])
    r = subprocess.run([str(exe), "exports", "retry", "12345"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "no export with id 12345" in r.stderr
