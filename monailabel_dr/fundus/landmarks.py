"""Optic disc and fovea localisation, and the retinal quadrants they define.

Classical image analysis (OpenCV), no training: it is used to report lesions per
retinal quadrant, so it must work on any photograph the server receives.

Method, on a copy of the field of view (FOV) resized so the FOV is ``WORK_DIAMETER`` px
across, with the expected disc diameter DD = ``DISC_FRACTION`` x FOV diameter:

* **Optic disc**: the disc is a bright blob where the main vessels run vertically.
  Brightness is (R+G)/2 divided by its large-scale background (flattens vignetting),
  smoothed at the disc's scale; the vessel term is the excess of the horizontal over the
  vertical green-channel gradient, averaged over a disc-sized window. The disc centre is
  the maximum of the sum of the two maps, each standardised inside the eroded FOV.
  Bright exudate clusters have edges in all directions, so they lose on the vessel term.
* **Fovea**: the darkest spot with the fewest edges at 1.8-3.2 DD from the disc centre, within
  +-30 degrees of the horizontal, on the FOV-centre side of the disc (the fovea lies
  about 2.5 DD temporal of the disc, slightly below it).
* **Found or not**: the disc is reported when the evidence at the chosen spot,
  (brightness / background - 1) x (vertical-vessel density / its FOV median), reaches
  ``min_disc_score``; the fovea when its darkness stands out from the search region by
  ``min_fovea_contrast`` standard deviations. Otherwise they are ``None`` and the
  quadrants fall back to the FOV centre with a horizontal axis.

Quadrants (:func:`quadrant_frame`): centred on the fovea, split by the line through the
disc and the fovea and its perpendicular; nasal is the disc side, superior is the image
top side. They are superior/inferior x nasal/temporal when both landmarks are found, and
upper/lower x left/right (image directions around the FOV centre) when not.

Accuracy is measured, not assumed: ``bench/landmarks_check.py`` reports the disc error on
the 54 IDRiD optic-disc masks and disc and fovea errors on phantoms (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .io import to_rgb_float

__all__ = ["Landmarks", "QuadrantFrame", "detect_landmarks", "quadrant_frame", "ANATOMICAL_QUADRANTS", "IMAGE_QUADRANTS"]

WORK_DIAMETER = 512  # px across the FOV on the analysis copy
DISC_FRACTION = 0.15  # disc diameter / FOV diameter for a 45-50 degree photograph
FOVEA_DD_RANGE = (1.8, 3.2)  # disc-fovea distance in disc diameters
FOVEA_MAX_ANGLE_DEG = 30.0
FOVEA_DD_TYPICAL = 2.5
FOVEA_ANGLE_TYPICAL = 6.0  # degrees below the disc level

ANATOMICAL_QUADRANTS = ("superior_nasal", "superior_temporal", "inferior_nasal", "inferior_temporal")
IMAGE_QUADRANTS = ("upper_left", "upper_right", "lower_left", "lower_right")


@dataclass(frozen=True)
class Landmarks:
    """Landmarks in original-image pixels, (x, y); ``None`` when not found."""

    disc: tuple[float, float] | None
    fovea: tuple[float, float] | None
    disc_diameter: float  # expected disc diameter used for the search (pixels)
    disc_score: float  # disc evidence: (brightness ratio - 1) x vertical-vessel density ratio
    fovea_contrast: float  # darkness of the fovea against its search region (standard deviations)

    def to_dict(self) -> dict[str, Any]:
        r = lambda p: None if p is None else [round(float(p[0]), 1), round(float(p[1]), 1)]  # noqa: E731
        return {
            "optic_disc": r(self.disc),
            "fovea": r(self.fovea),
            "disc_diameter_px": round(float(self.disc_diameter), 1),
            "disc_score": round(float(self.disc_score), 2),
            "fovea_contrast": round(float(self.fovea_contrast), 2),
        }


def _standardise(x: np.ndarray, inside: np.ndarray) -> np.ndarray:
    v = x[inside]
    sd = float(v.std())
    return (x - float(v.mean())) / (sd if sd > 1e-8 else 1.0)


def _odd(n: float) -> int:
    k = max(3, int(round(n)))
    return k if k % 2 else k + 1


def detect_landmarks(
    rgb: np.ndarray,
    fov: np.ndarray,
    min_disc_score: float = 0.4,
    min_fovea_contrast: float = 1.0,
) -> Landmarks:
    """Optic disc and fovea of a colour fundus photograph (display orientation, (H, W, 3)).

    ``fov`` is the boolean FOV mask (:func:`monailabel_dr.fundus.geometry.detect_fov`).
    """
    a = _AnalysisCopy.of(rgb, fov)
    if a.centre_zone.sum() < 16:
        return Landmarks(None, None, a.dd_orig, 0.0, 0.0)
    maps = _Maps(a)
    (dx, dy), disc_score = _find_disc(a, maps)
    if disc_score < min_disc_score:
        return Landmarks(None, None, a.dd_orig, disc_score, 0.0)
    fovea_xy, contrast = _find_fovea(a, maps, dx, dy)
    fovea = a.to_orig(*fovea_xy) if fovea_xy is not None and contrast >= min_fovea_contrast else None
    return Landmarks(a.to_orig(dx, dy), fovea, a.dd_orig, disc_score, contrast)


@dataclass
class _AnalysisCopy:
    """The FOV's bounding box resized so the FOV is ``WORK_DIAMETER`` px across, as float RGB, with its FOV
    mask, the zones away from the rim, the disc diameter there (``dd``) and in input pixels (``dd_orig``)."""

    small: np.ndarray
    mask: np.ndarray
    inner: np.ndarray          # away from the FOV rim (flash glare and the dark border both fool the maps)
    centre_zone: np.ndarray    # where a disc centre may be
    dd: float
    dd_orig: float
    box: tuple[int, int, int, int]   # y0, y1, x0, x1 in the input
    size: tuple[int, int]            # (width, height) of the copy

    @classmethod
    def of(cls, rgb: np.ndarray, fov: np.ndarray) -> "_AnalysisCopy":
        fov = np.asarray(fov, bool)
        rows, cols = np.flatnonzero(fov.any(axis=1)), np.flatnonzero(fov.any(axis=0))
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        diameter = float(max(y1 - y0, x1 - x0))  # a clipped FOV circle keeps its full width
        s = WORK_DIAMETER / diameter
        size = (max(8, round((x1 - x0) * s)), max(8, round((y1 - y0) * s)))
        # Resize first, convert after: this runs on every lesion_seg request, and converting the
        # 12 MP crop to float before shrinking it cost most of the time. The crop is a view: OpenCV reads rows
        # with a stride, and a contiguous copy of a 12 MP float crop cost more than the resize.
        crop = np.asarray(rgb)[y0:y1, x0:x1]
        if crop.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
            crop = to_rgb_float(crop)
        small = to_rgb_float(cv2.resize(crop, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR))
        mask = cv2.resize(fov[y0:y1, x0:x1].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        dd = DISC_FRACTION * WORK_DIAMETER
        ellipse = lambda f: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (_odd(f * dd), _odd(f * dd)))  # noqa: E731
        return cls(small=small, mask=mask, inner=cv2.erode(mask, ellipse(0.1)) > 0,
                   centre_zone=cv2.erode(mask, ellipse(0.6)) > 0, dd=dd, dd_orig=DISC_FRACTION * diameter,
                   box=(y0, y1, x0, x1), size=size)

    def to_orig(self, x: float, y: float) -> tuple[float, float]:
        """A pixel centre of the copy in input pixel coordinates."""
        y0, y1, x0, x1 = self.box
        return (x0 + (x + 0.5) / self.size[0] * (x1 - x0) - 0.5, y0 + (y + 0.5) / self.size[1] * (y1 - y0) - 0.5)


class _Maps:
    """The feature maps both searches use, on the analysis copy: local brightness over the background and
    the density of vertical vessel edges, by normalised convolution inside the FOV."""

    def __init__(self, a: _AnalysisCopy):
        small, dd = a.small, a.dd
        self.grey = 0.5 * (small[..., 0] + small[..., 1])
        self.m = a.mask.astype(np.float32)
        self._dens: dict[float, np.ndarray] = {}   # the mask's blur per sigma, computed once (kernels ~1.5 DD)
        self.background = self.masked_blur(self.grey, 1.5 * dd)
        self.bright = self.masked_blur(self.grey / np.maximum(self.background, 1e-3), dd / 4.0)
        # Vertical vessels: the arcades leave the disc upwards and downwards, so there the
        # horizontal intensity gradient dominates the vertical one. Exudate clusters have edges
        # in every direction and cancel out (a black-hat "dark thin structure" map did not:
        # the gaps between exudates count as vessels; 46/54 IDRiD discs against 52/54).
        gs = cv2.GaussianBlur(small[..., 1], (0, 0), 1.5)
        gx = np.abs(cv2.Sobel(gs, cv2.CV_32F, 1, 0))
        gy = np.abs(cv2.Sobel(gs, cv2.CV_32F, 0, 1))
        vertical = np.maximum(gx - gy, 0.0) * self.m
        vertical[~a.inner] = 0.0
        self.density = self.masked_blur(vertical, dd / 3.0)
        self.edges = self.masked_blur(np.where(a.inner, gx + gy, 0.0).astype(np.float32), dd / 3.0)

    def masked_blur(self, x: np.ndarray, sigma: float) -> np.ndarray:
        # Normalised convolution: the average of FOV pixels only, so the border does not leak in.
        num = cv2.GaussianBlur(x * self.m, (0, 0), sigma)
        if sigma not in self._dens:
            self._dens[sigma] = np.maximum(cv2.GaussianBlur(self.m, (0, 0), sigma), 1e-3)
        return num / self._dens[sigma]


def _find_disc(a: _AnalysisCopy, maps: _Maps) -> tuple[tuple[int, int], float]:
    """The disc centre on the copy (x, y): brightest and densest in vertical vessels; and its evidence score."""
    score = _standardise(maps.bright, a.centre_zone) + _standardise(maps.density, a.centre_zone)
    score_z = _standardise(score, a.centre_zone)
    score_z[~a.centre_zone] = -np.inf
    dy, dx = np.unravel_index(int(np.argmax(score_z)), score_z.shape)
    # Evidence that a disc is there at all: how much brighter than its background, times how
    # much denser in vertical vessels than the FOV's median. The threshold (0.4) sits under the
    # lowest value on the 54 IDRiD images (bench/landmarks_check.py prints disc_score_min) and
    # above disc-free textured fields (tests/test_landmarks.py checks those are refused).
    median_density = float(np.median(maps.density[a.centre_zone]))
    disc_score = float((maps.bright[dy, dx] - 1.0) * maps.density[dy, dx] / max(median_density, 1e-8))
    return (int(dx), int(dy)), disc_score


def _find_fovea(a: _AnalysisCopy, maps: _Maps, dx: int, dy: int) -> tuple[tuple[int, int] | None, float]:
    """The fovea on the copy (x, y) given the disc at (dx, dy), and its contrast (how much darker than the
    search region, in SDs); None when the search region is too small.

    Dark and avascular, 1.8-3.2 DD from the disc, towards the FOV centre, with a soft prior on the typical
    position (2.5 DD away, ~6 degrees below the disc level)."""
    dd = a.dd
    h, w = maps.grey.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vx, vy = xx - dx, yy - dy
    dist = np.hypot(vx, vy) / dd
    # The fovea is on the FOV-centre side of the disc; a disc within 1 DD of the centre
    # (a disc-centred field) leaves both sides open.
    toward = 1.0 if (w / 2.0) >= dx else -1.0
    if abs(w / 2.0 - dx) < dd:
        toward = np.where(vx >= 0, 1.0, -1.0)
    angle = np.degrees(np.arctan2(vy, vx * toward))  # > 0: below the disc
    region = ((dist >= FOVEA_DD_RANGE[0]) & (dist <= FOVEA_DD_RANGE[1]) & (np.abs(angle) <= FOVEA_MAX_ANGLE_DEG)
              & a.centre_zone)
    if region.sum() < 16:
        return None, 0.0
    dark = _standardise(-maps.masked_blur(maps.grey / np.maximum(maps.background, 1e-3), dd / 3.0), region)
    prior = -0.5 * ((dist - FOVEA_DD_TYPICAL) / 0.4) ** 2 - 0.5 * ((angle - FOVEA_ANGLE_TYPICAL) / 12.0) ** 2
    fscore = dark - 0.5 * _standardise(maps.edges, region) + prior
    fscore[~region] = -np.inf
    fy, fx = np.unravel_index(int(np.argmax(fscore)), fscore.shape)
    return (int(fx), int(fy)), float(dark[fy, fx])


@dataclass(frozen=True)
class QuadrantFrame:
    """Centre (x, y), unit axis pointing nasal (or image-right) and the quadrant names."""

    centre: tuple[float, float]
    axis: tuple[float, float]
    anatomical: bool

    @property
    def names(self) -> tuple[str, ...]:
        return ANATOMICAL_QUADRANTS if self.anatomical else IMAGE_QUADRANTS

    def classify(self, xs: np.ndarray, ys: np.ndarray) -> list[str]:
        """Quadrant name of each point (x, y) in original pixels."""
        ax, ay = self.axis
        u = (np.asarray(xs, float) - self.centre[0]) * ax + (np.asarray(ys, float) - self.centre[1]) * ay
        # Perpendicular pointing down the image (+y when the axis is horizontal).
        v = -(np.asarray(xs, float) - self.centre[0]) * ay + (np.asarray(ys, float) - self.centre[1]) * ax
        if ax < 0:  # keep "v > 0 = lower in the image" whatever the axis direction
            v = -v
        out = []
        for ui, vi in zip(np.atleast_1d(u), np.atleast_1d(v)):
            if self.anatomical:
                out.append(("inferior" if vi >= 0 else "superior") + "_" + ("nasal" if ui >= 0 else "temporal"))
            else:
                out.append(("lower" if vi >= 0 else "upper") + "_" + ("right" if ui >= 0 else "left"))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "centre": [round(float(self.centre[0]), 1), round(float(self.centre[1]), 1)],
            "nasal_axis" if self.anatomical else "axis": [round(float(self.axis[0]), 4), round(float(self.axis[1]), 4)],
            "reference": "fovea, disc-fovea axis (nasal = disc side)" if self.anatomical
            else "field-of-view centre, horizontal axis (optic disc or fovea not found)",
            "names": list(self.names),
        }


def quadrant_frame(landmarks: Landmarks | None, fov_centre: tuple[float, float]) -> QuadrantFrame:
    """Quadrants around the fovea on the disc-fovea axis, or the FOV centre when either is missing."""
    if landmarks is not None and landmarks.disc is not None and landmarks.fovea is not None:
        fx, fy = landmarks.fovea
        ax, ay = landmarks.disc[0] - fx, landmarks.disc[1] - fy
        n = float(np.hypot(ax, ay))
        if n > 0:
            return QuadrantFrame((float(fx), float(fy)), (ax / n, ay / n), True)
    return QuadrantFrame((float(fov_centre[0]), float(fov_centre[1])), (1.0, 0.0), False)
