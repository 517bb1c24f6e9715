"""`grading` infer task: ICDR grade probabilities, referable DR and lesion presence."""

from __future__ import annotations

import os
from typing import Any

import torch
from monailabel.interfaces.tasks.infer_v2 import InferType

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.fundus.lesions import GRADES, LESIONS, REFERABLE_MIN_GRADE
from monailabel_dr.lib.errors import BadInput, ModelNotTrained
from monailabel_dr.lib.infers.base import FundusInferTask
from monailabel_dr.lib.params import Param
from monailabel_dr.networks.attention_grader import build_grader
from monailabel_dr.networks.cam_grader import split_outputs


class GradingInfer(FundusInferTask):
    params = {"rationale": Param.boolean()}
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

    # set by the app when lesion_seg is served too: image path -> the /infer/lesion_seg answer (main.py)
    lesion_answer = None

    def writer(self, data: dict, extension=None, dtype=None):
        result = grading_result(data[self.output_label_key], data)
        result["model"] = self.model_json()
        return None, result

    @property
    def rationale_path(self) -> str:
        """``grade_rationale.json`` beside the served grading checkpoint (it travels with it), else in the model dir."""
        from monailabel_dr.lib.rationale import RATIONALE_FILE

        beside = os.path.join(os.path.dirname(os.path.abspath(self.model.serve_path)), RATIONALE_FILE)
        return beside if os.path.isfile(beside) else os.path.join(self.model.model_dir, RATIONALE_FILE)

    def __call__(self, request, callbacks=None):
        """``{"rationale": true}``: also the grade the lesions support (``lib/rationale.py``): the ICDR rule read
        off lesion_seg's per-lesion, per-quadrant statistics of the same photograph, in words, and the learned
        lesion-statistics grade when ``grade_rationale.json`` (``monailabel-dr rationale``) sits beside the served
        checkpoint or in the model dir, and the mean of the two (``combined_*``, what ``rationale`` evaluates)."""
        want = request.get("rationale", False)
        if not isinstance(want, bool):
            if str(want).lower() not in ("true", "false", "1", "0"):
                raise BadInput(f"rationale must be true or false, got {want!r}")
            want = str(want).lower() in ("true", "1")
        label, result = super().__call__(request, callbacks)
        if want:
            result["rationale"] = self._rationale(request["image"], result)
        return label, result

    def _rationale(self, image, grading: dict) -> dict:
        from monailabel_dr.lib.rationale import explain
        from monailabel_dr.networks.lesion_rationale import LesionGradeModel

        if self.lesion_answer is None:
            raise ModelNotTrained("a grade rationale needs the lesion_seg model: serve it too (--conf models all, or "
                                  "a list with grading and lesion_seg)")
        model, path = None, self.rationale_path
        if os.path.isfile(path):
            try:
                model = LesionGradeModel.load(path)
            except (ValueError, KeyError, OSError) as e:
                raise ModelNotTrained(f"{path} is not a lesion-grade model ({e}); refit it with `monailabel-dr rationale`") from e
        out = explain(self.lesion_answer(image), model, grading)
        out["learned_model"] = path if model is not None else None
        return out


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
