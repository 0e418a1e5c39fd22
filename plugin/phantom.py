"""Synthetic cardiac MR studies with real geometry (and two non-cardiac negatives).

A 3D thorax is defined in patient coordinates (DICOM LPS, millimetres; PS3.3
C.7.6.2.1.1: +x towards the patient's left, +y posterior, +z head).  Every image is
made by sampling that anatomy on its image plane, so Image Orientation (Patient),
Image Position (Patient), Pixel Spacing and the pixels always agree.  The node
classifies series *from geometry*, so the geometry is the point of this module.

Anatomy (see :class:`CardiacAnatomy`)
    * left ventricle: a truncated prolate ellipsoid blood pool (base plane at the
      ellipsoid centre, apex at the end of the long semi-axis) inside a myocardial
      shell ~9 mm thick at end-diastole.  The long axis :data:`LV_AXIS` points from
      base (posterior, superior, right) to apex (anterior, inferior, left).
    * right ventricle: an ellipsoid on the septal side minus the LV, i.e. a crescent
      towards the patient's right and anterior; left and right atria behind/above
      the base; an aortic root (LV outflow tract) leaving the base towards the
      patient's right and head; optional pericardial effusion (bright fluid shell);
      lungs, liver, spine, descending aorta, chest wall.
    * motion: the apex is fixed, the base descends and the LV blood pool shrinks from
      end-diastole (phase 0) to end-systole (~37 % of the cycle) and relaxes again;
      the myocardial volume is conserved, so the wall thickens in systole.  EDV/ESV
      are measured numerically on a 1 mm grid from the same membership function the
      images are sampled from.

Views (angles about the LV axis, measured in the short-axis plane from the
anterior direction towards the septum, following the AHA 17-segment model,
Cerqueira et al., Circulation 2002):  2CH plane at 0 deg (cuts anterior + inferior walls),
3CH at 60 deg (anteroseptal + inferolateral, contains the aortic root / LVOT),
4CH at 120 deg (inferoseptal + anterolateral, through the RV and both atria).

Vendor styles (``style``):
    ``siemens``  classic MR Image Storage, one file per image, Explicit VR LE.
    ``ge``       classic MR Image Storage, RLE Lossless, blank Series Description.
    ``philips``  each cine series is one Enhanced MR Image Storage object (PS3.3
                 A.36.2) with per-frame functional groups; localizer classic MR.

Variants (keyword options of :func:`write_study`; every default reproduces the style
above byte for byte):
    ``transfer_syntax``  "explicit", "rle", "jpeg-baseline" (Process 1, 8-bit, lossy),
                 "jpeg-extended" (Process 2 & 4, 12-bit, lossy), "jpeg-lossless"
                 (Process 14, SV1), "jpeg-ls" (lossless) or "jpeg2000" (lossless); None
                 keeps the style's own (RLE for ge, Explicit VR Little Endian otherwise).
                 pydicom encodes where it has an encoder (RLE; JPEG-LS with pyjpegls;
                 JPEG 2000 with pylibjpeg-openjpeg); the JPEG processes (and JPEG-LS
                 without pyjpegls) go through dcmtk's ``dcmcjpeg`` / ``dcmcjpls`` on the
                 written file.  SOP Instance UIDs never change on compression.  Lossless
                 encodings are the *same instances* as the uncompressed study (same UIDs,
                 as after a transcoding PACS); the lossy ones are other studies (own
                 UIDs), with Lossy Image Compression "01", ratio and method.  JPEG
                 baseline stores the 12-bit values divided by
                 :data:`JPEG_BASELINE_DIVISOR` in 8 bits (Bits Allocated/Stored 8, High
                 Bit 7, window divided alike), as PS3.5 Table 8.2.1-1 requires; the
                 classic MR Image module (PS3.3 C.8.3.1.1) allows only Bits Allocated 16,
                 so its classic files (localizer; cines of siemens/ge) carry that one
                 dciodvfy error; no valid classic MR object can be JPEG baseline.  Use
                 "jpeg-extended" for a lossy JPEG variant that is valid throughout.
    ``descriptions``  "vendor" (the style's names; GE-like "FIESTA CINE 4CH" … for ge),
                 "blank", or "misleading": the long-axis names are swapped (the 4CH is
                 labelled as the 2CH, the 2CH as the 4CH, the 3CH as the 4CH) so that a
                 test can check that geometry wins.  None keeps the style's own ("blank"
                 for ge, "vendor" otherwise).
    ``legacy_enhanced``  cines (and LGE) as Legacy Converted Enhanced MR Image Storage
                 (PS3.3 A.71) objects, converted from the classic images by highdicom;
                 TriggerTime / InversionTime stay in the Unassigned Per-Frame Converted
                 Attributes.
    ``lge``      adds a late gadolinium enhancement series: the SAX planes, one image
                 per slice, heart at its end-diastolic shape, inversion-recovery
                 contrast (:data:`LGE_IR`: myocardium nulled, blood grey) and, unless
                 ``lge_enhancement=False``, a bright transmural "infarct" in the basal
                 to mid inferolateral wall (AHA segments 5 and 11).  ScanningSequence
                 GR\\IR, InversionTime rising 4 ms per slice (as operators do while the
                 contrast washes out), description "LGE_PSIR_SAX" / blank / "sDE_SA".
    ``view_angles``  override :data:`VIEW_ANGLES_DEG` for some long-axis views, e.g.
                 ``{"4CH": 100}``: an oblique acquisition (the series is still recorded
                 under the intended view in the truth).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    UID,
    generate_uid,
)

__all__ = [
    "DESCRIPTION_MODES",
    "LGE_IR",
    "LV_APEX",
    "LV_AXIS",
    "STYLES",
    "TRANSFER_SYNTAXES",
    "VIEW_ANGLES_DEG",
    "CardiacAnatomy",
    "PhantomTruth",
    "Plane",
    "Tissue",
    "lax_plane",
    "localizer_planes",
    "main",
    "sax_planes",
    "write_brain_mr",
    "write_ct",
    "write_study",
]

STYLES = ("siemens", "ge", "philips")
#: ``transfer_syntax`` option -> Transfer Syntax UID (PS3.5 Annex A).
TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-extended": JPEGExtended12Bit,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg-ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}
#: Lossy transfer syntaxes: a different study (own UIDs), 8-bit pixels.
_LOSSY = frozenset({"jpeg-baseline", "jpeg-extended"})
#: 12-bit phantom values are divided by this for JPEG baseline (8 bits): 1275 -> 255.
JPEG_BASELINE_DIVISOR = 5.0
DESCRIPTION_MODES = ("vendor", "blank", "misleading")


def _unit(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=float)
    return a / np.linalg.norm(a)


#: LV long axis, base -> apex, LPS unit vector.
LV_AXIS: np.ndarray = _unit((0.55, -0.45, -0.70))
_U = LV_AXIS
#: Septal direction: patient right + anterior, projected into the short-axis plane.
_SEPT = _unit(_unit((-1.0, -1.0, 0.0)) - np.dot(_unit((-1.0, -1.0, 0.0)), _U) * _U)
#: Anterior-wall direction in the short-axis plane (left, anterior, superior).
_ANT = np.cross(_SEPT, _U)

#: Rotation of each long-axis plane about the LV axis (degrees from anterior
#: towards septal); the plane contains LV_AXIS and :func:`_sax_dir` (angle).
VIEW_ANGLES_DEG = {"2CH": 0.0, "3CH": 60.0, "4CH": 120.0}

#: Apex of the LV blood pool (endocardial apex), fixed over the cycle, LPS mm.
LV_APEX: np.ndarray = np.array([58.0, -68.0, -58.0])
_APEX = LV_APEX
_A_ED = 80.0  # base-apex length of the LV cavity at ED, mm
_B_ED = 28.0  # short-axis radius of the LV cavity at the base at ED, mm
_WALL_ED = 9.0  # radial wall thickness at ED, mm
_APEX_WALL = 7.0  # apical wall thickness, mm
_BASE_ED = _APEX - _A_ED * _U  # centre of the LV base plane at ED
RR_MS = 1000.0  # heart rate 60/min


def _sax_dir(theta_deg: float) -> np.ndarray:
    """Unit vector in the short-axis plane, ``theta`` from anterior towards septal."""
    t = math.radians(theta_deg)
    return math.cos(t) * _ANT + math.sin(t) * _SEPT


class Tissue(IntEnum):
    """Tissue labels of the phantom; intensities per contrast are tables below."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    SOFT = 4
    LIVER = 5
    BONE = 6
    BLOOD = 7
    MYOCARDIUM = 8
    FLUID = 9


#: bSSFP cine-like signal (arbitrary units, 12-bit range).
BSSFP = np.array([0, 520, 200, 30, 260, 290, 360, 900, 210, 1000], dtype=float)
#: Non-contrast CT, Hounsfield units.
CT_HU = np.array([-1000, -100, 45, -850, 35, 60, 650, 40, 45, 8], dtype=float)
#: Late gadolinium enhancement, magnitude inversion recovery with the myocardium nulled:
#: blood grey, fat bright, normal myocardium black (arbitrary units, 12-bit range).
LGE_IR = np.array([0, 420, 130, 20, 220, 260, 150, 480, 15, 120], dtype=float)
#: Signal of enhancing (infarcted) myocardium on LGE.
LGE_ENHANCED = 1150.0


# ----------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plane:
    """An image plane: PS3.3 C.7.6.2 Image Plane module, in LPS millimetres.

    ``row`` is the direction of increasing column index (first IOP triplet),
    ``col`` that of increasing row index; ``position`` is the centre of the
    top-left pixel; ``spacing`` is (row spacing, column spacing) as in Pixel Spacing.
    """

    row: tuple[float, float, float]
    col: tuple[float, float, float]
    position: tuple[float, float, float]
    spacing: tuple[float, float]
    rows: int
    cols: int

    @classmethod
    def centred(cls, centre: Iterable[float], row: Iterable[float], col: Iterable[float],
                fov_mm: float, size: int) -> "Plane":
        r, c = _unit(list(row)), _unit(list(col))
        c = _unit(c - np.dot(c, r) * r)
        px = fov_mm / size
        pos = np.asarray(list(centre), float) - (size / 2 - 0.5) * px * (r + c)
        return cls(tuple(map(float, r)), tuple(map(float, c)), tuple(map(float, pos)),
                   (px, px), size, size)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.col)

    @property
    def centre(self) -> np.ndarray:
        return (np.asarray(self.position) + (self.rows - 1) / 2 * self.spacing[0] * np.asarray(self.col)
                + (self.cols - 1) / 2 * self.spacing[1] * np.asarray(self.row))

    def points(self) -> np.ndarray:
        """Pixel centres, shape (rows*cols, 3), row-major like the pixel data."""
        i = np.arange(self.rows, dtype=float)[:, None, None] * self.spacing[0]
        j = np.arange(self.cols, dtype=float)[None, :, None] * self.spacing[1]
        p = np.asarray(self.position) + i * np.asarray(self.col) + j * np.asarray(self.row)
        return p.reshape(-1, 3)

    def iop(self) -> list[float]:
        return [round(float(v), 6) for v in (*self.row, *self.col)]

    def ipp(self) -> list[float]:
        return [round(float(v), 4) for v in self.position]


def _ellipsoid_q(p: np.ndarray, centre: np.ndarray, axes: np.ndarray, semi: Sequence[float]) -> np.ndarray:
    """Normalised squared radius of points in an ellipsoid (<=1 inside)."""
    d = (p - centre) @ axes.T
    return ((d / np.asarray(semi, float)) ** 2).sum(axis=1)


def _frame(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    third = np.cross(first, second)
    return np.stack([first, second, third])


# ----------------------------------------------------------------------------------
# anatomy
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _HeartState:
    f: float  # contraction fraction: 0 at ED, 1 at ES
    base: np.ndarray  # centre of LV base plane
    a: float
    b: float
    a_epi: float
    b_epi: float
    descent: float
    rv_scale: float


@dataclass
class CardiacAnatomy:
    """The thorax phantom.  ``ef`` sets the LV blood-pool shrinkage at end-systole.

    Parameters
    ----------
    ef:
        Requested LV ejection fraction (0.05-0.85).
    effusion_mm:
        Thickness of the pericardial fluid shell, 0 for none.
    phases:
        Number of cine phases over one R-R interval (>= 2).
    """

    ef: float = 0.55
    effusion_mm: float = 0.0
    phases: int = 12
    _states: dict[int, _HeartState] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.05 <= self.ef <= 0.85:
            raise ValueError(f"Argument 'ef' must be within [0.05, 0.85], got {self.ef!r}")
        if not 0.0 <= self.effusion_mm <= 40.0:
            raise ValueError(f"Argument 'effusion_mm' must be within [0, 40] mm, got {self.effusion_mm!r}")
        if self.phases < 2:
            raise ValueError(f"Argument 'phases' must be >= 2, got {self.phases!r}")
        # longitudinal shortening, then radial shortening to hit the EF exactly:
        # V = 2/3 pi b^2 a  =>  ESV/EDV = (1-la)(1-rb)^2
        self._la = min(0.15, max(0.02, 0.16 * self.ef))
        self._rb = 1.0 - math.sqrt((1.0 - self.ef) / (1.0 - self._la))
        a_epi, b_epi = _A_ED + _APEX_WALL, _B_ED + _WALL_ED
        self._myo = a_epi * b_epi**2 - _A_ED * _B_ED**2  # conserved (x 2/3 pi)

    # -- timing -----------------------------------------------------------------
    @property
    def es_phase(self) -> int:
        return max(1, min(self.phases - 1, round(0.37 * self.phases)))

    def contraction(self, phase: int) -> float:
        """0 at ED (phase 0), 1 at ES, cosine ejection and cosine filling."""
        es, n = self.es_phase, self.phases
        k = phase % n
        if k <= es:
            return 0.5 * (1.0 - math.cos(math.pi * k / es))
        return 0.5 * (1.0 + math.cos(math.pi * (k - es) / (n - es)))

    def trigger_time_ms(self, phase: int) -> float:
        return round(phase * RR_MS / self.phases, 2)

    def state(self, phase: int) -> _HeartState:
        if phase not in self._states:
            f = self.contraction(phase)
            a = _A_ED * (1.0 - self._la * f)
            b = _B_ED * (1.0 - self._rb * f)
            a_epi = a + _APEX_WALL
            b_epi = math.sqrt((self._myo + a * b * b) / a_epi)
            self._states[phase] = _HeartState(
                f=f, base=_APEX - a * _U, a=a, b=b, a_epi=a_epi, b_epi=b_epi,
                descent=_A_ED - a, rv_scale=1.0 - 0.6 * self.ef * f)
        return self._states[phase]

    # -- membership -------------------------------------------------------------
    def lv_blood(self, p: np.ndarray, phase: int) -> np.ndarray:
        """Boolean mask of the LV blood pool (the volume EF is computed from)."""
        st = self.state(phase)
        d = p - st.base
        t = d @ _U
        r2 = np.einsum("ij,ij->i", d, d) - t * t
        return (t >= 0) & ((t / st.a) ** 2 + r2 / st.b**2 <= 1.0)

    def labels(self, p: np.ndarray, phase: int) -> np.ndarray:
        """Tissue label (:class:`Tissue`) of each point, shape (N,) uint8."""
        st = self.state(phase)
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        lab = np.zeros(len(p), np.uint8)
        # torso: elliptic cylinder with subcutaneous fat and a muscle layer
        torso = ((x / 165.0) ** 2 + ((y - 5.0) / 115.0) ** 2) <= 1.0
        torso &= (z > -300) & (z < 260)
        lab[torso] = Tissue.FAT
        lab[torso & (((x / 153.0) ** 2 + ((y - 5.0) / 103.0) ** 2) <= 1.0)] = Tissue.MUSCLE
        cavity = torso & (((x / 138.0) ** 2 + ((y - 5.0) / 88.0) ** 2) <= 1.0)
        lab[cavity] = Tissue.SOFT
        # lungs (clipped by the diaphragm), liver dome under the right lung
        eye = np.eye(3)
        lung = (_ellipsoid_q(p, np.array([-72.0, 12.0, 20.0]), eye, (62, 86, 125)) <= 1) | (
            _ellipsoid_q(p, np.array([74.0, 14.0, 20.0]), eye, (58, 84, 125)) <= 1)
        lab[cavity & lung & (z > -100)] = Tissue.LUNG
        lab[cavity & (_ellipsoid_q(p, np.array([-35.0, 5.0, -150.0]), eye, (112, 86, 72)) <= 1)] = Tissue.LIVER
        # spine and descending aorta
        lab[torso & ((x**2 + (y - 84.0) ** 2) <= 17.0**2)] = Tissue.BONE
        lab[cavity & (((x - 24.0) ** 2 + (y - 55.0) ** 2) <= 11.0**2) & (z < 70)] = Tissue.BLOOD
        # mediastinal fat around the heart
        med_axes = _frame(_U, _SEPT)
        lab[_ellipsoid_q(p, _BASE_ED + 12.0 * _U + 8.0 * _SEPT, med_axes, (80, 52, 46)) <= 1] = Tissue.FAT

        # heart, in the LV frame of this phase
        d = p - st.base
        t = d @ _U
        r2 = np.einsum("ij,ij->i", d, d) - t * t
        rv_axes = _frame(_U, _sax_dir(100.0))
        rv_c = st.base + 0.3 * st.a * _U + 30.0 * _sax_dir(100.0)
        rv_semi = np.array([0.62 * st.a, 22.0 * st.rv_scale, 46.0 * (0.5 + 0.5 * st.rv_scale)])
        # pericardial effusion: a shell around both ventricles
        e = self.effusion_mm
        if e > 0:
            sac = (t >= -min(e, 6.0)) & (
                ((t / (st.a_epi + e)) ** 2 + r2 / (st.b_epi + e) ** 2 <= 1.0)
                | (_ellipsoid_q(p, rv_c, rv_axes, rv_semi + 3.0 + e) <= 1.0))
            lab[sac] = Tissue.FLUID
        # atria: clipped ellipsoids whose far end is fixed while the base descends
        grow = 0.5 * st.descent
        for c_off, semi, wall_first in (
            ((-20.0 - grow) * _U + 40.0 * _sax_dir(115.0), (28.0 + grow, 22.0, 22.0), True),  # RA
            ((-22.0 - grow) * _U + 8.0 * _sax_dir(240.0), (30.0 + grow, 24.0, 22.0), True),  # LA
        ):
            axes = _frame(_U, _SEPT)
            q_wall = _ellipsoid_q(p, st.base + c_off, axes, np.asarray(semi) + 2.5)
            q_blood = _ellipsoid_q(p, st.base + c_off, axes, semi)
            lab[(q_wall <= 1) & (t < 0)] = Tissue.MYOCARDIUM
            lab[(q_blood <= 1) & (t < 0)] = Tissue.BLOOD
        # aortic root / LVOT: a tube from the anteroseptal base towards right/superior
        v = _unit(-0.8 * _U + 0.6 * _sax_dir(60.0))
        p0 = st.base + 8.0 * _sax_dir(60.0) + 4.0 * _U
        dd = p - p0
        s = dd @ v
        rr = np.einsum("ij,ij->i", dd, dd) - s * s
        tube = (s >= 0) & (s <= 75.0)
        lab[tube & (rr <= 14.5**2)] = Tissue.MYOCARDIUM
        lab[tube & (rr <= 12.0**2)] = Tissue.BLOOD
        # right ventricle: wall, blood; then LV myocardium and blood pool on top
        lab[(t >= 0) & (_ellipsoid_q(p, rv_c, rv_axes, rv_semi + 3.5) <= 1)] = Tissue.MYOCARDIUM
        lab[(t >= 0) & (_ellipsoid_q(p, rv_c, rv_axes, rv_semi) <= 1)] = Tissue.BLOOD
        lab[(t >= 0) & ((t / st.a_epi) ** 2 + r2 / st.b_epi**2 <= 1.0)] = Tissue.MYOCARDIUM
        lab[(t >= 0) & ((t / st.a) ** 2 + r2 / st.b**2 <= 1.0)] = Tissue.BLOOD
        return lab

    # -- volumes ----------------------------------------------------------------
    def lv_volume_ml(self, phase: int, voxel_mm: float = 1.0) -> float:
        """LV blood-pool volume counted on a ``voxel_mm`` LPS grid (voxel centres)."""
        st0 = self.state(0)
        rad = st0.b + 2.0
        lo = np.minimum(st0.base, _APEX) - rad
        hi = np.maximum(st0.base, _APEX) + rad
        axes = [np.arange(lo[i], hi[i], voxel_mm) + voxel_mm / 2 for i in range(3)]
        total = 0
        for zi in np.array_split(axes[2], max(1, len(axes[2]) // 32)):
            g = np.stack(np.meshgrid(axes[0], axes[1], zi, indexing="ij"), -1).reshape(-1, 3)
            total += int(self.lv_blood(g, phase).sum())
        return total * voxel_mm**3 / 1000.0

    def enhancement(self, p: np.ndarray, phase: int = 0) -> np.ndarray:
        """Where LGE shows an infarct: basal to mid inferolateral wall (AHA 5 and 11), transmural.

        A boolean mask over ``p`` of the wedge 215-265 deg on the ring (anterior 0,
        septal 90, inferior 180, inferolateral 240) between 10 % and 60 % of the
        base-apex length; callers intersect it with the myocardium.
        """
        st = self.state(phase)
        d = p - st.base
        t = d @ _U
        theta = np.degrees(np.arctan2(d @ _SEPT, d @ _ANT)) % 360.0
        return (t >= 0.10 * st.a) & (t <= 0.60 * st.a) & (theta >= 215.0) & (theta <= 265.0)

    # -- images -----------------------------------------------------------------
    def render(self, plane: Plane, phase: int, rng: np.random.Generator,
               table: np.ndarray = BSSFP, noise: float = 12.0, coil: bool = True,
               enhance: float | None = None) -> np.ndarray:
        """Sample the anatomy on ``plane``: float image (rows, cols).

        ``enhance``: signal of the myocardium inside :meth:`enhancement` (LGE), or None.
        """
        pts = plane.points()
        lab = self.labels(pts, phase)
        img = table[lab]
        if enhance is not None:
            img = np.where((lab == Tissue.MYOCARDIUM) & self.enhancement(pts, phase), enhance, img)
        if coil:  # anterior surface coil: brighter in front
            img = img * (1.0 + 0.15 * np.clip(-(pts[:, 1] + 20.0) / 120.0, -1.0, 1.0))
        img = _smooth(img.reshape(plane.rows, plane.cols))
        if noise > 0:  # Rician magnitude noise
            n1 = rng.normal(0.0, noise, img.shape)
            n2 = rng.normal(0.0, noise, img.shape)
            img = np.sqrt((img + n1) ** 2 + n2**2)
        return img


def _smooth(img: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 separable blur: a little partial-volume softness."""
    p = np.pad(img, 1, mode="edge")
    h = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4.0
    return (h[:-2] + 2 * h[1:-1] + h[2:]) / 4.0


# ----------------------------------------------------------------------------------
# planes of a CMR exam
# ----------------------------------------------------------------------------------
def sax_planes(slices: int, size: int, fov_mm: float = 300.0) -> tuple[list[Plane], float]:
    """Short-axis planes, base -> apex, perpendicular to LV_AXIS.

    Displayed the usual way (anterior up, septum/RV on the viewer's left), which
    makes the plane normal (row x column) equal to ``-LV_AXIS``.  Returns the planes
    and the spacing between slices.
    """
    if slices < 1:
        raise ValueError(f"Argument 'slices' must be >= 1, got {slices!r}")
    spacing = 10.0 if slices == 1 else min(10.0, 70.0 / (slices - 1))
    mid = _A_ED / 2.0
    planes = []
    for i in range(slices):
        t = mid + (i - (slices - 1) / 2.0) * spacing
        centre = _BASE_ED + t * _U + 15.0 * _SEPT
        planes.append(Plane.centred(centre, -_SEPT, -_ANT, fov_mm, size))
    return planes, spacing


def lax_plane(view: str, size: int, fov_mm: float = 300.0, angle_deg: float | None = None) -> Plane:
    """Long-axis plane containing LV_AXIS, rotated VIEW_ANGLES_DEG[view] about it.

    Apex at the top of the image (column direction = apex -> base).  ``angle_deg``
    overrides the standard angle (an oblique acquisition).
    """
    d = _sax_dir(VIEW_ANGLES_DEG[view] if angle_deg is None else float(angle_deg))
    return Plane.centred(_BASE_ED + 18.0 * _U, -d, -_U, fov_mm, size)


def localizer_planes(size: int, fov_mm: float = 400.0) -> list[tuple[str, Plane]]:
    c = np.round(_BASE_ED + 20.0 * _U)
    return [
        ("TRA", Plane.centred(c, (1, 0, 0), (0, 1, 0), fov_mm, size)),
        ("SAG", Plane.centred(c, (0, 1, 0), (0, 0, -1), fov_mm, size)),
        ("COR", Plane.centred(c, (1, 0, 0), (0, 0, -1), fov_mm, size)),
    ]


# ----------------------------------------------------------------------------------
# truth
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhantomTruth:
    """What a phantom study really contains (written as ``truth.json``)."""

    ef: float
    effusion_mm: float
    edv_ml: float
    esv_ml: float
    ed_phase: int
    es_phase: int
    study_instance_uid: str
    style: str
    lv_axis: tuple[float, float, float]
    series: dict[str, str]  # view ("LOCALIZER","SAX","2CH","3CH","4CH"[,"LGE"]) -> SeriesInstanceUID

    def to_json(self) -> str:
        """The truth, plus ``labels``: the ``cmr_standard`` option ids it implies (:mod:`plugin.labels`)."""
        from plugin.labels import truth_labels

        return json.dumps({**asdict(self), "labels": truth_labels(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PhantomTruth":
        d = json.loads(text)
        d.pop("labels", None)
        d["lv_axis"] = tuple(d["lv_axis"])
        return cls(**d)


# ----------------------------------------------------------------------------------
# DICOM writing
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Vendor:
    manufacturer: str
    model: str
    software: str
    station: str
    field_t: float
    descriptions: dict[str, str]
    sequence_name: str | None
    series_numbers: dict[str, int]
    rle: bool = False
    enhanced: bool = False
    blank_descriptions: bool = False  # the style's default ``descriptions`` is "blank"


_VENDORS = {
    "siemens": _Vendor(
        "SIEMENS", "Aera", "syngo MR E11", "AWP66012", 1.5,
        {"LOCALIZER": "localizer", "SAX": "CINE_segmented_SAX", "2CH": "CINE_segmented_LAX_2Ch",
         "3CH": "CINE_segmented_LAX_3Ch", "4CH": "CINE_segmented_LAX_4Ch", "LGE": "LGE_PSIR_SAX"},
        "*tfi2d1_12", {"LOCALIZER": 1, "2CH": 2, "4CH": 3, "3CH": 4, "SAX": 5, "LGE": 6}),
    "ge": _Vendor(
        "GE MEDICAL SYSTEMS", "SIGNA Artist", "27\\LX\\MR Software release:RX27.0_R04", "GEMR01", 1.5,
        {"LOCALIZER": "3-Plane Loc", "SAX": "FIESTA CINE SAX", "2CH": "FIESTA CINE 2CH",
         "3CH": "FIESTA CINE 3CH", "4CH": "FIESTA CINE 4CH", "LGE": "MDE SAX"},
        None, {"LOCALIZER": 1, "2CH": 2, "4CH": 3, "3CH": 4, "SAX": 5, "LGE": 6}, rle=True,
        blank_descriptions=True),
    "philips": _Vendor(
        "Philips Medical Systems", "Ingenia", "5.7.1\\5.7.1.2", "PHMR01", 1.5,
        {"LOCALIZER": "Survey", "SAX": "sBTFE_SA", "2CH": "sBTFE_2CH", "3CH": "sBTFE_3CH",
         "4CH": "sBTFE_4CH", "LGE": "sDE_SA"},
        None, {"LOCALIZER": 101, "2CH": 201, "4CH": 301, "3CH": 401, "SAX": 501, "LGE": 601}, enhanced=True),
}

#: ``descriptions="misleading"``: which view's name each long-axis series carries.
_MISLEADING = {"2CH": "4CH", "4CH": "2CH", "3CH": "4CH"}


def _descriptions(vendor: _Vendor, mode: str) -> dict[str, str]:
    """SeriesDescription (and ProtocolName) per view for a ``descriptions`` mode."""
    names = dict(vendor.descriptions)
    if mode == "blank":
        return {view: "" for view in names}
    if mode == "misleading":
        names.update({view: vendor.descriptions[shown] for view, shown in _MISLEADING.items()})
    return names


_WINDOW = (450, 1000)  # bSSFP window centre/width
_LGE_WINDOW = (500, 1000)  # LGE window centre/width: blood mid-grey, enhancement white
_LGE_TI_MS = 280.0  # inversion time of the first LGE slice; +4 ms per slice


@dataclass(frozen=True)
class _Contrast:
    """What differs between a bSSFP cine and an LGE acquisition, for the writers."""

    lge: bool = False
    enhancement: bool = True  # LGE only: draw the infarct

    def window(self) -> tuple[int, int]:
        return _LGE_WINDOW if self.lge else _WINDOW

    def render(self, anatomy: "CardiacAnatomy", plane: Plane, phase: int, rng: np.random.Generator) -> np.ndarray:
        if not self.lge:
            return anatomy.render(plane, phase, rng)
        return anatomy.render(plane, phase, rng, table=LGE_IR,
                              enhance=LGE_ENHANCED if self.enhancement else None)

    @staticmethod
    def inversion_time(slice_index: int) -> float:
        return _LGE_TI_MS + 4.0 * slice_index


_CINE = _Contrast()


class _Ctx:
    """Study-level identity: patient, study, frame of reference, deterministic UIDs."""

    def __init__(self, key: str, seed: int, *, patient_id: str | None, description: str,
                 body_part: str, modality_tag: str) -> None:
        self.key = key
        self.seed = seed
        self.patient_id = patient_id or f"PHANTOM{seed:04d}"
        self.patient_name = f"PHANTOM^{modality_tag}^SEED{seed}"
        self.birth_date = f"{1950 + seed % 40:04d}{1 + seed % 12:02d}{1 + seed % 28:02d}"
        self.sex = "MF"[seed % 2]
        self.date = (_dt.date(2024, 3, 4) + _dt.timedelta(days=seed % 300)).strftime("%Y%m%d")
        self.time = "093000"
        self.description = description
        self.body_part = body_part
        self.study_uid = self.uid("study")
        self.for_uid = self.uid("frame-of-reference")
        self.accession = f"ACC{abs(_hash_int(key)) % 10**8:08d}"
        self.study_id = str(1 + seed % 9999)

    def uid(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=[self.key, *map(str, parts)])

    def clock(self, minutes: float) -> str:
        t = _dt.datetime(2000, 1, 1, 9, 30) + _dt.timedelta(minutes=minutes)
        return t.strftime("%H%M%S")


def _hash_int(text: str) -> int:
    """Stable (non-salted) integer hash of ``text``."""
    h = 1469598103934665603
    for ch in text.encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 64)
    return h


def _new_dataset(sop_class: str, sop_uid: str) -> Dataset:
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CMRAI_PHANTOM"
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def _common(ds: Dataset, ctx: _Ctx, vendor: _Vendor | None, *, modality: str, series_uid: str,
            series_number: int, description: str, minutes: float) -> None:
    """Patient, General Study, General Series, Frame of Reference, General Equipment."""
    ds.InstanceCreationDate = ctx.date
    ds.InstanceCreationTime = ctx.clock(minutes)
    ds.StudyDate = ctx.date
    ds.SeriesDate = ctx.date
    ds.AcquisitionDate = ctx.date
    ds.ContentDate = ctx.date
    ds.StudyTime = ctx.time
    ds.SeriesTime = ctx.clock(minutes)
    ds.AcquisitionTime = ctx.clock(minutes)
    ds.ContentTime = ctx.clock(minutes)
    ds.AccessionNumber = ctx.accession
    ds.Modality = modality
    ds.Manufacturer = vendor.manufacturer if vendor else "SIEMENS"
    ds.InstitutionName = "Phantom Hospital"
    ds.ReferringPhysicianName = ""
    ds.StationName = vendor.station if vendor else "PHANTOM01"
    ds.StudyDescription = ctx.description
    ds.SeriesDescription = description
    ds.ManufacturerModelName = vendor.model if vendor else "Phantom"
    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.PatientBirthDate = ctx.birth_date
    ds.PatientSex = ctx.sex
    ds.PatientSize = 1.75
    ds.PatientWeight = 78
    ds.BodyPartExamined = ctx.body_part
    ds.DeviceSerialNumber = "12345"
    ds.SoftwareVersions = vendor.software if vendor else "1.0"
    ds.ProtocolName = description
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ctx.study_id
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = ctx.for_uid
    ds.PositionReferenceIndicator = ""


def _pixels_u16(ds: Dataset, img: np.ndarray, bits_stored: int = 12) -> None:
    arr = np.clip(np.rint(img), 0, (1 << bits_stored) - 1).astype("<u2")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape[-2], arr.shape[-1]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()


def _plane_attrs(ds: Dataset, plane: Plane, thickness: float) -> None:
    ds.SliceThickness = thickness
    ds.ImagePositionPatient = plane.ipp()
    ds.ImageOrientationPatient = plane.iop()
    ds.SliceLocation = round(float(np.dot(plane.centre, plane.normal)), 4)
    ds.PixelSpacing = [round(plane.spacing[0], 6), round(plane.spacing[1], 6)]


def _save(ds: Dataset, path: Path, rle: bool = False, transfer_syntax: str | None = None) -> Path:
    """Write ``ds`` to ``path`` in ``transfer_syntax`` (RLE when ``rle``; else uncompressed).

    The SOP Instance UID is kept whatever the encoding (see :func:`_encode`).
    """
    ts = UID(transfer_syntax) if transfer_syntax else (RLELossless if rle else ExplicitVRLittleEndian)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ts == ExplicitVRLittleEndian:
        ds.save_as(path, enforce_file_format=True)
    else:
        _encode(ds, path, ts)
    return path


def _pydicom_can_encode(ts: UID) -> bool:
    try:
        return bool(get_encoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


#: dcmtk encoders used where pydicom has none: program and its options.  ``+un``:
#: never assign a new SOP Instance UID (dcmcjpeg would for lossy compression).
_DCMTK_ENCODERS: dict[UID, tuple[str, tuple[str, ...]]] = {
    JPEGBaseline8Bit: ("dcmcjpeg", ("+eb", "+q", "90", "+un")),
    JPEGExtended12Bit: ("dcmcjpeg", ("+ee", "+q", "90", "+un")),
    JPEGLosslessSV1: ("dcmcjpeg", ("+e1", "+un")),
    JPEGLSLossless: ("dcmcjpls", ("+el", "+un")),
}


def _dcmtk(program: str) -> str:
    found = shutil.which(program) or (f"/usr/bin/{program}" if Path(f"/usr/bin/{program}").exists() else None)
    if found is None:
        raise RuntimeError(f"dcmtk's {program} is needed for this transfer syntax and was not found on PATH")
    return found


def _to_8bit(ds: Dataset) -> None:
    """Requantise 12-bit pixels to 8 bits for JPEG baseline; windows are scaled alike.

    Values are divided by :data:`JPEG_BASELINE_DIVISOR`; Window Center / Width are
    divided the same way, top level and in Frame VOI LUT functional groups.
    """
    arr = ds.pixel_array.astype(np.float64)
    arr8 = np.clip(np.rint(arr / JPEG_BASELINE_DIVISOR), 0, 255).astype(np.uint8)
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = arr8.tobytes()

    def scale(item: Dataset) -> None:
        for kw in ("WindowCenter", "WindowWidth"):
            if kw in item:
                item[kw].value = round(float(item[kw].value) / JPEG_BASELINE_DIVISOR, 2)

    scale(ds)
    groups = [*(ds.get("SharedFunctionalGroupsSequence") or []), *(ds.get("PerFrameFunctionalGroupsSequence") or [])]
    for group in groups:
        for item in group.get("FrameVOILUTSequence") or []:
            scale(item)


def _encode(ds: Dataset, path: Path, ts: UID) -> None:
    """Compress ``ds`` into ``path``: pydicom's encoder when it has one, else dcmtk's.

    JPEG baseline first requantises to 8 bits (:func:`_to_8bit`; PS3.5 Table 8.2.1-1
    wants Bits Allocated 8, which the classic MR Image module forbids: the one
    dciodvfy error of that variant).  dcmtk records Lossy Image Compression "01" with
    ratio and method for the lossy processes, makes Image Type value 1 DERIVED and
    adds a Derivation Description; multi-frame objects get their Image Type back (it
    must agree with the frames' Frame Type) and lose the top-level Derivation
    Description / Code Sequence, which their IODs do not have.
    """
    if ts == JPEGBaseline8Bit and int(ds.BitsAllocated) != 8:
        _to_8bit(ds)
    if _pydicom_can_encode(ts):
        ds.compress(ts, generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
        return
    if ts not in _DCMTK_ENCODERS:
        raise RuntimeError(f"no encoder for transfer syntax {ts.name} ({ts}): pydicom has none installed "
                           "and dcmtk has no command-line encoder for it")
    program, options = _DCMTK_ENCODERS[ts]
    exe = _dcmtk(program)
    tmp = path.with_name(path.name + ".uncompressed")
    ds.save_as(tmp, enforce_file_format=True)
    try:
        res = subprocess.run([exe, *options, str(tmp), str(path)], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{program} failed on {path.name} ({ts.name}): "
                               f"{(res.stderr or res.stdout).strip()[:500]}")
    finally:
        tmp.unlink(missing_ok=True)
    if "PerFrameFunctionalGroupsSequence" in ds:
        out = pydicom.dcmread(path)
        out.ImageType = ds.ImageType
        for kw in ("DerivationDescription", "DerivationCodeSequence"):
            if kw in out:
                delattr(out, kw)
        out.save_as(path, enforce_file_format=True)


def _mr_cardiac_params(ds: Dataset, vendor: _Vendor, *, cine: bool, phases: int,
                       anatomy: CardiacAnatomy | None, phase: int) -> None:
    """MR Image module (PS3.3 C.8.3.1), bSSFP cine parameters."""
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = ["SK", "SS"]
    ds.ScanOptions = "CG" if cine else ""
    ds.MRAcquisitionType = "2D"
    if vendor.sequence_name:
        ds.SequenceName = vendor.sequence_name if cine else "*tfi2d1_97"
    ds.AngioFlag = "N"
    ds.RepetitionTime = 3.0 if not cine else 40.0
    ds.EchoTime = 1.3
    ds.NumberOfAverages = 1
    ds.ImagingFrequency = 63.68
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = 1
    ds.MagneticFieldStrength = vendor.field_t
    ds.NumberOfPhaseEncodingSteps = 128
    ds.EchoTrainLength = 1
    ds.PercentSampling = 100
    ds.PercentPhaseFieldOfView = 100
    ds.PixelBandwidth = 930
    ds.ReceiveCoilName = "Body18"
    ds.TransmitCoilName = "Body"
    ds.AcquisitionMatrix = [0, 128, 128, 0]
    ds.InPlanePhaseEncodingDirection = "ROW"
    ds.FlipAngle = 60 if cine else 50
    ds.SAR = 0.8
    ds.dBdt = 0
    ds.PatientPosition = "HFS"
    if cine and anatomy is not None:
        ds.TriggerTime = anatomy.trigger_time_ms(phase)
        ds.NominalInterval = int(RR_MS)
        ds.CardiacNumberOfImages = phases
        ds.HeartRate = int(round(60000 / RR_MS))
        ds.BeatRejectionFlag = "N"
        ds.LowRRValue = int(RR_MS * 0.8)
        ds.HighRRValue = int(RR_MS * 1.2)
        ds.IntervalsAcquired = 12
        ds.IntervalsRejected = 0
        ds.TriggerWindow = 10


def _lge_params(ds: Dataset, vendor: _Vendor, anatomy: CardiacAnatomy, slice_index: int) -> None:
    """Segmented inversion-recovery gradient echo (LGE) on top of :func:`_mr_cardiac_params`."""
    ds.ScanningSequence = ["GR", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.ScanOptions = "CG"
    if vendor.sequence_name:
        ds.SequenceName = "*tfl2d1r_23"
    ds.RepetitionTime = 720.0
    ds.EchoTime = 3.3
    ds.InversionTime = _Contrast.inversion_time(slice_index)
    ds.FlipAngle = 25
    ds.TriggerTime = anatomy.trigger_time_ms(0)  # drawn at the end-diastolic shape
    ds.NominalInterval = int(RR_MS)
    ds.CardiacNumberOfImages = 1
    ds.HeartRate = int(round(60000 / RR_MS))


def _classic_datasets(ctx: _Ctx, vendor: _Vendor, anatomy: CardiacAnatomy, *, view: str,
                      items: list[tuple[Plane, int, float]], cine: bool, thickness: float,
                      spacing: float | None, minutes: float, image_type: list[str],
                      description: str | None = None, contrast: _Contrast = _CINE) -> Iterable[Dataset]:
    """One classic MR Image Storage dataset (PS3.3 A.4) per (plane, phase, minute) item."""
    series_uid = ctx.uid("series", view)
    number = vendor.series_numbers[view]
    if description is None:
        description = vendor.descriptions[view]
    for k, (plane, phase, minute) in enumerate(items):
        sop = ctx.uid("sop", view, k)
        ds = _new_dataset(MRImageStorage, sop)
        _common(ds, ctx, vendor, modality="MR", series_uid=series_uid, series_number=number,
                description=description, minutes=minutes)
        ds.AcquisitionTime = ctx.clock(minute)
        ds.ContentTime = ctx.clock(minute)
        ds.ImageType = image_type
        _mr_cardiac_params(ds, vendor, cine=cine, phases=anatomy.phases, anatomy=anatomy, phase=phase)
        if contrast.lge:
            _lge_params(ds, vendor, anatomy, k)
        if spacing is not None:
            ds.SpacingBetweenSlices = round(spacing, 4)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagesInAcquisition = len(items)
        rng = np.random.default_rng([ctx.seed, _hash_int(view) % (1 << 32), k])
        img = contrast.render(anatomy, plane, phase, rng)
        _plane_attrs(ds, plane, thickness)
        _pixels_u16(ds, img)
        ds.WindowCenter, ds.WindowWidth = contrast.window()
        ds.WindowCenterWidthExplanation = "IR" if contrast.lge else "bSSFP"
        yield ds


def _write_classic_series(out: Path, ctx: _Ctx, vendor: _Vendor, anatomy: CardiacAnatomy, *,
                          view: str, items: list[tuple[Plane, int, float]], cine: bool,
                          thickness: float, spacing: float | None, minutes: float,
                          image_type: list[str], description: str | None = None,
                          transfer_syntax: str | None = None, contrast: _Contrast = _CINE) -> list[Path]:
    """One classic MR Image Storage file per (plane, phase) item."""
    folder = out / f"S{vendor.series_numbers[view]:03d}"
    paths = []
    for k, ds in enumerate(_classic_datasets(
            ctx, vendor, anatomy, view=view, items=items, cine=cine, thickness=thickness, spacing=spacing,
            minutes=minutes, image_type=image_type, description=description, contrast=contrast)):
        paths.append(_save(ds, folder / f"IM_{k + 1:04d}.dcm", rle=vendor.rle, transfer_syntax=transfer_syntax))
    return paths


def _write_legacy_series(out: Path, ctx: _Ctx, vendor: _Vendor, anatomy: CardiacAnatomy, *,
                         view: str, items: list[tuple[Plane, int, float]], thickness: float,
                         spacing: float | None, minutes: float, image_type: list[str],
                         description: str | None = None, transfer_syntax: str | None = None,
                         contrast: _Contrast = _CINE) -> Path:
    """One Legacy Converted Enhanced MR Image Storage object (PS3.3 A.71) for a whole series.

    The classic images are built as :func:`_write_classic_series` would write them and
    converted by highdicom (``LegacyConvertedEnhancedMRImage``): attributes that vary
    per frame (TriggerTime, InversionTime, ...) land in the Unassigned Per-Frame
    Converted Attributes Sequence, the rest in the shared one; the Conversion Source
    Attributes Sequence names the (never written) classic instances.
    """
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    classic = list(_classic_datasets(ctx, vendor, anatomy, view=view, items=items, cine=not contrast.lge,
                                     thickness=thickness, spacing=spacing, minutes=minutes,
                                     image_type=image_type, description=description, contrast=contrast))
    number = vendor.series_numbers[view]
    ds = LegacyConvertedEnhancedMRImage(classic, ctx.uid("series", view), number,
                                        ctx.uid("sop", view, "legacy-converted"), 1)
    # Deterministic output: highdicom draws a random Dimension Organization UID.
    dim_uid = ctx.uid("dimension-organization", view, "legacy-converted")
    for item in list(ds.get("DimensionOrganizationSequence") or []) + list(ds.get("DimensionIndexSequence") or []):
        item.DimensionOrganizationUID = dim_uid
    # dciodvfy does not count the Conversion Source Attributes Sequence as a reference,
    # and reports a Referenced Series Sequence without references as an error.
    if "ReferencedSeriesSequence" in ds:
        del ds.ReferencedSeriesSequence
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "CMRAI_PHANTOM"
    return _save(ds, out / f"S{number:03d}" / "IM_0001.dcm", rle=vendor.rle, transfer_syntax=transfer_syntax)


def _item(**kw: object) -> Dataset:
    d = Dataset()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def _heart_code() -> Dataset:
    return _item(CodeValue="80891009", CodingSchemeDesignator="SCT", CodeMeaning="Heart")


def _write_enhanced_series(out: Path, ctx: _Ctx, vendor: _Vendor, anatomy: CardiacAnatomy, *,
                           view: str, planes: list[Plane], thickness: float,
                           spacing: float | None, minutes: float, description: str | None = None,
                           transfer_syntax: str | None = None, contrast: _Contrast = _CINE) -> Path:
    """One Enhanced MR Image Storage object (PS3.3 A.36.2) holding a whole cine series.

    Frames are ordered slice-major (all phases of slice 1, then slice 2 ...); the
    dimensions are Stack ID, In-Stack Position Number and Temporal Position Index.
    An LGE series (``contrast.lge``) has one frame per slice, an inversion-recovery
    pulse sequence and a per-frame MR Modifier group (the inversion time rises per slice).
    """
    series_uid = ctx.uid("series", view)
    number = vendor.series_numbers[view]
    sop = ctx.uid("sop", view, 0)
    ds = _new_dataset(EnhancedMRImageStorage, sop)
    _common(ds, ctx, vendor, modality="MR", series_uid=series_uid, series_number=number,
            description=vendor.descriptions[view] if description is None else description, minutes=minutes)
    lge = contrast.lge
    for kw in ("AcquisitionDate", "AcquisitionTime", "PatientPosition"):
        delattr(ds, kw)
    ds.PatientPosition = "HFS"
    acq_dt = f"{ctx.date}{ctx.clock(minutes)}.000000"
    n_ph = 1 if lge else anatomy.phases
    contrast_kind = "T1" if lge else "UNKNOWN"
    flavor = ["ORIGINAL", "PRIMARY", "CARDIAC_GATED", "NONE"]
    ds.ImageType = flavor
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = vendor.field_t
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.AcquisitionDateTime = acq_dt
    ds.AcquisitionDuration = round(12.0 * len(planes), 1)
    ds.AcquisitionNumber = 1
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = contrast_kind
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    # MR Pulse Sequence module
    ds.PulseSequenceName = "IR_TFE" if lge else "BTFE"
    ds.MRAcquisitionType = "2D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE" if lge else "FREE_PRECESSION"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.NumberOfKSpaceTrajectories = 1
    # Cardiac Synchronization module
    ds.CardiacSynchronizationTechnique = "PROSPECTIVE" if lge else "RETROSPECTIVE"
    ds.CardiacSignalSource = "VCG"
    ds.CardiacRRIntervalSpecified = RR_MS
    ds.CardiacBeatRejectionTechnique = "NONE"
    ds.LowRRValue = int(RR_MS * 0.8)
    ds.HighRRValue = int(RR_MS * 1.2)
    ds.IntervalsAcquired = 12
    ds.IntervalsRejected = 0
    ds.SkipBeats = 0
    ds.CardiacFramingType = "FORW"
    ds.AcquisitionContextSequence = _seq()
    # Multi-frame Dimension module
    dim_uid = ctx.uid("dimension-organization", view)
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=dim_uid))
    ds.DimensionOrganizationType = "3D_TEMPORAL" if len(planes) > 1 else "3D"
    fc = 0x00209111  # FrameContentSequence
    ds.DimensionIndexSequence = _seq(
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=fc, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=fc, DimensionDescriptionLabel="In-Stack Position Number"),
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209128,
              FunctionalGroupPointer=fc, DimensionDescriptionLabel="Temporal Position Index"),
    )
    # Shared functional groups
    pm = _item(PixelSpacing=[round(planes[0].spacing[0], 6), round(planes[0].spacing[1], 6)],
               SliceThickness=thickness)
    if spacing is not None:
        pm.SpacingBetweenSlices = round(spacing, 4)
    shared = _item(
        PixelMeasuresSequence=_seq(pm),
        MRImageFrameTypeSequence=_seq(_item(
            FrameType=flavor, PixelPresentation="MONOCHROME", VolumetricProperties="VOLUME",
            VolumeBasedCalculationTechnique="NONE", ComplexImageComponent="MAGNITUDE",
            AcquisitionContrast=contrast_kind)),
        FrameAnatomySequence=_seq(_item(AnatomicRegionSequence=_seq(_heart_code()),
                                        FrameLaterality="U")),
        PixelValueTransformationSequence=_seq(_item(RescaleIntercept=0, RescaleSlope=1,
                                                    RescaleType="US")),
        FrameVOILUTSequence=_seq(_item(WindowCenter=contrast.window()[0], WindowWidth=contrast.window()[1],
                                       WindowCenterWidthExplanation="IR" if lge else "bSSFP")),
        MRFOVGeometrySequence=_seq(_item(
            InPlanePhaseEncodingDirection="ROW", MRAcquisitionFrequencyEncodingSteps=128,
            MRAcquisitionPhaseEncodingStepsInPlane=128, PercentSampling=100,
            PercentPhaseFieldOfView=100)),
        MREchoSequence=_seq(_item(EffectiveEchoTime=3.0 if lge else 1.3)),
        MRModifierSequence=_seq(_mr_modifier(None)),
        MRImagingModifierSequence=_seq(_item(
            MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
            TransmitterFrequency=63.9, PixelBandwidth=930)),
        MRReceiveCoilSequence=_seq(_item(ReceiveCoilName="dS Torso", ReceiveCoilManufacturerName="Philips", ReceiveCoilType="SURFACE",
                                         QuadratureReceiveCoil="NO")),
        MRTransmitCoilSequence=_seq(_item(TransmitCoilName="B", TransmitCoilManufacturerName="Philips", TransmitCoilType="BODY")),
        MRAveragesSequence=_seq(_item(NumberOfAverages=1)),
    )
    if lge:  # the inversion time changes per slice: MR Modifier goes per frame
        del shared.MRModifierSequence
    ds.SharedFunctionalGroupsSequence = _seq(shared)
    # Per-frame functional groups and pixels
    per_frame, frames = [], []
    rng_key = _hash_int(view) % (1 << 32)
    for s_idx, plane in enumerate(planes):
        for ph in range(n_ph):
            k = s_idx * n_ph + ph
            trig = anatomy.trigger_time_ms(ph)
            frame_dt = f"{ctx.date}{ctx.clock(minutes + s_idx * 0.25)}.{int(trig * 1000) % 1000000:06d}"
            fg = _item(
                FrameContentSequence=_seq(_item(
                    FrameAcquisitionNumber=s_idx + 1,
                    FrameReferenceDateTime=frame_dt, FrameAcquisitionDateTime=frame_dt,
                    FrameAcquisitionDuration=round(RR_MS / n_ph, 3),
                    StackID="1", InStackPositionNumber=s_idx + 1, TemporalPositionIndex=ph + 1,
                    DimensionIndexValues=[1, s_idx + 1, ph + 1])),
                PlanePositionSequence=_seq(_item(ImagePositionPatient=plane.ipp())),
                PlaneOrientationSequence=_seq(_item(ImageOrientationPatient=plane.iop())),
                CardiacSynchronizationSequence=_seq(_item(
                    NominalCardiacTriggerDelayTime=trig, ActualCardiacTriggerDelayTime=trig,
                    NominalPercentageOfCardiacPhase=round(100.0 * ph / n_ph, 2),
                    RRIntervalTimeNominal=RR_MS)),
                MRTimingAndRelatedParametersSequence=_seq(_item(
                    RepetitionTime=6.1 if lge else 2.8, FlipAngle=25 if lge else 60,
                    EchoTrainLength=1, RFEchoTrainLength=1,
                    GradientEchoTrainLength=1,
                    SpecificAbsorptionRateSequence=_seq(_item(
                        SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY",
                        SpecificAbsorptionRateValue=0.8)),
                    GradientOutputType="DB_DT", GradientOutput=0.0,
                    OperatingModeSequence=_seq(*(
                        _item(OperatingModeType=t, OperatingMode="IEC_NORMAL")
                        for t in ("STATIC FIELD", "RF", "GRADIENT"))))),
            )
            if lge:
                fg.MRModifierSequence = _seq(_mr_modifier(_Contrast.inversion_time(s_idx)))
            per_frame.append(fg)
            rng = np.random.default_rng([ctx.seed, rng_key, k])
            frames.append(contrast.render(anatomy, plane, ph, rng))
    ds.PerFrameFunctionalGroupsSequence = _seq(*per_frame)
    ds.NumberOfFrames = len(frames)
    _pixels_u16(ds, np.stack(frames))
    folder = out / f"S{number:03d}"
    return _save(ds, folder / "IM_0001.dcm", transfer_syntax=transfer_syntax)


def _mr_modifier(inversion_time: float | None) -> Dataset:
    """MR Modifier functional group item (PS3.3 C.8.13.5.6); inversion recovery when a TI is given."""
    item = _item(InversionRecovery="NO", FlowCompensation="NONE", T2Preparation="NO",
                 SpatialPresaturation="NONE", SpectrallySelectedExcitation="NONE", PartialFourier="NO",
                 ParallelAcquisition="NO")
    if inversion_time is not None:
        item.InversionRecovery = "YES"
        item.InversionTimes = [inversion_time]
    return item


# ----------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------
def write_study(out_dir: str | Path, *, style: str = "siemens", seed: int = 0, ef: float = 0.55,
                effusion_mm: float = 0.0, slices: int = 8, phases: int = 12, size: int = 128,
                study_description: str = "CMR cardiac function",
                patient_id: str | None = None, transfer_syntax: str | None = None,
                descriptions: str | None = None, legacy_enhanced: bool = False, lge: bool = False,
                lge_enhancement: bool = True,
                view_angles: Mapping[str, float] | None = None,
                on_series: Callable[[str, int, int], None] | None = None) -> PhantomTruth:
    """Write a synthetic CMR study (localizer, SAX cine stack, 2/3/4-chamber cines, optional LGE).

    Parameters
    ----------
    out_dir: folder to write into; one subfolder ``S<series number>`` per series.
    style: "siemens", "ge" or "philips" (see the module docstring).
    seed: drives UIDs, patient identity and noise; same arguments -> same bytes.
    ef: requested LV ejection fraction.  effusion_mm: pericardial fluid thickness.
    slices, phases, size: SAX slices, cine phases, matrix (square).
    transfer_syntax: a key of :data:`TRANSFER_SYNTAXES`, or None for the style's own.
    descriptions: one of :data:`DESCRIPTION_MODES`, or None for the style's own.
    legacy_enhanced: cines (and LGE) as Legacy Converted Enhanced MR Image objects.
    lge: add an LGE series (``truth.series["LGE"]``); ``lge_enhancement``: with an infarct.
    view_angles: oblique long-axis planes, degrees on the AHA ring per view.
    on_series: called as ``on_series(view, written, total)`` after each series is written
        (``cmr-ai phantom`` drives its progress bar with it); it changes no byte.
    (The variants are described in the module docstring.)

    Returns
    -------
    PhantomTruth, also written to ``out_dir/truth.json``; EDV/ESV/EF are measured
    on the sampled anatomy.

    Raises
    ------
    ValueError for an unknown style, option or out-of-range arguments.
    RuntimeError when the encoder a transfer syntax needs is missing (dcmtk).
    """
    if style not in STYLES:
        raise ValueError(f"Argument 'style' must be one of {', '.join(STYLES)}, got {style!r}")
    if not 16 <= size <= 1024:
        raise ValueError(f"Argument 'size' must be within [16, 1024], got {size!r}")
    if transfer_syntax is not None and transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"Argument 'transfer_syntax' must be one of {', '.join(TRANSFER_SYNTAXES)}, "
                         f"got {transfer_syntax!r}")
    if descriptions is not None and descriptions not in DESCRIPTION_MODES:
        raise ValueError(f"Argument 'descriptions' must be one of {', '.join(DESCRIPTION_MODES)}, "
                         f"got {descriptions!r}")
    for view in view_angles or {}:
        if view not in VIEW_ANGLES_DEG:
            raise ValueError(f"Argument 'view_angles' keys must be among {', '.join(VIEW_ANGLES_DEG)}, "
                             f"got {view!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    anatomy = CardiacAnatomy(ef=ef, effusion_mm=effusion_mm, phases=phases)
    vendor = _VENDORS[style]
    ts_key = transfer_syntax or ("rle" if vendor.rle else "explicit")
    desc_mode = descriptions or ("blank" if vendor.blank_descriptions else "vendor")
    key_fields: dict[str, object] = dict(kind="cardiac", style=style, seed=seed, ef=ef, effusion_mm=effusion_mm,
                                         slices=slices, phases=phases, size=size, desc=study_description,
                                         pid=patient_id)
    # Variants that change what the images show are other studies (own UIDs); the
    # defaults add nothing, so default studies keep their bytes.  Lossless transfer
    # syntaxes are the same instances encoded differently, and keep the UIDs.
    if ts_key in _LOSSY:
        key_fields["ts"] = ts_key
    if desc_mode != ("blank" if vendor.blank_descriptions else "vendor"):
        key_fields["descriptions"] = desc_mode
    if legacy_enhanced:
        key_fields["legacy_enhanced"] = True
    if lge:
        key_fields["lge"] = "enhancement" if lge_enhancement else "no enhancement"
    if view_angles:
        key_fields["view_angles"] = {k: float(v) for k, v in view_angles.items()}
    key = json.dumps(key_fields, sort_keys=True)
    ctx = _Ctx(key, seed, patient_id=patient_id, description=study_description,
               body_part="HEART", modality_tag="CARDIAC")
    ts = TRANSFER_SYNTAXES[ts_key] if transfer_syntax else None  # None: the vendor's own (RLE for ge)
    names = _descriptions(vendor, desc_mode)
    sax, sax_spacing = sax_planes(slices, size)
    thickness = 8.0
    angles = dict(view_angles or {})

    # 1. three-plane localizer (classic MR in every style), sampled in diastole
    loc_items = [(pl, 0, 1.0) for _, pl in localizer_planes(size)]
    _write_classic_series(out, ctx, vendor, anatomy, view="LOCALIZER", items=loc_items,
                          cine=False, thickness=10.0, spacing=None, minutes=1.0,
                          image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], description=names["LOCALIZER"],
                          transfer_syntax=ts)
    # 2.-4. long-axis cines, then 5. the SAX stack, then 6. LGE
    order = [("2CH", [lax_plane("2CH", size, angle_deg=angles.get("2CH"))], None, 4.0, _CINE),
             ("4CH", [lax_plane("4CH", size, angle_deg=angles.get("4CH"))], None, 6.0, _CINE),
             ("3CH", [lax_plane("3CH", size, angle_deg=angles.get("3CH"))], None, 8.0, _CINE),
             ("SAX", sax, sax_spacing, 10.0, _CINE)]
    if lge:
        order.append(("LGE", sax, sax_spacing, 25.0, _Contrast(lge=True, enhancement=lge_enhancement)))
    cine_type = ["ORIGINAL", "PRIMARY", "M", "ND"] if style == "siemens" else ["ORIGINAL", "PRIMARY", "OTHER"]
    report = on_series or (lambda _view, _done, _total: None)
    report("LOCALIZER", 1, 1 + len(order))
    for k, (view, planes, spacing, minutes, contrast) in enumerate(order, start=2):
        n_ph = 1 if contrast.lge else phases
        step = 0.5 if contrast.lge else 0.25  # LGE: one breath-hold per slice
        items = [(pl, ph, minutes + i * step) for i, pl in enumerate(planes) for ph in range(n_ph)]
        common = dict(view=view, thickness=thickness, spacing=spacing, minutes=minutes,
                      description=names[view], transfer_syntax=ts, contrast=contrast)
        if legacy_enhanced:
            _write_legacy_series(out, ctx, vendor, anatomy, items=items, image_type=cine_type, **common)
        elif vendor.enhanced:
            _write_enhanced_series(out, ctx, vendor, anatomy, planes=planes, **common)
        else:
            _write_classic_series(out, ctx, vendor, anatomy, items=items, cine=not contrast.lge,
                                  image_type=cine_type, **common)
        report(view, k, 1 + len(order))

    edv = anatomy.lv_volume_ml(0)
    esv = anatomy.lv_volume_ml(anatomy.es_phase)
    views = ("LOCALIZER", "SAX", "2CH", "3CH", "4CH") + (("LGE",) if lge else ())
    truth = PhantomTruth(
        ef=round((edv - esv) / edv, 4), effusion_mm=float(effusion_mm), edv_ml=round(edv, 2),
        esv_ml=round(esv, 2), ed_phase=0, es_phase=anatomy.es_phase,
        study_instance_uid=ctx.study_uid, style=style,
        lv_axis=tuple(round(float(v), 6) for v in LV_AXIS),
        series={v: ctx.uid("series", v) for v in views})
    (out / "truth.json").write_text(truth.to_json())
    return truth


# -- brain MR (negative test) --------------------------------------------------------
_BRAIN_T2 = np.array([0, 600, 60, 1500, 700, 480, 900], dtype=float)  # air fat bone csf gm wm vessel


def _brain_labels(p: np.ndarray) -> np.ndarray:
    eye = np.eye(3)
    c = np.array([0.0, 10.0, 20.0])
    lab = np.zeros(len(p), np.uint8)
    lab[_ellipsoid_q(p, c, eye, (76, 96, 86)) <= 1] = 1  # scalp fat
    lab[_ellipsoid_q(p, c, eye, (71, 91, 81)) <= 1] = 2  # skull
    lab[_ellipsoid_q(p, c, eye, (66, 86, 76)) <= 1] = 3  # CSF
    lab[_ellipsoid_q(p, c, eye, (63, 83, 73)) <= 1] = 4  # grey matter
    lab[_ellipsoid_q(p, c, eye, (55, 74, 64)) <= 1] = 5  # white matter
    for x in (-8.0, 8.0):  # lateral ventricles
        lab[_ellipsoid_q(p, c + (x, 0, 8), eye, (6, 26, 12)) <= 1] = 3
    return lab


def write_brain_mr(out_dir: str | Path, seed: int = 0, size: int = 128) -> list[Path]:
    """Write a small axial T2 brain MR series (non-cardiac negative); returns the paths."""
    out = Path(out_dir)
    key = json.dumps(dict(kind="brain", seed=seed, size=size), sort_keys=True)
    ctx = _Ctx(key, seed, patient_id=None, description="MRI BRAIN WO CONTRAST",
               body_part="BRAIN", modality_tag="BRAIN")
    vendor = _VENDORS["siemens"]
    series_uid = ctx.uid("series", "AX_T2")
    paths = []
    n = 5
    for k in range(n):
        z = 0.0 + 10.0 * k
        plane = Plane.centred((0.0, 10.0, z), (1, 0, 0), (0, 1, 0), 240.0, size)
        ds = _new_dataset(MRImageStorage, ctx.uid("sop", k))
        _common(ds, ctx, vendor, modality="MR", series_uid=series_uid, series_number=3,
                description="AX T2 TSE", minutes=2.0)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "SP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "*tse2d1_15"
        ds.RepetitionTime = 5000.0
        ds.EchoTime = 95.0
        ds.EchoTrainLength = 15
        ds.NumberOfAverages = 2
        ds.ImagingFrequency = 63.68
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = 1.5
        ds.FlipAngle = 150
        ds.SpacingBetweenSlices = 10.0
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagesInAcquisition = n
        _plane_attrs(ds, plane, 5.0)
        rng = np.random.default_rng([seed, 7, k])
        img = _smooth(_BRAIN_T2[_brain_labels(plane.points())].reshape(size, size))
        img = np.sqrt((img + rng.normal(0, 10, img.shape)) ** 2 + rng.normal(0, 10, img.shape) ** 2)
        _pixels_u16(ds, img)
        ds.WindowCenter = 700
        ds.WindowWidth = 1400
        paths.append(_save(ds, out / "S003" / f"IM_{k + 1:04d}.dcm"))
    return paths


def write_ct(out_dir: str | Path, seed: int = 0, size: int = 128) -> list[Path]:
    """Write a few axial chest CT slices (non-cardiac negative); returns the paths."""
    out = Path(out_dir)
    key = json.dumps(dict(kind="ct", seed=seed, size=size), sort_keys=True)
    ctx = _Ctx(key, seed, patient_id=None, description="CT CHEST", body_part="CHEST",
               modality_tag="CT")
    anatomy = CardiacAnatomy(ef=0.6, phases=2)
    series_uid = ctx.uid("series", "AXIAL")
    vendor = _Vendor("SIEMENS", "SOMATOM Force", "syngo CT VA50", "CT01", 0.0, {}, None, {})
    paths = []
    n = 6
    for k in range(n):
        z = 30.0 - 15.0 * k
        plane = Plane.centred((0.0, 0.0, z), (1, 0, 0), (0, 1, 0), 400.0, size)
        ds = _new_dataset(CTImageStorage, ctx.uid("sop", k))
        _common(ds, ctx, vendor, modality="CT", series_uid=series_uid, series_number=2,
                description="Thorax 1.5 Br40", minutes=1.0)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagesInAcquisition = n
        ds.DataCollectionDiameter = 500
        ds.ReconstructionDiameter = 400
        ds.DistanceSourceToDetector = 1085.6
        ds.DistanceSourceToPatient = 595
        ds.GantryDetectorTilt = 0
        ds.TableHeight = 150
        ds.RotationDirection = "CW"
        ds.ExposureTime = 500
        ds.XRayTubeCurrent = 120
        ds.Exposure = 60
        ds.FilterType = "FLAT"
        ds.ConvolutionKernel = "Br40"
        ds.PatientPosition = "HFS"
        _plane_attrs(ds, plane, 5.0)
        rng = np.random.default_rng([seed, 11, k])
        hu = anatomy.render(plane, 0, rng, table=CT_HU, noise=0.0, coil=False)
        hu = hu + rng.normal(0, 12.0, hu.shape)
        _pixels_u16(ds, hu + 1024.0)
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = [40, -600]
        ds.WindowWidth = [400, 1500]
        ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
        paths.append(_save(ds, out / "S002" / f"IM_{k + 1:04d}.dcm"))
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI: ``phantom OUT_DIR [--style ...] [--seed N] [--ef F] ... [--kind cardiac|brain|ct]``.

    Variants: ``--transfer-syntax``, ``--descriptions``, ``--legacy-enhanced``, ``--lge``
    (``--no-lge-enhancement``), ``--view-angle 4CH=100`` (repeatable).
    """
    ap = argparse.ArgumentParser(prog="phantom", description="Write a synthetic DICOM study.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--kind", choices=("cardiac", "brain", "ct"), default="cardiac")
    ap.add_argument("--style", choices=STYLES, default="siemens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ef", type=float, default=0.55)
    ap.add_argument("--effusion-mm", type=float, default=0.0)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--phases", type=int, default=12)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--transfer-syntax", choices=tuple(TRANSFER_SYNTAXES), default=None,
                    help="default: the style's own (RLE for ge, explicit VR little endian otherwise)")
    ap.add_argument("--descriptions", choices=DESCRIPTION_MODES, default=None,
                    help="default: the style's own (blank for ge, vendor otherwise)")
    ap.add_argument("--legacy-enhanced", action="store_true",
                    help="cines as Legacy Converted Enhanced MR Image objects")
    ap.add_argument("--lge", action="store_true", help="add a late gadolinium enhancement SAX series")
    ap.add_argument("--no-lge-enhancement", action="store_true", help="LGE without the inferolateral infarct")
    ap.add_argument("--view-angle", action="append", default=[], metavar="VIEW=DEG",
                    help="oblique long-axis plane, e.g. 4CH=100 (degrees on the AHA ring)")
    ap.add_argument("--set", type=int, metavar="N", default=None,
                    help="write N labelled phantoms (seeds SEED..SEED+N-1, EF and effusion spread over every "
                         "option, styles cycling) into OUT_DIR/<k>/ with OUT_DIR/labels.csv (plugin/labels.py)")
    from plugin.progress import add_arguments

    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        view_angles = {}
        for spec in args.view_angle:
            view, sep, deg = spec.partition("=")
            try:
                view_angles[view.strip().upper()] = float(deg)
            except ValueError:
                raise ValueError(f"Argument '--view-angle' must look like 4CH=100, got {spec!r}") from None
            if not sep:
                raise ValueError(f"Argument '--view-angle' must look like 4CH=100, got {spec!r}")
        if args.set is not None:
            from plugin.labels import write_phantom_set
            from plugin.progress import Bars, enabled

            if args.set < 1:
                raise ValueError(f"Argument '--set' must be at least 1, got {args.set}")
            with Bars(enabled(args.progress)) as bars:
                task = bars.add(f"phantom set: {args.set} studies", total=args.set)
                labels = write_phantom_set(args.out_dir, args.set, seed=args.seed, slices=args.slices,
                                           phases=args.phases, size=args.size,
                                           on_study=lambda done, _n: task.update(completed=done))
            print(f"wrote {args.set} labelled phantoms under {args.out_dir}; labels: {labels}")
        elif args.kind == "brain":
            paths = write_brain_mr(args.out_dir, seed=args.seed)
            print(f"wrote {len(paths)} brain MR files under {args.out_dir}")
        elif args.kind == "ct":
            paths = write_ct(args.out_dir, seed=args.seed)
            print(f"wrote {len(paths)} CT files under {args.out_dir}")
        else:
            from plugin.progress import Bars, enabled

            with Bars(enabled(args.progress)) as bars:
                task = bars.add(f"phantom: writing {args.style} series", total=6 if args.lge else 5)

                def on_series(view: str, done: int, total: int) -> None:
                    task.update(completed=done, total=total, description=f"phantom: wrote {view}")

                truth = write_study(args.out_dir, style=args.style, seed=args.seed, ef=args.ef,
                                    effusion_mm=args.effusion_mm, slices=args.slices,
                                    phases=args.phases, size=args.size, transfer_syntax=args.transfer_syntax,
                                    descriptions=args.descriptions, legacy_enhanced=args.legacy_enhanced,
                                    lge=args.lge, lge_enhancement=not args.no_lge_enhancement,
                                    view_angles=view_angles or None, on_series=on_series)
                task.update(description=f"phantom: {args.out_dir}")
            print(truth.to_json())
    except (ValueError, RuntimeError) as exc:
        print(f"phantom: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
