"""``cmr-ai`` command line: serve | worker | phantom | demo | status | inspect | rules check|explain|test |
audit export | report show | exports list|retry|purge | pull."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "urllib3", "PIL", "dicomweb_client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(path: str, *, node_files: bool = True):
    from plugin.config import ConfigError, load_settings

    try:
        return load_settings(path, node_files=node_files)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        raise SystemExit(1)


def _phi_policy(settings, debug_phi: bool) -> None:
    """PHI out of this process's logs unless logging.phi / --debug-phi (plugin/logsafe.py)."""
    from plugin import logsafe

    logsafe.install()
    logsafe.configure(settings.logging.phi or debug_phi)  # the embedded worker inherits it (environment)
    if logsafe.enabled():
        logging.getLogger("cmr_ai").warning(
            "PHI is written to this log (%s): patient names, IDs, accession numbers, descriptions …; "
            "for debugging only", "--debug-phi" if debug_phi else "logging.phi: true" if settings.logging.phi
            else f"{logsafe.ENV}=1, from the node's --debug-phi")


def cmd_serve(args) -> int:
    from plugin.node import Node

    _logging(args.verbose)
    settings = _load(args.config)
    _phi_policy(settings, args.debug_phi)
    node = Node(settings, start_worker=False if args.no_worker else None)
    node.run_forever()
    return 0


def cmd_worker(args) -> int:
    _logging(args.verbose)
    os.environ["CMR_AI_CONFIG"] = os.path.abspath(args.config)
    settings = _load(args.config, node_files=False)  # node.tls, node.http_token_file: the node's host only
    _phi_policy(settings, args.debug_phi)
    from worker.app import app, configure

    configure(settings)
    argv = ["worker", "-Q", args.queues, "-c", str(args.concurrency), "--loglevel", "INFO",
            "-n", f"cmr-ai-{args.queues.replace(',', '-')}-{os.getpid()}@%h"]
    if settings.queue.broker == "embedded" or settings.queue.broker.startswith("sqla+"):
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    if args.pool:
        argv += ["--pool", args.pool]
    app.worker_main(argv)
    return 0


def cmd_phantom(args, rest: list[str]) -> int:
    from plugin import phantom

    return phantom.main(rest)


def cmd_train(args) -> int:
    """Train a model on a labelled folder (worker/model/train.py); print training.json's summary."""
    import json as _json

    from plugin.progress import Bars, enabled
    from worker.model.train import TrainConfig, train

    _logging(args.verbose)
    for noisy in ("plugin.cardiac", "cmr_ai.cardiac"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = _load(args.config, node_files=False) if args.config else None
    cfg = TrainConfig(seed=args.seed, lora=args.lora, template=args.template)
    if args.epochs is not None:
        cfg.epochs = args.epochs
    if args.lr is not None:
        cfg.lr = args.lr
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    try:
        with Bars(enabled(args.progress)) as bars:
            record = train(args.data, args.out, base=args.base, config=cfg, val_dir=args.val, resume=args.resume,
                           stop_after=args.stop_after, bars=bars,
                           templates_dir=settings.templates_dir if settings is not None else None)
    except (ValueError, OSError) as e:
        print(f"cmr-ai train: {e}", file=sys.stderr)
        return 2
    last = record["val_metrics"][-1] if record["val_metrics"] else {}
    print(_json.dumps({"out": str(args.out), "epochs": record["epochs"], "losses": record["losses"],
                       "val": last, "seconds": record["seconds"]}, indent=1))
    return 0


def cmd_demo(args) -> int:
    from plugin.demo import run_demo

    return run_demo(workdir=args.workdir, keep_running=False, verbose=args.verbose, progress=args.progress)


def cmd_status(args) -> int:
    from plugin.status import command

    return command(args)


def cmd_inspect(args) -> int:
    import warnings

    from plugin.cardiac.inspect import INSPECT_STEPS, inspect_study, print_report, render_contact_sheet
    from plugin.progress import Bars, enabled

    if args.verbose:
        _logging(True)
    quiet = logging.getLogger("plugin.cardiac")
    level = quiet.level
    if not args.verbose:  # the report says what went wrong; no tracebacks on the terminal
        quiet.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            if not args.verbose:
                warnings.simplefilter("ignore")
            with Bars(enabled(args.progress)) as bars:
                task = bars.add(f"inspecting {args.study_dir}", total=INSPECT_STEPS)

                steps = iter(range(INSPECT_STEPS))

                def step(what: str) -> None:
                    task.update(completed=next(steps, INSPECT_STEPS - 1), description=f"inspect: {what}")

                report = inspect_study(args.study_dir, step=step)
                task.update(completed=INSPECT_STEPS, description=f"inspected {args.study_dir}")
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"cmr-ai inspect: error: {e}", file=sys.stderr)
        return 2
    finally:
        quiet.setLevel(level)
    if args.sheet:
        if report.bundle_images:
            out = render_contact_sheet(report.bundle_images, args.sheet, study_uid=report.study_instance_uid,
                                       series_numbers=report.series_numbers())
            if not args.json:
                print(f"contact sheet: {out} ({len(report.bundle_images)} images)")
        else:
            print("cmr-ai inspect: no analysis image: contact sheet not written", file=sys.stderr)
    if args.json:
        print(report.to_json())
    else:
        print_report(report)
    if report.error:
        if args.json:
            print(f"cmr-ai inspect: {report.error}", file=sys.stderr)
        return 1
    return 0


def cmd_rules_check(args) -> int:
    from plugin.config import ConfigError, load_settings

    try:
        s = load_settings(args.file)
    except ConfigError as e:
        for line in e.errors:
            print(line)
        return 1
    print(f"{args.file}: OK ({len(s.rules)} rules, {len(s.destinations)} destinations, {len(s.models)} models; "
          f"rules version {s.rules_version})")
    return 0


def _parse_at(text: Optional[str]):
    """``--at "2024-05-01 23:30"`` → a local datetime (None: now)."""
    from datetime import datetime

    if text is None:
        return None
    try:
        return datetime.fromisoformat(text.strip().replace(" ", "T", 1))
    except ValueError:
        raise SystemExit(f"cmr-ai rules: --at {text!r}: expected a local date and time like '2024-05-01 23:30'")


def _rules_settings(path: str):
    """Settings for explain/test; prints every error and returns None when the file is invalid."""
    from plugin.config import ConfigError, load_settings

    try:
        return load_settings(path)
    except ConfigError as e:
        for line in e.errors:
            print(line)
        return None


def cmd_rules_explain(args) -> int:
    from plugin.routing import StudyFacts, dicom_files, route

    settings = _rules_settings(args.file)
    if settings is None:
        return 2
    try:
        groups, studies, skipped = dicom_files(args.study_dir)
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"cmr-ai rules explain: error: {e}", file=sys.stderr)
        return 2
    facts = StudyFacts.from_folder(args.study_dir, calling_ae=args.calling_ae, source_ip=args.source_ip)
    decision = route(settings.rules, facts, now=_parse_at(args.at), rules_version=settings.rules_version,
                     evaluate_all=True)
    n_files = sum(len(v) for v in groups.values())
    print(f"rules:  {args.file} (version {settings.rules_version}, {len(settings.rules)} rules)")
    print(f"study:  {args.study_dir}: {', '.join(studies) or 'no StudyInstanceUID'} — {len(groups)} series, "
          f"{n_files} DICOM files" + (f", {len(skipped)} other file{'s' if len(skipped) > 1 else ''} skipped"
                                       if skipped else ""))
    if len(studies) > 1:
        print(f"        note: the folder holds {len(studies)} studies; the node would route each on its own")
    print(f"seen as: calling AE {args.calling_ae or '(not given: --calling-ae)'}, source IP "
          f"{args.source_ip or '(not given: --source-ip)'}, node time {decision.at:%a %Y-%m-%d %H:%M}")
    print()
    for line in decision.lines():
        print(line)
    if decision.early:
        print(f"expected views present ({', '.join(decision.views)}): the node would act after "
              f"1 s of quiet instead of {decision.stable_after:g} s")
    return 0


def _load_cases(path: str) -> tuple[list[dict], list[str]]:
    """The cases of a ``rules test`` file, and its mistakes as FILE:LINE: key: message."""
    import difflib

    from ruamel.yaml import YAML
    from ruamel.yaml.error import MarkedYAMLError

    from plugin.yamlmarks import key_of, line_of

    try:
        text = open(path).read()
    except OSError as e:
        return [], [f"{path}: cannot read: {e.strerror}"]
    try:
        top = YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        return [], [f"{path}:{(e.problem_mark.line + 1) if e.problem_mark else 1}: YAML syntax: {e.problem}"]
    items, root = (top["cases"], ("cases",)) if isinstance(top, dict) and "cases" in top else (top, ())
    if not isinstance(items, list) or not items:
        return [], [f"{path}:1: expected a list of cases such as - {{study: cardiac/, expect: cardiac-mr}}"]
    allowed = ("study", "expect", "calling_ae", "source_ip", "at")
    cases, errors = [], []

    def err(loc: tuple, msg: str) -> None:
        errors.append(f"{path}:{line_of(top, loc)}: {key_of(loc)}: {msg}")

    for i, c in enumerate(items):
        loc = root + (i,)
        if not isinstance(c, dict):
            err(loc, "expected a mapping such as {study: DIR, expect: RULE}")
            continue
        for k in c:
            if k not in allowed:
                h = difflib.get_close_matches(str(k), allowed, n=1)
                err(loc + (k,), f"unknown key {k!r}" + (f"; did you mean {h[0]!r}?" if h else
                                                        f"; expected one of {', '.join(allowed)}"))
        if not isinstance(c.get("study"), str):
            err(loc + ("study",), "a folder is needed (relative to the cases file)")
        exp = c.get("expect", ...)
        if exp is ...:
            err(loc, "expect is needed: a rule name, a list of rule names, or ignore")
        elif not (exp is None or isinstance(exp, str) or (isinstance(exp, list) and
                                                           all(isinstance(x, str) for x in exp))):
            err(loc + ("expect",), "expected a rule name, a list of rule names, or ignore")
        case = {k: (str(v) if k in ("calling_ae", "source_ip", "at") and v is not None else v) for k, v in c.items()}
        case["_line"] = line_of(top, loc)
        cases.append(case)
    return cases, errors


def cmd_rules_test(args) -> int:
    from pathlib import Path

    from plugin.routing import StudyFacts, route

    settings = _rules_settings(args.file)
    if settings is None:
        return 2
    cases, errors = _load_cases(args.cases)
    if errors:
        for e in errors:
            print(e)
        return 2
    names = {r.name for r in settings.rules}
    base = Path(args.cases).resolve().parent
    failed = 0
    for c in cases:
        exp = c["expect"]
        expected = [] if exp in (None, "ignore") else ([exp] if isinstance(exp, str) else list(exp))
        label = f"{args.cases}:{c['_line']}: {c['study']}"
        unknown = [e for e in expected if e not in names]
        if unknown:
            print(f"FAIL  {label}: expect names no rule of {args.file}: {', '.join(unknown)}")
            failed += 1
            continue
        folder = base / c["study"]
        try:
            facts = StudyFacts.from_folder(folder, calling_ae=c.get("calling_ae"), source_ip=c.get("source_ip"))
        except (FileNotFoundError, NotADirectoryError) as e:
            print(f"FAIL  {label}: {e}")
            failed += 1
            continue
        if not facts.headers:
            print(f"FAIL  {label}: no DICOM file in {folder}")
            failed += 1
            continue
        d = route(settings.rules, facts, now=_parse_at(c.get("at")), rules_version=settings.rules_version)
        acting = [a.rule for a in d.actions if a.action != "ignore"]
        got = list(d.rules)
        ok = (got == expected) or (not expected and not acting)
        shown = ", ".join(got) if got else "no rule"
        if ok:
            print(f"PASS  {label}: {shown} ({d.summary()})")
            continue
        failed += 1
        want = ", ".join(expected) or "ignore"
        print(f"FAIL  {label}: expected {want}, got {shown} ({d.summary()})")
        for t in d.trace:
            if t.rule in expected and not t.matched:
                print(f"        {t.rule}: " + ("not reached: an earlier rule decided" if not t.reached and
                                               not t.evaluated else t.reason()))
    print(f"{len(cases) - failed} passed, {failed} failed ({args.file}, rules version {settings.rules_version})")
    return 1 if failed else 0


def cmd_audit_export(args) -> int:
    """Write the audit rows since a day to OUT (.jsonl, or .parquet with pyarrow)."""
    from datetime import date

    from plugin.audit import AuditExportError, export_audit

    try:
        since = date.fromisoformat(args.since)
    except ValueError:
        print(f"Argument '--since' must be a date YYYY-MM-DD, got {args.since!r}", file=sys.stderr)
        return 2
    settings = _load(args.config)
    try:
        n = export_audit(settings.database.url, since, args.out)
    except AuditExportError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{n} audit rows since {since.isoformat()} written to {args.out}")
    return 0


def cmd_report_show(args) -> int:
    from plugin.reports.show import command

    return command(args)


def cmd_eval(args) -> int:
    """``cmr-ai eval``: the node's pipeline on labelled studies → metrics (plugin/evaluate.py)."""
    from plugin import evaluate

    if args.verbose:
        _logging(True)
    return evaluate.run(args)


def cmd_pull(args) -> int:
    """Pull one study from a DICOMweb source; a running node routes it, else it is processed here."""
    from plugin.config import ConfigError, load_settings

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("urllib3", "dicomweb_client"):
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        settings = load_settings(args.config)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    if args.source not in settings.sources:
        defined = ", ".join(sorted(settings.sources)) or "none (add a sources: section)"
        print(f"cmr-ai pull: no source {args.source!r} in {args.config}; defined: {defined}", file=sys.stderr)
        return 2
    _phi_policy(settings, False)
    from plugin.dicomweb.pull import PullError, pull_study
    from plugin.ingest import Indexer
    from plugin.progress import Bars, enabled
    from plugin.storage import InstanceStore

    store = InstanceStore(settings.storage.path, fsync=settings.storage.fsync,
                          duplicates=settings.storage.duplicates)
    indexer = Indexer(settings.database.url)
    with Bars(enabled(args.progress)) as bars:
        try:
            result = pull_study(settings, args.source, args.study_uid, store=store, indexer=indexer, progress=bars)
        except PullError as e:
            print(f"cmr-ai pull: source {args.source}: {e}", file=sys.stderr)
            return 1
        print(f"study {args.study_uid} from source {args.source}: {result.summary()} "
              f"({result.requests} WADO-RS request{'s' if result.requests != 1 else ''}, {result.seconds:.1f} s)",
              flush=True)
        for sop, reason in result.failed:
            print(f"  refused {sop}: {reason}")
        if result.failed:
            print(f"  {len(result.failed)} instance(s) refused by this node: the study is processed without them")
        from plugin import node as _node

        running = _node.running_node(settings)
        if running is not None:
            print(f"the running node (pid {running.get('pid')}) will route the study", flush=True)
            return 0
        if args.no_process:
            print("not processed (--no-process): a node started with this config will route it", flush=True)
            return 0
        outcome = _node.process_study(settings, args.study_uid, timeout=args.timeout, progress=bars)
    jobs = outcome.get("jobs") or []
    print(f"study {args.study_uid}: {outcome.get('state')}"
          + (f" (rule {outcome['rule']})" if outcome.get("rule") else "")
          + ("" if jobs else ": no job"))
    failed = False
    for j in jobs:
        counts: dict[tuple[str, str], int] = {}
        for e in j.get("exports") or []:
            counts[(e["state"], e["destination"])] = counts.get((e["state"], e["destination"]), 0) + 1
        sent = ", ".join(f"{n} {state} ({dest})" for (state, dest), n in sorted(counts.items())) or "no export"
        print(f"  job {j.get('id')} ({j.get('kind', 'analyse')}, rule {j.get('rule')}): {j.get('state')}; "
              f"objects: {sent}" + (f"; error: {j['error']}" if j.get("error") else ""))
        failed = failed or j.get("state") == "failed"
    if outcome.get("finished") is False:
        print(f"cmr-ai pull: jobs not finished after {args.timeout:g} s: they stay queued for the next node start",
              file=sys.stderr)
        return 1
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from plugin import progress as _progress

    p = argparse.ArgumentParser(prog="cmr-ai", description="AI drafts for cardiac MRI, as a DICOM node.")
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("serve", help="run the DICOM node (C-STORE SCP, routing, outbox, embedded worker)")
    sp.add_argument("--config", required=True)
    sp.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    sp.add_argument("--debug-phi", action="store_true",
                    help="write PHI (names, IDs, descriptions …) to the log, for debugging (logging.phi)")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("worker", help="run a Celery worker (queues node and/or gpu)")
    sp.add_argument("--config", required=True)
    sp.add_argument("--queues", default="gpu")
    sp.add_argument("--concurrency", type=int, default=1)
    sp.add_argument("--pool", default=None, help="Celery pool (prefork, solo, threads)")
    sp.add_argument("--debug-phi", action="store_true",
                    help="write PHI (names, IDs, descriptions …) to the log, for debugging (logging.phi)")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(fn=cmd_worker)

    sub.add_parser("phantom", help="write a synthetic study (see `cmr-ai phantom -h`)", add_help=False)

    sp = sub.add_parser("train", help="train a model (or LoRA adapters) on labelled studies")
    sp.add_argument("--config", default=None, help="node config (templates_dir); optional")
    sp.add_argument("--data", required=True, help="folder with labels.csv and the studies' DICOM files")
    sp.add_argument("--out", required=True, help="model directory to write (checkpoints/, training.json)")
    sp.add_argument("--base", default=None, help="model to start from (default: a fresh random demo model)")
    sp.add_argument("--lora", action="store_true", help="train LoRA adapters on --base instead of all weights")
    sp.add_argument("--epochs", type=int, default=None)
    sp.add_argument("--lr", type=float, default=None)
    sp.add_argument("--batch-size", type=int, default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--template", default="cmr_standard")
    sp.add_argument("--val", default=None, help="labelled folder for validation (default: 10%% of the studies)")
    sp.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints")
    sp.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    sp.add_argument("-v", "--verbose", action="store_true")
    _progress.add_arguments(sp)
    sp.set_defaults(fn=cmd_train)

    sp = sub.add_parser("demo", help="run the whole path once on a synthetic study")
    sp.add_argument("--workdir", default="./var/demo")
    sp.add_argument("-v", "--verbose", action="store_true")
    _progress.add_arguments(sp)
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("status", help="queue depths, recent jobs with stage times, studies by state, the outbox")
    sp.add_argument("--config", required=True)
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    sp.add_argument("--limit", type=int, default=20, help="recent jobs shown (default 20; 0: all)")
    sp.set_defaults(fn=cmd_status)

    sp = sub.add_parser("inspect", help="what the node understands of a study folder, and what the model sees")
    sp.add_argument("study_dir", help="folder of DICOM files (searched recursively, any file name)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON only")
    sp.add_argument("--sheet", metavar="OUT.png", help="write a contact sheet of the analysis images")
    sp.add_argument("-v", "--verbose", action="store_true")
    _progress.add_arguments(sp)
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("rules", help="routing rules")
    rsub = sp.add_subparsers(dest="rules_cmd", required=True)
    rp = rsub.add_parser("check", help="validate a config file; every error as FILE:LINE: message")
    rp.add_argument("file")
    rp.set_defaults(fn=cmd_rules_check)
    rp = rsub.add_parser("explain", help="every rule in order for a study folder: matched or not, and why")
    rp.add_argument("file", help="config file")
    rp.add_argument("study_dir", help="folder of one study's DICOM files (searched recursively)")
    rp.add_argument("--calling-ae", help="calling AE title the study would come from")
    rp.add_argument("--source-ip", help="IP address the study would come from")
    rp.add_argument("--at", help="node local time to route at, e.g. '2024-05-01 23:30' (default: now)")
    rp.set_defaults(fn=cmd_rules_explain)
    rp = rsub.add_parser("test", help="check the rule each study of a cases file gets (exit 1 on a failure)")
    rp.add_argument("file", help="config file")
    rp.add_argument("cases", help="YAML list of {study: DIR, expect: RULE | [RULES] | ignore} "
                                  "(optional calling_ae, source_ip, at); folders relative to this file")
    rp.set_defaults(fn=cmd_rules_test)

    sp = sub.add_parser("audit", help="the inference audit table")
    asub = sp.add_subparsers(dest="audit_cmd", required=True)
    ap = asub.add_parser("export", help="write audit rows since a day: OUT.jsonl, or OUT.parquet (needs pyarrow)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--since", required=True, help="first day (UTC) to export, YYYY-MM-DD")
    ap.add_argument("out", help="output file: *.jsonl or *.parquet")
    ap.set_defaults(fn=cmd_audit_export)

    sp = sub.add_parser("report", help="read SRs back (ours or any vendor's)")
    psub = sp.add_subparsers(dest="report_cmd", required=True)
    rp = psub.add_parser("show", help="print an SR as a readable report (--html: also write one); exit 2 for a "
                                      "file that is not a DICOM SR")
    rp.add_argument("files", nargs="+", metavar="FILE", help="DICOM SR file(s): ours or any vendor's")
    rp.add_argument("--html", metavar="OUT.html", help="also write the report(s) as one self-contained HTML page")
    rp.add_argument("--json", action="store_true", help="print a JSON list (one object per file) instead of text")
    rp.add_argument("--tree", action="store_true", help="also show the whole content tree of TID 1500 reports")
    rp.set_defaults(fn=cmd_report_show)

    sp = sub.add_parser("pull", help="pull one study from a DICOMweb source (sources:) and process it")
    sp.add_argument("--config", required=True)
    sp.add_argument("--source", required=True, help="a name under sources: in the config")
    sp.add_argument("study_uid", metavar="STUDY_UID", help="Study Instance UID to pull")
    sp.add_argument("--no-process", action="store_true",
                    help="only pull (store and index); a node started later routes the study")
    sp.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds to wait for the study's jobs when no node is running (default 1800)")
    sp.add_argument("-v", "--verbose", action="store_true")
    _progress.add_arguments(sp)
    sp.set_defaults(fn=cmd_pull)

    sp = sub.add_parser("eval", help="measure a model on labelled studies: accuracy, F1, AUROC, calibration, "
                                     "blank-image probe, latency (--json, --report OUT.html)")
    from plugin import evaluate as _evaluate

    _evaluate.add_arguments(sp)
    sp.set_defaults(fn=cmd_eval)

    from plugin import exports as _exports  # cmr-ai exports list|retry|purge (plugin/exports.py)

    _exports.add_parser(sub)

    if argv and argv[0] == "phantom":
        return cmd_phantom(None, argv[1:])
    args = p.parse_args(argv)
    if args.cmd == "exports":
        return _exports.run(args)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
