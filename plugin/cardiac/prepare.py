"""Pick phases and slices from the classified series and render the analysis images.

What is rendered (keys of the :class:`~worker.bundle.BundleImage` s):

- SAX: basal, mid and apical slices (25 %, 50 %, 75 % along the stack, base → apex,
  after dropping end slices where no LV blood pool is found at ED) at end-diastole
  and end-systole: ``SAX_basal_ED``, ``SAX_basal_ES``, ``SAX_mid_ED`` … ``SAX_apical_ES``.
  Each pair carries the LV region found on its ED image (``roi``, :func:`lv_roi`), which a
  template question with ``zoom: lv`` crops to.
- each long-axis view present: ``2CH_ED``, ``2CH_ES``, ``3CH_ED`` … ``4CH_ES``.

:func:`prepare_images` returns the images and the limitations; :func:`prepare_study`
(which it wraps) also says what was chosen per view (:class:`Selection`: series,
ED/ES phase indices and how ES was found, basal/mid/apical slice indices), for
``cmr-ai inspect``.

Phases. ED is the first phase (smallest trigger time: the R wave). ES is the phase
with the smallest LV blood-pool area in the mid SAX slice, searched between 10 %
and 65 % of the cycle: the blood pool is the bright, round connected region near
the image centre after an Otsu threshold, found at ED and then followed at the same
place through the cycle (see :func:`blood_pool`). Other slices use the
frame nearest in trigger time; long-axis series use the same fraction of their own
cycle, or their own blood-pool estimate when there is no SAX stack. When no
contraction can be found, ES falls back to 35 % of the cycle (the middle frame for
a cine without trigger times), and a limitation says so.

Pixels. Only the needed frame of a multi-frame object is decoded
(``pydicom.pixels.pixel_array(path, index=…)``; RLE, JPEG, JPEG-LS and JPEG 2000 via
the pylibjpeg plugins), then ``apply_modality_lut`` and ``apply_voi_lut`` with the
window from the file (per frame for multi-frame objects: Pixel Value Transformation
and Frame VOI LUT functional groups), or a 1–99 % percentile window when the file
has none; MONOCHROME1 is inverted; the result is scaled to 8 bits, resized to
``size`` × ``size`` keeping the physical aspect ratio (PixelSpacing) by padding, and
PNG-encoded.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array

from .masks import components, dilate, erode, otsu
from worker.bundle import BundleImage, SourceRef

from .classify import Classification, Location, apexward, find_stacks, group_locations, unit
from .series import Frame, SeriesInfo, Study, functional_group
from .views import LONG_AXIS, View

log = logging.getLogger(__name__)

RENDER_SIZE = 224
SLICE_LEVELS = (("basal", 0.25), ("mid", 0.50), ("apical", 0.75))
ES_FALLBACK_FRACTION = 0.35
ES_SEARCH = (0.10, 0.65)  # fraction of the cycle searched for the smallest blood pool


class PrepareError(RuntimeError):
    """Nothing analysable in the study; the message names the series and why.

    ``selections`` holds what :func:`prepare_study` had chosen per view before every
    view failed to render (empty when there was no cine to choose from).
    """

    def __init__(self, message: str, *, selections: Optional[dict] = None) -> None:
        super().__init__(message)
        self.selections: dict = dict(selections or {})


# ---------------------------------------------------------------------------- pixels


class FrameReader:
    """Decodes single frames, caching each file's header (read once, without pixels)."""

    def __init__(self) -> None:
        self._headers: dict[str, Dataset] = {}
        self._pixels: dict[tuple[str, Optional[int]], np.ndarray] = {}

    def header(self, path: str) -> Dataset:
        ds = self._headers.get(path)
        if ds is None:
            ds = self._headers[path] = pydicom.dcmread(path, stop_before_pixels=True)
        return ds

    def lut_dataset(self, frame: Frame) -> Dataset:
        """A small dataset holding the Modality LUT and VOI LUT attributes that apply to ``frame``."""
        ds = self.header(frame.path)
        out = Dataset()
        out.PhotometricInterpretation = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        out.BitsStored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        out.PixelRepresentation = int(ds.get("PixelRepresentation", 0))
        sources: list[Dataset] = [ds]
        if frame.frame_number is not None:
            shared_seq = ds.get("SharedFunctionalGroupsSequence")
            shared = shared_seq[0] if shared_seq else None
            per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence") or []
            pf = per_frame_seq[frame.frame_number - 1] if frame.frame_number - 1 < len(per_frame_seq) else None
            for keyword in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
                item = functional_group(pf, shared, keyword)
                if item is not None:
                    sources.insert(0, item)
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
                        "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"):
            for src in sources:
                if keyword in src and src[keyword].value not in (None, ""):
                    out[keyword] = src[keyword]
                    break
        if ("RescaleSlope" in out) != ("RescaleIntercept" in out):
            out.RescaleSlope = out.get("RescaleSlope", 1.0)
            out.RescaleIntercept = out.get("RescaleIntercept", 0.0)
        return out

    def modality(self, frame: Frame) -> np.ndarray:
        """The frame's values after the Modality LUT (float), decoding only that frame."""
        key = (frame.path, frame.frame_number)
        arr = self._pixels.get(key)
        if arr is None:
            index = frame.frame_number - 1 if frame.frame_number is not None else None
            raw = pixel_array(frame.path, index=index)
            if raw.ndim == 3 and index is None:  # a classic file holding several frames: first one
                raw = raw[0]
            arr = np.asarray(apply_modality_lut(raw, self.lut_dataset(frame)), dtype=np.float64)
            self._pixels[key] = arr
        return arr

    def render(self, frame: Frame, size: int = RENDER_SIZE,
               display: Optional["DisplayFrame"] = None) -> Image.Image:
        """8-bit grayscale, windowed, ``size`` × ``size`` (aspect kept by padding).

        With ``display``, the image is flipped/rotated so that the display's ``up`` and
        ``right`` patient directions point up and right on screen, whatever the row and
        column directions the scanner stored (see :class:`DisplayFrame`).
        """
        arr = self.modality(frame)
        lut = self.lut_dataset(frame)
        has_window = "VOILUTSequence" in lut or _window_ok(lut)
        if not has_window:
            for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
                if keyword in lut:
                    del lut[keyword]
            lo, hi = np.percentile(arr, [1.0, 99.0])
            lut.WindowCenter = float(lo + hi) / 2.0
            lut.WindowWidth = max(float(hi - lo), 1.0)
        out = np.asarray(apply_voi_lut(arr, lut), dtype=np.float64)
        y = np.asarray(apply_voi_lut(np.array([-1e30, 1e30]), lut), dtype=np.float64)
        y_lo, y_hi = float(y.min()), float(y.max())
        scale = 255.0 / (y_hi - y_lo) if y_hi > y_lo else 0.0
        img8 = np.clip((out - y_lo) * scale, 0, 255).round().astype(np.uint8)
        if lut.PhotometricInterpretation == "MONOCHROME1":
            img8 = 255 - img8
        img = Image.fromarray(img8, mode="L")
        if display is not None and frame.orientation is not None:
            img = _isotropic(img, frame.pixel_spacing)
            return _fit(display.apply(img, frame.orientation), None, size)
        return _fit(img, frame.pixel_spacing, size)


def _window_ok(lut: Dataset) -> bool:
    if "WindowCenter" not in lut or "WindowWidth" not in lut:
        return False
    try:
        w = lut["WindowWidth"].value
        w = float(w[0] if lut["WindowWidth"].VM > 1 else w)
        float(lut["WindowCenter"].value[0] if lut["WindowCenter"].VM > 1 else lut["WindowCenter"].value)
    except (TypeError, ValueError, IndexError):
        return False
    return math.isfinite(w) and w >= 1.0


@dataclass(frozen=True)
class DisplayFrame:
    """Where patient directions should point on screen, so every vendor's images look alike.

    Conventions (those of CMR reading, SCMR post-processing 2020): short axis seen from
    the apex with the anterior wall up and the septum / right ventricle on the viewer's
    left; long-axis views with the apex up, the lateral (or, in the 2-chamber view,
    the anterior) wall on the right. ``up`` and ``right`` are unit vectors in LPS.
    """

    up: tuple[float, float, float]
    right: tuple[float, float, float]

    @staticmethod
    def ring(axis) -> tuple[np.ndarray, np.ndarray]:
        """(septal, anterior) unit directions perpendicular to the LV axis (the AHA ring of classify)."""
        a = np.asarray(axis, float) / np.linalg.norm(axis)
        s = np.array([-1.0, -1.0, 0.0])  # patient right + anterior
        s = s - (s @ a) * a
        s /= np.linalg.norm(s)
        w = np.cross(a, s)
        if w @ np.array([0.0, -1.0, 1.0]) < 0:  # anterior (-y) and superior (+z)
            w = -w
        return s, w

    @classmethod
    def for_view(cls, view: View, axis, orientation) -> Optional["DisplayFrame"]:
        if axis is None:
            return None
        a = np.asarray(axis, float) / np.linalg.norm(axis)
        septal, anterior = cls.ring(a)
        if view == View.SAX:
            return cls(tuple(anterior), tuple(-septal))
        r, c = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        t = np.cross(np.cross(r, c), a)  # in-plane, perpendicular to the axis
        if np.linalg.norm(t) < 1e-6:
            return None
        t /= np.linalg.norm(t)
        ref = -septal if abs(t @ septal) >= 0.3 else anterior
        return cls(tuple(a), tuple(t if t @ ref >= 0 else -t))

    def apply(self, img: Image.Image, orientation) -> Image.Image:
        """Flip and rotate ``img`` (isotropic pixels) so ``up``/``right`` point up/right on screen."""
        r, c = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        up, right = np.asarray(self.up), np.asarray(self.right)
        u = np.array([up @ r, up @ c])  # in image coordinates: x = column index, y = row index (down)
        v = np.array([right @ r, right @ c])
        if np.linalg.norm(u) < 0.3:  # the wanted "up" is not in this plane: leave the image as stored
            return img
        if v[0] * u[1] - v[1] * u[0] > 0:  # mirror image: flip first
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            u[0], v[0] = -u[0], -v[0]
        angle = math.degrees(math.atan2(u[1], u[0])) + 90.0  # PIL rotates counter-clockwise on screen
        if abs(angle % 360.0) < 1e-6:
            return img
        return img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)


def _isotropic(img: Image.Image, spacing: Optional[tuple[float, float]]) -> Image.Image:
    """Resample so that a pixel is square in mm (rows keep their count)."""
    if not spacing or spacing[0] == spacing[1] or spacing[0] <= 0 or spacing[1] <= 0:
        return img
    row_sp, col_sp = spacing
    w = max(1, round(img.width * col_sp / row_sp))
    return img.resize((w, img.height), Image.Resampling.BICUBIC)


def _fit(img: Image.Image, spacing: Optional[tuple[float, float]], size: int) -> Image.Image:
    rows, cols = img.height, img.width
    row_sp, col_sp = spacing or (1.0, 1.0)
    h_mm, w_mm = rows * row_sp, cols * col_sp
    scale = size / max(h_mm, w_mm)
    w, h = max(1, round(w_mm * scale)), max(1, round(h_mm * scale))
    resized = img.resize((w, h), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(resized, ((size - w) // 2, (size - h) // 2))
    return canvas


# ---------------------------------------------------------------------------- blood pool


@dataclass(frozen=True)
class Pool:
    area: float  # pixels of the original image
    centre: tuple[float, float]  # (row, column) in the original image


def blood_pool(img: np.ndarray, hint: Optional[tuple[float, float]] = None) -> Optional[Pool]:
    """The LV blood pool in a bright-blood cine frame: a simple image-based estimate.

    The image is scaled to ≤ 128 pixels, normalised (1–99.5 % percentiles), thresholded
    with Otsu's method on its central half, eroded once (to cut thin bridges between
    chambers), split into 4-connected regions, and the region chosen: the one at (or
    nearest to) ``hint`` when given — to follow one chamber through the cycle —
    otherwise by size × closeness to the image centre × roundness², so that the round
    LV wins over the crescent-shaped RV. The
    region is dilated back by one pixel inside the threshold mask before it is
    measured. None when no plausible region exists.
    """
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 16:
        return None
    f = max(1, math.ceil(max(img.shape) / 128))
    if f > 1:
        h, w = (img.shape[0] // f) * f, (img.shape[1] // f) * f
        img = img[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))
    lo, hi = np.percentile(img, [1.0, 99.5])
    if hi <= lo:
        return None
    x = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
    h, w = x.shape
    roi = x[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
    mask = x > otsu(roi.ravel())
    labels, n = components(erode(mask))
    if n == 0:
        return None
    idx = np.arange(1, n + 1)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(float)
    yy, xx = np.indices(labels.shape)
    cy = np.bincount(labels.ravel(), weights=yy.ravel(), minlength=n + 1)[1:] / np.maximum(areas, 1)
    cx = np.bincount(labels.ravel(), weights=xx.ravel(), minlength=n + 1)[1:] / np.maximum(areas, 1)
    total = float(h * w)
    ok = (areas >= max(4.0, 0.002 * total)) & (areas <= 0.25 * total)
    if hint is not None:
        hy, hx = hint[0] / f, hint[1] / f
        iy, ix = int(round(hy)), int(round(hx))
        lab = labels[iy, ix] if 0 <= iy < h and 0 <= ix < w else 0
        if lab and ok[lab - 1]:
            chosen = lab
        else:
            d = np.hypot(cy - hy, cx - hx)
            d[~ok] = np.inf
            if not np.isfinite(d).any() or d.min() > 0.15 * max(h, w):
                return None
            chosen = int(idx[np.argmin(d)])
    else:
        # The LV blood pool is round in a short-axis (and oval in a long-axis) image, the
        # RV a crescent: weigh size by closeness to the centre and by roundness (area over
        # the disc reaching the farthest pixel; a crescent does not even contain its centroid).
        d = np.hypot(cy - (h - 1) / 2, cx - (w - 1) / 2)
        r_max = np.zeros(n)
        np.maximum.at(r_max, labels.ravel() - 1, np.where(labels.ravel() > 0,
                      np.hypot(yy.ravel() - cy[labels.ravel() - 1], xx.ravel() - cx[labels.ravel() - 1]), 0.0))
        roundness = np.clip(areas / (np.pi * np.maximum(r_max, 0.5) ** 2), 0.0, 1.0)
        inside = labels[np.clip(np.round(cy).astype(int), 0, h - 1), np.clip(np.round(cx).astype(int), 0, w - 1)] == idx
        roundness = np.where(inside, roundness, 0.3 * roundness)
        score = areas * np.exp(-((d / (0.2 * max(h, w))) ** 2)) * roundness ** 2
        score[~ok] = 0
        if score.max() <= 0:
            return None
        chosen = int(idx[np.argmax(score)])
    region = dilate(labels == chosen) & mask
    ys, xs = np.nonzero(region)
    return Pool(float(len(ys)) * f * f, (float(ys.mean() + 0.5) * f - 0.5, float(xs.mean() + 0.5) * f - 0.5))


#: The LV region (BundleImage.roi) is a square of this many times the square root of the
#: blood-pool area (the cavity's diameter is about 1.13 times it): the cavity and the
#: myocardium around it, little beyond; never smaller than MIN_ROI_FRACTION of the image.
#: Tight on purpose: a pericardial effusion is bright like blood, and in a wider square its
#: ring swayed the demo model's LV function answer (measured on phantoms of EF 0.30–0.42
#: with a 14 mm effusion: squares of 2.4 and 2.0 moved several up or down a category,
#: 1.6 got all fourteen right — README "The demo model").
ROI_SCALE = 1.6
MIN_ROI_FRACTION = 0.2
MAX_ROI_FRACTION = 0.9  # a larger square is no zoom: no roi


def lv_roi(img: Image.Image) -> Optional[tuple[int, int, int, int]]:
    """The LV region of a rendered short-axis end-diastolic image: ``(left, top, right, bottom)``.

    A square of :data:`ROI_SCALE` × √(blood-pool area) centred on the LV blood pool
    (:func:`blood_pool` on the rendered image), moved inside the image where it would
    cross an edge. None when no blood pool is found or the square would cover most of
    the image. The ES image of the same slice is cropped with the same box, so the
    cavity's change between them stays visible.
    """
    gray = np.asarray(img.convert("L"), dtype=np.float64)
    pool = blood_pool(gray)
    if pool is None:
        return None
    h, w = gray.shape
    side = max(ROI_SCALE * math.sqrt(pool.area), MIN_ROI_FRACTION * min(h, w))
    if side > MAX_ROI_FRACTION * min(h, w):
        return None
    side = int(round(side))
    cy, cx = pool.centre
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return (left, top, left + side, top + side)


# ---------------------------------------------------------------------------- phases


@dataclass
class Cine:
    """One cine location's phases in time order, and where ED and ES are."""

    location: Location
    phases: list[Frame]
    timed: bool

    @property
    def times(self) -> list[float]:
        return [f.trigger_time for f in self.phases]  # type: ignore[misc]

    def cycle_ms(self) -> Optional[float]:
        if not self.timed or len(self.phases) < 2:
            return None
        t = self.times
        steps = np.diff(t)
        return float(t[-1] - t[0] + np.median(steps))

    def index_at_fraction(self, frac: float) -> int:
        if self.timed:
            cyc = self.cycle_ms()
            if cyc:
                target = self.times[0] + frac * cyc
                return int(np.argmin([abs(t - target) for t in self.times]))
        return min(len(self.phases) - 1, int(round(frac * len(self.phases))))

    def fraction_of(self, i: int) -> float:
        cyc = self.cycle_ms()
        if cyc:
            return (self.times[i] - self.times[0]) / cyc
        return i / max(1, len(self.phases))

    def nearest(self, trigger_time: Optional[float], index: int) -> Frame:
        if self.timed and trigger_time is not None:
            return min(self.phases, key=lambda f: abs(f.trigger_time - trigger_time))  # type: ignore[operator]
        return self.phases[min(index, len(self.phases) - 1)]


def _cine(loc: Location) -> Cine:
    phases = loc.phases()
    timed = loc.timing == "trigger" and all(f.trigger_time is not None for f in phases)
    return Cine(loc, phases, timed)


def _pool_or_keep(reader: FrameReader, frame: Frame, hint) -> bool:
    """Whether a slice shows an LV blood pool; a frame that cannot be decoded is kept (decided later)."""
    try:
        return blood_pool(reader.modality(frame), hint) is not None
    except Exception as e:  # noqa: BLE001
        log.warning("blood-pool check: %s frame %s cannot be decoded: %s", frame.path, frame.frame_number, e)
        return True


def _guarded(fn, what: str, limitations: list[str]):
    """``fn()``, or None (with a limitation) when a frame it needs cannot be decoded."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        limitations.append(f"{what} skipped: a frame could not be decoded ({type(e).__name__}: {e})")
        return None


def _es_from_images(reader: FrameReader, cine: Cine,
                    hint: Optional[tuple[float, float]] = None) -> Optional[tuple[int, list[Optional[float]]]]:
    """Index of the phase with the smallest blood pool (within ES_SEARCH), and the area curve.

    The pool is found at ED (near ``hint`` when given) and followed through the cycle
    at the ED centre: in a short-axis plane the LV centre hardly moves.
    """
    if len(cine.phases) < 3:
        return None
    ed = blood_pool(reader.modality(cine.phases[0]), hint)
    if ed is None:
        return None
    areas: list[Optional[float]] = [ed.area]
    for f in cine.phases[1:]:
        p = blood_pool(reader.modality(f), ed.centre)
        areas.append(p.area if p else None)
    lo, hi = ES_SEARCH
    cands = [i for i in range(1, len(cine.phases)) if lo <= cine.fraction_of(i) <= hi and areas[i] is not None]
    if not cands:
        return None
    es = min(cands, key=lambda i: areas[i])  # type: ignore[arg-type,return-value]
    if areas[es] >= 0.95 * ed.area:  # type: ignore[operator]
        return None
    return es, areas


# ---------------------------------------------------------------------------- selection


def _best_series(study: Study, classifications: dict[str, Classification], view: View) -> list[SeriesInfo]:
    chosen = [study.series[u] for u, c in classifications.items() if c.view == view and u in study.series]
    return sorted(chosen, key=lambda s: (-classifications[s.uid].confidence, -len(s.frames),
                                         -(s.number or 0)))


def _sax_locations(study: Study, classifications: dict[str, Classification]) -> tuple[list[Location], str]:
    """The SAX stack's cine locations sorted base → apex, and a note on the choice."""
    series = _best_series(study, classifications, View.SAX)
    if not series:
        return [], ""
    per_series = {s.uid: [loc for loc in group_locations(s.frames, s.uid) if loc.is_cine] for s in series}
    locs = [loc for ls in per_series.values() for loc in ls]
    if not locs:
        return [], ""
    # Stacks inside one series first; then one-slice-per-series stacks. A repeated stack is
    # never merged with its repeat.
    stacks = [st for ls in per_series.values() for st in find_stacks(ls)]
    stacks += [st for st in find_stacks([ls[0] for ls in per_series.values() if len(ls) == 1])
               if len(st.series_uids) > 1]
    if stacks:
        number = {s.uid: s.number or 0 for s in series}

        def score(st):
            conf = float(np.mean([classifications[u].confidence for u in st.series_uids]))
            return (len({round(float(loc.centre @ st.normal)) for loc in st.locations}), conf,
                    max(number[u] for u in st.series_uids))
        stack = max(stacks, key=score)
        normal = stack.normal
        # Repeated slices (one series per slice, acquired twice): keep the later series.
        by_pos: dict[int, Location] = {}
        for loc in stack.locations:
            k = round(float(loc.centre @ normal))
            if k not in by_pos or number[loc.series_uid] > number[by_pos[k].series_uid]:
                by_pos[k] = loc
        chosen = list(by_pos.values())
    else:  # a SAX named from its description only: take its planes as they are
        best = series[0].uid
        chosen = [loc for loc in locs if loc.series_uid == best]
        normal = chosen[0].normal
    axis_t = classifications[chosen[0].series_uid].lv_axis
    axis = unit(axis_t) if axis_t is not None else apexward(normal)
    if abs(float(axis @ normal)) < 0.5:
        axis = apexward(normal)
    axis = apexward(axis)
    chosen = sorted(chosen, key=lambda loc: float(loc.centre @ axis))
    uids = list(dict.fromkeys(loc.series_uid for loc in chosen))
    note = ", ".join(study.series[u].label for u in uids[:3]) + (f" and {len(uids) - 3} more" if len(uids) > 3 else "")
    return chosen, note


def _lax_location(study: Study, classifications: dict[str, Classification], view: View) -> Optional[Location]:
    for s in _best_series(study, classifications, view):
        cines = [loc for loc in group_locations(s.frames, s.uid) if loc.is_cine]
        if cines:
            return max(cines, key=lambda loc: len(loc.frames))
    return None


def _image(reader: FrameReader, frame: Frame, key: str, view: View, phase: str, label: str,
           size: int, axis=None) -> BundleImage:
    display = DisplayFrame.for_view(view, axis, frame.orientation) if frame.orientation is not None else None
    img = reader.render(frame, size, display)
    return BundleImage(
        key=key, view=view.value, phase=phase, label=label, png_b64=BundleImage.encode_png(img),
        source=SourceRef(sop_class_uid=frame.sop_class_uid, sop_instance_uid=frame.sop_instance_uid,
                         series_instance_uid=frame.series_instance_uid, frame_number=frame.frame_number,
                         rows=frame.rows, columns=frame.columns))


def _summary(study: Study, classifications: dict[str, Classification]) -> str:
    parts = [f"{study.series[u].label}: {c.view.value}" for u, c in classifications.items() if u in study.series]
    return "; ".join(parts) if parts else "no MR image series"


@dataclass(frozen=True)
class Selection:
    """What was chosen from one cine view: the series, the phases and (SAX) the slices.

    ``ed_phase`` / ``es_phase`` are 0-based indices into the cine's phases in trigger-time
    order (one per trigger time; for the SAX stack those of the mid slice). ``slices``
    maps ``basal`` / ``mid`` / ``apical`` to 0-based slice indices in the stack ordered
    base → apex (``n_slices`` slices, before end slices without an LV blood pool are
    dropped). ``error`` says why nothing was rendered from the view although it was
    selected (a frame that could not be decoded); the other fields then hold what was
    decided before the failure.
    """

    view: View
    series_uids: tuple[str, ...]
    n_phases: int = 0
    ed_phase: Optional[int] = None
    es_phase: Optional[int] = None
    es_method: str = ""
    n_slices: int = 1
    slices: dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None


@dataclass(frozen=True)
class Preparation:
    """The result of :func:`prepare_study`: images, limitations and what was selected per view."""

    images: list[BundleImage]
    limitations: list[str]
    selections: dict[View, Selection]


def prepare_images(study: Study, classifications: dict[str, Classification], *,
                   size: int = RENDER_SIZE) -> tuple[list[BundleImage], list[str]]:
    """Render the ED/ES images of the SAX stack and of each long-axis view.

    Parameters
    ----------
    study, classifications
        From :func:`load_study` and :func:`classify_study`.
    size
        Edge of the square output images, in pixels.

    Returns
    -------
    tuple
        The images (SAX basal/mid/apical at ED and ES, then 2CH, 3CH, 4CH at ED and ES)
        and the limitations the report should show.

    Raises
    ------
    PrepareError
        No SAX stack and no long-axis cine in the study (the message lists every
        series with its view), or none of their frames could be decoded.
    """
    prepared = prepare_study(study, classifications, size=size)
    return prepared.images, prepared.limitations


def prepare_study(study: Study, classifications: dict[str, Classification], *,
                  size: int = RENDER_SIZE) -> Preparation:
    """:func:`prepare_images`, also returning which series, phases and slices were chosen.

    Returns
    -------
    Preparation
        ``images`` and ``limitations`` exactly as :func:`prepare_images` returns them,
        and a :class:`Selection` for every cine view that was selected (SAX, 2CH, 3CH,
        4CH), including those whose frames could not be decoded.

    Raises
    ------
    PrepareError
        As :func:`prepare_images`.
    """
    reader = FrameReader()
    images: list[BundleImage] = []
    limitations: list[str] = []
    selections: dict[View, Selection] = {}
    axis = next((c.lv_axis for c in classifications.values() if c.lv_axis is not None), None)
    sax, sax_note = _sax_locations(study, classifications)
    lax = {v: _lax_location(study, classifications, v) for v in LONG_AXIS}
    if not sax and not any(lax.values()):
        skipped = f"; {len(study.skipped)} non-image objects skipped" if study.skipped else ""
        raise PrepareError(f"no cine series to analyse (no short-axis stack, no 2CH/3CH/4CH cine) in study "
                           f"{study.study_instance_uid or '?'}: {_summary(study, classifications)}{skipped}")

    es_fraction: Optional[float] = None
    untimed_fallback = False
    if sax:
        sel: dict = dict(view=View.SAX, series_uids=tuple(dict.fromkeys(loc.series_uid for loc in sax)),
                         n_slices=len(sax))
        try:
            cines = [_cine(loc) for loc in sax]
            # The LV at ED in the middle of the stack, then every slice looked at near that
            # centre: drop end slices without an LV blood pool (above the base, below the apex).
            ref = blood_pool(reader.modality(cines[len(cines) // 2].phases[0]))
            hint = ref.centre if ref else None
            found = [_pool_or_keep(reader, c.phases[0], hint) for c in cines]
            first = 0
            if sum(found) >= 3:
                first = found.index(True)
                last = len(found) - 1 - found[::-1].index(True)
                if first or last < len(cines) - 1:
                    log.info("SAX: dropped %d slice(s) without a blood pool at the ends of the stack",
                             first + len(cines) - 1 - last)
                cines = cines[first:last + 1]
            n = len(cines)
            levels = {name: int(frac * (n - 1) + 0.5) for name, frac in SLICE_LEVELS}
            if n >= 3:
                levels["basal"] = min(levels["basal"], levels["mid"] - 1)
                levels["apical"] = min(max(levels["apical"], levels["mid"] + 1), n - 1)
            else:
                levels = {"mid": 0} if n == 1 else {"basal": 0, "apical": 1}
                limitations.append(f"short-axis stack has only {n} slice(s)")
            sel["slices"] = {name: first + levels[name] for name, _frac in SLICE_LEVELS if name in levels}
            mid = cines[levels.get("mid", 0)]
            sel.update(n_phases=len(mid.phases), ed_phase=0)
            est = _guarded(lambda: _es_from_images(reader, mid, hint), f"SAX mid slice ES estimate", limitations)
            if est is not None:
                es_idx = est[0]
                es_fraction = mid.fraction_of(es_idx)
                es_method = "smallest LV blood pool in the mid slice"
            elif mid.timed:
                es_idx = mid.index_at_fraction(ES_FALLBACK_FRACTION)
                es_method = "fallback: 35% of the cardiac cycle"
                limitations.append("ES could not be estimated from the blood pool; used 35% of the cardiac cycle")
            else:
                es_idx = len(mid.phases) // 2
                es_method = "fallback: middle frame (no trigger times)"
                untimed_fallback = True
            sel.update(es_phase=es_idx, es_method=es_method)
            if not mid.timed:
                if untimed_fallback:
                    limitations.append("ED/ES could not be determined (no trigger times); used first and middle "
                                       "frames")
                else:
                    limitations.append("no trigger times in the short-axis stack: ED is the first frame, ES the "
                                       "smallest blood pool")
            es_tt = mid.phases[es_idx].trigger_time
            done: set[int] = set()
            for name, _frac in SLICE_LEVELS:
                i = levels.get(name)
                if i is None or i in done:
                    continue
                errors = []
                # a slice whose frames cannot be decoded is replaced by its nearest decodable neighbour
                for j in (i, i + 1, i - 1, i + 2, i - 2):
                    if not 0 <= j < n or j in done:
                        continue
                    c = cines[j]
                    try:
                        pair = [_image(reader, f, f"SAX_{name}_{phase}", View.SAX, phase, f"SAX {name} {phase}",
                                       size, axis) for phase, f in (("ED", c.phases[0]), ("ES", c.nearest(es_tt, es_idx)))]
                    except Exception as e:  # noqa: BLE001 - truncated / undecodable pixel data
                        errors.append(f"slice {first + j + 1}: {type(e).__name__}: {e}")
                        continue
                    roi = _guarded(lambda: lv_roi(pair[0].to_pil()), f"SAX {name} LV region", limitations)
                    images.extend(im.model_copy(update={"roi": roi}) for im in pair)
                    done.add(j)
                    if j != i:
                        sel["slices"][name] = first + j
                        limitations.append(f"SAX {name}: slice {first + i + 1} could not be decoded "
                                           f"({errors[0]}); used slice {first + j + 1}")
                    break
                else:
                    sel["slices"].pop(name, None)
                    limitations.append(f"SAX {name}: no decodable slice ({'; '.join(errors)})")
            if not any(im.view == View.SAX.value for im in images):
                raise RuntimeError("no slice of the stack could be decoded")
            log.info("SAX from %s: %d slices, levels %s, ES phase %d/%d%s", sax_note, n,  # no quotes: plugin/logsafe.py
                     ", ".join(f"{k} {v}" for k, v in levels.items()), es_idx,
                     len(mid.phases), f" ({es_tt:.0f} ms)" if es_tt is not None else "")
        except Exception as e:  # noqa: BLE001 - a broken file must not hide the long-axis views
            log.warning("SAX stack could not be rendered: %s", e, exc_info=True)
            sel["error"] = f"short-axis stack could not be decoded ({sax_note}: {type(e).__name__}: {e})"
            limitations.append(sel["error"])
            images = [im for im in images if im.view != View.SAX.value]
        selections[View.SAX] = Selection(**sel)
    else:
        limitations.append("no short-axis cine stack found")

    for view in LONG_AXIS:
        loc = lax[view]
        if loc is None:
            limitations.append(f"no {view.value} cine found")
            continue
        c = classifications[loc.series_uid]
        label = study.series[loc.series_uid].label
        sel = dict(view=view, series_uids=(loc.series_uid,))
        try:
            cine = _cine(loc)
            sel.update(n_phases=len(cine.phases), ed_phase=0)
            if es_fraction is not None and cine.timed:
                es_i = cine.index_at_fraction(es_fraction)
                es_method = "same fraction of the cycle as the short-axis ES"
            else:
                est = _guarded(lambda: _es_from_images(reader, cine), f"{view.value} ES estimate", limitations)
                if est is not None:
                    es_i = est[0]
                    es_method = "smallest LV blood pool"
                elif cine.timed:
                    es_i = cine.index_at_fraction(ES_FALLBACK_FRACTION)
                    es_method = "fallback: 35% of the cardiac cycle"
                    limitations.append(f"{view.value}: ES could not be estimated; used 35% of the cardiac cycle")
                else:
                    es_i = len(cine.phases) // 2
                    es_method = "fallback: middle frame (no trigger times)"
                    limitations.append(f"{view.value}: ED/ES could not be determined (no trigger times); used "
                                       "first and middle frames")
            sel.update(es_phase=es_i, es_method=es_method)
            for phase, f in (("ED", cine.phases[0]), ("ES", cine.phases[es_i])):
                images.append(_image(reader, f, f"{view.value}_{phase}", view, phase, f"{view.value} {phase}", size,
                                     axis))
            if c.confidence < 0.5:
                limitations.append(f"{view.value} identified with low confidence ({c.confidence:.2f}) in {label}")
        except Exception as e:  # noqa: BLE001
            log.warning("%s could not be rendered from %s: %s", view.value, label, e, exc_info=True)
            images = [im for im in images if im.view != view.value]
            sel["error"] = f"{view.value} could not be decoded ({label}: {type(e).__name__}: {e})"
            limitations.append(sel["error"])
        selections[view] = Selection(**sel)

    if not any(c.view == View.LGE for c in classifications.values()):
        limitations.append("no LGE series")
    if not images:
        raise PrepareError(f"no image could be rendered from study {study.study_instance_uid or '?'}: "
                           + "; ".join(limitations), selections=selections)
    return Preparation(images, limitations, selections)
