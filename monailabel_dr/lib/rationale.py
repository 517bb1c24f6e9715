"""Fit and evaluate the lesion-based grade (:mod:`monailabel_dr.networks.lesion_rationale`) on a graded folder.

Input: the JSON answers of ``/infer/lesion_seg`` for every photograph (``monailabel-dr infer lesion_seg
--all --output DIR`` writes ``DIR/<id>_lesion_seg.json``, i.e. exactly what the server answers) and the
folder's grades. The split is the grader's patient split (same ``val_split`` / ``split_seed``), so the
figures sit beside the CNN grader's on the same validation patients. The regularisation ``C`` is chosen
by patient-grouped 5-fold cross-validation on the *training* patients only (quadratic weighted kappa).
"""

from __future__ import annotations

import json
import os

import numpy as np

from monailabel_dr.fundus.patients import patient_id, patient_split, split_description
from monailabel_dr.metrics.grading import grading_report, quadratic_weighted_kappa
from monailabel_dr.networks.lesion_rationale import (LesionGradeModel, combine, icdr_rule, lesion_features,
                                                     rationale_text)

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
RATIONALE_FILE = "grade_rationale.json"


def _anatomical(answer: dict) -> bool:
    """Whether the answer's quadrants are around the fovea (disc and fovea found), so "near the fovea" means it."""
    return bool(str((answer.get("quadrants") or {}).get("reference", "")).startswith("fovea"))


def features_of_answer(answer: dict) -> np.ndarray:
    return lesion_features(answer["lesions"], answer.get("fov_area_px") or np.prod(answer["image_size"]),
                           _anatomical(answer))


def read_lesion_answers(folder: str, ids) -> dict[str, dict]:
    out, missing = {}, []
    for i in ids:
        p = os.path.join(folder, f"{i}_lesion_seg.json")
        if os.path.isfile(p):
            with open(p) as f:
                out[i] = json.load(f)
        else:
            missing.append(i)
    if missing:
        raise ValueError(f"{folder}: no lesion_seg answer for {len(missing)} images, e.g. {missing[:5]} "
                         f"(run `monailabel-dr infer lesion_seg --all --output {folder}` on them)")
    return out


def _choose_c(X, y, groups, seed: int = 0) -> tuple[float, dict]:
    from sklearn.model_selection import StratifiedGroupKFold

    import warnings

    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folds = list(StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed).split(X, y, groups))
    for c in C_GRID:
        pred = np.zeros(len(y), int)
        for tr, te in folds:
            pred[te] = LesionGradeModel.fit(X[tr], y[tr], C=c).predict_proba(X[te]).argmax(1)
        scores[c] = quadratic_weighted_kappa(y, pred)
    best = max(C_GRID, key=lambda c: (scores[c], -c))
    return best, {str(c): round(float(v), 4) for c, v in scores.items()}


def fit_and_evaluate(answers: dict[str, dict], grades: dict[str, int], val_split: float = 0.2, split_seed: int = 0,
                     n_boot: int = 1000, cnn_report: dict | None = None) -> tuple[LesionGradeModel, dict]:
    """Fit on the training patients, report the rule, the learned model (and, with ``cnn_report`` - an
    ``evaluate grading --split val --json`` report of the same split - the CNN and the average of the two
    models' grade probabilities) on the validation patients."""
    ids = sorted(grades)
    train_ids, val_ids = patient_split(ids, [grades[i] for i in ids], val_split, seed=split_seed)
    X = {i: features_of_answer(answers[i]) for i in ids}
    Xtr, ytr = np.stack([X[i] for i in train_ids]), np.array([grades[i] for i in train_ids])
    c, cv = _choose_c(Xtr, ytr, [patient_id(i) for i in train_ids], seed=split_seed)
    model = LesionGradeModel.fit(Xtr, ytr, C=c, info={"C": c, "cv_kappa_by_C": cv, "train_images": len(train_ids),
                                                      "split": split_description(train_ids, val_ids, split_seed)})
    yv = np.array([grades[i] for i in val_ids])
    groups = [patient_id(i) for i in val_ids]
    learned = model.predict_proba(np.stack([X[i] for i in val_ids]))
    rule = np.array([icdr_rule(answers[i]["lesions"])[0] for i in val_ids])
    onehot = np.eye(5)[rule]
    # the rule's referable score: its grade >= 2 (a hard call, so its AUC is the balanced accuracy of the call)
    report = {
        "split": split_description(train_ids, val_ids, split_seed),
        "C": c, "cv_kappa_by_C": cv,
        "rule": grading_report(yv, onehot, (rule >= 2).astype(float), groups=groups, n_boot=n_boot),
        "learned": grading_report(yv, learned, learned[:, 2:].sum(1), groups=groups, n_boot=n_boot),
    }
    if cnn_report is not None:
        per = {p["image"]: p for p in cnn_report["per_image"]}
        missing = [i for i in val_ids if i not in per]
        if missing:
            raise ValueError(f"the CNN report lacks {len(missing)} validation images, e.g. {missing[:3]}: "
                             "give an `evaluate grading --split val` report of the same folder")
        cnn = np.array([per[i]["grade_probabilities"] for i in val_ids])
        cnn_ref = np.array([per[i]["referable_probability"] for i in val_ids])
        both, both_ref = combine(cnn, cnn_ref, learned)
        report["cnn"] = grading_report(yv, cnn, cnn_ref, groups=groups, n_boot=n_boot)
        report["cnn_plus_learned"] = grading_report(yv, both, both_ref, groups=groups, n_boot=n_boot)
    report["examples"] = [{"image": i, "grade": grades[i], "rule_grade": int(r), "learned_grade": int(p.argmax()),
                           "rationale": rationale_text(answers[i]["lesions"], _anatomical(answers[i]))}
                          for i, r, p in list(zip(val_ids, rule, learned))[:12]]
    return model, report


def explain(answer: dict, model: LesionGradeModel | None, grading: dict | None = None) -> dict:
    """The rationale served with a grading answer, from a ``/infer/lesion_seg`` answer of the same photograph;
    with the CNN's ``grading`` answer and a learned model, also the two combined (:func:`combine`)."""
    grade, why = icdr_rule(answer["lesions"])
    out = {
        "text": rationale_text(answer["lesions"], _anatomical(answer)),
        "icdr_rule_grade": grade,
        "icdr_rule": why,
        "lesions": {les: {k: v for k, v in st.items() if k in ("components", "area_px", "components_per_quadrant",
                                                                "nearest_to_centre")}
                    for les, st in answer["lesions"].items()},
        "quadrant_reference": (answer.get("quadrants") or {}).get("reference"),
    }
    if model is not None:
        p = model.predict_proba(features_of_answer(answer)[None])[0]
        out["learned_grade"] = int(p.argmax())
        out["learned_grade_probabilities"] = [round(float(v), 4) for v in p]
        if grading is not None:
            both, ref = combine(grading["grade_probabilities"], grading["referable_probability"], p[None])
            out["combined_grade"] = int(both[0].argmax())
            out["combined_grade_probabilities"] = [round(float(v), 4) for v in both[0]]
            out["combined_referable_probability"] = round(float(ref[0]), 4)
    return out
