"""``cmr-ai status --config FILE [--json] [--limit N]``: what the node is doing, from its database
and broker — queue depths, recent jobs with their stage times, studies by state, the outbox,
the DICOMweb sources (studies pulled, being pulled, failed with the archive's message).

Read-only: it opens the node's database (which brings the schema to head like any process,
plugin/db.py ``migrate``) and asks the broker how many messages wait in each queue
(:func:`plugin.metrics.queue_depths`, the same numbers as ``/metrics``). A broker that cannot
be reached is reported, not fatal; a config with mistakes is exit status 2 with one line.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from plugin import db

#: (stage, column it began at, column it ended at): the durations shown per job
STAGES = (("wait", "created_at", "started_at"), ("prepare", "started_at", "prepared_at"),
          ("infer", "prepared_at", "inferred_at"), ("report", "inferred_at", "reported_at"),
          ("export", "reported_at", "finished_at"))


class StatusError(Exception):
    """A config or database problem: one line for the user, exit status 2."""


def _hide_password(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def load(path: str):
    """Settings of ``path``; a missing or invalid file raises :class:`StatusError` (one line)."""
    from pathlib import Path

    from plugin.config import ConfigError, load_settings

    if not Path(path).is_file():
        raise StatusError(f"no config file {path!r}")
    try:
        return load_settings(path, check_templates=False)
    except ConfigError as e:
        more = len(e.errors) - 1
        raise StatusError(e.errors[0] + (f" (and {more} more: cmr-ai rules check {path})" if more else "")) \
            from None


def _seconds(a: Optional[datetime], b: Optional[datetime]) -> Optional[float]:
    return None if a is None or b is None else round((b - a).total_seconds(), 3)


def job_row(job: db.Job, now: datetime) -> dict[str, Any]:
    """One job as status shows it: stage durations in seconds (a running stage: so far)."""
    stages: dict[str, Optional[float]] = {}
    for name, begin, end in STAGES:
        t0, t1 = getattr(job, begin), getattr(job, end)
        if t0 is not None and t1 is None and not job.state.finished:
            stage_now = {"wait": db.JobState.QUEUED, "prepare": db.JobState.PREPARING,
                         "infer": db.JobState.INFERRING, "report": db.JobState.REPORTING,
                         "export": db.JobState.EXPORTING}[name]
            if job.state == stage_now:
                t1 = now  # the stage it is in: how long so far
        stages[name] = _seconds(t0, t1)
    return {
        "id": job.id, "study_instance_uid": job.study.study_instance_uid if job.study else None,
        "rule": job.rule, "kind": job.kind.value if job.kind else None, "state": job.state.value,
        "priority": job.priority, "model": job.model,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "age_s": _seconds(job.created_at, now), "stages_s": stages,
        "total_s": _seconds(job.created_at, job.finished_at), "attempts": job.attempts, "error": job.error,
    }


def collect(settings, limit: int = 20) -> dict[str, Any]:
    """Everything ``cmr-ai status`` prints, as a JSON-able dict."""
    from sqlalchemy import func, select

    try:
        from plugin.metrics import queue_depths
    except ImportError as e:  # the helper that /metrics uses is not there: say so, show the rest
        queue_depths = None
        queue_error: Optional[str] = f"queue depths unavailable: {e}"
    queues: Optional[dict[str, int]] = None
    if queue_depths is not None:
        queue_error = None
        try:
            queues = {str(k): int(v) for k, v in queue_depths(settings).items()}
        except Exception as e:  # an unreachable broker is a finding, not a crash
            queue_error = f"broker {_hide_password(settings.queue.broker)}: {type(e).__name__}: {e}"
    url = settings.database.url
    try:
        db.get_engine(url)
    except Exception as e:
        raise StatusError(f"cannot open the database {_hide_password(url)}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    now = db.utcnow()
    with db.session_scope(url) as s:
        studies = {st.value: n for st, n in s.execute(select(db.Study.state, func.count()).group_by(db.Study.state))}
        jobs_by_state = {st.value: n for st, n in s.execute(select(db.Job.state, func.count()).group_by(db.Job.state))}
        exports = {st.value: n for st, n in
                   s.execute(select(db.Export.state, func.count()).group_by(db.Export.state))}
        pulls: dict[str, dict[str, Any]] = {name: {st.value: 0 for st in db.PullState} for name in settings.sources}
        for name, st, n in s.execute(select(db.SourceStudy.source, db.SourceStudy.state, func.count())
                                     .group_by(db.SourceStudy.source, db.SourceStudy.state)):
            pulls.setdefault(name, {x.value: 0 for x in db.PullState})[st.value] = n
        for row in s.scalars(select(db.SourceStudy).where(db.SourceStudy.state == db.PullState.FAILED)
                             .order_by(db.SourceStudy.id.desc()).limit(5)):
            pulls[row.source].setdefault("failures", []).append(
                {"study_instance_uid": row.study_instance_uid, "attempts": row.attempts,
                 "error": (row.error or "").splitlines()[0][:300] if row.error else None,
                 "next_attempt": row.next_attempt.isoformat() if row.next_attempt else None})
        q = select(db.Job).order_by(db.Job.id.desc())
        if limit > 0:
            q = q.limit(limit)
        jobs = [job_row(j, now) for j in s.scalars(q)]
    return {
        "config": settings.source, "rules_version": settings.rules_version,
        "database": _hide_password(url), "broker": _hide_password(settings.queue.broker),
        "queues": queues, "queues_error": queue_error,
        "studies": {st.value: studies.get(st.value, 0) for st in db.StudyState},
        "jobs_by_state": {st.value: jobs_by_state.get(st.value, 0) for st in db.JobState},
        "outbox": {st.value: exports.get(st.value, 0) for st in db.ExportState},
        "sources": {name: {**counts, "url": settings.sources[name].dicomweb.url if name in settings.sources else None,
                           "poll_every": settings.sources[name].poll_every if name in settings.sources else None}
                    for name, counts in pulls.items()},
        "jobs": jobs, "now": now.isoformat(),
    }


def _dur(s: Optional[float]) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.0f} h" if s < 172800 \
        else f"{s / 86400:.0f} d"


def render(info: dict[str, Any]) -> None:
    """The human form, on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200, soft_wrap=False)
    console.print(f"config {info['config']} (rules version {info['rules_version']}); database {info['database']}")
    if info["queues"] is not None:
        depths = ", ".join(f"{q} {n}" for q, n in sorted(info["queues"].items())) or "none"
        console.print(f"queues ({info['broker']}): {depths}")
    else:
        console.print(f"queues ({info['broker']}): {info['queues_error']}")
    console.print("studies: " + ", ".join(f"{k} {v}" for k, v in info["studies"].items()))
    console.print("jobs: " + ", ".join(f"{k} {v}" for k, v in info["jobs_by_state"].items()))
    ob = info["outbox"]
    console.print(f"outbox: pending {ob['pending']}, dead {ob['dead']}, sent {ob['sent']}, "
                  f"superseded {ob['superseded']}")
    for name, src in (info.get("sources") or {}).items():
        every = (f"polled every {src['poll_every']:g} s" if src.get("poll_every") else
                 "on demand" if src.get("poll_every") is not None else "no longer configured")
        console.print(f"source {name} ({every}): pulled {src['done']}, pulling {src['pulling']}, "
                      f"failed {src['failed']}")
        for f in src.get("failures", []):
            console.print(f"  [red]failed[/] {f['study_instance_uid']} ({f['attempts']} attempt(s); next "
                          f"{f['next_attempt'] or 'on demand'}): {f['error']}")
    if not info["jobs"]:
        console.print("no jobs yet")
        return
    table = Table(title=f"recent jobs ({len(info['jobs'])})", title_justify="left")
    for col in ("id", "study", "rule", "state", "age", *(n for n, _, _ in STAGES), "error"):
        table.add_column(col, justify="right" if col in ("id", "age") or col in dict.fromkeys(
            n for n, _, _ in STAGES) else "left", overflow="fold")
    for j in info["jobs"]:
        style = {"failed": "red", "done": "green"}.get(j["state"])
        state = f"[{style}]{j['state']}[/]" if style else j["state"]
        err = (j["error"] or "").splitlines()[0][:120] if j["error"] else ""
        table.add_row(str(j["id"]), j["study_instance_uid"] or "", j["rule"], state, _dur(j["age_s"]),
                      *(_dur(j["stages_s"][n]) for n, _, _ in STAGES), err)
    console.print(table)


def command(args) -> int:
    """``cmr-ai status``: 0, or 2 with one line on stderr for a bad config or database."""
    try:
        settings = load(args.config)
        info = collect(settings, limit=args.limit)
    except StatusError as e:
        print(f"cmr-ai status: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        render(info)
    return 0
