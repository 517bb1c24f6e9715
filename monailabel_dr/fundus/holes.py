"""Random hole masks for training the learned inpainter of TWLR's stage 2 (self-supervised).

A hole is a union of blobs (filled ellipses) and strokes (thick polylines) drawn with OpenCV, kept
inside the field of view and off known lesion pixels (dilated by ``lesion_margin`` px), so the
network only ever learns to paint healthy retina. Its area is a random fraction, in
``area_fraction``, of the *healthy* field of view of the crop (field of view minus dilated lesions):
that is the only area a hole may cover, so the range can always be met.

- :func:`healthy_region`, :func:`random_hole_mask`: numpy / OpenCV, no MONAI;
- :class:`RandHoleMaskd`: the same as a MONAI ``Randomizable`` map transform (seeded like every
  other MONAI random transform of a training chain);
- :class:`InpaintingPaird`: the network input (RGB with the hole zeroed + the hole) and the target
  (true RGB + the hole), the contract of :func:`monailabel_dr.fundus.inpainting.network_inpaint` and
  :class:`monailabel_dr.networks.inpainter.HoleLoss`;
- :class:`SeededPerItemd`: random transforms made deterministic per item (fixed validation holes);
- :func:`hole_psnr`: PSNR inside the hole (MONAI's ``PSNRMetric`` on the hole pixels).

Nothing here knows MONAI Label.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, fields
from typing import Any, Hashable, Mapping, Sequence

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.metrics import PSNRMetric
from monai.transforms import Compose, MapTransform, Randomizable


def _pair(value, cast, name: str) -> tuple:
    v = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(v) != 2:
        raise ValueError(f"holes.{name} needs [min, max], got {value!r}")
    lo, hi = cast(v[0]), cast(v[1])
    if lo > hi or lo < 0:
        raise ValueError(f"holes.{name}: need 0 <= min <= max, got {value!r}")
    return lo, hi


@dataclass(frozen=True)
class HoleSettings:
    """What a hole looks like (the ``train.holes`` block of configs/twlr_inpainter.yaml)."""

    blobs: tuple[int, int] = (1, 3)                   # filled ellipses per hole (min, max)
    strokes: tuple[int, int] = (0, 2)                 # thick polylines per hole (min, max)
    area_fraction: tuple[float, float] = (0.05, 0.25)  # of the crop's healthy field of view
    stroke_width: tuple[float, float] = (0.03, 0.08)   # of the crop's shorter side
    stroke_vertices: tuple[int, int] = (3, 6)
    blob_aspect: tuple[float, float] = (0.3, 1.0)     # minor / major axis
    lesion_margin: int = 3                            # px around known lesions kept out of holes
    max_shapes: int = 64                              # planned shapes + fillers, per hole

    def __post_init__(self):
        for name, cast in (("blobs", int), ("strokes", int), ("area_fraction", float), ("stroke_width", float),
                           ("stroke_vertices", int), ("blob_aspect", float)):
            object.__setattr__(self, name, _pair(getattr(self, name), cast, name))
        if self.area_fraction[1] > 1:
            raise ValueError(f"holes.area_fraction must be within [0, 1], got {self.area_fraction}")
        if self.stroke_vertices[0] < 2:
            raise ValueError("holes.stroke_vertices: a polyline needs at least 2 vertices")
        if self.blob_aspect[0] <= 0 or self.blob_aspect[1] > 1:
            raise ValueError("holes.blob_aspect must be within (0, 1]")
        if self.blobs[1] + self.strokes[1] < 1:
            raise ValueError("holes: allow at least one blob or stroke")
        object.__setattr__(self, "lesion_margin", int(self.lesion_margin))
        object.__setattr__(self, "max_shapes", max(1, int(self.max_shapes)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "HoleSettings":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown hole setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def healthy_region(fov: np.ndarray, lesions: np.ndarray | None = None, margin: int = 0) -> np.ndarray:
    """Bool (H, W): inside the field of view and at least ``margin`` px away from any lesion pixel."""
    allowed = np.asarray(fov, dtype=bool).copy()
    if lesions is not None:
        les = np.asarray(lesions, dtype=bool)
        if les.any():
            if margin > 0:
                k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
                les = cv2.dilate(les.astype(np.uint8), k) > 0
            allowed &= ~les
    return allowed


def _draw_blob(canvas: np.ndarray, rng: np.random.RandomState, centre, area: float, s: HoleSettings) -> None:
    r = rng.uniform(*s.blob_aspect)
    a = math.sqrt(max(area, 1.0) / (math.pi * r))   # semi-axes a, r*a: area pi * a * (r * a)
    b = r * a
    shift = 4   # OpenCV's fixed-point sub-pixel coordinates, so small blobs keep their area
    f = 1 << shift
    cv2.ellipse(canvas, (int(centre[0] * f), int(centre[1] * f)), (max(1, int(a * f)), max(1, int(b * f))),
                float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1, lineType=cv2.LINE_8, shift=shift)


def _draw_stroke(canvas: np.ndarray, rng: np.random.RandomState, centre, area: float, s: HoleSettings) -> None:
    side = min(canvas.shape)
    width = max(2.0, rng.uniform(*s.stroke_width) * side)
    length = max(area / width, width)
    n = int(rng.randint(s.stroke_vertices[0], s.stroke_vertices[1] + 1))
    step = length / (n - 1)
    angle = rng.uniform(0, 2 * math.pi)
    pts = [np.asarray(centre, dtype=np.float64)]
    for _ in range(n - 1):
        angle += rng.uniform(-math.pi / 2, math.pi / 2)
        pts.append(pts[-1] + step * np.array([math.cos(angle), math.sin(angle)]))
    poly = np.round(np.stack(pts)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [poly], False, 1, thickness=max(1, int(round(width))), lineType=cv2.LINE_8)


def random_hole_mask(allowed: np.ndarray, rng: np.random.RandomState, settings: HoleSettings | None = None) -> np.ndarray:
    """A random hole (bool (H, W)) inside ``allowed`` covering a fraction in ``settings.area_fraction`` of it.

    ``blobs`` ellipses and ``strokes`` polylines share the drawn area; each is centred on an allowed
    pixel. Parts clipped by the region (or overlapping) are made up with filler blobs until the
    drawn fraction reaches the range (at most ``max_shapes`` shapes in all); a shape that would take the hole above the range is redrawn
    smaller (or left out). An empty region gives an empty hole.
    """
    s = settings or HoleSettings()
    allowed = np.asarray(allowed, dtype=bool)
    total = int(allowed.sum())
    hole = np.zeros(allowed.shape, bool)
    if total == 0:
        return hole
    lo, hi = s.area_fraction[0] * total, s.area_fraction[1] * total
    target = rng.uniform(lo, hi)
    kinds = ["blob"] * int(rng.randint(s.blobs[0], s.blobs[1] + 1)) + ["stroke"] * int(rng.randint(s.strokes[0], s.strokes[1] + 1))
    kinds = [kinds[i] for i in rng.permutation(len(kinds))] or ["blob"]
    ys, xs = np.nonzero(allowed)
    area = 0
    for i in range(s.max_shapes):
        planned = i < len(kinds)
        if not planned and area >= max(lo, 0.9 * target):
            break
        # planned shapes share the target; fillers (blobs) make up what clipping and overlaps lost
        budget = target / len(kinds) if planned else target - area
        budget = max(min(budget, target - area), 1.0)
        draw = _draw_stroke if planned and kinds[i] == "stroke" else _draw_blob
        j = int(rng.randint(len(ys)))
        for _ in range(6):   # a shape that would overshoot the range (thick strokes, tiny ranges) is redrawn smaller
            canvas = hole.astype(np.uint8)
            draw(canvas, rng, (xs[j], ys[j]), budget, s)
            new = (canvas > 0) & allowed
            if new.sum() <= hi:
                hole = new
                break
            budget /= 2
        area = int(hole.sum())
    return hole


def _bool_hw(value, threshold: float) -> np.ndarray:
    """(C, H, W) or (H, W) array / tensor -> bool (H, W): any channel above ``threshold``."""
    a = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    a = a > threshold
    return a.any(0) if a.ndim == 3 else a


class RandHoleMaskd(Randomizable, MapTransform):
    """Draw a random hole for ``data[key]`` (a channel-first image, (C, H, W)) into ``data[hole_key]``.

    ``fov_key``: (1, H, W) field of view (> 0.5 inside; absent: the whole image); ``avoid_key``:
    (C, H, W) known lesions (any channel > ``avoid_threshold`` is a lesion, dilated by the settings'
    ``lesion_margin``; absent: none). Writes float32 (1, H, W), 1 in the hole.
    """

    def __init__(self, keys: KeysCollection = "image", hole_key: str = "hole", fov_key: str | None = "fov",
                 avoid_key: str | None = None, settings: HoleSettings | Mapping | None = None,
                 avoid_threshold: float = 0.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.hole_key = hole_key
        self.fov_key = fov_key
        self.avoid_key = avoid_key
        self.avoid_threshold = float(avoid_threshold)
        self.settings = settings if isinstance(settings, HoleSettings) else HoleSettings.from_dict(settings)

    def randomize(self, data: Any = None) -> None:
        pass   # the shapes are drawn from self.R while the mask is made (their number depends on clipping)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape[-2:])
            fov = _bool_hw(d[self.fov_key], 0.5) if self.fov_key and self.fov_key in d else np.ones(shape, bool)
            avoid = _bool_hw(d[self.avoid_key], self.avoid_threshold) if self.avoid_key and self.avoid_key in d else None
            allowed = healthy_region(fov, avoid, self.settings.lesion_margin)
            hole = random_hole_mask(allowed, self.R, self.settings)
            d[self.hole_key] = torch.from_numpy(hole[None].astype(np.float32))
        return d


class InpaintingPaird(MapTransform):
    """``data[key]`` (3, H, W) RGB in [0, 1] and ``data[hole_key]`` (1, H, W) -> the network input
    ``data[key]`` = (4, H, W): RGB with the hole zeroed + the hole (as ``network_inpaint`` builds it at
    inference), and the target ``data[target_key]`` = (4, H, W): the true RGB + the hole (``HoleLoss``)."""

    def __init__(self, keys: KeysCollection = "image", hole_key: str = "hole", target_key: str = "label",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.hole_key = hole_key
        self.target_key = target_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            rgb = torch.as_tensor(d[key]).float()
            hole = torch.as_tensor(d[self.hole_key]).float()
            d[self.target_key] = torch.cat([rgb, hole], 0)
            d[key] = torch.cat([rgb * (1 - hole), hole], 0)
        return d


class SeededPerItemd(MapTransform):
    """Run random MONAI transforms with a seed derived from ``data[key]`` (an item id) and ``seed``, so
    one item always gets the same crops and holes, whatever the order or the epoch (fixed validation
    holes). Not ``Randomizable`` itself, so MONAI's ``CacheDataset`` computes it once and caches it.

    Hand-written: MONAI seeds a chain once (``Compose.set_random_state``), not per item; this only
    calls that per item.
    """

    def __init__(self, transforms: Sequence, key: str = "id", seed: int = 0):
        super().__init__(keys=key, allow_missing_keys=False)
        self.chain = Compose(list(transforms))
        self.key = key
        self.seed = int(seed)

    def __call__(self, data: Mapping[Hashable, Any]):
        item_seed = (zlib.crc32(str(data[self.key]).encode()) + self.seed) % (2**32)
        self.chain.set_random_state(seed=item_seed)
        return self.chain(dict(data))


MAX_PSNR = 100.0   # a perfect fill (MSE 0) reads as this instead of inf, so statistics stay finite


def hole_psnr(pred: torch.Tensor, target: torch.Tensor, hole: torch.Tensor) -> list[float]:
    """PSNR (dB, data range 1) inside the hole, per sample: pred / target (B, C, H, W) in [0, 1], hole
    (B, 1, H, W). Samples without a hole are skipped. MONAI's PSNRMetric on the hole pixels."""
    psnr = PSNRMetric(max_val=1.0)   # cumulative: a fresh one per call, so nothing accumulates
    out = []
    for p, t, h in zip(pred.float(), target.float(), hole):
        m = h[0] > 0.5
        if not bool(m.any()):
            continue
        v = float(psnr(p[:, m].reshape(1, -1), t[:, m].reshape(1, -1)).reshape(-1)[0])
        out.append(min(v, MAX_PSNR))
    return out
