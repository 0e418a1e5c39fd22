"""``cmr-ai exports list | retry | purge``: the outbox, seen and handled by an operator.

The commands work on the database of a config file (``--config``, default
``$CMR_AI_CONFIG`` or ``./config.yaml``) whether the node runs or not: a row queued
again is sent by the running node's outbox loop within seconds, by the next
``flush`` of any process, or at once with ``retry --now``. The claim on each row
(:mod:`plugin.outbox`) keeps the node and this command from sending it twice.

Exit status: 0 done; 1 the command ran but did not get everything it asked for
(an unknown export id, rows still not delivered after ``retry --now``, rows busy);
2 a usage, config or database error (nothing changed).
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

from plugin import db

STATES = [s.value for s in db.ExportState] + ["unconfirmed"]


class _Fail(Exception):
    """A usage/config/database error: message for stderr, exit status 2."""


def add_parser(sub) -> None:
    """Register ``exports list|retry|purge`` on the ``cmr-ai`` sub-parsers."""
    sp = sub.add_parser("exports", help="the outbox: list, retry, purge export rows")
    esub = sp.add_subparsers(dest="exports_cmd", required=True)

    def common(p):
        p.add_argument("--config", default=None,
                       help="config file (default: $CMR_AI_CONFIG, else ./config.yaml); its database is used")

    p = esub.add_parser("list", help="export rows, newest first: state, attempts, next attempt, peer status")
    common(p)
    p.add_argument("--state", action="append", default=[], metavar="STATE",
                   help=f"only rows in this state: {', '.join(STATES)} (repeat, or comma-separated)")
    p.add_argument("--job", type=int, help="only rows of this job id")
    p.add_argument("--destination", help="only rows for this destination")
    p.add_argument("--limit", type=int, default=200, help="at most this many rows (default 200; 0: all)")
    p.set_defaults(fn=cmd_list)

    p = esub.add_parser("retry", help="queue exports again (by id, or every dead one); --now sends them at once")
    common(p)
    p.add_argument("ids", nargs="*", type=int, metavar="ID", help="export ids (see `cmr-ai exports list`)")
    p.add_argument("--dead", action="store_true", help="every dead export (of --destination)")
    p.add_argument("--destination", help="with --dead: only the dead exports for this destination")
    p.add_argument("--now", action="store_true", help="send them now from this process, and show the outcome")
    from plugin.progress import add_arguments

    add_arguments(p)  # --progress / --no-progress: a bar per destination for --now (stderr)
    p.set_defaults(fn=cmd_retry)

    p = esub.add_parser("purge", help="delete old sent rows and/or dead rows (a dry run without --yes)")
    common(p)
    p.add_argument("--sent-older-than", type=float, metavar="DAYS",
                   help="sent (and superseded) rows that left the outbox more than DAYS days ago")
    p.add_argument("--dead", action="store_true", help="every dead row")
    p.add_argument("--yes", action="store_true", help="really delete (without it: show what would go)")
    p.set_defaults(fn=cmd_purge)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``exports`` command; errors become a message on stderr and exit status 2."""
    try:
        return args.fn(args)
    except _Fail as e:
        print(f"cmr-ai exports {args.exports_cmd}: error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------

def _settings(path: Optional[str]):
    from plugin.config import ConfigError, load_settings

    path = path or os.environ.get("CMR_AI_CONFIG") or "config.yaml"
    if not Path(path).is_file():
        raise _Fail(f"no config file {path!r} (give --config FILE or set CMR_AI_CONFIG)")
    try:
        settings = load_settings(path, check_templates=False)
    except ConfigError as e:
        raise _Fail("the config file has errors:\n" + "\n".join(e.errors)) from None
    url = settings.database.url
    if url.startswith("sqlite:///"):
        dbfile = url[len("sqlite:///"):]
        if dbfile and dbfile != ":memory:" and not Path(dbfile).is_file():
            raise _Fail(f"no database at {dbfile} (database.url in {path}): has the node run with this config?")
    try:
        db.get_engine(url)
    except Exception as e:
        raise _Fail(f"cannot open the database {url}: {type(e).__name__}: {e}") from None
    return settings


def _console():
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 200, soft_wrap=False)


def _ago(t: Optional[datetime], now: datetime) -> str:
    if t is None:
        return ""
    s = (t - now).total_seconds()
    n = abs(s)
    text = f"{n:.0f} s" if n < 120 else f"{n / 60:.0f} min" if n < 7200 else f"{n / 3600:.0f} h" if n < 172800 \
        else f"{n / 86400:.0f} d"
    return f"in {text}" if s > 0 else f"{text} ago"


def state_text(r: db.Export) -> str:
    """``pending``, ``sent``, ``sent, confirmed``, ``sent, awaiting qido``, ``sent, duplicate of 12`` …"""
    if r.state != db.ExportState.SENT:
        return r.state.value
    if r.duplicate_of is not None:
        return f"sent, duplicate of {r.duplicate_of}"
    if r.verify and r.confirmed_at is not None:
        return "sent, confirmed"
    if r.verify:
        return f"sent, awaiting {r.verify}"
    return "sent, with warning" if r.warning else "sent"


def _next(r: db.Export, now: datetime) -> str:
    if r.state == db.ExportState.PENDING:
        if r.claim is not None and r.next_attempt_at > now:
            return "sending now"
        return "due" if r.next_attempt_at <= now else _ago(r.next_attempt_at, now)
    if r.awaiting_confirmation and r.confirm_by is not None:
        return "confirm " + ("overdue" if r.confirm_by <= now else "by " + _ago(r.confirm_by, now))
    return ""


def _message(r: db.Export) -> str:
    if r.state == db.ExportState.SENT and r.duplicate_of is not None:
        return f"already delivered by export {r.duplicate_of}"
    if r.state == db.ExportState.SUPERSEDED:
        return "a newer export of the same object replaced it"
    if r.status == "waiting" and r.state == db.ExportState.PENDING:
        return "waiting for a newer export of the same object"
    return r.last_error or r.warning or ""


def _table(rows: list[db.Export], title: Optional[str] = None):
    from rich.table import Table

    now = db.utcnow()
    t = Table(title=title, title_justify="left", show_lines=False, pad_edge=False)
    for name, kw in (("id", {"justify": "right"}), ("job", {"justify": "right"}), ("destination", {}),
                     ("kind", {}), ("state", {}), ("attempts", {"justify": "right"}), ("next attempt", {}),
                     ("status", {}), ("last error / warning", {"overflow": "fold"})):
        t.add_column(name, no_wrap=name != "last error / warning", **kw)
    for r in rows:
        t.add_row(str(r.id), str(r.job_id), r.destination, r.kind or "", state_text(r), str(r.attempts or 0),
                  _next(r, now), r.status or "", _message(r))
    return t


def _summary(rows: list[db.Export]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    return f"{len(rows)} export{'s' if len(rows) != 1 else ''}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")" if rows else "")


# ---------------------------------------------------------------------------

def cmd_list(args) -> int:
    from plugin import outbox

    wanted = [s.strip() for x in args.state for s in x.split(",") if s.strip()]
    bad = [s for s in wanted if s not in STATES]
    if bad:
        raise _Fail(f"--state {', '.join(bad)}: expected one of {', '.join(STATES)}")
    if args.limit is not None and args.limit < 0:
        raise _Fail(f"--limit {args.limit}: expected 0 (all) or more")
    settings = _settings(args.config)
    states = {db.ExportState(s) for s in wanted if s != "unconfirmed"}
    if "unconfirmed" in wanted:
        states.add(db.ExportState.SENT)
    rows = outbox.list_exports(settings, states=states, job_id=args.job, destination=args.destination)
    if wanted:
        rows = [r for r in rows if r.state.value in wanted or ("unconfirmed" in wanted and r.awaiting_confirmation)]
    total = len(rows)
    if args.limit:
        rows = rows[:args.limit]
    console = _console()
    if not rows:
        console.print("no exports match")
        return 0
    console.print(_table(rows))
    console.print(_summary(rows) + (f"; {total - len(rows)} more not shown (--limit)" if total > len(rows) else ""))
    return 0


def cmd_retry(args) -> int:
    from plugin import outbox

    if not args.ids and not args.dead:
        raise _Fail("name export ids, or --dead for every dead export")
    if args.destination and not args.dead:
        raise _Fail("--destination goes with --dead (ids already name their rows)")
    settings = _settings(args.config)
    console = _console()
    if args.destination and args.destination not in settings.destinations:
        console.print(f"note: destination {args.destination!r} is not in {settings.source}; "
                      f"configured: {', '.join(sorted(settings.destinations)) or 'none'}")
    res = outbox.retry(settings, args.ids, dead=args.dead, destination=args.destination)
    if res.missing:
        print(f"cmr-ai exports retry: no export with id {', '.join(map(str, res.missing))}: nothing queued",
              file=sys.stderr)
        return 1
    if res.busy:
        console.print(f"being sent right now by another process, left alone: {', '.join(map(str, res.busy))}")
    if not res.queued:
        console.print("no dead exports" + (f" for {args.destination}" if args.destination else "")
                      if not res.busy else "nothing queued")
        return 1 if res.busy else 0
    console.print(f"queued again: {len(res.queued)} export{'s' if len(res.queued) != 1 else ''} "
                  f"({', '.join(map(str, res.queued))})")
    if not args.now:
        console.print("the running node sends them within seconds (or: cmr-ai exports retry --now ID...)")
        return 1 if res.busy else 0
    n = _flush_with_progress(settings, res.queued, getattr(args, "progress", None))
    rows = sorted(outbox.list_exports(settings), key=lambda r: r.id)
    rows = [r for r in rows if r.id in set(res.queued)]
    console.print(_table(rows, title=f"sent now: {n}"))
    left = [r for r in rows if r.state != db.ExportState.SENT]
    if left:
        console.print(f"{len(left)} not delivered: " + ", ".join(f"{r.id} {r.state.value}" for r in left))
        return 1
    return 1 if res.busy else 0


def _flush_with_progress(settings, ids: list[int], progress: Optional[bool]) -> int:
    """``outbox.flush`` of ``ids``, one destination at a time (so one association / STOW session
    each, as a single flush would), with a bar on stderr when progress is on."""
    from plugin import outbox
    from plugin.progress import Bars, enabled

    with db.session_scope(settings.database.url) as s:
        from sqlalchemy import select

        dest = dict(s.execute(select(db.Export.id, db.Export.destination).where(db.Export.id.in_(ids))).all())
    groups: dict[str, list[int]] = {}
    for i in ids:
        groups.setdefault(dest.get(i, ""), []).append(i)
    n = 0
    with Bars(enabled(progress)) as bars:
        task = bars.add(f"sending {len(ids)} export{'s' if len(ids) != 1 else ''}", total=len(ids))
        for name, group in sorted(groups.items()):
            task.update(description=f"sending to {name or '?'}")
            n += outbox.flush(settings, export_ids=group)
            task.advance(len(group))
        task.update(description=f"sent {n} of {len(ids)} exports")
    return n


def cmd_purge(args) -> int:
    from plugin import outbox

    if args.sent_older_than is None and not args.dead:
        raise _Fail("say what to delete: --sent-older-than DAYS and/or --dead")
    if args.sent_older_than is not None and args.sent_older_than < 0:
        raise _Fail(f"--sent-older-than {args.sent_older_than:g}: expected a number of days, 0 or more")
    settings = _settings(args.config)
    older = timedelta(days=args.sent_older_than) if args.sent_older_than is not None else None
    rows = outbox.purge(settings, sent_older_than=older, dead=args.dead, dry_run=not args.yes)
    console = _console()
    if not rows:
        console.print("nothing to purge")
        return 0
    console.print(_table(rows))
    if args.yes:
        console.print(f"deleted {_summary(rows)}; no file was deleted")
    else:
        console.print(f"dry run: {_summary(rows)} would be deleted; add --yes to delete them")
    return 0
