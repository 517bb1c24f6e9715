"""Grading metrics: accuracy, quadratic weighted kappa, referable-DR AUC.

Thin, documented wrappers over scikit-learn that handle the project's
conventions (ICDR labels 0-4, -1 = unknown) and name the variant they compute.
This module knows nothing of MONAI Label.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from monailabel_dr.fundus.lesions import GRADES, REFERABLE_MIN_GRADE

GRADE_LABELS = list(range(len(GRADES)))


def _known(y_true, y_pred):
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    keep = y_true >= 0
    return y_true[keep].astype(int), y_pred[keep]


def accuracy(y_true, y_pred) -> float:
    """Fraction of exactly right grades (unknown targets, -1, are skipped)."""
    t, p = _known(y_true, y_pred)
    if t.size == 0:
        return float("nan")
    return float(np.mean(t == np.asarray(p).astype(int)))


def quadratic_weighted_kappa(y_true, y_pred) -> float:
    """Cohen's kappa with quadratic weights over the 5 ICDR grades.

    The label set is fixed to 0-4 so that the weights do not depend on which
    grades happen to occur; returns nan when undefined (e.g. no known target).
    """
    t, p = _known(y_true, y_pred)
    if t.size == 0:
        return float("nan")
    p = np.asarray(p).astype(int)
    if np.all(t == t[0]) and np.all(p == t[0]):
        return 1.0  # perfect agreement on a single class: kappa's 0/0 read as agreement
    k = cohen_kappa_score(t, p, labels=GRADE_LABELS, weights="quadratic")
    return float(k)


def referable_auc(y_true_grades, referable_scores) -> float:
    """ROC AUC of referable DR (grade >= 2) from a score; nan if only one class is present."""
    t, s = _known(y_true_grades, referable_scores)
    ref = (t >= REFERABLE_MIN_GRADE).astype(int)
    if ref.size == 0 or ref.min() == ref.max():
        return float("nan")
    return float(roc_auc_score(ref, np.asarray(s, dtype=float)))


def selection_score(y_true, grade_probs, referable_scores) -> float:
    """The grader's model-selection criterion: the mean of quadratic weighted kappa (argmax grade) and
    referable-DR AUC (the referable output). Both are on the same 0-1 scale of usefulness, and the AUC,
    a ranking over every eye, moves much less between epochs than a kappa on a few dozen eyes; nan
    parts (a single class) count 0."""
    probs = np.asarray(grade_probs, dtype=float)
    k = quadratic_weighted_kappa(y_true, probs.argmax(axis=1))
    a = referable_auc(y_true, referable_scores)
    return float(np.mean([0.0 if np.isnan(k) else k, 0.0 if np.isnan(a) else a]))


def sensitivity_specificity(y_true_grades, referable_scores, threshold: float = 0.5) -> dict:
    """Referable DR (grade >= 2) called where score >= ``threshold`` (the served operating point)."""
    t, s = _known(y_true_grades, referable_scores)
    ref = t >= REFERABLE_MIN_GRADE
    call = np.asarray(s, dtype=float) >= float(threshold)
    tp, fn = int((call & ref).sum()), int((~call & ref).sum())
    tn, fp = int((~call & ~ref).sum()), int((call & ~ref).sum())
    return {
        "threshold": float(threshold),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
    }


def _point_metrics(t: np.ndarray, probs: np.ndarray, ref: np.ndarray, threshold: float) -> dict[str, float]:
    pred = probs.argmax(axis=1)
    ss = sensitivity_specificity(t, ref, threshold)
    return {
        "accuracy": accuracy(t, pred),
        "quadratic_weighted_kappa": quadratic_weighted_kappa(t, pred),
        "referable_auc": referable_auc(t, ref),
        "referable_sensitivity": ss["sensitivity"],
        "referable_specificity": ss["specificity"],
    }


def grading_report(y_true, grade_probs, referable_scores=None, threshold: float = 0.5, groups=None,
                   n_boot: int = 0, seed: int = 0, ci: float = 0.95) -> dict:
    """All grading metrics for predicted grade probabilities (N, 5) and referable scores (N,).

    - accuracy and quadratic weighted kappa of the argmax grade; per-grade confusion matrix (rows true);
    - referable-DR (grade >= 2) AUC, and sensitivity / specificity of ``score >= threshold`` (the served
      operating point: 0.5 on the referable output);
    - with ``n_boot`` > 0, percentile bootstrap ``ci`` intervals of each, resampling ``groups`` (patients:
      both eyes of a patient go in or out together, since they are not independent) or, without
      groups, images. A resample where a metric is undefined (one class) is left out of its interval.
    """
    probs = np.asarray(grade_probs, dtype=float)
    t = np.asarray(y_true)
    if referable_scores is None:
        referable_scores = probs[:, REFERABLE_MIN_GRADE:].sum(axis=1)
    ref = np.asarray(referable_scores, dtype=float)
    keep = t >= 0
    t, probs, ref = t[keep].astype(int), probs[keep], ref[keep]
    g = None if groups is None else np.asarray(groups)[keep]
    point = _point_metrics(t, probs, ref, threshold)
    report = {
        "n": int(t.size),
        **point,
        "operating_point": sensitivity_specificity(t, ref, threshold),
        "confusion_matrix": confusion_matrix(t, probs.argmax(axis=1)).tolist(),
        "confusion_matrix_axes": "rows = true grade 0-4, columns = predicted grade 0-4",
        "grade_counts": np.bincount(t, minlength=len(GRADES)).tolist(),
    }
    if n_boot > 0 and t.size:
        report["ci95" if abs(ci - 0.95) < 1e-9 else f"ci{int(round(ci * 100))}"] = _bootstrap(
            t, probs, ref, threshold, g, n_boot, seed, ci)
        report["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed),
                               "unit": "patient" if g is not None else "image", "method": "percentile"}
    return report


def _bootstrap(t, probs, ref, threshold, groups, n_boot, seed, ci) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([i]) for i in range(t.size)]
    else:
        _, inv = np.unique(groups, return_inverse=True)
        units = [np.flatnonzero(inv == k) for k in range(inv.max() + 1)]
    samples: dict[str, list[float]] = {}
    for _ in range(int(n_boot)):
        pick = rng.integers(0, len(units), size=len(units))
        idx = np.concatenate([units[k] for k in pick])
        for name, v in _point_metrics(t[idx], probs[idx], ref[idx], threshold).items():
            if np.isfinite(v):
                samples.setdefault(name, []).append(v)
    lo, hi = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    return {name: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] for name, v in samples.items()}


def confusion_matrix(y_true, y_pred) -> np.ndarray:
    """5x5 confusion matrix, rows = true grade, columns = predicted grade (scikit-learn's, with the
    label set fixed to 0-4 so absent grades keep their row and column)."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    t, p = _known(y_true, y_pred)
    return sk_confusion_matrix(t, np.asarray(p).astype(int), labels=GRADE_LABELS)
