"""Report templates: what the model is asked and how each answer is coded in DICOM.

One YAML file per template in ``dicom_sr_templates/``, validated when it is loaded (at
start-up, by ``cmr-ai rules check`` and by the config loader): every problem is
reported at once, each as ``FILE:LINE: key: message`` (line numbers come from
ruamel.yaml's round-trip loader), with a "did you mean" for misspelt keys and codes.

Schema
------
::

    name: cmr_standard                     # [a-z0-9_]+, must equal the file name stem
    title: CMR function — AI draft         # shown in the SR and burnt into the SC
    procedure: SCT.CardiacMRI              # procedure reported (TID 1500 row 4)
    impression: true                       # ask the model for a free-text impression
    limitations:                           # optional; report-level TEXT items
      - "Qualitative reading of a few rendered slices; no volumetry."
    coding_schemes:                        # only for codes outside DICOM's standard schemes
      - {designator: 99CMR, name: "Local CMR codes", responsible_organization: "Site X"}
    findings:                              # one TID 1410 measurement group each
      - id: lv_systolic_function           # [a-z0-9_]+, unique; stable: eval/training use it
        label: LV systolic function        # optional short topic for SR comments and the SC
        question: "How is the left ventricular systolic function?"
        concept: SCT.CardiacEjectionFraction   # Finding (DCM 121071) and the
                                               # qualitative evaluation's concept name
        site: SCT.LeftVentricle            # optional Finding Site (SCT 363698007)
        views: [SAX, 4CH]                  # plugin.cardiac.views.View values
        critical: [severely_reduced]       # option ids that need urgent review
        options:                           # >= 2; the model scores the texts
          - {id: normal, text: "normal", code: SCT.Normal}
          - {id: mildly_reduced, text: "mildly reduced", code: SCT.Mild}

A *code* is either a keyword of ``pydicom.sr.codedict.codes`` written
``SCHEME.Keyword`` (preferred: the dictionary is the project's single source of codes)
or an explicit mapping ``{scheme: SCT, value: "241620005", meaning: "Cardiac MRI"}``
(for local ``99CMR`` codes or concepts the dictionary lacks). A keyword that the
dictionary does not have is an error. A scheme that is not one of DICOM's standard
coding schemes (those of ``pydicom.sr.codedict``, plus ``SRT`` and ``ACR``) must be
declared under ``coding_schemes``; the SRs then carry it in the Coding Scheme
Identification Sequence (0008,0110), as PS3.3 C.12.1 requires. Private designators
should start with ``99`` (PS3.16 section 8.2). See ``docs/templates.md``.

Public API: :func:`load_template`, :func:`list_templates`, :class:`Template`,
:class:`TemplateError`.
"""
from __future__ import annotations

from plugin.yamlmarks import key_of, line_of

import difflib
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      ValidationError, ValidationInfo, field_validator)
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from plugin.cardiac.views import View
from worker.bundle import Question

__all__ = [
    "CodeSpec", "CodingScheme", "Finding", "Option", "Template", "TemplateError",
    "default_templates_dir", "list_templates", "load_template",
]

ID_RE = re.compile(r"^[a-z0-9_]+$")
_TAG_RE = re.compile(r"^[a-z]+(-[a-z]+)*\[.*\]$")
_KEYWORD_RE = re.compile(r"^\s*([A-Za-z0-9_-]+)\.([A-Za-z_][A-Za-z0-9_]*)\s*$")
# ``Collection.dir()`` of the big schemes is slow; keyword lists are cached per scheme.
_KEYWORDS: dict[str, list[str]] = {}


def default_templates_dir() -> Path:
    """The repository's ``dicom_sr_templates/`` (two levels above this package)."""
    return Path(__file__).resolve().parents[2] / "dicom_sr_templates"


class TemplateError(Exception):
    """A template failed to load; ``errors`` holds one ``FILE:LINE: key: message`` each."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# ---------------------------------------------------------------------------
# model

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept; ``keyword`` is set when it was written as ``SCHEME.Keyword``."""

    scheme: str = Field(min_length=1, max_length=16)
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)
    keyword: Optional[str] = None

    @property
    def code(self) -> Code:
        """The concept as a ``pydicom.sr.coding.Code`` (what highdicom takes)."""
        return Code(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)

    def __str__(self) -> str:
        return f"({self.value}, {self.scheme}, \"{self.meaning}\")"


def _scheme_keywords(scheme: str) -> list[str]:
    if scheme not in _KEYWORDS:
        _KEYWORDS[scheme] = list(getattr(codes, scheme).dir())
    return _KEYWORDS[scheme]


def _parse_code(v: Any) -> Any:
    """``"SCHEME.Keyword"`` → the codedict's code; a mapping passes on to CodeSpec."""
    if isinstance(v, CodeSpec) or isinstance(v, dict):
        if isinstance(v, dict) and "keyword" in v:
            raise ValueError("'keyword' is not a key of a code mapping: write the code as "
                             "'SCHEME.Keyword' or as {scheme, value, meaning}")
        return v
    if not isinstance(v, str):
        raise ValueError(f"expected a code, got {type(v).__name__} {v!r}: write "
                         "'SCHEME.Keyword' (e.g. 'SCT.Normal') or {scheme, value, meaning}")
    m = _KEYWORD_RE.match(v)
    if not m:
        raise ValueError(f"{v!r} is not a code: write a pydicom codedict keyword "
                         "'SCHEME.Keyword' (e.g. 'SCT.Normal') or {scheme, value, meaning}")
    scheme, keyword = m.groups()
    schemes = list(codes.schemes())
    if scheme not in schemes:
        hint = difflib.get_close_matches(scheme, schemes, n=1)
        raise ValueError(f"unknown coding scheme {scheme!r} in {v!r}" +
                         (f"; did you mean {hint[0]!r}?" if hint else f"; known: {', '.join(schemes)}"))
    try:
        code = getattr(getattr(codes, scheme), keyword)
    except (AttributeError, RuntimeError):
        hint = difflib.get_close_matches(keyword, _scheme_keywords(scheme), n=1, cutoff=0.7)
        raise ValueError(f"{v!r} is not in pydicom.sr.codedict.codes" +
                         (f"; did you mean '{scheme}.{hint[0]}'?" if hint else "")) from None
    return {"scheme": code.scheme_designator, "value": code.value, "meaning": code.meaning,
            "keyword": f"{scheme}.{keyword}"}


CodeField = Annotated[CodeSpec, BeforeValidator(_parse_code)]


def _check_id(v: str) -> str:
    if not ID_RE.match(v):
        raise ValueError(f"{v!r} is not a valid id: use lower-case letters, digits and '_'")
    return v


def _check_view(v: str) -> str:
    return View.parse(v).value


Ident = Annotated[str, AfterValidator(_check_id)]
ViewName = Annotated[str, AfterValidator(_check_view)]


#: Coding schemes PS3.16 defines (no declaration needed in a template).
STANDARD_SCHEMES = frozenset(codes.schemes()) | {"SRT", "ACR", "99SDM", "ICD10", "I9C"}


class CodingScheme(_Strict):
    """A coding scheme a template uses that DICOM does not define (a site's private one)."""

    designator: str = Field(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9_.-]+$")
    name: str = Field(min_length=1, max_length=64)
    version: Optional[str] = Field(None, max_length=16)
    responsible_organization: Optional[str] = Field(None, max_length=64)

    def item(self):
        """The Coding Scheme Identification Sequence item (highdicom)."""
        from highdicom.coding_schemes import CodingSchemeIdentificationItem
        return CodingSchemeIdentificationItem(designator=self.designator, name=self.name,
                                              version=self.version,
                                              responsible_organization=self.responsible_organization)


class Option(_Strict):
    """One answer option: the id the pipeline uses, the text the model scores, its code."""

    id: Ident
    text: str = Field(min_length=1)
    code: CodeField


class Finding(_Strict):
    """One question of the template; one TID 1410 measurement group in the SR."""

    id: Ident
    question: str = Field(min_length=1)
    label: Optional[str] = Field(None, min_length=1, max_length=64)
    concept: CodeField
    site: Optional[CodeField] = None
    views: list[ViewName] = Field(min_length=1)
    #: short-axis slice levels to show (default all three); needs SAX in ``views``
    slices: list[Literal["basal", "mid", "apical"]] = Field(default_factory=list)
    #: ``lv``: crop each image to the LV region ``prepare`` found (short-axis images)
    zoom: Optional[Literal["lv"]] = None
    critical: list[str] = Field(default_factory=list)
    options: list[Option] = Field(min_length=2)

    @field_validator("slices")
    @classmethod
    def _slices_need_sax(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if v and "SAX" not in (info.data.get("views") or []):
            raise ValueError("slices choose short-axis slice levels: add SAX to views")
        return list(dict.fromkeys(v))

    @property
    def topic(self) -> str:
        """Short human topic ("LV systolic function") for comments and the SC banner."""
        return self.label or self.id.replace("_", " ")

    def option(self, option_id: str) -> Option:
        """The option with this id.

        Raises
        ------
        KeyError
            Naming the finding, the unknown id and the known ids.
        """
        for o in self.options:
            if o.id == option_id:
                return o
        raise KeyError(f"finding {self.id!r} has no option {option_id!r}; "
                       f"options: {', '.join(o.id for o in self.options)}")

    def is_critical(self, option_id: str) -> bool:
        return option_id in self.critical


class Template(_Strict):
    """A validated report template (see the module docstring for the YAML schema)."""

    name: Ident
    title: str = Field(min_length=1, max_length=64)
    procedure: CodeField
    impression: bool = True
    limitations: list[str] = Field(default_factory=list)
    coding_schemes: list[CodingScheme] = Field(default_factory=list)
    findings: list[Finding] = Field(min_length=1)
    source: Optional[str] = Field(None, exclude=True)  # the file it was loaded from

    def coding_scheme_items(self) -> Optional[list]:
        """Coding Scheme Identification items for the non-standard schemes the template
        uses (None when it uses only DICOM's own), for the SR builders."""
        used = {spec.scheme for _, spec in self.all_codes()}
        items = [cs.item() for cs in self.coding_schemes if cs.designator in used]
        return items or None

    @cached_property
    def _by_id(self) -> dict[str, Finding]:
        return {f.id: f for f in self.findings}

    def finding(self, finding_id: str) -> Finding:
        """The finding with this id.

        Raises
        ------
        KeyError
            Naming the template, the id and a close match if there is one.
        """
        try:
            return self._by_id[finding_id]
        except KeyError:
            hint = difflib.get_close_matches(finding_id, list(self._by_id), n=1)
            raise KeyError(f"template {self.name!r} has no finding {finding_id!r}" +
                           (f"; did you mean {hint[0]!r}?" if hint else "")) from None

    def questions(self) -> list[Question]:
        """The findings as the model sees them (``worker.bundle.Question``), in order."""
        return [Question(id=f.id, text=f.question, options=[o.id for o in f.options],
                         option_texts=[o.text for o in f.options], views=list(f.views),
                         slices=list(f.slices), zoom=f.zoom or "")
                for f in self.findings]

    def all_codes(self) -> list[tuple[str, CodeSpec]]:
        """Every code of the template with its key path (for checks and listings)."""
        out: list[tuple[str, CodeSpec]] = [("procedure", self.procedure)]
        for i, f in enumerate(self.findings):
            out.append((f"findings[{i}].concept", f.concept))
            if f.site is not None:
                out.append((f"findings[{i}].site", f.site))
            for j, o in enumerate(f.options):
                out.append((f"findings[{i}].options[{j}].code", o.code))
        return out


# ---------------------------------------------------------------------------
# loading with line numbers

def _inner_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in getattr(ann, "__args__", None) or ():
        m = _inner_model(a)
        if m is not None:
            return m
    return None


def _fields_at(loc: tuple) -> list[str]:
    """Keys allowed at a location (for "did you mean")."""
    cur: Any = Template
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return []
        cur = _inner_model(cur.model_fields[part].annotation)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return [k for k in cur.model_fields if k not in ("source", "keyword")]
    return []


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _clean_loc(loc: tuple) -> tuple:
    # pydantic inserts validator/union tags such as "function-before[...]" into locations
    return tuple(p for p in loc if not (isinstance(p, str) and _TAG_RE.match(p)))


def _pydantic_errors(ve: ValidationError) -> list[tuple[tuple, str]]:
    out: list[tuple[tuple, str]] = []
    for err in ve.errors():
        loc = _clean_loc(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = _fields_at(loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = f"unknown key {loc[-1]!r}" + (f"; did you mean {hint[0]!r}?" if hint else
                                                 (f"; expected one of {', '.join(known)}" if known else ""))
        elif err["type"] == "missing":
            msg = f"required key {loc[-1]!r} is missing"
        elif err["type"] == "literal_error":
            msg = f"{err.get('input')!r}: {msg}"
        out.append((loc, msg))
    return out


def _semantic_errors(data: Any, stem: str) -> list[tuple[tuple, str]]:
    """Cross-reference checks on the raw data, so they are reported with field errors."""
    errs: list[tuple[tuple, str]] = []
    if not isinstance(data, dict):
        return errs
    if "source" in data:
        errs.append((("source",), "unknown key 'source'"))
    name = data.get("name")
    if isinstance(name, str) and ID_RE.match(name) and name != stem:
        errs.append((("name",), f"name {name!r} must equal the file name {stem!r} "
                                "(rules refer to templates by file name)"))
    declared: set[str] = set()
    schemes = data.get("coding_schemes")
    if isinstance(schemes, list):
        for k, cs in enumerate(schemes):
            d = cs.get("designator") if isinstance(cs, dict) else None
            if not isinstance(d, str):
                continue
            if d in STANDARD_SCHEMES:
                errs.append((("coding_schemes", k, "designator"),
                             f"{d!r} is a DICOM standard coding scheme: do not declare it"))
            elif d in declared:
                errs.append((("coding_schemes", k, "designator"), f"{d!r} is declared twice"))
            declared.add(d)
    _check_scheme(data.get("procedure"), ("procedure",), declared, errs)
    findings = data.get("findings")
    if not isinstance(findings, list):
        return errs
    first_seen: dict[str, int] = {}
    for i, f in enumerate(findings):
        if not isinstance(f, dict):
            continue
        fid = f.get("id")
        if isinstance(fid, str):
            if fid in first_seen:
                errs.append((("findings", i, "id"),
                             f"duplicate finding id {fid!r} (first at findings[{first_seen[fid]}])"))
            first_seen.setdefault(fid, i)
        options = f.get("options") if isinstance(f.get("options"), list) else []
        opt_ids: dict[str, int] = {}
        opt_texts: dict[str, int] = {}
        for j, o in enumerate(options):
            if not isinstance(o, dict):
                continue
            oid, text = o.get("id"), o.get("text")
            if isinstance(oid, str):
                if oid in opt_ids:
                    errs.append((("findings", i, "options", j, "id"),
                                 f"duplicate option id {oid!r} (first at options[{opt_ids[oid]}])"))
                opt_ids.setdefault(oid, j)
            if isinstance(text, str):
                if text.strip().lower() in opt_texts:
                    errs.append((("findings", i, "options", j, "text"),
                                 f"duplicate option text {text!r}: the model could not tell "
                                 f"options[{opt_texts[text.strip().lower()]}] and options[{j}] apart"))
                opt_texts.setdefault(text.strip().lower(), j)
        for key in ("concept", "site"):
            _check_scheme(f.get(key), ("findings", i, key), declared, errs)
        for j, o in enumerate(options):
            if isinstance(o, dict):
                _check_scheme(o.get("code"), ("findings", i, "options", j, "code"), declared, errs)
        critical = f.get("critical")
        if isinstance(critical, list):
            for k, c in enumerate(critical):
                if isinstance(c, str) and opt_ids and c not in opt_ids:
                    hint = difflib.get_close_matches(c, list(opt_ids), n=1)
                    errs.append((("findings", i, "critical", k), f"{c!r} is not an option id" +
                                 (f"; did you mean {hint[0]!r}?" if hint else
                                  f"; options: {', '.join(opt_ids)}")))
    return errs


def _check_scheme(code: Any, loc: tuple, declared: set[str], errs: list) -> None:
    """An explicit code mapping whose scheme is neither standard nor declared is an error."""
    if not isinstance(code, dict) or not isinstance(code.get("scheme"), str):
        return
    scheme = code["scheme"]
    if scheme in STANDARD_SCHEMES or scheme in declared:
        return
    hint = difflib.get_close_matches(scheme, sorted(STANDARD_SCHEMES | declared), n=1, cutoff=0.7)
    errs.append((loc + ("scheme",),
                 f"coding scheme {scheme!r} is not a DICOM standard scheme" +
                 (f" (did you mean {hint[0]!r}?)" if hint else "") +
                 ": declare it under coding_schemes: [{designator: " + scheme +
                 ", name: ..., responsible_organization: ...}]"))


def _resolve(name_or_path: Union[str, Path], templates_dir: Union[str, Path, None]) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"template file {path} not found")
        return path
    base = Path(templates_dir).expanduser() if templates_dir else default_templates_dir()
    if not ID_RE.match(text):
        raise FileNotFoundError(f"{text!r} is not a template name (expected [a-z0-9_]+)")
    path = base / f"{text}.yaml"
    if not path.is_file():
        known = list_templates(base)
        hint = difflib.get_close_matches(text, known, n=1)
        raise FileNotFoundError(f"template {text!r} not found in {base}" +
                                (f"; did you mean {hint[0]!r}?" if hint else
                                 f"; available: {', '.join(known) or 'none'}"))
    return path


def load_template(name_or_path: Union[str, Path],
                  templates_dir: Union[str, Path, None] = None) -> Template:
    """Load and validate a report template.

    Parameters
    ----------
    name_or_path:
        A template name (``"cmr_standard"`` → ``<templates_dir>/cmr_standard.yaml``) or a
        path to a YAML file (anything with a ``/`` or a ``.yaml``/``.yml`` suffix).
    templates_dir:
        Where names are looked up; default: the repository's ``dicom_sr_templates/``.

    Returns
    -------
    Template

    Raises
    ------
    FileNotFoundError
        No such template (the message lists what is available).
    TemplateError
        The file is not a valid template; ``.errors`` has every problem found, each
        ``FILE:LINE: key: message``.
    """
    path = _resolve(name_or_path, templates_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TemplateError([f"{path}:1: (top): cannot read template: {e}"]) from None
    try:
        doc = YAML(typ="rt").load(text)
    except MarkedYAMLError as e:
        line = (e.problem_mark.line + 1) if e.problem_mark else 1
        raise TemplateError([f"{path}:{line}: (top): YAML syntax: {e.problem}"]) from None
    except YAMLError as e:
        raise TemplateError([f"{path}:1: (top): YAML: {e}"]) from None
    if not isinstance(doc, dict):
        raise TemplateError([f"{path}:1: (top): a template must be a mapping "
                             "(name, title, procedure, findings, …)"])
    data = _plain(doc)
    errors: list[tuple[tuple, str]] = []
    template: Optional[Template] = None
    try:
        template = Template.model_validate({**data, "source": str(path)})
    except ValidationError as ve:
        errors.extend(_pydantic_errors(ve))
    errors.extend(_semantic_errors(data, path.stem))
    if errors:
        rows = sorted(((line_of(doc, loc), key_of(loc), msg) for loc, msg in errors),
                      key=lambda r: r[0])
        raise TemplateError([f"{path}:{line}: {key}: {msg}" for line, key, msg in rows])
    assert template is not None
    return template


def list_templates(templates_dir: Union[str, Path, None] = None) -> list[str]:
    """Names of the templates in ``templates_dir`` (default: the repository's), sorted."""
    base = Path(templates_dir).expanduser() if templates_dir else default_templates_dir()
    if not base.is_dir():
        return []
    return sorted(p.stem for p in base.glob("*.yaml") if ID_RE.match(p.stem))
