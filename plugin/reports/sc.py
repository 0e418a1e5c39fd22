"""Secondary Capture of an AI draft: the slices used, with the answers burnt in.

The one object every viewer shows (VIEWERS.md). A mosaic of the bundle images (each
tile labelled, e.g. "SAX mid ED") under a red banner "UNVERIFIED AI DRAFT — cmr-ai — not
for diagnosis"; right under the banner a dark red strip with the critical answers
("CRITICAL — urgent review: …") and the safety pass's ``AI SAFETY FLAG: …`` lines, when
there are any; under the tiles one line per answer ("LV systolic function: normal
(p 0.62)"), the impression and the template title; a red footer repeats the banner.
Built with highdicom's ``SCImage`` (RGB, 8 bit); BurnedInAnnotation YES; Series
Description, Image Comments and Derivation Description say "AI draft, unverified";
patient/study attributes copied from a source; deterministic UIDs as in
:mod:`plugin.reports.sr`.
"""
from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING, Optional, Sequence

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.sr.codedict import codes

from plugin.reports.sr import (CHARSET, Answer, _equipment, _safety_lines, answers,
                               dicom_text, output_uid, source_datasets)
from plugin.reports.template import Template
from worker.bundle import BundleImage, InferenceResult

if TYPE_CHECKING:  # pragma: no cover
    from worker.safety import SafetyReport

__all__ = ["BANNER", "SC_SERIES_DESCRIPTION", "build_secondary_capture", "flag_lines",
           "render_mosaic"]

SC_SERIES_DESCRIPTION = "AI DRAFT cmr-ai SC"
TILE = 256
MAX_COLUMNS = 4
MIN_WIDTH = 768
PAD = 8

_RED = (190, 20, 20)
_WHITE = (255, 255, 255)
_YELLOW = (255, 220, 40)
_ORANGE = (255, 120, 40)
_GREY = (200, 200, 200)
_FLAG_BG = (70, 10, 10)


def BANNER(algorithm_name: str = "cmr-ai") -> str:  # noqa: N802 — reads like a constant
    return f"UNVERIFIED AI DRAFT — {algorithm_name} — not for diagnosis"


def _font(size: int):
    return ImageFont.load_default(size=size)


def _text(s: str, font) -> str:
    # Pillow's bundled default font has no em dash (it draws a box), and its bitmap
    # fallback (no FreeType) is Latin-1 only
    s = s.replace("—", "-").replace("–", "-")
    if isinstance(font, ImageFont.FreeTypeFont):
        return s
    return s.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, font, width: int) -> list[str]:
    """Wrap to a pixel width (greedy, by words)."""
    avg = max(font.getlength("abcdefghijklmnopqrstuvwxyz") / 26, 1)
    chars = max(int(width / avg), 10)
    lines = textwrap.wrap(text, chars) or [""]
    out = []
    for line in lines:
        while font.getlength(line) > width and len(line) > 10:  # rare: very wide glyphs
            cut = line.rfind(" ", 0, len(line) - 1)
            cut = cut if cut > 0 else len(line) - 1
            out.append(line[:cut])
            line = line[cut:].lstrip()
        out.append(line)
    return out


def _tile(image: BundleImage, font) -> Image.Image:
    src = image.to_pil()
    scale = min(TILE / src.width, TILE / src.height)
    size = (max(1, round(src.width * scale)), max(1, round(src.height * scale)))
    src = src.resize(size, Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (TILE, TILE), (0, 0, 0))
    tile.paste(src, ((TILE - size[0]) // 2, (TILE - size[1]) // 2))
    draw = ImageDraw.Draw(tile)
    label = _text(image.label or image.key, font)
    box = draw.textbbox((4, 3), label, font=font)
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
    draw.text((4, 3), label, fill=_YELLOW, font=font)
    draw.rectangle((0, 0, TILE - 1, TILE - 1), outline=(90, 90, 90))
    return tile


def flag_lines(template: Template, ans: Sequence[Answer],
               safety: "Optional[SafetyReport]" = None) -> list[str]:
    """The lines of the strip under the banner, as the SR words them: ``CRITICAL — urgent
    review: …`` naming every critical answer, then the safety pass's lines (critical
    findings it found that the answers do not mark, ``AI SAFETY FLAG: …`` per flag)."""
    critical = [a for a in ans if a.critical]
    out = ["CRITICAL — urgent review: " + "; ".join(a.answer_text for a in critical)] if critical else []
    return out + _safety_lines(template, ans, safety)


def render_mosaic(template: Template, result: InferenceResult, images: Sequence[BundleImage],
                  ans: Sequence[Answer], *, algorithm_name: str = "cmr-ai",
                  safety: "Optional[SafetyReport]" = None) -> Image.Image:
    """The SC picture: banner, critical/safety strip, labelled tiles, answers, impression
    (PIL RGB image)."""
    big, normal, small = _font(20), _font(15), _font(13)
    n = len(images)
    ncols = min(MAX_COLUMNS, max(n, 1))
    nrows = math.ceil(n / ncols) if n else 0
    width = max(ncols * TILE, MIN_WIDTH)
    text_w = width - 2 * PAD

    banner = _wrap(_text(BANNER(algorithm_name), big), big, text_w)
    sub = _wrap(_text(f"{template.title} · model {result.model} · {template.name}", small),
                small, text_w)
    flags = [(t, _ORANGE if line.startswith("CRITICAL") else _YELLOW, normal)
             for line in flag_lines(template, ans, safety)
             for t in _wrap(_text(line, normal), normal, text_w)]
    lines: list[tuple[str, tuple, object]] = []
    for a in ans:
        colour = _ORANGE if a.critical else _YELLOW
        lines += [(t, colour, normal) for t in _wrap(_text(a.line, normal), normal, text_w)]
    if template.impression and result.impression.strip():
        lines += [(t, _WHITE, normal) for t in
                  _wrap(_text(f"Impression (AI draft): {result.impression.strip()}", normal),
                        normal, text_w)]
    lines += [(t, _GREY, small) for t in
              _wrap(_text("Review against the images; probabilities are model scores, "
                          "not calibrated likelihoods.", small), small, text_w)]

    def h(font) -> int:
        b = font.getbbox("Ag")
        return b[3] - b[1] + 6

    banner_h = PAD + len(banner) * h(big) + len(sub) * h(small) + PAD
    flags_h = PAD + sum(h(f) for _, _, f in flags) + PAD if flags else 0
    grid_h = nrows * TILE
    text_h = PAD + sum(h(f) for _, _, f in lines) + PAD
    canvas = Image.new("RGB", (width, banner_h + flags_h + grid_h + text_h + h(small) + PAD),
                       (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width - 1, banner_h - 1), fill=_RED)
    y = PAD
    for t in banner:
        draw.text((PAD, y), t, fill=_WHITE, font=big)
        y += h(big)
    for t in sub:
        draw.text((PAD, y), t, fill=_WHITE, font=small)
        y += h(small)
    if flags:
        draw.rectangle((0, banner_h, width - 1, banner_h + flags_h - 1), fill=_FLAG_BG)
        y = banner_h + PAD
        for t, colour, font in flags:
            draw.text((PAD, y), t, fill=colour, font=font)
            y += h(font)
    top = banner_h + flags_h
    x0 = (width - ncols * TILE) // 2
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        canvas.paste(_tile(im, small), (x0 + c * TILE, top + r * TILE))
    y = top + grid_h + PAD
    for t, colour, font in lines:
        draw.text((PAD, y), t, fill=colour, font=font)
        y += h(font)
    footer = _text(BANNER(algorithm_name), small)
    draw.rectangle((0, canvas.height - h(small) - PAD, width - 1, canvas.height - 1), fill=_RED)
    draw.text((PAD, canvas.height - h(small) - PAD // 2), footer, fill=_WHITE, font=small)
    return canvas


def build_secondary_capture(
    template: Template,
    result: InferenceResult,
    images: list[BundleImage],
    sources: dict[str, pydicom.Dataset],
    *,
    series_number: int = 9902,
    instance_number: int = 1,
    manufacturer: str = "cmr-ai",
    algorithm_name: str = "cmr-ai",
    algorithm_version: Optional[str] = None,
    institution_name: Optional[str] = None,
    safety: "Optional[SafetyReport]" = None,
    rules_version: Optional[str] = None,
) -> hd.sc.SCImage:
    """Build the Secondary Capture (RGB mosaic with the draft burnt in).

    Parameters
    ----------
    template, result, images, sources:
        As :func:`plugin.reports.sr.build_measurement_report`; patient and study
        attributes are copied from the first image's source dataset.
    series_number, instance_number, manufacturer, institution_name:
        Written as such.
    algorithm_name, algorithm_version:
        Burnt into the banner / written as Software Versions; the version defaults to
        ``result.model_fingerprint``.
    safety:
        The :class:`worker.safety.SafetyReport` of the result: its lines (see
        :func:`flag_lines`) are burnt into the strip under the banner, with the critical
        answers (which are there with or without it), and repeated in Image Comments.
    rules_version:
        Part of the SOP Instance UID (see :func:`plugin.reports.sr.output_uid`).

    Returns
    -------
    highdicom.sc.SCImage
        Modality OT, BurnedInAnnotation YES, Laterality and Patient Orientation present
        but empty (a mosaic of differently oriented slices), Source Image Sequence naming
        every slice used; deterministic Series/SOP Instance UIDs.

    Raises
    ------
    ValueError
        No images, an image without its source dataset, or an answer that is not a
        template option.
    """
    version = algorithm_version or result.model_fingerprint or "unknown"
    ans = answers(template, result)
    evidence = source_datasets(images, sources)
    ref = evidence[0]
    study_uid = str(ref.StudyInstanceUID)
    pixels = np.asarray(render_mosaic(template, result, images, ans, algorithm_name=algorithm_name,
                                      safety=safety), dtype=np.uint8)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=output_uid(study_uid, template.name, result.model_fingerprint,
                                       "sc", "series"),
        series_number=series_number,
        sop_instance_uid=output_uid(study_uid, template.name, result.model_fingerprint, "sc",
                                    rules_version=rules_version),
        instance_number=instance_number,
        manufacturer=manufacturer,
        # required by highdicom for PATIENT; blanked below (tiles differ in orientation)
        patient_orientation=("L", "P"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
        contributing_equipment=[_equipment(manufacturer, algorithm_name, version, result)],
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=algorithm_name[:64],
        software_versions=version[:64],
        institution_name=institution_name,
        specific_character_set=CHARSET,
    )
    sc.PatientOrientation = None          # Type 2: present, empty
    sc.Laterality = None                  # Type 2C; dciodvfy wants it on SC from cardiac MR
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageComments = dicom_text(" ".join(
        [f"{BANNER(algorithm_name)}. {template.title}."]
        + [f"{line.rstrip('.')}." for line in flag_lines(template, ans, safety)]))[:10240]
    sc.DerivationDescription = (f"Mosaic of {len(images)} rendered source slice(s) with the "
                                f"{algorithm_name} AI draft answers burnt in")[:1024]
    items = []
    for im in images:
        ds = sources[im.source.sop_instance_uid]
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        if im.source.frame_number and "NumberOfFrames" in ds:
            item.ReferencedFrameNumber = im.source.frame_number
        item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(
            codes.DCM.SourceImageForImageProcessingOperation)]
        items.append(item)
    sc.SourceImageSequence = items
    return sc
