"""Read a cardiac MR study's headers into per-frame records, grouped by series.

Only headers are read here (``stop_before_pixels=True``); pixels are decoded later,
for the few frames :mod:`plugin.cardiac.prepare` actually renders.

Classic objects (MR Image Storage, one file per image) give one :class:`Frame` per
file from the Image Plane module (PS3.3 C.7.6.2: ImageOrientationPatient,
ImagePositionPatient, PixelSpacing) and TriggerTime / InstanceNumber.

Multi-frame objects (Enhanced MR and Legacy Converted Enhanced MR Image Storage) are
expanded into one :class:`Frame` per frame from their functional groups (PS3.3
C.7.6.16), per-frame first, then shared: Plane Position (Patient), Plane Orientation
(Patient), Pixel Measures, Cardiac Synchronization (NominalCardiacTriggerDelayTime)
and Frame Content (StackID, InStackPositionNumber, TemporalPositionIndex). Legacy
converted objects keep classic attributes such as TriggerTime in the Unassigned
Per-Frame / Shared Converted Attributes sequences; those are read as a fallback.

Everything else (SR, presentation states, key object selections, secondary
captures, CT, spectroscopy, files that are not DICOM) is skipped and logged with
the tag that decided it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    UID,
)

log = logging.getLogger(__name__)

#: SOP classes analysed: acquired MR images, classic and multi-frame.
MR_IMAGE_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage})
MULTIFRAME_CLASSES = frozenset({EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage})


@dataclass(frozen=True)
class Frame:
    """One 2-D image: a classic file, or one frame of a multi-frame object.

    Geometry is in the patient coordinate system (LPS, millimetres), as DICOM
    defines it. ``orientation`` is (row cosines, column cosines); ``position`` is the
    centre of the top-left pixel; ``pixel_spacing`` is (row spacing, column spacing).
    """

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    frame_number: Optional[int]  # 1-based for multi-frame objects, None for classic files
    orientation: Optional[tuple[float, float, float, float, float, float]]
    position: Optional[tuple[float, float, float]]
    pixel_spacing: Optional[tuple[float, float]]
    rows: int
    columns: int
    trigger_time: Optional[float]  # ms after the R wave
    instance_number: Optional[int]
    stack_id: Optional[str] = None
    in_stack_position: Optional[int] = None
    temporal_position_index: Optional[int] = None
    inversion_time: Optional[float] = None  # ms
    frame_type: tuple[str, ...] = ()  # FrameType (multi-frame) or ImageType (classic)

    @property
    def normal(self) -> Optional[np.ndarray]:
        """Unit plane normal, row × column cosines (None without orientation)."""
        if self.orientation is None:
            return None
        r = np.asarray(self.orientation[:3], float)
        c = np.asarray(self.orientation[3:], float)
        n = np.cross(r, c)
        norm = np.linalg.norm(n)
        return n / norm if norm > 1e-6 else None

    @property
    def time_key(self) -> tuple:
        """Sort key for cine order: trigger time, then temporal index, then instance/frame number."""
        big = float("inf")
        return (
            self.trigger_time if self.trigger_time is not None else big,
            self.temporal_position_index if self.temporal_position_index is not None else big,
            self.instance_number if self.instance_number is not None else big,
            self.frame_number or 0,
        )


@dataclass
class SeriesInfo:
    """The analysable frames of one series, with the text that describes it."""

    uid: str
    description: str = ""
    number: Optional[int] = None
    image_type: tuple[str, ...] = ()  # union of ImageType / FrameType values, in first-seen order
    sequence_name: str = ""  # SequenceName (classic) or PulseSequenceName (enhanced)
    protocol_name: str = ""
    modality: str = ""
    frames: list[Frame] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Short human name for logs and messages: ``series 7 'cine_4ch'``."""
        num = f"series {self.number}" if self.number is not None else f"series {self.uid}"
        return f"{num} {self.description!r}" if self.description else num

    @property
    def text(self) -> str:
        """All describing text, for keyword evidence (descriptions, protocol, sequence)."""
        return " ".join(t for t in (self.description, self.protocol_name, self.sequence_name) if t)


@dataclass(frozen=True)
class SkippedObject:
    path: str
    reason: str


@dataclass
class Study:
    """One study's analysable series (by SeriesInstanceUID, ordered by SeriesNumber)."""

    study_instance_uid: str = ""
    series: dict[str, SeriesInfo] = field(default_factory=dict)
    skipped: list[SkippedObject] = field(default_factory=list)

    def ordered(self) -> list[SeriesInfo]:
        return sorted(self.series.values(), key=lambda s: (s.number is None, s.number or 0, s.uid))


# ---------------------------------------------------------------------------- helpers


def _floats(value: Any, n: int) -> Optional[tuple[float, ...]]:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in (value if isinstance(value, (list, tuple, MultiValue))
                                        else [value]))
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _float(value: Any) -> Optional[float]:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (list, tuple, MultiValue)):
            value = value[0] if len(value) else None
            if value is None:
                return None
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> Optional[int]:
    f = _float(value)
    return int(f) if f is not None else None


def _str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _strings(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, (list, tuple, MultiValue)):
        return tuple(str(v).strip().upper() for v in value if str(v).strip())
    return tuple(s.strip().upper() for s in str(value).split("\\") if s.strip())


def functional_group(per_frame: Optional[Dataset], shared: Optional[Dataset], keyword: str) -> Optional[Dataset]:
    """First item of functional group ``keyword``: per-frame first, then shared (PS3.3 C.7.6.16)."""
    for group in (per_frame, shared):
        if group is not None:
            seq = group.get(keyword)
            if seq:
                return seq[0]
    return None


def _fg_value(per_frame, shared, sequence: str, keyword: str) -> Any:
    item = functional_group(per_frame, shared, sequence)
    return item.get(keyword) if item is not None else None


def _merge_unique(a: tuple[str, ...], b: Iterable[str]) -> tuple[str, ...]:
    out = list(a)
    for v in b:
        if v not in out:
            out.append(v)
    return tuple(out)


# ---------------------------------------------------------------------------- frames


def _classic_frames(ds: Dataset, path: str, series_uid: str) -> list[Frame]:
    image_type = _strings(ds.get("ImageType"))
    return [Frame(
        path=path,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=series_uid,
        frame_number=None,
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        trigger_time=_float(ds.get("TriggerTime")),
        instance_number=_int(ds.get("InstanceNumber")),
        temporal_position_index=_int(ds.get("TemporalPositionIdentifier")),
        inversion_time=_float(ds.get("InversionTime")),
        frame_type=image_type,
    )]


def _multiframe_frames(ds: Dataset, path: str, series_uid: str) -> list[Frame]:
    n = _int(ds.get("NumberOfFrames")) or 1
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
    instance_number = _int(ds.get("InstanceNumber"))
    top_type = _strings(ds.get("ImageType"))
    frames = []
    for i in range(n):
        pf = per_frame_seq[i] if i < len(per_frame_seq) else None
        content = functional_group(pf, None, "FrameContentSequence") or Dataset()
        trigger = _float(_fg_value(pf, shared, "CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"))
        if trigger is None:  # legacy converted: classic TriggerTime kept as an unassigned attribute
            for keyword in ("UnassignedPerFrameConvertedAttributesSequence", "UnassignedSharedConvertedAttributesSequence"):
                trigger = _float(_fg_value(pf, shared, keyword, "TriggerTime"))
                if trigger is not None:
                    break
        if trigger is None:
            trigger = _float(ds.get("TriggerTime"))
        inversion = _float(_fg_value(pf, shared, "MRModifierSequence", "InversionTimes"))
        if inversion is None:
            inversion = _float(_fg_value(pf, shared, "UnassignedPerFrameConvertedAttributesSequence", "InversionTime"))
        frame_type = _strings(_fg_value(pf, shared, "MRImageFrameTypeSequence", "FrameType")) or top_type
        frames.append(Frame(
            path=path,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=series_uid,
            frame_number=i + 1,
            orientation=_floats(_fg_value(pf, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),  # type: ignore[arg-type]
            position=_floats(_fg_value(pf, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),  # type: ignore[arg-type]
            pixel_spacing=_floats(_fg_value(pf, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),  # type: ignore[arg-type]
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            trigger_time=trigger,
            instance_number=instance_number,
            stack_id=_str(content.get("StackID")) or None,
            in_stack_position=_int(content.get("InStackPositionNumber")),
            temporal_position_index=_int(content.get("TemporalPositionIndex")),
            inversion_time=inversion,
            frame_type=frame_type,
        ))
    return frames


def _skip_reason(ds: Dataset) -> Optional[str]:
    """Why an object is not analysed, naming the tag; None when it is an MR image."""
    sop_class = ds.get("SOPClassUID")
    if not sop_class:
        return "(0008,0016) SOP Class UID missing"
    sop_class = UID(str(sop_class))
    if sop_class not in MR_IMAGE_CLASSES:
        return f"(0008,0016) SOP Class UID is {sop_class.name} ({sop_class}): not an acquired MR image"
    if not ds.get("SeriesInstanceUID"):
        return "(0020,000E) Series Instance UID missing"
    if not ds.get("SOPInstanceUID"):
        return "(0008,0018) SOP Instance UID missing"
    if not ds.get("Rows") or not ds.get("Columns"):
        return "(0028,0010) Rows / (0028,0011) Columns missing: no pixel data"
    photometric = _str(ds.get("PhotometricInterpretation")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"(0028,0004) Photometric Interpretation is {photometric or 'missing'!r}: only grayscale is analysed"
    return None


# ---------------------------------------------------------------------------- public


def load_study(paths: Sequence[str | os.PathLike]) -> Study:
    """Read the headers of one study's files into series of per-frame records.

    Parameters
    ----------
    paths
        The study's files as stored by the node, any order, any mix of classic and
        multi-frame objects and transfer syntaxes.

    Returns
    -------
    Study
        MR image series by SeriesInstanceUID; ``skipped`` lists every other file
        with the reason (each is also logged at INFO).
    """
    study = Study()
    for p in paths:
        path = os.fspath(p)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as e:
            study.skipped.append(SkippedObject(path, f"not readable as DICOM ({type(e).__name__}: {e})"))
            log.info("skipped %s: not readable as DICOM (%s)", path, e)
            continue
        reason = _skip_reason(ds)
        if reason is not None:
            study.skipped.append(SkippedObject(path, reason))
            log.info("skipped %s: %s", path, reason)
            continue
        series_uid = str(ds.SeriesInstanceUID)
        if not study.study_instance_uid:
            study.study_instance_uid = _str(ds.get("StudyInstanceUID"))
        multiframe = UID(str(ds.SOPClassUID)) in MULTIFRAME_CLASSES or (_int(ds.get("NumberOfFrames")) or 1) > 1
        frames = _multiframe_frames(ds, path, series_uid) if multiframe else _classic_frames(ds, path, series_uid)
        info = study.series.get(series_uid)
        if info is None:
            info = study.series[series_uid] = SeriesInfo(
                uid=series_uid,
                description=_str(ds.get("SeriesDescription")),
                number=_int(ds.get("SeriesNumber")),
                sequence_name=_str(ds.get("SequenceName")) or _str(ds.get("PulseSequenceName")),
                protocol_name=_str(ds.get("ProtocolName")),
                modality=_str(ds.get("Modality")),
            )
        info.image_type = _merge_unique(info.image_type, _strings(ds.get("ImageType")))
        for f in frames:
            info.image_type = _merge_unique(info.image_type, f.frame_type)
        info.frames.extend(frames)
    study.series = {s.uid: s for s in study.ordered()}
    for s in study.series.values():
        s.frames.sort(key=lambda f: (f.time_key, f.path))
    n_frames = sum(len(s.frames) for s in study.series.values())
    log.info("study %s: %d series, %d frames, %d objects skipped", study.study_instance_uid or "?",
             len(study.series), n_frames, len(study.skipped))
    return study
