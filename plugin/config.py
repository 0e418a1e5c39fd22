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
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
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


class NodeConfig(_Strict):
    ae_title: str = "CMR_AI"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    http_port: Optional[int] = Field(None, ge=0, le=65535)
    max_pdu: int = Field(0, ge=0)  # 0 = unlimited

    _ae = field_validator("ae_title")(_check_ae)


class StorageConfig(_Strict):
    path: str = "./var/dicom"
    fsync: bool = True


class DatabaseConfig(_Strict):
    url: str = "sqlite:///./var/cmr-ai.db"


class QueueConfig(_Strict):
    broker: str = "embedded"  # embedded | redis://… | amqp://… | sqla+…
    worker_concurrency: int = Field(1, ge=1)  # embedded worker processes
    task_soft_time_limit: int = Field(1800, ge=10)

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


class DimseTarget(_Strict):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: Optional[str] = None
    timeout: float = 30.0

    _ae = field_validator("ae_title")(_check_ae)


class DicomwebTarget(_Strict):
    url: str
    username: Optional[str] = None
    password: Optional[str] = None
    token_file: Optional[str] = None
    timeout: float = 60.0

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")


class Destination(_Strict):
    """Exactly one of ``dimse``, ``dicomweb`` or ``folder``."""

    dimse: Optional[DimseTarget] = None
    dicomweb: Optional[DicomwebTarget] = None
    folder: Optional[str] = None
    max_attempts: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _one(self) -> "Destination":
        kinds = [k for k in ("dimse", "dicomweb", "folder") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a destination needs exactly one of dimse, dicomweb, folder (got {kinds or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("dimse", "dicomweb", "folder") if getattr(self, k) is not None)


MatchValue = Union[str, int, float, list[Union[str, int, float]]]


class Rule(_Strict):
    name: str
    match: dict[str, MatchValue] = Field(default_factory=dict)
    action: Literal["analyse", "ignore"] = "analyse"
    stable_after: float = Field(3.0, ge=0)
    template: Optional[str] = None
    model: Optional[str] = None
    priority: int = Field(5, ge=0, le=9)
    send_to: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _analyse_needs(self) -> "Rule":
        if self.action == "analyse":
            missing = [k for k in ("template", "model") if not getattr(self, k)]
            if missing:
                raise ValueError(f"action 'analyse' needs {' and '.join(missing)}")
        return self


class Settings(_Strict):
    node: NodeConfig = Field(default_factory=NodeConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    models: dict[str, ModelConfig] = Field(default_factory=lambda: {"demo": ModelConfig(path="demo")})
    destinations: dict[str, Destination] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    templates_dir: Optional[str] = None

    # Where the file was loaded from (not a YAML key).
    source: Optional[str] = Field(None, exclude=True)

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
            return list(cur.model_fields)
        else:
            cur = None
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _inner_model(ann: Any) -> Any:
    args = getattr(ann, "__args__", None)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in args or ():
        m = _inner_model(a)
        if m is not None:
            return m
    return None


def _semantic_errors(raw: dict, templates_dir: Optional[str], check_templates: bool = True) -> list[tuple[tuple, str]]:
    """Cross-reference checks pydantic cannot do on its own.

    They run on the plain document (not the validated model) so they are reported
    together with the schema errors, not after them.
    """
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
                errs.append((("rules", i, "name"), f"duplicate rule name {name!r} (first at rules[{seen[name]}])"))
            seen.setdefault(name, i)
        send_to = r.get("send_to") if isinstance(r.get("send_to"), list) else []
        for j, d in enumerate(send_to):
            if isinstance(d, str) and d not in dests:
                hint = difflib.get_close_matches(d, list(dests), n=1)
                errs.append((("rules", i, "send_to", j),
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
        match = r.get("match") if isinstance(r.get("match"), dict) else {}
        for k, v in match.items():
            vals = v if isinstance(v, list) else [v]
            for val in vals:
                if isinstance(val, str):
                    try:
                        re.compile(val)
                    except re.error as e:
                        errs.append((("rules", i, "match", k), f"bad regular expression {val!r}: {e}"))
            from pydicom.datadict import tag_for_keyword
            if tag_for_keyword(k) is None:
                hint = _keyword_hint(k)
                errs.append((("rules", i, "match", k), f"{k!r} is not a DICOM keyword" +
                             (f"; did you mean {hint!r}?" if hint else "")))
    return errs


def _keyword_hint(k: str) -> Optional[str]:
    from pydicom.datadict import keyword_dict
    m = difflib.get_close_matches(k, list(keyword_dict), n=1, cutoff=0.75)
    return m[0] if m else None


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def load_settings(path: str | Path, *, check_templates: bool = True) -> Settings:
    """Load and validate a config file.

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
    errors: list[str] = []
    raw = _plain(doc)
    settings = None
    try:
        settings = Settings.model_validate({**raw, "source": str(path)})
    except ValidationError as ve:
        for err in ve.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                known = _fields_at(Settings, loc[:-1])
                hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
                msg = f"unknown key {loc[-1]!r}" + (f"; did you mean {hint[0]!r}?" if hint else
                                                     (f"; expected one of {', '.join(known)}" if known else ""))
            errors.append((line_of(doc, loc), f"{path}:{line_of(doc, loc)}: {key_of(loc)}: {msg}"))
    tdir = raw.get("templates_dir") if isinstance(raw.get("templates_dir"), str) else None
    for loc, msg in _semantic_errors(raw, tdir, check_templates):
        errors.append((line_of(doc, loc), f"{path}:{line_of(doc, loc)}: {key_of(loc)}: {msg}"))
    if errors:
        raise ConfigError([m for _, m in sorted(errors, key=lambda e: e[0])])
    assert settings is not None
    return settings


def default_settings() -> Settings:
    """The embedded defaults, as in config.example.yaml without destinations/rules."""
    return Settings()
