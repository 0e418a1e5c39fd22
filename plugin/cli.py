"""``cmr-ai`` command line: serve | worker | phantom | demo | inspect | rules check."""
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
    for noisy in ("pynetdicom", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(path: str):
    from plugin.config import ConfigError, load_settings

    try:
        return load_settings(path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        raise SystemExit(1)


def cmd_serve(args) -> int:
    from plugin.node import Node

    _logging(args.verbose)
    settings = _load(args.config)
    node = Node(settings, start_worker=False if args.no_worker else None)
    node.run_forever()
    return 0


def cmd_worker(args) -> int:
    _logging(args.verbose)
    os.environ["CMR_AI_CONFIG"] = os.path.abspath(args.config)
    settings = _load(args.config)
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


def cmd_demo(args) -> int:
    from plugin.demo import run_demo

    return run_demo(workdir=args.workdir, keep_running=False, verbose=args.verbose)


def cmd_inspect(args) -> int:
    import warnings

    from plugin.cardiac.inspect import inspect_study, print_report, render_contact_sheet

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
            report = inspect_study(args.study_dir)
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
    print(f"{args.file}: OK ({len(s.rules)} rules, {len(s.destinations)} destinations, {len(s.models)} models)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="cmr-ai", description="AI drafts for cardiac MRI, as a DICOM node.")
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("serve", help="run the DICOM node (C-STORE SCP, routing, outbox, embedded worker)")
    sp.add_argument("--config", required=True)
    sp.add_argument("--no-worker", action="store_true", help="do not start the embedded worker")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(fn=cmd_serve)

    sp = sub.add_parser("worker", help="run a Celery worker (queues node and/or gpu)")
    sp.add_argument("--config", required=True)
    sp.add_argument("--queues", default="gpu")
    sp.add_argument("--concurrency", type=int, default=1)
    sp.add_argument("--pool", default=None, help="Celery pool (prefork, solo, threads)")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(fn=cmd_worker)

    sub.add_parser("phantom", help="write a synthetic study (see `cmr-ai phantom -h`)", add_help=False)

    sp = sub.add_parser("demo", help="run the whole path once on a synthetic study")
    sp.add_argument("--workdir", default="./var/demo")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(fn=cmd_demo)

    sp = sub.add_parser("inspect", help="what the node understands of a study folder, and what the model sees")
    sp.add_argument("study_dir", help="folder of DICOM files (searched recursively, any file name)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON only")
    sp.add_argument("--sheet", metavar="OUT.png", help="write a contact sheet of the analysis images")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("rules", help="routing rules")
    rsub = sp.add_subparsers(dest="rules_cmd", required=True)
    rp = rsub.add_parser("check", help="validate a config file; every error as FILE:LINE: message")
    rp.add_argument("file")
    rp.set_defaults(fn=cmd_rules_check)

    if argv and argv[0] == "phantom":
        return cmd_phantom(None, argv[1:])
    args = p.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
