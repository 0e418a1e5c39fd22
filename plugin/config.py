"""Typed settings loaded from one YAML file, validated at start-up.

Every error names the file, the line and the key (``config.yaml:12: rules[0].send_to:
unknown destination 'pacs2'``) and all errors are reported together. Line numbers
come from ruamel.yaml's round-trip loader, which keeps them on every mapping and
sequence node.

See ``config.example.yaml`` for every setting with comments.
"""
from __future__ import annotations

from plugin.yamlmarks import key_of, line_of

import difflib
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, <= 16


class ConfigError(Exception):
    """A configuration file failed to load; ``errors`` holds one "FILE:LINE: key: message" each."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_ae(v: str) -> str:
    v = v.strip()
    if not AE_TITLE_RE.match(v):
        raise ValueError(f"{v!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return v


def _check_file(v: Optional[str]) -> Optional[str]:
    """A path from the config that must name a readable file (relative: from the current directory)."""
    if v is None:
        return v
    p = Path(v).expanduser()
    if not p.is_file():
        raise ValueError(f"{v!r}: no such file" + (f" (relative to {Path.cwd()})" if not p.is_absolute() else ""))
    if not os.access(p, os.R_OK):
        raise ValueError(f"{v!r}: not readable by this user")
    return v


def _close_keyword(key: str) -> Optional[str]:
    from pydicom.datadict import DicomDictionary

    words = [e[4] for e in DicomDictionary.values() if e[4]]
    hint = difflib.get_close_matches(key, words, n=1)
    return hint[0] if hint else None


def _node_file(v: Optional[str], info: ValidationInfo) -> Optional[str]:
    """:func:`_check_file` for a file only the node reads (``node.tls``, ``node.http_token_file``):
    not checked when a worker loads the config (``load_settings(node_files=False)``), as a
    GPU host that shares the node's config file need not have them."""
    if info.context and info.context.get("node_files") is False:
        return v
    return _check_file(v)


class AllowEntry(_Strict):
    """One caller the node accepts associations from (``node.allow``; docs/security.md).

    Every key given must match: ``{ae_title: PACS, ip: 192.168.2.7}`` is that AE title
    from that address; ``{ip: 10.1.0.0/16}`` is any AE title from that network.
    """

    ae_title: Optional[str] = None
    ip: Optional[str] = None  # an address or a network in CIDR notation (IPv4 or IPv6)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else _check_ae(v)

    @field_validator("ip", mode="before")
    @classmethod
    def _ip(cls, v: Any) -> Any:
        if v is None:
            return v
        text = str(v).strip()
        try:
            net = ipaddress.ip_network(text, strict=True)
            return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        except ValueError:
            try:  # host bits set: say which network was probably meant
                near = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"{text!r} is not an IP address or network (e.g. 192.168.2.7, 10.1.0.0/16, "
                                 "fd00::/8)") from None
            raise ValueError(f"{text!r} has host bits set; did you mean {str(near)!r}?") from None

    @model_validator(mode="after")
    def _some(self) -> "AllowEntry":
        if self.ae_title is None and self.ip is None:
            raise ValueError("an allow entry needs ae_title, ip or both (e.g. {ae_title: SCANNER1})")
        return self

    @property
    def network(self) -> Optional[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return None if self.ip is None else ipaddress.ip_network(self.ip)

    def matches(self, ae_title: str, address: str) -> bool:
        """Whether a caller (its calling AE title and IP address) is this entry."""
        if self.ae_title is not None and ae_title.strip() != self.ae_title:
            return False
        if self.ip is not None:
            try:
                ip = ipaddress.ip_address(address.split("%", 1)[0])
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if ip not in self.network:
                return False
        return True

    def __str__(self) -> str:
        return "@".join(x for x in (self.ae_title, self.ip) if x is not None)


class TlsConfig(_Strict):
    """DICOM TLS for the listener (PS3.15 Annex B; docs/security.md)."""

    cert: str  # PEM: the node's certificate (chain)
    key: str  # PEM: its private key (unencrypted)
    ca: Optional[str] = None  # PEM: CA certificate(s) that callers' certificates must chain to
    require_client_cert: bool = False
    port: Optional[int] = Field(None, ge=0, le=65535)  # an extra TLS listener; None: node.port speaks TLS

    _files = field_validator("cert", "key", "ca")(_node_file)

    @model_validator(mode="after")
    def _usable(self, info: ValidationInfo) -> "TlsConfig":
        if info.context and info.context.get("node_files") is False:
            return self
        if self.require_client_cert and not self.ca:
            raise ValueError("require_client_cert needs ca (the CA certificate that signs the callers' "
                             "certificates)")
        from plugin.dimse.security import TLSConfigError, server_ssl_context

        try:
            server_ssl_context(self)
        except TLSConfigError as e:
            raise ValueError(str(e)) from None
        return self


class NodeConfig(_Strict):
    ae_title: str = "CMR_AI"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    http_port: Optional[int] = Field(None, ge=0, le=65535)  # admin HTTP API (plugin/api.py); 0 = any free port
    http_token_file: Optional[str] = None  # the API's bearer token; unset: generated into <var>/run/api-token
    # the longest P-DATA-TF we accept (PS3.8 D.1); longer ones are aborted at their header (plugin/dimse/guard.py).
    # 256 KiB: a typical MR image in one PDU, and a bound on what one connection buffers; 0 = unlimited
    max_pdu: int = Field(262144, ge=0)
    allow: list[AllowEntry] = Field(default_factory=list)  # empty = any caller
    tls: Optional[TlsConfig] = None

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("http_token_file")
    @classmethod
    def _token(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if info.context and info.context.get("node_files") is False:
            return v
        if _check_file(v) is not None and not Path(v).expanduser().read_text().strip():
            raise ValueError(f"{v!r} is empty: put the admin API's bearer token in it (or leave http_token_file "
                             "out to have one generated)")
        return v

    @model_validator(mode="after")
    def _ports(self) -> "NodeConfig":
        if self.tls is not None and self.tls.port and self.tls.port == self.port:
            raise ValueError(f"tls.port {self.tls.port} is node.port: leave tls.port out to make node.port "
                             "speak TLS, or give the TLS listener its own port")
        if self.http_port and self.http_port in (self.port, self.tls.port if self.tls else None):
            raise ValueError(f"http_port {self.http_port} is also a DICOM port")
        return self


class StorageConfig(_Strict):
    path: str = "./var/dicom"
    fsync: bool = True
    # a SOP Instance UID received again with *different* content: the new copy replaces
    # the stored one, or the first copy is kept (identical copies are never rewritten)
    duplicates: Literal["replace", "keep"] = "replace"


class DatabaseConfig(_Strict):
    url: str = "sqlite:///./var/cmr-ai.db"


class QueueConfig(_Strict):
    broker: str = "embedded"  # embedded | redis://… | amqp://… | sqla+…
    worker_concurrency: int = Field(1, ge=1)  # embedded worker processes
    task_soft_time_limit: int = Field(1800, ge=10)
    # Redis: seconds before a task taken by a worker that died is delivered again; None = 2 × task_soft_time_limit
    visibility_timeout: Optional[int] = Field(None, ge=10)

    @model_validator(mode="after")
    def _visibility(self) -> "QueueConfig":
        if self.visibility_timeout is not None and self.visibility_timeout <= self.task_soft_time_limit + 60:
            raise ValueError(f"visibility_timeout {self.visibility_timeout} must exceed task_soft_time_limit + 60 s "
                             f"({self.task_soft_time_limit + 60}): a task still running would be delivered again")
        return self

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str) -> str:
        if v != "embedded" and not re.match(r"^(redis|rediss|amqp|amqps|sqla\+[a-z]+|memory)://", v):
            raise ValueError(f"{v!r}: expected 'embedded', redis://…, amqp://… or sqla+<db url>")
        return v


class ModelConfig(_Strict):
    path: str  # "demo" or a local directory
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    device: str = "auto"
    adapter: Optional[str] = None
    calibration: Optional[str] = None  # YAML {finding_id: temperature} applied to option scores


class DimseTarget(_Strict):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: Optional[str] = None
    timeout: float = 30.0

    _ae = field_validator("ae_title")(_check_ae)


class WebAuth(_Strict):
    """``auth:`` of a DICOMweb peer: HTTP basic (``username`` + ``password``) or a bearer token
    read from ``token_file``."""

    username: Optional[str] = None
    password: Optional[str] = None
    token_file: Optional[str] = None

    _file = field_validator("token_file")(_node_file)

    @model_validator(mode="after")
    def _one(self) -> "WebAuth":
        if self.token_file and self.username:
            raise ValueError("give either username/password (HTTP basic) or token_file (bearer token), not both")
        if self.password is not None and not self.username:
            raise ValueError("password without username")
        if not self.token_file and not self.username:
            raise ValueError("expected username (+ password) or token_file")
        return self


class DicomwebTarget(_Strict):
    """A DICOMweb peer: a destination (STOW-RS) or a source (QIDO-RS + WADO-RS).

    Credentials either flat (``username``, ``password``, ``token_file``) or under ``auth:``.
    """

    url: str
    username: Optional[str] = None
    password: Optional[str] = None
    token_file: Optional[str] = None
    auth: Optional[WebAuth] = None
    timeout: float = Field(60.0, gt=0)  # seconds for each HTTP request (connect, and between bytes received)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _auth(self) -> "DicomwebTarget":
        if self.auth is not None and (self.username or self.password or self.token_file):
            raise ValueError("credentials given twice: use auth: or username/password/token_file, not both")
        return self

    @property
    def credentials(self) -> tuple[Optional[str], Optional[str], Optional[str]]:
        """(username, password, token_file), from ``auth:`` or the flat keys."""
        a = self.auth or self
        return a.username, a.password, a.token_file


class Source(_Strict):
    """An archive the node pulls studies from (``sources:``; :mod:`plugin.dicomweb.pull`).

    ``query`` holds QIDO-RS study filters (DICOM keywords or ``GGGGEEEE`` tags, e.g.
    ``{ModalitiesInStudy: MR}``); the poller adds ``StudyDate`` for its date window of
    ``window_days`` (today and the days before). ``poll_every``: seconds between queries,
    0 = only on demand (``cmr-ai pull``). An archive that fails or times out is asked
    again after a back-off that doubles up to ``max_backoff`` seconds.
    """

    dicomweb: DicomwebTarget
    query: dict[str, Union[str, int, float, list[str]]] = Field(default_factory=dict)
    poll_every: float = Field(60.0, ge=0)
    window_days: int = Field(1, ge=0)  # 0: no date filter (every study the query matches)
    limit: int = Field(100, ge=1, le=10000)  # studies asked for per query (QIDO-RS limit)
    max_backoff: float = Field(900.0, ge=1)

    @field_validator("query")
    @classmethod
    def _keys(cls, v: dict) -> dict:
        from pydicom.datadict import keyword_for_tag, tag_for_keyword

        for key in v:
            if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
                if not keyword_for_tag(int(key, 16)):
                    raise ValueError(f"{key!r} is not a tag of the DICOM dictionary")
            elif tag_for_keyword(key) is None:
                hint = _close_keyword(key)
                raise ValueError(f"{key!r} is not a DICOM keyword" + (f"; did you mean {hint!r}?" if hint else ""))
            if key in ("StudyDate", "00080020", "limit", "offset"):
                raise ValueError(f"{key!r} is set by the poller (window_days, limit): leave it out of query")
        return v


class Destination(_Strict):
    """Exactly one of ``dimse``, ``dicomweb`` or ``folder``.

    ``verify`` asks the peer to confirm that it kept what was sent: ``commitment``
    (DIMSE Storage Commitment Push Model, PS3.4 Annex J: the result comes back as an
    N-EVENT-REPORT to the node's own AE, so the peer must know the node as a
    modality) or ``qido`` (DICOMweb: a QIDO-RS search for each instance). An object
    not confirmed within ``verify_timeout`` seconds is sent again (with back-off,
    counting towards ``max_attempts``).
    """

    dimse: Optional[DimseTarget] = None
    dicomweb: Optional[DicomwebTarget] = None
    folder: Optional[str] = None
    max_attempts: int = Field(8, ge=1)
    verify: Literal["none", "commitment", "qido"] = "none"
    verify_timeout: float = Field(300.0, gt=0)

    @field_validator("verify")
    @classmethod
    def _verify_fits_transport(cls, v: str, info: ValidationInfo) -> str:
        needs = {"commitment": "dimse", "qido": "dicomweb"}.get(v)
        if needs and info.data.get(needs) is None:
            have = next((k for k in ("dimse", "dicomweb", "folder") if info.data.get(k) is not None), None)
            raise ValueError(f"verify {v!r} needs a {needs} destination"
                             + (f" (this one is {have})" if have else "")
                             + ("; use verify: qido for dicomweb" if have == "dicomweb" else "")
                             + ("; use verify: commitment for dimse" if have == "dimse" else ""))
        return v

    @model_validator(mode="after")
    def _one(self) -> "Destination":
        kinds = [k for k in ("dimse", "dicomweb", "folder") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a destination needs exactly one of dimse, dicomweb, folder (got {kinds or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("dimse", "dicomweb", "folder") if getattr(self, k) is not None)


class Rule(_Strict):
    """One routing rule. The grammar of ``match`` and ``expected_views`` lives in
    :mod:`plugin.routing` (one place for the loader and the matcher); see docs/rules.md."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str
    match: Any = Field(default_factory=dict)  # checked by plugin.routing (file:line errors per condition)
    action: Literal["analyse", "forward", "ignore"] = "analyse"
    continue_: bool = Field(False, alias="continue")
    stable_after: float = Field(3.0, ge=0)
    expected_views: list[str] = Field(default_factory=list)
    template: Optional[str] = None
    model: Optional[str] = None
    priority: int = Field(5, ge=0, le=9)
    send_to: list[str] = Field(default_factory=list)
    forward_to: list[str] = Field(default_factory=list)

    _condition: Any = PrivateAttr(None)  # the compiled match (plugin.routing)
    _line: Optional[int] = PrivateAttr(None)  # where the rule starts in its file

    @model_validator(mode="before")
    @classmethod
    def _default_action(cls, data: Any) -> Any:
        """Without ``action``: a rule that only has ``forward_to`` forwards; otherwise it analyses."""
        if isinstance(data, dict) and "action" not in data and data.get("forward_to") \
                and not data.get("template") and not data.get("model"):
            data = {**data, "action": "forward"}
        return data

    @field_validator("expected_views")
    @classmethod
    def _views(cls, v: list[str]) -> list[str]:
        from plugin.cardiac.views import View

        out = []
        for x in v:
            try:
                out.append(View.parse(str(x)).value)
            except ValueError:
                out.append(x)  # reported by plugin.routing with its line
        return out

    @model_validator(mode="after")
    def _action_needs(self) -> "Rule":
        if self.action == "analyse":
            missing = [k for k in ("template", "model") if not getattr(self, k)]
            if missing:
                raise ValueError(f"action 'analyse' needs {' and '.join(missing)}"
                                 + ("" if self.template or self.model else
                                    " (a rule that only forwards: action: forward with forward_to)"))
        elif self.action == "forward":
            if not self.forward_to:
                raise ValueError("action 'forward' needs forward_to (destination names)")
            extra = [k for k in ("template", "model") if getattr(self, k)] + (["send_to"] if self.send_to else [])
            if extra:
                raise ValueError(f"{', '.join(extra)} only apply to action 'analyse' (to analyse and forward, "
                                 "write action: analyse with forward_to)")
        elif self.forward_to:
            raise ValueError("action 'ignore' cannot have forward_to (did you mean action: forward?)")
        from plugin.routing import compile_rule

        self._condition = compile_rule(self)
        return self


class SafetyConfig(_Strict):
    probe: bool = True  # score each question once more on a blank image: flags image-blind models
    critical_hook: Optional[str] = None  # shell command run for critical findings (see worker/safety.py)


class LoggingConfig(_Strict):
    """What the node and workers may write to their logs (docs/security.md)."""

    # PHI (patient names, IDs, dates of birth, sex/age/weight, addresses, accession numbers,
    # institution/physician names, free-text descriptions) appears in logs only when true;
    # UIDs always do. `cmr-ai serve|worker --debug-phi` sets it for one run.
    phi: bool = False


class Settings(_Strict):
    node: NodeConfig = Field(default_factory=NodeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    models: dict[str, ModelConfig] = Field(default_factory=lambda: {"demo": ModelConfig(path="demo")})
    destinations: dict[str, Destination] = Field(default_factory=dict)
    sources: dict[str, Source] = Field(default_factory=dict)  # DICOMweb archives to pull from
    rules: list[Rule] = Field(default_factory=list)
    templates_dir: Optional[str] = None
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    # Where the file was loaded from, and the version of its content (not YAML keys).
    source: Optional[str] = Field(None, exclude=True)
    rules_version: Optional[str] = Field(None, exclude=True)

    @property
    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()

    def resolve(self, p: str) -> Path:
        """A path from the config, relative paths taken from the current directory."""
        return Path(p).expanduser()


# ---------------------------------------------------------------------------
# loading with line numbers

def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Known keys of the model at a location (for "did you mean")."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int) or cur is None:
            continue
        if isinstance(cur, type) and issubclass(cur, BaseModel) and part in cur.model_fields:
            ann = cur.model_fields[part].annotation
            cur = _inner_model(ann)
        elif isinstance(cur, type) and issubclass(cur, BaseModel):
            return _keys(cur)
        else:
            cur = None
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return _keys(cur)
    return []


def _keys(model: type[BaseModel]) -> list[str]:
    """The YAML keys of a model: aliases where set (``continue``), never the excluded fields."""
    return [f.alias or name for name, f in model.model_fields.items() if not f.exclude]


def _inner_model(ann: Any) -> Any:
    args = getattr(ann, "__args__", None)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in args or ():
        m = _inner_model(a)
        if m is not None:
            return m
    return None


def _semantic_errors(raw: dict, templates_dir: Optional[str], check_templates: bool = True,
                     line_for=lambda loc: 0) -> list[tuple[tuple, str]]:
    """Cross-reference checks pydantic cannot do on its own, and the rule grammar.

    They run on the plain document (not the validated model) so they are reported
    together with the schema errors, not after them. The grammar of ``match`` and
    ``expected_views`` is :func:`plugin.routing.rule_set_errors`: the same code the
    node evaluates with.
    """
    from plugin.routing import rule_set_errors

    errs: list[tuple[tuple, str]] = []
    dests = raw.get("destinations") if isinstance(raw.get("destinations"), dict) else {}
    models = raw.get("models") if isinstance(raw.get("models"), dict) else {"demo": {}}
    rules = raw.get("rules") if isinstance(raw.get("rules"), list) else []
    seen: dict[str, int] = {}
    for i, r in enumerate(rules):
        if not isinstance(r, dict):
            continue
        name = r.get("name")
        if isinstance(name, str):
            if name in seen:
                errs.append((("rules", i, "name"), f"duplicate rule name {name!r} (first at rules[{seen[name]}]"
                             + (f", line {line_for(('rules', seen[name]))})" if line_for(("rules", seen[name]))
                                else ")")))
            seen.setdefault(name, i)
        for key in ("send_to", "forward_to"):
            targets = r.get(key) if isinstance(r.get(key), list) else []
            for j, d in enumerate(targets):
                if isinstance(d, str) and d not in dests:
                    hint = difflib.get_close_matches(d, list(dests), n=1)
                    errs.append(((("rules", i, key, j)),
                                 f"unknown destination {d!r}" + (f"; did you mean {hint[0]!r}?" if hint else
                                                                 f"; defined: {sorted(dests) or 'none'}")))
        model = r.get("model")
        if isinstance(model, str) and model not in models:
            hint = difflib.get_close_matches(model, list(models), n=1)
            errs.append((("rules", i, "model"), f"unknown model {model!r}" +
                         (f"; did you mean {hint[0]!r}?" if hint else f"; defined: {sorted(models)}")))
        template = r.get("template")
        if isinstance(template, str) and check_templates:
            from plugin.reports.template import TemplateError, load_template
            try:
                load_template(template, templates_dir)
            except TemplateError as e:
                errs.append((("rules", i, "template"), f"template {template!r}: " + "; ".join(e.errors)))
            except FileNotFoundError as e:
                errs.append((("rules", i, "template"), str(e)))
    errs += rule_set_errors(rules, line_for)
    return errs


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def load_settings(path: str | Path, *, check_templates: bool = True, node_files: bool = True) -> Settings:
    """Load and validate a config file.

    ``node_files=False`` (``cmr-ai worker``): the files only the node reads (``node.tls``,
    ``node.http_token_file``) are not checked; a worker on another host need not have them.

    Raises
    ------
    ConfigError
        With every problem found, each as ``FILE:LINE: key: message``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config: {e.strerror}"]) from None
    yaml = YAML(typ="rt")
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as e:
        line = (e.problem_mark.line + 1) if e.problem_mark else 1
        raise ConfigError([f"{path}:{line}: YAML syntax: {e.problem}"]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}:1: the config must be a mapping of sections (node, storage, …)"])
    errors: list[tuple[int, str]] = []
    raw = _plain(doc)
    for reserved in ("source", "rules_version"):
        if reserved in raw:
            errors.append((line_of(doc, (reserved,)), f"{path}:{line_of(doc, (reserved,))}: {reserved}: unknown key "
                           f"{reserved!r}; expected one of {', '.join(_keys(Settings))}"))
            raw.pop(reserved)
    from plugin.routing import RuleGrammarError, rules_version

    settings = None
    grammar_errors: list[tuple[tuple, str]] = []
    try:
        settings = Settings.model_validate({**raw, "source": str(path), "rules_version": rules_version(text)},
                                           context={"node_files": node_files})
    except ValidationError as ve:
        for err in ve.errors():
            grammar = (err.get("ctx") or {}).get("error")
            if isinstance(grammar, RuleGrammarError):  # the same mistakes, with their own lines, come from
                grammar_errors += [(err["loc"][:2] + loc, m) for loc, m in grammar.errors]  # _semantic_errors
                continue
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                known = _fields_at(Settings, loc[:-1])
                hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
                msg = f"unknown key {loc[-1]!r}" + (f"; did you mean {hint[0]!r}?" if hint else
                                                     (f"; expected one of {', '.join(known)}" if known else ""))
            errors.append((line_of(doc, loc), f"{path}:{line_of(doc, loc)}: {key_of(loc)}: {msg}"))
    tdir = raw.get("templates_dir") if isinstance(raw.get("templates_dir"), str) else None
    for loc, msg in _semantic_errors(raw, tdir, check_templates, lambda loc: line_of(doc, loc)):
        errors.append((line_of(doc, loc), f"{path}:{line_of(doc, loc)}: {key_of(loc)}: {msg}"))
    if settings is None and not errors:  # cannot happen while both use plugin.routing; never hide a mistake
        errors = [(line_of(doc, loc), f"{path}:{line_of(doc, loc)}: {key_of(loc)}: {msg}")
                  for loc, msg in grammar_errors]
    if errors:
        unique = list(dict.fromkeys(m for _, m in sorted(errors, key=lambda e: e[0])))
        raise ConfigError(unique)
    assert settings is not None
    for i, rule in enumerate(settings.rules):
        rule._line = line_of(doc, ("rules", i))
    return settings


def default_settings() -> Settings:
    """The embedded defaults, as in config.example.yaml without destinations/rules."""
    return Settings()
