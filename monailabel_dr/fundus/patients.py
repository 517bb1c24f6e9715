"""Patients behind image ids, and a validation split that keeps each patient on one side.

Both eyes of a patient look alike (same camera, same person, usually a similar grade), so a
split by image lets validation see the other eye of a training patient and overstates every
figure. Ids that carry an eye suffix name their patient:

- ``Patient012_L`` / ``Patient012_R`` (the graded_dr folder), ``13_left`` / ``13_right`` (Kaggle EyePACS),
  ``P7-OD`` / ``P7 OS`` (clinical OD/OS), case-insensitive, separated by ``_``, ``-``, ``.`` or a space.

An id without such a suffix is its own patient (IDRiD ids, for example), so :func:`patient_split` splits by
image there; :func:`split_description` says which one was used. (The grading trainer keeps MONAI Label's
own image split for datastores whose ids carry no eye suffix at all.)

The split is :class:`sklearn.model_selection.StratifiedGroupKFold` (groups = patients, stratified by
grade, shuffled with a fixed seed) with ``round(1 / val_fraction)`` folds; fold 0 validates. It is a
function of the ids, their grades and the seed only, so the trainer, ``evaluate`` and the benches all
see the same validation patients.

Nothing here knows about MONAI Label or torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = ["EYE_SUFFIX", "has_eye_suffix", "patient_id", "patient_split", "split_description"]

# <patient><sep><eye> at the end of the id
EYE_SUFFIX = re.compile(r"^(?P<patient>.+?)[_\-. ](?P<eye>l|r|left|right|od|os)$", re.IGNORECASE)

DEFAULT_SPLIT_SEED = 0


def patient_id(image_id: str) -> str:
    """The patient part of an image id (the id itself when it carries no eye suffix)."""
    m = EYE_SUFFIX.match(str(image_id))
    return m.group("patient") if m else str(image_id)


def has_eye_suffix(image_id: str) -> bool:
    return EYE_SUFFIX.match(str(image_id)) is not None


def patient_split(ids: Sequence[str], grades: Sequence[int] | None = None, val_fraction: float = 0.2,
                  seed: int = DEFAULT_SPLIT_SEED) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)``: no patient on both sides, grades balanced across the two as far as
    the patients allow. ``val_fraction`` <= 0 gives no validation ids."""
    ids = [str(i) for i in ids]
    if val_fraction <= 0 or len(ids) < 2:
        return list(ids), []
    groups = np.array([patient_id(i) for i in ids])
    n_patients = len(set(groups.tolist()))
    n_splits = int(min(max(2, round(1.0 / float(val_fraction))), n_patients))
    if n_splits < 2:
        return list(ids), []
    y = np.zeros(len(ids), dtype=int) if grades is None else np.asarray(grades, dtype=int)
    # stratification needs each class in at least one group per fold; sklearn warns (not fails) otherwise
    from sklearn.model_selection import StratifiedGroupKFold

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
        _, val_idx = next(iter(folds.split(np.zeros(len(ids)), y, groups)))
    val = set(val_idx.tolist())
    return [i for k, i in enumerate(ids) if k not in val], [i for k, i in enumerate(ids) if k in val]


def split_description(train_ids: Sequence[str], val_ids: Sequence[str], seed: int = DEFAULT_SPLIT_SEED) -> dict:
    """What a trainer records in its stats about the split it used."""
    all_ids = list(train_ids) + list(val_ids)
    by_patient = any(has_eye_suffix(i) for i in all_ids)
    train_p = {patient_id(i) for i in train_ids}
    val_p = {patient_id(i) for i in val_ids}
    return {
        "kind": "patient" if by_patient else "image",
        "rule": ("StratifiedGroupKFold by grade, groups = patient (id without its _L/_R eye suffix), fold 0 validates"
                 if by_patient else "StratifiedGroupKFold by grade, one image per group (ids carry no eye suffix)"),
        "seed": int(seed),
        "train_images": len(train_ids),
        "val_images": len(val_ids),
        "train_patients": len(train_p),
        "val_patients": len(val_p),
        "shared_patients": len(train_p & val_p),
    }
