"""`grading` infer task: ICDR grade probabilities, referable DR and lesion presence."""

from __future__ import annotations

from typing import Any

import torch
from monailabel.interfaces.tasks.infer_v2 import InferType

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus.lesions import GRADES, LESIONS, REFERABLE_MIN_GRADE
from monailabel_dr.lib.infers.base import FundusInferTask
from monailabel_dr.networks.attention_grader import build_grader
from monailabel_dr.networks.cam_grader import split_outputs


class GradingInfer(FundusInferTask):
    """Classification result (JSON only):

    ``grade``, ``grade_name``, ``grade_probabilities`` (5), ``referable_probability``
    (the dedicated referable-DR output, the CAM paper's RDR classifier),
    ``referable_from_grades`` (P(grade >= 2) from the grade softmax), ``referable``,
    ``lesion_presence`` (MA/HE/EX/SE probabilities) and MONAI Label's
    ``prediction`` list of {idx, label, score}.
    """

    def __init__(self, name: str, model: ModelSettings, app: AppSettings):
        super().__init__(
            name=name,
            model=model,
            app=app,
            network=build_grader(model.network),
            type=InferType.CLASSIFICATION,
            labels={g: i for i, g in enumerate(GRADES)},
            description="DR grading: ICDR grade 0-4, referable DR and lesion-presence probabilities",
        )

    def writer(self, data: dict, extension=None, dtype=None):
        result = grading_result(data[self.output_label_key], data)
        result["model"] = self.model_json()
        return None, result


def grading_result(logits, data: dict) -> dict[str, Any]:
    """The grading JSON from logits (1, 10) in the grader layout (shared by `grading` and `twlr_vlm`)."""
    logits = logits if torch.is_tensor(logits) else torch.as_tensor(logits)
    out = split_outputs(logits.float().cpu())
    grade_p = out["grade"].reshape(-1).numpy().astype(float)
    grade = int(grade_p.argmax())
    ref = float(out["referable"].reshape(-1)[0])
    lesions = {n: round(float(p), 4) for n, p in zip(LESIONS, out["lesions"].reshape(-1).numpy())}
    return {
        "grade": grade,
        "grade_name": GRADES[grade],
        "grade_probabilities": [round(float(p), 4) for p in grade_p],
        "referable_probability": round(ref, 4),
        "referable_from_grades": round(float(grade_p[REFERABLE_MIN_GRADE:].sum()), 4),
        "referable": bool(ref >= 0.5),
        "lesion_presence": lesions,
        "prediction": [{"idx": i, "label": GRADES[i], "score": round(float(p), 4)} for i, p in enumerate(grade_p)],
        "image_size": [data["fundus_source"]["height"], data["fundus_source"]["width"]],
    }
