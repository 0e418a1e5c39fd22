"""Routing rules: the condition grammar, its validation, evaluation and explanation.

This module is the one place that knows the grammar of ``match``: the config loader
(:mod:`plugin.config`) calls :func:`rule_set_errors` to validate a file, and the
node and ``cmr-ai rules explain|test`` call :func:`route` to evaluate it, so the two
can never disagree. The reference for admins is ``docs/rules.md``.

A study is seen as the headers of one instance per series (:func:`read_series_headers`),
plus what the node knows of the association (calling AE title, source IP), the
node's local clock and, only when a rule asks for it, the cardiac view of every
series (:func:`series_views`, from :mod:`plugin.cardiac`).

``match`` maps keys to conditions; every condition of a mapping must hold:

- a DICOM keyword → a value condition that holds when *any* series' header satisfies
  it: a string is a regular expression searched anywhere (``re.search``); a number
  must be equal; a list holds when any item holds; a mapping is an operator object
  (``eq ne gt ge lt le regex in present``; all of its operators must hold);
- ``not: {…}``, ``any: [{…}, …]``, ``all: [{…}, …]``: groups;
- ``series: {view: SAX, min_slices: 8, min_phases: 20}``: some cardiac view is present
  (slices counted over every series of that view);
- ``calling_ae: <value condition>``, ``source_ip: 10.0.0.0/8`` (or a list),
  ``time: {between: ["22:00", "06:00"], weekdays: [mon, …]}``,
  ``study_age: {max: "2d", min: "30m"}``.

Rules are tried in order; the first matching rule decides, unless it says
``continue: true``, in which case the next matching rule adds its action too.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

if TYPE_CHECKING:
    from plugin.config import Rule

log = logging.getLogger("cmr_ai.routing")

#: Keys of ``match`` that are not DICOM keywords (DICOM keywords are CamelCase, so they cannot clash).
SPECIAL_KEYS = ("not", "any", "all", "series", "calling_ae", "source_ip", "time", "study_age")
#: Operators of a value condition written as a mapping (``{gt: 5}``).
OPERATORS = ("eq", "ne", "gt", "ge", "lt", "le", "regex", "in", "present")
SERIES_KEYS = ("view", "min_slices", "min_phases")
TIME_KEYS = ("between", "weekdays")
AGE_KEYS = ("min", "max")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: A study is never routed before it has been quiet this long, even with ``expected_views``.
EARLY_QUIET = 1.0
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Operator names from other tools, for "did you mean".
_OPERATOR_ALIASES = {"lte": "le", "gte": "ge", "neq": "ne", "equals": "eq", "equal": "eq", "not_equal": "ne",
                     ">": "gt", ">=": "ge", "<": "lt", "<=": "le", "=": "eq", "==": "eq", "!=": "ne",
                     "match": "regex", "re": "regex", "pattern": "regex", "exists": "present", "one_of": "in"}
_NUM_OPS = {"gt": (">", lambda a, b: a > b), "ge": (">=", lambda a, b: a >= b),
            "lt": ("<", lambda a, b: a < b), "le": ("<=", lambda a, b: a <= b)}

Loc = tuple  # a path into the config document: ("rules", 0, "match", "Modality")


class RuleGrammarError(ValueError):
    """A rule does not follow the grammar; ``errors`` holds (location, message) pairs."""

    def __init__(self, errors: list[tuple[Loc, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{_key(loc)}: {msg}" for loc, msg in errors))


def _key(loc: Loc) -> str:
    from plugin.yamlmarks import key_of

    return key_of(loc)


def rules_version(text: str | bytes) -> str:
    """The short version of a config file: the first 12 hex digits of its content's SHA-256."""
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:12]


# ---------------------------------------------------------------------------
# what is known of a study

@dataclass(frozen=True)
class SeriesView:
    """One series as :mod:`plugin.cardiac` classifies it: its view and its cine shape."""

    series_uid: str
    number: Optional[int]
    description: str
    view: str  # a plugin.cardiac.View value ("SAX", "4CH", …)
    slices: int  # distinct positions
    phases: int  # most distinct trigger times at one position


def series_views(paths: Sequence[str | os.PathLike]) -> list[SeriesView]:
    """Classify every MR image series of a study's files (headers only; reads every file).

    Raises whatever :func:`plugin.cardiac.load_study` / ``classify_study`` raise;
    :class:`StudyFacts` turns that into "no view known" with the reason.
    """
    from plugin.cardiac import classify_study, load_study
    from plugin.cardiac.classify import group_locations

    study = load_study(paths)
    classes = classify_study(study)
    out = []
    for s in study.ordered():
        c = classes.get(s.uid)
        locs = group_locations(s.frames, s.uid)
        out.append(SeriesView(s.uid, s.number, s.description, c.view.value if c else "OTHER", len(locs),
                              max((len(loc.phases()) for loc in locs), default=0)))
    return out


def read_series_headers(groups: Iterable[Sequence[str | os.PathLike]], tries: int = 3) -> list[Optional[Dataset]]:
    """One header (no pixels) per series: the first of each group's files that reads as DICOM.

    This is the study as routing sees it, shared by the node (groups from its
    database, in the order received) and ``cmr-ai rules explain`` (groups from a
    folder), so both route the same files the same way. A group none of whose first
    ``tries`` files reads gives None (the node then routes on what its index knows).
    """
    out: list[Optional[Dataset]] = []
    for paths in groups:
        header = None
        for p in list(paths)[:tries]:
            try:
                header = pydicom.dcmread(p, stop_before_pixels=True)
                break
            except Exception as e:  # noqa: BLE001 - a stored file that no longer reads
                log.warning("cannot read %s for routing: %s", p, e)
        out.append(header)
    return out


def scan_dicom(folder: str | os.PathLike, tags: Sequence[str]) -> tuple[list[tuple[str, Dataset]], list[str]]:
    """Every DICOM file under ``folder`` (recursive, any name, sorted path order, linked
    folders followed once), with a header of just ``tags``; and the files skipped as not
    DICOM. The one folder walk that ``cmr-ai rules test``, ``eval`` and ``train`` share.

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        When ``folder`` is not a directory.
    """
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not root.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    found: list[tuple[str, Dataset]] = []
    skipped: list[str] = []
    seen: set[str] = set()  # linked folders are followed, each real folder once (no link loops)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if not os.path.isfile(p):
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=list(tags))
            except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError):
                skipped.append(p)
                continue
            found.append((p, ds))
    return found, skipped


def dicom_files(folder: str | os.PathLike) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """A folder's DICOM files grouped by series, searched recursively in sorted order.

    Returns
    -------
    tuple
        (SeriesInstanceUID → paths, StudyInstanceUIDs seen, files skipped as not DICOM).

    Raises
    ------
    FileNotFoundError, NotADirectoryError
        When ``folder`` is not a directory.
    """
    groups: dict[str, list[str]] = {}
    studies: list[str] = []
    found, skipped = scan_dicom(folder, ["StudyInstanceUID", "SeriesInstanceUID"])
    for p, ds in found:
        uid = str(ds.get("StudyInstanceUID", "") or "")
        if uid and uid not in studies:
            studies.append(uid)
        groups.setdefault(str(ds.get("SeriesInstanceUID", "") or ""), []).append(p)
    return groups, studies, skipped


@dataclass
class StudyFacts:
    """Everything routing may look at for one study.

    Parameters
    ----------
    headers:
        One header per series (:func:`read_series_headers`).
    paths:
        Every instance file of the study, or a callable returning them; only read
        when a rule needs series views (``series:`` conditions, ``expected_views``).
    calling_ae, source_ip:
        The association the study came in on (None when not known).
    study_instance_uid:
        For messages.
    """

    headers: list[Dataset]
    paths: Union[Sequence[str], Callable[[], Sequence[str]]] = ()
    calling_ae: Optional[str] = None
    source_ip: Optional[str] = None
    study_instance_uid: str = ""
    _views: Optional[list[SeriesView]] = field(default=None, repr=False)
    _views_error: Optional[str] = field(default=None, repr=False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, calling_ae: Optional[str] = None,
                    source_ip: Optional[str] = None) -> "StudyFacts":
        """The study in a folder, as the node would see it had the folder been sent to it."""
        groups, studies, _skipped = dicom_files(folder)
        headers = [h for h in read_series_headers(groups.values()) if h is not None]
        paths = [p for ps in groups.values() for p in ps]
        return cls(headers=headers, paths=paths, calling_ae=calling_ae, source_ip=source_ip,
                   study_instance_uid=", ".join(studies))

    def values(self, keyword: str) -> list["_Val"]:
        return [v for ds in self.headers for v in _values(ds, keyword)]

    def views(self) -> list[SeriesView]:
        """The cardiac view of every series (computed once, on first use)."""
        if self._views is None:
            paths = self.paths() if callable(self.paths) else self.paths
            try:
                self._views = series_views(list(paths))
            except Exception as e:  # noqa: BLE001 - routing must not fail on an odd study
                log.warning("study %s: series views unknown: %s: %s", self.study_instance_uid, type(e).__name__, e)
                self._views, self._views_error = [], f"{type(e).__name__}: {e}"
        return self._views

    def view_summary(self) -> dict[str, tuple[int, int]]:
        """View → (slices over every series of that view, most phases)."""
        out: dict[str, tuple[int, int]] = {}
        for sv in self.views():
            s, p = out.get(sv.view, (0, 0))
            out[sv.view] = (s + sv.slices, max(p, sv.phases))
        return out


# ---------------------------------------------------------------------------
# values

@dataclass(frozen=True)
class _Val:
    text: str  # the value as text; a multi-valued element joined with "\"
    parts: tuple[str, ...]  # its values


def _values(ds: Dataset, keyword: str) -> list[_Val]:
    if keyword not in ds:
        return []
    try:
        v = ds.get(keyword)
    except Exception:  # noqa: BLE001 - an element that does not decode counts as absent
        return []
    if v is None or v == "":
        return [_Val("", ())]
    if isinstance(v, (list, MultiValue)):
        parts = tuple(str(x) for x in v)
        return [_Val("\\".join(parts), parts)]
    return [_Val(str(v), (str(v),))]


def _num(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Any) -> str:
    if _is_number(x):
        return f"{x:g}" if isinstance(x, float) else str(x)
    return repr(x)


def _eq(operand: Any, v: _Val) -> bool:
    """``eq``: numeric equality for a number (any of the values), exact text otherwise."""
    if _is_number(operand):
        return any(_num(p) == float(operand) for p in v.parts)
    return v.text == str(operand)


class _Pred:
    """One test of one value."""

    def __init__(self, op: str, arg: Any):
        self.op, self.arg = op, arg
        self._re = re.compile(arg) if op == "regex" else None

    def __call__(self, v: _Val) -> bool:
        op, arg = self.op, self.arg
        if op == "regex":
            return self._re.search(v.text) is not None
        if op == "eq":
            return _eq(arg, v)
        if op == "ne":
            return not _eq(arg, v)
        if op == "in":
            return any(_eq(a, v) for a in arg)
        fn = _NUM_OPS[op][1]
        return any((n := _num(p)) is not None and fn(n, float(arg)) for p in v.parts)

    def describe(self) -> str:
        op, arg = self.op, self.arg
        if op == "regex":
            return f"~ /{arg}/"
        if op == "eq":
            return f"= {_fmt(arg)}" if _is_number(arg) else f"== {arg!r}"
        if op == "ne":
            return f"!= {_fmt(arg)}"
        if op == "in":
            return f"in [{', '.join(_fmt(a) for a in arg)}]"
        return f"{_NUM_OPS[op][0]} {_fmt(arg)}"


class _ValueTest:
    """A value condition: predicates that must all hold for one value, and/or presence."""

    def __init__(self, preds: Sequence[_Pred] = (), present: Optional[bool] = None,
                 alternatives: Sequence["_ValueTest"] = ()):
        self.preds, self.present, self.alternatives = tuple(preds), present, tuple(alternatives)

    def holds(self, values: list[_Val]) -> bool:
        if self.alternatives:
            return any(a.holds(values) for a in self.alternatives)
        if self.present is not None:
            filled = [v for v in values if v.text != ""]
            if not self.present:
                return not filled
            if not filled:
                return False
            if not self.preds:
                return True
        return any(all(p(v) for p in self.preds) for v in values)

    def describe(self) -> str:
        if self.alternatives:
            return "(" + " or ".join(a.describe() for a in self.alternatives) + ")"
        parts = [p.describe() for p in self.preds]
        if self.present is not None:
            parts.insert(0, "present" if self.present else "absent")
        return " and ".join(parts)


def _seen(values: list[_Val], limit: int = 5) -> str:
    distinct = list(dict.fromkeys(repr(v.text) for v in values))
    if not distinct:
        return "absent"
    more = f", … (+{len(distinct) - limit})" if len(distinct) > limit else ""
    return ", ".join(distinct[:limit]) + more


# ---------------------------------------------------------------------------
# conditions and their outcomes

@dataclass(frozen=True)
class Check:
    """One condition's outcome: what was asked, whether it held, and what was seen."""

    condition: str
    ok: bool
    seen: str = ""
    children: tuple["Check", ...] = ()

    def lines(self, indent: str = "", decides: bool = False) -> list[str]:
        mark = "yes" if self.ok else "no "
        text = f"{indent}{mark}  {self.condition}"
        if self.seen:
            text += f"   [seen: {self.seen}]"
        if decides:
            text += "   <- decides"
        out = [text]
        for c in self.children:
            out += c.lines(indent + "       ")
        return out

    def brief(self) -> str:
        """One line: the condition, what was seen, and for a group its parts."""
        out = self.condition + (f" (seen {self.seen})" if self.seen else "")
        if self.children:
            out += " [" + "; ".join(f"{c.brief()}: {'yes' if c.ok else 'no'}" for c in self.children) + "]"
        return out

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"condition": self.condition, "ok": self.ok}
        if self.seen:
            d["seen"] = self.seen
        if self.children:
            d["children"] = [c.to_dict() for c in self.children]
        return d


class _Ctx:
    def __init__(self, facts: StudyFacts, now: datetime):
        self.facts, self.now = facts, now


class _Cond:
    cost = 0  # 1: needs series views (reads every header of the study)
    always_true = False

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, ctx: _Ctx) -> Check:
        raise NotImplementedError


class _Keyword(_Cond):
    def __init__(self, keyword: str, test: _ValueTest):
        self.keyword, self.test = keyword, test

    def describe(self) -> str:
        return f"{self.keyword} {self.test.describe()}"

    def check(self, ctx: _Ctx) -> Check:
        values = ctx.facts.values(self.keyword)
        return Check(self.describe(), self.test.holds(values), _seen(values))


class _CallingAE(_Cond):
    def __init__(self, test: _ValueTest):
        self.test = test

    def describe(self) -> str:
        return f"calling_ae {self.test.describe()}"

    def check(self, ctx: _Ctx) -> Check:
        ae = ctx.facts.calling_ae
        values = [_Val(ae, (ae,))] if ae is not None else []
        return Check(self.describe(), self.test.holds(values), repr(ae) if ae is not None else "not known")


class _SourceIP(_Cond):
    def __init__(self, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]):
        self.networks = tuple(networks)

    def describe(self) -> str:
        return "source_ip in " + ", ".join(str(n) for n in self.networks)

    def check(self, ctx: _Ctx) -> Check:
        ip = ctx.facts.source_ip
        if not ip:
            return Check(self.describe(), False, "not known")
        try:
            addr = ipaddress.ip_address(ip.strip())
        except ValueError:
            return Check(self.describe(), False, f"{ip!r} (not an IP address)")
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return Check(self.describe(), any(addr in n for n in self.networks if n.version == addr.version), str(addr))


class _Time(_Cond):
    def __init__(self, start: Optional[dtime], end: Optional[dtime], weekdays: Optional[frozenset[int]]):
        self.start, self.end, self.weekdays = start, end, weekdays

    def describe(self) -> str:
        parts = []
        if self.start is not None:
            parts.append(f"between {self.start:%H:%M} and {self.end:%H:%M}")
        if self.weekdays is not None:
            parts.append("on " + ", ".join(WEEKDAYS[d] for d in sorted(self.weekdays)))
        return "time " + " ".join(parts)

    def check(self, ctx: _Ctx) -> Check:
        now = ctx.now
        t = now.time()
        day = now.weekday()
        ok = True
        if self.start is not None:
            if self.start < self.end:
                ok = self.start <= t < self.end
            else:  # wraps midnight: before its end, the window started yesterday
                ok = t >= self.start or t < self.end
                if t < self.end:
                    day = (day - 1) % 7
        if ok and self.weekdays is not None:
            ok = day in self.weekdays
        return Check(self.describe(), ok, f"{now:%a %Y-%m-%d %H:%M} node time")


def study_datetime(facts: StudyFacts) -> Optional[datetime]:
    """StudyDate + StudyTime (PS3.5 DA/TM) of the first series that has a StudyDate."""
    for ds in facts.headers:
        d = str(ds.get("StudyDate", "") or "").strip()
        if len(d) < 8:
            continue
        try:
            day = date(int(d[:4]), int(d[4:6]), int(d[6:8]))
        except ValueError:
            continue
        tm = str(ds.get("StudyTime", "") or "").strip().replace(":", "").split(".")[0]
        digits = (tm + "000000")[:6] if tm.isdigit() else "000000"
        try:
            clock = dtime(int(digits[:2]), int(digits[2:4]), min(59, int(digits[4:6])))
        except ValueError:
            clock = dtime(0, 0)
        return datetime.combine(day, clock)
    return None


def _fmt_duration(td: timedelta) -> str:
    s = td.total_seconds()
    for unit, n in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if abs(s) >= n and s % n == 0:
            return f"{int(s // n)}{unit}"
    if abs(s) >= 86400:
        return f"{s / 86400:.1f}d"
    if abs(s) >= 3600:
        return f"{s / 3600:.1f}h"
    if abs(s) >= 60:
        return f"{s / 60:.0f}m"
    return f"{s:.0f}s"


class _StudyAge(_Cond):
    def __init__(self, min_age: Optional[timedelta], max_age: Optional[timedelta]):
        self.min_age, self.max_age = min_age, max_age

    def describe(self) -> str:
        parts = []
        if self.min_age is not None:
            parts.append(f">= {_fmt_duration(self.min_age)}")
        if self.max_age is not None:
            parts.append(f"<= {_fmt_duration(self.max_age)}")
        return "study_age " + " and ".join(parts)

    def check(self, ctx: _Ctx) -> Check:
        when = study_datetime(ctx.facts)
        if when is None:
            return Check(self.describe(), False, "(0008,0020) StudyDate absent or not a date")
        age = ctx.now - when
        ok = (self.min_age is None or age >= self.min_age) and (self.max_age is None or age <= self.max_age)
        return Check(self.describe(), ok, f"{_fmt_duration(age)} (StudyDate/Time {when:%Y-%m-%d %H:%M})")


class _Series(_Cond):
    cost = 1

    def __init__(self, views: Optional[frozenset[str]], min_slices: Optional[int], min_phases: Optional[int]):
        self.views, self.min_slices, self.min_phases = views, min_slices, min_phases

    def describe(self) -> str:
        what = " or ".join(sorted(self.views)) if self.views else "any view"
        req = []
        if self.min_slices is not None:
            req.append(f">= {self.min_slices} slices")
        if self.min_phases is not None:
            req.append(f">= {self.min_phases} phases")
        return f"series {what}" + (f" with {' and '.join(req)}" if req else "")

    def check(self, ctx: _Ctx) -> Check:
        summary = ctx.facts.view_summary()
        ok = any((self.views is None or view in self.views)
                 and (self.min_slices is None or slices >= self.min_slices)
                 and (self.min_phases is None or phases >= self.min_phases)
                 for view, (slices, phases) in summary.items())
        seen = ", ".join(f"{v} {s}x{p}" for v, (s, p) in summary.items()) or "no MR image series"
        if ctx.facts._views_error:
            seen += f" ({ctx.facts._views_error})"
        return Check(self.describe(), ok, seen + " (view slices x phases)" if summary else seen)


class _All(_Cond):
    """Every condition holds (a ``match`` mapping, or ``all: [...]``)."""

    def __init__(self, conds: Sequence[_Cond], label: Optional[str] = None):
        self.conds = tuple(conds)
        self.label = label
        self.cost = max((c.cost for c in self.conds), default=0)
        self.always_true = all(c.always_true for c in self.conds)

    def describe(self) -> str:
        if not self.conds:
            return "(always)"
        inner = " and ".join(c.describe() for c in self.conds)
        return inner if len(self.conds) == 1 else f"({inner})"

    def evaluate(self, ctx: _Ctx) -> list[Check]:
        """The checks in evaluation order (cheap ones first), stopping at the first that fails."""
        out = []
        for c in sorted(self.conds, key=lambda c: c.cost):
            chk = c.check(ctx)
            out.append(chk)
            if not chk.ok:
                break
        return out

    def check(self, ctx: _Ctx) -> Check:
        checks = self.evaluate(ctx)
        ok = all(c.ok for c in checks)
        if len(self.conds) == 1 and self.label is None:
            return checks[0]
        return Check(self.label or f"all of {len(self.conds)}", ok, "", tuple(checks))


class _Any(_Cond):
    def __init__(self, items: Sequence[_All]):
        self.items = tuple(items)
        self.cost = max((c.cost for c in self.items), default=0)
        self.always_true = any(c.always_true for c in self.items)

    def describe(self) -> str:
        return "any of (" + "; ".join(c.describe() for c in self.items) + ")"

    def check(self, ctx: _Ctx) -> Check:
        checks = []
        for c in sorted(self.items, key=lambda c: c.cost):
            chk = c.check(ctx)
            checks.append(chk)
            if chk.ok:
                break
        return Check(f"any of {len(self.items)}", any(c.ok for c in checks), "", tuple(checks))


class _Not(_Cond):
    def __init__(self, inner: _All):
        self.inner = inner
        self.cost = inner.cost

    def describe(self) -> str:
        return f"not {self.inner.describe()}"

    def check(self, ctx: _Ctx) -> Check:
        chk = self.inner.check(ctx)
        return Check(self.describe(), not chk.ok, "", (chk,))


# ---------------------------------------------------------------------------
# compiling (and validating) the grammar

def _kind(x: Any) -> str:
    if x is None:
        return "nothing"
    if isinstance(x, bool):
        return f"{str(x).lower()} (a yes/no value)"
    if isinstance(x, dict):
        return "a mapping" if x else "an empty mapping"
    if isinstance(x, list):
        return "a list" if x else "an empty list"
    if _is_number(x):
        return f"the number {x}"
    return repr(x)


def _hint(word: str, choices: Iterable[str], cutoff: float = 0.6) -> Optional[str]:
    m = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=cutoff)
    return m[0] if m else None


def _unknown(word: str, choices: Sequence[str], what: str) -> str:
    h = _hint(word, choices)
    return f"unknown {what} {word!r}" + (f"; did you mean {h!r}?" if h else f"; expected one of {', '.join(choices)}")


def _regex_error(pattern: str) -> Optional[str]:
    try:
        re.compile(pattern)
    except re.error as e:
        return f"bad regular expression {pattern!r}: {e}"
    return None


def _compile_value(raw: Any, loc: Loc, errs: list, *, in_list: bool = False) -> Optional[_ValueTest]:
    """A value condition: regex string, number, list of alternatives, or operator mapping."""
    if isinstance(raw, bool) or raw is None:
        errs.append((loc, f"{_kind(raw)} is not a condition: write a regular expression (\"(?i)yes\"), "
                          "a number, a list, or an operator mapping such as {present: true}"))
        return None
    if isinstance(raw, str):
        err = _regex_error(raw)
        if err:
            errs.append((loc, err))
            return None
        return _ValueTest([_Pred("regex", raw)])
    if _is_number(raw):
        return _ValueTest([_Pred("eq", raw)])
    if isinstance(raw, list):
        if in_list:
            errs.append((loc, "a list inside a list: write the alternatives in one list"))
            return None
        if not raw:
            errs.append((loc, "an empty list never matches: give at least one alternative"))
            return None
        alts = [_compile_value(item, loc + (j,), errs, in_list=True) for j, item in enumerate(raw)]
        return _ValueTest(alternatives=[a for a in alts]) if all(alts) else None
    if isinstance(raw, dict):
        if not raw:
            errs.append((loc, f"an empty operator mapping: use one of {', '.join(OPERATORS)}"))
            return None
        preds: list[_Pred] = []
        present: Optional[bool] = None
        ok = True
        for op, arg in raw.items():
            oloc = loc + (op,)
            if op not in OPERATORS:
                alias = _OPERATOR_ALIASES.get(str(op).lower())
                errs.append((oloc, f"unknown operator {op!r}; did you mean {alias!r}?" if alias
                             else _unknown(op, OPERATORS, "operator")))
                ok = False
            elif op == "present":
                if not isinstance(arg, bool):
                    errs.append((oloc, f"present needs true or false, got {_kind(arg)}"))
                    ok = False
                else:
                    present = arg
            elif op in _NUM_OPS:
                if not _is_number(arg):
                    errs.append((oloc, f"{op} needs a number, got {_kind(arg)}"))
                    ok = False
                else:
                    preds.append(_Pred(op, arg))
            elif op in ("eq", "ne"):
                if not (isinstance(arg, str) or _is_number(arg)):
                    errs.append((oloc, f"{op} needs a text or a number, got {_kind(arg)}"))
                    ok = False
                else:
                    preds.append(_Pred(op, arg))
            elif op == "regex":
                err = _regex_error(arg) if isinstance(arg, str) else f"regex needs a text, got {_kind(arg)}"
                if err:
                    errs.append((oloc, err))
                    ok = False
                else:
                    preds.append(_Pred(op, arg))
            elif op == "in":
                if not isinstance(arg, list) or not arg:
                    errs.append((oloc, f"in needs a non-empty list, got {_kind(arg)}"))
                    ok = False
                else:
                    bad = [j for j, a in enumerate(arg) if not (isinstance(a, str) or _is_number(a))]
                    for j in bad:
                        errs.append((oloc + (j,), f"in: each item must be a text or a number, got {_kind(arg[j])}"))
                    if bad:
                        ok = False
                    else:
                        preds.append(_Pred(op, list(arg)))
        if present is False and len(raw) > 1:
            errs.append((loc + ("present",), "present: false cannot be combined with other operators "
                                              "(there is no value to compare)"))
            ok = False
        return _ValueTest(preds, present) if ok else None
    errs.append((loc, f"{_kind(raw)} is not a condition"))
    return None


def _compile_groups(key: str, raw: Any, loc: Loc, errs: list) -> Optional[list[_All]]:
    if not isinstance(raw, list) or not raw:
        errs.append((loc, f"{key} needs a non-empty list of condition mappings, got {_kind(raw)}"))
        return None
    items = []
    for j, item in enumerate(raw):
        if not isinstance(item, dict) or not item:
            errs.append((loc + (j,), f"{key}[{j}] must be a non-empty mapping of conditions, got {_kind(item)}"))
            items.append(None)
        else:
            items.append(compile_match(item, loc + (j,), errs))
    return items if all(i is not None for i in items) else None  # type: ignore[return-value]


def _parse_clock(raw: Any, loc: Loc, errs: list) -> Optional[dtime]:
    if not isinstance(raw, str) or not re.match(r"^\d{1,2}:\d{2}(:\d{2})?$", raw.strip()):
        errs.append((loc, f"expected a time of day in quotes like \"22:00\", got {_kind(raw)}"))
        return None
    parts = [int(x) for x in raw.strip().split(":")]
    try:
        return dtime(*parts)
    except ValueError as e:
        errs.append((loc, f"{raw!r} is not a time of day: {e}"))
        return None


def parse_duration(raw: Any) -> timedelta:
    """``"30m"``, ``"6h"``, ``"2d"``, ``"1w"``, ``"90s"`` → timedelta; ValueError otherwise."""
    m = _DURATION_RE.match(raw) if isinstance(raw, str) else None
    if not m:
        raise ValueError(f"expected a duration like \"30m\", \"6h\", \"2d\" (units s, m, h, d, w), got {_kind(raw)}")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def _check_keys(raw: dict, allowed: Sequence[str], loc: Loc, errs: list, what: str) -> bool:
    ok = True
    for k in raw:
        if k not in allowed:
            errs.append((loc + (k,), _unknown(k, allowed, what)))
            ok = False
    return ok


def _compile_special(key: str, raw: Any, loc: Loc, errs: list) -> Optional[_Cond]:
    if key == "not":
        if not isinstance(raw, dict) or not raw:
            errs.append((loc, f"not needs a non-empty mapping of conditions, got {_kind(raw)}"))
            return None
        inner = compile_match(raw, loc, errs)
        return _Not(inner) if inner is not None else None
    if key in ("any", "all"):
        items = _compile_groups(key, raw, loc, errs)
        if items is None:
            return None
        return _Any(items) if key == "any" else _All(items, label=f"all of {len(items)}")
    if key == "calling_ae":
        test = _compile_value(raw, loc, errs)
        return _CallingAE(test) if test else None
    if key == "source_ip":
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            errs.append((loc, "source_ip needs an address or network (10.0.0.5, 10.0.0.0/8) or a list of them"))
            return None
        nets = []
        for j, item in enumerate(items):
            iloc = loc + (j,) if isinstance(raw, list) else loc
            try:
                if not isinstance(item, str):
                    raise ValueError(item)
                nets.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                errs.append((iloc, f"{_kind(item)} is not an IP address or network (10.0.0.5, 10.0.0.0/8, fd00::/8)"))
        return _SourceIP(nets) if len(nets) == len(items) else None
    if key == "time":
        if not isinstance(raw, dict) or not raw:
            errs.append((loc, "time needs a mapping: {between: [\"22:00\", \"06:00\"], weekdays: [mon, tue]}"))
            return None
        if not _check_keys(raw, TIME_KEYS, loc, errs, "time key"):
            return None
        start = end = None
        days = None
        ok = True
        if "between" in raw:
            b = raw["between"]
            if not isinstance(b, list) or len(b) != 2:
                errs.append((loc + ("between",),
                             f"between needs two times of day [\"22:00\", \"06:00\"], got {_kind(b)}"))
                ok = False
            else:
                start = _parse_clock(b[0], loc + ("between", 0), errs)
                end = _parse_clock(b[1], loc + ("between", 1), errs)
                if start is None or end is None:
                    ok = False
                elif start == end:
                    errs.append((loc + ("between",), "start and end are the same time: the window is empty"))
                    ok = False
        if "weekdays" in raw:
            w = raw["weekdays"]
            if not isinstance(w, list) or not w:
                errs.append((loc + ("weekdays",), f"weekdays needs a list such as [mon, tue, wed], got {_kind(w)}"))
                ok = False
            else:
                days = set()
                for j, d in enumerate(w):
                    name = str(d).strip().lower()[:3]
                    if not isinstance(d, str) or name not in WEEKDAYS:
                        errs.append((loc + ("weekdays", j), _unknown(str(d), WEEKDAYS, "weekday")))
                        ok = False
                    else:
                        days.add(WEEKDAYS.index(name))
        return _Time(start, end, frozenset(days) if days is not None else None) if ok else None
    if key == "study_age":
        if not isinstance(raw, dict) or not raw:
            errs.append((loc, "study_age needs a mapping: {max: \"2d\"} and/or {min: \"30m\"}"))
            return None
        if not _check_keys(raw, AGE_KEYS, loc, errs, "study_age key"):
            return None
        bounds: dict[str, Optional[timedelta]] = {"min": None, "max": None}
        ok = True
        for k in AGE_KEYS:
            if k in raw:
                try:
                    bounds[k] = parse_duration(raw[k])
                except ValueError as e:
                    errs.append((loc + (k,), str(e)))
                    ok = False
        if ok and bounds["min"] is not None and bounds["max"] is not None and bounds["min"] > bounds["max"]:
            errs.append((loc, "min is larger than max: no study can match"))
            ok = False
        return _StudyAge(bounds["min"], bounds["max"]) if ok else None
    if key == "series":
        if isinstance(raw, list):
            items = [_compile_series(item, loc + (j,), errs) for j, item in enumerate(raw)]
            if not raw:
                errs.append((loc, "series needs a mapping such as {view: SAX, min_slices: 8}"))
                return None
            return _All(items, label=f"all of {len(items)}") if all(items) else None  # type: ignore[arg-type]
        return _compile_series(raw, loc, errs)
    raise AssertionError(key)


def _compile_series(raw: Any, loc: Loc, errs: list) -> Optional[_Series]:
    from plugin.cardiac.views import View

    if not isinstance(raw, dict) or not raw:
        errs.append((loc, f"series needs a mapping such as {{view: SAX, min_slices: 8}}, got {_kind(raw)}"))
        return None
    if not _check_keys(raw, SERIES_KEYS, loc, errs, "series key"):
        return None
    ok = True
    views = None
    if "view" in raw:
        items = raw["view"] if isinstance(raw["view"], list) else [raw["view"]]
        views = set()
        for j, v in enumerate(items):
            vloc = loc + ("view", j) if isinstance(raw["view"], list) else loc + ("view",)
            try:
                views.add(View.parse(str(v)).value)
            except ValueError as e:
                h = _hint(str(v).upper(), [x.value for x in View])
                errs.append((vloc, str(e) + (f"; did you mean {h!r}?" if h else "")))
                ok = False
    counts: dict[str, Optional[int]] = {}
    for k in ("min_slices", "min_phases"):
        v = raw.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            errs.append((loc + (k,), f"{k} needs a whole number >= 1, got {_kind(v)}"))
            ok = False
        counts[k] = v
    if not ok:
        return None
    return _Series(frozenset(views) if views is not None else None, counts["min_slices"], counts["min_phases"])


def _keyword_hint(k: str) -> Optional[str]:
    from pydicom.datadict import keyword_dict

    m = difflib.get_close_matches(k, list(keyword_dict) + list(SPECIAL_KEYS), n=1, cutoff=0.75)
    if not m:  # "modality" → "Modality"
        lower = {kw.lower(): kw for kw in keyword_dict}
        return lower.get(k.lower())
    return m[0]


def compile_match(raw: Any, loc: Loc = ("match",), errs: Optional[list] = None) -> Optional[_All]:
    """Compile a ``match`` mapping; every mistake is appended to ``errs`` as (location, message).

    Returns None when there was a mistake (``errs`` then says which); an absent or
    empty mapping matches every study.
    """
    from pydicom.datadict import tag_for_keyword

    errs = errs if errs is not None else []
    if raw is None:
        return _All(())
    if not isinstance(raw, dict):
        errs.append((loc, f"match needs a mapping of conditions (DICOM keyword: value), got {_kind(raw)}"))
        return None
    n = len(errs)
    conds: list[_Cond] = []
    for key, val in raw.items():
        kloc = loc + (key,)
        if key in SPECIAL_KEYS:
            c = _compile_special(key, val, kloc, errs)
        else:
            if not isinstance(key, str) or tag_for_keyword(key) is None:
                h = _keyword_hint(str(key))
                errs.append((kloc, f"{key!r} is not a DICOM keyword nor one of {', '.join(SPECIAL_KEYS)}" +
                             (f"; did you mean {h!r}?" if h else "")))
            test = _compile_value(val, kloc, errs)
            c = _Keyword(str(key), test) if test else None
        if c is not None:
            conds.append(c)
    return _All(conds) if len(errs) == n else None


def view_errors(raw: Any, loc: Loc, errs: list) -> None:
    """Check an ``expected_views`` list."""
    from plugin.cardiac.views import View

    if raw is None:
        return
    if not isinstance(raw, list):
        errs.append((loc, f"expected_views needs a list of views such as [SAX, 4CH], got {_kind(raw)}"))
        return
    for j, v in enumerate(raw):
        try:
            View.parse(str(v))
        except ValueError as e:
            h = _hint(str(v).upper(), [x.value for x in View])
            errs.append((loc + (j,), str(e) + (f"; did you mean {h!r}?" if h else "")))


def rule_set_errors(raw_rules: Any, line_for: Callable[[Loc], int] = lambda loc: 0) -> list[tuple[Loc, str]]:
    """Grammar errors of a ``rules:`` list (the plain document): conditions, views, unreachable rules.

    ``line_for`` maps a location to its line, used to name the rule that makes a
    later one unreachable.
    """
    errs: list[tuple[Loc, str]] = []
    if not isinstance(raw_rules, list):
        return errs
    catch_all: Optional[tuple[int, str]] = None
    for i, r in enumerate(raw_rules):
        if not isinstance(r, dict):
            continue
        cond = compile_match(r.get("match"), ("rules", i, "match"), errs)
        view_errors(r.get("expected_views"), ("rules", i, "expected_views"), errs)
        name = r.get("name") if isinstance(r.get("name"), str) else f"rules[{i}]"
        if catch_all is not None:
            j, earlier = catch_all
            line = line_for(("rules", j))
            errs.append((("rules", i, "name") if "name" in r else ("rules", i),
                         f"rule {name!r} can never match: rule {earlier!r} (rules[{j}]"
                         f"{f', line {line}' if line else ''}) before it catches every study and has no "
                         f"'continue: true'"))
        elif cond is not None and cond.always_true and r.get("continue") is not True:
            catch_all = (i, name)
    return errs


def compile_rule(rule: "Rule") -> _All:
    """The rule's compiled match; raises :class:`RuleGrammarError` listing every mistake."""
    errs: list[tuple[Loc, str]] = []
    cond = compile_match(rule.match, ("match",), errs)
    view_errors(rule.expected_views, ("expected_views",), errs)
    if errs or cond is None:
        raise RuleGrammarError(errs)
    return cond


# ---------------------------------------------------------------------------
# evaluating

@dataclass(frozen=True)
class RuleAction:
    """What one matched rule asks for."""

    rule: str
    action: str  # "analyse" | "forward" | "ignore"
    template: Optional[str] = None
    model: Optional[str] = None
    priority: int = 5
    send_to: tuple[str, ...] = ()
    forward_to: tuple[str, ...] = ()
    stable_after: float = 3.0
    expected_views: tuple[str, ...] = ()

    @classmethod
    def of(cls, r: "Rule") -> "RuleAction":
        return cls(rule=r.name, action=r.action, template=r.template, model=r.model, priority=r.priority,
                   send_to=tuple(r.send_to), forward_to=tuple(r.forward_to), stable_after=r.stable_after,
                   expected_views=tuple(r.expected_views))

    def summary(self) -> str:
        if self.action == "analyse":
            out = f"analyse with {self.template} / {self.model} (priority {self.priority})"
            out += f", results to {', '.join(self.send_to)}" if self.send_to else ", results kept on the node"
            if self.forward_to:
                out += f"; forward originals to {', '.join(self.forward_to)}"
            return out
        if self.action == "forward":
            return f"forward originals to {', '.join(self.forward_to)}"
        return "ignore"


@dataclass(frozen=True)
class RuleTrace:
    """One rule's evaluation: matched or not, and the conditions that decided it."""

    rule: str
    index: int
    line: Optional[int]
    matched: bool
    reached: bool  # False: an earlier rule matched without 'continue: true'
    evaluated: bool  # False: skipped (not reached; the node does not evaluate those)
    checks: tuple[Check, ...]
    action: str
    continues: bool = False

    @property
    def deciding(self) -> Optional[Check]:
        """The condition that failed (None when the rule matched)."""
        return next((c for c in self.checks if not c.ok), None)

    def reason(self) -> str:
        if not self.evaluated:
            return "not evaluated"
        if self.matched:
            return f"all {len(self.checks)} conditions hold" if self.checks else "empty match: catches every study"
        d = self.deciding
        assert d is not None
        return f"{d.brief()}: no"

    def to_dict(self) -> dict:
        return {"rule": self.rule, "line": self.line, "matched": self.matched, "reached": self.reached,
                "evaluated": self.evaluated, "action": self.action, "continue": self.continues,
                "reason": self.reason(), "checks": [c.to_dict() for c in self.checks]}


@dataclass(frozen=True)
class Decision:
    """What to do with a complete study, and why.

    ``actions`` holds every rule that applies, in order: the first matching rule,
    and after it the next matching rule for as long as each says ``continue: true``.
    """

    actions: tuple[RuleAction, ...] = ()
    trace: tuple[RuleTrace, ...] = ()
    rules_version: Optional[str] = None
    stable_after: float = 3.0
    early: bool = False  # every matched rule's expected_views are present
    views: tuple[str, ...] = ()  # views present, when they were looked at
    at: Optional[datetime] = None

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(a.rule for a in self.actions)

    @property
    def rule(self) -> Optional[str]:
        """The first matching rule (None when no rule matched)."""
        return self.actions[0].rule if self.actions else None

    @property
    def analyses(self) -> tuple[RuleAction, ...]:
        return tuple(a for a in self.actions if a.action == "analyse")

    @property
    def forwards(self) -> tuple[RuleAction, ...]:
        return tuple(a for a in self.actions if a.forward_to)

    @property
    def action(self) -> str:
        """"analyse" when any matched rule analyses, else "forward" when one forwards, else "ignore"."""
        if self.analyses:
            return "analyse"
        return "forward" if self.forwards else "ignore"

    def _first_analysis(self) -> Optional[RuleAction]:
        return self.analyses[0] if self.analyses else None

    @property
    def template(self) -> Optional[str]:
        a = self._first_analysis()
        return a.template if a else None

    @property
    def model(self) -> Optional[str]:
        a = self._first_analysis()
        return a.model if a else None

    @property
    def priority(self) -> int:
        a = self._first_analysis()
        return a.priority if a else 5

    @property
    def send_to(self) -> tuple[str, ...]:
        a = self._first_analysis()
        return a.send_to if a else ()

    def ready(self, quiet: float) -> bool:
        """Whether a study quiet for ``quiet`` seconds may be acted on now."""
        return quiet >= self.stable_after or (self.early and quiet >= EARLY_QUIET)

    def summary(self) -> str:
        if not self.actions:
            return "no rule matched: ignored"
        return "; ".join(f"rule {a.rule}: {a.summary()}" for a in self.actions)

    @property
    def explanation(self) -> tuple[str, ...]:
        """One line per rule, then the decision."""
        lines = []
        for t in self.trace:
            state = "MATCH" if t.matched else "no"
            if not t.reached:
                state += " (not reached)"
            lines.append(f"{t.rule}: {state} — {t.reason()}")
        return tuple(lines + [self.summary()])

    def to_dict(self) -> dict:
        return {"rules_version": self.rules_version, "matched": list(self.rules), "action": self.action,
                "summary": self.summary(), "early": self.early, "views": list(self.views),
                "stable_after": self.stable_after, "at": self.at.isoformat(timespec="seconds") if self.at else None,
                "actions": [dataclasses.asdict(a) for a in self.actions],
                "rules": [t.to_dict() for t in self.trace]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def lines(self) -> list[str]:
        """The full explanation, as ``cmr-ai rules explain`` prints it."""
        out = []
        for t in self.trace:
            where = f" (line {t.line})" if t.line else ""
            state = "MATCH" if t.matched else "no"
            if not t.reached:
                tail = " (not reached: an earlier rule decided)"
            elif t.matched:
                tail = f" -> {t.action}" + ("; continue" if t.continues else "")
            else:
                tail = ""
            out.append(f"{t.index + 1:>2}. {t.rule}{where}: {state}{tail}")
            if not t.evaluated:
                out.append("       not evaluated")
                continue
            if not t.checks:
                out.append("       empty match: catches every study")
            deciding = t.deciding
            for c in t.checks:
                out += c.lines("       ", decides=c is deciding)
        out.append(f"decision: {self.summary()}")
        return out


def _compiled(rule: "Rule") -> _All:
    cond = getattr(rule, "_condition", None)
    return cond if cond is not None else compile_rule(rule)


def rule_matches(rule: "Rule", study: StudyFacts | Iterable[Dataset], *, now: Optional[datetime] = None
                 ) -> tuple[bool, str]:
    """Whether every condition of ``rule`` holds; and why (the deciding condition)."""
    facts = study if isinstance(study, StudyFacts) else StudyFacts(headers=list(study))
    checks = _compiled(rule).evaluate(_Ctx(facts, now or datetime.now()))
    ok = all(c.ok for c in checks)
    t = RuleTrace(rule.name, 0, None, ok, True, True, tuple(checks), rule.action)
    return ok, t.reason()


def min_quiet(rules: Sequence["Rule"]) -> float:
    """How long a study must be quiet before it is routed at all."""
    q = min((r.stable_after for r in rules), default=3.0)
    if any(r.expected_views for r in rules):
        q = min(q, EARLY_QUIET)
    return q


def route(rules: Sequence["Rule"], study: StudyFacts | Iterable[Dataset], *, now: Optional[datetime] = None,
          rules_version: Optional[str] = None, evaluate_all: bool = False) -> Decision:
    """Evaluate the rules in order for one study.

    Parameters
    ----------
    rules:
        ``Settings.rules``.
    study:
        What is known of the study; a plain list of headers (one per series) is
        accepted too.
    now:
        The node's local time (for ``time`` and ``study_age``); default: now.
    rules_version:
        Recorded on the decision.
    evaluate_all:
        Also evaluate the rules after the deciding one (for ``rules explain``); the
        node does not, so that a study never pays for conditions that cannot change
        the outcome.

    Returns
    -------
    Decision
        The actions of the matched rules (none: ignored) and a trace of every rule.
    """
    facts = study if isinstance(study, StudyFacts) else StudyFacts(headers=list(study))
    ctx = _Ctx(facts, now or datetime.now())
    traces: list[RuleTrace] = []
    actions: list[RuleAction] = []
    matched_rules: list["Rule"] = []
    reached = True
    for i, r in enumerate(rules):
        line = getattr(r, "_line", None)
        if not reached and not evaluate_all:
            traces.append(RuleTrace(r.name, i, line, False, False, False, (), r.action, r.continue_))
            continue
        checks = _compiled(r).evaluate(ctx)
        ok = all(c.ok for c in checks)
        traces.append(RuleTrace(r.name, i, line, ok, reached, True, tuple(checks), r.action, r.continue_))
        if ok and reached:
            actions.append(RuleAction.of(r))
            matched_rules.append(r)
            if not r.continue_:
                reached = False
    if matched_rules:
        stable_after = max(r.stable_after for r in matched_rules)
    else:
        stable_after = min((r.stable_after for r in rules), default=3.0)
    early = False
    views: tuple[str, ...] = ()
    if matched_rules and all(r.expected_views for r in matched_rules):
        present = set(facts.view_summary())
        views = tuple(sorted(present))
        early = all(set(r.expected_views) <= present for r in matched_rules)
    return Decision(actions=tuple(actions), trace=tuple(traces), rules_version=rules_version,
                    stable_after=stable_after, early=early, views=views, at=ctx.now)
