"""Clinical context for the prompt: age, sex, reason for the procedure, admitting diagnoses."""
from __future__ import annotations

import re
from typing import Iterable, Optional

import pydicom

_SEX = {"M": "male", "F": "female", "O": "other sex"}
_AGE = re.compile(r"^(\d{3})([DWMY])$")
_UNIT = {"D": "day", "W": "week", "M": "month", "Y": "year"}


def _text(v) -> str:
    return " ".join("".join(" " if ord(c) < 32 else c for c in str(v or "")).split())[:200]


def _reason(ds: pydicom.Dataset) -> str:
    for item in [ds, *(ds.get("RequestAttributesSequence") or [])]:
        for kw in ("ReasonForTheRequestedProcedure", "RequestedProcedureDescription"):
            if item.get(kw):
                return _text(item.get(kw))
    return ""


def clinical_context(ds: Optional[pydicom.Dataset]) -> str:
    """One line for the prompt, or "" when the study carries none of it (PS3.3 patient study module)."""
    if ds is None:
        return ""
    parts = []
    m = _AGE.match(str(ds.get("PatientAge", "") or ""))
    sex = _SEX.get(str(ds.get("PatientSex", "") or "").upper(), "")
    if m:
        n, unit = int(m.group(1)), _UNIT[m.group(2)]
        parts.append(f"{n}-{unit}-old" + (f" {sex}" if sex else ""))
    elif sex:
        parts.append(sex)
    reason = _reason(ds)
    if reason:
        parts.append(f"reason for the examination: {reason}")
    dx = _text(ds.get("AdmittingDiagnosesDescription"))
    if dx:
        parts.append(f"admitting diagnoses: {dx}")
    return ("Clinical context: " + "; ".join(parts) + ".") if parts else ""


def study_context(paths: Iterable[str]) -> str:
    """The context from the first readable header of the study."""
    for p in paths:
        try:
            return clinical_context(pydicom.dcmread(p, stop_before_pixels=True))
        except Exception:  # noqa: BLE001 - an unreadable file: try the next
            continue
    return ""
