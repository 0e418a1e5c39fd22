"""Container health checks for docker/Dockerfile.node and docker/Dockerfile.worker.

``node``:   GET http://127.0.0.1:<node.http_port>/health (open, no token) must answer 200 with
            ``"ok": true`` — the node is up and its database reachable (plugin/api.py).
``worker``: a Celery ping to the worker(s) of this container (node names ``…@<hostname>``, as
            ``cmr-ai worker`` names them) must be answered — the worker is connected to the broker.

Exit 0 healthy, 1 not (Docker's HEALTHCHECK convention); one line on stdout says why.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import urllib.request


def node(settings) -> int:
    port = settings.node.http_port
    if not port:
        print("node.http_port is not set (or 0): no /health to check")
        return 1
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            body = json.loads(r.read() or b"{}")
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"/health on port {port}: {type(e).__name__}: {e}")
        return 1
    print(f"/health: ok={body.get('ok')}")
    return 0 if body.get("ok") else 1


def worker(settings) -> int:
    from worker.app import app, configure

    configure(settings)
    host = socket.gethostname()
    try:
        replies = app.control.inspect(timeout=5).ping() or {}
    except Exception as e:  # noqa: BLE001
        print(f"broker: {type(e).__name__}: {e}")
        return 1
    short = host.split(".")[0]
    mine = [name for name in replies if name.partition("@")[2].split(".")[0] == short]  # %h may be the FQDN
    print(f"ping: {', '.join(mine) or 'no worker of ' + host + ' answered'}")
    return 0 if mine else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cmr-ai-healthcheck")
    ap.add_argument("what", choices=("node", "worker"))
    ap.add_argument("--config", default="/etc/cmr-ai/config.yaml")
    args = ap.parse_args(argv)
    from plugin.config import ConfigError, load_settings

    try:
        settings = load_settings(args.config, check_templates=False)
    except ConfigError as e:
        print(e.errors[0])
        return 1
    return node(settings) if args.what == "node" else worker(settings)


if __name__ == "__main__":
    sys.exit(main())
