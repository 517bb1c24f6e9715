"""Image-level label files: the grade label (``<image id>.grade.json``).

A grade label is a small JSON document saved as a MONAI Label `final` label (or
written by ``monailabel-dr import``)::

    {"grade": 2, "lesions": {"MA": true, "HE": true, "EX": false, "SE": false}}

``grade`` is the ICDR grade 0-4 (or null when only lesions are known);
``lesions`` is optional and may name any subset of MA/HE/EX/SE.  The distinct
``.grade.json`` suffix keeps the datastore from mistaking its own
``datastore_v2.json`` for an image (MONAILABEL_NOTES.md, Datastore).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from monailabel_dr.fundus.lesions import GRADES, LESIONS

GRADE_LABEL_SUFFIX = ".grade.json"

# the image-level target vector of the graders: [grade, referable, MA, HE, EX, SE]
N_TARGETS = 2 + len(LESIONS)


def make_targets(grade: int | None, lesions: dict[str, bool | int | None] | None) -> list[float]:
    """Target vector [grade, referable, MA, HE, EX, SE]; -1 marks an unknown entry."""
    from monailabel_dr.fundus.lesions import is_referable

    t = [-1.0] * N_TARGETS
    if grade is not None:
        t[0] = float(int(grade))
        t[1] = 1.0 if is_referable(int(grade)) else 0.0
    for i, name in enumerate(LESIONS):
        v = (lesions or {}).get(name)
        if v is not None:
            t[2 + i] = 1.0 if bool(v) else 0.0
    return t


class LabelFormatError(ValueError):
    """A label that cannot be used; the message is shown to users (HTTP 4xx)."""


@dataclass
class GradeLabel:
    grade: int | None
    lesions: dict[str, bool] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"grade": self.grade}
        if self.lesions:
            d["lesions"] = {k: bool(v) for k, v in self.lesions.items()}
        d.update(self.extra)
        return d


def parse_grade_label(obj: Any) -> GradeLabel:
    """Validate a decoded grade label (dict) or raise LabelFormatError."""
    if not isinstance(obj, dict):
        raise LabelFormatError('a grade label must be a JSON object like {"grade": 2, "lesions": {"MA": true}}')
    grade = obj.get("grade")
    if grade is not None:
        if isinstance(grade, bool) or not isinstance(grade, (int, str)) or not str(grade).strip().isdigit():
            raise LabelFormatError(f"grade must be an integer 0-{len(GRADES) - 1}, got {grade!r}")
        grade = int(grade)
        if not 0 <= grade < len(GRADES):
            raise LabelFormatError(f"grade must be an integer 0-{len(GRADES) - 1} (ICDR), got {grade}")
    lesions_raw = obj.get("lesions") or {}
    if not isinstance(lesions_raw, dict):
        raise LabelFormatError("lesions must be an object mapping MA/HE/EX/SE to true/false")
    lesions: dict[str, bool] = {}
    for k, v in lesions_raw.items():
        key = str(k).upper()
        if key not in LESIONS:
            raise LabelFormatError(f"unknown lesion {k!r}; expected one of {list(LESIONS)}")
        if v is None:
            continue
        if not isinstance(v, (bool, int)) or (isinstance(v, int) and v not in (0, 1)):
            raise LabelFormatError(f"lesion {key} must be true/false, got {v!r}")
        lesions[key] = bool(v)
    if grade is None and not lesions:
        raise LabelFormatError("a grade label needs a grade (0-4) or at least one lesion flag")
    extra = {k: v for k, v in obj.items() if k not in ("grade", "lesions")}
    return GradeLabel(grade=grade, lesions=lesions, extra=extra)


def read_grade_label(path: str | os.PathLike) -> GradeLabel:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LabelFormatError(f"grade label {os.path.basename(str(path))} is not valid JSON: {e}") from e
    return parse_grade_label(obj)


def write_grade_label(path: str | os.PathLike, label: GradeLabel) -> str:
    path = str(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(label.to_json(), f, indent=1)
    os.replace(tmp, path)
    return path


def is_grade_label_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(GRADE_LABEL_SUFFIX)
