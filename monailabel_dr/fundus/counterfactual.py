"""Lesion-removed counterfactuals of real photographs, for training TWLR's grader without grades.

Real lesion datasets (IDRiD's segmentation set) have pixel masks but no grades, and every image is
diseased, so an image-level grader trained on them alone never sees a negative. This module makes
the negatives from the photographs themselves: per sample it removes a random subset of the lesion
types (all of a type's pixels, dilated) or a random subset of one type's lesions, by inpainting them
with the same OpenCV backend TWLR's stage 2 uses, and derives the image-level targets from what is
left:

- lesion presence: a type is present when at least ``min_area`` working pixels of it remain;
- grade: an ICDR *proxy* from the remaining lesion types (:func:`grade_proxy`): none -> 0 (no DR),
  microaneurysms only -> 1 (mild), any haemorrhage / hard exudate / cotton-wool spot -> 2
  (moderate). ICDR's severe and proliferative grades rest on findings no lesion mask holds (the
  4-2-1 rule's venous beading and IRMA, neovascularisation), so the proxy never exceeds 2.

Inpainting also leaves a smooth patch where it works; so that "smooth patch" cannot itself become
the grader's cue for "healthy", random healthy regions (off every lesion) are inpainted too, as
decoys, with probability ``decoy_prob``, on positives and negatives alike.

The grader itself is trained on image-level targets only; the masks are used to synthesise the
counterfactual images (say so wherever such a model is reported).

Nothing here knows MONAI Label.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Hashable, Mapping

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

from monailabel_dr.fundus.components import connected_components
from monailabel_dr.fundus.holes import HoleSettings, healthy_region, random_hole_mask
from monailabel_dr.fundus.inpainting import opencv_inpaint
from monailabel_dr.fundus.lesions import LESIONS


def grade_proxy(present: Mapping[str, bool]) -> int:
    """ICDR grade proxy from lesion presence: 0 none, 1 microaneurysms only, 2 anything else (see module doc)."""
    if any(present.get(les, False) for les in LESIONS if les != "MA"):
        return 2
    return 1 if present.get("MA", False) else 0


@dataclass(frozen=True)
class CounterfactualSettings:
    """The ``train.counterfactual`` block of a TWLR profile (configs/twlr.yaml)."""

    clear_prob: float = 0.25     # remove every lesion (a lesion-free counterfactual)
    remove_prob: float = 0.4     # otherwise, remove each lesion type with this probability
    partial_prob: float = 0.3    # otherwise, remove a random 30-90 % of a kept type's lesions
    decoy_prob: float = 0.5      # inpaint random healthy regions as well (see module doc)
    decoy_area: tuple[float, float] = (0.002, 0.02)   # of the healthy field of view
    dilation: int = 2            # px (working resolution) around removed lesions
    radius: int = 3              # OpenCV inpainting radius, px
    backend: str = "ns"          # "ns" (Navier-Stokes) or "telea"
    min_area: float = 1.0        # working pixels of coverage for a lesion type to count as present

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "CounterfactualSettings":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"counterfactual: unknown settings {sorted(unknown)}; known: {sorted(names)}")
        if "decoy_area" in d:
            d["decoy_area"] = tuple(float(v) for v in d["decoy_area"])
        s = cls(**d)
        for name in ("clear_prob", "remove_prob", "partial_prob", "decoy_prob"):
            if not 0.0 <= getattr(s, name) <= 1.0:
                raise ValueError(f"counterfactual.{name} must be in [0, 1], got {getattr(s, name)}")
        if s.backend not in ("ns", "telea"):
            raise ValueError(f"counterfactual.backend must be ns or telea, got {s.backend!r}")
        return s


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def remove_lesions(image: np.ndarray, coverage: np.ndarray, fov: np.ndarray, remove: np.ndarray,
                   s: CounterfactualSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inpaint the pixels ``remove`` (bool (H, W)), dilated by ``s.dilation`` and kept in the field of view.

    image: (H, W, 3) uint8; coverage: (m, H, W) lesion coverage in [0, 1]. Returns the new image, the
    coverage with the inpainted pixels cleared, and the inpainted region.
    """
    region = remove.astype(np.uint8)
    if s.dilation > 0:
        region = cv2.dilate(region, _disk(s.dilation))
    region = (region > 0) & fov
    if not region.any():
        return image, coverage, region
    out = opencv_inpaint(image, region, method=s.backend, radius=s.radius)
    return out, coverage * ~region[None], region


class RandLesionRemovald(Randomizable, MapTransform):
    """Make a random lesion-removed counterfactual of ``data[key]`` and its image-level target.

    Needs ``data[key]`` (3, H, W) RGB in [0, 1] and ``data[lesions_key]`` (m + 1, H, W): lesion coverage
    per type plus the field of view (``LoadLesionTargetsd``'s output). Writes the new image to
    ``data[key]``, ``data[label_key]`` = [grade proxy, referable, MA, HE, EX, SE] (``make_targets``),
    and drops ``data[lesions_key]``.
    """

    def __init__(self, keys: KeysCollection = "image", lesions_key: str = "lesions", label_key: str = "label",
                 settings: CounterfactualSettings | Mapping | None = None, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.lesions_key = lesions_key
        self.label_key = label_key
        self.settings = settings if isinstance(settings, CounterfactualSettings) else CounterfactualSettings.from_dict(settings)

    def randomize(self, data: Any = None) -> None:
        pass   # draws depend on which lesions the image holds; they are taken from self.R in __call__

    def _plan(self, coverage: np.ndarray) -> np.ndarray:
        """Which lesion pixels to remove (bool (H, W))."""
        s = self.settings
        drop = np.zeros(coverage.shape[1:], bool)
        present = [i for i in range(coverage.shape[0]) if coverage[i].sum() >= s.min_area]
        if not present:
            return drop
        if self.R.rand() < s.clear_prob:
            return coverage.max(0) > 0
        for i in present:
            if self.R.rand() < s.remove_prob:
                drop |= coverage[i] > 0
            elif self.R.rand() < s.partial_prob:
                k, comp = connected_components(coverage[i] > 0)[:2]
                n = k + 1   # with the background, as OpenCV counts
                if n > 2:   # at least two lesions: remove a random 30-90 % of them
                    k = max(1, int(round(self.R.uniform(0.3, 0.9) * (n - 1))))
                    chosen = self.R.choice(np.arange(1, n), size=min(k, n - 2), replace=False)
                    drop |= np.isin(comp, chosen)
        return drop

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from monailabel_dr.fundus.labels import make_targets

        d = dict(data)
        s = self.settings
        les = d.pop(self.lesions_key)
        les = les.detach().cpu().numpy() if torch.is_tensor(les) else np.asarray(les)
        coverage, fov = les[:-1].astype(np.float32), les[-1] > 0.5
        for key in self.key_iterator(d):
            img = d[key]
            img = img.detach().cpu().numpy() if torch.is_tensor(img) else np.asarray(img)
            rgb = (np.clip(img.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)
            rgb, coverage, _ = remove_lesions(rgb, coverage, fov, self._plan(coverage), s)
            if self.R.rand() < s.decoy_prob:
                # off the lesions, and off the field of view's rim (inpainting there would pull in the black surround)
                inner = cv2.erode(fov.astype(np.uint8), _disk(3 * s.radius)) > 0
                allowed = healthy_region(inner, coverage.max(0) > 0, margin=s.dilation + 2)
                hole = random_hole_mask(allowed, self.R, HoleSettings(area_fraction=s.decoy_area, strokes=(0, 1)))
                if hole.any():
                    rgb = opencv_inpaint(rgb, hole, method=s.backend, radius=s.radius)
            d[key] = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / 255.0)
        present = {name: bool(coverage[i].sum() >= s.min_area) for i, name in enumerate(LESIONS)}
        d[self.label_key] = torch.tensor(make_targets(grade_proxy(present), present), dtype=torch.float32)
        return d
