"""DICOM Structured Reports of an AI draft, built with highdicom.

Two documents per study (see /work/shared/VIEWERS.md for why both):

* :func:`build_measurement_report` — Comprehensive SR, TID 1500 Measurement Report with one
  TID 1410 Planar ROI group per template finding: Tracking Identifier + Tracking UID, an
  Image Region on the image the finding was judged on (OHIF crashes on groups without
  one), Finding, Finding Site, the coded answer as a qualitative evaluation, the answer's
  probability as a NUM (with the same region as its source: OHIF needs it there to load
  the group into its measurement panel) and a Comment TEXT (DCM 121106) that OHIF uses
  as the label.
  Report-level TEXT items (the "unverified AI draft" notice, impression, limitations,
  provenance) sit in the TID 1500 row 12 "Qualitative Evaluations" container, outside
  the measurement groups.
* :func:`build_narrative_report` — Enhanced SR, plain text with SEPARATE continuity,
  for viewers that only show SR text.

Both are VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY and CompletionFlag
PARTIAL: the document is a machine draft covering only the template's questions and
awaiting a physician's report (PS3.3 C.17.2: COMPLETE would claim the content is
complete). Output UIDs are deterministic (``generate_uid(entropy_srcs=[study UID,
template name, model fingerprint, kind])``) so a retried export replaces the
instance on the PACS instead of duplicating it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import (AlgorithmIdentification, ContainerContentItem, CoordinatesForMeasurement,
                          DeviceObserverIdentifyingAttributes, FindingSite, ImageRegion,
                          LanguageOfContentItemAndDescendants, Measurement, MeasurementReport,
                          ObservationContext, ObserverContext,
                          PlanarROIMeasurementsAndQualitativeEvaluations, QualitativeEvaluation,
                          RelationshipTypeValues, SourceImageForRegion, TextContentItem,
                          TrackingIdentifier)
from highdicom.sr.templates import DEFAULT_LANGUAGE, ImageLibraryEntryDescriptors
from highdicom.sr.value_types import CodeContentItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from plugin.reports.template import Finding, Option, Template
from worker.bundle import BundleImage, InferenceResult

if TYPE_CHECKING:  # pragma: no cover
    from worker.safety import SafetyReport

__all__ = [
    "Answer", "DRAFT_NOTICE", "answers", "build_measurement_report", "build_narrative_report",
    "output_uid",
]

log = logging.getLogger(__name__)

DRAFT_NOTICE = "Unverified AI draft — not reviewed by a physician"
SR_SERIES_DESCRIPTION = "AI DRAFT cmr-ai SR"
TEXT_SERIES_DESCRIPTION = "AI DRAFT cmr-ai report text"
# TID 1500 row 12. Not in pydicom's code dictionary, hence written out here.
# UTF-8: the texts carry "—" and patient names may need any repertoire
CHARSET = "ISO_IR 192"
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
_CONT = RelationshipTypeValues.CONTAINS


# ---------------------------------------------------------------------------
# shared by sr.py and sc.py

@dataclass(frozen=True)
class Answer:
    """One template finding with the model's answer."""

    finding: Finding
    option: Option
    probability: float
    image_keys: tuple[str, ...]

    @property
    def critical(self) -> bool:
        return self.finding.is_critical(self.option.id)

    @property
    def answer_text(self) -> str:
        """``LV systolic function: normal (p 0.62)``."""
        return f"{self.finding.topic}: {self.option.text} (p {self.probability:.2f})"

    @property
    def line(self) -> str:
        """:attr:`answer_text` (+ a critical marker)."""
        return self.answer_text + (" — CRITICAL, review urgently" if self.critical else "")

    @property
    def comment(self) -> str:
        """``AI DRAFT — LV systolic function: normal (p 0.62)``, the group's Comment."""
        return f"AI DRAFT — {self.line}"


def dicom_text(text: str) -> str:
    """Model-written text made safe for the text VRs (UT/ST): control characters become spaces."""
    return " ".join("".join(" " if ord(ch) < 32 or ord(ch) == 127 else ch for ch in text).split())


def answers(template: Template, result: InferenceResult) -> list[Answer]:
    """The result's answers in template order, resolved to template options.

    Findings of the template that the result lacks are left out (and logged); findings
    of the result that the template lacks are ignored (and logged).

    Raises
    ------
    ValueError
        An answer that is not an option of its finding, or without a probability.
    """
    by_id = {f.id: f for f in result.findings}
    for fid in by_id:
        if fid not in {f.id for f in template.findings}:
            log.warning("result of job %s has finding %r that template %r lacks; ignored",
                        result.job_id, fid, template.name)
    out: list[Answer] = []
    for finding in template.findings:
        fr = by_id.get(finding.id)
        if fr is None:
            log.warning("result of job %s has no answer for %r (template %r)",
                        result.job_id, finding.id, template.name)
            continue
        try:
            option = finding.option(fr.answer)
        except KeyError as e:
            raise ValueError(f"job {result.job_id}: {e.args[0]}") from None
        p = fr.probabilities.get(fr.answer)
        if p is None or not math.isfinite(p):
            raise ValueError(f"job {result.job_id}: finding {finding.id!r} has no probability "
                             f"for its answer {fr.answer!r}")
        out.append(Answer(finding, option, min(max(float(p), 0.0), 1.0), tuple(fr.image_keys)))
    return out


def output_uid(study_uid: str, template_name: str, fingerprint: str, *kind: str,
               rules_version: Optional[str] = None) -> str:
    """Deterministic UID for an output object (same inputs → same UID → PACS replaces).

    Series UIDs come from study, template and model fingerprint (a changed model gives a
    new series); SOP Instance UIDs also from the rules version of the config that
    decided the analysis, so a re-analysis under the same model and rules replaces the
    earlier object and a re-send never duplicates it.
    """
    extra = [f"rules={rules_version}"] if rules_version else []
    return generate_uid(entropy_srcs=[str(study_uid), template_name, fingerprint, *kind, *extra])


def source_datasets(images: Sequence[BundleImage],
                    sources: dict[str, pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The stored instances the images were rendered from, once each, in image order.

    Raises
    ------
    ValueError
        No images, or an image whose source instance is not in ``sources``.
    """
    if not images:
        raise ValueError("no bundle images: an AI draft needs at least one source image")
    missing = [f"{im.key} ({im.source.sop_instance_uid})" for im in images
               if im.source.sop_instance_uid not in sources]
    if missing:
        raise ValueError("source dataset missing for bundle image(s): " + ", ".join(missing))
    seen: dict[str, pydicom.Dataset] = {}
    for im in images:
        uid = im.source.sop_instance_uid
        if uid not in seen:
            seen[uid] = _with_type2(sources[uid])
    return list(seen.values())


# Patient/study attributes highdicom reads from the first source: Type 2 in the SR/SC
# IODs, but scanners and anonymisers leave some out (read leniently, write strictly).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
          "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def _with_type2(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds``, or a copy of its elements with missing Type 2 patient/study attributes
    present and empty (the caller's dataset is never changed)."""
    missing = [k for k in _TYPE2 if k not in ds]
    if not missing:
        return ds
    copy = pydicom.Dataset()
    for elem in ds:
        copy.add(elem)
    for k in missing:
        setattr(copy, k, None)
    return copy


def _image_for(answer: Answer, images: Sequence[BundleImage]) -> BundleImage:
    """The image the finding was judged on: the first of its image keys that exists,
    else the first image of one of the finding's views, else the first image."""
    by_key = {im.key: im for im in images}
    for k in answer.image_keys:
        if k in by_key:
            return by_key[k]
    if answer.image_keys:
        log.warning("finding %r: none of its image keys %s is in the bundle; using a %s image",
                    answer.finding.id, list(answer.image_keys), "/".join(answer.finding.views))
    for im in images:
        if im.view in answer.finding.views:
            return im
    return images[0]


def _provenance(template: Template, result: InferenceResult, algorithm_name: str,
                algorithm_version: str) -> str:
    return (f"Generated by {algorithm_name} {algorithm_version}: model {result.model} "
            f"({result.quantization or 'full precision'} on {result.device or 'unknown device'}), "
            f"template {template.name} ({template.title})")


def _limitations(template: Template, ans: Sequence[Answer], extra: Sequence[str]) -> list[str]:
    out = list(template.limitations) + [t for t in extra if t]
    answered = {a.finding.id for a in ans}
    missing = [f.topic for f in template.findings if f.id not in answered]
    if missing:
        out.append("Not answered by the model: " + ", ".join(missing) + ".")
    return out


def _safety_lines(template: Template, ans: Sequence[Answer],
                  safety: "Optional[SafetyReport]") -> list[str]:
    """Report-level lines of the safety pass (:mod:`worker.safety`): one
    ``CRITICAL — urgent review: …`` line for the critical answers it found that the
    template-based line does not already name, then one ``AI SAFETY FLAG: …`` per flag."""
    if safety is None:
        return []
    out: list[str] = []
    marked = {(a.finding.id, a.option.id) for a in ans if a.critical}
    extra = []
    for fid, oid in safety.criticals:
        if (fid, oid) in marked:
            continue
        try:
            finding = template.finding(fid)
            extra.append(f"{finding.topic}: {finding.option(oid).text}")
        except KeyError:
            extra.append(f"{fid}: {oid}")
    if extra:
        out.append("CRITICAL — urgent review: " + "; ".join(extra))
    out.extend(safety.messages())
    return [dicom_text(t) for t in out]


def _observation_context(result: InferenceResult, manufacturer: str, algorithm_name: str,
                         algorithm_version: str) -> ObservationContext:
    device = DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=["cmr-ai device", algorithm_name, algorithm_version,
                                       result.model_fingerprint]),
        name=algorithm_name,
        manufacturer_name=manufacturer,
        model_name=result.model[:64] or None,
    )
    return ObservationContext(observer_device_context=ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))


def _equipment(manufacturer: str, algorithm_name: str, algorithm_version: str,
               result: InferenceResult) -> hd.ContributingEquipment:
    # Processing Equipment (DCM 109102): "processed composite instances to create new
    # composite instances" — what cmr-ai does. Modifying Equipment (109103) is for
    # equipment that changed an existing instance without creating a new one.
    return hd.ContributingEquipment(
        manufacturer=manufacturer[:64],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm_name[:64],
        software_versions=algorithm_version[:64],
        contribution_description=(f"AI draft by {algorithm_name} (model {result.model}); "
                                  "unverified, not for diagnosis")[:1024],
    )


def _region(image: BundleImage, ds: pydicom.Dataset, nth: int,
            geometry: str) -> tuple[ImageRegion, CoordinatesForMeasurement]:
    """A rectangle (closed 5-point POLYLINE) or POINT on the source image (frame): the
    group's Image Region and the same coordinates as the Source of its measurement."""
    ref = image.source
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    multiframe = "NumberOfFrames" in ds
    frames = [ref.frame_number] if ref.frame_number and multiframe else None
    if n_frames > 1 and not frames:
        raise ValueError(f"bundle image {image.key!r}: source {ref.sop_instance_uid} has "
                         f"{n_frames} frames but the SourceRef names no frame_number")
    if frames and frames[0] > n_frames:
        raise ValueError(f"bundle image {image.key!r}: frame {frames[0]} > NumberOfFrames "
                         f"{n_frames} of {ref.sop_instance_uid}")
    source = SourceImageForRegion(referenced_sop_class_uid=ds.SOPClassUID,
                                  referenced_sop_instance_uid=ds.SOPInstanceUID,
                                  referenced_frame_numbers=frames)
    rows = int(getattr(ds, "Rows", 0) or ref.rows)
    cols = int(getattr(ds, "Columns", 0) or ref.columns)
    if geometry == "point":
        kind, data = "POINT", np.array([[cols / 2.0, rows / 2.0]], dtype=np.float32)
    else:
        # nested rectangles, one per finding on the same image, so each label stays apart
        inset = min(0.10 + 0.03 * nth, 0.40)
        x0, x1 = cols * inset, cols * (1 - inset)
        y0, y1 = rows * inset, rows * (1 - inset)
        kind = "POLYLINE"
        data = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)
    return (ImageRegion(graphic_type=kind, graphic_data=data, source_image=source),
            CoordinatesForMeasurement(graphic_type=kind, graphic_data=data, source_image=source))


def _library_images(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Sources that highdicom can describe in the TID 1600 image library (single-frame
    images with plane geometry); the rest are still listed as evidence."""
    out = []
    for ds in datasets:
        try:
            ImageLibraryEntryDescriptors(ds)
        except Exception as e:  # noqa: BLE001 — missing/odd attributes: leave it out
            log.debug("image library: leaving out %s (%s)", ds.get("SOPInstanceUID"), e)
            continue
        out.append(ds)
    return out


# ---------------------------------------------------------------------------
# TID 1500

def build_measurement_report(
    template: Template,
    result: InferenceResult,
    images: list[BundleImage],
    sources: dict[str, pydicom.Dataset],
    *,
    series_number: int = 9901,
    instance_number: int = 1,
    manufacturer: str = "cmr-ai",
    algorithm_name: str = "cmr-ai",
    algorithm_version: Optional[str] = None,
    limitations: Sequence[str] = (),
    institution_name: Optional[str] = None,
    region: str = "rectangle",
    safety: "Optional[SafetyReport]" = None,
    rules_version: Optional[str] = None,
) -> hd.sr.ComprehensiveSR:
    """Build the TID 1500 Comprehensive SR of an AI draft.

    Parameters
    ----------
    template:
        The report template the model answered.
    result:
        The model's answers; ``image_keys[0]`` of each finding names the bundle image the
        finding is drawn on.
    images:
        The bundle images (each carries the SourceRef of its stored instance and frame).
    sources:
        Stored source datasets by SOP Instance UID (pixel data not needed); every image's
        source must be there. Patient and study attributes come from the first one.
    series_number, instance_number, manufacturer, institution_name:
        Written as such.
    algorithm_name, algorithm_version:
        Algorithm Identification (TID 4019) and device observer; the version defaults to
        ``result.model_fingerprint``.
    limitations:
        Extra report-level limitation texts (after the template's).
    region:
        ``"rectangle"`` (closed 5-point POLYLINE, inset from the image border; OHIF shows a
        rectangle) or ``"point"`` (image centre; OHIF shows a probe).
    safety:
        The :class:`worker.safety.SafetyReport` of the result: each flag becomes a
        report-level ``AI SAFETY FLAG: …`` Comment, critical answers a
        ``CRITICAL — urgent review: …`` Comment (``result.impression`` is expected to be
        the cleaned one already).
    rules_version:
        Version of the config whose rules decided the analysis; part of the SOP
        Instance UID (see :func:`output_uid`).

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        UNVERIFIED, PRELIMINARY, PARTIAL; deterministic Series/SOP Instance UIDs.

    Raises
    ------
    ValueError
        No answer to report, an answer that is not a template option, an image without
        its source dataset, or a multi-frame source without a frame number.
    """
    if region not in ("rectangle", "point"):
        raise ValueError(f'region must be "rectangle" or "point", got {region!r}')
    version = algorithm_version or result.model_fingerprint or "unknown"
    ans = answers(template, result)
    if not ans:
        raise ValueError(f"job {result.job_id}: no answer for any finding of template "
                         f"{template.name!r}; nothing to report")
    evidence = source_datasets(images, sources)
    study_uid = str(evidence[0].StudyInstanceUID)
    algorithm = AlgorithmIdentification(
        name=algorithm_name, version=version,
        parameters=[f"model={result.model}", f"template={template.name}",
                    f"quantization={result.quantization or 'none'}"])

    groups = []
    per_image: dict[str, int] = {}
    for a in ans:
        image = _image_for(a, images)
        ds = sources[image.source.sop_instance_uid]
        nth = per_image.get(image.key, 0)
        per_image[image.key] = nth + 1
        roi, roi_source = _region(image, ds, nth, region)
        group = PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=output_uid(study_uid, template.name, result.model_fingerprint, "sr",
                               "tracking", a.finding.id),
                identifier=a.finding.id),
            referenced_region=roi,
            finding_type=a.finding.concept.code,
            finding_sites=[FindingSite(a.finding.site.code)] if a.finding.site else None,
            algorithm_id=algorithm,
            qualitative_evaluations=[QualitativeEvaluation(a.finding.concept.code,
                                                           a.option.code.code)],
            measurements=[Measurement(name=codes.DCM.Probability,
                                      value=round(a.probability, 4),
                                      unit=codes.UCUM.Ratio)],
        )
        # OHIF 3 (dcmjs) reads a group's coordinates from inside its first NUM when the
        # group has one, and leaves the group out of its measurement panel when that NUM
        # has none: the probability names the region it was judged on as its source
        # (TID 300 style INFERRED FROM SCOORD "Source"). highdicom's TID 1410 builder
        # refuses measurement coordinates (TID 1419 has no such row; the templates are
        # extensible), hence added here. Checked with OHIF 3.13: tests/test_viewer.py.
        num = next(it for it in group[0].ContentSequence if it.ValueType == "NUM")
        num.ContentSequence = [*num.get("ContentSequence", []), roi_source]
        group[0].ContentSequence.append(TextContentItem(
            name=codes.DCM.Comment, value=a.comment, relationship_type=_CONT))
        groups.append(group)

    report = MeasurementReport(
        observation_context=_observation_context(result, manufacturer, algorithm_name, version),
        procedure_reported=template.procedure.code,
        imaging_measurements=groups,
        referenced_images=_library_images(evidence) or None,
    )
    texts = [TextContentItem(name=codes.DCM.Comment, value=DRAFT_NOTICE, relationship_type=_CONT)]
    critical = [a for a in ans if a.critical]
    if critical:
        texts.append(TextContentItem(
            name=codes.DCM.Comment, relationship_type=_CONT,
            value="CRITICAL — urgent review: " + "; ".join(a.answer_text for a in critical)))
    for line in _safety_lines(template, ans, safety):
        texts.append(TextContentItem(name=codes.DCM.Comment, value=line, relationship_type=_CONT))
    if template.impression and result.impression.strip():
        texts.append(TextContentItem(name=codes.DCM.Impression, relationship_type=_CONT,
                                     value=f"AI DRAFT impression: {dicom_text(result.impression)}"))
    for lim in _limitations(template, ans, limitations):
        texts.append(TextContentItem(name=codes.DCM.Comment, value=f"Limitation: {lim}",
                                     relationship_type=_CONT))
    texts.append(TextContentItem(name=codes.DCM.Comment, relationship_type=_CONT,
                                 value=_provenance(template, result, algorithm_name, version)))
    container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, is_content_continuous=False,
                                     relationship_type=_CONT)
    container.ContentSequence = texts
    report[0].ContentSequence.append(container)

    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=output_uid(study_uid, template.name, result.model_fingerprint,
                                       "sr", "series"),
        series_number=series_number,
        sop_instance_uid=output_uid(study_uid, template.name, result.model_fingerprint, "sr",
                                    rules_version=rules_version),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=False,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        performed_procedure_codes=[template.procedure.code],
        contributing_equipment=[_equipment(manufacturer, algorithm_name, version, result)],
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=algorithm_name[:64],
        software_versions=version[:64],
        specific_character_set=CHARSET,
        coding_schemes=template.coding_scheme_items(),
    )
    return sr


# ---------------------------------------------------------------------------
# text-only SR

def build_narrative_report(
    template: Template,
    result: InferenceResult,
    images: list[BundleImage],
    sources: dict[str, pydicom.Dataset],
    *,
    series_number: int = 9903,
    instance_number: int = 1,
    manufacturer: str = "cmr-ai",
    algorithm_name: str = "cmr-ai",
    algorithm_version: Optional[str] = None,
    limitations: Sequence[str] = (),
    institution_name: Optional[str] = None,
    safety: "Optional[SafetyReport]" = None,
    rules_version: Optional[str] = None,
) -> hd.sr.EnhancedSR:
    """Build a short text-only Enhanced SR of the same draft (SEPARATE continuity).

    The root is LN 18748-4 "Diagnostic Imaging Report": the draft notice, a Findings
    section with one TEXT per finding (``LV systolic function: normal (p 0.62)``), an
    Impressions section, limitations and provenance. Parameters (``safety`` included:
    a ``CRITICAL — urgent review`` line and the ``AI SAFETY FLAG`` lines after the draft
    notice), flags and errors as :func:`build_measurement_report`; default series 9903.

    Returns
    -------
    highdicom.sr.EnhancedSR
    """
    version = algorithm_version or result.model_fingerprint or "unknown"
    ans = answers(template, result)
    evidence = source_datasets(images, sources)
    study_uid = str(evidence[0].StudyInstanceUID)

    root = ContainerContentItem(name=codes.LN.DiagnosticImagingReport, is_content_continuous=False)
    items: list = []
    items.extend(LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    items.extend(_observation_context(result, manufacturer, algorithm_name, version))
    items.append(CodeContentItem(name=codes.DCM.ProcedureReported, value=template.procedure.code,
                                 relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    items.append(TextContentItem(name=codes.DCM.Comment, relationship_type=_CONT,
                                 value=f"AI DRAFT. {DRAFT_NOTICE}."))
    critical = [a for a in ans if a.critical]
    if critical and safety is not None:
        items.append(TextContentItem(
            name=codes.DCM.Comment, relationship_type=_CONT,
            value="CRITICAL — urgent review: " + "; ".join(a.answer_text for a in critical)))
    for line in _safety_lines(template, ans, safety):
        items.append(TextContentItem(name=codes.DCM.Comment, value=line, relationship_type=_CONT))
    findings = ContainerContentItem(name=codes.DCM.Findings, is_content_continuous=False,
                                    relationship_type=_CONT)
    findings.ContentSequence = [
        TextContentItem(name=codes.DCM.Finding, value=a.line, relationship_type=_CONT)
        for a in ans] or [TextContentItem(name=codes.DCM.Finding, relationship_type=_CONT,
                                          value="No finding was answered by the model.")]
    items.append(findings)
    if template.impression and result.impression.strip():
        imp = ContainerContentItem(name=codes.DCM.Impressions, is_content_continuous=False,
                                   relationship_type=_CONT)
        imp.ContentSequence = [TextContentItem(name=codes.DCM.Impression, relationship_type=_CONT,
                                               value=f"AI DRAFT: {dicom_text(result.impression)}")]
        items.append(imp)
    for lim in _limitations(template, ans, limitations):
        items.append(TextContentItem(name=codes.DCM.Comment, value=f"Limitation: {lim}",
                                     relationship_type=_CONT))
    items.append(TextContentItem(name=codes.DCM.Comment, relationship_type=_CONT,
                                 value=_provenance(template, result, algorithm_name, version)))
    root.ContentSequence = items

    return hd.sr.EnhancedSR(
        evidence=evidence,
        content=root,
        series_instance_uid=output_uid(study_uid, template.name, result.model_fingerprint,
                                       "sr-text", "series"),
        series_number=series_number,
        sop_instance_uid=output_uid(study_uid, template.name, result.model_fingerprint, "sr-text",
                                    rules_version=rules_version),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=False,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        performed_procedure_codes=[template.procedure.code],
        contributing_equipment=[_equipment(manufacturer, algorithm_name, version, result)],
        series_description=TEXT_SERIES_DESCRIPTION,
        manufacturer_model_name=algorithm_name[:64],
        software_versions=version[:64],
        specific_character_set=CHARSET,
        coding_schemes=template.coding_scheme_items(),
    )
