"""docker/compose.yaml, docker/config.yaml and the Dockerfiles agree (no Docker daemon here:
the files are parsed). Every host the config names is a compose service on the port that
service listens on; the node publishes node.port and node.http_port; every cmr-ai container
mounts docker/config.yaml where its command's --config points; each command is one the real
``cmr-ai`` parser accepts; Flower watches the config's broker; the images download nothing."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from plugin.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
CONFIG = DOCKER / "config.yaml"
#: the port each peer image listens on in its container (their defaults; compose may not change them)
PEER_PORTS = {"redis": {6379}, "postgres": {5432}, "orthancteam/orthanc": {4242, 8042}}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the x-cmr-ai merge keys


@pytest.fixture(scope="module")
def settings():
    return load_settings(CONFIG)


def services_of_image(compose: dict, prefix: str) -> list[str]:
    return [n for n, s in compose["services"].items() if str(s.get("image", "")).split(":")[0] == prefix]


def cmr_services(compose: dict) -> dict[str, dict]:
    """The services that run cmr-ai (built from, or named like, one of our images)."""
    return {n: s for n, s in compose["services"].items()
            if "build" in s or str(s.get("image", "")).startswith("cmr-ai")}


def dockerfile_of(compose: dict, name: str) -> Path:
    """The Dockerfile a service's image comes from (a service reusing an image: its builder's)."""
    svc = compose["services"][name]
    if "build" not in svc:
        name = next(n for n, s in compose["services"].items() if "build" in s and s.get("image") == svc["image"])
        svc = compose["services"][name]
    return (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, cur = [], ""
    for line in path.read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def command_of(compose: dict, name: str) -> list[str]:
    svc = compose["services"][name]
    if "command" in svc:
        cmd = svc["command"]
        return cmd if isinstance(cmd, list) else shlex.split(cmd)
    cmds = [exec_form(a) for i, a in dockerfile_instructions(dockerfile_of(compose, name)) if i == "CMD"]
    return cmds[-1]


class _Parsed(Exception):
    def __init__(self, ns):
        self.ns = ns


def parse_cli(argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run ``argv`` through the real ``cmr-ai`` parser (plugin/cli.py), stopping before dispatch."""
    from plugin import cli

    real = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", spy)
        with pytest.raises(_Parsed) as e:
            cli.main(argv)
    return e.value.ns


def option(cmd: list[str], name: str) -> str:
    for i, a in enumerate(cmd):
        if a == name:
            return cmd[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{name} not in {cmd}")


def split_volume(v: str) -> list[str]:
    """``SOURCE:TARGET[:MODE]``, where SOURCE may be ``${VAR:-default}``."""
    var = re.match(r"^\$\{[^}]*\}", v)
    head = var.group(0) if var else ""
    return [head + part if i == 0 else part for i, part in enumerate(v[len(head):].split(":"))]


def mounts(svc: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume: sources of bind mounts resolved from docker/."""
    out = []
    for v in svc.get("volumes", []):
        src, target = split_volume(v)[:2]
        if src.startswith((".", "/")):
            src = str((COMPOSE.parent / src).resolve())
        out.append((src, target))
    return out


def test_compose_has_the_services(compose):
    names = set(compose["services"])
    assert {"redis", "postgres", "orthanc", "node", "node-worker", "gpu-worker", "flower"} <= names
    assert services_of_image(compose, "redis") == ["redis"]
    assert services_of_image(compose, "postgres") == ["postgres"]
    assert services_of_image(compose, "orthancteam/orthanc") == ["orthanc"]
    assert services_of_image(compose, "mher/flower") == ["flower"]
    for svc in compose["services"].values():  # named volumes used are declared
        for src, _ in mounts(svc):
            if not src.startswith("/") and not src.startswith("$"):
                assert src in compose["volumes"], src
        for dep in svc.get("depends_on", {}):
            assert dep in names


def test_config_loads_and_every_host_it_names_is_a_service(compose, settings):
    services = compose["services"]
    broker = urlsplit(settings.queue.broker)
    assert broker.scheme == "redis" and broker.hostname in services
    assert (broker.port or 6379) in PEER_PORTS[services[broker.hostname]["image"].split(":")[0]]

    dbu = make_url(settings.database.url)
    assert dbu.drivername == "postgresql+psycopg" and dbu.host in services
    pg = services[dbu.host]
    assert (dbu.port or 5432) in PEER_PORTS[pg["image"].split(":")[0]]
    env = pg["environment"]
    assert (dbu.username, dbu.password, dbu.database) == (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"],
                                                           env["POSTGRES_DB"])

    assert settings.destinations, "the compose config should deliver to the compose Orthanc"
    orthanc = services["orthanc"]["environment"]
    for name, dest in settings.destinations.items():
        if dest.dimse is not None:
            assert dest.dimse.host in services, name
            assert dest.dimse.port == int(orthanc.get("ORTHANC__DICOM_PORT", 4242))
            assert dest.dimse.ae_title == orthanc["ORTHANC__DICOM_AET"]
        elif dest.dicomweb is not None:
            u = urlsplit(dest.dicomweb.url)
            assert u.hostname in services and (u.port or 80) == 8042, name
            assert orthanc["ORTHANC__DICOM_WEB__ENABLE"] == "true" and orthanc["DICOM_WEB_PLUGIN_ENABLED"] == "true"
            assert (u.path + "/").startswith(orthanc.get("ORTHANC__DICOM_WEB__ROOT", "/dicom-web/"))
        else:
            pytest.fail(f"destination {name}: a folder destination means nothing across containers")
    # Orthanc knows the node by its service name and ports, so it can send studies on to it
    modalities = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])
    assert ["CMR_AI", "node", settings.node.port] in modalities.values()
    assert settings.node.ae_title == "CMR_AI"


def test_node_publishes_its_dicom_and_http_ports(compose, settings):
    node = compose["services"]["node"]
    published = {int(str(p).split(":")[-1]) for p in node["ports"]}
    assert published == {settings.node.port, settings.node.http_port}
    assert settings.node.host == "0.0.0.0"  # reachable through the published ports
    exposed = {int(p) for i, a in dockerfile_instructions(dockerfile_of(compose, "node")) if i == "EXPOSE"
               for p in a.split()}
    assert exposed == published


def test_every_cmr_ai_container_mounts_the_config_its_command_reads(compose, settings, monkeypatch):
    services = cmr_services(compose)
    assert set(services) == {"node", "node-worker", "gpu-worker"}
    for name, svc in services.items():
        cmd = command_of(compose, name)
        assert cmd[0] == "cmr-ai", (name, cmd)
        ns = parse_cli(cmd[1:], monkeypatch)  # the real parser accepts it: subcommand and options
        target = option(cmd, "--config")
        assert (str(CONFIG), target) in mounts(svc), (name, mounts(svc))
        assert ns.config == target
        hc = svc["healthcheck"]["test"]
        assert option(hc, "--config") == target, name
        assert svc["environment"]["HF_HUB_OFFLINE"] == "1"
        if ns.cmd == "worker":
            assert ns.queues in ("node", "gpu"), (name, ns.queues)
            assert hc[-3] == "worker" or "worker" in hc
    node = parse_cli(command_of(compose, "node")[1:], monkeypatch)
    assert node.cmd == "serve" and node.no_worker  # the workers are their own containers
    queues = {parse_cli(command_of(compose, n)[1:], monkeypatch).queues for n in ("node-worker", "gpu-worker")}
    assert queues == {"node", "gpu"}
    # the node and the node-queue worker share the DICOM store (prepare reads what the node stored)
    store = Path(settings.storage.path)
    vols = {n: {src for src, tgt in mounts(services[n]) if store.is_relative_to(tgt)} for n in ("node", "node-worker")}
    assert vols["node"] and vols["node"] == vols["node-worker"] and not next(iter(vols["node"])).startswith("/")
    # the GPU worker reads its weights from a read-only mount; nothing else about models is needed
    gpu = services["gpu-worker"]
    model_mounts = [split_volume(v) for v in gpu["volumes"] if split_volume(v)[1] == "/models"]
    assert model_mounts and model_mounts[0][2] == "ro"
    for name, m in settings.models.items():
        assert Path(m.path).is_relative_to("/models"), f"models.{name}.path {m.path} is not under the /models mount"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_dockerfiles_exist_and_their_commands_are_cmr_ai_subcommands(compose, monkeypatch):
    files = {dockerfile_of(compose, n) for n in cmr_services(compose)}
    assert files == {DOCKER / "Dockerfile.node", DOCKER / "Dockerfile.worker"}
    for path in files:
        assert path.is_file()
        ins = dockerfile_instructions(path)
        for kind in ("CMD", "ENTRYPOINT"):
            for args in (a for i, a in ins if i == kind):
                cmd = exec_form(args)
                assert cmd[0] == "cmr-ai", (path.name, cmd)
                parse_cli(cmd[1:], monkeypatch)
        for i, a in ins:  # what the images copy exists, and the build context's ignore file lets it in
            if i == "COPY":
                *srcs, _dst = a.split()
                for src in srcs:
                    assert (ROOT / src).exists(), (path.name, src)
        ignore = path.with_name(path.name + ".dockerignore").read_text().split()
        for i, a in ins:
            if i == "COPY":
                for src in a.split()[:-1]:
                    assert f"!{src}" in ignore, (path.name, src)
        text = path.read_text()
        env = " ".join(a for i, a in ins if i == "ENV")
        assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
        run = " ".join(a for i, a in ins if i == "RUN")
        assert not re.search(r"snapshot_download|from_pretrained|huggingface-cli|hf download|git lfs|wget|curl",
                             run), f"{path.name} downloads something at build time"
        healthchecks = [a for i, a in ins if i == "HEALTHCHECK"]
        assert len(healthchecks) == 1 and "cmr-ai-healthcheck" in healthchecks[0]
        assert "USER" in {i for i, _ in ins}, f"{path.name} runs as root"
        assert "torch==" in text
    node = (DOCKER / "Dockerfile.node").read_text()
    # dcmtk only on request: serve and the workers never run it (pynetdicom speaks DICOM)
    assert re.search(r'if \[ "\$WITH_DCMTK" = "1" \]; then\s*\\?\s*apt-get update && apt-get install[^;]*dcmtk', node)
    assert "download.pytorch.org/whl/cpu" in node  # the node never needs CUDA wheels
    hc = [a for i, a in dockerfile_instructions(DOCKER / "Dockerfile.node") if i == "HEALTHCHECK"][0]
    assert exec_form(hc[hc.index("CMD") + 3:].strip())[-3:] == ["node", "--config", "/etc/cmr-ai/config.yaml"]


def test_flower_watches_the_configs_broker(compose, settings):
    flower = compose["services"]["flower"]
    cmd = flower["command"]
    broker = option(cmd, "--broker") if any(a.startswith("--broker") for a in cmd) \
        else flower["environment"]["CELERY_BROKER_URL"]
    assert broker == settings.queue.broker
    assert "flower" in cmd and int(option(cmd, "--port")) == 5555
    assert any(str(p).endswith(":5555") for p in flower["ports"])


def test_node_healthcheck_asks_health_on_the_http_port(tmp_path, capsys):
    """docker/healthcheck.py node against a stand-in /health: 0 when ok, 1 when not or down."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cmr_ai_healthcheck", DOCKER / "healthcheck.py")
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    answer = {"ok": True}
    seen = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = json.dumps(answer).encode()
            self.send_response(200 if answer["ok"] else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        cfg = tmp_path / "config.yaml"
        cfg.write_text(CONFIG.read_text().replace("http_port: 8080", f"http_port: {port}"))
        assert hc.main(["node", "--config", str(cfg)]) == 0 and seen == ["/health"]
        answer["ok"] = False
        assert hc.main(["node", "--config", str(cfg)]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert hc.main(["node", "--config", str(cfg)]) == 1  # nobody listens
    assert "/health on port" in capsys.readouterr().out
