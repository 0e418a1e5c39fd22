"""Routing rules: which studies are analysed, with which template and model, sent where.

A rule's ``match`` maps DICOM keywords to conditions:

- a string is a regular expression searched anywhere in the value (``re.search``);
- a number must equal the value;
- a list holds when any of its items holds;
- an empty ``match`` matches every study.

A study is seen as the headers of one instance per series. A condition holds when
*any* series' header satisfies it, so series-level keywords (``Modality``,
``SeriesDescription`` …) mean "some series of the study", and study-level keywords
(identical in every series) behave as expected. All conditions of a rule must hold;
the first matching rule decides.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from pydicom import Dataset
from pydicom.multival import MultiValue

from plugin.config import Rule


@dataclass(frozen=True)
class Decision:
    """What to do with a complete study."""

    rule: Optional[str]  # None when no rule matched
    action: str  # "analyse" | "ignore"
    template: Optional[str] = None
    model: Optional[str] = None
    priority: int = 5
    send_to: tuple[str, ...] = ()
    stable_after: float = 3.0
    explanation: tuple[str, ...] = field(default_factory=tuple)


def _values(ds: Dataset, keyword: str) -> list[str]:
    if keyword not in ds:
        return []
    v = ds.get(keyword)
    if v is None:
        return [""]
    if isinstance(v, (list, MultiValue)):
        return ["\\".join(str(x) for x in v)]
    return [str(v)]


def _holds(cond: Any, value: str) -> bool:
    if isinstance(cond, list):
        return any(_holds(c, value) for c in cond)
    if isinstance(cond, str):
        return re.search(cond, value) is not None
    if isinstance(cond, bool):
        return value.lower() in ("1", "true", "yes") if cond else value.lower() in ("", "0", "false", "no")
    try:
        return float(value) == float(cond)
    except ValueError:
        return False


def rule_matches(rule: Rule, headers: Iterable[Dataset]) -> tuple[bool, str]:
    """Whether every condition of ``rule`` holds for some series header; and why."""
    headers = list(headers)
    for keyword, cond in rule.match.items():
        seen = [v for ds in headers for v in _values(ds, keyword)]
        if not any(_holds(cond, v) for v in seen):
            shown = ", ".join(sorted({repr(v) for v in seen})[:5]) or "absent"
            return False, f"{keyword}: {cond!r} did not match ({shown})"
    return True, "all conditions hold" if rule.match else "empty match (catches everything)"


def route(rules: list[Rule], headers: Iterable[Dataset]) -> Decision:
    """The first matching rule's decision; ``ignore`` when none matches."""
    headers = list(headers)
    why: list[str] = []
    for r in rules:
        ok, reason = rule_matches(r, headers)
        why.append(f"{r.name}: {'MATCH' if ok else 'no'} — {reason}")
        if ok:
            return Decision(rule=r.name, action=r.action, template=r.template, model=r.model,
                            priority=r.priority, send_to=tuple(r.send_to), stable_after=r.stable_after,
                            explanation=tuple(why))
    return Decision(rule=None, action="ignore", stable_after=min((r.stable_after for r in rules), default=3.0),
                    explanation=tuple(why + ["no rule matched: ignored"]))
