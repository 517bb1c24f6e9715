"""Dice and IoU: the app's one overlap rule, used by the evaluation (``metrics/lesions.py``), the lesion
trainers' validation (``PooledLesionDice``), TWLR's weak-mask figures (``metrics/regression.py``) and the
disagreement score (``metrics/uncertainty.py``).

The rule: ``Dice = 2 TP / (2 TP + FP + FN)`` and ``IoU = TP / (TP + FP + FN)`` over whatever counts the
caller pooled (one image, all images, one histogram bin). When truth and prediction are both empty the
denominator is 0 and the overlap is **undefined: NaN** (never 0, which would punish a correct "nothing
here", nor 1, which would reward it in an average). Averages skip undefined values. A caller that must
give a number converts at its own boundary and says so: the disagreement score counts two empty masks as
full agreement (the models agree there is nothing), a trainer's validation key metric as 0 (nothing to
select on), a JSON report as null.

Why not ``monai.metrics.DiceMetric``: its empty rule (``ignore_empty``) makes an image with an empty
truth NaN whatever was predicted, so a false positive on a healthy eye would not count against the
model; and it works per batch on tensors, while these counts are pooled over whole photographs or read
from probability histograms.
"""

from __future__ import annotations

import numpy as np


def _counts(*xs):
    return tuple(np.asarray(x, dtype=np.float64) for x in xs)


def dice_from_counts(tp, fp, fn) -> np.ndarray:
    """Dice of (arrays of) counts, elementwise; NaN where ``2 TP + FP + FN == 0``."""
    tp, fp, fn = _counts(tp, fp, fn)
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)


def iou_from_counts(tp, fp, fn) -> np.ndarray:
    """IoU (Jaccard) of (arrays of) counts, elementwise; NaN where ``TP + FP + FN == 0``."""
    tp, fp, fn = _counts(tp, fp, fn)
    den = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, tp / np.where(den > 0, den, 1), np.nan)


def mask_dice(a, b) -> float:
    """Dice of two binary masks of one shape; NaN when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    tp = int(np.logical_and(a, b).sum())
    return float(dice_from_counts(tp, int(a.sum()) - tp, int(b.sum()) - tp))
