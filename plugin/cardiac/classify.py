"""Which view each series of a cardiac MR study shows: geometry first, text as evidence.

Coordinates are DICOM patient coordinates (LPS: +x patient left, +y posterior,
+z superior). The rule, in the order it is applied:

1. **Localizer.** ImageType contains LOCALIZER; or the description says localizer /
   scout / survey / pilot / loc; or a series that is not a cine has images in
   mutually orthogonal planes (|n1·n2| < 0.2: a 3-plane scout); or a series is a
   single image that is not part of a cine. Localizers are never analysed.
2. **Tissue characterisation** (best effort, first version) from descriptions,
   sequence names and ImageType: LGE (lge, psir, de, mde, delayed, late, viability),
   T1MAP (t1 map, molli, shmolli), T2MAP (t2 map), PERFUSION (perfusion, perf,
   first pass); LGE words on single-phase images with an InversionTime are surer
   (0.9). Without such words a non-cine series with an inversion time and several
   slices is guessed LGE — 0.6 when its images are ≥ 3 parallel planes stepping
   along their normal (one image per position), else 0.4 — and many dynamics at one
   position with (almost) constant trigger delay are guessed PERFUSION (0.4).
3. **Cine.** A location (same plane, same position) is a cine when it holds ≥ 3
   frames with ≥ 3 distinct trigger times spanning ≥ 100 ms (an "untimed" cine: ≥ 5
   frames and no trigger times; its phases are then ordered by temporal index or
   instance number).
4. **Short axis (SAX).** ≥ 3 parallel cine planes (|n1·n2| > 0.98) at distinct
   positions whose centres step along the common normal (principal direction of the
   centres within 25° of the normal). The planes may come from one series or from
   one series per slice. The stack's normal must lie near the LV long axis: within
   37° of the axis found from the long-axis planes when there are ≥ 2, or within
   50° of the population prior ``normalize(+1, -1, -1)`` (the apex points to the
   patient's left, anterior and inferior). The LV long axis is then the stack normal,
   oriented base → apex (flipped so that it has a positive component on the prior).
   (Either test suffices: the axis from only two long-axis planes is not always right.)
5. **LV long axis without a SAX stack.** Long-axis planes all contain the axis, so for
   every pair of non-parallel single-plane cines the intersection direction
   n1 × n2 is a candidate; the candidate (within 60° of the prior) that lies in the
   most planes (|n·d| < 0.3) wins, refined as the direction most orthogonal to the
   normals of those planes (smallest eigenvector of Σ n nᵀ). With a single long-axis
   plane the prior projected into that plane stands in; then the naming is weak and
   a description that names a view decides.
6. **Long axis (2CH / 3CH / 4CH).** A single-plane cine whose plane contains the LV
   long axis a (|n·a| < 0.3) is a long-axis view. Its in-plane transverse direction
   t = a × n (perpendicular to the axis) gives its angle around the axis on a
   reference ring built from the patient axes (the AHA 17-segment ring):

   - septal direction s = the patient's right + anterior, (-1, -1, 0), projected
     perpendicular to a (the septum faces the RV, which lies right and in front);
   - anterior-wall direction w = ± a × s, the sign that points anterior + superior
     (0, -1, +1) (the anterior wall faces the chest wall and the head);
   - angle θ = atan2(t·s, t·w) mod 180°, i.e. measured from the anterior wall towards
     the septum. A plane through the axis cuts two opposite walls, so θ is taken
     mod 180°.

   The standard planes are 60° apart, exactly as the AHA segments they cut:

   ====  ======  ==============================================================
   view  θ       walls cut (AHA)
   ====  ======  ==============================================================
   2CH     0°    anterior / inferior: t points anterior-superior ↔ posterior-inferior
   3CH    60°    anteroseptal / inferolateral, through the LV outflow tract
   4CH   120°    inferoseptal / anterolateral, through the RV: t points mostly
                 right(-anterior) ↔ left(-posterior)
   ====  ======  ==============================================================

   The nearest standard angle within ±25° names the view; outside every tolerance
   the plane is OTHER (unless the description names a view, at low confidence).
   Worked example, the typical axis a = normalize(+0.55, −0.45, −0.70): the 2CH
   transverse direction is (+0.50, −0.50, +0.71) (anterior-superior, a little left),
   the 3CH one (−0.33, −0.89, +0.31), the 4CH one (−0.83, −0.39, −0.40) (right,
   anterior, a little inferior). Patient directions land at: anterior + superior
   30°, anterior 56°, LV outflow tract (right + anterior + superior) 62° (inside
   the 3CH tolerance), right + anterior 90° (the septum, by construction), right 127°.

   **Image content as supporting evidence.** For each single-plane long-axis cine
   one frame is decoded — the first phase (end-diastole), and only that frame of a
   multi-frame object — and resampled onto a 2 mm grid aligned with the LV axis
   (rows along a, apex-wards; columns along t, sign chosen towards the septum s, or
   towards the anterior wall w for planes nearly parallel to the septum). After an
   Otsu threshold (bright blood) the LV cavity is the large bright region nearest
   the image centre; its apex is its most apical row. Bright runs are then followed
   row by row from the apex to the base:

   - *RV*: in the mid-ventricle (10–60 mm from the apex), a second bright run beside
     the LV run on the septal side, 2–20 mm away (the septum) and ≥ 4 mm wide, on
     ≥ 50 % of the rows more than on the lateral side (a symmetric bright rim, such
     as pericardial fluid, is not an RV): "RV blood pool beside the LV, as in a
     4-chamber view".
   - *outflow tract*: beyond 60 mm from the apex, bright blood that is continuous
     (row to row, never jumping outwards by > 6 mm, i.e. not a neighbouring chamber
     merging in) with the LV cavity and reaches > 8 mm beyond the widest mid-LV half
     width on the septal side, ≥ 300 mm² of it: "bright blood leaving the LV base
     towards the aorta, as in a 3-chamber view".
   - neither (≤ 20 % RV rows, < 100 mm² outflow): "as in a 2-chamber view".

   The content names 3CH when there is an outflow tract (a 3-chamber plane also
   grazes the RV), else 4CH when there is an RV, else 2CH; nothing when the signs are
   equivocal, when the lateral side of the LV also shows a bright rim on ≥ 30 % of
   the rows, when no LV blood pool is found, or when the frame cannot be decoded
   (the reason says which). Agreement with the geometric view adds 0.1 to the
   confidence (at most 0.95), disagreement takes 0.1 off; geometry still names the
   view — except when it is ambiguous: θ within 10° of the midpoint between two
   standard planes (30°, 90°, 150°, i.e. > 20° from both), where the content decides
   between those two (confidence 0.55). The thresholds were set on
   :mod:`plugin.phantom` images (96–256 px, with and without pericardial fluid) and
   the test factory: a heuristic for bright-blood (SSFP) cines, deliberately weak
   evidence.
7. **Descriptions as evidence.** SeriesDescription, ProtocolName and SequenceName are
   tokenised (``sBTFE_SA`` → s, btfe, sa; ``LAX_3Ch`` → lax, 3, ch) and matched against
   2CH/3CH/4CH/SAX/LAX/cine/localizer/tissue words. When the description agrees with
   the geometry the confidence is high; when it is blank geometry alone decides;
   when they disagree geometry wins for SAX and long-axis naming and the reason
   says so. A cine that is neither a stack nor a long-axis plane is OTHER unless
   its description names a view.

``Classification.reasons`` lists the evidence in words, e.g. ``"ImageType contains
LOCALIZER"``, ``"12 parallel cine planes stepping 8.0 mm along their normal"``,
``"plane contains the LV long axis (|n·a| = 0.02); θ = 121° on the AHA ring,
1° from 4CH (120°)"``.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from .masks import components, erode, otsu
from .series import Frame, SeriesInfo, Study
from .views import LONG_AXIS, View

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- constants

#: Population prior for the LV long axis, base → apex: patient left, anterior, inferior (LPS).
PRIOR_AXIS = np.array([1.0, -1.0, -1.0]) / math.sqrt(3.0)
#: The septum faces the patient's right and front.
SEPTAL_HINT = np.array([-1.0, -1.0, 0.0]) / math.sqrt(2.0)
#: The anterior wall faces the chest wall and the head.
ANTERIOR_HINT = np.array([0.0, -1.0, 1.0]) / math.sqrt(2.0)
#: Angle of each standard long-axis plane on the AHA ring (degrees from the anterior wall towards the septum).
STANDARD_ANGLES: dict[View, float] = {View.CH2: 0.0, View.CH3: 60.0, View.CH4: 120.0}
ANGLE_TOLERANCE = 25.0  # degrees
LAX_TOLERANCE = 0.3  # |n·axis| for a plane that contains the axis
PARALLEL = 0.98  # |n1·n2| above which planes are parallel
ORTHOGONAL = 0.2  # |n1·n2| below which planes are orthogonal
STACK_VS_LAX_AXIS = 0.8  # |n·a| for a stack normal vs the axis from long-axis planes (~37°)
STACK_VS_PRIOR = math.cos(math.radians(50))
PAIR_VS_PRIOR = math.cos(math.radians(60))
AMBIGUOUS_MARGIN = 10.0  # degrees: θ this close to the midpoint between two standard planes is ambiguous
CONTENT_WEIGHT = 0.1  # confidence added (agreement) or taken off (disagreement) by the image content


@dataclass(frozen=True)
class Classification:
    """The view of one series, how sure we are, and why."""

    view: View
    confidence: float  # 0..1
    reasons: list[str] = field(default_factory=list)
    angle_deg: Optional[float] = None  # long-axis planes: θ on the AHA ring
    lv_axis: Optional[tuple[float, float, float]] = None  # base → apex, LPS, as used for this study


# ---------------------------------------------------------------------------- geometry


def unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    n = np.linalg.norm(v)
    return v / n if n > 1e-9 else v


def apexward(v) -> np.ndarray:
    """``v`` flipped, if needed, to point base → apex (positive on the prior: left, anterior, inferior)."""
    v = unit(v)
    return -v if float(v @ PRIOR_AXIS) < 0 else v


def ring_basis(axis) -> tuple[np.ndarray, np.ndarray]:
    """(anterior-wall direction w, septal direction s), both perpendicular to ``axis``."""
    a = unit(axis)
    s = unit(SEPTAL_HINT - (SEPTAL_HINT @ a) * a)
    w = unit(np.cross(a, s))
    if w @ ANTERIOR_HINT < 0:
        w = -w
    return w, s


def ring_angle(axis, normal) -> float:
    """Angle (0–180°) of a plane containing ``axis`` around it, from the anterior wall towards the septum."""
    a = unit(axis)
    t = unit(np.cross(a, unit(normal)))
    w, s = ring_basis(a)
    return round(math.degrees(math.atan2(float(t @ s), float(t @ w))), 6) % 180.0


def angle_distance(a: float, b: float) -> float:
    """Distance between two plane angles, mod 180°."""
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


def nearest_standard(theta: float) -> tuple[View, float]:
    view = min(STANDARD_ANGLES, key=lambda v: angle_distance(theta, STANDARD_ANGLES[v]))
    return view, angle_distance(theta, STANDARD_ANGLES[view])


@dataclass
class Location:
    """Frames of one series in one plane at one position (a cine, or a single image)."""

    series_uid: str
    normal: np.ndarray
    centre: np.ndarray
    frames: list[Frame]

    @property
    def timing(self) -> Optional[str]:
        """'trigger' (cine with trigger times), 'order' (untimed cine), 'dynamic' or None."""
        n = len(self.frames)
        tts = [f.trigger_time for f in self.frames if f.trigger_time is not None]
        if len(tts) == n and n >= 3:
            distinct = len({round(t, 1) for t in tts})
            if distinct >= 3 and max(tts) - min(tts) >= 100.0 and distinct >= 0.5 * n:
                return "trigger"
            if n >= 10:
                return "dynamic"
            return None
        if not tts and n >= 5:
            return "order"
        return None

    @property
    def is_cine(self) -> bool:
        return self.timing in ("trigger", "order")

    def phases(self) -> list[Frame]:
        """Cine frames in time order, one per trigger time (the first frame where several share one)."""
        out: list[Frame] = []
        seen: set = set()
        for f in sorted(self.frames, key=lambda f: f.time_key):
            key = round(f.trigger_time, 1) if f.trigger_time is not None else (f.temporal_position_index,
                                                                                 f.instance_number, f.frame_number)
            if key in seen:
                continue
            seen.add(key)
            out.append(f)
        return out


def frame_centre(f: Frame) -> Optional[np.ndarray]:
    """Patient coordinates of the image centre (ImagePositionPatient is the top-left pixel's centre)."""
    if f.position is None or f.orientation is None:
        return None
    r = np.asarray(f.orientation[:3], float)
    c = np.asarray(f.orientation[3:], float)
    row_sp, col_sp = f.pixel_spacing or (1.0, 1.0)
    return (np.asarray(f.position, float) + r * (f.columns - 1) / 2.0 * col_sp
            + c * (f.rows - 1) / 2.0 * row_sp)


def group_locations(frames: Iterable[Frame], series_uid: str = "") -> list[Location]:
    """Group frames by plane (|n1·n2| > 0.999) and position (< 1 mm apart)."""
    locs: list[Location] = []
    fast: dict[tuple, Location] = {}
    for f in frames:
        n = f.normal
        c = frame_centre(f)
        if n is None or c is None:
            continue
        key = (tuple(np.round(f.orientation, 3)), tuple(np.round(f.position, 1)))  # type: ignore[arg-type]
        loc = fast.get(key)
        if loc is None:
            for cand in locs:
                if abs(float(cand.normal @ n)) > 0.999 and float(np.linalg.norm(cand.centre - c)) < 1.0:
                    loc = cand
                    break
        if loc is None:
            loc = Location(series_uid or f.series_instance_uid, n, c, [])
            locs.append(loc)
        fast[key] = loc
        loc.frames.append(f)
    return locs


def _parallel_groups(locs: Sequence[Location]) -> list[list[Location]]:
    groups: list[list[Location]] = []
    for loc in locs:
        for g in groups:
            if abs(float(g[0].normal @ loc.normal)) > PARALLEL:
                g.append(loc)
                break
        else:
            groups.append([loc])
    return groups


@dataclass
class Stack:
    """Parallel cine planes stepping along their normal."""

    locations: list[Location]  # sorted along ``normal``
    normal: np.ndarray
    step_mm: float

    @property
    def series_uids(self) -> list[str]:
        return list(dict.fromkeys(loc.series_uid for loc in self.locations))


def find_stacks(locs: Sequence[Location], *, cine: bool = True) -> list[Stack]:
    """Groups of ≥ 3 parallel cine planes at distinct positions whose centres step along the normal.

    ``cine=False``: the same for single-image locations (an LGE stack: one image per position).
    """
    stacks = []
    chosen = [loc for loc in locs if (loc.is_cine if cine else len(loc.frames) == 1)]
    for g in _parallel_groups(chosen):
        if len(g) < 3:
            continue
        n = unit(g[0].normal)
        offsets = np.array([float((loc.centre - g[0].centre) @ n) for loc in g])
        if len({round(o * 2) for o in offsets}) < 3:
            continue
        centres = np.array([loc.centre for loc in g])
        _, _, vt = np.linalg.svd(centres - centres.mean(axis=0))
        if abs(float(vt[0] @ n)) < math.cos(math.radians(25)):
            continue
        order = np.argsort(offsets)
        steps = np.diff(offsets[order])
        steps = steps[steps > 0.25]
        stacks.append(Stack([g[i] for i in order], n, float(np.median(steps)) if len(steps) else 0.0))
    return stacks


def axis_from_planes(normals: Sequence[np.ndarray]) -> Optional[tuple[np.ndarray, list[int]]]:
    """The direction contained in most of the planes (their common intersection), or None."""
    best = None
    for i in range(len(normals)):
        for j in range(i + 1, len(normals)):
            d = np.cross(normals[i], normals[j])
            if np.linalg.norm(d) < 0.2:  # nearly parallel planes: no reliable intersection
                continue
            d = apexward(d)
            if float(d @ PRIOR_AXIS) < PAIR_VS_PRIOR:
                continue
            inliers = [k for k, n in enumerate(normals) if abs(float(n @ d)) < LAX_TOLERANCE]
            score = (len(inliers), float(d @ PRIOR_AXIS))
            if best is None or score > best[0]:
                best = (score, d, inliers)
    if best is None:
        return None
    _, d, inliers = best
    m = sum(np.outer(normals[k], normals[k]) for k in inliers)
    w, v = np.linalg.eigh(m)
    axis = apexward(v[:, 0])
    return axis, inliers


# ---------------------------------------------------------------------------- text evidence

_TOKEN_SPLIT = re.compile(r"[^a-z0-9]+")

_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("LOCALIZER", re.compile(r" (localizer|localiser|localizers|loc|scout|survey|smartsurvey|tripilot|pilot|"
                             r"3 pl|3 plane|three plane|plane loc) ")),
    (View.CH2.value, re.compile(r" ((2|two) (ch|chamber|chambers|chb)|vla|2 cv) ")),
    (View.CH3.value, re.compile(r" ((3|three) (ch|chamber|chambers|chb)|lvot|3 cv) ")),
    (View.CH4.value, re.compile(r" ((4|four) (ch|chamber|chambers|chb)|hla|4 cv) ")),
    (View.SAX.value, re.compile(r" (sa|sax|sashort|short axis|shortaxis|sa stack|sax stack|kurzachse) ")),
    ("LAX", re.compile(r" (lax|long axis|longaxis) ")),
    ("CINE", re.compile(r" (cine|trufi|fiesta|btfe|bssfp|ssfp|tf 2 d|tf2d) ")),
    (View.LGE.value, re.compile(r" (lge|psir|de|mde|delayed|late|viability|delayed enhancement|late enhancement|"
                                r"lge psir) ")),
    (View.T1MAP.value, re.compile(r" (t 1 map|t 1 mapping|t 1 maps|molli|shmolli|t 1 molli) ")),
    (View.T2MAP.value, re.compile(r" (t 2 map|t 2 mapping|t 2 maps) ")),
    (View.PERFUSION.value, re.compile(r" (perfusion|perf|first pass|firstpass) ")),
]


def tokens(text: str) -> list[str]:
    """``'sBTFE_SA'`` → ['s', 'btfe', 'sa']; ``'LAX_3Ch'`` → ['lax', '3', 'ch']."""
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)  # camelCase
    text = re.sub(r"([A-Za-z])([0-9])", r"\1 \2", text)
    text = re.sub(r"([0-9])([A-Za-z])", r"\1 \2", text)
    return [t for t in _TOKEN_SPLIT.split(text.lower()) if t]


def text_hints(text: str) -> dict[str, str]:
    """Keyword evidence in ``text``: hint name (a View value, 'LAX', 'CINE', 'LOCALIZER') → matched words."""
    joined = " " + " ".join(tokens(text)) + " "
    out = {}
    for name, pat in _PATTERNS:
        m = pat.search(joined)
        if m:
            out[name] = m.group(1)
    return out


@dataclass
class _Evidence:
    series: SeriesInfo
    locations: list[Location]
    hints: dict[str, str]  # from descriptions / protocol / sequence name
    type_hints: dict[str, str]  # from ImageType

    @property
    def cine(self) -> list[Location]:
        return [loc for loc in self.locations if loc.is_cine]

    def where(self, hint: str) -> str:
        """Which attribute carried the hint, quoted, for a reason string."""
        s = self.series
        for keyword, value in (("SeriesDescription", s.description), ("ProtocolName", s.protocol_name),
                               ("SequenceName", s.sequence_name)):
            if value and hint in text_hints(value):
                return f"{keyword} {value!r}"
        if hint in self.type_hints:
            return f"ImageType {'/'.join(s.image_type)!r}"
        return "description"

    def named(self) -> list[tuple[str, View]]:
        """(attribute and value, view) for each describing attribute that names exactly one cine view."""
        s = self.series
        out = []
        for keyword, value in (("SeriesDescription", s.description), ("ProtocolName", s.protocol_name),
                               ("SequenceName", s.sequence_name)):
            if value:
                h = text_hints(value)
                views = [View(x) for x in (View.CH2.value, View.CH3.value, View.CH4.value, View.SAX.value) if x in h]
                if len(views) == 1:
                    out.append((f"{keyword} {value!r}", views[0]))
        return out

    def desc_view(self) -> Optional[View]:
        """The cine view the text names (SeriesDescription first, then ProtocolName, SequenceName), or None."""
        named = self.named()
        return named[0][1] if named else None

    def weigh(self, view: View, conf: float, reasons: list[str], geometry: str,
              winner: str = "geometry wins") -> float:
        """Add the text's evidence for ``view`` to ``reasons``; return the adjusted confidence."""
        named = self.named()
        agree = [w for w, v in named if v == view]
        disagree = [(w, v) for w, v in named if v != view]
        for w, v in disagree:
            reasons.append(f"{w} suggests {v.value}, but {geometry}: {winner}")
        for w in agree:
            reasons.append(f"{w} agrees ({view.value})")
        if disagree:
            return min(conf, 0.6)
        if agree:
            return max(conf, 0.95)
        if "LAX" in self.hints and view in LONG_AXIS:
            reasons.append(f"{self.where('LAX')} says long axis; view named from geometry")
        else:
            reasons.append("no view in the description: geometry alone")
        return conf


def _orientation_clusters(locs: Sequence[Location]) -> list[np.ndarray]:
    return [g[0].normal for g in _parallel_groups(locs)]


def _fmt_axis(a: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:+.2f}" for x in a) + ")"


# ---------------------------------------------------------------------------- image content

_GRID_MM = 2.0  # resampling step of the axis-aligned grid
_MID_BAND = (10.0, 60.0)  # mm from the apex: mid-ventricular rows searched for an RV beside the LV
_BASAL_FROM = 60.0  # mm from the apex: rows beyond are searched for an outflow tract
_SEPTUM_GAP = (2.0, 20.0)  # mm between the LV run and an RV run (septum and walls)
_RV_MIN_WIDTH = 4.0  # mm
_RV_PRESENT = 0.5  # fraction of mid-ventricular rows with an RV run (more than on the lateral side)
_RV_ABSENT = 0.2
_RIM = 0.3  # fraction of rows with a bright run beside the lateral LV wall too: equivocal
_OUTFLOW_MARGIN = 8.0  # mm beyond the widest mid-LV half width
_OUTFLOW_PRESENT = 300.0  # mm²
_OUTFLOW_ABSENT = 100.0  # mm²
_JUMP_MM = 6.0  # a run widening outwards by more than this from one row to the next has merged with a neighbour


@dataclass(frozen=True)
class ContentEvidence:
    """What one decoded long-axis frame shows (see the module docstring, "Image content")."""

    view: Optional[View]  # 2CH / 3CH / 4CH the content suggests, or None (no evidence)
    reason: str  # begins with "content", for Classification.reasons
    rv_fraction: float = 0.0  # septal-side RV rows minus lateral-side rows, mid-ventricle
    outflow_mm2: float = 0.0  # LV-continuous bright blood beyond the LV outline, basal


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) column pairs of the True runs of a boolean row, end exclusive."""
    d = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
    return list(zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist()))


def _touch(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def decode_frame(frame: Frame) -> tuple[np.ndarray, str]:
    """One frame's stored values (float) and Photometric Interpretation, decoding only that frame."""
    out = Dataset()
    index = frame.frame_number - 1 if frame.frame_number is not None else None
    arr = pixel_array(frame.path, index=index, ds_out=out)
    if arr.ndim != 2:
        raise ValueError(f"expected one grayscale frame, got an array of shape {arr.shape}")
    return np.asarray(arr, dtype=np.float64), str(out.get("PhotometricInterpretation", "MONOCHROME2"))


def _axis_grid(img: np.ndarray, photometric: str, frame: Frame,
               axis: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray, bool]]:
    """Resample the frame onto a grid: rows along the LV axis (apex-wards), columns along t.

    t = n × a, signed towards the septum (or the anterior wall when the plane is nearly
    parallel to the septum: then ``septal`` is False). Values normalised to 0..1
    (1–99.5 % percentiles), bright blood high whatever the Photometric Interpretation.
    """
    if frame.orientation is None or frame.position is None:
        return None
    r = np.asarray(frame.orientation[:3], float)
    c = np.asarray(frame.orientation[3:], float)
    n = unit(np.cross(r, c))
    a = unit(axis - float(axis @ n) * n)
    w, s = ring_basis(axis)
    t = unit(np.cross(n, a))
    septal = abs(float(t @ s)) >= 0.25
    if float(t @ (s if septal else w)) < 0:
        t = -t
    lo, hi = np.percentile(img, [1.0, 99.5])
    if hi <= lo:
        return None
    x = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
    if photometric.upper() == "MONOCHROME1":
        x = 1.0 - x
    rows, cols = x.shape
    row_sp, col_sp = frame.pixel_spacing or (1.0, 1.0)
    centre = frame_centre(frame)
    half = 0.5 * max(rows * row_sp, cols * col_sp)
    g = np.arange(-half, half + 1e-6, _GRID_MM)
    d = centre + g[:, None, None] * a + g[None, :, None] * t - np.asarray(frame.position, float)
    i = np.rint(d @ c / row_sp).astype(int)
    j = np.rint(d @ r / col_sp).astype(int)
    inside = (i >= 0) & (i < rows) & (j >= 0) & (j < cols)
    grid = np.zeros(i.shape)
    grid[inside] = x[i[inside], j[inside]]
    return grid, g, septal


def _track(mask: np.ndarray, g: np.ndarray, i_apex: int, j0: int) -> tuple[float, float]:
    """Follow bright runs from the apex row to the base on one side (columns increasing from ``j0``).

    A run continues the LV (or RV) when it touches an LV (RV) run of the previous row
    and no RV (LV) run; a new run 2–20 mm beside the LV run in the mid-ventricle starts
    an RV. Returns (fraction of mid-ventricular rows with an RV run beside the LV run,
    outflow area in mm²: LV-continuous bright blood beyond the LV outline, basal rows).
    """
    step = _GRID_MM
    apex_u = g[i_apex]
    lvs: list[tuple[int, int]] = []
    rvs: list[tuple[int, int]] = []
    half_width = 0.0
    band_rows = rv_rows = 0
    outflow = 0.0
    for i in range(i_apex, -1, -1):
        u = g[i]
        from_apex = apex_u - u
        runs = _runs(mask[i])
        new_lv: list[tuple[int, int]] = []
        new_rv: list[tuple[int, int]] = []
        for run in runs:
            lv_parent = [q for q in lvs if _touch(run, q)]
            rv_parent = [q for q in rvs if _touch(run, q)]
            if lv_parent and not rv_parent:
                jumped = run[1] > max(q[1] for q in lv_parent) + round(_JUMP_MM / step)
                if not jumped or from_apex <= _BASAL_FROM:
                    new_lv.append(run)
            elif rv_parent and not lv_parent:
                new_rv.append(run)
            elif not lv_parent and not rv_parent and not lvs and run[0] - 1 <= j0 < run[1] + 1:
                new_lv.append(run)  # the LV at the apex
        if _MID_BAND[0] <= from_apex <= _MID_BAND[1] and new_lv:
            lv_run = min(new_lv, key=lambda q: 0 if q[0] <= j0 < q[1] else min(abs(q[0] - j0), abs(q[1] - j0)))
            half_width = max(half_width, (lv_run[1] - 1 - j0) * step)
            band_rows += 1
            for run in runs:
                gap = (run[0] - lv_run[1]) * step
                if (run not in new_lv and run not in new_rv and run[0] >= lv_run[1]
                        and _SEPTUM_GAP[0] <= gap <= _SEPTUM_GAP[1] and (run[1] - run[0]) * step >= _RV_MIN_WIDTH):
                    new_rv.append(run)
            if any(q[0] >= lv_run[1] for q in new_rv):
                rv_rows += 1
        if from_apex > _BASAL_FROM and band_rows:
            limit = j0 + int(round((half_width + _OUTFLOW_MARGIN) / step))
            outflow += sum(max(0, e - max(b, limit)) for b, e in new_lv) * step * step
        lvs, rvs = new_lv, new_rv
        if not lvs and not rvs and from_apex > _MID_BAND[0]:
            break
    return (rv_rows / band_rows if band_rows else 0.0), outflow


def content_evidence(frame: Frame, axis: Sequence[float]) -> ContentEvidence:
    """Read one long-axis frame for an RV beside the LV and an LV outflow tract; never raises.

    Parameters
    ----------
    frame
        The frame to look at (the end-diastolic phase of the cine); its ``path`` and
        ``frame_number`` say what to decode.
    axis
        The LV long axis, base → apex, as used for the geometric naming.

    Returns
    -------
    ContentEvidence
        ``view`` None (and the reason why) when the content says nothing clear.
    """
    try:
        img, photometric = decode_frame(frame)
    except Exception as e:  # noqa: BLE001 - any decoder failure means: no content evidence
        where = f"frame {frame.frame_number} of " if frame.frame_number is not None else ""
        return ContentEvidence(None, f"content: the ED frame ({where}{frame.path}) could not be decoded "
                                     f"({type(e).__name__}: {e}); no content evidence")
    try:
        return _content_from_pixels(img, photometric, frame, unit(np.asarray(axis, float)))
    except Exception as e:  # noqa: BLE001 - a content check must never stop the classification
        log.warning("content check failed on %s: %s", frame.path, e, exc_info=True)
        return ContentEvidence(None, f"content: check failed ({type(e).__name__}: {e}); no content evidence")


def _content_from_pixels(img: np.ndarray, photometric: str, frame: Frame, axis: np.ndarray) -> ContentEvidence:
    grid = _axis_grid(img, photometric, frame, axis)
    if grid is None:
        return ContentEvidence(None, "content: flat image or no geometry; no content evidence")
    x, g, septal = grid
    central = np.abs(g) <= 60.0
    if central.sum() < 8:
        return ContentEvidence(None, "content: field of view too small; no content evidence")
    eroded = erode(x > otsu(x[np.ix_(central, central)].ravel()))
    labels, k = components(eroded)
    uu, vv = np.meshgrid(g, g, indexing="ij")
    flat = labels.ravel()
    count = np.bincount(flat, minlength=k + 1)[1:].astype(float)
    cu = np.bincount(flat, uu.ravel(), k + 1)[1:] / np.maximum(count, 1)
    cv = np.bincount(flat, vv.ravel(), k + 1)[1:] / np.maximum(count, 1)
    area = count * _GRID_MM ** 2
    # the LV: a large bright region near the image centre
    score = area * np.exp(-(np.hypot(cu, cv) / 60.0) ** 2) * (area >= 300.0)
    if not k or score.max() <= 0:
        return ContentEvidence(None, "content: no LV blood pool found near the image centre; no content evidence")
    lv = labels == int(np.argmax(score)) + 1
    i_apex = int(np.nonzero(lv.any(axis=1))[0].max())
    v0 = float(vv[lv & (uu >= g[i_apex] - 10.0)].mean())
    j0 = int(np.argmin(np.abs(g - v0)))
    n = len(g)
    plus = _track(eroded, g, i_apex, j0)
    minus = _track(eroded[:, ::-1], g, i_apex, n - 1 - j0)
    if septal:
        rv, rim, outflow = plus[0] - minus[0], minus[0], plus[1]
    else:  # no septal side in this plane: either side counts, the other is the lateral rim
        rv, rim, outflow = abs(plus[0] - minus[0]), min(plus[0], minus[0]), max(plus[1], minus[1])
    side = "septal" if septal else "one"
    if rim >= _RIM:
        return ContentEvidence(None, f"content: bright rim beside the LV on both sides (pericardial fluid?) on "
                                     f"{100 * rim:.0f} % of rows; no content evidence", rv, outflow)
    if outflow >= _OUTFLOW_PRESENT:
        return ContentEvidence(View.CH3, f"content: bright blood leaving the LV base towards the aorta, as in a "
                                         f"3-chamber view ({outflow:.0f} mm² beyond the LV outline)", rv, outflow)
    if rv >= _RV_PRESENT:
        return ContentEvidence(View.CH4, f"content: RV blood pool beside the LV, as in a 4-chamber view (on the "
                                         f"{side} side, {100 * rv:.0f} % of mid-ventricular rows)", rv, outflow)
    if rv <= _RV_ABSENT and outflow < _OUTFLOW_ABSENT:
        return ContentEvidence(View.CH2, "content: no RV blood pool beside the LV and no outflow tract, as in a "
                                         "2-chamber view", rv, outflow)
    return ContentEvidence(None, f"content: equivocal (RV beside the LV on {100 * rv:.0f} % of mid-ventricular "
                                 f"rows, {outflow:.0f} mm² of possible outflow tract); no content evidence",
                           rv, outflow)


def _between(theta: float) -> Optional[tuple[View, View, float]]:
    """The two standard planes θ lies between when it is within AMBIGUOUS_MARGIN of their midpoint."""
    views = sorted(STANDARD_ANGLES, key=lambda v: angle_distance(theta, STANDARD_ANGLES[v]))
    first, second = views[0], views[1]
    a, b = STANDARD_ANGLES[first], STANDARD_ANGLES[second]
    gap = angle_distance(a, b)
    mid = (a + gap / 2.0) % 180.0 if angle_distance((a + gap / 2.0) % 180.0, b) < gap else (a - gap / 2.0) % 180.0
    if angle_distance(theta, mid) < AMBIGUOUS_MARGIN:
        return first, second, mid
    return None


# ---------------------------------------------------------------------------- classification


def _pre_classify(ev: _Evidence) -> Optional[Classification]:
    """Localizers, tissue characterisation and non-cine series: decided without the LV axis."""
    s = ev.series
    reasons: list[str] = []
    if "LOCALIZER" in s.image_type:
        return Classification(View.LOCALIZER, 0.99, ["ImageType contains LOCALIZER"])
    if "LOCALIZER" in ev.hints:
        return Classification(View.LOCALIZER, 0.9, [f"{ev.where('LOCALIZER')} says localizer "
                                                    f"({ev.hints['LOCALIZER']!r})"])
    tissue = [v for v in (View.LGE, View.T1MAP, View.T2MAP, View.PERFUSION)
              if v.value in ev.hints or v.value in ev.type_hints]
    if tissue:
        v = tissue[0]
        src = ev.hints.get(v.value) or ev.type_hints.get(v.value)
        reasons.append(f"{ev.where(v.value)} indicates {v.value} ({src!r})")
        if len(tissue) > 1:
            reasons.append(f"also mentions {', '.join(t.value for t in tissue[1:])}; took the first")
        conf = 0.8
        if v == View.LGE and not ev.cine:
            tis = sorted({round(f.inversion_time) for f in s.frames if f.inversion_time})
            if tis:
                reasons.append(f"single-phase inversion-recovery images (InversionTime {_fmt_range(tis)} ms) "
                               f"at {len(ev.locations)} position(s)")
                conf = 0.9
        return Classification(v, conf, reasons)
    if not s.frames:
        return Classification(View.OTHER, 0.5, ["no image frames"])
    if not ev.locations:
        return Classification(View.OTHER, 0.3, [f"(0020,0037) Image Orientation (Patient) / (0020,0032) Image "
                                                f"Position (Patient) missing in {s.label}: cannot use geometry"])
    cine = ev.cine
    if not cine:
        normals = _orientation_clusters(ev.locations)
        ortho = any(abs(float(normals[i] @ normals[j])) < ORTHOGONAL
                    for i in range(len(normals)) for j in range(i + 1, len(normals)))
        if ortho:
            return Classification(View.LOCALIZER, 0.9, [f"{len(normals)} orientations, mutually orthogonal "
                                                        f"planes and no cine: a multi-plane scout"])
        if len(s.frames) == 1:
            return Classification(View.LOCALIZER, 0.6, ["a single image, not part of a cine"])
        if any(loc.timing == "dynamic" for loc in ev.locations):
            n = max(len(loc.frames) for loc in ev.locations)
            return Classification(View.PERFUSION, 0.4, [f"{n} dynamics at one position without cine timing "
                                                        f"(trigger delay nearly constant)"])
        if any(f.inversion_time for f in s.frames) and len(ev.locations) >= 2:
            tis = sorted({round(f.inversion_time) for f in s.frames if f.inversion_time})
            reasons = [f"not a cine; inversion-recovery images (InversionTime {_fmt_range(tis)} ms) at "
                       f"{len(ev.locations)} positions"]
            stacks = find_stacks(ev.locations, cine=False)
            if stacks:
                stack = max(stacks, key=lambda st: len(st.locations))
                reasons.append(f"one image per position, {len(stack.locations)} parallel planes stepping "
                               f"{stack.step_mm:.1f} mm along their normal: an LGE stack")
                return Classification(View.LGE, 0.6, reasons)
            return Classification(View.LGE, 0.4, reasons)
        return Classification(View.OTHER, 0.5, [f"not a cine: {len(ev.locations)} positions, no location with "
                                                "≥ 3 distinct trigger times"])
    return None


def _fmt_range(values: Sequence[float]) -> str:
    return f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}–{values[-1]:g}"


def _stack_plausible(stack: Stack, lax_axis: Optional[np.ndarray]) -> tuple[bool, str]:
    """Is the stack's normal near the LV long axis (of the long-axis planes, or the prior)?"""
    c_prior = abs(float(stack.normal @ PRIOR_AXIS))
    prior_ok = c_prior >= STACK_VS_PRIOR
    prior_txt = (f"normal {math.degrees(math.acos(min(1.0, c_prior))):.0f}° from the expected LV long-axis "
                 "direction (left-anterior-inferior)")
    if lax_axis is None:
        return prior_ok, prior_txt
    c = abs(float(stack.normal @ lax_axis))
    lax_txt = f"normal {math.degrees(math.acos(min(1.0, c))):.0f}° from the LV long axis of the long-axis planes"
    if c >= STACK_VS_LAX_AXIS:
        return True, lax_txt
    return prior_ok, f"{lax_txt}, {prior_txt}"


def classify_study(study: Study) -> dict[str, Classification]:
    """Classify every series of ``study`` (see the module docstring for the rule).

    Parameters
    ----------
    study
        From :func:`plugin.cardiac.series.load_study`.

    Returns
    -------
    dict
        SeriesInstanceUID → :class:`Classification`, in series order.
    """
    evidence: dict[str, _Evidence] = {}
    for s in study.ordered():
        evidence[s.uid] = _Evidence(s, group_locations(s.frames, s.uid), text_hints(s.text),
                                    text_hints(" ".join(s.image_type)))
    result: dict[str, Classification] = {}
    pending: list[_Evidence] = []
    for uid, ev in evidence.items():
        c = _pre_classify(ev)
        if c is not None:
            result[uid] = c
        else:
            pending.append(ev)

    # Stacks within a series, then across single-plane series (one series per slice).
    in_series: dict[str, Stack] = {}
    singles: list[_Evidence] = []
    for ev in pending:
        stacks = find_stacks(ev.cine)
        if stacks:
            in_series[ev.series.uid] = max(stacks, key=lambda st: len(st.locations))
        else:
            singles.append(ev)
    single_loc = {ev.series.uid: max(ev.cine, key=lambda loc: len(loc.frames)) for ev in singles}
    cross = [st for st in find_stacks(list(single_loc.values())) if len(st.series_uids) >= 3]

    # LV long axis from the long-axis candidates (single planes not in a cross-series stack).
    in_cross = {uid for st in cross for uid in st.series_uids}
    lax_uids = [uid for uid in single_loc if uid not in in_cross]
    lax_normals = [single_loc[uid].normal for uid in lax_uids]
    from_planes = axis_from_planes(lax_normals) if len(lax_normals) >= 2 else None
    lax_axis = from_planes[0] if from_planes else None

    sax_stacks: list[tuple[Stack, list[str], bool]] = []  # stack, reasons, geometrically plausible
    rejected: dict[str, str] = {}
    for st in list(in_series.values()) + cross:
        ok, why = _stack_plausible(st, lax_axis)
        hinted = any(evidence[u].desc_view() == View.SAX for u in st.series_uids)
        if ok or hinted:
            sax_stacks.append((st, [why] if ok else [why + ", accepted because the description says SAX"], ok))
        else:
            for u in st.series_uids:
                rejected[u] = why

    axis: Optional[np.ndarray] = None
    axis_reason = ""
    if sax_stacks:
        primary = max(sax_stacks, key=lambda x: (x[2], len(x[0].locations)))[0]
        axis = apexward(primary.normal)
        axis_reason = f"LV long axis {_fmt_axis(axis)} = SAX stack normal"
        if lax_axis is not None:
            dev = math.degrees(math.acos(min(1.0, abs(float(axis @ lax_axis)))))
            axis_reason += f" ({dev:.0f}° from the intersection of the long-axis planes)"
    elif lax_axis is not None:
        axis = lax_axis
        axis_reason = (f"LV long axis {_fmt_axis(axis)} from the intersection of {len(from_planes[1])} "  # type: ignore[index]
                       f"long-axis planes (no SAX stack)")
    axis_t = tuple(float(x) for x in axis) if axis is not None else None

    # SAX series.
    for st, why, _ok in sax_stacks:
        spans = len(st.series_uids) > 1
        for u in st.series_uids:
            ev = evidence[u]
            reasons = [f"{len(st.locations)} parallel cine planes stepping {st.step_mm:.1f} mm along their normal"
                       + (f" (one per series, {len(st.series_uids)} series)" if spans else "")] + why
            conf = ev.weigh(View.SAX, 0.8 if not spans else 0.75, reasons, "the geometry is a short-axis stack")
            result[u] = Classification(View.SAX, conf, reasons, None, axis_t)

    # Single-plane cines: long axis or other.
    for ev in pending:
        uid = ev.series.uid
        if uid in result:
            continue
        named_src, named = ev.named()[0] if ev.named() else ("", None)
        if uid in rejected:
            result[uid] = Classification(View.OTHER, 0.5, [f"parallel cine stack, but its {rejected[uid]}: "
                                                           "not a short-axis stack"], None, axis_t)
            continue
        loc = single_loc.get(uid)
        if loc is None:
            result[uid] = Classification(View.OTHER, 0.4, ["cine, but not a stack or a single plane"], None, axis_t)
            continue
        n_planes = len(_orientation_clusters(ev.cine))
        reasons = []
        if n_planes > 1:
            reasons.append(f"{n_planes} cine planes in one series; judged on the one with most frames")
        a = axis
        weak_axis = False
        if a is None:
            a = apexward(PRIOR_AXIS - (PRIOR_AXIS @ loc.normal) * loc.normal)
            weak_axis = True
            reasons.append("only one long-axis plane and no SAX stack: LV axis taken as the population prior "
                           f"projected into the plane {_fmt_axis(a)}")
        else:
            reasons.append(axis_reason)
        dot = abs(float(loc.normal @ a))
        if dot >= LAX_TOLERANCE:
            deg = math.degrees(math.acos(min(1.0, dot)))
            reasons.append(f"single cine plane, |n·a| = {dot:.2f}: does not contain the LV long axis "
                           f"(normal {deg:.0f}° from it)")
            if named is not None:
                reasons.append(f"{named_src} names {named.value}; geometry disagrees, kept at low "
                               "confidence")
                result[uid] = Classification(named, 0.35, reasons, None, axis_t)
            else:
                result[uid] = Classification(View.OTHER, 0.6, reasons, None, axis_t)
            continue
        theta = ring_angle(a, loc.normal)
        view, err = nearest_standard(theta)
        geo = (f"plane contains the LV long axis (|n·a| = {dot:.2f}); θ = {theta:.0f}° on the AHA ring, "
               f"{err:.0f}° from {view.value} ({STANDARD_ANGLES[view]:.0f}°)")
        reasons.append(geo)
        content = content_evidence(loc.phases()[0], a)
        log.debug("%s: %s", ev.series.label, content.reason)
        between = _between(theta)
        if between is not None:
            first, second, mid = between
            # with only the prior axis, a description naming a view decides (below), not the content
            if content.view in (first, second) and not (weak_axis and named in LONG_AXIS):
                reasons.append(f"θ = {theta:.0f}° is within {AMBIGUOUS_MARGIN:.0f}° of the midpoint ({mid:.0f}°) "
                               f"between {first.value} and {second.value}: the image content decides")
                reasons.append(content.reason)
                view = content.view
                conf = ev.weigh(view, 0.55, reasons, f"the geometry is ambiguous and the content says {view.value}",
                                "the content wins")
                if weak_axis:
                    conf = min(conf, 0.6)
                result[uid] = Classification(view, round(conf, 2), reasons, theta, axis_t)
                continue
            reasons.append(f"θ = {theta:.0f}° is between {first.value} and {second.value}; "
                           + content.reason + (" (neither of the two)" if content.view is not None else ""))
            content = ContentEvidence(None, "")
        if err > ANGLE_TOLERANCE:
            reasons[-1] = geo + f": outside ±{ANGLE_TOLERANCE:.0f}°"
            if named is not None and named != View.SAX:
                reasons.append(f"{named_src} names {named.value}: used at low confidence")
                result[uid] = Classification(named, 0.45, reasons, theta, axis_t)
            else:
                result[uid] = Classification(View.OTHER, 0.5, reasons, theta, axis_t)
            continue
        conf = 0.85 - 0.3 * err / ANGLE_TOLERANCE
        if content.view is None:
            if content.reason:
                reasons.append(content.reason)
        elif content.view == view:
            reasons.append(content.reason)
            conf = min(0.95, conf + CONTENT_WEIGHT)
        else:
            reasons.append(f"{content.reason}, but geometry says {view.value}: geometry wins")
            conf -= CONTENT_WEIGHT
        if weak_axis and named in LONG_AXIS and named != view:
            reasons.append(f"{named_src} names {named.value}; the axis is only a prior, so the "
                           "description wins")
            view, conf = named, 0.6
        else:
            conf = ev.weigh(view, conf - (0.25 if weak_axis else 0.0), reasons, f"geometry says {view.value}")
            if weak_axis:
                conf = min(conf, 0.85)
        result[uid] = Classification(view, round(conf, 2), reasons, theta, axis_t)

    for uid, c in result.items():
        log.info("%s: %s (%.2f) — %s", study.series[uid].label, c.view.value, c.confidence, "; ".join(c.reasons))
    return {uid: result[uid] for uid in study.series}
