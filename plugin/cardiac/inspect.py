"""``cmr-ai inspect``: what the node understands of one study, and what the model will see.

:func:`inspect_study` runs the node's own path on a folder — :func:`load_study` →
:func:`classify_study` → :func:`prepare_study`, the code ``prepare`` runs, never a
copy — and reports, per series, the view and why, the cine shape (slices × phases),
the ED/ES phases and basal/mid/apical slices chosen, whether the model sees it and,
if not, why not. It also checks what the node only finds out when it renders a
frame: every image file's Pixel Data (7FE0,0010) is complete, every frame has its
Image Plane geometry (PS3.3 C.7.6.2), no SOP Instance UID is stored twice.

Nothing in a folder makes it fail: files that are not DICOM, empty, truncated or
without geometry are reported with the reason, naming the tag. Only a folder that
does not exist raises (:class:`FileNotFoundError`).

:func:`render_contact_sheet` draws exactly the images of the analysis bundle, one
labelled tile each, as one PNG.
"""
from __future__ import annotations

import base64
import io
import logging
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from worker.bundle import BundleImage

from .classify import Classification, classify_study, group_locations
from .prepare import PrepareError, Selection, prepare_study
from .series import SeriesInfo, SkippedObject, Study, load_study
from .views import CINE_VIEWS, View

log = logging.getLogger(__name__)

__all__ = [
    "FileProblem",
    "ImageReport",
    "SeriesReport",
    "SkippedFile",
    "StudyReport",
    "contact_sheet_size",
    "inspect_study",
    "pixel_data_problem",
    "print_report",
    "render_contact_sheet",
]

TISSUE_VIEWS = (View.LGE, View.T1MAP, View.T2MAP, View.PERFUSION)


# ---------------------------------------------------------------------------- report model


class SkippedFile(BaseModel):
    """A file that is not part of any series: not DICOM, not an MR image, unreadable."""

    model_config = ConfigDict(frozen=True)

    path: str  # relative to the study folder
    reason: str


class FileProblem(BaseModel):
    """A file kept in a series that has something wrong (truncated pixels, no geometry, a duplicate)."""

    model_config = ConfigDict(frozen=True)

    path: str
    series_instance_uid: str
    reason: str


class SeriesReport(BaseModel):
    """One series as the node understands it."""

    series_instance_uid: str
    series_number: Optional[int]
    description: str
    view: str  # a View value
    confidence: float
    n_slices: int  # distinct positions (planes) with geometry
    n_phases: int  # most distinct trigger times at one position
    n_frames: int
    ed_phase: Optional[int] = None  # cine views chosen by prepare: 0-based, trigger-time order
    es_phase: Optional[int] = None
    es_method: str = ""
    chosen_slices: dict[str, int] = Field(default_factory=dict)  # SAX: level -> slice index, base -> apex
    used: bool = False  # does the model see images of this series
    reasons: list[str] = Field(default_factory=list)


class ImageReport(BaseModel):
    """One analysis image (a tile of the contact sheet) and where it comes from."""

    key: str
    view: str
    phase: str
    label: str
    series_instance_uid: str
    series_number: Optional[int]
    sop_instance_uid: str
    frame_number: Optional[int]  # 1-based, multi-frame objects only
    #: the LV square (left, top, right, bottom) in the image's pixels that a ``zoom: lv``
    #: question crops this image to (SAX images where a blood pool was found); else None
    roi: Optional[tuple[int, int, int, int]] = None


class StudyReport(BaseModel):
    """Everything ``cmr-ai inspect`` shows; :meth:`to_json` is its machine-readable form."""

    study_dir: str
    study_instance_uid: str
    n_files: int
    series: list[SeriesReport]
    skipped: list[SkippedFile]
    file_problems: list[FileProblem]
    limitations: list[str]
    images: list[ImageReport]
    error: Optional[str] = None  # why the study cannot be analysed (the PrepareError message)
    bundle_images: list[BundleImage] = Field(default_factory=list, exclude=True, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self, indent: Optional[int] = 2) -> str:
        return self.model_dump_json(indent=indent)

    def series_numbers(self) -> dict[str, Optional[int]]:
        return {s.series_instance_uid: s.series_number for s in self.series}


# ---------------------------------------------------------------------------- file checks


def _walk(root: Path) -> list[Path]:
    """Every regular file under ``root`` (recursively, symlinked folders not followed), sorted."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: log.warning("cannot list %s", e)):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():
                out.append(p)
    return out


def _as_int(value) -> Optional[int]:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def pixel_data_problem(path: str | os.PathLike) -> Optional[str]:
    """Why the Pixel Data (7FE0,0010) of an image file cannot be decoded in full; None when it is complete.

    Native (uncompressed) data must hold Rows × Columns × SamplesPerPixel ×
    BitsAllocated / 8 bytes per frame; encapsulated data must parse into
    NumberOfFrames frames (PS3.5 A.4). Nothing is decoded.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except Exception as e:  # noqa: BLE001 - a broken file is a finding, not a failure
            return f"(7FE0,0010) Pixel Data unreadable ({type(e).__name__}: {e})"
    notes = "; ".join(dict.fromkeys(str(w.message) for w in caught))
    why = f" ({notes})" if notes else ""
    if "PixelData" not in ds:
        return f"(7FE0,0010) Pixel Data missing or cut off{why}"
    rows, cols = _as_int(ds.get("Rows")) or 0, _as_int(ds.get("Columns")) or 0
    n_frames = _as_int(ds.get("NumberOfFrames")) or 1
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2.1")))
    try:
        value = ds.PixelData
    except Exception as e:  # noqa: BLE001
        return f"(7FE0,0010) Pixel Data unreadable ({type(e).__name__}: {e})"
    if syntax.is_encapsulated:
        try:
            found = sum(1 for _ in generate_frames(value, number_of_frames=n_frames))
        except Exception as e:  # noqa: BLE001
            return f"(7FE0,0010) Pixel Data ({syntax.name}) truncated or corrupt ({type(e).__name__}: {e}){why}"
        if found < n_frames:
            return f"(7FE0,0010) Pixel Data ({syntax.name}) holds {found} of {n_frames} frames{why}"
        return None
    bits = _as_int(ds.get("BitsAllocated")) or 16
    samples = _as_int(ds.get("SamplesPerPixel")) or 1
    expected = math.ceil(rows * cols * samples * n_frames * bits / 8)
    if len(value) < expected:
        return (f"(7FE0,0010) Pixel Data truncated: {len(value)} of {expected} bytes ({rows}×{cols}, "
                f"{n_frames} frame(s), {bits} bits allocated){why}")
    return None


def _load(paths: Sequence[Path]) -> Study:
    """:func:`load_study`, falling back to one file at a time when a header makes it fail."""
    try:
        return load_study(paths)
    except Exception:  # noqa: BLE001 - find the culprit(s), report them, keep the rest
        log.warning("load_study failed on the whole folder; reading file by file", exc_info=True)
    good: list[Path] = []
    bad: list[SkippedObject] = []
    for p in paths:
        try:
            load_study([p])
            good.append(p)
        except Exception as e:  # noqa: BLE001
            bad.append(SkippedObject(os.fspath(p), f"header not understood ({type(e).__name__}: {e})"))
    study = load_study(good)
    study.skipped.extend(bad)
    return study


def _geometry_problem(frames) -> Optional[str]:
    missing = []
    if any(f.orientation is None for f in frames):
        missing.append("(0020,0037) Image Orientation (Patient)")
    if any(f.position is None for f in frames):
        missing.append("(0020,0032) Image Position (Patient)")
    if not missing:
        return None
    which = ""
    if frames[0].frame_number is not None:
        nums = [f.frame_number for f in frames if f.orientation is None or f.position is None]
        shown = ", ".join(str(n) for n in nums[:5]) + (", …" if len(nums) > 5 else "")
        which = f" in {len(nums)} frame(s) ({shown})"
    return f"{' and '.join(missing)} missing{which}: not placed in any slice, ignored"


def _file_problems(study: Study, rel) -> list[FileProblem]:
    problems: list[FileProblem] = []
    copies: dict[str, set[str]] = defaultdict(set)
    for s in study.series.values():
        for f in s.frames:
            copies[f.sop_instance_uid].add(f.path)
    for s in study.series.values():
        by_path: dict[str, list] = defaultdict(list)
        for f in s.frames:
            by_path[f.path].append(f)
        for path in sorted(by_path):
            frames = sorted(by_path[path], key=lambda f: f.frame_number or 0)
            reasons = []
            try:
                pix = pixel_data_problem(path)
            except Exception as e:  # noqa: BLE001
                pix = f"(7FE0,0010) Pixel Data could not be checked ({type(e).__name__}: {e})"
            if pix:
                reasons.append(pix)
            geo = _geometry_problem(frames)
            if geo:
                reasons.append(geo)
            if any(f.pixel_spacing is None for f in frames):
                reasons.append("(0028,0030) Pixel Spacing missing: 1 mm assumed")
            sop = frames[0].sop_instance_uid
            others = sorted(rel(p) for p in copies[sop] if p != path)
            if others:
                reasons.append(f"(0008,0018) SOP Instance UID {sop} also stored as {', '.join(others)}: the same "
                               "object twice, the node reads whichever sorts first")
            problems += [FileProblem(path=rel(path), series_instance_uid=s.uid, reason=r) for r in reasons]
    return problems


# ---------------------------------------------------------------------------- series


def _cine_shape(s: SeriesInfo) -> tuple[int, int]:
    """(distinct positions, most distinct trigger times at one position)."""
    locs = group_locations(s.frames, s.uid)
    if locs:
        return len(locs), max(len(loc.phases()) for loc in locs)
    times = {round(f.trigger_time, 1) for f in s.frames if f.trigger_time is not None}
    return 0, len(times)


def _not_used_reason(s: SeriesInfo, c: Classification, selections: Mapping[View, Selection],
                     study: Study, error: Optional[str]) -> str:
    if c.view == View.LOCALIZER:
        return "not analysed: localizers are never shown to the model"
    if c.view in TISSUE_VIEWS:
        return f"not analysed: {c.view.value} series are not part of the analysis bundle (cine views only)"
    if c.view == View.OTHER:
        return "not analysed: no cardiac view recognised"
    sel = selections.get(c.view)
    if sel is None:
        return f"not used: no {c.view.value} cine could be selected" + (f" ({error})" if error else "")
    if s.uid not in sel.series_uids:
        chosen = ", ".join(study.series[u].label for u in sel.series_uids if u in study.series)
        return f"not used: {chosen} chosen for {c.view.value}"
    if sel.error:
        return f"not used: {sel.error}"
    return f"not used: part of the {c.view.value} stack, but none of its slices is basal, mid or apical"


def _evidence_first(c: Classification) -> list[str]:
    """The classification's reasons with the deciding one first (a long-axis plane's angle on the AHA ring)."""
    reasons = list(c.reasons)
    deciding = [r for r in reasons if "on the AHA ring" in r]
    return deciding + [r for r in reasons if r not in deciding]


def _problem_lines(problems: list[FileProblem]) -> list[str]:
    """One line per problem; the same problem in many files once, with a count."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for p in problems:
        grouped[p.reason].append(p.path)
    lines = []
    for reason, paths in grouped.items():
        if len(paths) == 1:
            lines.append(f"{paths[0]}: {reason}")
        else:
            lines.append(f"{reason}: {len(paths)} files ({paths[0]}, …)")
    return lines


# ---------------------------------------------------------------------------- public


#: how many times :func:`inspect_study` calls its ``step`` callback
INSPECT_STEPS = 5


def inspect_study(study_dir: str | os.PathLike, *, size: int = 224,
                  step: Optional[Callable[[str], None]] = None) -> StudyReport:
    """Inspect every file under ``study_dir`` as the node would analyse it.

    Parameters
    ----------
    study_dir
        A folder (searched recursively; every file, whatever its name) or one file.
    size
        Edge of the rendered analysis images, as ``prepare`` renders them.
    step
        Called with a short description as each of the :data:`INSPECT_STEPS` begins
        (``cmr-ai inspect`` drives its progress bar with it).

    Returns
    -------
    StudyReport
        Per-series view, cine shape, ED/ES, chosen slices, use and reasons; skipped
        files; file problems; limitations; the analysis images. ``error`` holds the
        :class:`PrepareError` message when nothing can be analysed.

    Raises
    ------
    FileNotFoundError
        ``study_dir`` does not exist.
    """
    root = Path(study_dir)
    if not root.exists():
        raise FileNotFoundError(f"study folder {os.fspath(root)!r} does not exist")
    step = step or (lambda _what: None)
    step("listing files")
    paths = [root] if root.is_file() else _walk(root)
    base = root.parent if root.is_file() else root

    def rel(path: str | os.PathLike) -> str:
        try:
            return Path(path).relative_to(base).as_posix()
        except ValueError:
            return os.fspath(path)

    step(f"reading {len(paths)} file{'s' if len(paths) != 1 else ''}")
    study = _load(paths)
    skipped = []
    for sk in study.skipped:
        reason = sk.reason
        if "InvalidDicomError" in reason and "DICM" in reason:
            reason = "not DICOM: no File Meta Information header ('DICM' prefix missing, PS3.10 7.1)"
        try:
            if os.path.getsize(sk.path) == 0:
                reason = "empty file (0 bytes): not DICOM"
        except OSError:
            pass
        skipped.append(SkippedFile(path=rel(sk.path), reason=reason))
    skipped.sort(key=lambda s: s.path)
    step("checking pixel data")
    problems = _file_problems(study, rel)

    error: Optional[str] = None
    step("classifying series")
    try:
        classifications = classify_study(study)
    except Exception as e:  # noqa: BLE001 - report, never crash
        log.warning("classification failed", exc_info=True)
        classifications = {u: Classification(View.OTHER, 0.0, [f"classification failed ({type(e).__name__}: {e})"])
                           for u in study.series}
        error = f"classification failed ({type(e).__name__}: {e})"

    images: list[BundleImage] = []
    limitations: list[str] = []
    selections: dict[View, Selection] = {}
    step("preparing the analysis images")
    if error is None:
        try:
            prepared = prepare_study(study, classifications, size=size)
            images, limitations, selections = prepared.images, prepared.limitations, prepared.selections
        except PrepareError as e:
            error = str(e)
            selections = dict(e.selections)
        except Exception as e:  # noqa: BLE001
            log.warning("prepare failed", exc_info=True)
            error = f"images could not be prepared ({type(e).__name__}: {e})"

    used = {im.source.series_instance_uid for im in images}
    problems_by_series: dict[str, list[FileProblem]] = defaultdict(list)
    for p in problems:
        problems_by_series[p.series_instance_uid].append(p)
    series: list[SeriesReport] = []
    for s in study.ordered():
        c = classifications.get(s.uid) or Classification(View.OTHER, 0.0, ["not classified"])
        n_slices, n_phases = _cine_shape(s)
        rep = SeriesReport(series_instance_uid=s.uid, series_number=s.number, description=s.description,
                           view=c.view.value, confidence=round(float(c.confidence), 2), n_slices=n_slices,
                           n_phases=n_phases, n_frames=len(s.frames), used=s.uid in used)
        sel = selections.get(c.view) if c.view in CINE_VIEWS else None
        if sel is not None and s.uid in sel.series_uids:
            rep.ed_phase, rep.es_phase, rep.es_method = sel.ed_phase, sel.es_phase, sel.es_method
            rep.chosen_slices = dict(sel.slices)
        reasons = _problem_lines(problems_by_series.get(s.uid, []))
        if not rep.used:
            reasons.append(_not_used_reason(s, c, selections, study, error))
        rep.reasons = reasons + _evidence_first(c)
        series.append(rep)

    numbers = {s.uid: s.number for s in study.series.values()}
    return StudyReport(
        study_dir=os.fspath(root),
        study_instance_uid=study.study_instance_uid,
        n_files=len(paths),
        series=series,
        skipped=skipped,
        file_problems=problems,
        limitations=limitations,
        images=[ImageReport(key=im.key, view=im.view, phase=im.phase, label=im.label,
                            series_instance_uid=im.source.series_instance_uid,
                            series_number=numbers.get(im.source.series_instance_uid),
                            sop_instance_uid=im.source.sop_instance_uid, frame_number=im.source.frame_number,
                            roi=im.roi)
                for im in images],
        error=error,
        bundle_images=images,
    )


# ---------------------------------------------------------------------------- contact sheet

SHEET_TILE = 160
SHEET_COLUMNS = 6  # SAX basal/mid/apical × ED/ES on one row, 2CH/3CH/4CH × ED/ES on the next
SHEET_MARGIN = 8
SHEET_GAP = 6
SHEET_HEADER = 40
SHEET_LABEL = 28


def contact_sheet_size(n_images: int, *, tile: int = SHEET_TILE, columns: Optional[int] = None) -> tuple[int, int]:
    """(width, height) of the contact sheet of ``n_images`` tiles."""
    cols = max(1, min(columns or SHEET_COLUMNS, n_images))
    rows = max(1, math.ceil(n_images / cols))
    width = 2 * SHEET_MARGIN + cols * tile + (cols - 1) * SHEET_GAP
    height = SHEET_HEADER + rows * (tile + SHEET_LABEL) + (rows - 1) * SHEET_GAP + SHEET_MARGIN
    return width, height


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def render_contact_sheet(images: Sequence[BundleImage], out_path: str | os.PathLike, *,
                         title: str = "What the model sees", study_uid: str = "",
                         series_numbers: Optional[Mapping[str, Optional[int]]] = None,
                         tile: int = SHEET_TILE, columns: Optional[int] = None) -> Path:
    """Write a PNG grid of exactly ``images`` (the analysis bundle), one labelled tile each.

    Parameters
    ----------
    images
        The bundle images, in bundle order (their PNGs are decoded, not re-rendered).
    out_path
        Where the PNG goes (parent folders are created).
    title, study_uid
        The header: the title, then the study's UID and the number of images.
    series_numbers
        SeriesInstanceUID → SeriesNumber, for the tile labels (the UID's tail otherwise).
    tile, columns
        Tile edge in pixels; tiles per row (6 by default).

    Returns
    -------
    Path
        ``out_path``.

    Raises
    ------
    ValueError
        ``images`` is empty.
    """
    if not images:
        raise ValueError("Argument 'images' is empty: no analysis image to draw")
    series_numbers = series_numbers or {}
    cols = max(1, min(columns or SHEET_COLUMNS, len(images)))
    width, height = contact_sheet_size(len(images), tile=tile, columns=columns)
    sheet = Image.new("L", (width, height), 24)
    draw = ImageDraw.Draw(sheet)
    big, small = _font(14), _font(11)
    draw.text((SHEET_MARGIN, 4), title, fill=255, font=big)
    boxes = "  ·  box: the LV square a zoom: lv question crops to" if any(im.roi for im in images) else ""
    draw.text((SHEET_MARGIN, 22), f"Study {study_uid or '?'}  ·  {len(images)} images{boxes}", fill=190, font=small)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x = SHEET_MARGIN + c * (tile + SHEET_GAP)
        y = SHEET_HEADER + r * (tile + SHEET_LABEL + SHEET_GAP)
        pic = Image.open(io.BytesIO(base64.b64decode(im.png_b64))).convert("L")
        sheet.paste(pic.resize((tile, tile), Image.Resampling.LANCZOS), (x, y))
        if im.roi is not None:  # the square a `zoom: lv` question crops to
            sx, sy = tile / pic.width, tile / pic.height
            left, top, right, bottom = im.roi
            draw.rectangle((x + left * sx, y + top * sy, x + right * sx - 1, y + bottom * sy - 1), outline=255)
        number = series_numbers.get(im.source.series_instance_uid)
        where = f"series {number}" if number is not None else f"series …{im.source.series_instance_uid[-8:]}"
        if im.source.frame_number is not None:
            where += f", frame {im.source.frame_number}"
        draw.text((x, y + tile + 2), im.key, fill=255, font=small)
        draw.text((x, y + tile + 15), where, fill=170, font=small)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG", optimize=True)
    return out


# ---------------------------------------------------------------------------- text output


def _slices_text(s: SeriesReport) -> str:
    return " ".join(f"{k[0]}{v}" for k, v in s.chosen_slices.items())


def print_report(report: StudyReport, console=None) -> None:
    """Print the report as tables (rich): series, then skipped files, file problems, limitations, images."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=170)
    console.print(Text(f"Study {report.study_instance_uid or '?'}  ({report.study_dir}, {report.n_files} files)",
                       style="bold"))
    t = Table(show_lines=False)
    for name, kw in (("#", dict(justify="right")), ("description", {}), ("view", {}),
                     ("conf", dict(justify="right")), ("slices×phases", dict(justify="right")),
                     ("ED/ES", {}), ("chosen slices", {}), ("used", {}), ("first reason", dict(max_width=70))):
        t.add_column(name, **kw)
    for s in report.series:
        ed_es = f"{s.ed_phase}/{s.es_phase}" if s.ed_phase is not None else ""
        t.add_row(Text("" if s.series_number is None else str(s.series_number)), Text(s.description),
                  Text(s.view), Text(f"{s.confidence:.2f}"), Text(f"{s.n_slices}×{s.n_phases}"), Text(ed_es),
                  Text(_slices_text(s)), Text("yes" if s.used else "no", style="green" if s.used else "yellow"),
                  Text(s.reasons[0] if s.reasons else ""))
    console.print(t)
    sections = (
        ("Skipped files", [f"{s.path}: {s.reason}" for s in report.skipped]),
        ("File problems", [f"{p.path}: {p.reason}" for p in report.file_problems]),
        ("Limitations", list(report.limitations)),
        ("What the model sees", [f"{i.key}: series {i.series_number}, SOP {i.sop_instance_uid}"
                                 + (f", frame {i.frame_number}" if i.frame_number is not None else "")
                                 + (f", LV square {i.roi}" if i.roi is not None else "")
                                 for i in report.images]),
    )
    for heading, lines in sections:
        if lines:
            console.print(Text(f"\n{heading} ({len(lines)})", style="bold"))
            for line in lines:
                console.print(Text(f"  {line}"))
    if report.error:
        console.print(Text(f"\nNot analysable: {report.error}", style="bold red"))
