"""Grayscale Softcopy Presentation State of an AI draft, on the original images.

PS3.3 A.33.1 (GSPS IOD), built with highdicom's ``GrayscaleSoftcopyPresentationState``
for PACS that render presentation states (OHIF does not: VIEWERS.md — so the same
draft is always also in the SR and the SC). It references the stored images the model
was shown (each bundle image's SourceRef: the instance, and the frame of a multi-frame
Enhanced MR object; the Presentation State Relationship lists only those frames) and
draws on each of them:

* layer ``AI_DRAFT_BANNER`` (red): the banner ``AI DRAFT - UNVERIFIED, not for
  diagnosis - cmr-ai`` and the lines of the SC's strip (``CRITICAL - urgent review: …``
  naming the critical answers, the safety pass's ``AI SAFETY FLAG: …``; see
  :func:`plugin.reports.sc.flag_lines`), top left, on *every* referenced image;
* layer ``AI_DRAFT`` (yellow), or ``AI_DRAFT_CRIT`` (orange) for critical answers: per
  finding judged on that image, its answer line (``AI DRAFT - LV size: normal
  (p 0.42)``, with ``- CRITICAL, review urgently`` where the template says so) at the
  bottom left, and a rectangle (closed 5-point POLYLINE, nested insets as the SR's
  image regions). Text and rectangle share a Graphic Group and carry the SR
  measurement group's Tracking Identifier/UID, so a PACS can relate the two objects.

Texts use ASCII dashes (:func:`display_text`). Layers recommend their colour (CIELab)
and white on grayscale displays. Text positions are DISPLAY units (fractions of the
displayed area, readable whatever the matrix), rectangles PIXEL units; the Displayed
Area is the whole matrix of each image, with its pixel aspect ratio.

Windowing is copied from each referenced image (frame): Window Center/Width of a
single-frame image, else the frame's Frame VOI LUT (per-frame functional group, else
shared), else the Smallest/Largest Image Pixel Value, else the stored bit range; the
rescale (Modality LUT) likewise. When the referenced images disagree on the rescale,
the PR uses the identity Modality LUT and expresses each window in stored values (one
Modality LUT applies to every referenced image). Deterministic UIDs as in
:mod:`plugin.reports.sr`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Optional, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.color import CIELabColor
from highdicom.pr import (AnnotationUnitsValues, GraphicAnnotation, GraphicGroup,
                          GraphicLayer, GraphicObject, GraphicTypeValues,
                          GrayscaleSoftcopyPresentationState, SoftcopyVOILUTTransformation,
                          TextJustificationValues, TextObject)
from pydicom.multival import MultiValue

from plugin.reports.sc import flag_lines
from plugin.reports.sr import (CHARSET, Answer, _equipment, _image_for, answers, output_uid,
                               source_datasets)
from plugin.reports.template import Template
from worker.bundle import BundleImage, InferenceResult

try:  # what highdicom itself uses to decide whether a frame number may be given
    from highdicom._standard_utils import is_multiframe_image as _multiframe_iod
except ImportError:  # pragma: no cover — another highdicom layout
    def _multiframe_iod(ds: pydicom.Dataset) -> bool:
        return "NumberOfFrames" in ds

if TYPE_CHECKING:  # pragma: no cover
    from worker.safety import SafetyReport

__all__ = ["CONTENT_LABEL", "LAYER_BANNER", "LAYER_CRITICAL", "LAYER_FINDINGS", "PR_BANNER",
           "PR_SERIES_DESCRIPTION", "build_presentation_state", "display_text"]

log = logging.getLogger(__name__)

PR_SERIES_DESCRIPTION = "AI DRAFT cmr-ai PR"
CONTENT_LABEL = "AI_DRAFT"
LAYER_BANNER = "AI_DRAFT_BANNER"
LAYER_FINDINGS = "AI_DRAFT"
LAYER_CRITICAL = "AI_DRAFT_CRIT"

# text layout in DISPLAY units (fractions of the displayed area)
_LEFT, _RIGHT, _TOP, _BOTTOM = 0.01, 0.99, 0.01, 0.99
_LINE = 0.05


def PR_BANNER(algorithm_name: str = "cmr-ai") -> str:  # noqa: N802 — reads like a constant
    return f"AI DRAFT - UNVERIFIED, not for diagnosis - {algorithm_name}"


def display_text(text: str) -> str:
    """``text`` as the PR shows it: dashes as ASCII "-" (what the SC's font does too).

    Legal in UTF-8 (ISO_IR 192), but presentation-state renderers often draw with
    fonts and checkers that do not expect non-Latin-1 punctuation: dcmtk's ``dcmpschk``
    rejects an em dash in (0070,0006) Unformatted Text Value; other characters (a
    patient's name, quoted model text) are left as they are."""
    return text.replace("—", "-").replace("–", "-")


@dataclass
class _Ref:
    """One referenced image (frame) and what is drawn on it."""

    ds: pydicom.Dataset          # the stored source (Type 2 attributes completed)
    frame: Optional[int]         # 1-based frame of a multi-frame object, else None
    keys: list[str] = field(default_factory=list)        # bundle images rendered from it
    findings: list[Answer] = field(default_factory=list)  # answers judged on it

    @property
    def uid(self) -> str:
        return str(self.ds.SOPInstanceUID)

    @property
    def rows(self) -> int:
        return int(self.ds.Rows)

    @property
    def columns(self) -> int:
        return int(self.ds.Columns)


def _frame(image: BundleImage, ds: pydicom.Dataset) -> Optional[int]:
    """The frame ``image`` was rendered from (None for a single-frame image).

    Raises
    ------
    ValueError
        A multi-frame source of several frames without a frame number, or a frame
        number beyond (0028,0008) Number of Frames.
    """
    if not _multiframe_iod(ds):
        return None
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    frame = image.source.frame_number or (1 if n == 1 else None)
    if frame is None:
        raise ValueError(f"bundle image {image.key!r}: source {ds.SOPInstanceUID} has {n} frames "
                         "but the SourceRef names no frame_number")
    if not 1 <= frame <= n:
        raise ValueError(f"bundle image {image.key!r}: frame {frame} outside (0028,0008) Number "
                         f"of Frames {n} of {ds.SOPInstanceUID}")
    return frame


def _first(value) -> Optional[float]:
    """First value of a possibly multi-valued DS, as float (None when empty)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return float(value[0]) if len(value) else None
    return float(value)


def _functional(ds: pydicom.Dataset, frame: Optional[int], seq: str) -> Optional[pydicom.Dataset]:
    """The ``seq`` functional group item of ``frame``: per-frame first, then shared."""
    if frame is None:
        return None
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and len(per) >= frame and seq in per[frame - 1]:
        return per[frame - 1][seq][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and seq in shared[0]:
        return shared[0][seq][0]
    return None


def _rescale(ref: _Ref) -> tuple[float, float, str]:
    """(slope, intercept, type) of the image (frame); identity when it has none."""
    item = _functional(ref.ds, ref.frame, "PixelValueTransformationSequence") or ref.ds
    slope, intercept = _first(item.get("RescaleSlope")), _first(item.get("RescaleIntercept"))
    if slope is None or intercept is None or slope == 0:
        return 1.0, 0.0, "US"
    return slope, intercept, str(item.get("RescaleType") or "US")


def _window(ref: _Ref) -> tuple[float, float, Optional[str], Optional[str]]:
    """(center, width, explanation, VOI LUT function) the image (frame) is displayed with,
    in modality values (after the rescale)."""
    item = _functional(ref.ds, ref.frame, "FrameVOILUTSequence") or ref.ds
    center, width = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        exp = item.get("WindowCenterWidthExplanation")
        if isinstance(exp, (list, MultiValue)):
            exp = exp[0] if len(exp) else None
        func = item.get("VOILUTFunction")
        return center, width, (str(exp)[:64] or None) if exp else None, \
            (str(func) if func in ("LINEAR", "LINEAR_EXACT", "SIGMOID") else None)
    slope, intercept, _ = _rescale(ref)
    lo, hi = ref.ds.get("SmallestImagePixelValue"), ref.ds.get("LargestImagePixelValue")
    if isinstance(lo, int) and isinstance(hi, int) and hi > lo:
        how, exp = "from the smallest/largest image pixel value", "MIN_MAX"
    else:
        bits = int(ref.ds.get("BitsStored") or 16)
        signed = int(ref.ds.get("PixelRepresentation") or 0) == 1
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        how, exp = "over the stored bit range", "BIT_RANGE"
    log.info("PR: %s%s has no window; windowing %s", ref.uid,
             f" frame {ref.frame}" if ref.frame else "", how)
    lo_m, hi_m = sorted((lo * slope + intercept, hi * slope + intercept))
    return (lo_m + hi_m) / 2.0, max(hi_m - lo_m, 1.0), exp, None


def _voi_and_modality(refs: Sequence[_Ref]) -> tuple[list[SoftcopyVOILUTTransformation],
                                                     hd.ModalityLUTTransformation]:
    """Softcopy VOI LUT items (grouped by window) and the one Modality LUT of the PR."""
    rescales = {_rescale(r) for r in refs}
    common = len(rescales) == 1
    slope, intercept, rtype = next(iter(rescales)) if common else (1.0, 0.0, "US")
    if not common:
        log.info("PR: referenced images disagree on the rescale %s; identity Modality LUT, "
                 "windows in stored values", sorted(rescales))
    groups: dict[tuple, list[_Ref]] = {}
    for r in refs:
        center, width, exp, func = _window(r)
        if not common:  # express the window in stored values: v = (m - b) / s
            s, b, _ = _rescale(r)
            center, width = (center - b) / s, width / abs(s)
        key = (round(center, 4), round(max(width, 1.0), 4), exp, func)
        groups.setdefault(key, []).append(r)
    voi = []
    for (center, width, exp, func), members in groups.items():
        single = [r.ds for r in members if r.frame is None]
        multi: dict[str, list[_Ref]] = {}
        for r in members:
            if r.frame is not None:
                multi.setdefault(r.uid, []).append(r)
        # one-item lists: highdicom 0.28.2 turns a plain str explanation into its characters
        kw = dict(window_center=[center], window_width=[width],
                  window_explanation=[exp] if exp else None, voi_lut_function=func)
        if len(groups) == 1 and not multi:  # one window for every (single-frame) image
            voi.append(SoftcopyVOILUTTransformation(**kw))
            continue
        if single:
            voi.append(SoftcopyVOILUTTransformation(
                **kw, referenced_images=hd.ReferencedImageSequence(single)))
        for rs in multi.values():
            voi.append(SoftcopyVOILUTTransformation(
                **kw, referenced_images=hd.ReferencedImageSequence(
                    [rs[0].ds], referenced_frame_number=sorted(r.frame for r in rs))))
    modality = hd.ModalityLUTTransformation(rescale_intercept=intercept, rescale_slope=slope,
                                            rescale_type=rtype)
    return voi, modality


def _aspect(ref: _Ref) -> tuple[int, int]:
    """Presentation Pixel Aspect Ratio (vertical : horizontal pixel size, integers) from
    (0028,0030) Pixel Spacing of the image or the frame's Pixel Measures; 1:1 without."""
    item = _functional(ref.ds, ref.frame, "PixelMeasuresSequence") or ref.ds
    spacing = item.get("PixelSpacing")
    try:
        ratio = Fraction(float(spacing[0]) / float(spacing[1])).limit_denominator(1000)
    except (TypeError, IndexError, ValueError, ZeroDivisionError):
        return 1, 1
    return (ratio.numerator, ratio.denominator) if ratio > 0 else (1, 1)


def _rectangle(ref: _Ref, nth: int) -> np.ndarray:
    """Closed 5-point rectangle inset from the border (as :func:`plugin.reports.sr._region`)."""
    inset = min(0.10 + 0.03 * nth, 0.40)
    x0, x1 = ref.columns * inset, ref.columns * (1 - inset)
    y0, y1 = ref.rows * inset, ref.rows * (1 - inset)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def _stand_in(ds: pydicom.Dataset, rows: int, columns: int) -> pydicom.Dataset:
    """A copy of ``ds``'s elements with another Rows/Columns: highdicom refuses referenced
    images of different matrices; the Displayed Area is written per matrix afterwards."""
    copy = pydicom.Dataset()
    for elem in ds:
        copy.add(elem)
    copy.add_new(0x00280010, "US", rows)
    copy.add_new(0x00280011, "US", columns)
    return copy


def _image_items(refs: Sequence[_Ref]) -> list[pydicom.Dataset]:
    """Referenced Image Sequence items for ``refs``: one per instance, frames listed."""
    by_uid: dict[str, list[_Ref]] = {}
    for r in refs:
        by_uid.setdefault(r.uid, []).append(r)
    items = []
    for rs in by_uid.values():
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = rs[0].ds.SOPClassUID
        item.ReferencedSOPInstanceUID = rs[0].uid
        frames = sorted(r.frame for r in rs if r.frame is not None)
        if frames:
            item.ReferencedFrameNumber = frames if len(frames) > 1 else frames[0]
        items.append(item)
    return items


def build_presentation_state(
    template: Template,
    result: InferenceResult,
    images: list[BundleImage],
    sources: dict[str, pydicom.Dataset],
    *,
    series_number: int = 9904,
    instance_number: int = 1,
    manufacturer: str = "cmr-ai",
    algorithm_name: str = "cmr-ai",
    algorithm_version: Optional[str] = None,
    institution_name: Optional[str] = None,
    safety: "Optional[SafetyReport]" = None,
    rules_version: Optional[str] = None,
) -> GrayscaleSoftcopyPresentationState:
    """Build the GSPS of an AI draft on the original images (PS3.3 A.33.1).

    Parameters
    ----------
    template, result, images, sources:
        As :func:`plugin.reports.sr.build_measurement_report`: every bundle image is
        referenced (its stored instance, and frame for a multi-frame object); each
        answer is drawn on the image it was judged on (``image_keys[0]``, see
        ``_image_for``). Patient and study attributes come from the first source.
    series_number, instance_number, manufacturer, institution_name:
        Written as such.
    algorithm_name, algorithm_version:
        Named in the banner / written as Manufacturer's Model Name and Software
        Versions; the version defaults to ``result.model_fingerprint``.
    safety:
        The :class:`worker.safety.SafetyReport`: its lines go under the banner on every
        referenced image, after the ``CRITICAL - urgent review`` line that names the
        critical answers (present with or without it).
    rules_version:
        Part of the SOP Instance UID (see :func:`plugin.reports.sr.output_uid`).

    Returns
    -------
    highdicom.pr.GrayscaleSoftcopyPresentationState
        Modality PR, Content Label ``AI_DRAFT``, three graphic layers, VOI LUT and
        Modality LUT from the sources; deterministic Series/SOP Instance UIDs.

    Raises
    ------
    ValueError
        No answer to draw, no images, an image without its source dataset, a source
        that is not grayscale, a multi-frame source without a frame number, or an
        answer that is not a template option.
    """
    version = algorithm_version or result.model_fingerprint or "unknown"
    ans = answers(template, result)
    if not ans:
        raise ValueError(f"job {result.job_id}: no answer for any finding of template "
                         f"{template.name!r}; nothing to draw")
    evidence = {str(ds.SOPInstanceUID): ds for ds in source_datasets(images, sources)}
    for uid, ds in evidence.items():
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise ValueError(f"source {uid}: (0028,0002) Samples per Pixel "
                             f"{ds.SamplesPerPixel}: a grayscale presentation state needs 1")
    study_uid = str(next(iter(evidence.values())).StudyInstanceUID)

    refs: dict[tuple[str, Optional[int]], _Ref] = {}
    ref_of_key: dict[str, _Ref] = {}
    for im in images:
        ds = evidence[im.source.sop_instance_uid]
        frame = _frame(im, ds)
        ref = refs.setdefault((im.source.sop_instance_uid, frame), _Ref(ds, frame))
        ref.keys.append(im.key)
        ref_of_key[im.key] = ref
    for a in ans:
        ref_of_key[_image_for(a, images).key].findings.append(a)

    layers = [
        GraphicLayer(LAYER_FINDINGS, order=1, description="AI draft answers (unverified)",
                     display_color=CIELabColor.from_rgb(255, 220, 40)),
        GraphicLayer(LAYER_CRITICAL, order=2, description="AI draft critical answers (unverified)",
                     display_color=CIELabColor.from_rgb(255, 120, 40)),
        GraphicLayer(LAYER_BANNER, order=3, description=f"{algorithm_name} AI draft notice"[:64],
                     display_color=CIELabColor.from_rgb(255, 40, 40)),
    ]
    for layer in layers:  # white on grayscale displays (CIELab is for colour ones)
        layer.GraphicLayerRecommendedDisplayGrayscaleValue = 0xFFFF
    banner = [display_text(t) for t in [PR_BANNER(algorithm_name)] + flag_lines(template, ans, safety)]
    groups: list[GraphicGroup] = []
    annotations: list[GraphicAnnotation] = []
    for ref in refs.values():
        n_lines = len(banner) + len(ref.findings)
        line = min(_LINE, (_BOTTOM - _TOP) / max(n_lines, 1))
        frame_kw = {"referenced_frame_number": ref.frame} if ref.frame is not None else {}
        annotations.append(GraphicAnnotation(
            referenced_images=[ref.ds], graphic_layer=layers[2], **frame_kw,
            text_objects=[TextObject(text[:1024], units=AnnotationUnitsValues.DISPLAY,
                                     bounding_box=(_LEFT, _TOP + i * line, _RIGHT, _TOP + (i + 1) * line),
                                     text_justification=TextJustificationValues.LEFT)
                          for i, text in enumerate(banner)]))
        per_layer: dict[str, tuple[list, list]] = {}
        for nth, a in enumerate(ref.findings):
            comment = display_text(a.comment)
            group = GraphicGroup(len(groups) + 1, label=a.finding.topic[:64], description=comment)
            groups.append(group)
            tracking = dict(tracking_id=a.finding.id,
                            tracking_uid=output_uid(study_uid, template.name, result.model_fingerprint,
                                                    "sr", "tracking", a.finding.id))
            # answer lines stacked upwards from the bottom, template order top to bottom
            row = len(ref.findings) - nth
            text = TextObject(comment[:1024], units=AnnotationUnitsValues.DISPLAY,
                              bounding_box=(_LEFT, _BOTTOM - row * line, _RIGHT,
                                            _BOTTOM - (row - 1) * line),
                              text_justification=TextJustificationValues.LEFT,
                              graphic_group=group, **tracking)
            rect = GraphicObject(GraphicTypeValues.POLYLINE, _rectangle(ref, nth),
                                 units=AnnotationUnitsValues.PIXEL, graphic_group=group, **tracking)
            texts, graphics = per_layer.setdefault(LAYER_CRITICAL if a.critical else LAYER_FINDINGS,
                                                   ([], []))
            texts.append(text)
            graphics.append(rect)
        for layer in layers[:2]:
            if layer.GraphicLayer in per_layer:
                texts, graphics = per_layer[layer.GraphicLayer]
                annotations.append(GraphicAnnotation(
                    referenced_images=[ref.ds], graphic_layer=layer, **frame_kw,
                    text_objects=texts, graphic_objects=graphics))

    voi, modality = _voi_and_modality(list(refs.values()))
    first = next(iter(evidence.values()))
    areas = {(r.rows, r.columns, _aspect(r)) for r in refs.values()}
    referenced = [ds if (int(ds.Rows), int(ds.Columns)) == (int(first.Rows), int(first.Columns))
                  else _stand_in(ds, int(first.Rows), int(first.Columns))
                  for ds in evidence.values()]
    pr = GrayscaleSoftcopyPresentationState(
        referenced_images=referenced,
        series_instance_uid=output_uid(study_uid, template.name, result.model_fingerprint,
                                       "pr", "series"),
        series_number=series_number,
        sop_instance_uid=output_uid(study_uid, template.name, result.model_fingerprint, "pr",
                                    rules_version=rules_version),
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name[:64],
        software_versions=version[:64],
        device_serial_number=None,
        content_label=CONTENT_LABEL,
        content_description=f"{algorithm_name} AI draft - UNVERIFIED, not for diagnosis"[:64],
        graphic_annotations=annotations,
        graphic_layers=layers,
        graphic_groups=groups or None,
        institution_name=institution_name,
        modality_lut_transformation=modality,
        voi_lut_transformations=voi,
        contributing_equipment=[_equipment(manufacturer, algorithm_name, version, result)],
        series_description=PR_SERIES_DESCRIPTION,
        specific_character_set=CHARSET,
    )
    pr.Laterality = None  # Type 2C; dciodvfy wants it on a GSPS from cardiac MR
    # Presentation State Relationship: only the frames used of a multi-frame object
    by_series: dict[str, list[_Ref]] = {}
    for r in refs.values():
        by_series.setdefault(str(r.ds.SeriesInstanceUID), []).append(r)
    for item in pr.ReferencedSeriesSequence:
        item.ReferencedImageSequence = _image_items(by_series[str(item.SeriesInstanceUID)])
    if len(areas) > 1 or next(iter(areas))[2] != (1, 1):
        # highdicom writes one Displayed Area for all images, from the first, with a 1:1
        # pixel aspect ratio: one item per matrix size and pixel shape instead
        items = []
        for rows, columns, aspect in sorted(areas):
            area = pydicom.Dataset()
            if len(areas) > 1:
                area.ReferencedImageSequence = _image_items(
                    [r for r in refs.values() if (r.rows, r.columns, _aspect(r)) == (rows, columns, aspect)])
            area.PixelOriginInterpretation = "VOLUME"
            area.DisplayedAreaTopLeftHandCorner = [1, 1]
            area.DisplayedAreaBottomRightHandCorner = [columns, rows]
            area.PresentationSizeMode = "SCALE TO FIT"
            area.PresentationPixelAspectRatio = list(aspect)
            items.append(area)
        pr.DisplayedAreaSelectionSequence = items
    return pr
