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


def grading_report(y_true, grade_probs, referable_scores=None) -> dict:
    """All grading metrics for predicted grade probabilities (N, 5)."""
    probs = np.asarray(grade_probs, dtype=float)
    pred = probs.argmax(axis=1)
    if referable_scores is None:
        referable_scores = probs[:, REFERABLE_MIN_GRADE:].sum(axis=1)
    t = np.asarray(y_true)
    return {
        "n": int((t >= 0).sum()),
        "accuracy": accuracy(t, pred),
        "quadratic_weighted_kappa": quadratic_weighted_kappa(t, pred),
        "referable_auc": referable_auc(t, referable_scores),
        "confusion_matrix": confusion_matrix(t, pred).tolist(),
    }


def confusion_matrix(y_true, y_pred) -> np.ndarray:
    """5x5 confusion matrix, rows = true grade, columns = predicted grade."""
    t, p = _known(y_true, y_pred)
    m = np.zeros((len(GRADES), len(GRADES)), dtype=int)
    np.add.at(m, (t, np.asarray(p).astype(int)), 1)
    return m
