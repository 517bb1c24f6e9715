"""Connected components: the app's one rule, used by serving, evaluation and training alike.

Lesions, region proposals and fields of view are the **8-connected** components of a 2-D boolean mask.
OpenCV's ``connectedComponentsWithStats`` gives labels, areas and centroids in one pass (3-5x faster than
``scipy.ndimage.label`` plus ``bincount`` on a sparse 12 MP lesion mask, measured on 2 CPU cores), so it is
the implementation. OpenCV numbers components in its own order; ``raster_order=True`` renumbers them in
the order of each component's first pixel in a row-major scan (what ``scipy.ndimage.label`` gives), for
outputs where the number is what a client sees (the CAM region ids).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np


class Components(NamedTuple):
    n: int                  # number of components (labels 1..n; 0 is background)
    labels: np.ndarray      # (H, W) int32
    areas: np.ndarray       # (n,) int64, pixels of component k + 1 at index k
    centroids: np.ndarray   # (n, 2) float64, (x, y) of component k + 1 at index k


def connected_components(mask: np.ndarray, raster_order: bool = False) -> Components:
    """The 8-connected components of a 2-D mask (anything non-zero is foreground)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    if not m.flags.c_contiguous or m.dtype not in (np.uint8, np.bool_):
        m = (m != 0).astype(np.uint8)
    elif m.dtype == np.bool_:
        m = m.view(np.uint8)        # no copy: OpenCV takes any non-zero uint8 as foreground
    n, labels, stats, cents = cv2.connectedComponentsWithStats(m, connectivity=8)
    areas, cents = stats[1:, cv2.CC_STAT_AREA].astype(np.int64), cents[1:]
    if raster_order and n > 2:
        flat = labels.ravel()
        nz = np.flatnonzero(flat)
        _, first = np.unique(flat[nz], return_index=True)      # first scan position of labels 1..n-1
        order = np.argsort(first, kind="stable")               # new label k + 1 is old label order[k] + 1
        lut = np.zeros(n, dtype=np.int32)
        lut[order + 1] = np.arange(1, n, dtype=np.int32)
        labels = lut[labels]
        areas, cents = areas[order], cents[order]
    return Components(int(n - 1), labels.astype(np.int32, copy=False), areas, cents)


def kept_components(prob: np.ndarray, threshold: float, peak: float = 0.0, min_area: int = 0) -> np.ndarray:
    """The mask ``prob >= threshold`` keeping only the components whose highest probability reaches ``peak``
    (hysteresis thresholding: a component needs a confident core; its extent is the threshold's) and whose
    area is at least ``min_area`` pixels. A uint8 mask (0/1). With ``peak <= threshold`` and ``min_area <= 1``
    it is the plain threshold mask.

    ``skimage.filters.apply_hysteresis_threshold`` does the peak part with ``scipy.ndimage.label`` (4-connected
    by default, and 3-5x slower on a 12 MP map) and ``skimage.morphology.remove_small_objects`` the area part
    with a second labelling; this is the app's 8-connected rule (module docstring) in one labelling, and the
    maximum per component is taken over the foreground pixels only (a lesion map is ~1 % foreground)."""
    p = np.asarray(prob)
    mask = (p >= threshold).view(np.uint8) if threshold > 0 else (p >= threshold).astype(np.uint8)
    if (peak <= threshold and min_area <= 1) or not mask.any():
        return mask
    comps = connected_components(mask)
    fg = comps.labels > 0
    lab = comps.labels[fg]
    keep = np.ones(comps.n + 1, bool)
    if peak > threshold:
        best = np.zeros(comps.n + 1, np.float64)
        np.maximum.at(best, lab, p[fg])
        keep &= best >= peak
    if min_area > 1:
        keep[1:] &= comps.areas >= min_area
    keep[0] = False
    out = np.zeros_like(mask)
    out[fg] = keep[lab]
    return out
