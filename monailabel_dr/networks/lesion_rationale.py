"""A grade from the lesions: the ICDR criteria that lesion maps can show, and a small learned model.

Input: the per-lesion statistics that ``/infer/lesion_seg`` answers (``lesions``: presence probability,
component count, area, components per quadrant, distance of the nearest component to the fovea) and the
field-of-view area. Two readings of them:

1. :func:`icdr_rule` - the International Clinical DR scale where lesions decide it:
   no lesion -> 0 (no DR); microaneurysms only -> 1 (mild); any other lesion -> 2 (moderate);
   more than ``SEVERE_HE_PER_QUADRANT`` (20) haemorrhages in each of the 4 quadrants -> 3 (severe, the
   first part of the 4-2-1 rule). Venous beading, IRMA and neovascularisation (the rest of 4-2-1 and
   proliferative DR) are not segmented, so the rule never says 4 and can under-call severe eyes.
2. :class:`LesionGradeModel` - multinomial logistic regression (scikit-learn) on :func:`lesion_features`,
   class-balanced, fitted on a training split; stored as JSON (coefficients and scaler, not a pickle), so
   a model directory holds no executable content and any scikit-learn version reads it.

:func:`rationale_text` says in words what the rule read ("HE in 4 quadrants, 31 components; EX near the
fovea"). Nothing here knows about MONAI, MONAI Label or torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from monailabel_dr.fundus.lesions import GRADES, LESIONS

SEVERE_HE_PER_QUADRANT = 20   # ICDR severe NPDR: "more than 20 intraretinal haemorrhages in each of 4 quadrants"
# "near the fovea": nearest component within 0.25 field-of-view radii, about one disc diameter on a 45 degree
# photograph (disc ~1.8 mm, FOV radius ~6.5 mm); only read when the fovea was found
NEAR_FOVEA_RADII = 0.25
FEATURES_PER_LESION = ("present", "log_components", "log_area_permille", "quadrants_with_lesion",
                       "log_max_per_quadrant", "presence_probability", "near_fovea")
FEATURE_NAMES = tuple(f"{les}_{f}" for les in LESIONS for f in FEATURES_PER_LESION)


def _quadrant_counts(stat: Mapping) -> list[int]:
    return [int(v) for v in (stat.get("components_per_quadrant") or {}).values()]


def lesion_features(lesions: Mapping[str, Mapping], fov_area_px: float, anatomical: bool = True) -> np.ndarray:
    """Feature vector (``FEATURE_NAMES`` order) from one photograph's lesion statistics."""
    out = []
    for les in LESIONS:
        st = lesions.get(les) or {}
        n = int(st.get("components", 0))
        quads = _quadrant_counts(st)
        near = st.get("nearest_to_centre")
        out += [
            float(n > 0),
            float(np.log1p(n)),
            float(np.log1p(1000.0 * float(st.get("area_px", 0)) / max(float(fov_area_px), 1.0))),
            float(sum(1 for q in quads if q > 0)),
            float(np.log1p(max(quads) if quads else 0)),
            float(st.get("presence_probability", 0.0)),
            float(anatomical and near is not None and near <= NEAR_FOVEA_RADII),
        ]
    return np.asarray(out, dtype=np.float64)


def icdr_rule(lesions: Mapping[str, Mapping]) -> tuple[int, str]:
    """``(grade, criterion)``: the ICDR grade the lesions alone support, and which criterion gave it."""
    present = {les for les in LESIONS if int((lesions.get(les) or {}).get("components", 0)) > 0}
    if not present:
        return 0, "no lesion found"
    he_quads = _quadrant_counts(lesions.get("HE") or {})
    if len(he_quads) == 4 and min(he_quads) > SEVERE_HE_PER_QUADRANT:
        return 3, f"more than {SEVERE_HE_PER_QUADRANT} haemorrhages in each of the 4 quadrants (4-2-1 rule)"
    if present == {"MA"}:
        return 1, "microaneurysms only"
    others = sorted(present - {"MA"}, key=LESIONS.index)
    return 2, f"more than microaneurysms only ({', '.join(others)}), short of the severe criteria"


def rationale_text(lesions: Mapping[str, Mapping], anatomical: bool = True) -> str:
    """One line per finding: "HE in 4 quadrants, 31 components; EX near the fovea"."""
    parts = []
    for les in LESIONS:
        st = lesions.get(les) or {}
        n = int(st.get("components", 0))
        if n == 0:
            continue
        quads = sum(1 for q in _quadrant_counts(st) if q > 0)
        txt = f"{les} in {quads} quadrant{'s' if quads != 1 else ''}, {n} component{'s' if n != 1 else ''}"
        near = st.get("nearest_to_centre")
        if anatomical and near is not None and near <= NEAR_FOVEA_RADII:
            txt += f"; {les} near the fovea"
        parts.append(txt)
    return "; ".join(parts) if parts else "no lesion found"


def combine(cnn_probs, cnn_referable, learned_probs) -> tuple[np.ndarray, np.ndarray]:
    """The CNN grader and the lesion-statistics model together: the mean of their grade probabilities, and
    of the CNN's referable output with the lesion model's P(grade >= 2). Unweighted (nothing fitted on the
    validation patients), so what the server answers is what ``monailabel-dr rationale`` evaluates."""
    cnn = np.atleast_2d(np.asarray(cnn_probs, float))
    learned = np.atleast_2d(np.asarray(learned_probs, float))
    probs = (cnn + learned) / 2
    ref = (np.asarray(cnn_referable, float).reshape(-1) + learned[:, 2:].sum(axis=1)) / 2
    return probs, ref


class LesionGradeModel:
    """Multinomial logistic regression on standardised :func:`lesion_features`, as plain arrays."""

    kind = "lesion_grade_logreg"

    def __init__(self, mean, scale, coef, intercept, classes, info: dict | None = None):
        self.mean = np.asarray(mean, float)
        self.scale = np.asarray(scale, float)
        self.coef = np.asarray(coef, float)
        self.intercept = np.asarray(intercept, float)
        self.classes = [int(c) for c in classes]
        self.info = dict(info or {})
        if self.coef.shape != (len(self.classes), len(FEATURE_NAMES)) or self.mean.shape != (len(FEATURE_NAMES),):
            raise ValueError(f"lesion grade model: coefficients {self.coef.shape} / scaler {self.mean.shape} do not "
                             f"fit {len(self.classes)} classes x {len(FEATURE_NAMES)} features")

    @classmethod
    def fit(cls, X: np.ndarray, y: Sequence[int], C: float = 1.0, info: dict | None = None) -> "LesionGradeModel":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        X = np.asarray(X, float)
        scaler = StandardScaler().fit(X)
        clf = LogisticRegression(C=float(C), class_weight="balanced", max_iter=5000)
        clf.fit(scaler.transform(X), np.asarray(y, int))
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        return cls(scaler.mean_, scale, clf.coef_, clf.intercept_, clf.classes_, info)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, 5) grade probabilities (grades never seen in training get 0)."""
        z = (np.atleast_2d(np.asarray(X, float)) - self.mean) / self.scale
        logits = z @ self.coef.T + self.intercept
        if len(self.classes) == 2 and self.coef.shape[0] == 1:   # scikit-learn's binary layout
            logits = np.concatenate([-logits, logits], axis=1) / 2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        out = np.zeros((p.shape[0], len(GRADES)))
        out[:, self.classes] = p
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "features": list(FEATURE_NAMES), "classes": self.classes,
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept.tolist(), "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LesionGradeModel":
        if d.get("kind") != cls.kind or list(d.get("features", [])) != list(FEATURE_NAMES):
            raise ValueError(f"not a {cls.kind} model of features {FEATURE_NAMES[:2]}...: kind {d.get('kind')!r}")
        return cls(d["mean"], d["scale"], d["coef"], d["intercept"], d["classes"], d.get("info"))

    def save(self, path: str) -> None:
        import os

        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "LesionGradeModel":
        with open(path) as f:
            return cls.from_dict(json.load(f))
