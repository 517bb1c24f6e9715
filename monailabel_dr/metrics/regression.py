"""Metrics of TWLR's severity regression where the lesion-free eye is known (synthetic phantoms).

- :func:`masked_psnr` / :func:`masked_ssim`: PSNR and SSIM of an image against a reference restricted
  to a region (the removed regions, or the field of view). ``skimage.metrics.peak_signal_noise_ratio``
  and MONAI's ``PSNRMetric`` have no mask argument, so PSNR is computed here from the masked MSE
  (10 log10(255^2 / MSE)); SSIM is scikit-image's local SSIM map averaged over the region.
- :func:`random_mask_expectation`: the expected overlap of a random mask of the same area placed
  uniformly inside the field of view, the baseline a weak mask must beat.
- :class:`WeakMaskAccumulator`: pooled Dice / precision / recall of weak masks per lesion and for the
  union of lesions, with the random baseline pooled alike.

Nothing here knows MONAI Label.
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

from monailabel_dr.metrics.overlap import dice_from_counts


def masked_psnr(image: np.ndarray, reference: np.ndarray, mask: np.ndarray, data_range: float = 255.0) -> float | None:
    """PSNR (dB) over the pixels of ``mask`` (all channels); None for an empty mask, inf when identical."""
    m = mask.astype(bool)
    if not m.any():
        return None
    diff = image.astype(np.float64)[m] - reference.astype(np.float64)[m]
    mse = float(np.mean(diff ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def masked_ssim(image: np.ndarray, reference: np.ndarray, mask: np.ndarray, data_range: float = 255.0) -> float | None:
    """Mean of the local SSIM map (7x7 windows, colour channels averaged) over ``mask``; None for an empty mask."""
    m = mask.astype(bool)
    if not m.any():
        return None
    _, smap = structural_similarity(image, reference, data_range=data_range, channel_axis=-1 if image.ndim == 3 else None,
                                    full=True)
    if smap.ndim == 3:
        smap = smap.mean(-1)
    return float(smap[m].mean())


def random_mask_expectation(area: int, truth_area: int, fov_area: int) -> float:
    """Expected true positives of a random mask of ``area`` pixels placed uniformly in a field of view of
    ``fov_area`` pixels holding ``truth_area`` lesion pixels: area * truth_area / fov_area."""
    return area * truth_area / max(fov_area, 1)


def _dice(tp: float, fp: float, fn: float) -> float | None:
    """metrics/overlap.py's Dice; undefined (both empty) is None in these JSON-bound figures."""
    d = float(dice_from_counts(tp, fp, fn))
    return None if math.isnan(d) else d


class WeakMaskAccumulator:
    """Pooled (over images) weak-mask overlap with the true masks, per class and for the union
    ("any"), next to a random mask of the same area per image (its expected counts)."""

    def __init__(self, classes):
        self.classes = (*classes, "any")
        self.counts = {c: np.zeros(3) for c in self.classes}          # TP, FP, FN
        self.random = {c: np.zeros(3) for c in self.classes}          # expected TP, FP, FN of the random mask

    def update(self, weak: dict[str, np.ndarray], truth: dict[str, np.ndarray], fov: np.ndarray) -> dict:
        fov = fov.astype(bool)
        weak = {c: weak[c].astype(bool) & fov for c in weak}
        truth = {c: truth[c].astype(bool) & fov for c in truth}
        weak["any"] = np.any(list(weak.values()), axis=0)
        truth["any"] = np.any(list(truth.values()), axis=0)
        per_image = {}
        for c in self.classes:
            w, t = weak[c], truth[c]
            tp = float((w & t).sum())
            a, g = float(w.sum()), float(t.sum())
            self.counts[c] += (tp, a - tp, g - tp)
            etp = random_mask_expectation(a, g, int(fov.sum()))
            self.random[c] += (etp, a - etp, g - etp)
            per_image[c] = {"dice": _dice(tp, a - tp, g - tp), "random_dice": _dice(etp, a - etp, g - etp),
                            "area": int(a), "truth_area": int(g)}
        return per_image

    def compute(self) -> dict:
        out = {}
        for c in self.classes:
            tp, fp, fn = self.counts[c]
            rtp, rfp, rfn = self.random[c]
            out[c] = {
                "dice": _dice(tp, fp, fn),
                "precision": None if tp + fp == 0 else tp / (tp + fp),
                "recall": None if tp + fn == 0 else tp / (tp + fn),
                "random_dice": _dice(rtp, rfp, rfn),
                "random_precision": None if rtp + rfp == 0 else rtp / (rtp + rfp),
                "weak_area_px": int(tp + fp),
                "truth_area_px": int(tp + fn),
            }
        return out
