"""Read any DICOM Structured Report back as a readable report: ``cmr-ai report show``.

Two layers:

* a generic reader of the SR Document Content tree (PS3.3 C.17.3): every content item
  becomes a :class:`ContentNode` — TEXT, CODE, NUM (value and units), CONTAINER (with its
  continuity and template), IMAGE / COMPOSITE / WAVEFORM references, SCOORD / SCOORD3D /
  TCOORD, UIDREF, DATE / TIME / DATETIME, PNAME, by-reference relationships (resolved to
  the item they point at) and value types it does not know (shown, never fatal). Each
  node carries its position identifier (``1.4.2``), the one by-reference relationships
  use (C.17.3.2.5 Referenced Content Item Identifier).
* a view for TID 1500 *Imaging Measurement Report* (root DCM 126000): header, observer
  context (TID 1001/1002/1004), procedure reported, one :class:`FindingLine` per
  measurement group (TID 1410/1411/1501), report-level texts and the Contributing
  Equipment. Other documents (our narrative Enhanced SR, LN 18748-4, or any vendor's)
  get the header and the generic outline.

Read leniently: SRs come from other vendors and from PACS exports, so missing optional
attributes, odd values and unknown value types are shown as they are, not refused.

    report = read_report("sr.dcm")          # Report (frozen dataclasses, JSON-able)
    print(render_text(report))
    Path("sr.html").write_text(render_html([report]))
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import json
import os
import sys
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from plugin.reports.sr import QUALITATIVE_EVALUATIONS

__all__ = [
    "Concept", "ContentNode", "Equipment", "Evaluation", "FindingLine", "ImageRef",
    "NotAStructuredReport", "Observer", "Report", "ReportError", "ReportText", "TextKind",
    "command", "load_sr", "read_content", "read_report", "render_html",
    "render_outline", "render_text",
]

SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
FINDINGS_CATEGORY = Code("276214006", "SCT", "Findings category type")
_MAX_DEPTH = 64  # deeper trees are cut off (shown), never a RecursionError


# ---------------------------------------------------------------------------
# errors

class ReportError(ValueError):
    """A file that cannot be shown: unreadable, not DICOM, or not an SR. The message
    names the file."""


class NotAStructuredReport(ReportError):
    """A DICOM file that is not a Structured Report."""


# ---------------------------------------------------------------------------
# data

@dataclass(frozen=True)
class Concept:
    """A coded concept as written in the file (meaning may be empty in foreign SRs)."""

    scheme: str
    value: str
    meaning: str = ""

    def is_(self, code: Code) -> bool:
        """Same scheme designator and code value as a pydicom :class:`Code`."""
        return self.scheme == code.scheme_designator and self.value == code.value

    @property
    def code(self) -> str:
        """``SCT 241620005``."""
        return f"{self.scheme} {self.value}".strip()

    def __str__(self) -> str:
        return self.meaning or f"({self.code})"


@dataclass(frozen=True)
class ImageRef:
    """A referenced SOP instance (IMAGE, COMPOSITE or WAVEFORM item, or the image an
    SCOORD is SELECTED FROM), with frames / segments when given."""

    sop_class_uid: str
    sop_instance_uid: str
    frames: tuple[int, ...] = ()
    segments: tuple[int, ...] = ()

    @property
    def sop_class_name(self) -> str:
        return _uid_name(self.sop_class_uid)

    @property
    def short_uid(self) -> str:
        """The SOP Instance UID's tail (``…901927089``): what tells instances apart."""
        return _short_uid(self.sop_instance_uid)

    @property
    def label(self) -> str:
        """``…017901927089 frame 13``."""
        out = self.short_uid or "(no SOP Instance UID)"
        if self.frames:
            out += (" frame " if len(self.frames) == 1 else " frames ") + ",".join(map(str, self.frames))
        if self.segments:
            out += (" segment " if len(self.segments) == 1 else " segments ") + \
                ",".join(map(str, self.segments))
        return out


@dataclass(frozen=True)
class ContentNode:
    """One SR content item and its children.

    ``id`` is the item's position (root ``1``, its third child ``1.3``);
    ``value`` is the display text of its value (see :func:`read_content`); the typed
    fields hold what the value is made of, where the value type has it.
    """

    id: str
    relationship: str  # "" for the root
    value_type: str  # "" for a by-reference item
    name: Optional[Concept]
    value: str
    children: tuple["ContentNode", ...] = ()
    code: Optional[Concept] = None  # CODE
    number: Optional[float] = None  # NUM
    unit: str = ""  # NUM
    text: Optional[str] = None  # TEXT (as written), UIDREF, DATE/TIME/DATETIME, PNAME
    image: Optional[ImageRef] = None  # IMAGE, COMPOSITE, WAVEFORM
    graphic_type: str = ""  # SCOORD, SCOORD3D
    reference: Optional[str] = None  # by-reference: the id of the target item
    continuity: str = ""  # CONTAINER
    template: str = ""  # CONTAINER: "TID 1500"

    def walk(self) -> Iterator["ContentNode"]:
        """This node and all its descendants, depth first."""
        yield self
        for c in self.children:
            yield from c.walk()

    def named(self, code: Code) -> bool:
        return self.name is not None and self.name.is_(code)

    @property
    def label(self) -> str:
        return str(self.name) if self.name else ""


class TextKind(str, Enum):
    """What a report-level text is, for grouping in the view."""

    IMPRESSION = "impression"
    LIMITATION = "limitation"
    SAFETY = "safety"
    EVALUATION = "evaluation"
    COMMENT = "comment"


@dataclass(frozen=True)
class ReportText:
    """A report-level item of a TID 1500 report (outside the measurement groups)."""

    kind: TextKind
    name: str
    value: str


@dataclass(frozen=True)
class Evaluation:
    """A qualitative evaluation of a measurement group: a CODE (or TEXT) item."""

    name: str
    value: str
    code: Optional[Concept] = None


@dataclass(frozen=True)
class FindingLine:
    """One TID 1500 measurement group (TID 1410 / 1411 / 1501), as one line."""

    index: int
    tracking_id: Optional[str] = None
    tracking_uid: Optional[str] = None
    finding: Optional[str] = None
    finding_code: Optional[Concept] = None
    category: Optional[str] = None
    sites: tuple[str, ...] = ()
    evaluations: tuple[Evaluation, ...] = ()
    probability: Optional[float] = None
    measurements: tuple[str, ...] = ()  # other NUM items: "Name: 52 %"
    comments: tuple[str, ...] = ()
    image: Optional[ImageRef] = None
    region: str = ""  # "POLYLINE", "SCOORD3D POINT (frame of reference …1234)"
    algorithm: str = ""
    template: str = ""  # "TID 1410" when the group says so
    node_id: str = ""
    extra: tuple[str, ...] = ()  # items of the group not shown above, "Name: value"

    @property
    def evaluation_text(self) -> str:
        """The evaluations, the value alone where its name is the finding itself."""
        out = []
        for e in self.evaluations:
            same = e.name == (self.finding or "") or not e.name
            out.append(e.value if same else f"{e.name}: {e.value}")
        return "; ".join(out)

    @property
    def where(self) -> str:
        return self.image.label if self.image else self.region


@dataclass(frozen=True)
class Observer:
    """An observer of the observation context (TID 1002 person / TID 1004 device)."""

    kind: str  # "Device", "Person" or the Observer Type's meaning
    name: str = ""
    uid: str = ""
    manufacturer: str = ""
    model: str = ""
    serial_number: str = ""
    location: str = ""
    organization: str = ""
    role: str = ""

    @property
    def summary(self) -> str:
        parts = [f"{self.kind.lower()} {self.name!r}" if self.name else self.kind.lower()]
        for label, v in (("manufacturer", self.manufacturer), ("model", self.model),
                         ("serial", self.serial_number), ("location", self.location),
                         ("organization", self.organization), ("role", self.role),
                         ("UID", self.uid)):
            if v:
                parts.append(f"{label} {v}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Equipment:
    """One item of the Contributing Equipment Sequence (0018,A001)."""

    purpose: str
    manufacturer: str = ""
    model: str = ""
    software_versions: str = ""
    description: str = ""
    institution: str = ""
    date_time: str = ""

    @property
    def summary(self) -> str:
        what = " ".join(x for x in (self.manufacturer, self.model) if x) or "(unnamed)"
        if self.software_versions:
            what += f" {self.software_versions}"
        out = f"{self.purpose or 'Equipment'}: {what}"
        if self.institution:
            out += f" at {self.institution}"
        if self.date_time:
            out += f" ({self.date_time})"
        if self.description:
            out += f" — {self.description}"
        return out


@dataclass(frozen=True)
class Report:
    """An SR read back: header, observer context, and (for TID 1500) the findings.

    ``content`` is the whole tree; for TID 1500 ``other`` holds the top-level items the
    view does not show in its own sections, so nothing is silently left out.
    """

    source: str
    sop_class_uid: str
    sop_instance_uid: str
    title: str
    title_code: Optional[Concept]
    is_tid1500: bool
    content: ContentNode
    template: str = ""
    modality: str = ""
    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_instance_uid: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    accession_number: str = ""
    series_number: str = ""
    series_description: str = ""
    instance_number: str = ""
    content_date_time: str = ""
    manufacturer: str = ""
    institution: str = ""
    completion_flag: str = ""
    verification_flag: str = ""
    preliminary_flag: str = ""
    verified_by: tuple[str, ...] = ()
    language: str = ""
    observers: tuple[Observer, ...] = ()
    procedures: tuple[str, ...] = ()
    algorithm: str = ""
    image_library: int = 0
    evidence: str = ""  # "4 instances in 3 series"
    findings: tuple[FindingLine, ...] = ()
    texts: tuple[ReportText, ...] = ()
    equipment: tuple[Equipment, ...] = ()
    other: tuple[ContentNode, ...] = ()
    warnings: tuple[str, ...] = ()  # what pydicom warned about while reading (odd values …)

    @property
    def sop_class_name(self) -> str:
        return _uid_name(self.sop_class_uid)

    @property
    def unverified(self) -> bool:
        return self.verification_flag.upper() == "UNVERIFIED"

    @property
    def preliminary(self) -> bool:
        return self.preliminary_flag.upper() == "PRELIMINARY"

    @property
    def by_device(self) -> bool:
        """An observer of the document is a device (an algorithm wrote it)."""
        return any(o.kind.lower() == "device" for o in self.observers)

    @property
    def banner(self) -> str:
        """``UNVERIFIED AI DRAFT`` (device observer) / ``UNVERIFIED DRAFT`` /
        ``PRELIMINARY AI DRAFT`` …, or "" for a verified final document."""
        if not (self.unverified or self.preliminary):
            return ""
        return ("UNVERIFIED " if self.unverified else "PRELIMINARY ") + \
            ("AI " if self.by_device else "") + "DRAFT"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (enums as their values, derived labels added)."""
        d = dataclasses.asdict(self)
        d["sop_class_name"] = self.sop_class_name
        d["banner"] = self.banner
        for f, fd in zip(self.findings, d["findings"]):
            fd["evaluation_text"] = f.evaluation_text
            fd["where"] = f.where
        return _jsonable(d)


# ---------------------------------------------------------------------------
# reading

PathLike = Union[str, "os.PathLike[str]"]


def load_sr(path: PathLike) -> Dataset:
    """Read ``path`` as a DICOM SR (pixel data never loaded).

    Files without the 128-byte preamble / File Meta (as some PACS exports write them)
    are read too.

    Raises
    ------
    ReportError
        Unreadable file or not DICOM; :class:`NotAStructuredReport` for DICOM that is
        not an SR. The message starts with the file name.
    """
    name = os.fspath(path)
    try:
        ds = pydicom.dcmread(name, stop_before_pixels=True)
    except InvalidDicomError:
        ds = _read_forced(name)
    except (IsADirectoryError, FileNotFoundError, PermissionError) as e:
        raise ReportError(f"{name}: cannot read: {e.strerror}") from None
    except Exception as e:  # noqa: BLE001 — truncated/garbled files raise anything
        raise ReportError(f"{name}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    if not is_sr(ds):
        sop = str(ds.get("SOPClassUID", "") or "")
        what = f"SOP Class {_uid_name(sop)}" + (f" ({sop})" if sop and _uid_name(sop) != sop else "") \
            if sop else "no SOP Class UID"
        raise NotAStructuredReport(f"{name}: not a DICOM Structured Report ({what}, Modality "
                                   f"{ds.get('Modality', '') or '(none)'})")
    return ds


def _read_forced(name: str) -> Dataset:
    """A dataset without preamble/File Meta; anything that does not look like one is
    "not a DICOM file"."""
    try:
        ds = pydicom.dcmread(name, force=True, stop_before_pixels=True)
        ok = ("SOPClassUID" in ds and str(ds.SOPClassUID).startswith("1.")) or \
             ("ValueType" in ds and "ContentSequence" in ds)
        if ok:
            ds.SOPClassUID  # noqa: B018 — make a garbled element raise here
    except Exception:  # noqa: BLE001
        ok = False
    if not ok:
        raise ReportError(f"{name}: not a DICOM file (no DICM preamble, and it does not read as a "
                          "DICOM dataset)")
    return ds


def is_sr(ds: Dataset) -> bool:
    """An SR document: an SR SOP Class, Modality SR, or a root CONTAINER with content."""
    try:
        sop = str(ds.get("SOPClassUID", "") or "")
        return sop.startswith(SR_SOP_CLASS_PREFIX) or str(ds.get("Modality", "")) == "SR" or \
            (str(ds.get("ValueType", "")) == "CONTAINER" and "ContentSequence" in ds)
    except Exception:  # noqa: BLE001
        return False


def read_content(ds: Dataset) -> ContentNode:
    """The SR content tree of ``ds`` (the dataset is the root item, id ``1``).

    Never raises for odd content: an item that cannot be read becomes a node whose value
    says why, an unknown value type a node naming its attributes, a tree deeper than
    64 levels is cut (and says so). By-reference items get the target's id in
    ``reference`` and its label in ``value``.
    """
    root = _node(ds, "1", "", 0)
    index = {n.id: n for n in root.walk()}
    return _resolve(root, index)


def _resolve(node: ContentNode, index: dict[str, ContentNode]) -> ContentNode:
    kids = tuple(_resolve(c, index) for c in node.children)
    if node.reference is not None:
        target = index.get(node.reference)
        desc = (f"{target.value_type or 'item'} {target.label}".strip() + (f" = {_clip(target.value)}"
                if target.value and target.value_type not in ("CONTAINER",) else "")) \
            if target else "(not in this document)"
        return dataclasses.replace(node, value=f"→ {node.reference} {desc}", children=kids)
    if kids != node.children:
        return dataclasses.replace(node, children=kids)
    return node


def _node(item: Dataset, nid: str, rel: str, depth: int) -> ContentNode:
    try:
        name = _concept_of(item, "ConceptNameCodeSequence")
    except Exception:  # noqa: BLE001
        name = None
    vt = ""
    try:
        vt = str(item.get("ValueType", "") or "").strip().upper()
        children: tuple[ContentNode, ...] = ()
        seq = item.get("ContentSequence") or []
        if seq and depth >= _MAX_DEPTH:
            children = (ContentNode(f"{nid}.1", "", "", None,
                                    f"({len(seq)} item(s) deeper than {_MAX_DEPTH} levels not shown)"),)
        elif seq:
            children = tuple(_node(child, f"{nid}.{i}", _str(child.get("RelationshipType")), depth + 1)
                             for i, child in enumerate(seq, 1))
        if not vt and "ReferencedContentItemIdentifier" in item:
            ref = ".".join(str(int(x)) for x in _seq_values(item.ReferencedContentItemIdentifier))
            return ContentNode(nid, rel, "", name, "", children, reference=ref)
        fields = _value(item, vt)
        return ContentNode(nid, rel, vt, name, children=children, **fields)
    except Exception as e:  # noqa: BLE001 — show it, never fail the whole document
        return ContentNode(nid, rel, vt, name, f"(unreadable item: {type(e).__name__}: {e})")


def _value(item: Dataset, vt: str) -> dict[str, Any]:
    """The value of one item as the ContentNode fields (``value`` always set)."""
    if vt == "TEXT":
        t = _str(item.get("TextValue"))
        return {"value": t, "text": t}
    if vt == "CODE":
        c = _concept_of(item, "ConceptCodeSequence")
        return {"value": f"{c} ({c.code})" if c and c.meaning else (str(c) if c else "(no code)"),
                "code": c}
    if vt == "NUM":
        return _num(item)
    if vt == "CONTAINER":
        cont = _str(item.get("ContinuityOfContent"))
        tpl = ""
        for t in item.get("ContentTemplateSequence") or []:
            tid = _str(t.get("TemplateIdentifier"))
            if tid:
                res = _str(t.get("MappingResource"))
                tpl = f"TID {tid}" if res in ("DCMR", "") else f"{res} {tid}"
        return {"value": ", ".join(x for x in (cont, tpl) if x), "continuity": cont, "template": tpl}
    if vt in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        ref = _image_ref(item)
        if ref is None:
            return {"value": "(no Referenced SOP Sequence)"}
        text = f"{ref.sop_class_name} {ref.label}"
        extra = []
        first = item.ReferencedSOPSequence[0]
        if vt == "WAVEFORM" and "ReferencedWaveformChannels" in first:
            extra.append("channels " + " ".join(map(str, _seq_values(first.ReferencedWaveformChannels))))
        for ps in (first.get("ReferencedSOPSequence") or []):  # e.g. a presentation state
            extra.append(f"with {_uid_name(_str(ps.get('ReferencedSOPClassUID')))} "
                         f"{_short_uid(_str(ps.get('ReferencedSOPInstanceUID')))}")
        return {"value": " ".join([text, *extra]), "image": ref}
    if vt in ("SCOORD", "SCOORD3D"):
        gt = _str(item.get("GraphicType"))
        data = [float(x) for x in _seq_values(item.get("GraphicData"))]
        dim = 3 if vt == "SCOORD3D" else 2
        pts = [data[i:i + dim] for i in range(0, len(data) - dim + 1, dim)]
        text = f"{gt or '(no graphic type)'}, {len(pts)} point{'s' if len(pts) != 1 else ''}"
        if pts:
            axes = "xyz"[:dim]
            text += ", " + " ".join(
                f"{a} {min(p[k] for p in pts):g}" + (f"–{max(p[k] for p in pts):g}"
                                                     if max(p[k] for p in pts) != min(p[k] for p in pts) else "")
                for k, a in enumerate(axes))
        if vt == "SCOORD3D":
            text += f" (frame of reference {_short_uid(_str(item.get('ReferencedFrameOfReferenceUID')))})"
        return {"value": text, "graphic_type": gt}
    if vt == "TCOORD":
        kind = _str(item.get("TemporalRangeType"))
        for kw, label in (("ReferencedSamplePositions", "sample positions"),
                          ("ReferencedTimeOffsets", "time offsets"),
                          ("ReferencedDateTime", "date-times")):
            if kw in item:
                vals = list(_seq_values(item.get(kw)))
                return {"value": f"{kind} {label} " + " ".join(map(str, vals[:8])) +
                        (" …" if len(vals) > 8 else "")}
        return {"value": kind}
    if vt == "UIDREF":
        u = _str(item.get("UID"))
        return {"value": u, "text": u}
    if vt == "DATE":
        d = _date(_str(item.get("Date")))
        return {"value": d, "text": d}
    if vt == "TIME":
        t = _time(_str(item.get("Time")))
        return {"value": t, "text": t}
    if vt == "DATETIME":
        t = _datetime(_str(item.get("DateTime")))
        return {"value": t, "text": t}
    if vt == "PNAME":
        p = _pname(item.get("PersonName"))
        return {"value": p, "text": p}
    # unknown or new value type (TABLE …): say what is there
    skip = {"RelationshipType", "ValueType", "ConceptNameCodeSequence", "ContentSequence",
            "ObservationDateTime", "ObservationUID"}
    kws = [e.keyword or str(e.tag) for e in item if (e.keyword or str(e.tag)) not in skip]
    return {"value": f"(value type {vt or 'missing'} not shown" +
                     (f"; attributes: {', '.join(kws)})" if kws else ")")}


def _num(item: Dataset) -> dict[str, Any]:
    mv = item.get("MeasuredValueSequence") or []
    if not mv:
        q = _concept_of(item, "NumericValueQualifierCodeSequence")
        return {"value": f"(no value: {q})" if q else "(no value)"}
    m = mv[0]
    raw = m.get("NumericValue")
    number: Optional[float] = None
    fp = m.get("FloatingPointValue")
    try:
        number = float(fp) if fp is not None else float(raw)
    except (TypeError, ValueError):
        number = None
    shown = _str(raw) if raw not in (None, "") else (f"{number:g}" if number is not None else "?")
    unit = _unit(_concept_of(m, "MeasurementUnitsCodeSequence"))
    return {"value": f"{shown} {unit}".strip(), "number": number, "unit": unit}


def _unit(c: Optional[Concept]) -> str:
    """UCUM units as written (``mm``, ``%``); ``1`` and ``{ratio}`` as nothing;
    other annotations without braces; other schemes by meaning."""
    if c is None:
        return ""
    if c.scheme == "UCUM":
        if c.value in ("1", "{ratio}"):
            return ""
        if c.value.startswith("{") and c.value.endswith("}"):
            return c.value[1:-1]
        return c.value
    return c.meaning or c.value


def _image_ref(item: Dataset) -> Optional[ImageRef]:
    seq = item.get("ReferencedSOPSequence") or []
    if not seq:
        return None
    r = seq[0]
    return ImageRef(sop_class_uid=_str(r.get("ReferencedSOPClassUID")),
                    sop_instance_uid=_str(r.get("ReferencedSOPInstanceUID")),
                    frames=_ints(r.get("ReferencedFrameNumber")),
                    segments=_ints(r.get("ReferencedSegmentNumber")))


def _concept_of(ds: Dataset, keyword: str) -> Optional[Concept]:
    seq = ds.get(keyword) or []
    if not seq:
        return None
    c = seq[0]
    value = _str(c.get("CodeValue")) or _str(c.get("LongCodeValue")) or _str(c.get("URNCodeValue"))
    return Concept(scheme=_str(c.get("CodingSchemeDesignator")), value=value,
                   meaning=_str(c.get("CodeMeaning")))


# ---------------------------------------------------------------------------
# the report

def read_report(source: Union[PathLike, Dataset]) -> Report:
    """Read an SR file (or dataset) into a :class:`Report`.

    What pydicom warns about while reading (invalid values, an unknown character set …)
    is kept in ``Report.warnings`` rather than printed.

    Raises
    ------
    ReportError
        See :func:`load_sr`; also for a dataset that is not an SR.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = _read_report(source)
    seen = list(dict.fromkeys(str(w.message) for w in caught))
    return dataclasses.replace(report, warnings=tuple(seen)) if seen else report


def _read_report(source: Union[PathLike, Dataset]) -> Report:
    if isinstance(source, Dataset):
        ds, name = source, str(getattr(source, "filename", "") or "<dataset>")
        if not is_sr(ds):
            raise NotAStructuredReport(f"{name}: not a DICOM Structured Report")
    else:
        name = os.fspath(source)
        ds = load_sr(name)
    root = read_content(ds)

    def g(keyword: str) -> str:
        return _safe_str(ds, keyword)

    tpl = ""
    for t in ds.get("ContentTemplateSequence") or []:
        if _str(t.get("TemplateIdentifier")):
            tpl = f"TID {_str(t.get('TemplateIdentifier'))}"
    title = root.name
    is_1500 = title is not None and title.is_(codes.DCM.ImagingMeasurementReport)
    fields: dict[str, Any] = dict(
        source=name, sop_class_uid=g("SOPClassUID"), sop_instance_uid=g("SOPInstanceUID"),
        title=str(title) if title else "(no document title)", title_code=title,
        is_tid1500=is_1500, content=root, template=tpl, modality=g("Modality"),
        patient_name=_pname(ds.get("PatientName")), patient_id=g("PatientID"),
        patient_birth_date=_date(g("PatientBirthDate")), patient_sex=g("PatientSex"),
        study_instance_uid=g("StudyInstanceUID"), study_date=_date(g("StudyDate")),
        study_time=_time(g("StudyTime")), study_description=g("StudyDescription"),
        accession_number=g("AccessionNumber"), series_number=g("SeriesNumber"),
        series_description=g("SeriesDescription"), instance_number=g("InstanceNumber"),
        content_date_time=" ".join(x for x in (_date(g("ContentDate")), _time(g("ContentTime"))) if x),
        manufacturer=g("Manufacturer"), institution=g("InstitutionName"),
        completion_flag=g("CompletionFlag"), verification_flag=g("VerificationFlag"),
        preliminary_flag=g("PreliminaryFlag"), verified_by=_verifiers(ds),
        equipment=_equipment(ds), evidence=_evidence(ds),
    )
    used: set[str] = set()
    fields["observers"] = _observers(root, used)
    for n in root.children:
        if n.named(codes.DCM.LanguageOfContentItemAndDescendants) and n.code:
            fields["language"] = n.code.meaning or n.code.value
            used.add(n.id)
        elif n.named(codes.DCM.ProcedureReported) and n.code:
            fields.setdefault("procedures", ())
            fields["procedures"] += (str(n.code),)
            used.add(n.id)
    if is_1500:
        fields.update(_tid1500(root, used))
    return Report(**fields)


def _tid1500(root: ContentNode, used: set[str]) -> dict[str, Any]:
    findings: list[FindingLine] = []
    texts: list[ReportText] = []
    other: list[ContentNode] = []
    library = 0
    for n in root.children:
        if n.id in used:
            continue
        if n.named(codes.DCM.ImageLibrary):
            library = sum(1 for x in n.walk() if x.value_type == "IMAGE" and x.image)
        elif n.named(codes.DCM.ImagingMeasurements):
            for g in n.children:
                if g.value_type == "CONTAINER" and g.named(codes.DCM.MeasurementGroup):
                    findings.append(_finding(g, len(findings) + 1))
                else:
                    other.append(g)
        elif n.named(QUALITATIVE_EVALUATIONS):
            for t in n.children:
                if t.value_type in ("TEXT", "CODE"):
                    texts.append(_report_text(t))
                else:
                    other.append(t)
        else:
            other.append(n)
    algos = list(dict.fromkeys(f.algorithm for f in findings if f.algorithm))
    return {"findings": tuple(findings), "texts": tuple(texts), "other": tuple(other),
            "image_library": library, "algorithm": "; ".join(algos)}


def _finding(group: ContentNode, index: int) -> FindingLine:
    f: dict[str, Any] = {"index": index, "node_id": group.id, "template": group.template}
    sites, evals, nums, comments, extra = [], [], [], [], []
    alg_name = alg_version = ""
    for n in group.children:
        vt = n.value_type
        if n.named(codes.DCM.TrackingIdentifier) and n.text is not None:
            f["tracking_id"] = n.text
        elif n.named(codes.DCM.TrackingUniqueIdentifier) and n.text is not None:
            f["tracking_uid"] = n.text
        elif n.named(codes.DCM.Finding) and n.code:
            f["finding"], f["finding_code"] = str(n.code), n.code
        elif n.named(FINDINGS_CATEGORY) and n.code:
            f["category"] = str(n.code)
        elif n.named(codes.SCT.FindingSite) and n.code:
            mods = [str(c.code) for c in n.children if c.code]  # laterality, topographical modifier
            sites.append(str(n.code) + (f" ({', '.join(mods)})" if mods else ""))
        elif n.named(codes.DCM.AlgorithmName):
            alg_name = n.text or ""
        elif n.named(codes.DCM.AlgorithmVersion):
            alg_version = n.text or ""
        elif vt == "NUM" and n.named(codes.DCM.Probability):
            f["probability"] = n.number
        elif vt == "NUM":
            nums.append(f"{n.label}: {n.value}")
        elif vt == "CODE" and n.relationship == "CONTAINS":
            evals.append(Evaluation(n.label, str(n.code) if n.code else n.value, n.code))
        elif vt == "TEXT" and n.named(codes.DCM.Comment):
            comments.append(n.text or "")
        elif vt in ("SCOORD", "SCOORD3D") and "image" not in f and not f.get("region"):
            src = next((c.image for c in n.children if c.image), None)
            f["region"] = n.graphic_type if vt == "SCOORD" else f"SCOORD3D {n.value}"
            if src:
                f["image"] = src
        elif vt in ("IMAGE", "COMPOSITE") and n.image and "image" not in f:
            f["image"] = n.image
        elif n.named(codes.DCM.AlgorithmParameters):
            continue  # shown with --tree; the name and version identify the algorithm
        else:
            extra.append(f"{n.label or n.value_type or 'item'}: {n.value}")
    f.update(sites=tuple(sites), evaluations=tuple(evals), measurements=tuple(nums),
             comments=tuple(comments), extra=tuple(extra),
             algorithm=" ".join(x for x in (alg_name, alg_version) if x))
    return FindingLine(**f)


def _report_text(n: ContentNode) -> ReportText:
    value = n.text if n.value_type == "TEXT" else (str(n.code) if n.code else n.value)
    value = value or ""
    if n.value_type == "CODE":
        kind = TextKind.EVALUATION
    elif n.named(codes.DCM.Impression):
        kind = TextKind.IMPRESSION
    elif value.startswith("Limitation:"):
        kind, value = TextKind.LIMITATION, value[len("Limitation:"):].strip()
    elif value.startswith(("AI SAFETY FLAG", "CRITICAL")):
        kind = TextKind.SAFETY
    else:
        kind = TextKind.COMMENT
    return ReportText(kind, n.label, value)


_OBSERVER_FIELDS = {
    ("DCM", "121012"): "uid", ("DCM", "121013"): "name", ("DCM", "121014"): "manufacturer",
    ("DCM", "121015"): "model", ("DCM", "121016"): "serial_number", ("DCM", "121017"): "location",
    ("DCM", "121008"): "name", ("DCM", "121009"): "organization", ("DCM", "121010"): "role",
}
_DEVICE_ONLY = {"uid", "manufacturer", "model", "serial_number", "location"}


def _observers(root: ContentNode, used: set[str]) -> tuple[Observer, ...]:
    """TID 1001 observer context at the top level: each Observer Type starts an observer."""
    out: list[dict[str, str]] = []
    for n in root.children:
        if n.relationship != "HAS OBS CONTEXT" or n.name is None:
            continue
        if n.named(codes.DCM.ObserverType):
            out.append({"kind": str(n.code) if n.code else "Observer"})
            used.add(n.id)
            continue
        key = _OBSERVER_FIELDS.get((n.name.scheme, n.name.value))
        if key is None:
            continue
        if not out:  # no Observer Type item: infer it (TID 1002 default is a person)
            out.append({"kind": "Device" if key in _DEVICE_ONLY or n.name.value == "121013" else "Person"})
        out[-1].setdefault(key, n.text if n.text is not None else n.value)
        used.add(n.id)
    return tuple(Observer(**o) for o in out)


def _equipment(ds: Dataset) -> tuple[Equipment, ...]:
    out = []
    for e in ds.get("ContributingEquipmentSequence") or []:
        try:
            p = _concept_of(e, "PurposeOfReferenceCodeSequence")
            out.append(Equipment(purpose=str(p) if p else "", manufacturer=_safe_str(e, "Manufacturer"),
                                 model=_safe_str(e, "ManufacturerModelName"),
                                 software_versions=_safe_str(e, "SoftwareVersions"),
                                 description=_safe_str(e, "ContributionDescription"),
                                 institution=_safe_str(e, "InstitutionName"),
                                 date_time=_datetime(_safe_str(e, "ContributionDateTime"))))
        except Exception:  # noqa: BLE001
            continue
    return tuple(out)


def _verifiers(ds: Dataset) -> tuple[str, ...]:
    out = []
    for v in ds.get("VerifyingObserverSequence") or []:
        try:
            who = _pname(v.get("VerifyingObserverName"))
            org = _safe_str(v, "VerifyingOrganization")
            when = _datetime(_safe_str(v, "VerificationDateTime"))
            out.append(", ".join(x for x in (who, org, when) if x))
        except Exception:  # noqa: BLE001
            continue
    return tuple(out)


def _evidence(ds: Dataset) -> str:
    n_inst, series = 0, set()
    for kw in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(kw) or []:
            for s in study.get("ReferencedSeriesSequence") or []:
                series.add(_str(s.get("SeriesInstanceUID")))
                n_inst += len(s.get("ReferencedSOPSequence") or [])
    if not n_inst:
        return ""
    return f"{n_inst} instance{'s' if n_inst != 1 else ''} in {len(series)} series"


# ---------------------------------------------------------------------------
# text

_RULE = "=" * 78


def render_outline(node: ContentNode, indent: int = 0) -> list[str]:
    """The content tree as indented lines: ``1.4.2  CONTAINS NUM Probability: 0.9``.

    Multi-line TEXT values continue on indented lines.
    """
    pad = "  " * indent
    head = f"{pad}{node.id}  " + " ".join(x for x in (node.relationship, node.value_type) if x)
    label = node.label
    if node.value_type == "CONTAINER":
        line = f"{head} {label or '(unnamed container)'}" + (f" [{node.value}]" if node.value else "")
        lines = [line]
    else:
        value_lines = (node.value or "").splitlines() or [""]
        sep = ": " if label and value_lines[0] else ""
        lines = [f"{head} {label}{sep}{value_lines[0]}".rstrip()]
        cont = " " * (len(head) + 1 + len(label) + len(sep))
        lines += [f"{cont}{v}" for v in value_lines[1:]]
    for c in node.children:
        lines += render_outline(c, indent + 1)
    return lines


def _header_rows(r: Report) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("file", r.source)]
    patient = " · ".join(x for x in (
        r.patient_name or "(no name)", f"ID {r.patient_id}" if r.patient_id else "",
        f"born {r.patient_birth_date}" if r.patient_birth_date else "",
        f"sex {r.patient_sex}" if r.patient_sex else "") if x)
    rows.append(("patient", patient))
    study = " · ".join(x for x in (
        " ".join(y for y in (r.study_date, r.study_time) if y),
        f"accession {r.accession_number}" if r.accession_number else "",
        f"“{r.study_description}”" if r.study_description else "") if x)
    rows.append(("study", study or "(no date)"))
    rows.append(("study UID", r.study_instance_uid or "(none)"))
    doc = f"{r.title}" + (f" ({r.title_code.code})" if r.title_code else "")
    rows.append(("document", f"{doc}, {r.sop_class_name}" + (f", {r.template}" if r.template else "")))
    series = " ".join(x for x in (
        f"series {r.series_number}" if r.series_number else "",
        f"“{r.series_description}”" if r.series_description else "",
        f"instance {r.instance_number}" if r.instance_number else "") if x)
    if series:
        rows.append(("series", series))
    rows.append(("SOP instance", r.sop_instance_uid or "(none)"))
    if r.content_date_time:
        rows.append(("content date", r.content_date_time))
    flags = " · ".join(f"{k} {v}" for k, v in (("completion", r.completion_flag),
                                               ("verification", r.verification_flag),
                                               ("preliminary", r.preliminary_flag)) if v)
    rows.append(("flags", flags or "(none)"))
    for v in r.verified_by:
        rows.append(("verified by", v))
    if r.manufacturer or r.institution:
        rows.append(("written by", " at ".join(x for x in (r.manufacturer, r.institution) if x)))
    for o in r.observers:
        rows.append(("observer", o.summary))
    for p in r.procedures:
        rows.append(("procedure", p))
    if r.language:
        rows.append(("language", r.language))
    if r.algorithm:
        rows.append(("algorithm", r.algorithm))
    for w in r.warnings[:5]:
        rows.append(("read warning", _clip(w, 160)))
    if len(r.warnings) > 5:
        rows.append(("read warning", f"… and {len(r.warnings) - 5} more (--json lists them all)"))
    if r.evidence or r.image_library:
        rows.append(("evidence", ", ".join(x for x in (
            r.evidence, f"{r.image_library} in the image library" if r.image_library else "") if x)))
    return rows


def _columns(f: FindingLine) -> list[str]:
    finding = f.finding or f.category or "(no finding)"
    if f.sites:
        finding += " @ " + ", ".join(f.sites)
    p = "" if f.probability is None else f"p {f.probability:.2f}"
    where = f.where
    return [f"{f.index}.", f.tracking_id or "-", finding, f.evaluation_text or "-", p,
            f"[on {where}]" if where else "[no image]"]


def render_text(report: Report, *, tree: bool = False) -> str:
    """The report as plain text (header, findings, texts, equipment; the content outline
    for non-TID-1500 documents, and for TID 1500 too with ``tree``)."""
    r = report
    out = [_RULE]
    if r.banner:
        out.append(f"*** {r.banner} — VerificationFlag {r.verification_flag or '(none)'}, "
                   f"PreliminaryFlag {r.preliminary_flag or '(none)'}: not a signed report ***")
    out.append(r.title)
    out.append(_RULE)
    rows = _header_rows(r)
    w = max(len(k) for k, _ in rows)
    out += [f"{k + ':':<{w + 1}} {v}" for k, v in rows]
    if r.is_tid1500:
        out.append("")
        out.append(f"Findings ({len(r.findings)} measurement group{'s' if len(r.findings) != 1 else ''})")
        cols = [_columns(f) for f in r.findings]
        widths = [max((len(c[i]) for c in cols), default=0) for i in range(6)]
        for f, c in zip(r.findings, cols):
            line = "  " + "  ".join(v.ljust(widths[i]) if i < 5 else v for i, v in enumerate(c))
            extras = list(f.measurements) + [f"“{x}”" for x in f.comments]
            if f.extra:
                extras.append(f"+{len(f.extra)} more item(s) (--tree)")
            out.append((line + ("  " + "  ".join(extras) if extras else "")).rstrip())
        if not r.findings:
            out.append("  (no measurement group)")
        sections = [(TextKind.IMPRESSION, "Impression"), (TextKind.SAFETY, "Safety flags"),
                    (TextKind.EVALUATION, "Qualitative evaluations"), (TextKind.LIMITATION, "Limitations"),
                    (TextKind.COMMENT, "Notes")]
        for kind, heading in sections:
            items = [t for t in r.texts if t.kind == kind]
            if items:
                out += ["", heading] + [f"  - {_indent_more(t.value, 4)}" for t in items]
        if r.other:
            out += ["", "Other content"]
            for n in r.other:
                out += render_outline(n, 1)
    if r.equipment:
        out += ["", "Contributing equipment"] + [f"  - {e.summary}" for e in r.equipment]
    if tree or not r.is_tid1500:
        out += ["", "Content"] + render_outline(r.content, 1)
    return "\n".join(out) + "\n"


def _indent_more(text: str, n: int) -> str:
    return ("\n" + " " * n).join(text.splitlines() or [""])


# ---------------------------------------------------------------------------
# HTML

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111}
section.sr{border-top:3px solid #444;margin-bottom:2.5em;padding-top:.5em}
h1{font-size:1.35em;margin:.3em 0} h2{font-size:1.1em;margin:1.2em 0 .4em}
.banner{background:#b71c1c;color:#fff;font-weight:bold;padding:.5em .8em;font-size:1.1em}
table{border-collapse:collapse} td,th{border:1px solid #bbb;padding:.25em .5em;vertical-align:top;text-align:left}
table.head th{background:#f2f2f2;white-space:nowrap} table.findings th{background:#e8eef7}
td.num{text-align:right;font-variant-numeric:tabular-nums} code,.uid{font-family:ui-monospace,monospace;font-size:.92em}
ul.tree{list-style:none;padding-left:1.2em;margin:0} ul.tree li{margin:.1em 0}
.rel{color:#666;font-size:.85em} .vt{color:#1a5;font-size:.85em} .id{color:#999;font-size:.85em}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_html(reports: Union[Report, Sequence[Report]], *, tree: bool = False) -> str:
    """A self-contained HTML page (inline CSS, no script, no external asset) of one or
    more reports; every value from the file is HTML-escaped."""
    if isinstance(reports, Report):
        reports = [reports]
    title = "cmr-ai report show: " + ", ".join(Path(r.source).name for r in reports)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"]
    for r in reports:
        parts.append(_html_report(r, tree=tree))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_report(r: Report, *, tree: bool) -> str:
    p = ['<section class="sr">']
    if r.banner:
        p.append(f'<div class="banner">{_e(r.banner)} — VerificationFlag {_e(r.verification_flag or "(none)")}, '
                 f'PreliminaryFlag {_e(r.preliminary_flag or "(none)")}: not a signed report</div>')
    p.append(f"<h1>{_e(r.title)}</h1>")
    p.append('<table class="head">' + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>"
                                               for k, v in _header_rows(r)) + "</table>")
    if r.is_tid1500:
        p.append(f"<h2>Findings ({len(r.findings)})</h2>")
        p.append('<table class="findings"><thead><tr><th>#</th><th>Tracking ID</th><th>Finding</th>'
                 "<th>Finding site</th><th>Evaluation</th><th>Probability</th><th>Image</th>"
                 "<th>Comment</th></tr></thead><tbody>")
        for f in r.findings:
            prob = "" if f.probability is None else f"{f.probability:.2f}"
            note = "<br>".join(_e(x) for x in (*f.measurements, *f.comments, *f.extra))
            img = (f'<span class="uid" title="{_e(f.image.sop_instance_uid)}">{_e(f.where)}</span>'
                   if f.image else _e(f.where))
            p.append(f"<tr><td>{f.index}</td><td><code>{_e(f.tracking_id or '')}</code></td>"
                     f"<td>{_e(f.finding or f.category or '')}</td><td>{_e(', '.join(f.sites))}</td>"
                     f"<td>{_e(f.evaluation_text)}</td><td class=\"num\">{prob}</td><td>{img}</td>"
                     f"<td>{note}</td></tr>")
        p.append("</tbody></table>")
        for kind, heading in ((TextKind.IMPRESSION, "Impression"), (TextKind.SAFETY, "Safety flags"),
                              (TextKind.EVALUATION, "Qualitative evaluations"),
                              (TextKind.LIMITATION, "Limitations"), (TextKind.COMMENT, "Notes")):
            items = [t for t in r.texts if t.kind == kind]
            if items:
                p.append(f"<h2>{heading}</h2><ul>" + "".join(f"<li>{_e(t.value)}</li>" for t in items) + "</ul>")
        if r.other:
            p.append("<h2>Other content</h2>" + _html_tree(r.other))
    if r.equipment:
        p.append("<h2>Contributing equipment</h2><ul>" +
                 "".join(f"<li>{_e(e.summary)}</li>" for e in r.equipment) + "</ul>")
    if tree or not r.is_tid1500:
        p.append("<h2>Content</h2>" + _html_tree([r.content]))
    p.append("</section>")
    return "\n".join(p)


def _html_tree(nodes: Iterable[ContentNode]) -> str:
    out = ['<ul class="tree">']
    for n in nodes:
        value = _e(n.value).replace("\n", "<br>")
        out.append(f'<li><span class="id">{_e(n.id)}</span> <span class="rel">{_e(n.relationship)}</span> '
                   f'<span class="vt">{_e(n.value_type)}</span> <b>{_e(n.label)}</b>'
                   + (f": {value}" if value else "")
                   + (_html_tree(n.children) if n.children else "") + "</li>")
    out.append("</ul>")
    return "".join(out)


# ---------------------------------------------------------------------------
# CLI: cmr-ai report show

def command(args: argparse.Namespace) -> int:
    """Run ``cmr-ai report show``: 0 when every file was shown, 2 when any could not be
    (each such file gets one line on stderr naming it)."""
    reports: list[Report] = []
    failed = 0
    for f in args.files:
        try:
            reports.append(read_report(f))
        except ReportError as e:
            print(f"cmr-ai report show: {e}", file=sys.stderr)
            failed += 1
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2, ensure_ascii=False))
    else:
        for i, r in enumerate(reports):
            sys.stdout.write(("\n" if i else "") + render_text(r, tree=args.tree))
    if args.html and reports:
        try:
            Path(args.html).write_text(render_html(reports, tree=args.tree), encoding="utf-8")
        except OSError as e:
            print(f"cmr-ai report show: {args.html}: cannot write: {e.strerror}", file=sys.stderr)
            return 2
        print(f"HTML: {args.html} ({len(reports)} report{'s' if len(reports) != 1 else ''})",
              file=sys.stderr if args.json else sys.stdout)
    return 2 if failed else 0


# ---------------------------------------------------------------------------
# small helpers

def _str(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def _safe_str(ds: Dataset, kw: str) -> str:
    try:
        return _str(ds.get(kw))
    except Exception:  # noqa: BLE001 — an odd value in a foreign file: leave it out
        return ""


def _seq_values(v: Any) -> list:
    if v is None or v == "":
        return []
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return list(v)
    return [v]


def _ints(v: Any) -> tuple[int, ...]:
    out = []
    for x in _seq_values(v):
        try:
            out.append(int(x))
        except (TypeError, ValueError):
            continue
    return tuple(out)


def _uid_name(uid: str) -> str:
    if not uid:
        return "(unknown SOP class)"
    try:
        return UID(uid).name or uid
    except Exception:  # noqa: BLE001
        return uid


def _short_uid(uid: str, keep: int = 12) -> str:
    return uid if len(uid) <= keep + 4 else "…" + uid[-keep:]


def _clip(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _date(v: str) -> str:
    """``20240102`` → ``2024-01-02``; anything else as written."""
    v = v.strip()
    if len(v) == 8 and v.isdigit():
        return f"{v[:4]}-{v[4:6]}-{v[6:]}"
    return v


def _time(v: str) -> str:
    """``101500.123`` → ``10:15:00``; ``1015`` → ``10:15``; anything else as written."""
    v = v.strip()
    main = v.split(".")[0].replace(":", "")
    if main.isdigit() and len(main) in (2, 4, 6):
        return ":".join(main[i:i + 2] for i in range(0, len(main), 2))
    return v


def _datetime(v: str) -> str:
    """``20240102101500.5+0100`` → ``2024-01-02 10:15:00 +0100``."""
    v = v.strip()
    tz = ""
    for sign in ("+", "-"):
        if sign in v[8:]:
            i = v.index(sign, 8)
            v, tz = v[:i], v[i:]
            break
    if len(v) >= 8 and v[:8].isdigit():
        out = _date(v[:8]) + (" " + _time(v[8:]) if v[8:] else "")
        return out + (f" {tz}" if tz else "")
    return v + tz


def _pname(v: Any) -> str:
    """``Doe^Jane^M^Dr`` → ``Doe, Jane M, Dr``; other forms as written."""
    if v is None or str(v) == "":
        return ""
    try:
        pn = v if hasattr(v, "family_name") else pydicom.valuerep.PersonName(str(v))
        family, given, middle = pn.family_name, pn.given_name, pn.middle_name
        prefix, suffix = pn.name_prefix, pn.name_suffix
    except Exception:  # noqa: BLE001
        return str(v)
    if not (family or given):
        return str(v)
    rest = " ".join(x for x in (given, middle) if x)
    out = ", ".join(x for x in (family, rest) if x)
    return " ".join(x for x in (prefix, out, suffix) if x)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
