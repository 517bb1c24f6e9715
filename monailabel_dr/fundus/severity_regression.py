"""Stage 2 of TWLR (Luo et al., 2025): iterative saliency-guided inpainting towards a healthier eye
("severity regression", ``../shared/METHODS.md`` §4), an image-processing loop over a grader's answers.

The grader is passed in as a function (for TWLR's vision-language grader,
:func:`monailabel_dr.networks.twlr.grading_probe`), the inpainting backend too
(:mod:`monailabel_dr.fundus.inpainting`), so this module knows neither torch networks nor MONAI Label.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from monailabel_dr.fundus.lesions import LESIONS

# image (S, S, 3) uint8 -> (grade probabilities, lesion probabilities, lesion saliency (m, S, S))
GradeFn = Callable[[np.ndarray], tuple[Sequence[float], Sequence[float], np.ndarray]]


@dataclass
class RegressionSettings:
    """METHODS.md §4's defaults."""
    tau: float = 0.5                 # a lesion is inpainted while its presence probability is above tau
    threshold: float = 0.5           # on the min-max normalised saliency
    dilation: int = 3                # px at the loop's working resolution
    t_max: int = 8
    min_new_fraction: float = 0.0005  # a new region under this fraction of the field of view is "tiny"
    patience: int = 2                # stop when the grade has not dropped for this many steps
    saliency: str = "patch_text"     # which saliency the grading probe computes (networks/twlr.py SALIENCY_METHODS)

    @classmethod
    def from_dict(cls, d: dict | None, saliency_methods: Sequence[str] | None = None) -> "RegressionSettings":
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown severity-regression settings {sorted(unknown)}")
        s = cls(**d)
        s.tau, s.threshold, s.min_new_fraction = float(s.tau), float(s.threshold), float(s.min_new_fraction)
        s.dilation, s.t_max, s.patience = int(s.dilation), int(s.t_max), int(s.patience)
        if not 0 < s.tau < 1 or not 0 < s.threshold < 1:
            raise ValueError("tau and threshold must lie in (0, 1)")
        if s.dilation < 0 or not 1 <= s.t_max <= 50 or s.patience < 1:
            raise ValueError("dilation >= 0, 1 <= t_max <= 50 and patience >= 1 are required")
        if saliency_methods is not None and s.saliency not in saliency_methods:
            raise ValueError(f"saliency must be one of {tuple(saliency_methods)}")
        return s


@dataclass
class Step:
    grade_probabilities: list[float]
    lesion_probabilities: dict[str, float]
    grade: int
    new_area: int = 0
    new_area_per_lesion: dict[str, int] = field(default_factory=dict)


@dataclass
class Regression:
    images: list[np.ndarray]          # (S, S, 3) uint8, step 0 = the input
    masks: list[np.ndarray]           # per step >= 1: (S, S) uint8 label of the newly inpainted region (1-4)
    steps: list[Step]
    weak: np.ndarray                  # (4, S, S) bool: union of the regions removed per lesion
    stop_reason: str
    score: np.ndarray | None = None   # (4, S, S) float: the weak masks as a ranking (see severity_regression)


def _salient_region(sal: np.ndarray, active: list[int], threshold: float, kernel) -> np.ndarray:
    """The union of the active lesions' saliency maps at ``threshold``, each dilated by ``kernel`` (or not)."""
    region = np.zeros(sal.shape[1:], bool)
    for k in active:
        m = (sal[k] >= threshold).astype(np.uint8)
        if kernel is not None:
            m = cv2.dilate(m, kernel)
        region |= m.astype(bool)
    return region


def _credit(new: np.ndarray, owner: np.ndarray, active: list[int], sal: np.ndarray, t: int, t_max: int,
            weak: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Credit step ``t``'s removed region to the lesion owning each pixel: adds it to ``weak`` and
    ``score`` (in place, see :func:`severity_regression`) and returns the step's label map (lesion k -> k + 1)."""
    label = np.zeros(new.shape, np.uint8)
    for k in active:
        part = new & (owner == k)
        weak[k] |= part
        label[part] = k + 1
        score[k][part] = 0.5 + 0.5 * (t_max - t + np.maximum(sal[k][part], 0.01)) / t_max
    return label


def severity_regression(grade_fn: GradeFn, image: np.ndarray, fov: np.ndarray,
                        inpaint: Callable[[np.ndarray, np.ndarray], np.ndarray],
                        settings: RegressionSettings) -> Regression:
    """METHODS.md §4's loop on one working image (S, S, 3) uint8 with its field of view (S, S) bool.

    ``grade_fn(image)``: the grader's answer on an image: grade probabilities, lesion presence
    probabilities and lesion saliency maps (m, S, S) at the image's size (for TWLR's grader:
    :func:`monailabel_dr.networks.twlr.grading_probe`).

    Each step: grade the current image; the lesions whose presence probability is above ``tau`` give
    saliency maps (min-max normalised, upsampled to S); each is thresholded, dilated by ``dilation``
    px and restricted to the field of view; their union minus what was already removed is the new
    region, which alone is inpainted; then the image is regraded. A pixel of the new region is
    credited to the lesion with the highest saliency there (the weak mask of that lesion).

    ``Regression.score`` ranks the weak-mask pixels for threshold-free metrics (AUC-PR): a pixel removed
    at step t (1-based) for lesion k scores 0.5 + 0.5 (t_max - t + max(s, 0.01)) / t_max, s being its
    normalised saliency for k then; others score 0. So earlier removal ranks higher, saliency breaks
    ties within a step, and ``score > 0.5`` is exactly the weak mask.

    Stops when: the grade is 0 (``healthy``), no lesion is above tau (``no_lesion_above_tau``), the new
    region is under ``min_new_fraction`` of the field of view (``tiny_region``), the grade has not
    dropped for ``patience`` steps (``no_grade_drop``), ``t_max`` steps were taken (``t_max``). A step
    whose regrade is a higher grade than before is undone and ends the loop (``grade_increased``), so
    the recorded grades never increase.
    """
    s = image.shape[0]
    fov = fov.astype(bool)
    fov_area = max(int(fov.sum()), 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * settings.dilation + 1,) * 2) if settings.dilation else None
    removed = np.zeros((s, s), bool)
    weak = np.zeros((len(LESIONS), s, s), bool)
    score = np.zeros((len(LESIONS), s, s), np.float32)

    def grade(img: np.ndarray) -> tuple[Step, np.ndarray]:
        gp, lp, sal = grade_fn(img)
        gp = np.asarray(gp, dtype=np.float64)
        step = Step(grade_probabilities=[round(float(p), 4) for p in gp], grade=int(gp.argmax()),
                    lesion_probabilities={les: round(float(p), 4) for les, p in zip(LESIONS, lp)})
        return step, np.asarray(sal)

    current = image.copy()
    step, sal = grade(current)
    images, masks, steps = [current], [], [step]
    stalled = 0
    reason = "t_max"
    for t in range(1, settings.t_max + 1):
        if step.grade == 0:
            reason = "healthy"
            break
        active = [k for k, les in enumerate(LESIONS) if step.lesion_probabilities[les] > settings.tau]
        if not active:
            reason = "no_lesion_above_tau"
            break
        new = _salient_region(sal, active, settings.threshold, kernel) & fov & ~removed
        if new.sum() < settings.min_new_fraction * fov_area:
            reason = "tiny_region"
            break
        owner = np.asarray(active)[np.argmax(sal[active], axis=0)]
        candidate = inpaint(current, new)
        next_step, next_sal = grade(candidate)
        if next_step.grade > step.grade:
            reason = "grade_increased"
            break
        label = _credit(new, owner, active, sal, t, settings.t_max, weak, score)
        next_step.new_area = int(new.sum())
        next_step.new_area_per_lesion = {LESIONS[k]: int((label == k + 1).sum()) for k in active}
        removed |= new
        stalled = stalled + 1 if next_step.grade >= step.grade else 0
        current, step, sal = candidate, next_step, next_sal
        images.append(current)
        masks.append(label)
        steps.append(step)
        if stalled >= settings.patience:
            reason = "no_grade_drop"
            break
    else:
        reason = "t_max"
    if reason == "t_max" and step.grade == 0:
        reason = "healthy"
    return Regression(images=images, masks=masks, steps=steps, weak=weak, stop_reason=reason, score=score)
