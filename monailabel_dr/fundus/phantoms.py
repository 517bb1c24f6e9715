"""Deterministic synthetic colour fundus photographs ("phantoms") with known lesions and DR grade.

A phantom is a macula-centred 45-degree-style colour fundus photograph drawn from a seed:
orange-red background with per-seed pigmentation / brightness, radial illumination fall-off,
choroidal texture, a darker macula with an avascular fovea, a yellow-white optic disc with a
brighter cup about 2.4 disc diameters nasal of the fovea (mirrored between left and right
eyes), and an artery / vein tree branching from the disc in upper and lower arcades that curve
around the macula.  Lesions are drawn on top of that *healthy* eye:

* ``MA`` microaneurysms: tiny, sharp, dark-red round dots (the smallest lesion), mostly at the
  posterior pole around the macula;
* ``HE`` haemorrhages: dark-red dot/blot and flame-shaped (along the nerve-fibre direction,
  i.e. radial to the disc) lesions, larger than MAs; the ``HE`` mask also contains a
  preretinal (boat-shaped, flat fluid level on top) haemorrhage when one is drawn;
* ``EX`` hard exudates: bright yellow-white, sharply delimited deposits in clumps or partial
  (circinate) rings near the macula;
* ``SE`` soft exudates (cotton-wool spots): pale, fluffy, ill-defined white patches close to the
  main vessel arcades;
* neovascularization (not one of the four segmentation classes; its region is
  ``Phantom.nv_mask``): tufts of fine tortuous vessel loops with a faint fibrous veil at the disc
  margin (NVD) and/or on the arcades (NVE).

No lesion is drawn on the optic disc or outside the field of view (FOV); lesions of different
kinds do not overlap (where soft edges still touch, a mask pixel belongs to the top-most lesion,
drawing order EX, HE, MA, SE).  Blood colours are relative to the local background, so
haemorrhages and MAs are darker and redder than their surroundings in every fundus.  Every size
is a fraction of the FOV radius ``R``, so a phantom looks the same at any resolution (at a
working resolution of 256 px across the FOV, microaneurysms are 1.5-2.5 px, haemorrhages
3.5-10 px (flames longer), a preretinal haemorrhage 40-75 px wide); the same seed and grade give
the same eye and findings at every size.

Grading rule (ICDR-style, :func:`grade_from_findings`), applied to ``Phantom.findings``
------------------------------------------------------------------------------------------
* **4 proliferative DR**: ``neovascularization`` and/or ``preretinal_haemorrhage``;
* **3 severe NPDR**: at least ``SEVERE_HE_PER_QUADRANT`` (= 5) intraretinal haemorrhages in
  *each* of the four retinal quadrants (superior/inferior x temporal/nasal, split by the
  horizontal and vertical lines through the fovea) - a scaled-down "4-2-1 rule" (the real rule
  asks for > 20 per quadrant on a 7-field photograph; venous beading and IRMA are not drawn);
* **2 moderate NPDR**: more than microaneurysms only - any haemorrhage (below the severe
  criterion), hard exudate or cotton-wool spot;
* **1 mild NPDR**: microaneurysms only;
* **0 no DR**: no lesion at all.

``make_phantom(seed, grade=g)`` samples findings of exactly grade ``g`` with clearly separated
amounts: mild 2-10 MAs; moderate at most 8 small/medium haemorrhages (so it can never satisfy
the severe criterion) and/or exudates / cotton-wool spots; severe 5-9 larger haemorrhages in
every quadrant (20-36 in all) plus many MAs and usually exudates; proliferative a moderate or
severe background plus one to three neovascular tufts (90 %) and/or a large preretinal
haemorrhage (50 %, always when there is no NV).

``Phantom.healthy`` is the same eye without lesions: it equals ``Phantom.image`` bit for bit
outside the union of the lesion masks and ``nv_mask`` dilated by ``info['mask_halo_px']``
pixels (soft lesion edges and camera blur), so it is ground truth for inpainting.

Everything is drawn from ``np.random.default_rng(seed)`` (and generators seeded from it, one per
stage) - never from the global RNG: the same seed, size and grade give byte-identical arrays.
One 480x640 phantom takes ~40-90 ms on one CPU core (960x1280: ~0.35 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from .lesions import GRADES, LESIONS, is_referable

__all__ = [
    "Phantom",
    "make_phantom",
    "grade_from_findings",
    "QUADRANTS",
    "SEVERE_HE_PER_QUADRANT",
]

# Retinal quadrants around the fovea used by the severe-NPDR criterion.
QUADRANTS: tuple[str, ...] = ("superior_temporal", "superior_nasal", "inferior_temporal", "inferior_nasal")
# Minimum number of intraretinal haemorrhages in every quadrant for severe NPDR (grade 3).
SEVERE_HE_PER_QUADRANT = 5
# Moderate NPDR never has more haemorrhages than this (< 4 * SEVERE_HE_PER_QUADRANT).
MODERATE_MAX_HE = 8

_SHIFT = 4  # sub-pixel bits for cv2 drawing
_ONE = 1 << _SHIFT


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


@dataclass
class Phantom:
    """One synthetic fundus photograph with its ground truth.

    image:   (H, W, 3) uint8 RGB with lesions, black outside the circular FOV.
    healthy: (H, W, 3) uint8 RGB of the same eye without lesions (equals ``image`` outside the
             lesion masks / ``nv_mask`` dilated by ``info['mask_halo_px']``).
    masks:   per lesion in ``LESIONS`` a bool (H, W) mask, True where that lesion is drawn
             (drawn alpha > 0.5); all four keys are always present.
    grade:   ICDR grade 0-4, ``grade_from_findings(findings)``.
    findings: lesion counts ('MA', 'HE' (intraretinal), 'EX' (deposits), 'EX_clusters', 'SE'),
             'haemorrhages_per_quadrant' {quadrant: count}, 'neovascularization' (bool),
             'nv_tufts', 'nv_locations' (['disc'|'elsewhere', ...]), 'preretinal_haemorrhage'
             (bool), 'referable' (bool).
    fov:     bool (H, W) field-of-view mask.
    info:    seed, size (H, W), grade, grade_name, laterality ('left'/'right'), fov_center (x, y),
             fov_radius, disc_center (x, y), disc_radii (rx, ry), disc_diameter, cup_radii,
             fovea_center (x, y), mask_halo_px, pigmentation, brightness.
    nv_mask: bool (H, W), the regions of the neovascular tufts (all False without NV).
    """

    image: np.ndarray
    healthy: np.ndarray
    masks: dict[str, np.ndarray]
    grade: int
    findings: dict
    fov: np.ndarray
    info: dict
    nv_mask: np.ndarray | None = field(default=None, repr=False)

    def lesion_presence(self) -> dict[str, bool]:
        """{lesion: True if its mask is non-empty} for every lesion in ``LESIONS``."""
        return {name: bool(self.masks[name].any()) for name in LESIONS}


def grade_from_findings(findings: dict) -> int:
    """ICDR grade 0-4 from a findings dict (see the module docstring for the rule)."""
    if bool(findings.get("neovascularization", False)) or bool(findings.get("preretinal_haemorrhage", False)):
        return 4
    per_quadrant = findings.get("haemorrhages_per_quadrant") or {}
    if len(per_quadrant) >= 4 and all(
        int(per_quadrant.get(q, 0)) >= SEVERE_HE_PER_QUADRANT for q in QUADRANTS
    ):
        return 3
    if int(findings.get("HE", 0)) > 0 or int(findings.get("EX", 0)) > 0 or int(findings.get("SE", 0)) > 0:
        return 2
    if int(findings.get("MA", 0)) > 0:
        return 1
    return 0


def make_phantom(seed: int, size: tuple[int, int] = (480, 640), grade: int | None = None) -> Phantom:
    """Draw the phantom of ``seed`` at ``size`` = (H, W); ``grade`` None draws one uniformly."""
    h, w = int(size[0]), int(size[1])
    if h < 32 or w < 32:
        raise ValueError(f"phantom size must be at least 32x32, got {size}")
    rng = np.random.default_rng(int(seed))
    if grade is None:
        grade = int(rng.integers(0, 5))
    grade = int(grade)
    if not 0 <= grade <= 4:
        raise ValueError(f"grade must be in 0..4, got {grade}")
    return _Builder(rng, int(seed), h, w, grade).build()


# --------------------------------------------------------------------------------------------
# implementation
# --------------------------------------------------------------------------------------------


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return a
    k = 2 * int(math.ceil(3.0 * sigma)) + 1
    return cv2.GaussianBlur(a, (k, k), sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def _pts(points: np.ndarray) -> np.ndarray:
    """Float (N, 2) x, y points -> int32 fixed-point for cv2 drawing with shift=_SHIFT."""
    return np.round(np.asarray(points, dtype=np.float64) * _ONE).astype(np.int32).reshape(-1, 1, 2)


class _Layer:
    """Premultiplied layer: coverage ``a`` (H, W) and colour*coverage ``p`` (3, H, W, planar).

    Only the bounding box of what was drawn (padded by the blur radius) is ever processed.
    """

    def __init__(self, h: int, w: int, sigma: float):
        self.h, self.w = h, w
        self.a = np.zeros((h, w), np.float32)
        self.p = np.zeros((3, h, w), np.float32)
        self.sigma = sigma
        self.box: list[float] | None = None

    @property
    def used(self) -> bool:
        return self.box is not None

    def extend(self, points: np.ndarray) -> None:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        b = [lo[0], lo[1], hi[0], hi[1]]
        if self.box is None:
            self.box = b
        else:
            self.box = [min(self.box[0], b[0]), min(self.box[1], b[1]), max(self.box[2], b[2]), max(self.box[3], b[3])]

    def roi(self) -> tuple[slice, slice]:
        pad = int(math.ceil(3.0 * self.sigma)) + 3
        x0 = max(0, int(math.floor(self.box[0])) - pad)
        y0 = max(0, int(math.floor(self.box[1])) - pad)
        x1 = min(self.w, int(math.ceil(self.box[2])) + pad + 1)
        y1 = min(self.h, int(math.ceil(self.box[3])) + pad + 1)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def poly(self, points: np.ndarray, colour, opacity: float) -> None:
        pts = _pts(points)
        cv2.fillPoly(self.a, [pts], float(opacity), cv2.LINE_8, _SHIFT)
        for k in range(3):
            cv2.fillPoly(self.p[k], [pts], float(colour[k]) * float(opacity), cv2.LINE_8, _SHIFT)
        self.extend(points)

    def patch(self, box: tuple[slice, slice], alpha: np.ndarray, colour: np.ndarray) -> None:
        """Paint a local (h, w) coverage with a per-pixel (3, h, w) colour over ``box``."""
        ys, xs = box
        sel = alpha > 0
        self.a[ys, xs][sel] = alpha[sel]
        for k in range(3):
            self.p[k, ys, xs][sel] = (colour[k] * alpha)[sel]
        self.extend(np.array([[xs.start, ys.start], [xs.stop - 1, ys.stop - 1]], float))

    def finish(self, allowed: np.ndarray) -> None:
        """Blur (soft edges) and clip to ``allowed`` (float 0/1, full size)."""
        if not self.used:
            return
        ys, xs = self.roi()
        self.a[ys, xs] = _blur(self.a[ys, xs], self.sigma)
        for k in range(3):
            self.p[k, ys, xs] = _blur(self.p[k, ys, xs], self.sigma)
        self.clip(allowed)

    def clip(self, allowed: np.ndarray) -> None:
        if not self.used:
            return
        ys, xs = self.roi()
        al = allowed[ys, xs]
        self.a[ys, xs] *= al
        for k in range(3):
            self.p[k, ys, xs] *= al

    def over(self, img: np.ndarray) -> None:
        """Composite this layer over the planar (3, H, W) ``img`` in place."""
        if not self.used:
            return
        ys, xs = self.roi()
        keep = 1.0 - self.a[ys, xs]
        for k in range(3):
            sub = img[k, ys, xs]
            sub *= keep
            sub += self.p[k, ys, xs]


def _ellipse_pts(cx, cy, rx, ry, angle=0.0, n=28, radial_noise=None):
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    rad = 1.0 if radial_noise is None else radial_noise
    x = rx * np.cos(t) * rad
    y = ry * np.sin(t) * rad
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)


def _smooth_radial_noise(rng, n, amp, harmonics=4):
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    out = np.ones(n)
    for k in range(2, 2 + harmonics):
        out += (amp / k) * rng.normal() * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return np.clip(out, 0.45, 1.8)


class _Builder:
    def __init__(self, rng: np.random.Generator, seed: int, h: int, w: int, grade: int):
        self.rng, self.seed, self.h, self.w, self.grade = rng, seed, h, w, grade
        self.R = 0.47 * min(h, w)
        self.c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])

    # ---------------------------------------------------------------- geometry
    def _box(self, centre, half) -> tuple[slice, slice]:
        x0 = max(0, int(math.floor(centre[0] - half)))
        x1 = min(self.w, int(math.ceil(centre[0] + half)) + 1)
        y0 = max(0, int(math.floor(centre[1] - half)))
        y1 = min(self.h, int(math.ceil(centre[1] + half)) + 1)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def _grid(self, box) -> tuple[np.ndarray, np.ndarray]:
        ys, xs = box
        return (
            np.arange(xs.start, xs.stop, dtype=np.float32)[None, :],
            np.arange(ys.start, ys.stop, dtype=np.float32)[:, None],
        )

    def _geometry(self):
        rng, R, h, w = self.rng, self.R, self.h, self.w
        self.laterality = "right" if rng.random() < 0.5 else "left"
        # Right eye: the disc (nasal) is on the right of the image; left eye mirrors it.
        self.t = -1.0 if self.laterality == "right" else 1.0  # +x direction of "temporal"
        self.dd = R * rng.uniform(0.29, 0.34)  # disc diameter ~0.15-0.17 of the FOV diameter
        self.disc = self.c + np.array([-self.t * R * rng.uniform(0.36, 0.44), R * rng.uniform(-0.10, 0.0)])
        dist = self.dd * rng.uniform(2.3, 2.6)
        ang = rng.uniform(0.02, 0.14)  # fovea slightly below the disc
        self.fovea = self.disc + dist * np.array([self.t * math.cos(ang), math.sin(ang)])
        self.disc_r = np.array([0.5 * self.dd * rng.uniform(0.88, 0.96), 0.5 * self.dd * rng.uniform(0.98, 1.06)])
        self.cup_frac = rng.uniform(0.3, 0.5)
        x = np.arange(w, dtype=np.float32)[None, :] - np.float32(self.c[0])
        y = np.arange(h, dtype=np.float32)[:, None] - np.float32(self.c[1])
        self.r2_fov = x * x + y * y  # (H, W) squared distance from the FOV centre
        self.fov = self.r2_fov <= np.float32(R * R)
        # Lesions may only be drawn inside the FOV (with a small margin) and off the disc.
        margin = 0.12 * self.dd
        self.disc_zone = np.zeros((h, w), bool)
        box = self._box(self.disc, self.disc_r.max() + margin + 2)
        gx, gy = self._grid(box)
        exm = (gx - np.float32(self.disc[0])) / np.float32(self.disc_r[0] + margin)
        eym = (gy - np.float32(self.disc[1])) / np.float32(self.disc_r[1] + margin)
        self.disc_zone[box] = (exm * exm + eym * eym) <= 1.0
        self.lesion_allowed = ((self.r2_fov <= np.float32((R - 2.0) ** 2)) & ~self.disc_zone).astype(np.float32)

    def _quadrant(self, p) -> str:
        sup = p[1] < self.fovea[1]
        temporal = (p[0] - self.fovea[0]) * self.t > 0
        return ("superior_" if sup else "inferior_") + ("temporal" if temporal else "nasal")

    def _valid(self, p, rad, fov_frac=0.9) -> bool:
        if math.hypot(p[0] - self.c[0], p[1] - self.c[1]) > fov_frac * self.R - rad:
            return False
        dx = (p[0] - self.disc[0]) / (self.disc_r[0] + 0.15 * self.dd + rad)
        dy = (p[1] - self.disc[1]) / (self.disc_r[1] + 0.15 * self.dd + rad)
        return dx * dx + dy * dy > 1.0

    def _free(self, p, rad, kind) -> bool:
        """No lesion of another kind (or NV / preretinal haemorrhage) within ``rad`` + margin."""
        if not self.occ_x:
            return True
        d = np.hypot(np.asarray(self.occ_x) - p[0], np.asarray(self.occ_y) - p[1])
        clash = d < np.asarray(self.occ_r) + (rad + 0.012 * self.R)
        if not clash.any():
            return True
        return all(self.occ_k[i] == kind for i in np.nonzero(clash)[0])

    def _occupy(self, p, rad, kind) -> None:
        self.occ_x.append(float(p[0]))
        self.occ_y.append(float(p[1]))
        self.occ_r.append(float(rad))
        self.occ_k.append(kind)

    def _ok(self, p, rad, kind, quadrant, fov_frac) -> bool:
        return (
            self._valid(p, rad, fov_frac)
            and (quadrant is None or self._quadrant(p) == quadrant)
            and (kind is None or self._free(p, rad, kind))
        )

    def _sample(self, centre, sigma, rad, quadrant=None, fov_frac=0.9, kind=None, tries=150):
        """A lesion position near ``centre`` inside the FOV, off the disc, in ``quadrant`` (if
        given) and not overlapping lesions of other kinds (if ``kind`` given)."""
        rng = self.rng
        for _ in range(tries):
            p = centre + rng.normal(0.0, sigma, 2)
            if self._ok(p, rad, kind, quadrant, fov_frac):
                return p
        for k in (kind, None):  # fall back to uniform in the FOV, finally allowing overlaps
            for _ in range(tries):
                a, r = rng.uniform(0, 2 * np.pi), self.R * 0.85 * math.sqrt(rng.random())
                p = self.c + r * np.array([math.cos(a), math.sin(a)])
                if self._ok(p, rad, k, quadrant, fov_frac):
                    return p
        raise RuntimeError("could not place a lesion")  # pragma: no cover

    def _bg_at(self, p) -> np.ndarray:
        """Lesion-free background colour (RGB, no vessels) around ``p``."""
        _, bh, bw = self.bg_plain.shape
        x = min(bw - 1, max(0, int(round(p[0] / 4.0))))
        y = min(bh - 1, max(0, int(round(p[1] / 4.0))))
        return self.bg_plain[:, y, x].astype(np.float64)

    def _dark_red(self, p, lo, hi) -> np.ndarray:
        """Blood colour relative to the local background (darker and redder in every fundus)."""
        rng = self.rng
        f = np.array([rng.uniform(lo[0], hi[0]), rng.uniform(lo[1], hi[1]), rng.uniform(lo[2], hi[2])])
        return self._bg_at(p) * f

    def _lit(self, p, colour) -> np.ndarray:
        """A bright lesion colour dimmed like the background by the illumination fall-off."""
        f = min(1.0, max(0.6, self._bg_at(p)[0] / float(self.base[0])))
        return np.asarray(colour, float) * (0.6 + 0.4 * f)

    # ---------------------------------------------------------------- healthy eye
    def _background(self) -> np.ndarray:
        rng, R, h, w = self.rng, self.R, self.h, self.w
        pig = rng.uniform(0.0, 1.0)  # 0 light / blond fundus, 1 heavily pigmented
        bright = rng.uniform(0.82, 1.08)
        self.pigmentation, self.brightness = float(pig), float(bright)
        base = np.array(
            [
                230 - 50 * pig + rng.uniform(-8, 8),
                102 - 40 * pig + rng.uniform(-10, 10),
                48 - 22 * pig + rng.uniform(-8, 8),
            ],
            np.float32,
        ) * np.float32(bright)
        self.base = base
        # illumination: radial fall-off around a slightly decentred point
        ic = self.c + R * rng.uniform(-0.12, 0.12, 2)
        x = (np.arange(w, dtype=np.float32)[None, :] - np.float32(ic[0])) / np.float32(R)
        y = (np.arange(h, dtype=np.float32)[:, None] - np.float32(ic[1])) / np.float32(R)
        r2 = x * x + y * y
        vig = np.float32(rng.uniform(0.35, 0.6))
        illum = 1.0 - vig * r2 * (np.float32(0.55) + np.float32(0.45) * r2)
        np.maximum(illum, np.float32(0.2), out=illum)
        # choroidal texture: smooth low-frequency blotches plus a finer grain
        # (on a fixed grid over the FOV's bounding box, so it does not depend on the image size)
        tex = np.zeros((h, w), np.float32)
        box = self._box(self.c, R + 1.0)
        bh, bw = box[0].stop - box[0].start, box[1].stop - box[1].start
        for n, amp in ((14, 0.06), (52, 0.025)):
            g = self.tex_rng.standard_normal((n, n)).astype(np.float32) * np.float32(amp)
            tex[box] += cv2.resize(g, (bw, bh), interpolation=cv2.INTER_CUBIC)
        # planar (3, H, W) image; red is less affected by the choroidal texture than green / blue
        img = np.empty((3, h, w), np.float32)
        for k, ck in enumerate((0.6, 1.0, 1.0)):
            np.multiply(tex, np.float32(ck * base[k]), out=img[k])
            img[k] += base[k]
            img[k] *= illum
        # macula: darker, browner; avascular fovea darker still
        s_mac = self.dd * rng.uniform(0.7, 0.95)
        depth = rng.uniform(0.18, 0.32)
        box = self._box(self.fovea, 4.0 * s_mac)
        gx, gy = self._grid(box)
        dx, dy = gx - np.float32(self.fovea[0]), gy - np.float32(self.fovea[1])
        df2 = dx * dx + dy * dy
        mac = np.exp(df2 * np.float32(-0.5 / s_mac**2))
        s_fov = self.dd * 0.18
        fov_spot = np.exp(df2 * np.float32(-0.5 / s_fov**2))
        dark = np.float32(depth) * mac + np.float32(0.12) * fov_spot
        for k, wk in enumerate((0.75, 1.0, 0.9)):
            img[k][box] *= 1.0 - np.float32(wk) * dark
        self.bg_plain = img[:, ::4, ::4].copy()  # lesion colours are relative to this
        # optic disc with a brighter cup (soft edges) and a faint peripapillary glow
        box = self._box(self.disc, 3.5 * self.disc_r.max())
        gx, gy = self._grid(box)
        ex = (gx - np.float32(self.disc[0])) / np.float32(self.disc_r[0])
        ey = (gy - np.float32(self.disc[1])) / np.float32(self.disc_r[1])
        e = np.sqrt(ex * ex + ey * ey)  # 1 on the disc rim
        soft = np.float32(max(0.06, 1.2 / float(self.disc_r.min())))
        a_disc = np.clip((1.0 - e) / soft + 0.5, 0.0, 1.0)
        disc_col = np.array(
            [rng.uniform(235, 252), rng.uniform(172, 205), rng.uniform(100, 140)], np.float32
        ) * np.float32(min(1.0, 0.9 + 0.12 * bright))
        rim_shade = 1.0 - np.float32(0.15) * np.minimum(e, 1.0) ** 2
        cup_off = self.t * 0.12 * self.disc_r[0]
        cx = (gx - np.float32(self.disc[0] + cup_off)) / np.float32(self.disc_r[0] * self.cup_frac)
        cy = (gy - np.float32(self.disc[1])) / np.float32(self.disc_r[1] * self.cup_frac * 1.1)
        ec = np.sqrt(cx * cx + cy * cy)
        a_cup = np.clip((1.0 - ec) / np.float32(0.35) + 0.5, 0.0, 1.0)
        cup_col = np.array([rng.uniform(248, 255), rng.uniform(222, 240), rng.uniform(160, 200)], np.float32)
        halo = np.exp(np.maximum(e - 1.0, 0.0) * np.float32(-4.0)) * (1.0 - a_disc)
        keep = 1.0 + np.float32(0.07) * halo - a_disc
        rim = rim_shade * (1.0 - a_cup) * a_disc
        cup = a_cup * a_disc
        for k in range(3):
            sub = img[k][box]
            sub *= keep
            sub += disc_col[k] * rim + cup_col[k] * cup
        return img

    def _arcade(self, sign: float) -> np.ndarray:
        """Main temporal arcade (sign -1 superior, +1 inferior): an elliptic arc from the disc
        around the macula, with a slow wobble; image coordinates (N, 2)."""
        rng, R, t = self.rng, self.R, self.t
        d_u = (self.fovea[0] - self.disc[0]) * t
        d_v = self.fovea[1] - self.disc[1]
        a = d_u * rng.uniform(0.95, 1.12)
        b = R * rng.uniform(0.5, 0.6)
        th = np.linspace(np.pi, np.pi * rng.uniform(0.08, 0.22), 300)
        u = a + a * np.cos(th)
        v = d_v * (1 + np.cos(th)) / 2 + sign * b * np.sin(th)
        # resample by arc length and add a wobble perpendicular to the path
        seg = np.hypot(np.diff(u), np.diff(v))
        s = np.concatenate([[0.0], np.cumsum(seg)])
        step = 0.015 * R
        ss = np.arange(0.0, s[-1], step)
        u, v = np.interp(ss, s, u), np.interp(ss, s, v)
        du, dv = np.gradient(u), np.gradient(v)
        nrm = np.hypot(du, dv) + 1e-9
        wob = np.zeros_like(ss)
        for _ in range(3):
            wob += 0.012 * R * rng.normal() * np.sin(2 * np.pi * ss / (R * rng.uniform(0.25, 0.8)) + rng.uniform(0, 2 * np.pi))
        wob *= np.minimum(1.0, ss / (0.15 * R))  # no wobble at the disc
        u, v = u - dv / nrm * wob, v + du / nrm * wob
        return np.stack([self.disc[0] + t * u, self.disc[1] + v], axis=1)

    def _turtle(self, p0, hd, htarget, appr, length, gen):
        """Vessel path by a random walk that turns towards ``htarget`` (local frame, +u temporal)."""
        rng, R, t = self.rng, self.R, self.t
        step = 0.015 * R
        n = max(2, int(length / step))
        jit = rng.normal(0.0, 0.05 if gen == 0 else 0.09, n).tolist()
        k = step / appr
        cx, cy, rr = self.c[0], self.c[1], (1.03 * R) ** 2
        fx, fy, faz = self.fovea[0], self.fovea[1], (0.45 * self.dd) ** 2
        x, y = float(p0[0]), float(p0[1])
        pts = [(x, y)]
        hcur = hd
        for i in range(n):
            hcur = htarget + (hcur - htarget) * (1.0 - k) + jit[i]
            x += step * t * math.cos(hcur)
            y += step * math.sin(hcur)
            if (x - cx) ** 2 + (y - cy) ** 2 > rr or (x - fx) ** 2 + (y - fy) ** 2 < faz:
                break
            pts.append((x, y))
        return np.array(pts)

    def _vessels(self, img: np.ndarray) -> None:
        """Artery/vein trees from the disc: temporal arcades around the macula, nasal branches."""
        rng, R, t = self.rng, self.R, self.t
        h, w = self.h, self.w
        canv = {"vein": np.zeros((h, w), np.uint8), "artery": np.zeros((h, w), np.uint8)}
        reflex = np.zeros((h, w), np.uint8)
        self.arcades: list[np.ndarray] = []
        step = 0.015 * R
        wmin = 0.0035 * R  # thinner ones are drawn 1 px wide with less contrast
        wv = 0.022 * R * rng.uniform(0.9, 1.1)
        deg = math.radians

        todo = []  # (path (N, 2), width at start, generation, kind)
        for kind, wscale in (("vein", 1.0), ("artery", 0.72)):
            wk = wv * wscale
            off = self.disc + rng.normal(0, 0.05 * self.dd, 2)
            for sign in (-1.0, 1.0):
                arc = self._arcade(sign)
                arc[0] = off
                self.arcades.append(arc)
                todo.append((arc, wk, 0, kind))
                # nasal branches
                todo.append((self._turtle(off, sign * deg(rng.uniform(100, 120)), sign * deg(rng.uniform(140, 160)),
                                          0.45 * R, 1.0 * R, 1), 0.75 * wk, 1, kind))
            # small nasal and macular vessels straight from the disc
            a = deg(180 + rng.uniform(-20, 20))
            todo.append((self._turtle(off, a, a, R, 0.7 * R, 2), 0.45 * wk, 2, kind))
            a = deg(rng.uniform(-25, 25))
            todo.append((self._turtle(off, a, a + deg(rng.uniform(-20, 20)), R, 0.8 * R, 2), 0.35 * wk, 2, kind))

        while todo:
            arr, wd, gen, kind = todo.pop()
            m = len(arr)
            if m < 2:
                continue
            widths = wd * (1.0 - 0.5 * np.arange(m) / max(m, 0.8 * R / step))
            if gen < 3 and m >= 6:
                nb = int(rng.poisson(m * step / (0.4 * R))) + (2 if gen == 0 else 0)
                for _ in range(nb):
                    j = int(rng.integers(max(2, m // 8), m - 2))
                    cw = widths[j] * rng.uniform(0.5, 0.72)
                    if cw < wmin:
                        continue
                    d = arr[min(m - 1, j + 1)] - arr[j - 1]
                    hd = math.atan2(d[1], d[0] * t)
                    side = 1.0 if rng.random() < 0.5 else -1.0
                    ch = hd + side * rng.uniform(0.45, 1.0)
                    cl = (m - j) * step * rng.uniform(0.4, 0.8) + 0.15 * R
                    path = self._turtle(arr[j], ch, ch + rng.normal(0, 0.35), rng.uniform(0.3, 1.0) * R, cl, gen + 1)
                    todo.append((path, cw, gen + 1, kind))
            # draw in chunks of constant thickness; contrast falls for thin vessels
            fixed = _pts(arr)
            chunk = 4
            for s in range(0, m - 1, chunk):
                wseg = float(widths[s])
                thick = max(1, int(round(wseg)))
                contrast = min(1.0, 0.55 + 0.45 * wseg / (0.012 * R))
                if wseg < 1.0:
                    contrast *= max(0.4, wseg)
                seg = fixed[s : min(m, s + chunk + 1)]
                cv2.polylines(canv[kind], [seg], False, int(round(255 * contrast)), thick, cv2.LINE_AA, _SHIFT)
                if kind == "artery" and wseg >= 3.0:  # central light reflex of the wider arteries
                    cv2.polylines(reflex, [seg], False, 255, max(1, int(round(wseg / 4))), cv2.LINE_AA, _SHIFT)

        vein_mult = np.array([rng.uniform(0.56, 0.66), rng.uniform(0.36, 0.44), rng.uniform(0.38, 0.46)], np.float32)
        art_mult = np.array([rng.uniform(0.80, 0.88), rng.uniform(0.60, 0.70), rng.uniform(0.60, 0.70)], np.float32)
        sig = max(0.3, 0.0025 * R)
        for kind, mult in (("artery", art_mult), ("vein", vein_mult)):
            a = _blur(canv[kind].astype(np.float32) * np.float32(1 / 255.0), sig)
            for k in range(3):
                img[k] *= 1.0 - a * np.float32(1.0 - mult[k])
        a = _blur(reflex.astype(np.float32) * np.float32(0.12 / 255.0), sig)
        a += 1.0
        img *= a

    # ---------------------------------------------------------------- lesions
    def _plan(self) -> dict:
        """Decide the amounts of every finding for the requested grade."""
        rng, g = self.rng, self.grade
        plan = dict(ma=0, he=0, he_severe=False, ex_clusters=0, se=0, nv=0, prh=False)
        if g == 1:
            plan["ma"] = int(rng.integers(2, 11))
        elif g >= 2:
            background = 2 if g == 2 else (3 if g == 3 else (2 if rng.random() < 0.5 else 3))
            if background == 2:
                plan["ma"] = int(rng.integers(3, 16)) if rng.random() < 0.85 else 0
                has = [rng.random() < 0.75, rng.random() < 0.5, rng.random() < 0.35]
                if not any(has):
                    has[int(rng.integers(0, 3))] = True
                plan["he"] = int(rng.integers(1, MODERATE_MAX_HE + 1)) if has[0] else 0
                plan["ex_clusters"] = int(rng.integers(1, 3)) if has[1] else 0
                plan["se"] = int(rng.integers(1, 4)) if has[2] else 0
            else:
                plan["ma"] = int(rng.integers(8, 26))
                plan["he_severe"] = True
                plan["ex_clusters"] = int(rng.integers(1, 4)) if rng.random() < 0.7 else 0
                plan["se"] = int(rng.integers(1, 6)) if rng.random() < 0.6 else 0
            if g == 4:
                nv = rng.random() < 0.9
                prh = rng.random() < 0.5 or not nv
                plan["nv"] = int(rng.integers(1, 4)) if nv else 0
                plan["prh"] = bool(prh)
        return plan

    def _draw_ma(self, layer: _Layer, n: int) -> int:
        rng, R, dd = self.rng, self.R, self.dd
        centre = self.fovea + 0.35 * (self.disc - self.fovea)
        for _ in range(n):
            r0 = R * rng.uniform(0.0055, 0.0095)
            if rng.random() < 0.75:
                p = self._sample(centre, dd * rng.uniform(0.9, 1.4), r0, kind="MA")
            else:
                p = self._sample(self.c, 0.45 * R, r0, kind="MA")
            self._occupy(p, r0, "MA")
            r = max(1.1, r0)  # at least ~2 px across, so that tiny images keep their MAs
            col = self._dark_red(p, (0.52, 0.2, 0.3), (0.68, 0.34, 0.5))
            layer.poly(_ellipse_pts(p[0], p[1], r, r * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), 16), col,
                       rng.uniform(0.92, 1.0))
        return n

    def _one_haemorrhage(self, layer: _Layer, centre, sigma, r, severe: bool, quadrant=None):
        """Dot/blot (a few irregular blobs with a darker core) or flame-shaped haemorrhage."""
        rng = self.rng
        flame = rng.random() < (0.4 if severe else 0.3)
        extent = (2.2 * 1.2 if flame else 1.6) * r
        p = self._sample(centre, sigma, extent, quadrant=quadrant, fov_frac=0.88, kind="HE")
        self._occupy(p, extent, "HE")
        col = self._dark_red(p, (0.48, 0.16, 0.28), (0.64, 0.32, 0.48))
        if flame:  # elongated along the nerve fibres, i.e. radially from the disc
            to_disc = math.atan2(p[1] - self.disc[1], p[0] - self.disc[0])
            pts = _ellipse_pts(p[0], p[1], r * rng.uniform(1.5, 2.2), r * rng.uniform(0.4, 0.6), to_disc, 32,
                               _smooth_radial_noise(rng, 32, 0.2, 3))
            layer.poly(pts, col * 1.05, rng.uniform(0.82, 0.92))
        else:
            for k in range(int(rng.integers(1, 4))):
                q = p + (np.clip(rng.normal(0, 0.3 * r, 2), -0.5 * r, 0.5 * r) if k else 0.0)
                rr = r * (rng.uniform(0.55, 0.8) if k else 1.0)
                pts = _ellipse_pts(q[0], q[1], rr, rr * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), 32,
                                   _smooth_radial_noise(rng, 32, 0.25, 3))
                layer.poly(pts, col, rng.uniform(0.85, 0.95))
            core = _ellipse_pts(p[0], p[1], 0.5 * r, 0.45 * r, rng.uniform(0, np.pi), 16)
            layer.poly(core, col * 0.8, 0.97)
        return p

    def _draw_he(self, layer: _Layer, plan: dict) -> tuple[int, dict]:
        rng, R, dd = self.rng, self.R, self.dd
        per_q = {q: 0 for q in QUADRANTS}
        if plan["he_severe"]:
            for q in QUADRANTS:
                sup = q.startswith("superior")
                tem = q.endswith("temporal")
                qc = self.fovea + np.array([(1 if tem else -1) * self.t * 0.4 * R, (-1 if sup else 1) * 0.4 * R])
                for _ in range(int(rng.integers(SEVERE_HE_PER_QUADRANT, SEVERE_HE_PER_QUADRANT + 5))):
                    r = R * rng.uniform(0.016, 0.038)
                    p = self._one_haemorrhage(layer, qc, 0.3 * R, r, True, quadrant=q)
                    per_q[self._quadrant(p)] += 1
        else:
            centre = self.fovea + 0.3 * (self.disc - self.fovea)
            for _ in range(plan["he"]):
                r = R * rng.uniform(0.014, 0.028)
                p = self._one_haemorrhage(layer, centre, rng.uniform(1.2, 2.0) * dd, r, False)
                per_q[self._quadrant(p)] += 1
        return sum(per_q.values()), per_q

    def _draw_prh(self, layer: _Layer) -> None:
        """Boat-shaped preretinal haemorrhage: flat fluid level on top, rounded below."""
        rng, dd = self.rng, self.dd
        a = dd * rng.uniform(0.55, 0.85)
        b = dd * rng.uniform(0.35, 0.55)
        centre = self.disc + np.array([self.t * dd * rng.uniform(0.8, 2.0), dd * rng.choice([-1.0, 1.0]) * rng.uniform(1.3, 2.2)])
        extent = 1.1 * max(a, b)
        p = self._sample(centre, 0.6 * dd, extent, fov_frac=0.86, kind="PRH")
        self._occupy(p, extent, "PRH")
        pts = _ellipse_pts(p[0], p[1], a, b, rng.uniform(-0.1, 0.1), 48, _smooth_radial_noise(rng, 48, 0.08))
        top = p[1] - b * rng.uniform(0.0, 0.35)  # the fluid level
        col = self._dark_red(p, (0.6, 0.18, 0.3), (0.75, 0.3, 0.45))
        box = self._box(p, 1.3 * max(a, b) + 2)
        ys, xs = box
        local = np.zeros((ys.stop - ys.start, xs.stop - xs.start), np.float32)
        cv2.fillPoly(local, [_pts(pts - np.array([xs.start, ys.start]))], 1.0, cv2.LINE_8, _SHIFT)
        gy = np.arange(ys.start, ys.stop, dtype=np.float32)[:, None]
        local *= gy >= np.float32(top)
        # sedimented blood: darker towards the bottom
        depth = np.clip((gy - np.float32(top)) / np.float32(p[1] + b - top), 0.0, 1.0)
        shade = 1.0 - np.float32(0.4) * depth
        colour = np.stack([np.broadcast_to(np.float32(c) * shade, local.shape) for c in col])
        layer.patch(box, local * np.float32(0.97), colour)

    def _draw_ex(self, layer: _Layer, n_clusters: int) -> int:
        rng, R, dd = self.rng, self.R, self.dd
        count = 0
        for _ in range(n_clusters):
            ang = rng.uniform(0, 2 * np.pi)
            cc = self.fovea + dd * rng.uniform(0.5, 1.6) * np.array([math.cos(ang), math.sin(ang)])
            ring = rng.random() < 0.5
            nd = int(rng.integers(5, 16))
            rad_ring = dd * rng.uniform(0.3, 0.6)
            a0, span = rng.uniform(0, 2 * np.pi), rng.uniform(2.0, 5.0)
            drawn = 0
            for _ in range(nd):
                r = R * rng.uniform(0.006, 0.016) * (1.6 if rng.random() < 0.15 else 1.0)
                if ring:  # circinate: a partial ring of deposits
                    phi = a0 + span * rng.random()
                    q = cc + (rad_ring + rng.normal(0, 0.06 * dd)) * np.array([math.cos(phi), math.sin(phi)])
                else:  # clump
                    q = cc + rng.normal(0, 0.22 * dd, 2)
                col = self._lit(q, (rng.uniform(236, 255), rng.uniform(205, 238), rng.uniform(85, 145)))
                shape = _ellipse_pts(q[0], q[1], r, r * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi), 12,
                                     _smooth_radial_noise(rng, 12, 0.5))
                opacity = rng.uniform(0.9, 1.0)
                if not (self._valid(q, 1.5 * r, 0.88) and self._free(q, 1.5 * r, "EX")):
                    continue
                self._occupy(q, 1.5 * r, "EX")
                layer.poly(shape, col, opacity)
                drawn += 1
            if drawn == 0:  # a requested cluster is never empty
                r = R * 0.012
                q = self._sample(self.fovea, dd, 1.5 * r, fov_frac=0.88, kind="EX")
                self._occupy(q, 1.5 * r, "EX")
                layer.poly(_ellipse_pts(q[0], q[1], r, r, 0.0, 12), self._lit(q, (245, 225, 120)), 1.0)
                drawn = 1
            count += drawn
        return count

    def _arcade_point(self, dmin, dmax):
        """A point on a main arcade between dmin and dmax from the disc centre, and its direction."""
        rng = self.rng
        for _ in range(50):
            arc = self.arcades[int(rng.integers(0, len(self.arcades)))]
            d = np.hypot(arc[:, 0] - self.disc[0], arc[:, 1] - self.disc[1])
            idx = np.nonzero((d >= dmin) & (d <= dmax))[0]
            if len(idx):
                j = int(idx[int(rng.integers(0, len(idx)))])
                j2 = min(len(arc) - 1, j + 1)
                v = arc[j2] - arc[max(0, j2 - 1)]
                return arc[j], math.atan2(v[1], v[0])
        return self.disc + np.array([self.t * dmin, 0.0]), 0.0

    def _draw_se(self, layer: _Layer, n: int) -> int:
        rng, R, dd = self.rng, self.R, self.dd
        for _ in range(n):
            s = R * rng.uniform(0.035, 0.06)
            extent = 1.8 * s
            p = None
            for _ in range(30):  # close to a main arcade
                q, ang = self._arcade_point(0.9 * dd, 3.2 * dd)
                q = q + rng.normal(0, 0.03 * R, 2)
                if self._valid(q, extent, 0.86) and self._free(q, extent, "SE"):
                    p = q
                    break
            if p is None:
                p = self._sample(self.fovea, 1.5 * dd, extent, fov_frac=0.86, kind="SE")
                ang = rng.uniform(0, np.pi)
            self._occupy(p, extent, "SE")
            col = self._lit(p, (rng.uniform(228, 248), rng.uniform(218, 238), rng.uniform(190, 218)))
            op = rng.uniform(0.75, 0.88)
            for k in range(int(rng.integers(3, 7))):
                q = p + (np.clip(rng.normal(0, 0.3 * s, 2), -0.5 * s, 0.5 * s) if k else 0.0)
                rr = s * rng.uniform(0.45, 0.75)
                pts = _ellipse_pts(q[0], q[1], rr * rng.uniform(1.0, 1.5), rr * rng.uniform(0.6, 1.0), ang, 20,
                                   _smooth_radial_noise(rng, 20, 0.3))
                layer.poly(pts, col, op)
        return n

    def _draw_nv(self, nv: _Layer, haze: _Layer, n: int) -> tuple[list[str], np.ndarray]:
        """Neovascular tufts: fine tortuous red loops over a faint fibrous veil, each confined to a
        disc-shaped region (returned as a bool mask)."""
        rng, R, dd, h, w = self.rng, self.R, self.dd, self.h, self.w
        locations = []
        lines = np.zeros((h, w), np.uint8)
        region = np.zeros((h, w), np.uint8)
        thick = max(1, int(round(0.0075 * R)))
        col = None
        for k in range(n):
            if k == 0 and rng.random() < 0.75:  # NVD at the disc margin
                ang = rng.uniform(0, 2 * np.pi)
                c = self.disc + dd * rng.uniform(0.45, 0.65) * np.array([math.cos(ang), math.sin(ang)])
                rt = dd * rng.uniform(0.4, 0.6)
                locations.append("disc")
            else:  # NVE on an arcade
                c, _ = self._arcade_point(1.5 * dd, 3.8 * dd)
                rt = dd * rng.uniform(0.3, 0.45)
                locations.append("elsewhere")
            self._occupy(c, rt, "NV")
            if col is None:
                col = self._dark_red(c + np.array([0.0, 1.5 * dd]), (0.72, 0.36, 0.45), (0.85, 0.48, 0.6))
            cv2.circle(region, tuple(int(v) for v in np.round(c * _ONE)), int(round(rt * _ONE)), 1, -1, cv2.LINE_8, _SHIFT)
            nv.extend(np.array([c - rt, c + rt]))
            haze.poly(_ellipse_pts(c[0], c[1], 0.55 * rt, 0.55 * rt * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), 24,
                                   _smooth_radial_noise(rng, 24, 0.3)), self._lit(c, (222, 206, 192)), rng.uniform(0.18, 0.3))
            for _ in range(int(rng.integers(12, 24))):
                lc = c + np.clip(rng.normal(0, 0.3 * rt, 2), -0.5 * rt, 0.5 * rt)
                lr = rt * rng.uniform(0.12, 0.4)
                m = 40
                tt = np.linspace(0, 2 * np.pi * rng.uniform(0.9, 1.6), m) + rng.uniform(0, 2 * np.pi)
                rad = lr * _smooth_radial_noise(rng, m, 0.9, 5)
                pts = np.stack([lc[0] + rad * np.cos(tt), lc[1] + rad * np.sin(tt)], axis=1)
                cv2.polylines(lines, [_pts(pts)], False, int(rng.integers(190, 256)), thick, cv2.LINE_AA, _SHIFT)
        nv_mask = (region > 0) & self.fov
        if n:
            ys, xs = nv.roi()
            a = _blur(lines[ys, xs].astype(np.float32) * np.float32(1 / 255.0), nv.sigma) * nv_mask[ys, xs]
            nv.a[ys, xs] = a
            for k in range(3):
                nv.p[k, ys, xs] = a * np.float32(col[k])
            haze.finish(nv_mask.astype(np.float32))
        return locations, nv_mask

    # ---------------------------------------------------------------- assembly
    def build(self) -> Phantom:
        """The eye, its lesions, then the camera; the stages draw from their own random streams."""
        # one independent stream per stage, so that size-dependent draws (texture, noise) never
        # shift the others: the same seed gives the same eye and lesions at every size
        streams = [np.random.default_rng(int(s)) for s in self.rng.integers(0, 2**62, size=5)]
        self.rng, self.tex_rng = streams[0], streams[1]
        self._geometry()
        clean = self._background()
        self.rng = streams[2]
        self._vessels(clean)
        self.rng = streams[3]
        plan = self._plan()
        blur_scale = self.R / 225.0  # blur widths relative to a 480-px-high image
        layers, nv_layers, nv_loc, nv_mask, counts = self._draw_lesions(plan, blur_scale)
        masks = _top_most_masks(layers, self.h, self.w)
        healthy, image, halo = self._photograph(clean, layers, nv_layers, masks, nv_mask, streams[4], blur_scale)

        findings = {
            **{k: int(counts[k]) for k in ("MA", "HE", "EX")},
            "EX_clusters": int(plan["ex_clusters"]),
            "SE": int(counts["SE"]),
            "haemorrhages_per_quadrant": counts["per_quadrant"],
            "neovascularization": bool(plan["nv"] > 0),
            "nv_tufts": int(plan["nv"]),
            "nv_locations": nv_loc,
            "preretinal_haemorrhage": bool(plan["prh"]),
        }
        g = grade_from_findings(findings)
        assert g == self.grade, (g, self.grade, findings)
        findings["referable"] = is_referable(g)
        return Phantom(image=image, healthy=healthy, masks=masks, grade=g, findings=findings,
                       fov=self.fov.copy(), info=self._info(g, halo), nv_mask=nv_mask)

    def _draw_lesions(self, plan: dict, blur_scale: float):
        """Every finding of ``plan`` on its own layer: big findings first, the others avoid them (and each
        other). Returns the lesion layers, the NV layers (tufts, veil), the NV locations and region, and
        the counts drawn."""
        h, w, s = self.h, self.w, blur_scale
        layers = {
            "EX": _Layer(h, w, max(0.35, 0.4 * s)),
            "HE": _Layer(h, w, max(0.45, 0.8 * s)),
            "MA": _Layer(h, w, max(0.4, 0.45 * s)),
            "SE": _Layer(h, w, max(1.0, 3.2 * s)),
        }
        self.occ_x, self.occ_y, self.occ_r, self.occ_k = [], [], [], []
        nv = _Layer(h, w, max(0.3, 0.3 * s))
        nv_haze = _Layer(h, w, max(1.0, 4.0 * s))
        nv_loc, nv_mask = self._draw_nv(nv, nv_haze, plan["nv"])
        if plan["prh"]:
            self._draw_prh(layers["HE"])
        n_he, per_q = self._draw_he(layers["HE"], plan)
        counts = {"HE": n_he, "per_quadrant": per_q}
        counts["EX"] = self._draw_ex(layers["EX"], plan["ex_clusters"])
        counts["SE"] = self._draw_se(layers["SE"], plan["se"])
        counts["MA"] = self._draw_ma(layers["MA"], plan["ma"])
        for layer in layers.values():
            layer.finish(self.lesion_allowed)
        return layers, (nv_haze, nv), nv_loc, nv_mask, counts

    def _photograph(self, clean: np.ndarray, layers: dict, nv_layers: tuple, masks: dict, nv_mask: np.ndarray,
                    cam_rng: np.random.Generator, blur_scale: float) -> tuple[np.ndarray, np.ndarray, int]:
        """The healthy and the diseased photograph through one camera (one noise field, one blur), the
        lesions composited only near their masks; also the halo (px) beyond which nothing changed."""
        h, w, R = self.h, self.w, self.R
        noise_sigma = cam_rng.uniform(1.5, 3.5)
        # triangular noise from random bytes (much faster than Gaussian)
        raw = np.frombuffer(cam_rng.bytes(2 * h * w), np.uint8).reshape(2, h, w)
        noise = raw[0].astype(np.float32) + raw[1] - np.float32(255.0)
        noise *= np.float32(noise_sigma / 104.5)
        cam_sigma = max(0.4, 0.6 * blur_scale)
        cam_radius = int(math.ceil(3.0 * cam_sigma))
        halo_pre = int(math.ceil(0.03 * R)) + 1
        halo = halo_pre + cam_radius + 1

        support = nv_mask.copy()
        for m in masks.values():
            support |= m
        has_lesions = bool(support.any())
        image_clean = clean
        if has_lesions:
            # nothing may change farther than halo_pre px from a mask / NV region
            dist = cv2.distanceTransform((~support).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
            allowed = (dist <= halo_pre).astype(np.float32)
            image_clean = clean.copy()
            for layer in (layers["EX"], layers["HE"], layers["MA"], layers["SE"], *nv_layers):
                layer.clip(allowed)
                layer.over(image_clean)

        fov_u8 = self.fov.astype(np.uint8)

        def finalize(x: np.ndarray) -> np.ndarray:
            planes = []
            for k, nk in enumerate((1.2, 1.0, 0.8)):
                y = x[k] + np.float32(nk) * noise
                y = _blur(y, cam_sigma)
                np.maximum(y, 0.0, out=y)
                planes.append(cv2.convertScaleAbs(y) * fov_u8)
            return cv2.merge(planes)

        healthy = finalize(clean)
        image = finalize(image_clean) if has_lesions else healthy.copy()
        return healthy, image, halo

    def _info(self, grade: int, halo: int) -> dict:
        return {
            "seed": self.seed,
            "size": (self.h, self.w),
            "grade": grade,
            "grade_name": GRADES[grade],
            "laterality": self.laterality,
            "fov_center": (float(self.c[0]), float(self.c[1])),
            "fov_radius": float(self.R),
            "disc_center": (float(self.disc[0]), float(self.disc[1])),
            "disc_radii": (float(self.disc_r[0]), float(self.disc_r[1])),
            "disc_diameter": float(2 * self.disc_r.max()),
            "cup_radii": (float(self.disc_r[0] * self.cup_frac), float(self.disc_r[1] * self.cup_frac * 1.1)),
            "fovea_center": (float(self.fovea[0]), float(self.fovea[1])),
            "mask_halo_px": int(halo),
            "pigmentation": self.pigmentation,
            "brightness": self.brightness,
        }


def _top_most_masks(layers: dict, h: int, w: int) -> dict[str, np.ndarray]:
    """A pixel belongs to the top-most lesion drawn there (layers are composited EX, HE, MA, SE)."""
    masks = {}
    above = np.zeros((h, w), bool)
    for name in ("SE", "MA", "HE", "EX"):
        m = layers[name].a > 0.5
        masks[name] = m & ~above
        above |= m
    return {name: masks[name] for name in LESIONS}
